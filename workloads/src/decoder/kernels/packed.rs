//! Weights repacked sixteen rows at a time for AVX-512 VNNI, so that one
//! `vpdpbusd` multiplies four weights of each of sixteen rows by the same
//! four activations (broadcast), and each of the sixteen 32-bit lanes holds
//! one output column: no horizontal sums, and the weight unpacking is
//! shared by every activation row of a call.
//!
//! The idea is llama.cpp's repacked CPU layouts (ggml-cpu `repack.cpp`,
//! the `q4_K_8x8` family, and the VNNI tiles of `tiled-kernel.cpp`); the
//! layouts and kernels here are our own, one per format the Qwen models
//! use: Q4_K and Q6_K (activations in Q8_K) and Q5_0 and Q8_0 (activations
//! in Q8_0).
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so the weights are
//! stored unsigned (Q4_K's 0..15 as they are; Q6_K's and Q5_0's values
//! before their offsets of 32 and 16; Q8_0's with 128 added) and the
//! offset comes back through the activation block sums (Q8_K's `bsums`,
//! and for Q8_0 a sum per block computed once per activation row, see
//! [`Q8_0Side`]). Every block's integer dot product is exact, and each
//! lane's f32 accumulation is one fixed sequence of operations per block
//! that does not depend on how many activation rows a call has: a row
//! computed alone (decode) gives the bits it gives in a batch (prefill,
//! batched verification), as everywhere in [`super`].
//!
//! Layout: a packed matrix is its groups of sixteen rows one after the
//! other; a group is its blocks in order, each block the sixteen rows'
//! blocks rearranged (see each format's `pack`). Nibbles of two groups of
//! four weights share a byte lane: byte `j` of a row's 32-bit lane holds
//! weight `4t + j` in its low nibble and `4t + 4 + j` in its high one,
//! which one AND and one shift turn into the two `vpdpbusd` operands.
//! The packed copy has the bytes of the original blocks, except Q4_K's
//! 6-bit scales and minimums, stored as whole bytes (3% more), so decoding
//! reads about as much as before.

use std::arch::x86_64::*;
use std::ops::Range;

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ5_0, BlockQ6K, BlockQ8_0};
use candle_core::quantized::GgmlDType;

use super::x86::{view, Mirror, Q4K, Q5_0, Q6K, Q8K, Q8_0};

/// Rows per group: the sixteen 32-bit lanes of a 512-bit vector.
pub(super) const ROWS: usize = 16;

/// For Q8_0 activation rows, per block: the scale as f32 and the sum of
/// the 32 quantized values, computed once per row when the row is
/// quantized (see `Scratch::prepare`).
#[derive(Clone, Copy)]
pub(super) struct Q8_0Side {
    pub d: f32,
    pub sum: i32,
}

impl Q8_0Side {
    pub fn of(b: &BlockQ8_0) -> Q8_0Side {
        // SAFETY: `Q8_0` mirrors `BlockQ8_0` (asserted in `x86`).
        let b = &view::<Q8_0>(std::slice::from_ref(b))[0];
        Q8_0Side {
            d: half::f16::from_bits(b.d).to_f32(),
            sum: b.qs.iter().map(|&q| q as i32).sum(),
        }
    }
}

/// The activation rows of one call: `m` rows of `row_bytes` quantized
/// bytes each, and for Q8_0 rows their per-block side values.
#[derive(Clone, Copy)]
pub(super) struct Act<'a> {
    pub xq: &'a [u8],
    pub row_bytes: usize,
    pub side: &'a [Q8_0Side],
}

