//! Training-free ChunkLLM chunk selection (after Ouyang, Lv, Ren, Wei,
//! Wang, Feng; arXiv 2510.02361): entries `chunk-select` (every key and
//! value kept, selection per layer and KV head), `chunk-select-vote` (the
//! same with the paper's cross-layer vote and local chunks) and
//! `chunk-select-evict` (what a selection leaves out is dropped), one
//! [`ChunkSelectKv`] over two kinds of storage.
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
//! `None`. In `chunk-select` every key and value is kept: a selection step
//! ranks every chunk of the history, so a chunk left out now can be
//! chosen at the next boundary. [`KvCache::truncate`] restores the earlier
//! state exactly: it drops the chunks that end past the new length and the
//! selections made by queries there (a history of selections is kept for
//! that).
//!
//! # Our evicting variant: `chunk-select-evict`
//!
//! ChunkLLM's abstract reports "48.58% key-value cache retention" (v1) and
//! "only 52.10% of key-value cache" (v2). Read alone, that suggests that
//! unselected chunks leave memory, and this entry was added to measure
//! that reading. The paper's text does not support it: in its Sec. 2.3
//! every update ranks all `c` chunks of the history (the end token's
//! chunk scores span every chunk) and retrieves the chosen ones from the
//! full K and V, which must therefore still hold the rest; and its Sec.
//! 3.2.1 calls the 48.58% a "KV cache usage rate", compared with
//! StreamingLLM's and SepLLM's, i.e. the share of the cache attention
//! works on, which is what our `read_share` measures for `chunk-select`.
//! So `chunk-select-evict` is **our variant, not ChunkLLM**: a query-aware
//! eviction at chunk granularity (in the spirit of SnapKV-style methods),
//! kept because it answers a question users ask of selection methods:
//! what does it cost to also free the memory?
//! It is `chunk-select` in everything (boundaries, cap, selection rule,
//! what each query reads) but one: when a (layer, KV head) makes a
//! selection, committing that step drops from that (layer, KV head) every
//! row no later query can read: it keeps the selected chunks and the
//! positions from the selection step on. Later selection steps
//! attend to, and rank, only what is still held (the surviving part of
//! each chunk, plus the newer positions), and drop again what they leave
//! out; so each output is exact attention over what that (layer, KV head)
//! holds at that moment, and from the first selection on each holds at
//! most `budget + 1 - cap` selected rows plus the open chunk (at most
//! `budget + 1` rows in a one-row step).
//!
//! Storage is per (layer, KV head): `head_dim` floats of key and of value
//! per held row and its position (`u32`), compacted in place at each
//! eviction, with the allocation shrunk when it is more than twice what
//! is held; [`KvCache::bytes`] counts those rows (and the metadata below),
//! not capacity, as [`DenseKv`] does. The first decode step still holds
//! the dense copy made by `from_dense` (it attends to all of it, and drops
//! rows only when its block is committed), so peak memory during that step
//! equals dense's (the full copy, as in `chunk-select`). The workload's recorded `kv_bytes` is the
//! cache's `bytes()` after the last decode step of each prompt (the end of
//! the greedy answer in `needle`, of the teacher-forced continuation in
//! `perplexity`; `kv_bytes_peak` is the largest of these per-prompt
//! figures, not a peak over time), so it shows the evicted cache, never
//! that dense moment (unless the answer took no decode step at all).
//!
//! Known limit: the eviction is query-aware. Chunks are chosen by what the
//! question at the end of the prompt attends to and then are gone, so a
//! later, different question about dropped text cannot be answered (a
//! second needle query in the same conversation, say); `chunk-select`
//! could still choose those chunks at its next boundary.
//!
//! `truncate` works back to the newest selection that dropped rows, not
//! below it: the dropped rows cannot be restored, so that is a
//! [`DecoderError::Cache`] (as in `kv-cluster` below its last merge). The
//! workload never needs it: `perplexity` does not truncate, and `needle`
//! builds the cache again from the shared prefill when truncating to the
//! prompt fails, before it scores the answer.
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
//! - Unselected chunks stay in memory, as the paper's re-ranking of every
//!   chunk requires (Sec. 2.3): `chunk-select`'s bytes are the dense ones
//!   plus metadata, and its saving shows in reads. (`chunk-select-evict`,
//!   our variant above, drops them.)
//! - The paper votes: each layer picks its top-k chunks and a vote over
//!   the layers' choices gives one global top-k that every layer reads
//!   (Sec. 2.3; removing the vote cost 1.6 LongBench points in its Table
//!   4). `chunk-select` selects per (layer, KV head) with no vote, the
//!   finest choice the model's own attention allows; `chunk-select-vote`
//!   (below) votes as the paper does.
//! - The paper always keeps the most recent 15 or 16 chunks ("local
//!   chunks", Sec. 3.2) besides the top-k; `chunk-select` keeps only the
//!   chunk being written, `chunk-select-vote` keeps local chunks too.
//! - The paper's first selection is made by the prompt's end token, inside
//!   the prefill (Sec. 2.3); ours by the first decode step, whose query
//!   attends to the whole prompt (the shared dense prefill cannot carry a
//!   per-method selection).
//!
//! # The paper's vote: `chunk-select-vote`
//!
//! `chunk-select-vote` is `chunk-select` (every key and value kept, the
//! same boundaries, cap and selection steps) with ChunkLLM's cross-layer
//! vote and local chunks (Sec. 2.3 and 3.2), still training-free:
//!
//! - At a selection step every (layer, KV head) attends densely, as in
//!   `chunk-select`, and adds its chunk masses to its layer's: one score
//!   per chunk and layer, summed over all the layer's query heads (the
//!   paper's QK Adapter scores a chunk once per layer, over its heads).
//! - Local chunks: the newest chunks (the open one before the query
//!   first), while they fit in `budget / 16` positions. The paper keeps
//!   16 local chunks beside a top-k of 256 (needle and PG19 settings,
//!   Sec. 3.2), a sixteenth of the chunks it reads; our chunks are about
//!   as long as its sentence-level ones, so a sixteenth of the positions.
//! - Each layer's ballot: the other chunks by its mass, largest first,
//!   while they fit in what the budget leaves (`budget - local - (cap -
//!   1)`, as in `chunk-select`). A chunk's votes are the ballots that hold
//!   it; the global set is the chunks by votes (ties: summed mass over the
//!   layers, then the later chunk) while they fit in the same room. The
//!   paper's Fig. 2 counts ballots this way; it gives no tie rule.
//! - The vote needs every layer's ballot, so it is taken when the
//!   selecting token is committed (after its last layer) and applies
//!   from the next token on, to every layer and KV head alike. The
//!   selecting token itself reads everything, as in `chunk-select`.
//!
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

use super::held::{Held, HeldRows};
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

/// The `chunk-select` entry (training-free ChunkLLM, every key and value
/// kept).
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

/// The `chunk-select-vote` entry: training-free ChunkLLM with the paper's
/// cross-layer vote and local chunks (see the module documentation).
#[derive(Debug, Clone, Copy, Default)]
pub struct ChunkSelectVote;

impl Policy for ChunkSelectVote {
    fn id(&self) -> &'static str {
        "chunk-select-vote"
    }

    fn from_dense(&self, dense: &DenseKv, plan: &Plan<'_>) -> Box<dyn KvCache> {
        Box::new(ChunkSelectKv::voting(dense, plan))
    }
}

/// The `chunk-select-evict` entry: `chunk-select` whose selections also
/// drop what they leave out (our variant, not ChunkLLM's method; see the
/// module documentation).
#[derive(Debug, Clone, Copy, Default)]
pub struct ChunkSelectEvict;

impl Policy for ChunkSelectEvict {
    fn id(&self) -> &'static str {
        "chunk-select-evict"
    }

    fn from_dense(&self, dense: &DenseKv, plan: &Plan<'_>) -> Box<dyn KvCache> {
        Box::new(ChunkSelectKv::evicting(dense, plan))
    }
}

