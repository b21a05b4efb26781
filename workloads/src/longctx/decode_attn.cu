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
// group; its 4 warps each keep a running (max, sum, acc) per query head and
// merge them at the split's end. The rows are "logical": the selection's
// rows in order, which is one range (dense, cluster), two ranges (sinks +
// window) or a list of 16-row pages (block-topk). The last block of a head
// to finish (a ticket counter) combines the partials of all splits, so a
// step is one launch. The *_tma kernels (every range step, and
// block-topk's longer selections: cuda.rs says which) bring the tiles into
// shared memory with bulk copies instead of loading them into registers.
//
// quest_score + topk_select: Quest's page scores over the metadata, and an
// exact top-k per KV head: a radix select on the scores' order-preserving
// bit patterns (11 + 11 + 10 bits; the first histogram is built by the
// scoring kernel), then compaction of the selected page ids in ascending
// order, ties to the lower page index. topk_select first copies the keys
// of its head into shared memory when they fit (one round trip to L2
// instead of four passes over it).
// topk_select_cluster does the same on a thread block cluster of
// SEL_CLUSTER blocks per KV head, each with its share of the keys (cuda.rs
// says from which context on).
//
// Programmatic dependent launch: every kernel lets the next kernel on the
// stream be scheduled at once (griddepcontrol.launch_dependents) and waits
// for the previous one to finish, memory included (griddepcontrol.wait),
// before it reads anything that kernel may have written; so the launch and
// block set-up of a kernel overlap the previous one. Within a block-topk
// step the top-k and attention launches are dependent launches; with
// chaining (cuda.rs) so is the first kernel of every step, on the step of
// the layer before. Both are no-ops under an ordinary launch. Chained long
// range steps start their first tiles before they wait (attn_body's
// EARLY), since the cache rows those hold are not the kernel before's.

#define D 128
#define G 4
#define PAGE 16
#define FULL 0xffffffffu
#define LOG2E 1.4426950408889634f
#define NEG_INF __int_as_float(0xff800000)

// Attention: blocks of 4 warps that work independently. A tile is 32
// rows; warp w takes rows 8w .. 8w + 7 of every tile of its block's split,
// a half-warp one row at a time (16 lanes x 16 bytes = one 256-byte row),
// loads the next tile's rows into registers while it computes the current
// one, and keeps its own online softmax: no block-wide barrier until the
// split's end. A paged split spans at most MAX_SPAN_PAGES pages.
#define ATT_THREADS 128
#define ATT_WARPS 4
#define TILE 32
#define WROWS 8
#define RPL (WROWS / 2)
#define MAX_SPLITS 256
#define MAX_SPAN_PAGES 1024

// Quest.
#define SC_THREADS 256
#define SC_UNROLL 4
#define SEL_THREADS 1024
#define HIST1 2048

typedef unsigned short bf16;

__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

// Bulk copies (TMA, cp.async.bulk) from global to shared memory, completed
// on an mbarrier that counts their bytes.
__device__ __forceinline__ unsigned smem_addr(const void *p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(unsigned long long *b) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(b)) : "memory");
}
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
__device__ __forceinline__ void mbar_expect_tx(unsigned long long *b, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_g2s(void *dst, const void *src, unsigned bytes, unsigned long long *b) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     smem_addr(dst)),
                 "l"(src), "r"(bytes), "r"(smem_addr(b))
                 : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long *b, unsigned parity) {
    asm volatile(
        "{\n .reg .pred done;\n WAIT:\n mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n @!done bra WAIT;\n}" ::"r"(
            smem_addr(b)),
        "r"(parity)
        : "memory");
}
// An L2 prefetch of `bytes` (a multiple of 16) from a 16-byte-aligned
// global address (a hint: it changes no result).
__device__ __forceinline__ void prefetch_l2(const void *p, unsigned bytes) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
}
// Shared memory written by bulk copies after generic reads of it.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

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

// Calls f(offset in the tile, first cache row, bytes of K or of V) for each
// run of contiguous cache rows among the n logical rows from t0 of a range
// step (rows [0, len0) at start0, the rest at start1; head_row0 is the
// head's first row): one run, or two where they cross from the first range
// to the second.
template <typename F>
__device__ __forceinline__ void tile_runs(int t0, int n, long long head_row0, int start0, int len0, int start1,
                                          const F &f) {
    for (int done = 0; done < n;) {
        const int j = t0 + done;
        const int piece = j < len0 ? min(n - done, len0 - j) : n - done;
        f(done, head_row0 + (j < len0 ? start0 + j : start1 + (j - len0)), (unsigned)(piece * D * sizeof(bf16)));
        done += piece;
    }
}

// PAGED: logical row j is row (j % 16) of page pages[j / 16]. Otherwise
// rows [start0, start0 + len0) then [start1, ...).
//
// Which tiles a split reads: with `interleave`, split s of S reads tiles
// s, s + S, s + 2S, ... of the whole selection, so that the blocks of a
// head sweep its rows together from front to back, as a copy does;
// otherwise split s reads the contiguous rows [s * span, (s + 1) * span).
// DEPTH: tiles in flight per block with bulk copies (TMA), 2 otherwise.
// PREFETCH: before waiting on the kernel before it, the block asks for its
// split's rows to be brought into L2 (range steps; what a dependent launch
// may do, since the history does not depend on that kernel).
template <bool PAGED, bool BIAS, bool DROP_LAST, int DEPTH, bool TMA = false, bool PREFETCH = false,
          bool EARLY = false>
