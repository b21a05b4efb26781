//! Workload `long-context`: KV-cache compression and sparse attention for
//! long-context decoding, against dense attention, on our own decoder
//! ([`crate::decoder`]) with each method plugged in as a [`KvCache`]
//! ([`policy::Policy`]).
//!
//! The job. `needle`: answer every retrieval prompt of a grid of context
//! lengths and depths ([`haystack`]): prefill, then greedy decoding of up
//! to [`MAX_NEW`] tokens. `perplexity`: score the continuation of every
//! window of long real text. Time-to-result is that wall time.
//!
//! Shared prefill. Methods that only change what decoding reads start from
//! one dense prefill per prompt, computed once per trial (untimed) and
//! reused by every configuration; its measured time is added to each such
//! method's time-to-result, since on its own the method would have to do
//! that work. Building the method's cache from it (eviction, clustering,
//! page metadata, and the copy of what it keeps, dense's full copy
//! included) is timed. Methods that change prefill (DHSA) run their own
//! prefill inside the clock. Scoring (log-softmax over the vocabulary) is
//! evaluation and is not timed, in either variant.
//!
//! Quality and target. Exact-match accuracy needs about 1,500 prompts per
//! cell to resolve two points, far beyond a CPU; so every entry runs on
//! exactly the prompts `dense` runs on and is compared pairwise on a
//! continuous per-prompt figure: the mean log-probability of the answer
//! tokens given the prompt, teacher-forced through the method's cache
//! (`needle`), or the continuation's perplexity (`perplexity`). The metric
//! is the upper end of the 95% bootstrap interval of the mean paired drop
//! against dense (nats per answer token; relative perplexity increase); a
//! method reaches the target when that bound is within the variant's
//! margin (0.05 nats per token; 2%). Accuracy per cell is recorded beside
//! it. RULES.md and the workload README give the derivation.

pub mod chunk_select;
pub mod cluster;
pub mod dhsa;
pub mod haystack;
mod held;
pub mod kernel;
pub mod policy;
pub mod quest;
pub mod sink_window;
pub mod snapkv;
pub mod step;
#[cfg(test)]
mod testutil;

#[cfg(feature = "cuda")]
pub mod cuda;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::clock::Stopwatch;
use crate::contract::*;
use crate::decoder::cuda::{Boundaries, CudaDecoder, CudaModel, ReadRule};
use crate::decoder::{Decoder, DecoderError, DenseKv, Engine, KvCache, Model, Reads, Weights};
use crate::{assets, WorkloadError};
use haystack::{Corpus, NeedlePrompt, Task, Window};
use policy::{Plan, Policy};

pub struct LongContext;

/// Tokens generated per needle prompt (the answer is read from them).
pub const MAX_NEW: usize = 16;
/// Bootstrap resamples of the paired-drop interval.
const BOOTSTRAP: usize = 2000;
/// The cache budgets every compressing entry runs at, as fractions of the
/// prompt.
pub(crate) const BUDGETS: &[f64] = &[0.1, 0.25, 0.5];
/// Environment variable naming the GGUF of the `user-model` variant (the
/// same one SpecTr's `user-pair` reads for its target).
pub const ENV_MODEL: &str = crate::spectr::llm::ENV_TARGET;

const NEEDLE_TARGET: Target = Target {
    value: 0.05,
    source: "margin 0.05 nats per answer token on the upper 95% bootstrap bound of the mean paired drop against dense (RULES.md, workload README)",
};
const BUDGET_NEEDLE: Budget = Budget {
    quick_s: 60.0,
    full_s: 3600.0,
};

const fn method(
    id: &'static str,
    description: &'static str,
    variants: &'static [&'static str],
) -> Entry {
    Entry {
        id,
        kind: EntryKind::Method,
        description,
        grid: &[Param {
            name: "budget",
            values: BUDGETS,
        }],
        fixed: &[],
        variants,
        cuda_only: false,
        cpu_only_variants: &[],
    }
}

/// The variants that run the decoder (every entry); `decode-step` runs the
/// entries that have a kernel.
const DECODER_VARIANTS: &[&str] = &["needle", "perplexity", "needle-1.5b", "user-model"];

/// `e` without a GPU-decoder form: `--device cuda` runs leave it out of the
/// decoder variants ([`GRAPH_ENTRIES`] lists the entries that have one).
const fn cpu_decoder_only(e: Entry) -> Entry {
    Entry {
        cpu_only_variants: DECODER_VARIANTS,
        ..e
    }
}

const fn peer(
    id: &'static str,
    description: &'static str,
    grid: &'static [Param],
    fixed: &'static [(&'static str, f64)],
) -> Entry {
    Entry {
        id,
        kind: EntryKind::Baseline,
        description,
        grid,
        fixed,
        variants: &["decode-step"],
        cuda_only: true,
        cpu_only_variants: &[],
    }
}

