//! The runner: applies the time-to-result rules (RULES.md) to a plan and
//! appends one record per trial.
//!
//! For each (workload, variant) it loads once (untimed), then for each trial
//! prepares the trial's shared data once (untimed, seeded identically for
//! every entry), then for each configuration: untimed set-up, the timed
//! [`Job::run`] between two synchronised clock reads, untimed evaluation.
//! Errors and panics in any step become a record with infinity and the
//! reason; the suite goes on, and the run reports them at its end
//! ([`RunSummary::failed`]). `--resume` retries such trials; a trial that
//! missed its target or budget is a result and stays.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use workloads::clock::{Clock, Stopwatch};
use workloads::{
    seed, Device, Entry, Job, LoadContext, Params, Profile, TrialContext, TrialData, WorkloadError,
};

use crate::fingerprint::Fingerprint;
use crate::plan::{Shard, Unit};
use crate::records::{self, RecordWriter, RunInfo, Status, TrialKey, TrialRecord, WorkloadVersion};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub profile: Profile,
    /// Trials per configuration.
    pub trials: u32,
    pub seed: u64,
    pub device: Device,
    pub out: PathBuf,
    pub resume: bool,
    pub quiet: bool,
    pub shard: Option<Shard>,
    pub command_line: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Records(#[from] records::RecordsError),
    #[error("output directory {dir}: {problem}")]
    Out { dir: PathBuf, problem: String },
    #[error(transparent)]
    Workload(#[from] WorkloadError),
}

/// What a finished run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunSummary {
    pub recorded: usize,
    pub skipped: usize,
    pub reached: usize,
    /// A torn record dropped by `--resume` (the trial in flight at a kill).
    pub dropped_torn: Option<String>,
    /// Trials that `--resume` ran again because they had ended in an error
    /// or a panic.
    pub retried: usize,
    /// The trials of this invocation that ended in an error or a panic:
    /// which (workload / variant / entry [params] trial) and the reason.
    pub failed: Vec<(String, String)>,
    /// Failed trials of the directory outside a resume's plan (another
    /// --entry, say): still recorded, not run again.
    pub failed_outside: usize,
}

/// Everything a run needs from its environment; tests pass a mock clock
/// and a fixed fingerprint.
pub struct Env<'a> {
    pub clock: &'a dyn Clock,
    pub fingerprint: Fingerprint,
    pub git_commit: String,
    pub now: &'a dyn Fn() -> String,
}

