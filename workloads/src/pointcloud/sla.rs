//! Scattered Linear Attention (SLA), the CPU operator, and its float64
//! reference.
//!
//! SLA is ScatterFormer's attention (He et al., "ScatterFormer: Efficient
//! Voxel Transformer with Scattered Linear Attention", ECCV 2024, arXiv
//! 2401.00912, Sec. 3.2, Eqs. 2-3, building on the linear attention of Sec.
//! 3.1). The voxels of a whole scene form one matrix, ordered by window so
//! that each window is a contiguous block of rows, and linear attention runs
//! on each block separately: no window is sorted by size or padded. With the
//! kernel `phi = relu` (the authors' `SLALayer` applies `F.relu` to `q` and
//! `k`; there is no `1/sqrt(d)` scaling), for window `w` and each head:
//!
//! ```text
//! KV = sum_{j in w} phi(k_j)^T v_j     (d x d)     s = sum_{j in w} phi(k_j)
//! out_i = phi(q_i) KV / (phi(q_i) . s + 1e-6)       for i in w
//! ```
//!
//! The paper's "hardware efficient implementation" (Sec. 3.2) walks each
//! window in fixed-size chunks of voxels, accumulating `KV` in fast memory
//! (the released Triton kernels use chunks of 32 rows). This CPU version
//! does the same with chunks of [`CHUNK`] voxels: a chunk's `phi(k)` and `v`
//! rows are converted to `f32` once and folded into the `f32` state of every
//! head, and the state (16 KiB at 4 heads of 32) stays in L1 while the
//! window's queries are applied to it. Windows are independent and run in
//! parallel with rayon; the unit of work is a window with all its heads,
//! because a voxel's heads share one 512-byte row and splitting by head
//! would read each row once per head.
//!
//! The two dense products inside a chunk (`KV += phi(K)^T V` and `phi(Q)
//! KV`) are [`baselines::window_attention::products`], register-blocked
//! and chosen at run time for AVX-512 or AVX2 with FMA. The padded linear
//! baseline calls the same products on its padded windows, so the two
//! compute the same arithmetic and their timing difference is the cost of
//! sort-and-pad alone.
//!
//! What this does not include: the released `ScatterAttention` module also
//! sum-pools `KV` and `s` over neighbouring windows with a sparse 3x3 pool
//! before applying them (`scatterformer_utils.py`); `SLALayer`, which the
//! released backbone uses, does not, and neither does this operator.
//!
//! Layout and the windows' contract are those of
//! [`baselines::window_attention`] (`[n, heads, dim]` rows, windows
//! contiguous and in order); the sort-and-pad baselines it is measured
//! against, and the quadratic-form reference, live there too.

use std::sync::atomic::{AtomicUsize, Ordering};

use baselines::window_attention::{
    check_layout, dot, linear_output, load, products, relu, split_windows_mut, transpose_heads,
    LINEAR_EPS,
};
pub use baselines::window_attention::{Grads64, Scalar, Shape};
use baselines::with_head_dim;
use rayon::prelude::*;

/// Voxels per chunk of the state accumulation: two chunk buffers of
/// `16 x 512` bytes beside a 16 KiB state, all within L1 (the padded
/// linear baseline's chunk too, whose output code SLA shares).
pub use baselines::window_attention::CHUNK;

/// What one SLA call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlaStats {
    /// Non-empty windows.
    pub windows: usize,
    /// Voxels (`shape.n`): SLA touches no slot that is not a voxel.
    pub voxels: usize,
    /// Bytes of per-worker scratch (states and chunk buffers) allocated in
    /// the call; compare the baselines' `PadStats::workspace_bytes`.
    pub workspace_bytes: usize,
}

/// Deliberate faults, compiled only into the tests' variants, so that the
/// tests can show that a wrong operator fails the tolerance. `NONE` is the
/// operator; the branches on the others fold away at compile time.
mod fault {
    pub const NONE: u8 = 0;
    /// `phi(k) = k`: the ReLU on keys dropped.
    pub const NO_RELU_K: u8 = 1;
    /// The state omits the last voxel of each window.
    pub const SKIP_LAST: u8 = 2;
    /// Backward omits `s dden_i` in `dphi(q_i)`.
    pub const NO_S_DDEN: u8 = 3;
    /// Backward omits `ds` in `dphi(k_j)`.
    pub const NO_DS: u8 = 4;
}

#[inline(always)]
fn phi_k<const F: u8>(x: f32) -> f32 {
    if F == fault::NO_RELU_K {
        x
    } else {
        relu(x)
    }
}

