//! Workload `spectr`: speculative decoding with SpecTr's multi-draft K-SEQ
//! selection (Sun et al., "SpecTr: Fast Speculative Decoding via Optimal
//! Transport", NeurIPS 2023, arXiv 2310.15141) against standard speculative
//! sampling (Leviathan et al. arXiv 2211.17192; Chen et al. arXiv
//! 2302.01318) and autoregressive sampling.
//!
//! The job: generate `n` new tokens after every prompt (for the synthetic
//! variants, `n` steps of every draft/target pair). The quality requirement
//! is exactness: the emitted tokens must follow the target model's
//! distribution. Evaluation (untimed) tests that with a randomised
//! probability-integral transform: for each emitted token x with target
//! distribution q over ids, u = F(x - 1) + v q(x) with v uniform is exactly
//! uniform on [0, 1] for an exact sampler; a chi-square test of the u's
//! gives the trial's `exactness_p`, and the target is p >= 0.001. Unit
//! tests of every sampler do the stronger check (joint distributions with
//! enough draws that 1% total variation fails).
//!
//! Modules: [`lm`] (what a sampler sees of a model), [`kseq`] (one K-SEQ
//! step), [`decode`] (the generation loops), [`optimal`] (the LP optimum on
//! small vocabularies), [`synthetic`] and [`ngram`] (the models), [`llm`]
//! (the GGUF decoder as a model, and the prompts).
//!
//! Transformer pairs: `qwen2.5-coder-0.5b-1.5b` (full profile) drafts with
//! Qwen2.5-Coder-0.5B-Instruct for Qwen2.5-Coder-1.5B-Instruct, on the 48
//! prompts of `workloads/data/spectr-prompts.jsonl` in the Qwen chat
//! template, at temperature 1. Its trials also record `greedy_match`: the
//! fraction of [`GREEDY_PROMPTS`] prompts on which the configuration at
//! temperature 0 emits exactly greedy autoregressive decoding's
//! [`GREEDY_TOKENS`] tokens (1 for a correct implementation).
//!
//! Your own pair: the held-out variant `user-pair` loads the draft GGUF
//! named by `BENCH_SUITE_DRAFT_GGUF` and the target GGUF named by
//! `BENCH_SUITE_TARGET_GGUF` (`llama` or `qwen2` architectures, byte-level
//! BPE tokenizers), refuses the pair if their tokenizers differ, and runs
//! the same prompts in the target's chat template:
//!
//! ```text
//! BENCH_SUITE_DRAFT_GGUF=/m/small.gguf BENCH_SUITE_TARGET_GGUF=/m/big.gguf \
//!     bench-suite run spectr --variant user-pair --profile quick
//! ```
//!
//! On a GPU: `--device cuda` runs the transformer variants on our decoder's
//! GPU path (`crate::decoder::cuda`, feature `gpu-decoder`), which is not
//! batch invariant; the greedy check then counts only divergences that are
//! not near ties ([`GREEDY_TIE_NATS`]) against the configuration.

pub mod decode;
pub mod kseq;
pub mod llm;
pub mod lm;
pub mod ngram;
pub mod optimal;
pub mod synthetic;

use std::cell::RefCell;
use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::clock::Stopwatch;
use crate::contract::*;
use crate::{assets, seed, WorkloadError};
use llm::ModelPair;
use lm::LanguageModel;
use synthetic::{Fixed, PairSpec};

pub struct Spectr;

const EXACTNESS_ALPHA: f64 = 1e-3;
const PIT_BINS: usize = 10;
/// Prompts and new tokens of the greedy check of the transformer variants
/// (untimed, once per configuration and run: greedy output does not
/// depend on the trial's seed).
pub const GREEDY_PROMPTS: usize = 2;
pub const GREEDY_TOKENS: usize = 32;
/// A greedy divergence counts as a near tie when the target's two best
/// logits (at temperature 1, at the first diverging position of the
/// autoregressive output) differ by less than this. The CPU decoder is
/// batch invariant and never diverges. The GPU decoder is not (see
/// `decoder::cuda`): on Qwen2.5-Coder-1.5B on an H100, a 37-node
/// verification tree's logits differ from the same positions stepped one at
/// a time by up to 0.36 (of a 30-logit span; `decoder` test
/// `gpu_qwen_rows_close`), because each 8-bit activation rounding that
/// flips between the two paths moves later layers. A margin below twice
/// that can swap the argmax, so 1 nat (a top-two probability ratio under
/// e); a wrong decoder or sampler diverges where the margin is larger.
/// The 0.36 was measured before single steps attended through the split-K
/// kernel (`decoder::split_attn`, 2026-11-28) instead of cuBLAS; that
/// kernel agrees with a float64 reference to 1e-6 of its output, far below
/// the activation roundings that set the 0.36, but the figure has not been
/// measured again since.
pub const GREEDY_TIE_NATS: f64 = 1.0;
/// Longest draft of the entries' grids, for the context-length check.
const MAX_L: usize = 8;
/// Full-profile budget of one trial of a transformer variant (48 prompts x
/// 64 tokens through a 1.5B target on a CPU).
const BUDGET_LLM_FULL_S: f64 = 1800.0;

