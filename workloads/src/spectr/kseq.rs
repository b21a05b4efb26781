//! K-SEQ, SpecTr's k-sequential draft selection for one token position
//! (Sun et al., "SpecTr", arXiv 2310.15141, Algorithm 2 "K-SEQ"; the section
//! number is not verified, see the README's provenance note).
//!
//! Given `k` draft tokens `X_1..X_k` drawn i.i.d. from the draft
//! distribution `p`, K-SEQ outputs one token `Y` distributed exactly as the
//! target `q`, keeping a draft token as often as it can:
//!
//! 1. With `beta(rho) = sum_y min(p(y), q(y)/rho)`, choose `rho* in [1, k]`
//!    solving `1 - (1 - beta)^k = rho * beta`. The left side falls and the
//!    right side rises with `rho`, so the root exists and is where the
//!    scheme is still valid with the largest `beta`.
//! 2. For `i = 1..k`: accept `X_i` with probability
//!    `min(1, q(X_i) / (rho p(X_i)))`; stop at the first acceptance.
//! 3. If none is accepted, draw from the residual
//!    `(q(y) - c min(p(y), q(y)/rho)) / (1 - beta)^k` with
//!    `c = (1 - (1 - beta)^k) / beta`.
//!
//! The acceptance probability is `1 - (1 - beta(rho*))^k`, at least
//! `(1 - 1/e)` times the optimal transport value of [`super::optimal`]. With
//! `k = 1`, `rho* = 1` and this is standard speculative sampling (the
//! residual is `max(0, q - p)`); [`Plan::step`] then makes the same decisions
//! from the same random numbers as `baselines::sampling::speculative_step`.
//!
//! The residual formula is valid for *any* `rho` with
//! `1 - (1 - beta)^k <= rho * beta`, i.e. `c <= rho`, and at the root
//! `c = rho`, where it reduces to `max(0, q - rho p)` normalised. We sample
//! it as `q - (c / rho) min(rho p, q)` with `c / rho` capped at one, so a
//! root that is off in the last bits costs a negligible amount of acceptance
//! but never exactness.
//!
//! # Finding `rho*` fast
//!
//! The vocabularies of interest have ~150k tokens and K-SEQ runs at every
//! position, so `rho*` must cost a couple of passes over the vocabulary, not
//! a bisection of ~50. Write `s(rho) = rho * beta(rho) = sum_y min(rho p,
//! q)`: it is concave and piecewise linear, with slope `a(rho) = sum_{q >=
//! rho p} p` and a breakpoint at each ratio `q(y)/p(y)` in `[1, k]`
//! (typically tens of thousands of them, so sorting them all is out).
//!
//! 1. One pass at `rho = 1` gives `a` and `b = sum_{q < p} q`. Freezing which
//!    tokens lie on which side gives the model `s ~ a rho + b`, exact up to
//!    the next breakpoint; its root (a scalar equation) is a Newton-like
//!    candidate, which on realistic pairs lands within 0.3% of its own step
//!    from `rho*`.
//! 2. The next pass returns the exact sums outside a window of ratios of 1%
//!    of that step around the candidate and collects the few hundred tokens
//!    inside it, which gives `f` at both ends of the window. If the window
//!    brackets the root (`f(lo) > 0 >= f(hi)`), the rest of the search
//!    partitions those tokens around Newton-like pivots and finally sorts
//!    the last few dozen and solves each segment exactly. Otherwise the
//!    bracket tightens and the step repeats from the nearer end.
//!
//! The passes are written with SIMD intrinsics (AVX2 when the CPU has it,
//! else SSE2) because the compiler turns the selects of the plain loops into
//! branches; they are compared with the scalar pass in the tests. A token
//! with `p(y) = 0` needs no special case: it always counts on the `a` side,
//! with weight zero.

use rand::Rng;

/// What one K-SEQ step emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepResult {
    /// Draft number `draft_index` (0-based, in the order given) was kept.
    Accepted { draft_index: usize, token: u32 },
    /// No draft was kept; `token` came from the residual distribution.
    Residual { token: u32 },
}

impl StepResult {
    pub fn token(self) -> u32 {
        match self {
            StepResult::Accepted { token, .. } | StepResult::Residual { token } => token,
        }
    }
}

/// `beta(rho) = sum_y min(p(y), q(y) / rho)`, straight from the definition.
pub fn beta(p: &[f64], q: &[f64], rho: f64) -> f64 {
    p.iter().zip(q).map(|(&p, &q)| p.min(q / rho)).sum()
}

/// K-SEQ's acceptance probability, `1 - (1 - beta)^k`.
pub fn acceptance(beta: f64, k: usize) -> f64 {
    1.0 - (1.0 - beta).max(0.0).powi(k as i32)
}

/// `(rho*, beta(rho*))` for `k` drafts (see the module docs).
///
/// # Panics
/// If `k == 0` or `p` and `q` differ in length.
pub fn solve_rho(p: &[f64], q: &[f64], k: usize) -> (f64, f64) {
    let plan = KSeq::default().plan(p, q, k);
    (plan.rho, plan.beta)
}

