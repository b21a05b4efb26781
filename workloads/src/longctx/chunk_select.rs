//! Training-free ChunkLLM chunk selection (after Ouyang, Lv, Ren, Wei,
//! Wang, Feng; arXiv 2510.02361): entry `chunk-select`.
//!
//! # The paper's method
//!
//! ChunkLLM adds two trained modules to a frozen model. A Chunk Adapter, a
//! feed-forward layer on the first layer's hidden states, marks a token as
//! a chunk boundary when `sigmoid(FFN(h_i)) > alpha`; its training labels
//! come from a rule-based sentence splitter. At every layer, a QK Adapter
//! compresses queries and keys and scores chunks; it is trained by
//! distillation (a KL divergence) to reproduce the full attention's mass
//! summed per chunk. At inference the top-k chunks by that score are
//! selected, and, because the tokens of one chunk attend to nearly the
//! same earlier chunks (the paper's Intra-Chunk Attention Consistency),
//! the selection is recomputed only when the current token is a chunk
//! boundary; the tokens in between reuse it.
//!
//! # The training-free form implemented here
//!
//! - Chunk Adapter -> `plan.boundary`: a chunk ends at a token whose text
//!   ends a sentence or a line (the splitter's notion of a boundary, which
//!   the adapter was trained to imitate), or when it reaches the cap
//!   [`chunk_cap`]: [`MAX_CHUNK_LEN`] tokens, never more than a quarter of
//!   the budget. Prompt tokens come from `plan.prompt`, later ones from
//!   [`KvCache::begin_block`]. Chunks are the same for every layer, as one
//!   adapter serves them all.
//! - QK Adapter -> the model's own attention, which is what the adapter is
//!   distilled to imitate. A *selection step* is the first decode step
//!   after the prefill and every step whose token ends a chunk. Its query
//!   attends to the whole cache (its output is dense attention, bit for
//!   bit); its softmax probabilities are summed per chunk (closed chunks
//!   and the open one before it) and over the query heads that share the
//!   KV head, and the chunks are taken in order of that mass (ties: the
//!   later chunk) while they fit in `budget - (cap - 1)` positions, a
//!   chunk that does not fit being skipped. The selection is kept per
//!   (layer, KV head).
//! - Between selection steps a query reads the selected chunks plus every
//!   position from the selection step on (the chunk being written, which
//!   the selection could not contain). The next boundary comes within
//!   `cap` tokens, so that part holds at most `cap - 1` positions and the
//!   read stays within the budget; only selection steps read everything.
//!
//! The prefill is the shared dense one ([`Policy::from_dense`] copies its
//! keys and values and chunks the prompt); `Policy::empty` is the default
//! `None`. Every key and value is kept: a selection step ranks every chunk
//! of the history, so a chunk left out now can be chosen at the next
//! boundary. [`KvCache::truncate`] restores the earlier state exactly: it
//! drops the chunks that end past the new length and the selections made
//! by queries there (a history of selections is kept for that).
//!
//! # Departures, and why
//!
//! - Both adapters are replaced as above: we train nothing. The boundary
//!   table is a punctuation rule, not the adapter's contextual decision;
//!   the chunk scores are exact attention masses, not the adapter's
//!   compressed estimate, at the cost of one dense query per chunk.
//! - The cap on chunk length is ours: a run without punctuation (a long
//!   list, a URL, encoded data) would otherwise be one chunk that the
//!   budget cannot hold, and the part read in full between selections
//!   would grow without bound.
//! - Selection is per KV head, because each `attend` call sees only the
//!   query heads that share one KV head.
//! - The budget is in positions, not in a chunk count `k`: chunks vary in
//!   length, and every method here is held to the same positions per
//!   query.
//! - We could not confirm from the paper's text whether unselected chunks
//!   leave memory; we keep them (see above), so the cache's bytes are the
//!   dense ones plus metadata, and the saving shows in reads.
//! - In a block of several rows after the prefill (a verification tree,
//!   or more prompt), only the first row, which is always committed, can
//!   make a selection; the later rows read the selection made before the
//!   block with at most `cap - 1` of the newest positions, because the
//!   rows of a block are attended concurrently and the cache cannot tell
//!   which tree rows will be committed. The next one-row step reselects if
//!   a chunk ended meanwhile. The tokens of a committed block are taken
//!   from its rows in order, which is exact for prompt blocks and decode
//!   steps but not for a tree's accepted path.

use std::cell::RefCell;
use std::sync::{Mutex, MutexGuard};

use super::policy::{Plan, Policy};
use crate::decoder::kernels::dot;
use crate::decoder::{
    attend_segments, BlockKv, DecoderError, DenseKv, KvCache, KvShape, ReadCounter, Reads, Rows,
    Segment,
};

