//! The decode-attention step of `long-context` as a kernel problem: one
//! decoding step of one attention layer at real model shapes, over a dense,
//! a block-selected, a clustered or a windowed KV cache. This module is the
//! CPU side, always compiled: the problem definition, seeded data, a float64
//! reference, the multi-threaded CPU step, and the byte accounting of the
//! memory-traffic floor. The CUDA kernels that time the same step on a GPU
//! live in `cuda.rs` (feature `cuda`) and are checked against this module.
//!
//! What is computed. A Llama-3-8B-like layer ([`Shape::llama3_8b`]: 32
//! query heads, 8 KV heads, head dimension 128, batch 1, bf16 cache) and one
//! new query token. Query head `h` reads KV head `h / 4` (grouped-query
//! attention, the grouping of `repeat_kv` and of PyTorch's `enable_gqa`).
//! Every head computes `softmax(q K^T / sqrt(d) + b) V` over the rows that
//! its step kind selects ([`StepKind`]):
//!
//! * `Dense`: all `n` rows. Split-K over the context is flash-decoding
//!   (Dao et al., "Flash-Decoding for long-context inference", 2023).
//! * `BlockTopk`: Quest (Tang et al., arXiv 2406.10774). The cache is cut
//!   into pages of 16 rows; per page and KV head the metadata is the
//!   channel-wise minimum and maximum of the keys. A page's score for a
//!   query group is `sum_{h in group} sum_i max(q_hi M_i, q_hi m_i)`, the
//!   largest `q . k` any key inside the page's bounding box can reach,
//!   summed over the four query heads that share the KV head (the selection
//!   is per KV head, so that a page read serves the whole group). The step
//!   reads the metadata, keeps the `ceil(frac * n_pages)` best pages (ties
//!   to the lower page index) and attends over them.
//! * `Cluster`: a compressed cache in the manner of Chelsea (arXiv
//!   2506.11418): `ceil(frac * n)` centroid rows per KV head, each with an
//!   additive logit bias `ln(count)` for the keys it stands for. Clustering
//!   happens off the decode step (Chelsea clusters during prefill), so the
//!   generator builds centroids and counts ([`Step::new`]); the step is
//!   attention over the centroids with the bias. Every KV head is
//!   clustered: the 4% of heads the decoder's `kv-cluster` keeps whole
//!   would each read their head in full, as `Dense` does.
//! * `Window`: StreamingLLM (Xiao et al., arXiv 2309.17453): the first 4 rows
//!   (attention sinks) and the last `ceil(frac * n) - 4` rows.
//!
//! What a step must read, and so the floor. [`Step::bytes`] counts the
//! bytes no implementation of the step can avoid reading or writing once:
//! the K and V rows it attends over (bf16), the page metadata for
//! block-topk, the bias for the clustered cache, the query (bf16) and the
//! output (f32). The memory-traffic floor of a step is that count divided by
//! the device's measured copy bandwidth; `cuda.rs` times against it.
//! Scratch that stays on chip or in L2 (page scores, the selected page list,
//! split-K partials) is not counted: a step could avoid it.
//!
//! The data ([`DenseCache::generate`]) is seeded and spread like a real
//! layer's: keys with per-channel offsets and a few large outlier channels,
//! query heads of a group correlated, a strong first row (an attention
//! sink), a strong last row, and about one key in 1,024 planted to align
//! with its group's queries. Planted keys hold a large share of the
//! attention mass, so a page selection is neither trivial (all pages alike)
//! nor degenerate (one page holds everything): see the tests.
//!
//! What a CPU run times is [`Step::run_cpu`]: the selection (scoring the
//! pages, top-k) and the attention, on all cores, in f32 arithmetic from the
//! bf16 cache. [`Step::reference_f64`] is the same mathematics in float64
//! from the same bf16 data, for a given selection; results are compared with
//! [`max_rel_err`] against [`TOLERANCE`].

use std::ops::Range;
use std::sync::Arc;

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use crate::seed::derive;
use crate::WorkloadError;

/// Rows per Quest page.
pub const PAGE: usize = 16;
/// Attention-sink rows of the windowed cache (StreamingLLM keeps 4).
pub const SINKS: usize = 4;

/// Tolerance on [`max_rel_err`] of an f32 step (CPU or GPU) against the
/// float64 reference over the same selection, both from the same bf16 data.
///
/// Justification (unit roundoff `u = 2^-24`, about `6e-8`). A logit is a
/// 128-term dot product: its error is at most `128 u sum_i |q_i k_i| / sqrt(d)`,
/// about `5e-5` for these data (`sum |q_i k_i| / sqrt(d)` stays under 10),
/// and the output moves by about as much, relatively. The weighted sums of
/// values run over at most about 1,400 terms in one f32 accumulator before
/// blocks are combined (a GPU thread's share of a split, a CPU task's
/// chunk), bounded by `1,400 u`, about `8e-5`, of `sum p |v|`, which is up
/// to 5 times `max |out|` here (values are unit normals, outputs averages).
/// `exp2`'s approximation adds 2 ulp. The worst case is then about `5e-4`;
/// errors measured are near `1e-6`; the bound sets the tolerance. A step
/// that loses one split of 49, or one range, errs by far more (tests).
pub const TOLERANCE: f64 = 1e-3;

/// Relative error bound of an f32 Quest page score: a sum of `group * d`
/// (512) products, each rounded once, in any order: `512 u` is `3.1e-5` of
/// `sum |q_hi| max(|M_i|, |m_i|)`; the margin covers the products' own
/// rounding. The CUDA kernel's form (the group's positive and negative
/// query parts summed first, then `2 d` fused products: see
/// decode_attn.cu) rounds fewer times and stays within it.
const SCORE_REL: f64 = 4e-5;

