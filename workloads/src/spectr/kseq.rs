//! K-SEQ, SpecTr's k-sequential draft selection for one token position
//! (Sun et al., "SpecTr", arXiv 2310.15141, Sec. 4, Algorithm 2 "K-SEQ").
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
//! position, so `rho*` must cost a few passes over the vocabulary, not a
//! bisection of ~50. Write `s(rho) = rho * beta(rho) = sum_y min(rho p, q)`:
//! it is concave and piecewise linear, with slope `a(rho) = sum_{q >= rho p}
//! p`, and a breakpoint at each ratio `q(y)/p(y)` in `[1, k]`. One pass at
//! `rho` gives `s` and `a`; freezing which tokens lie on which side gives a
//! model `s ~ a rho + b` that is exact up to the next breakpoint, and its
//! root (a scalar equation) is a Newton-like step. A few such steps, kept
//! inside a bracket `f(lo) > 0 >= f(hi)`, get within 0.1% of the root; one
//! last pass then collects the few tokens whose ratio lies in a narrow
//! window around it, with exact sums for everything outside, and the root is
//! solved exactly over those breakpoints, sorted. Passes are branch-free
//! with four accumulators so they vectorise; `p(y) = 0` needs no special
//! case (the token always counts on the `a` side with weight zero).

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
/// draws.len()`. Allocates only when the root search needs a window (see
/// [`KSeq`] to reuse that buffer across steps).
pub fn kseq_step<R: Rng + ?Sized>(p: &[f64], q: &[f64], draws: &[u32], rng: &mut R) -> StepResult {
    KSeq::default()
        .plan(p, q, draws.len())
        .step(p, q, draws, rng)
}

/// Reusable K-SEQ solver: holds the scratch buffer of the root search.
#[derive(Debug, Default)]
pub struct KSeq {
    window: Vec<(f64, f64, f64)>,
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

/// Above this relative step the Newton-like iteration goes on over the
/// whole vocabulary; below it, the last pass collects a window.
const WINDOW_STEP: f64 = 1e-3;
/// Iterations before the search falls back to halving the bracket.
const NEWTON_ITERATIONS: usize = 12;
const MAX_ITERATIONS: usize = 200;

impl KSeq {
    /// Solves for `rho*` and returns the plan for `k` drafts.
    ///
    /// # Panics
    /// If `k == 0` or `p` and `q` differ in length.
    pub fn plan(&mut self, p: &[f64], q: &[f64], k: usize) -> Plan {
        assert!(k >= 1, "K-SEQ needs at least one draft");
        assert_eq!(p.len(), q.len(), "draft and target vocabularies differ");
        let (s1, a1) = pass(p, q, 1.0);
        if k == 1 {
            return Plan {
                k,
                rho: 1.0,
                beta: s1,
                gamma: 1.0,
            };
        }
        let kf = k as f64;
        // f(1) = 1 - (1 - beta)^k - beta >= 0, with equality only when
        // beta(1) is 0 or 1 (disjoint or equal distributions).
        let mut cur = Point::new(1.0, a1, s1 - a1, k);
        if cur.f <= 0.0 {
            return Plan::from_point(&cur, k);
        }
        let mut lo = cur;
        // f(k) <= 0 always (k beta(k) = sum min(k p, q) >= 1 - (1 - beta)^k);
        // its sums are computed only if the search ends there.
        let mut hi: Option<Point> = None;
        let mut hi_rho = kf;
        for iteration in 0..MAX_ITERATIONS {
            let cand = if iteration < NEWTON_ITERATIONS {
                segment_root(cur.a, cur.b, k, lo.rho, hi_rho)
            } else {
                0.5 * (lo.rho + hi_rho)
            };
            let narrow = (hi_rho - lo.rho) <= WINDOW_STEP * lo.rho;
            let step = (cand - cur.rho).abs() / cur.rho;
            if narrow || step < WINDOW_STEP {
                let half = if narrow {
                    f64::INFINITY
                } else {
                    4.0 * step + 1e-12
                };
                let wlo = lo.rho.max(cand * (1.0 - half));
                let whi = hi_rho.min(cand * (1.0 + half));
                match self.window_solve(p, q, k, wlo, whi) {
                    Ok(plan) => return plan,
                    Err((at_lo, at_hi)) => {
                        // The root is outside the window: tighten the
                        // bracket with the two exact evaluations and go on.
                        if at_lo.f > 0.0 {
                            lo = at_lo;
                        }
                        if at_hi.f > 0.0 {
                            lo = at_hi;
                        }
                        if at_lo.f <= 0.0 && at_lo.rho < hi_rho {
                            hi_rho = at_lo.rho;
                            hi = Some(at_lo);
                        }
                        if at_hi.f <= 0.0 && at_hi.rho < hi_rho {
                            hi_rho = at_hi.rho;
                            hi = Some(at_hi);
                        }
                        cur = if at_hi.f > 0.0 { at_hi } else { at_lo };
                        continue;
                    }
                }
            }
            let (s, a) = pass(p, q, cand);
            cur = Point::new(cand, a, s - cand * a, k);
            if cur.f > 0.0 {
                lo = cur;
            } else {
                hi_rho = cand;
                hi = Some(cur);
            }
        }
        // Not reached in practice; any bracket end with f <= 0 is valid.
        let end = hi.unwrap_or_else(|| {
            let (s, a) = pass(p, q, kf);
            Point::new(kf, a, s - kf * a, k)
        });
        Plan::from_point(&end, k)
    }

