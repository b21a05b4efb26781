//! The `bench-suite` binary end to end, bad input included: exit codes,
//! messages that name the problem and the valid choices, and nothing
//! half-written.

use std::fs;
use std::path::Path;

use assert_cmd::Command;
use predicates::prelude::*;

fn bench() -> Command {
    let mut c = Command::cargo_bin("bench-suite").unwrap();
    c.env_remove("BENCH_SUITE_ASSETS");
    c
}

/// The arguments of a tiny real run: the synthetic-small variant, two
/// cheap entries, two trials.
fn small_run_args(seed: &str) -> Vec<String> {
    [
        "run",
        "spectr",
        "--variant",
        "synthetic-small",
        "--entry",
        "autoregressive",
        "--entry",
        "speculative",
        "--trials",
        "2",
        "--quiet",
        "--seed",
        seed,
    ]
    .map(String::from)
    .to_vec()
}

fn small_run(out: &Path, seed: &str) {
    bench()
        .args(small_run_args(seed))
        .arg("--out")
        .arg(out)
        .assert()
        .success()
        .stderr(predicate::str::contains("trials recorded"));
}

#[test]
fn list_shows_the_registry_in_text_and_json() {
    bench()
        .arg("list")
        .assert()
        .success()
        .stdout(predicate::str::contains("spectr (v1)"))
        .stdout(predicate::str::contains("autoregressive"))
        .stdout(predicate::str::contains("reference"))
        .stdout(predicate::str::contains("k in {2, 4, 8}"));
    let out = bench().args(["list", "--json"]).output().unwrap();
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let spectr = json
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == "spectr")
        .unwrap();
    assert!(spectr["variants"].as_array().unwrap().len() >= 2);
    assert_eq!(spectr["metric"]["direction"], "higher-is-better");
}

#[test]
fn env_prints_the_fingerprint() {
    bench()
        .arg("env")
        .assert()
        .success()
        .stdout(predicate::str::contains("hardware_id:"))
        .stdout(predicate::str::contains("cpu:"));
    let out = bench().args(["env", "--json"]).output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["hardware_id"].as_str().unwrap().len(), 12);
    let kernels = json["cpu_kernels"].as_str().unwrap();
    assert!(
        ["avx512-vnni", "avx2", "candle"].contains(&kernels),
        "{kernels}"
    );
    // The environment switch that turns the AVX-512 kernels off shows.
    let out = bench()
        .args(["env", "--json"])
        .env("BENCH_SUITE_NO_AVX512", "1")
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(json["cpu_kernels"], "avx512-vnni");
}

#[test]
fn bad_selections_exit_2_and_list_the_valid_choices() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "nope"],
            "unknown workload `nope`; valid workloads: spectr",
        ),
        (
            &["run", "spectr", "--variant", "nope"],
            "valid variants: ngram-jargon",
        ),
        (
            &["run", "spectr", "--entry", "nope"],
            "valid entries: autoregressive",
        ),
        (
            &["run", "spectr", "--device", "gpu"],
            "valid devices: cpu, cuda",
        ),
        (
            &["run", "spectr", "--profile", "huge"],
            "valid profiles: quick, full",
        ),
        (&["suite", "--shard", "5/4"], "malformed shard `5/4`"),
        (&["suite", "--shard", "x"], "malformed shard"),
        (&["run", "spectr", "--trials", "0"], "--trials"),
        (
            &["run", "spectr", "--trials", "-1"],
            "must be a whole number of at least 1",
        ),
        (
            &["run", "spectr", "--seed", "-1"],
            "must be a non-negative whole number",
        ),
    ];
    for (args, message) in cases {
        bench()
            .args(*args)
            .arg("--out")
            .arg(&out)
            .assert()
            .code(2)
            .stderr(predicate::str::contains(*message));
        assert!(!out.exists(), "{args:?} wrote output");
    }
    bench()
        .args(["compare", "a", "b", "--threshold=-3"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("non-negative percentage"));
}

#[test]
fn cuda_without_the_feature_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    bench()
        .args(["run", "spectr", "--device", "cuda:0", "--out"])
        .arg(dir.path().join("o"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("built without CUDA"));
}

#[test]
fn an_unwritable_or_occupied_out_is_refused_before_running() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    fs::write(&file, "x").unwrap();
    bench()
        .args(["run", "spectr", "--out"])
        .arg(&file)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("not a directory"));
    bench()
        .args(["run", "spectr", "--out"])
        .arg(file.join("below"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("cannot create"));

    let run = dir.path().join("run");
    small_run(&run, "1");
    let before = fs::read(run.join("records.jsonl")).unwrap();
    bench()
        .args(["run", "spectr", "--variant", "synthetic-small", "--out"])
        .arg(&run)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--resume"));
    assert_eq!(
        fs::read(run.join("records.jsonl")).unwrap(),
        before,
        "records untouched"
    );
}

