// CUDA kernels of the `point-cloud-sla` workload, compiled at run time with
// NVRTC (see cuda.rs). Element type T is `float` (f32) or `unsigned short`
// holding bf16 bits; every sum is accumulated in f32.
//
// Layout everywhere: rows of [heads, HEAD_DIM] per voxel, voxel-major, so
// element (i, h, c) sits at (i * heads + h) * HEAD_DIM + c. A window is a
// contiguous run of rows: offsets[w] .. offsets[w] + counts[w].
//
// Scattered Linear Attention (ScatterFormer, arXiv 2401.00912, Sec. 3.2):
//   KV = sum_j relu(k_j)^T v_j,  s = sum_j relu(k_j)        (per window, head)
//   out_i = relu(q_i) KV / (relu(q_i) . s + 1e-6)
//
// One warp owns one (window, head) pass over voxels, and the state never
// leaves the SM (no round trip through global memory: q, k, v are read
// once and out written once, which is the memory-traffic floor). The
// forward kernels (sla_fwd_mma for f32, sla_fwd_bf16mma for bf16) and the
// backward (sla_bwd_mma) multiply on tensor cores; the FMA kernels kept
// for A/B timing (sla_fwd_ffma, sla_bwd) give lane l column l of the
// d x d state, so a voxel costs one coalesced row load per tensor and 32
// FMAs per lane. Windows are scheduled in two
// classes from a work list built once per layout: a window with more than
// SMALL voxels gets a whole block of WARPS warps that split its voxels
// (the paper's chunk-wise split) and reduce their partial states in shared
// memory; smaller windows are packed WARPS to a block, one warp each. The
// tensor-core forward also has a grouped list (sla_fwd_grouped_*, built by
// packing.rs): a window gets warps in proportion to its voxels, up to
// WARPS, and several windows share a block. The cluster forward
// (sla_fwd_cluster_*, packing.rs cluster_items) goes further for the
// largest windows: up to CLUSTER blocks of a thread-block cluster share
// one, and sum their partial states through distributed shared memory
// (sum_cluster_states). The autotuner picks it where it is faster: on an
// H200 (2026-11-28) the nuScenes-like frames' forward, 1.33x faster in
// f32 and 1.09x in bf16 than the best grouped share (r8 in results/runs).

#ifndef HEAD_DIM
#define HEAD_DIM 32
#endif
#define D HEAD_DIM
#define WARPS 8
#define CLUSTER 4 /* blocks per cluster of sla_fwd_cluster_* (packing.rs CLUSTER) */
#define STRIDE (D + 1) /* padded row stride: conflict-free transposes */
#define FULL 0xffffffffu
#define EPS 1e-6f

#if D != 32
#error "these kernels map one head-dimension element to one lane: HEAD_DIM must be 32"
#endif

__device__ __forceinline__ float ld(const float *p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const unsigned short *p, long long i) {
    return __uint_as_float(((unsigned)p[i]) << 16);
}
__device__ __forceinline__ void st(float *p, long long i, float x) { p[i] = x; }
// Round to nearest even, as half::bf16::from_f32 does on the host.
__device__ __forceinline__ void st(unsigned short *p, long long i, float x) {
    unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        p[i] = (unsigned short)((u >> 16) | 0x40);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    p[i] = (unsigned short)(u >> 16);
}

// Zeroes a warp's accumulator fragments: two 16-row tiles of J 8-column
// blocks (the forward's 32 x 32 state, the backward's 32 x 40 [dKV | ds]).
template <int J>
__device__ __forceinline__ void zero_acc(float (&acc)[2][J][4]) {
#pragma unroll
    for (int m = 0; m < 2; m++)
#pragma unroll
        for (int j = 0; j < J; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[m][j][e] = 0.f;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL, x, o);
    return x;
}

__device__ __forceinline__ long long at(long long row, int heads, int h, int lane) {
    return (row * heads + h) * D + lane;
}

// Rows a warp needs in every lane (relu(k_j) to update the state, relu(q_i)
// to apply it) are staged in shared memory and read back as float4
// broadcasts: 8 shared loads per row instead of 32 warp shuffles, which
// would otherwise bound the kernel (shuffles issue at one warp instruction
// per cycle per SM, FMAs at four). Loads from global memory run UNROLL
// voxels ahead of the arithmetic so that each warp keeps rows in flight;
// the FMA forward kernel loads FWD_UNROLL rows at a time and the next
// FWD_UNROLL while it computes (FWD_PREFETCH).
#define UNROLL 4
#ifndef FWD_UNROLL
#define FWD_UNROLL 8
#endif
#ifndef FWD_PREFETCH
#define FWD_PREFETCH true
#endif

// acc[a] += row[a] * x
__device__ __forceinline__ void axpy_row(float acc[D], const float *row, float x) {
    const float4 *p = reinterpret_cast<const float4 *>(row);
#pragma unroll
    for (int a4 = 0; a4 < D / 4; a4++) {
        const float4 r = p[a4];
        acc[4 * a4] = fmaf(r.x, x, acc[4 * a4]);
        acc[4 * a4 + 1] = fmaf(r.y, x, acc[4 * a4 + 1]);
        acc[4 * a4 + 2] = fmaf(r.z, x, acc[4 * a4 + 2]);
        acc[4 * a4 + 3] = fmaf(r.w, x, acc[4 * a4 + 3]);
    }
}

// sum_a row[a] * r[a]
__device__ __forceinline__ float dot_row(const float *row, const float r[D]) {
    const float4 *p = reinterpret_cast<const float4 *>(row);
    float acc = 0.f;
#pragma unroll
    for (int a4 = 0; a4 < D / 4; a4++) {
        const float4 x = p[a4];
        acc = fmaf(x.x, r[4 * a4], acc);
        acc = fmaf(x.y, r[4 * a4 + 1], acc);
        acc = fmaf(x.z, r[4 * a4 + 2], acc);
        acc = fmaf(x.w, r[4 * a4 + 3], acc);
    }
    return acc;
}

// Rows j0, j0 + stride, ..., U of them, of two tensors (k and v, or q and
// dout) in lane's column; zeros past the end, which add nothing (relu(0)
// = 0, and a zero q or dout gives zero gradients).
template <int U, typename T>
__device__ __forceinline__ void load_pair(const T *k, const T *v, long long start, int n,
                                          int heads, int h, int j0, int stride, float kk[U],
                                          float vv[U]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int j = j0 + u * stride;
        kk[u] = 0.f;
        vv[u] = 0.f;
        if (j < n) {
            const long long idx = at(start + j, heads, h, lane);
            kk[u] = ld(k, idx);
            vv[u] = ld(v, idx);
        }
    }
}

// kv[a] += relu(k_j)[a] * v_j[lane], s += relu(k_j)[lane] over voxels
// first, first + stride, ... of the window, U at a time; `stage` holds U
// rows. With PREFETCH the next U rows are loaded while the current ones
// are used (2U rows in flight per warp).
template <int U, bool PREFETCH, typename T>
__device__ __forceinline__ void accumulate_state(const T *k, const T *v, long long start,
                                                 int n, int heads, int h, int first,
                                                 int stride, float kv[D], float &s,
                                                 float *stage) {
    const int lane = threadIdx.x & 31;
    float kk[U], vv[U];
    if (PREFETCH) load_pair<U>(k, v, start, n, heads, h, first, stride, kk, vv);
    for (int j0 = first; j0 < n; j0 += U * stride) {
        if (!PREFETCH) load_pair<U>(k, v, start, n, heads, h, j0, stride, kk, vv);
        float vc[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const float kj = fmaxf(kk[u], 0.f);
            s += kj;
            stage[u * D + lane] = kj;
            vc[u] = vv[u];
        }
        __syncwarp();
        if (PREFETCH) load_pair<U>(k, v, start, n, heads, h, j0 + U * stride, stride, kk, vv);
        // Rows past the end are zeros: skip their arithmetic (the
        // condition is the same in every lane).
#pragma unroll
        for (int u = 0; u < U; u++)
            if (j0 + u * stride < n) axpy_row(kv, stage + u * D, vc[u]);
        __syncwarp();
    }
}

// relu(q_i) in lane's column for rows i0, i0 + stride, ... (U of them);
// zeros past the end.
template <int U, typename T>
__device__ __forceinline__ void load_q(const T *q, long long start, int n, int heads, int h,
                                       int i0, int stride, float qq[U]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int i = i0 + u * stride;
        qq[u] = i < n ? ld(q, at(start + i, heads, h, lane)) : 0.f;
    }
}

// out_i = relu(q_i) KV / (relu(q_i) . s + eps) for voxels first, first +
// stride, ... of the window, U at a time (PREFETCH as above).
template <int U, bool PREFETCH, typename T>
__device__ __forceinline__ void apply_state(const T *q, T *out, long long start, int n,
                                            int heads, int h, int first, int stride,
                                            const float kv[D], float s, float *stage) {
    const int lane = threadIdx.x & 31;
    float qq[U];
    if (PREFETCH) load_q<U>(q, start, n, heads, h, first, stride, qq);
    for (int i0 = first; i0 < n; i0 += U * stride) {
        if (!PREFETCH) load_q<U>(q, start, n, heads, h, i0, stride, qq);
        float qc[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            qc[u] = fmaxf(qq[u], 0.f);
            stage[u * D + lane] = qc[u];
        }
        __syncwarp();
        if (PREFETCH) load_q<U>(q, start, n, heads, h, i0 + U * stride, stride, qq);
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int i = i0 + u * stride;
            if (i >= n) break;  // the same in every lane
            const float num = dot_row(stage + u * D, kv);
            const float den = warp_sum(qc[u] * s) + EPS;
            st(out, at(start + i, heads, h, lane), num / den);
        }
        __syncwarp();
    }
}

