//! The contract every workload implements, and nothing else.
//!
//! A workload is mostly *data* ([`WorkloadSpec`]): its papers, variants,
//! entries (methods and baselines, with parameter grids), quality metric,
//! target and time budget. The runner in `bench-suite` reads that data and
//! decides what "reached" means (AlgoPerf's `spec.Workload` does the same
//! with `validation_target_value` and `max_allowed_runtime_sec`).
//!
//! The code a workload supplies is split so that set-up cannot be timed by
//! accident (rustc-perf's `register_benchmark(name, || { init(); move ||
//! work() })`):
//!
//! ```text
//! Workload::load(variant)      untimed, once per variant: assets, models
//!   └ Loaded::trial(seed)      untimed, once per trial: data shared by every
//!                              entry, so comparisons are paired
//!       └ TrialData::setup(config)   untimed: per-configuration set-up,
//!                                    kernel compilation, warm-up
//!           └ Job::run(stopwatch)    TIMED: the only code under the clock
//!             Job::evaluate()        untimed: quality against the target
//! ```
//!
//! Only [`Job::run`] receives a [`Stopwatch`]; a job that evaluates while it
//! runs (training-style) pauses it with [`Stopwatch::paused`].

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::clock::Stopwatch;
use crate::device::Device;
use crate::WorkloadError;

/// A paper a workload reproduces.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Paper {
    pub title: &'static str,
    pub arxiv: &'static str,
    /// Where in the paper the reproduced method or claim is (e.g. "Sec. 4, Alg. 2").
    pub section: &'static str,
}

/// Whether a larger quality value is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    HigherIsBetter,
    LowerIsBetter,
}

/// The quality metric of a workload.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Metric {
    /// Column-safe name, e.g. `exactness_p`.
    pub name: &'static str,
    pub description: &'static str,
    pub direction: Direction,
}

impl Metric {
    /// The one definition of "at or above the target" (the runner calls it,
    /// workloads never decide it themselves).
    pub fn reached(&self, quality: f64, target: f64) -> bool {
        if quality.is_nan() {
            return false;
        }
        match self.direction {
            Direction::HigherIsBetter => quality >= target,
            Direction::LowerIsBetter => quality <= target,
        }
    }
}

/// A target value and where it came from.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Target {
    pub value: f64,
    pub source: &'static str,
}

/// Run size: `quick` is what CI runs (each workload under 2 minutes on two
/// CPU cores); `full` is publication size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    Quick,
    Full,
}

impl Profile {
    pub const ALL: [Profile; 2] = [Profile::Quick, Profile::Full];

    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Quick => "quick",
            Profile::Full => "full",
        }
    }

    /// Default number of trials (AlgoPerf-style repetition): 2 in quick, 5 in full.
    pub fn default_trials(self) -> u32 {
        match self {
            Profile::Quick => 2,
            Profile::Full => 5,
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "quick" => Ok(Profile::Quick),
            "full" => Ok(Profile::Full),
            _ => Err(format!(
                "unknown profile `{s}`; valid profiles: quick, full"
            )),
        }
    }
}

/// Wall-clock budget for one trial of one configuration, per profile.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Budget {
    pub quick_s: f64,
    pub full_s: f64,
}

impl Budget {
    pub fn seconds(&self, profile: Profile) -> f64 {
        match profile {
            Profile::Quick => self.quick_s,
            Profile::Full => self.full_s,
        }
    }
}

/// How a variant takes part in runs that do not name variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VariantRole {
    /// The workload's default variant (exactly one; it is in the quick profile).
    Default,
    /// Runs in the profiles it lists.
    Standard,
    /// Held out: runs only when named with `--variant`.
    HeldOut,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Variant {
    pub id: &'static str,
    pub description: &'static str,
    pub role: VariantRole,
    /// Profiles in which this variant runs when no `--variant` is given.
    pub profiles: &'static [Profile],
    pub target: Target,
    pub budget: Budget,
    /// Axes every configuration of this variant is crossed with, before the
    /// entry's own grid (the scene size of a scaling variant: one chart
    /// then puts every size on one axis). Usually empty.
    pub params: &'static [Param],
}

impl Variant {
    /// Every configuration of `entry` on this variant: the variant's axes
    /// first, then the entry's fixed parameters and grid.
    pub fn configs(&self, entry: &Entry) -> Vec<Params> {
        let own = entry.configs();
        cross(vec![Params::default()], self.params)
            .into_iter()
            .flat_map(|base| {
                own.iter().map(move |e| {
                    let mut next = base.clone();
                    next.0.extend(e.0.iter().cloned());
                    next
                })
            })
            .collect()
    }

    /// Whether an un-filtered run of `profile` includes this variant.
    pub fn runs_by_default(&self, profile: Profile) -> bool {
        self.role != VariantRole::HeldOut && self.profiles.contains(&profile)
    }
}