__device__ __forceinline__ void attn_body(
    const bf16 *__restrict__ q, const bf16 *__restrict__ kc, const bf16 *__restrict__ vc,
    const float *__restrict__ bias, const int *__restrict__ pages, int n_sel, long long rows,
    int start0, int len0, int start1, int total, int span, int interleave, float scale_log2,
    float *__restrict__ part_o, float2 *__restrict__ part_ml, unsigned *__restrict__ counters,
    float *__restrict__ out) {
    __shared__ int s_pages[MAX_SPAN_PAGES];
    __shared__ __align__(16) float ps[ATT_WARPS][RPL][2][G];  // p per row and head, per warp
    __shared__ __align__(16) float red[ATT_WARPS][G][D];
    __shared__ float2 wml[ATT_WARPS][G];
    __shared__ float wgt[G][MAX_SPLITS];
    __shared__ int is_last;

    const int h = blockIdx.y, s = blockIdx.x, splits = gridDim.x;
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5, hf = lane >> 4, l = lane & 15;
    const int gq = (l >> 2) & 3;  // the head whose score reduce4 leaves in this lane
    const int begin = interleave ? 0 : s * span;
    const int end = interleave ? total : min(total, begin + span);
    const int n_tiles = interleave ? ((total + TILE - 1) / TILE - s + splits - 1) / splits
                                   : (end - begin + TILE - 1) / TILE;
    auto tile_row = [&](int it) { return interleave ? (s + it * splits) * TILE : begin + it * TILE; };
    // EARLY (range steps by bulk copies; cuda.rs picks the *_early kernels
    // for long splits): a split of more than 2 DEPTH tiles issues its first
    // DEPTH tiles before it waits on the kernel before it, and reads the
    // query after the wait. Those tiles precede the newest row, which is in
    // the split's last tile (the logical rows end with it), so in a decoder
    // no kernel before the step writes them.
    static_assert(!EARLY || (TMA && !PAGED && !PREFETCH), "early starts serve bulk-copy range steps");
    const bool early = EARLY && n_tiles > 2 * DEPTH;

    // Let the next kernel on the stream be scheduled now, and wait for the
    // previous one (its results, memory included) before reading anything:
    // the query, the page ids (topk_select) or, chained, anything the
    // previous step wrote. No-ops under an ordinary launch.
    pdl_trigger();
    if constexpr (PREFETCH) {
        static_assert(!PAGED && !BIAS, "prefetching serves range steps without a bias");
        // One thread per tile: its rows of K and of V, a request per run.
        for (int it = t; it < n_tiles; it += ATT_THREADS)
            tile_runs(tile_row(it), min(TILE, end - tile_row(it)), (long long)h * rows, start0, len0, start1,
                      [&](int, long long row, unsigned bytes) {
                          prefetch_l2(kc + row * D, bytes);
                          prefetch_l2(vc + row * D, bytes);
                      });
    }
    if (!early) pdl_wait();
    const uint4 *K4 = reinterpret_cast<const uint4 *>(kc) + (long long)h * rows * (D / 8);
    const uint4 *V4 = reinterpret_cast<const uint4 *>(vc) + (long long)h * rows * (D / 8);
    const float *B = BIAS ? bias + (long long)h * rows : nullptr;
    const int page0 = begin >> 4;
    if (PAGED) {
        // The split's page ids, once, so that no load waits on a lookup:
        // its pages in order (contiguous), or two per tile (interleaved: a
        // tile is 2 whole pages).
        const int *P = pages + (long long)h * n_sel;
        const int np = interleave ? 2 * n_tiles : ((end - 1) >> 4) - page0 + 1;
        for (int i = t; i < np; i += ATT_THREADS) {
            const int pg = interleave ? (tile_row(i >> 1) >> 4) + (i & 1) : page0 + i;
            s_pages[i] = pg < n_sel ? __ldg(P + pg) : 0;
        }
        __syncthreads();
    }
    // Row i of this lane's half-warp in tile it: tile row 8 warp + 2 i + hf,
    // so that a warp reads 2 adjacent rows (512 bytes) at a time.
    auto load = [&](int it, uint4 kk[RPL], uint4 vv[RPL], float bb[RPL]) {
        const int t0 = tile_row(it);
#pragma unroll
        for (int i = 0; i < RPL; i++) {
            const int r = WROWS * warp + 2 * i + hf, j = t0 + r;
            const bool ok = j < end;
            long long row = 0;
            if (ok) {
                if (PAGED) {
                    const int local = interleave ? 2 * it + (r >> 4) : (j >> 4) - page0;
                    row = (long long)s_pages[local] * PAGE + (j & 15);
                } else {
                    row = j < len0 ? start0 + j : start1 + (j - len0);
                }
            }
            kk[i] = ok ? __ldg(K4 + row * (D / 8) + l) : make_uint4(0, 0, 0, 0);
            vv[i] = ok ? __ldg(V4 + row * (D / 8) + l) : make_uint4(0, 0, 0, 0);
            bb[i] = !ok ? NEG_INF : BIAS ? __ldg(B + row) * LOG2E : 0.f;
        }
    };

    // This lane's 8 channels of the group's 4 queries, scaled by
    // log2(e) / sqrt(D) so that exp2 gives the softmax weights.
    float qf[G][8];
    auto load_q = [&]() {
#pragma unroll
        for (int g = 0; g < G; g++) {
            unpack8(reinterpret_cast<const uint4 *>(q + (h * G + g) * D)[l], qf[g]);
#pragma unroll
            for (int c = 0; c < 8; c++) qf[g][c] *= scale_log2;
        }
    };
    if (!early) load_q();
    float acc[G][8];
#pragma unroll
    for (int g = 0; g < G; g++)
#pragma unroll
        for (int c = 0; c < 8; c++) acc[g][c] = 0.f;
    // Running max and sum of head gq over this warp's rows (the same in
    // every lane of that head, in both halves).
    float m_run = NEG_INF, l_run = 0.f;

    // One tile: scores, the online softmax update, and the weighted sum of
    // its values into acc.
    auto step = [&](const uint4 kk[RPL], const uint4 vv[RPL], const float bb[RPL]) {
        // Scores (log2 units) of this lane's 4 rows for head gq; invalid
        // rows carry -inf in bb.
        float sc[RPL];
#pragma unroll
        for (int i = 0; i < RPL; i++) {
            float kf[8], a[G];
            unpack8(kk[i], kf);
#pragma unroll
            for (int g = 0; g < G; g++) {
                float x = 0.f;
#pragma unroll
                for (int c = 0; c < 8; c++) x = fmaf(qf[g][c], kf[c], x);
                a[g] = x;
            }
            sc[i] = reduce4(a, l) + bb[i];
        }
        float mx = fmaxf(fmaxf(sc[0], sc[1]), fmaxf(sc[2], sc[3]));
        mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, 16));
        const float m_new = fmaxf(m_run, mx);
        // A warp whose rows are all past the end keeps m = -inf.
        const bool none = m_new == NEG_INF;
        const float alpha = none ? 1.f : exp2f(m_run - m_new);
        float psum = 0.f;