/// One CPU task's softmax state for one query head: running max, sum of
/// weights, weighted sum of values.
type Partial = (f32, f32, Vec<f32>);

/// Rows of one CPU task (and of one generator task).
const CPU_CHUNK: usize = 2048;

fn config(msg: String) -> WorkloadError {
    WorkloadError::Config(msg)
}

/// `ceil(frac * count)` in f64 arithmetic, at least 1 and at most `count`
/// (the peer script computes the same with Python floats).
pub fn budget(frac: f64, count: usize) -> usize {
    ((frac * count as f64).ceil() as usize).clamp(1, count.max(1))
}

/// The attention layer's shape and the context length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Context length: rows of the dense cache per KV head.
    pub n: usize,
}

impl Shape {
    /// A Llama-3-8B layer: 32 query heads, 8 KV heads, head dimension 128.
    pub const fn llama3_8b(n: usize) -> Shape {
        Shape {
            q_heads: 32,
            kv_heads: 8,
            head_dim: 128,
            n,
        }
    }

    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }

    pub fn validate(&self) -> Result<(), WorkloadError> {
        if self.kv_heads == 0 || self.q_heads == 0 || !self.q_heads.is_multiple_of(self.kv_heads) {
            return Err(config(format!(
                "{} query heads cannot be grouped over {} KV heads: the query heads must be a positive multiple of the KV heads",
                self.q_heads, self.kv_heads
            )));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(8) {
            return Err(config(format!(
                "head dimension {} must be a positive multiple of 8 (16-byte rows of bf16)",
                self.head_dim
            )));
        }
        if self.n == 0 {
            return Err(config("the context length must be at least 1".into()));
        }
        Ok(())
    }
}

/// Which cache a step reads. Budgets are fractions of the context.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepKind {
    Dense,
    /// Quest page selection: pages of `page` rows, `ceil(frac * pages)` kept.
    BlockTopk {
        page: usize,
        frac: f64,
    },
    /// `ceil(frac * n)` centroid rows with a `ln(count)` bias.
    Cluster {
        frac: f64,
    },
    /// `sinks` first rows plus the last `ceil(frac * n) - sinks` rows.
    Window {
        sinks: usize,
        frac: f64,
    },
}

impl StepKind {
    pub fn block_topk(frac: f64) -> Self {
        StepKind::BlockTopk { page: PAGE, frac }
    }

    pub fn window(frac: f64) -> Self {
        StepKind::Window { sinks: SINKS, frac }
    }

    pub fn name(&self) -> &'static str {
        match self {
            StepKind::Dense => "dense",
            StepKind::BlockTopk { .. } => "block-topk",
            StepKind::Cluster { .. } => "kv-cluster",
            StepKind::Window { .. } => "sink-window",
        }
    }

    /// The budget as a fraction of the context (1 for dense).
    pub fn frac(&self) -> f64 {
        match *self {
            StepKind::Dense => 1.0,
            StepKind::BlockTopk { frac, .. }
            | StepKind::Cluster { frac }
            | StepKind::Window { frac, .. } => frac,
        }
    }

    fn validate(&self, shape: &Shape) -> Result<(), WorkloadError> {
        let frac = self.frac();
        if !(frac > 0.0 && frac <= 1.0) {
            return Err(config(format!(
                "{}: budget fraction {frac} must lie in (0, 1]",
                self.name()
            )));
        }
        match *self {
            StepKind::BlockTopk { page, .. } => {
                if page == 0 || !shape.n.is_multiple_of(page) {
                    return Err(config(format!(
                        "block-topk: context {} is not a whole number of {page}-row pages; use a multiple of {page}",
                        shape.n
                    )));
                }
            }
            StepKind::Window { sinks, frac } => {
                let b = budget(frac, shape.n);
                if b <= sinks {
                    return Err(config(format!(
                        "sink-window: a budget of {b} rows leaves no window after {sinks} sinks; raise the fraction or the context"
                    )));
                }
            }
            StepKind::Dense | StepKind::Cluster { .. } => {}
        }
        Ok(())
    }
}

/// Query and dense cache of one layer, bf16. Layouts: `q` is
/// `[q_heads][d]`; `k` and `v` are `[kv_heads][n][d]`.
pub struct DenseCache {
    pub shape: Shape,
    pub q: Vec<bf16>,
    pub k: Vec<bf16>,
    pub v: Vec<bf16>,
    /// Rows planted to align with their group's queries, per KV head
    /// (always including row 0 and row `n - 1`).
    pub planted: Vec<Vec<usize>>,
}

fn normal(rng: &mut ChaCha8Rng) -> f32 {
    StandardNormal.sample(rng)
}