// The work item (index into the work list) and head of this block; the
// grid is (items, heads). For bf16 the linear block index runs over heads
// fastest, so that the blocks of one item's heads are scheduled together
// and read the neighbouring 64-byte pieces of the same rows (a row holds
// every head) at about the same time, instead of the whole tensor being
// swept once per head in 64-byte pieces. Measured on an H100 (2026-11-28,
// `sla_forward_sweep`, bf16 forward with the bf16 tensor-core kernel,
// medians of two rounds): 1M voxels 0.727 -> 0.611 ms autotuned, 0.753 ->
// 0.657 ms with the block list; the frames and 10k voxels within 4%
// either way. For f32 (128-byte
// pieces) it gained nothing in the forward and made forward + backward
// 4-8% slower from 300k voxels (the workload's own timing, two rounds),
// so f32 keeps heads outermost.
//
// The cluster kernels (CLUSTERED) need the CLUSTER blocks of a cluster,
// which are consecutive in x, to be consecutive items of one head. bf16
// keeps heads innermost at the cluster's grain instead: cluster c is
// items CLUSTER (c / heads) .. + CLUSTER - 1 of head c % heads.
template <typename T, bool CLUSTERED = false>
__device__ __forceinline__ void block_item(int heads, int &item, int &h) {
    if (CLUSTERED && sizeof(T) == 2) {
        const int l = blockIdx.x + blockIdx.y * gridDim.x;
        const int c = l / CLUSTER;
        h = c % heads;
        item = (c / heads) * CLUSTER + (l - c * CLUSTER);
    } else if (sizeof(T) == 2) {
        const int l = blockIdx.x + blockIdx.y * gridDim.x;
        item = l / heads;
        h = l - item * heads;
    } else {
        item = blockIdx.x;
        h = blockIdx.y;
    }
}

// The window a warp works on, and which of its chunks: a big window's
// block splits it over its WARPS warps (first = warp w, step = WARPS), a
// small window is one warp's (first = 0, step = 1). False for an empty
// slot of the last small block (its warp returns; that path has no
// __syncthreads).
__device__ __forceinline__ bool work_item(const int *big, int n_big, const int *small, int item,
                                          int w, int &win, int &first, int &step) {
    if (item < n_big) {
        win = big[item];
        first = w;
        step = WARPS;
        return true;
    }
    win = small[(item - n_big) * WARPS + w];
    first = 0;
    step = 1;
    return win >= 0;
}

// Sums the WARPS partial d x d states (and vectors) in `part` into part[0].
__device__ __forceinline__ void reduce_parts(float (*part)[D * STRIDE], float (*vec)[D],
                                             int active) {
    __syncthreads();
    for (int e = threadIdx.x; e < D * STRIDE; e += blockDim.x) {
        float t = part[0][e];
        for (int w = 1; w < active; w++) t += part[w][e];
        part[0][e] = t;
    }
    for (int e = threadIdx.x; e < D; e += blockDim.x) {
        float t = vec[0][e];
        for (int w = 1; w < active; w++) t += vec[w][e];
        vec[0][e] = t;
    }
    __syncthreads();
}

template <typename T>
__device__ void sla_fwd(const T *q, const T *k, const T *v, T *out, const unsigned *offsets,
                        const unsigned *counts, const int *big, int n_big, const int *small,
                        int heads) {
    __shared__ float part[WARPS][D * STRIDE];
    __shared__ float vec[WARPS][D];
    __shared__ __align__(16) float stage_all[WARPS][FWD_UNROLL * D];
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int item, h;
    block_item<T>(heads, item, h);
    float *stage = stage_all[w];
    float kv[D];
#pragma unroll
    for (int a = 0; a < D; a++) kv[a] = 0.f;
    float s = 0.f;
    int win, first, stride;
    if (!work_item(big, n_big, small, item, w, win, first, stride)) return;
    const long long start = offsets[win];
    const int n = counts[win];
    accumulate_state<FWD_UNROLL, FWD_PREFETCH>(k, v, start, n, heads, h, first, stride, kv, s, stage);
    if (stride == WARPS) {
#pragma unroll
        for (int a = 0; a < D; a++) part[w][a * STRIDE + lane] = kv[a];
        vec[w][lane] = s;
        reduce_parts(part, vec, WARPS);
#pragma unroll
        for (int a = 0; a < D; a++) kv[a] = part[0][a * STRIDE + lane];
        s = vec[0][lane];
    }
    apply_state<FWD_UNROLL, FWD_PREFETCH>(q, out, start, n, heads, h, first, stride, kv, s, stage);
}

// ---- Forward on tensor cores ---------------------------------------------
// The same work list and warps, but the products run as warp-wide
// mma.sync (m16n8k8, TF32 inputs, f32 accumulation) instead of one FMA per
// lane and element. Used for f32 storage; bf16 storage has its own kernel
// on bf16 tensor cores (sla_fwd_bf16mma, below). Phase 1, per chunk of 8 voxels: KV (32 x 32) += K^T V
// with K^T as the 32 x 8 A operand (two m-tiles) and V as the 8 x 32 B
// operand (four n-tiles). Phase 2, per chunk of 16 voxels: [num | den] =
// Q [KV | s] with Q as the 16 x 32 A operand, KV as B (four n-tiles) and s
// as a fifth n-tile whose column 0 is s and the rest zero, so the
// normaliser comes out of the same instructions.
//
// Precision. TF32 keeps 10 mantissa bits; to keep f32 accuracy every
// operand that is not exactly a TF32 value is split, x = big + small with
// both TF32, and a product is big*big + big*small + small*big (the
// "3xTF32" scheme). |small| <= 2^-11 |x|, so the small*small term left
// out is at most 2^-22 of a product, a few f32 roundings. bf16
// inputs are exact TF32 values, so their products would need one
// instruction (EXACT; the bf16 entries now use sla_fwd_bf16mma instead);
// KV is an f32 sum and is always split.
//
// Measured on an H100 (`sla_forward_sweep` in cuda.rs, one run, f32 / bf16,
// medians of 50 launches): a Waymo-like frame of 27,074 voxels took
// 0.0665 / 0.0616 ms with the FMA kernel (sla_fwd_ffma, kept for that A/B
// comparison; it prefetches 8 rows ahead since this change, and the
// kernel before it, 4 rows without prefetching, measured within 5% of it
// in an earlier sweep on the same GPU model) and 0.0428 / 0.0353 ms here;
// 300k voxels 0.488 / 0.519 ms and 0.318 / 0.296 ms. Compiled for three resident blocks per SM (80
// registers, a few spilled), which beat the compiler's own 95 registers
// and two blocks (0.0456 ms at the frame) and loading the first Q rows
// during the state's reduction. Also tried and not kept (H100, 2026-11-27,
// two alternating rounds of `sla_forward_sweep` against this kernel): a
// deeper prefetch, the rows of the next two chunks in flight instead of
// one (kept as loaded bf16 bits and widened only where used, so that no
// conversion waits on a load; 79 registers, no spills). bf16 got slower
// everywhere: a 27,074-voxel Waymo-like frame 0.0354 / 0.0364 -> 0.0396 ms,
// 30k 0.039 -> 0.043-0.046 ms, 300k 0.298 / 0.301 -> 0.311 / 0.313 ms; with
// it in f32 too (spilling) f32 went from 0.043 to 0.053 ms on the frame.
// So waiting on its loads is not what holds the bf16 kernel back.
// Nor L2 prefetches (H200, 2026-11-29, results/runs/2026-11-29-h200-
// point-cloud-sla-l2-prefetch): prefetch.global.L2 of the K and V rows of a
// warp's next 2, 4 or 8 chunks and of its first two Q chunks once its
// window is known, then kept that far ahead in the loops, made both kernels
// slower at every size (f32 Waymo-like frame 0.0399 / 0.0405 -> 0.047-0.049
// ms, 10k voxels 0.023 -> 0.029 ms, 1M 0.76 -> 0.96-1.04 ms; bf16 0.024 ->
// 0.026 ms on the frame, 0.51 -> 0.54-0.55 ms at 1M).
// What did pay (H200, 2026-11-29, after a SASS-level profile of small
// scenes, results/runs/2026-11-29-h200-point-cloud-sla-ncu-small-scenes):
// a reciprocal per row and products instead of a division per output, in
// both forwards and the tensor-core backward, and the block's work items
// read once per lane in sum_shared_states instead of one after another.
// Two alternating rounds of `sla_forward_sweep` (autotuned; results/runs/
// 2026-11-29-h200-point-cloud-sla-reciprocal): f32 Waymo-like frame
// 0.0394-0.0404 -> 0.0363-0.0372 ms, 10k 0.0230-0.0232 -> 0.0221-0.0223,
// 1M 0.757 -> 0.730; bf16 frame 0.0239-0.0243 -> 0.0223-0.0224, 100k
// 0.058 -> 0.050, 1M 0.512 -> 0.418. Forward + backward
// (`sla_backward_sweep`): f32 frame 0.1515 -> 0.1320-0.1329 ms, 10k
// 0.085-0.086 -> 0.074, 1M 3.53 -> 3.19; bf16 1M 3.40 -> 3.12.
// Tried next and not kept: each grouped slot's [first row, count] read
// beside its item (one round trip before the first rows instead of two):
// f32 within 1-2%, bf16 slower at every size (1M 0.416 -> 0.700 ms;
// results/runs/2026-11-29-h200-point-cloud-sla-spans). Nor a window
// that one warp holds alone, of at most 16 (or 32) voxels, computed in the
// parallel form, sum_j (q.k_j) v_j / (sum_j q.k_j + eps), with Q, K and V
// in one round trip and no state: Waymo-like frame 1-2% faster, 300k and
// 1M 2-3% slower (32: slower everywhere; results/runs/2026-11-29-h200-
// point-cloud-sla-parallel-form). Such warps are not what a small scene
// waits for. Nor the block's and cluster's sums of partial states with an
// element's loads issued together: f32 within 2%, bf16 3-31% slower
// (results/runs/2026-11-29-h200-point-cloud-sla-batched-sums).
//
// Shared memory per warp (dynamic, FWD_WARP_FLOATS floats): a staging area
// of 8 K rows and 8 V rows (phase 1, row stride KS) or 16 Q rows (phase
// 2, row stride QS), f32 after relu; and the warp's KV with s in column 32 and zeros in
// columns 33..39, row stride KS. KS = 40 for the tiles read as [t][g]
// (banks 8t + g) and QS = 36 for Q, read as [g][t] (banks 4g + t), make
// every fragment read below conflict-free.
#define KS 40
#define QS 36
#define FWD_STAGE_FLOATS (16 * KS)
#define FWD_WARP_FLOATS (FWD_STAGE_FLOATS + 32 * KS)

__device__ __forceinline__ unsigned to_tf32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}