static SPEC: WorkloadSpec = WorkloadSpec {
    id: "spectr",
    version: 1,
    title: "Speculative decoding: SpecTr K-SEQ vs speculative vs autoregressive sampling",
    summary: "Multi-draft speculative decoding with SpecTr's K-SEQ selection, against one-draft speculative sampling and autoregressive sampling, with exactness checked on every trial.",
    papers: &[
        Paper {
            title: "SpecTr: Fast Speculative Decoding via Optimal Transport",
            arxiv: "2310.15141",
            section: "Alg. 2 (K-SEQ), Fig. 2 (one iteration), Fig. 3 (draft selection), LP optimum per the abstract; section numbers unverified, see README",
        },
        Paper {
            title: "Fast Inference from Transformers via Speculative Decoding",
            arxiv: "2211.17192",
            section: "Sec. 2.3 (speculative sampling), Sec. 3.1 (eq. 1)",
        },
        Paper {
            title: "Accelerating Large Language Model Decoding with Speculative Sampling",
            arxiv: "2302.01318",
            section: "Alg. 2",
        },
    ],
    metric: Metric {
        name: "exactness_p",
        description: "p-value of a chi-square test that the emitted tokens follow the target model (randomised PIT); 0 for a transformer configuration whose greedy output leaves greedy decoding's other than at a near tie",
        direction: Direction::HigherIsBetter,
    },
    variants: &[
        Variant {
            id: "ngram-jargon",
            description: "Models: an interpolated modified Kneser-Ney 4-gram as the target and an absolute-discounting bigram as the draft, both word-level (4,096 types) from the Jargon File. Real text statistics at CPU speed. Model calls are cheap here, so time-to-result weighs sampling overhead more than a neural model would.",
            role: VariantRole::Default,
            profiles: &[Profile::Quick, Profile::Full],
            target: Target {
                value: EXACTNESS_ALPHA,
                source: "significance level 0.001 of the exactness test (RULES.md; workload module doc)",
            },
            budget: Budget {
                quick_s: 20.0,
                full_s: 300.0,
            },
            params: &[],
        },
        Variant {
            id: "synthetic",
            description: "Context-independent draft/target pairs over 1,024 tokens with controlled divergence (q = softmax(2g), p = softmax(2g + e), g and e standard normal), so the closed forms for acceptance and block efficiency apply. Model calls cost nothing here: time-to-result measures sampler overhead only.",
            role: VariantRole::Standard,
            profiles: &[Profile::Quick, Profile::Full],
            target: Target {
                value: EXACTNESS_ALPHA,
                source: "significance level 0.001 of the exactness test",
            },
            budget: Budget {
                quick_s: 20.0,
                full_s: 300.0,
            },
            params: &[],
        },
        Variant {
            id: "synthetic-50k",
            description: "As `synthetic`, over a 50,000-token vocabulary (a real LLM's size).",
            role: VariantRole::Standard,
            profiles: &[Profile::Full],
            target: Target {
                value: EXACTNESS_ALPHA,
                source: "significance level 0.001 of the exactness test",
            },
            budget: Budget {
                quick_s: 60.0,
                full_s: 600.0,
            },
            params: &[],
        },
        Variant {
            id: "synthetic-small",
            description: "Sixteen context-independent pairs per trial over 4 to 6 tokens (sharper divergence: p = softmax(g + 1.5 e)), where the optimal transport acceptance can be solved exactly by linear programming: K-SEQ must lie between (1 - 1/e) OPT and OPT.",
            role: VariantRole::Standard,
            profiles: &[Profile::Quick, Profile::Full],
            target: Target {
                value: EXACTNESS_ALPHA,
                source: "significance level 0.001 of the exactness test",
            },
            budget: Budget {
                quick_s: 20.0,
                full_s: 300.0,
            },
            params: &[],
        },
        Variant {
            id: "qwen2.5-coder-0.5b-1.5b",
            description: "Models: Qwen2.5-Coder-0.5B-Instruct drafts for Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, one tokenizer) on our decoder (CPU; GPU with --device cuda); 48 chat prompts in six categories (workloads/data/spectr-prompts.jsonl) in the Qwen chat template, temperature 1. The draft's call costs a fraction of the target's, as in the paper's setting. Also records greedy_match (temperature 0 equals greedy decoding).",
            role: VariantRole::Standard,
            profiles: &[Profile::Full],
            target: Target {
                value: EXACTNESS_ALPHA,
                source: "significance level 0.001 of the exactness test",
            },
            budget: Budget {
                quick_s: 120.0,
                full_s: BUDGET_LLM_FULL_S,
            },
            params: &[],
        },
        Variant {
            id: "user-pair",
            description: "Your own draft/target GGUF pair (llama or qwen2 architecture, one tokenizer), named by the environment variables BENCH_SUITE_DRAFT_GGUF and BENCH_SUITE_TARGET_GGUF, on the same prompts in the target's chat template, temperature 1. Held out: runs only when named.",
            role: VariantRole::HeldOut,
            profiles: &[Profile::Quick, Profile::Full],
            target: Target {
                value: EXACTNESS_ALPHA,
                source: "significance level 0.001 of the exactness test",
            },
            budget: Budget {
                quick_s: 120.0,
                full_s: BUDGET_LLM_FULL_S,
            },
            params: &[],
        },
    ],
    entries: &[
        Entry {
            id: "autoregressive",
            kind: EntryKind::Reference,
            description: "one target call per token",
            grid: &[],
            fixed: &[],
            variants: &[],
            cuda_only: false,
            cpu_only_variants: &[],
        },
        Entry {
            id: "speculative",
            kind: EntryKind::Baseline,
            description: "speculative sampling, one draft of L tokens (SpecTr with k = 1)",
            grid: &[Param {
                name: "L",
                values: &[2.0, 4.0, 8.0],
            }],
            fixed: &[("k", 1.0)],
            variants: &[],
            cuda_only: false,
            cpu_only_variants: &[],
        },
        Entry {
            id: "spectr",
            kind: EntryKind::Method,
            description: "SpecTr: k i.i.d. drafts of L tokens, K-SEQ selection, one batched target call per block",
            grid: &[
                Param {
                    name: "k",
                    values: &[2.0, 4.0, 8.0],
                },
                Param {
                    name: "L",
                    values: &[2.0, 4.0, 8.0],
                },
            ],
            fixed: &[],
            variants: &[],
            cuda_only: false,
            cpu_only_variants: &[],
        },
        Entry {
            id: "ot-optimal",
            kind: EntryKind::Baseline,
            description: "the optimal transport coupling solved by linear programming (the exact optimum K-SEQ approximates), one draft position",
            grid: &[Param {
                name: "k",
                values: &[2.0, 3.0],
            }],
            fixed: &[("L", 1.0)],
            variants: &["synthetic-small"],
            cuda_only: false,
            cpu_only_variants: &[],
        },
    ],
    figures: &[
        Figure {
            key: "block_efficiency",
            label: "tokens / target call",
        },
        Figure {
            key: "block_efficiency_theory",
            label: "closed form",
        },
        Figure {
            key: "acceptance_first",
            label: "acceptance, 1st position",
        },
        Figure {
            key: "acceptance_first_theory",
            label: "K-SEQ theory",
        },
        Figure {
            key: "acceptance_opt",
            label: "OPT (LP)",
        },
        Figure {
            key: "tokens_per_s",
            label: "tokens/s",
        },
        Figure {
            key: "target_calls",
            label: "target calls",
        },
        Figure {
            key: "greedy_match",
            label: "greedy = autoregressive",
        },
    ],
    comparisons: &[Comparison {
        baseline: "speculative",
        same: &["L"],
        label: "speedup vs speculative, same L",
    }],
    charts: &[
        Chart {
            id: "block-efficiency",
            title: "Block efficiency against the number of drafts",
            x: Source::Param("k"),
            x_label: "drafts k (k = 1: speculative sampling)",
            y: Source::Figure("block_efficiency"),
            y_label: "tokens per target call",
            series: Series::Param("L"),
            entries: &["speculative", "spectr"],
            theory: Some("block_efficiency_theory"),
            log_x: true,
            log_y: false,
            only: &[],
        },
        Chart {
            id: "speedup",
            title: "Speedup over autoregressive sampling",
            x: Source::Param("k"),
            x_label: "drafts k (k = 1: speculative sampling)",
            y: Source::Speedup,
            y_label: "speedup (x, paired median)",
            series: Series::Param("L"),
            entries: &["speculative", "spectr"],
            theory: None,
            log_x: true,
            log_y: false,
            only: &[],
        },
        Chart {
            id: "acceptance-vs-opt",
            title: "First-position acceptance: K-SEQ against the optimum",
            x: Source::Param("k"),
            x_label: "drafts k",
            y: Source::Figure("acceptance_first"),
            y_label: "acceptance probability",
            series: Series::Figures(&[
                ("K-SEQ measured", "acceptance_first"),
                ("K-SEQ theory", "acceptance_first_theory"),
                ("OPT (LP)", "acceptance_opt"),
                ("(1 - 1/e) OPT", "acceptance_opt_bound"),
            ]),
            entries: &["speculative", "spectr", "ot-optimal"],
            theory: None,
            log_x: false,
            log_y: false,
            only: &[],
        },
    ],
    claims: &[
        "SpecTr (abstract of arXiv 2310.15141): 2.13x wall-clock speedup over autoregressive sampling and a further 1.37x over speculative decoding, on state-of-the-art LLMs (PaLM-2 models). Our CPU variants differ: n-gram and synthetic models whose calls cost microseconds, and Qwen2.5-Coder 0.5B/1.5B on 2 CPU cores, where batched verification costs nearly as much per row as single steps.",
        "K-SEQ's acceptance is at least (1 - 1/e) of the optimal transport acceptance (abstract; checked on every synthetic-small trial).",
    ],
};