/// Per-worker buffers: the state of one window (`kv`, `s`), its transpose
/// and gradients for the backward, and chunk buffers of [`CHUNK`] rows.
struct Scratch {
    kv: Vec<f32>,
    s: Vec<f32>,
    kvt: Vec<f32>,
    dkv: Vec<f32>,
    dkvt: Vec<f32>,
    ds: Vec<f32>,
    dden: Vec<f32>,
    x: Vec<f32>,
    y: Vec<f32>,
    z: Vec<f32>,
    u: Vec<f32>,
}

impl Scratch {
    /// `backward` adds the buffers only the backward uses.
    fn new(heads: usize, dim: usize, backward: bool, bytes: &AtomicUsize) -> Self {
        let (st, sv, ch) = (heads * dim * dim, heads * dim, CHUNK * heads * dim);
        let bwd = |len: usize| vec![0.0f32; if backward { len } else { 0 }];
        let sc = Scratch {
            kv: vec![0.0; st],
            s: vec![0.0; sv],
            kvt: bwd(st),
            dkv: bwd(st),
            dkvt: bwd(st),
            ds: bwd(sv),
            dden: bwd(CHUNK * heads),
            x: vec![0.0; ch],
            y: vec![0.0; ch],
            z: bwd(ch),
            u: bwd(ch),
        };
        let floats: usize = [
            &sc.kv, &sc.s, &sc.kvt, &sc.dkv, &sc.dkvt, &sc.ds, &sc.dden, &sc.x, &sc.y, &sc.z, &sc.u,
        ]
        .iter()
        .map(|b| b.len())
        .sum();
        bytes.fetch_add(floats * std::mem::size_of::<f32>(), Ordering::Relaxed);
        sc
    }
}

/// The state of one window, all heads: `KV = sum_j phi(k_j)^T v_j`, `s =
/// sum_j phi(k_j)`, a chunk of [`CHUNK`] voxels at a time: the chunk's
/// `phi(k)` and `v` rows are converted to `f32` once and folded into every
/// head's state.
fn window_state<T: Scalar, const D: usize, const F: u8>(
    k: &[T],
    v: &[T],
    heads: usize,
    sc: &mut Scratch,
) {
    let row = heads * D;
    let mut rows = k.len() / row;
    if F == fault::SKIP_LAST {
        rows -= 1;
    }
    sc.kv.fill(0.0);
    sc.s.fill(0.0);
    for start in (0..rows).step_by(CHUNK) {
        let g = CHUNK.min(rows - start);
        let at = start * row..(start + g) * row;
        load(&mut sc.x, &k[at.clone()], phi_k::<F>);
        load(&mut sc.y, &v[at], |x| x);
        for h in 0..heads {
            let kv = &mut sc.kv[h * D * D..][..D * D];
            products::accumulate_outer::<D>(kv, &sc.x, &sc.y, (g, row, h * D));
        }
        for xr in sc.x[..g * row].chunks_exact(row) {
            for (sa, &xa) in sc.s.iter_mut().zip(xr) {
                *sa += xa;
            }
        }
    }
}

/// SLA over one window: its state, then `out_i = phi(q_i) KV / (phi(q_i) .
/// s + 1e-6)` for each of its voxels and heads, a chunk at a time.
fn window_forward<T: Scalar, const D: usize, const F: u8>(
    q: &[T],
    k: &[T],
    v: &[T],
    heads: usize,
    out: &mut [T],
    sc: &mut Scratch,
) {
    window_state::<T, D, F>(k, v, heads, sc);
    linear_output::<T, D>(q, heads, (&sc.kv, &sc.s), (&mut sc.x, &mut sc.y), out);
}

