// Decode-attention step kernels of `long-context` (see cuda.rs and
// kernel.rs), compiled at run time with NVRTC for compute_90.
//
// Shapes are fixed at compile time: head dimension D = 128, G = 4 query
// heads per KV head (Llama-3-8B: 32 query heads over 8 KV heads). The cache
// is bf16 (carried as unsigned short), arithmetic is f32, the output f32.
// Layouts: q [HQ][D]; k, v [HKV][rows][D]; bias [HKV][rows]; Quest
// metadata [HKV][pages][2][D] (channel-wise min, then max, of each page's
// keys); out [HQ][D].
//
// attn_*: split-K decode attention (flash-decoding). Block (s, h) reads
// split s of KV head h's selected rows once, for all G query heads of the
// group, and keeps a running (max, sum, acc) per query head. A split is a
// span of "logical" rows: the selection's rows in order, which is one range
// (dense, cluster), two ranges (sinks + window) or a list of 16-row pages
// (block-topk). The last block of a head to finish (a ticket counter)
// combines the partials of all splits, so a step is one launch.
//
// quest_score + topk_select: Quest's page scores over the metadata, and an
// exact top-k per KV head: a radix select on the scores' order-preserving
// bit patterns (11 + 11 + 10 bits; the first histogram is built by the
// scoring kernel), then compaction of the selected page ids in ascending
// order, ties to the lower page index.

#define D 128
#define G 4
#define PAGE 16
#define FULL 0xffffffffu
#define LOG2E 1.4426950408889634f
#define NEG_INF __int_as_float(0xff800000)

// Attention: 4 warps; a half-warp owns one row at a time (16 lanes x 16
// bytes = one 256-byte row); a tile is 32 rows, 4 per half-warp. Tiles
// stream into shared memory through a STAGES-deep cp.async pipeline, so
// that a block always has STAGES - 1 tiles (48 KiB) in flight while it
// computes one. A paged split spans at most MAX_SPAN_PAGES pages.
#define ATT_THREADS 128
#define HALVES 8
#define TILE 32
#define RPH (TILE / HALVES)
#define STAGES 4
#define MAX_SPLITS 256
#define MAX_SPAN_PAGES 1024

// Quest.
#define SC_THREADS 256
#define SC_UNROLL 4
#define SEL_THREADS 1024
#define HIST1 2048

typedef unsigned short bf16;

__device__ __forceinline__ void unpack8(const uint4 u, float f[8]) {
    f[0] = __uint_as_float(u.x << 16);
    f[1] = __uint_as_float(u.x & 0xffff0000u);
    f[2] = __uint_as_float(u.y << 16);
    f[3] = __uint_as_float(u.y & 0xffff0000u);
    f[4] = __uint_as_float(u.z << 16);
    f[5] = __uint_as_float(u.z & 0xffff0000u);
    f[6] = __uint_as_float(u.w << 16);
    f[7] = __uint_as_float(u.w & 0xffff0000u);
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(FULL, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL, x, o);
    return x;
}

// Sums four per-lane partial dot products (one per query head of the
// group) over a half-warp with 5 shuffles instead of 16: each step halves
// the heads a lane carries. Afterwards lane l of the half holds the total
// of head (l >> 2) & 3.
__device__ __forceinline__ float reduce4(const float a[4], int l) {
    const bool b3 = (l >> 3) & 1;
    const float s0 = b3 ? a[0] : a[2], s1 = b3 ? a[1] : a[3];
    const float k0 = b3 ? a[2] : a[0], k1 = b3 ? a[3] : a[1];
    const float c0 = k0 + __shfl_xor_sync(FULL, s0, 8);
    const float c1 = k1 + __shfl_xor_sync(FULL, s1, 8);
    const bool b2 = (l >> 2) & 1;
    float c = (b2 ? c1 : c0) + __shfl_xor_sync(FULL, b2 ? c0 : c1, 4);
    c += __shfl_xor_sync(FULL, c, 2);
    c += __shfl_xor_sync(FULL, c, 1);
    return c;
}