/// How many prompts and tokens per trial, per variant and profile.
fn job_size(variant: &str, profile: Profile) -> (usize, usize) {
    match (variant, profile) {
        ("ngram-jargon", Profile::Quick) => (12, 64),
        ("ngram-jargon", Profile::Full) => (48, 128),
        ("synthetic", Profile::Quick) => (1, 4000),
        ("synthetic", Profile::Full) => (1, 20_000),
        ("synthetic-50k", Profile::Quick) => (1, 500),
        ("synthetic-50k", Profile::Full) => (1, 1_000),
        ("synthetic-small", Profile::Quick) => (16, 500),
        ("qwen2.5-coder-0.5b-1.5b" | "user-pair", Profile::Quick) => (2, 16),
        ("qwen2.5-coder-0.5b-1.5b" | "user-pair", Profile::Full) => (48, 64),
        _ => (16, 2_000),
    }
}

impl Workload for Spectr {
    fn spec(&self) -> &'static WorkloadSpec {
        &SPEC
    }

    fn load(&self, ctx: &LoadContext<'_>) -> Result<Box<dyn Loaded>, WorkloadError> {
        let transformer = matches!(ctx.variant.id, "qwen2.5-coder-0.5b-1.5b" | "user-pair");
        if ctx.device.is_cuda() && !transformer {
            return Err(WorkloadError::Device(format!(
                "spectr's variant `{}` (n-gram or synthetic models) runs on the CPU; only the \
                 transformer variants (qwen2.5-coder-0.5b-1.5b, user-pair) run on a GPU; use \
                 --device cpu",
                ctx.variant.id
            )));
        }
        let (prompts, tokens) = job_size(ctx.variant.id, ctx.profile);
        let models = match ctx.variant.id {
            "ngram-jargon" => {
                let text = assets::jargon_text()?;
                Models::Ngram(Box::new(ngram::NgramPair::from_text(
                    &text,
                    ngram::NgramConfig::default(),
                )?))
            }
            "synthetic" => Models::Synthetic(PairSpec {
                vocab: 1024,
                sharpness: 2.0,
                sigma: 1.0,
            }),
            "synthetic-50k" => Models::Synthetic(PairSpec {
                vocab: 50_000,
                sharpness: 2.0,
                sigma: 1.0,
            }),
            "synthetic-small" => Models::Small,
            "qwen2.5-coder-0.5b-1.5b" => {
                let draft = assets::verify(&assets::QWEN_CODER_0_5B)?;
                let target = assets::verify(&assets::QWEN_CODER_1_5B)?;
                Models::Llm(Box::new(LlmModels::new(
                    ModelPair::load(&draft, &target, ctx.device)?,
                    prompts,
                    tokens,
                )?))
            }
            "user-pair" => Models::Llm(Box::new(LlmModels::new(
                ModelPair::from_env(ctx.device)?,
                prompts,
                tokens,
            )?)),
            other => {
                return Err(WorkloadError::Config(format!(
                    "spectr has no variant `{other}`"
                )))
            }
        };
        Ok(Box::new(LoadedSpectr {
            models,
            prompts,
            tokens,
        }))
    }
}