/// Backward over one window. The state is recomputed from `k` and `v`, not
/// saved by the forward: it costs one more pass over the window's keys
/// (a third of the forward's arithmetic) and saves `windows x heads x (d^2
/// + d)` floats between the passes, more than `q`, `k` and `v` together
/// when windows hold fewer than `d` voxels. (The authors' autograd
/// functions keep `KV` for their backward instead: `ScatterMatmulQC` saves
/// it with `save_for_backward`.)
///
/// With `phi = relu`, `num_i = phi(q_i) KV`, `den_i = phi(q_i) . s + 1e-6`
/// and the loss `L = sum_i dout_i . out_i`:
///
/// ```text
/// g_i       = dout_i / den_i
/// dden_i    = -(g_i . num_i) / den_i              (d(num/den)/d den)
/// dphi(q_i) = KV g_i + s dden_i                   (through num_i and den_i)
/// dKV       = sum_i phi(q_i)^T g_i
/// ds        = sum_i phi(q_i) dden_i
/// dphi(k_j) = dKV v_j + ds                        (KV and s both hold phi(k_j))
/// dv_j      = dKV^T phi(k_j)
/// dq = dphi(q) * [q > 0]      dk = dphi(k) * [k > 0]
/// ```
///
/// `KV g_i` and `dKV v_j` are computed as `g_i KV^T` and `v_j dKV^T` from
/// the transposed states, so that every product is one of [`products`]'.
#[allow(clippy::too_many_arguments)] // the tensors of one window, named as in the math
fn window_backward<T: Scalar, const D: usize, const F: u8>(
    (q, k, v, dout): (&[T], &[T], &[T], &[T]),
    heads: usize,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    sc: &mut Scratch,
) {
    let row = heads * D;
    let rows = q.len() / row;
    window_state::<T, D, F>(k, v, heads, sc);
    transpose_heads::<D>(&sc.kv, &mut sc.kvt);
    sc.dkv.fill(0.0);
    sc.ds.fill(0.0);
    // Queries, a chunk at a time: x = phi(q), y = num, then y = g, z =
    // dphi(q) without the s dden term.
    for start in (0..rows).step_by(CHUNK) {
        let g = CHUNK.min(rows - start);
        let at = start * row..(start + g) * row;
        load(&mut sc.x, &q[at.clone()], relu);
        for h in 0..heads {
            let kv = &sc.kv[h * D * D..][..D * D];
            products::chunk_mat::<D>(&sc.x, kv, &mut sc.y, (g, row, h * D));
        }
        let dout_rows = dout[at.clone()].chunks_exact(row);
        for (j, (d, (x, y))) in dout_rows
            .zip(sc.x.chunks_exact(row).zip(sc.y.chunks_exact_mut(row)))
            .enumerate()
        {
            for h in 0..heads {
                let s = &sc.s[h * D..][..D];
                let den = dot(&x[h * D..][..D], s) + LINEAR_EPS;
                let yh = &mut y[h * D..][..D];
                let mut gn = [0.0f32; 8];
                for (l, (yb, &db)) in yh.iter_mut().zip(&d[h * D..][..D]).enumerate() {
                    let gb = db.to_f32() / den;
                    gn[l % 8] += gb * *yb;
                    *yb = gb;
                }
                let dden = -gn.iter().sum::<f32>() / den;
                sc.dden[j * heads + h] = dden;
                for (dsa, &xa) in sc.ds[h * D..][..D].iter_mut().zip(&x[h * D..][..D]) {
                    *dsa += xa * dden;
                }
            }
        }
        for h in 0..heads {
            let kvt = &sc.kvt[h * D * D..][..D * D];
            products::chunk_mat::<D>(&sc.y, kvt, &mut sc.z, (g, row, h * D));
            let dkv = &mut sc.dkv[h * D * D..][..D * D];
            products::accumulate_outer::<D>(dkv, &sc.x, &sc.y, (g, row, h * D));
        }
        let q_rows = q[at.clone()].chunks_exact(row);
        for (j, ((dqr, qr), z)) in dq[at]
            .chunks_exact_mut(row)
            .zip(q_rows)
            .zip(sc.z.chunks_exact(row))
            .enumerate()
        {
            for h in 0..heads {
                let dden = if F == fault::NO_S_DDEN {
                    0.0
                } else {
                    sc.dden[j * heads + h]
                };
                for a in h * D..(h + 1) * D {
                    let grad = if qr[a].to_f32() > 0.0 {
                        z[a] + sc.s[a] * dden
                    } else {
                        0.0
                    };
                    dqr[a] = T::from_f32(grad);
                }
            }
        }
    }
    if F == fault::NO_DS {
        sc.ds.fill(0.0);
    }
    transpose_heads::<D>(&sc.dkv, &mut sc.dkvt);
    // Keys and values, a chunk at a time: x = phi(k), y = v, z = dKV v (as
    // v dKV^T), u = dv.
    for start in (0..rows).step_by(CHUNK) {
        let g = CHUNK.min(rows - start);
        let at = start * row..(start + g) * row;
        load(&mut sc.x, &k[at.clone()], phi_k::<F>);
        load(&mut sc.y, &v[at.clone()], |x| x);
        for h in 0..heads {
            let (dkvt, dkv) = (
                &sc.dkvt[h * D * D..][..D * D],
                &sc.dkv[h * D * D..][..D * D],
            );
            products::chunk_mat::<D>(&sc.y, dkvt, &mut sc.z, (g, row, h * D));
            products::chunk_mat::<D>(&sc.x, dkv, &mut sc.u, (g, row, h * D));
        }
        let k_rows = k[at.clone()].chunks_exact(row);
        let grads = dk[at.clone()]
            .chunks_exact_mut(row)
            .zip(dv[at].chunks_exact_mut(row));
        for (((dkr, dvr), kr), (z, u)) in grads
            .zip(k_rows)
            .zip(sc.z.chunks_exact(row).zip(sc.u.chunks_exact(row)))
        {
            for a in 0..row {
                let grad = if kr[a].to_f32() > 0.0 {
                    z[a] + sc.ds[a]
                } else {
                    0.0
                };
                dkr[a] = T::from_f32(grad);
                dvr[a] = T::from_f32(u[a]);
            }
        }
    }
}