    /// Collects the breakpoints with ratio in `[wlo, whi)` and solves
    /// exactly if the root is inside; else returns the evaluations at the
    /// window's ends.
    fn window_solve(
        &mut self,
        p: &[f64],
        q: &[f64],
        k: usize,
        wlo: f64,
        whi: f64,
    ) -> Result<Plan, (Point, Point)> {
        let (a_out, b_out) = window_pass(p, q, wlo, whi, &mut self.window);
        let (mut a, mut b) = (a_out, b_out);
        for &(_, pp, _) in &self.window {
            a += pp;
        }
        let at_lo = Point::new(wlo, a, b, k);
        let b_in: f64 = self.window.iter().map(|&(_, _, qq)| qq).sum();
        let at_hi = Point::new(whi, a_out, b_out + b_in, k);
        if !(at_lo.f > 0.0 && at_hi.f <= 0.0) {
            return Err((at_lo, at_hi));
        }
        self.window.sort_unstable_by(|x, y| x.0.total_cmp(&y.0));
        let mut seg_lo = wlo;
        for &(r, pp, qq) in &self.window {
            // Up to and including r, this token is on the `a` side.
            if f_at(r, a, b, k) <= 0.0 {
                let rho = segment_root(a, b, k, seg_lo, r);
                return Ok(Plan::from_point(&Point::new(rho, a, b, k), k));
            }
            a -= pp;
            b += qq;
            seg_lo = r;
        }
        let rho = segment_root(a, b, k, seg_lo, whi);
        Ok(Plan::from_point(&Point::new(rho, a, b, k), k))
    }
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
        let (s, a) = pass(p, q, rho);
        Plan::from_point(&Point::new(rho, a, s - rho * a, k), k)
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
        let weight = |pp: f64, qq: f64| {
            let m = rho * pp;
            let m = if m < qq { m } else { qq };
            (qq - gamma * m).max(0.0)
        };
        let total: f64 = p
            .chunks(BLOCK)
            .zip(q.chunks(BLOCK))
            .map(|(pb, qb)| block_sum(pb, qb, weight))
            .sum();
        let v = rng.random::<f64>();
        if !(total > 0.0) {
            return baselines::sampling::sample_categorical(q, rng);
        }
        let target = v * total;
        let mut acc = 0.0;
        let mut last_positive = 0;
        for (block, (pb, qb)) in p.chunks(BLOCK).zip(q.chunks(BLOCK)).enumerate() {
            let sum = block_sum(pb, qb, weight);
            if acc + sum <= target {
                acc += sum;
                if sum > 0.0 {
                    last_positive = block * BLOCK + pb.len() - 1;
                }
                continue;
            }
            for (i, (&pp, &qq)) in pb.iter().zip(qb).enumerate() {
                let w = weight(pp, qq);
                if w > 0.0 {
                    acc += w;
                    last_positive = block * BLOCK + i;
                    if target < acc {
                        return last_positive;
                    }
                }
            }
        }
        // Rounding carried the target past the end.
        while last_positive > 0 && weight(p[last_positive], q[last_positive]) <= 0.0 {
            last_positive -= 1;
        }
        last_positive
    }
}

