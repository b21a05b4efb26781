//! The KV cache behind a trait, and the attention arithmetic every cache
//! shares.
//!
//! The decoder hands a cache the keys and values of committed positions
//! ([`KvCache::append`]) and asks it to attend for one query
//! ([`KvCache::attend`]). The cache decides which of its entries the query
//! sees, so an eviction or compression policy (a sliding window with
//! attention sinks, clustered keys with a log-count bias, block-sparse page
//! selection that looks at the query) is one implementation of this trait,
//! plugged into the same decoder. Every policy ends in [`attend_segments`],
//! whose arithmetic depends only on the list of keys, in order: that is what
//! keeps a query's result identical whether it is computed alone or in a
//! batch.
//!
//! The query also sees the not-yet-committed positions of the block being
//! computed (a prompt chunk, or the ancestors of a node in a verification
//! tree): those come in [`BlockKv`] and are always attended in full, after
//! the cache's own entries, the order a one-token step sees them in.

use std::sync::atomic::{AtomicU64, Ordering};

use super::DecoderError;

/// The cache's view of the model: what one position stores per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// Floats per position per layer for keys (and again for values).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Appends to `out` KV head `kv_head`'s `head_dim` floats of each of
    /// `rows`, rows of `kv_dim` floats in `x`: the layout of a cache that
    /// stores each head apart.
    pub fn extend_head(
        &self,
        out: &mut Vec<f32>,
        x: &[f32],
        kv_head: usize,
        rows: impl IntoIterator<Item = usize>,
    ) {
        let (d, hd) = (self.kv_dim(), self.head_dim);
        for r in rows {
            let at = r * d + kv_head * hd;
            out.extend_from_slice(&x[at..at + hd]);
        }
    }
}

/// Rows of the block in flight that one query sees: itself and its
/// ancestors, oldest first. Row `r` of `k`/`v` is `kv_dim` floats.
#[derive(Debug, Clone, Copy)]
pub struct BlockKv<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub rows: &'a [usize],
}

thread_local! {
    /// [`BlockKv::with_head`]'s copy of one KV head of the block in flight.
    static HEAD_BLOCK: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<usize>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

impl<'a> BlockKv<'a> {
    /// The block's rows as the last segment of [`attend_segments`] (no
    /// bias): every cache attends them after its own entries.
    pub fn segment(&self) -> Segment<'a> {
        Segment {
            k: self.k,
            v: self.v,
            rows: Rows::List(self.rows),
            bias: None,
        }
    }

    /// Calls `f` with this block's rows for KV head `kv_head` alone, laid
    /// out `head_dim` floats a row (row `i` for the `i`-th of `rows`): for a
    /// cache that stores each head apart. The floats are the same, so
    /// attention over them is the same arithmetic.
    pub fn with_head<R>(
        &self,
        shape: KvShape,
        kv_head: usize,
        f: impl FnOnce(&BlockKv<'_>) -> R,
    ) -> R {
        HEAD_BLOCK.with(|b| {
            let (bk, bv, rows) = &mut *b.borrow_mut();
            bk.clear();
            bv.clear();
            rows.clear();
            shape.extend_head(bk, self.k, kv_head, self.rows.iter().copied());
            shape.extend_head(bv, self.v, kv_head, self.rows.iter().copied());
            rows.extend(0..self.rows.len());
            f(&BlockKv { k: bk, v: bv, rows })
        })
    }
}

/// One run of keys/values for [`attend_segments`]: rows of `kv_dim` floats
/// in `k`/`v`, the ones named by `rows`, each with an optional additive
/// logit bias (for example `ln(count)` for a cluster centroid that stands in
/// for `count` keys).
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub rows: Rows<'a>,
    pub bias: Option<&'a [f32]>,
}

/// Which rows of a segment, in order.
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    Range(usize, usize),
    List(&'a [usize]),
}