/// One K-SEQ step: `draws` are the draft tokens (i.i.d. from `p`), `k =
/// draws.len()`. Allocates the root search's scratch buffers; [`KSeq`]
/// reuses them across steps.
pub fn kseq_step<R: Rng + ?Sized>(p: &[f64], q: &[f64], draws: &[u32], rng: &mut R) -> StepResult {
    KSeq::default()
        .plan(p, q, draws.len())
        .step(p, q, draws, rng)
}

/// Reusable K-SEQ solver: holds the scratch buffers of the root search.
#[derive(Debug, Default)]
pub struct KSeq {
    /// Breakpoints `(q/p, p, q)` inside the current window of ratios.
    window: Vec<(f64, f64, f64)>,
    /// Starts of the chunks (8 or 16 tokens) that hold a window token.
    chunks: Vec<u32>,
}

/// Everything one K-SEQ step needs once `rho` is known.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub k: usize,
    pub rho: f64,
    pub beta: f64,
    /// `c / rho`, capped at 1: the residual is `q - gamma min(rho p, q)`.
    gamma: f64,
}

/// Full passes with Newton-like windows before the search collects the
/// whole bracket as its window instead (never reached on the pairs tested).
const NEWTON_PASSES: usize = 8;
/// Half-width of the window around a Newton-like candidate, as a fraction
/// of the step that produced it. The candidate's error is second order in
/// the step: on the benchmark pairs the first candidate from `rho = 1` is
/// within 0.3% of that step of the root, and a window that misses costs one
/// more pass, from a closer point.
const WINDOW_FRACTION: f64 = 0.01;
/// Below this many breakpoints the window is sorted and walked.
const SORT_BELOW: usize = 64;

impl KSeq {
    /// Solves for `rho*` and returns the plan for `k` drafts.
    ///
    /// Every pass over the vocabulary returns the exact sums outside a
    /// window of ratios `[wlo, whi]` and the breakpoints inside it, which
    /// gives `f` at both ends. The first pass is at `rho = 1` with an empty
    /// window; each later one is centred on the Newton-like candidate from
    /// the previous pass, with a half-width of 1% of that step. Once a window
    /// brackets the root, the rest of the search runs over its breakpoints
    /// only.
    ///
    /// # Panics
    /// If `k == 0` or `p` and `q` differ in length.
    pub fn plan(&mut self, p: &[f64], q: &[f64], k: usize) -> Plan {
        assert!(k >= 1, "K-SEQ needs at least one draft");
        assert_eq!(p.len(), q.len(), "draft and target vocabularies differ");
        let (a1, b1) = window_pass(p, q, 1.0, 1.0, &mut self.window, &mut self.chunks);
        if k == 1 {
            return Plan {
                k,
                rho: 1.0,
                beta: a1 + b1,
                gamma: 1.0,
            };
        }
        // f(1) = 1 - (1 - beta)^k - beta >= 0, with equality only when
        // beta(1) is 0 or 1 (disjoint or equal distributions).
        let mut cur = Point::new(1.0, a1, b1, k);
        if cur.f <= 0.0 {
            return Plan::from_point(&cur, k);
        }
        let mut lo = cur;
        // f(k) <= 0 always (k beta(k) = sum min(k p, q) >= 1 - (1 - beta)^k),
        // so k closes the bracket without being evaluated.
        let mut hi_rho = k as f64;
        for passes in 1.. {
            if lo.rho >= hi_rho {
                // f(k) rounded above zero: k is the root to rounding.
                return Plan::from_point(&lo, k);
            }
            let (wlo, whi) = if passes < NEWTON_PASSES {
                let cand = segment_root(cur.a, cur.b, k, lo.rho, hi_rho);
                let half = WINDOW_FRACTION * (cand - cur.rho).abs() + 1e-12 * cand;
                ((cand - half).max(lo.rho), (cand + half).min(hi_rho))
            } else {
                // The whole bracket: it brackets the root by construction.
                (lo.rho, hi_rho)
            };
            let (a_out, b_out) = window_pass(p, q, wlo, whi, &mut self.window, &mut self.chunks);
            let (p_in, q_in) = self
                .window
                .iter()
                .fold((0.0, 0.0), |(x, y), &(_, pp, qq)| (x + pp, y + qq));
            let at_lo = Point::new(wlo, a_out + p_in, b_out, k);
            let at_hi = Point::new(whi, a_out, b_out + q_in, k);
            if at_lo.f > 0.0 && at_hi.f <= 0.0 {
                return Plan::from_point(&self.solve_window(at_lo, at_hi, a_out, b_out, k), k);
            }
            // The root is outside the window: tighten the bracket.
            if at_hi.f > 0.0 {
                lo = at_hi;
                cur = at_hi;
            } else {
                hi_rho = at_lo.rho;
                cur = at_lo;
            }
        }
        unreachable!("the loop returns once the bracket is collected")
    }