// x = big + small, both TF32 (small = 0 when EXACT: x is already TF32).
template <bool EXACT>
__device__ __forceinline__ void split_tf32(float x, unsigned &big, unsigned &small) {
    if (EXACT) {
        big = __float_as_uint(x);
        small = 0u;
    } else {
        big = to_tf32(x);
        small = to_tf32(x - __uint_as_float(big));
    }
}

__device__ __forceinline__ void mma_tf32(float c[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// c += A B in f32 accuracy from split operands (terms skipped where an
// operand is exact).
template <bool EXACT_A, bool EXACT_B>
__device__ __forceinline__ void mma_3x(float c[4], const unsigned ab[4], const unsigned as[4],
                                       const unsigned bb[2], const unsigned bs[2]) {
    if (!EXACT_A) mma_tf32(c, as, bb);
    if (!EXACT_B) mma_tf32(c, ab, bs);
    mma_tf32(c, ab, bb);
}

// Four consecutive elements as f32 (16-byte f32 or 8-byte bf16 loads).
__device__ __forceinline__ float4 ld4(const float *p, long long i) {
    return *reinterpret_cast<const float4 *>(p + i);
}
__device__ __forceinline__ float4 ld4(const unsigned short *p, long long i) {
    const uint2 u = *reinterpret_cast<const uint2 *>(p + i);
    return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u),
                       __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xffff0000u));
}
__device__ __forceinline__ float4 relu4(float4 x) {
    return make_float4(fmaxf(x.x, 0.f), fmaxf(x.y, 0.f), fmaxf(x.z, 0.f), fmaxf(x.w, 0.f));
}

// Rows r0 + 4p + (lane >> 3), p < P, of the window's head h: columns
// 4 (lane & 7) .. + 3 of each (8 lanes per row, so a warp loads 4 rows per
// instruction); zeros past the window's end.
template <int P, typename T>
__device__ __forceinline__ void load_rows(const T *x, long long start, int n, int heads, int h,
                                          int r0, float4 out[P]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int p = 0; p < P; p++) {
        const int r = r0 + 4 * p + (lane >> 3);
        out[p] = r < n ? ld4(x, ((start + r) * heads + h) * D + 4 * (lane & 7))
                       : make_float4(0.f, 0.f, 0.f, 0.f);
    }
}

template <typename T>
__device__ __forceinline__ void st2(T *p, long long i, float x, float y) {
    st(p, i, x);
    st(p, i + 1, y);
}
__device__ __forceinline__ void st2(float *p, long long i, float x, float y) {
    *reinterpret_cast<float2 *>(p + i) = make_float2(x, y);
}

// Fields of a forward work item: the grouped list's (packing.rs, encode:
// window << 8 | multi << 7 | first << 4 | step) or, CLUSTERED, the cluster
// list's (encode_wide: window << 13 | csync << 12 | multi << 11 | first << 6
// | step).
template <bool WIDE>
__device__ __forceinline__ int item_step(int it) { return WIDE ? it & 63 : it & 15; }
template <bool WIDE>
__device__ __forceinline__ int item_first(int it) { return WIDE ? (it >> 6) & 31 : (it >> 4) & 7; }
template <bool WIDE>
__device__ __forceinline__ bool item_multi(int it) { return WIDE ? (it >> 11) & 1 : (it >> 7) & 1; }
template <bool WIDE>
__device__ __forceinline__ int item_window(int it) {
    return (int)((unsigned)it >> (WIDE ? 13 : 8));
}

// Thread-block clusters (sm_90): this block's rank in its cluster, the
// cluster-wide barrier in its two halves, and a load from the shared
// memory of another block of the cluster (at the same offset as p here).
__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ void cluster_arrive() {
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ float ld_cluster(const float *p, unsigned rank) {
    unsigned a, m;
    float x;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(m) : "r"(a), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(x) : "r"(m) : "memory");
    return x;
}

// The forward's work item of warp w: its window, first chunk, chunk step
// and voxel count, and whether its block shares windows among warps.
// GROUPED: from the grouped list (an empty slot has n = 0 and still meets
// the block's barriers); otherwise from work_item (false: an empty slot,
// whose warp returns).
template <bool GROUPED, bool CLUSTERED = false>
__device__ __forceinline__ bool fwd_work_item(const int *big, int n_big, const int *small,
                                              const unsigned *counts, int item, int w, int &win,
                                              int &first, int &step, int &n, bool &multi,
                                              bool &csync) {
    csync = false;
    if (GROUPED || CLUSTERED) {
        const int it = small[item * WARPS + w];
        step = item_step<CLUSTERED>(it);
        first = item_first<CLUSTERED>(it);
        multi = item_multi<CLUSTERED>(it);
        csync = CLUSTERED && ((it >> 12) & 1);
        win = item_window<CLUSTERED>(it);
        n = step ? (int)counts[win] : 0;
        if (step == 0) step = 1;
        return true;
    }
    if (!work_item(big, n_big, small, item, w, win, first, step)) return false;
    multi = step == WARPS;
    n = counts[win];
    return true;
}

// In a block whose warps share windows (every warp calls this, with all
// its 32 lanes: it holds two block-wide barriers and a warp shuffle), sums
// the partial state tiles of each window into the tile of its first warp,
// and returns the tile of warp w's window.
//
// The block's WARPS work items are loaded once, one per lane, before the
// first barrier, and handed round by shuffles: loaded inside the loop, as
// until 2026-11-29, they were WARPS round trips to L2 one after another on
// every warp's path (an H200 profile of 10k voxels put about 12% of the
// forward's stall samples on that loop; results/runs/2026-11-29-h200-
// point-cloud-sla-ncu-small-scenes).
template <bool GROUPED, bool CLUSTERED = false>
__device__ __forceinline__ const float *sum_shared_states(float *fwd_smem, const int *small,
                                                          int item, int w, int first) {
    static_assert(WARPS <= 32, "a lane loads one of the block's work items");
    const int lane = threadIdx.x & 31;
    const int mine = (GROUPED || CLUSTERED) ? small[item * WARPS + (lane % WARPS)] : 0;
    __syncthreads();
    for (int u = 0; u < WARPS; u++) {
        int su = WARPS;  // without GROUPED the block is one window
        if (GROUPED || CLUSTERED) {
            // The block's first warp of a window leads it here (for a
            // window spanning blocks, the block's warp 0); the window has
            // min(step, WARPS) warps in this block.
            const int iu = __shfl_sync(FULL, mine, u);
            const int fu = item_first<CLUSTERED>(iu), gu = item_step<CLUSTERED>(iu);
            if (CLUSTERED) su = (fu & 7) == 0 ? min(gu, WARPS) : 0;
            else su = fu == 0 ? gu : 0;
        } else if (u > 0) {
            break;
        }
        if (su < 2) continue;
        float *lead = fwd_smem + u * FWD_WARP_FLOATS + FWD_STAGE_FLOATS;
        for (int e = threadIdx.x; e < 32 * KS; e += blockDim.x) {
            float x = lead[e];
            for (int o = 1; o < su; o++) x += lead[o * FWD_WARP_FLOATS + e];
            lead[e] = x;
        }
    }
    __syncthreads();
    const int lead = CLUSTERED ? first & 7 : first;
    return fwd_smem + (w - lead) * FWD_WARP_FLOATS + FWD_STAGE_FLOATS;
}

// The cluster schedule (packing.rs, cluster_items): after the block's own
// sum (sum_shared_states), the blocks of a window that spans several
// (step > WARPS, then every slot of the block is that window's) add up
// their partial states through distributed shared memory, each block
// summing the span's tiles in the same order, so that all of them hold
// the same state. Every block of a cluster with such a window (csync, the
// same on all its slots) meets the cluster barrier here, arrives once more
// when it has read the others' shared memory, and waits for everyone's
// second arrival before it exits (cluster_exit), since a block's shared
// memory goes with it. The state goes to warp 1's tile, free since the
// block's sum; returns the tile to read the state from.
__device__ __forceinline__ const float *sum_cluster_states(float *fwd_smem, const float *kv,
                                                           int first, int step, bool csync) {
    if (!csync) return kv;
    __syncwarp();  // the barriers below are .aligned: converged warps
    cluster_arrive();
    cluster_wait();
    if (step > WARPS) {
        const unsigned base = cluster_rank() - (unsigned)(first >> 3);
        const int nb = step >> 3;
        const float *lead = fwd_smem + FWD_STAGE_FLOATS;
        float *total = fwd_smem + FWD_WARP_FLOATS + FWD_STAGE_FLOATS;
        for (int e = threadIdx.x; e < 32 * KS; e += blockDim.x) {
            float x = 0.f;
            for (int j = 0; j < nb; j++) x += ld_cluster(lead + e, base + j);
            total[e] = x;
        }
        __syncthreads();
        kv = total;
    }
    cluster_arrive();
    return kv;
}

__device__ __forceinline__ void cluster_exit(bool csync) {
    if (csync) {
        __syncwarp();
        cluster_wait();
    }
}

// The warp's accumulators (rows a = g + 16m (+ 8), columns 8j + 2t (+ 1),
// J column tiles) into its state tile.
template <int J>
__device__ __forceinline__ void store_state(float *tile, const float acc[2][J][4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int m = 0; m < 2; m++)
#pragma unroll
        for (int j = 0; j < J; j++) {
            const int a = g + 16 * m, col = 2 * t + 8 * j;
            tile[a * KS + col] = acc[m][j][0];
            tile[a * KS + col + 1] = acc[m][j][1];
            tile[(a + 8) * KS + col] = acc[m][j][2];
            tile[(a + 8) * KS + col + 1] = acc[m][j][3];
        }
}