#[test]
fn run_writes_records_and_a_report_and_resume_skips_what_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    small_run(&run, "1");
    for f in ["raw.csv", "records.jsonl", "run.json", "summary.md"] {
        assert!(run.join(f).exists(), "{f}");
    }
    // 1 + 3 configurations x 2 trials.
    assert_eq!(
        fs::read_to_string(run.join("records.jsonl"))
            .unwrap()
            .lines()
            .count(),
        8
    );
    assert!(run.join("charts/spectr-synthetic-small-ttr.png").exists());
    let summary = fs::read_to_string(run.join("summary.md")).unwrap();
    assert!(summary.contains("### Variant `synthetic-small`"));
    let before = fs::read(run.join("records.jsonl")).unwrap();
    let raw_before = fs::read(run.join("raw.csv")).unwrap();

    bench()
        .args(small_run_args("1"))
        .args(["--resume", "--out"])
        .arg(&run)
        .assert()
        .success()
        .stderr(predicate::str::contains("0 trials recorded"))
        .stderr(predicate::str::contains("8 already recorded"));
    // Records read back and written again are the same bytes: floats
    // round-trip exactly (serde_json's `float_roundtrip`).
    assert!(
        fs::read(run.join("records.jsonl")).unwrap() == before,
        "records.jsonl changed on resume"
    );
    assert!(
        fs::read(run.join("raw.csv")).unwrap() == raw_before,
        "raw.csv changed on resume"
    );
}

#[test]
fn report_and_compare_read_only_records_and_reject_corrupt_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    small_run(&a, "1");
    small_run(&b, "2");

    let out = dir.path().join("report");
    bench()
        .args(["report"])
        .arg(&a)
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    assert!(out.join("summary.md").exists());

    // Two runs with the same seed would duplicate trials: refused.
    bench()
        .arg("report")
        .arg(&a)
        .arg(&a)
        .arg("--out")
        .arg(&out)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("duplicate record"));

    // Several inputs need an --out; a file is no --out.
    bench()
        .arg("report")
        .arg(&a)
        .arg(&b)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("needs --out"));
    let file = dir.path().join("a-file");
    fs::write(&file, "x").unwrap();
    for cmd in [&["report"][..], &["merge"][..]] {
        bench()
            .args(cmd)
            .arg(&a)
            .arg("--out")
            .arg(&file)
            .assert()
            .code(2)
            .stderr(predicate::str::contains("is not a directory"));
    }

    // A generous threshold passes; a negative change cannot regress.
    bench()
        .arg("compare")
        .arg(&a)
        .arg(&b)
        .args(["--threshold", "100000"])
        .assert()
        .success()
        .stdout(predicate::str::contains("| configuration |"));

    // Make b's autoregressive trials miss: a regression, exit 1.
    let jsonl = fs::read_to_string(b.join("records.jsonl")).unwrap();
    let slowed: String = jsonl
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if v["entry"] == "autoregressive" {
                v["time_to_result_s"] = serde_json::json!("inf");
                v["reached"] = serde_json::json!(false);
                v["status"] = serde_json::json!("missed_target");
            }
            v.to_string() + "\n"
        })
        .collect();
    fs::write(b.join("records.jsonl"), &slowed).unwrap();
    bench()
        .arg("compare")
        .arg(&a)
        .arg(&b)
        .assert()
        .code(1)
        .stdout(predicate::str::contains("REGRESSION"));
    // A configuration that misses in both runs is no regression, and says
    // so; one only a side has is named.
    let both = dir.path().join("both");
    fs::create_dir_all(&both).unwrap();
    fs::copy(b.join("run.json"), both.join("run.json")).unwrap();
    let speculative_dropped: String = slowed
        .lines()
        .filter(|l| !l.contains("\"entry\":\"speculative\""))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(both.join("records.jsonl"), speculative_dropped).unwrap();
    bench()
        .arg("compare")
        .arg(&b)
        .arg(&both)
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "| miss | miss | - | no result in either run |",
        ))
        .stderr(predicate::str::contains("only in the base run"))
        .stderr(predicate::str::contains("speculative"));

    // A corrupt line: exit 2, naming file and line.
    let mut lines: Vec<String> = jsonl.lines().map(str::to_string).collect();
    lines[2] = "{\"not\": \"a record\"}".into();
    fs::write(b.join("records.jsonl"), lines.join("\n") + "\n").unwrap();
    bench()
        .arg("report")
        .arg(&b)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("records.jsonl:3"));
    // A foreign directory.
    bench()
        .arg("report")
        .arg(dir.path())
        .assert()
        .code(2)
        .stderr(predicate::str::contains("no records.jsonl"));
    // Its report may not go into another run's directory.
    bench()
        .arg("report")
        .arg(&b)
        .arg("--out")
        .arg(&a)
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "holds records that this report does not describe",
        ));
    // A run directory without a finished trial names itself and the fix.
    let empty = dir.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    fs::copy(a.join("run.json"), empty.join("run.json")).unwrap();
    fs::write(empty.join("records.jsonl"), "").unwrap();
    for cmd in [&["report"][..], &["compare", "a"][..], &["pair", "a"][..]] {
        let mut c = bench();
        c.arg(cmd[0]);
        if cmd.len() > 1 {
            c.arg(&a);
        }
        c.arg(&empty)
            .assert()
            .code(2)
            .stderr(predicate::str::contains("empty: no trial recorded yet"))
            .stderr(predicate::str::contains("--resume"));
    }
    // compare and pair check run.json too.
    let run_json = fs::read(a.join("run.json")).unwrap();
    fs::write(a.join("run.json"), b"{\"truncated\"").unwrap();
    for cmd in ["compare", "pair"] {
        bench()
            .arg(cmd)
            .arg(&a)
            .arg(&a)
            .assert()
            .code(2)
            .stderr(predicate::str::contains("run.json"));
    }
    fs::write(a.join("run.json"), run_json).unwrap();
    // A raw.csv that disagrees with records.jsonl.
    fs::write(b.join("records.jsonl"), &jsonl).unwrap();
    let csv = fs::read_to_string(b.join("raw.csv")).unwrap();
    let short: Vec<&str> = csv.lines().take(3).collect();
    fs::write(b.join("raw.csv"), short.join("\n") + "\n").unwrap();
    bench()
        .arg("report")
        .arg(&b)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("raw.csv"));
}

