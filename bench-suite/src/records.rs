//! Trial records: one row per trial, in `raw.csv` and `records.jsonl`.
//!
//! `records.jsonl` is the source of truth (it carries the workload's own
//! figures); `raw.csv` has the fixed columns for spreadsheets and scripts.
//! Both are appended and flushed as each trial ends, so an interrupted run
//! loses at most the trial in flight. Every file this module reads is read
//! strictly: a malformed, truncated or foreign row is an error naming the
//! file and line, never a silently dropped row.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fingerprint::Fingerprint;

/// Bump when a column changes meaning or a required column is added.
pub const SCHEMA_VERSION: u32 = 1;

pub const RAW_CSV: &str = "raw.csv";
pub const RECORDS_JSONL: &str = "records.jsonl";
pub const RUN_JSON: &str = "run.json";

/// The fix for a damaged line of `records.jsonl`. Deleting a line leaves
/// `raw.csv` a row longer, which reads as lost records, so it goes too.
const DAMAGED_LINE: &str = "the file is damaged: restore it from a copy of the run, or delete \
                            that line and raw.csv (`run ... --resume` with the run's own \
                            settings rebuilds raw.csv and runs that trial again)";
/// The fix for a damaged `raw.csv`.
const REBUILD_CSV: &str = "raw.csv is rebuilt from records.jsonl by `run ... --resume` with the \
                           run's own settings";

#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {problem}")]
    Malformed {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RecordsError + '_ {
    move |source| RecordsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How a trial ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Produced its result at or above the target within the budget.
    Reached,
    /// Finished, but the quality missed the target.
    MissedTarget,
    /// Stopped (or finished) beyond its time budget.
    OverBudget,
    /// Set-up, run or evaluation returned an error.
    Error,
    /// Set-up, run or evaluation panicked.
    Panicked,
}

impl Status {
    /// A trial without a result of the method's own (an error or a panic
    /// in set-up, run or evaluation), as opposed to a result that missed
    /// its target or budget.
    pub fn is_failure(self) -> bool {
        matches!(self, Status::Error | Status::Panicked)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Reached => "reached",
            Status::MissedTarget => "missed_target",
            Status::OverBudget => "over_budget",
            Status::Error => "error",
            Status::Panicked => "panicked",
        }
    }
}

/// One trial of one configuration. Field order is the `raw.csv` column
/// order; `figures` and `note` live only in `records.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialRecord {
    pub schema_version: u32,
    pub run_id: String,
    pub workload: String,
    pub workload_version: u32,
    pub variant: String,
    pub entry: String,
    pub entry_kind: String,
    pub params: String,
    pub trial: u32,
    pub seed: u64,
    pub device: String,
    pub hardware_id: String,
    pub quality_metric: String,
    /// `None` when the trial produced no result (error, panic, over budget).
    pub quality: Option<f64>,
    pub target: f64,
    pub reached: bool,
    /// Infinity for every trial that did not reach the target.
    #[serde(with = "inf_f64")]
    pub time_to_result_s: f64,
    pub budget_s: f64,
    pub status: Status,
    pub started_at: String,
    pub git_commit: String,
    /// Timed seconds actually spent, whatever the status.
    pub wall_s: f64,
    pub reason: String,
    #[serde(default)]
    pub figures: BTreeMap<String, f64>,
    #[serde(default)]
    pub note: Option<String>,
}

impl TrialRecord {
    /// Identity of a trial within a run: `--resume` skips these, `merge`
    /// refuses duplicates of them.
    pub fn key(&self) -> TrialKey {
        TrialKey {
            workload: self.workload.clone(),
            variant: self.variant.clone(),
            entry: self.entry.clone(),
            params: self.params.clone(),
            trial: self.trial,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrialKey {
    pub workload: String,
    pub variant: String,
    pub entry: String,
    pub params: String,
    pub trial: u32,
}

impl std::fmt::Display for TrialKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}/{}[{}] trial {}",
            self.workload, self.variant, self.entry, self.params, self.trial
        )
    }
}