/// The chunks one selection step chose for one (layer, KV head).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Position of the query that made it; later queries read this
    /// position and every one after it in full.
    pub pos: usize,
    /// The chosen chunks as `[start, end)` position ranges, in order. In
    /// an evicting cache, the part of each chunk still held (every
    /// position of the range is held).
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

/// Local chunks take at most `budget / LOCAL_SHARE` positions
/// (`chunk-select-vote`; ChunkLLM keeps 16 local chunks beside 256).
pub const LOCAL_SHARE: usize = 16;

/// The masses the layers of one selection step have added so far
/// (`chunk-select-vote`), voted on when its token is committed.
#[derive(Debug, Default)]
struct Ballots {
    /// Position of the selecting query.
    pos: usize,
    /// The chunks ranked, as position ranges in order (the same for every
    /// layer and KV head: a voting cache keeps every row).
    spans: Vec<(usize, usize)>,
    /// Per layer, per chunk: attention mass summed over the layer's query
    /// heads. Empty until the first KV head adds its share.
    mass: Vec<Vec<f64>>,
}

/// `chunk-select`'s choice for one (layer, KV head) over `spans` (chunks
/// as position ranges, in order) with attention masses `mass`: the chunks
/// by mass, largest first (ties: the later chunk), while they fit in
/// `budget + 1 - cap` positions, a chunk that does not fit being skipped.
/// In order. Shared by [`ChunkSelectKv`] and the GPU decoder's read rule
/// (`decoder::cuda::ReadRule::ChunkSelect`), so both break ties alike.
pub fn top_chunks(
    spans: &[(usize, usize)],
    mass: &[f64],
    budget: usize,
    cap: usize,
) -> Vec<(usize, usize)> {
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_unstable_by(|&x, &y| mass[y].total_cmp(&mass[x]).then(y.cmp(&x)));
    let room = (budget + 1).saturating_sub(cap);
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
        .iter()
        .zip(keep)
        .filter_map(|(&span, k)| k.then_some(span))
        .collect()
}

/// ChunkLLM's chunk vote (arXiv 2510.02361, Sec. 2.3) over `spans` (chunks
/// as position ranges, in order, the newest last) with per-layer masses
/// `mass[layer][chunk]`: the local chunks (the newest, while they fit in
/// `budget / LOCAL_SHARE`), then the other chunks by votes (how many
/// layers' ballots hold them; a ballot is a layer's chunks by its mass
/// while they fit), ties by summed mass, then the later chunk, while they
/// fit in `budget + 1 - cap` less the local positions. In order.
pub fn vote_chunks(
    spans: &[(usize, usize)],
    mass: &[Vec<f64>],
    budget: usize,
    cap: usize,
) -> Vec<(usize, usize)> {
    let n = spans.len();
    let len = |c: usize| spans[c].1 - spans[c].0;
    let mut keep = vec![false; n];
    let mut local = 0;
    for c in (0..n).rev() {
        if local + len(c) > budget / LOCAL_SHARE {
            break;
        }
        keep[c] = true;
        local += len(c);
    }
    let room = (budget + 1).saturating_sub(cap + local);
    let fill = |order: &[usize], pick: &mut dyn FnMut(usize)| {
        let mut used = 0;
        for &c in order {
            if used + len(c) <= room {
                pick(c);
                used += len(c);
            }
        }
    };
    let others: Vec<usize> = (0..n).filter(|&c| !keep[c]).collect();
    let mut votes = vec![0usize; n];
    let mut total = vec![0f64; n];
    for m in mass {
        let mut order = others.clone();
        order.sort_unstable_by(|&x, &y| m[y].total_cmp(&m[x]).then(y.cmp(&x)));
        fill(&order, &mut |c| votes[c] += 1);
        for (t, &x) in total.iter_mut().zip(m) {
            *t += x;
        }
    }
    let mut order = others;
    order.sort_unstable_by(|&x, &y| {
        (votes[y].cmp(&votes[x]))
            .then(total[y].total_cmp(&total[x]))
            .then(y.cmp(&x))
    });
    fill(&order, &mut |c| keep[c] = true);
    (0..n).filter(|&c| keep[c]).map(|c| spans[c]).collect()
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

/// Where a [`ChunkSelectKv`] keeps its keys and values.
#[derive(Debug)]
enum Store {
    /// Every position, each row holding every KV head (`chunk-select`).
    Full(DenseKv),
    /// Per (layer, KV head), the rows it still holds
    /// (`chunk-select-evict`): each head drops different rows.
    Held {
        rows: HeldRows,
        /// The newest position whose selection dropped rows: the state
        /// at or before it cannot be restored.
        evicted: Option<usize>,
    },
}

impl Held {
    /// Keeps the rows that queries after selection `s` can still read
    /// (its chunks, and every position from `s.pos` on) and gives the
    /// freed memory back, leaving room for `spare` more rows. Whether any
    /// row was dropped.
    fn evict(&mut self, s: &Selection, hd: usize, spare: usize) -> bool {
        let mut kept = 0;
        let mut c = 0;
        for r in 0..self.pos.len() {
            let p = self.pos[r] as usize;
            while s.chunks.get(c).is_some_and(|&(_, z)| z <= p) {
                c += 1;
            }
            if p >= s.pos || s.chunks.get(c).is_some_and(|&(a, _)| a <= p) {
                if kept != r {
                    self.pos[kept] = self.pos[r];
                    self.k.copy_within(r * hd..(r + 1) * hd, kept * hd);
                    self.v.copy_within(r * hd..(r + 1) * hd, kept * hd);
                }
                kept += 1;
            }
        }
        let dropped = kept < self.pos.len();
        self.pos.truncate(kept);
        self.k.truncate(kept * hd);
        self.v.truncate(kept * hd);
        // Shrink only when far too large, so the steps up to the next
        // selection do not reallocate.
        let want = kept + spare;
        if self.pos.capacity() > 2 * want {
            self.pos.shrink_to(want);
            self.k.shrink_to(want * hd);
            self.v.shrink_to(want * hd);
        }
        dropped
    }
}

impl Store {
    fn shape(&self) -> KvShape {
        match self {
            Store::Full(kv) => kv.shape(),
            Store::Held { rows, .. } => rows.shape,
        }
    }

    fn len(&self) -> usize {
        match self {
            Store::Full(kv) => kv.len(),
            Store::Held { rows, .. } => rows.len,
        }
    }

    fn append(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        match self {
            Store::Full(kv) => kv.append(layer, pos, k, v),
            Store::Held { rows, .. } => rows.append(layer, pos, k, v, "chunk-select-evict"),
        }
    }

    /// Forgets positions `len..`; fails, changing nothing, where an
    /// eviction dropped rows that were visible at `len`.
    fn truncate(&mut self, len: usize) -> Result<(), DecoderError> {
        match self {
            Store::Full(kv) => kv.truncate(len),
            Store::Held { rows, evicted } => {
                if let Some(e) = evicted.filter(|&e| len <= e) {
                    return Err(DecoderError::Cache(format!(
                        "chunk-select-evict cache cannot truncate {} positions to {len}: the \
                         selection at position {e} evicted the chunks it left out, which cannot \
                         be restored (truncate to at least {} positions, or build the cache \
                         again from the prefill)",
                        rows.len,
                        e + 1
                    )));
                }
                rows.truncate(len);
                Ok(())
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Store::Full(kv) => kv.bytes(),
            Store::Held { rows, .. } => rows.bytes(),
        }
    }
}

/// One (layer, KV head)'s cached rows as `attend` reads them: row `r`
/// has its key at `k[r * stride + head * head_dim..]` (`head_dim`
/// floats), its value likewise in `v`.
struct View<'a> {
    k: &'a [f32],
    v: &'a [f32],
    stride: usize,
    head: usize,
    /// Rows held.
    n: usize,
    /// Positions committed (what the query could have seen).
    visible: usize,
    /// Position of each row; `None`: row `r` is position `r`.
    pos: Option<&'a [u32]>,
}

impl View<'_> {
    /// Rows held before position `p`.
    fn row_of(&self, p: usize) -> usize {
        self.pos
            .map_or(p, |ps| ps.partition_point(|&x| (x as usize) < p))
    }

    fn pos_of(&self, r: usize) -> usize {
        self.pos.map_or(r, |ps| ps[r] as usize)
    }
}

