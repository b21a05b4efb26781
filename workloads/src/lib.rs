//! The middle floor: the workload contract, the one registry list, and one
//! module per workload.
//!
//! Where to start: [`contract`] defines what a workload is (data in
//! [`contract::WorkloadSpec`], untimed loading and set-up, one timed
//! [`contract::Job::run`]); [`WORKLOADS`] lists every workload; each workload
//! lives in its own module (`spectr/`) with its methods, data and tests.
//! Adding a workload is one module and one line in [`WORKLOADS`]; adding a
//! method is one module and one line in that workload's entry list.
//!
//! The runner that applies the time-to-result rules lives in `bench-suite`,
//! above this crate; nothing here depends on it.

pub mod assets;
pub mod child;
pub mod clock;
pub mod contract;
pub mod decoder;
pub mod device;
pub mod longctx;
pub mod pointcloud;
pub mod seed;
pub mod spectr;
pub mod stats;

pub use contract::*;
pub use device::Device;

/// Every workload, in the order `list` shows them.
pub const WORKLOADS: &[&dyn Workload] = &[
    &spectr::Spectr,
    &pointcloud::PointCloudSla,
    &longctx::LongContext,
];

/// Looks a workload up by id.
pub fn workload(id: &str) -> Option<&'static dyn Workload> {
    WORKLOADS.iter().copied().find(|w| w.spec().id == id)
}

/// What can go wrong inside a workload. Every variant's message names the
/// thing at fault and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("missing asset {path}: {fix}")]
    MissingAsset { path: String, fix: String },
    #[error("corrupt asset {path}: {problem}; {fix}")]
    CorruptAsset {
        path: String,
        problem: String,
        fix: String,
    },
    #[error("over budget: {elapsed_s:.3} s spent of a {budget_s:.3} s budget")]
    OverBudget { elapsed_s: f64, budget_s: f64 },
    #[error("device: {0}")]
    Device(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Other(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registered_workload_is_valid_and_unique() {
        let mut ids = std::collections::BTreeSet::new();
        for w in WORKLOADS {
            let spec = w.spec();
            spec.validate().unwrap();
            assert!(ids.insert(spec.id), "duplicate workload id {}", spec.id);
            assert!(workload(spec.id).is_some());
        }
        assert!(workload("no-such-workload").is_none());
    }

    #[test]
    fn a_comparison_must_name_an_entry_and_one_of_its_parameters() {
        let spectr = workload("spectr").unwrap().spec();
        let with = |c: &'static [Comparison]| WorkloadSpec {
            comparisons: c,
            ..*spectr
        };
        with(&[Comparison {
            baseline: "speculative",
            same: &["L"],
            label: "",
        }])
        .validate()
        .unwrap();
        let e = with(&[Comparison {
            baseline: "no-such-entry",
            same: &[],
            label: "",
        }])
        .validate()
        .unwrap_err();
        assert!(e.contains("unknown entry `no-such-entry`"), "{e}");
        let e = with(&[Comparison {
            baseline: "speculative",
            same: &["depth"],
            label: "",
        }])
        .validate()
        .unwrap_err();
        assert!(e.contains("parameter `depth`"), "{e}");
        // A variant's parameter counts: point-cloud-sla pairs its GPU peers
        // with `sla` at the same `voxels` of its `scaling` variant.
        let pc = workload("point-cloud-sla").unwrap().spec();
        assert!(!pc.comparisons.is_empty());
        assert!(pc.comparisons.iter().all(|c| c.same.contains(&"voxels")));
        pc.validate().unwrap();
    }

    #[test]
    fn grids_expand_in_declaration_order() {
        let e = Entry {
            id: "x",
            kind: EntryKind::Method,
            description: "",
            grid: &[
                Param {
                    name: "k",
                    values: &[2.0, 4.0],
                },
                Param {
                    name: "L",
                    values: &[1.0, 8.0],
                },
            ],
            fixed: &[("t", 0.5)],
            variants: &[],
            cuda_only: false,
            cpu_only_variants: &[],
        };
        let got: Vec<String> = e.configs().iter().map(|p| p.to_string()).collect();
        assert_eq!(
            got,
            [
                "t=0.5,k=2,L=1",
                "t=0.5,k=2,L=8",
                "t=0.5,k=4,L=1",
                "t=0.5,k=4,L=8"
            ]
        );
        for s in &got {
            assert_eq!(&s.parse::<Params>().unwrap().to_string(), s);
        }
        assert!("k".parse::<Params>().is_err());
        // A variant's own axes come first and cross every entry config.
        let v = Variant {
            id: "scaling",
            description: "",
            role: VariantRole::Standard,
            profiles: &[Profile::Full],
            target: Target {
                value: 1.0,
                source: "",
            },
            budget: Budget {
                quick_s: 1.0,
                full_s: 1.0,
            },
            params: &[Param {
                name: "n",
                values: &[10.0, 20.0],
            }],
        };
        let got: Vec<String> = v.configs(&e).iter().map(|p| p.to_string()).collect();
        assert_eq!(got.len(), 8);
        assert_eq!(got[0], "n=10,t=0.5,k=2,L=1");
        assert_eq!(got[7], "n=20,t=0.5,k=4,L=8");
        assert!("k=x".parse::<Params>().is_err());
    }
}