fn check_lens(shape: Shape, tensors: &[(&str, usize)]) {
    for &(name, len) in tensors {
        assert_eq!(
            len,
            shape.len(),
            "{name} has {len} elements, but {shape:?} needs {}",
            shape.len()
        );
    }
}

/// SLA forward: writes `out` (`[n, heads, dim]`, voxel order) from `q`,
/// `k`, `v` in the same layout, window `w` being voxels `offsets[w]..
/// offsets[w] + counts[w]`. Arithmetic and state in `f32`, whatever `T`.
///
/// # Panics
/// If the windows do not partition the voxels in order
/// ([`check_layout`]), a tensor's length is not `shape.len()`, or
/// `shape.dim` is not one of
/// [`HEAD_DIMS`](baselines::window_attention::HEAD_DIMS).
pub fn forward<T: Scalar>(
    q: &[T],
    k: &[T],
    v: &[T],
    offsets: &[u32],
    counts: &[u32],
    shape: Shape,
    out: &mut [T],
) -> SlaStats {
    forward_with::<T, { fault::NONE }>(q, k, v, offsets, counts, shape, out)
}

fn forward_with<T: Scalar, const F: u8>(
    q: &[T],
    k: &[T],
    v: &[T],
    offsets: &[u32],
    counts: &[u32],
    shape: Shape,
    out: &mut [T],
) -> SlaStats {
    check_lens(
        shape,
        &[
            ("q", q.len()),
            ("k", k.len()),
            ("v", v.len()),
            ("out", out.len()),
        ],
    );
    check_layout(offsets, counts, shape.n);
    let (row, heads) = (shape.row(), shape.heads);
    let bytes = AtomicUsize::new(0);
    with_head_dim!(shape.dim, D => {
        split_windows_mut(out, counts, row)
            .into_par_iter()
            .enumerate()
            .filter(|(_, o)| !o.is_empty())
            .for_each_init(
                || Scratch::new(heads, D, false, &bytes),
                |sc, (w, o)| {
                    let at = offsets[w] as usize * row..offsets[w] as usize * row + o.len();
                    let (q, k, v) = (&q[at.clone()], &k[at.clone()], &v[at]);
                    window_forward::<T, D, F>(q, k, v, heads, o, sc)
                },
            )
    });
    SlaStats {
        windows: counts.iter().filter(|&&c| c > 0).count(),
        voxels: shape.n,
        workspace_bytes: bytes.into_inner(),
    }
}

/// SLA backward: the gradients of `L = sum dout . out` with respect to `q`,
/// `k` and `v`, written to `dq`, `dk`, `dv` (layouts as in [`forward`]).
/// The per-window state is recomputed (see the formulas at
/// `window_backward` in the source).
///
/// # Panics
/// As [`forward`].
#[allow(clippy::too_many_arguments)] // mirrors the forward's tensors plus their gradients
pub fn backward<T: Scalar>(
    q: &[T],
    k: &[T],
    v: &[T],
    dout: &[T],
    offsets: &[u32],
    counts: &[u32],
    shape: Shape,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) -> SlaStats {
    backward_with::<T, { fault::NONE }>([q, k, v, dout], offsets, counts, shape, [dq, dk, dv])
}