const BLOCK: usize = 256;

/// Sum of `weight` over a block with four independent accumulators.
#[inline]
fn block_sum(p: &[f64], q: &[f64], weight: impl Fn(f64, f64) -> f64) -> f64 {
    let mut acc = [0.0f64; 4];
    let (pc, qc) = (p.chunks_exact(4), q.chunks_exact(4));
    let (pr, qr) = (pc.remainder(), qc.remainder());
    for (a, b) in pc.zip(qc) {
        for l in 0..4 {
            acc[l] += weight(a[l], b[l]);
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (&a, &b) in pr.iter().zip(qr) {
        s += weight(a, b);
    }
    s
}

/// One pass at `rho`: `(s, a)` with `s = sum min(rho p, q)` and
/// `a = sum_{q >= rho p} p`.
fn pass(p: &[f64], q: &[f64], rho: f64) -> (f64, f64) {
    let mut s = [0.0f64; 4];
    let mut a = [0.0f64; 4];
    let (pc, qc) = (p.chunks_exact(4), q.chunks_exact(4));
    let (pr, qr) = (pc.remainder(), qc.remainder());
    for (pb, qb) in pc.zip(qc) {
        for l in 0..4 {
            let m = rho * pb[l];
            let above = qb[l] >= m;
            s[l] += if above { m } else { qb[l] };
            a[l] += if above { pb[l] } else { 0.0 };
        }
    }
    let mut s_tot = (s[0] + s[1]) + (s[2] + s[3]);
    let mut a_tot = (a[0] + a[1]) + (a[2] + a[3]);
    for (&pp, &qq) in pr.iter().zip(qr) {
        let m = rho * pp;
        if qq >= m {
            s_tot += m;
            a_tot += pp;
        } else {
            s_tot += qq;
        }
    }
    (s_tot, a_tot)
}

/// One pass for a window `[wlo, whi)` of ratios: returns
/// `(sum_{q >= whi p} p, sum_{q < wlo p} q)` and leaves the tokens in the
/// window in `out` as `(q/p, p, q)`.
fn window_pass(
    p: &[f64],
    q: &[f64],
    wlo: f64,
    whi: f64,
    out: &mut Vec<(f64, f64, f64)>,
) -> (f64, f64) {
    out.clear();
    let mut a = [0.0f64; 4];
    let mut b = [0.0f64; 4];
    for (i, (pb, qb)) in p.chunks(4).zip(q.chunks(4)).enumerate() {
        let mut inside = false;
        for l in 0..pb.len() {
            let (lo_m, hi_m) = (wlo * pb[l], whi * pb[l]);
            a[l] += if qb[l] >= hi_m { pb[l] } else { 0.0 };
            b[l] += if qb[l] < lo_m { qb[l] } else { 0.0 };
            inside |= qb[l] >= lo_m && qb[l] < hi_m;
        }
        if inside {
            for l in 0..pb.len() {
                let (pp, qq) = (pb[l], qb[l]);
                if qq >= wlo * pp && qq < whi * pp {
                    out.push((qq / pp, pp, qq));
                }
            }
        }
        let _ = i;
    }
    ((a[0] + a[1]) + (a[2] + a[3]), (b[0] + b[1]) + (b[2] + b[3]))
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
