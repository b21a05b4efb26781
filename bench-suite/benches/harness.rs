//! The harness's own costs, so they can be shown to vanish next to what it
//! times: the overhead of one trial (set-up, the two synchronised clock
//! reads, evaluation, the record appended and flushed to both files;
//! target under 1 ms) and the time to summarise and render a report from
//! 10,000 records (target under 2 s).

#[path = "../tests/toy/mod.rs"]
mod toy;

use std::time::{Duration, Instant};

use bench_suite::fingerprint::Fingerprint;
use bench_suite::plan::{self, Selection};
use bench_suite::records::{self, Status, TrialRecord};
use bench_suite::report::{self, ReportInput};
use bench_suite::runner::{self, Env, RunOptions};
use bench_suite::summary;
use criterion::{criterion_group, criterion_main, Criterion};
use workloads::clock::MockClock;
use workloads::{Device, Profile};

fn fingerprint() -> Fingerprint {
    Fingerprint::new(
        "bench".into(),
        2,
        24.0,
        vec![],
        "os".into(),
        "k".into(),
        "h".into(),
    )
}

fn now() -> String {
    "2026-01-01T00:00:00Z".into()
}

/// Per-trial overhead: the toy's `fast` entry spends only mock time, so the
/// real wall time of a run is the harness itself.
fn trial_overhead(c: &mut Criterion) {
    let selection = Selection {
        workloads: vec!["toy".into()],
        variants: vec!["easy".into()],
        entries: vec!["fast".into()],
    };
    let units = plan::plan(
        toy::REGISTRY,
        &selection,
        Profile::Quick,
        workloads::Device::Cpu,
    )
    .unwrap();
    let trials = 50u32;
    let per_run = trials as usize * 2; // two grid points
    c.bench_function("overhead per trial (record flushed to disk)", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters.div_ceil(per_run as u64) {
                let dir = tempfile::tempdir().unwrap();
                let opts = RunOptions {
                    profile: Profile::Quick,
                    trials,
                    seed: 0,
                    device: Device::Cpu,
                    out: dir.path().to_path_buf(),
                    resume: false,
                    quiet: true,
                    shard: None,
                    command_line: vec![],
                };
                let clock = MockClock::default();
                let env = Env {
                    clock: &clock,
                    fingerprint: fingerprint(),
                    git_commit: "bench".into(),
                    now: &now,
                };
                let t0 = Instant::now();
                let done = runner::run(&units, &opts, &env).unwrap();
                total += t0.elapsed();
                assert_eq!(done.recorded, per_run);
            }
            // Scale to the requested iteration count (whole runs are timed).
            total.mul_f64(iters as f64 / (iters.div_ceil(per_run as u64) * per_run as u64) as f64)
        })
    });
}

/// 10,000 records: 2 workloads x 5 variants x 50 configurations x 20 trials.
fn synthetic_records() -> Vec<TrialRecord> {
    let mut out = Vec::with_capacity(10_000);
    for w in 0..2 {
        for v in 0..5 {
            for cfg in 0..50 {
                for trial in 0..20u32 {
                    let t = 1.0 + cfg as f64 * 0.01 + f64::from(trial % 7) * 0.001;
                    let reached = !(cfg + trial as usize).is_multiple_of(13);
                    out.push(TrialRecord {
                        schema_version: records::SCHEMA_VERSION,
                        run_id: "bench".into(),
                        workload: format!("w{w}"),
                        workload_version: 1,
                        variant: format!("v{v}"),
                        entry: if cfg == 0 {
                            "ref".into()
                        } else {
                            format!("m{}", cfg % 5)
                        },
                        entry_kind: if cfg == 0 {
                            "reference".into()
                        } else {
                            "method".into()
                        },
                        params: if cfg == 0 {
                            String::new()
                        } else {
                            format!("k={cfg}")
                        },
                        trial,
                        seed: u64::from(trial) * 1000 + v,
                        device: "cpu".into(),
                        hardware_id: "hw".into(),
                        quality_metric: "q".into(),
                        quality: Some(1.0),
                        target: 0.5,
                        reached,
                        time_to_result_s: if reached { t } else { f64::INFINITY },
                        budget_s: 10.0,
                        status: if reached {
                            Status::Reached
                        } else {
                            Status::MissedTarget
                        },
                        started_at: now(),
                        git_commit: "bench".into(),
                        wall_s: t,
                        reason: String::new(),
                        figures: [("tokens_per_s".to_string(), 100.0 / t)]
                            .into_iter()
                            .collect(),
                        note: None,
                    });
                }
            }
        }
    }
    out
}

fn report_10k(c: &mut Criterion) {
    let records = synthetic_records();
    assert_eq!(records.len(), 10_000);
    let mut group = c.benchmark_group("report");
    group.sample_size(10);
    group.bench_function("summarise + render 10,000 records", |b| {
        b.iter(|| {
            let dir = tempfile::tempdir().unwrap();
            let groups = summary::summarise(&records, false).unwrap();
            report::write_report(
                &ReportInput {
                    groups: &groups,
                    runs: &[],
                    registry: toy::REGISTRY,
                },
                dir.path(),
            )
            .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, trial_overhead, report_10k);
criterion_main!(benches);
