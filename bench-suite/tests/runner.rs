//! The runner end to end with the mock clock and the toy workload: the
//! rules (misses are infinity, budgets stop jobs, panics are recorded),
//! medians, intervals, paired speedups, profiles and B on hand-computed
//! cases; resume after an interruption; sharding and merging; the summary
//! table as a snapshot.

mod toy;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use bench_suite::fingerprint::Fingerprint;
use bench_suite::plan::{self, Selection, Shard};
use bench_suite::records::{self, Status, TrialRecord};
use bench_suite::report::{self, ReportInput};
use bench_suite::runner::{self, Env, RunOptions, RunSummary};
use bench_suite::summary::{self, HardwareGroup};
use workloads::clock::MockClock;
use workloads::{Device, Profile};

fn fingerprint(cpu: &str) -> Fingerprint {
    Fingerprint::new(
        cpu.into(),
        2,
        24.0,
        vec![],
        "TestOS 1".into(),
        "1.0".into(),
        "test-host".into(),
    )
}

fn options(out: &Path, profile: Profile, trials: u32, shard: Option<Shard>) -> RunOptions {
    RunOptions {
        profile,
        trials,
        seed: 7,
        device: Device::Cpu,
        out: out.to_path_buf(),
        resume: false,
        quiet: true,
        shard,
        command_line: vec!["bench-suite".into(), "suite".into()],
    }
}

fn now() -> String {
    "2026-01-02T03:04:05Z".into()
}

fn run_toy(opts: &RunOptions, selection: &Selection, cpu: &str) -> RunSummary {
    let units = plan::plan(toy::REGISTRY, selection, opts.profile, opts.device).unwrap();
    let units = plan::shard(units, opts.shard);
    runner::prepare_out(opts).unwrap();
    let clock = MockClock::default();
    let env = Env {
        clock: &clock,
        fingerprint: fingerprint(cpu),
        git_commit: "abc123".into(),
        now: &now,
    };
    runner::run(&units, opts, &env).unwrap()
}

/// A finished quick run of the toy registry, 3 trials, in a new directory.
fn finished_run() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    run_toy(
        &options(dir.path(), Profile::Quick, 3, None),
        &Selection::default(),
        "cpu-a",
    );
    dir
}

fn records_of(dir: &Path) -> Vec<TrialRecord> {
    records::read_dir(dir).unwrap()
}

fn find<'a>(rs: &'a [TrialRecord], entry: &str, params: &str, trial: u32) -> &'a TrialRecord {
    rs.iter()
        .find(|r| r.entry == entry && r.params == params && r.trial == trial)
        .unwrap_or_else(|| panic!("no record {entry} {params} {trial}"))
}

#[test]
fn a_run_applies_the_rules_and_records_every_trial() {
    let dir = tempfile::tempdir().unwrap();
    let done = run_toy(
        &options(dir.path(), Profile::Quick, 3, None),
        &Selection::default(),
        "cpu-a",
    );
    // quick runs only the default variant: 7 configurations x 3 trials.
    assert_eq!(done.recorded, 21);
    assert_eq!(done.reached, 3 + 6 + 2);
    let rs = records_of(dir.path());
    assert_eq!(rs.len(), 21);
    assert!(rs.iter().all(|r| r.variant == "easy"));

    let r = find(&rs, "ref", "", 0);
    assert_eq!(
        (r.status, r.time_to_result_s, r.reached),
        (Status::Reached, 2.0, true)
    );
    assert_eq!(find(&rs, "fast", "speed=4", 2).time_to_result_s, 0.5);
    let miss = find(&rs, "miss", "", 0);
    assert_eq!(miss.status, Status::MissedTarget);
    assert!(miss.time_to_result_s.is_infinite());
    assert_eq!(miss.quality, Some(0.0));
    assert!(miss.reason.contains("misses the target"));
    let over = find(&rs, "over", "", 1);
    assert_eq!(over.status, Status::OverBudget);
    assert!(over.time_to_result_s.is_infinite());
    assert_eq!(
        over.wall_s, 10.5,
        "stopped at the first check past the 10 s budget"
    );
    let panicked = find(&rs, "panics", "", 2);
    assert_eq!(panicked.status, Status::Panicked);
    assert!(panicked.reason.contains("toy panic"));
    assert_eq!(find(&rs, "flaky", "", 1).status, Status::MissedTarget);

    // Paired data: every entry of a trial has the same seed; trials differ.
    for t in 0..3 {
        let seeds: BTreeSet<u64> = rs.iter().filter(|r| r.trial == t).map(|r| r.seed).collect();
        assert_eq!(seeds.len(), 1);
    }
    assert_ne!(find(&rs, "ref", "", 0).seed, find(&rs, "ref", "", 1).seed);
    // Figures travel in records.jsonl; raw.csv has the fixed columns.
    assert_eq!(find(&rs, "fast", "speed=2", 0).figures["work_units"], 1.0);
    let header = fs::read_to_string(dir.path().join("raw.csv")).unwrap();
    assert!(header.starts_with(&records::CSV_COLUMNS.join(",")));
    let info = records::read_run_info(dir.path()).unwrap();
    assert_eq!(
        (info.profile.as_str(), info.trials, info.seed),
        ("quick", 3, 7)
    );
}