impl DenseCache {
    /// Seeded data (see the module docs). Deterministic for a given
    /// `(shape, seed)` whatever the number of threads.
    pub fn generate(shape: Shape, seed: u64) -> Result<Self, WorkloadError> {
        shape.validate()?;
        let (n, d, kvh, g) = (shape.n, shape.head_dim, shape.kv_heads, shape.group());
        let sqrt_d = (d as f32).sqrt();
        // Query heads of a group share a base direction (they read the same
        // keys), plus their own part.
        let mut rng = ChaCha8Rng::seed_from_u64(derive(seed, &["longctx-kernel", "q"]));
        let mut base = vec![0f32; kvh * d];
        base.iter_mut().for_each(|x| *x = normal(&mut rng));
        let mut q = vec![bf16::ZERO; shape.q_heads * d];
        for (h, row) in q.chunks_mut(d).enumerate() {
            let b = &base[(h / g) * d..(h / g + 1) * d];
            for (x, &bc) in row.iter_mut().zip(b) {
                *x = bf16::from_f32(bc + 0.5 * normal(&mut rng));
            }
        }
        // Per KV head: channel offsets, and a few outlier channels with a
        // large offset and a larger spread (the "massive" key channels of
        // real models); elsewhere a spread of 0.5 (keys of real layers are
        // far from isotropic: most of their energy is in the offsets).
        let mut mu = vec![0f32; kvh * d];
        let mut sigma = vec![0.5f32; kvh * d];
        for h in 0..kvh {
            let mut rng = ChaCha8Rng::seed_from_u64(derive(
                seed,
                &["longctx-kernel", "chan", &h.to_string()],
            ));
            for c in 0..d {
                mu[h * d + c] = 0.3 * normal(&mut rng);
            }
            for _ in 0..4.min(d) {
                let c = rng.random_range(0..d);
                mu[h * d + c] = if rng.random::<bool>() { 4.0 } else { -4.0 };
                sigma[h * d + c] = 1.0;
            }
        }
        let mut k = vec![bf16::ZERO; kvh * n * d];
        let mut v = vec![bf16::ZERO; kvh * n * d];
        k.par_chunks_mut(n * d)
            .zip(v.par_chunks_mut(n * d))
            .enumerate()
            .for_each(|(h, (kh, vh))| {
                kh.par_chunks_mut(CPU_CHUNK * d)
                    .zip(vh.par_chunks_mut(CPU_CHUNK * d))
                    .enumerate()
                    .for_each(|(c, (kc, vc))| {
                        let mut rng = ChaCha8Rng::seed_from_u64(derive(
                            seed,
                            &["longctx-kernel", "kv", &h.to_string(), &c.to_string()],
                        ));
                        let (m, s) = (&mu[h * d..(h + 1) * d], &sigma[h * d..(h + 1) * d]);
                        for (kr, vr) in kc.chunks_mut(d).zip(vc.chunks_mut(d)) {
                            for i in 0..d {
                                kr[i] = bf16::from_f32(m[i] + s[i] * normal(&mut rng));
                                vr[i] = bf16::from_f32(normal(&mut rng));
                            }
                        }
                    });
            });
        // Planted keys: k = mu + 0.5 sigma z + (L sqrt(d) / |b|^2) b, whose
        // logit against the group's queries is about L.
        let mut planted = Vec::with_capacity(kvh);
        for h in 0..kvh {
            let mut rng = ChaCha8Rng::seed_from_u64(derive(
                seed,
                &["longctx-kernel", "plant", &h.to_string()],
            ));
            let b = &base[h * d..(h + 1) * d];
            let b2: f32 = b.iter().map(|x| x * x).sum();
            let mut rows: Vec<(usize, f32)> = vec![(0, 8.0), (n - 1, 6.0)];
            for _ in 0..(n / 1024).max(2) {
                rows.push((rng.random_range(0..n), rng.random_range(4.0..9.0)));
            }
            for &(r, strength) in &rows {
                let alpha = strength * sqrt_d / b2;
                let kr = &mut k[(h * n + r) * d..(h * n + r + 1) * d];
                for i in 0..d {
                    let x =
                        mu[h * d + i] + 0.3 * sigma[h * d + i] * normal(&mut rng) + alpha * b[i];
                    kr[i] = bf16::from_f32(x);
                }
            }
            let mut rows: Vec<usize> = rows.into_iter().map(|(r, _)| r).collect();
            rows.sort_unstable();
            rows.dedup();
            planted.push(rows);
        }
        Ok(DenseCache {
            shape,
            q,
            k,
            v,
            planted,
        })
    }
}

/// The clustered cache: `rows` centroids per KV head. Layouts `[kv_heads][rows][d]`
/// and `[kv_heads][rows]`.
pub struct Clustered {
    pub rows: usize,
    pub k: Vec<bf16>,
    pub v: Vec<bf16>,
    pub counts: Vec<u32>,
    /// `ln(count)` per centroid.
    pub bias: Vec<f32>,
}

impl Clustered {
    /// Cuts each head's context into `rows` contiguous segments at random
    /// points and keeps each segment's mean key and value (rounded to bf16)
    /// and its size: Chelsea clusters within chunks of the sequence; any
    /// clustering gives a step of the same shape and cost.
    fn build(cache: &DenseCache, rows: usize, seed: u64) -> Self {
        let Shape { n, head_dim: d, .. } = cache.shape;
        let kvh = cache.shape.kv_heads;
        let per_head: Vec<(Vec<bf16>, Vec<bf16>, Vec<u32>)> = (0..kvh)
            .into_par_iter()
            .map(|h| {
                let mut rng = ChaCha8Rng::seed_from_u64(derive(
                    seed,
                    &["longctx-kernel", "cluster", &h.to_string()],
                ));
                let mut cuts: Vec<usize> = rand::seq::index::sample(&mut rng, n - 1, rows - 1)
                    .into_iter()
                    .map(|c| c + 1)
                    .collect();
                cuts.sort_unstable();
                cuts.insert(0, 0);
                cuts.push(n);
                let mut kc = Vec::with_capacity(rows * d);
                let mut vc = Vec::with_capacity(rows * d);
                let mut counts = Vec::with_capacity(rows);
                let mut sk = vec![0f64; d];
                let mut sv = vec![0f64; d];
                for w in cuts.windows(2) {
                    sk.iter_mut().for_each(|x| *x = 0.0);
                    sv.iter_mut().for_each(|x| *x = 0.0);
                    for r in w[0]..w[1] {
                        let at = (h * n + r) * d;
                        for i in 0..d {
                            sk[i] += cache.k[at + i].to_f64();
                            sv[i] += cache.v[at + i].to_f64();
                        }
                    }
                    let c = (w[1] - w[0]) as f64;
                    kc.extend(sk.iter().map(|x| bf16::from_f64(x / c)));
                    vc.extend(sv.iter().map(|x| bf16::from_f64(x / c)));
                    counts.push((w[1] - w[0]) as u32);
                }
                (kc, vc, counts)
            })
            .collect();
        let mut out = Clustered {
            rows,
            k: Vec::with_capacity(kvh * rows * d),
            v: Vec::with_capacity(kvh * rows * d),
            counts: Vec::with_capacity(kvh * rows),
            bias: Vec::new(),
        };
        for (kc, vc, counts) in per_head {
            out.k.extend(kc);
            out.v.extend(vc);
            out.counts.extend(counts);
        }
        out.bias = out.counts.iter().map(|&c| (c as f32).ln()).collect();
        out
    }
}