#pragma unroll
        for (int i = 0; i < RPL; i++) {
            sc[i] = none ? 0.f : exp2f(sc[i] - m_new);
            psum += sc[i];
        }
        psum += __shfl_xor_sync(FULL, psum, 16);
        l_run = l_run * alpha + psum;
        m_run = m_new;
        // Every lane needs all 4 heads' p for its rows, and all 4 alphas.
        if ((l & 3) == 0) {
#pragma unroll
            for (int i = 0; i < RPL; i++) ps[warp][i][hf][gq] = sc[i];
        }
        float al[G];
#pragma unroll
        for (int g = 0; g < G; g++) al[g] = __shfl_sync(FULL, alpha, 4 * g);
        __syncwarp();
#pragma unroll
        for (int g = 0; g < G; g++)
#pragma unroll
            for (int c = 0; c < 8; c++) acc[g][c] *= al[g];
#pragma unroll
        for (int i = 0; i < RPL; i++) {
            const float4 p = *reinterpret_cast<const float4 *>(ps[warp][i][hf]);
            float vf[8];
            unpack8(vv[i], vf);
#pragma unroll
            for (int c = 0; c < 8; c++) {
                acc[0][c] = fmaf(p.x, vf[c], acc[0][c]);
                acc[1][c] = fmaf(p.y, vf[c], acc[1][c]);
                acc[2][c] = fmaf(p.z, vf[c], acc[2][c]);
                acc[3][c] = fmaf(p.w, vf[c], acc[3][c]);
            }
        }
        __syncwarp();  // ps is rewritten next tile
    };

    if constexpr (TMA) {
        // Bulk copies: thread 0 copies whole tiles of K and V (each a run of
        // contiguous rows, two where the tile crosses from the first range
        // to the second, or a run per page) into a ring of DEPTH stages in
        // shared memory, all DEPTH in flight from the start; the warps read their
        // rows from there. No registers hold loads in flight, so a block
        // keeps DEPTH tiles (16 KB each) in flight at any occupancy.
        static_assert(!(BIAS && PAGED), "a bias comes with range steps only");
        extern __shared__ __align__(128) unsigned char dsm[];
        bf16 *sk = reinterpret_cast<bf16 *>(dsm), *sv = sk + DEPTH * TILE * D;
        __shared__ __align__(8) unsigned long long bar[DEPTH];
        // With a bias (one range: the host sends no other), each stage also
        // holds its tile's biases, copied from the 16-byte boundary at or
        // below the first (off floats before it) and rounded up to 16 bytes;
        // the host pads the bias buffer so that the copy stays inside it.
        __shared__ __align__(16) float sbias[BIAS ? DEPTH : 1][TILE + 8];
        auto bias_from = [&](int t0, int &off) {
            const float *src = bias + (long long)h * rows + start0 + t0;
            off = (int)((reinterpret_cast<unsigned long long>(src) & 15) >> 2);
            return src - off;
        };
        if (t == 0) {
#pragma unroll
            for (int d = 0; d < DEPTH; d++) mbar_init(&bar[d]);
            mbar_init_fence();
        }
        __syncthreads();
        auto issue = [&](int it, int st) {
            const int t0 = tile_row(it), n = min(TILE, end - t0);
            int off = 0;
            const float *bsrc = BIAS ? bias_from(t0, off) : nullptr;
            const unsigned bbytes = BIAS ? ((off + n) * 4 + 15) & ~15u : 0u;
            mbar_expect_tx(&bar[st], 2u * n * D * sizeof(bf16) + bbytes);
            if constexpr (BIAS) bulk_g2s(&sbias[st][0], bsrc, bbytes, &bar[st]);
            auto copy = [&](int done, long long row, unsigned bytes) {
                bulk_g2s(sk + (st * TILE + done) * D, kc + row * D, bytes, &bar[st]);
                bulk_g2s(sv + (st * TILE + done) * D, vc + row * D, bytes, &bar[st]);
            };
            if constexpr (PAGED) {
                // A run per page the tile touches (the ids staged above).
                for (int done = 0; done < n;) {
                    const int j = t0 + done, piece = min(n - done, PAGE - (j & 15));
                    const int local = interleave ? 2 * it + (done >> 4) : (j >> 4) - page0;
                    copy(done, (long long)h * rows + (long long)s_pages[local] * PAGE + (j & 15),
                         (unsigned)(piece * D * sizeof(bf16)));
                    done += piece;
                }
            } else {
                tile_runs(t0, n, (long long)h * rows, start0, len0, start1, copy);
            }
        };
        if (t == 0)
            for (int d = 0; d < DEPTH && d < n_tiles; d++) issue(d, d);
        if (early) {
            pdl_wait();
            load_q();
        }
        for (int it = 0; it < n_tiles; it++) {
            const int st = it % DEPTH;
            mbar_wait(&bar[st], (it / DEPTH) & 1);
            uint4 kk[RPL], vv[RPL];
            float bb[RPL];
            const int t0 = tile_row(it);
            int off = 0;
            if constexpr (BIAS) bias_from(t0, off);
#pragma unroll
            for (int i = 0; i < RPL; i++) {
                const int r = WROWS * warp + 2 * i + hf;
                const bool ok = t0 + r < end;
                kk[i] = ok ? reinterpret_cast<const uint4 *>(sk + (st * TILE + r) * D)[l] : make_uint4(0, 0, 0, 0);
                vv[i] = ok ? reinterpret_cast<const uint4 *>(sv + (st * TILE + r) * D)[l] : make_uint4(0, 0, 0, 0);
                bb[i] = !ok ? NEG_INF : BIAS ? sbias[st][off + r] * LOG2E : 0.f;
            }
            // Refill the stage as soon as every warp has its rows.
            if (it + DEPTH < n_tiles) {
                __syncthreads();
                if (t == 0) {
                    fence_proxy_async();
                    issue(it + DEPTH, st);
                }
            }
            step(kk, vv, bb);
        }
    } else {
        // Double buffering in registers: the next tile's loads are issued
        // before the current tile is computed.
        static_assert(DEPTH == 2, "the register path double-buffers");
        uint4 kk[RPL], vv[RPL];
        float bb[RPL];
        if (n_tiles > 0) load(0, kk, vv, bb);
        for (int it = 0; it < n_tiles; it++) {
            uint4 kn[RPL], vn[RPL];
            float bn[RPL];
            if (it + 1 < n_tiles) load(it + 1, kn, vn, bn);
            step(kk, vv, bb);
#pragma unroll
            for (int i = 0; i < RPL; i++) {
                kk[i] = kn[i];
                vv[i] = vn[i];
                bb[i] = bn[i];
            }
        }
    }

    // The two halves of a warp hold the same channels for different rows.
