//! `bench-suite predict-spectr`: the speedup SpecTr would give on a GPU,
//! predicted from block efficiency measured by a CPU run and per-call costs
//! measured on the GPU (`scripts/spectr_gpu_costs.py`). Issue 3 asks for
//! this where the decoder cannot run on the GPU; every figure it writes is
//! labelled *predicted*.
//!
//! The cost model. A call that scores `n` rows (contexts) costs `C(n)`,
//! interpolated linearly between the measured row counts. Over a trial of
//! `T` tokens with `D` draft calls scoring `R_d` rows and `V` target calls
//! scoring `R_v` rows (figures `draft_calls`, `draft_rows`, `target_calls`,
//! `target_rows`, `tokens` of the records), the predicted time per token is
//!
//! ```text
//! t = (D * C_draft(R_d / D) + V * C_target(R_v / V)) / T
//! ```
//!
//! and autoregressive sampling costs `C_target(1)` per token, so the
//! predicted speedup over it is `C_target(1) / t`. Using each call kind's
//! mean rows is exact where `C` is linear between the row counts involved;
//! sampling and K-SEQ selection are left out (they cost microseconds).
//!
//! Besides the measured cost tables, the bandwidth limit: a call costs its
//! weight bytes over the measured copy bandwidth, whatever its rows (the
//! best a fused, bandwidth-bound kernel could do; compute is ignored).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use crate::records::{RecordsError, TrialRecord};
use crate::summary::param_value;

/// One cost curve: measured `(rows, milliseconds)`, sorted by rows.
#[derive(Debug, Clone, PartialEq)]
pub enum Curve {
    Measured(Vec<(f64, f64)>),
    /// Bandwidth limit: the same cost at every row count.
    Flat(f64),
}

impl Curve {
    /// Cost of a call over `rows` rows, in ms; `None` outside the measured
    /// range (no extrapolation).
    pub fn at(&self, rows: f64) -> Option<f64> {
        match self {
            Curve::Flat(ms) => Some(*ms),
            Curve::Measured(points) => {
                let i = points.iter().position(|&(n, _)| n >= rows)?;
                let (n1, c1) = points[i];
                if n1 == rows || i == 0 {
                    return (n1 == rows).then_some(c1);
                }
                let (n0, c0) = points[i - 1];
                Some(c0 + (c1 - c0) * (rows - n0) / (n1 - n0))
            }
        }
    }
}

/// Cost curves by `(model, cost model)`, where a cost model is
/// `format/mode` (for example `bf16/graph`) or `format/bandwidth`.
#[derive(Debug, Default)]
pub struct Costs {
    pub curves: BTreeMap<(String, String), Curve>,
    /// Where the costs were measured (the JSON's `device`): one device,
    /// or none where the only file read records none.
    pub devices: Vec<String>,
    /// Cost files read so far, and the first of them that records no
    /// device (no JSON beside it, or none in it).
    files: usize,
    undeclared: Option<std::path::PathBuf>,
}

#[derive(Debug, serde::Deserialize)]
struct CostRow {
    model: String,
    format: String,
    mode: String,
    rows: f64,
    median_ms: f64,
}