fn summarise(dir: &Path) -> HardwareGroup {
    summary::summarise(&records_of(dir), false)
        .unwrap()
        .remove(0)
}

#[test]
fn medians_intervals_speedups_and_profiles_match_hand_computed_values() {
    let dir = finished_run();
    let g = summarise(dir.path());
    let c = |entry: &str, params: &str| {
        g.configs
            .iter()
            .find(|c| c.entry == entry && c.params == params)
            .unwrap()
            .clone()
    };
    assert_eq!(c("ref", "").median_s, 2.0);
    assert_eq!(c("ref", "").ci_s, (2.0, 2.0));
    let fast = c("fast", "speed=4");
    assert_eq!((fast.median_s, fast.successes, fast.trials), (0.5, 3, 3));
    assert_eq!(fast.speedup.as_ref().unwrap().median, 4.0);
    // flaky: times [1, inf, 1] -> median 1; paired ratios [2, 0, 2] -> 2.
    let flaky = c("flaky", "");
    assert_eq!((flaky.median_s, flaky.successes), (1.0, 2));
    assert_eq!(flaky.speedup.as_ref().unwrap().median, 2.0);
    assert!(flaky.ci_s.0 <= 1.0 && flaky.ci_s.1.is_infinite());
    // A method that always misses: median inf, speedup 0.
    let miss = c("miss", "");
    assert!(miss.median_s.is_infinite());
    assert_eq!(miss.speedup.as_ref().unwrap().median, 0.0);
    assert!(miss.failure.as_deref().unwrap().starts_with("3x score = 0"));

    // Profile over the one problem (toy/easy): best times ref 2, fast 0.5,
    // flaky 1, the rest miss; r = 4, 1, 2. B(fast) = 1, B(flaky) = (4-2)/3,
    // B(ref) = 0 up to the trapezoid's half step at tau = 4; misses 0.
    let p = &g.profiles[0];
    let b = |m: &str| p.profile.score[p.profile.methods.iter().position(|x| x == m).unwrap()];
    let tol = 3.0 / 1000.0; // one grid step of the 1,001-point tau grid
    assert!((b("fast") - 1.0).abs() <= tol);
    assert!((b("flaky") - 2.0 / 3.0).abs() <= tol);
    assert!(b("ref").abs() <= tol);
    for m in ["miss", "over", "panics"] {
        assert_eq!(b(m), 0.0);
    }
    let gm = |m: &str| p.geomean_speedup[p.profile.methods.iter().position(|x| x == m).unwrap()];
    assert_eq!(gm("fast").map(|g| g.0), Some(4.0));
}

#[test]
fn the_full_profile_adds_variants_and_held_out_variants_need_naming() {
    let dir = tempfile::tempdir().unwrap();
    run_toy(
        &options(dir.path(), Profile::Full, 2, None),
        &Selection::default(),
        "cpu-a",
    );
    let variants: BTreeSet<String> = records_of(dir.path())
        .into_iter()
        .map(|r| r.variant)
        .collect();
    assert_eq!(variants, BTreeSet::from(["easy".into(), "hard".into()]));
    let g = summarise(dir.path());
    // hard doubles every time, so the ratios and B are unchanged.
    assert_eq!(g.profiles[0].profile.problems, ["toy/easy", "toy/hard"]);
    let hard_fast = g
        .configs
        .iter()
        .find(|c| c.variant == "hard" && c.params == "speed=4")
        .unwrap();
    assert_eq!(hard_fast.median_s, 1.0);

    let named = tempfile::tempdir().unwrap();
    let sel = Selection {
        workloads: vec!["toy".into()],
        variants: vec!["secret".into()],
        entries: vec!["ref".into()],
    };
    run_toy(
        &options(named.path(), Profile::Quick, 1, None),
        &sel,
        "cpu-a",
    );
    let rs = records_of(named.path());
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].variant, "secret");
}