#pragma unroll
    for (int g = 0; g < G; g++)
#pragma unroll
        for (int c = 0; c < 8; c++) acc[g][c] += __shfl_xor_sync(FULL, acc[g][c], 16);
    if (hf == 0) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            float4 *dst = reinterpret_cast<float4 *>(&red[warp][g][8 * l]);
            dst[0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
            dst[1] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
        }
        if ((l & 3) == 0) wml[warp][gq] = make_float2(m_run, l_run);
    }
    __syncthreads();
    // Merge the 4 warps' states; write this split's partial.
    {
        const int g = warp, c4 = lane * 4;
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, wml[w][g].x);
        float L = 0.f;
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int w = 0; w < ATT_WARPS; w++) {
            const float f = exp2f(wml[w][g].x - M);  // 0 for a warp without rows
            L += f * wml[w][g].y;
            const float4 r = *reinterpret_cast<const float4 *>(&red[w][g][c4]);
            o.x = fmaf(f, r.x, o.x);
            o.y = fmaf(f, r.y, o.y);
            o.z = fmaf(f, r.z, o.z);
            o.w = fmaf(f, r.w, o.w);
        }
        reinterpret_cast<float4 *>(part_o + (((long long)h * splits + s) * G + g) * D)[lane] = o;
        if (lane == 0) part_ml[((long long)h * splits + s) * G + g] = make_float2(M, L);
    }

    // The last block of head h to get here combines all splits.
    __threadfence();
    __syncthreads();
    if (t == 0) is_last = atomicAdd(&counters[h], 1u) == (unsigned)(splits - 1);
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    const int used = DROP_LAST ? splits - 1 : splits;
    // The combine is a chain of L2 round trips at the end of the step, so
    // its loads are issued together: every split's (max, sum) of head g at
    // once (MAX_SPLITS / 32 per lane), then 16 splits' outputs at a time.
    // At 4k it costs about 2.3 us of dense's 9.8 (H200, 2026-11-29: the
    // step without it, `forms/` of results/runs/2026-11-29-h200-long-
    // context-decode-step-early-start). Loading the first 16 outputs with
    // the (max, sum) saved a round trip but held 64 more registers: the
    // shortest steps gained (the window at 10% of 4k 0.0073 -> 0.0062 ms),
    // every other got slower (dense at 4k 0.0098 -> 0.0102).
    {
        const int g = warp;
        float2 ml[MAX_SPLITS / 32];
#pragma unroll
        for (int i = 0; i < MAX_SPLITS / 32; i++) {
            const int x = lane + 32 * i;
            ml[i] = x < used ? __ldcg(&part_ml[((long long)h * splits + x) * G + g]) : make_float2(NEG_INF, 0.f);
        }
        float M = NEG_INF;
#pragma unroll
        for (int i = 0; i < MAX_SPLITS / 32; i++) M = fmaxf(M, ml[i].x);
        M = warp_max(M);
        float L = 0.f;
#pragma unroll
        for (int i = 0; i < MAX_SPLITS / 32; i++) {
            ml[i].x = exp2f(ml[i].x - M);  // 0 past `used` and for a split without rows
            L += ml[i].x * ml[i].y;
        }
        L = warp_sum(L);
#pragma unroll
        for (int i = 0; i < MAX_SPLITS / 32; i++)
            if (lane + 32 * i < used) wgt[g][lane + 32 * i] = ml[i].x / L;
    }
    __syncthreads();
    {
        const int g = warp;
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 16
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
        int start0, int len0, int start1, int total, int span, int interleave, float scale_log2, \
        float *__restrict__ part_o, float2 *__restrict__ part_ml, unsigned *__restrict__ counters, \
        float *__restrict__ out
#define ATTN_PASS                                                                           \
    q, kc, vc, bias, pages, n_sel, rows, start0, len0, start1, total, span, interleave, scale_log2, \
        part_o, part_ml, counters, out

extern "C" __global__ void __launch_bounds__(ATT_THREADS, 3) attn_ranges(ATTN_ARGS) {
    attn_body<false, false, false, 2>(ATTN_PASS);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 3) attn_ranges_bias(ATTN_ARGS) {
    attn_body<false, true, false, 2>(ATTN_PASS);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 3) attn_pages(ATTN_ARGS) {
    attn_body<true, false, false, 2>(ATTN_PASS);
}
// Short range steps: tiles brought in by bulk copies, TMA_STAGES in flight
// per block (dynamic shared memory: TMA_STAGES * 16 KB; cuda.rs has the
// same TMA_STAGES).
#define TMA_STAGES 4
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 2) attn_ranges_tma(ATTN_ARGS) {
    attn_body<false, false, false, TMA_STAGES, true>(ATTN_PASS);
}
// The clustered cache (one range with a bias per row), by bulk copies.
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 2) attn_ranges_bias_tma(ATTN_ARGS) {
    attn_body<false, true, false, TMA_STAGES, true>(ATTN_PASS);
}
// Block-topk's selected pages, brought in by bulk copies a page at a time.
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 2) attn_pages_tma(ATTN_ARGS) {
    attn_body<true, false, false, TMA_STAGES, true>(ATTN_PASS);
}
// Twice the stages, for steps whose splits hold more tiles than
// TMA_STAGES (dense at 4k: 8 tiles at 16 splits, all in flight at once);
// one block per SM (128 KB). cuda.rs (`from_step`) says when.
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 1) attn_ranges_tma8(ATTN_ARGS) {
    attn_body<false, false, false, 2 * TMA_STAGES, true>(ATTN_PASS);
}
// Long range steps that start their first tiles before waiting on the
// kernel before them (attn_body's EARLY; cuda.rs, `with_ring_rule`).
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 2) attn_ranges_tma_early(ATTN_ARGS) {
    attn_body<false, false, false, TMA_STAGES, true, false, true>(ATTN_PASS);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 2) attn_ranges_bias_tma_early(ATTN_ARGS) {
    attn_body<false, true, false, TMA_STAGES, true, false, true>(ATTN_PASS);
}
// Range steps that prefetch their rows into L2 before waiting on the
// kernel before them (see attn_body; cuda.rs, `Variant::Prefetch`).
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 3) attn_ranges_pf(ATTN_ARGS) {
    attn_body<false, false, false, 2, false, true>(ATTN_PASS);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 2) attn_ranges_tma_pf(ATTN_ARGS) {
    attn_body<false, false, false, TMA_STAGES, true, true>(ATTN_PASS);
}
// Deliberately wrong (tests only): the combine leaves out the last split.
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 3) attn_ranges_drop_last(ATTN_ARGS) {
    attn_body<false, false, true, 2>(ATTN_PASS);
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
// each page's key (keys of head h start at h * stride) and adds the top 11
// bits of the keys to hist (the first pass of the radix select).
//
// A page's score is the sum over the group's query heads g and channels c
// of max(q[g][c] * min[c], q[g][c] * max[c]) (Quest's upper bound). Since
// min[c] <= max[c], each term is q+ * max[c] + q- * min[c] with q+ =
// max(q, 0) and q- = min(q, 0), so the score is sum_c P[c] * max[c] +
// N[c] * min[c] with P[c] = sum_g max(q[g][c], 0) and N[c] = sum_g
// min(q[g][c], 0), formed once per block: 2 FMAs per channel and page
// instead of 16 operations (4 heads x 2 products, a max and an add), the
// same quantity up to f32 rounding. Until 2026-11-29 the kernel summed
// the 16 operations, and its time was their issue, not its reads.
// The metadata is read once per step, with streaming loads (__ldcs, evict
// first): on an H200 at 512k that took the scores from 0.0352 to 0.0333 ms
// and the step from 0.1081 to 0.1060 ms (two alternating rounds; __ldg
// before; 8 rounds of loads in flight instead of 4 took 101 registers and
// was slower, 0.0360 ms).
extern "C" __global__ void __launch_bounds__(SC_THREADS) quest_score(
    const bf16 *__restrict__ q, const bf16 *__restrict__ meta, int n_pages, int stride, int per_block,
    unsigned *__restrict__ keys, unsigned *__restrict__ hist) {
    __shared__ unsigned sh[HIST1];
    const int h = blockIdx.y, t = threadIdx.x, hw = t >> 4, l = t & 15;
    pdl_trigger();
    for (int b = t; b < HIST1; b += SC_THREADS) sh[b] = 0;
    pdl_wait();  // chained: the previous step may still be using keys and hist
    float qp[8], qn[8];
#pragma unroll
    for (int c = 0; c < 8; c++) qp[c] = qn[c] = 0.f;
#pragma unroll
    for (int g = 0; g < G; g++) {
        float qf[8];
        unpack8(reinterpret_cast<const uint4 *>(q + (h * G + g) * D)[l], qf);
#pragma unroll
        for (int c = 0; c < 8; c++) {
            qp[c] += fmaxf(qf[c], 0.f);
            qn[c] += fminf(qf[c], 0.f);
        }
    }
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
            lo[u] = ok ? __ldcs(M4 + (long long)p * (2 * D / 8) + l) : make_uint4(0, 0, 0, 0);
            hi[u] = ok ? __ldcs(M4 + (long long)p * (2 * D / 8) + D / 8 + l) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < SC_UNROLL; u++) {
            const int p = base + u * halves + hw;
            float mn[8], mx[8];
            unpack8(lo[u], mn);
            unpack8(hi[u], mx);
            float x = 0.f;
#pragma unroll
            for (int c = 0; c < 8; c++) x = fmaf(qn[c], mn[c], fmaf(qp[c], mx[c], x));
            x += __shfl_xor_sync(FULL, x, 8);
            x += __shfl_xor_sync(FULL, x, 4);
            x += __shfl_xor_sync(FULL, x, 2);
            x += __shfl_xor_sync(FULL, x, 1);
            if (l == 0 && p < p_end) {
                const unsigned key = order_key(x);
                keys[(long long)h * stride + p] = key;
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

// 16-byte words in flight at once per thread while staging the keys.
#define SEL_BATCH 8

// Exclusive prefix sum of x over the lanes of a warp (all lanes active).
__device__ __forceinline__ unsigned warp_exclusive_scan(unsigned x) {
    const int lane = threadIdx.x & 31;
    unsigned incl = x;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned y = __shfl_up_sync(FULL, incl, o);
        if (lane >= o) incl += y;
    }
    return incl - x;
}

// Copies m4 16-byte words from global G4 to shared S4, SEL_BATCH loads in
// flight per thread at once.
__device__ __forceinline__ void stage_words(const uint4 *__restrict__ G4, uint4 *__restrict__ S4, int m4) {
    for (int base = threadIdx.x; base < m4; base += SEL_THREADS * SEL_BATCH) {
        uint4 kb[SEL_BATCH];
#pragma unroll
        for (int u = 0; u < SEL_BATCH; u++) {
            const int i = base + u * SEL_THREADS;
            kb[u] = i < m4 ? __ldcg(G4 + i) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < SEL_BATCH; u++) {
            const int i = base + u * SEL_THREADS;
            if (i < m4) S4[i] = kb[u];
        }
    }
}

// A radix pass over the m4 words of K4: every nonzero key whose bits from
// PSHIFT up equal `prefix` counts into hist[(key >> BSHIFT) & BMASK].
// Padding words are 0 and never counted.
template <int PSHIFT, int BSHIFT, unsigned BMASK>
__device__ __forceinline__ void radix_count(const uint4 *K4, int m4, unsigned prefix, unsigned *hist) {
    for (int i = threadIdx.x; i < m4; i += SEL_THREADS) {
        const uint4 x = K4[i];
        const unsigned ks[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
        for (int j = 0; j < 4; j++)
            if (ks[j] && (ks[j] >> PSHIFT) == prefix) atomicAdd(&hist[(ks[j] >> BSHIFT) & BMASK], 1u);
    }
}

// The keys above T and equal to T in a warp's words [a4, b4) of K4, summed
// over the warp and stored by its lane 0 in w_gt[warp] and w_eq[warp].
__device__ __forceinline__ void warp_count(const uint4 *K4, int a4, int b4, unsigned T, unsigned *w_gt,
                                           unsigned *w_eq) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned gt = 0, eq = 0;
    for (int i = a4 + lane; i < b4; i += 32) {
        const uint4 x = K4[i];
        gt += (x.x > T) + (x.y > T) + (x.z > T) + (x.w > T);
        eq += (x.x == T) + (x.y == T) + (x.z == T) + (x.w == T);
    }
    gt = __reduce_add_sync(FULL, gt);
    eq = __reduce_add_sync(FULL, eq);
    if (lane == 0) {
        w_gt[warp] = gt;
        w_eq[warp] = eq;
    }
}

// Compaction of a warp's words [a4, b4) of K4 into out[pos...]: the page
// of every key above T, and of every key equal to T while fewer than
// `need` of those come before it (eq_seen in earlier warps). A word per
// lane and round, so (round, lane, key within the word) is page order, and
// two warp scans per round (keys equal to T, then keys taken) give each
// page its place. Word i holds pages 4 (page4 + i) to 4 (page4 + i) + 3.
// Every lane of the warp runs the same rounds (shuffles).
__device__ __forceinline__ void compact_words(const uint4 *K4, int a4, int b4, unsigned T, unsigned need,
                                              unsigned pos, unsigned eq_seen, int page4, int *out) {
    const int lane = threadIdx.x & 31;
    for (int base = a4; base < b4; base += 32) {
        const int i = base + lane;
        const uint4 x = i < b4 ? K4[i] : make_uint4(0, 0, 0, 0);
        const unsigned ks[4] = {x.x, x.y, x.z, x.w};
        const unsigned my_eq = (ks[0] == T) + (ks[1] == T) + (ks[2] == T) + (ks[3] == T);
        const unsigned eq_pre = warp_exclusive_scan(my_eq);
        unsigned e = eq_seen + eq_pre, take = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const bool is_eq = ks[j] == T;
            if (ks[j] > T || (is_eq && e < need)) take |= 1u << j;
            e += is_eq;
        }
        const unsigned my_take = __popc(take);
        const unsigned take_pre = warp_exclusive_scan(my_take);
        unsigned q = pos + take_pre;
#pragma unroll
        for (int j = 0; j < 4; j++)
            if (take >> j & 1u) out[q++] = 4 * (page4 + i) + j;
        pos += __shfl_sync(FULL, take_pre + my_take, 31);
        eq_seen += __shfl_sync(FULL, eq_pre + my_eq, 31);
    }
}

// Exact top-k pages of KV head blockIdx.x from its keys, written ascending
// to pages[h][0..k). With `staged`, first copies the head's keys (stride, a
// multiple of 4, words from keys + h * stride) into dynamic shared memory
// in 16-byte loads, all in flight at once, and works there; otherwise it
// reads them from global memory in every pass. Completes the radix select
// that quest_score began (and clears its histogram for the next step),
// then compacts (warp_count, compact_words). Every pass reads the keys as
// 16-byte words; until 2026-11-29 it
// read them one at a time, with a bounds check each, and compacted by
// two ballots per 32 keys (at 512k on an H200 the top-k took 16.4 us,
// now 14.8; the step 0.1128 -> 0.1112 ms; cuda.rs).
extern "C" __global__ void __launch_bounds__(SEL_THREADS) topk_select(
    const unsigned *__restrict__ keys, unsigned *__restrict__ hist, int n_pages, int stride, int k,
    int staged, int *__restrict__ pages) {
    extern __shared__ __align__(16) unsigned s_keys[];
    __shared__ unsigned sh[HIST1];
    __shared__ unsigned tmp[32];
    __shared__ unsigned w_gt[32], w_eq[32];
    __shared__ unsigned s_bin, s_above;
    const int h = blockIdx.x, t = threadIdx.x, warp = t >> 5;
    pdl_trigger();
    pdl_wait();  // the keys and the histogram come from quest_score
    const unsigned *Kg = keys + (long long)h * stride;
    unsigned hv[HIST1 / SEL_THREADS];
#pragma unroll
    for (int j = 0; j < HIST1 / SEL_THREADS; j++) hv[j] = __ldcg(&hist[h * HIST1 + t + j * SEL_THREADS]);
    if (staged) stage_words(reinterpret_cast<const uint4 *>(Kg), reinterpret_cast<uint4 *>(s_keys), stride / 4);
#pragma unroll
    for (int j = 0; j < HIST1 / SEL_THREADS; j++) {
        sh[t + j * SEL_THREADS] = hv[j];
        hist[h * HIST1 + t + j * SEL_THREADS] = 0;
    }
    const unsigned *K = staged ? s_keys : Kg;
    __syncthreads();
    unsigned need = k;
    find_bin(sh, HIST1, need, tmp, &s_bin, &s_above);
    unsigned prefix = s_bin;  // key >> 21
    need -= s_above;
    // The keys as 16-byte words: the key buffer's stride is a multiple of
    // 4 and its padding past n_pages stays 0 (never written), which no
    // pass counts, so the words need no bounds check within the stride.
    const uint4 *K4 = reinterpret_cast<const uint4 *>(K);
    const int n4 = stride / 4;
    // Pass 2: bits 20..10 of the keys under the prefix.
    for (int b = t; b < HIST1; b += SEL_THREADS) sh[b] = 0;
    __syncthreads();
    radix_count<21, 10, 2047>(K4, n4, prefix, sh);
    __syncthreads();
    find_bin(sh, 2048, need, tmp, &s_bin, &s_above);
    prefix = (prefix << 11) | s_bin;  // key >> 10
    need -= s_above;
    // Pass 3: bits 9..0.
    for (int b = t; b < 1024; b += SEL_THREADS) sh[b] = 0;
    __syncthreads();
    radix_count<10, 0, 1023>(K4, n4, prefix, sh);
    __syncthreads();
    find_bin(sh, 1024, need, tmp, &s_bin, &s_above);
    const unsigned T = (prefix << 10) | s_bin;  // the k-th largest key
    need -= s_above;                            // keys equal to T to take
    // Compaction: keys above T, and the first `need` keys equal to T. Warp
    // w owns words [w * seg4, (w + 1) * seg4), so page order is warp
    // order, then word order within a warp, then the word's 4 keys.
    const int seg4 = (n4 + 31) / 32, a4 = min(n4, warp * seg4), b4 = min(n4, a4 + seg4);
    warp_count(K4, a4, b4, T, w_gt, w_eq);
    __syncthreads();
    unsigned gt_before = 0, eq_before = 0;
    for (int x = 0; x < warp; x++) {
        gt_before += w_gt[x];
        eq_before += w_eq[x];
    }
    compact_words(K4, a4, b4, T, need, gt_before + min(eq_before, need), eq_before, 0, pages + (long long)h * k);
}

// Thread block clusters (sm_90): a barrier of the whole cluster
// (release/acquire: shared-memory writes before it are visible to every
// block of the cluster after it), and loads and stores of another block's
// shared memory.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// The address of `p` (this block's shared memory) in block `rank`.
__device__ __forceinline__ unsigned cluster_map(const void *p, unsigned rank) {
    unsigned a;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(a) : "r"(smem_addr(p)), "r"(rank));
    return a;
}
__device__ __forceinline__ unsigned ld_cluster(unsigned a) {
    unsigned x;
    asm volatile("ld.shared::cluster.u32 %0, [%1];" : "=r"(x) : "r"(a) : "memory");
    return x;
}
__device__ __forceinline__ void st_cluster(unsigned a, unsigned x) {
    asm volatile("st.shared::cluster.u32 [%0], %1;" ::"r"(a), "r"(x) : "memory");
}