// GROUPED: the work list of packing.rs instead of work_item's: `small`
// holds one item per warp, (window << 8) | (multi << 7) | (first << 4) |
// step, `step` warps sharing a window (0: an empty slot, which still meets
// the block's barriers), and `multi` set on every slot of a block where
// some window has several warps; `big` and `n_big` are unused.
template <typename T, bool GROUPED, bool CLUSTERED = false>
__device__ void sla_fwd_mma(const T *q, const T *k, const T *v, T *out,
                            const unsigned *offsets, const unsigned *counts, const int *big,
                            int n_big, const int *small, int heads) {
    constexpr bool EXACT = sizeof(T) == 2;  // bf16 inputs are TF32 values
    extern __shared__ __align__(16) float fwd_smem[];
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int item, h;
    block_item<T, CLUSTERED>(heads, item, h);
    const int g = lane >> 2, t = lane & 3;
    float *stage = fwd_smem + w * FWD_WARP_FLOATS;
    float *kvs = stage + FWD_STAGE_FLOATS;
    int win, first, step, n;
    bool multi, csync;
    if (!fwd_work_item<GROUPED, CLUSTERED>(big, n_big, small, counts, item, w, win, first, step,
                                           n, multi, csync))
        return;
    const long long start = offsets[win];

    // Phase 1: chunks first, first + step, ... of 8 voxels.
    float acc[2][4][4];
    zero_acc(acc);
    float4 s4 = make_float4(0.f, 0.f, 0.f, 0.f);
    float *sk = stage, *sv = stage + 8 * KS;
    float4 kx[2], vx[2];
    load_rows<2>(k, start, n, heads, h, 8 * first, kx);
    load_rows<2>(v, start, n, heads, h, 8 * first, vx);
    for (int c = first; 8 * c < n; c += step) {
#pragma unroll
        for (int p = 0; p < 2; p++) {
            const int r = 4 * p + (lane >> 3);
            const float4 kr = relu4(kx[p]);
            s4.x += kr.x;
            s4.y += kr.y;
            s4.z += kr.z;
            s4.w += kr.w;
            *reinterpret_cast<float4 *>(sk + r * KS + 4 * (lane & 7)) = kr;
            *reinterpret_cast<float4 *>(sv + r * KS + 4 * (lane & 7)) = vx[p];
        }
        __syncwarp();
        // The next chunk's rows load while this one is multiplied.
        load_rows<2>(k, start, n, heads, h, 8 * (c + step), kx);
        load_rows<2>(v, start, n, heads, h, 8 * (c + step), vx);
        unsigned ab[2][4], as[2][4], bb[4][2], bs[4][2];
#pragma unroll
        for (int m = 0; m < 2; m++) {  // A[row a][col j] = K[voxel j][a]
            split_tf32<EXACT>(sk[t * KS + g + 16 * m], ab[m][0], as[m][0]);
            split_tf32<EXACT>(sk[t * KS + g + 8 + 16 * m], ab[m][1], as[m][1]);
            split_tf32<EXACT>(sk[(t + 4) * KS + g + 16 * m], ab[m][2], as[m][2]);
            split_tf32<EXACT>(sk[(t + 4) * KS + g + 8 + 16 * m], ab[m][3], as[m][3]);
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {  // B[voxel][col] = V[voxel][col]
            split_tf32<EXACT>(sv[t * KS + g + 8 * j], bb[j][0], bs[j][0]);
            split_tf32<EXACT>(sv[(t + 4) * KS + g + 8 * j], bb[j][1], bs[j][1]);
        }
#pragma unroll
        for (int m = 0; m < 2; m++)
#pragma unroll
            for (int j = 0; j < 4; j++) mma_3x<EXACT, EXACT>(acc[m][j], ab[m], as[m], bb[j], bs[j]);
        __syncwarp();
    }
    // s: lanes l, l ^ 8, l ^ 16, l ^ 24 hold the same four columns.
#pragma unroll
    for (int o = 8; o < 32; o <<= 1) {
        s4.x += __shfl_xor_sync(FULL, s4.x, o);
        s4.y += __shfl_xor_sync(FULL, s4.y, o);
        s4.z += __shfl_xor_sync(FULL, s4.z, o);
        s4.w += __shfl_xor_sync(FULL, s4.w, o);
    }
    // The warp's KV, s and zeros into its shared tile.
    store_state<4>(kvs, acc);
    if (lane < 8) {
        kvs[(4 * lane) * KS + 32] = s4.x;
        kvs[(4 * lane + 1) * KS + 32] = s4.y;
        kvs[(4 * lane + 2) * KS + 32] = s4.z;
        kvs[(4 * lane + 3) * KS + 32] = s4.w;
    }
#pragma unroll
    for (int col = 33; col < KS; col++) kvs[lane * KS + col] = 0.f;
    const float *kv = kvs;
    if (multi) kv = sum_shared_states<GROUPED, CLUSTERED>(fwd_smem, small, item, w, first);
    else __syncwarp();
    if (CLUSTERED) kv = sum_cluster_states(fwd_smem, kv, first, step, csync);

    // Phase 2: chunks first, first + step, ... of 16 voxels.
    float *sq = stage;
    float4 qx[4];
    load_rows<4>(q, start, n, heads, h, 16 * first, qx);
    for (int c = first; 16 * c < n; c += step) {
#pragma unroll
        for (int p = 0; p < 4; p++)
            *reinterpret_cast<float4 *>(sq + (4 * p + (lane >> 3)) * QS + 4 * (lane & 7)) =
                relu4(qx[p]);
        __syncwarp();
        load_rows<4>(q, start, n, heads, h, 16 * (c + step), qx);
        float o[5][4];
#pragma unroll
        for (int j = 0; j < 5; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) o[j][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {  // A[voxel][a] = Q[voxel][a], a in 8kk..8kk+7
            unsigned ab[4], as[4];
            split_tf32<EXACT>(sq[g * QS + t + 8 * kk], ab[0], as[0]);
            split_tf32<EXACT>(sq[(g + 8) * QS + t + 8 * kk], ab[1], as[1]);
            split_tf32<EXACT>(sq[g * QS + t + 4 + 8 * kk], ab[2], as[2]);
            split_tf32<EXACT>(sq[(g + 8) * QS + t + 4 + 8 * kk], ab[3], as[3]);
#pragma unroll
            for (int j = 0; j < 5; j++) {  // B[a][col] = [KV | s][a][col]
                unsigned bb[2], bs[2];
                split_tf32<false>(kv[(t + 8 * kk) * KS + g + 8 * j], bb[0], bs[0]);
                split_tf32<false>(kv[(t + 4 + 8 * kk) * KS + g + 8 * j], bb[1], bs[1]);
                mma_3x<EXACT, false>(o[j], ab, as, bb, bs);
            }
        }
        // Column 32 (n-tile 4, column 0) is the normaliser: lane 4g holds
        // it for rows g and g + 8.
        // Two divisions a lane, then products: a division per output (16)
        // made the stores a visible share of small scenes' time.
        const float inv0 = 1.f / (__shfl_sync(FULL, o[4][0], lane & ~3) + EPS);
        const float inv1 = 1.f / (__shfl_sync(FULL, o[4][2], lane & ~3) + EPS);
        const int r0 = 16 * c + g, r1 = r0 + 8;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int col = 8 * j + 2 * t;
            if (r0 < n) st2(out, at(start + r0, heads, h, col), o[j][0] * inv0, o[j][1] * inv0);
            if (r1 < n) st2(out, at(start + r1, heads, h, col), o[j][2] * inv1, o[j][3] * inv1);
        }
        __syncwarp();
    }
    if (CLUSTERED) cluster_exit(csync);
}

// ---- Forward on bf16 tensor cores (bf16 storage) -------------------------
// bf16 inputs need neither the TF32 splits nor f32 staging: the products
// run as mma.sync m16n8k16 with bf16 operands and f32 accumulation, 16
// voxels (phase 1) or 16 channels (phase 2) per instruction instead of 8.
// Rows are staged in shared memory as loaded (bf16, relu applied to k and
// q by masking sign bits; row stride 80 bytes, so that the 8 rows of an
// ldmatrix are conflict-free) and fragments come from ldmatrix. Phase 1,
// per chunk of 16 voxels: KV (32 x 32) += K^T V, A = K^T from ldmatrix
// .trans of the K rows, B = V from ldmatrix .trans of the V rows, and
// s = K^T 1 from a constant all-ones B tile (2 + 8 instructions). Phase 2,
// per chunk of 16 voxels: [num | den] = Q [KV | s], A = Q from ldmatrix;
// the B operand [KV | s] is the f32 state split once per window into two
// bf16 terms, hi = bf16(x) and lo = bf16(x - hi) (|x - hi - lo| <= 2^-16
// |x|, far below the 2^-9 of the bf16 output), held in 40 registers for
// the whole phase, so a chunk costs 2 ldmatrix and 20 mma. Work list,
// schedules and shared memory as sla_fwd_mma's. Measured on an H100
// (2026-11-28, `sla_forward_sweep`, two alternating rounds, autotuned
// schedule), against bf16 through sla_fwd_mma: a 27,074-voxel Waymo-like
// frame 0.0398 -> 0.0255 ms, 100k voxels 0.107 -> 0.071 ms, 1M 0.937 ->
// 0.611 ms (1.77x its floor), the same maximum error (2.4e-3, the output's
// bf16 rounding); r6 in results/runs has the workload's own timing.
#define BF_ROW 80 /* bytes per staged row: 64 of data, 16 of padding */

__device__ __forceinline__ unsigned relu_bf16x2(unsigned u) {
    return u & ~(((u & 0x80008000u) >> 15) * 0xffffu);
}

__device__ __forceinline__ unsigned pack_bf16x2(float lo_elem, float hi_elem) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi_elem), "f"(lo_elem));
    return r;
}