    /// The root inside the window `[lo.rho, hi.rho]`, given the sums
    /// outside it (`a_out` above, `b_out` below) and its breakpoints in
    /// `self.window`. Narrows the window by partitioning the breakpoints
    /// around Newton-like pivots until few are left, then sorts and walks
    /// them; each segment between breakpoints is solved as a scalar equation.
    fn solve_window(
        &mut self,
        mut lo: Point,
        mut hi: Point,
        mut a_out: f64,
        mut b_out: f64,
        k: usize,
    ) -> Point {
        let set = &mut self.window;
        let mut use_median = false;
        while set.len() > SORT_BELOW {
            // The Newton-like candidate from the lower end; the middle
            // element's ratio when that failed to split the set last time.
            let newton = segment_root(lo.a, lo.b, k, lo.rho, hi.rho);
            let median = use_median || newton <= lo.rho || newton >= hi.rho;
            let pivot = if median { set[set.len() / 2].0 } else { newton };
            let len = set.len();
            let split = partition(set, pivot);
            if median && (split == 0 || split == len) {
                // Ties at the median: sorting handles them.
                break;
            }
            use_median = split == 0 || split == len;
            let (below, above) = set.split_at(split);
            let a_above: f64 = above.iter().map(|e| e.1).sum();
            let b_below: f64 = below.iter().map(|e| e.2).sum();
            let at = Point::new(pivot, a_out + a_above, b_out + b_below, k);
            if at.f > 0.0 {
                // Root above the pivot: the lower part is settled.
                b_out += b_below;
                lo = at;
                set.drain(..split);
            } else {
                a_out += a_above;
                hi = at;
                set.truncate(split);
            }
        }
        set.sort_unstable_by(|x, y| x.0.total_cmp(&y.0));
        // At lo.rho every remaining breakpoint counts on the `a` side.
        let mut a = a_out + set.iter().map(|e| e.1).sum::<f64>();
        let mut b = b_out;
        let mut seg_lo = lo.rho;
        for &(r, pp, qq) in set.iter() {
            // Up to and including r, this token is on the `a` side.
            if f_at(r, a, b, k) <= 0.0 {
                return Point::new(segment_root(a, b, k, seg_lo, r), a, b, k);
            }
            a -= pp;
            b += qq;
            seg_lo = r;
        }
        Point::new(segment_root(a, b, k, seg_lo, hi.rho), a, b, k)
    }
}

/// Reorders `set` so that ratios below `pivot` come first; returns how many.
fn partition(set: &mut [(f64, f64, f64)], pivot: f64) -> usize {
    let mut split = 0;
    for i in 0..set.len() {
        if set[i].0 < pivot {
            set.swap(i, split);
            split += 1;
        }
    }
    split
}

/// `rho` with the exact sums there: `a = sum_{q >= rho p} p`,
/// `b = sum_{q < rho p} q`, so `beta = a + b / rho`.
#[derive(Debug, Clone, Copy)]
struct Point {
    rho: f64,
    a: f64,
    b: f64,
    f: f64,
}

impl Point {
    fn new(rho: f64, a: f64, b: f64, k: usize) -> Self {
        Point {
            rho,
            a,
            b,
            f: f_at(rho, a, b, k),
        }
    }
}

/// `1 - (1 - beta)^k - rho beta` with `beta = a + b / rho`.
fn f_at(rho: f64, a: f64, b: f64, k: usize) -> f64 {
    let beta = a + b / rho;
    acceptance(beta, k) - (a * rho + b)
}

/// The root in `[lo, hi]` of `f_at(., a, b, k)` (decreasing in `rho`), as
/// the smallest point found with a non-positive value: `hi` if there is
/// none, `lo` if `lo` already is one.
fn segment_root(a: f64, b: f64, k: usize, mut lo: f64, mut hi: f64) -> f64 {
    if f_at(lo, a, b, k) <= 0.0 {
        return lo;
    }
    if f_at(hi, a, b, k) > 0.0 {
        return hi;
    }
    loop {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            return hi;
        }
        if f_at(mid, a, b, k) > 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
}

impl Plan {
    fn from_point(pt: &Point, k: usize) -> Plan {
        let beta = (pt.a + pt.b / pt.rho).clamp(0.0, 1.0);
        // c = (1 - (1 - beta)^k) / beta <= rho where f <= 0.
        let gamma = if beta > 0.0 {
            (acceptance(beta, k) / beta / pt.rho).min(1.0)
        } else {
            0.0
        };
        Plan {
            k,
            rho: pt.rho,
            beta,
            gamma,
        }
    }

    /// A plan for an arbitrary `rho` (an O(V) pass). Exact only when `rho
    /// >= rho*`, where it accepts less often than [`KSeq::plan`].
    pub fn at_rho(p: &[f64], q: &[f64], k: usize, rho: f64) -> Plan {
        let (a, b) = window_pass(p, q, rho, rho, &mut Vec::new(), &mut Vec::new());
        Plan::from_point(&Point::new(rho, a, b, k), k)
    }

    /// A deliberately wrong plan for tests: keep each draft with
    /// `min(1, q/p)` and fall back to `max(0, q - p)` whatever `k` is.
    #[cfg(test)]
    pub(crate) fn naive(p: &[f64], q: &[f64], k: usize) -> Plan {
        Plan {
            k,
            rho: 1.0,
            beta: beta(p, q, 1.0),
            gamma: 1.0,
        }
    }

    /// The probability that some draft is kept, `1 - (1 - beta)^k`.
    pub fn acceptance(&self) -> f64 {
        acceptance(self.beta, self.k)
    }