/// The rows a step attends over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// The same row ranges for every KV head (dense, window, cluster).
    Ranges(Vec<Range<usize>>),
    /// Selected page indices per KV head, ascending (block-topk).
    Pages(Vec<Vec<u32>>),
}

impl Selection {
    /// Rows of KV head `h`, in order.
    pub fn rows(&self, h: usize, page: usize) -> Vec<u32> {
        match self {
            Selection::Ranges(rs) => rs
                .iter()
                .flat_map(|r| r.clone())
                .map(|r| r as u32)
                .collect(),
            Selection::Pages(ps) => ps[h]
                .iter()
                .flat_map(|&p| (p as usize * page..(p as usize + 1) * page).map(|r| r as u32))
                .collect(),
        }
    }
}

/// Bytes a step must move (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepBytes {
    pub kv: u64,
    pub meta: u64,
    pub bias: u64,
    pub q: u64,
    pub out: u64,
}

impl StepBytes {
    pub fn total(&self) -> u64 {
        self.kv + self.meta + self.bias + self.q + self.out
    }
}

/// What a step computed: the output `[q_heads][d]` and the rows it read.
pub struct StepOutput {
    pub out: Vec<f32>,
    pub selection: Selection,
}

/// One decode step of one kind, with the data it reads.
pub struct Step {
    pub kind: StepKind,
    pub cache: Arc<DenseCache>,
    /// The centroid cache (cluster only).
    pub clustered: Option<Clustered>,
    /// Quest metadata `[kv_heads][pages][2][d]`, minimum then maximum
    /// (block-topk only).
    pub meta: Vec<bf16>,
}

impl Step {
    /// Builds what the kind needs beside the dense cache (untimed set-up:
    /// metadata and centroids are maintained off the decode step).
    pub fn new(cache: Arc<DenseCache>, kind: StepKind, seed: u64) -> Result<Self, WorkloadError> {
        kind.validate(&cache.shape)?;
        let shape = cache.shape;
        let (mut clustered, mut meta) = (None, Vec::new());
        match kind {
            StepKind::Cluster { frac } => {
                clustered = Some(Clustered::build(&cache, budget(frac, shape.n), seed));
            }
            StepKind::BlockTopk { page, .. } => meta = quest_metadata(&cache, page),
            StepKind::Dense | StepKind::Window { .. } => {}
        }
        Ok(Step {
            kind,
            cache,
            clustered,
            meta,
        })
    }

    /// Generates the dense cache and the step in one go.
    pub fn generate(shape: Shape, kind: StepKind, seed: u64) -> Result<Self, WorkloadError> {
        Step::new(Arc::new(DenseCache::generate(shape, seed)?), kind, seed)
    }

    pub fn shape(&self) -> Shape {
        self.cache.shape
    }

    /// The K and V the step attends over and their rows per KV head.
    pub fn kv(&self) -> (&[bf16], &[bf16], usize) {
        match &self.clustered {
            Some(c) => (&c.k, &c.v, c.rows),
            None => (&self.cache.k, &self.cache.v, self.cache.shape.n),
        }
    }

    /// The per-row logit bias (cluster only), `[kv_heads][rows]`.
    pub fn bias(&self) -> Option<&[f32]> {
        self.clustered.as_ref().map(|c| &c.bias[..])
    }

    pub fn page(&self) -> usize {
        match self.kind {
            StepKind::BlockTopk { page, .. } => page,
            _ => PAGE,
        }
    }

    /// Pages of the context (block-topk; 0 otherwise).
    pub fn n_pages(&self) -> usize {
        match self.kind {
            StepKind::BlockTopk { page, .. } => self.shape().n / page,
            _ => 0,
        }
    }

    /// Pages kept per KV head (block-topk; 0 otherwise).
    pub fn pages_kept(&self) -> usize {
        match self.kind {
            StepKind::BlockTopk { frac, .. } => budget(frac, self.n_pages()),
            _ => 0,
        }
    }

    /// Rows read per KV head.
    pub fn rows_read(&self) -> usize {
        let n = self.shape().n;
        match self.kind {
            StepKind::Dense => n,
            StepKind::BlockTopk { page, .. } => self.pages_kept() * page,
            StepKind::Cluster { frac } | StepKind::Window { frac, .. } => budget(frac, n),
        }
    }

    /// The rows of the kinds whose rows do not depend on the query.
    pub fn fixed_ranges(&self) -> Option<Vec<Range<usize>>> {
        let n = self.shape().n;
        match self.kind {
            StepKind::Dense => Some(std::iter::once(0..n).collect()),
            StepKind::Cluster { frac } => Some(std::iter::once(0..budget(frac, n)).collect()),
            StepKind::Window { sinks, frac } => {
                let w = budget(frac, n) - sinks;
                Some(vec![0..sinks, n - w..n])
            }
            StepKind::BlockTopk { .. } => None,
        }
    }

