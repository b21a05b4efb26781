//! `bench-suite compare BASE NEW`: per configuration, the change in median
//! time-to-result; a regression beyond the threshold fails CI.

use std::fmt::Write as _;

use crate::report::{fmt_ratio, fmt_time};
use crate::summary::HardwareGroup;

#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub config: String,
    pub base_s: f64,
    pub new_s: f64,
    /// new / base (greater than 1 is slower).
    pub ratio: f64,
    pub regression: bool,
}

/// Compares configurations present in both; a configuration regresses when
/// its median grows by more than `threshold_pct` percent or it newly misses.
pub fn compare(base: &HardwareGroup, new: &HardwareGroup, threshold_pct: f64) -> Vec<Change> {
    let limit = 1.0 + threshold_pct / 100.0;
    new.configs
        .iter()
        .filter_map(|n| {
            let b = base.configs.iter().find(|b| {
                (
                    b.workload.as_str(),
                    b.variant.as_str(),
                    b.entry.as_str(),
                    b.params.as_str(),
                ) == (
                    n.workload.as_str(),
                    n.variant.as_str(),
                    n.entry.as_str(),
                    n.params.as_str(),
                )
            })?;
            let ratio = match (b.median_s.is_finite(), n.median_s.is_finite()) {
                (true, true) => n.median_s / b.median_s,
                (true, false) => f64::INFINITY,
                (false, true) => 0.0,
                (false, false) => 1.0,
            };
            Some(Change {
                config: format!("{}/{}/{}", n.workload, n.variant, n.label()),
                base_s: b.median_s,
                new_s: n.median_s,
                ratio,
                regression: ratio > limit,
            })
        })
        .collect()
}

/// The configurations (as `workload/variant/entry [params]`) that only one
/// side has, which [`compare`] leaves out: `(only in base, only in new)`.
pub fn unmatched(base: &HardwareGroup, new: &HardwareGroup) -> (Vec<String>, Vec<String>) {
    let name =
        |c: &crate::summary::ConfigSummary| format!("{}/{}/{}", c.workload, c.variant, c.label());
    let names = |g: &HardwareGroup| g.configs.iter().map(name).collect::<Vec<_>>();
    let (b, n) = (names(base), names(new));
    (
        b.iter().filter(|x| !n.contains(x)).cloned().collect(),
        n.iter().filter(|x| !b.contains(x)).cloned().collect(),
    )
}

pub fn render(changes: &[Change], threshold_pct: f64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| configuration | base (s) | new (s) | new/base | verdict |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for c in changes {
        let neither = c.base_s.is_infinite() && c.new_s.is_infinite();
        let verdict = if c.regression {
            format!("REGRESSION (> +{threshold_pct}%)")
        } else if neither {
            "no result in either run".into()
        } else {
            "ok".into()
        };
        // Two misses have no ratio to show.
        let ratio = if neither {
            "-".into()
        } else {
            fmt_ratio(c.ratio)
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {ratio} | {verdict} |",
            c.config,
            fmt_time(c.base_s),
            fmt_time(c.new_s),
        );
    }
    s
}