impl Costs {
    /// Reads `gpu-costs.csv` and, if present beside it, `gpu-costs.json`
    /// (device name, weight bytes and copy bandwidth). Files of several
    /// devices are refused, and so is a file that records no device beside
    /// any other file (their devices cannot be checked); nothing is added
    /// from a refused file.
    pub fn add_file(&mut self, csv_path: &Path) -> Result<(), RecordsError> {
        let bad =
            |problem: String| RecordsError::Invalid(format!("{}: {problem}", csv_path.display()));
        let json_path = csv_path.with_extension("json");
        let meta: Option<serde_json::Value> = if json_path.exists() {
            let text = std::fs::read_to_string(&json_path).map_err(|source| RecordsError::Io {
                path: json_path.clone(),
                source,
            })?;
            Some(
                serde_json::from_str(&text)
                    .map_err(|e| RecordsError::Invalid(format!("{}: {e}", json_path.display())))?,
            )
        } else {
            None
        };
        let device = meta.as_ref().and_then(|m| m["device"].as_str());
        match (device, &self.undeclared) {
            (Some(d), None) => {
                if let Some(other) = self.devices.iter().find(|x| *x != d) {
                    return Err(RecordsError::Invalid(format!(
                        "{}: measured on {d}, but an earlier cost file on {other}; \
                         a prediction combines costs from one device, so pass the files of one device",
                        json_path.display()
                    )));
                }
            }
            (Some(_), Some(first)) | (None, Some(first)) => {
                return Err(bad(format!(
                    "{} records no device (no gpu-costs.json with a `device` beside it), so it cannot \
                     be combined with another cost file; pass one file, or each with the JSON that \
                     scripts/spectr_gpu_costs.py wrote beside it",
                    first.display()
                )));
            }
            (None, None) if self.files > 0 => {
                return Err(bad(format!(
                    "records no device (no {} with a `device`), so it cannot be combined with \
                     another cost file; pass it alone, or with the JSON that \
                     scripts/spectr_gpu_costs.py wrote beside it",
                    json_path.display()
                )));
            }
            (None, None) => {}
        }
        let mut reader = csv::Reader::from_path(csv_path).map_err(|e| {
            bad(format!(
                "{e}; pass the gpu-costs.csv that scripts/spectr_gpu_costs.py wrote"
            ))
        })?;
        let mut points: BTreeMap<(String, String), Vec<(f64, f64)>> = BTreeMap::new();
        for row in reader.deserialize::<CostRow>() {
            let row = row.map_err(|e| bad(format!("malformed row: {e}")))?;
            if !(row.rows >= 1.0 && row.median_ms.is_finite() && row.median_ms > 0.0) {
                return Err(bad(format!(
                    "row {} / {} ms of {} is not a positive cost",
                    row.rows, row.median_ms, row.model
                )));
            }
            points
                .entry((row.model, format!("{}/{}", row.format, row.mode)))
                .or_default()
                .push((row.rows, row.median_ms));
        }
        if points.is_empty() {
            return Err(bad("no cost rows".into()));
        }
        for (key, p) in points.iter_mut() {
            p.sort_by(|a, b| a.0.total_cmp(&b.0));
            if let Some(w) = p.windows(2).find(|w| w[0].0 == w[1].0) {
                return Err(bad(format!(
                    "{} {} has two costs for {} rows; pass each measurement once",
                    key.0, key.1, w[0].0
                )));
            }
            if self.curves.contains_key(key) {
                return Err(bad(format!(
                    "{} {} is also in an earlier cost file; pass each measurement once",
                    key.0, key.1
                )));
            }
        }
        // Checked: from here on the file is added whole.
        for (key, p) in points {
            self.curves.insert(key, Curve::Measured(p));
        }
        self.files += 1;
        match device {
            Some(d) if self.devices.is_empty() => self.devices.push(d.to_string()),
            Some(_) => {}
            None => self.undeclared = Some(csv_path.to_path_buf()),
        }
        if let Some(meta) = meta {
            let bandwidth = meta["copy_bandwidth_bytes_per_s"].as_f64();
            if let (Some(bw), Some(bytes)) = (bandwidth, meta["weight_bytes"].as_object()) {
                for (key, b) in bytes {
                    let (Some((model, format)), Some(b)) = (key.split_once('/'), b.as_f64()) else {
                        continue;
                    };
                    // Files of one run repeat the limit; the first file's counts.
                    self.curves
                        .entry((model.to_string(), format!("{format}/bandwidth")))
                        .or_insert(Curve::Flat(b / bw * 1e3));
                }
            }
        }
        Ok(())
    }