/// Longest chunk without a boundary token, about a long English sentence
/// in BPE tokens.
pub const MAX_CHUNK_LEN: usize = 32;

/// The chunk cap for a budget: [`MAX_CHUNK_LEN`], at most a quarter of the
/// budget (so several chunks fit beside the part read in full), at least
/// one.
pub fn chunk_cap(budget: usize) -> usize {
    MAX_CHUNK_LEN.min((budget / 4).max(1))
}

/// The `chunk-select` entry (training-free ChunkLLM).
#[derive(Debug, Clone, Copy, Default)]
pub struct ChunkSelect;

impl Policy for ChunkSelect {
    fn id(&self) -> &'static str {
        "chunk-select"
    }

    fn from_dense(&self, dense: &DenseKv, plan: &Plan<'_>) -> Box<dyn KvCache> {
        Box::new(ChunkSelectKv::from_dense(dense, plan))
    }
}

/// The chunks one selection step chose for one (layer, KV head).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Position of the query that made it; later queries read this
    /// position and every one after it in full.
    pub pos: usize,
    /// The chosen chunks as `[start, end)` position ranges, in order.
    pub chunks: Vec<(usize, usize)>,
}

impl Selection {
    fn bytes(&self) -> usize {
        std::mem::size_of::<usize>() + self.chunks.len() * std::mem::size_of::<(usize, usize)>()
    }
}

thread_local! {
    static ROWS: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

fn lock(m: &Mutex<Vec<Selection>>) -> MutexGuard<'_, Vec<Selection>> {
    // A panic elsewhere cannot leave a history half-written (pushes are
    // single calls), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether token `t` is set in the bitset `set`.
fn bit(set: &[u64], t: u32) -> bool {
    let t = t as usize;
    set.get(t / 64).is_some_and(|w| (w >> (t % 64)) & 1 == 1)
}

/// The training-free ChunkLLM cache: every key and value, the chunk
/// bounds, and per (layer, KV head) the history of selections. See the
/// module documentation.
#[derive(Debug)]
pub struct ChunkSelectKv {
    kv: DenseKv,
    budget: usize,
    cap: usize,
    /// Bit `t`: vocabulary token `t` ends a sentence or a line.
    boundary: Vec<u64>,
    /// Exclusive ends of the closed chunks (committed positions).
    ends: Vec<u32>,
    /// The block in flight: its first position, and for each of its rows
    /// whether the token is a boundary.
    block_pos: usize,
    block_ends: Vec<bool>,
    /// Per `layer * n_kv_heads + kv_head`: selections, oldest first.
    history: Vec<Mutex<Vec<Selection>>>,
    reads: ReadCounter,
}

impl ChunkSelectKv {
    /// The cache after the dense prefill `dense` of `plan.prompt`, with
    /// room for `plan.max_new` more positions.
    pub fn from_dense(dense: &DenseKv, plan: &Plan<'_>) -> ChunkSelectKv {
        let shape = dense.shape();
        let n = dense.len();
        let mut kv = DenseKv::new(shape, n + plan.max_new + 1);
        for l in 0..shape.n_layers {
            kv.append(l, 0, dense.keys(l), dense.values(l));
        }
        let mut boundary = vec![0u64; plan.boundary.len().div_ceil(64)];
        for (t, _) in plan.boundary.iter().enumerate().filter(|(_, &b)| b) {
            boundary[t / 64] |= 1 << (t % 64);
        }
        let mut cache = ChunkSelectKv {
            kv,
            budget: plan.budget,
            cap: chunk_cap(plan.budget),
            block_ends: plan.prompt.iter().map(|&t| bit(&boundary, t)).collect(),
            boundary,
            ends: Vec::new(),
            block_pos: 0,
            history: (0..shape.n_layers * shape.n_kv_heads)
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            reads: ReadCounter::default(),
        };
        cache.commit(0, n);
        cache.block_pos = n;
        cache.block_ends.clear();
        cache
    }

    pub fn shape(&self) -> KvShape {
        self.kv.shape()
    }

    /// The longest chunk for this cache's budget ([`chunk_cap`]).
    pub fn chunk_cap(&self) -> usize {
        self.cap
    }

    /// Exclusive ends of the closed chunks.
    pub fn chunk_ends(&self) -> &[u32] {
        &self.ends
    }

    /// The newest selection of (`layer`, `kv_head`), if any.
    pub fn selection(&self, layer: usize, kv_head: usize) -> Option<Selection> {
        lock(&self.history[layer * self.kv.shape().n_kv_heads + kv_head])
            .last()
            .cloned()
    }

    /// Selections (`layer`, `kv_head`) has made and still holds.
    pub fn selections_made(&self, layer: usize, kv_head: usize) -> usize {
        lock(&self.history[layer * self.kv.shape().n_kv_heads + kv_head]).len()
    }

    fn tail_start(&self) -> usize {
        self.ends.last().map_or(0, |&e| e as usize)
    }

    /// Closes the chunks that positions `pos..pos + rows` (rows of the
    /// block in flight, in order) end.
    fn commit(&mut self, pos: usize, rows: usize) {
        for p in pos..pos + rows {
            let marked = p
                .checked_sub(self.block_pos)
                .and_then(|i| self.block_ends.get(i))
                .copied()
                .unwrap_or(false);
            if marked || p + 1 - self.tail_start() >= self.cap {
                self.ends.push(p as u32 + 1);
            }
        }
    }

    /// Whether the first row of the block in flight ends a chunk.
    fn root_ends_chunk(&self) -> bool {
        self.block_ends.first() == Some(&true) || self.block_pos + 1 - self.tail_start() >= self.cap
    }

    /// The chunks a selection step with query `q` keeps: chunk attention
    /// mass (softmax over the `n` cached rows and the block rows, summed
    /// per chunk and over the query heads), largest first, while they fit.
    fn select(
        &self,
        q: &[f32],
        kv_head: usize,
        keys: &[f32],
        n: usize,
        block: &BlockKv<'_>,
        scores: &mut Vec<f32>,
    ) -> Vec<(usize, usize)> {
        let shape = self.kv.shape();
        let (hd, d) = (shape.head_dim, shape.kv_dim());
        let off = kv_head * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut spans = Vec::with_capacity(self.ends.len() + 1);
        let mut start = 0;
        for &e in &self.ends {
            spans.push((start, e as usize));
            start = e as usize;
        }
        if start < n {
            spans.push((start, n));
        }
        let mut mass = vec![0f64; spans.len()];
        for qh in q.chunks_exact(hd) {
            scores.clear();
            scores.extend((0..n).map(|r| dot(qh, &keys[r * d + off..r * d + off + hd]) * scale));
            scores.extend(
                block
                    .rows
                    .iter()
                    .map(|&r| dot(qh, &block.k[r * d + off..r * d + off + hd]) * scale),
            );
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut z = 0f64;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                z += *s as f64;
            }
            for (m, &(a, b)) in mass.iter_mut().zip(&spans) {
                *m += scores[a..b].iter().map(|&e| e as f64).sum::<f64>() / z;
            }
        }
        let mut order: Vec<usize> = (0..spans.len()).collect();
        order.sort_unstable_by(|&x, &y| mass[y].total_cmp(&mass[x]).then(y.cmp(&x)));
        let room = self.budget + 1 - self.cap;
        let mut keep = vec![false; spans.len()];
        let mut used = 0;
        for c in order {
            let len = spans[c].1 - spans[c].0;
            if used + len <= room {
                keep[c] = true;
                used += len;
            }
        }
        spans
            .into_iter()
            .zip(keep)
            .filter_map(|(s, k)| k.then_some(s))
            .collect()
    }
}