__device__ __forceinline__ float bf16_lo(unsigned u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf16_hi(unsigned u) { return __uint_as_float(u & 0xffff0000u); }

__device__ __forceinline__ unsigned smem_addr(const void *p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void ldsm_x4(unsigned r[4], const void *p) {
    const unsigned a = smem_addr(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned r[4], const void *p) {
    const unsigned a = smem_addr(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ void mma_bf16(float c[4], const unsigned a[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Rows r0 + (lane >> 2) and r0 + 8 + (lane >> 2) of the window's head h,
// 16 bytes each (columns 8 (lane & 3) .. + 7); zeros past the end.
__device__ __forceinline__ void load_rows16(const unsigned short *x, long long start, int n,
                                            int heads, int h, int r0, uint4 out[2]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int p = 0; p < 2; p++) {
        const int r = r0 + 8 * p + (lane >> 2);
        out[p] = r < n ? *reinterpret_cast<const uint4 *>(x + ((start + r) * heads + h) * D +
                                                          8 * (lane & 3))
                       : make_uint4(0u, 0u, 0u, 0u);
    }
}

// The 16 rows of `rows` into a stage of 16 rows of BF_ROW bytes, with relu
// when RELU.
template <bool RELU>
__device__ __forceinline__ void stage_rows16(char *stage, const uint4 rows[2]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int p = 0; p < 2; p++) {
        uint4 x = rows[p];
        if (RELU) {
            x.x = relu_bf16x2(x.x);
            x.y = relu_bf16x2(x.y);
            x.z = relu_bf16x2(x.z);
            x.w = relu_bf16x2(x.w);
        }
        *reinterpret_cast<uint4 *>(stage + (8 * p + (lane >> 2)) * BF_ROW + 16 * (lane & 3)) = x;
    }
}

template <bool GROUPED, bool CLUSTERED = false>
__device__ void sla_fwd_bf16mma(const unsigned short *q, const unsigned short *k,
                                const unsigned short *v, unsigned short *out,
                                const unsigned *offsets, const unsigned *counts, const int *big,
                                int n_big, const int *small, int heads) {
    extern __shared__ __align__(16) float fwd_smem[];
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int item, h;
    block_item<unsigned short, CLUSTERED>(heads, item, h);
    const int g = lane >> 2, t = lane & 3;
    float *stage_f = fwd_smem + w * FWD_WARP_FLOATS;
    char *sk = reinterpret_cast<char *>(stage_f), *sv = sk + 16 * BF_ROW;
    float *kvs = stage_f + FWD_STAGE_FLOATS;
    int win, first, step, n;
    bool multi, csync;
    if (!fwd_work_item<GROUPED, CLUSTERED>(big, n_big, small, counts, item, w, win, first, step,
                                           n, multi, csync))
        return;
    const long long start = offsets[win];
    // ldmatrix row addresses: lane L gives row L & 7 of matrix L >> 3.
    const int mq = lane >> 3, mr = lane & 7;

    // Phase 1: chunks first, first + step, ... of 16 voxels.
    float acc[2][4][4], accs[2][4];
    zero_acc(acc);
#pragma unroll
    for (int m = 0; m < 2; m++)
#pragma unroll
        for (int e = 0; e < 4; e++) accs[m][e] = 0.f;
    const unsigned ONES = 0x3f803f80u;  // two bf16 ones
    uint4 kx[2], vx[2];
    load_rows16(k, start, n, heads, h, 16 * first, kx);
    load_rows16(v, start, n, heads, h, 16 * first, vx);
    for (int c = first; 16 * c < n; c += step) {
        stage_rows16<true>(sk, kx);
        stage_rows16<false>(sv, vx);
        __syncwarp();
        // The next chunk's rows load while this one is multiplied.
        load_rows16(k, start, n, heads, h, 16 * (c + step), kx);
        load_rows16(v, start, n, heads, h, 16 * (c + step), vx);
        // A of m-tile m (channels 16m..): matrices (voxels 0-7 | 8-15) x
        // (channels +0 | +8) in the order a0a1, a2a3, a4a5, a6a7.
        unsigned a[2][4], b[2][4];
#pragma unroll
        for (int m = 0; m < 2; m++)
            ldsm_x4_t(a[m], sk + (8 * (mq >> 1) + mr) * BF_ROW + 2 * (16 * m + 8 * (mq & 1)));
        // B of n-tiles 2u, 2u + 1: matrices (voxels 0-7 | 8-15) x columns
        // (16u + 0 | 16u + 8).
#pragma unroll
        for (int u = 0; u < 2; u++)
            ldsm_x4_t(b[u], sv + (8 * (mq & 1) + mr) * BF_ROW + 2 * (16 * u + 8 * (mq >> 1)));
#pragma unroll
        for (int m = 0; m < 2; m++) {
#pragma unroll
            for (int j = 0; j < 4; j++)
                mma_bf16(acc[m][j], a[m], b[j >> 1][2 * (j & 1)], b[j >> 1][2 * (j & 1) + 1]);
            mma_bf16(accs[m], a[m], ONES, ONES);
        }
        __syncwarp();
    }
    // The warp's KV, s and zeros into its shared tile (row stride KS).
#pragma unroll
    for (int m = 0; m < 2; m++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int a = g + 16 * m, col = 2 * t + 8 * j;
            kvs[a * KS + col] = acc[m][j][0];
            kvs[a * KS + col + 1] = acc[m][j][1];
            kvs[(a + 8) * KS + col] = acc[m][j][2];
            kvs[(a + 8) * KS + col + 1] = acc[m][j][3];
        }
    if (t == 0) {
#pragma unroll
        for (int m = 0; m < 2; m++) {
            kvs[(g + 16 * m) * KS + 32] = accs[m][0];
            kvs[(g + 8 + 16 * m) * KS + 32] = accs[m][2];
        }
    }
#pragma unroll
    for (int col = 33; col < KS; col++) kvs[lane * KS + col] = 0.f;
    const float *kv = kvs;
    if (multi) kv = sum_shared_states<GROUPED, CLUSTERED>(fwd_smem, small, item, w, first);
    else __syncwarp();
    if (CLUSTERED) kv = sum_cluster_states(fwd_smem, kv, first, step, csync);

    // [KV | s] as B fragments of k-step ks (channels 16ks..) and n-tile j:
    // b0b1 = rows 16ks + 2t, +1 and b2b3 = rows 16ks + 2t + 8, +9, column
    // 8j + g; hi and lo terms.
    unsigned bh[2][5][2], bl[2][5][2];
#pragma unroll
    for (int ks = 0; ks < 2; ks++)
#pragma unroll
        for (int j = 0; j < 5; j++)
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int a = 16 * ks + 2 * t + 8 * r, col = 8 * j + g;
                const float x0 = kv[a * KS + col], x1 = kv[(a + 1) * KS + col];
                const unsigned hi = pack_bf16x2(x0, x1);
                bh[ks][j][r] = hi;
                bl[ks][j][r] = pack_bf16x2(x0 - bf16_lo(hi), x1 - bf16_hi(hi));
            }
    __syncwarp();  // the stage is reused for Q below

    // Phase 2: chunks first, first + step, ... of 16 voxels.
    char *sq = sk;
    uint4 qx[2];
    load_rows16(q, start, n, heads, h, 16 * first, qx);
    for (int c = first; 16 * c < n; c += step) {
        stage_rows16<true>(sq, qx);
        __syncwarp();
        load_rows16(q, start, n, heads, h, 16 * (c + step), qx);
        float o[5][4];
#pragma unroll
        for (int j = 0; j < 5; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) o[j][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < 2; ks++) {
            // A: matrices (voxels 0-7 | 8-15) x (channels 16ks + 0 | + 8).
            unsigned a[4];
            ldsm_x4(a, sq + (8 * (mq & 1) + mr) * BF_ROW + 2 * (16 * ks + 8 * (mq >> 1)));
#pragma unroll
            for (int j = 0; j < 5; j++) {
                mma_bf16(o[j], a, bl[ks][j][0], bl[ks][j][1]);
                mma_bf16(o[j], a, bh[ks][j][0], bh[ks][j][1]);
            }
        }
        // Column 32 (n-tile 4, column 0) is the normaliser: lane 4g holds
        // it for rows g and g + 8.
        // Two divisions a lane, then products (as in sla_fwd_mma).
        const float inv0 = 1.f / (__shfl_sync(FULL, o[4][0], lane & ~3) + EPS);
        const float inv1 = 1.f / (__shfl_sync(FULL, o[4][2], lane & ~3) + EPS);
        const int r0 = 16 * c + g, r1 = r0 + 8;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int col = 8 * j + 2 * t;
            if (r0 < n)
                *reinterpret_cast<unsigned *>(out + at(start + r0, heads, h, col)) =
                    pack_bf16x2(o[j][0] * inv0, o[j][1] * inv0);
            if (r1 < n)
                *reinterpret_cast<unsigned *>(out + at(start + r1, heads, h, col)) =
                    pack_bf16x2(o[j][2] * inv1, o[j][3] * inv1);
        }
        __syncwarp();
    }
    if (CLUSTERED) cluster_exit(csync);
}

// Backward (derivation in sla.rs): with phi = relu, num = phi(q) KV,
// den = phi(q).s + eps, g = dout / den, dden = -(g . num) / den:
//   dphi(q) = KV g + s dden;  dKV = sum_i phi(q_i)^T g_i;  ds = sum_i phi(q_i) dden_i
//   dphi(k_j) = dKV v_j + ds;  dv_j = dKV^T phi(k_j)
// The state is recomputed (as the authors' backward does), not stored.
// Compiled for at least 2 resident blocks of WARPS warps per SM (which
// caps registers at 128 a thread; its register count without the hint was
// not profiled). Measured on the H100 (scaling variant, f32,
// forward + backward): 8.60 -> 6.73 ms at 1M voxels, 0.936 -> 0.777 ms at
// 100k, 0.154 -> 0.150 ms at 10k; asking for 3 blocks was slower than 2
// (the variants compared were temporary kernels, not kept here).

template <typename T>
__device__ void sla_bwd(const T *q, const T *k, const T *v, const T *dout, T *dq, T *dk,
                        T *dv, const unsigned *offsets, const unsigned *counts,
                        const int *big, int n_big, const int *small, int heads) {
    __shared__ float part[WARPS][D * STRIDE];
    __shared__ float vec[WARPS][D];
    __shared__ __align__(16) float stage_all[WARPS][2 * UNROLL * D];
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int item, h;
    block_item<T>(heads, item, h);
    float *stage = stage_all[w], *stage2 = stage_all[w] + UNROLL * D;
    int win, first, stride;
    if (!work_item(big, n_big, small, item, w, win, first, stride)) return;
    const bool shared_window = stride == WARPS;
    const long long start = offsets[win];
    const int n = counts[win];

    // Phase 1: the state, as in the forward pass.
    float col[D], row[D];
#pragma unroll
    for (int a = 0; a < D; a++) col[a] = 0.f;
    float s = 0.f;
    accumulate_state<UNROLL, false>(k, v, start, n, heads, h, first, stride, col, s, stage);
#pragma unroll
    for (int a = 0; a < D; a++) part[w][a * STRIDE + lane] = col[a];
    vec[w][lane] = s;
    if (shared_window) reduce_parts(part, vec, WARPS);
    else __syncwarp();
    const int src = shared_window ? 0 : w;
#pragma unroll
    for (int a = 0; a < D; a++) {
        col[a] = part[src][a * STRIDE + lane]; // KV[a][lane]
        row[a] = part[src][lane * STRIDE + a]; // KV[lane][a]
    }
    s = vec[src][lane];
    if (shared_window) __syncthreads(); // part is reused below
    else __syncwarp();

    // Phase 2: dq, and the gradients of the state.
    float dcol[D];
#pragma unroll
    for (int a = 0; a < D; a++) dcol[a] = 0.f;
    float ds = 0.f;
    for (int i0 = first; i0 < n; i0 += UNROLL * stride) {
        float qq[UNROLL], gg[UNROLL], dd[UNROLL];
        load_pair<UNROLL>(q, dout, start, n, heads, h, i0, stride, qq, gg);
#pragma unroll
        for (int u = 0; u < UNROLL; u++) stage[u * D + lane] = fmaxf(qq[u], 0.f);
        __syncwarp();
        // Past the end q = dout = 0, so g = dden = 0: no contribution.
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const float qi = fmaxf(qq[u], 0.f);
            const float num = dot_row(stage + u * D, col);
            const float den = warp_sum(qi * s) + EPS;
            gg[u] = gg[u] / den;
            dd[u] = -warp_sum(gg[u] * num) / den;
            stage2[u * D + lane] = gg[u];
        }
        __syncwarp();
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int i = i0 + u * stride;
            const float qi = fmaxf(qq[u], 0.f);
            const float dphi = fmaf(s, dd[u], dot_row(stage2 + u * D, row));
            axpy_row(dcol, stage + u * D, gg[u]); // dKV[b][lane] += phi(q)[b] g[lane]
            ds = fmaf(qi, dd[u], ds);
            if (i < n) st(dq, at(start + i, heads, h, lane), qq[u] > 0.f ? dphi : 0.f);
        }
        __syncwarp();
    }

    // Phase 3: dk and dv from the reduced dKV and ds.
#pragma unroll
    for (int a = 0; a < D; a++) part[w][a * STRIDE + lane] = dcol[a];
    vec[w][lane] = ds;
    if (shared_window) reduce_parts(part, vec, WARPS);
    else __syncwarp();
#pragma unroll
    for (int a = 0; a < D; a++) {
        col[a] = part[src][a * STRIDE + lane]; // dKV[a][lane]
        row[a] = part[src][lane * STRIDE + a]; // dKV[lane][a]
    }
    ds = vec[src][lane];
    for (int j0 = first; j0 < n; j0 += UNROLL * stride) {
        float kk[UNROLL], vv[UNROLL];
        load_pair<UNROLL>(k, v, start, n, heads, h, j0, stride, kk, vv);
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            stage[u * D + lane] = fmaxf(kk[u], 0.f);
            stage2[u * D + lane] = vv[u];
        }
        __syncwarp();
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int j = j0 + u * stride;
            const float dphik = ds + dot_row(stage2 + u * D, row);
            const float dvj = dot_row(stage + u * D, col);
            if (j < n) {
                const long long idx = at(start + j, heads, h, lane);
                st(dk, idx, kk[u] > 0.f ? dphik : 0.f);
                st(dv, idx, dvj);
            }
        }
        __syncwarp();
    }
}