/// `out[r * out_stride + c] = dot(w[c], x[r])` for the packed columns `c`
/// in `cols`, every row `r < m`.
pub(super) type PackedCols = unsafe fn(&[u8], usize, Range<usize>, Act<'_>, usize, *mut f32, usize);

/// A weight matrix's first `rows` rows (a multiple of [`ROWS`]), repacked.
pub(super) struct Packed {
    pub data: Vec<u8>,
    pub rows: usize,
    pub cols: PackedCols,
}

/// One format's packing and kernel.
trait Format: Mirror + Sized + 'static {
    /// Bytes of one block of sixteen rows.
    const BYTES: usize;
    /// Weights per block (one activation block each).
    const BLOCK_LEN: usize;
    /// Whether the activations are Q8_0 rows with their [`Q8_0Side`].
    const SIDE: bool;

    /// The sixteen rows' block `i`, repacked into `dst` (`BYTES` long).
    fn pack(rows: [&Self; ROWS], dst: &mut [u8]);

    /// The sixteen columns of one group against `NR` activation rows.
    ///
    /// # Safety
    /// AVX512F/BW/VL/VNNI available; `p` points at `kb` packed blocks;
    /// each `x[r]` at `kb` activation blocks (bytes of the activation
    /// format) and, for Q8_0 activations, `side[r]` at `kb` side values.
    unsafe fn group<const NR: usize>(
        p: *const u8,
        kb: usize,
        x: [*const u8; NR],
        side: [*const Q8_0Side; NR],
    ) -> [__m512; NR];
}

/// Packs the first `n_rows - n_rows % ROWS` rows of a `dtype` matrix
/// (`bytes`, rows of `k` weights), or `None` when the format has no packed
/// kernel or there is no whole group.
pub(super) fn pack(dtype: GgmlDType, bytes: &[u8], n_rows: usize, k: usize) -> Option<Packed> {
    match dtype {
        GgmlDType::Q4K => pack_as::<Q4K>(super::blocks::<BlockQ4K>(bytes), n_rows, k),
        GgmlDType::Q6K => pack_as::<Q6K>(super::blocks::<BlockQ6K>(bytes), n_rows, k),
        GgmlDType::Q5_0 => pack_as::<Q5_0>(super::blocks::<BlockQ5_0>(bytes), n_rows, k),
        GgmlDType::Q8_0 => pack_as::<Q8_0>(super::blocks::<BlockQ8_0>(bytes), n_rows, k),
        _ => None,
    }
}

fn pack_as<F: Format>(w: &[F::Of], n_rows: usize, k: usize) -> Option<Packed> {
    let (rows, kb) = (n_rows / ROWS * ROWS, k / F::BLOCK_LEN);
    if rows == 0 {
        return None;
    }
    let w = view::<F>(w);
    assert!(w.len() >= rows * kb);
    let mut data = vec![0u8; rows / ROWS * kb * F::BYTES];
    for (g, dst) in data.chunks_exact_mut(kb * F::BYTES).enumerate() {
        for (i, d) in dst.chunks_exact_mut(F::BYTES).enumerate() {
            F::pack(std::array::from_fn(|r| &w[(g * ROWS + r) * kb + i]), d);
        }
    }
    Some(Packed {
        data,
        rows,
        cols: cols::<F>,
    })
}