static SPEC: WorkloadSpec = WorkloadSpec {
    id: "long-context",
    version: 1,
    title: "Long-context decoding: KV-cache compression and sparse attention vs dense",
    summary: "Sinks + sliding window, Quest page selection, Chelsea KV clustering, DHSA, training-free ChunkLLM selection and SnapKV plugged into one decoder, against the full KV cache, on needle retrieval and perplexity over real text, compared pairwise on the same prompts.",
    papers: &[
        Paper {
            title: "Efficient Streaming Language Models with Attention Sinks (StreamingLLM)",
            arxiv: "2309.17453",
            section: "Sec. 3.1-3.2, Table 2 (rolling KV cache with 4 attention sinks)",
        },
        Paper {
            title: "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
            arxiv: "2406.10774",
            section: "Sec. 3.4, Alg. 1 (page criticality from min/max keys, top-k pages); Sec. 4.1 (first two layers dense)",
        },
        Paper {
            title: "Efficient Long-Context LLM Inference via KV Cache Clustering (Chelsea)",
            arxiv: "2506.11418",
            section: "body not read (only the abstract was reachable): chunked soft matching filled in from ToMe, see longctx/cluster.rs",
        },
        Paper {
            title: "Dynamic Hierarchical Sparse Attention (DHSA)",
            arxiv: "2510.24606",
            section: "v1: Sec. 2.1-2.3 (hierarchical sparsity prediction, dynamic boundary detection, length-normalised chunk representation, eq. 4); App. A, Algs. 1-2 (prefill and decode); read with the authors' code, see longctx/dhsa.rs",
        },
        Paper {
            title: "ChunkLLM: A Lightweight Pluggable Framework for Accelerating LLM Inference",
            arxiv: "2510.02361",
            section: "v1: Sec. 2.1 (Chunk Adapter), Sec. 2.2 (QK Adapter, attention distillation), Sec. 2.3 (top-k chunk selection, cross-layer voting, ICAC); training-free form, see longctx/chunk_select.rs",
        },
        Paper {
            title: "SnapKV: LLM Knows What You are Looking for Before Generation",
            arxiv: "2404.14469",
            section: "Sec. 4 (observation window, voting, pooling), as the authors' snapkv_utils.py implements it; section numbers not checked, see longctx/snapkv.rs",
        },
        Paper {
            title: "RULER: What's the Real Context Size of Your Long-Context Language Models?",
            arxiv: "2404.06654",
            section: "Sec. 3.1-3.2 (NIAH multi-key, multi-value; variable tracking)",
        },
    ],
    metric: Metric {
        name: "quality_loss",
        description: "needle and perplexity: upper end of the 95% bootstrap interval of the mean per-prompt quality drop against dense on the same prompts (nats per answer token; relative perplexity increase); decode-step: the attention output's largest relative error against a float64 reference, over its tolerance",
        direction: Direction::LowerIsBetter,
    },
    variants: &[
        Variant {
            id: "needle",
            description: "Retrieval (passkey, multi-key, multi-value, variable tracking) in Jargon File haystacks. Full profile: Qwen2.5-Coder-0.5B-Instruct at 1k/2k/4k/8k tokens x depths 0.1/0.5/0.9, 1 prompt per cell. Quick profile: a smoke test with SmolLM2-135M-Instruct at 256/512 tokens, depth 0.5.",
            role: VariantRole::Default,
            profiles: &[Profile::Quick, Profile::Full],
            target: NEEDLE_TARGET,
            budget: BUDGET_NEEDLE,
            params: &[],
        },
        Variant {
            id: "perplexity",
            description: "Perplexity of 64-token continuations of Jargon File text after 1k/2k/4k-token contexts (2 windows each), SmolLM2-135M-Instruct. Quick: two 256-token contexts, 16-token continuations.",
            role: VariantRole::Standard,
            profiles: &[Profile::Quick, Profile::Full],
            target: Target {
                value: 0.02,
                source: "margin 2% relative perplexity increase on the upper 95% bootstrap bound of the mean paired increase against dense (RULES.md, workload README)",
            },
            budget: Budget {
                quick_s: 60.0,
                full_s: 3600.0,
            },
            params: &[],
        },
        Variant {
            id: "decode-step",
            description: "One decoding step of one attention layer at Llama-3-8B shapes (32 query heads, 8 KV heads, head dim 128, bf16 cache, batch 1) at 4k-512k tokens: dense, Quest page selection, clustered and windowed caches. CPU: our multi-threaded step; GPU (--device cuda): our cudarc kernels beside the memory-traffic floor and the PyTorch peers.",
            role: VariantRole::Standard,
            profiles: &[Profile::Full],
            target: Target {
                value: 1.0,
                source: "the step output's largest relative error against a float64 reference within 1e-3 (f32 accumulation over bf16 data; see longctx/kernel.rs), and the selected pages a float64 top-k up to near-ties",
            },
            budget: Budget {
                quick_s: 60.0,
                full_s: 600.0,
            },
            params: &[Param {
                name: "context",
                values: step::CONTEXTS,
            }],
        },
        Variant {
            id: "needle-1.5b",
            description: "The needle grid with Qwen2.5-Coder-1.5B-Instruct (9/9 at every length in llama.cpp: a strict check). Held out: about 2x the 0.5B's cost.",
            role: VariantRole::HeldOut,
            profiles: &[Profile::Full],
            target: NEEDLE_TARGET,
            budget: BUDGET_NEEDLE,
            params: &[],
        },
        Variant {
            id: "user-model",
            description: "The needle grid with your own GGUF (llama or qwen2 architecture), named by BENCH_SUITE_TARGET_GGUF. Held out: runs only when named.",
            role: VariantRole::HeldOut,
            profiles: &[Profile::Quick, Profile::Full],
            target: NEEDLE_TARGET,
            budget: BUDGET_NEEDLE,
            params: &[],
        },
    ],
    entries: &[
        Entry {
            id: "dense",
            kind: EntryKind::Reference,
            description: "The full KV cache; every query reads every position.",
            grid: &[],
            fixed: &[("budget", 1.0)],
            variants: &[],
            cuda_only: false,
            cpu_only_variants: &[],
        },
        method(
            "sink-window",
            "StreamingLLM: the first 4 positions (attention sinks) plus the newest ones, evicting the oldest non-sink as decoding appends.",
            &[],
        ),
        method(
            "block-topk",
            "Quest: 16-token pages with per-channel min/max key bounds; each query reads the pages with the highest bound on q.k (one selection per KV head), plus the current page; the first two layers stay dense.",
            &[],
        ),
        cpu_decoder_only(method(
            "kv-cluster",
            "Chelsea-style KV clustering: within 64-token chunks, keys alternately split into two sets and the most similar pairs merged (bipartite soft matching) into count-weighted centroids until the budget is met, attended with a ln(count) bias; 16 sinks and the 64 most recent positions kept exact (each at most a quarter of the budget), and the 4% of KV heads an offline calibration finds most sensitive kept whole.",
            &[],
        )),
        cpu_decoder_only(method(
            "dhsa",
            "Dynamic Hierarchical Sparse Attention: variable-length chunks cut where the keys change, chunk scores from length-normalised key sums, the top-scoring tokens within the budget plus the first and most recent; sparse in its own prefill and in decode.",
            DECODER_VARIANTS,
        )),
        method(
            "chunk-select",
            "ChunkLLM, training-free form: chunks end at sentence and line boundaries; at each boundary token the query's own attention mass per chunk picks the chunks later queries read, within the budget.",
            DECODER_VARIANTS,
        ),
        method(
            "chunk-select-vote",
            "ChunkLLM, training-free form with the paper's vote: chunk-select, but at each boundary token every layer ranks the chunks by its attention mass, the layers' ballots are counted, and the winners plus the newest (local) chunks are what every layer reads until the next boundary.",
            DECODER_VARIANTS,
        ),
        cpu_decoder_only(method(
            "chunk-select-evict",
            "Our evicting variant of chunk-select (not ChunkLLM, whose selections re-rank every chunk and so keep them all): each selection also drops from memory the chunks it leaves out, so after the first decode step each KV head holds about the budget.",
            DECODER_VARIANTS,
        )),
        cpu_decoder_only(method(
            "snapkv",
            "SnapKV: at the end of the prefill, the attention of the prompt's last 32 tokens (the observation window), summed over them and the query heads of each KV head and max-pooled over 7 positions (the authors' LongBench setting), picks the positions each KV head keeps within the budget, window included; the rest is dropped, and decoding appends without evicting.",
            DECODER_VARIANTS,
        )),
        peer(
            "sdpa-gqa",
            "PyTorch scaled_dot_product_attention with native GQA (enable_gqa), cuDNN backend, under CUDA graphs (scripts/peer_decode_attn.py).",
            &[],
            &[("budget", 1.0)],
        ),
        peer(
            "hf-repeat-kv",
            "The Hugging Face step: repeat_kv expands the 8 KV heads to 32, then SDPA (scripts/peer_decode_attn.py).",
            &[],
            &[("budget", 1.0)],
        ),
        peer(
            "quest-torch",
            "Quest composed from torch ops: page scores from min/max metadata, topk per KV head, gather, SDPA (scripts/peer_decode_attn.py).",
            &[Param {
                name: "budget",
                values: BUDGETS,
            }],
            &[],
        ),
    ],
    figures: &[
        Figure {
            key: "drop_mean",
            label: "mean paired drop",
        },
        Figure {
            key: "accuracy",
            label: "exact match",
        },
        Figure {
            key: "kv_share",
            label: "KV bytes / dense",
        },
        Figure {
            key: "read_share",
            label: "share read per step",
        },
        Figure {
            key: "decode_tokens_per_s",
            label: "decode tok/s",
        },
        Figure {
            key: "prefill_s",
            label: "prefill s",
        },
        Figure {
            key: "floor_ratio",
            label: "time / floor",
        },
        Figure {
            key: "rel_err",
            label: "rel. error",
        },
    ],
    comparisons: &[],
    charts: &[
        Chart {
            id: "drop-vs-budget",
            title: "Paired quality drop against dense, by cache budget",
            x: Source::Param("budget"),
            x_label: "cache budget (fraction of the context)",
            y: Source::Figure("drop_mean"),
            y_label: "mean paired drop (needle: nats/token; perplexity: relative)",
            series: Series::Entries,
            entries: &[],
            theory: None,
            log_x: false,
            log_y: false,
            only: &[],
        },
        Chart {
            id: "accuracy-vs-budget",
            title: "Exact-match accuracy by cache budget",
            x: Source::Param("budget"),
            x_label: "cache budget (fraction of the context)",
            y: Source::Figure("accuracy"),
            y_label: "exact match (all cells)",
            series: Series::Entries,
            entries: &[],
            theory: None,
            log_x: false,
            log_y: false,
            only: &[],
        },
        Chart {
            id: "perplexity-vs-budget",
            title: "Perplexity by cache budget",
            x: Source::Param("budget"),
            x_label: "cache budget (fraction of the context)",
            y: Source::Figure("ppl"),
            y_label: "perplexity of the continuations",
            series: Series::Entries,
            entries: &[],
            theory: None,
            log_x: false,
            log_y: false,
            only: &[],
        },
        Chart {
            id: "throughput-vs-context",
            title: "Decode throughput against context length",
            x: Source::Param("budget"),
            x_label: "context (tokens)",
            y: Source::Figure("decode_tokens_per_s"),
            y_label: "decode tokens per second",
            series: Series::Curve(&[
                (256.0, "tokens_per_s_c256"),
                (512.0, "tokens_per_s_c512"),
                (1024.0, "tokens_per_s_c1024"),
                (2048.0, "tokens_per_s_c2048"),
                (4096.0, "tokens_per_s_c4096"),
                (8192.0, "tokens_per_s_c8192"),
            ]),
            entries: &[],
            theory: None,
            log_x: true,
            log_y: false,
            only: &[],
        },
        Chart {
            id: "quality-vs-speed",
            title: "Quality drop against speedup over dense (each line: one method across budgets)",
            x: Source::Speedup,
            x_label: "time-to-result speedup over dense (median, paired)",
            y: Source::Figure("drop_mean"),
            y_label: "mean paired drop",
            series: Series::Pareto {
                x_higher_better: true,
                y_higher_better: false,
            },
            entries: &[],
            theory: None,
            log_x: false,
            log_y: false,
            only: &[],
        },
        Chart {
            id: "step-latency",
            title: "Decode-attention step time against context (Llama-3-8B layer, bf16)",
            x: Source::Param("context"),
            x_label: "context (tokens)",
            y: Source::TimeToResult,
            y_label: "seconds per step (median)",
            series: Series::Entries,
            entries: &[],
            theory: None,
            log_x: true,
            log_y: true,
            only: &[],
        },
        Chart {
            id: "step-floor-ratio",
            title: "Decode-attention step time over its memory-traffic floor",
            x: Source::Param("context"),
            x_label: "context (tokens)",
            y: Source::Figure("floor_ratio"),
            y_label: "step time / (bytes read / copy bandwidth)",
            series: Series::Entries,
            entries: &[],
            theory: None,
            log_x: true,
            log_y: true,
            only: &[],
        },
        Chart {
            id: "needle-heatmap",
            title: "Exact match by context length and needle depth (one panel per entry and budget)",
            x: Source::Param("budget"),
            x_label: "depth of the first needle (% of the haystack)",
            y: Source::Figure("accuracy"),
            y_label: "context (tokens)",
            series: Series::Heat {
                rows: &[256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0],
                cols: &[10.0, 50.0, 90.0],
                key: "acc_c{row}_d{col}",
            },
            entries: &[],
            theory: None,
            log_x: false,
            log_y: false,
            only: &[],
        },
    ],
    claims: &[
        "Chelsea (arXiv 2506.11418 v1): up to 80% less KV-cache memory and up to 3.19x faster decoding at comparable accuracy (its revision, CentroidKV, reports up to 75% less memory, decoding up to 1.92x faster and serving throughput up to 4x). Per an unverified summary of its full text, the 80% is a budget of 20% of the tokens on 7-8B models with 1.5-1.7 LongBench points lost, and the 3.19x Llama-3.1-8B's decode step at 64k tokens.",
        "DHSA (arXiv 2510.24606): dense-level accuracy with 20-60% less prefill latency and 35% less peak memory.",
        "ChunkLLM (arXiv 2510.02361): 98.64% of long-context performance with 48.58% KV-cache retention.",
        "StreamingLLM (arXiv 2309.17453): stable perplexity over streams far beyond the trained window with 4 sink tokens plus a recent window.",
        "Quest (arXiv 2406.10774): up to 7.03x self-attention speedup with negligible accuracy loss on long-context tasks.",
        "SnapKV (arXiv 2404.14469): with 16k-token inputs, generation 3.6x faster and memory 8.2x more efficient than the baseline, with comparable accuracy on LongBench.",
    ],
};