enum Models {
    Ngram(Box<ngram::NgramPair>),
    Synthetic(PairSpec),
    Small,
    Llm(Box<LlmModels>),
}

/// A transformer pair, its prompts (token ids), and what the greedy check
/// has computed so far.
struct LlmModels {
    pair: ModelPair,
    prompts: Vec<Vec<u32>>,
    /// Greedy autoregressive output on the first prompts, computed once.
    greedy_reference: RefCell<Option<Vec<Vec<u32>>>>,
    /// The greedy check per (k, L), computed once per run.
    greedy_match: RefCell<BTreeMap<(usize, usize), GreedyCheck>>,
}

impl LlmModels {
    /// `n` prompts spread over the file's categories, rendered in the
    /// target's chat template and tokenized (untimed).
    fn new(pair: ModelPair, n: usize, tokens: usize) -> Result<LlmModels, WorkloadError> {
        let all = llm::prompts()?;
        let n = n.min(all.len());
        let model = pair.target.model();
        let prompts = (0..n)
            .map(|i| {
                let p = &all[i * all.len() / n];
                Ok(model.tokenizer().encode(&llm::render(&model, p))?)
            })
            .collect::<Result<Vec<_>, WorkloadError>>()?;
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0) + tokens + MAX_L + 1;
        pair.check_context(longest)?;
        Ok(LlmModels {
            pair,
            prompts,
            greedy_reference: RefCell::new(None),
            greedy_match: RefCell::new(BTreeMap::new()),
        })
    }

    /// SpecTr with `k` drafts of `l` tokens at temperature 0 against greedy
    /// autoregressive decoding's [`GREEDY_TOKENS`] tokens, on the first
    /// [`GREEDY_PROMPTS`] prompts.
    fn greedy_match(&self, k: usize, l: usize) -> Result<GreedyCheck, WorkloadError> {
        if let Some(&m) = self.greedy_match.borrow().get(&(k, l)) {
            return Ok(m);
        }
        let n = GREEDY_PROMPTS.min(self.prompts.len());
        // At temperature 0 every distribution is one-hot, so the tokens do
        // not depend on the random numbers.
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (draft, target) = (&self.pair.greedy_draft, &self.pair.greedy_target);
        let mut reference = self.greedy_reference.borrow_mut();
        if reference.is_none() {
            *reference = Some(
                self.prompts[..n]
                    .iter()
                    .map(|p| {
                        decode::autoregressive(target, p, GREEDY_TOKENS, &mut rng, &mut || Ok(()))
                            .map(|g| g.tokens)
                    })
                    .collect::<Result<_, _>>()?,
            );
        }
        let (mut equal, mut far) = (0, 0);
        for (p, want) in self.prompts.iter().zip(reference.as_ref().expect("set")) {
            let g = decode::spectr(draft, target, p, GREEDY_TOKENS, k, l, &mut rng, &mut || {
                Ok(())
            })?;
            match first_divergence(&g.tokens, want) {
                None => equal += 1,
                Some(j) => {
                    let mut context = p.clone();
                    context.extend_from_slice(&want[..j]);
                    let margin = top_two_margin(&self.pair.target.next_dist(&context));
                    far += usize::from(margin >= GREEDY_TIE_NATS);
                }
            }
        }
        let check = GreedyCheck {
            matched: equal as f64 / n as f64,
            far: far as f64,
        };
        self.greedy_match.borrow_mut().insert((k, l), check);
        Ok(check)
    }
}

