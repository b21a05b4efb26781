//! From trial records to the numbers a report prints: per configuration the
//! median time-to-result with its bootstrap interval, the success count,
//! the paired speedup over the reference baseline and the median of each
//! figure; per workload the performance profile over its variants; and a
//! suite-wide profile for entries that appear in several workloads.
//!
//! Only records go in (renderers never see the runner). Records from
//! different hardware are never compared with each other: they form
//! separate [`HardwareGroup`]s, and mixing them needs an explicit flag.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::records::TrialRecord;
use crate::stats::{self, PerformanceProfile, Speedup};

/// Seed of the bootstrap resampling, fixed so that reports are reproducible.
pub const BOOTSTRAP_SEED: u64 = 0x5eed;

#[derive(Debug, Clone, PartialEq)]
pub struct ConfigSummary {
    pub workload: String,
    pub workload_version: u32,
    pub variant: String,
    pub entry: String,
    pub entry_kind: String,
    pub params: String,
    /// Time-to-result per trial (infinity for misses), in trial order.
    pub times: Vec<f64>,
    pub seeds: Vec<u64>,
    pub median_s: f64,
    pub ci_s: (f64, f64),
    pub successes: usize,
    pub trials: usize,
    /// Against the variant's reference baseline, paired by trial seed.
    pub speedup: Option<Speedup>,
    /// Median over trials of each recorded figure.
    pub figures: BTreeMap<String, f64>,
    pub quality_median: Option<f64>,
    pub target: f64,
    /// The most common failure reason, if any trial failed.
    pub failure: Option<String>,
}

impl ConfigSummary {
    pub fn label(&self) -> String {
        if self.params.is_empty() {
            self.entry.clone()
        } else {
            format!("{} {}", self.entry, self.params)
        }
    }

    /// A parameter's value, parsed from the `params` string.
    pub fn param(&self, name: &str) -> Option<f64> {
        param_value(&self.params, name).and_then(|v| v.parse().ok())
    }
}

/// `c`'s speedup over `baseline`, from the trials both ran with the same
/// seed (none: `None`).
pub fn paired_speedup(baseline: &ConfigSummary, c: &ConfigSummary) -> Option<Speedup> {
    let (base_t, own_t): (Vec<f64>, Vec<f64>) = c
        .seeds
        .iter()
        .zip(&c.times)
        .filter_map(|(s, &t)| {
            let i = baseline.seeds.iter().position(|bs| bs == s)?;
            Some((baseline.times[i], t))
        })
        .unzip();
    (!base_t.is_empty()).then(|| stats::speedup_summary(&base_t, &own_t, BOOTSTRAP_SEED))
}

/// The value of `name` in a record's `k=v,k=v` parameter string.
pub fn param_value<'a>(params: &'a str, name: &str) -> Option<&'a str> {
    params
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The reference configuration `c` is measured against: with one, that
/// one; with several, the one that agrees with `c` on every parameter
/// that varies among them (`None` if `c` lacks one of those parameters or
/// no reference sits at its point).
fn matching_reference<'r>(
    refs: &'r [ConfigSummary],
    c: &ConfigSummary,
) -> Option<&'r ConfigSummary> {
    if let [only] = refs {
        return Some(only);
    }
    let names: std::collections::BTreeSet<&str> = refs
        .iter()
        .flat_map(|r| {
            r.params
                .split(',')
                .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
        })
        .collect();
    let axes: Vec<&str> = names
        .into_iter()
        .filter(|n| {
            let first = refs[0].param(n);
            refs.iter().any(|r| r.param(n) != first)
        })
        .collect();
    refs.iter().find(|r| {
        axes.iter()
            .all(|a| c.param(a).is_some() && r.param(a) == c.param(a))
    })
}

/// The profile of one workload over its variants (or of the suite).
#[derive(Debug, Clone)]
pub struct ProfileSummary {
    pub scope: String,
    pub profile: PerformanceProfile,
    /// Per entry: geometric-mean speedup over the reference, and the number
    /// of problems it was computed over.
    pub geomean_speedup: Vec<Option<(f64, usize)>>,
}

#[derive(Debug, Clone)]
pub struct HardwareGroup {
    pub hardware_id: String,
    pub configs: Vec<ConfigSummary>,
    pub profiles: Vec<ProfileSummary>,
    pub suite_profile: Option<ProfileSummary>,
}

impl HardwareGroup {
    pub fn workloads(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for c in &self.configs {
            if !out.contains(&c.workload.as_str()) {
                out.push(&c.workload);
            }
        }
        out
    }

