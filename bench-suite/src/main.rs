//! The `bench-suite` binary: argument parsing and wiring only.
//!
//! Exit codes: 0 success; 1 a run failed to write, or `compare` found a
//! regression; 2 bad input (unknown workload, variant, entry or device,
//! malformed flag, unusable `--out`, missing or corrupt results file).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use workloads::{Device, Profile, WORKLOADS};

use bench_suite::fingerprint::{self, Fingerprint};
use bench_suite::pairs::{self, PairOptions};
use bench_suite::plan::{self, Selection, Shard};
use bench_suite::records;
use bench_suite::report::{self, ReportInput};
use bench_suite::runner::{self, Env, RunOptions};
use bench_suite::{compare, merge, predict, summary};

#[derive(Parser)]
#[command(
    name = "bench-suite",
    version,
    about = "Reproduce and compare efficiency methods under time-to-result rules"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List workloads, variants, entries, targets and budgets.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Run one workload.
    Run {
        /// Workload id (see `bench-suite list`).
        workload: String,
        #[command(flatten)]
        opts: RunArgs,
    },
    /// Run the whole registry, or one shard of it.
    Suite {
        #[command(flatten)]
        opts: RunArgs,
        /// Run only the I-th of N deterministic shares of the suite's
        /// (workload, variant, entry) units, 1 <= I <= N.
        #[arg(long, value_name = "I/N", value_parser = parse_shard)]
        shard: Option<Shard>,
    },
    /// Merge the result directories of shards into one.
    Merge {
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Render summary.md and charts from saved records (never re-runs).
    Report {
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Where to write; defaults to the first directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Put results from different hardware in one report, each labelled.
        #[arg(long)]
        allow_mixed_hardware: bool,
    },
    /// Compare two result directories; exits 1 on a regression.
    Compare {
        base: PathBuf,
        new: PathBuf,
        /// Largest tolerated growth of a median time-to-result, in percent.
        #[arg(long, default_value_t = 10.0, value_parser = parse_threshold)]
        threshold: f64,
        #[arg(long)]
        allow_mixed_hardware: bool,
    },
    /// The trials two result directories share (same workload, variant,
    /// entry, params, trial and seed), side by side: quality, target
    /// decisions and chosen figures, e.g. a GPU run against a CPU run.
    Pair {
        a: PathBuf,
        b: PathBuf,
        #[arg(long, default_value = "A")]
        label_a: String,
        #[arg(long, default_value = "B")]
        label_b: String,
        /// A figure to show per pair (repeatable), e.g. answer_logp.
        #[arg(long)]
        figure: Vec<String>,
        /// A prefix of 0/1 figures to count differences of, e.g. acc_c.
        #[arg(long)]
        cells: Option<String>,
    },
    /// Predict SpecTr's GPU speedup from a CPU run's call counts and
    /// per-call costs measured on a GPU (scripts/spectr_gpu_costs.py).
    PredictSpectr {
        /// Result directory of a `bench-suite run spectr` (its records).
        records: PathBuf,
        /// A gpu-costs.csv written by scripts/spectr_gpu_costs.py
        /// (repeatable; its gpu-costs.json is read from beside it).
        #[arg(long, required = true)]
        costs: Vec<PathBuf>,
        #[arg(long, default_value = "qwen2.5-coder-0.5b-1.5b")]
        variant: String,
        /// Model names of the draft and target in the cost files.
        #[arg(long, default_value = "qwen2.5-coder-0.5b")]
        draft_model: String,
        #[arg(long, default_value = "qwen2.5-coder-1.5b")]
        target_model: String,
        /// Directory for gpu-prediction.md and gpu-prediction.csv.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print this machine's hardware fingerprint.
    Env {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Variants to run (repeatable); default: those the profile runs.
    #[arg(long = "variant", value_name = "V")]
    variants: Vec<String>,
    /// Entries to run (repeatable); default: all.
    #[arg(long = "entry", value_name = "E")]
    entries: Vec<String>,
    /// Trials per configuration; default: 2 in quick, 5 in full.
    #[arg(long, allow_negative_numbers = true, value_parser = parse_trials)]
    trials: Option<u32>,
    #[arg(long, default_value = "quick", value_parser = parse_profile)]
    profile: Profile,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: Device,
    /// Suite seed; trial seeds are derived from it.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = parse_seed)]
    seed: u64,
    /// Output directory; default: results/runs/<date>-<host>-<device>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue an interrupted run in --out, skipping recorded trials.
    #[arg(long)]
    resume: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Do not render the report after the run.
    #[arg(long)]
    no_report: bool,
}

fn parse_profile(s: &str) -> Result<Profile, String> {
    s.parse()
}

fn parse_device(s: &str) -> Result<Device, String> {
    s.parse()
}

fn parse_shard(s: &str) -> Result<Shard, String> {
    s.parse()
}

fn parse_threshold(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!(
            "threshold `{s}` must be a non-negative percentage, e.g. 10"
        )),
    }
}