/// The greedy check of one configuration.
#[derive(Debug, Clone, Copy)]
struct GreedyCheck {
    /// Fraction of prompts whose output equals greedy decoding's.
    matched: f64,
    /// Prompts that diverged where the target's best two logits differ by
    /// [`GREEDY_TIE_NATS`] or more (0 for a correct implementation on any
    /// device).
    far: f64,
}

/// The first position where `got` leaves `want` (a shorter or longer
/// output leaves it where the shorter one ends).
fn first_divergence(got: &[u32], want: &[u32]) -> Option<usize> {
    match got.iter().zip(want).position(|(a, b)| a != b) {
        Some(j) => Some(j),
        None if got.len() == want.len() => None,
        None => Some(got.len().min(want.len())),
    }
}

/// ln(p1 / p2) of the two most likely tokens: their logit difference at
/// temperature 1 (infinite if only one token has mass).
fn top_two_margin(p: &[f64]) -> f64 {
    let (mut a, mut b) = (0f64, 0f64);
    for &x in p {
        if x > a {
            (a, b) = (x, a);
        } else if x > b {
            b = x;
        }
    }
    (a / b).ln()
}

struct LoadedSpectr {
    models: Models,
    prompts: usize,
    tokens: usize,
}

/// One generation problem: a model pair and a prompt.
struct Problem<'a> {
    draft: &'a dyn LanguageModel,
    target: &'a dyn LanguageModel,
    prompt: Vec<u32>,
}

/// A trial's shared data: the synthetic pairs it drew, or its prompts.
struct SpectrTrial<'a> {
    loaded: &'a LoadedSpectr,
    pairs: Vec<(Fixed, Fixed)>,
    prompts: Vec<Vec<u32>>,
    seed: u64,
}

impl Loaded for LoadedSpectr {
    fn trial(&self, ctx: &TrialContext<'_>) -> Result<Box<dyn TrialData + '_>, WorkloadError> {
        let mut rng = ChaCha8Rng::seed_from_u64(ctx.seed);
        let (pairs, prompts) = match &self.models {
            Models::Ngram(pair) => (Vec::new(), pair.prompts(self.prompts, 16, ctx.seed)),
            Models::Synthetic(spec) => (vec![synthetic::draw_pair(*spec, &mut rng)], vec![vec![]]),
            Models::Llm(m) => (Vec::new(), m.prompts.clone()),
            Models::Small => {
                let pairs: Vec<_> = (0..self.prompts)
                    .map(|i| {
                        let spec = PairSpec {
                            vocab: 4 + i % 3,
                            sharpness: 1.0,
                            sigma: 1.5,
                        };
                        synthetic::draw_pair(spec, &mut rng)
                    })
                    .collect();
                let prompts = vec![vec![]; pairs.len()];
                (pairs, prompts)
            }
        };
        Ok(Box::new(SpectrTrial {
            loaded: self,
            pairs,
            prompts,
            seed: ctx.seed,
        }))
    }
}

impl SpectrTrial<'_> {
    fn problems(&self) -> Vec<Problem<'_>> {
        match &self.loaded.models {
            Models::Ngram(pair) => self
                .prompts
                .iter()
                .map(|p| Problem {
                    draft: &pair.draft,
                    target: &pair.target,
                    prompt: p.clone(),
                })
                .collect(),
            Models::Llm(m) => self
                .prompts
                .iter()
                .map(|p| Problem {
                    draft: &m.pair.draft,
                    target: &m.pair.target,
                    prompt: p.clone(),
                })
                .collect(),
            _ => self
                .pairs
                .iter()
                .map(|(d, t)| Problem {
                    draft: d,
                    target: t,
                    prompt: Vec::new(),
                })
                .collect(),
        }
    }
}