fn backward_with<T: Scalar, const F: u8>(
    [q, k, v, dout]: [&[T]; 4],
    offsets: &[u32],
    counts: &[u32],
    shape: Shape,
    [dq, dk, dv]: [&mut [T]; 3],
) -> SlaStats {
    check_lens(
        shape,
        &[
            ("q", q.len()),
            ("k", k.len()),
            ("v", v.len()),
            ("dout", dout.len()),
            ("dq", dq.len()),
            ("dk", dk.len()),
            ("dv", dv.len()),
        ],
    );
    check_layout(offsets, counts, shape.n);
    let (row, heads) = (shape.row(), shape.heads);
    let bytes = AtomicUsize::new(0);
    let grads = split_windows_mut(dq, counts, row)
        .into_par_iter()
        .zip(split_windows_mut(dk, counts, row))
        .zip(split_windows_mut(dv, counts, row))
        .enumerate()
        .filter(|(_, ((dq, _), _))| !dq.is_empty());
    with_head_dim!(shape.dim, D => {
        grads.for_each_init(
            || Scratch::new(heads, D, true, &bytes),
            |sc, (w, ((dq, dk), dv))| {
                let at = offsets[w] as usize * row..offsets[w] as usize * row + dq.len();
                let x = (&q[at.clone()], &k[at.clone()], &v[at.clone()], &dout[at]);
                window_backward::<T, D, F>(x, heads, dq, dk, dv, sc)
            },
        )
    });
    SlaStats {
        windows: counts.iter().filter(|&&c| c > 0).count(),
        voxels: shape.n,
        workspace_bytes: bytes.into_inner(),
    }
}

/// SLA forward and backward in `f64`, window by window, in the state form
/// of [`forward`] with the backward formulas of `window_backward`. Checked
/// against central finite differences and against the quadratic form
/// ([`baselines::window_attention::linear_window_reference_f64`]) in the
/// tests.
///
/// # Panics
/// If the layout fails [`check_layout`] or a length is not `shape.len()`.
pub fn reference_f64(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    offsets: &[u32],
    counts: &[u32],
    shape: Shape,
) -> Grads64 {
    check_lens(
        shape,
        &[
            ("q", q.len()),
            ("k", k.len()),
            ("v", v.len()),
            ("dout", dout.len()),
        ],
    );
    check_layout(offsets, counts, shape.n);
    let (row, d) = (shape.row(), shape.dim);
    let zeros = || vec![0.0f64; shape.len()];
    let mut r = Grads64 {
        out: zeros(),
        dq: zeros(),
        dk: zeros(),
        dv: zeros(),
    };
    let relu = |x: f64| x.max(0.0);
    for (&o, &c) in offsets.iter().zip(counts) {
        let voxels = o as usize..(o + c) as usize;
        for h in 0..shape.heads {
            let at = |i: usize, t: usize| i * row + h * d + t;
            let mut kv = vec![0.0f64; d * d];
            let mut s = vec![0.0f64; d];
            for j in voxels.clone() {
                for a in 0..d {
                    let pk = relu(k[at(j, a)]);
                    s[a] += pk;
                    for b in 0..d {
                        kv[a * d + b] += pk * v[at(j, b)];
                    }
                }
            }
            let mut dkv = vec![0.0f64; d * d];
            let mut ds = vec![0.0f64; d];
            for i in voxels.clone() {
                let pq: Vec<f64> = (0..d).map(|a| relu(q[at(i, a)])).collect();
                let num: Vec<f64> = (0..d)
                    .map(|b| (0..d).map(|a| pq[a] * kv[a * d + b]).sum())
                    .collect();
                let den: f64 = (0..d).map(|a| pq[a] * s[a]).sum::<f64>() + LINEAR_EPS as f64;
                let g: Vec<f64> = (0..d).map(|b| dout[at(i, b)] / den).collect();
                let dden = -(0..d).map(|b| g[b] * num[b]).sum::<f64>() / den;
                for a in 0..d {
                    r.out[at(i, a)] = num[a] / den;
                    let kv_g: f64 = (0..d).map(|b| kv[a * d + b] * g[b]).sum();
                    if q[at(i, a)] > 0.0 {
                        r.dq[at(i, a)] = kv_g + s[a] * dden;
                    }
                    ds[a] += pq[a] * dden;
                    for b in 0..d {
                        dkv[a * d + b] += pq[a] * g[b];
                    }
                }
            }
            for j in voxels.clone() {
                for a in 0..d {
                    let dkv_v: f64 = (0..d).map(|b| dkv[a * d + b] * v[at(j, b)]).sum();
                    if k[at(j, a)] > 0.0 {
                        r.dk[at(j, a)] = dkv_v + ds[a];
                    }
                    r.dv[at(j, a)] = (0..d).map(|b| dkv[b * d + a] * relu(k[at(j, b)])).sum();
                }
            }
        }
    }
    r
}