fn parse_trials(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "trials `{s}` must be a whole number of at least 1, e.g. 5"
        )),
    }
}

fn parse_seed(s: &str) -> Result<u64, String> {
    s.parse::<u64>()
        .map_err(|_| format!("seed `{s}` must be a non-negative whole number, e.g. 0"))
}

/// Bad input: exit 2.
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// `{:#}`: an anyhow error's causes too (a context alone names no reason).
fn usage(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(Usage(format!("{e:#}")))
}

enum Done {
    Ok,
    Regression,
    /// A run whose every trial is recorded, some of them failed (an error
    /// or a panic: a missing asset, say). Exit 1.
    TrialsFailed,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(Done::Ok) => ExitCode::SUCCESS,
        Ok(Done::Regression | Done::TrialsFailed) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<Usage>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<Done> {
    match cli.command {
        Command::List { json } => {
            if json {
                let specs: Vec<_> = WORKLOADS.iter().map(|w| w.spec()).collect();
                println!("{}", serde_json::to_string_pretty(&specs)?);
            } else {
                print!("{}", list_text());
            }
            Ok(Done::Ok)
        }
        Command::Run { workload, opts } => {
            let selection = Selection {
                workloads: vec![workload],
                variants: opts.variants.clone(),
                entries: opts.entries.clone(),
            };
            run(selection, opts, None)
        }
        Command::Suite { opts, shard } => {
            let selection = Selection {
                workloads: vec![],
                variants: opts.variants.clone(),
                entries: opts.entries.clone(),
            };
            run(selection, opts, shard)
        }
        Command::PredictSpectr {
            records: dir,
            costs: files,
            variant,
            draft_model,
            target_model,
            out,
        } => {
            let (recs, _) = read_results(&dir)?;
            let calls = predict::calls(&recs, &variant).map_err(usage)?;
            let mut costs = predict::Costs::default();
            for f in &files {
                costs.add_file(f).map_err(usage)?;
            }
            let predictions = predict::predict(&calls, &costs, &draft_model, &target_model);
            if predictions.is_empty() {
                return Err(usage(format!(
                    "the cost files hold no cost model measured for both `{draft_model}` and \
                     `{target_model}`; check --draft-model and --target-model"
                )));
            }
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let unreached = predict::unreached(&recs, &variant);
            let md = predict::render(
                &calls,
                &unreached,
                &predictions,
                &costs,
                &dir.display().to_string(),
            );
            records::write_atomic(&out.join("gpu-prediction.md"), md.as_bytes())?;
            records::write_atomic(
                &out.join("gpu-prediction.csv"),
                predict::to_csv(&predictions).as_bytes(),
            )?;
            print!("{md}");
            Ok(Done::Ok)
        }
        Command::Merge { dirs, out } => {
            let n = merge::merge(&dirs, &out).map_err(usage)?;
            eprintln!(
                "merged {n} records from {} directories into {}",
                dirs.len(),
                out.display()
            );
            Ok(Done::Ok)
        }
        Command::Report {
            dirs,
            out,
            allow_mixed_hardware,
        } => {
            let out = match out {
                Some(out) => {
                    check_report_out(&dirs, &out).map_err(usage)?;
                    out
                }
                None if dirs.len() > 1 => {
                    return Err(usage(
                        "a report of several directories needs --out (a new or empty \
                         directory): written into one of them, it would not describe that \
                         directory's own records",
                    ))
                }
                None => dirs[0].clone(),
            };
            let files = render_report(&dirs, &out, allow_mixed_hardware)?;
            eprintln!(
                "wrote {} files; summary: {}",
                files.len(),
                out.join("summary.md").display()
            );
            Ok(Done::Ok)
        }
        Command::Compare {
            base,
            new,
            threshold,
            allow_mixed_hardware,
        } => {
            let (b, _) = read_results(&base)?;
            let (n, _) = read_results(&new)?;
            let bg = summary::summarise(&b, false).map_err(usage)?;
            let ng = summary::summarise(&n, false).map_err(usage)?;
            if bg[0].hardware_id != ng[0].hardware_id && !allow_mixed_hardware {
                return Err(usage(format!(
                    "{} ran on hardware {} and {} on {}: times from different machines are not comparable; pass --allow-mixed-hardware to compare anyway",
                    base.display(),
                    bg[0].hardware_id,
                    new.display(),
                    ng[0].hardware_id
                )));
            }
            let changes = compare::compare(&bg[0], &ng[0], threshold);
            if changes.is_empty() {
                let (only_base, only_new) = compare::unmatched(&bg[0], &ng[0]);
                return Err(usage(format!(
                    "{} and {} share no configuration (workload, variant, entry and params) to \
                     compare: the base run has {} (first: {}), the new run {} (first: {}); \
                     compare two runs of the same selection",
                    base.display(),
                    new.display(),
                    only_base.len(),
                    only_base.first().map_or("-", String::as_str),
                    only_new.len(),
                    only_new.first().map_or("-", String::as_str),
                )));
            }
            print!("{}", compare::render(&changes, threshold));
            let (only_base, only_new) = compare::unmatched(&bg[0], &ng[0]);
            for (side, dir, only) in [("base", &base, &only_base), ("new", &new, &only_new)] {
                if !only.is_empty() {
                    eprintln!(
                        "note: {} configuration(s) only in the {side} run {} were not compared: {}",
                        only.len(),
                        dir.display(),
                        only.join(", ")
                    );
                }
            }
            let regressions = changes.iter().filter(|c| c.regression).count();
            if regressions > 0 {
                eprintln!("{regressions} regression(s) beyond {threshold}%");
                Ok(Done::Regression)
            } else {
                Ok(Done::Ok)
            }
        }
        Command::Pair {
            a,
            b,
            label_a,
            label_b,
            figure,
            cells,
        } => {
            let (ra, _) = read_results(&a)?;
            let (rb, _) = read_results(&b)?;
            let o = PairOptions {
                labels: (label_a, label_b),
                figures: figure,
                cells,
            };
            print!("{}", pairs::render(&ra, &rb, &o).map_err(usage)?);
            Ok(Done::Ok)
        }
        Command::Env { json } => {
            let fp = Fingerprint::detect();
            if json {
                println!("{}", serde_json::to_string_pretty(&fp)?);
            } else {
                println!("hardware_id: {}", fp.hardware_id);
                println!(
                    "cpu: {} ({} cores, {} decoder kernels)",
                    fp.cpu_model, fp.cpu_cores, fp.cpu_kernels
                );
                println!("memory: {:.1} GiB", fp.memory_gib);
                if fp.gpus.is_empty() {
                    println!("gpu: none");
                }
                for g in &fp.gpus {
                    println!(
                        "gpu: {} ({} MiB, driver {}, CUDA {})",
                        g.name, g.memory_mib, g.driver, g.cuda
                    );
                }
                println!("os: {} (kernel {})", fp.os, fp.kernel);
                println!("host: {}", fp.hostname);
                println!("commit: {}", fingerprint::git_commit());
            }
            Ok(Done::Ok)
        }
    }
}

fn run(selection: Selection, opts: RunArgs, shard: Option<Shard>) -> anyhow::Result<Done> {
    let units = plan::plan(WORKLOADS, &selection, opts.profile, opts.device).map_err(usage)?;
    let left_out = plan::left_out(WORKLOADS, &selection, opts.profile, opts.device);
    if !left_out.is_empty() {
        eprintln!(
            "note: left out on {}, as they have no GPU form yet (run them with --device cpu): {}",
            opts.device,
            left_out.join(", ")
        );
    }
    let units = plan::shard(units, shard);
    if units.is_empty() {
        // More shards than units: this shard has nothing to do.
        eprintln!(
            "shard {} has no units (the suite has fewer units than shards)",
            shard.map_or(String::new(), |s| s.to_string())
        );
        return Ok(Done::Ok);
    }
    let clock = opts.device.clock().map_err(usage)?;
    let fp = Fingerprint::detect();
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| runner::default_out(&fp, opts.device));
    let run_opts = RunOptions {
        profile: opts.profile,
        trials: opts.trials.unwrap_or(opts.profile.default_trials()),
        seed: opts.seed,
        device: opts.device,
        out: out.clone(),
        resume: opts.resume,
        quiet: opts.quiet,
        shard,
        command_line: std::env::args().collect(),
    };
    runner::prepare_out(&run_opts).map_err(usage)?;
    // Ctrl-C or SIGTERM: say where the finished trials are and how to go
    // on. Each record is flushed as its trial ends, and --resume drops the
    // one in flight if it was torn.
    let at = out.display().to_string();
    let _ = ctrlc::set_handler(move || {
        eprintln!(
            "\ninterrupted: the trials finished so far are in '{at}'; to continue, rerun the \
             same command with --resume (and --out '{at}' if it had no --out)"
        );
        std::process::exit(130);
    });
    let env = Env {
        clock: clock.as_ref(),
        fingerprint: fp,
        git_commit: fingerprint::git_commit(),
        now: &runner::now_rfc3339,
    };
    let done = runner::run(&units, &run_opts, &env).map_err(|e| match e {
        // A damaged results directory is bad input.
        runner::RunError::Records(records::RecordsError::Malformed { .. })
        | runner::RunError::Records(records::RecordsError::Invalid(_)) => usage(e),
        e => anyhow::Error::new(e).context("run failed"),
    })?;
    if done.retried > 0 {
        eprintln!(
            "resume: ran again {} trial(s) that had ended in an error or a panic",
            done.retried
        );
    }
    if let Some(torn) = &done.dropped_torn {
        eprintln!(
            "resume: dropped an incomplete last record (the trial in flight when the run stopped; it was rerun): {}",
            torn.chars().take(120).collect::<String>()
        );
    }
    eprintln!(
        "{} trials recorded ({} reached the target), {} already recorded; results in {}",
        done.recorded,
        done.reached,
        done.skipped,
        out.display()
    );
    if !opts.no_report {
        render_report(std::slice::from_ref(&out), &out, false)?;
        eprintln!("report: {}", out.join("summary.md").display());
    }
    if done.failed_outside > 0 {
        eprintln!(
            "note: {} failed trial(s) outside this selection stay recorded in {}; resume with \
             the run's full selection to run them again",
            done.failed_outside,
            out.display()
        );
    }
    if done.failed.is_empty() {
        return Ok(Done::Ok);
    }
    eprint!("{}", failure_report(&done.failed, &out));
    Ok(Done::TrialsFailed)
}