    /// Cost models measured for both models.
    pub fn models_for(&self, draft: &str, target: &str) -> Vec<String> {
        let of = |m: &str| {
            self.curves
                .keys()
                .filter(|(model, _)| model == m)
                .map(|(_, c)| c.clone())
                .collect::<Vec<_>>()
        };
        let d = of(draft);
        of(target).into_iter().filter(|c| d.contains(c)).collect()
    }
}

/// Mean call counts of one configuration over its trials.
#[derive(Debug, Clone, PartialEq)]
pub struct Calls {
    pub entry: String,
    pub params: String,
    pub trials: usize,
    pub tokens: f64,
    pub draft_calls: f64,
    pub draft_rows: f64,
    pub target_calls: f64,
    pub target_rows: f64,
}

impl Calls {
    pub fn block_efficiency(&self) -> f64 {
        self.tokens / self.target_calls
    }

    /// Predicted ms per token under a draft and a target cost curve.
    pub fn ms_per_token(&self, draft: &Curve, target: &Curve) -> Option<f64> {
        let drafting = if self.draft_calls > 0.0 {
            self.draft_calls * draft.at(self.draft_rows / self.draft_calls)?
        } else {
            0.0
        };
        let verifying = self.target_calls * target.at(self.target_rows / self.target_calls)?;
        Some((drafting + verifying) / self.tokens)
    }
}

/// Call counts per configuration of `variant`, from the trials that
/// reached the target (the others carry no figures).
pub fn calls(records: &[TrialRecord], variant: &str) -> Result<Vec<Calls>, RecordsError> {
    let mut by_config: BTreeMap<(String, String), Vec<&TrialRecord>> = BTreeMap::new();
    for r in records
        .iter()
        .filter(|r| r.workload == "spectr" && r.variant == variant && r.reached)
    {
        by_config
            .entry((r.entry.clone(), r.params.clone()))
            .or_default()
            .push(r);
    }
    if by_config.is_empty() {
        return Err(RecordsError::Invalid(format!(
            "no spectr trial of variant `{variant}` reached its target in these records; run \
             `bench-suite run spectr --variant {variant}` first"
        )));
    }
    let mut out = Vec::new();
    for ((entry, params), trials) in by_config {
        let mean = |key: &str| -> Result<f64, RecordsError> {
            let mut sum = 0.0;
            for t in &trials {
                sum += t.figures.get(key).copied().ok_or_else(|| {
                    RecordsError::Invalid(format!(
                        "{entry} {params} trial {} has no figure `{key}`: records from before \
                         rows were recorded (commit 4d9d0bc); run it again",
                        t.trial
                    ))
                })?;
            }
            Ok(sum / trials.len() as f64)
        };
        out.push(Calls {
            tokens: mean("tokens")?,
            draft_calls: mean("draft_calls")?,
            draft_rows: mean("draft_rows")?,
            target_calls: mean("target_calls")?,
            target_rows: mean("target_rows")?,
            trials: trials.len(),
            entry,
            params,
        });
    }
    // Baseline first, then by k and L as numbers (not as text).
    let rank = |c: &Calls| {
        let n = |name| param_value(&c.params, name).and_then(|v| v.parse::<u32>().ok());
        let kind = ["autoregressive", "speculative", "spectr"]
            .iter()
            .position(|e| *e == c.entry)
            .unwrap_or(3);
        (kind, c.entry.clone(), n("k"), n("L"), c.params.clone())
    };
    out.sort_by_key(rank);
    Ok(out)
}

/// The configurations of `variant` none of whose trials reached the
/// target (so they carry no call counts and get no prediction), as
/// `entry params (statuses)`, in record order.
pub fn unreached(records: &[TrialRecord], variant: &str) -> Vec<String> {
    let mine = |r: &&TrialRecord| r.workload == "spectr" && r.variant == variant;
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for r in records.iter().filter(mine) {
        let config = format!("{} {}", r.entry, r.params);
        let reached = records
            .iter()
            .filter(mine)
            .any(|x| x.reached && x.entry == r.entry && x.params == r.params);
        if reached {
            continue;
        }
        let status = r.status.as_str().to_string();
        match out.iter_mut().find(|(c, _)| *c == config) {
            Some((_, st)) if !st.contains(&status) => st.push(status),
            Some(_) => {}
            None => out.push((config, vec![status])),
        }
    }
    out.into_iter()
        .map(|(c, st)| format!("{c} ({})", st.join(", ")))
        .collect()
}