/// Norm-wise relative error in the infinity norm: `max_i |got_i - want_i| /
/// max_i |want_i|`.
///
/// Not element-wise: attention outputs and gradients cross zero, and a
/// voxel whose ReLU'd query is zero has an output of exactly zero, so
/// `|got_i - want_i| / |want_i|` would be dominated by entries that are
/// zero or nearly so, whose absolute errors are tiny, and no tolerance
/// derived from the unit roundoff would apply. Relative to the largest
/// entry, the error is what rounding theory bounds. If `want` is all zero,
/// the error is 0 when `got` is too and infinite otherwise.
///
/// # Panics
/// If the lengths differ.
pub fn max_rel_err<T: Scalar>(got: &[T], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "got and want differ in length");
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((g.to_f32() as f64 - w).abs()));
    if scale == 0.0 {
        return if diff == 0.0 { 0.0 } else { f64::INFINITY };
    }
    diff / scale
}

/// The tolerance on [`max_rel_err`] for results stored in a type of `bits`
/// bits (`8 * size_of::<T>()`).
///
/// * 32 (`f32`): `1e-4`. The state sums up to about 1,000 voxels per window
///   and the outputs sum `d` more products; the classical worst-case bound
///   for such sums is `n u` with `u = 2^-24` (about `6e-8`), so `6e-5` at
///   `n = 1,000`. Errors measured in the tests are near `1e-6`; the bound,
///   not the measurement, sets the tolerance.
/// * 16 (`bf16`): `1e-2`. The arithmetic is `f32`, and each output is
///   rounded to `bf16` once, with unit roundoff `2^-8` (about `3.9e-3`; 8
///   significand bits). The reference is computed from the `bf16` inputs
///   themselves, so the error measures the operator and not the rounding of
///   the inputs.
///
/// # Panics
/// For any other width.
pub fn tolerance(bits: u32) -> f64 {
    match bits {
        32 => 1e-4,
        16 => 1e-2,
        b => panic!("no tolerance is justified for {b}-bit storage (32 and 16 are)"),
    }
}

#[cfg(test)]
mod tests {
    //! SLA against its `f64` reference, against the quadratic form, against
    //! the padded linear baseline, and faulty variants against the
    //! tolerance, on fresh random inputs from a seeded generator.

    use super::*;
    use baselines::window_attention::{
        linear_window_reference_f64, padded_linear_backward, padded_linear_forward, to_f64,
    };
    use half::bf16;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use rand_distr::StandardNormal;

    struct Case {
        offsets: Vec<u32>,
        counts: Vec<u32>,
        shape: Shape,
        /// `q`, `k`, `v`, `dout` in `f64`.
        x: [Vec<f64>; 4],
    }

    /// Windows of 0, 1 and 2 voxels, then `windows` of 1..=`max` voxels;
    /// normal inputs, with 8% of the `q` and `k` head rows made all
    /// negative, and every key of window 1 (one voxel) and of the last
    /// window negative, so whole windows have `s = 0`.
    fn case(seed: u64, windows: usize, max: u32, heads: usize, dim: usize) -> Case {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut counts: Vec<u32> = vec![0, 1, 2, 1, 0];
        counts.extend((0..windows).map(|_| rng.random_range(1..=max)));
        let offsets: Vec<u32> = counts
            .iter()
            .scan(0u32, |acc, &c| {
                let o = *acc;
                *acc += c;
                Some(o)
            })
            .collect();
        let n = counts.iter().sum::<u32>() as usize;
        let shape = Shape { n, heads, dim };
        let mut x: [Vec<f64>; 4] = std::array::from_fn(|_| {
            (0..shape.len())
                .map(|_| rng.sample::<f64, _>(StandardNormal))
                .collect()
        });
        for xt in x.iter_mut().take(2) {
            for r in xt.chunks_mut(dim) {
                if rng.random::<f64>() < 0.08 {
                    r.iter_mut().for_each(|y| *y = -y.abs());
                }
            }
        }
        let row = shape.row();
        let last = *offsets.last().unwrap() as usize;
        for e in (offsets[1] as usize * row..offsets[2] as usize * row).chain(last * row..n * row) {
            x[1][e] = -x[1][e].abs();
        }
        Case {
            offsets,
            counts,
            shape,
            x,
        }
    }

    fn cast<T: Scalar>(x: &[f64]) -> Vec<T> {
        x.iter().map(|&y| T::from_f32(y as f32)).collect()
    }

