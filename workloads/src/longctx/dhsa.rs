//! DHSA, Dynamic Hierarchical Sparse Attention (Xiong, Zou, Fekri, Cho;
//! arXiv 2510.24606), as a cache that runs its own prefill: entry `dhsa`.
//!
//! # The paper's method
//!
//! DHSA decides, per layer, which (query, key) pairs attention computes, in
//! two stages (the paper's "hierarchical sparsity prediction"). A boundary
//! predictor cuts the sequence into variable-length chunks ("dynamic
//! chunking"). Each chunk is summarised by its keys (and its queries)
//! aggregated with length normalisation, `k_c = sqrt(|C|) * mean_{i in C}
//! k_i` ("length-normalized aggregation": the mean of many keys varies
//! less than the mean of few, so plain means would rank short chunks
//! first and plain sums long ones; the square root keeps the spread of the
//! scores independent of chunk length). Chunk pairs are
//! scored `S_c = q_c . k_c`, the scores are upsampled to token level (each
//! token pair inherits the score of its two chunks), and each query keeps
//! the `N_b` keys of highest upsampled score. The authors' released code
//! (`_obtain_dhsa_mask`, pooling `avgpool_norm`) also always keeps the
//! first tokens ("global") and the most recent ones ("local") inside
//! `N_b`; we keep both too.
//!
//! # As implemented
//!
//! Chunking is per layer, on that layer's keys (all KV heads of a row
//! together, the feature the paper's predictor reads), decided online as
//! keys are appended. For a candidate cut after position `i`, the contrast
//! `1 - cos(sum k[i-w+1..=i], sum k[i+1..=i+w])` (`w` =
//! [`BOUNDARY_WINDOW`]) measures how much the keys change across `i`. A
//! chunk ends after `i` when its contrast is a peak within
//! [`NMS_RADIUS`] candidates on either side (earliest wins a tie) and the
//! chunk has at least [`MIN_CHUNK`] tokens, or when the chunk reaches
//! [`MAX_CHUNK`] tokens. So the decision for `i` waits for key
//! `i + NMS_RADIUS + w`; the positions after the last closed chunk form an
//! open tail, summarised as a provisional chunk. Closed chunks keep
//! `sum(k) / sqrt(len)` (= mean times sqrt(size)) per KV head.
//!
//! Selection is per query and KV head: the query summary is the sum of the
//! query heads that share the KV head (a query chunk of one token: its
//! normalisation `sqrt(1)` is 1, and a positive factor does not change a
//! ranking). With budget `B` and `n > B` committed positions, the query
//! reads the first `min(SINK_TOKENS, B/4)` positions, the last
//! `min(LOCAL_TOKENS, B/4)`, and fills the rest of `B` with the positions of
//! highest upsampled score among those between; tokens of one chunk tie, and
//! ties go to the later position. With `n <= B` it reads every position, so
//! a budget at least the context gives dense attention bit for bit. The
//! block in flight (the 64-token prompt block, or the decode token itself)
//! is always read in full after the cached rows, as the decoder requires.
//!
//! Prefill and decode run the same rule: DHSA's own prefill fills this
//! cache block by block, and each decode step is a query like any other.
//! [`Policy::from_dense`] appends a dense prefill's keys and values and
//! runs the same chunker over them, so the cache is the one DHSA's own
//! prefill would have built from those keys; only the prompt's attention
//! was dense. [`KvCache::truncate`] restores the earlier state exactly
//! (every key is kept, and a chunk decision depends only on the keys up to
//! a fixed lookahead, so the decisions the shorter sequence had not made
//! are undone).
//!
//! # Departures, and why
//!
//! - The boundary predictor is a trained network over a layer's keys (an
//!   encoder, a feature-fusion module and an MLP), trained on labels the
//!   authors derive from how later queries' attention mass splits across a
//!   candidate; its scores are thresholded, non-maximum suppressed and
//!   capped at a chunk count. We have no trained predictor, and the label
//!   rule needs the attention of later queries, which a causal cache does
//!   not have. The contrast of the key windows around a candidate
//!   replaces the predictor's score; a local-peak test over `NMS_RADIUS`
//!   replaces the greedy suppression (every local peak survives greedy
//!   suppression, and a local peak is decidable online); there is no
//!   threshold (raw cosines are not calibrated like the predictor's
//!   output) and no global chunk count (it needs the whole prompt). Flat
//!   stretches of keys are therefore cut at noise peaks into chunks of
//!   `MIN_CHUNK` or more tokens, which only makes the selection finer.
//! - Query chunks: the paper scores query chunk against key chunk, and the
//!   authors' code uses fixed query blocks whose queries share one
//!   selection. Our decoder attends one query at a time and cannot see the
//!   other queries of its block, so every query is its own chunk.
//! - The authors average queries and keys over all heads and share one
//!   selection per layer; each `attend` call here sees one KV head's group,
//!   so the selection is per KV head.
//! - `SINK_TOKENS` and `LOCAL_TOKENS` are smaller than the code's 128 each
//!   and capped at a quarter of the budget, because our budgets (10%-50% of
//!   1k-8k tokens, down to about 25 positions in the quick profile) are far
//!   smaller than theirs.
//! - The authors' code gives the last 64 prompt queries (the instruction)
//!   dense attention. Our prompts have no marked instruction span, and
//!   every method is held to the same per-query budget, so we do not.
//! - The authors' code decodes densely (its decode path is a TODO); the
//!   paper applies DHSA to decode as well (v1, App. A and Alg. 2), and so
//!   do we, but with another chunking of the generated tokens: the paper
//!   freezes the prompt's boundaries and puts every token generated
//!   before the current one into one chunk (the current query is its own),
//!   while we keep running the online chunker over generated keys, as over
//!   the prompt's. With answers of at most 16 tokens the two differ only
//!   in how those few positions are grouped.
//!
//! Sections (v1, "... for On-Device LLMs"): Sec. 2.1 hierarchical sparsity
//! prediction (chunk scores, upsampling, TOPK with budget `N_b`), Sec. 2.2
//! dynamic boundary detection, Sec. 2.3 the length-normalised chunk
//! representation (eq. 4), App. A the prefill and decode workflow (Algs.
//! 1-2), App. B the boundary labels. A later revision retitled the paper
//! and may number them differently.

