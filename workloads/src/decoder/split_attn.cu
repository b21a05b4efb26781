// Split-K attention of one query row over an f32 KV cache, for the GPU
// decoder (`split_attn.rs` says why and how it is checked). Compiled at
// run time with NVRTC.
//
// q: [kv_heads][G][D], the G query heads of KV head h at q + h * G * D,
//    already scaled by 1 / sqrt(D).
// The rows read are segment 0's n0 rows then segment 1's n1 rows. Segment
// i's row r of KV head h starts at k_i + h * hs_i + r * D (likewise v_i);
// segment 0 may instead be a list of pages of the cache (`seg_row`), n0 / page
// per KV head, of which KV head h reads the first counts[h] where
// `per_head` is set (lists padded to one length; a split past a head's rows
// leaves an empty partial: m = -inf, l = 0).
// Grid (S, kv_heads); split s reads rows [s * C, min((s + 1) * C, n0 + n1)).
// Partials, per (h, s, g): the unnormalised output o (D floats), the
// split's score maximum m and its sum of exp(score - m), l.

#define WARP 32
#define NEG_INF __int_as_float(0xff800000)

// Row `row` of the rows read by KV head h. Segment 0 is a run, or, where
// `page` > 0, `np` pages of `page` rows: its row r is row
// pages[h * np + r / page] * page + r % page of segment 0's cache.
__device__ __forceinline__ const float* seg_row(const float* a, long ha, int na,
                                               const float* b, long hb, int h,
                                               int row, int D,
                                               const unsigned* pages, int page, int np) {
  if (row >= na) return b + h * hb + (long)(row - na) * D;
  if (page > 0) row = (int)pages[h * np + row / page] * page + row % page;
  return a + h * ha + (long)row * D;
}