/// # Safety
/// As for [`PackedCols`]: concurrent calls have disjoint `cols`, all below
/// the packed rows; `out` holds `(m - 1) * out_stride + cols.end` floats;
/// AVX512F/BW/VL/VNNI available.
unsafe fn cols<F: Format>(
    packed: &[u8],
    k: usize,
    cols: Range<usize>,
    act: Act<'_>,
    m: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let kb = k / F::BLOCK_LEN;
    let group_bytes = kb * F::BYTES;
    assert!(cols.end.div_ceil(ROWS) * group_bytes <= packed.len());
    assert!(m * act.row_bytes <= act.xq.len());
    assert!(!F::SIDE || act.side.len() >= m * kb);
    let mut g = cols.start / ROWS;
    while g * ROWS < cols.end {
        let (a, b) = (cols.start.max(g * ROWS), cols.end.min((g + 1) * ROWS));
        let mask: __mmask16 = (((1u32 << (b - a)) - 1) << (a - g * ROWS)) as u16;
        let p = unsafe { packed.as_ptr().add(g * group_bytes) };
        let mut r0 = 0;
        while r0 < m {
            // Four rows per weight unpacking, then two, then one: each
            // row's lanes are the same bits in any of them.
            let take = match m - r0 {
                4.. => 4,
                2..4 => 2,
                _ => 1,
            };
            let x = |i: usize| unsafe { act.xq.as_ptr().add((r0 + i) * act.row_bytes) };
            let s = |i: usize| {
                if F::SIDE {
                    unsafe { act.side.as_ptr().add((r0 + i) * kb) }
                } else {
                    std::ptr::null()
                }
            };
            // SAFETY: the bounds asserted above; the caller's contract.
            unsafe {
                match take {
                    4 => store(
                        F::group::<4>(p, kb, [x(0), x(1), x(2), x(3)], [s(0), s(1), s(2), s(3)]),
                        out,
                        r0,
                        out_stride,
                        g,
                        mask,
                    ),
                    2 => store(
                        F::group::<2>(p, kb, [x(0), x(1)], [s(0), s(1)]),
                        out,
                        r0,
                        out_stride,
                        g,
                        mask,
                    ),
                    _ => store(
                        F::group::<1>(p, kb, [x(0)], [s(0)]),
                        out,
                        r0,
                        out_stride,
                        g,
                        mask,
                    ),
                }
            }
            r0 += take;
        }
        g += 1;
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn store<const NR: usize>(
    v: [__m512; NR],
    out: *mut f32,
    r0: usize,
    out_stride: usize,
    g: usize,
    mask: __mmask16,
) {
    for (i, v) in v.into_iter().enumerate() {
        // SAFETY: the caller's bounds; the mask keeps to its columns.
        unsafe { _mm512_mask_storeu_ps(out.add((r0 + i) * out_stride + g * ROWS), mask, v) };
    }
}

/// Sixteen f16 values at `p` as f32 lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn f16x16(p: *const u8) -> __m512 {
    unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn load64(p: *const u8) -> __m512i {
    unsafe { _mm512_loadu_si512(p as *const __m512i) }
}

/// The 32-bit word `t` at `p`, in every lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn bcast(p: *const u8, t: usize) -> __m512i {
    unsafe { _mm512_set1_epi32((p as *const i32).add(t).read_unaligned()) }
}

/// Sum over `t` of `w[t]` (unsigned) times the activation word `t` at `ys`
/// (signed, broadcast): four weights of sixteen rows per `vpdpbusd`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_words<const N: usize>(w: &[__m512i; N], ys: *const u8) -> __m512i {
    let mut s = _mm512_setzero_si512();
    for (t, &wt) in w.iter().enumerate() {
        // SAFETY: the caller's `ys` holds `N` words.
        s = _mm512_dpbusd_epi32(s, wt, unsafe { bcast(ys, t) });
    }
    s
}

/// The 32-weight formats (activations in Q8_0): block `i`'s unsigned
/// weights `w` (the weights plus `offset`) and scales `d` against each
/// row's block, into `acc`.
///
/// # Safety
/// As for `Format::group`: `x[r]` and `side[r]` hold block `i`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn accumulate_q8_0<const NR: usize>(
    acc: &mut [__m512; NR],
    w: &[__m512i; 8],
    d: __m512,
    offset: i32,
    x: [*const Q8_0; NR],
    side: [*const Q8_0Side; NR],
    i: usize,
) {
    for r in 0..NR {
        let (y, sd) = unsafe { (&*x[r].add(i), *side[r].add(i)) };
        let s = unsafe { dot_words(w, y.qs.as_ptr() as *const u8) };
        let s = _mm512_sub_epi32(s, _mm512_set1_epi32(offset * sd.sum));
        let ds = _mm512_mul_ps(d, _mm512_set1_ps(sd.d));
        acc[r] = _mm512_fmadd_ps(ds, _mm512_cvtepi32_ps(s), acc[r]);
    }
}