#[test]
fn resume_after_an_interruption_finishes_the_run_without_repeating_trials() {
    let full = finished_run();
    let expected = records_of(full.path());

    // Simulate a kill: 10 complete records, the 11th torn mid-line, and a
    // raw.csv that stopped one row earlier still.
    let cut = finished_run();
    let jsonl = fs::read_to_string(cut.path().join("records.jsonl")).unwrap();
    let lines: Vec<&str> = jsonl.lines().collect();
    let torn = format!("{}\n{}", lines[..10].join("\n"), &lines[10][..40]);
    fs::write(cut.path().join("records.jsonl"), torn).unwrap();
    let csv = fs::read_to_string(cut.path().join("raw.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    fs::write(cut.path().join("raw.csv"), rows[..10].join("\n") + "\n").unwrap();

    // Reading it without --resume is an error naming file and line.
    let err = records::read_dir(cut.path()).unwrap_err().to_string();
    assert!(
        err.contains("records.jsonl:11") && err.contains("--resume"),
        "{err}"
    );
    // A fresh run into it is refused.
    let opts = options(cut.path(), Profile::Quick, 3, None);
    assert!(runner::prepare_out(&opts)
        .unwrap_err()
        .to_string()
        .contains("--resume"));
    // So is a resume with other settings.
    let mut other = opts.clone();
    other.resume = true;
    other.seed = 8;
    assert!(runner::prepare_out(&other)
        .unwrap_err()
        .to_string()
        .contains("same settings"));

    // The panics among the 10 kept records are run again: a failed trial
    // is not a result.
    let kept_failed = lines[..10]
        .iter()
        .filter(|l| l.contains("\"status\":\"panicked\""))
        .count();
    assert!(kept_failed > 0, "the toy's panicking entry runs in trial 0");
    // A resume as another shard is refused too.
    let mut shard = opts.clone();
    shard.resume = true;
    shard.shard = Some(Shard { index: 2, count: 2 });
    assert!(runner::prepare_out(&shard)
        .unwrap_err()
        .to_string()
        .contains("same shard"));

    let mut resume = opts.clone();
    resume.resume = true;
    let done = run_toy(&resume, &Selection::default(), "cpu-a");
    assert_eq!(
        (done.recorded, done.skipped, done.retried),
        (11 + kept_failed, 10 - kept_failed, kept_failed)
    );
    assert!(done.dropped_torn.is_some());
    // Every panic of the run was run in this invocation: again, or anew.
    assert_eq!(done.failed.len(), 3);
    assert!(done
        .failed
        .iter()
        .all(|(trial, reason)| trial.contains("/panics") && reason.contains("toy panic")));
    let got = records_of(cut.path());
    assert_eq!(got.len(), expected.len());
    let strip = |rs: &[TrialRecord]| {
        let mut v: Vec<(String, f64, Status)> = rs
            .iter()
            .map(|r| (r.key().to_string(), r.time_to_result_s, r.status))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert_eq!(strip(&got), strip(&expected));
    // Resuming a finished run records nothing new but its failed trials
    // (the toy's 3 panics, which panic again, each recorded once).
    let again = run_toy(&resume, &Selection::default(), "cpu-a");
    assert_eq!((again.recorded, again.skipped, again.retried), (3, 18, 3));
    assert_eq!(again.failed.len(), 3);
    assert_eq!(strip(&records_of(cut.path())), strip(&expected));
    // A resume of part of the plan leaves the other entries' failed
    // trials recorded (and does not run them).
    let only_ref = Selection {
        entries: vec!["ref".into()],
        ..Selection::default()
    };
    let part = run_toy(&resume, &only_ref, "cpu-a");
    assert_eq!(
        (part.recorded, part.retried, part.failed_outside),
        (0, 0, 3)
    );
    assert_eq!(strip(&records_of(cut.path())), strip(&expected));

    // A records.jsonl that lost records while raw.csv kept them is
    // refused rather than rebuilt from, which would lose their last copy.
    let lost = finished_run();
    let jsonl = fs::read_to_string(lost.path().join("records.jsonl")).unwrap();
    let half: Vec<&str> = jsonl.lines().take(5).collect();
    fs::write(lost.path().join("records.jsonl"), half.join("\n") + "\n").unwrap();
    let before = fs::read(lost.path().join("raw.csv")).unwrap();
    let err = records::recover(lost.path()).unwrap_err().to_string();
    assert!(
        err.contains("21 rows") && err.contains("holds 5 records") && err.contains("restore"),
        "{err}"
    );
    assert_eq!(fs::read(lost.path().join("raw.csv")).unwrap(), before);
    // Without records.jsonl, a run into it is refused the same way.
    fs::remove_file(lost.path().join("records.jsonl")).unwrap();
    let mut into_lost = options(lost.path(), Profile::Quick, 3, None);
    into_lost.resume = true;
    let err = runner::prepare_out(&into_lost).unwrap_err().to_string();
    assert!(err.contains("no records.jsonl"), "{err}");

    // A raw.csv whose rows name other trials than records.jsonl's lines.
    let swapped = finished_run();
    let csv = fs::read_to_string(swapped.path().join("raw.csv")).unwrap();
    let mut rows: Vec<&str> = csv.lines().collect();
    rows.swap(1, 2);
    fs::write(swapped.path().join("raw.csv"), rows.join("\n") + "\n").unwrap();
    let err = records::read_dir(swapped.path()).unwrap_err().to_string();
    assert!(
        err.contains("row 1 is") && err.contains("the files disagree"),
        "{err}"
    );

    // A byte-order mark (an editor's) is named as such.
    let bom = finished_run();
    let jsonl = fs::read_to_string(bom.path().join("records.jsonl")).unwrap();
    fs::write(bom.path().join("records.jsonl"), format!("\u{feff}{jsonl}")).unwrap();
    let err = records::read_dir(bom.path()).unwrap_err().to_string();
    assert!(err.contains("byte-order mark"), "{err}");

    // A repeated record is an error naming both lines.
    let dup = finished_run();
    let jsonl = fs::read_to_string(dup.path().join("records.jsonl")).unwrap();
    let first = jsonl.lines().next().unwrap().to_string();
    fs::write(
        dup.path().join("records.jsonl"),
        format!("{jsonl}{first}\n"),
    )
    .unwrap();
    fs::remove_file(dup.path().join("raw.csv")).unwrap();
    let err = records::read_dir(dup.path()).unwrap_err().to_string();
    assert!(
        err.contains("records.jsonl:22") && err.contains("repeats the trial of line 1"),
        "{err}"
    );
    // Following the advice (the line and raw.csv deleted) lets --resume
    // rebuild the directory; so does deleting a damaged line, whose trial
    // is then run again.
    fs::write(dup.path().join("records.jsonl"), &jsonl).unwrap();
    let lines: Vec<&str> = jsonl.lines().collect();
    let without: String = lines[..4]
        .iter()
        .chain(&lines[5..])
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(dup.path().join("records.jsonl"), without).unwrap();
    let mut again = options(dup.path(), Profile::Quick, 3, None);
    again.resume = true;
    let done = run_toy(&again, &Selection::default(), "cpu-a");
    assert_eq!(done.skipped + done.recorded, 21);
    assert!(done.recorded >= 1, "the deleted line's trial runs again");
    assert_eq!(records_of(dup.path()).len(), 21);
}

#[test]
fn shards_partition_the_plan_and_merge_back_to_the_unsharded_run() {
    // On the real registry and the toy: union = plan, no overlap.
    for (registry, profile) in [
        (workloads::WORKLOADS, Profile::Quick),
        (workloads::WORKLOADS, Profile::Full),
        (toy::REGISTRY, Profile::Full),
    ] {
        let all: Vec<String> = plan::plan(registry, &Selection::default(), profile, Device::Cpu)
            .unwrap()
            .iter()
            .map(|u| u.label())
            .collect();
        for n in 1..=5 {
            let mut union = Vec::new();
            for i in 1..=n {
                let part = plan::shard(
                    plan::plan(registry, &Selection::default(), profile, Device::Cpu).unwrap(),
                    Some(Shard { index: i, count: n }),
                );
                union.extend(part.iter().map(|u| u.label()));
            }
            let set: BTreeSet<&String> = union.iter().collect();
            assert_eq!(set.len(), union.len(), "overlap with {n} shards");
            assert_eq!(set, all.iter().collect(), "union of {n} shards");
        }
    }

    let whole = tempfile::tempdir().unwrap();
    run_toy(
        &options(whole.path(), Profile::Full, 2, None),
        &Selection::default(),
        "cpu-a",
    );
    let root = tempfile::tempdir().unwrap();
    let mut dirs = Vec::new();
    for i in 1..=3 {
        let d = root.path().join(format!("shard-{i}"));
        let shard = Some(Shard { index: i, count: 3 });
        run_toy(
            &options(&d, Profile::Full, 2, shard),
            &Selection::default(),
            "cpu-a",
        );
        dirs.push(d);
    }
    let merged = root.path().join("merged");
    let n = bench_suite::merge::merge(&dirs, &merged).unwrap();
    let keyed = |rs: Vec<TrialRecord>| {
        rs.into_iter()
            .map(|r| (r.key(), r.seed, r.time_to_result_s.to_bits()))
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(n, records_of(whole.path()).len());
    assert_eq!(keyed(records_of(&merged)), keyed(records_of(whole.path())));
    assert_eq!(
        records::read_run_info(&merged).unwrap().merged_from.len(),
        3
    );
    // Overlapping shards are refused.
    let err =
        bench_suite::merge::merge(&[dirs[0].clone(), dirs[0].clone()], &root.path().join("m2"))
            .unwrap_err();
    assert!(err.to_string().contains("must not overlap"), "{err}");
}

#[test]
fn reports_refuse_mixed_hardware_unless_told_and_then_label_it() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    run_toy(
        &options(a.path(), Profile::Quick, 2, None),
        &Selection::default(),
        "cpu-a",
    );
    run_toy(
        &options(b.path(), Profile::Quick, 2, None),
        &Selection::default(),
        "cpu-b",
    );
    let mut both = records_of(a.path());
    both.extend(records_of(b.path()));
    let err = summary::summarise(&both, false).unwrap_err().to_string();
    assert!(err.contains("--allow-mixed-hardware"), "{err}");
    let groups = summary::summarise(&both, true).unwrap();
    assert_eq!(groups.len(), 2);
    let runs = vec![
        records::read_run_info(a.path()).unwrap(),
        records::read_run_info(b.path()).unwrap(),
    ];
    let out = tempfile::tempdir().unwrap();
    report::write_report(
        &ReportInput {
            groups: &groups,
            runs: &runs,
            registry: toy::REGISTRY,
        },
        out.path(),
    )
    .unwrap();
    let md = fs::read_to_string(out.path().join("summary.md")).unwrap();
    assert_eq!(md.matches("## Hardware `").count(), 2);
}

#[test]
fn the_report_renders_tables_and_charts_from_records() {
    let dir = tempfile::tempdir().unwrap();
    run_toy(
        &options(dir.path(), Profile::Full, 3, None),
        &Selection::default(),
        "cpu-a",
    );
    let groups = summary::summarise(&records_of(dir.path()), false).unwrap();
    let runs = vec![records::read_run_info(dir.path()).unwrap()];
    let input = ReportInput {
        groups: &groups,
        runs: &runs,
        registry: toy::REGISTRY,
    };
    let files = report::write_report(&input, dir.path()).unwrap();
    for stem in [
        "toy-profile",
        "toy-easy-ttr",
        "toy-hard-ttr",
        "toy-easy-work",
    ] {
        for ext in ["svg", "png"] {
            let f = dir.path().join("charts").join(format!("{stem}.{ext}"));
            assert!(files.contains(&f), "missing {}", f.display());
            assert!(fs::metadata(&f).unwrap().len() > 1000);
        }
    }
    let md = fs::read_to_string(dir.path().join("summary.md")).unwrap();
    insta::assert_snapshot!("toy_summary", md);
}