/// The CSV projection of a record (no nested figures).
#[derive(Debug, Serialize, Deserialize)]
struct CsvRow {
    schema_version: u32,
    run_id: String,
    workload: String,
    workload_version: u32,
    variant: String,
    entry: String,
    entry_kind: String,
    params: String,
    trial: u32,
    seed: u64,
    device: String,
    hardware_id: String,
    quality_metric: String,
    quality: Option<f64>,
    target: f64,
    reached: bool,
    #[serde(with = "inf_f64")]
    time_to_result_s: f64,
    budget_s: f64,
    status: Status,
    started_at: String,
    git_commit: String,
    wall_s: f64,
    reason: String,
}

impl From<&TrialRecord> for CsvRow {
    fn from(r: &TrialRecord) -> Self {
        CsvRow {
            schema_version: r.schema_version,
            run_id: r.run_id.clone(),
            workload: r.workload.clone(),
            workload_version: r.workload_version,
            variant: r.variant.clone(),
            entry: r.entry.clone(),
            entry_kind: r.entry_kind.clone(),
            params: r.params.clone(),
            trial: r.trial,
            seed: r.seed,
            device: r.device.clone(),
            hardware_id: r.hardware_id.clone(),
            quality_metric: r.quality_metric.clone(),
            quality: r.quality,
            target: r.target,
            reached: r.reached,
            time_to_result_s: r.time_to_result_s,
            budget_s: r.budget_s,
            status: r.status,
            started_at: r.started_at.clone(),
            git_commit: r.git_commit.clone(),
            wall_s: r.wall_s,
            reason: r.reason.clone(),
        }
    }
}

/// Serialises infinity as the string `"inf"` (JSON has no infinity) and
/// reads it back from either a number or that string.
mod inf_f64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_infinite() && *v > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_f64(*v)
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrStr {
        Num(f64),
        Str(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match NumOrStr::deserialize(d)? {
            NumOrStr::Num(v) => Ok(v),
            NumOrStr::Str(s) => match s.as_str() {
                "inf" | "+inf" | "infinity" => Ok(f64::INFINITY),
                other => other
                    .parse::<f64>()
                    .map_err(|_| serde::de::Error::custom(format!("not a time: `{other}`"))),
            },
        }
    }
}

/// What `run.json` holds: enough to reproduce and to refuse mixing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub schema_version: u32,
    pub run_id: String,
    pub command_line: Vec<String>,
    pub bench_suite_version: String,
    pub workloads: Vec<WorkloadVersion>,
    pub profile: String,
    pub trials: u32,
    pub seed: u64,
    pub device: String,
    pub shard: Option<String>,
    pub started_at: String,
    pub git_commit: String,
    pub fingerprint: Fingerprint,
    /// For a merged directory: the runs it was merged from.
    #[serde(default)]
    pub merged_from: Vec<RunInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadVersion {
    pub id: String,
    pub version: u32,
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// reader never sees a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RecordsError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io(path))
}

pub fn write_run_info(dir: &Path, info: &RunInfo) -> Result<(), RecordsError> {
    let json = serde_json::to_vec_pretty(info).expect("RunInfo serialises");
    write_atomic(&dir.join(RUN_JSON), &json)
}

pub fn read_run_info(dir: &Path) -> Result<RunInfo, RecordsError> {
    is_results_dir(dir)?;
    let path = dir.join(RUN_JSON);
    if !path.exists() {
        return Err(RecordsError::Invalid(format!(
            "{}: no {RUN_JSON} here, so this is not a bench-suite results directory; pass a \
             directory written by `bench-suite run`, `suite` or `merge` (if it was one and its \
             {RUN_JSON} was deleted, restore that file from a copy of the run)",
            dir.display()
        )));
    }
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|e| RecordsError::Malformed {
        path: path.clone(),
        line: e.line(),
        problem: format!(
            "not a bench-suite run.json ({e}); the file is damaged: restore it from a copy of \
             the run"
        ),
    })
}