/// A method under test, a baseline, or the one reference baseline that
/// speedups are measured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryKind {
    Method,
    Baseline,
    Reference,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Method => "method",
            EntryKind::Baseline => "baseline",
            EntryKind::Reference => "reference",
        }
    }
}

/// One axis of an entry's parameter grid.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Param {
    pub name: &'static str,
    pub values: &'static [f64],
}

/// A method or baseline. Each point of its grid is its own configuration.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Entry {
    pub id: &'static str,
    pub kind: EntryKind,
    pub description: &'static str,
    pub grid: &'static [Param],
    /// Parameters with one value that are still recorded, so that entries
    /// line up on a chart (plain speculative sampling is `k = 1`).
    pub fixed: &'static [(&'static str, f64)],
    /// Variants this entry applies to; empty means all.
    pub variants: &'static [&'static str],
    /// Runs only with `--device cuda` (a peer that exists only on GPUs);
    /// CPU runs leave it out unless it is named, which is then an error.
    pub cuda_only: bool,
    /// Variants in which this entry has no GPU form yet: `--device cuda`
    /// runs leave it out of them (and say so), where it would only fail.
    pub cpu_only_variants: &'static [&'static str],
}

impl Entry {
    pub fn applies_to(&self, variant: &str) -> bool {
        self.variants.is_empty() || self.variants.contains(&variant)
    }

    /// Every configuration of the grid, in declaration order (the last
    /// parameter varies fastest), fixed parameters first.
    pub fn configs(&self) -> Vec<Params> {
        let fixed = Params(
            self.fixed
                .iter()
                .map(|&(n, v)| (n.to_string(), v))
                .collect(),
        );
        cross(vec![fixed], self.grid)
    }
}

/// Every extension of `bases` by one value of each axis, in order (the
/// last axis varies fastest).
fn cross(bases: Vec<Params>, axes: &[Param]) -> Vec<Params> {
    axes.iter().fold(bases, |out, p| {
        out.into_iter()
            .flat_map(|base| {
                p.values.iter().map(move |&v| {
                    let mut next = base.clone();
                    next.0.push((p.name.to_string(), v));
                    next
                })
            })
            .collect()
    })
}

/// One grid point, in the order the entry declares its parameters.
/// Written as `k=2,L=4` in records; the empty string when there are none.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Params(pub Vec<(String, f64)>);

impl Params {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|(n, _)| n == name).map(|&(_, v)| v)
    }

    /// A parameter that the grid guarantees, as an integer.
    pub fn usize(&self, name: &str) -> Result<usize, WorkloadError> {
        match self.get(name) {
            Some(v) if v >= 0.0 && v.fract() == 0.0 => Ok(v as usize),
            Some(v) => Err(WorkloadError::Config(format!(
                "parameter `{name}` must be a non-negative integer, got {v}"
            ))),
            None => Err(WorkloadError::Config(format!(
                "parameter `{name}` is missing from `{self}`"
            ))),
        }
    }
}

impl fmt::Display for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (n, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{n}={v}")?;
        }
        Ok(())
    }
}

impl FromStr for Params {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Ok(Params::default());
        }
        s.split(',')
            .map(|kv| {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| format!("parameter `{kv}` is not of the form name=value"))?;
                let v: f64 = v
                    .parse()
                    .map_err(|_| format!("parameter `{k}` has a non-numeric value `{v}`"))?;
                Ok((k.to_string(), v))
            })
            .collect::<Result<_, _>>()
            .map(Params)
    }
}

/// A workload-specific figure worth a column in the summary table.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Figure {
    /// Key in [`Outcome::figures`]; units belong in the name (`tokens_per_s`).
    pub key: &'static str,
    pub label: &'static str,
}

/// A second paired ratio for the summary table, beside the one against the
/// reference: each configuration's time against the configuration of
/// `baseline` whose parameters named in `same` are equal (SpecTr against
/// speculative sampling with the same draft length), paired by trial seed.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Comparison {
    /// The entry the ratio is taken against.
    pub baseline: &'static str,
    /// Parameters that must match; the others may differ.
    pub same: &'static [&'static str],
    /// Column header.
    pub label: &'static str,
}