/// The dense baseline as a policy: a copy of the shared prefill.
struct Dense;

impl Policy for Dense {
    fn id(&self) -> &'static str {
        "dense"
    }

    fn from_dense(&self, dense: &DenseKv, _plan: &Plan<'_>) -> Box<dyn KvCache> {
        let copy = dense.clone();
        copy.reset_reads();
        Box::new(copy)
    }
}

/// Every entry's policy, in the order of the spec's entries.
const POLICIES: &[&dyn Policy] = &[
    &Dense,
    &sink_window::SinkWindow,
    &quest::BlockTopK,
    &cluster::KvCluster,
    &dhsa::Dhsa,
    &chunk_select::ChunkSelect,
    &chunk_select::ChunkSelectVote,
    &chunk_select::ChunkSelectEvict,
    &snapkv::SnapKvPolicy,
];

fn policy_of(id: &str) -> Result<&'static dyn Policy, WorkloadError> {
    POLICIES
        .iter()
        .copied()
        .find(|p| p.id() == id)
        .ok_or_else(|| WorkloadError::Config(format!("long-context has no entry `{id}`")))
}

/// What a variant measures, at which sizes, in one profile.
#[derive(Debug, Clone)]
struct Grid {
    kind: Kind,
    contexts: &'static [usize],
    /// Needle depths (needle); one dummy depth for perplexity, whose
    /// windows per context are `per_cell`.
    depths: &'static [f64],
    per_cell: usize,
    /// Continuation tokens scored per perplexity window.
    continuation: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Needle,
    Perplexity,
}

fn grid(variant: &str, profile: Profile) -> Grid {
    let needle = |contexts, depths, per_cell| Grid {
        kind: Kind::Needle,
        contexts,
        depths,
        per_cell,
        continuation: 0,
    };
    match (variant, profile) {
        ("perplexity", Profile::Quick) => Grid {
            kind: Kind::Perplexity,
            contexts: &[256],
            depths: &[0.0],
            per_cell: 2,
            continuation: 16,
        },
        ("perplexity", Profile::Full) => Grid {
            kind: Kind::Perplexity,
            contexts: &[1024, 2048, 4096],
            depths: &[0.0],
            per_cell: 2,
            continuation: 64,
        },
        (_, Profile::Quick) => needle(&[256, 512], &[0.5], 1),
        (_, Profile::Full) => needle(&[1024, 2048, 4096, 8192], &[0.1, 0.5, 0.9], 1),
    }
}

fn model_file(variant: &str, profile: Profile) -> Result<PathBuf, WorkloadError> {
    match (variant, profile) {
        ("needle", Profile::Full) => assets::verify(&assets::QWEN_CODER_0_5B),
        ("needle-1.5b", _) => assets::verify(&assets::QWEN_CODER_1_5B),
        ("user-model", _) => {
            let p = std::env::var_os(ENV_MODEL).ok_or_else(|| {
                WorkloadError::Config(format!(
                    "variant `user-model` needs {ENV_MODEL}=/path/to/model.gguf (a llama or \
                     qwen2 GGUF)"
                ))
            })?;
            let p = PathBuf::from(p);
            if !p.is_file() {
                return Err(WorkloadError::Config(format!(
                    "{ENV_MODEL} names {}, which is not a file",
                    p.display()
                )));
            }
            Ok(p)
        }
        _ => assets::verify(&assets::SMOLLM2_135M),
    }
}

impl Workload for LongContext {
    fn spec(&self) -> &'static WorkloadSpec {
        &SPEC
    }

    fn load(&self, ctx: &LoadContext<'_>) -> Result<Box<dyn Loaded>, WorkloadError> {
        if ctx.variant.id == "decode-step" {
            return step::load(ctx);
        }
        load_decoders(ctx, false)
    }
}

/// The decoder variants' set-up. With `--device cuda` they run on the GPU
/// decoder (feature `gpu-decoder`; [`Backend::Graph`]); `graph_on_cpu`
/// puts that decoder's graph on the CPU instead (tests).
fn load_decoders(
    ctx: &LoadContext<'_>,
    graph_on_cpu: bool,
) -> Result<Box<dyn Loaded>, WorkloadError> {
    let grid = grid(ctx.variant.id, ctx.profile);
    let path = model_file(ctx.variant.id, ctx.profile)?;
    let model = Arc::new(Model::load(&path)?);
    let backend = match Weights::on(model.clone(), ctx.device)? {
        _ if graph_on_cpu => Backend::Graph(Arc::new(CudaModel::on_cpu(&model)?)),
        Weights::Cpu(_) => Backend::Cpu,
        #[cfg(feature = "gpu-decoder")]
        Weights::Cuda(_, gpu) => {
            // Kernel loading and cuBLAS start-up, outside every clock.
            gpu.warm_up()?;
            Backend::Graph(gpu)
        }
    };
    let longest =
        grid.contexts.iter().max().copied().unwrap_or(0) + grid.continuation.max(MAX_NEW) + 1;
    if longest > model.config().context_length {
        return Err(WorkloadError::Config(format!(
            "{} has a context of {} tokens; variant `{}` needs {longest}",
            path.display(),
            model.config().context_length,
            ctx.variant.id
        )));
    }
    let corpus = Corpus::jargon(&assets::jargon_text()?, &model)?;
    let boundary = boundary_table(&model)?;
    let tok = model.tokenizer();
    let stop: Vec<u32> = tok
        .eos()
        .into_iter()
        .chain(tok.token_id("<|im_end|>"))
        .chain(tok.token_id("<|endoftext|>"))
        .collect();
    Ok(Box::new(LoadedLc {
        model,
        backend,
        model_name: path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        corpus,
        boundary: Boundaries(boundary.into()),
        stop,
        grid,
        calibrations: RefCell::new(Vec::new()),
        calibration_text: RefCell::new(None),
    }))
}