/// One predicted speedup.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub entry: String,
    pub params: String,
    pub cost_model: String,
    pub ms_per_token: f64,
    pub over_autoregressive: f64,
    /// Over `speculative` with the same `L` (none for that entry itself
    /// and for autoregressive sampling).
    pub over_speculative: Option<f64>,
}

/// Predictions for every configuration and every cost model measured for
/// both models. Configurations whose rows fall outside a curve's measured
/// range are left out of that cost model.
pub fn predict(calls: &[Calls], costs: &Costs, draft: &str, target: &str) -> Vec<Prediction> {
    let mut out = Vec::new();
    for model in costs.models_for(draft, target) {
        let d = &costs.curves[&(draft.to_string(), model.clone())];
        let t = &costs.curves[&(target.to_string(), model.clone())];
        let Some(ar) = t.at(1.0) else { continue };
        let per_token: Vec<Option<f64>> = calls.iter().map(|c| c.ms_per_token(d, t)).collect();
        for (c, ms) in calls.iter().zip(&per_token) {
            let Some(ms) = *ms else { continue };
            let l = param_value(&c.params, "L");
            let spec = calls
                .iter()
                .zip(&per_token)
                .find(|(s, _)| s.entry == "speculative" && param_value(&s.params, "L") == l)
                .and_then(|(_, m)| *m);
            out.push(Prediction {
                entry: c.entry.clone(),
                params: c.params.clone(),
                cost_model: model.clone(),
                ms_per_token: ms,
                over_autoregressive: ar / ms,
                over_speculative: match (c.entry.as_str(), l, spec) {
                    ("spectr", Some(_), Some(s)) => Some(s / ms),
                    _ => None,
                },
            });
        }
    }
    out
}

/// One CSV row per (configuration, cost model).
pub fn to_csv(predictions: &[Prediction]) -> String {
    let mut s = String::from(
        "entry,params,cost_model,predicted_ms_per_token,predicted_over_autoregressive,predicted_over_speculative\n",
    );
    for p in predictions {
        let _ = writeln!(
            s,
            "{},\"{}\",{},{:.5},{:.4},{}",
            p.entry,
            p.params,
            p.cost_model,
            p.ms_per_token,
            p.over_autoregressive,
            p.over_speculative
                .map(|v| format!("{v:.4}"))
                .unwrap_or_default()
        );
    }
    s
}