    /// One K-SEQ step over `draws` (i.i.d. from `p`; `draws.len()` must be
    /// the `k` the plan was made for). Random numbers used, in order: one
    /// uniform per draft examined, then one for the residual if needed.
    pub fn step<R: Rng + ?Sized>(
        &self,
        p: &[f64],
        q: &[f64],
        draws: &[u32],
        rng: &mut R,
    ) -> StepResult {
        debug_assert_eq!(draws.len(), self.k, "plan made for another k");
        for (draft_index, &token) in draws.iter().enumerate() {
            let x = token as usize;
            // u < min(1, q / (rho p)) without dividing.
            if rng.random::<f64>() * (self.rho * p[x]) < q[x] {
                return StepResult::Accepted { draft_index, token };
            }
        }
        StepResult::Residual {
            token: self.sample_residual(p, q, rng) as u32,
        }
    }

    /// One draw from the residual `q - gamma min(rho p, q)` (unnormalised),
    /// by inversion over blocks, without allocating. Should the residual
    /// have no mass (rejection was then impossible in exact arithmetic) the
    /// draw is from `q`.
    fn sample_residual<R: Rng + ?Sized>(&self, p: &[f64], q: &[f64], rng: &mut R) -> usize {
        let (rho, gamma) = (self.rho, self.gamma);
        let total: f64 = p
            .chunks(BLOCK)
            .zip(q.chunks(BLOCK))
            .map(|(pb, qb)| residual_sum(pb, qb, rho, gamma))
            .sum();
        let v = rng.random::<f64>();
        // Also catches a NaN total.
        if total.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return baselines::sampling::sample_categorical(q, rng);
        }
        let target = v * total;
        let mut acc = 0.0;
        let mut last_positive = None;
        for (block, (pb, qb)) in p.chunks(BLOCK).zip(q.chunks(BLOCK)).enumerate() {
            let sum = residual_sum(pb, qb, rho, gamma);
            if acc + sum <= target {
                acc += sum;
                continue;
            }
            for (i, (&pp, &qq)) in pb.iter().zip(qb).enumerate() {
                let w = residual_weight(pp, qq, rho, gamma);
                if w > 0.0 {
                    acc += w;
                    last_positive = Some(block * BLOCK + i);
                    if target < acc {
                        return block * BLOCK + i;
                    }
                }
            }
        }
        // Rounding carried the target past the end: the last token with
        // residual mass.
        last_positive.unwrap_or_else(|| {
            (0..p.len())
                .rev()
                .find(|&i| residual_weight(p[i], q[i], rho, gamma) > 0.0)
                .expect("the residual has positive total mass")
        })
    }
}

const BLOCK: usize = 256;

/// `q - gamma min(rho p, q)`, floored at zero; written as the SIMD code
/// computes it (`min` as `m < q ? m : q`).
#[inline]
fn residual_weight(p: f64, q: f64, rho: f64, gamma: f64) -> f64 {
    let m = rho * p;
    let m = if m < q { m } else { q };
    let w = q - gamma * m;
    if w > 0.0 {
        w
    } else {
        0.0
    }
}

/// Sum of [`residual_weight`] over a block.
fn residual_sum(p: &[f64], q: &[f64], rho: f64, gamma: f64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        simd::residual_sum(p, q, rho, gamma)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        p.iter()
            .zip(q)
            .map(|(&pp, &qq)| residual_weight(pp, qq, rho, gamma))
            .sum()
    }
}

/// One pass over the vocabulary for a window `[wlo, whi]` of ratios:
/// returns `(a_out, b_out) = (sum_{q >= whi p} p, sum_{q < wlo p} q)` and
/// leaves the tokens with `wlo p <= q < whi p` in `out` as `(q/p, p, q)`.
/// With `wlo == whi == rho` the window is empty and the sums are `a(rho)`
/// and `b(rho)`. A token with `p = 0` always lands in `a_out`, with weight
/// zero, and never in the window.
fn window_pass(
    p: &[f64],
    q: &[f64],
    wlo: f64,
    whi: f64,
    out: &mut Vec<(f64, f64, f64)>,
    chunks: &mut Vec<u32>,
) -> (f64, f64) {
    out.clear();
    #[cfg(target_arch = "x86_64")]
    {
        simd::window_pass(p, q, wlo, whi, out, chunks)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = chunks;
        window_pass_scalar(p, q, wlo, whi, out)
    }
}

/// The scalar form of [`window_pass`], also used for the SIMD remainders.
fn window_pass_scalar(
    p: &[f64],
    q: &[f64],
    wlo: f64,
    whi: f64,
    out: &mut Vec<(f64, f64, f64)>,
) -> (f64, f64) {
    let (mut a, mut b) = (0.0, 0.0);
    for (&pp, &qq) in p.iter().zip(q) {
        let above = qq >= whi * pp;
        let below = qq < wlo * pp;
        if above {
            a += pp;
        } else if below {
            b += qq;
        } else {
            out.push((qq / pp, pp, qq));
        }
    }
    (a, b)
}