// ---- Backward on tensor cores ----------------------------------------------
// The same gradients as sla_bwd, with every product on mma.sync m16n8k8
// TF32 (f32 inputs split into two TF32 parts, as in sla_fwd_mma; bf16
// inputs are exact in TF32), 16 voxels a chunk, the block list's schedule
// (work_item). Per window and head, with phi = relu:
//   phase 1: [KV | s] = phi(K)^T [V | 1]                 (as the forward)
//   phase 2: [num | den] = phi(Q) [KV | s], G = dout / den,
//            dd = -rowsum(G * num) / den,
//            dq = (G KV^T + dd s^T) * [q > 0],
//            [dKV | ds] += phi(Q)^T [G | dd]              (in registers)
//   phase 3: dk = (V dKV^T + ds) * [k > 0], dv = phi(K) dKV.
// Shared memory per warp (floats, rows of KS): two staging tiles of 16 rows
// (A: phi(k) or phi(q); B: v, dout then [G | dd]; B's columns 32..39 hold
// [1, 0, ...] in phase 1) and one 32-row state tile, [KV | s] in phase 2,
// then [dKV | ds] in phase 3. A window given a whole block sums its warps'
// tiles into warp 0's (sum_warp_tiles). Measured on an H200 (2026-11-28,
// `sla_backward_sweep`, forward + backward, f32 / bf16, ms) against the
// FMA kernel: a 27,074-voxel Waymo-like frame 0.235 / 0.210 -> 0.150 /
// 0.135, 100k voxels 0.671 / 0.623 -> 0.438 / 0.398, 1M 5.75 / 5.73 ->
// 3.53 / 3.40; largest relative error against float64 3.8e-6 (f32) and
// 2.2e-3 (bf16) in the kernel test. ptxas reports small spills (about
// 300 bytes a thread) under the two-blocks-per-SM bound.
#define BWD_WARP_FLOATS (2 * 16 * KS + 32 * KS)

// In a block whose eight warps share one window: sums every warp's state
// tile into warp 0's and returns it (two block-wide barriers).
__device__ __forceinline__ const float *sum_warp_tiles(float *smem) {
    float *tile0 = smem + 2 * 16 * KS;
    __syncthreads();
    for (int e = threadIdx.x; e < 32 * KS; e += blockDim.x) {
        float x = tile0[e];
        for (int u = 1; u < WARPS; u++) x += tile0[u * BWD_WARP_FLOATS + e];
        tile0[e] = x;
    }
    __syncthreads();
    return tile0;
}

// acc[m][j] += A^T B over a staged chunk of 16 voxels, where A (voxel x 32)
// is `sa` and B (voxel x 40) is `sb`: the 32 x 40 product phi(K)^T [V | 1]
// (phase 1) or phi(Q)^T [G | dd] (phase 2).
template <bool EXACT_A, bool EXACT_B>
__device__ __forceinline__ void acc_at_b(float acc[2][5][4], const float *sa, const float *sb) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int ks = 0; ks < 2; ks++) {
        const int v0 = 8 * ks + t;
        unsigned ab[2][4], as[2][4];
#pragma unroll
        for (int m = 0; m < 2; m++) {  // A^T[a][voxel] = A[voxel][a]
            split_tf32<EXACT_A>(sa[v0 * KS + g + 16 * m], ab[m][0], as[m][0]);
            split_tf32<EXACT_A>(sa[v0 * KS + g + 8 + 16 * m], ab[m][1], as[m][1]);
            split_tf32<EXACT_A>(sa[(v0 + 4) * KS + g + 16 * m], ab[m][2], as[m][2]);
            split_tf32<EXACT_A>(sa[(v0 + 4) * KS + g + 8 + 16 * m], ab[m][3], as[m][3]);
        }
#pragma unroll
        for (int j = 0; j < 5; j++) {
            unsigned bb[2], bs[2];
            split_tf32<EXACT_B>(sb[v0 * KS + g + 8 * j], bb[0], bs[0]);
            split_tf32<EXACT_B>(sb[(v0 + 4) * KS + g + 8 * j], bb[1], bs[1]);
#pragma unroll
            for (int m = 0; m < 2; m++) mma_3x<EXACT_A, EXACT_B>(acc[m][j], ab[m], as[m], bb, bs);
        }
    }
}

// c[j] = A X for a staged chunk A (16 x 32, `sa`) and a 32-row state tile
// X, over the first J column tiles of 8: with TRANS, X^T (c[r][a] =
// sum_c A[r][c] X[a][c]); otherwise X (c[r][col] = sum_a A[r][a] X[a][col]).
template <int J, bool TRANS, bool EXACT_A>
__device__ __forceinline__ void a_times_state(float c[J][4], const float *sa, const float *x) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < J; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) c[j][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        unsigned ab[4], as[4];
        split_tf32<EXACT_A>(sa[g * KS + t + 8 * kk], ab[0], as[0]);
        split_tf32<EXACT_A>(sa[(g + 8) * KS + t + 8 * kk], ab[1], as[1]);
        split_tf32<EXACT_A>(sa[g * KS + t + 4 + 8 * kk], ab[2], as[2]);
        split_tf32<EXACT_A>(sa[(g + 8) * KS + t + 4 + 8 * kk], ab[3], as[3]);
#pragma unroll
        for (int j = 0; j < J; j++) {
            unsigned bb[2], bs[2];
            if (TRANS) {  // B[k][n] = X[n][k]
                split_tf32<false>(x[(g + 8 * j) * KS + t + 8 * kk], bb[0], bs[0]);
                split_tf32<false>(x[(g + 8 * j) * KS + t + 4 + 8 * kk], bb[1], bs[1]);
            } else {
                split_tf32<false>(x[(t + 8 * kk) * KS + g + 8 * j], bb[0], bs[0]);
                split_tf32<false>(x[(t + 4 + 8 * kk) * KS + g + 8 * j], bb[1], bs[1]);
            }
            mma_3x<EXACT_A, false>(c[j], ab, as, bb, bs);
        }
    }
}

// Stages loaded rows (load_rows<4>) into a tile of 16 rows of KS, with
// relu when RELU.
template <bool RELU>
__device__ __forceinline__ void stage16(float *tile, const float4 x[4]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int p = 0; p < 4; p++)
        *reinterpret_cast<float4 *>(tile + (4 * p + (lane >> 3)) * KS + 4 * (lane & 7)) =
            RELU ? relu4(x[p]) : x[p];
}

// Streams the warp's chunks of 16 rows of a window (chunks first, first +
// step, ...) through its stage: rows of `x` into `sa` with relu, rows of `y`
// into `sb`; the next chunk's rows load while `body(c)` works on chunk c.
template <typename T, typename Body>
__device__ __forceinline__ void for_chunks(const T *x, const T *y, long long start, int n,
                                           int heads, int h, int first, int step, float *sa,
                                           float *sb, Body body) {
    float4 xa[4], xb[4];
    load_rows<4>(x, start, n, heads, h, 16 * first, xa);
    load_rows<4>(y, start, n, heads, h, 16 * first, xb);
    for (int c = first; 16 * c < n; c += step) {
        stage16<true>(sa, xa);
        stage16<false>(sb, xb);
        __syncwarp();
        load_rows<4>(x, start, n, heads, h, 16 * (c + step), xa);
        load_rows<4>(y, start, n, heads, h, 16 * (c + step), xb);
        body(c);
        __syncwarp();
    }
}