/// Which sampler a configuration runs.
#[derive(Debug, Clone, Copy)]
enum Method {
    Autoregressive,
    /// k = 1 is speculative sampling.
    Spectr {
        k: usize,
        l: usize,
    },
    Optimal {
        k: usize,
    },
}

impl TrialData for SpectrTrial<'_> {
    fn setup(&self, entry: &Entry, params: &Params) -> Result<Box<dyn Job + '_>, WorkloadError> {
        let method = match entry.id {
            "autoregressive" => Method::Autoregressive,
            "speculative" | "spectr" => Method::Spectr {
                k: params.usize("k")?,
                l: params.usize("L")?,
            },
            "ot-optimal" => Method::Optimal {
                k: params.usize("k")?,
            },
            other => {
                return Err(WorkloadError::Config(format!(
                    "spectr has no entry `{other}`"
                )))
            }
        };
        let problems = self.problems();
        // Set-up outside the clock: the LP solve of the optimal coupling.
        let couplings = match method {
            Method::Optimal { k } => problems
                .iter()
                .map(|p| {
                    let dp = p.draft.next_dist(&p.prompt);
                    let dq = p.target.next_dist(&p.prompt);
                    optimal::OptimalCoupling::solve(&dp, &dq, k)
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => Vec::new(),
        };
        // Each configuration draws its own randomness from the trial seed.
        let rng =
            ChaCha8Rng::seed_from_u64(seed::derive(self.seed, &[entry.id, &params.to_string()]));
        let llm = match &self.loaded.models {
            Models::Llm(m) => Some(&**m),
            _ => None,
        };
        let job = SpectrJob {
            method,
            llm,
            problems,
            couplings,
            tokens: self.loaded.tokens,
            rng,
            outputs: Vec::new(),
            seed: self.seed,
            wall_s: f64::NAN,
            split: None,
        };
        job.warm_up()?;
        Ok(Box::new(job))
    }
}

struct SpectrJob<'a> {
    method: Method,
    llm: Option<&'a LlmModels>,
    problems: Vec<Problem<'a>>,
    couplings: Vec<optimal::OptimalCoupling>,
    tokens: usize,
    rng: ChaCha8Rng,
    outputs: Vec<decode::Generation>,
    seed: u64,
    /// Timed seconds of the whole job, for tokens per second.
    wall_s: f64,
    /// Where the timed seconds went, for the language-model variants:
    /// (draft, target) statistics accumulated during `run`.
    split: Option<(llm::LmStats, llm::LmStats)>,
}

impl SpectrJob<'_> {
    /// Generates `tokens` tokens for problem `i` with the configured method.
    fn generate(
        &self,
        i: usize,
        tokens: usize,
        rng: &mut ChaCha8Rng,
        check: &mut dyn FnMut() -> Result<(), WorkloadError>,
    ) -> Result<decode::Generation, WorkloadError> {
        let p = &self.problems[i];
        match self.method {
            Method::Autoregressive => {
                decode::autoregressive(p.target, &p.prompt, tokens, rng, check)
            }
            Method::Spectr { k, l } => {
                decode::spectr(p.draft, p.target, &p.prompt, tokens, k, l, rng, check)
            }
            Method::Optimal { .. } => {
                let coupling = &self.couplings[i];
                decode::with_coupling(p.draft, p.target, &p.prompt, tokens, coupling, rng, check)
            }
        }
    }

    /// Untimed warm-up: a short generation with a throwaway generator, so
    /// that the timed run does not pay for cold caches and first-touch
    /// allocation.
    fn warm_up(&self) -> Result<(), WorkloadError> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed::derive(self.seed, &["warm-up"]));
        self.generate(0, self.tokens.min(16), &mut rng, &mut || Ok(()))
            .map(|_| ())
    }
}