    /// SLA (with fault `F`) output and gradients, and the inputs as rounded
    /// to `T`, widened back to `f64`.
    fn run<T: Scalar, const F: u8>(c: &Case) -> ([Vec<T>; 4], [Vec<f64>; 4]) {
        let [q, k, v, d] = c.x.each_ref().map(|x| cast::<T>(x));
        let zero = || vec![T::from_f32(0.0); c.shape.len()];
        let mut out = zero();
        let st = forward_with::<T, F>(&q, &k, &v, &c.offsets, &c.counts, c.shape, &mut out);
        assert_eq!(st.voxels, c.shape.n);
        assert!(st.workspace_bytes > 0);
        let (mut dq, mut dk, mut dv) = (zero(), zero(), zero());
        backward_with::<T, F>(
            [&q, &k, &v, &d],
            &c.offsets,
            &c.counts,
            c.shape,
            [&mut dq, &mut dk, &mut dv],
        );
        let inputs = [&q, &k, &v, &d].map(|x| to_f64(x));
        ([out, dq, dk, dv], inputs)
    }

    fn errors<T: Scalar>(got: &[Vec<T>; 4], want: &Grads64) -> [f64; 4] {
        [
            max_rel_err(&got[0], &want.out),
            max_rel_err(&got[1], &want.dq),
            max_rel_err(&got[2], &want.dk),
            max_rel_err(&got[3], &want.dv),
        ]
    }

    fn sci(x: &[f64]) -> String {
        let parts: Vec<String> = x.iter().map(|v| format!("{v:.2e}")).collect();
        parts.join(", ")
    }

    fn reference(c: &Case, inputs: &[Vec<f64>; 4]) -> Grads64 {
        let [q, k, v, d] = inputs;
        reference_f64(q, k, v, d, &c.offsets, &c.counts, c.shape)
    }

    fn check<T: Scalar>(c: &Case, label: &str) {
        let (got, inputs) = run::<T, { fault::NONE }>(c);
        let e = errors(&got, &reference(c, &inputs));
        let tol = tolerance(8 * std::mem::size_of::<T>() as u32);
        eprintln!("{label} {} (out, dq, dk, dv): {}", T::NAME, sci(&e));
        assert!(e.iter().all(|&x| x <= tol), "{label}: {e:?} > {tol}");
    }

    #[test]
    fn sla_matches_reference_f32_and_bf16() {
        let c = case(11, 40, 300, 4, 32);
        check::<f32>(&c, "sla vs reference, d = 32");
        check::<bf16>(&c, "sla vs reference, d = 32");
        let c = case(12, 40, 300, 2, 8);
        check::<f32>(&c, "sla vs reference, d = 8");
    }

    #[test]
    fn sla_equals_the_quadratic_form() {
        // The identity SLA relies on, in f64: sum_j (phi(q).phi(k_j)) v_j =
        // phi(q) (sum_j phi(k_j)^T v_j), gradients included.
        let c = case(13, 30, 300, 4, 32);
        let [q, k, v, d] = &c.x;
        let state = reference_f64(q, k, v, d, &c.offsets, &c.counts, c.shape);
        let quad = linear_window_reference_f64(q, k, v, d, &c.offsets, &c.counts, c.shape);
        let rel = |got: &[f64], want: &[f64]| {
            let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            got.iter()
                .zip(want)
                .fold(0.0f64, |m, (g, w)| m.max((g - w).abs()))
                / scale
        };
        let e64 = [
            rel(&state.out, &quad.out),
            rel(&state.dq, &quad.dq),
            rel(&state.dk, &quad.dk),
            rel(&state.dv, &quad.dv),
        ];
        eprintln!("state form vs quadratic form, f64: {}", sci(&e64));
        assert!(e64.iter().all(|&x| x < 1e-12), "{e64:?}");
        // And the f32 operator against the quadratic form directly.
        let (got, inputs) = run::<f32, { fault::NONE }>(&c);
        let [q, k, v, d] = &inputs;
        let quad = linear_window_reference_f64(q, k, v, d, &c.offsets, &c.counts, c.shape);
        let e = errors(&got, &quad);
        eprintln!("sla f32 vs quadratic form: {}", sci(&e));
        assert!(e.iter().all(|&x| x <= tolerance(32)), "{e:?}");
    }

