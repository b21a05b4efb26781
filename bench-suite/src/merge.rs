//! `bench-suite merge`: joins the result directories of shards (or of runs
//! resumed elsewhere) into one, refusing anything that would double-count.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::records::{self, RunInfo, TrialRecord};

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("{0}")]
    Records(#[from] records::RecordsError),
    #[error("{dir} was run with profile {profile}, seed {seed}, {trials} trials, but {first} with profile {p0}, seed {s0}, {t0} trials; only shards of one run merge")]
    Mismatch {
        dir: PathBuf,
        profile: String,
        seed: u64,
        trials: u32,
        first: PathBuf,
        p0: String,
        s0: u64,
        t0: u32,
    },
    #[error("{key} appears in both {a} and {b}; shards must not overlap")]
    Overlap { key: String, a: PathBuf, b: PathBuf },
    #[error("{0} already holds records; choose an empty --out")]
    OutNotEmpty(PathBuf),
    #[error("--out {dir}: {problem}; choose another --out")]
    Out { dir: PathBuf, problem: String },
}

/// Merges `inputs` into `out`; returns the number of records written.
pub fn merge(inputs: &[PathBuf], out: &Path) -> Result<usize, MergeError> {
    if out.exists() && !out.is_dir() {
        return Err(MergeError::Out {
            dir: out.to_path_buf(),
            problem: "exists and is not a directory".into(),
        });
    }
    if out.join(records::RECORDS_JSONL).exists() {
        return Err(MergeError::OutNotEmpty(out.to_path_buf()));
    }
    let mut infos: Vec<RunInfo> = Vec::new();
    let mut all: Vec<TrialRecord> = Vec::new();
    let mut owner: HashMap<(records::TrialKey, String), PathBuf> = HashMap::new();
    for dir in inputs {
        let info = records::read_run_info(dir)?;
        if let Some(first) = infos.first() {
            if (first.profile.as_str(), first.seed, first.trials)
                != (info.profile.as_str(), info.seed, info.trials)
            {
                return Err(MergeError::Mismatch {
                    dir: dir.clone(),
                    profile: info.profile,
                    seed: info.seed,
                    trials: info.trials,
                    first: inputs[0].clone(),
                    p0: first.profile.clone(),
                    s0: first.seed,
                    t0: first.trials,
                });
            }
        }
        for r in records::read_dir(dir)? {
            let key = (r.key(), r.hardware_id.clone());
            if let Some(a) = owner.get(&key) {
                return Err(MergeError::Overlap {
                    key: r.key().to_string(),
                    a: a.clone(),
                    b: dir.clone(),
                });
            }
            owner.insert(key, dir.clone());
            all.push(r);
        }
        // A merged input contributes the runs it was merged from.
        if info.merged_from.is_empty() {
            infos.push(info);
        } else {
            infos.extend(info.merged_from);
        }
    }
    std::fs::create_dir_all(out).map_err(|e| MergeError::Out {
        dir: out.to_path_buf(),
        problem: format!("cannot create it ({e})"),
    })?;
    let first = infos[0].clone();
    let merged = RunInfo {
        run_id: format!("merged-{}", first.run_id),
        command_line: std::env::args().collect(),
        shard: None,
        merged_from: infos,
        ..first
    };
    records::write_all(out, &all)?;
    records::write_run_info(out, &merged)?;
    Ok(all.len())
}