impl Rows<'_> {
    fn len(&self) -> usize {
        match self {
            Rows::Range(a, b) => b - a,
            Rows::List(l) => l.len(),
        }
    }

    fn get(&self, i: usize) -> usize {
        match self {
            Rows::Range(a, _) => a + i,
            Rows::List(l) => l[i],
        }
    }
}

/// A KV cache: storage, the choice of what a query attends to, and byte
/// accounting. `Send + Sync` because the decoder attends from several
/// threads at once (reads only).
pub trait KvCache: Send + Sync {
    /// Commits positions `pos..pos + rows` of `layer`: `k` and `v` hold
    /// `rows * kv_dim` floats each (keys after RoPE). The decoder appends
    /// every layer, in order, for each block it commits.
    fn append(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]);

    /// Positions committed (the next position is `len()`), whatever the
    /// cache has since dropped or merged.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets positions `len..`. Speculative decoding uses it to drop a
    /// rejected suffix; a cache that can no longer restore the state at
    /// `len` (it evicted something that was visible then) says so.
    fn truncate(&mut self, len: usize) -> Result<(), DecoderError>;

    /// Attention output for the `n_rep` query heads of `q` (`n_rep *
    /// head_dim` floats, already rotated) that share KV head `kv_head` of
    /// `layer`, over what this cache lets them see plus `block` (keys of the
    /// block in flight, always visible, attended after the cache's own
    /// entries). Writes `n_rep * head_dim` floats to `out`.
    fn attend(
        &self,
        layer: usize,
        kv_head: usize,
        q: &[f32],
        block: &BlockKv<'_>,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    );

    /// Bytes held for keys and values (what a compression policy saves),
    /// including any metadata the policy keeps beside them (page bounds,
    /// centroid counts).
    fn bytes(&self) -> usize;

    /// Called by the decoder before it computes a block of new positions
    /// starting at `pos` (a prompt chunk or one decode step: positions
    /// `pos..pos + tokens.len()`; for a verification tree, its nodes in
    /// tree order, of which only an accepted path is committed), with their
    /// token ids. Policies that act on token boundaries (a chunk that
    /// ends at a sentence) learn the tokens here; the default ignores them.
    fn begin_block(&mut self, _pos: usize, _tokens: &[u32]) {}

    /// What attention has read so far: see [`Reads`]. The default (a cache
    /// that does not count) reports nothing.
    fn reads(&self) -> Reads {
        Reads::default()
    }

    /// The dense cache behind this one, if it is one (to reuse a dense
    /// prefill as the starting point of another policy).
    fn as_dense(&self) -> Option<&DenseKv> {
        None
    }
}

/// Read accounting, summed over every [`KvCache::attend`] call (one per
/// query position, layer and KV head): `rows_read` cached rows scored by
/// the query (selection metadata not included), out of `rows_visible`
/// committed positions the query could have seen. Rows of the block in
/// flight are not counted. `rows_read / rows_visible` is the share of the
/// cache a step reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reads {
    pub calls: u64,
    pub rows_read: u64,
    pub rows_visible: u64,
}

impl Reads {
    /// The share of visible positions read (1 for dense attention; NaN
    /// before any call).
    pub fn share(&self) -> f64 {
        self.rows_read as f64 / self.rows_visible as f64
    }
}

/// Thread-safe [`Reads`] counters for a cache's `attend` (which runs on
/// several threads at once).
#[derive(Debug, Default)]
pub struct ReadCounter {
    calls: AtomicU64,
    read: AtomicU64,
    visible: AtomicU64,
}

impl ReadCounter {
    pub fn add(&self, rows_read: usize, rows_visible: usize) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.read.fetch_add(rows_read as u64, Ordering::Relaxed);
        self.visible
            .fetch_add(rows_visible as u64, Ordering::Relaxed);
    }

    pub fn get(&self) -> Reads {
        Reads {
            calls: self.calls.load(Ordering::Relaxed),
            rows_read: self.read.load(Ordering::Relaxed),
            rows_visible: self.visible.load(Ordering::Relaxed),
        }
    }

    pub fn reset(&self) {
        self.calls.store(0, Ordering::Relaxed);
        self.read.store(0, Ordering::Relaxed);
        self.visible.store(0, Ordering::Relaxed);
    }
}