    #[test]
    fn sla_equals_padded_linear() {
        let c = case(14, 40, 300, 4, 32);
        let (got, inputs) = run::<f32, { fault::NONE }>(&c);
        let [q, k, v, d] = c.x.each_ref().map(|x| cast::<f32>(x));
        let zero = || vec![0.0f32; c.shape.len()];
        let (mut out, mut dq, mut dk, mut dv) = (zero(), zero(), zero(), zero());
        let (o, n) = (&c.offsets, &c.counts);
        padded_linear_forward(&q, &k, &v, o, n, c.shape, &mut out);
        padded_linear_backward(&q, &k, &v, &d, o, n, c.shape, &mut dq, &mut dk, &mut dv);
        let padded = [out, dq, dk, dv];
        let vs_sla: Vec<f64> = padded
            .iter()
            .zip(&got)
            .map(|(p, s)| max_rel_err(p, &to_f64(s)))
            .collect();
        let vs_ref = errors(&padded, &reference(&c, &inputs));
        eprintln!(
            "padded linear vs sla (out, dq, dk, dv): {}; vs reference: {}",
            sci(&vs_sla),
            sci(&vs_ref)
        );
        let tol = tolerance(32);
        assert!(
            vs_sla.iter().chain(&vs_ref).all(|&e| e <= tol),
            "{vs_sla:?} {vs_ref:?}"
        );
    }

    /// Each fault must miss the tolerance by a factor of at least 100 in the
    /// quantity it corrupts.
    #[test]
    fn faulty_sla_fails_the_tolerance() {
        let c = case(15, 40, 300, 4, 32);
        let want = reference(&c, &run::<f32, { fault::NONE }>(&c).1);
        let tol = tolerance(32);
        let faults = [
            (
                "no relu on k",
                errors(&run::<f32, { fault::NO_RELU_K }>(&c).0, &want)[0],
            ),
            (
                "last voxel skipped",
                errors(&run::<f32, { fault::SKIP_LAST }>(&c).0, &want)[0],
            ),
            (
                "no s dden in dq",
                errors(&run::<f32, { fault::NO_S_DDEN }>(&c).0, &want)[1],
            ),
            (
                "no ds in dk",
                errors(&run::<f32, { fault::NO_DS }>(&c).0, &want)[2],
            ),
        ];
        for (name, e) in faults {
            eprintln!(
                "fault {name}: error {e:.2e} ({:.0}x the tolerance)",
                e / tol
            );
            assert!(e > 100.0 * tol, "fault {name} passed: error {e:e}");
        }
    }

    /// Central differences of `L = sum dout . out` against the reference's
    /// gradients, for 300 random entries of `q`, `k`, `v` (entries within
    /// `1e-3` of a ReLU kink skipped). Step `1e-6`: truncation and
    /// cancellation errors both near `1e-10` relative.
    #[test]
    fn reference_matches_finite_differences() {
        let c = case(16, 6, 12, 2, 8);
        let [q, k, v, d] = &c.x;
        let loss = |q: &[f64], k: &[f64], v: &[f64]| {
            let g = reference_f64(q, k, v, d, &c.offsets, &c.counts, c.shape);
            g.out.iter().zip(d).map(|(a, b)| a * b).sum::<f64>()
        };
        let g = reference_f64(q, k, v, d, &c.offsets, &c.counts, c.shape);
        let grads = [&g.dq, &g.dk, &g.dv];
        let scale = grads
            .iter()
            .flat_map(|x| x.iter())
            .fold(0.0f64, |m, x| m.max(x.abs()));
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        let (h, mut worst, mut tried) = (1e-6, 0.0f64, 0);
        for _ in 0..300 {
            let (t, e) = (rng.random_range(0..3), rng.random_range(0..c.shape.len()));
            let mut x = [q.clone(), k.clone(), v.clone()];
            if t < 2 && x[t][e].abs() < 1e-3 {
                continue;
            }
            x[t][e] += h;
            let up = loss(&x[0], &x[1], &x[2]);
            x[t][e] -= 2.0 * h;
            let down = loss(&x[0], &x[1], &x[2]);
            worst = worst.max(((up - down) / (2.0 * h) - grads[t][e]).abs() / scale);
            tried += 1;
        }
        eprintln!("reference vs finite differences ({tried} entries): {worst:.2e}");
        assert!(tried > 250 && worst < 1e-6, "{worst:e}");
    }

    #[test]
    #[should_panic(expected = "head dim 12 is not one the kernels are compiled for")]
    fn unsupported_head_dim_panics_with_the_list() {
        let c = case(18, 2, 4, 1, 12);
        let x = cast::<f32>(&c.x[0]);
        let mut out = x.clone();
        forward(&x, &x, &x, &c.offsets, &c.counts, c.shape, &mut out);
    }
}