// Blocks per KV head of topk_select_cluster: one cluster.
#define SEL_CLUSTER 8

// The histogram `mine` (nbins words, the same offset in every block of the
// cluster) summed over the cluster's blocks, into sh.
__device__ __forceinline__ void cluster_hist_sum(const unsigned *mine, int nbins, unsigned *sh) {
    for (int b = threadIdx.x; b < nbins; b += SEL_THREADS) {
        unsigned c = 0;
#pragma unroll
        for (int r = 0; r < SEL_CLUSTER; r++) c += ld_cluster(cluster_map(mine + b, r));
        sh[b] = c;
    }
}

// topk_select spread over a cluster of SEL_CLUSTER blocks per KV head: the
// same exact top-k, ascending, ties to the lower page (its doc above), with
// a SEL_CLUSTER-th of the head's keys per block. Block r (blockIdx.x) owns
// the 16-byte words [r * c4, (r + 1) * c4) of the keys and stages them when
// `staged`. Each radix pass counts into the block's own histogram; after a
// cluster barrier every block sums the cluster's histograms from their
// shared memory and finds the same bin. For the compaction each block
// sends its counts of keys above and equal to the threshold to every block
// of the cluster, so that a block's pages follow those of lower ranks.
// Three cluster barriers in all; after the last no block reads another's
// shared memory, so a block may exit. The single-block kernel takes a
// 512k-context head's 32,768 keys through every pass on one SM.
extern "C" __global__ void __cluster_dims__(SEL_CLUSTER, 1, 1) __launch_bounds__(SEL_THREADS)
    topk_select_cluster(const unsigned *__restrict__ keys, unsigned *__restrict__ hist, int n_pages, int stride,
                        int k, int staged, int *__restrict__ pages) {
    extern __shared__ __align__(16) unsigned s_keys[];
    __shared__ unsigned sh[HIST1];
    __shared__ unsigned h2[HIST1], h3[1024];  // this block's counts of passes 2 and 3
    __shared__ unsigned tmp[32];
    __shared__ unsigned w_gt[32], w_eq[32];
    __shared__ unsigned c_gt[SEL_CLUSTER], c_eq[SEL_CLUSTER];  // every block's counts (compaction)
    __shared__ unsigned s_bin, s_above;
    // The grid's x is exactly one cluster (cuda.rs), so blockIdx.x is the
    // block's rank in it.
    const int h = blockIdx.y, rank = blockIdx.x, t = threadIdx.x, warp = t >> 5;
    pdl_trigger();
    pdl_wait();  // the keys and the histogram come from quest_score
    const int n4 = stride / 4, c4 = (n4 + SEL_CLUSTER - 1) / SEL_CLUSTER;
    const int first4 = min(n4, rank * c4), m4 = min(n4, first4 + c4) - first4;
    const uint4 *G4 = reinterpret_cast<const uint4 *>(keys + (long long)h * stride) + first4;
    unsigned hv[HIST1 / SEL_THREADS];
#pragma unroll
    for (int j = 0; j < HIST1 / SEL_THREADS; j++) hv[j] = __ldcg(&hist[h * HIST1 + t + j * SEL_THREADS]);
    if (staged) stage_words(G4, reinterpret_cast<uint4 *>(s_keys), m4);
#pragma unroll
    for (int j = 0; j < HIST1 / SEL_THREADS; j++) {
        sh[t + j * SEL_THREADS] = hv[j];
        h2[t + j * SEL_THREADS] = 0;
    }
    for (int b = t; b < 1024; b += SEL_THREADS) h3[b] = 0;
    const uint4 *K4 = staged ? reinterpret_cast<const uint4 *>(s_keys) : G4;
    __syncthreads();
    unsigned need = k;
    find_bin(sh, HIST1, need, tmp, &s_bin, &s_above);
    unsigned prefix = s_bin;  // key >> 21
    need -= s_above;
    // Pass 2: bits 20..10 of the keys under the prefix (padding words are
    // 0 and never counted, as in topk_select).
    radix_count<21, 10, 2047>(K4, m4, prefix, h2);
    __syncthreads();
    cluster_sync();  // every block has read the first histogram and counted pass 2
    if (rank == 0)
#pragma unroll
        for (int j = 0; j < HIST1 / SEL_THREADS; j++) hist[h * HIST1 + t + j * SEL_THREADS] = 0;
    cluster_hist_sum(h2, HIST1, sh);
    __syncthreads();
    find_bin(sh, 2048, need, tmp, &s_bin, &s_above);
    prefix = (prefix << 11) | s_bin;  // key >> 10
    need -= s_above;
    // Pass 3: bits 9..0.
    radix_count<10, 0, 1023>(K4, m4, prefix, h3);
    __syncthreads();
    cluster_sync();  // every block has read the others' h2 and counted pass 3
    cluster_hist_sum(h3, 1024, sh);
    __syncthreads();
    find_bin(sh, 1024, need, tmp, &s_bin, &s_above);
    const unsigned T = (prefix << 10) | s_bin;  // the k-th largest key
    need -= s_above;                            // keys equal to T to take
    // This block's counts, per warp (warp w owns words [w * seg4, ...) of
    // the block's), then sent to every block of the cluster.
    const int seg4 = (m4 + 31) / 32, a4 = min(m4, warp * seg4), b4 = min(m4, a4 + seg4);
    warp_count(K4, a4, b4, T, w_gt, w_eq);
    __syncthreads();
    if (t < SEL_CLUSTER) {
        unsigned bg = 0, be = 0;
        for (int x = 0; x < 32; x++) {
            bg += w_gt[x];
            be += w_eq[x];
        }
        st_cluster(cluster_map(&c_gt[rank], t), bg);
        st_cluster(cluster_map(&c_eq[rank], t), be);
    }
    __syncwarp();    // warp 0 converged again before the .aligned barrier
    cluster_sync();  // every block has every block's counts, and has read h3
    unsigned gt_before = 0, eq_before = 0;
    for (int x = 0; x < rank; x++) {
        gt_before += c_gt[x];
        eq_before += c_eq[x];
    }
    for (int x = 0; x < warp; x++) {
        gt_before += w_gt[x];
        eq_before += w_eq[x];
    }
    compact_words(K4, a4, b4, T, need, gt_before + min(eq_before, need), eq_before, first4,
                  pages + (long long)h * k);
}