/// The training-free ChunkLLM cache: the keys and values (every one, or
/// per (layer, KV head) what its selections kept), the chunk bounds, and
/// per (layer, KV head) the history of selections. See the module
/// documentation.
#[derive(Debug)]
pub struct ChunkSelectKv {
    store: Store,
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
    /// Per `layer * n_kv_heads + kv_head`: selections, oldest first (in
    /// an evicting cache, from the newest one that dropped rows on).
    history: Vec<Mutex<Vec<Selection>>>,
    /// `chunk-select-vote`: the selection step in flight's masses.
    vote: Option<Mutex<Ballots>>,
    reads: ReadCounter,
}

impl ChunkSelectKv {
    /// The `chunk-select` cache after the dense prefill `dense` of
    /// `plan.prompt`, with room for `plan.max_new` more positions: every
    /// key and value is kept.
    pub fn from_dense(dense: &DenseKv, plan: &Plan<'_>) -> ChunkSelectKv {
        let shape = dense.shape();
        let n = dense.len();
        let mut kv = DenseKv::new(shape, n + plan.max_new + 1);
        for l in 0..shape.n_layers {
            kv.append(l, 0, dense.keys(l), dense.values(l));
        }
        ChunkSelectKv::with_store(Store::Full(kv), n, plan)
    }

    /// The `chunk-select-vote` cache after the dense prefill `dense`:
    /// every key and value kept, selections by the layers' vote.
    pub fn voting(dense: &DenseKv, plan: &Plan<'_>) -> ChunkSelectKv {
        let mut cache = ChunkSelectKv::from_dense(dense, plan);
        cache.vote = Some(Mutex::new(Ballots::default()));
        cache
    }

    /// The `chunk-select-evict` cache after the dense prefill `dense`:
    /// every position, copied per (layer, KV head), until the first
    /// selection drops what it leaves out.
    pub fn evicting(dense: &DenseKv, plan: &Plan<'_>) -> ChunkSelectKv {
        let shape = dense.shape();
        let (n, hd) = (dense.len(), shape.head_dim);
        let room = n + plan.max_new + 1;
        let heads = (0..shape.n_layers * shape.n_kv_heads)
            .map(|i| {
                let (l, g) = (i / shape.n_kv_heads, i % shape.n_kv_heads);
                let gather = |x: &[f32]| {
                    let mut out = Vec::with_capacity(room * hd);
                    shape.extend_head(&mut out, x, g, 0..n);
                    out
                };
                let mut pos = Vec::with_capacity(room);
                pos.extend(0..n as u32);
                Held {
                    pos,
                    k: gather(dense.keys(l)),
                    v: gather(dense.values(l)),
                }
            })
            .collect();
        let store = Store::Held {
            rows: HeldRows {
                shape,
                len: n,
                heads,
            },
            evicted: None,
        };
        ChunkSelectKv::with_store(store, n, plan)
    }

    /// The cache over `store`, which holds the `n` prompt positions.
    fn with_store(store: Store, n: usize, plan: &Plan<'_>) -> ChunkSelectKv {
        let shape = store.shape();
        let mut boundary = vec![0u64; plan.boundary.len().div_ceil(64)];
        for (t, _) in plan.boundary.iter().enumerate().filter(|(_, &b)| b) {
            boundary[t / 64] |= 1 << (t % 64);
        }
        let mut cache = ChunkSelectKv {
            store,
            budget: plan.budget,
            cap: chunk_cap(plan.budget),
            block_ends: plan.prompt.iter().map(|&t| bit(&boundary, t)).collect(),
            boundary,
            ends: Vec::new(),
            block_pos: 0,
            history: (0..shape.n_layers * shape.n_kv_heads)
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            vote: None,
            reads: ReadCounter::default(),
        };
        cache.commit(0, n);
        cache.block_pos = n;
        cache.block_ends.clear();
        cache
    }

    pub fn shape(&self) -> KvShape {
        self.store.shape()
    }

    /// Whether selections drop what they leave out (`chunk-select-evict`).
    pub fn evicts(&self) -> bool {
        matches!(self.store, Store::Held { .. })
    }

    /// Whether selections are the layers' vote (`chunk-select-vote`).
    pub fn votes(&self) -> bool {
        self.vote.is_some()
    }

    /// The longest chunk for this cache's budget ([`chunk_cap`]).
    pub fn chunk_cap(&self) -> usize {
        self.cap
    }

    /// Exclusive ends of the closed chunks.
    pub fn chunk_ends(&self) -> &[u32] {
        &self.ends
    }

    /// The positions (`layer`, `kv_head`) holds, in order: every committed
    /// one, unless the cache evicts.
    pub fn held(&self, layer: usize, kv_head: usize) -> Vec<usize> {
        match &self.store {
            Store::Full(kv) => (0..kv.len()).collect(),
            Store::Held { rows, .. } => rows.positions(layer, kv_head),
        }
    }

    /// The newest selection of (`layer`, `kv_head`), if any.
    pub fn selection(&self, layer: usize, kv_head: usize) -> Option<Selection> {
        lock(&self.history[layer * self.shape().n_kv_heads + kv_head])
            .last()
            .cloned()
    }