use std::cell::RefCell;

use super::policy::{Plan, Policy};
use crate::decoder::kernels::dot;
use crate::decoder::{
    attend_segments, BlockKv, DecoderError, DenseKv, KvCache, KvShape, ReadCounter, Reads, Rows,
    Segment,
};

/// Keys on each side of a candidate cut whose sums are compared (the
/// authors' `boundary_window_size` default).
pub const BOUNDARY_WINDOW: usize = 4;
/// A cut must be the strongest contrast within this many candidates on
/// either side (the authors' NMS window default).
pub const NMS_RADIUS: usize = 8;
/// Shortest chunk: the spacing non-maximum suppression enforces between
/// two peaks, applied to forced cuts too.
pub const MIN_CHUNK: usize = NMS_RADIUS + 1;
/// Longest chunk: a cut is forced here, so the open tail (and the error of
/// summarising a long run by one vector) stays bounded.
pub const MAX_CHUNK: usize = 64;
/// First positions every query reads (attention sinks), at most a quarter
/// of the budget.
pub const SINK_TOKENS: usize = 16;
/// Most recent cached positions every query reads, at most a quarter of the
/// budget.
pub const LOCAL_TOKENS: usize = 64;

/// Keys after a candidate that its decision needs: its right window, and
/// the right half of its suppression window.
const LOOKAHEAD: usize = NMS_RADIUS + BOUNDARY_WINDOW;

/// The `dhsa` entry.
#[derive(Debug, Clone, Copy, Default)]
pub struct Dhsa;

impl Policy for Dhsa {
    fn id(&self) -> &'static str {
        "dhsa"
    }

    fn from_dense(&self, dense: &DenseKv, plan: &Plan<'_>) -> Box<dyn KvCache> {
        Box::new(DhsaKv::from_dense(dense, plan.budget, plan.max_new))
    }

    fn empty(&self, plan: &Plan<'_>) -> Option<Box<dyn KvCache>> {
        Some(Box::new(DhsaKv::new(
            plan.shape,
            plan.budget,
            plan.context + plan.max_new + 1,
        )))
    }
}

/// One layer's chunks.
#[derive(Debug, Clone, Default)]
struct Chunking {
    /// Exclusive ends of the closed chunks, increasing.
    ends: Vec<u32>,
    /// `kv_dim` floats per closed chunk: `sum(k) / sqrt(len)`.
    reps: Vec<f32>,
    /// Contrast of the cut after position `i`, for every `i` whose right
    /// window is complete (`-inf` where the left window is not).
    contrast: Vec<f32>,
    /// Candidates `0..decided` have been decided.
    decided: usize,
    /// The open tail `[last end, len)` summarised like a closed chunk
    /// (empty while the sequence is).
    tail: Vec<f32>,
}

impl Chunking {
    fn tail_start(&self) -> usize {
        self.ends.last().map_or(0, |&e| e as usize)
    }

    /// Brings the chunking up to date with `keys` (`kv_dim = d` per row).
    fn advance(&mut self, keys: &[f32], d: usize) {
        let n = keys.len() / d;
        while self.contrast.len() + BOUNDARY_WINDOW < n {
            let i = self.contrast.len();
            self.contrast.push(if i + 1 < BOUNDARY_WINDOW {
                f32::NEG_INFINITY
            } else {
                window_contrast(keys, d, i)
            });
        }
        let decidable = n.saturating_sub(LOOKAHEAD);
        for i in self.decided..decidable {
            let len = i + 1 - self.tail_start();
            if len >= MAX_CHUNK || (len >= MIN_CHUNK && self.is_peak(i)) {
                self.close(keys, d, i + 1);
            }
        }
        self.decided = self.decided.max(decidable);
        self.refresh_tail(keys, d);
    }

    /// Undoes every decision a sequence of `keys.len() / d` positions had
    /// not yet made.
    fn rollback(&mut self, keys: &[f32], d: usize) {
        let n = keys.len() / d;
        self.contrast.truncate(n.saturating_sub(BOUNDARY_WINDOW));
        self.decided = self.decided.min(n.saturating_sub(LOOKAHEAD));
        let keep = self.ends.partition_point(|&e| e as usize <= self.decided);
        self.ends.truncate(keep);
        self.reps.truncate(keep * d);
        self.refresh_tail(keys, d);
    }