/// The trials that failed, one paragraph per distinct reason (the first
/// trial that gave it and how many did), and how to retry them.
fn failure_report(failed: &[(String, String)], out: &std::path::Path) -> String {
    let mut reasons: Vec<(&str, &str, usize)> = Vec::new();
    for (trial, reason) in failed {
        match reasons.iter_mut().find(|(r, _, _)| r == reason) {
            Some(x) => x.2 += 1,
            None => reasons.push((reason, trial, 1)),
        }
    }
    let mut s = format!(
        "error: {} trial(s) failed (an error or a panic, recorded as infinity):\n",
        failed.len()
    );
    for (reason, first, n) in &reasons {
        let more = if *n > 1 {
            format!(" (and {} more trial(s) with the same reason)", n - 1)
        } else {
            String::new()
        };
        s += &format!("  {first}{more}: {reason}\n");
    }
    s += &format!(
        "fix the cause, then rerun the same command with --resume (and --out '{}' if it had no \
         --out) to run those trials again\n",
        out.display()
    );
    s
}

/// A results directory's records and run.json, checked; an error naming
/// the directory when no trial is recorded there yet.
fn read_results(
    dir: &std::path::Path,
) -> anyhow::Result<(Vec<records::TrialRecord>, records::RunInfo)> {
    let recs = records::read_dir(dir).map_err(usage)?;
    let info = records::read_run_info(dir).map_err(usage)?;
    if recs.is_empty() {
        return Err(usage(format!(
            "{}: no trial recorded yet (the run stopped before its first trial ended); \
             continue it with `run ... --out {} --resume` and its own settings, or pass another \
             directory",
            dir.display(),
            dir.display()
        )));
    }
    Ok((recs, info))
}