template <typename T>
__device__ void sla_bwd_mma(const T *q, const T *k, const T *v, const T *dout, T *dq, T *dk,
                            T *dv, const unsigned *offsets, const unsigned *counts,
                            const int *big, int n_big, const int *small, int heads) {
    constexpr bool EXACT = sizeof(T) == 2;  // bf16 inputs are TF32 values
    extern __shared__ __align__(16) float bwd_smem[];
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    int item, h;
    block_item<T>(heads, item, h);
    float *sa = bwd_smem + w * BWD_WARP_FLOATS, *sb = sa + 16 * KS, *tile = sb + 16 * KS;
    int win, first, step;
    if (!work_item(big, n_big, small, item, w, win, first, step)) return;
    const bool shared_window = step == WARPS;
    const long long start = offsets[win];
    const int n = counts[win];

    // Phase 1: [KV | s] = phi(K)^T [V | 1].
    for (int r = lane >> 3; r < 16; r += 4) sb[r * KS + 32 + (lane & 7)] = (lane & 7) == 0;
    float acc[2][5][4];
    zero_acc(acc);
    for_chunks(k, v, start, n, heads, h, first, step, sa, sb,
               [=, &acc](int) { acc_at_b<EXACT, EXACT>(acc, sa, sb); });
    store_state<5>(tile, acc);
    const float *kv = tile;
    if (shared_window) kv = sum_warp_tiles(bwd_smem);
    else __syncwarp();

    // Phase 2: dq, and [dKV | ds] in acc.
    zero_acc(acc);
    for_chunks(q, dout, start, n, heads, h, first, step, sa, sb, [=, &acc](int c) {
        float o[5][4];
        a_times_state<5, false, EXACT>(o, sa, kv);
        // Column 32 is the normaliser (lane 4g holds it for rows g, g + 8).
        // Reciprocals once, then products (as in the forward).
        const float inv0 = 1.f / (__shfl_sync(FULL, o[4][0], lane & ~3) + EPS);
        const float inv1 = 1.f / (__shfl_sync(FULL, o[4][2], lane & ~3) + EPS);
        float gr[4][4], p0 = 0.f, p1 = 0.f;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int col = 8 * j + 2 * t;
            gr[j][0] = sb[g * KS + col] * inv0;
            gr[j][1] = sb[g * KS + col + 1] * inv0;
            gr[j][2] = sb[(g + 8) * KS + col] * inv1;
            gr[j][3] = sb[(g + 8) * KS + col + 1] * inv1;
            p0 = fmaf(gr[j][0], o[j][0], fmaf(gr[j][1], o[j][1], p0));
            p1 = fmaf(gr[j][2], o[j][2], fmaf(gr[j][3], o[j][3], p1));
        }
        p0 += __shfl_xor_sync(FULL, p0, 1);
        p0 += __shfl_xor_sync(FULL, p0, 2);
        p1 += __shfl_xor_sync(FULL, p1, 1);
        p1 += __shfl_xor_sync(FULL, p1, 2);
        const float dd0 = -p0 * inv0, dd1 = -p1 * inv1;
        __syncwarp();  // every lane has read dout: [G | dd] replaces it
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int col = 8 * j + 2 * t;
            sb[g * KS + col] = gr[j][0];
            sb[g * KS + col + 1] = gr[j][1];
            sb[(g + 8) * KS + col] = gr[j][2];
            sb[(g + 8) * KS + col + 1] = gr[j][3];
        }
        if (t == 0) {
            sb[g * KS + 32] = dd0;
            sb[(g + 8) * KS + 32] = dd1;
        }
        __syncwarp();
        float d[4][4];
        a_times_state<4, true, false>(d, sb, kv);  // G KV^T
        const int r0 = 16 * c + g, r1 = r0 + 8;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int a = 8 * j + 2 * t;
            const float s0 = kv[a * KS + 32], s1 = kv[(a + 1) * KS + 32];
            const float x0 = sa[g * KS + a] > 0.f ? fmaf(dd0, s0, d[j][0]) : 0.f;
            const float x1 = sa[g * KS + a + 1] > 0.f ? fmaf(dd0, s1, d[j][1]) : 0.f;
            const float x2 = sa[(g + 8) * KS + a] > 0.f ? fmaf(dd1, s0, d[j][2]) : 0.f;
            const float x3 = sa[(g + 8) * KS + a + 1] > 0.f ? fmaf(dd1, s1, d[j][3]) : 0.f;
            if (r0 < n) st2(dq, at(start + r0, heads, h, a), x0, x1);
            if (r1 < n) st2(dq, at(start + r1, heads, h, a), x2, x3);
        }
        acc_at_b<EXACT, false>(acc, sa, sb);
    });

    // Phase 3: dk and dv from [dKV | ds].
    if (shared_window) __syncthreads();  // every warp is done with warp 0's [KV | s]
    store_state<5>(tile, acc);
    const float *dkv = tile;
    if (shared_window) dkv = sum_warp_tiles(bwd_smem);
    else __syncwarp();
    for_chunks(k, v, start, n, heads, h, first, step, sa, sb, [=](int c) {
        float dkk[4][4], dvv[4][4];
        a_times_state<4, true, EXACT>(dkk, sb, dkv);   // V dKV^T
        a_times_state<4, false, EXACT>(dvv, sa, dkv);  // phi(K) dKV
        const int r0 = 16 * c + g, r1 = r0 + 8;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int a = 8 * j + 2 * t;
            const float s0 = dkv[a * KS + 32], s1 = dkv[(a + 1) * KS + 32];
            const float x0 = sa[g * KS + a] > 0.f ? dkk[j][0] + s0 : 0.f;
            const float x1 = sa[g * KS + a + 1] > 0.f ? dkk[j][1] + s1 : 0.f;
            const float x2 = sa[(g + 8) * KS + a] > 0.f ? dkk[j][2] + s0 : 0.f;
            const float x3 = sa[(g + 8) * KS + a + 1] > 0.f ? dkk[j][3] + s1 : 0.f;
            if (r0 < n) {
                st2(dk, at(start + r0, heads, h, a), x0, x1);
                st2(dv, at(start + r0, heads, h, a), dvv[j][0], dvv[j][1]);
            }
            if (r1 < n) {
                st2(dk, at(start + r1, heads, h, a), x2, x3);
                st2(dv, at(start + r1, heads, h, a), dvv[j][2], dvv[j][3]);
            }
        }
    });
}

// ---- Sort-and-pad baselines ------------------------------------------------
// Rows move between the voxel layout and the padded layout through a row map
// built once per layout (pad_row[i] = padded row of voxel i); pad rows are
// zero (memset before the gather), which also masks them out of linear
// attention since relu(0) = 0.

template <typename T>
__device__ void gather_rows(const T *src, T *dst, const unsigned *pad_row, long long n_rows,
                            int row_len) {
    long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n_rows * row_len) return;
    long long i = e / row_len;
    int c = (int)(e - i * row_len);
    dst[(long long)pad_row[i] * row_len + c] = src[e];
}

template <typename T>
__device__ void scatter_rows(const T *src, T *dst, const unsigned *pad_row, long long n_rows,
                             int row_len) {
    long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n_rows * row_len) return;
    long long i = e / row_len;
    int c = (int)(e - i * row_len);
    dst[e] = src[(long long)pad_row[i] * row_len + c];
}

// Softmax attention inside each padded window (the approach ScatterFormer
// replaces): one thread per query row, keys streamed with an online softmax
// (flash-attention style), pad keys masked by the window's real count. A
// tile is 32 queries of one padded window; blocks hold 4 tiles.
#define TILE 32
template <typename T>
__device__ void softmax_fwd(const T *q, const T *k, const T *v, T *out, float *lse,
                            const unsigned *tile_win, const unsigned *tile_q0,
                            const unsigned *pbase, const unsigned *plen, const unsigned *count,
                            int n_tiles, int heads, float scale) {
    const int tile = blockIdx.x * 4 + (threadIdx.x >> 5);
    if (tile >= n_tiles) return;
    const int h = blockIdx.y, lane = threadIdx.x & 31;
    const unsigned win = tile_win[tile];
    const long long base = pbase[win];
    const int qi = tile_q0[tile] + lane;
    if (qi >= (int)plen[win]) return;
    const int n = count[win];
    float qr[D], acc[D];
    const long long qrow = ((base + qi) * heads + h) * D;
#pragma unroll
    for (int c = 0; c < D; c++) {
        qr[c] = ld(q, qrow + c) * scale;
        acc[c] = 0.f;
    }
    float m = -__int_as_float(0x7f800000), l = 0.f; // -inf (NVRTC has no math.h)
    for (int j = 0; j < n; j++) {
        const long long krow = ((base + j) * heads + h) * D;
        float sc = 0.f;
#pragma unroll
        for (int c = 0; c < D; c++) sc = fmaf(qr[c], ld(k, krow + c), sc);
        float mn = fmaxf(m, sc);
        float corr = __expf(m - mn), p = __expf(sc - mn);
        l = l * corr + p;
#pragma unroll
        for (int c = 0; c < D; c++) acc[c] = fmaf(p, ld(v, krow + c), acc[c] * corr);
        m = mn;
    }
    const float inv = 1.f / l;
#pragma unroll
    for (int c = 0; c < D; c++) st(out, qrow + c, acc[c] * inv);
    lse[(base + qi) * heads + h] = m + __logf(l);
}

// dq (thread per query) and delta_i = dout_i . out_i.
template <typename T>
__device__ void softmax_bwd_dq(const T *q, const T *k, const T *v, const T *out,
                               const T *dout, const float *lse, float *delta, T *dq,
                               const unsigned *tile_win, const unsigned *tile_q0,
                               const unsigned *pbase, const unsigned *plen,
                               const unsigned *count, int n_tiles, int heads, float scale) {
    const int tile = blockIdx.x * 4 + (threadIdx.x >> 5);
    if (tile >= n_tiles) return;
    const int h = blockIdx.y, lane = threadIdx.x & 31;
    const unsigned win = tile_win[tile];
    const long long base = pbase[win];
    const int qi = tile_q0[tile] + lane;
    const int n = count[win];
    if (qi >= n) return; // pad queries have no gradient to give
    const long long qrow = ((base + qi) * heads + h) * D;
    float qr[D], dor[D], acc[D];
    float dl = 0.f;
#pragma unroll
    for (int c = 0; c < D; c++) {
        qr[c] = ld(q, qrow + c);
        dor[c] = ld(dout, qrow + c);
        dl = fmaf(dor[c], ld(out, qrow + c), dl);
        acc[c] = 0.f;
    }
    const float ls = lse[(base + qi) * heads + h];
    delta[(base + qi) * heads + h] = dl;
    for (int j = 0; j < n; j++) {
        const long long krow = ((base + j) * heads + h) * D;
        float sc = 0.f, dp = 0.f;
#pragma unroll
        for (int c = 0; c < D; c++) {
            sc = fmaf(qr[c], ld(k, krow + c), sc);
            dp = fmaf(dor[c], ld(v, krow + c), dp);
        }
        float p = __expf(sc * scale - ls);
        float dsc = p * (dp - dl) * scale;
#pragma unroll
        for (int c = 0; c < D; c++) acc[c] = fmaf(dsc, ld(k, krow + c), acc[c]);
    }
#pragma unroll
    for (int c = 0; c < D; c++) st(dq, qrow + c, acc[c]);
}