/// `table[t]`: token `t` ends a sentence or a line.
fn boundary_table(model: &Model) -> Result<Vec<bool>, WorkloadError> {
    let tok = model.tokenizer();
    (0..model.vocab_size() as u32)
        .map(|t| {
            let s = tok.decode(&[t]).unwrap_or_default();
            Ok(s.contains(['.', '!', '?', ';', '\n']))
        })
        .collect()
}

/// Where the needle and perplexity decoders run.
enum Backend {
    /// Our CPU decoder, with every entry's cache.
    Cpu,
    /// The GPU decoder's candle graph ([`crate::decoder::cuda`]): with
    /// `--device cuda`, or on the CPU in tests. It runs [`GRAPH_ENTRIES`]
    /// only: `dense`, and `sink-window`, `block-topk`, `chunk-select` and
    /// `chunk-select-vote` as read rules over the dense cache
    /// ([`CudaDecoder::set_read_rule`]). Each reads what its CPU cache
    /// reads; sink-window evicts in steps, holding up to a window more than
    /// the CPU cache.
    Graph(Arc<CudaModel>),
}

/// The entries the GPU decoder runs (see [`Backend::Graph`]).
const GRAPH_ENTRIES: &[&str] = &[
    "dense",
    "sink-window",
    "block-topk",
    "chunk-select",
    "chunk-select-vote",
];

/// How the GPU decoder serves entry `id` with a budget of `budget`
/// positions (chunks cut at `boundary`): its read rule
/// ([`CudaDecoder::set_read_rule`]). An entry outside [`GRAPH_ENTRIES`] is
/// refused by name.
fn graph_rule(id: &str, budget: usize, boundary: &Boundaries) -> Result<ReadRule, WorkloadError> {
    match id {
        "dense" => Ok(ReadRule::Dense),
        "sink-window" => Ok(ReadRule::SinkWindow {
            sinks: sink_window::SINKS,
            budget,
        }),
        "block-topk" => Ok(ReadRule::TopPages {
            page: quest::PAGE,
            dense_layers: quest::DENSE_LAYERS,
            budget,
        }),
        "chunk-select" | "chunk-select-vote" => Ok(ReadRule::ChunkSelect {
            budget,
            cap: chunk_select::chunk_cap(budget),
            vote: id == "chunk-select-vote",
            boundary: boundary.clone(),
        }),
        _ => Err(WorkloadError::Config(format!(
            "entry `{id}` runs only on the CPU decoder: with --device cuda the {} variants run \
             {GRAPH_ENTRIES:?} (run the others with --device cpu)",
            SPEC.id
        ))),
    }
}

/// A decoder after a prompt, on either backend.
enum Dec {
    Cpu(Box<Decoder>),
    Graph(Box<CudaDecoder>),
}

impl Dec {
    fn step(&mut self, token: u32) -> Result<&[f32], DecoderError> {
        match self {
            Dec::Cpu(d) => d.step(token),
            Dec::Graph(g) => g.prefill(&[token]),
        }
    }

    fn truncate(&mut self, len: usize) -> Result<(), DecoderError> {
        match self {
            Dec::Cpu(d) => d.truncate(len),
            Dec::Graph(g) => Engine::truncate(&mut **g, len),
        }
    }

    fn reads(&self) -> Reads {
        match self {
            Dec::Cpu(d) => d.cache().reads(),
            Dec::Graph(g) => g.reads(),
        }
    }

    fn kv_bytes(&self) -> usize {
        match self {
            Dec::Cpu(d) => d.cache().bytes(),
            Dec::Graph(g) => g.kv_bytes(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Dec::Cpu(d) => d.len(),
            Dec::Graph(g) => g.tokens().len(),
        }
    }
}

struct LoadedLc {
    model: Arc<Model>,
    backend: Backend,
    model_name: String,
    corpus: Corpus,
    boundary: Boundaries,
    stop: Vec<u32>,
    grid: Grid,
    /// Calibrations done (methods with one, by budget fraction's bits):
    /// offline work, once per model and budget, outside every clock.
    calibrations: RefCell<Vec<(u64, Rc<cluster::Calibration>)>>,
    /// The calibration text's dense prefill, once per model.
    calibration_text: RefCell<Option<Rc<cluster::CalibrationText>>>,
}

/// One prompt of a trial: a needle question or a perplexity window.
enum Item {
    Needle(NeedlePrompt),
    Window(Window),
}

impl Item {
    /// The tokens prefilled.
    fn prompt(&self) -> &[u32] {
        match self {
            Item::Needle(p) => &p.tokens,
            Item::Window(w) => &w.tokens[..w.context],
        }
    }

    /// The grid row (requested context length).
    fn context(&self) -> usize {
        match self {
            Item::Needle(p) => p.context,
            Item::Window(w) => w.context,
        }
    }
}

/// The shared dense prefill of one prompt.
struct Prefill {
    state: Prefilled,
    logits: Vec<f32>,
    seconds: f64,
    /// The queries of the prompt's last positions (`snapkv`'s observation
    /// window), recorded by the CPU prefill.
    window: Option<Arc<snapkv::WindowQueries>>,
}

/// What a shared prefill leaves, per backend.
enum Prefilled {
    Cpu(DenseKv),
    /// A GPU decoder after the prompt, forked for each method.
    Graph(Box<CudaDecoder>),
}

/// Seed of the calibration text's draw: fixed, so every trial and run of
/// a model keeps the same heads whole.
const CALIBRATION_SEED: u64 = 0x6361_6c69;

impl LoadedLc {
    /// `kv-cluster`'s offline calibration at budget `frac` (see
    /// [`cluster::calibrate`]): on a window of Jargon File text drawn with
    /// [`CALIBRATION_SEED`], as long as the variant's longest context up to
    /// [`cluster::CALIBRATION_CONTEXT`] tokens, prefilled once per model;
    /// computed once per budget.
    fn calibration(
        &self,
        frac: f64,
        share: f64,
    ) -> Result<Rc<cluster::Calibration>, WorkloadError> {
        if let Some((_, c)) = self
            .calibrations
            .borrow()
            .iter()
            .find(|(f, _)| *f == frac.to_bits())
        {
            return Ok(c.clone());
        }
        let text = self.calibration_text.borrow().clone();
        let text = match text {
            Some(t) => t,
            None => {
                let longest = self.grid.contexts.iter().max().copied().unwrap_or(0);
                let context = longest.min(cluster::CALIBRATION_CONTEXT);
                let mut rng = ChaCha8Rng::seed_from_u64(CALIBRATION_SEED);
                let w = haystack::window(
                    &self.corpus,
                    &self.model,
                    context,
                    cluster::CALIBRATION_QUERIES,
                    &mut rng,
                )?;
                let t = Rc::new(cluster::CalibrationText::new(
                    &self.model,
                    w.tokens,
                    context,
                )?);
                *self.calibration_text.borrow_mut() = Some(t.clone());
                t
            }
        };
        let c = Rc::new(cluster::calibrate(&self.model, &text, frac, share)?);
        self.calibrations
            .borrow_mut()
            .push((frac.to_bits(), c.clone()));
        Ok(c)
    }
}

impl Loaded for LoadedLc {
    fn trial(&self, ctx: &TrialContext<'_>) -> Result<Box<dyn TrialData + '_>, WorkloadError> {
        let mut rng = ChaCha8Rng::seed_from_u64(ctx.seed);
        let g = &self.grid;
        let mut items = Vec::new();
        for &c in g.contexts {
            for &d in g.depths {
                for _ in 0..g.per_cell {
                    items.push(match g.kind {
                        Kind::Needle => {
                            // Shifted by the trial, so that over trials
                            // every cell sees every task kind.
                            let task =
                                Task::ALL[(items.len() + ctx.trial as usize) % Task::ALL.len()];
                            Item::Needle(haystack::needle_prompt(
                                &self.corpus,
                                &self.model,
                                c,
                                d,
                                task,
                                &mut rng,
                            )?)
                        }
                        Kind::Perplexity => Item::Window(haystack::window(
                            &self.corpus,
                            &self.model,
                            c,
                            g.continuation,
                            &mut rng,
                        )?),
                    });
                }
            }
        }
        let n = items.len();
        Ok(Box::new(LcTrial {
            loaded: self,
            items,
            prefills: RefCell::new((0..n).map(|_| None).collect()),
            reference: RefCell::new(vec![None; n]),
            seed: ctx.seed,
        }))
    }
}

struct LcTrial<'l> {
    loaded: &'l LoadedLc,
    items: Vec<Item>,
    prefills: RefCell<Vec<Option<Rc<Prefill>>>>,
    /// Dense's per-prompt figure (answer log-probability or continuation
    /// NLL), computed once per trial for the paired comparison.
    reference: RefCell<Vec<Option<f64>>>,
    seed: u64,
}

impl LcTrial<'_> {
    fn plan<'a>(&'a self, item: &'a Item, frac: f64, max_new: usize) -> Plan<'a> {
        let prompt = item.prompt();
        let context = prompt.len();
        Plan {
            shape: self.loaded.model.kv_shape(),
            context,
            budget: ((frac * context as f64).ceil() as usize).clamp(1, context),
            prompt,
            boundary: &self.loaded.boundary.0,
            max_new,
            whole_heads: &[],
            window: None,
        }
    }