/// The current time as RFC 3339 (UTC, seconds).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Checks `--out` before anything runs: creatable, writable, and either
/// fresh or (with `--resume`) a run of the same settings.
pub fn prepare_out(opts: &RunOptions) -> Result<(), RunError> {
    let dir = &opts.out;
    let out_err = |problem: String| RunError::Out {
        dir: dir.clone(),
        problem,
    };
    if dir.exists() && !dir.is_dir() {
        return Err(out_err(
            "exists and is not a directory; choose another --out".into(),
        ));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| out_err(format!("cannot create it ({e}); choose a writable --out")))?;
    let probe = dir.join(format!(".write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .map_err(|e| out_err(format!("not writable ({e}); choose a writable --out")))?;
    let _ = std::fs::remove_file(&probe);
    let has_records = dir.join(records::RECORDS_JSONL).exists();
    if !has_records && records::csv_rows(dir)? > 0 {
        return Err(out_err(format!(
            "holds rows in {} but no {}: its records were lost or moved (raw.csv cannot \
             rebuild them); restore {} from a copy of the run, or choose a new --out",
            records::RAW_CSV,
            records::RECORDS_JSONL,
            records::RECORDS_JSONL
        )));
    }
    if has_records && !dir.join(records::RUN_JSON).exists() {
        return Err(out_err(format!(
            "holds records but no {}: without it the run's settings are unknown; restore it \
             from a copy of the run, or choose a new --out",
            records::RUN_JSON
        )));
    }
    if has_records && !opts.resume {
        return Err(out_err(
            "already holds records; pass --resume to continue that run, or choose a new --out"
                .into(),
        ));
    }
    if has_records {
        let info = records::read_run_info(dir)?;
        let same = info.profile == opts.profile.as_str()
            && info.seed == opts.seed
            && info.trials == opts.trials
            && info.device == opts.device.to_string()
            && info.shard == opts.shard.map(|s| s.to_string());
        if !same {
            let shard =
                |s: Option<String>| s.map_or(", no shard".into(), |s| format!(", shard {s}"));
            return Err(out_err(format!(
                "holds a run with profile {}, seed {}, {} trials on {}{}; --resume needs the same \
                 settings (and the same shard)",
                info.profile,
                info.seed,
                info.trials,
                info.device,
                shard(info.shard.clone())
            )));
        }
    }
    Ok(())
}

/// Adds the workloads of `units` that `seen` lacks, in plan order.
fn add_workloads(seen: &mut Vec<WorkloadVersion>, units: &[Unit]) {
    for u in units {
        let s = u.workload.spec();
        if !seen.iter().any(|w| w.id == s.id) {
            seen.push(WorkloadVersion {
                id: s.id.into(),
                version: s.version,
            });
        }
    }
}

/// The identity of one trial of `unit` (see [`TrialRecord::key`]): what
/// `--resume` skips, or runs again after a failure.
fn trial_key(unit: &Unit, params: &Params, trial: u32) -> TrialKey {
    TrialKey {
        workload: unit.workload.spec().id.into(),
        variant: unit.variant.id.into(),
        entry: unit.entry.id.into(),
        params: params.to_string(),
        trial,
    }
}

/// Runs `units` into `opts.out` (which [`prepare_out`] has checked).
pub fn run(units: &[Unit], opts: &RunOptions, env: &Env<'_>) -> Result<RunSummary, RunError> {
    let dir = &opts.out;
    let mut summary = RunSummary::default();
    let (done, run_id) = if opts.resume && dir.join(records::RECORDS_JSONL).exists() {
        let (mut existing, torn) = records::recover(dir)?;
        summary.dropped_torn = torn;
        let mut info = records::read_run_info(dir)?;
        // A resume may add workloads to the run (a wider selection): its
        // run.json then lists them too.
        let before = info.workloads.len();
        add_workloads(&mut info.workloads, units);
        if info.workloads.len() > before {
            records::write_run_info(dir, &info)?;
        }
        // Trials of this plan that failed (a missing asset, say) run
        // again; their records go, so that the directory holds each trial
        // once. Failed trials outside the plan (another --entry, say) stay.
        let planned: HashSet<TrialKey> = units
            .iter()
            .flat_map(|u| {
                u.variant
                    .configs(u.entry)
                    .into_iter()
                    .flat_map(move |p| (0..opts.trials).map(move |trial| trial_key(u, &p, trial)))
            })
            .collect();
        let before = existing.len();
        existing.retain(|r| !(r.status.is_failure() && planned.contains(&r.key())));
        summary.retried = before - existing.len();
        summary.failed_outside = existing.iter().filter(|r| r.status.is_failure()).count();
        if summary.retried > 0 {
            records::write_all(dir, &existing)?;
        }
        (
            existing
                .iter()
                .map(TrialRecord::key)
                .collect::<HashSet<_>>(),
            info.run_id,
        )
    } else {
        let started = (env.now)();
        let run_id = format!(
            "{}-{}",
            started.replace([':', '-'], "").trim_end_matches('Z'),
            &env.fingerprint.hardware_id[..6]
        );
        let mut seen = Vec::new();
        add_workloads(&mut seen, units);
        let info = RunInfo {
            schema_version: records::SCHEMA_VERSION,
            run_id: run_id.clone(),
            command_line: opts.command_line.clone(),
            bench_suite_version: env!("CARGO_PKG_VERSION").into(),
            workloads: seen,
            profile: opts.profile.as_str().into(),
            trials: opts.trials,
            seed: opts.seed,
            device: opts.device.to_string(),
            shard: opts.shard.map(|s| s.to_string()),
            started_at: started,
            git_commit: env.git_commit.clone(),
            fingerprint: env.fingerprint.clone(),
            merged_from: Vec::new(),
        };
        records::write_run_info(dir, &info)?;
        (HashSet::new(), run_id)
    };
    let mut writer = RecordWriter::open(dir)?;

    let total: u64 = units
        .iter()
        .map(|u| u.variant.configs(u.entry).len() as u64 * u64::from(opts.trials))
        .sum();
    let bar = progress_bar(total, opts.quiet);

    // Units arrive grouped by (workload, variant) in registry order.
    let mut start = 0;
    while start < units.len() {
        let head = units[start];
        let end = start
            + units[start..]
                .iter()
                .take_while(|u| {
                    u.workload.spec().id == head.workload.spec().id
                        && u.variant.id == head.variant.id
                })
                .count();
        let group = &units[start..end];
        start = end;

        let ctx = Ctx {
            opts,
            env,
            run_id: &run_id,
            head,
        };
        let configs: Vec<(Unit, Params)> = group
            .iter()
            .flat_map(|u| u.variant.configs(u.entry).into_iter().map(move |p| (*u, p)))
            .collect();
        let pending = |trial: u32| {
            configs
                .iter()
                .filter(|(u, p)| !done.contains(&trial_key(u, p, trial)))
                .collect::<Vec<_>>()
        };
        if (0..opts.trials).all(|t| pending(t).is_empty()) {
            summary.skipped += configs.len() * opts.trials as usize;
            bar.inc(configs.len() as u64 * u64::from(opts.trials));
            continue;
        }
        bar.set_message(format!(
            "{} / {}: loading",
            head.workload.spec().id,
            head.variant.id
        ));
        let loaded = guarded(|| {
            head.workload.load(&LoadContext {
                variant: head.variant,
                profile: opts.profile,
                device: opts.device,
                seed: seed::variant_seed(opts.seed, head.workload.spec().id, head.variant.id),
            })
        });
        for trial in 0..opts.trials {
            let todo = pending(trial);
            summary.skipped += configs.len() - todo.len();
            bar.inc((configs.len() - todo.len()) as u64);
            if todo.is_empty() {
                continue;
            }
            let trial_seed =
                seed::trial_seed(opts.seed, head.workload.spec().id, head.variant.id, trial);
            let data = match &loaded {
                Ok(l) => guarded(|| {
                    l.trial(&TrialContext {
                        variant: head.variant,
                        profile: opts.profile,
                        device: opts.device,
                        trial,
                        seed: trial_seed,
                    })
                }),
                Err(f) => Err(f.clone()),
            };
            for (unit, params) in todo {
                bar.set_message(format!("{} [{}] trial {}", unit.label(), params, trial + 1));
                let started_at = (env.now)();
                let result = match &data {
                    Ok(d) => run_config(d.as_ref(), unit.entry, params, env.clock, ctx.budget()),
                    Err(f) => Attempt::failed(f.clone()),
                };
                let record = ctx.record(unit.entry, params, trial, trial_seed, started_at, result);
                if record.status.is_failure() {
                    summary.failed.push((
                        format!("{} [{}] trial {}", unit.label(), params, trial),
                        record.reason.clone(),
                    ));
                }
                summary.recorded += 1;
                summary.reached += usize::from(record.reached);
                writer.append(&record)?;
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    Ok(summary)
}

fn progress_bar(total: u64, quiet: bool) -> ProgressBar {
    let target = if quiet {
        ProgressDrawTarget::hidden()
    } else {
        // Hidden automatically when stderr is not a terminal.
        ProgressDrawTarget::stderr()
    };
    let bar = ProgressBar::with_draw_target(Some(total), target);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} trials  {wide_msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// A failure of a step outside the timed job, kept for every record it hits.
#[derive(Debug, Clone)]
struct Failure {
    status: Status,
    reason: String,
}

/// Runs `f`, turning an error or a panic into a [`Failure`].
fn guarded<T>(f: impl FnOnce() -> Result<T, WorkloadError>) -> Result<T, Failure> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure {
            status: match e {
                WorkloadError::OverBudget { .. } => Status::OverBudget,
                _ => Status::Error,
            },
            reason: e.to_string(),
        }),
        Err(payload) => Err(Failure {
            status: Status::Panicked,
            reason: format!("panicked: {}", panic_message(&payload)),
        }),
    }
}

fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

/// What one configuration's trial produced.
struct Attempt {
    outcome: Result<workloads::Outcome, Failure>,
    wall_s: f64,
}

impl Attempt {
    fn failed(f: Failure) -> Self {
        Attempt {
            outcome: Err(f),
            wall_s: 0.0,
        }
    }
}

/// Untimed set-up, timed run, untimed evaluation of one configuration.
fn run_config(
    data: &dyn TrialData,
    entry: &Entry,
    params: &Params,
    clock: &dyn Clock,
    budget_s: f64,
) -> Attempt {
    let mut job: Box<dyn Job + '_> = match guarded(|| data.setup(entry, params)) {
        Ok(job) => job,
        Err(f) => return Attempt::failed(f),
    };
    let mut stopwatch = Stopwatch::new(clock, budget_s);
    let ran = guarded(|| {
        stopwatch.start();
        let r = job.run(&mut stopwatch);
        stopwatch.stop();
        r
    });
    let wall_s = stopwatch.elapsed();
    let outcome = ran.and_then(|()| guarded(move || job.evaluate()));
    Attempt { outcome, wall_s }
}

struct Ctx<'a> {
    opts: &'a RunOptions,
    env: &'a Env<'a>,
    run_id: &'a str,
    head: Unit,
}

impl Ctx<'_> {
    fn budget(&self) -> f64 {
        self.head.variant.budget.seconds(self.opts.profile)
    }

    /// Applies the rules: reached iff the quality meets the target and the
    /// timed part stayed within budget; every other trial scores infinity.
    fn record(
        &self,
        entry: &Entry,
        params: &Params,
        trial: u32,
        seed: u64,
        started_at: String,
        attempt: Attempt,
    ) -> TrialRecord {
        let spec = self.head.workload.spec();
        let target = self.head.variant.target.value;
        let budget_s = self.budget();
        let (quality, status, reason, figures, note, time) = match attempt.outcome {
            Err(f) => (
                None,
                f.status,
                f.reason,
                Default::default(),
                None,
                f64::INFINITY,
            ),
            Ok(o) => {
                let time = o.measured_time_s.unwrap_or(attempt.wall_s);
                let (status, reason) = if attempt.wall_s > budget_s {
                    (
                        Status::OverBudget,
                        format!(
                            "timed part took {:.3} s of a {budget_s} s budget",
                            attempt.wall_s
                        ),
                    )
                } else if !spec.metric.reached(o.quality, target) {
                    (
                        Status::MissedTarget,
                        format!(
                            "{} = {} misses the target {target}",
                            spec.metric.name, o.quality
                        ),
                    )
                } else {
                    (Status::Reached, String::new())
                };
                (Some(o.quality), status, reason, o.figures, o.note, time)
            }
        };
        let reached = status == Status::Reached;
        TrialRecord {
            schema_version: records::SCHEMA_VERSION,
            run_id: self.run_id.into(),
            workload: spec.id.into(),
            workload_version: spec.version,
            variant: self.head.variant.id.into(),
            entry: entry.id.into(),
            entry_kind: entry.kind.as_str().into(),
            params: params.to_string(),
            trial,
            seed,
            device: self.opts.device.to_string(),
            hardware_id: self.env.fingerprint.hardware_id.clone(),
            quality_metric: spec.metric.name.into(),
            quality: quality.filter(|q| q.is_finite()),
            target,
            reached,
            time_to_result_s: if reached { time } else { f64::INFINITY },
            budget_s,
            status,
            started_at,
            git_commit: self.env.git_commit.clone(),
            wall_s: attempt.wall_s,
            reason,
            figures: figures.into_iter().filter(|(_, v)| v.is_finite()).collect(),
            note,
        }
    }
}

/// The default `--out`: `results/runs/<date>-<host>-<device>`.
pub fn default_out(fp: &Fingerprint, device: Device) -> PathBuf {
    let date = now_rfc3339()[..10].to_string();
    let host: String = fp
        .hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    Path::new("results/runs").join(format!(
        "{date}-{host}-{}",
        fp.device_label(device.is_cuda())
    ))
}