// cp.async (sm_80+): 16 or 4 bytes from global to shared memory without
// passing through registers; a source size of 0 writes zeros and reads
// nothing (rows past the end of a split).
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool ok) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void *smem, const void *gmem, bool ok) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(ok ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Dynamic shared memory of an attention block, in bytes, in this order:
// STAGES tiles of K then V rows, STAGES tiles of bias, the tile's scores,
// the rescale factors, the combine weights, and (paged) the split's page
// ids. The split-K reduction reuses the K/V stages once the loop is done.
#define KV_STAGE_BYTES (TILE * D * 2 * 2)
#define SMEM_KV (STAGES * KV_STAGE_BYTES)
#define SMEM_BIAS (STAGES * TILE * 4)
#define SMEM_SP (TILE * G * 4)
#define SMEM_ALPHA 16
#define SMEM_WGT (G * MAX_SPLITS * 4)
#define SMEM_BASE (SMEM_KV + SMEM_BIAS + SMEM_SP + SMEM_ALPHA + SMEM_WGT)
#define SMEM_PAGED (SMEM_BASE + MAX_SPAN_PAGES * 4)

// PAGED: logical row j is row (j % 16) of page pages[j / 16]. Otherwise
// rows [start0, start0 + len0) then [start1, ...).
template <bool PAGED, bool BIAS, bool DROP_LAST>
__device__ __forceinline__ void attn_body(
    const bf16 *__restrict__ q, const bf16 *__restrict__ kc, const bf16 *__restrict__ vc,
    const float *__restrict__ bias, const int *__restrict__ pages, int n_sel, long long rows,
    int start0, int len0, int start1, int total, int span, float scale_log2,
    float *__restrict__ part_o, float2 *__restrict__ part_ml, unsigned *__restrict__ counters,
    float *__restrict__ out) {
    extern __shared__ __align__(16) unsigned char smem[];
    uint4 *kv_s = reinterpret_cast<uint4 *>(smem);  // [STAGES][2][TILE][D / 8]
    float *bias_s = reinterpret_cast<float *>(smem + SMEM_KV);  // [STAGES][TILE]
    float(*sp)[G] = reinterpret_cast<float(*)[G]>(smem + SMEM_KV + SMEM_BIAS);  // [TILE][G]
    float *s_alpha = reinterpret_cast<float *>(smem + SMEM_KV + SMEM_BIAS + SMEM_SP);
    float(*wgt)[MAX_SPLITS] = reinterpret_cast<float(*)[MAX_SPLITS]>(smem + SMEM_KV + SMEM_BIAS + SMEM_SP + SMEM_ALPHA);
    int *s_pages = reinterpret_cast<int *>(smem + SMEM_BASE);
    float(*red)[G][D] = reinterpret_cast<float(*)[G][D]>(smem);  // [HALVES][G][D], after the loop
    __shared__ int is_last;

    const int h = blockIdx.y, s = blockIdx.x, splits = gridDim.x;
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5, hw = t >> 4, l = t & 15;
    const int begin = s * span, end = min(total, begin + span);
    const int n_tiles = (end - begin + TILE - 1) / TILE;

    const uint4 *K4 = reinterpret_cast<const uint4 *>(kc) + (long long)h * rows * (D / 8);
    const uint4 *V4 = reinterpret_cast<const uint4 *>(vc) + (long long)h * rows * (D / 8);
    const float *B = BIAS ? bias + (long long)h * rows : nullptr;
    const int page0 = begin >> 4;
    if (PAGED) {
        // The split's page ids, once, so that no copy waits on a lookup.
        const int *P = pages + (long long)h * n_sel;
        const int np = ((end - 1) >> 4) - page0 + 1;
        for (int i = t; i < np; i += ATT_THREADS) s_pages[i] = __ldg(P + page0 + i);
        __syncthreads();
    }
    auto phys = [&](int j) -> long long {
        if (PAGED) return (long long)s_pages[(j >> 4) - page0] * PAGE + (j & 15);
        return j < len0 ? start0 + j : start1 + (j - len0);
    };
    // Copies tile `tile` of the split into stage `st`: 8 16-byte chunks of
    // K and V rows per thread, and one bias per row.
    auto issue = [&](int tile, int st) {
        const int t0 = begin + tile * TILE;
        uint4 *ks = kv_s + st * 2 * TILE * (D / 8);
        uint4 *vs = ks + TILE * (D / 8);
#pragma unroll
        for (int i = 0; i < TILE * (D / 8) / ATT_THREADS; i++) {
            const int c = t + i * ATT_THREADS, r = c >> 4, col = c & 15, j = t0 + r;
            const bool ok = j < end;
            const long long row = ok ? phys(j) : 0;
            cp_async16(ks + c, K4 + row * (D / 8) + col, ok);
            cp_async16(vs + c, V4 + row * (D / 8) + col, ok);
        }
        if (BIAS && t < TILE) {
            const int j = t0 + t;
            const bool ok = j < end;
            cp_async4(bias_s + st * TILE + t, B + (ok ? phys(j) : 0), ok);
        }
    };

    // This lane's 8 channels of the group's 4 queries, scaled by
    // log2(e) / sqrt(D) so that exp2 gives the softmax weights.
    float qf[G][8];
#pragma unroll
    for (int g = 0; g < G; g++) {
        unpack8(reinterpret_cast<const uint4 *>(q + (h * G + g) * D)[l], qf[g]);
#pragma unroll
        for (int c = 0; c < 8; c++) qf[g][c] *= scale_log2;
    }
    float acc[G][8];
#pragma unroll
    for (int g = 0; g < G; g++)
#pragma unroll
        for (int c = 0; c < 8; c++) acc[g][c] = 0.f;
    // Running max and sum of head `warp`, kept by every lane of that warp.
    float m_run = NEG_INF, l_run = 0.f;

    // STAGES - 1 tiles in flight ahead of the one being computed; one
    // commit group per tile (empty ones past the end keep the count).
#pragma unroll
    for (int st = 0; st < STAGES - 1; st++) {
        if (st < n_tiles) issue(st, st);
        cp_async_commit();
    }
    for (int it = 0; it < n_tiles; it++) {
        cp_async_wait<STAGES - 2>();
        // Tile `it` has landed for every thread, and every thread is done
        // with tile it - 1, whose stage the next copy overwrites.
        __syncthreads();
        if (it + STAGES - 1 < n_tiles) issue(it + STAGES - 1, (it + STAGES - 1) % STAGES);
        cp_async_commit();
        const int st = it % STAGES, t0 = begin + it * TILE;
        const uint4 *ks = kv_s + st * 2 * TILE * (D / 8);
        const uint4 *vs = ks + TILE * (D / 8);
        // Scores (log2 units) of the tile's rows for the group's 4 heads.
#pragma unroll
        for (int i = 0; i < RPH; i++) {
            const int r = i * HALVES + hw;
            float kf[8], a[G];
            unpack8(ks[r * (D / 8) + l], kf);
#pragma unroll
            for (int g = 0; g < G; g++) {
                float x = 0.f;
#pragma unroll
                for (int c = 0; c < 8; c++) x = fmaf(qf[g][c], kf[c], x);
                a[g] = x;
            }
            const float sc = reduce4(a, l);
            if ((l & 3) == 0) {
                const float b = BIAS ? bias_s[st * TILE + r] * LOG2E : 0.f;
                sp[r][(l >> 2) & 3] = (t0 + r < end) ? sc + b : NEG_INF;
            }
        }
        __syncthreads();
        // Online softmax: warp w updates head w over the tile's 32 rows.
        {
            const float x = sp[lane][warp];
            const float m_new = fmaxf(m_run, warp_max(x));
            const float alpha = exp2f(m_run - m_new);  // 0 on the first tile
            const float p = exp2f(x - m_new);
            l_run = l_run * alpha + warp_sum(p);
            m_run = m_new;
            sp[lane][warp] = p;
            if (lane == 0) s_alpha[warp] = alpha;
        }
        __syncthreads();
        // acc = alpha acc + sum_r p_r v_r.
        {
            float al[G];
#pragma unroll
            for (int g = 0; g < G; g++) al[g] = s_alpha[g];
#pragma unroll
            for (int g = 0; g < G; g++)
#pragma unroll
                for (int c = 0; c < 8; c++) acc[g][c] *= al[g];
#pragma unroll
            for (int i = 0; i < RPH; i++) {
                const int r = i * HALVES + hw;
                const float4 p = *reinterpret_cast<const float4 *>(sp[r]);
                float vf[8];
                unpack8(vs[r * (D / 8) + l], vf);
#pragma unroll
                for (int c = 0; c < 8; c++) {
                    acc[0][c] = fmaf(p.x, vf[c], acc[0][c]);
                    acc[1][c] = fmaf(p.y, vf[c], acc[1][c]);
                    acc[2][c] = fmaf(p.z, vf[c], acc[2][c]);
                    acc[3][c] = fmaf(p.w, vf[c], acc[3][c]);
                }
            }
        }
    }
    // Only empty groups can be pending; the stages become the reduction
    // buffer once every thread is past its last read of them.
    cp_async_wait<0>();
    __syncthreads();

    // Sum the 8 half-warps' accumulators; write this split's partial.
#pragma unroll
    for (int g = 0; g < G; g++) {
        float4 *dst = reinterpret_cast<float4 *>(&red[hw][g][8 * l]);
        dst[0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
        dst[1] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
    }
    __syncthreads();
    {
        const int g = warp, c4 = lane * 4;
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int x = 0; x < HALVES; x++) {
            const float4 r = *reinterpret_cast<const float4 *>(&red[x][g][c4]);
            o.x += r.x;
            o.y += r.y;
            o.z += r.z;
            o.w += r.w;
        }
        reinterpret_cast<float4 *>(part_o + (((long long)h * splits + s) * G + g) * D)[lane] = o;
        if (lane == 0) part_ml[((long long)h * splits + s) * G + g] = make_float2(m_run, l_run);
    }

    // The last block of head h to get here combines all splits.
    __threadfence();
    __syncthreads();
    if (t == 0) is_last = atomicAdd(&counters[h], 1u) == (unsigned)(splits - 1);
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    const int used = DROP_LAST ? splits - 1 : splits;
    {
        const int g = warp;
        float M = NEG_INF;
        for (int x = lane; x < used; x += 32) M = fmaxf(M, __ldcg(&part_ml[((long long)h * splits + x) * G + g]).x);
        M = warp_max(M);
        float L = 0.f;
        for (int x = lane; x < used; x += 32) {
            const float2 ml = __ldcg(&part_ml[((long long)h * splits + x) * G + g]);
            const float w = exp2f(ml.x - M);
            wgt[g][x] = w;
            L += w * ml.y;
        }
        L = warp_sum(L);
        for (int x = lane; x < used; x += 32) wgt[g][x] /= L;
    }
    __syncthreads();
    {
        const int g = warp;
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
        for (int x = 0; x < used; x++) {
            const float w = wgt[g][x];
            const float4 po =
                __ldcg(reinterpret_cast<const float4 *>(part_o + (((long long)h * splits + x) * G + g) * D) + lane);
            o.x = fmaf(w, po.x, o.x);
            o.y = fmaf(w, po.y, o.y);
            o.z = fmaf(w, po.z, o.z);
            o.w = fmaf(w, po.w, o.w);
        }
        reinterpret_cast<float4 *>(out + (h * G + g) * D)[lane] = o;
    }
    if (t == 0) counters[h] = 0;  // ready for the next launch
}

#define ATTN_ARGS                                                                                \
    const bf16 *__restrict__ q, const bf16 *__restrict__ kc, const bf16 *__restrict__ vc,        \
        const float *__restrict__ bias, const int *__restrict__ pages, int n_sel, long long rows, \
        int start0, int len0, int start1, int total, int span, float scale_log2,                 \
        float *__restrict__ part_o, float2 *__restrict__ part_ml, unsigned *__restrict__ counters, \
        float *__restrict__ out
#define ATTN_PASS                                                                           \
    q, kc, vc, bias, pages, n_sel, rows, start0, len0, start1, total, span, scale_log2, part_o, \
        part_ml, counters, out

extern "C" __global__ void __launch_bounds__(ATT_THREADS) attn_ranges(ATTN_ARGS) {
    attn_body<false, false, false>(ATTN_PASS);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attn_ranges_bias(ATTN_ARGS) {
    attn_body<false, true, false>(ATTN_PASS);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attn_pages(ATTN_ARGS) {
    attn_body<true, false, false>(ATTN_PASS);
}
// Deliberately wrong (tests only): the combine leaves out the last split.
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attn_ranges_drop_last(ATTN_ARGS) {
    attn_body<false, false, true>(ATTN_PASS);
}

// Order-preserving map of a float to an unsigned key: larger float,
// larger key. Adding +0 turns -0 into +0, so that the two zeros tie as they
// do in the host's comparison.
__device__ __forceinline__ unsigned order_key(float x) {
    const unsigned u = __float_as_uint(x + 0.f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Quest page scores of KV head blockIdx.y over pages
// [blockIdx.x * per_block, ...): one page per half-warp at a time. Writes
// each page's key and adds the top 11 bits of the keys to hist (the first
// pass of the radix select).
extern "C" __global__ void __launch_bounds__(SC_THREADS) quest_score(
    const bf16 *__restrict__ q, const bf16 *__restrict__ meta, int n_pages, int per_block,
    unsigned *__restrict__ keys, unsigned *__restrict__ hist) {
    __shared__ unsigned sh[HIST1];
    const int h = blockIdx.y, t = threadIdx.x, hw = t >> 4, l = t & 15;
    for (int b = t; b < HIST1; b += SC_THREADS) sh[b] = 0;
    float qf[G][8];
#pragma unroll
    for (int g = 0; g < G; g++) unpack8(reinterpret_cast<const uint4 *>(q + (h * G + g) * D)[l], qf[g]);
    __syncthreads();
    const uint4 *M4 = reinterpret_cast<const uint4 *>(meta) + (long long)h * n_pages * (2 * D / 8);
    const int p_begin = blockIdx.x * per_block, p_end = min(n_pages, p_begin + per_block);
    const int halves = SC_THREADS / 16;
    // The loop bounds are the same for the whole block: every lane reaches
    // the shuffles below.
    for (int base = p_begin; base < p_end; base += halves * SC_UNROLL) {
        uint4 lo[SC_UNROLL], hi[SC_UNROLL];
#pragma unroll
        for (int u = 0; u < SC_UNROLL; u++) {
            const int p = base + u * halves + hw;
            const bool ok = p < p_end;
            lo[u] = ok ? __ldg(M4 + (long long)p * (2 * D / 8) + l) : make_uint4(0, 0, 0, 0);
            hi[u] = ok ? __ldg(M4 + (long long)p * (2 * D / 8) + D / 8 + l) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < SC_UNROLL; u++) {
            const int p = base + u * halves + hw;
            float mn[8], mx[8];
            unpack8(lo[u], mn);
            unpack8(hi[u], mx);
            float x = 0.f;
#pragma unroll
            for (int g = 0; g < G; g++)
#pragma unroll
                for (int c = 0; c < 8; c++) x += fmaxf(qf[g][c] * mn[c], qf[g][c] * mx[c]);
            x += __shfl_xor_sync(FULL, x, 8);
            x += __shfl_xor_sync(FULL, x, 4);
            x += __shfl_xor_sync(FULL, x, 2);
            x += __shfl_xor_sync(FULL, x, 1);
            if (l == 0 && p < p_end) {
                const unsigned key = order_key(x);
                keys[(long long)h * n_pages + p] = key;
                atomicAdd(&sh[key >> 21], 1u);
            }
        }
    }
    __syncthreads();
    for (int b = t; b < HIST1; b += SC_THREADS)
        if (sh[b]) atomicAdd(&hist[h * HIST1 + b], sh[b]);
}

// Inclusive prefix sum over the block (1024 threads); `tmp` holds 32 words.
template <typename T>
__device__ __forceinline__ T block_scan(T x, T *tmp) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const T y = __shfl_up_sync(FULL, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) tmp[warp] = x;
    __syncthreads();
    if (warp == 0) {
        T w = tmp[lane];
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const T y = __shfl_up_sync(FULL, w, o);
            if (lane >= o) w += y;
        }
        tmp[lane] = w;
    }
    __syncthreads();
    if (warp > 0) x += tmp[warp - 1];
    __syncthreads();
    return x;
}

// The bin of `sh` (nbins = 1024 or 2048) holding the need-th largest key,
// counting from the top bin, and how many keys lie in higher bins.
__device__ __forceinline__ void find_bin(const unsigned *sh, int nbins, unsigned need, unsigned *tmp,
                                         unsigned *s_bin, unsigned *s_above) {
    const int per = nbins / SEL_THREADS, t = threadIdx.x;
    unsigned c = 0;
    for (int j = 0; j < per; j++) c += sh[nbins - 1 - (t * per + j)];
    const unsigned incl = block_scan<unsigned>(c, tmp);
    unsigned run = incl - c;
    if (run < need && incl >= need) {
        for (int j = 0; j < per; j++) {
            const int b = nbins - 1 - (t * per + j);
            if (run + sh[b] >= need) {
                *s_bin = b;
                *s_above = run;
                break;
            }
            run += sh[b];
        }
    }
    __syncthreads();
}

// Exact top-k pages of KV head blockIdx.x from its keys, written ascending
// to pages[h][0..k). Completes the radix select that quest_score began
// (and clears its histogram for the next step), then compacts.
extern "C" __global__ void __launch_bounds__(SEL_THREADS) topk_select(
    const unsigned *__restrict__ keys, unsigned *__restrict__ hist, int n_pages, int k,
    int *__restrict__ pages) {
    __shared__ unsigned sh[HIST1];
    __shared__ unsigned tmp[32];
    __shared__ unsigned long long tmp64[32];
    __shared__ unsigned s_bin, s_above;
    const int h = blockIdx.x, t = threadIdx.x;
    const unsigned *K = keys + (long long)h * n_pages;
    for (int b = t; b < HIST1; b += SEL_THREADS) {
        sh[b] = hist[h * HIST1 + b];
        hist[h * HIST1 + b] = 0;
    }
    __syncthreads();
    unsigned need = k;
    find_bin(sh, HIST1, need, tmp, &s_bin, &s_above);
    unsigned prefix = s_bin;  // key >> 21
    need -= s_above;
    // Pass 2: bits 20..10 of the keys under the prefix.
    for (int b = t; b < HIST1; b += SEL_THREADS) sh[b] = 0;
    __syncthreads();
    for (int p = t; p < n_pages; p += SEL_THREADS) {
        const unsigned key = K[p];
        if ((key >> 21) == prefix) atomicAdd(&sh[(key >> 10) & 2047], 1u);
    }
    __syncthreads();
    find_bin(sh, 2048, need, tmp, &s_bin, &s_above);
    prefix = (prefix << 11) | s_bin;  // key >> 10
    need -= s_above;
    // Pass 3: bits 9..0.
    for (int b = t; b < 1024; b += SEL_THREADS) sh[b] = 0;
    __syncthreads();
    for (int p = t; p < n_pages; p += SEL_THREADS) {
        const unsigned key = K[p];
        if ((key >> 10) == prefix) atomicAdd(&sh[key & 1023], 1u);
    }
    __syncthreads();
    find_bin(sh, 1024, need, tmp, &s_bin, &s_above);
    const unsigned T = (prefix << 10) | s_bin;  // the k-th largest key
    need -= s_above;                            // keys equal to T to take
    // Compaction: keys above T, and the first `need` keys equal to T.
    const int per = (n_pages + SEL_THREADS - 1) / SEL_THREADS;
    const int p0 = min(n_pages, t * per), p1 = min(n_pages, p0 + per);
    unsigned gt = 0, eq = 0;
    for (int p = p0; p < p1; p++) {
        const unsigned key = K[p];
        gt += key > T;
        eq += key == T;
    }
    const unsigned long long packed = (unsigned long long)gt | ((unsigned long long)eq << 32);
    const unsigned long long ex = block_scan<unsigned long long>(packed, tmp64) - packed;
    const unsigned gt_ex = (unsigned)ex, eq_ex = (unsigned)(ex >> 32);
    unsigned pos = gt_ex + min(eq_ex, need), eq_seen = eq_ex;
    int *out = pages + (long long)h * k;
    for (int p = p0; p < p1; p++) {
        const unsigned key = K[p];
        if (key > T) {
            out[pos++] = p;
        } else if (key == T) {
            if (eq_seen < need) out[pos++] = p;
            eq_seen++;
        }
    }
}