// Diagnostics for the timing tests (cuda.rs), never in a timed step of the
// workload: attn_read_only reads exactly the rows attn_ranges reads, with
// the same grid, tiles and 16-byte loads, and computes nothing (what the
// memory traffic and the launch cost alone under the same protocol);
// attn_empty does nothing at all (the cost of a graph node).
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 3) attn_read_only(ATTN_ARGS) {
    const int h = blockIdx.y, s = blockIdx.x, splits = gridDim.x;
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5, hf = lane >> 4, l = lane & 15;
    const int begin = interleave ? 0 : s * span;
    const int end = interleave ? total : min(total, begin + span);
    const int n_tiles = interleave ? ((total + TILE - 1) / TILE - s + splits - 1) / splits
                                   : (end - begin + TILE - 1) / TILE;
    pdl_trigger();
    pdl_wait();
    const uint4 *K4 = reinterpret_cast<const uint4 *>(kc) + (long long)h * rows * (D / 8);
    const uint4 *V4 = reinterpret_cast<const uint4 *>(vc) + (long long)h * rows * (D / 8);
    unsigned x = 0;
#pragma unroll 2
    for (int it = 0; it < n_tiles; it++) {
        const int t0 = interleave ? (s + it * splits) * TILE : begin + it * TILE;
#pragma unroll
        for (int i = 0; i < RPL; i++) {
            const int j = t0 + WROWS * warp + 2 * i + hf;
            if (j < end) {
                const long long row = j < len0 ? start0 + j : start1 + (j - len0);
                const uint4 a = __ldg(K4 + row * (D / 8) + l), b = __ldg(V4 + row * (D / 8) + l);
                x ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w;
            }
        }
    }
    if (x == 0x9e3779b9u) out[h * G * D + t] = 1.f;  // keeps the loads; almost never taken
}
extern "C" __global__ void attn_empty(ATTN_ARGS) {
    pdl_trigger();
    pdl_wait();
}