    pub fn bytes(&self) -> StepBytes {
        let s = self.shape();
        let (kvh, d) = (s.kv_heads as u64, s.head_dim as u64);
        StepBytes {
            kv: kvh * self.rows_read() as u64 * 2 * d * 2,
            meta: kvh * self.n_pages() as u64 * 2 * d * 2,
            bias: self.bias().map_or(0, |b| b.len() as u64 * 4),
            q: s.q_heads as u64 * d * 2,
            out: s.q_heads as u64 * d * 4,
        }
    }

    /// Quest page scores `[kv_heads][pages]` in float64.
    pub fn page_scores_f64(&self) -> Vec<f64> {
        self.page_scores(|q, lo, hi| {
            q.iter()
                .zip(lo.iter().zip(hi))
                .map(|(&q, (&m, &mx))| {
                    let q = q as f64;
                    (q * m.to_f64()).max(q * mx.to_f64())
                })
                .sum::<f64>()
        })
    }

    /// Quest page scores in f32, as the CPU step computes them.
    fn page_scores_f32(&self) -> Vec<f64> {
        self.page_scores(|q, lo, hi| {
            q.iter()
                .zip(lo.iter().zip(hi))
                .map(|(&q, (&m, &mx))| (q * m.to_f32()).max(q * mx.to_f32()))
                .sum::<f32>() as f64
        })
    }

    /// `score(q_h, min, max)` summed over each KV head's query group.
    fn page_scores(&self, score: impl Fn(&[f32], &[bf16], &[bf16]) -> f64 + Sync) -> Vec<f64> {
        let s = self.shape();
        let (d, g, np) = (s.head_dim, s.group(), self.n_pages());
        let q: Vec<f32> = self.cache.q.iter().map(|x| x.to_f32()).collect();
        let mut out = vec![0f64; s.kv_heads * np];
        out.par_chunks_mut(np.max(1))
            .enumerate()
            .for_each(|(h, row)| {
                for (p, o) in row.iter_mut().enumerate() {
                    let at = (h * np + p) * 2 * d;
                    let (lo, hi) = (&self.meta[at..at + d], &self.meta[at + d..at + 2 * d]);
                    *o = (0..g)
                        .map(|j| score(&q[(h * g + j) * d..(h * g + j + 1) * d], lo, hi))
                        .sum();
                }
            });
        out
    }

    /// The selection a float64 step makes.
    pub fn selection_f64(&self) -> Selection {
        match self.fixed_ranges() {
            Some(r) => Selection::Ranges(r),
            None => Selection::Pages(top_pages(
                &self.page_scores_f64(),
                self.n_pages(),
                self.pages_kept(),
            )),
        }
    }

    /// Checks that `sel` is a valid selection for this step. For
    /// block-topk: exactly `pages_kept` distinct ascending pages per KV head,
    /// each page on which it differs from the float64 top-k within the f32
    /// rounding bound of the k-th largest score (a near tie). Returns the
    /// number of such near-tie swaps.
    pub fn check_selection(&self, sel: &Selection) -> Result<usize, String> {
        let pages = match (sel, self.fixed_ranges()) {
            (Selection::Ranges(r), Some(f)) if *r == f => return Ok(0),
            (Selection::Pages(p), None) => p,
            _ => {
                return Err(format!(
                    "{}: not the selection of this kind",
                    self.kind.name()
                ))
            }
        };
        let s = self.shape();
        let (np, k, d, g) = (self.n_pages(), self.pages_kept(), s.head_dim, s.group());
        if pages.len() != s.kv_heads {
            return Err(format!(
                "{} KV heads selected, expected {}",
                pages.len(),
                s.kv_heads
            ));
        }
        let scores = self.page_scores_f64();
        let q: Vec<f64> = self.cache.q.iter().map(|x| x.to_f64()).collect();
        let mut swaps = 0;
        for (h, sel) in pages.iter().enumerate() {
            if sel.len() != k
                || sel.windows(2).any(|w| w[0] >= w[1])
                || sel.iter().any(|&p| p as usize >= np)
            {
                return Err(format!(
                    "KV head {h}: {} pages, expected {k} distinct ascending pages below {np}",
                    sel.len()
                ));
            }
            let sc = &scores[h * np..(h + 1) * np];
            let want = &top_pages(sc, np, k)[0];
            let mut sorted: Vec<f64> = sc.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kth = sorted[k - 1];
            // The largest score magnitude bound over the head's pages.
            let bound = (0..np)
                .map(|p| {
                    let at = (h * np + p) * 2 * d;
                    (0..g * d)
                        .map(|x| {
                            let i = x % d;
                            let qh = q[(h * g + x / d) * d + i].abs();
                            qh * self.meta[at + i]
                                .to_f64()
                                .abs()
                                .max(self.meta[at + d + i].to_f64().abs())
                        })
                        .sum::<f64>()
                })
                .fold(0f64, f64::max)
                * SCORE_REL;
            let mut is_want = vec![false; np];
            want.iter().for_each(|&p| is_want[p as usize] = true);
            for &p in sel {
                if !is_want[p as usize] {
                    let gap = kth - sc[p as usize];
                    if gap > 2.0 * bound {
                        return Err(format!(
                            "KV head {h}: page {p} selected with score {:.6} below the k-th best {kth:.6} by {gap:.3e} (rounding allows {:.3e})",
                            sc[p as usize],
                            2.0 * bound
                        ));
                    }
                    swaps += 1;
                }
            }
        }
        Ok(swaps)
    }