extern "C" __global__ void split_attn_partial(
    const float* __restrict__ q,
    const float* __restrict__ k0, const float* __restrict__ v0, long hs0, int n0,
    const float* __restrict__ k1, const float* __restrict__ v1, long hs1, int n1,
    const unsigned* __restrict__ pages, int page,
    const unsigned* __restrict__ counts, int per_head,
    int G, int D, int C, int S,
    float* __restrict__ part_o, float* __restrict__ part_m, float* __restrict__ part_l) {
  extern __shared__ float sm[];
  float* qs = sm;           // G * D
  float* ps = sm + G * D;   // G * C: scores, then exp(score - m)
  __shared__ float ms[8], ls[8];
  const int s = blockIdx.x, h = blockIdx.y;
  const int r0 = s * C;
  const int np = page > 0 ? n0 / page : 0;
  // This head's rows of segment 0 (the list's stride stays np).
  const int na = per_head ? (int)counts[h] * page : n0;
  const int nr = max(0, min(C, na + n1 - r0));
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) qs[i] = q[(long)h * G * D + i];
  __syncthreads();
  const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
  const int nw = blockDim.x / WARP, per = D / WARP;
  // Scores: a warp per row, each lane holding D / 32 of the key.
  for (int r = warp; r < nr; r += nw) {
    const float* kr = seg_row(k0, hs0, na, k1, hs1, h, r0 + r, D, pages, page, np);
    float kv[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) kv[e] = e < per ? kr[lane + WARP * e] : 0.f;
    for (int g = 0; g < G; ++g) {
      float acc = 0.f;
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (e < per) acc = fmaf(qs[g * D + lane + WARP * e], kv[e], acc);
#pragma unroll
      for (int o = WARP / 2; o; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if (lane == 0) ps[g * C + r] = acc;
    }
  }
  __syncthreads();
  // Per query head (warp g): the split's maximum, the exponentials, their sum.
  if (warp < G) {
    float* p = ps + warp * C;
    float m = NEG_INF;
    for (int r = lane; r < nr; r += WARP) m = fmaxf(m, p[r]);
#pragma unroll
    for (int o = WARP / 2; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float l = 0.f;
    for (int r = lane; r < nr; r += WARP) {
      const float e = expf(p[r] - m);
      p[r] = e;
      l += e;
    }
#pragma unroll
    for (int o = WARP / 2; o; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    if (lane == 0) {
      ms[warp] = m;
      ls[warp] = l;
    }
  }
  __syncthreads();
  // Values: a thread per (g, d), consecutive threads on consecutive d.
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    const int g = i / D, d = i % D;
    const float* p = ps + g * C;
    float acc = 0.f;
#pragma unroll 8
    for (int r = 0; r < nr; ++r)
      acc = fmaf(p[r], seg_row(v0, hs0, na, v1, hs1, h, r0 + r, D, pages, page, np)[d], acc);
    part_o[(((long)h * S + s) * G + g) * D + d] = acc;
  }
  if (threadIdx.x < G) {
    part_m[((long)h * S + s) * G + threadIdx.x] = ms[threadIdx.x];
    part_l[((long)h * S + s) * G + threadIdx.x] = ls[threadIdx.x];
  }
}

// Block (h * G + g), D threads: the splits' partials rescaled to their
// common maximum and summed; out[(h * G + g) * D + d].
extern "C" __global__ void split_attn_combine(
    const float* __restrict__ part_o, const float* __restrict__ part_m,
    const float* __restrict__ part_l, int G, int D, int S, float* __restrict__ out) {
  const int hg = blockIdx.x, h = hg / G, g = hg % G, d = threadIdx.x;
  float m = NEG_INF;
  for (int s = 0; s < S; ++s) m = fmaxf(m, part_m[((long)h * S + s) * G + g]);
  float l = 0.f, acc = 0.f;
  for (int s = 0; s < S; ++s) {
    const long j = ((long)h * S + s) * G + g;
    const float w = expf(part_m[j] - m);
    l = fmaf(w, part_l[j], l);
    acc = fmaf(w, part_o[j * D + d], acc);
  }
  out[(long)hg * D + d] = acc / l;
}

// Quest's page criticality (arXiv 2406.10774, Sec. 3.3) summed over the G
// query heads of a KV head: sum_g sum_d max(q[g][d] * l[d], q[g][d] * u[d]),
// with l and u the page's channel-wise key minima and maxima. Computed by
// one warp (lanes over d), the same arithmetic in both kernels below, so
// that they agree bit for bit.
__device__ __forceinline__ float page_crit(const float* qh, const float* l,
                                           const float* u, int G, int D, int lane) {
  float total = 0.f;
  for (int g = 0; g < G; ++g) {
    float s = 0.f;
    for (int d = lane; d < D; d += WARP) {
      const float x = qh[g * D + d];
      s += fmaxf(x * l[d], x * u[d]);
    }
    total += s;
  }
#pragma unroll
  for (int o = WARP / 2; o; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
  return isnan(total) ? NEG_INF : total;
}

// crit[h * P + p] for page p of KV head h at lo + h * hs + p * D (a NaN
// becomes -inf). Grid (ceil(P / warps), kv_heads), a warp per page.
extern "C" __global__ void quest_scores(
    const float* __restrict__ q, const float* __restrict__ lo,
    const float* __restrict__ hi, long hs, int P, int G, int D,
    float* __restrict__ crit) {
  const int h = blockIdx.y, lane = threadIdx.x % WARP;
  const int p = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
  if (p >= P) return;
  const float c = page_crit(q + (long)h * G * D, lo + h * hs + (long)p * D,
                            hi + h * hs + (long)p * D, G, D, lane);
  if (lane == 0) crit[(long)h * P + p] = c;
}

// Quest's selection in one launch, for up to a few thousand pages: block h
// scores KV head h's P pages into shared memory (a warp per page, as
// `quest_scores`), then ranks each page in the CPU cache's order (higher
// criticality first, ties to the lower page) and writes the pages of
// rank < W to out[h * W + rank]. The ranks are a permutation of 0..P, so
// every slot of out is written once (W <= P).
extern "C" __global__ void quest_top_pages(
    const float* __restrict__ q, const float* __restrict__ lo,
    const float* __restrict__ hi, long hs, int P, int G, int D, int W,
    unsigned* __restrict__ out) {
  extern __shared__ float crit[];
  const int h = blockIdx.x, lane = threadIdx.x % WARP;
  const int nw = blockDim.x / WARP;
  for (int p = threadIdx.x / WARP; p < P; p += nw) {
    const float c = page_crit(q + (long)h * G * D, lo + h * hs + (long)p * D,
                              hi + h * hs + (long)p * D, G, D, lane);
    if (lane == 0) crit[p] = c;
  }
  __syncthreads();
  for (int p = threadIdx.x; p < P; p += blockDim.x) {
    const float s = crit[p];
    int rank = 0;
    for (int o = 0; o < P; ++o) {
      const float t = crit[o];
      rank += (t > s) || (t == s && o < p);
    }
    if (rank < W) out[(long)h * W + rank] = (unsigned)p;
  }
}