    fn is_peak(&self, i: usize) -> bool {
        let c = &self.contrast;
        let x = c[i];
        x.is_finite()
            && c[i.saturating_sub(NMS_RADIUS)..i].iter().all(|&y| y <= x)
            && c[i + 1..=i + NMS_RADIUS].iter().all(|&y| y < x)
    }

    fn close(&mut self, keys: &[f32], d: usize, end: usize) {
        let start = self.tail_start();
        let at = self.reps.len();
        self.reps.resize(at + d, 0.0);
        summarise(keys, d, start, end, &mut self.reps[at..]);
        self.ends.push(end as u32);
    }

    fn refresh_tail(&mut self, keys: &[f32], d: usize) {
        // Decisions lag the keys, so the tail is empty only when the
        // sequence is.
        let (start, n) = (self.tail_start(), keys.len() / d);
        self.tail.clear();
        if start < n {
            self.tail.resize(d, 0.0);
            summarise(keys, d, start, n, &mut self.tail);
        }
    }

    fn bytes(&self) -> usize {
        4 * (self.ends.len() + self.reps.len() + self.contrast.len() + self.tail.len())
            + std::mem::size_of::<usize>()
    }
}

/// `sum(k[start..end]) / sqrt(end - start)` into `out` (`d` floats), summed
/// in position order so the bits do not depend on how the rows arrived.
fn summarise(keys: &[f32], d: usize, start: usize, end: usize, out: &mut [f32]) {
    out.fill(0.0);
    for row in keys[start * d..end * d].chunks_exact(d) {
        for (o, &k) in out.iter_mut().zip(row) {
            *o += k;
        }
    }
    let inv = 1.0 / ((end - start) as f32).sqrt();
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// `1 - cos` between the sums of the `BOUNDARY_WINDOW` keys ending at `i`
/// and the `BOUNDARY_WINDOW` keys after it (0 if either sum is zero).
fn window_contrast(keys: &[f32], d: usize, i: usize) -> f32 {
    let (mut lr, mut ll, mut rr) = (0f64, 0f64, 0f64);
    for c in 0..d {
        let (mut l, mut r) = (0f64, 0f64);
        for j in 0..BOUNDARY_WINDOW {
            l += keys[(i - j) * d + c] as f64;
            r += keys[(i + 1 + j) * d + c] as f64;
        }
        lr += l * r;
        ll += l * l;
        rr += r * r;
    }
    let den = (ll * rr).sqrt();
    if den > 0.0 {
        (1.0 - lr / den) as f32
    } else {
        0.0
    }
}

/// A chunk (or its part a query may select): its score for the query, the
/// eligible rows `a..z`, and how many of their last rows were taken.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    score: f32,
    a: usize,
    z: usize,
    take: usize,
}

#[derive(Debug, Default)]
struct Scratch {
    rows: Vec<usize>,
    cands: Vec<Candidate>,
    order: Vec<u32>,
    qsum: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// DHSA's cache: every key and value, each layer's chunks, and read
/// counters. See the module documentation.
#[derive(Debug)]
pub struct DhsaKv {
    kv: DenseKv,
    budget: usize,
    chunks: Vec<Chunking>,
    reads: ReadCounter,
}

impl DhsaKv {
    /// An empty cache letting each query read `budget` cached positions,
    /// with room for `capacity` positions before any reallocation.
    pub fn new(shape: KvShape, budget: usize, capacity: usize) -> DhsaKv {
        DhsaKv {
            kv: DenseKv::new(shape, capacity),
            budget,
            chunks: vec![Chunking::default(); shape.n_layers],
            reads: ReadCounter::default(),
        }
    }