#[test]
fn suite_shards_merge_into_the_unsharded_set() {
    let dir = tempfile::tempdir().unwrap();
    let mut shards = Vec::new();
    for i in 1..=3 {
        let out = dir.path().join(format!("shard-{i}"));
        let shard = format!("{i}/3");
        let mut cmd = bench();
        cmd.args([
            "suite",
            "--variant",
            "synthetic-small",
            "--entry",
            "autoregressive",
            "--entry",
            "speculative",
            "--entry",
            "ot-optimal",
            "--trials",
            "1",
            "--quiet",
            "--no-report",
            "--shard",
            &shard,
            "--out",
        ])
        .arg(&out);
        cmd.assert().success();
        if out.exists() {
            shards.push(out);
        }
    }
    let merged = dir.path().join("merged");
    bench()
        .arg("merge")
        .args(&shards)
        .arg("--out")
        .arg(&merged)
        .assert()
        .success();
    let keys: std::collections::BTreeSet<String> = fs::read_to_string(merged.join("records.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{}|{}", v["entry"], v["params"])
        })
        .collect();
    // autoregressive 1 + speculative 3 + ot-optimal 2 configurations.
    assert_eq!(keys.len(), 6);
    bench().arg("report").arg(&merged).assert().success();
    // Merging into a directory that holds records is refused.
    bench()
        .arg("merge")
        .args(&shards)
        .arg("--out")
        .arg(&merged)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("already holds records"));
}

#[test]
fn predict_spectr_writes_its_table_and_refuses_bad_cost_files() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    small_run(&run, "3");
    let costs = dir.path().join("gpu-costs.csv");
    let mut csv = String::from("model,format,mode,context,rows,median_ms,p10_ms,p90_ms\n");
    for n in 1..=20 {
        csv += &format!("d,bf16,graph,8,{n},{},0,0\n", 1.0 + 0.01 * n as f64);
        csv += &format!("t,bf16,graph,8,{n},{},0,0\n", 3.0 + 0.05 * n as f64);
    }
    fs::write(&costs, csv).unwrap();
    let out = dir.path().join("pred");
    let predict = |models: [&str; 2], costs: &Path, out: &Path| {
        let mut c = bench();
        c.args(["predict-spectr", "--variant", "synthetic-small"])
            .arg(&run)
            .arg("--costs")
            .arg(costs)
            .args(["--draft-model", models[0], "--target-model", models[1]])
            .arg("--out")
            .arg(out);
        c
    };
    predict(["d", "t"], &costs, &out)
        .assert()
        .success()
        .stdout(predicate::str::contains("| speculative |"));
    let table = fs::read_to_string(out.join("gpu-prediction.md")).unwrap();
    assert!(
        table.contains("| autoregressive | - | 1.00 | 1.0 | 1.00x |"),
        "{table}"
    );
    assert!(out.join("gpu-prediction.csv").exists());

    // Model names absent from the costs, and a missing cost file: exit 2,
    // nothing written.
    let none = dir.path().join("none");
    predict(["x", "t"], &costs, &none)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--draft-model"));
    predict(["d", "t"], &dir.path().join("missing.csv"), &none)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("missing.csv"));
    assert!(!none.exists());
}

