//! A test-only workload whose jobs spend exact amounts of mock time, so
//! whole runs can be checked against hand-computed medians, speedups and
//! profiles (hyperfine's `MockExecutor` idea).

use workloads::clock::Stopwatch;
use workloads::*;

pub struct Toy;

pub static REGISTRY: &[&dyn Workload] = &[&Toy];

/// Seconds each entry spends on variant `easy`; `hard` doubles them.
/// `fast` spends 2 / speed. The reference spends 2 s.
static SPEC: WorkloadSpec = WorkloadSpec {
    id: "toy",
    version: 1,
    title: "Toy workload for the runner's tests",
    summary: "Spends mock time.",
    papers: &[Paper {
        title: "None",
        arxiv: "0000.00000",
        section: "-",
    }],
    metric: Metric {
        name: "score",
        description: "a made-up quality",
        direction: Direction::HigherIsBetter,
    },
    variants: &[
        Variant {
            id: "easy",
            description: "The default variant.",
            role: VariantRole::Default,
            profiles: &[Profile::Quick, Profile::Full],
            target: Target {
                value: 0.5,
                source: "chosen for the test",
            },
            budget: Budget {
                quick_s: 10.0,
                full_s: 10.0,
            },
            params: &[],
        },
        Variant {
            id: "hard",
            description: "Everything takes twice as long.",
            role: VariantRole::Standard,
            profiles: &[Profile::Full],
            target: Target {
                value: 0.5,
                source: "chosen for the test",
            },
            budget: Budget {
                quick_s: 10.0,
                full_s: 10.0,
            },
            params: &[],
        },
        Variant {
            id: "secret",
            description: "Held out.",
            role: VariantRole::HeldOut,
            profiles: &[Profile::Quick, Profile::Full],
            target: Target {
                value: 0.5,
                source: "chosen for the test",
            },
            budget: Budget {
                quick_s: 10.0,
                full_s: 10.0,
            },
            params: &[],
        },
    ],
    entries: &[
        Entry {
            id: "ref",
            kind: EntryKind::Reference,
            description: "spends 2 s",
            grid: &[],
            fixed: &[],
            variants: &[],
            cuda_only: false,
            cpu_only_variants: &[],
        },
        Entry {
            id: "fast",
            kind: EntryKind::Method,
            description: "spends 2/speed s",
            grid: &[Param {
                name: "speed",
                values: &[2.0, 4.0],
            }],
            fixed: &[],
            variants: &[],
            cuda_only: false,
            cpu_only_variants: &[],
        },
        Entry {
            id: "miss",
            kind: EntryKind::Method,
            description: "fast but below target",
            grid: &[],
            fixed: &[],
            variants: &[],
            cuda_only: false,
            cpu_only_variants: &[],
        },
        Entry {
            id: "over",
            kind: EntryKind::Method,
            description: "never finishes: stopped by its budget",
            grid: &[],
            fixed: &[],
            variants: &[],
            cuda_only: false,
            cpu_only_variants: &[],
        },
        Entry {
            id: "panics",
            kind: EntryKind::Baseline,
            description: "panics in run",
            grid: &[],
            fixed: &[],
            variants: &["easy"],
            cuda_only: false,
            cpu_only_variants: &[],
        },
        Entry {
            id: "flaky",
            kind: EntryKind::Method,
            description: "misses in trial 1 only; 1 s otherwise",
            grid: &[],
            fixed: &[],
            variants: &[],
            cuda_only: false,
            cpu_only_variants: &[],
        },
    ],
    figures: &[Figure {
        key: "work_units",
        label: "work (units)",
    }],
    comparisons: &[],
    charts: &[Chart {
        id: "work",
        title: "Work against speed",
        x: Source::Param("speed"),
        x_label: "speed (x)",
        y: Source::Figure("work_units"),
        y_label: "work (units)",
        series: Series::Param("speed"),
        entries: &["fast"],
        theory: None,
        log_x: false,
        log_y: false,
        only: &[],
    }],
    claims: &["The toy paper claims 4x."],
};

impl Workload for Toy {
    fn spec(&self) -> &'static WorkloadSpec {
        &SPEC
    }

    fn load(&self, ctx: &LoadContext<'_>) -> Result<Box<dyn Loaded>, WorkloadError> {
        Ok(Box::new(ToyLoaded {
            factor: if ctx.variant.id == "hard" { 2.0 } else { 1.0 },
        }))
    }
}

struct ToyLoaded {
    factor: f64,
}

impl Loaded for ToyLoaded {
    fn trial(&self, ctx: &TrialContext<'_>) -> Result<Box<dyn TrialData + '_>, WorkloadError> {
        Ok(Box::new(ToyTrial {
            factor: self.factor,
            trial: ctx.trial,
        }))
    }
}

struct ToyTrial {
    factor: f64,
    trial: u32,
}

impl TrialData for ToyTrial {
    fn setup(&self, entry: &Entry, params: &Params) -> Result<Box<dyn Job + '_>, WorkloadError> {
        let (seconds, quality) = match entry.id {
            "ref" => (2.0, 1.0),
            "fast" => (2.0 / params.get("speed").unwrap(), 1.0),
            "miss" => (0.125, 0.0),
            "flaky" => (1.0, if self.trial == 1 { 0.0 } else { 1.0 }),
            "over" | "panics" => (f64::INFINITY, 1.0),
            other => return Err(WorkloadError::Config(format!("no entry {other}"))),
        };
        Ok(Box::new(ToyJob {
            seconds: seconds * self.factor,
            quality,
            panics: entry.id == "panics",
        }))
    }
}

struct ToyJob {
    seconds: f64,
    quality: f64,
    panics: bool,
}

impl Job for ToyJob {
    fn run(&mut self, sw: &mut Stopwatch<'_>) -> Result<(), WorkloadError> {
        if self.panics {
            panic!("toy panic");
        }
        // Evaluation-style pause: this time must not count.
        sw.paused(|| ());
        let mut left = self.seconds;
        while left > 0.0 {
            let step = left.min(0.5);
            sw.spend(step);
            left -= step;
            sw.check()?;
        }
        Ok(())
    }

    fn evaluate(self: Box<Self>) -> Result<Outcome, WorkloadError> {
        Ok(Outcome::new(self.quality).figure("work_units", 1.0 / self.seconds))
    }
}