/// An error naming the problem unless `dir` is an existing directory.
fn is_results_dir(dir: &Path) -> Result<(), RecordsError> {
    if dir.is_dir() {
        Ok(())
    } else if dir.exists() {
        Err(RecordsError::Invalid(format!(
            "{} is a file, not a results directory; pass the directory a run wrote",
            dir.display()
        )))
    } else {
        Err(RecordsError::Invalid(format!(
            "{}: no such directory; pass a directory written by `bench-suite run`, `suite` or `merge`",
            dir.display()
        )))
    }
}

/// Appends records to `raw.csv` and `records.jsonl`, one flushed line each.
pub struct RecordWriter {
    csv_path: PathBuf,
    jsonl_path: PathBuf,
    csv: File,
    jsonl: File,
}

impl RecordWriter {
    /// Opens (creating if needed) the two files of `dir` for appending.
    pub fn open(dir: &Path) -> Result<Self, RecordsError> {
        let csv_path = dir.join(RAW_CSV);
        let jsonl_path = dir.join(RECORDS_JSONL);
        let new_csv =
            !csv_path.exists() || fs::metadata(&csv_path).map_err(io(&csv_path))?.len() == 0;
        let open = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(io(p))
        };
        let mut csv = open(&csv_path)?;
        let jsonl = open(&jsonl_path)?;
        if new_csv {
            csv.write_all(csv_header().as_bytes())
                .map_err(io(&csv_path))?;
            csv.flush().map_err(io(&csv_path))?;
        }
        Ok(RecordWriter {
            csv_path,
            jsonl_path,
            csv,
            jsonl,
        })
    }

    /// Appends one record to both files and flushes them.
    pub fn append(&mut self, record: &TrialRecord) -> Result<(), RecordsError> {
        let mut line = serde_json::to_vec(record).expect("records serialise");
        line.push(b'\n');
        self.jsonl.write_all(&line).map_err(io(&self.jsonl_path))?;
        self.jsonl.flush().map_err(io(&self.jsonl_path))?;
        let row = csv_row(record);
        self.csv.write_all(&row).map_err(io(&self.csv_path))?;
        self.csv.flush().map_err(io(&self.csv_path))
    }
}

fn csv_header() -> String {
    let mut w = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(vec![]);
    w.write_record(CSV_COLUMNS).expect("in-memory write");
    String::from_utf8(w.into_inner().expect("in-memory")).expect("ascii")
}

fn csv_row(record: &TrialRecord) -> Vec<u8> {
    let mut w = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(vec![]);
    w.serialize(CsvRow::from(record)).expect("in-memory write");
    w.into_inner().expect("in-memory")
}

/// The `raw.csv` columns, in order.
pub const CSV_COLUMNS: &[&str] = &[
    "schema_version",
    "run_id",
    "workload",
    "workload_version",
    "variant",
    "entry",
    "entry_kind",
    "params",
    "trial",
    "seed",
    "device",
    "hardware_id",
    "quality_metric",
    "quality",
    "target",
    "reached",
    "time_to_result_s",
    "budget_s",
    "status",
    "started_at",
    "git_commit",
    "wall_s",
    "reason",
];

/// Writes both files of `dir` afresh from `records` (atomically each):
/// `raw.csv` first, so that an interruption between the two leaves it
/// shorter than `records.jsonl` (rebuilt by `--resume`), never longer
/// (which reads as records lost).
pub fn write_all(dir: &Path, records: &[TrialRecord]) -> Result<(), RecordsError> {
    let mut jsonl = Vec::new();
    let mut csv = csv_header().into_bytes();
    for r in records {
        jsonl.extend(serde_json::to_vec(r).expect("records serialise"));
        jsonl.push(b'\n');
        csv.extend(csv_row(r));
    }
    write_atomic(&dir.join(RAW_CSV), &csv)?;
    write_atomic(&dir.join(RECORDS_JSONL), &jsonl)
}