    /// The dense prefill of prompt `i` (untimed, once per trial).
    fn prefill(&self, i: usize) -> Result<Rc<Prefill>, WorkloadError> {
        if let Some(p) = &self.prefills.borrow()[i] {
            return Ok(p.clone());
        }
        let prompt = self.items[i].prompt();
        let model = &self.loaded.model;
        let p = Rc::new(match &self.loaded.backend {
            Backend::Cpu => {
                let extra = self.max_new(i) + 1;
                let cache = DenseKv::new(model.kv_shape(), prompt.len() + extra);
                let window = Arc::new(snapkv::WindowQueries::new(
                    model.kv_shape(),
                    model.config().n_heads / model.config().n_kv_heads,
                    prompt.len(),
                ));
                let cache = snapkv::ObservedKv::new(cache, window.clone());
                let mut dec = Decoder::with_cache(model.clone(), Box::new(cache));
                let t0 = Instant::now();
                let logits = dec.prefill(prompt)?.to_vec();
                let seconds = t0.elapsed().as_secs_f64();
                let cache = dec
                    .cache()
                    .as_dense()
                    .expect("a dense decoder holds a dense cache")
                    .clone();
                Prefill {
                    state: Prefilled::Cpu(cache),
                    logits,
                    seconds,
                    window: Some(window),
                }
            }
            Backend::Graph(gpu) => {
                let mut dec = CudaDecoder::new(gpu.clone());
                let t0 = Instant::now();
                // The logits come back to the host, which waits for the
                // device: the clock reads after the work is done.
                let logits = dec.prefill(prompt)?.to_vec();
                let seconds = t0.elapsed().as_secs_f64();
                Prefill {
                    state: Prefilled::Graph(Box::new(dec)),
                    logits,
                    seconds,
                    window: None,
                }
            }
        });
        self.prefills.borrow_mut()[i] = Some(p.clone());
        Ok(p)
    }

    /// A decoder for prompt `i` with `policy`'s cache built from its
    /// shared prefill `pre`.
    fn decoder_for(
        &self,
        pre: &Prefill,
        policy: &dyn Policy,
        plan: &Plan<'_>,
    ) -> Result<Dec, WorkloadError> {
        let prompt = plan.prompt.to_vec();
        Ok(match &pre.state {
            Prefilled::Cpu(dense) => {
                let plan = Plan {
                    window: pre.window.as_deref(),
                    ..*plan
                };
                let cache = policy.from_dense(dense, &plan);
                Dec::Cpu(Box::new(Decoder::resume(
                    self.loaded.model.clone(),
                    cache,
                    prompt,
                )?))
            }
            Prefilled::Graph(g) => {
                let rule = graph_rule(policy.id(), plan.budget, &self.loaded.boundary)?;
                let mut g = g.fork()?;
                g.set_read_rule(rule);
                Dec::Graph(Box::new(g))
            }
        })
    }

    fn max_new(&self, i: usize) -> usize {
        match &self.items[i] {
            Item::Needle(p) => MAX_NEW.max(p.answer_tokens.len()),
            Item::Window(w) => w.tokens.len() - w.context,
        }
    }

    /// Dense's figure for prompt `i` (untimed, once per trial).
    fn reference(&self, i: usize) -> Result<f64, WorkloadError> {
        if let Some(r) = self.reference.borrow()[i] {
            return Ok(r);
        }
        let pre = self.prefill(i)?;
        let item = &self.items[i];
        let plan = self.plan(item, 1.0, self.max_new(i));
        let mut dec = self.decoder_for(&pre, &Dense, &plan)?;
        let r = match item {
            Item::Needle(p) => {
                answer_logp(&mut dec, &pre.logits, &p.answer_tokens, &mut || Ok(()))?
            }
            Item::Window(w) => continuation_nll(
                &mut dec,
                &pre.logits,
                &w.tokens[w.context..],
                &mut || Ok(()),
            )?,
        };
        self.reference.borrow_mut()[i] = Some(r);
        Ok(r)
    }
}

impl TrialData for LcTrial<'_> {
    fn setup(&self, entry: &Entry, params: &Params) -> Result<Box<dyn Job + '_>, WorkloadError> {
        let policy = policy_of(entry.id)?;
        if let Backend::Graph(_) = self.loaded.backend {
            graph_rule(entry.id, 1, &self.loaded.boundary)?;
        }
        let frac = params.get("budget").unwrap_or(1.0);
        if !(frac > 0.0 && frac <= 1.0) {
            return Err(WorkloadError::Config(format!(
                "entry `{}`: budget {frac} must be a fraction of the prompt in (0, 1] \
                 (the grid runs {BUDGETS:?})",
                entry.id
            )));
        }
        // The shared prefills and dense's figures, and the method's
        // offline calibration, before the clock starts.
        for i in 0..self.items.len() {
            self.prefill(i)?;
            self.reference(i)?;
        }
        let calibration = match (&self.loaded.backend, policy.whole_share()) {
            (Backend::Cpu, Some(share)) => Some(self.loaded.calibration(frac, share)?),
            _ => None,
        };
        Ok(Box::new(LcJob {
            trial: self,
            policy,
            frac,
            calibration,
            results: Vec::new(),
            run_s: 0.0,
        }))
    }
}

/// Index of the largest logit (the first on ties).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `log softmax(logits)[token]`, in f64.
fn log_prob(logits: &[f32], token: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    logits[token as usize] as f64 - max - z.ln()
}

/// Mean log-probability of `answer` after the prompt (whose last logits are
/// `first`), teacher-forced through `dec`.
fn answer_logp(
    dec: &mut Dec,
    first: &[f32],
    answer: &[u32],
    check: &mut dyn FnMut() -> Result<(), WorkloadError>,
) -> Result<f64, WorkloadError> {
    let mut sum = log_prob(first, answer[0]);
    for w in answer.windows(2) {
        sum += log_prob(dec.step(w[0])?, w[1]);
        check()?;
    }
    Ok(sum / answer.len() as f64)
}

/// Mean negative log-likelihood of `cont` after the prompt (last logits
/// `first`), teacher-forced through `dec`.
fn continuation_nll(
    dec: &mut Dec,
    first: &[f32],
    cont: &[u32],
    check: &mut dyn FnMut() -> Result<(), WorkloadError>,
) -> Result<f64, WorkloadError> {
    Ok(-answer_logp(dec, first, cont, check)?)
}

/// What one prompt gave.
#[derive(Debug, Clone)]
struct PromptResult {
    context: usize,
    /// Index into the trial's items.
    item: usize,
    prefill_s: f64,
    shared_prefill: bool,
    decode_s: f64,
    decode_steps: usize,
    kv_bytes: usize,
    dense_bytes: usize,
    reads: Reads,
    /// Needle: the generated text is right. Perplexity: unused.
    correct: bool,
    /// Needle: mean answer log-probability; perplexity: continuation NLL.
    score: f64,
}