impl Job for SpectrJob<'_> {
    fn run(&mut self, sw: &mut Stopwatch<'_>) -> Result<(), WorkloadError> {
        let mut rng = self.rng.clone();
        let stats = |m: &LlmModels| (m.pair.draft.stats(), m.pair.target.stats());
        let before = self.llm.map(stats);
        for i in 0..self.problems.len() {
            let generation = self.generate(i, self.tokens, &mut rng, &mut || sw.check())?;
            self.outputs.push(generation);
        }
        self.wall_s = sw.elapsed();
        self.split = self.llm.map(stats).zip(before).map(|((d, t), (d0, t0))| {
            let less = |a: llm::LmStats, b: llm::LmStats| llm::LmStats {
                decoder_s: a.decoder_s - b.decoder_s,
                softmax_s: a.softmax_s - b.softmax_s,
                ..a
            };
            (less(d, d0), less(t, t0))
        });
        Ok(())
    }

    fn evaluate(self: Box<Self>) -> Result<Outcome, WorkloadError> {
        let mut pit = Vec::new();
        let mut eval_rng = ChaCha8Rng::seed_from_u64(seed::derive(self.seed, &["exactness"]));
        let (mut target_calls, mut draft_calls, mut emitted) = (0u64, 0u64, 0usize);
        let (mut target_rows, mut draft_rows, mut prompt_tokens) = (0u64, 0u64, 0usize);
        // Acceptance at draft position j, conditional on reaching j; averaged
        // over problems with equal weight, like the closed forms it is
        // compared with (pooling over blocks would over-weight the pairs
        // with low acceptance, which need more blocks).
        let positions = match self.method {
            Method::Autoregressive => 0,
            Method::Spectr { l, .. } => l,
            Method::Optimal { .. } => 1,
        };
        let mut acceptance = vec![0.0; positions];
        for (p, g) in self.problems.iter().zip(&self.outputs) {
            let sequence = [&p.prompt[..], &g.tokens[..]].concat();
            let laws = p.target.conditionals(&sequence, p.prompt.len());
            for (q, &t) in laws.iter().zip(&g.tokens) {
                pit.push(crate::stats::pit_value(q, t, eval_rng.random::<f64>()));
            }
            emitted += g.tokens.len();
            target_calls += g.target_calls;
            draft_calls += g.draft_calls;
            target_rows += g.target_rows;
            draft_rows += g.draft_rows;
            prompt_tokens += p.prompt.len();
            let mut reached = g.blocks;
            for (j, a) in acceptance.iter_mut().enumerate() {
                let kept = g.accepted_per_position.get(j).copied().unwrap_or(0);
                if reached > 0 {
                    *a += kept as f64 / reached as f64 / self.problems.len() as f64;
                }
                reached = kept;
            }
        }
        let expected = self.problems.len() * self.tokens;
        if emitted != expected {
            return Err(WorkloadError::Other(format!(
                "emitted {emitted} tokens, the job asks for {expected}"
            )));
        }
        let p_value = crate::stats::pit_uniformity_p(&pit, PIT_BINS);
        let greedy = match (self.method, self.llm) {
            (Method::Spectr { k, l }, Some(m)) => Some(m.greedy_match(k, l)?),
            _ => None,
        };
        // A greedy divergence that is not a near tie fails the check: the
        // trial's quality is then 0 (below the target, scored infinite).
        let failed_greedy = greedy.is_some_and(|g| g.far > 0.0);
        let mut out = Outcome::new(if failed_greedy { 0.0 } else { p_value })
            .figure("pit_p", p_value)
            .figure("tokens", emitted as f64)
            .figure("tokens_per_s", emitted as f64 / self.wall_s)
            .figure("target_calls", target_calls as f64)
            .figure("draft_calls", draft_calls as f64)
            .figure("block_efficiency", emitted as f64 / target_calls as f64)
            .figure("target_rows", target_rows as f64)
            .figure("draft_rows", draft_rows as f64)
            .figure(
                "mean_prompt_tokens",
                prompt_tokens as f64 / self.problems.len() as f64,
            );
        if let Some((d, t)) = self.split {
            // The rest of the timed seconds: selection, sampling and the
            // adapter's bookkeeping on the host.
            let rest = self.wall_s - d.decoder_s - t.decoder_s - d.softmax_s - t.softmax_s;
            out = out
                .figure("draft_decoder_s", d.decoder_s)
                .figure("target_decoder_s", t.decoder_s)
                .figure("softmax_s", d.softmax_s + t.softmax_s)
                .figure("sampler_s", rest);
        }
        if let Some(first) = acceptance.first() {
            out = out.figure("acceptance_first", *first);
        }
        for (j, a) in acceptance.iter().enumerate() {
            out = out.figure(&format!("acceptance_pos{}", j + 1), *a);
        }
        match self.method {
            Method::Autoregressive => {}
            Method::Spectr { k, l } => {
                if let Some(g) = greedy {
                    out = out
                        .figure("greedy_match", g.matched)
                        .figure("greedy_far_divergences", g.far);
                }
                let theory = self.theory(k, l);
                if let Some(a) = theory.0 {
                    out = out.figure("acceptance_first_theory", a);
                }
                if let Some(e) = theory.1 {
                    out = out.figure("block_efficiency_theory", e);
                }
                if let Some(opt) = theory.2 {
                    out = out
                        .figure("acceptance_opt", opt)
                        .figure("acceptance_opt_bound", (1.0 - (-1.0f64).exp()) * opt);
                }
            }
            Method::Optimal { .. } => {
                let opt = self.couplings.iter().map(|c| c.acceptance()).sum::<f64>()
                    / self.couplings.len() as f64;
                out = out
                    .figure("acceptance_opt", opt)
                    .figure("acceptance_opt_bound", (1.0 - (-1.0f64).exp()) * opt);
            }
        }
        Ok(out)
    }
}