/// Vector forms of the passes, dispatched once per call: AVX2 where the
/// CPU has it (about 1.5x faster than SSE2 here), else SSE2, which every
/// x86_64 CPU has. The plain loops are not vectorised by the compiler (their
/// selects become branches) and ran 3x slower than SSE2. Each form computes
/// the same quantities with the same comparisons as the scalar code; sums
/// differ only in the order of additions. The tests compare every form with
/// the scalar one.
#[cfg(target_arch = "x86_64")]
mod simd {
    pub(super) fn window_pass(
        p: &[f64],
        q: &[f64],
        wlo: f64,
        whi: f64,
        out: &mut Vec<(f64, f64, f64)>,
        chunks: &mut Vec<u32>,
    ) -> (f64, f64) {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present.
            unsafe { avx2::window_pass(p, q, wlo, whi, out, chunks) }
        } else {
            // SAFETY: SSE2 is part of the x86_64 baseline.
            unsafe { sse2::window_pass(p, q, wlo, whi, out, chunks) }
        }
    }

    pub(super) fn residual_sum(p: &[f64], q: &[f64], rho: f64, gamma: f64) -> f64 {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present.
            unsafe { avx2::residual_sum(p, q, rho, gamma) }
        } else {
            // SAFETY: SSE2 is part of the x86_64 baseline.
            unsafe { sse2::residual_sum(p, q, rho, gamma) }
        }
    }

    /// The tokens of the flagged chunks that lie in the window (their sums
    /// are already counted), then the scalar tail from `main` on.
    fn finish(
        (p, q): (&[f64], &[f64]),
        (wlo, whi): (f64, f64),
        out: &mut Vec<(f64, f64, f64)>,
        starts: &[u32],
        width: usize,
        main: usize,
    ) -> (f64, f64) {
        for &start in starts {
            let c = start as usize;
            super::window_pass_scalar(&p[c..c + width], &q[c..c + width], wlo, whi, out);
        }
        let n = p.len().min(q.len());
        super::window_pass_scalar(&p[main..n], &q[main..n], wlo, whi, out)
    }

    /// Written for any lane width: `$w` doubles per register, four
    /// registers per step.
    macro_rules! kernels {
        ($feature:literal, $reg:ty, $w:literal, $zero:ident, $set1:ident, $load:ident, $store:ident,
         $mul:ident, $add:ident, $sub:ident, $min:ident, $max:ident, $and:ident, $or:ident,
         $ge:expr, $lt:expr, $movemask:ident, $ones:expr) => {
            use std::arch::x86_64::*;

            const STEP: usize = 4 * $w;

            /// SAFETY: the caller guarantees the target feature.
            #[target_feature(enable = $feature)]
            unsafe fn hsum(v: [$reg; 4]) -> f64 {
                let mut x = [0.0f64; $w];
                $store(x.as_mut_ptr(), $add($add(v[0], v[1]), $add(v[2], v[3])));
                x.iter().sum()
            }

            /// SAFETY: the caller guarantees the target feature.
            #[target_feature(enable = $feature)]
            pub(in super::super) unsafe fn window_pass(
                p: &[f64],
                q: &[f64],
                wlo: f64,
                whi: f64,
                out: &mut Vec<(f64, f64, f64)>,
                chunks: &mut Vec<u32>,
            ) -> (f64, f64) {
                if wlo == whi {
                    return point_pass(p, q, wlo);
                }
                let n = p.len().min(q.len());
                let main = n - n % STEP;
                chunks.clear();
                chunks.reserve(main / STEP + 1);
                let starts = chunks.as_mut_ptr();
                let mut found = 0;
                let (lo, hi) = ($set1(wlo), $set1(whi));
                let mut a = [$zero(); 4];
                let mut b = [$zero(); 4];
                let mut i = 0;
                // Loads read p[i..i + STEP], q[i..i + STEP] with i + STEP <=
                // main <= n; one chunk start is written per step, into the
                // main / STEP + 1 slots reserved.
                while i < main {
                    let mut outside = $ones;
                    for l in 0..4 {
                        let pv = $load(p.as_ptr().add(i + $w * l));
                        let qv = $load(q.as_ptr().add(i + $w * l));
                        let above = $ge(qv, $mul(hi, pv));
                        let below = $lt(qv, $mul(lo, pv));
                        a[l] = $add(a[l], $and(above, pv));
                        b[l] = $add(b[l], $and(below, qv));
                        outside = $and(outside, $or(above, below));
                    }
                    // Branch-free: a chunk with a breakpoint keeps its slot
                    // (a branch or a call here costs more than the write).
                    *starts.add(found) = i as u32;
                    found += ($movemask(outside) != (1 << $w) - 1) as usize;
                    i += STEP;
                }
                // The first `found` slots were written above.
                chunks.set_len(found);
                let (ra, rb) = super::finish((p, q), (wlo, whi), out, chunks, STEP, main);
                (hsum(a) + ra, hsum(b) + rb)
            }

            /// The empty window at `rho`: `(a, b)` from `s = sum min(rho
            /// p, q)` and `a = sum_{q >= rho p} p`, cheaper than two masked
            /// sums.
            /// SAFETY: the caller guarantees the target feature.
            #[target_feature(enable = $feature)]
            unsafe fn point_pass(p: &[f64], q: &[f64], rho: f64) -> (f64, f64) {
                let n = p.len().min(q.len());
                let main = n - n % STEP;
                let r = $set1(rho);
                let mut s = [$zero(); 4];
                let mut a = [$zero(); 4];
                let mut i = 0;
                while i < main {
                    for l in 0..4 {
                        let pv = $load(p.as_ptr().add(i + $w * l));
                        let qv = $load(q.as_ptr().add(i + $w * l));
                        let m = $mul(r, pv);
                        s[l] = $add(s[l], $min(m, qv));
                        a[l] = $add(a[l], $and($ge(qv, m), pv));
                    }
                    i += STEP;
                }
                let (s, a) = (hsum(s), hsum(a));
                let (ra, rb) = super::super::window_pass_scalar(
                    &p[main..n],
                    &q[main..n],
                    rho,
                    rho,
                    &mut Vec::new(),
                );
                (a + ra, (s - rho * a).max(0.0) + rb)
            }

            /// SAFETY: the caller guarantees the target feature.
            #[target_feature(enable = $feature)]
            pub(in super::super) unsafe fn residual_sum(
                p: &[f64],
                q: &[f64],
                rho: f64,
                gamma: f64,
            ) -> f64 {
                let n = p.len().min(q.len());
                let main = n - n % STEP;
                let (r, g, zero) = ($set1(rho), $set1(gamma), $zero());
                let mut s = [$zero(); 4];
                let mut i = 0;
                while i < main {
                    for (l, acc) in s.iter_mut().enumerate() {
                        let pv = $load(p.as_ptr().add(i + $w * l));
                        let qv = $load(q.as_ptr().add(i + $w * l));
                        let m = $min($mul(r, pv), qv);
                        let w = $max($sub(qv, $mul(g, m)), zero);
                        *acc = $add(*acc, w);
                    }
                    i += STEP;
                }
                hsum(s)
                    + p[main..n]
                        .iter()
                        .zip(&q[main..n])
                        .map(|(&pp, &qq)| super::super::residual_weight(pp, qq, rho, gamma))
                        .sum::<f64>()
            }
        };
    }

    pub(super) mod sse2 {
        kernels!(
            "sse2",
            __m128d,
            2,
            _mm_setzero_pd,
            _mm_set1_pd,
            _mm_loadu_pd,
            _mm_storeu_pd,
            _mm_mul_pd,
            _mm_add_pd,
            _mm_sub_pd,
            _mm_min_pd,
            _mm_max_pd,
            _mm_and_pd,
            _mm_or_pd,
            _mm_cmpge_pd,
            _mm_cmplt_pd,
            _mm_movemask_pd,
            _mm_castsi128_pd(_mm_set1_epi32(-1))
        );
    }

    pub(super) mod avx2 {
        /// `_mm256_cmp_pd` with an ordered `>=`.
        #[target_feature(enable = "avx2")]
        #[inline]
        unsafe fn ge(a: __m256d, b: __m256d) -> __m256d {
            _mm256_cmp_pd::<_CMP_GE_OQ>(a, b)
        }
        /// `_mm256_cmp_pd` with an ordered `<`.
        #[target_feature(enable = "avx2")]
        #[inline]
        unsafe fn lt(a: __m256d, b: __m256d) -> __m256d {
            _mm256_cmp_pd::<_CMP_LT_OQ>(a, b)
        }
        kernels!(
            "avx2",
            __m256d,
            4,
            _mm256_setzero_pd,
            _mm256_set1_pd,
            _mm256_loadu_pd,
            _mm256_storeu_pd,
            _mm256_mul_pd,
            _mm256_add_pd,
            _mm256_sub_pd,
            _mm256_min_pd,
            _mm256_max_pd,
            _mm256_and_pd,
            _mm256_or_pd,
            ge,
            lt,
            _mm256_movemask_pd,
            _mm256_castsi256_pd(_mm256_set1_epi32(-1))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::chi_square_gof;
    use baselines::sampling::{sample_categorical, speculative_step, SpecStep};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// `f(rho)` straight from the definition.
    fn f_ref(p: &[f64], q: &[f64], k: usize, rho: f64) -> f64 {
        let b = beta(p, q, rho);
        acceptance(b, k) - rho * b
    }

    /// Slow reference: 200 bisections of the definition over [1, k].
    fn rho_ref(p: &[f64], q: &[f64], k: usize) -> f64 {
        let (mut lo, mut hi) = (1.0, k as f64);
        if f_ref(p, q, k, lo) <= 0.0 {
            return lo;
        }
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if f_ref(p, q, k, mid) > 0.0 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi
    }

    fn random_dist(n: usize, peaked: f64, zeros: f64, rng: &mut impl Rng) -> Vec<f64> {
        let mut d: Vec<f64> = (0..n)
            .map(|_| {
                if rng.random::<f64>() < zeros {
                    0.0
                } else {
                    (peaked * rng.random::<f64>()).exp()
                }
            })
            .collect();
        if d.iter().all(|&x| x == 0.0) {
            d[0] = 1.0;
        }
        let s: f64 = d.iter().sum();
        d.iter_mut().for_each(|x| *x /= s);
        d
    }

    /// Our root against the reference: both are roots of the definition
    /// (|f| at rounding level, 1e-12) with the same acceptance to 1e-12, and
    /// the same `rho` to 1e-9 relative wherever `rho` is well defined. When
    /// `1 - (1 - beta)^k` rounds to one, f is flat at rounding level over a
    /// whole interval of `rho` and every point of it is a root.
    fn assert_same_root(p: &[f64], q: &[f64], k: usize, what: &str) {
        let (rho, b) = solve_rho(p, q, k);
        let want = rho_ref(p, q, k);
        assert!((1.0..=k as f64).contains(&rho), "{what}: rho {rho}");
        assert!((b - beta(p, q, rho)).abs() < 1e-12, "{what}: beta");
        assert!(f_ref(p, q, k, rho).abs() < 1e-12, "{what}: f({rho}) != 0");
        let (ours, theirs) = (acceptance(b, k), acceptance(beta(p, q, want), k));
        assert!(
            (ours - theirs).abs() < 1e-12,
            "{what}: acceptance {ours} vs {theirs}"
        );
        if theirs < 1.0 - 1e-9 {
            assert!(
                (rho - want).abs() <= 1e-9 * want,
                "{what}: rho {rho} vs {want}"
            );
        }
    }

    #[test]
    fn solve_rho_finds_the_root_of_the_definition() {
        let mut rng = ChaCha8Rng::seed_from_u64(20);
        for case in 0..300 {
            let n = [2, 3, 5, 17, 100, 3000][case % 6];
            let peaked = [0.5, 3.0, 12.0][case % 3];
            let zeros = [0.0, 0.2][case % 2];
            let p = random_dist(n, peaked, zeros, &mut rng);
            let q = random_dist(n, peaked, zeros, &mut rng);
            for k in [2, 3, 4, 8] {
                assert_same_root(&p, &q, k, &format!("case {case} k {k}"));
            }
        }
    }

    #[test]
    fn solve_rho_on_a_large_peaked_vocabulary() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let p = random_dist(152_000, 14.0, 0.0, &mut rng);
        let q = random_dist(152_000, 14.0, 0.0, &mut rng);
        for k in [2, 4, 8] {
            assert_same_root(&p, &q, k, &format!("k {k}"));
        }
    }

    /// Every vector form of the passes against the scalar one: the same
    /// window tokens and the same sums to 1e-12 relative (only the order of
    /// additions differs).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_passes_match_the_scalar_pass() {
        type WindowPass = unsafe fn(
            &[f64],
            &[f64],
            f64,
            f64,
            &mut Vec<(f64, f64, f64)>,
            &mut Vec<u32>,
        ) -> (f64, f64);
        type ResidualSum = unsafe fn(&[f64], &[f64], f64, f64) -> f64;
        let mut forms: Vec<(&str, WindowPass, ResidualSum)> =
            vec![("sse2", simd::sse2::window_pass, simd::sse2::residual_sum)];
        if std::is_x86_feature_detected!("avx2") {
            forms.push(("avx2", simd::avx2::window_pass, simd::avx2::residual_sum));
        }
        let close = |x: f64, y: f64| (x - y).abs() <= 1e-12 * x.abs().max(y.abs()) + 1e-300;
        let mut rng = ChaCha8Rng::seed_from_u64(23);
        for case in 0..200 {
            let n = [1, 7, 8, 15, 16, 17, 33, 1000, 4099][case % 9];
            let p = random_dist(n, 8.0, 0.1, &mut rng);
            let q = random_dist(n, 8.0, 0.1, &mut rng);
            let wlo = 1.0 + 3.0 * rng.random::<f64>();
            let whi = if case % 3 == 0 {
                wlo
            } else {
                wlo * (1.0 + rng.random::<f64>())
            };
            let mut want_set = Vec::new();
            let (wa, wb) = window_pass_scalar(&p, &q, wlo, whi, &mut want_set);
            let key = |set: &mut Vec<(f64, f64, f64)>| {
                set.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.total_cmp(&y.1)));
            };
            key(&mut want_set);
            let (rho, gamma) = (wlo, rng.random::<f64>());
            let want_res: f64 = p
                .iter()
                .zip(&q)
                .map(|(&a, &b)| residual_weight(a, b, rho, gamma))
                .sum();
            for &(name, pass, residual) in &forms {
                let (mut set, mut chunks) = (Vec::new(), Vec::new());
                // SAFETY: SSE2 is baseline; AVX2 was detected above.
                let (a, b) = unsafe { pass(&p, &q, wlo, whi, &mut set, &mut chunks) };
                key(&mut set);
                assert!(
                    close(a, wa) && close(b, wb),
                    "{name} case {case}: ({a}, {b}) vs ({wa}, {wb})"
                );
                assert_eq!(set, want_set, "{name} case {case}");
                let r = unsafe { residual(&p, &q, rho, gamma) };
                assert!(close(r, want_res), "{name} case {case}: {r} vs {want_res}");
            }
        }
    }

    #[test]
    fn degenerate_pairs() {
        let p = [0.2, 0.3, 0.5];
        // Equal distributions: everything is accepted at rho = 1.
        assert_eq!(solve_rho(&p, &p, 4), (1.0, 1.0));
        // Disjoint supports: nothing can be accepted, the residual is q.
        let (a, b) = ([0.5, 0.5, 0.0], [0.0, 0.0, 1.0]);
        let (rho, beta) = solve_rho(&a, &b, 3);
        assert_eq!((rho, beta), (1.0, 0.0));
        let mut rng = ChaCha8Rng::seed_from_u64(22);
        for _ in 0..100 {
            let d = [sample_categorical(&a, &mut rng) as u32; 3];
            assert_eq!(
                kseq_step(&a, &b, &d, &mut rng),
                StepResult::Residual { token: 2 }
            );
        }
        // k = 1 is speculative sampling: rho = 1, beta = sum min(p, q).
        assert_eq!(solve_rho(&[0.7, 0.3], &[0.4, 0.6], 1), (1.0, 0.7));
    }

    const P: [f64; 6] = [0.30, 0.05, 0.20, 0.10, 0.15, 0.20];
    const Q: [f64; 6] = [0.10, 0.25, 0.20, 0.30, 0.05, 0.10];

    /// Counts of K-SEQ outputs and the number of acceptances over `n` steps.
    fn run(plan: &Plan, n: usize, seed: u64) -> ([u64; 6], u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut counts = [0u64; 6];
        let mut accepted = 0;
        let mut draws = vec![0u32; plan.k];
        for _ in 0..n {
            for d in &mut draws {
                *d = sample_categorical(&P, &mut rng) as u32;
            }
            let r = plan.step(&P, &Q, &draws, &mut rng);
            accepted += matches!(r, StepResult::Accepted { .. }) as u64;
            counts[r.token() as usize] += 1;
        }
        (counts, accepted)
    }

    // 200_000 steps: 1% total variation gives noncentrality >= 80 on 5 dof
    // (threshold near 26 at p = 1e-4). Acceptance rates are checked to 5
    // binomial standard errors (at most 0.0011 each).
    const N: usize = 200_000;

    #[test]
    fn kseq_emits_the_target_and_accepts_at_the_predicted_rate() {
        for (i, k) in [1, 2, 3, 4, 8].into_iter().enumerate() {
            let plan = KSeq::default().plan(&P, &Q, k);
            let (counts, accepted) = run(&plan, N, 30 + i as u64);
            let gof = chi_square_gof(&counts, &Q);
            assert!(gof.p_value > 1e-4, "k {k}: p = {}", gof.p_value);
            let rate = accepted as f64 / N as f64;
            let want = plan.acceptance();
            let se = (want * (1.0 - want) / N as f64).sqrt();
            assert!((rate - want).abs() < 5.0 * se, "k {k}: {rate} vs {want}");
        }
    }

    #[test]
    fn kseq_with_rho_forced_to_one_is_caught() {
        for (i, k) in [2, 4].into_iter().enumerate() {
            let (counts, _) = run(&Plan::naive(&P, &Q, k), N, 40 + i as u64);
            let p = chi_square_gof(&counts, &Q).p_value;
            assert!(p < 1e-12, "k {k}: naive K-SEQ passed with p = {p}");
        }
    }

    #[test]
    fn a_valid_rho_above_the_root_stays_exact() {
        let plan = Plan::at_rho(&P, &Q, 4, 3.0);
        assert!(plan.rho > KSeq::default().plan(&P, &Q, 4).rho);
        let (counts, _) = run(&plan, N, 50);
        assert!(chi_square_gof(&counts, &Q).p_value > 1e-4);
    }

    #[test]
    fn k_one_makes_the_decisions_of_standard_speculative_sampling() {
        let mut gen = ChaCha8Rng::seed_from_u64(60);
        for case in 0..2000 {
            let n = [2, 6, 50][case % 3];
            let p = random_dist(n, 4.0, 0.1, &mut gen);
            let q = random_dist(n, 4.0, 0.1, &mut gen);
            let x = sample_categorical(&p, &mut gen);
            let seed = gen.random::<u64>();
            let ours = kseq_step(&p, &q, &[x as u32], &mut ChaCha8Rng::seed_from_u64(seed));
            let theirs = speculative_step(&p, &q, x, &mut ChaCha8Rng::seed_from_u64(seed));
            let same = match (ours, theirs) {
                (StepResult::Accepted { token, .. }, SpecStep::Accepted(t)) => token as usize == t,
                (StepResult::Residual { token }, SpecStep::Resampled(t)) => token as usize == t,
                _ => false,
            };
            assert!(same, "case {case}: {ours:?} vs {theirs:?}");
        }
    }

    #[test]
    fn residual_draws_follow_the_residual_on_a_large_vocabulary() {
        // Forced residual draws (no drafts examined) over 10_000 tokens,
        // binned into 20 equal-probability bins of the residual.
        let mut rng = ChaCha8Rng::seed_from_u64(70);
        let p = random_dist(10_000, 6.0, 0.05, &mut rng);
        let q = random_dist(10_000, 6.0, 0.05, &mut rng);
        let plan = KSeq::default().plan(&p, &q, 4);
        let w: Vec<f64> = p
            .iter()
            .zip(&q)
            .map(|(&pp, &qq)| (qq - plan.gamma * (plan.rho * pp).min(qq)).max(0.0))
            .collect();
        let total: f64 = w.iter().sum();
        let bins = 20;
        let mut bin_of = vec![0usize; w.len()];
        let mut probs = vec![0.0; bins];
        let mut acc = 0.0;
        for (i, &x) in w.iter().enumerate() {
            let b = ((acc / total * bins as f64) as usize).min(bins - 1);
            bin_of[i] = b;
            probs[b] += x / total;
            acc += x;
        }
        let mut counts = vec![0u64; bins];
        for _ in 0..N {
            counts[bin_of[plan.sample_residual(&p, &q, &mut rng)]] += 1;
        }
        let gof = chi_square_gof(&counts, &probs);
        assert!(gof.p_value > 1e-4, "p = {}", gof.p_value);
    }
}
