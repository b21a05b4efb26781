//! Workload `spectr`: speculative decoding with SpecTr's multi-draft K-SEQ
//! selection (Sun et al., NeurIPS 2023, arXiv 2310.15141) against standard
//! speculative sampling and autoregressive sampling.
//!
//! Integration in progress: the workload spec and job land with the harness.

pub mod lm;

use crate::contract::*;
use crate::WorkloadError;

pub struct Spectr;

static SPEC: WorkloadSpec = WorkloadSpec {
    id: "spectr",
    version: 1,
    title: "Speculative decoding: SpecTr K-SEQ vs speculative vs autoregressive",
    summary: "",
    papers: &[],
    metric: Metric {
        name: "exactness_p",
        description: "p-value of a goodness-of-fit test of emitted tokens against the target model",
        direction: Direction::HigherIsBetter,
    },
    variants: &[Variant {
        id: "ngram-jargon",
        description: "",
        role: VariantRole::Default,
        profiles: &[Profile::Quick, Profile::Full],
        target: Target {
            value: 1e-3,
            source: "",
        },
        budget: Budget {
            quick_s: 10.0,
            full_s: 60.0,
        },
    }],
    entries: &[Entry {
        id: "autoregressive",
        kind: EntryKind::Reference,
        description: "",
        grid: &[],
        fixed: &[],
        variants: &[],
    }],
    figures: &[],
    charts: &[],
    claims: &[],
};

impl Workload for Spectr {
    fn spec(&self) -> &'static WorkloadSpec {
        &SPEC
    }

    fn load(&self, _ctx: &LoadContext<'_>) -> Result<Box<dyn Loaded>, WorkloadError> {
        Err(WorkloadError::Other("spectr: integration in progress".into()))
    }
}