    /// The step in float64 over `sel`'s rows, from the bf16 data.
    pub fn reference_f64(&self, sel: &Selection) -> Vec<f64> {
        let s = self.shape();
        let (d, g) = (s.head_dim, s.group());
        let (k, v, rows) = self.kv();
        let bias = self.bias();
        let scale = 1.0 / (d as f64).sqrt();
        let heads: Vec<Vec<u32>> = (0..s.kv_heads).map(|h| sel.rows(h, self.page())).collect();
        let mut out = vec![0f64; s.q_heads * d];
        out.par_chunks_mut(d).enumerate().for_each(|(qh, o)| {
            let h = qh / g;
            let q: Vec<f64> = self.cache.q[qh * d..(qh + 1) * d]
                .iter()
                .map(|x| x.to_f64())
                .collect();
            let logits: Vec<f64> = heads[h]
                .iter()
                .map(|&r| {
                    let at = (h * rows + r as usize) * d;
                    let dot: f64 = (0..d).map(|i| q[i] * k[at + i].to_f64()).sum();
                    dot * scale + bias.map_or(0.0, |b| b[h * rows + r as usize] as f64)
                })
                .collect();
            let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mut total = 0.0;
            for (&r, &x) in heads[h].iter().zip(&logits) {
                let w = (x - m).exp();
                total += w;
                let at = (h * rows + r as usize) * d;
                for i in 0..d {
                    o[i] += w * v[at + i].to_f64();
                }
            }
            o.iter_mut().for_each(|x| *x /= total);
        });
        out
    }

    /// The step on the CPU in f32 arithmetic, on all cores: the selection
    /// (block-topk: page scores and top-k) and split-K attention.
    pub fn run_cpu(&self) -> StepOutput {
        let selection = match self.fixed_ranges() {
            Some(r) => Selection::Ranges(r),
            None => Selection::Pages(top_pages(
                &self.page_scores_f32(),
                self.n_pages(),
                self.pages_kept(),
            )),
        };
        let out = self.attend_f32(&selection);
        StepOutput { out, selection }
    }

    fn attend_f32(&self, sel: &Selection) -> Vec<f32> {
        let s = self.shape();
        let (d, g) = (s.head_dim, s.group());
        let (k, v, rows) = self.kv();
        let bias = self.bias();
        let scale = 1.0 / (d as f32).sqrt();
        let heads: Vec<Vec<u32>> = (0..s.kv_heads).map(|h| sel.rows(h, self.page())).collect();
        let tasks: Vec<(usize, usize)> = heads
            .iter()
            .enumerate()
            .flat_map(|(h, r)| (0..r.len().div_ceil(CPU_CHUNK)).map(move |c| (h, c)))
            .collect();
        // Each task: per query head of the group (max, sum, acc[d]).
        let partials: Vec<(usize, Vec<Partial>)> = tasks
            .par_iter()
            .map(|&(h, c)| {
                let chunk = &heads[h][c * CPU_CHUNK..((c + 1) * CPU_CHUNK).min(heads[h].len())];
                let q: Vec<Vec<f32>> = (0..g)
                    .map(|j| {
                        let at = (h * g + j) * d;
                        self.cache.q[at..at + d]
                            .iter()
                            .map(|x| x.to_f32() * scale)
                            .collect()
                    })
                    .collect();
                let mut row = vec![0f32; d];
                let mut logits = vec![vec![0f32; chunk.len()]; g];
                for (t, &r) in chunk.iter().enumerate() {
                    let at = (h * rows + r as usize) * d;
                    row.iter_mut()
                        .zip(&k[at..at + d])
                        .for_each(|(x, y)| *x = y.to_f32());
                    let b = bias.map_or(0.0, |b| b[h * rows + r as usize]);
                    for j in 0..g {
                        logits[j][t] = q[j].iter().zip(&row).map(|(a, b)| a * b).sum::<f32>() + b;
                    }
                }
                let mut res: Vec<Partial> = logits
                    .iter_mut()
                    .map(|l| {
                        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let mut total = 0f32;
                        l.iter_mut().for_each(|x| {
                            *x = (*x - m).exp();
                            total += *x;
                        });
                        (m, total, vec![0f32; d])
                    })
                    .collect();
                for (t, &r) in chunk.iter().enumerate() {
                    let at = (h * rows + r as usize) * d;
                    row.iter_mut()
                        .zip(&v[at..at + d])
                        .for_each(|(x, y)| *x = y.to_f32());
                    for (j, (_, _, acc)) in res.iter_mut().enumerate() {
                        let p = logits[j][t];
                        acc.iter_mut().zip(&row).for_each(|(a, &x)| *a += p * x);
                    }
                }
                (h, res)
            })
            .collect();
        let mut out = vec![0f32; s.q_heads * d];
        for h in 0..s.kv_heads {
            let parts: Vec<&Vec<Partial>> = partials
                .iter()
                .filter(|(ph, _)| *ph == h)
                .map(|(_, p)| p)
                .collect();
            for j in 0..g {
                let m = parts
                    .iter()
                    .map(|p| p[j].0)
                    .fold(f32::NEG_INFINITY, f32::max);
                let o = &mut out[(h * g + j) * d..(h * g + j + 1) * d];
                let mut total = 0f32;
                for p in &parts {
                    let w = (p[j].0 - m).exp();
                    total += w * p[j].1;
                    o.iter_mut().zip(&p[j].2).for_each(|(a, &x)| *a += w * x);
                }
                o.iter_mut().for_each(|x| *x /= total);
            }
        }
        out
    }
}

/// Channel-wise minimum and maximum of each page's keys, `[kv_heads][pages][2][d]`.
fn quest_metadata(cache: &DenseCache, page: usize) -> Vec<bf16> {
    let Shape { n, head_dim: d, .. } = cache.shape;
    let np = n / page;
    let mut meta = vec![bf16::ZERO; cache.shape.kv_heads * np * 2 * d];
    meta.par_chunks_mut(2 * d).enumerate().for_each(|(hp, m)| {
        let (h, p) = (hp / np, hp % np);
        let (lo, hi) = m.split_at_mut(d);
        lo.fill(bf16::INFINITY);
        hi.fill(bf16::NEG_INFINITY);
        for r in p * page..(p + 1) * page {
            let at = (h * n + r) * d;
            for i in 0..d {
                let x = cache.k[at + i];
                if x < lo[i] {
                    lo[i] = x;
                }
                if x > hi[i] {
                    hi[i] = x;
                }
            }
        }
    });
    meta
}