    pub fn variants(&self, workload: &str) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for c in self.configs.iter().filter(|c| c.workload == workload) {
            if !out.contains(&c.variant.as_str()) {
                out.push(&c.variant);
            }
        }
        out
    }

    pub fn configs_of<'a>(
        &'a self,
        workload: &'a str,
        variant: &'a str,
    ) -> impl Iterator<Item = &'a ConfigSummary> + 'a {
        self.configs
            .iter()
            .filter(move |c| c.workload == workload && c.variant == variant)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SummaryError {
    #[error("records from {count} different hardware fingerprints ({ids}); results from different machines are not comparable. Report them separately, or pass --allow-mixed-hardware to put them in one report, each labelled with its hardware")]
    MixedHardware { count: usize, ids: String },
    #[error("duplicate record for {key} (seed {seed}) on hardware {hardware}: the same trial appears twice (two runs with the same seed?); pass each run to a separate report, or merge shards of one run")]
    Duplicate {
        key: String,
        seed: u64,
        hardware: String,
    },
    #[error("no records to report")]
    Empty,
}

/// Summarises `records`, one group per hardware fingerprint.
pub fn summarise(
    records: &[TrialRecord],
    allow_mixed: bool,
) -> Result<Vec<HardwareGroup>, SummaryError> {
    if records.is_empty() {
        return Err(SummaryError::Empty);
    }
    let mut hardware: Vec<&str> = Vec::new();
    for r in records {
        if !hardware.contains(&r.hardware_id.as_str()) {
            hardware.push(&r.hardware_id);
        }
    }
    if hardware.len() > 1 && !allow_mixed {
        return Err(SummaryError::MixedHardware {
            count: hardware.len(),
            ids: hardware.join(", "),
        });
    }
    hardware
        .iter()
        .map(|hw| {
            let rs: Vec<&TrialRecord> = records.iter().filter(|r| r.hardware_id == *hw).collect();
            summarise_group(hw, &rs)
        })
        .collect()
}

fn summarise_group(
    hardware_id: &str,
    records: &[&TrialRecord],
) -> Result<HardwareGroup, SummaryError> {
    // Configurations in order of first appearance.
    let mut order: Vec<(String, String, String, String)> = Vec::new();
    let mut by_config: HashMap<(String, String, String, String), Vec<&TrialRecord>> =
        HashMap::new();
    let mut seen = HashSet::new();
    for r in records {
        let key = (
            r.workload.clone(),
            r.variant.clone(),
            r.entry.clone(),
            r.params.clone(),
        );
        if !seen.insert((key.clone(), r.seed)) {
            return Err(SummaryError::Duplicate {
                key: r.key().to_string(),
                seed: r.seed,
                hardware: hardware_id.into(),
            });
        }
        by_config
            .entry(key.clone())
            .or_insert_with(|| {
                order.push(key.clone());
                Vec::new()
            })
            .push(r);
    }
    let mut configs: Vec<ConfigSummary> = order
        .iter()
        .map(|key| config_summary(&by_config[key]))
        .collect();

    // Paired speedups over the reference configuration of each variant: the
    // one at the same point of the reference's own axes (the parameters
    // that vary among the reference's configurations, such as a variant's
    // context length or scene size), or the only one.
    let mut references: HashMap<(String, String), Vec<ConfigSummary>> = HashMap::new();
    for c in configs.iter().filter(|c| c.entry_kind == "reference") {
        references
            .entry((c.workload.clone(), c.variant.clone()))
            .or_default()
            .push(c.clone());
    }
    for c in &mut configs {
        let Some(refs) = references.get(&(c.workload.clone(), c.variant.clone())) else {
            continue;
        };
        let Some(reference) = matching_reference(refs, c) else {
            continue;
        };
        c.speedup = paired_speedup(reference, c);
    }

    let mut profiles = Vec::new();
    let mut workloads: Vec<&str> = Vec::new();
    for c in &configs {
        if !workloads.contains(&c.workload.as_str()) {
            workloads.push(&c.workload);
        }
    }
    for w in &workloads {
        let problems: Vec<(String, String)> = unique(
            configs
                .iter()
                .filter(|c| c.workload == *w)
                .map(|c| (c.workload.clone(), c.variant.clone())),
        );
        let entries = unique(
            configs
                .iter()
                .filter(|c| c.workload == *w)
                .map(|c| c.entry.clone()),
        );
        profiles.push(profile_over(
            &configs,
            &format!("workload {w}"),
            &entries,
            &problems,
        ));
    }
    // Suite-wide: entries that appear in at least two workloads.
    let shared: Vec<String> = unique(configs.iter().map(|c| c.entry.clone()))
        .into_iter()
        .filter(|e| {
            unique(
                configs
                    .iter()
                    .filter(|c| &c.entry == e)
                    .map(|c| c.workload.clone()),
            )
            .len()
                >= 2
        })
        .collect();
    let suite_profile = (!shared.is_empty()).then(|| {
        let problems = unique(
            configs
                .iter()
                .map(|c| (c.workload.clone(), c.variant.clone())),
        );
        profile_over(&configs, "suite", &shared, &problems)
    });
    Ok(HardwareGroup {
        hardware_id: hardware_id.into(),
        configs,
        profiles,
        suite_profile,
    })
}

fn unique<T: PartialEq>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut out = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// An entry's time on a problem is its best configuration's median (the
/// grid plays the role of AlgoPerf's external tuning); absent is a miss.
fn profile_over(
    configs: &[ConfigSummary],
    scope: &str,
    entries: &[String],
    problems: &[(String, String)],
) -> ProfileSummary {
    let best = |entry: &str, (w, v): &(String, String)| -> Option<&ConfigSummary> {
        configs
            .iter()
            .filter(|c| c.entry == entry && &c.workload == w && &c.variant == v)
            .min_by(|a, b| a.median_s.total_cmp(&b.median_s))
    };
    let times: Vec<Vec<f64>> = entries
        .iter()
        .map(|e| {
            problems
                .iter()
                .map(|p| best(e, p).map_or(f64::INFINITY, |c| c.median_s))
                .collect()
        })
        .collect();
    let geomean_speedup = entries
        .iter()
        .map(|e| {
            let speedups: Vec<f64> = problems
                .iter()
                .filter_map(|p| {
                    best(e, p)
                        .and_then(|c| c.speedup.as_ref())
                        .map(|s| s.median)
                })
                .collect();
            stats::geometric_mean_speedup(&speedups)
        })
        .collect();
    ProfileSummary {
        scope: scope.into(),
        profile: PerformanceProfile::new(
            entries.to_vec(),
            problems.iter().map(|(w, v)| format!("{w}/{v}")).collect(),
            times,
        ),
        geomean_speedup,
    }
}

fn config_summary(records: &[&TrialRecord]) -> ConfigSummary {
    let first = records[0];
    let mut sorted: Vec<&&TrialRecord> = records.iter().collect();
    sorted.sort_by_key(|r| r.trial);
    let times: Vec<f64> = sorted.iter().map(|r| r.time_to_result_s).collect();
    let median_s = stats::median(&times);
    let ci_s = stats::bootstrap_ci(&times, stats::median, 0.95, 2000, BOOTSTRAP_SEED);
    let mut figure_values: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in &sorted {
        for (k, v) in &r.figures {
            figure_values.entry(k.clone()).or_default().push(*v);
        }
    }
    let qualities: Vec<f64> = sorted.iter().filter_map(|r| r.quality).collect();
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for r in sorted.iter().filter(|r| !r.reached) {
        *reasons.entry(r.reason.as_str()).or_default() += 1;
    }
    ConfigSummary {
        workload: first.workload.clone(),
        workload_version: first.workload_version,
        variant: first.variant.clone(),
        entry: first.entry.clone(),
        entry_kind: first.entry_kind.clone(),
        params: first.params.clone(),
        seeds: sorted.iter().map(|r| r.seed).collect(),
        median_s,
        ci_s,
        successes: sorted.iter().filter(|r| r.reached).count(),
        trials: sorted.len(),
        speedup: None,
        figures: figure_values
            .into_iter()
            .map(|(k, v)| (k, stats::median(&v)))
            .collect(),
        quality_median: (!qualities.is_empty()).then(|| stats::median(&qualities)),
        target: first.target,
        failure: reasons
            .into_iter()
            .max_by_key(|&(_, n)| n)
            .map(|(r, n)| format!("{n}x {r}")),
        times,
    }
}

#[cfg(test)]
mod reference_tests {
    use super::*;

    fn config(entry: &str, kind: &str, params: &str) -> ConfigSummary {
        ConfigSummary {
            workload: "w".into(),
            workload_version: 1,
            variant: "v".into(),
            entry: entry.into(),
            entry_kind: kind.into(),
            params: params.into(),
            times: vec![1.0],
            seeds: vec![1],
            median_s: 1.0,
            ci_s: (1.0, 1.0),
            successes: 1,
            trials: 1,
            speedup: None,
            figures: Default::default(),
            quality_median: None,
            target: 1.0,
            failure: None,
        }
    }

    /// A method is paired with the reference at its own context (the
    /// reference's axis), whatever its other parameters; a lone reference
    /// serves everything; a point with no reference gets none.
    #[test]
    fn the_reference_is_the_one_at_the_same_axis_point() {
        let refs = vec![
            config("dense", "reference", "context=4096,budget=1"),
            config("dense", "reference", "context=65536,budget=1"),
        ];
        let m = config("topk", "method", "context=65536,budget=0.1");
        assert_eq!(
            matching_reference(&refs, &m).unwrap().params,
            "context=65536,budget=1"
        );
        let m = config("topk", "method", "context=4096,budget=0.5");
        assert_eq!(
            matching_reference(&refs, &m).unwrap().params,
            "context=4096,budget=1"
        );
        assert!(matching_reference(&refs, &config("x", "method", "context=8")).is_none());
        assert!(matching_reference(&refs, &config("x", "method", "budget=1")).is_none());
        let one = vec![config("dense", "reference", "budget=1")];
        assert_eq!(
            matching_reference(&one, &config("x", "method", "budget=0.1"))
                .unwrap()
                .params,
            "budget=1"
        );
    }
}