    /// Selections (`layer`, `kv_head`) has made and still holds.
    pub fn selections_made(&self, layer: usize, kv_head: usize) -> usize {
        lock(&self.history[layer * self.shape().n_kv_heads + kv_head]).len()
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

    /// In an evicting cache, applies the selections that the first row of
    /// the block just committed at `pos..pos + rows` made in `layer`.
    fn evict(&mut self, layer: usize, pos: usize, rows: usize) {
        let cap = self.cap;
        let Store::Held {
            rows: HeldRows { shape, heads, .. },
            evicted,
        } = &mut self.store
        else {
            return;
        };
        let slots = layer * shape.n_kv_heads..(layer + 1) * shape.n_kv_heads;
        for (held, history) in heads[slots.clone()]
            .iter_mut()
            .zip(&mut self.history[slots])
        {
            let history = history.get_mut().unwrap_or_else(|e| e.into_inner());
            let Some(s) = history
                .last()
                .filter(|s| (pos..pos + rows).contains(&s.pos))
            else {
                continue;
            };
            if held.evict(s, shape.head_dim, cap) {
                *evicted = Some(evicted.map_or(s.pos, |e| e.max(s.pos)));
                // No state before this selection can come back, so the
                // selections it replaced are never read again.
                let older = history.len() - 1;
                history.drain(..older);
            }
        }
    }

    /// The chunks a selection step with query `q` keeps: chunk attention
    /// mass ([`Self::chunk_mass`]), largest first, while they fit.
    fn select(
        &self,
        q: &[f32],
        view: &View<'_>,
        block: &BlockKv<'_>,
        scores: &mut Vec<f32>,
    ) -> Vec<(usize, usize)> {
        let (spans, mass) = self.chunk_mass(q, view, block, scores);
        top_chunks(&spans, &mass, self.budget, self.cap)
    }

    /// The chunks of `view` (closed ones, then the open one before the
    /// query) as position ranges of held rows, and the attention mass of
    /// each: softmax over the cached rows of `view` and the rows of
    /// `block`, laid out like `view`, summed per chunk's held rows and
    /// over the query heads of `q`.
    fn chunk_mass(
        &self,
        q: &[f32],
        view: &View<'_>,
        block: &BlockKv<'_>,
        scores: &mut Vec<f32>,
    ) -> (Vec<(usize, usize)>, Vec<f64>) {
        let hd = self.shape().head_dim;
        let (n, stride) = (view.n, view.stride);
        let off = view.head * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        // Rows of each chunk still held (closed chunks, then the open one
        // before the query), as row ranges.
        let mut spans = Vec::with_capacity(self.ends.len() + 1);
        let mut start = 0;
        for &e in &self.ends {
            let end = view.row_of(e as usize);
            if end > start {
                spans.push((start, end));
            }
            start = end;
        }
        if start < n {
            spans.push((start, n));
        }
        let mut mass = vec![0f64; spans.len()];
        for qh in q.chunks_exact(hd) {
            scores.clear();
            scores.extend(
                (0..n).map(|r| dot(qh, &view.k[r * stride + off..r * stride + off + hd]) * scale),
            );
            scores.extend(
                block
                    .rows
                    .iter()
                    .map(|&r| dot(qh, &block.k[r * stride + off..r * stride + off + hd]) * scale),
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
        let spans = spans
            .into_iter()
            .map(|(a, b)| {
                // A chunk's held rows are a run of consecutive positions:
                // an eviction keeps or drops a closed chunk whole, and cuts
                // the open one only at the selecting position.
                debug_assert_eq!(view.pos_of(b - 1) + 1 - view.pos_of(a), b - a);
                (view.pos_of(a), view.pos_of(b - 1) + 1)
            })
            .collect();
        (spans, mass)
    }

    /// Adds a selection step's chunk masses for one (`layer`, KV head) to
    /// the ballots of the step in flight (`chunk-select-vote`).
    fn add_ballot(&self, layer: usize, spans: Vec<(usize, usize)>, mass: &[f64]) {
        let vote = self.vote.as_ref().expect("a voting cache");
        let mut b = vote.lock().unwrap_or_else(|e| e.into_inner());
        if b.mass.is_empty() {
            b.pos = self.block_pos;
            b.mass = vec![vec![0.0; spans.len()]; self.shape().n_layers];
            b.spans = spans;
        }
        debug_assert_eq!(b.pos, self.block_pos);
        for (m, &x) in b.mass[layer].iter_mut().zip(mass) {
            *m += x;
        }
    }

    /// Takes the vote of the selection step at `pos..pos + rows`, if one
    /// was made, and gives its chunks to every (layer, KV head).
    fn cast_vote(&mut self, pos: usize, rows: usize) {
        let Some(vote) = &mut self.vote else {
            return;
        };
        let b = std::mem::take(vote.get_mut().unwrap_or_else(|e| e.into_inner()));
        if b.mass.is_empty() || !(pos..pos + rows).contains(&b.pos) {
            return;
        }
        let chunks = vote_chunks(&b.spans, &b.mass, self.budget, self.cap);
        for h in &mut self.history {
            h.get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .push(Selection {
                    pos: b.pos,
                    chunks: chunks.clone(),
                });
        }
    }

    /// Forgets the masses of a selection step that was never committed.
    fn drop_ballots(&mut self) {
        if let Some(vote) = &mut self.vote {
            *vote.get_mut().unwrap_or_else(|e| e.into_inner()) = Ballots::default();
        }
    }

    /// `attend` over `view`, the rows of (`layer`, `kv_head`) at history
    /// slot `slot`, with the block in flight laid out like `view`.
    #[allow(clippy::too_many_arguments)]
    fn attend_view(
        &self,
        slot: usize,
        view: &View<'_>,
        q: &[f32],
        block: &BlockKv<'_>,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let hd = self.shape().head_dim;
        let layer = slot / self.shape().n_kv_heads;
        let in_flight = block.segment();
        let slot = &self.history[slot];
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
                    k: view.k,
                    v: view.v,
                    rows: Rows::Range(0, view.n),
                    bias: None,
                },
                in_flight,
            ];
            attend_segments(q, hd, view.stride, view.head, &segments, scores, out);
            self.reads.add(view.n, view.visible);
            if self.vote.is_some() {
                let (spans, mass) = self.chunk_mass(q, view, block, scores);
                self.add_ballot(layer, spans, &mass);
                return;
            }
            let chunks = self.select(q, view, block, scores);
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
                        rows.extend(view.row_of(a)..view.row_of(z));
                    }
                    let tail = s.pos.max(view.visible.saturating_sub(self.cap - 1));
                    rows.extend(view.row_of(tail)..view.n);
                }
                // Rows after the first of the very first block after the
                // prefill: nothing is selected yet, so the newest
                // positions stand in.
                None => rows.extend(view.row_of(view.visible.saturating_sub(self.budget))..view.n),
            }
            let segments = [
                Segment {
                    k: view.k,
                    v: view.v,
                    rows: Rows::List(&rows),
                    bias: None,
                },
                in_flight,
            ];
            attend_segments(q, hd, view.stride, view.head, &segments, scores, out);
            self.reads.add(rows.len(), view.visible);
        });
    }
}

impl KvCache for ChunkSelectKv {
    fn append(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        self.store.append(layer, pos, k, v);
        let shape = self.store.shape();
        let rows = k.len() / shape.kv_dim();
        self.evict(layer, pos, rows);
        if layer + 1 == shape.n_layers {
            self.cast_vote(pos, rows);
            self.commit(pos, rows);
        }
    }

    fn len(&self) -> usize {
        self.store.len()
    }

    fn truncate(&mut self, len: usize) -> Result<(), DecoderError> {
        if len >= self.store.len() {
            return Ok(());
        }
        self.store.truncate(len)?;
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
        self.drop_ballots();
        Ok(())
    }

    fn begin_block(&mut self, pos: usize, tokens: &[u32]) {
        self.block_pos = pos;
        self.block_ends.clear();
        self.drop_ballots();
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
        let shape = self.shape();
        let (hd, d) = (shape.head_dim, shape.kv_dim());
        let slot = layer * shape.n_kv_heads + kv_head;
        match &self.store {
            Store::Full(kv) => {
                let n = kv.keys(layer).len() / d;
                let view = View {
                    k: kv.keys(layer),
                    v: kv.values(layer),
                    stride: d,
                    head: kv_head,
                    n,
                    visible: n,
                    pos: None,
                };
                self.attend_view(slot, &view, q, block, scores, out);
            }
            Store::Held { rows, .. } => {
                let h = &rows.heads[slot];
                let view = View {
                    k: &h.k,
                    v: &h.v,
                    stride: hd,
                    head: 0,
                    n: h.pos.len(),
                    visible: rows.len,
                    pos: Some(&h.pos),
                };
                // This head's slice of the block rows, laid out like its
                // own storage.
                block.with_head(shape, kv_head, |own| {
                    self.attend_view(slot, &view, q, own, scores, out)
                });
            }
        }
    }

    fn bytes(&self) -> usize {
        self.store.bytes()
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
    use crate::longctx::testutil::{assert_close, attention_f64_of_head, uniform};
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
            whole_heads: &[],
            window: None,
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
        let held: Vec<usize> = (0..tokens.len()).collect();
        brute_held_selection(keys, own, q, g, tokens, &held, budget)
    }