/// The markdown table: one row per configuration, one column per cost model.
pub fn render(
    calls: &[Calls],
    unreached: &[String],
    predictions: &[Prediction],
    costs: &Costs,
    source: &str,
) -> String {
    let mut models: Vec<&str> = predictions.iter().map(|p| p.cost_model.as_str()).collect();
    models.dedup();
    let mut s = String::new();
    let devices = if costs.devices.is_empty() {
        "(device not recorded)".to_string()
    } else {
        costs.devices.join(", ")
    };
    let _ = writeln!(s, "## Predicted GPU speedup (not measured end to end)\n");
    let _ = writeln!(
        s,
        "Block efficiency and rows per call from `{source}`; per-call costs measured on {devices}. \
         Predicted ms per token `t = (D * C_draft(R_d / D) + V * C_target(R_v / V)) / T` (D, V: \
         draft and target calls; R: rows they score; T: tokens), against `C_target(1)` for \
         autoregressive sampling. Each cell: predicted speedup over autoregressive sampling, and \
         in brackets over `speculative` with the same L.\n"
    );
    let _ = write!(
        s,
        "| entry | params | tokens / target call | rows / target call |"
    );
    for m in &models {
        let _ = write!(s, " {m} |");
    }
    let _ = write!(s, "\n|---|---|---|---|");
    for _ in &models {
        let _ = write!(s, "---|");
    }
    s.push('\n');
    for c in calls {
        let _ = write!(
            s,
            "| {} | {} | {:.2} | {:.1} |",
            c.entry,
            if c.params.is_empty() { "-" } else { &c.params },
            c.block_efficiency(),
            c.target_rows / c.target_calls
        );
        for m in &models {
            let p = predictions
                .iter()
                .find(|p| p.cost_model == *m && p.entry == c.entry && p.params == c.params);
            let cell = match p {
                None => "n/a".to_string(),
                Some(p) => match p.over_speculative {
                    Some(v) => format!("{:.2}x ({:.2}x)", p.over_autoregressive, v),
                    None => format!("{:.2}x", p.over_autoregressive),
                },
            };
            let _ = write!(s, " {cell} |");
        }
        s.push('\n');
    }
    if !unreached.is_empty() {
        let _ = writeln!(
            s,
            "\nNot predicted (no trial reached the target, so no call counts): {}.",
            unreached.join("; ")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calls(entry: &str, params: &str, t: f64, dc: f64, dr: f64, vc: f64, vr: f64) -> Calls {
        Calls {
            entry: entry.into(),
            params: params.into(),
            trials: 1,
            tokens: t,
            draft_calls: dc,
            draft_rows: dr,
            target_calls: vc,
            target_rows: vr,
        }
    }

    #[test]
    fn calls_average_reached_trials_and_name_missing_figures() {
        let line = |trial: u32, figures: &str| {
            format!(
                r#"{{"schema_version":1,"run_id":"r","workload":"spectr","workload_version":1,"variant":"v","entry":"spectr","entry_kind":"method","params":"k=2,L=2","trial":{trial},"seed":1,"device":"cpu","hardware_id":"h","quality_metric":"exactness_p","quality":1.0,"target":0.001,"reached":true,"time_to_result_s":1.0,"budget_s":9.0,"status":"reached","started_at":"t","git_commit":"c","wall_s":1.0,"reason":"","figures":{{{figures}}}}}"#
            )
        };
        let full = |t: f64| {
            format!(
                r#""tokens":{t},"draft_calls":4,"draft_rows":8,"target_calls":2,"target_rows":10"#
            )
        };
        let recs: Vec<TrialRecord> = [line(0, &full(6.0)), line(1, &full(8.0))]
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let c = super::calls(&recs, "v").unwrap();
        assert_eq!(c.len(), 1);
        let mut many = Vec::new();
        for (entry, params) in [
            ("spectr", "k=8,L=2"),
            ("spectr", "k=2,L=8"),
            ("speculative", "k=1,L=2"),
            ("spectr", "k=2,L=2"),
        ] {
            let l = line(0, &full(6.0))
                .replace(
                    "\"spectr\",\"entry_kind",
                    &format!("\"{entry}\",\"entry_kind"),
                )
                .replace("k=2,L=2", params);
            many.push(serde_json::from_str::<TrialRecord>(&l).unwrap());
        }
        let order: Vec<String> = super::calls(&many, "v")
            .unwrap()
            .iter()
            .map(|c| format!("{} {}", c.entry, c.params))
            .collect();
        assert_eq!(
            order,
            [
                "speculative k=1,L=2",
                "spectr k=2,L=2",
                "spectr k=2,L=8",
                "spectr k=8,L=2"
            ]
        );
        assert_eq!((c[0].trials, c[0].tokens), (2, 7.0));
        assert_eq!(c[0].block_efficiency(), 3.5);
        let e = super::calls(&recs, "w").unwrap_err().to_string();
        assert!(e.contains("`w`"), "{e}");
        // A configuration whose only trial ran over budget has no call
        // counts: left out of the calls, and named by `unreached`.
        let over = line(0, "")
            .replace("k=2,L=2", "k=8,L=8")
            .replace(r#""reached":true"#, r#""reached":false"#)
            .replace(r#""status":"reached""#, r#""status":"over_budget""#);
        let mut with_over = recs.clone();
        with_over.push(serde_json::from_str(&over).unwrap());
        assert_eq!(super::calls(&with_over, "v").unwrap().len(), 1);
        assert_eq!(unreached(&with_over, "v"), ["spectr k=8,L=8 (over_budget)"]);
        assert!(unreached(&recs, "v").is_empty());
        let old: TrialRecord = serde_json::from_str(&line(0, r#""tokens":6"#)).unwrap();
        let e = super::calls(&[old], "v").unwrap_err().to_string();
        assert!(
            e.contains("draft_calls") && e.contains("run it again"),
            "{e}"
        );
    }

    #[test]
    fn curves_interpolate_inside_and_refuse_outside() {
        let c = Curve::Measured(vec![(1.0, 2.0), (3.0, 4.0), (9.0, 10.0)]);
        assert_eq!(c.at(1.0), Some(2.0));
        assert_eq!(c.at(2.0), Some(3.0));
        assert_eq!(c.at(6.0), Some(7.0));
        assert_eq!(c.at(9.0), Some(10.0));
        assert_eq!(c.at(0.5), None);
        assert_eq!(c.at(9.5), None);
        assert_eq!(Curve::Flat(1.5).at(100.0), Some(1.5));
    }

    #[test]
    fn the_prediction_follows_the_formula() {
        // Target: 4 ms at 1 row, 6 ms at 9; draft: 1 ms at 1 row, 2 ms at 3.
        let mut costs = Costs::default();
        costs.curves.insert(
            ("t".into(), "m".into()),
            Curve::Measured(vec![(1.0, 4.0), (9.0, 6.0)]),
        );
        costs.curves.insert(
            ("d".into(), "m".into()),
            Curve::Measured(vec![(1.0, 1.0), (3.0, 2.0)]),
        );
        let cs = vec![
            calls("autoregressive", "", 64.0, 0.0, 0.0, 64.0, 64.0),
            // 20 blocks of L = 2: 40 draft calls over 80 rows (2 each),
            // 20 verification calls over 100 rows (5 each), 60 tokens.
            calls("speculative", "k=1,L=2", 60.0, 40.0, 80.0, 20.0, 100.0),
            calls("spectr", "k=2,L=2", 60.0, 40.0, 80.0, 15.0, 75.0),
        ];
        let p = predict(&cs, &costs, "d", "t");
        assert_eq!(p.len(), 3);
        assert!((p[0].over_autoregressive - 1.0).abs() < 1e-12);
        // Draft: 40 * C_d(2) = 40 * 1.5; target: 20 * C_t(5) = 20 * 5.
        let spec_ms = (40.0 * 1.5 + 20.0 * 5.0) / 60.0;
        assert!((p[1].ms_per_token - spec_ms).abs() < 1e-12);
        assert!((p[1].over_autoregressive - 4.0 / spec_ms).abs() < 1e-12);
        assert_eq!(p[1].over_speculative, None);
        let spectr_ms = (40.0 * 1.5 + 15.0 * 5.0) / 60.0;
        assert!((p[2].over_speculative.unwrap() - spec_ms / spectr_ms).abs() < 1e-12);
        let table = render(&cs, &[], &p, &costs, "x");
        assert!(
            table.contains("| spectr | k=2,L=2 | 4.00 | 5.0 |"),
            "{table}"
        );
        assert!(!table.contains("Not predicted"), "{table}");
        let table = render(
            &cs,
            &["spectr k=8,L=8 (over_budget)".into()],
            &p,
            &costs,
            "x",
        );
        assert!(
            table.contains("Not predicted (no trial reached the target, so no call counts): spectr k=8,L=8 (over_budget)."),
            "{table}"
        );
    }

    #[test]
    fn a_cost_file_is_read_with_its_bandwidth_limit_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let csv_path = dir.path().join("gpu-costs.csv");
        std::fs::write(
            &csv_path,
            "model,format,mode,context,rows,median_ms,p10_ms,p90_ms\n\
             a,bf16,graph,320,2,3.0,2.9,3.1\na,bf16,graph,320,1,2.0,1.9,2.1\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("gpu-costs.json"),
            r#"{"device":"GPU X","copy_bandwidth_bytes_per_s":1e12,"weight_bytes":{"a/bf16":2e9}}"#,
        )
        .unwrap();
        let mut costs = Costs::default();
        costs.add_file(&csv_path).unwrap();
        let key = |m: &str| ("a".to_string(), m.to_string());
        assert_eq!(
            costs.curves[&key("bf16/graph")],
            Curve::Measured(vec![(1.0, 2.0), (2.0, 3.0)])
        );
        assert_eq!(costs.curves[&key("bf16/bandwidth")], Curve::Flat(2.0));
        assert_eq!(costs.devices, vec!["GPU X".to_string()]);

        // One cost row of `model` in a folder of its own, with a JSON
        // naming `device` beside it, or (`bare`) none.
        let file = |device: Option<&str>, model: &str| {
            let sub = dir
                .path()
                .join(format!("{}-{model}", device.unwrap_or("bare")));
            std::fs::create_dir_all(&sub).unwrap();
            let path = sub.join("gpu-costs.csv");
            std::fs::write(
                &path,
                format!("model,format,mode,context,rows,median_ms\n{model},bf16,graph,151,1,1.0\n"),
            )
            .unwrap();
            if let Some(device) = device {
                std::fs::write(
                    sub.join("gpu-costs.json"),
                    format!(r#"{{"device":"{device}"}}"#),
                )
                .unwrap();
            }
            path
        };
        // A second file of the same device adds its curves; one measured
        // on another device is refused, naming both.
        let second = |device: &str, model: &str| file(Some(device), model);
        costs.add_file(&second("GPU X", "b")).unwrap();
        assert!(costs
            .curves
            .contains_key(&("b".to_string(), "bf16/graph".to_string())));
        let e = costs
            .add_file(&second("GPU Y", "c"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("GPU Y") && e.contains("GPU X"), "{e}");
        assert_eq!(costs.devices, vec!["GPU X".to_string()]);
        // Nothing of the refused file was added.
        assert!(!costs
            .curves
            .contains_key(&("c".to_string(), "bf16/graph".to_string())));
        // A file without a device: accepted alone, refused beside any
        // other file, in either order.
        let bare = |model: &str| file(None, model);
        let e = costs.add_file(&bare("d")).unwrap_err().to_string();
        assert!(
            e.contains("bare-d") && e.contains("records no device"),
            "{e}"
        );
        let mut alone = Costs::default();
        alone.add_file(&bare("e")).unwrap();
        assert!(alone.devices.is_empty());
        let e = alone
            .add_file(&second("GPU X", "f"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bare-e") && e.contains("records no device"),
            "{e}"
        );
        let e = alone.add_file(&bare("g")).unwrap_err().to_string();
        assert!(e.contains("records no device"), "{e}");
        assert_eq!(alone.curves.len(), 1);

        let error_for = |rows: &str| {
            let head = "model,format,mode,context,rows,median_ms\n";
            std::fs::write(&csv_path, format!("{head}{rows}")).unwrap();
            Costs::default()
                .add_file(&csv_path)
                .unwrap_err()
                .to_string()
        };
        let e = error_for("a,b,c,1,0,1\n");
        assert!(e.contains("gpu-costs.csv") && e.contains("positive"), "{e}");
        // Two costs for the same row count: refused, not silently dropped.
        let e = error_for("a,bf16,graph,320,1,2.0\na,bf16,graph,320,1,2.5\n");
        assert!(e.contains("two costs for 1 rows"), "{e}");
        let e = Costs::default()
            .add_file(&dir.path().join("missing.csv"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing.csv") && e.contains("spectr_gpu_costs.py"),
            "{e}"
        );
    }
}