/// The `k` best pages of each KV head's row of `scores` (`[heads][pages]`),
/// ties to the lower index, returned ascending.
pub fn top_pages(scores: &[f64], pages: usize, k: usize) -> Vec<Vec<u32>> {
    scores
        .chunks(pages.max(1))
        .map(|sc| {
            let mut idx: Vec<u32> = (0..pages as u32).collect();
            let better =
                |a: &u32, b: &u32| sc[*b as usize].total_cmp(&sc[*a as usize]).then(a.cmp(b));
            if k < pages {
                idx.select_nth_unstable_by(k - 1, better);
                idx.truncate(k);
            }
            idx.sort_unstable();
            idx
        })
        .collect()
}

/// `max |got - want| / max |want|`.
pub fn max_rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "got and want differ in length");
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()));
    if scale == 0.0 {
        return if diff == 0.0 { 0.0 } else { f64::INFINITY };
    }
    if diff.is_nan() {
        return f64::INFINITY;
    }
    diff / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds() -> [StepKind; 4] {
        [
            StepKind::Dense,
            StepKind::block_topk(0.1),
            StepKind::Cluster { frac: 0.1 },
            StepKind::window(0.1),
        ]
    }

    /// The CPU step of every kind against float64, at the real shape and at
    /// a small one with a ragged last chunk (n not a multiple of 2,048).
    #[test]
    fn cpu_step_matches_the_float64_reference_for_every_kind() {
        for shape in [
            Shape::llama3_8b(4096),
            Shape {
                q_heads: 8,
                kv_heads: 2,
                head_dim: 64,
                n: 16 * 400,
            },
        ] {
            let cache = Arc::new(DenseCache::generate(shape, 5).unwrap());
            for kind in kinds() {
                let step = Step::new(cache.clone(), kind, 5).unwrap();
                let got = step.run_cpu();
                let swaps = step.check_selection(&got.selection).unwrap();
                let want = step.reference_f64(&got.selection);
                let e = max_rel_err(&got.out, &want);
                eprintln!(
                    "{} n={}: rel err {e:.2e}, {swaps} near-tie swaps",
                    kind.name(),
                    shape.n
                );
                assert!(e <= TOLERANCE, "{}: {e:.3e}", kind.name());
                assert!(got.out.iter().all(|x| x.is_finite()));
            }
        }
    }

    /// Dropping the last range (or page) of a selection moves the output
    /// far past the tolerance: the check can fail.
    #[test]
    fn a_step_that_drops_rows_fails_the_check() {
        let cache = Arc::new(DenseCache::generate(Shape::llama3_8b(4096), 9).unwrap());
        for kind in kinds() {
            let step = Step::new(cache.clone(), kind, 9).unwrap();
            let sel = step.selection_f64();
            let broken = match &sel {
                Selection::Ranges(r) => {
                    let mut r = r.clone();
                    let last = r.last_mut().unwrap();
                    last.end -= (last.end - last.start) / 8;
                    Selection::Ranges(r)
                }
                Selection::Pages(p) => {
                    Selection::Pages(p.iter().map(|x| x[..x.len() - 1].to_vec()).collect())
                }
            };
            let e = max_rel_err(&step.attend_f32(&broken), &step.reference_f64(&sel));
            assert!(
                e > 10.0 * TOLERANCE,
                "{}: dropped rows went unnoticed ({e:.2e})",
                kind.name()
            );
        }
    }

    /// A page's score is, summed over the query group, each head's largest
    /// `q_h . k` over the corners of the page's bounding box (enumerated at
    /// d = 8), so at least the group's `sum_h q_h . k` of every key in the
    /// page; the selection is the brute-force top k of those scores.
    #[test]
    fn quest_scores_are_corner_maxima_and_selection_is_the_brute_force_top_k() {
        let shape = Shape {
            q_heads: 8,
            kv_heads: 2,
            head_dim: 8,
            n: 16 * 64,
        };
        let step = Step::generate(shape, StepKind::block_topk(0.2), 3).unwrap();
        let (d, np, g) = (8, 64, 4);
        let scores = step.page_scores_f64();
        let q: Vec<f64> = step.cache.q.iter().map(|x| x.to_f64()).collect();
        for h in 0..2 {
            for p in 0..np {
                let at = (h * np + p) * 2 * d;
                // The bound is per query head, summed over the group.
                let best: f64 = (0..g)
                    .map(|j| {
                        (0..1u32 << d)
                            .map(|corner| {
                                (0..d)
                                    .map(|i| {
                                        let m = if corner >> i & 1 == 1 {
                                            at + d + i
                                        } else {
                                            at + i
                                        };
                                        q[(h * g + j) * d + i] * step.meta[m].to_f64()
                                    })
                                    .sum::<f64>()
                            })
                            .fold(f64::NEG_INFINITY, f64::max)
                    })
                    .sum();
                let sc = scores[h * np + p];
                assert!(
                    (sc - best).abs() <= 1e-12 * best.abs().max(1.0),
                    "{sc} vs {best}"
                );
                for r in p * 16..(p + 1) * 16 {
                    let dot: f64 = (0..g * d)
                        .map(|x| {
                            q[(h * g + x / d) * d + x % d]
                                * step.cache.k[(h * shape.n + r) * d + x % d].to_f64()
                        })
                        .sum();
                    assert!(dot <= sc + 1e-9, "key {r} beats its page's bound");
                }
            }
            let k = step.pages_kept();
            let mut order: Vec<usize> = (0..np).collect();
            order.sort_by(|&a, &b| {
                scores[h * np + b]
                    .total_cmp(&scores[h * np + a])
                    .then(a.cmp(&b))
            });
            let mut brute: Vec<u32> = order[..k].iter().map(|&p| p as u32).collect();
            brute.sort_unstable();
            let Selection::Pages(sel) = step.selection_f64() else {
                panic!("block-topk selects pages")
            };
            assert_eq!(sel[h], brute);
        }
    }

    /// A selection that swaps a top page for the worst one is rejected; the
    /// f64 selection itself passes with no swaps.
    #[test]
    fn selection_check_rejects_a_wrong_page() {
        let step = Step::generate(Shape::llama3_8b(4096), StepKind::block_topk(0.1), 4).unwrap();
        let Selection::Pages(mut sel) = step.selection_f64() else {
            panic!("block-topk selects pages")
        };
        assert_eq!(step.check_selection(&Selection::Pages(sel.clone())), Ok(0));
        let scores = step.page_scores_f64();
        let np = step.n_pages();
        let worst = (0..np as u32)
            .min_by(|&a, &b| scores[a as usize].total_cmp(&scores[b as usize]))
            .unwrap();
        let best = (0..np as u32)
            .max_by(|&a, &b| scores[a as usize].total_cmp(&scores[b as usize]))
            .unwrap();
        sel[0].retain(|&p| p != best);
        sel[0].push(worst);
        sel[0].sort_unstable();
        assert!(step.check_selection(&Selection::Pages(sel)).is_err());
    }

    /// Planted keys make the selection matter: the best tenth of the pages
    /// holds far more than a tenth of the dense attention mass, and not all of it.
    #[test]
    fn the_data_make_page_selection_non_trivial_and_are_deterministic() {
        let shape = Shape::llama3_8b(8192);
        let a = DenseCache::generate(shape, 21).unwrap();
        let b = DenseCache::generate(shape, 21).unwrap();
        let c = DenseCache::generate(shape, 22).unwrap();
        assert!(a.k == b.k && a.v == b.v && a.q == b.q);
        assert!(a.k != c.k);
        let cache = Arc::new(a);
        let step = Step::new(cache.clone(), StepKind::block_topk(0.1), 21).unwrap();
        let Selection::Pages(sel) = step.selection_f64() else {
            panic!("block-topk selects pages")
        };
        let (d, n) = (128, shape.n);
        for qh in [0usize, 13, 31] {
            let h = qh / 4;
            let q: Vec<f64> = cache.q[qh * d..(qh + 1) * d]
                .iter()
                .map(|x| x.to_f64())
                .collect();
            let w: Vec<f64> = (0..n)
                .map(|r| {
                    let at = (h * n + r) * d;
                    (0..d).map(|i| q[i] * cache.k[at + i].to_f64()).sum::<f64>() / (d as f64).sqrt()
                })
                .collect();
            let m = w.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = w.iter().map(|x| (x - m).exp()).collect();
            let total: f64 = p.iter().sum();
            let kept: f64 = sel[h]
                .iter()
                .flat_map(|&pg| pg as usize * 16..(pg as usize + 1) * 16)
                .map(|r| p[r])
                .sum();
            let share = kept / total;
            eprintln!("query head {qh}: top 10% of pages hold {share:.3} of the mass");
            assert!(share > 0.3 && share < 0.99, "{share}");
        }
    }

    #[test]
    fn bytes_match_a_hand_count() {
        let cache = Arc::new(DenseCache::generate(Shape::llama3_8b(4096), 1).unwrap());
        let bytes = |kind| Step::new(cache.clone(), kind, 1).unwrap().bytes();
        // 8 KV heads x rows x (K and V) x 128 x 2 bytes; q 32 x 128 x 2; out 32 x 128 x 4.
        let (q, out) = (8192, 16384);
        assert_eq!(
            bytes(StepKind::Dense),
            StepBytes {
                kv: 16_777_216,
                meta: 0,
                bias: 0,
                q,
                out
            }
        );
        // 256 pages, ceil(25.6) = 26 kept; metadata 8 x 256 x 2 x 128 x 2.
        assert_eq!(
            bytes(StepKind::block_topk(0.1)),
            StepBytes {
                kv: 8 * 26 * 16 * 512,
                meta: 1_048_576,
                bias: 0,
                q,
                out
            }
        );
        // ceil(409.6) = 410 centroids, 4-byte bias each.
        assert_eq!(
            bytes(StepKind::Cluster { frac: 0.1 }),
            StepBytes {
                kv: 8 * 410 * 512,
                meta: 0,
                bias: 8 * 410 * 4,
                q,
                out
            }
        );
        assert_eq!(
            bytes(StepKind::window(0.1)),
            StepBytes {
                kv: 8 * 410 * 512,
                meta: 0,
                bias: 0,
                q,
                out
            }
        );
        assert_eq!(bytes(StepKind::Dense).total(), 16_777_216 + 8192 + 16384);
    }

    #[test]
    fn bad_configurations_are_rejected_with_the_fix() {
        let err = |shape, kind| match Step::generate(shape, kind, 0) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{kind:?} on {shape:?} was accepted"),
        };
        assert!(err(Shape::llama3_8b(1000), StepKind::block_topk(0.1)).contains("multiple of 16"));
        assert!(err(Shape::llama3_8b(1024), StepKind::Cluster { frac: 0.0 }).contains("(0, 1]"));
        assert!(err(Shape::llama3_8b(32), StepKind::window(0.1)).contains("no window"));
        let odd = Shape {
            q_heads: 6,
            kv_heads: 4,
            ..Shape::llama3_8b(64)
        };
        assert!(err(odd, StepKind::Dense).contains("multiple of the KV heads"));
    }
}