    /// Relative error allowed against the f64 reference: f32 terms of
    /// magnitude <= 1 summed over at most ~300 rows (rounding ~1e-6 at
    /// worst in practice), where reading one wrong chunk moves an output by
    /// ~1e-2.
    const TOL: f64 = 1e-5;

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
                        let want = attention_f64_of_head(group(&s.q[l], g), SHAPE.head_dim, g, &kv);
                        assert_close(
                            &got[l][g],
                            &want,
                            TOL,
                            &format!("step {i} layer {l} head {g}"),
                        );
                    }
                    assert_eq!(cache.selections_made(l, g), 1 + usize::from(i >= 3));
                }
            }
            assert_eq!(read as usize, want_read, "step {i}");
            tokens.push(t);
        }
    }

    /// The two caches that keep every row: `chunk-select` and
    /// `chunk-select-vote`.
    type Make = fn(&DenseKv, &Plan<'_>) -> ChunkSelectKv;
    const KEEPING: [(&str, Make); 2] = [
        ("chunk-select", ChunkSelectKv::from_dense),
        ("chunk-select-vote", ChunkSelectKv::voting),
    ];

    /// A budget above every position keeps every chunk, so decoding gives
    /// the dense cache's outputs bit for bit (the same rows in the same
    /// order through `attend_segments`) and reads every row.
    #[test]
    fn large_budget_is_dense_bitwise() {
        for (policy, id) in [
            (&ChunkSelect as &dyn Policy, "chunk-select"),
            (&ChunkSelectVote, "chunk-select-vote"),
            (&ChunkSelectEvict, "chunk-select-evict"),
        ] {
            let mut rng = ChaCha8Rng::seed_from_u64(4);
            let n = 150;
            let (tokens, dense) = prompt(&mut rng, n);
            let boundary = table();
            let mut cache = policy.from_dense(&dense, &plan(&tokens, &boundary, 10_000));
            let mut full = dense.clone();
            full.reset_reads();
            for pos in n..n + 40 {
                let t = token(&mut rng);
                let s = random_step(&mut rng, t);
                assert_eq!(
                    step(&mut *cache, pos, &s),
                    step(&mut full, pos, &s),
                    "{id} pos {pos}"
                );
            }
            assert_eq!(cache.reads(), full.reads(), "{id}");
        }
    }

    /// Over a long decode, every step reads either everything (selection
    /// steps: the first, boundary tokens, chunks reaching the cap) or at
    /// most the budget, and the counters add up.
    #[test]
    fn reads_respect_the_budget_between_selections() {
        for (id, make) in KEEPING {
            reads_respect_the_budget(id, make);
        }
    }

    fn reads_respect_the_budget(id: &str, make: Make) {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (n, budget) = (300, 40);
        let (mut tokens, dense) = prompt(&mut rng, n);
        let boundary = table();
        let mut cache = make(&dense, &plan(&tokens, &boundary, budget));
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
                assert_eq!(read, pos as u64 * per, "{id} pos {pos}");
                assert_eq!(cache.selection(0, 0).unwrap().pos, pos);
                dense_steps += 1;
            } else {
                let mut want = 0;
                for l in 0..SHAPE.n_layers {
                    for g in 0..SHAPE.n_kv_heads {
                        let sel = cache.selection(l, g).unwrap();
                        let held: usize = sel.chunks.iter().map(|(a, b)| b - a).sum();
                        assert!(held + (pos - sel.pos) <= budget, "{id} pos {pos}");
                        want += (held + pos - sel.pos) as u64;
                    }
                }
                assert_eq!(read, want, "{id} pos {pos}");
                sparse += 1;
            }
            tokens.push(s.token);
        }
        assert!(
            sparse > 40 && dense_steps > 5,
            "{id}: {sparse} sparse, {dense_steps} dense"
        );
        assert!(cache.reads().share() < 0.5, "{id}");
    }

    /// `truncate` forgets the chunks and selections of the dropped
    /// positions: decoding the same steps again gives the same bits, and
    /// truncating to the prompt gives back the state `from_dense` built.
    #[test]
    fn truncate_restores_the_earlier_state() {
        for (id, make) in KEEPING {
            truncate_restores(id, make);
        }
    }

    fn truncate_restores(id: &str, make: Make) {
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
        let mut cache = make(&dense, &p);
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
            assert_eq!(&again[..], &first[cut..], "{id} after truncating to +{cut}");
        }
        cache.truncate(n).unwrap();
        assert_eq!(cache.chunk_ends(), &fresh_ends[..]);
        assert_eq!(cache.selection(1, 1), None);
        assert_eq!(cache.bytes(), fresh_bytes, "{id}");
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
                    let want = attention_f64_of_head(group(&s.q[l], g), SHAPE.head_dim, g, &kv);
                    assert_close(&out, &want, TOL, &format!("row {i} layer {l} head {g}"));
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

    /// The selection an evicting cache's query should make, by brute
    /// force in f64 from positions alone: the chunks of
    /// [`brute_held_mass`] by mass (ties: later), taken while their held
    /// rows fit in `budget + 1 - cap`. Position ranges.
    fn brute_held_selection(
        keys: &[f32],
        own: &[f32],
        q: &[f32],
        g: usize,
        tokens: &[u32],
        held: &[usize],
        budget: usize,
    ) -> Vec<(usize, usize)> {
        let cap = chunk_cap(budget);
        let (spans, mass) = brute_held_mass(keys, own, q, g, tokens, held, budget);
        let mut order: Vec<usize> = (0..spans.len()).collect();
        order.sort_by(|&x, &y| mass[y].total_cmp(&mass[x]).then(y.cmp(&x)));
        let mut keep = vec![false; spans.len()];
        let mut used = 0;
        for c in order {
            let (a, b) = spans[c];
            if used + b - a <= budget + 1 - cap {
                keep[c] = true;
                used += b - a;
            }
        }
        (0..spans.len())
            .filter(|&c| keep[c])
            .map(|c| spans[c])
            .collect()
    }

    /// By brute force in f64 from positions alone: the chunks by the rule
    /// over `tokens` (the committed ones), each cut to the positions of
    /// `held` in it (empty ones skipped), as position ranges, and the mass
    /// a softmax over the held rows of `keys` and the query's own key
    /// gives each, summed over the query heads of `q`.
    fn brute_held_mass(
        keys: &[f32],
        own: &[f32],
        q: &[f32],
        g: usize,
        tokens: &[u32],
        held: &[usize],
        budget: usize,
    ) -> (Vec<(usize, usize)>, Vec<f64>) {
        let (hd, d) = (SHAPE.head_dim, SHAPE.kv_dim());
        let n = tokens.len();
        let cap = chunk_cap(budget);
        let mut bounds = vec![0];
        bounds.extend(rule_ends(tokens, cap).iter().map(|&e| e as usize));
        if *bounds.last().unwrap() < n {
            bounds.push(n);
        }
        let spans: Vec<Vec<usize>> = bounds
            .windows(2)
            .map(|w| {
                held.iter()
                    .copied()
                    .filter(|p| (w[0]..w[1]).contains(p))
                    .collect()
            })
            .filter(|s: &Vec<usize>| !s.is_empty())
            .collect();
        let score = |qh: &[f32], k: &[f32]| {
            qh.iter()
                .zip(k)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>()
                / (hd as f64).sqrt()
        };
        let mut mass = vec![0f64; spans.len()];
        for qh in q.chunks_exact(hd) {
            let s_own = score(qh, &own[g * hd..(g + 1) * hd]);
            let s: Vec<f64> = held
                .iter()
                .map(|&p| score(qh, &keys[p * d + g * hd..p * d + (g + 1) * hd]))
                .collect();
            let m = s.iter().copied().fold(s_own, f64::max);
            let z = s.iter().map(|x| (x - m).exp()).sum::<f64>() + (s_own - m).exp();
            for (c, span) in spans.iter().enumerate() {
                mass[c] += span
                    .iter()
                    .map(|p| (s[held.iter().position(|h| h == p).unwrap()] - m).exp() / z)
                    .sum::<f64>();
            }
        }
        let ranges = spans
            .iter()
            .map(|s| {
                let (a, b) = (s[0], s[s.len() - 1] + 1);
                assert_eq!(b - a, s.len(), "a chunk's held positions are a run");
                (a, b)
            })
            .collect();
        (ranges, mass)
    }

    /// Positions of the ranges `chunks`, then `tail`.
    fn positions(chunks: &[(usize, usize)], tail: std::ops::Range<usize>) -> Vec<usize> {
        chunks.iter().flat_map(|&(a, b)| a..b).chain(tail).collect()
    }

    /// Capacity, in rows, of the largest allocation any (layer, KV head)
    /// of an evicting cache keeps.
    fn held_capacity(cache: &ChunkSelectKv) -> usize {
        let Store::Held { rows, .. } = &cache.store else {
            panic!("not an evicting cache")
        };
        rows.heads
            .iter()
            .map(|h| {
                (h.pos.capacity())
                    .max(h.k.capacity() / SHAPE.head_dim)
                    .max(h.v.capacity() / SHAPE.head_dim)
            })
            .max()
            .unwrap()
    }

    /// The evicting entry holds the dense copy until its first selection
    /// is committed, then at most `budget + cap` rows per (layer, KV head)
    /// (plus the metadata, counted exactly here), far below dense and
    /// `chunk-select`, over a long decode; the allocation shrinks too.
    #[test]
    fn evicting_holds_about_the_budget_after_the_first_selection() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (n, budget) = (2000, 100);
        let (mut tokens, dense) = prompt(&mut rng, n);
        let boundary = table();
        let p = plan(&tokens, &boundary, budget);
        assert_eq!(ChunkSelectEvict.id(), "chunk-select-evict");
        assert!(ChunkSelectEvict.empty(&p).is_none());
        assert_eq!(ChunkSelectEvict.from_dense(&dense, &p).len(), n);
        let mut cache = ChunkSelectKv::evicting(&dense, &p);
        let mut plain = ChunkSelectKv::from_dense(&dense, &p);
        assert!(cache.evicts() && !plain.evicts());
        let cap = cache.chunk_cap();
        let per = SHAPE.n_layers * SHAPE.n_kv_heads;
        // Per held row and (layer, KV head): key and value, and position.
        let row = 2 * SHAPE.head_dim * 4 + 4;
        assert!(cache.bytes() >= dense.bytes() + per * n * 4);
        for pos in n..n + 60 {
            let t = token(&mut rng);
            let s = random_step(&mut rng, t);
            step(&mut cache, pos, &s);
            step(&mut plain, pos, &s);
            tokens.push(t);
            let mut history = 0;
            for l in 0..SHAPE.n_layers {
                for g in 0..SHAPE.n_kv_heads {
                    // Selected chunks, then at most `cap` newest positions.
                    assert!(cache.held(l, g).len() <= budget + 1, "pos {pos}");
                    assert_eq!(cache.selections_made(l, g), 1, "pos {pos}");
                    history += cache.selection(l, g).unwrap().bytes();
                }
            }
            let meta = 8 * VOCAB.div_ceil(64) + 4 * cache.chunk_ends().len() + 1 + history;
            let bound = per * (budget + cap) * row + meta;
            let dense_now = (pos + 1) * per * SHAPE.head_dim * 2 * 4;
            assert!(
                cache.bytes() <= bound,
                "pos {pos}: {} > {bound}",
                cache.bytes()
            );
            assert!(cache.bytes() * 10 < dense_now, "pos {pos}");
            assert!(plain.bytes() > dense_now, "pos {pos}");
            assert!(held_capacity(&cache) <= 2 * (budget + cap), "pos {pos}");
        }
    }

    /// Every step of the evicting entry, over a long decode, is exact f64
    /// attention over what a model built from positions alone says each
    /// (layer, KV head) reads: everything it holds at a selection step
    /// (whose choice brute force confirms over the held rows), else the
    /// selected chunks and the positions since; what it holds matches the
    /// model after every step, and the read counters add up. Until its
    /// second selection it is `chunk-select` bit for bit.
    #[test]
    fn evicting_steps_are_exact_over_what_each_head_holds() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let (n, budget) = (300, 40);
        let (mut tokens, dense) = prompt(&mut rng, n);
        let boundary = table();
        let p = plan(&tokens, &boundary, budget);
        let mut cache = ChunkSelectKv::evicting(&dense, &p);
        let mut plain = ChunkSelectKv::from_dense(&dense, &p);
        let mut full = dense.clone();
        let cap = cache.chunk_cap();
        let per = SHAPE.n_layers * SHAPE.n_kv_heads;
        let d = SHAPE.kv_dim();
        let mut held: Vec<Vec<usize>> = vec![(0..n).collect(); per];
        let mut chosen: Vec<Option<Selection>> = vec![None; per];
        let mut selections = 0;
        for pos in n..n + 90 {
            let t = token(&mut rng);
            let s = random_step(&mut rng, t);
            let start = rule_ends(&tokens, cap).last().map_or(0, |&e| e as usize);
            let selects = pos == n || t < 2 || pos + 1 - start >= cap;
            let before = cache.reads();
            let got = step(&mut cache, pos, &s);
            let got_plain = step(&mut plain, pos, &s);
            step(&mut full, pos, &s);
            let mut want_read = 0;
            for l in 0..SHAPE.n_layers {
                for g in 0..SHAPE.n_kv_heads {
                    let slot = l * SHAPE.n_kv_heads + g;
                    let what = format!("pos {pos} layer {l} head {g}");
                    let sel = cache.selection(l, g).unwrap();
                    let rows = if selects {
                        let brute = brute_held_selection(
                            &full.keys(l)[..pos * d],
                            &s.k[l],
                            group(&s.q[l], g),
                            g,
                            &tokens,
                            &held[slot],
                            budget,
                        );
                        assert_eq!(sel.pos, pos, "{what}");
                        assert_eq!(sel.chunks, brute, "{what}");
                        let read = std::mem::replace(&mut held[slot], positions(&brute, pos..pos));
                        chosen[slot] = Some(sel);
                        read
                    } else {
                        let c = chosen[slot].as_ref().unwrap();
                        assert_eq!(&sel, c, "{what}: a non-boundary step reselected");
                        assert!(
                            c.chunks.iter().map(|(a, b)| b - a).sum::<usize>() + pos - c.pos
                                <= budget
                        );
                        positions(&c.chunks, c.pos..pos)
                    };
                    held[slot].push(pos);
                    assert_eq!(cache.held(l, g), held[slot], "{what}");
                    want_read += rows.len();
                    let want = attention_f64_of_head(
                        group(&s.q[l], g),
                        SHAPE.head_dim,
                        g,
                        &rows_with_own(&full, l, &rows, &s),
                    );
                    assert_close(&got[l][g], &want, TOL, &what);
                    if selections == 0 || (selections == 1 && !selects) {
                        assert_eq!(got[l][g], got_plain[l][g], "{what}");
                        assert_eq!(cache.selection(l, g), plain.selection(l, g), "{what}");
                    }
                }
            }
            let after = cache.reads();
            assert_eq!(
                (after.rows_read - before.rows_read) as usize,
                want_read,
                "pos {pos}"
            );
            assert_eq!(after.rows_visible - before.rows_visible, (pos * per) as u64);
            selections += usize::from(selects);
            tokens.push(t);
        }
        assert!(selections > 8, "{selections} selection steps");
        assert!(cache.reads().share() < plain.reads().share());
    }

    /// A selection step after an eviction ranks only what is still held:
    /// a query aimed at a chunk the first selection dropped makes
    /// `chunk-select` choose that chunk, and the evicting cache choose
    /// among what it holds, as brute force over those rows says.
    #[test]
    fn a_selection_after_eviction_ranks_only_held_chunks() {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let (n, budget) = (240, 64);
        let (mut tokens, dense) = prompt(&mut rng, n);
        tokens[n - 1] = 0;
        let boundary = table();
        let p = plan(&tokens, &boundary, budget);
        let mut cache = ChunkSelectKv::evicting(&dense, &p);
        let mut plain = ChunkSelectKv::from_dense(&dense, &p);
        let mut full = dense.clone();
        let s0 = random_step(&mut rng, 9);
        assert_eq!(step(&mut cache, n, &s0), step(&mut plain, n, &s0));
        step(&mut full, n, &s0);
        tokens.push(9);
        let first = cache.selection(0, 0).unwrap();
        let held_before: Vec<Vec<usize>> = (0..SHAPE.n_layers)
            .flat_map(|l| (0..SHAPE.n_kv_heads).map(move |g| (l, g)))
            .map(|(l, g)| cache.held(l, g))
            .collect();
        assert_eq!(held_before[0], positions(&first.chunks, n..n + 1));
        // A closed prompt chunk that (layer 0, head 0) dropped, and a
        // boundary-token query whose group-0 heads point at its first key.
        let (a, b) = rule_ends(&tokens[..n], cache.chunk_cap())
            .iter()
            .scan(0, |start, &e| {
                let span = (*start, e as usize);
                *start = e as usize;
                Some(span)
            })
            .find(|&(a, _)| !held_before[0].contains(&a))
            .expect("the first selection dropped a chunk");
        let d = SHAPE.kv_dim();
        let mut s1 = random_step(&mut rng, 0);
        let key = &full.keys(0)[a * d..a * d + SHAPE.head_dim];
        for h in 0..N_REP {
            for (x, &k) in s1.q[0][h * SHAPE.head_dim..].iter_mut().zip(key) {
                *x = 12.0 * k;
            }
        }
        let got = step(&mut cache, n + 1, &s1);
        let got_plain = step(&mut plain, n + 1, &s1);
        let picked = plain.selection(0, 0).unwrap();
        assert!(
            picked.chunks.contains(&(a, b)),
            "chunk-select picks the dropped chunk {:?}: {:?}",
            (a, b),
            picked.chunks
        );
        assert_ne!(got[0][0], got_plain[0][0]);
        for l in 0..SHAPE.n_layers {
            for g in 0..SHAPE.n_kv_heads {
                let held = &held_before[l * SHAPE.n_kv_heads + g];
                let sel = cache.selection(l, g).unwrap();
                assert_eq!(sel.pos, n + 1);
                assert!(
                    sel.chunks
                        .iter()
                        .flat_map(|&(x, y)| x..y)
                        .all(|p| held.contains(&p)),
                    "layer {l} head {g}: {:?} outside {held:?}",
                    sel.chunks
                );
                let brute = brute_held_selection(
                    &full.keys(l)[..(n + 1) * d],
                    &s1.k[l],
                    group(&s1.q[l], g),
                    g,
                    &tokens,
                    held,
                    budget,
                );
                assert_eq!(sel.chunks, brute, "layer {l} head {g}");
                let want = attention_f64_of_head(
                    group(&s1.q[l], g),
                    SHAPE.head_dim,
                    g,
                    &rows_with_own(&full, l, held, &s1),
                );
                assert_close(&got[l][g], &want, TOL, &format!("layer {l} head {g}"));
            }
        }
        assert!(!cache.held(0, 0).contains(&a));
    }

    /// `truncate` works down to just after the newest selection that
    /// dropped rows (decoding the same steps again gives the same bits and
    /// bytes) and refuses below it, changing nothing.
    #[test]
    fn evicting_truncate_stops_at_the_newest_eviction() {
        let mut rng = ChaCha8Rng::seed_from_u64(14);
        let (n, budget) = (200, 48);
        let (mut tokens, dense) = prompt(&mut rng, n);
        tokens[n - 1] = 0;
        let boundary = table();
        let mut cache = ChunkSelectKv::evicting(&dense, &plan(&tokens, &boundary, budget));
        let cap = cache.chunk_cap();
        assert_eq!(cap, 12);
        // The first step selects; no boundary token follows, so the chunk
        // opened at `n` reaches the cap at `n + 11`, which selects again.
        let steps: Vec<Step> = (0..14)
            .map(|i| random_step(&mut rng, if i == 0 { 9 } else { 2 + i as u32 }))
            .collect();
        let mut first = Vec::new();
        let mut bytes = Vec::new();
        let mut held_before_second = 0;
        for (i, s) in steps.iter().enumerate() {
            if i == 11 {
                held_before_second = cache.held(0, 0).len();
            }
            first.push(step(&mut cache, n + i, s));
            bytes.push(cache.bytes());
        }
        assert_eq!(cache.selection(0, 0).unwrap().pos, n + 11);
        // More than the selection can keep, so it dropped some.
        assert!(held_before_second > budget + 1 - cap);
        let held = cache.held(1, 1);
        for cut in [0, 5, 11] {
            let e = cache.truncate(n + cut).unwrap_err().to_string();
            assert!(
                e.contains("cannot truncate") && e.contains(&format!("position {}", n + 11)),
                "{e}"
            );
            assert_eq!(cache.len(), n + 14);
            assert_eq!(cache.held(1, 1), held);
        }
        for cut in [13, 12] {
            cache.truncate(n + cut).unwrap();
            assert_eq!(cache.len(), n + cut);
            assert!(cache.held(1, 1).iter().all(|&p| p < n + cut));
            for i in cut..14 {
                assert_eq!(
                    step(&mut cache, n + i, &steps[i]),
                    first[i],
                    "+{cut}: step {i}"
                );
                assert_eq!(cache.bytes(), bytes[i], "+{cut}: step {i}");
            }
        }
        // Before the second eviction, the first bounds truncation.
        let mut cache = ChunkSelectKv::evicting(&dense, &plan(&tokens, &boundary, budget));
        for (i, s) in steps[..6].iter().enumerate() {
            step(&mut cache, n + i, s);
        }
        assert!(cache.truncate(n).is_err());
        cache.truncate(n + 1).unwrap();
        for i in 1..6 {
            assert_eq!(step(&mut cache, n + i, &steps[i]), first[i], "step {i}");
        }
    }

    /// With a budget over the whole prompt an evicting cache drops
    /// nothing: every position stays held, and truncating to the prompt
    /// works (no eviction stands in the way) and decodes the same bits
    /// again. (`large_budget_is_dense_bitwise` checks that its outputs and
    /// reads are dense's.)
    #[test]
    fn evicting_with_a_budget_over_the_prompt_keeps_everything() {
        let mut rng = ChaCha8Rng::seed_from_u64(15);
        let n = 150;
        let (tokens, dense) = prompt(&mut rng, n);
        let boundary = table();
        let p = plan(&tokens, &boundary, 10_000);
        let steps: Vec<Step> = (0..40)
            .map(|_| {
                let t = token(&mut rng);
                random_step(&mut rng, t)
            })
            .collect();
        let mut evicting = ChunkSelectKv::evicting(&dense, &p);
        let outs: Vec<_> = steps
            .iter()
            .enumerate()
            .map(|(i, s)| step(&mut evicting, n + i, s))
            .collect();
        for l in 0..SHAPE.n_layers {
            for g in 0..SHAPE.n_kv_heads {
                assert_eq!(evicting.held(l, g), (0..n + 40).collect::<Vec<_>>());
            }
        }
        evicting.truncate(n).unwrap();
        for (i, s) in steps.iter().enumerate() {
            assert_eq!(step(&mut evicting, n + i, s), outs[i], "again, step {i}");
        }
    }

    /// In a block of several rows, the evicting cache's first row selects
    /// over all it holds and the later rows read the earlier selection
    /// (its chunks and at most `cap - 1` newest positions) and their block
    /// ancestors; committing the block drops what the first row left out.
    #[test]
    fn evicting_block_rows_read_what_is_held() {
        let mut rng = ChaCha8Rng::seed_from_u64(16);
        let (n, budget) = (200, 64);
        let (mut tokens, dense) = prompt(&mut rng, n);
        tokens[n - 1] = 0;
        let boundary = table();
        let mut cache = ChunkSelectKv::evicting(&dense, &plan(&tokens, &boundary, budget));
        let mut full = dense.clone();
        let s0 = random_step(&mut rng, 9);
        step(&mut cache, n, &s0);
        step(&mut full, n, &s0);
        let d = SHAPE.kv_dim();
        let rows3: Vec<Step> = [0u32, 5, 6]
            .into_iter()
            .map(|t| random_step(&mut rng, t))
            .collect();
        let held_before: Vec<Vec<usize>> = (0..SHAPE.n_layers * SHAPE.n_kv_heads)
            .map(|i| cache.held(i / SHAPE.n_kv_heads, i % SHAPE.n_kv_heads))
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
                    let cached = if i == 0 {
                        held_before[l * SHAPE.n_kv_heads + g].clone()
                    } else {
                        positions(&before.chunks, before.pos..n + 1)
                    };
                    let (k, v) = (full.keys(l), full.values(l));
                    let kv: Vec<(&[f32], &[f32])> = cached
                        .iter()
                        .map(|&r| (&k[r * d..(r + 1) * d], &v[r * d..(r + 1) * d]))
                        .chain((0..=i).map(|j| (&bk[j * d..(j + 1) * d], &bv[j * d..(j + 1) * d])))
                        .collect();
                    let want = attention_f64_of_head(group(&s.q[l], g), SHAPE.head_dim, g, &kv);
                    assert_close(&out, &want, TOL, &format!("row {i} layer {l} head {g}"));
                }
            }
        }
        for l in 0..SHAPE.n_layers {
            let k: Vec<f32> = rows3.iter().flat_map(|s| s.k[l].clone()).collect();
            let v: Vec<f32> = rows3.iter().flat_map(|s| s.v[l].clone()).collect();
            cache.append(l, n + 1, &k, &v);
        }
        assert_eq!(cache.len(), n + 4);
        for l in 0..SHAPE.n_layers {
            for g in 0..SHAPE.n_kv_heads {
                let sel = cache.selection(l, g).unwrap();
                assert_eq!(sel.pos, n + 1);
                assert_eq!(cache.held(l, g), positions(&sel.chunks, n + 1..n + 4));
            }
        }
    }

    /// The vote `chunk-select-vote` should take at a selection step whose
    /// query is `s`, over the committed `tokens` of `full`, by brute force
    /// in f64: per layer, the masses of [`brute_held_mass`] summed over
    /// the KV heads, counted by [`vote_chunks`] (checked on its own by
    /// `vote_counts_ballots_not_mass`).
    fn brute_vote(full: &DenseKv, s: &Step, tokens: &[u32], budget: usize) -> Vec<(usize, usize)> {
        let (p, d) = (tokens.len(), SHAPE.kv_dim());
        let held: Vec<usize> = (0..p).collect();
        let mut spans = Vec::new();
        let mass: Vec<Vec<f64>> = (0..SHAPE.n_layers)
            .map(|l| {
                let mut sum: Vec<f64> = Vec::new();
                for g in 0..SHAPE.n_kv_heads {
                    let keys = &full.keys(l)[..p * d];
                    let q = group(&s.q[l], g);
                    let (sp, m) = brute_held_mass(keys, &s.k[l], q, g, tokens, &held, budget);
                    sum.resize(m.len(), 0.0);
                    for (a, b) in sum.iter_mut().zip(&m) {
                        *a += b;
                    }
                    spans = sp;
                }
                sum
            })
            .collect();
        vote_chunks(&spans, &mass, budget, chunk_cap(budget))
    }

    /// The vote by hand: ballots are counted, so a chunk that every layer
    /// ranks second beats one that a single layer ranks first by far;
    /// ties go to the summed mass, then the later chunk; local chunks are
    /// kept outside the vote; a chunk that does not fit is skipped.
    #[test]
    fn vote_counts_ballots_not_mass() {
        let spans: Vec<(usize, usize)> = (0..6).map(|c| (4 * c, 4 * c + 4)).collect();
        // Budget 64: local room 4 (the newest chunk); cap 53 leaves room
        // for two more chunks of 4.
        let (budget, cap) = (64, 53);
        let mass = vec![
            vec![0.9, 0.06, 0.04, 0.0, 0.0, 5.0],
            vec![0.0, 0.4, 0.35, 0.1, 0.0, 5.0],
            vec![0.1, 0.3, 0.5, 0.0, 0.0, 5.0],
        ];
        // Ballots {0, 1}, {1, 2}, {2, 1}: votes 1, 3, 2. By summed mass
        // alone chunks 0 (1.0) and 2 (0.89) would beat chunk 1 (0.76).
        assert_eq!(
            vote_chunks(&spans, &mass, budget, cap),
            [(4, 8), (8, 12), (20, 24)]
        );
        // One vote each for chunks 0-3: summed mass decides.
        let split = vec![
            vec![0.5, 0.4, 0.0, 0.0, 0.0, 0.0],
            vec![0.0, 0.0, 0.3, 0.25, 0.0, 0.0],
        ];
        assert_eq!(
            vote_chunks(&spans, &split, budget, cap),
            [(0, 4), (4, 8), (20, 24)]
        );
        // No mass anywhere: the later chunks.
        let flat = vec![vec![0.0; 6]; 2];
        assert_eq!(
            vote_chunks(&spans, &flat, budget, cap),
            [(12, 16), (16, 20), (20, 24)]
        );
        // Uneven chunks: the newest (4 positions) is over the local room
        // of 2, so nothing is local; room 5 skips chunk 0 (6 positions)
        // and takes chunks 1 and 2, which fill 4.
        let uneven = [(0, 6), (6, 8), (8, 10), (10, 14)];
        assert_eq!(
            vote_chunks(&uneven, &[vec![0.9, 0.1, 0.05, 0.0]], 32, 28),
            [(6, 8), (8, 10)]
        );
    }

    /// `chunk-select-vote` over a decode: a selection step attends
    /// densely (bit for bit the dense cache), and once its token is
    /// committed every (layer, KV head) holds the same selection, the
    /// brute-force f64 vote; the steps until the next boundary read those
    /// chunks plus the positions since (checked against f64 attention
    /// over exactly those rows), within the budget.
    #[test]
    fn voting_steps_read_the_layers_vote() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let (n, budget) = (400, 128);
        let (mut tokens, dense) = prompt(&mut rng, n);
        tokens[n - 1] = 0;
        let boundary = table();
        let p = plan(&tokens, &boundary, budget);
        assert_eq!(ChunkSelectVote.id(), "chunk-select-vote");
        assert!(ChunkSelectVote.empty(&p).is_none());
        assert_eq!(ChunkSelectVote.from_dense(&dense, &p).len(), n);
        let mut cache = ChunkSelectKv::voting(&dense, &p);
        assert!(cache.votes() && !cache.evicts());
        let mut full = dense.clone();
        let mut differs = false;
        let mut vote: Vec<(usize, usize)> = Vec::new();
        let mut vote_pos = 0;
        for (i, t) in [50u32, 5, 7, 0, 4, 6, 9].into_iter().enumerate() {
            let pos = n + i;
            let s = random_step(&mut rng, t);
            let before = cache.reads();
            let got = step(&mut cache, pos, &s);
            let dense_out = step(&mut full, pos, &s);
            let read = cache.reads().rows_read - before.rows_read;
            let selects = i == 0 || t < 2;
            let per = (SHAPE.n_layers * SHAPE.n_kv_heads) as u64;
            if selects {
                assert_eq!(got, dense_out, "step {i}");
                assert_eq!(read, pos as u64 * per, "step {i}");
                vote = brute_vote(&full, &s, &tokens, budget);
                vote_pos = pos;
                let held: usize = vote.iter().map(|(a, b)| b - a).sum();
                assert!(held <= budget + 1 - cache.chunk_cap() && held > budget / 2);
            }
            for (l, got_l) in got.iter().enumerate() {
                for (g, got_lg) in got_l.iter().enumerate() {
                    let sel = cache.selection(l, g).expect("a vote was taken");
                    assert_eq!(sel.pos, vote_pos, "step {i}");
                    assert_eq!(sel.chunks, vote, "step {i} layer {l} head {g}");
                    if selects {
                        let own = brute_selection(
                            &full.keys(l)[..pos * SHAPE.kv_dim()],
                            &s.k[l],
                            group(&s.q[l], g),
                            g,
                            &tokens,
                            budget,
                        );
                        differs |= own != vote;
                    } else {
                        let rows = positions(&vote, vote_pos..pos);
                        assert!(rows.len() <= budget);
                        let kv = rows_with_own(&full, l, &rows, &s);
                        let want = attention_f64_of_head(group(&s.q[l], g), SHAPE.head_dim, g, &kv);
                        assert_close(got_lg, &want, TOL, &format!("step {i} layer {l} head {g}"));
                    }
                }
            }
            if !selects {
                let want = per * positions(&vote, vote_pos..pos).len() as u64;
                assert_eq!(read, want, "step {i}");
            }
            tokens.push(t);
        }
        // Not every head's own choice is the vote: the test tells the two
        // entries apart.
        assert!(differs);
    }
}