    /// The cache DHSA's own prefill would have built from `dense`'s keys
    /// and values, with room for `extra` more positions.
    pub fn from_dense(dense: &DenseKv, budget: usize, extra: usize) -> DhsaKv {
        let shape = dense.shape();
        let mut cache = DhsaKv::new(shape, budget, dense.len() + extra + 1);
        for l in 0..shape.n_layers {
            cache.append(l, 0, dense.keys(l), dense.values(l));
        }
        cache
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Exclusive ends of `layer`'s closed chunks (the open tail follows the
    /// last one).
    pub fn chunk_ends(&self, layer: usize) -> &[u32] {
        &self.chunks[layer].ends
    }

    /// Closed chunk `chunk` of `layer` as `sum(k) / sqrt(len)`, `kv_dim`
    /// floats (every KV head).
    pub fn chunk_rep(&self, layer: usize, chunk: usize) -> &[f32] {
        let d = self.kv.shape().kv_dim();
        &self.chunks[layer].reps[chunk * d..(chunk + 1) * d]
    }

    /// The open tail of `layer` summarised like a closed chunk.
    pub fn tail_rep(&self, layer: usize) -> &[f32] {
        &self.chunks[layer].tail
    }

    /// The cached rows a query `q` (the `n_rep` heads of KV head `kv_head`)
    /// of `layer` reads, in position order.
    pub fn selected_rows(&self, layer: usize, kv_head: usize, q: &[f32]) -> Vec<usize> {
        let n = self.kv.keys(layer).len() / self.kv.shape().kv_dim();
        if n <= self.budget {
            return (0..n).collect();
        }
        let mut s = Scratch::default();
        self.select(layer, kv_head, q, n, &mut s);
        s.rows
    }

    /// Fills `s.rows` with the selection of a query when `n > budget`.
    fn select(&self, layer: usize, kv_head: usize, q: &[f32], n: usize, s: &mut Scratch) {
        let shape = self.kv.shape();
        let (hd, d) = (shape.head_dim, shape.kv_dim());
        let b = self.budget;
        let sinks = SINK_TOKENS.min(b / 4);
        let local = LOCAL_TOKENS.min(b / 4);
        let (lo, hi) = (sinks, n - local);
        let Scratch {
            rows,
            cands,
            order,
            qsum,
        } = s;
        qsum.clear();
        qsum.resize(hd, 0.0);
        for head in q.chunks_exact(hd) {
            for (a, &x) in qsum.iter_mut().zip(head) {
                *a += x;
            }
        }
        let ch = &self.chunks[layer];
        let off = kv_head * hd;
        cands.clear();
        let mut start = 0;
        let spans = ch
            .ends
            .iter()
            .enumerate()
            .map(|(c, &e)| (e as usize, &ch.reps[c * d + off..c * d + off + hd]))
            .chain(std::iter::once((n, &ch.tail[off..off + hd])));
        for (end, rep) in spans {
            let (a, z) = (start.max(lo), end.min(hi));
            if a < z {
                cands.push(Candidate {
                    score: dot(qsum, rep),
                    a,
                    z,
                    take: 0,
                });
            }
            start = end;
        }
        order.clear();
        order.extend(0..cands.len() as u32);
        order.sort_unstable_by(|&x, &y| {
            let (x, y) = (&cands[x as usize], &cands[y as usize]);
            y.score.total_cmp(&x.score).then(y.a.cmp(&x.a))
        });
        let mut left = b - sinks - local;
        for &i in order.iter() {
            if left == 0 {
                break;
            }
            let c = &mut cands[i as usize];
            c.take = (c.z - c.a).min(left);
            left -= c.take;
        }
        rows.clear();
        rows.extend(0..sinks);
        for c in cands.iter().filter(|c| c.take > 0) {
            rows.extend(c.z - c.take..c.z);
        }
        rows.extend(hi..n);
    }
}

impl KvCache for DhsaKv {
    fn append(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        self.kv.append(layer, pos, k, v);
        let d = self.kv.shape().kv_dim();
        self.chunks[layer].advance(self.kv.keys(layer), d);
    }

    fn len(&self) -> usize {
        self.kv.len()
    }

    fn truncate(&mut self, len: usize) -> Result<(), DecoderError> {
        if len >= self.kv.len() {
            return Ok(());
        }
        self.kv.truncate(len)?;
        let d = self.kv.shape().kv_dim();
        for (l, ch) in self.chunks.iter_mut().enumerate() {
            ch.rollback(self.kv.keys(l), d);
        }
        Ok(())
    }

    fn attend(
        &self,
        layer: usize,
        kv_head: usize,
        q: &[f32],
        block: &BlockKv<'_>,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let shape = self.kv.shape();
        let d = shape.kv_dim();
        let (keys, values) = (self.kv.keys(layer), self.kv.values(layer));
        let n = keys.len() / d;
        let in_flight = block.segment();
        if n <= self.budget {
            let segments = [
                Segment {
                    k: keys,
                    v: values,
                    rows: Rows::Range(0, n),
                    bias: None,
                },
                in_flight,
            ];
            attend_segments(q, shape.head_dim, d, kv_head, &segments, scores, out);
            self.reads.add(n, n);
            return;
        }
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            self.select(layer, kv_head, q, n, &mut s);
            let segments = [
                Segment {
                    k: keys,
                    v: values,
                    rows: Rows::List(&s.rows),
                    bias: None,
                },
                in_flight,
            ];
            attend_segments(q, shape.head_dim, d, kv_head, &segments, scores, out);
            self.reads.add(s.rows.len(), n);
        });
    }

    fn bytes(&self) -> usize {
        self.kv.bytes() + self.chunks.iter().map(Chunking::bytes).sum::<usize>()
    }