/// Nibble byte for weights `4t + j` (low) and `4t + 4 + j` (high).
fn nibble_pair(q: &[u8], t: usize, j: usize) -> u8 {
    (q[4 * t + j] & 0x0F) | (q[4 * t + 4 + j] << 4)
}

/// The sixteen rows' values `q[r][..n]` (each below 16) as nibble vectors:
/// `n / 8` vectors of 64 bytes, vector `v` holding weights `8v..8v + 8`.
fn put_nibbles(q: &[[u8; 256]; ROWS], n: usize, dst: &mut [u8]) {
    for v in 0..n / 8 {
        for r in 0..ROWS {
            for j in 0..4 {
                dst[64 * v + 4 * r + j] = nibble_pair(&q[r], 2 * v, j);
            }
        }
    }
}

fn put_f16(vals: [u16; ROWS], dst: &mut [u8]) {
    for (r, v) in vals.iter().enumerate() {
        dst[2 * r..2 * r + 2].copy_from_slice(&v.to_le_bytes());
    }
}

/// Q4_K's sub-block scale and minimum `j` (ggml's `get_scale_min_k4`).
fn q4k_scale_min(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

// Q4_K, 2,368 bytes per block of sixteen rows: d (16 x f16), dmin
// (16 x f16), scales [sub-block][row] (u8), minimums [sub-block][row]
// (u8), then per sub-block of 32 weights four nibble vectors.
const Q4K_SC: usize = 64;
const Q4K_MN: usize = Q4K_SC + 128;
const Q4K_QS: usize = Q4K_MN + 128;

impl Format for Q4K {
    const BLOCK_LEN: usize = 256;
    const BYTES: usize = Q4K_QS + 2048;
    const SIDE: bool = false;

    fn pack(rows: [&Self; ROWS], dst: &mut [u8]) {
        put_f16(rows.map(|b| b.d), &mut dst[..32]);
        put_f16(rows.map(|b| b.dmin), &mut dst[32..64]);
        let mut q = [[0u8; 256]; ROWS];
        for (r, b) in rows.iter().enumerate() {
            for sb in 0..8 {
                let (sc, mn) = q4k_scale_min(sb, &b.scales);
                dst[Q4K_SC + 16 * sb + r] = sc;
                dst[Q4K_MN + 16 * sb + r] = mn;
            }
            // Bytes 32j..32j + 32: weights 64j + l (low) and 64j + 32 + l.
            for (e, v) in q[r].iter_mut().enumerate() {
                let (j, l) = (e / 64, e % 64);
                let byte = b.qs[32 * j + l % 32];
                *v = if l < 32 { byte & 0x0F } else { byte >> 4 };
            }
        }
        put_nibbles(&q, 256, &mut dst[Q4K_QS..]);
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn group<const NR: usize>(
        p: *const u8,
        kb: usize,
        x: [*const u8; NR],
        _side: [*const Q8_0Side; NR],
    ) -> [__m512; NR] {
        let m4 = _mm512_set1_epi8(0x0F);
        let x = x.map(|x| x as *const Q8K);
        let mut acc = [_mm512_setzero_ps(); NR];
        for i in 0..kb {
            // SAFETY (whole body): within the blocks the caller vouches for.
            let b = unsafe { p.add(i * Self::BYTES) };
            let mut sumi = [_mm512_setzero_si512(); NR];
            let mut mins = [_mm512_setzero_si512(); NR];
            for sb in 0..8 {
                let (sc, mn) = unsafe {
                    (
                        _mm512_cvtepu8_epi32(_mm_loadu_si128(
                            b.add(Q4K_SC + 16 * sb) as *const __m128i
                        )),
                        _mm512_cvtepu8_epi32(_mm_loadu_si128(
                            b.add(Q4K_MN + 16 * sb) as *const __m128i
                        )),
                    )
                };
                // The minimum in both 16-bit halves, against the pair of
                // 16-weight sums of the activations.
                let mn = _mm512_or_si512(mn, _mm512_slli_epi32::<16>(mn));
                let q = unsafe { b.add(Q4K_QS + 256 * sb) };
                let mut w = [_mm512_setzero_si512(); 8];
                for v in 0..4 {
                    let bits = unsafe { load64(q.add(64 * v)) };
                    w[2 * v] = _mm512_and_si512(bits, m4);
                    w[2 * v + 1] = _mm512_and_si512(_mm512_srli_epi16::<4>(bits), m4);
                }
                for r in 0..NR {
                    let y = unsafe { &*x[r].add(i) };
                    let ys = y.qs.as_ptr().wrapping_add(32 * sb) as *const u8;
                    let s = unsafe { dot_words(&w, ys) };
                    sumi[r] = _mm512_add_epi32(sumi[r], _mm512_mullo_epi32(s, sc));
                    let bs = unsafe { bcast(y.bsums.as_ptr() as *const u8, sb) };
                    mins[r] = _mm512_dpwssd_epi32(mins[r], mn, bs);
                }
            }
            let (d, dmin) = unsafe { (f16x16(b), f16x16(b.add(32))) };
            for r in 0..NR {
                let dx = _mm512_set1_ps(unsafe { (*x[r].add(i)).d });
                acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(d, dx), _mm512_cvtepi32_ps(sumi[r]), acc[r]);
                acc[r] =
                    _mm512_fnmadd_ps(_mm512_mul_ps(dmin, dx), _mm512_cvtepi32_ps(mins[r]), acc[r]);
            }
        }
        acc
    }
}

// Q6_K, 3,360 bytes per block of sixteen rows: d (16 x f16), scales as
// pairs [sub-block pair][row][2] (i8), the low four bits as nibble vectors
// (32 of them), then per sub-block of 16 weights one vector of the high
// two bits: byte j of a row's lane holds, in bits 2u..2u + 2, the high
// bits of weight 4u + j of the sub-block.
const Q6K_SC: usize = 32;
const Q6K_QL: usize = Q6K_SC + 256;
const Q6K_QH: usize = Q6K_QL + 2048;

impl Format for Q6K {
    const BLOCK_LEN: usize = 256;
    const BYTES: usize = Q6K_QH + 1024;
    const SIDE: bool = false;

    fn pack(rows: [&Self; ROWS], dst: &mut [u8]) {
        put_f16(rows.map(|b| b.d), &mut dst[..32]);
        let mut q = [[0u8; 256]; ROWS];
        for (r, b) in rows.iter().enumerate() {
            for (s, &sc) in b.scales.iter().enumerate() {
                dst[Q6K_SC + 32 * (s / 2) + 2 * r + s % 2] = sc as u8;
            }
            // ggml's layout: per half n of 128 weights, for l < 32, ql[l]
            // and ql[l + 32] hold the low bits of weights l, l + 32 (low
            // nibbles) and l + 64, l + 96 (high), qh[l] their high bits.
            for n in 0..2 {
                for l in 0..32 {
                    let (a, c, h) = (b.ql[64 * n + l], b.ql[64 * n + l + 32], b.qh[32 * n + l]);
                    let e = 128 * n + l;
                    q[r][e] = (a & 0x0F) | ((h & 3) << 4);
                    q[r][e + 32] = (c & 0x0F) | (((h >> 2) & 3) << 4);
                    q[r][e + 64] = (a >> 4) | (((h >> 4) & 3) << 4);
                    q[r][e + 96] = (c >> 4) | (((h >> 6) & 3) << 4);
                }
            }
        }
        put_nibbles(&q, 256, &mut dst[Q6K_QL..]);
        for s in 0..16 {
            for r in 0..ROWS {
                for j in 0..4 {
                    dst[Q6K_QH + 64 * s + 4 * r + j] = (0..4)
                        .map(|u| (q[r][16 * s + 4 * u + j] >> 4) << (2 * u))
                        .sum();
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn group<const NR: usize>(
        p: *const u8,
        kb: usize,
        x: [*const u8; NR],
        _side: [*const Q8_0Side; NR],
    ) -> [__m512; NR] {
        let m4 = _mm512_set1_epi8(0x0F);
        let m30 = _mm512_set1_epi8(0x30);
        let x = x.map(|x| x as *const Q8K);
        let mut acc = [_mm512_setzero_ps(); NR];
        for i in 0..kb {
            // SAFETY (whole body): within the blocks the caller vouches for.
            let b = unsafe { p.add(i * Self::BYTES) };
            let mut sumi = [_mm512_setzero_si512(); NR];
            let mut off = [_mm512_setzero_si512(); NR];
            for pair in 0..8 {
                let scp = _mm512_cvtepi8_epi16(unsafe {
                    _mm256_loadu_si256(b.add(Q6K_SC + 32 * pair) as *const __m256i)
                });
                let scs = [
                    _mm512_srai_epi32::<16>(_mm512_slli_epi32::<16>(scp)),
                    _mm512_srai_epi32::<16>(scp),
                ];
                for (h2, &sc) in scs.iter().enumerate() {
                    let s = 2 * pair + h2;
                    let (lo, hi, h) = unsafe {
                        (
                            load64(b.add(Q6K_QL + 128 * s)),
                            load64(b.add(Q6K_QL + 128 * s + 64)),
                            load64(b.add(Q6K_QH + 64 * s)),
                        )
                    };
                    let w = [
                        _mm512_or_si512(
                            _mm512_and_si512(lo, m4),
                            _mm512_and_si512(_mm512_slli_epi16::<4>(h), m30),
                        ),
                        _mm512_or_si512(
                            _mm512_and_si512(_mm512_srli_epi16::<4>(lo), m4),
                            _mm512_and_si512(_mm512_slli_epi16::<2>(h), m30),
                        ),
                        _mm512_or_si512(_mm512_and_si512(hi, m4), _mm512_and_si512(h, m30)),
                        _mm512_or_si512(
                            _mm512_and_si512(_mm512_srli_epi16::<4>(hi), m4),
                            _mm512_and_si512(_mm512_srli_epi16::<2>(h), m30),
                        ),
                    ];
                    for r in 0..NR {
                        let y = unsafe { &*x[r].add(i) };
                        let ys = y.qs.as_ptr().wrapping_add(16 * s) as *const u8;
                        let d = unsafe { dot_words(&w, ys) };
                        sumi[r] = _mm512_add_epi32(sumi[r], _mm512_mullo_epi32(d, sc));
                    }
                }
                for r in 0..NR {
                    let y = unsafe { &*x[r].add(i) };
                    let bs = unsafe { bcast(y.bsums.as_ptr() as *const u8, pair) };
                    off[r] = _mm512_dpwssd_epi32(off[r], scp, bs);
                }
            }
            let d = unsafe { f16x16(b) };
            for r in 0..NR {
                let dx = _mm512_set1_ps(unsafe { (*x[r].add(i)).d });
                // The stored values are the weights plus 32.
                let s = _mm512_sub_epi32(sumi[r], _mm512_slli_epi32::<5>(off[r]));
                acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(d, dx), _mm512_cvtepi32_ps(s), acc[r]);
            }
        }
        acc
    }
}

// Q5_0, 352 bytes per block of sixteen rows: d (16 x f16), four nibble
// vectors of the low bits, then one vector of the fifth bits: byte j of a
// row's lane holds in bit u the fifth bit of weight 4u + j.
const Q5_0_QS: usize = 32;
const Q5_0_QH: usize = Q5_0_QS + 256;

/// The fifth bits of weights `4u + j`, at bit 4 of byte `j`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn fifth_bits(h: __m512i, u: usize) -> __m512i {
    let m = _mm512_set1_epi8(0x10);
    let moved = match u {
        0 => _mm512_slli_epi16::<4>(h),
        1 => _mm512_slli_epi16::<3>(h),
        2 => _mm512_slli_epi16::<2>(h),
        3 => _mm512_slli_epi16::<1>(h),
        4 => h,
        5 => _mm512_srli_epi16::<1>(h),
        6 => _mm512_srli_epi16::<2>(h),
        _ => _mm512_srli_epi16::<3>(h),
    };
    _mm512_and_si512(moved, m)
}

impl Format for Q5_0 {
    const BLOCK_LEN: usize = 32;
    const BYTES: usize = Q5_0_QH + 64;
    const SIDE: bool = true;

    fn pack(rows: [&Self; ROWS], dst: &mut [u8]) {
        put_f16(rows.map(|b| b.d), &mut dst[..32]);
        let mut q = [[0u8; 256]; ROWS];
        for (r, b) in rows.iter().enumerate() {
            let qh = u32::from_le_bytes(b.qh);
            for (e, v) in q[r][..32].iter_mut().enumerate() {
                let low = if e < 16 {
                    b.qs[e] & 0x0F
                } else {
                    b.qs[e - 16] >> 4
                };
                *v = low | ((((qh >> e) & 1) as u8) << 4);
            }
            for j in 0..4 {
                dst[Q5_0_QH + 4 * r + j] = (0..8).map(|u| (q[r][4 * u + j] >> 4) << u).sum();
            }
        }
        put_nibbles(&q, 32, &mut dst[Q5_0_QS..]);
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn group<const NR: usize>(
        p: *const u8,
        kb: usize,
        x: [*const u8; NR],
        side: [*const Q8_0Side; NR],
    ) -> [__m512; NR] {
        let m4 = _mm512_set1_epi8(0x0F);
        let x = x.map(|x| x as *const Q8_0);
        let mut acc = [_mm512_setzero_ps(); NR];
        for i in 0..kb {
            // SAFETY (whole body): within the blocks the caller vouches for.
            let b = unsafe { p.add(i * Self::BYTES) };
            let h = unsafe { load64(b.add(Q5_0_QH)) };
            let mut w = [_mm512_setzero_si512(); 8];
            for v in 0..4 {
                let bits = unsafe { load64(b.add(Q5_0_QS + 64 * v)) };
                w[2 * v] = _mm512_or_si512(_mm512_and_si512(bits, m4), fifth_bits(h, 2 * v));
                w[2 * v + 1] = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(bits), m4),
                    fifth_bits(h, 2 * v + 1),
                );
            }
            // The stored values are the weights plus 16.
            unsafe { accumulate_q8_0(&mut acc, &w, f16x16(b), 16, x, side, i) };
        }
        acc
    }
}

// Q8_0, 544 bytes per block of sixteen rows: d (16 x f16), then eight
// vectors of four weights per row, each plus 128 (unsigned).
const Q8_0_QS: usize = 32;

impl Format for Q8_0 {
    const BLOCK_LEN: usize = 32;
    const BYTES: usize = Q8_0_QS + 512;
    const SIDE: bool = true;

    fn pack(rows: [&Self; ROWS], dst: &mut [u8]) {
        put_f16(rows.map(|b| b.d), &mut dst[..32]);
        for (r, b) in rows.iter().enumerate() {
            for t in 0..8 {
                for j in 0..4 {
                    dst[Q8_0_QS + 64 * t + 4 * r + j] = (b.qs[4 * t + j] as u8) ^ 0x80;
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn group<const NR: usize>(
        p: *const u8,
        kb: usize,
        x: [*const u8; NR],
        side: [*const Q8_0Side; NR],
    ) -> [__m512; NR] {
        let x = x.map(|x| x as *const Q8_0);
        let mut acc = [_mm512_setzero_ps(); NR];
        for i in 0..kb {
            // SAFETY (whole body): within the blocks the caller vouches for.
            let b = unsafe { p.add(i * Self::BYTES) };
            let w: [__m512i; 8] =
                std::array::from_fn(|t| unsafe { load64(b.add(Q8_0_QS + 64 * t)) });
            // The stored values are the weights plus 128.
            unsafe { accumulate_q8_0(&mut acc, &w, f16x16(b), 128, x, side, i) };
        }
        acc
    }
}
