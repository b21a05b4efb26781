//! `bench-suite pair A B`: the trials two runs share, side by side. A pair
//! is the same workload, variant, entry, params, trial and seed, so the
//! same inputs: whether two devices or builds compute the same thing
//! (quality, target decisions, chosen figures), where `compare` asks
//! whether one got slower.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::records::TrialRecord;

/// What to set beside the quality of each pair.
#[derive(Debug, Clone, Default)]
pub struct PairOptions {
    /// Column names for the two runs.
    pub labels: (String, String),
    /// Figures shown per pair, with the largest difference over pairs.
    pub figures: Vec<String>,
    /// A prefix of 0/1 figures (the needle's `acc_c` cells): per pair, how
    /// many differ.
    pub cells: Option<String>,
}

type Key<'a> = (&'a str, &'a str, &'a str, &'a str, u32, u64);

fn key(r: &TrialRecord) -> Key<'_> {
    (
        &r.workload,
        &r.variant,
        &r.entry,
        &r.params,
        r.trial,
        r.seed,
    )
}

fn num(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{x:.4}"))
}

/// The Markdown of the pairs; an error when the runs share no trial.
pub fn render(a: &[TrialRecord], b: &[TrialRecord], o: &PairOptions) -> Result<String, String> {
    let bm: BTreeMap<Key, &TrialRecord> = b.iter().map(|r| (key(r), r)).collect();
    let am: BTreeMap<Key, &TrialRecord> = a.iter().map(|r| (key(r), r)).collect();
    let pairs: Vec<(&TrialRecord, &TrialRecord)> = am
        .iter()
        .filter_map(|(k, ra)| bm.get(k).map(|rb| (*ra, *rb)))
        .collect();
    if pairs.is_empty() {
        return Err(
            "the two runs share no trial (workload, variant, entry, params, trial \
                    and seed); run both with the same --seed and --profile"
                .into(),
        );
    }
    // A figure or cell prefix no pair carries is a typo, not "no difference".
    let mut names: Vec<&str> = pairs
        .iter()
        .flat_map(|(x, y)| x.figures.keys().chain(y.figures.keys()))
        .map(String::as_str)
        .collect();
    names.sort_unstable();
    names.dedup();
    let missing: Vec<&str> = o
        .figures
        .iter()
        .filter(|f| !names.contains(&f.as_str()))
        .chain(
            o.cells
                .iter()
                .filter(|p| !names.iter().any(|k| k.starts_with(p.as_str()))),
        )
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        let more = names.len().saturating_sub(40);
        let carried = if names.is_empty() {
            "no figures (their trials have no result)".to_string()
        } else {
            names[..names.len().min(40)].join(", ")
        };
        return Err(format!(
            "no paired trial has a finite value for the figure or cell prefix {} (a typo?); \
             the paired records carry: {carried}{}",
            missing.join(", "),
            if more > 0 {
                format!(" (and {more} more)")
            } else {
                String::new()
            }
        ));
    }
    let (la, lb) = (&o.labels.0, &o.labels.1);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Pairs: {} trials in both; only in {la}: {}, only in {lb}: {}.\n",
        pairs.len(),
        a.len() - pairs.len(),
        b.len() - pairs.len()
    );
    let mut head = vec!["workload", "variant", "entry", "params", "trial"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    for c in ["quality", "reached"]
        .iter()
        .map(|s| s.to_string())
        .chain(o.figures.iter().cloned())
    {
        head.push(format!("{c} {la}"));
        head.push(format!("{c} {lb}"));
    }
    if let Some(p) = &o.cells {
        head.push(format!("{p}* differing"));
    }
    let _ = writeln!(s, "| {} |", head.join(" | "));
    let _ = writeln!(s, "|{}", "---|".repeat(head.len()));
    let mut worst: Vec<f64> = vec![0.0; o.figures.len() + 1];
    let (mut flips, mut cells, mut cells_differing) = (Vec::new(), 0usize, 0usize);
    for (ra, rb) in &pairs {
        let mut row = vec![
            ra.workload.clone(),
            ra.variant.clone(),
            ra.entry.clone(),
            ra.params.clone(),
            ra.trial.to_string(),
            num(ra.quality),
            num(rb.quality),
            ra.reached.to_string(),
            rb.reached.to_string(),
        ];
        if let (Some(x), Some(y)) = (ra.quality, rb.quality) {
            worst[0] = worst[0].max((x - y).abs());
        }
        if ra.reached != rb.reached {
            let params = if ra.params.is_empty() {
                String::new()
            } else {
                format!(" {}", ra.params)
            };
            flips.push(format!("{}{params} trial {}", ra.entry, ra.trial));
        }
        for (i, f) in o.figures.iter().enumerate() {
            let (x, y) = (ra.figures.get(f).copied(), rb.figures.get(f).copied());
            if let (Some(x), Some(y)) = (x, y) {
                worst[i + 1] = worst[i + 1].max((x - y).abs());
            }
            row.push(num(x));
            row.push(num(y));
        }
        if let Some(p) = &o.cells {
            let differing = ra
                .figures
                .iter()
                .filter(|(k, _)| k.starts_with(p.as_str()))
                .filter(|(k, x)| rb.figures.get(*k).is_some_and(|y| y != *x))
                .count();
            cells += ra
                .figures
                .keys()
                .filter(|k| k.starts_with(p.as_str()))
                .count();
            cells_differing += differing;
            row.push(differing.to_string());
        }
        let _ = writeln!(s, "| {} |", row.join(" | "));
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "- target decisions differing: {} of {}{}",
        flips.len(),
        pairs.len(),
        if flips.is_empty() {
            String::new()
        } else {
            format!(" ({})", flips.join("; "))
        }
    );
    let names = std::iter::once("quality").chain(o.figures.iter().map(String::as_str));
    for (name, w) in names.zip(&worst) {
        let _ = writeln!(s, "- largest |{la} - {lb}| of {name}: {w:.4}");
    }
    if let Some(p) = &o.cells {
        let _ = writeln!(s, "- {p}* figures differing: {cells_differing} of {cells}");
    }
    Ok(s)
}