struct LcJob<'t> {
    trial: &'t LcTrial<'t>,
    policy: &'static dyn Policy,
    frac: f64,
    /// The method's offline calibration, if it has one.
    calibration: Option<Rc<cluster::Calibration>>,
    results: Vec<PromptResult>,
    run_s: f64,
}

impl LcJob<'_> {
    /// The decoder for prompt `i` with this method's cache after the
    /// prompt, the logits after the prompt, and the prefill's seconds and
    /// whether they were shared (measured once, outside the clock).
    fn start(&self, i: usize) -> Result<(Dec, Vec<f32>, f64, bool), WorkloadError> {
        let t = self.trial;
        let item = &t.items[i];
        let mut plan = t.plan(item, self.frac, t.max_new(i));
        if let Some(c) = &self.calibration {
            plan.whole_heads = &c.whole;
        }
        let model = t.loaded.model.clone();
        // (On the GPU decoder, `setup` admits no entry with its own prefill.)
        if let (Backend::Cpu, Some(cache)) = (&t.loaded.backend, self.policy.empty(&plan)) {
            let t0 = Instant::now();
            let mut dec = Decoder::with_cache(model, cache);
            let logits = dec.prefill(item.prompt())?.to_vec();
            return Ok((
                Dec::Cpu(Box::new(dec)),
                logits,
                t0.elapsed().as_secs_f64(),
                false,
            ));
        }
        let pre = t.prefill(i)?;
        let dec = t.decoder_for(&pre, self.policy, &plan)?;
        Ok((dec, pre.logits.clone(), pre.seconds, true))
    }

    /// Greedy generation after a needle prompt: the tokens and the number
    /// of decoder steps taken.
    fn generate(
        &self,
        dec: &mut Dec,
        first: &[f32],
        stopwatch: &Stopwatch<'_>,
    ) -> Result<(Vec<u32>, usize), WorkloadError> {
        let stop = &self.trial.loaded.stop;
        let mut generated = Vec::new();
        let mut next = argmax(first);
        let mut steps = 0;
        while !stop.contains(&next) {
            generated.push(next);
            if generated.len() == MAX_NEW {
                break;
            }
            next = argmax(dec.step(next)?);
            steps += 1;
            stopwatch.check()?;
        }
        Ok((generated, steps))
    }
}

impl Job for LcJob<'_> {
    fn run(&mut self, stopwatch: &mut Stopwatch<'_>) -> Result<(), WorkloadError> {
        let t = self.trial;
        let per_token = {
            let s = t.loaded.model.kv_shape();
            s.n_layers * s.kv_dim() * 2 * 4
        };
        for i in 0..t.items.len() {
            // Every build from the shared prefill is timed, dense's copy
            // included: methods that keep the whole cache (dense, Quest,
            // chunk selection, DHSA) copy it, and the others copy what they
            // keep, so sharing costs each about what it would save.
            let (mut dec, first, prefill_s, shared) = self.start(i)?;
            stopwatch.check()?;
            let before = dec.reads();
            let t0 = Instant::now();
            let mut r = match &t.items[i] {
                Item::Needle(p) => {
                    let (generated, steps) = self.generate(&mut dec, &first, stopwatch)?;
                    let decode_s = t0.elapsed().as_secs_f64();
                    let mut r = self.snapshot(
                        i, &dec, before, prefill_s, shared, decode_s, steps, per_token,
                    );
                    // Untimed: whether the answer is right, and its
                    // log-probability through this method's cache from the
                    // state after the prompt (a cache that cannot forget
                    // the generated tokens is built again).
                    stopwatch.paused(|| -> Result<(), WorkloadError> {
                        let text = t.loaded.model.tokenizer().decode(&generated)?;
                        r.correct = haystack::correct(&text, &p.values);
                        let mut again = match dec.truncate(p.tokens.len()) {
                            Ok(()) => dec,
                            Err(_) => self.start(i)?.0,
                        };
                        r.score =
                            answer_logp(&mut again, &first, &p.answer_tokens, &mut || Ok(()))?;
                        Ok(())
                    })?;
                    r
                }
                Item::Window(w) => {
                    // Teacher-forced steps are the timed work; each token's
                    // log-probability is evaluation, off the clock.
                    let cont = &w.tokens[w.context..];
                    let mut nll = stopwatch.paused(|| -log_prob(&first, cont[0]));
                    let mut decode_s = 0.0;
                    for pair in cont.windows(2) {
                        let t1 = Instant::now();
                        let logits = dec.step(pair[0])?;
                        decode_s += t1.elapsed().as_secs_f64();
                        nll -= stopwatch.paused(|| log_prob(logits, pair[1]));
                        stopwatch.check()?;
                    }
                    let nll = nll / cont.len() as f64;
                    let mut r = self.snapshot(
                        i,
                        &dec,
                        before,
                        prefill_s,
                        shared,
                        decode_s,
                        cont.len() - 1,
                        per_token,
                    );
                    r.score = nll;
                    r
                }
            };
            r.item = i;
            self.results.push(r);
        }
        self.run_s = stopwatch.elapsed();
        Ok(())
    }

    fn evaluate(self: Box<Self>) -> Result<Outcome, WorkloadError> {
        let t = self.trial;
        let kind = t.loaded.grid.kind;
        let drops: Vec<f64> = self
            .results
            .iter()
            .map(|r| {
                let reference = t.reference(r.item)?;
                Ok(match kind {
                    Kind::Needle => reference - r.score,
                    Kind::Perplexity => (r.score - reference).exp() - 1.0,
                })
            })
            .collect::<Result<_, WorkloadError>>()?;
        let mut rng = ChaCha8Rng::seed_from_u64(t.seed ^ 0x6c6f_6e67);
        let (mean, ub) = bootstrap_upper(&drops, &mut rng);
        let mut o = Outcome::new(ub);
        let shared: f64 = self
            .results
            .iter()
            .filter(|r| r.shared_prefill)
            .map(|r| r.prefill_s)
            .sum::<f64>()
            // An empty float sum is -0.0; records should say 0.
            + 0.0;
        o.measured_time_s = Some(self.run_s + shared);
        o = o
            .figure("drop_mean", mean)
            .figure("prompts", self.results.len() as f64)
            .figure("prefill_s", self.results.iter().map(|r| r.prefill_s).sum())
            .figure("shared_prefill_s", shared);
        let steps: usize = self.results.iter().map(|r| r.decode_steps).sum();
        let decode_s: f64 = self.results.iter().map(|r| r.decode_s).sum();
        o = o
            .figure("decode_s", decode_s)
            .figure("decode_tokens_per_s", steps as f64 / decode_s);
        let mut by_ctx: BTreeMap<usize, (usize, f64)> = BTreeMap::new();
        for r in &self.results {
            let e = by_ctx.entry(r.context).or_default();
            e.0 += r.decode_steps;
            e.1 += r.decode_s;
        }
        for (c, (n, s)) in &by_ctx {
            o = o.figure(&format!("tokens_per_s_c{c}"), *n as f64 / s);
        }
        // Prompts fill their context row to within one haystack entry;
        // what they hold is recorded beside the row's label.
        let mut lens: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for r in &self.results {
            lens.entry(r.context)
                .or_default()
                .push(t.items[r.item].prompt().len());
        }
        for (c, l) in &lens {
            o = o.figure(
                &format!("prompt_tokens_c{c}"),
                l.iter().sum::<usize>() as f64 / l.len() as f64,
            );
        }
        let peak = self.results.iter().map(|r| r.kv_bytes).max().unwrap_or(0);
        let share = self
            .results
            .iter()
            .map(|r| r.kv_bytes as f64 / r.dense_bytes as f64)
            .sum::<f64>()
            / self.results.len() as f64;
        let reads = self.results.iter().fold((0u64, 0u64), |a, r| {
            (a.0 + r.reads.rows_read, a.1 + r.reads.rows_visible)
        });
        o = o
            .figure("kv_bytes_peak", peak as f64)
            .figure("kv_share", share)
            .figure("read_share", reads.0 as f64 / reads.1 as f64);
        match kind {
            Kind::Needle => {
                let acc = |rs: &[&PromptResult]| {
                    rs.iter().filter(|r| r.correct).count() as f64 / rs.len() as f64
                };
                let all: Vec<&PromptResult> = self.results.iter().collect();
                o = o.figure("accuracy", acc(&all)).figure(
                    "answer_logp",
                    self.results.iter().map(|r| r.score).sum::<f64>() / all.len() as f64,
                );
                let mut cells: BTreeMap<(usize, u64), Vec<&PromptResult>> = BTreeMap::new();
                for r in &self.results {
                    let Item::Needle(p) = &t.items[r.item] else {
                        continue;
                    };
                    cells
                        .entry((p.context, (p.depth * 100.0).round() as u64))
                        .or_default()
                        .push(r);
                }
                for ((c, d), rs) in &cells {
                    o = o.figure(&format!("acc_c{c}_d{d}"), acc(rs));
                }
            }
            Kind::Perplexity => {
                let nll =
                    self.results.iter().map(|r| r.score).sum::<f64>() / self.results.len() as f64;
                o = o.figure("ppl", nll.exp());
                let mut by: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
                for r in &self.results {
                    by.entry(r.context).or_default().push(r.score);
                }
                for (c, s) in &by {
                    o = o.figure(
                        &format!("ppl_c{c}"),
                        (s.iter().sum::<f64>() / s.len() as f64).exp(),
                    );
                }
            }
        }
        let attention = match &t.loaded.backend {
            Backend::Graph(g) => {
                format!("; GPU decoder, decode attention: {}", g.decode_attention())
            }
            Backend::Cpu => String::new(),
        };
        let whole = match &self.calibration {
            Some(c) => {
                let heads = t.loaded.model.kv_shape().n_kv_heads;
                let named: Vec<String> = c
                    .whole_slots()
                    .iter()
                    .map(|&s| format!("{}.{} ({:.3})", s / heads, s % heads, c.error[s]))
                    .collect();
                o = o.figure("whole_heads", named.len() as f64);
                format!(
                    "; KV heads kept whole by the calibration, layer.head (relative \
                     squared error of their clustered attention): {}",
                    named.join(", ")
                )
            }
            None => String::new(),
        };
        o.note = Some(format!(
            "model {}; budget {} of each prompt; shared dense prefill time added: \
             {}{attention}{whole}",
            t.loaded.model_name,
            self.frac,
            self.results.iter().any(|r| r.shared_prefill)
        ));
        Ok(o)
    }
}