impl Clone for ReadCounter {
    fn clone(&self) -> Self {
        let r = self.get();
        ReadCounter {
            calls: AtomicU64::new(r.calls),
            read: AtomicU64::new(r.rows_read),
            visible: AtomicU64::new(r.rows_visible),
        }
    }
}

/// Softmax attention of `q` (`n_rep` heads of `head_dim`) over the rows of
/// `segments`, in order, using KV head `kv_head` of each row: scores
/// `q.k / sqrt(head_dim) + bias`, a max-subtracted softmax, and the weighted
/// sum of values accumulated in row order. The result depends only on the
/// sequence of rows, never on how many queries are in flight.
///
/// Where the CPU has AVX2 and FMA (checked once per process, so every call
/// of a run takes the same path) the arithmetic runs in 8-lane vectors
/// ([`simd`]): dot products with fused multiply-adds, the exponentials by a
/// polynomial (Cephes' `expf`, a few ulp), their sum and the weighted sum of
/// values in lanes, each in an order fixed by the row count alone. Until
/// 2026-11-29 it was built for baseline x86-64 with the library's scalar
/// `exp`, and each query head read its KV head's rows again, which made
/// attention, not the weights, the cost of long prompts. Qwen2.5-Coder-0.5B
/// on 2 cores, before and after: prefill of 8,192 tokens 31.0 -> 86.0
/// tokens/s, decode at 8k 8.1 -> 11.7 tokens/s
/// (`results/runs/2026-11-29-vm-cpu-decoder-vector-attention`).
pub fn attend_segments(
    q: &[f32],
    head_dim: usize,
    kv_dim: usize,
    kv_head: usize,
    segments: &[Segment<'_>],
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if super::kernels::has_avx2_fma() && q.len() / head_dim <= simd::MAX_REP {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        unsafe { simd::attend(q, head_dim, kv_dim, kv_head, segments, scores, out) };
        return;
    }
    attend_scalar(q, head_dim, kv_dim, kv_head, segments, scores, out);
}

/// [`attend_segments`] without vector instructions.
fn attend_scalar(
    q: &[f32],
    head_dim: usize,
    kv_dim: usize,
    kv_head: usize,
    segments: &[Segment<'_>],
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let n_rep = q.len() / head_dim;
    let total: usize = segments.iter().map(|s| s.rows.len()).sum();
    let scale = 1.0 / (head_dim as f32).sqrt();
    let off = kv_head * head_dim;
    for h in 0..n_rep {
        let qh = &q[h * head_dim..(h + 1) * head_dim];
        scores.clear();
        scores.reserve(total);
        for s in segments {
            for i in 0..s.rows.len() {
                let r = s.rows.get(i);
                let k = &s.k[r * kv_dim + off..r * kv_dim + off + head_dim];
                let mut v = super::kernels::dot(qh, k) * scale;
                if let Some(b) = s.bias {
                    v += b[r];
                }
                scores.push(v);
            }
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for v in scores.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        let oh = &mut out[h * head_dim..(h + 1) * head_dim];
        oh.fill(0.0);
        let mut j = 0;
        for s in segments {
            for i in 0..s.rows.len() {
                let r = s.rows.get(i);
                let p = scores[j] * inv;
                j += 1;
                let v = &s.v[r * kv_dim + off..r * kv_dim + off + head_dim];
                for (o, &x) in oh.iter_mut().zip(v) {
                    *o += p * x;
                }
            }
        }
    }
}

/// [`attend_segments`] in AVX2 vectors with fused multiply-adds. Every sum
/// runs in eight lanes in index order, then a fixed tree across the lanes;
/// a slice's last `len % 8` elements go through the same vector code with
/// the missing lanes zero (and left out of sums), except the value sum's,
/// which take scalar fused multiply-adds; so each element's arithmetic
/// depends only on its index and the slice's length.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::Segment;

    /// Most query heads per KV head this path takes (`attend_segments`
    /// sends more to the scalar path).
    pub(super) const MAX_REP: usize = 16;

    /// The query heads that share the KV head go through each row
    /// together (one read of its key and value for all of them); each
    /// head's arithmetic is the same as if it were alone.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend(
        q: &[f32],
        head_dim: usize,
        kv_dim: usize,
        kv_head: usize,
        segments: &[Segment<'_>],
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let n_rep = q.len() / head_dim;
        let total: usize = segments.iter().map(|s| s.rows.len()).sum();
        let scale = 1.0 / (head_dim as f32).sqrt();
        let off = kv_head * head_dim;
        // scores[h * total + j]: head h, row j.
        scores.clear();
        scores.resize(n_rep * total, 0.0);
        let mut j = 0;
        for s in segments {
            for i in 0..s.rows.len() {
                let r = s.rows.get(i);
                let k = &s.k[r * kv_dim + off..r * kv_dim + off + head_dim];
                let b = s.bias.map_or(0.0, |b| b[r]);
                for h in 0..n_rep {
                    let v = dot(&q[h * head_dim..(h + 1) * head_dim], k) * scale;
                    scores[h * total + j] = if s.bias.is_some() { v + b } else { v };
                }
                j += 1;
            }
        }
        let mut inv = [0f32; MAX_REP];
        for h in 0..n_rep {
            let row = &mut scores[h * total..(h + 1) * total];
            let m = max(row);
            inv[h] = 1.0 / exp_sub_sum(row, m);
        }
        out[..n_rep * head_dim].fill(0.0);
        let mut j = 0;
        for s in segments {
            for i in 0..s.rows.len() {
                let r = s.rows.get(i);
                let v = &s.v[r * kv_dim + off..r * kv_dim + off + head_dim];
                for h in 0..n_rep {
                    let p = scores[h * total + j] * inv[h];
                    axpy(&mut out[h * head_dim..(h + 1) * head_dim], p, v);
                }
                j += 1;
            }
        }
    }

    /// The lanes of `v` summed in a fixed order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
        _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)))
    }

    /// Elements `i..i + n` of `x` (`n <= 8`), the other lanes zero.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn load_part(x: &[f32], i: usize, n: usize) -> __m256 {
        let mut buf = [0f32; 8];
        buf[..n].copy_from_slice(&x[i..i + n]);
        // SAFETY: `buf` holds 8 floats.
        unsafe { _mm256_loadu_ps(buf.as_ptr()) }
    }

    /// `a . b`: two 8-lane accumulators of fused multiply-adds (16
    /// elements a round), the tail through zero-padded lanes, then the
    /// lanes in a fixed tree.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        // SAFETY: every load reads 8 floats below `n`.
        unsafe {
            while i + 16 <= n {
                let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb), acc0);
                acc1 =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(8)), _mm256_loadu_ps(pb.add(8)), acc1);
                i += 16;
            }
            if i + 8 <= n {
                let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb), acc0);
                i += 8;
            }
        }
        if i < n {
            acc1 = _mm256_fmadd_ps(load_part(a, i, n - i), load_part(b, i, n - i), acc1);
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }

    /// The largest element (`-inf` for none).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn max(x: &[f32]) -> f32 {
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i + 8 <= x.len() {
            // SAFETY: 8 floats from `i`, below the length.
            m = _mm256_max_ps(m, unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) });
            i += 8;
        }
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
        lanes
            .iter()
            .chain(&x[i..])
            .copied()
            .fold(f32::NEG_INFINITY, f32::max)
    }

    /// `exp(x)` in each lane: Cephes' `expf` (range reduction by ln 2 in two
    /// parts, a degree-6 polynomial, the power of two put in the exponent
    /// bits); inputs are clamped to +-88.376, below which the result is 0.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-88.376_26)),
            _mm256_set1_ps(88.376_26),
        );
        let fx = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        ));
        let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
        let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), x);
        let z = _mm256_mul_ps(x, x);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0));
        let e = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
        _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e)))
    }

    /// `x[i] = exp(x[i] - max)` for every element; returns their sum.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp_sub_sum(x: &mut [f32], max: f32) -> f32 {
        let m = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        let n = x.len();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: 8 floats from `i`, below the length.
            unsafe {
                let p = x.as_mut_ptr().add(i);
                let e = exp(_mm256_sub_ps(_mm256_loadu_ps(p), m));
                _mm256_storeu_ps(p, e);
                acc = _mm256_add_ps(acc, e);
            }
            i += 8;
        }
        if i < n {
            let k = n - i;
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` holds 8 floats.
            unsafe {
                _mm256_storeu_ps(
                    lanes.as_mut_ptr(),
                    exp(_mm256_sub_ps(load_part(x, i, k), m)),
                )
            };
            lanes[k..].fill(0.0);
            x[i..].copy_from_slice(&lanes[..k]);
            // SAFETY: as above.
            acc = _mm256_add_ps(acc, unsafe { _mm256_loadu_ps(lanes.as_ptr()) });
        }
        hsum(acc)
    }

    /// `o += p * v`, element by element (fused).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn axpy(o: &mut [f32], p: f32, v: &[f32]) {
        let n = o.len().min(v.len());
        let pv = _mm256_set1_ps(p);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: 8 floats from `i` in both, below `n`.
            unsafe {
                let po = o.as_mut_ptr().add(i);
                let r =
                    _mm256_fmadd_ps(pv, _mm256_loadu_ps(v.as_ptr().add(i)), _mm256_loadu_ps(po));
                _mm256_storeu_ps(po, r);
            }
            i += 8;
        }
        for (o, &x) in o[i..n].iter_mut().zip(&v[i..n]) {
            *o = p.mul_add(x, *o);
        }
    }
}

/// Everything kept, in f32, in buffers that grow by doubling (reserve
/// `capacity` positions up front to never reallocate).
#[derive(Debug, Clone)]
pub struct DenseKv {
    shape: KvShape,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    reads: ReadCounter,
}

impl DenseKv {
    pub fn new(shape: KvShape, capacity: usize) -> DenseKv {
        let n = capacity * shape.kv_dim();
        DenseKv {
            shape,
            k: (0..shape.n_layers).map(|_| Vec::with_capacity(n)).collect(),
            v: (0..shape.n_layers).map(|_| Vec::with_capacity(n)).collect(),
            reads: ReadCounter::default(),
        }
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// Keys of `layer`, `len() * kv_dim` floats, position-major (each row
    /// holds every KV head, head-major within the row).
    pub fn keys(&self, layer: usize) -> &[f32] {
        &self.k[layer]
    }

    /// Values of `layer`, laid out as [`DenseKv::keys`].
    pub fn values(&self, layer: usize) -> &[f32] {
        &self.v[layer]
    }

    /// Zeroes the read counters (a clone of a prefilled cache starts its
    /// decode accounting afresh).
    pub fn reset_reads(&self) {
        self.reads.reset();
    }
}

impl KvCache for DenseKv {
    fn append(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let d = self.shape.kv_dim();
        assert_eq!(
            self.k[layer].len(),
            pos * d,
            "dense cache: append out of order"
        );
        assert_eq!(k.len(), v.len());
        self.k[layer].extend_from_slice(k);
        self.v[layer].extend_from_slice(v);
    }

    fn len(&self) -> usize {
        self.k.last().map_or(0, |k| k.len() / self.shape.kv_dim())
    }

    fn truncate(&mut self, len: usize) -> Result<(), DecoderError> {
        let n = len * self.shape.kv_dim();
        for (k, v) in self.k.iter_mut().zip(&mut self.v) {
            k.truncate(n);
            v.truncate(n);
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
        let d = self.shape.kv_dim();
        let n = self.k[layer].len() / d;
        let segments = [
            Segment {
                k: &self.k[layer],
                v: &self.v[layer],
                rows: Rows::Range(0, n),
                bias: None,
            },
            block.segment(),
        ];
        attend_segments(q, self.shape.head_dim, d, kv_head, &segments, scores, out);
        self.reads.add(n, n);
    }

    fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|x| x.len() * 4).sum()
    }

    fn reads(&self) -> Reads {
        self.reads.get()
    }

    fn as_dense(&self) -> Option<&DenseKv> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Attention against a float64 softmax on random data: relative error
    /// below 1e-5 (f32 arithmetic on ~40 terms of magnitude <= 1).
    #[test]
    fn dense_attention_matches_f64() {
        let shape = KvShape {
            n_layers: 1,
            n_kv_heads: 2,
            head_dim: 8,
        };
        let d = shape.kv_dim();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let mut r = |n: usize| {
            (0..n)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect::<Vec<_>>()
        };
        let mut kv = DenseKv::new(shape, 4);
        let (k, v) = (r(30 * d), r(30 * d));
        kv.append(0, 0, &k, &v);
        let (bk, bv) = (r(3 * d), r(3 * d));
        let q = r(2 * 8);
        let block = BlockKv {
            k: &bk,
            v: &bv,
            rows: &[0, 2],
        };
        let mut out = vec![0f32; 16];
        kv.attend(0, 1, &q, &block, &mut Vec::new(), &mut out);
        let keys: Vec<(&[f32], &[f32])> = (0..30)
            .map(|i| (&k[i * d + 8..i * d + 16], &v[i * d + 8..i * d + 16]))
            .chain(
                [0, 2]
                    .iter()
                    .map(|&i| (&bk[i * d + 8..i * d + 16], &bv[i * d + 8..i * d + 16])),
            )
            .collect();
        for h in 0..2 {
            let qh = &q[h * 8..h * 8 + 8];
            let s: Vec<f64> = keys
                .iter()
                .map(|(k, _)| {
                    qh.iter()
                        .zip(*k)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        / 8f64.sqrt()
                })
                .collect();
            let m = s.iter().copied().fold(f64::MIN, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for j in 0..8 {
                let want: f64 = keys
                    .iter()
                    .zip(&e)
                    .map(|((_, v), p)| v[j] as f64 * p / z)
                    .sum();
                let got = out[h * 8 + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{got} vs {want}"
                );
            }
        }
        assert_eq!(kv.len(), 30);
        assert_eq!(kv.bytes(), 2 * 30 * d * 4);
        assert_eq!(
            kv.reads(),
            Reads {
                calls: 1,
                rows_read: 30,
                rows_visible: 30
            }
        );
        assert_eq!(kv.keys(0), &k[..]);
        kv.truncate(10).unwrap();
        assert_eq!(kv.len(), 10);
        assert_eq!(kv.bytes(), 2 * 10 * d * 4);
    }

    /// Float64 attention of one query head over `keys` (key, value, bias).
    fn reference(q: &[f32], keys: &[(&[f32], &[f32], f32)]) -> Vec<f64> {
        let d = q.len();
        let s: Vec<f64> = keys
            .iter()
            .map(|(k, _, b)| {
                q.iter()
                    .zip(*k)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
                    / (d as f64).sqrt()
                    + *b as f64
            })
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        (0..d)
            .map(|c| {
                keys.iter()
                    .zip(&e)
                    .map(|((_, v, _), w)| w / z * v[c] as f64)
                    .sum()
            })
            .collect()
    }

    /// `attend_segments` on the path this CPU takes (vector or scalar), and
    /// the scalar path, against float64: grouped heads (1 to 7 per KV
    /// head), rows not a multiple of 8 (the vectors' tails), a bias, two
    /// segments (a range and a list) and head dimensions 64 and 12. Scores
    /// spread over about +-6, so the softmax is far from uniform.
    #[test]
    fn attention_paths_match_f64() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        for &(hd, n_kv) in &[(64usize, 2usize), (12, 3)] {
            for &rows in &[1usize, 7, 8, 9, 40, 203] {
                for n_rep in [1usize, 3, 7] {
                    let d = hd * n_kv;
                    let mut r = |n: usize, a: f32| {
                        (0..n)
                            .map(|_| rng.random_range(-a..a))
                            .collect::<Vec<f32>>()
                    };
                    let (k, v) = (r(rows * d, 1.0), r(rows * d, 1.0));
                    let bias = r(rows, 2.0);
                    let q = r(n_rep * hd, 2.5);
                    let list: Vec<usize> = (0..rows).rev().step_by(2).collect();
                    let segments = [
                        Segment {
                            k: &k,
                            v: &v,
                            rows: Rows::Range(0, rows),
                            bias: Some(&bias),
                        },
                        Segment {
                            k: &k,
                            v: &v,
                            rows: Rows::List(&list),
                            bias: None,
                        },
                    ];
                    let kv_head = n_kv - 1;
                    let off = kv_head * hd;
                    let keys: Vec<(&[f32], &[f32], f32)> = (0..rows)
                        .map(|i| (i, bias[i]))
                        .chain(list.iter().map(|&i| (i, 0.0)))
                        .map(|(i, b)| {
                            (
                                &k[i * d + off..i * d + off + hd],
                                &v[i * d + off..i * d + off + hd],
                                b,
                            )
                        })
                        .collect();
                    let mut fast = vec![0f32; n_rep * hd];
                    let mut slow = vec![0f32; n_rep * hd];
                    attend_segments(&q, hd, d, kv_head, &segments, &mut Vec::new(), &mut fast);
                    attend_scalar(&q, hd, d, kv_head, &segments, &mut Vec::new(), &mut slow);
                    for h in 0..n_rep {
                        let want = reference(&q[h * hd..(h + 1) * hd], &keys);
                        let scale = want.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-3);
                        for (name, got) in [("dispatched", &fast), ("scalar", &slow)] {
                            let err = got[h * hd..(h + 1) * hd]
                                .iter()
                                .zip(&want)
                                .map(|(&g, w)| (g as f64 - w).abs())
                                .fold(0f64, f64::max)
                                / scale;
                            assert!(
                                err < 2e-5,
                                "{name} hd={hd} rows={rows} n_rep={n_rep} head {h}: {err:.2e}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The vector `exp` against float64 over the range softmax uses (every
    /// argument at most 0): relative error within 4 ulp down to -80, and 0
    /// or at most about 1e-35 below.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_matches_f64() {
        if !crate::decoder::kernels::has_avx2_fma() {
            eprintln!("no AVX2/FMA here: vector exp not tested");
            return;
        }
        use std::arch::x86_64::*;
        let mut worst = 0f64;
        let mut x = -88.0f32;
        while x <= 0.0 {
            let xs: [f32; 8] = std::array::from_fn(|i| x + i as f32 * 1.37e-3);
            let mut got = [0f32; 8];
            // SAFETY: the CPU has AVX2 and FMA (checked above); both arrays
            // hold 8 floats.
            unsafe {
                _mm256_storeu_ps(got.as_mut_ptr(), simd::exp(_mm256_loadu_ps(xs.as_ptr())));
            }
            for (&a, &g) in xs.iter().zip(&got) {
                let want = (a as f64).exp();
                if a > -80.0 {
                    worst = worst.max(((g as f64 - want) / want).abs());
                } else {
                    assert!(g >= 0.0 && (g as f64) < 1e-34, "exp({a}) = {g}");
                }
            }
            x += 0.0173;
        }
        assert!(
            worst < 4.0 * f32::EPSILON as f64,
            "worst relative error {worst:.2e}"
        );
        eprintln!("vector exp: worst relative error {worst:.2e}");
    }
}