/// Where a chart reads a coordinate from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Source {
    /// A configuration parameter.
    Param(&'static str),
    /// The median over trials of a recorded figure.
    Figure(&'static str),
    /// The median time-to-result in seconds.
    TimeToResult,
    /// The median paired speedup over the reference baseline.
    Speedup,
}

/// How a chart groups points into lines.
#[derive(Debug, Clone, Copy, Serialize)]
pub enum Series {
    /// One line per value of this parameter, across the chart's entries
    /// (`L=4` joins speculative sampling at k = 1 and SpecTr at k > 1).
    Param(&'static str),
    /// One line per listed figure, each `(legend label, figure key)`; the x
    /// axis must be a parameter or figure shared by all.
    Figures(&'static [(&'static str, &'static str)]),
    /// One line per entry (and per value of any other parameter that
    /// varies among the chart's configurations, besides the x axis).
    Entries,
    /// One line per configuration through fixed points `(x, figure)`: a
    /// distribution as its quantile function (`(0.5, "occ_p50")`), or one
    /// figure measured at several sizes within a trial (`(4096.0,
    /// "tokens_per_s_c4096")`); the chart's `x` is ignored.
    Curve(&'static [(f64, &'static str)]),
    /// A heat map per configuration (small multiples): one panel per
    /// configuration, labelled like [`Series::Curve`] lines, with one cell
    /// per `(row, col)` pair. A cell's value is the figure named by `key`
    /// with `{row}` and `{col}` replaced by the row and column values
    /// written in their shortest form (`1024.0` -> `1024`, `0.5` -> `0.5`),
    /// so `"acc_c{row}_d{col}"` reads `acc_c1024_d50`. Rows run down the
    /// chart's `y_label` (context length, first row on top), columns along
    /// its `x_label` (needle depth); cells are coloured on a fixed 0..1
    /// scale, so the figures should be shares (accuracy); a missing cell is
    /// drawn hatched grey, and a configuration without any of these figures
    /// gets no panel. The chart's `x`, `y`, `theory`, `log_x` and `log_y`
    /// are ignored.
    Heat {
        rows: &'static [f64],
        cols: &'static [f64],
        key: &'static str,
    },
    /// A scatter of configurations at (`x`, `y`), one colour per entry (its
    /// configurations joined in parameter order), with a dashed line
    /// through the Pareto front: the configurations that no other one
    /// dominates (matches on both axes and beats on one), higher or lower
    /// being better as given. Configurations without a finite `x` and `y`
    /// (a missed time-to-result) are left out, and counted in the caption.
    Pareto {
        x_higher_better: bool,
        y_higher_better: bool,
    },
}

/// A workload-specific chart, declared as data; `bench-suite` renders it
/// from records, once per variant that has data for it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Chart {
    /// File stem: `<workload>-<variant>-<id>.svg`.
    pub id: &'static str,
    pub title: &'static str,
    pub x: Source,
    pub x_label: &'static str,
    pub y: Source,
    pub y_label: &'static str,
    pub series: Series,
    /// Entries whose records feed the chart; empty means all.
    pub entries: &'static [&'static str],
    /// A figure drawn dashed beside each line of `Param` series (a closed
    /// form the measured points should sit on).
    pub theory: Option<&'static str>,
    pub log_x: bool,
    pub log_y: bool,
    /// Only configurations with these parameter values (e.g. the forward
    /// pass in f32); empty means all.
    pub only: &'static [(&'static str, f64)],
}

/// Everything a workload declares as data.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct WorkloadSpec {
    pub id: &'static str,
    /// Bump on any change that alters results; a published workload is
    /// versioned, never edited in place.
    pub version: u32,
    pub title: &'static str,
    pub summary: &'static str,
    pub papers: &'static [Paper],
    pub metric: Metric,
    pub variants: &'static [Variant],
    pub entries: &'static [Entry],
    pub figures: &'static [Figure],
    /// Paired ratios against other baselines than the reference.
    pub comparisons: &'static [Comparison],
    pub charts: &'static [Chart],
    /// The papers' headline claims, printed beside our figures.
    pub claims: &'static [&'static str],
}