// dk, dv (thread per key); needs lse and delta of every real query.
template <typename T>
__device__ void softmax_bwd_dkv(const T *q, const T *k, const T *v, const T *dout,
                                const float *lse, const float *delta, T *dk, T *dv,
                                const unsigned *tile_win, const unsigned *tile_q0,
                                const unsigned *pbase, const unsigned *plen,
                                const unsigned *count, int n_tiles, int heads, float scale) {
    const int tile = blockIdx.x * 4 + (threadIdx.x >> 5);
    if (tile >= n_tiles) return;
    const int h = blockIdx.y, lane = threadIdx.x & 31;
    const unsigned win = tile_win[tile];
    const long long base = pbase[win];
    const int kj = tile_q0[tile] + lane;
    const int n = count[win];
    if (kj >= n) return;
    const long long krow = ((base + kj) * heads + h) * D;
    float kr[D], vr[D], gk[D], gv[D];
#pragma unroll
    for (int c = 0; c < D; c++) {
        kr[c] = ld(k, krow + c);
        vr[c] = ld(v, krow + c);
        gk[c] = 0.f;
        gv[c] = 0.f;
    }
    for (int i = 0; i < n; i++) {
        const long long qrow = ((base + i) * heads + h) * D;
        float sc = 0.f, dp = 0.f;
#pragma unroll
        for (int c = 0; c < D; c++) {
            sc = fmaf(ld(q, qrow + c), kr[c], sc);
            dp = fmaf(ld(dout, qrow + c), vr[c], dp);
        }
        const long long r = (base + i) * heads + h;
        float p = __expf(sc * scale - lse[r]);
        float dsc = p * (dp - delta[r]) * scale;
#pragma unroll
        for (int c = 0; c < D; c++) {
            gv[c] = fmaf(p, ld(dout, qrow + c), gv[c]);
            gk[c] = fmaf(dsc, ld(q, qrow + c), gk[c]);
        }
    }
#pragma unroll
    for (int c = 0; c < D; c++) {
        st(dk, krow + c, gk[c]);
        st(dv, krow + c, gv[c]);
    }
}

// A deliberately broken forward pass for the test that a wrong kernel fails:
// it drops the last voxel of every window from the state.
template <typename T>
__device__ void sla_fwd_broken(const T *q, const T *k, const T *v, T *out,
                               const unsigned *offsets, const unsigned *counts, int n_windows,
                               int heads) {
    const int win = blockIdx.x * WARPS + (threadIdx.x >> 5);
    if (win >= n_windows) return;
    const int h = blockIdx.y, lane = threadIdx.x & 31;
    float kv[D];
#pragma unroll
    for (int a = 0; a < D; a++) kv[a] = 0.f;
    float s = 0.f;
    const long long start = offsets[win];
    const int n = counts[win];
    __shared__ __align__(16) float stage_all[WARPS][UNROLL * D];
    accumulate_state<UNROLL, false>(k, v, start, n - 1, heads, h, 0, 1, kv, s,
                                    stage_all[threadIdx.x >> 5]);
    for (int i = 0; i < n; i++) {
        long long idx = at(start + i, heads, h, lane);
        float qi = fmaxf(ld(q, idx), 0.f);
        float num = 0.f;
#pragma unroll
        for (int a = 0; a < D; a++) num = fmaf(__shfl_sync(FULL, qi, a), kv[a], num);
        st(out, idx, num / (warp_sum(qi * s) + EPS));
    }
}

// The tensor-core forward of each storage type: TF32 with split operands
// for f32, bf16 mma for bf16.
template <typename T, bool GROUPED, bool CLUSTERED = false>
__device__ __forceinline__ void sla_fwd_tc(const T *q, const T *k, const T *v, T *out,
                                           const unsigned *offsets, const unsigned *counts,
                                           const int *big, int n_big, const int *small,
                                           int heads) {
    if constexpr (sizeof(T) == 2)
        sla_fwd_bf16mma<GROUPED, CLUSTERED>(q, k, v, out, offsets, counts, big, n_big, small,
                                            heads);
    else
        sla_fwd_mma<T, GROUPED, CLUSTERED>(q, k, v, out, offsets, counts, big, n_big, small,
                                           heads);
}

#define INSTANTIATE(SUFFIX, T)                                                               \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                 \
        sla_fwd_ffma_##SUFFIX(const T *q, const T *k, const T *v, T *out, const unsigned *offsets, \
                         const unsigned *counts, const int *big, int n_big, const int *small, \
                         int heads) {                                                        \
        sla_fwd<T>(q, k, v, out, offsets, counts, big, n_big, small, heads);                 \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 3)                               \
        sla_fwd_##SUFFIX(const T *q, const T *k, const T *v, T *out, const unsigned *offsets, \
                         const unsigned *counts, const int *big, int n_big, const int *small, \
                         int heads) {                                                        \
        sla_fwd_tc<T, false>(q, k, v, out, offsets, counts, big, n_big, small, heads);       \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 3)                               \
        sla_fwd_grouped_##SUFFIX(const T *q, const T *k, const T *v, T *out,                 \
                                 const unsigned *offsets, const unsigned *counts,            \
                                 const int *big, int n_big, const int *small, int heads) {   \
        sla_fwd_tc<T, true>(q, k, v, out, offsets, counts, big, n_big, small, heads);        \
    }                                                                                        \
    extern "C" __global__ void __cluster_dims__(CLUSTER, 1, 1) __launch_bounds__(WARPS * 32, 3) \
        sla_fwd_cluster_##SUFFIX(const T *q, const T *k, const T *v, T *out,                 \
                                 const unsigned *offsets, const unsigned *counts,            \
                                 const int *big, int n_big, const int *small, int heads) {   \
        sla_fwd_tc<T, true, true>(q, k, v, out, offsets, counts, big, n_big, small, heads);  \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 2)                              \
        sla_bwd_##SUFFIX(const T *q, const T *k, const T *v, const T *dout, T *dq, T *dk,    \
                         T *dv, const unsigned *offsets, const unsigned *counts,              \
                         const int *big, int n_big, const int *small, int heads) {           \
        sla_bwd<T>(q, k, v, dout, dq, dk, dv, offsets, counts, big, n_big, small, heads);    \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 2)                              \
        sla_bwd_mma_##SUFFIX(const T *q, const T *k, const T *v, const T *dout, T *dq,       \
                             T *dk, T *dv, const unsigned *offsets, const unsigned *counts,   \
                             const int *big, int n_big, const int *small, int heads) {       \
        sla_bwd_mma<T>(q, k, v, dout, dq, dk, dv, offsets, counts, big, n_big, small, heads); \
    }                                                                                        \
    extern "C" __global__ void sla_fwd_broken_##SUFFIX(const T *q, const T *k, const T *v,   \
                                                       T *out, const unsigned *offsets,      \
                                                       const unsigned *counts, int n_windows, \
                                                       int heads) {                          \
        sla_fwd_broken<T>(q, k, v, out, offsets, counts, n_windows, heads);                  \
    }                                                                                        \
    extern "C" __global__ void gather_rows_##SUFFIX(const T *src, T *dst,                    \
                                                    const unsigned *pad_row,                 \
                                                    long long n_rows, int row_len) {         \
        gather_rows<T>(src, dst, pad_row, n_rows, row_len);                                  \
    }                                                                                        \
    extern "C" __global__ void scatter_rows_##SUFFIX(const T *src, T *dst,                   \
                                                     const unsigned *pad_row,                \
                                                     long long n_rows, int row_len) {        \
        scatter_rows<T>(src, dst, pad_row, n_rows, row_len);                                 \
    }                                                                                        \
    extern "C" __global__ void softmax_fwd_##SUFFIX(                                         \
        const T *q, const T *k, const T *v, T *out, float *lse, const unsigned *tile_win,    \
        const unsigned *tile_q0, const unsigned *pbase, const unsigned *plen,                \
        const unsigned *count, int n_tiles, int heads, float scale) {                        \
        softmax_fwd<T>(q, k, v, out, lse, tile_win, tile_q0, pbase, plen, count, n_tiles,    \
                       heads, scale);                                                        \
    }                                                                                        \
    extern "C" __global__ void softmax_bwd_dq_##SUFFIX(                                      \
        const T *q, const T *k, const T *v, const T *out, const T *dout, const float *lse,   \
        float *delta, T *dq, const unsigned *tile_win, const unsigned *tile_q0,              \
        const unsigned *pbase, const unsigned *plen, const unsigned *count, int n_tiles,     \
        int heads, float scale) {                                                            \
        softmax_bwd_dq<T>(q, k, v, out, dout, lse, delta, dq, tile_win, tile_q0, pbase,      \
                          plen, count, n_tiles, heads, scale);                               \
    }                                                                                        \
    extern "C" __global__ void softmax_bwd_dkv_##SUFFIX(                                     \
        const T *q, const T *k, const T *v, const T *dout, const float *lse,                 \
        const float *delta, T *dk, T *dv, const unsigned *tile_win, const unsigned *tile_q0, \
        const unsigned *pbase, const unsigned *plen, const unsigned *count, int n_tiles,     \
        int heads, float scale) {                                                            \
        softmax_bwd_dkv<T>(q, k, v, dout, lse, delta, dk, dv, tile_win, tile_q0, pbase,      \
                           plen, count, n_tiles, heads, scale);                              \
    }

INSTANTIATE(f32, float)
INSTANTIATE(bf16, unsigned short)