/// A report's `--out` must not hold records other than the report's: its
/// summary.md and charts would then describe records it does not hold. So
/// it may be the only input, or a directory without records.
fn check_report_out(dirs: &[PathBuf], out: &std::path::Path) -> Result<(), String> {
    if out.exists() && !out.is_dir() {
        return Err(format!(
            "--out {} exists and is not a directory; choose another --out",
            out.display()
        ));
    }
    let same = |d: &PathBuf| match (d.canonicalize(), out.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    let only_input = dirs.len() == 1 && same(&dirs[0]);
    if out.join(records::RECORDS_JSONL).exists() && !only_input {
        return Err(format!(
            "--out {} holds records that this report does not describe alone; choose a new or \
             empty directory (or, for one input, that input itself)",
            out.display()
        ));
    }
    Ok(())
}

fn render_report(
    dirs: &[PathBuf],
    out: &std::path::Path,
    allow_mixed: bool,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut all = Vec::new();
    let mut runs = Vec::new();
    for d in dirs {
        let (recs, info) = read_results(d)?;
        all.extend(recs);
        if info.merged_from.is_empty() {
            runs.push(info);
        } else {
            runs.extend(info.merged_from);
        }
    }
    let groups = summary::summarise(&all, allow_mixed).map_err(usage)?;
    std::fs::create_dir_all(out)
        .with_context(|| {
            format!(
                "cannot create report directory {}; choose a writable --out",
                out.display()
            )
        })
        .map_err(usage)?;
    report::write_report(
        &ReportInput {
            groups: &groups,
            runs: &runs,
            registry: WORKLOADS,
        },
        out,
    )
}

fn list_text() -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    for w in WORKLOADS {
        let spec = w.spec();
        let _ = writeln!(s, "{} (v{}): {}", spec.id, spec.version, spec.title);
        for p in spec.papers {
            let _ = writeln!(s, "  paper: {} (arXiv {}, {})", p.title, p.arxiv, p.section);
        }
        let _ = writeln!(
            s,
            "  metric: {} ({:?}): {}",
            spec.metric.name, spec.metric.direction, spec.metric.description
        );
        let _ = writeln!(s, "  variants:");
        for v in spec.variants {
            let profiles: Vec<&str> = v.profiles.iter().map(|p| p.as_str()).collect();
            let _ = writeln!(
                s,
                "    {:<28} {:?}, profiles [{}], target {} ({}), budget {} s quick / {} s full{}",
                v.id,
                v.role,
                profiles.join(", "),
                v.target.value,
                v.target.source,
                v.budget.quick_s,
                v.budget.full_s,
                if v.params.is_empty() {
                    String::new()
                } else {
                    format!(" [every configuration x {}]", axes(v.params))
                }
            );
        }
        let _ = writeln!(s, "  entries:");
        for e in spec.entries {
            let _ = writeln!(
                s,
                "    {:<28} {:<9} {}{}{}{}",
                e.id,
                e.kind.as_str(),
                if e.cuda_only { "(GPU only) " } else { "" },
                if e.cpu_only_variants.is_empty() {
                    String::new()
                } else {
                    format!("(CPU only in {}) ", e.cpu_only_variants.join(", "))
                },
                e.description,
                if e.grid.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", axes(e.grid))
                }
            );
        }
    }
    s
}

/// `k in {2, 4} x L in {2, 4}`.
fn axes(params: &[workloads::Param]) -> String {
    params
        .iter()
        .map(|p| {
            let vals: Vec<String> = p.values.iter().map(|v| v.to_string()).collect();
            format!("{} in {{{}}}", p.name, vals.join(", "))
        })
        .collect::<Vec<_>>()
        .join(" x ")
}