/// Reads `records.jsonl` strictly. With `allow_torn_tail`, an unterminated
/// last line (the trial in flight when a run was killed) is reported in the
/// second value instead of being an error; it is never silently dropped.
pub fn read_jsonl(
    path: &Path,
    allow_torn_tail: bool,
) -> Result<(Vec<TrialRecord>, Option<String>), RecordsError> {
    let bytes = fs::read(path).map_err(io(path))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| RecordsError::Malformed {
        path: path.to_path_buf(),
        line: 1 + bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count(),
        problem: format!("not UTF-8 text; {DAMAGED_LINE}"),
    })?;
    if text.starts_with('\u{feff}') {
        return Err(RecordsError::Malformed {
            path: path.to_path_buf(),
            line: 1,
            problem: "starts with a UTF-8 byte-order mark, which an editor added; remove those \
                      three bytes (the records are otherwise intact)"
                .into(),
        });
    }
    let mut records = Vec::new();
    let mut torn = None;
    let mut seen: std::collections::HashMap<TrialKey, usize> = std::collections::HashMap::new();
    let n_lines = text.split_inclusive('\n').count();
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let lineno = i + 1;
        let terminated = line.ends_with('\n');
        let body = line.trim_end_matches(['\n', '\r']);
        if body.trim().is_empty() {
            return Err(RecordsError::Malformed {
                path: path.to_path_buf(),
                line: lineno,
                problem: "empty line; delete it".into(),
            });
        }
        if !terminated && lineno == n_lines && allow_torn_tail {
            torn = Some(body.to_string());
            break;
        }
        let rec: TrialRecord = serde_json::from_str(body).map_err(|e| RecordsError::Malformed {
            path: path.to_path_buf(),
            line: lineno,
            problem: if terminated {
                format!("not a bench-suite trial record ({e}); {DAMAGED_LINE}")
            } else {
                format!(
                    "truncated last line ({e}); the run was interrupted: rerun it with --resume"
                )
            },
        })?;
        if rec.schema_version != SCHEMA_VERSION {
            return Err(RecordsError::Malformed {
                path: path.to_path_buf(),
                line: lineno,
                problem: format!(
                    "schema_version {} but this bench-suite reads {SCHEMA_VERSION}; read it with \
                     the bench-suite version that wrote it (run.json names it)",
                    rec.schema_version
                ),
            });
        }
        if let Some(first) = seen.insert(rec.key(), lineno) {
            return Err(RecordsError::Malformed {
                path: path.to_path_buf(),
                line: lineno,
                problem: format!(
                    "repeats the trial of line {first} ({}); a records file holds each trial \
                     once: delete one of the two lines, and raw.csv (`run ... --resume` with the \
                     run's own settings rebuilds it)",
                    rec.key()
                ),
            });
        }
        records.push(rec);
    }
    Ok((records, torn))
}

/// Reads `raw.csv` strictly: header must match, every row must parse.
/// Returns each data row's trial, in order.
pub fn check_csv(path: &Path) -> Result<Vec<TrialKey>, RecordsError> {
    let file = File::open(path).map_err(io(path))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(BufReader::new(file));
    let header = reader.headers().map_err(|e| RecordsError::Malformed {
        path: path.to_path_buf(),
        line: 1,
        problem: format!("unreadable header ({e}); {REBUILD_CSV}"),
    })?;
    let got: Vec<&str> = header.iter().collect();
    if got != CSV_COLUMNS {
        return Err(RecordsError::Malformed {
            path: path.to_path_buf(),
            line: 1,
            problem: format!("header is not bench-suite's raw.csv header; {REBUILD_CSV}"),
        });
    }
    let mut keys = Vec::new();
    for (i, row) in reader.deserialize::<CsvRow>().enumerate() {
        let row = row.map_err(|e| RecordsError::Malformed {
            path: path.to_path_buf(),
            line: i + 2,
            problem: format!("bad row ({e}); {REBUILD_CSV}"),
        })?;
        keys.push(TrialKey {
            workload: row.workload,
            variant: row.variant,
            entry: row.entry,
            params: row.params,
            trial: row.trial,
        });
    }
    Ok(keys)
}