    fn reads(&self) -> Reads {
        self.reads.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::longctx::testutil::{assert_close, attention_f64_of_head, uniform};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const SHAPE: KvShape = KvShape {
        n_layers: 2,
        n_kv_heads: 2,
        head_dim: 8,
    };
    const N_REP: usize = 2;

    /// Keys and values for `n` positions of every layer, plus one query
    /// per position, layer and KV head group.
    struct Data {
        k: Vec<Vec<f32>>,
        v: Vec<Vec<f32>>,
        q: Vec<Vec<f32>>,
    }

    fn random_data(rng: &mut ChaCha8Rng, shape: KvShape, n: usize) -> Data {
        let d = shape.kv_dim();
        let qd = N_REP * d;
        Data {
            k: (0..shape.n_layers).map(|_| uniform(rng, n * d)).collect(),
            v: (0..shape.n_layers).map(|_| uniform(rng, n * d)).collect(),
            q: (0..shape.n_layers).map(|_| uniform(rng, n * qd)).collect(),
        }
    }

    /// Runs `data` through `cache` the way the decoder does: blocks of
    /// `block` positions (every row sees itself and the earlier rows of
    /// its block), then one-position steps from `steps_from` on. Returns
    /// every attention output, indexed `[pos][layer][kv_head]`.
    fn drive(
        cache: &mut dyn KvCache,
        shape: KvShape,
        data: &Data,
        n: usize,
        block: usize,
        steps_from: usize,
    ) -> Vec<Vec<Vec<Vec<f32>>>> {
        let (d, hd) = (shape.kv_dim(), shape.head_dim);
        let qd = N_REP * d;
        let mut outs = Vec::new();
        let mut pos = 0;
        while pos < n {
            let t = if pos < steps_from {
                block.min(steps_from - pos).min(n - pos)
            } else {
                1
            };
            cache.begin_block(pos, &vec![0; t]);
            let mut block_out = vec![vec![Vec::new(); shape.n_layers]; t];
            for l in 0..shape.n_layers {
                let bk = &data.k[l][pos * d..(pos + t) * d];
                let bv = &data.v[l][pos * d..(pos + t) * d];
                for (i, row_out) in block_out.iter_mut().enumerate() {
                    let rows: Vec<usize> = (0..=i).collect();
                    let blk = BlockKv {
                        k: bk,
                        v: bv,
                        rows: &rows,
                    };
                    let q = &data.q[l][(pos + i) * qd..(pos + i + 1) * qd];
                    for g in 0..shape.n_kv_heads {
                        let mut out = vec![0f32; N_REP * hd];
                        let qg = &q[g * N_REP * hd..(g + 1) * N_REP * hd];
                        cache.attend(l, g, qg, &blk, &mut Vec::new(), &mut out);
                        row_out[l].push(out);
                    }
                }
            }
            for l in 0..shape.n_layers {
                cache.append(
                    l,
                    pos,
                    &data.k[l][pos * d..(pos + t) * d],
                    &data.v[l][pos * d..(pos + t) * d],
                );
            }
            outs.extend(block_out);
            pos += t;
        }
        outs
    }

    /// The chunk ends the rule gives, computed in one pass over all keys
    /// of a sequence of `n` positions (not incrementally).
    fn rule_ends(keys: &[f32], d: usize) -> Vec<u32> {
        let n = keys.len() / d;
        let w = BOUNDARY_WINDOW;
        let c: Vec<f64> = (0..n.saturating_sub(w))
            .map(|i| {
                if i + 1 < w {
                    return f64::NEG_INFINITY;
                }
                let sum = |rows: std::ops::Range<usize>| -> Vec<f64> {
                    (0..d)
                        .map(|j| rows.clone().map(|r| keys[r * d + j] as f64).sum())
                        .collect()
                };
                let (l, r) = (sum(i + 1 - w..i + 1), sum(i + 1..i + 1 + w));
                let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
                1.0 - dot(&l, &r) / (dot(&l, &l) * dot(&r, &r)).sqrt()
            })
            .collect();
        let mut ends = Vec::new();
        let mut start = 0;
        for i in 0..n.saturating_sub(NMS_RADIUS + w) {
            let peak = c[i].is_finite()
                && (i.saturating_sub(NMS_RADIUS)..i).all(|j| c[j] <= c[i])
                && (i + 1..=i + NMS_RADIUS).all(|j| c[j] < c[i]);
            let len = i + 1 - start;
            if len >= MAX_CHUNK || (len >= MIN_CHUNK && peak) {
                ends.push(i as u32 + 1);
                start = i + 1;
            }
        }
        ends
    }

    /// `sqrt(len) * mean(k[a..z])` of KV head `g`, in f64, from the keys.
    fn mean_sqrt(keys: &[f32], d: usize, a: usize, z: usize) -> Vec<f64> {
        (0..d)
            .map(|j| {
                let mean = (a..z).map(|r| keys[r * d + j] as f64).sum::<f64>() / (z - a) as f64;
                mean * ((z - a) as f64).sqrt()
            })
            .collect()
    }

    /// Keys with a strong shared direction (as real keys have) and a run
    /// of `planted` keys pointing elsewhere starting at `at`.
    fn anisotropic_keys(
        rng: &mut ChaCha8Rng,
        n: usize,
        d: usize,
        at: usize,
        planted: usize,
    ) -> Vec<f32> {
        let mut k = Vec::with_capacity(n * d);
        for r in 0..n {
            for j in 0..d {
                let base = if (at..at + planted).contains(&r) {
                    if j == 1 {
                        3.0
                    } else {
                        0.0
                    }
                } else if j == 0 {
                    3.0
                } else {
                    0.0
                };
                k.push(base + rng.random_range(-0.1f32..0.1));
            }
        }
        k
    }

    /// Each closed chunk and the open tail hold `mean * sqrt(size)` of
    /// their keys (relative error below 1e-5: an f32 sum of at most 64
    /// terms of magnitude 1, against f64).
    #[test]
    fn chunk_representation_is_mean_times_sqrt_size() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let n = 400;
        let data = random_data(&mut rng, SHAPE, n);
        let mut cache = DhsaKv::new(SHAPE, n, n);
        drive(&mut cache, SHAPE, &data, n, 64, n);
        let d = SHAPE.kv_dim();
        for l in 0..SHAPE.n_layers {
            let ends = cache.chunk_ends(l);
            assert!(ends.len() >= n / MAX_CHUNK, "{} chunks", ends.len());
            let mut start = 0;
            let spans = ends
                .iter()
                .map(|&e| e as usize)
                .chain(std::iter::once(n))
                .enumerate();
            for (c, end) in spans {
                let got = if c < ends.len() {
                    cache.chunk_rep(l, c)
                } else {
                    cache.tail_rep(l)
                };
                let want = mean_sqrt(&data.k[l], d, start, end);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "layer {l} chunk {c} [{start}, {end}): {g} vs {w}"
                    );
                }
                start = end;
            }
        }
    }

    /// Boundaries are where the contrast rule puts them: on planted shifts
    /// of direction exactly, and on random keys as a one-pass evaluation
    /// of the rule says, within [MIN_CHUNK, MAX_CHUNK] tokens.
    #[test]
    fn boundaries_follow_the_contrast_rule() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let shape = KvShape {
            n_layers: 1,
            n_kv_heads: 2,
            head_dim: 8,
        };
        let d = shape.kv_dim();
        // Segments no longer than 2 * NMS_RADIUS, so every non-edge
        // candidate has a stronger edge within reach, and longer than
        // NMS_RADIUS, so no two edges suppress each other.
        let lens = [12usize, 10, 16, 13, 11, 15, 14, 10, 16, 12];
        let mut keys = Vec::new();
        let mut edges = Vec::new();
        for &len in &lens {
            let dir = uniform(&mut rng, d);
            for _ in 0..len {
                keys.extend(
                    dir.iter()
                        .map(|&x| 2.0 * x + rng.random_range(-0.05f32..0.05)),
                );
            }
            edges.push((keys.len() / d) as u32);
        }
        let n = keys.len() / d;
        let mut cache = DhsaKv::new(shape, n, n);
        cache.append(0, 0, &keys, &keys);
        let decided: Vec<u32> = edges
            .iter()
            .copied()
            .filter(|&e| e as usize <= n - LOOKAHEAD)
            .collect();
        assert_eq!(cache.chunk_ends(0), &decided[..]);
        assert!(decided.len() >= lens.len() - 2);

        let n = 700;
        let keys = uniform(&mut rng, n * d);
        let mut cache = DhsaKv::new(shape, n, n);
        for (pos, (k, v)) in keys.chunks(7 * d).zip(keys.chunks(7 * d)).enumerate() {
            cache.append(0, pos * 7, k, v);
        }
        let ends = cache.chunk_ends(0);
        assert_eq!(ends, &rule_ends(&keys, d)[..]);
        let mut start = 0;
        for &e in ends {
            let len = e as usize - start;
            assert!((MIN_CHUNK..=MAX_CHUNK).contains(&len), "chunk of {len}");
            start = e as usize;
        }
        assert!(n - start <= MAX_CHUNK + LOOKAHEAD);
    }

    /// Forced cuts: keys that never change direction are cut every
    /// MAX_CHUNK tokens.
    #[test]
    fn flat_keys_are_cut_at_max_chunk() {
        let shape = KvShape {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim: 4,
        };
        let n = 300;
        let keys = vec![1.0f32; n * 4];
        let mut cache = DhsaKv::new(shape, n, n);
        cache.append(0, 0, &keys, &keys);
        let want: Vec<u32> = (1..)
            .map(|c| (c * MAX_CHUNK) as u32)
            .take_while(|&e| e as usize <= n - LOOKAHEAD)
            .collect();
        assert_eq!(cache.chunk_ends(0), &want[..]);
    }

    /// The state does not depend on how positions were grouped into
    /// appends (64-row prefill blocks, single decode steps, or one dense
    /// prefill through `from_dense`): same chunks, same bits.
    #[test]
    fn chunking_is_independent_of_block_sizes() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let n = 333;
        let data = random_data(&mut rng, SHAPE, n);
        let mut blocks = DhsaKv::new(SHAPE, 50, n);
        drive(&mut blocks, SHAPE, &data, n, 64, 200);
        let mut steps = DhsaKv::new(SHAPE, 50, n);
        drive(&mut steps, SHAPE, &data, n, 1, 0);
        let mut dense = DenseKv::new(SHAPE, n);
        for l in 0..SHAPE.n_layers {
            dense.append(l, 0, &data.k[l], &data.v[l]);
        }
        let from = DhsaKv::from_dense(&dense, 50, 8);
        assert_eq!(Dhsa.from_dense(&dense, &plan(SHAPE, n, 50)).len(), n);
        for l in 0..SHAPE.n_layers {
            for other in [&steps, &from] {
                assert_eq!(blocks.chunk_ends(l), other.chunk_ends(l));
                assert_eq!(blocks.chunks[l].reps, other.chunks[l].reps);
                assert_eq!(blocks.tail_rep(l), other.tail_rep(l));
            }
        }
    }

    fn plan(shape: KvShape, context: usize, budget: usize) -> Plan<'static> {
        Plan {
            shape,
            context,
            budget,
            prompt: &[],
            boundary: &[],
            max_new: 8,
            whole_heads: &[],
            window: None,
        }
    }

    /// The rows a query should read, computed independently in f64 from
    /// the keys and the chunk bounds: sinks, local window, and the top
    /// positions by upsampled `sqrt(size) * mean` score, ties to the later
    /// position.
    fn expected_rows(
        keys: &[f32],
        ends: &[u32],
        q: &[f32],
        g: usize,
        n: usize,
        budget: usize,
    ) -> Vec<usize> {
        let (hd, d) = (SHAPE.head_dim, SHAPE.kv_dim());
        if n <= budget {
            return (0..n).collect();
        }
        let sinks = SINK_TOKENS.min(budget / 4);
        let local = LOCAL_TOKENS.min(budget / 4);
        let qsum: Vec<f64> = (0..hd)
            .map(|j| q.chunks_exact(hd).map(|h| h[j] as f64).sum())
            .collect();
        let mut score = vec![0f64; n];
        let mut start = 0;
        for end in ends.iter().map(|&e| e as usize).chain(std::iter::once(n)) {
            let rep = mean_sqrt(keys, d, start, end);
            let s: f64 = qsum.iter().zip(&rep[g * hd..]).map(|(a, b)| a * b).sum();
            score[start..end].fill(s);
            start = end;
        }
        let mut middle: Vec<usize> = (sinks..n - local).collect();
        middle.sort_by(|&x, &y| score[y].total_cmp(&score[x]).then(y.cmp(&x)));
        let mut rows: Vec<usize> = (0..sinks)
            .chain(middle[..budget - sinks - local].iter().copied())
            .chain(n - local..n)
            .collect();
        rows.sort_unstable();
        rows
    }

    /// Prefill in 64-row blocks then decode, with a budget well below the
    /// context: every output matches a float64 softmax over exactly the
    /// rows the rule selects plus the block rows (relative error below
    /// 1e-5: f32 terms of magnitude <= 1 over at most ~100 rows, against a
    /// wrong row set that moves outputs by ~1e-2), and every query reads
    /// exactly `min(budget, n)` cached rows.
    #[test]
    fn attention_matches_f64_over_the_selected_rows() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let (n, budget, steps_from) = (300, 48, 256);
        let data = random_data(&mut rng, SHAPE, n);
        let (d, hd) = (SHAPE.kv_dim(), SHAPE.head_dim);
        let qd = N_REP * d;
        // Replay up to each position to know the cache state each query
        // saw; check a spread of positions to keep the test fast.
        for &check in &[40usize, 130, 200, 257, 299] {
            let mut cache = DhsaKv::new(SHAPE, budget, n);
            let outs = drive(&mut cache, SHAPE, &data, check + 1, 64, steps_from);
            // The committed state the query at `check` saw.
            let seen = if check < steps_from {
                check / 64 * 64
            } else {
                check
            };
            let mut before = DhsaKv::new(SHAPE, budget, n);
            drive(&mut before, SHAPE, &data, seen, 64, steps_from);
            for (l, out_l) in outs[check].iter().enumerate() {
                let keys = &data.k[l][..seen * d];
                let ends = before.chunk_ends(l).to_vec();
                let q = &data.q[l][check * qd..(check + 1) * qd];
                for g in 0..SHAPE.n_kv_heads {
                    let qg = &q[g * N_REP * hd..(g + 1) * N_REP * hd];
                    let rows = expected_rows(keys, &ends, qg, g, seen, budget);
                    assert_eq!(rows, before.selected_rows(l, g, qg));
                    assert_eq!(rows.len(), seen.min(budget));
                    // The selected cached rows, then the block rows up to
                    // the query itself.
                    let kv: Vec<(&[f32], &[f32])> = rows
                        .iter()
                        .copied()
                        .chain(seen..=check)
                        .map(|r| {
                            (
                                &data.k[l][r * d..(r + 1) * d],
                                &data.v[l][r * d..(r + 1) * d],
                            )
                        })
                        .collect();
                    let want = attention_f64_of_head(qg, hd, g, &kv);
                    let what = format!("pos {check} layer {l} head {g}");
                    assert_close(&out_l[g], &want, 1e-5, &what);
                }
            }
        }
    }

    /// A run of keys aligned with the query, in keys that otherwise share
    /// an orthogonal direction, becomes its own chunk and is selected
    /// whole under a small budget.
    #[test]
    fn planted_chunk_is_selected() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let shape = KvShape {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim: 16,
        };
        let (n, at, planted, budget) = (320, 150, 12, 40);
        let keys = anisotropic_keys(&mut rng, n, 16, at, planted);
        let values = uniform(&mut rng, n * 16);
        let mut cache = DhsaKv::new(shape, budget, n);
        cache.append(0, 0, &keys, &values);
        let ends = cache.chunk_ends(0);
        assert!(ends.contains(&(at as u32)) && ends.contains(&((at + planted) as u32)));
        let q: Vec<f32> = (0..2 * 16)
            .map(|j| if j % 16 == 1 { 1.0 } else { 0.0 })
            .collect();
        let rows = cache.selected_rows(0, 0, &q);
        assert_eq!(rows.len(), budget);
        for r in at..at + planted {
            assert!(rows.contains(&r), "planted row {r} not read: {rows:?}");
        }
    }

    /// With a budget of at least every position, prefill and decode give
    /// the dense cache's outputs bit for bit (the same rows in the same
    /// order through the same `attend_segments`), and reads are all rows.
    #[test]
    fn large_budget_is_dense_bitwise() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let n = 200;
        let data = random_data(&mut rng, SHAPE, n);
        let mut dense = DenseKv::new(SHAPE, n);
        let want = drive(&mut dense, SHAPE, &data, n, 64, 150);
        let mut cache = Dhsa
            .empty(&plan(SHAPE, n, n))
            .expect("DHSA runs its own prefill");
        assert!(cache.is_empty());
        let got = drive(&mut *cache, SHAPE, &data, n, 64, 150);
        assert_eq!(got, want);
        assert_eq!(cache.reads(), dense.reads());
    }

    /// Read accounting over a prefill and decode run: one call per
    /// (position, layer, KV head), `min(n, budget)` rows read out of `n`
    /// committed, block rows not counted.
    #[test]
    fn reads_count_the_budget() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (n, budget, steps_from) = (260, 70, 192);
        let data = random_data(&mut rng, SHAPE, n);
        let mut cache = DhsaKv::new(SHAPE, budget, n);
        drive(&mut cache, SHAPE, &data, n, 64, steps_from);
        let per = (SHAPE.n_layers * SHAPE.n_kv_heads) as u64;
        let (mut read, mut visible) = (0u64, 0u64);
        for pos in 0..n {
            let seen = if pos < steps_from { pos / 64 * 64 } else { pos };
            read += seen.min(budget) as u64 * per;
            visible += seen as u64 * per;
        }
        let r = cache.reads();
        assert_eq!(r.calls, n as u64 * per);
        assert_eq!((r.rows_read, r.rows_visible), (read, visible));
        assert!(r.share() < 0.5);
    }

    /// `truncate` restores the state a shorter sequence had: the same
    /// chunks and the same outputs when the forgotten positions are
    /// appended again; truncating past the end is a no-op.
    #[test]
    fn truncate_restores_the_earlier_state() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let n = 300;
        let data = random_data(&mut rng, SHAPE, n);
        let mut fresh = DhsaKv::new(SHAPE, 60, n);
        let want = drive(&mut fresh, SHAPE, &data, n, 64, 128);
        for cut in [0usize, 5, 128, 131, 250] {
            let mut cache = DhsaKv::new(SHAPE, 60, n);
            drive(&mut cache, SHAPE, &data, n, 64, 128);
            let bytes = cache.bytes();
            cache.truncate(n + 10).unwrap();
            assert_eq!(cache.bytes(), bytes);
            cache.truncate(cut).unwrap();
            assert_eq!(cache.len(), cut);
            let mut shorter = DhsaKv::new(SHAPE, 60, n);
            drive(&mut shorter, SHAPE, &data, cut, 64, 128);
            for l in 0..SHAPE.n_layers {
                assert_eq!(cache.chunk_ends(l), shorter.chunk_ends(l), "cut {cut}");
                assert_eq!(cache.chunks[l].contrast, shorter.chunks[l].contrast);
                assert_eq!(cache.chunks[l].decided, shorter.chunks[l].decided);
                assert_eq!(cache.tail_rep(l), shorter.tail_rep(l));
            }
            // Appending the rest again, one step at a time, reproduces the
            // original outputs for the decode positions.
            let d = SHAPE.kv_dim();
            let tail = Data {
                k: data.k.iter().map(|k| k[cut * d..].to_vec()).collect(),
                v: data.v.iter().map(|v| v[cut * d..].to_vec()).collect(),
                q: data
                    .q
                    .iter()
                    .map(|q| q[cut * N_REP * d..].to_vec())
                    .collect(),
            };
            let again = drive_from(&mut cache, &tail, cut, n);
            for pos in cut.max(128)..n {
                assert_eq!(again[pos - cut], want[pos], "cut {cut} pos {pos}");
            }
        }
    }

    /// `drive` for positions `from..n` in single steps on a cache already
    /// holding `from` positions (`data` starts at `from`).
    fn drive_from(
        cache: &mut DhsaKv,
        data: &Data,
        from: usize,
        n: usize,
    ) -> Vec<Vec<Vec<Vec<f32>>>> {
        let (d, hd) = (SHAPE.kv_dim(), SHAPE.head_dim);
        let qd = N_REP * d;
        let mut outs = Vec::new();
        for i in 0..n - from {
            let mut row = vec![Vec::new(); SHAPE.n_layers];
            for (l, row) in row.iter_mut().enumerate() {
                let (bk, bv) = (
                    &data.k[l][i * d..(i + 1) * d],
                    &data.v[l][i * d..(i + 1) * d],
                );
                let blk = BlockKv {
                    k: bk,
                    v: bv,
                    rows: &[0],
                };
                for g in 0..SHAPE.n_kv_heads {
                    let q = &data.q[l][i * qd + g * N_REP * hd..i * qd + (g + 1) * N_REP * hd];
                    let mut out = vec![0f32; N_REP * hd];
                    cache.attend(l, g, q, &blk, &mut Vec::new(), &mut out);
                    row.push(out);
                }
            }
            for l in 0..SHAPE.n_layers {
                cache.append(
                    l,
                    from + i,
                    &data.k[l][i * d..(i + 1) * d],
                    &data.v[l][i * d..(i + 1) * d],
                );
            }
            outs.push(row);
        }
        outs
    }

    /// Bytes: every key and value, plus the chunk metadata.
    #[test]
    fn bytes_count_keys_values_and_chunks() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let n = 150;
        let data = random_data(&mut rng, SHAPE, n);
        let mut cache = DhsaKv::new(SHAPE, 30, n);
        drive(&mut cache, SHAPE, &data, n, 64, n);
        let d = SHAPE.kv_dim();
        let meta: usize = (0..SHAPE.n_layers)
            .map(|l| {
                let c = cache.chunk_ends(l).len();
                4 * (c + c * d + (n - BOUNDARY_WINDOW) + d) + std::mem::size_of::<usize>()
            })
            .sum();
        assert_eq!(cache.bytes(), 2 * n * d * 4 * SHAPE.n_layers + meta);
        assert_eq!(Dhsa.id(), "dhsa");
    }
}