impl KvCache for ChunkSelectKv {
    fn append(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        self.kv.append(layer, pos, k, v);
        let shape = self.kv.shape();
        if layer + 1 == shape.n_layers {
            self.commit(pos, k.len() / shape.kv_dim());
        }
    }

    fn len(&self) -> usize {
        self.kv.len()
    }

    fn truncate(&mut self, len: usize) -> Result<(), DecoderError> {
        if len >= self.kv.len() {
            return Ok(());
        }
        self.kv.truncate(len)?;
        let keep = self.ends.partition_point(|&e| e as usize <= len);
        self.ends.truncate(keep);
        for h in &mut self.history {
            let h = h.get_mut().unwrap_or_else(|e| e.into_inner());
            while h.last().is_some_and(|s| s.pos >= len) {
                h.pop();
            }
        }
        self.block_pos = len;
        self.block_ends.clear();
        Ok(())
    }

    fn begin_block(&mut self, pos: usize, tokens: &[u32]) {
        self.block_pos = pos;
        self.block_ends.clear();
        let set = &self.boundary;
        self.block_ends.extend(tokens.iter().map(|&t| bit(set, t)));
        // A selection tagged at or after `pos` came from a block that was
        // never committed (a verification not accepted).
        for h in &mut self.history {
            let h = h.get_mut().unwrap_or_else(|e| e.into_inner());
            while h.last().is_some_and(|s| s.pos >= pos) {
                h.pop();
            }
        }
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
        let (hd, d) = (shape.head_dim, shape.kv_dim());
        let (keys, values) = (self.kv.keys(layer), self.kv.values(layer));
        let n = keys.len() / d;
        let in_flight = Segment {
            k: block.k,
            v: block.v,
            rows: Rows::List(block.rows),
            bias: None,
        };
        let slot = &self.history[layer * shape.n_kv_heads + kv_head];
        // Only the block's first row is sure to be committed, so only it
        // may select; the others read what was selected before the block.
        let select = block.rows.len() == 1 && {
            let h = lock(slot);
            match h.iter().rev().find(|s| s.pos < self.block_pos) {
                None => true,
                Some(s) => {
                    self.root_ends_chunk()
                        || self.ends.last().is_some_and(|&e| e as usize > s.pos + 1)
                }
            }
        };
        if select {
            let segments = [
                Segment {
                    k: keys,
                    v: values,
                    rows: Rows::Range(0, n),
                    bias: None,
                },
                in_flight,
            ];
            attend_segments(q, hd, d, kv_head, &segments, scores, out);
            self.reads.add(n, n);
            let chunks = self.select(q, kv_head, keys, n, block, scores);
            lock(slot).push(Selection {
                pos: self.block_pos,
                chunks,
            });
            return;
        }
        ROWS.with(|rows| {
            let mut rows = rows.borrow_mut();
            rows.clear();
            match lock(slot).iter().rev().find(|s| s.pos < self.block_pos) {
                Some(s) => {
                    for &(a, z) in &s.chunks {
                        rows.extend(a..z);
                    }
                    rows.extend(s.pos.max(n.saturating_sub(self.cap - 1))..n);
                }
                // Rows after the first of the very first block after the
                // prefill: nothing is selected yet, so the newest
                // positions stand in.
                None => rows.extend(n.saturating_sub(self.budget)..n),
            }
            let segments = [
                Segment {
                    k: keys,
                    v: values,
                    rows: Rows::List(&rows),
                    bias: None,
                },
                in_flight,
            ];
            attend_segments(q, hd, d, kv_head, &segments, scores, out);
            self.reads.add(rows.len(), n);
        });
    }