impl WorkloadSpec {
    pub fn variant(&self, id: &str) -> Option<&'static Variant> {
        self.variants.iter().find(|v| v.id == id)
    }

    pub fn entry(&self, id: &str) -> Option<&'static Entry> {
        self.entries.iter().find(|e| e.id == id)
    }

    pub fn reference(&self) -> &'static Entry {
        self.entries
            .iter()
            .find(|e| e.kind == EntryKind::Reference)
            .expect("validated: exactly one reference entry")
    }

    /// Checks the invariants the runner relies on; the registry test calls
    /// it for every workload.
    pub fn validate(&self) -> Result<(), String> {
        let id = self.id;
        let refs = self
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::Reference)
            .count();
        if refs != 1 {
            return Err(format!("{id}: {refs} reference entries, need exactly 1"));
        }
        let defaults: Vec<_> = self
            .variants
            .iter()
            .filter(|v| v.role == VariantRole::Default)
            .collect();
        if defaults.len() != 1 {
            return Err(format!("{id}: {} default variants, need 1", defaults.len()));
        }
        if !defaults[0].profiles.contains(&Profile::Quick) {
            return Err(format!("{id}: the default variant must run in quick"));
        }
        for name in self
            .entries
            .iter()
            .map(|e| e.id)
            .chain(self.variants.iter().map(|v| v.id))
        {
            if !is_slug(name) {
                return Err(format!("{id}: `{name}` is not a lowercase slug"));
            }
        }
        let mut entries = std::collections::BTreeSet::new();
        for e in self.entries {
            if !entries.insert(e.id) {
                return Err(format!("{id}: duplicate entry `{}`", e.id));
            }
            for v in e.variants {
                if self.variant(v).is_none() {
                    return Err(format!(
                        "{id}: entry `{}` names unknown variant `{v}`",
                        e.id
                    ));
                }
            }
        }
        if !self.reference().variants.is_empty() {
            return Err(format!(
                "{id}: the reference entry must apply to every variant"
            ));
        }
        for c in self.comparisons {
            let Some(b) = self.entry(c.baseline) else {
                return Err(format!(
                    "{id}: comparison against unknown entry `{}`",
                    c.baseline
                ));
            };
            for name in c.same {
                let declared = b.grid.iter().any(|p| p.name == *name)
                    || b.fixed.iter().any(|(f, _)| f == name)
                    || self
                        .variants
                        .iter()
                        .any(|v| v.params.iter().any(|p| p.name == *name));
                if !declared {
                    return Err(format!(
                        "{id}: comparison against `{}` matches parameter `{name}`, which neither it nor any variant has; declare it in that entry's grid or fixed parameters or in a variant's params, or drop it from `same`",
                        b.id
                    ));
                }
            }
        }
        let mut variants = std::collections::BTreeSet::new();
        for v in self.variants {
            if !variants.insert(v.id) {
                return Err(format!("{id}: duplicate variant `{}`", v.id));
            }
            for p in Profile::ALL {
                if v.budget.seconds(p).is_nan() || v.budget.seconds(p) <= 0.0 {
                    return Err(format!("{id}/{}: budget must be positive", v.id));
                }
            }
        }
        Ok(())
    }
}

fn is_slug(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

/// What a variant is loaded with (untimed).
#[derive(Debug, Clone)]
pub struct LoadContext<'a> {
    pub variant: &'a Variant,
    pub profile: Profile,
    pub device: Device,
    /// Seed for variant-level randomness (e.g. a synthetic model); the same
    /// in every trial.
    pub seed: u64,
}

/// What one trial is prepared with (untimed).
#[derive(Debug, Clone)]
pub struct TrialContext<'a> {
    pub variant: &'a Variant,
    pub profile: Profile,
    pub device: Device,
    pub trial: u32,
    /// Derived from (suite seed, workload, variant, trial); identical for
    /// every entry so that comparisons are paired.
    pub seed: u64,
}

/// The result of one timed job, filled in by [`Job::evaluate`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// The workload's quality metric.
    pub quality: f64,
    /// Workload-specific figures; units in the key (`tokens_per_s`,
    /// `kv_bytes`); dimensionless ones say what they count.
    pub figures: BTreeMap<String, f64>,
    /// Time measured inside the job when the job's own timing is the result
    /// (median of repeated kernel launches timed with device events); when
    /// `None`, the stopwatch's active time is the time-to-result.
    pub measured_time_s: Option<f64>,
    /// Anything a reader of the record should know (an approximation made).
    pub note: Option<String>,
}

impl Outcome {
    pub fn new(quality: f64) -> Self {
        Outcome {
            quality,
            ..Outcome::default()
        }
    }

    pub fn figure(mut self, key: &str, value: f64) -> Self {
        self.figures.insert(key.to_string(), value);
        self
    }
}

/// A workload: static data plus the untimed loader.
pub trait Workload: Sync {
    fn spec(&self) -> &'static WorkloadSpec;

    /// Untimed, once per variant per run: load assets and models.
    fn load(&self, ctx: &LoadContext<'_>) -> Result<Box<dyn Loaded>, WorkloadError>;
}

/// A loaded variant.
pub trait Loaded {
    /// Untimed, once per trial: the data every entry of this trial shares.
    fn trial(&self, ctx: &TrialContext<'_>) -> Result<Box<dyn TrialData + '_>, WorkloadError>;
}

/// One trial's shared data.
pub trait TrialData {
    /// Untimed set-up of one configuration; returns the job to time.
    fn setup(&self, entry: &Entry, params: &Params) -> Result<Box<dyn Job + '_>, WorkloadError>;
}

/// The timed work of one configuration in one trial.
pub trait Job {
    /// Timed. Long loops call [`Stopwatch::check`] so that a job over its
    /// budget stops itself (cooperative cancellation).
    fn run(&mut self, stopwatch: &mut Stopwatch<'_>) -> Result<(), WorkloadError>;

    /// Untimed: measure the quality of what `run` produced.
    fn evaluate(self: Box<Self>) -> Result<Outcome, WorkloadError>;
}