/// Reads a results directory: its records, checked against `raw.csv`.
pub fn read_dir(dir: &Path) -> Result<Vec<TrialRecord>, RecordsError> {
    is_results_dir(dir)?;
    let jsonl = dir.join(RECORDS_JSONL);
    if !jsonl.exists() {
        return Err(RecordsError::Invalid(format!(
            "{}: no {RECORDS_JSONL} here; pass a directory written by `bench-suite run`, `suite` or `merge`",
            dir.display()
        )));
    }
    let (records, _) = read_jsonl(&jsonl, false)?;
    let csv = dir.join(RAW_CSV);
    if csv.exists() {
        let keys = check_csv(&csv)?;
        let rows = keys.len();
        if rows != records.len() {
            let fix = if rows > records.len() {
                "records were lost from records.jsonl, the source of truth: restore it from a \
                 copy of the run"
            } else {
                "raw.csv missed rows (a run stopped mid-write): `run ... --resume` with the run's \
                 own settings rebuilds it from records.jsonl"
            };
            return Err(RecordsError::Invalid(format!(
                "{}: {rows} rows but {} has {} records; {fix}",
                csv.display(),
                jsonl.display(),
                records.len()
            )));
        }
        // raw.csv copies records.jsonl's columns, row for line.
        if let Some(i) = (0..rows).find(|&i| keys[i] != records[i].key()) {
            return Err(RecordsError::Invalid(format!(
                "{}: row {} is {} but line {} of {} is {}; the files disagree. {REBUILD_CSV}",
                csv.display(),
                i + 1,
                keys[i],
                i + 1,
                jsonl.display(),
                records[i].key()
            )));
        }
    }
    Ok(records)
}

/// Prepares `dir` for `--resume`: drops a torn last record (reporting it),
/// rebuilds `raw.csv` from `records.jsonl`, and returns what is recorded.
/// Refuses when `raw.csv` holds more rows than `records.jsonl` records:
/// then records were lost from `records.jsonl`, and rebuilding `raw.csv`
/// from it would lose their last copy.
pub fn recover(dir: &Path) -> Result<(Vec<TrialRecord>, Option<String>), RecordsError> {
    let jsonl = dir.join(RECORDS_JSONL);
    let (records, torn) = if jsonl.exists() {
        read_jsonl(&jsonl, true)?
    } else {
        (Vec::new(), None)
    };
    // A torn last record has no row: a record's line is flushed before
    // its row.
    let rows = csv_rows(dir)?;
    if rows > records.len() {
        return Err(RecordsError::Invalid(format!(
            "{}: {rows} rows, but {} holds {} records: records were lost from it (it is the \
             source of truth, and raw.csv cannot rebuild it); restore {RECORDS_JSONL} from a \
             copy of the run, or start again with another --out",
            dir.join(RAW_CSV).display(),
            jsonl.display(),
            records.len()
        )));
    }
    write_all(dir, &records)?;
    Ok((records, torn))
}

/// Data rows of `dir`'s `raw.csv` (0 without the file), counted loosely:
/// a damaged row still counts, a quoted line break does not.
pub fn csv_rows(dir: &Path) -> Result<usize, RecordsError> {
    let path = dir.join(RAW_CSV);
    if !path.exists() {
        return Ok(0);
    }
    let file = File::open(&path).map_err(io(&path))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(BufReader::new(file));
    Ok(reader.byte_records().count())
}

/// Lines of a file, for tests and tools.
pub fn count_lines(path: &Path) -> Result<usize, RecordsError> {
    let f = File::open(path).map_err(io(path))?;
    Ok(BufReader::new(f).lines().count())
}