impl SpectrJob<'_> {
    /// Closed forms where the steps are i.i.d. (the synthetic variants):
    /// (mean first-position K-SEQ acceptance, block efficiency for k = 1,
    /// mean LP optimum on vocabularies of at most 6 with k at most 3).
    fn theory(&self, k: usize, l: usize) -> (Option<f64>, Option<f64>, Option<f64>) {
        if !self.problems.iter().all(|p| p.prompt.is_empty()) {
            return (None, None, None);
        }
        let n = self.problems.len() as f64;
        let mut acc = 0.0;
        let mut eff = 0.0;
        let mut opt = Some(0.0);
        for p in &self.problems {
            let dp = p.draft.next_dist(&[]);
            let dq = p.target.next_dist(&[]);
            let (_, beta) = kseq::solve_rho(&dp, &dq, k);
            acc += 1.0 - (1.0 - beta).powi(k as i32);
            eff += synthetic::block_efficiency_closed_form(synthetic::overlap(&dp, &dq), l);
            opt = match opt {
                Some(o) if dp.len() <= 6 && k <= 3 => optimal::OptimalCoupling::solve(&dp, &dq, k)
                    .ok()
                    .map(|c| o + c.acceptance()),
                _ => None,
            };
        }
        (
            Some(acc / n),
            (k == 1 && self.problems.len() == 1).then_some(eff / n),
            opt.map(|o| o / n),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::CpuClock;
    use crate::device::Device;

    /// The transformer variant end to end in its quick size (2 prompts x 16
    /// tokens): load, trial, set-up, run, evaluation with the greedy check.
    /// Minutes on two CPU cores, so ignored; run it with `--ignored` when
    /// the Qwen files are fetched.
    #[test]
    #[ignore]
    fn qwen_pair_runs_end_to_end_in_quick() {
        if assets::path(&assets::QWEN_CODER_1_5B).is_err() {
            eprintln!("skipped: Qwen2.5-Coder 1.5B not fetched");
            return;
        }
        let variant = SPEC.variant("qwen2.5-coder-0.5b-1.5b").unwrap();
        let loaded = Spectr
            .load(&LoadContext {
                variant,
                profile: Profile::Quick,
                device: Device::Cpu,
                seed: 1,
            })
            .unwrap();
        let trial = loaded
            .trial(&TrialContext {
                variant,
                profile: Profile::Quick,
                device: Device::Cpu,
                trial: 0,
                seed: 2,
            })
            .unwrap();
        for (entry, params) in [("autoregressive", ""), ("spectr", "k=2,L=4")] {
            let entry = SPEC.entry(entry).unwrap();
            let mut job = trial.setup(entry, &params.parse().unwrap()).unwrap();
            let clock = CpuClock::default();
            let mut sw = Stopwatch::new(&clock, 600.0);
            sw.start();
            job.run(&mut sw).unwrap();
            sw.stop();
            let out = job.evaluate().unwrap();
            eprintln!("{} {params}: {out:?}", entry.id);
            assert_eq!(out.figures["tokens"], 32.0);
            assert!(out.figures["tokens_per_s"].is_finite());
            assert!(out.quality > 0.0);
            if entry.id == "spectr" {
                assert_eq!(out.figures["greedy_match"], 1.0);
                assert!(out.figures["block_efficiency"] > 1.0);
            }
        }
    }

    #[test]
    fn divergence_is_the_first_differing_position() {
        assert_eq!(first_divergence(&[1, 2, 3], &[1, 2, 3]), None);
        assert_eq!(first_divergence(&[1, 2, 4], &[1, 2, 3]), Some(2));
        assert_eq!(first_divergence(&[9, 2, 3], &[1, 2, 3]), Some(0));
        assert_eq!(first_divergence(&[1, 2], &[1, 2, 3]), Some(2));
        assert_eq!(first_divergence(&[1, 2, 3, 4], &[1, 2, 3]), Some(3));
    }

    #[test]
    fn top_two_margin_is_the_log_ratio_of_the_two_largest() {
        let m = top_two_margin(&[0.2, 0.5, 0.3]);
        assert!((m - (0.5f64 / 0.3).ln()).abs() < 1e-12);
        assert!((top_two_margin(&[0.25, 0.25, 0.5]) - 2f64.ln()).abs() < 1e-12);
        assert_eq!(top_two_margin(&[0.4, 0.4, 0.2]), 0.0);
        assert_eq!(top_two_margin(&[0.0, 1.0, 0.0]), f64::INFINITY);
    }

    /// `--device cuda`: refused for the CPU-only variants, and, in a build
    /// without the GPU decoder, for the transformer variants too, each
    /// error naming the fix.
    #[test]
    fn cuda_device_errors_name_the_fix() {
        let load = |id: &str| {
            Spectr
                .load(&LoadContext {
                    variant: SPEC.variant(id).unwrap(),
                    profile: Profile::Quick,
                    device: Device::Cuda(0),
                    seed: 1,
                })
                .map(|_| ())
        };
        let Err(WorkloadError::Device(msg)) = load("synthetic") else {
            panic!("synthetic on cuda must be refused");
        };
        assert!(msg.contains("--device cpu"), "{msg}");
        #[cfg(not(feature = "gpu-decoder"))]
        if assets::path(&assets::QWEN_CODER_1_5B).is_ok()
            && assets::path(&assets::QWEN_CODER_0_5B).is_ok()
        {
            let err = load("qwen2.5-coder-0.5b-1.5b").unwrap_err().to_string();
            assert!(err.contains("--features cuda,gpu-decoder"), "{err}");
        }
    }
}