impl LcJob<'_> {
    #[allow(clippy::too_many_arguments)]
    fn snapshot(
        &self,
        i: usize,
        dec: &Dec,
        before: Reads,
        prefill_s: f64,
        shared_prefill: bool,
        decode_s: f64,
        decode_steps: usize,
        per_token: usize,
    ) -> PromptResult {
        let after = dec.reads();
        PromptResult {
            context: self.trial.items[i].context(),
            item: i,
            prefill_s,
            shared_prefill,
            decode_s,
            decode_steps,
            kv_bytes: dec.kv_bytes(),
            dense_bytes: dec.len() * per_token,
            reads: Reads {
                calls: after.calls - before.calls,
                rows_read: after.rows_read - before.rows_read,
                rows_visible: after.rows_visible - before.rows_visible,
            },
            correct: false,
            score: f64::NAN,
        }
    }
}

/// The mean of `xs` and the upper end of its 95% percentile-bootstrap
/// interval (the 97.5th percentile of resampled means). One value gives a
/// degenerate interval at that value.
fn bootstrap_upper(xs: &[f64], rng: &mut impl Rng) -> (f64, f64) {
    let n = xs.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    let mut means: Vec<f64> = (0..BOOTSTRAP)
        .map(|_| (0..n).map(|_| xs[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let k = ((0.975 * BOOTSTRAP as f64).ceil() as usize).min(BOOTSTRAP) - 1;
    (mean, means[k])
}

#[cfg(test)]
mod tests {
    use super::testutil::{run_entry, CpuLoad};
    use super::*;

    #[test]
    fn every_entry_has_one_policy_and_every_policy_an_entry() {
        for e in SPEC.entries.iter().filter(|e| e.applies_to("needle")) {
            assert_eq!(policy_of(e.id).unwrap().id(), e.id);
        }
        // The decode-step variant has a kernel for each of its own
        // non-peer entries, and refuses the others by name.
        for e in SPEC.entries {
            let kernel = step::step_kind(e.id, 0.1);
            if e.applies_to("decode-step") && !e.cuda_only {
                assert_eq!(kernel.unwrap().name(), e.id);
            } else {
                let err = kernel.unwrap_err().to_string();
                assert!(err.contains(e.id), "{err}");
            }
        }
        for p in POLICIES {
            assert!(SPEC.entry(p.id()).is_some(), "{} has no entry", p.id());
        }
        // One policy per decoder entry, listed in the spec's order.
        let entries: Vec<&str> = SPEC
            .entries
            .iter()
            .filter(|e| e.applies_to("needle"))
            .map(|e| e.id)
            .collect();
        let policies: Vec<&str> = POLICIES.iter().map(|p| p.id()).collect();
        assert_eq!(policies, entries);
        assert!(entries.contains(&"chunk-select-evict"));
        assert!(!SPEC
            .entry("chunk-select-evict")
            .unwrap()
            .applies_to("decode-step"));
        assert!(policy_of("no-such").is_err());
        // The spec says which entries have no GPU-decoder form, so that
        // `--device cuda` plans leave them out; it must agree with what
        // the GPU decoder runs (graph_rule).
        let boundary = Boundaries(Arc::from(vec![false; 4]));
        for e in SPEC.entries {
            for &v in DECODER_VARIANTS {
                if !e.applies_to(v) {
                    continue;
                }
                let on_gpu = graph_rule(e.id, 8, &boundary).is_ok();
                assert_eq!(
                    on_gpu,
                    !e.cpu_only_variants.contains(&v),
                    "{} in {v}: GPU form {on_gpu}",
                    e.id
                );
            }
        }
    }

    /// The percentile bootstrap's upper bound against the normal-theory
    /// one on normal data (n = 400: they agree to about 10% of the
    /// half-width), and a constant sample's degenerate interval.
    #[test]
    fn bootstrap_upper_bound_matches_normal_theory() {
        use rand_distr::{Distribution, Normal};
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let xs: Vec<f64> = (0..400)
            .map(|_| Normal::new(0.3, 1.0).unwrap().sample(&mut rng))
            .collect();
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        let (m, ub) = bootstrap_upper(&xs, &mut rng);
        assert!((m - mean).abs() < 1e-12);
        let half = 1.96 * sd / n.sqrt();
        assert!(
            (ub - (mean + half)).abs() < 0.1 * half,
            "bootstrap {ub}, normal {}",
            mean + half
        );
        assert_eq!(bootstrap_upper(&[0.25; 7], &mut rng), (0.25, 0.25));
        assert!(bootstrap_upper(&[], &mut rng).0.is_nan());
    }

    #[test]
    fn log_prob_and_argmax_against_f64() {
        let l = [0.5f32, 2.0, -1.0, 2.0];
        assert_eq!(argmax(&l), 1);
        let z: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
        for (i, &x) in l.iter().enumerate() {
            assert!((log_prob(&l, i as u32) - (x as f64 - z.ln())).abs() < 1e-12);
        }
    }

    /// The whole job on SmolLM2 (skipped when it is not fetched): dense
    /// paired with itself drops exactly nothing, reads and keeps
    /// everything, and records every figure the report reads.
    #[test]
    fn needle_quick_runs_end_to_end_and_dense_pairs_with_itself() {
        if let Err(e) = assets::path(&assets::SMOLLM2_135M) {
            eprintln!("skipped: {e}");
            return;
        }
        let loaded = CpuLoad::new("needle", Profile::Quick);
        let trial = loaded.trial(7);
        let run = |id: &str, params: &str| run_entry(&*trial, id, params);
        // A method first: it must leave the shared prefill as it found it.
        let (q, q_timed) = run("block-topk", "budget=0.25");
        // The sparse layers read at most a quarter of what is visible; the
        // first two layers read everything (SmolLM2 has 30).
        let share = q.figures["read_share"];
        let most = (2.0 + 28.0 * 0.25) / 30.0;
        assert!(
            share > 0.8 * most && share <= most,
            "block-topk read share {share}"
        );
        assert!(
            q.figures["kv_share"] > 1.0,
            "Quest keeps everything plus bounds"
        );
        assert!(
            (q.measured_time_s.unwrap() - (q_timed + q.figures["shared_prefill_s"])).abs() < 1e-3,
            "time-to-result = timed decode + the shared prefill"
        );
        // kv-cluster calibrates in its untimed set-up and keeps 4% of
        // SmolLM2's 90 KV heads whole (4), which its note names.
        let (c, _) = run("kv-cluster", "budget=0.25");
        assert_eq!(c.figures["whole_heads"], 4.0);
        let note = c.note.as_deref().unwrap_or_default();
        assert!(note.contains("kept whole by the calibration"), "{note}");
        assert!(c.figures["kv_share"] < 0.25 + 4.0 / 90.0 + 0.05);
        // SnapKV keeps a quarter of each prompt (window included) and
        // what decoding appends, and reads only that.
        let (sk, _) = run("snapkv", "budget=0.25");
        assert!(sk.quality.is_finite());
        assert!(sk.figures["kv_share"] < 0.35, "{}", sk.figures["kv_share"]);
        assert!(
            sk.figures["read_share"] < 0.35,
            "{}",
            sk.figures["read_share"]
        );
        let (o, timed) = run("dense", "budget=1");
        assert!(!o.figures.contains_key("whole_heads"));
        assert_eq!(o.quality, 0.0);
        assert_eq!(o.figures["drop_mean"], 0.0);
        assert_eq!(o.figures["kv_share"], 1.0);
        assert_eq!(o.figures["read_share"], 1.0);
        for k in [
            "accuracy",
            "answer_logp",
            "acc_c256_d50",
            "acc_c512_d50",
            "tokens_per_s_c256",
            "tokens_per_s_c512",
            "prompt_tokens_c256",
            "prompt_tokens_c512",
            "prefill_s",
            "kv_bytes_peak",
        ] {
            assert!(o.figures[k].is_finite(), "{k}");
        }
        assert!(o.figures["prompt_tokens_c512"] <= 512.0);
        assert!(o.figures["prompt_tokens_c512"] > 400.0);
        assert!(
            (o.measured_time_s.unwrap() - (timed + o.figures["shared_prefill_s"])).abs() < 1e-3
        );
        let dense = SPEC.entry("dense").unwrap();
        // A budget outside (0, 1] is refused with a message naming it.
        let bad: Params = "budget=0".parse().unwrap();
        let Err(e) = trial.setup(dense, &bad) else {
            panic!("budget 0 accepted")
        };
        assert!(e.to_string().contains("budget"), "{e}");
    }
}

#[cfg(test)]
mod graph_tests {
    use super::testutil::{run_entry, CpuLoad};
    use super::*;

    /// The needle job on the GPU decoder's graph (here on candle's CPU
    /// backend) against the same trial on the CPU decoder: `dense` and
    /// `sink-window` at 25% give the same mean answer log-probability and
    /// paired drop within 0.1 nats per token (measured: 0.028 and 0.048
    /// for the log-probabilities, 0.02 for the drop; the graph rounds its
    /// 8-bit activations in other places, and SmolLM2 here is Q4_1), and
    /// `block-topk` at 25% within 0.2 (measured: 0.098 and 0.126; its page
    /// selection is discontinuous, so a near-tie of two pages' bounds that
    /// rounds the other way swaps what a head reads; with f32 weights the
    /// rule matches the CPU cache to 2.4e-6), and `chunk-select` and
    /// `chunk-select-vote` at 25% within 0.2 for the same reason (measured
    /// 2026-11-29: 0.008 and 0.012, 0.004 and 0.0002). All give the same
    /// read share (exactly, as measured; a near-tie of two chunks of
    /// different lengths could move ChunkLLM's by a few rows, hence 1e-3
    /// there); on the graph, sink-window holds between the CPU cache's
    /// bytes and a window more (it evicts in steps), and block-topk and
    /// ChunkLLM's forms the CPU cache's bytes (the cache and its metadata)
    /// within 1%. The exact equivalence of the read rules is
    /// `sink_window_reads_match_the_cpu_cache`,
    /// `top_pages_reads_match_the_cpu_cache` and
    /// `chunk_select_reads_match_the_cpu_cache` in
    /// `workloads/tests/decoder.rs` (f32, 1.3e-6, 2.4e-6 and 2.9e-6). Dense pairs with itself exactly on either
    /// backend. An entry the graph does not run is refused by name.
    #[test]
    fn needle_on_the_graph_matches_the_cpu_decoder() {
        if let Err(e) = assets::path(&assets::SMOLLM2_135M) {
            eprintln!("skipped: {e}");
            return;
        }
        let cpu = CpuLoad::new("needle", Profile::Quick);
        let graph = CpuLoad::graph("needle", Profile::Quick);
        let (ct, gt) = (cpu.trial(7), graph.trial(7));
        for (id, params) in [
            ("dense", "budget=1"),
            ("sink-window", "budget=0.25"),
            ("block-topk", "budget=0.25"),
            ("chunk-select", "budget=0.25"),
            ("chunk-select-vote", "budget=0.25"),
        ] {
            let (c, _) = run_entry(&*ct, id, params);
            let (g, _) = run_entry(&*gt, id, params);
            let (a, b) = (c.figures["answer_logp"], g.figures["answer_logp"]);
            eprintln!(
                "{id}: answer log-prob CPU {a:.4} graph {b:.4}; drop {:.4} / {:.4}; read share {:.4} / {:.4}",
                c.figures["drop_mean"],
                g.figures["drop_mean"],
                c.figures["read_share"],
                g.figures["read_share"]
            );
            let tol = if matches!(id, "dense" | "sink-window") {
                0.1
            } else {
                0.2
            };
            assert!((a - b).abs() < tol, "{id}: {a} vs {b}");
            assert!(
                (c.figures["drop_mean"] - g.figures["drop_mean"]).abs() < tol,
                "{id}: paired drops differ"
            );
            let share_tol = if id.starts_with("chunk-select") {
                1e-3
            } else {
                1e-9
            };
            assert!(
                (c.figures["read_share"] - g.figures["read_share"]).abs() < share_tol,
                "{id}: read shares differ"
            );
            let (ck, gk) = (c.figures["kv_share"], g.figures["kv_share"]);
            match id {
                "dense" => {
                    assert_eq!(g.figures["drop_mean"], 0.0);
                    assert_eq!(gk, 1.0);
                }
                "sink-window" => {
                    assert!(ck < 0.3, "the CPU cache keeps its budget");
                    assert!(
                        gk >= ck - 1e-9 && gk <= 2.0 * ck,
                        "the graph evicts to between the budget and a window more: {gk} ({ck})"
                    );
                }
                _ => assert!(
                    gk > 1.0 && (gk - ck).abs() < 0.01,
                    "{id}: bytes with metadata: CPU {ck}, graph {gk}"
                ),
            }
        }
        let entry = SPEC.entry("kv-cluster").unwrap();
        let Err(e) = gt.setup(entry, &"budget=0.25".parse().unwrap()) else {
            panic!("kv-cluster accepted on the graph")
        };
        assert!(
            e.to_string().contains("runs only on the CPU decoder"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod step_tests {
    use super::testutil::{run_entry, CpuLoad};
    use super::*;

    /// The decode-step variant on the CPU at its smallest context: every
    /// kernel entry within tolerance, timed, and with its byte figures; a
    /// decoder-only entry refused by name.
    #[test]
    fn decode_step_runs_on_the_cpu_for_every_kernel_entry() {
        let loaded = CpuLoad::new("decode-step", Profile::Full);
        let trial = loaded.trial(3);
        for (id, params) in [
            ("dense", "context=4096,budget=1"),
            ("block-topk", "context=4096,budget=0.1"),
            ("kv-cluster", "context=4096,budget=0.25"),
            ("sink-window", "context=4096,budget=0.5"),
        ] {
            let (o, _) = run_entry(&*trial, id, params);
            assert!(o.quality < 1.0, "{id}: {}", o.quality);
            assert!(o.measured_time_s.unwrap() > 0.0);
            assert_eq!(o.figures["context"], 4096.0);
            let share = o.figures["read_share"];
            let want = if id == "dense" {
                1.0
            } else {
                params.rsplit('=').next().unwrap().parse::<f64>().unwrap()
            };
            assert!((share - want).abs() < 0.01, "{id}: read share {share}");
        }
        let dhsa = SPEC.entry("dhsa").unwrap();
        let Err(e) = trial.setup(dhsa, &"context=4096,budget=0.1".parse().unwrap()) else {
            panic!("dhsa accepted for decode-step")
        };
        assert!(e.to_string().contains("dhsa"), "{e}");
    }
}