/// `pair` sets the trials of two runs side by side: two runs with the same
/// seed pair every trial and agree on everything but time (the toy
/// variant is deterministic); runs with other seeds share no inputs and
/// are refused (exit 2); a missing directory is named.
#[test]
fn pair_matches_trials_by_seed() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    small_run(&a, "1");
    small_run(&b, "1");
    small_run(&c, "2");
    bench()
        .arg("pair")
        .arg(&a)
        .arg(&b)
        .args(["--label-a", "first", "--label-b", "second"])
        .args(["--figure", "block_efficiency", "--cells", "target_"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "Pairs: 8 trials in both; only in first: 0, only in second: 0.",
        ))
        .stdout(predicate::str::contains(
            "target decisions differing: 0 of 8",
        ))
        .stdout(predicate::str::contains(
            "largest |first - second| of quality: 0.0000",
        ))
        .stdout(predicate::str::contains(
            "largest |first - second| of block_efficiency: 0.0000",
        ))
        .stdout(predicate::str::contains(
            "target_* figures differing: 0 of 16",
        ));
    // One of b's trials with another quality, missing its target.
    let jsonl = fs::read_to_string(b.join("records.jsonl")).unwrap();
    let changed: String = jsonl
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if i == 0 {
                v["quality"] = serde_json::json!(9.5);
                v["reached"] = serde_json::json!(false);
                v["time_to_result_s"] = serde_json::json!("inf");
                v["status"] = serde_json::json!("missed_target");
            }
            v.to_string() + "\n"
        })
        .collect();
    fs::write(b.join("records.jsonl"), changed).unwrap();
    fs::remove_file(b.join("raw.csv")).unwrap();
    bench()
        .arg("pair")
        .arg(&a)
        .arg(&b)
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "target decisions differing: 1 of 8",
        ))
        .stdout(predicate::str::contains("(autoregressive trial 0)"))
        .stdout(predicate::str::contains("of quality: 0.0000").not());
    bench()
        .arg("pair")
        .arg(&a)
        .arg(&c)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("share no trial"));
    // A figure no trial carries is a typo, not "no difference".
    bench()
        .arg("pair")
        .arg(&a)
        .arg(&b)
        .args(["--figure", "block_efficiencyy"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("block_efficiencyy"))
        .stderr(predicate::str::contains("block_efficiency,"));
    bench()
        .arg("pair")
        .arg(&a)
        .arg(dir.path().join("nowhere"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("nowhere: no such directory"));
}

#[test]
fn failed_trials_exit_1_name_the_fix_and_resume_runs_them_again() {
    // The stereo capture is an asset; an empty asset folder lacks it.
    let dir = tempfile::tempdir().unwrap();
    let assets = dir.path().join("assets");
    fs::create_dir_all(&assets).unwrap();
    let out = dir.path().join("out");
    let args = [
        "run",
        "point-cloud-sla",
        "--variant",
        "stereo-middlebury",
        "--entry",
        "sla",
        "--trials",
        "1",
        "--quiet",
        "--no-report",
    ];
    bench()
        .env("BENCH_SUITE_ASSETS", &assets)
        .args(args)
        .arg("--out")
        .arg(&out)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("4 trial(s) failed"))
        .stderr(predicate::str::contains("missing asset"))
        .stderr(predicate::str::contains("fetch-assets.sh middlebury"))
        .stderr(predicate::str::contains("--resume"));
    // Every trial is still recorded, as infinity.
    let jsonl = fs::read_to_string(out.join("records.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), 4);
    assert!(jsonl.lines().all(|l| l.contains("\"status\":\"error\"")));
    // --resume runs them again (and, the asset still missing, fails again),
    // keeping one record per trial.
    bench()
        .env("BENCH_SUITE_ASSETS", &assets)
        .args(args)
        .arg("--out")
        .arg(&out)
        .arg("--resume")
        .assert()
        .code(1)
        .stderr(predicate::str::contains("ran again 4 trial(s)"));
    let again = fs::read_to_string(out.join("records.jsonl")).unwrap();
    assert_eq!(again.lines().count(), 4);
    assert_eq!(
        fs::read_to_string(out.join("raw.csv"))
            .unwrap()
            .lines()
            .count(),
        5
    );
}