    fn bytes(&self) -> usize {
        self.kv.bytes()
            + 8 * self.boundary.len()
            + 4 * self.ends.len()
            + self.block_ends.len()
            + self
                .history
                .iter()
                .map(|h| lock(h).iter().map(Selection::bytes).sum::<usize>())
                .sum::<usize>()
    }

    fn reads(&self) -> Reads {
        self.reads.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const SHAPE: KvShape = KvShape {
        n_layers: 2,
        n_kv_heads: 2,
        head_dim: 8,
    };
    const N_REP: usize = 2;
    /// Tokens `0` and `1` of the test vocabulary end a sentence.
    const VOCAB: usize = 100;

    fn table() -> Vec<bool> {
        (0..VOCAB).map(|t| t < 2).collect()
    }

    fn uniform(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// A token that ends a sentence about one time in ten.
    fn token(rng: &mut ChaCha8Rng) -> u32 {
        if rng.random_range(0..10) == 0 {
            rng.random_range(0..2)
        } else {
            rng.random_range(2..VOCAB as u32)
        }
    }

    /// One decode position: its token, and per layer its key, value and
    /// query (every query head).
    struct Step {
        token: u32,
        k: Vec<Vec<f32>>,
        v: Vec<Vec<f32>>,
        q: Vec<Vec<f32>>,
    }

    fn random_step(rng: &mut ChaCha8Rng, token: u32) -> Step {
        let d = SHAPE.kv_dim();
        Step {
            token,
            k: (0..SHAPE.n_layers).map(|_| uniform(rng, d)).collect(),
            v: (0..SHAPE.n_layers).map(|_| uniform(rng, d)).collect(),
            q: (0..SHAPE.n_layers)
                .map(|_| uniform(rng, N_REP * d))
                .collect(),
        }
    }

    fn group(q: &[f32], g: usize) -> &[f32] {
        let w = N_REP * SHAPE.head_dim;
        &q[g * w..(g + 1) * w]
    }

    /// A one-position block through `cache` as the decoder runs it:
    /// outputs `[layer][kv_head]`.
    fn step(cache: &mut dyn KvCache, pos: usize, s: &Step) -> Vec<Vec<Vec<f32>>> {
        cache.begin_block(pos, &[s.token]);
        let mut outs = vec![Vec::new(); SHAPE.n_layers];
        for (l, out_l) in outs.iter_mut().enumerate() {
            let block = BlockKv {
                k: &s.k[l],
                v: &s.v[l],
                rows: &[0],
            };
            for g in 0..SHAPE.n_kv_heads {
                let mut out = vec![0f32; N_REP * SHAPE.head_dim];
                cache.attend(l, g, group(&s.q[l], g), &block, &mut Vec::new(), &mut out);
                out_l.push(out);
            }
        }
        for l in 0..SHAPE.n_layers {
            cache.append(l, pos, &s.k[l], &s.v[l]);
        }
        outs
    }

    /// A prompt of `n` random positions: tokens, and a dense cache.
    fn prompt(rng: &mut ChaCha8Rng, n: usize) -> (Vec<u32>, DenseKv) {
        let d = SHAPE.kv_dim();
        let tokens: Vec<u32> = (0..n).map(|_| token(rng)).collect();
        let mut dense = DenseKv::new(SHAPE, n + 64);
        for l in 0..SHAPE.n_layers {
            dense.append(l, 0, &uniform(rng, n * d), &uniform(rng, n * d));
        }
        (tokens, dense)
    }

    fn plan<'a>(tokens: &'a [u32], boundary: &'a [bool], budget: usize) -> Plan<'a> {
        Plan {
            shape: SHAPE,
            context: tokens.len(),
            budget,
            prompt: tokens,
            boundary,
            max_new: 64,
        }
    }

    /// Chunk ends by the rule, in one pass over `tokens`.
    fn rule_ends(tokens: &[u32], cap: usize) -> Vec<u32> {
        let mut ends = Vec::new();
        let mut start = 0;
        for (p, &t) in tokens.iter().enumerate() {
            if t < 2 || p + 1 - start >= cap {
                ends.push(p as u32 + 1);
                start = p + 1;
            }
        }
        ends
    }

    /// The selection a query should make, by brute force in f64: softmax
    /// over the cached rows of `keys` (`n` of them, chunked by `tokens`)
    /// and the query's own key, mass summed per chunk and head, chunks by
    /// mass (ties: later) while they fit in `budget + 1 - cap`.
    fn brute_selection(
        keys: &[f32],
        own: &[f32],
        q: &[f32],
        g: usize,
        tokens: &[u32],
        budget: usize,
    ) -> Vec<(usize, usize)> {
        let (hd, d) = (SHAPE.head_dim, SHAPE.kv_dim());
        let n = tokens.len();
        let cap = chunk_cap(budget);
        let mut spans = Vec::new();
        let mut start = 0;
        for e in rule_ends(tokens, cap) {
            spans.push((start, e as usize));
            start = e as usize;
        }
        if start < n {
            spans.push((start, n));
        }
        let key = |r: usize| -> &[f32] {
            if r < n {
                &keys[r * d + g * hd..r * d + (g + 1) * hd]
            } else {
                &own[g * hd..(g + 1) * hd]
            }
        };
        let mut mass = vec![0f64; spans.len()];
        for qh in q.chunks_exact(hd) {
            let s: Vec<f64> = (0..=n)
                .map(|r| {
                    qh.iter()
                        .zip(key(r))
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let m = s.iter().copied().fold(f64::MIN, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for (c, &(a, b)) in spans.iter().enumerate() {
                mass[c] += (a..b).map(|r| (s[r] - m).exp() / z).sum::<f64>();
            }
        }
        let mut order: Vec<usize> = (0..spans.len()).collect();
        order.sort_by(|&x, &y| mass[y].total_cmp(&mass[x]).then(y.cmp(&x)));
        let mut keep = vec![false; spans.len()];
        let mut used = 0;
        for c in order {
            let len = spans[c].1 - spans[c].0;
            if used + len <= budget + 1 - cap {
                keep[c] = true;
                used += len;
            }
        }
        (0..spans.len())
            .filter(|&c| keep[c])
            .map(|c| spans[c])
            .collect()
    }

    /// Float64 softmax attention of the heads of `q` over KV head `g` of
    /// whole rows `kv`, in order.
    fn reference(q: &[f32], g: usize, kv: &[(&[f32], &[f32])]) -> Vec<f64> {
        let hd = SHAPE.head_dim;
        let off = g * hd;
        let mut out = vec![0f64; q.len()];
        for (h, qh) in q.chunks_exact(hd).enumerate() {
            let s: Vec<f64> = kv
                .iter()
                .map(|(k, _)| {
                    qh.iter()
                        .zip(&k[off..off + hd])
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let m = s.iter().copied().fold(f64::MIN, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for (j, o) in out[h * hd..(h + 1) * hd].iter_mut().enumerate() {
                *o = kv
                    .iter()
                    .zip(&e)
                    .map(|((_, v), p)| v[off + j] as f64 * p)
                    .sum::<f64>()
                    / z;
            }
        }
        out
    }

    /// Relative error below 1e-5: f32 terms of magnitude <= 1 summed over
    /// at most ~300 rows (rounding ~1e-6 at worst in practice), where
    /// reading one wrong chunk moves an output by ~1e-2.
    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        for (g, w) in got.iter().zip(want) {
            assert!(
                (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "{what}: {g} vs {w}"
            );
        }
    }

    /// Rows `rows` of layer `l` of `dense` followed by the step's own row.
    fn rows_with_own<'a>(
        dense: &'a DenseKv,
        l: usize,
        rows: &[usize],
        s: &'a Step,
    ) -> Vec<(&'a [f32], &'a [f32])> {
        let d = SHAPE.kv_dim();
        let (k, v) = (dense.keys(l), dense.values(l));
        rows.iter()
            .map(|&r| (&k[r * d..(r + 1) * d], &v[r * d..(r + 1) * d]))
            .chain(std::iter::once((&s.k[l][..], &s.v[l][..])))
            .collect()
    }

    /// Chunks end after boundary tokens and at the cap, in the prompt and
    /// while decoding; the cap follows the budget.
    #[test]
    fn chunks_end_at_boundary_tokens_or_the_cap() {
        assert_eq!(
            [1, 7, 25, 64, 100, 1000].map(chunk_cap),
            [1, 1, 6, 16, 25, 32]
        );
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (mut tokens, dense) = prompt(&mut rng, 300);
        let boundary = table();
        let mut cache = ChunkSelectKv::from_dense(&dense, &plan(&tokens, &boundary, 64));
        assert_eq!(cache.chunk_cap(), 16);
        assert_eq!(cache.chunk_ends(), &rule_ends(&tokens, 16)[..]);
        for pos in 300..340 {
            let t = token(&mut rng);
            let s = random_step(&mut rng, t);
            step(&mut cache, pos, &s);
            tokens.push(s.token);
        }
        assert_eq!(cache.chunk_ends(), &rule_ends(&tokens, 16)[..]);
        assert!(cache.chunk_ends().windows(2).all(|w| w[1] - w[0] <= 16));
        assert_eq!(ChunkSelect.id(), "chunk-select");
        assert!(ChunkSelect.empty(&plan(&tokens, &boundary, 64)).is_none());
    }

    /// The first decode step attends densely (bit for bit the dense
    /// cache's output) and selects, per (layer, KV head), the chunks a
    /// brute-force f64 attention-mass ranking selects, within the budget.
    #[test]
    fn first_step_is_dense_and_selects_the_top_mass_chunks() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (n, budget) = (240, 64);
        let (tokens, dense) = prompt(&mut rng, n);
        let boundary = table();
        let p = plan(&tokens, &boundary, budget);
        assert_eq!(ChunkSelect.from_dense(&dense, &p).len(), n);
        let mut cache = ChunkSelectKv::from_dense(&dense, &p);
        let mut full = dense.clone();
        let s = random_step(&mut rng, 50);
        let want = step(&mut full, n, &s);
        assert_eq!(step(&mut cache, n, &s), want);
        for l in 0..SHAPE.n_layers {
            for g in 0..SHAPE.n_kv_heads {
                let sel = cache.selection(l, g).expect("the first step selects");
                assert_eq!(sel.pos, n);
                let brute = brute_selection(
                    dense.keys(l),
                    &s.k[l],
                    group(&s.q[l], g),
                    g,
                    &tokens,
                    budget,
                );
                assert_eq!(sel.chunks, brute, "layer {l} head {g}");
                let held: usize = sel.chunks.iter().map(|(a, b)| b - a).sum();
                assert!(held <= budget + 1 - cache.chunk_cap() && held > budget / 2);
            }
        }
        let per = (SHAPE.n_layers * SHAPE.n_kv_heads) as u64;
        assert_eq!(
            cache.reads(),
            Reads {
                calls: per,
                rows_read: n as u64 * per,
                rows_visible: n as u64 * per,
            }
        );
    }

    /// A non-boundary step reuses the previous selection and reads its
    /// chunks plus the positions since (checked against f64 attention over
    /// exactly those rows); a boundary step attends densely and selects
    /// afresh, as brute force says.
    #[test]
    fn selection_changes_only_at_boundary_tokens() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (n, budget) = (240, 64);
        let (mut tokens, dense) = prompt(&mut rng, n);
        // The prompt ends a sentence, so the chunk cap is far away.
        tokens[n - 1] = 0;
        let boundary = table();
        let mut cache = ChunkSelectKv::from_dense(&dense, &plan(&tokens, &boundary, budget));
        let mut full = dense.clone();
        let per = SHAPE.n_layers * SHAPE.n_kv_heads;
        let mut selections: Vec<Option<Selection>> = vec![None; per];
        for (i, t) in [5u32, 7, 9, 0, 4, 6].into_iter().enumerate() {
            let pos = n + i;
            let s = random_step(&mut rng, t);
            let before = cache.reads();
            let got = step(&mut cache, pos, &s);
            let dense_out = step(&mut full, pos, &s);
            let read = cache.reads().rows_read - before.rows_read;
            let selects = i == 0 || t < 2;
            let mut want_read = 0;
            for l in 0..SHAPE.n_layers {
                for g in 0..SHAPE.n_kv_heads {
                    let slot = l * SHAPE.n_kv_heads + g;
                    let sel = cache.selection(l, g).unwrap();
                    if selects {
                        assert_eq!(sel.pos, pos);
                        let brute = brute_selection(
                            &full.keys(l)[..pos * SHAPE.kv_dim()],
                            &s.k[l],
                            group(&s.q[l], g),
                            g,
                            &tokens,
                            budget,
                        );
                        assert_eq!(sel.chunks, brute, "step {i} layer {l} head {g}");
                        assert_eq!(got[l][g], dense_out[l][g]);
                        want_read += pos;
                        selections[slot] = Some(sel);
                    } else {
                        let prev = selections[slot].as_ref().unwrap();
                        assert_eq!(&sel, prev, "step {i}: a non-boundary step reselected");
                        let rows: Vec<usize> = prev
                            .chunks
                            .iter()
                            .flat_map(|&(a, b)| a..b)
                            .chain(prev.pos..pos)
                            .collect();
                        assert!(rows.len() <= budget);
                        want_read += rows.len();
                        let kv = rows_with_own(&full, l, &rows, &s);
                        let want = reference(group(&s.q[l], g), g, &kv);
                        assert_close(&got[l][g], &want, &format!("step {i} layer {l} head {g}"));
                    }
                    assert_eq!(cache.selections_made(l, g), 1 + usize::from(i >= 3));
                }
            }
            assert_eq!(read as usize, want_read, "step {i}");
            tokens.push(t);
        }
    }

    /// A budget above every position keeps every chunk, so decoding gives
    /// the dense cache's outputs bit for bit (the same rows in the same
    /// order through `attend_segments`) and reads every row.
    #[test]
    fn large_budget_is_dense_bitwise() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let n = 150;
        let (tokens, dense) = prompt(&mut rng, n);
        let boundary = table();
        let mut cache = ChunkSelect.from_dense(&dense, &plan(&tokens, &boundary, 10_000));
        let mut full = dense.clone();
        full.reset_reads();
        for pos in n..n + 40 {
            let t = token(&mut rng);
            let s = random_step(&mut rng, t);
            assert_eq!(
                step(&mut *cache, pos, &s),
                step(&mut full, pos, &s),
                "pos {pos}"
            );
        }
        assert_eq!(cache.reads(), full.reads());
    }

    /// Over a long decode, every step reads either everything (selection
    /// steps: the first, boundary tokens, chunks reaching the cap) or at
    /// most the budget, and the counters add up.
    #[test]
    fn reads_respect_the_budget_between_selections() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (n, budget) = (300, 40);
        let (mut tokens, dense) = prompt(&mut rng, n);
        let boundary = table();
        let mut cache = ChunkSelectKv::from_dense(&dense, &plan(&tokens, &boundary, budget));
        let cap = cache.chunk_cap();
        let per = (SHAPE.n_layers * SHAPE.n_kv_heads) as u64;
        let (mut sparse, mut dense_steps) = (0, 0);
        for pos in n..n + 80 {
            let t = token(&mut rng);
            let s = random_step(&mut rng, t);
            let start = rule_ends(&tokens, cap).last().map_or(0, |&e| e as usize);
            let selects = pos == n || s.token < 2 || pos + 1 - start >= cap;
            let before = cache.reads();
            step(&mut cache, pos, &s);
            let after = cache.reads();
            assert_eq!(after.calls - before.calls, per);
            assert_eq!(after.rows_visible - before.rows_visible, pos as u64 * per);
            let read = after.rows_read - before.rows_read;
            if selects {
                assert_eq!(read, pos as u64 * per, "pos {pos}");
                assert_eq!(cache.selection(0, 0).unwrap().pos, pos);
                dense_steps += 1;
            } else {
                let mut want = 0;
                for l in 0..SHAPE.n_layers {
                    for g in 0..SHAPE.n_kv_heads {
                        let sel = cache.selection(l, g).unwrap();
                        let held: usize = sel.chunks.iter().map(|(a, b)| b - a).sum();
                        assert!(held + (pos - sel.pos) <= budget, "pos {pos}");
                        want += (held + pos - sel.pos) as u64;
                    }
                }
                assert_eq!(read, want, "pos {pos}");
                sparse += 1;
            }
            tokens.push(s.token);
        }
        assert!(
            sparse > 40 && dense_steps > 5,
            "{sparse} sparse, {dense_steps} dense"
        );
        assert!(cache.reads().share() < 0.5);
    }

    /// `truncate` forgets the chunks and selections of the dropped
    /// positions: decoding the same steps again gives the same bits, and
    /// truncating to the prompt gives back the state `from_dense` built.
    #[test]
    fn truncate_restores_the_earlier_state() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let (n, budget) = (200, 48);
        let (tokens, dense) = prompt(&mut rng, n);
        let boundary = table();
        let p = plan(&tokens, &boundary, budget);
        let steps: Vec<Step> = (0..30)
            .map(|_| {
                let t = token(&mut rng);
                random_step(&mut rng, t)
            })
            .collect();
        let mut cache = ChunkSelectKv::from_dense(&dense, &p);
        let fresh_bytes = cache.bytes();
        let fresh_ends = cache.chunk_ends().to_vec();
        let first: Vec<_> = (0..30)
            .map(|i| step(&mut cache, n + i, &steps[i]))
            .collect();
        cache.truncate(n + 100).unwrap();
        assert_eq!(cache.len(), n + 30);
        for cut in [17usize, 0] {
            cache.truncate(n + cut).unwrap();
            assert_eq!(cache.len(), n + cut);
            let again: Vec<_> = (cut..30)
                .map(|i| step(&mut cache, n + i, &steps[i]))
                .collect();
            assert_eq!(&again[..], &first[cut..], "after truncating to +{cut}");
        }
        cache.truncate(n).unwrap();
        assert_eq!(cache.chunk_ends(), &fresh_ends[..]);
        assert_eq!(cache.selection(1, 1), None);
        assert_eq!(cache.bytes(), fresh_bytes);
    }

    /// In a block of several rows after the prefill, the first row (a
    /// boundary token) selects densely, and the later rows read the
    /// earlier selection, at most `cap - 1` newest positions, and their
    /// block ancestors; the next block sees the first row's selection.
    #[test]
    fn later_rows_of_a_block_read_the_earlier_selection() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (n, budget) = (200, 64);
        let (mut tokens, dense) = prompt(&mut rng, n);
        tokens[n - 1] = 0;
        let boundary = table();
        let mut cache = ChunkSelectKv::from_dense(&dense, &plan(&tokens, &boundary, budget));
        let mut full = dense.clone();
        let s0 = random_step(&mut rng, 9);
        step(&mut cache, n, &s0);
        step(&mut full, n, &s0);
        let d = SHAPE.kv_dim();
        let rows3: Vec<Step> = [0u32, 5, 6]
            .into_iter()
            .map(|t| random_step(&mut rng, t))
            .collect();
        cache.begin_block(n + 1, &[0, 5, 6]);
        for l in 0..SHAPE.n_layers {
            let bk: Vec<f32> = rows3.iter().flat_map(|s| s.k[l].clone()).collect();
            let bv: Vec<f32> = rows3.iter().flat_map(|s| s.v[l].clone()).collect();
            for g in 0..SHAPE.n_kv_heads {
                let before = cache.selection(l, g).unwrap();
                for (i, s) in rows3.iter().enumerate() {
                    let ancestors: Vec<usize> = (0..=i).collect();
                    let block = BlockKv {
                        k: &bk,
                        v: &bv,
                        rows: &ancestors,
                    };
                    let mut out = vec![0f32; N_REP * SHAPE.head_dim];
                    cache.attend(l, g, group(&s.q[l], g), &block, &mut Vec::new(), &mut out);
                    let cached: Vec<usize> = if i == 0 {
                        (0..n + 1).collect()
                    } else {
                        before
                            .chunks
                            .iter()
                            .flat_map(|&(a, b)| a..b)
                            .chain(before.pos..n + 1)
                            .collect()
                    };
                    let (k, v) = (full.keys(l), full.values(l));
                    let kv: Vec<(&[f32], &[f32])> = cached
                        .iter()
                        .map(|&r| (&k[r * d..(r + 1) * d], &v[r * d..(r + 1) * d]))
                        .chain((0..=i).map(|j| (&bk[j * d..(j + 1) * d], &bv[j * d..(j + 1) * d])))
                        .collect();
                    let want = reference(group(&s.q[l], g), g, &kv);
                    assert_close(&out, &want, &format!("row {i} layer {l} head {g}"));
                }
                assert_eq!(cache.selection(l, g).unwrap().pos, n + 1);
            }
        }
        for l in 0..SHAPE.n_layers {
            let k: Vec<f32> = rows3.iter().flat_map(|s| s.k[l].clone()).collect();
            let v: Vec<f32> = rows3.iter().flat_map(|s| s.v[l].clone()).collect();
            cache.append(l, n + 1, &k, &v);
        }
        assert_eq!(cache.len(), n + 4);
        assert_eq!(*cache.chunk_ends().last().unwrap() as usize, n + 2);
        // An uncommitted block's selection is dropped at the next block.
        cache.begin_block(n + 4, &[0, 3]);
        let block = BlockKv {
            k: &rows3[0].k[0],
            v: &rows3[0].v[0],
            rows: &[0],
        };
        let mut out = vec![0f32; N_REP * SHAPE.head_dim];
        cache.attend(
            0,
            0,
            group(&rows3[0].q[0], 0),
            &block,
            &mut Vec::new(),
            &mut out,
        );
        assert_eq!(cache.selections_made(0, 0), 3);
        cache.begin_block(n + 4, &[3]);
        assert_eq!(cache.selections_made(0, 0), 2);
    }
}
