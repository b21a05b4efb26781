//! The scoring rules: how trial times become medians, intervals, speedups
//! and performance-profile scores.
//!
//! A time is `f64` seconds to reach the target; [`MISS`] (`f64::INFINITY`)
//! records a trial that did not reach it within the budget. Misses are data,
//! not errors: they take part in medians (a configuration that misses in
//! most trials has an infinite median), in bootstrap intervals (a percentile
//! may be infinite) and in performance profiles (a miss never counts as
//! solved). NaN and negative times are never valid (records are checked when
//! read); each function says what it does with one rather than guess a time.
//!
//! The performance profile follows Dolan & Moré, "Benchmarking optimization
//! software with performance profiles" (Math. Prog. 91, 2002), as AlgoPerf
//! uses it (`scoring/performance_profile.py` in mlcommons/algorithmic-efficiency):
//! ratios to the fastest method per problem, `rho(tau)` = share of problems
//! with ratio `<= tau` on a linspace grid of `tau` over `[1, MAX_TAU]`, and
//! the score is the trapezoid integral of `rho` divided by `MAX_TAU - 1`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// The recorded time of a trial that missed its target.
pub const MISS: f64 = f64::INFINITY;
/// Default confidence level of [`bootstrap_ci`].
pub const DEFAULT_LEVEL: f64 = 0.95;
/// Default number of bootstrap resamples: enough that the 2.5 % and 97.5 %
/// order statistics rest on 50 resamples each.
pub const DEFAULT_RESAMPLES: usize = 2000;
/// Largest ratio to the fastest method that still counts as solved (AlgoPerf's
/// `max_tau`); a method more than 4x slower than the best on a problem scores
/// it as a miss.
pub const MAX_TAU: f64 = 4.0;
/// Default number of grid points for the profile integral. With 1001 points
/// the grid step is 0.003, so the trapezoid rule is within
/// `1 / (2 * (1001 - 1)) = 5e-4` of the exact integral of the step function
/// (see [`PerformanceProfile::trapezoid_error_bound`]).
pub const DEFAULT_TAU_POINTS: usize = 1001;

/// Median of `xs`, with misses taking part: sorted by `f64::total_cmp`, so
/// `inf` sorts above every finite time. An even count gives the mean of the
/// two middle values, which is `inf` if either is. An empty slice gives NaN.
pub fn median(xs: &[f64]) -> f64 {
    median_in_place(&mut xs.to_vec())
}

/// [`median`] that reorders `v` instead of copying it (the bootstrap calls
/// this once per resample).
fn median_in_place(v: &mut [f64]) -> f64 {
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    let mid = n / 2;
    let (below, &mut upper, _) = v.select_nth_unstable_by(mid, f64::total_cmp);
    if n % 2 == 1 {
        return upper;
    }
    let lower = below
        .iter()
        .copied()
        .max_by(f64::total_cmp)
        .expect("an even, non-zero count leaves at least one value below the middle");
    // Halve before adding: `inf` stays `inf` and `f64::MAX` does not overflow.
    0.5 * lower + 0.5 * upper
}

/// Percentile-bootstrap interval for `stat` over `xs` at confidence `level`
/// (e.g. [`DEFAULT_LEVEL`]), from `resamples` resamples drawn with a ChaCha8
/// generator seeded by `seed`, so the same inputs always give the same
/// interval.
///
/// The bounds are order statistics of the resampled statistics, rounded
/// outwards (the lower bound at index `floor(a/2 * (B-1))`, the upper at
/// `ceil((1-a/2) * (B-1))` of the sorted `B` values), so the interval never
/// interpolates between a finite value and `inf` and is, if anything,
/// slightly wide. A bound is `inf` when enough resamples have an infinite
/// statistic. One sample gives `(stat(xs), stat(xs))`; none gives NaNs.
///
/// # Panics
/// If `level` is not inside `(0, 1)` or `resamples` is zero: both are
/// constants chosen by the caller, not data.
pub fn bootstrap_ci(
    xs: &[f64],
    stat: impl Fn(&[f64]) -> f64,
    level: f64,
    resamples: usize,
    seed: u64,
) -> (f64, f64) {
    assert!(
        level > 0.0 && level < 1.0,
        "bootstrap level must be inside (0, 1), got {level}"
    );
    assert!(resamples > 0, "bootstrap needs at least one resample");
    match xs.len() {
        0 => return (f64::NAN, f64::NAN),
        1 => {
            let s = stat(xs);
            return (s, s);
        }
        _ => {}
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut sample = vec![0.0; xs.len()];
    let mut stats: Vec<f64> = (0..resamples)
        .map(|_| {
            for slot in sample.iter_mut() {
                *slot = xs[rng.random_range(0..xs.len())];
            }
            stat(&sample)
        })
        .collect();
    stats.sort_unstable_by(f64::total_cmp);
    let tail = (1.0 - level) / 2.0;
    let last = (resamples - 1) as f64;
    let lo = (tail * last).floor() as usize;
    let hi = (((1.0 - tail) * last).ceil() as usize).min(resamples - 1);
    (stats[lo], stats[hi])
}

/// Per-trial speedups of a method over the reference, and how many trial
/// pairs carried no information.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairedSpeedups {
    /// `reference / method` for each informative pair, in trial order.
    pub ratios: Vec<f64>,
    /// Pairs where both missed (or a time was invalid): dropped, since
    /// neither time says anything about the other.
    pub dropped: usize,
}

/// Speedup of `method` over `reference`, trial by trial (trial `i` of each ran
/// with the same seed), as `reference / method`:
///
/// | reference | method | speedup |
/// |-----------|--------|---------|
/// | finite    | finite | `ref / method` (equal times, zero included, give 1) |
/// | finite    | miss   | 0 |
/// | miss      | finite | `inf` |
/// | miss      | miss   | dropped, counted in `dropped` |
///
/// A method time of 0 against a positive reference gives `inf` (a mock
/// clock can record 0 s). A pair with a NaN or negative time carries no
/// usable information either and is dropped the same way.
///
/// # Panics
/// If the slices differ in length: pairing trials by seed is the caller's
/// job, and a silent truncation would hide a missing trial.
pub fn paired_speedups(reference: &[f64], method: &[f64]) -> PairedSpeedups {
    assert_eq!(
        reference.len(),
        method.len(),
        "paired speedups need one method trial per reference trial; pair trials by seed first"
    );
    let valid = |t: f64| t >= 0.0; // false for NaN
    let mut ratios = Vec::with_capacity(reference.len());
    let mut dropped = 0;
    for (&r, &m) in reference.iter().zip(method) {
        if !valid(r) || !valid(m) {
            dropped += 1;
            continue;
        }
        match (r.is_finite(), m.is_finite()) {
            (false, false) => dropped += 1,
            (true, false) => ratios.push(0.0),
            (false, true) => ratios.push(f64::INFINITY),
            (true, true) if r == m => ratios.push(1.0),
            (true, true) => ratios.push(r / m),
        }
    }
    PairedSpeedups { ratios, dropped }
}

/// Median paired speedup with its bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Speedup {
    /// Median of the paired ratios; NaN when no pair was informative.
    pub median: f64,
    /// Bootstrap interval of the median at [`DEFAULT_LEVEL`].
    pub lo: f64,
    pub hi: f64,
    /// Informative pairs the median is over.
    pub pairs: usize,
    /// Pairs where both missed (see [`paired_speedups`]).
    pub dropped: usize,
}

/// [`paired_speedups`] summarised as a median with a [`DEFAULT_LEVEL`]
/// percentile-bootstrap interval ([`DEFAULT_RESAMPLES`] resamples, `seed`).
///
/// # Panics
/// As [`paired_speedups`], if the slices differ in length.
pub fn speedup_summary(reference: &[f64], method: &[f64], seed: u64) -> Speedup {
    let paired = paired_speedups(reference, method);
    let (lo, hi) = bootstrap_ci(
        &paired.ratios,
        median,
        DEFAULT_LEVEL,
        DEFAULT_RESAMPLES,
        seed,
    );
    Speedup {
        median: median(&paired.ratios),
        lo,
        hi,
        pairs: paired.ratios.len(),
        dropped: paired.dropped,
    }
}

/// Geometric mean of the finite, positive speedups, and how many there were;
/// `None` if there are none. Misses on either side (0: the method missed,
/// `inf`: the reference missed) have no finite logarithm, so they are left
/// out; report the count beside the mean so a reader sees how many remained.
pub fn geometric_mean_speedup(speedups: &[f64]) -> Option<(f64, usize)> {
    let (sum, used) = speedups
        .iter()
        .filter(|s| s.is_finite() && **s > 0.0)
        .fold((0.0, 0usize), |(sum, n), s| (sum + s.ln(), n + 1));
    (used > 0).then(|| ((sum / used as f64).exp(), used))
}

/// `num_points` evenly spaced values of `tau` from 1 to [`MAX_TAU`], both
/// ends included exactly (AlgoPerf's `np.linspace(min_tau, max_tau, num)`).
///
/// # Panics
/// If `num_points < 2`: a trapezoid needs two ends.
pub fn tau_grid(num_points: usize) -> Vec<f64> {
    assert!(num_points >= 2, "a tau grid needs at least 2 points");
    let step = (MAX_TAU - 1.0) / (num_points - 1) as f64;
    (0..num_points)
        .map(|k| {
            if k == num_points - 1 {
                MAX_TAU
            } else {
                1.0 + step * k as f64
            }
        })
        .collect()
}

/// Performance ratios `r[m][p] = t[m][p] / min_m t[m][p]`. A problem every
/// method missed gives `inf` for all; a time equal to the best gives exactly
/// 1 (so a best time of 0 s gives 1 for the methods that tied it and `inf`
/// for the rest). A NaN time is ignored in the minimum and gives a NaN
/// ratio, which no `tau` admits.
pub fn performance_ratios(times: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let problems = times.first().map_or(0, Vec::len);
    let best: Vec<f64> = (0..problems)
        .map(|p| times.iter().map(|row| row[p]).fold(f64::INFINITY, f64::min))
        .collect();
    times
        .iter()
        .map(|row| {
            row.iter()
                .zip(&best)
                .map(|(&t, &b)| {
                    if b.is_infinite() {
                        f64::INFINITY
                    } else if t == b {
                        1.0
                    } else {
                        t / b
                    }
                })
                .collect()
        })
        .collect()
}

/// `rho(tau)` for one method: the share of problems with ratio `<= tau`, at
/// each of `taus`. No problems gives 0 everywhere.
pub fn profile_curve(ratios: &[f64], taus: &[f64]) -> Vec<f64> {
    if ratios.is_empty() {
        return vec![0.0; taus.len()];
    }
    let mut sorted = ratios.to_vec();
    sorted.sort_unstable_by(f64::total_cmp);
    let n = sorted.len() as f64;
    taus.iter()
        .map(|&tau| sorted.partition_point(|&r| r <= tau) as f64 / n)
        .collect()
}

/// Trapezoid integral of `rho` over `taus`, divided by the span of `taus`:
/// 1 for a method within a factor `taus[0]` of the best everywhere, 0 for
/// one that never comes within the largest `tau`.
pub fn profile_score(rho: &[f64], taus: &[f64]) -> f64 {
    debug_assert_eq!(rho.len(), taus.len());
    let span = match (taus.first(), taus.last()) {
        (Some(a), Some(b)) if b > a => b - a,
        _ => return f64::NAN,
    };
    let area: f64 = taus
        .windows(2)
        .zip(rho.windows(2))
        .map(|(t, r)| 0.5 * (t[1] - t[0]) * (r[0] + r[1]))
        .sum();
    area / span
}

/// A performance profile over methods and problems, with each method's
/// score `B`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PerformanceProfile {
    pub methods: Vec<String>,
    pub problems: Vec<String>,
    /// `ratios[m][p]`: method `m`'s time on problem `p` over the best time
    /// on `p`. Kept unclipped; ratios above [`MAX_TAU`] never count in `rho`.
    pub ratios: Vec<Vec<f64>>,
    /// The grid of `tau`, from 1 to [`MAX_TAU`].
    pub taus: Vec<f64>,
    /// `rho[m][k]`: share of problems method `m` solved within `taus[k]` of
    /// the best.
    pub rho: Vec<Vec<f64>>,
    /// `score[m]`: normalised area under `rho[m]`, in `[0, 1]`.
    pub score: Vec<f64>,
}

impl PerformanceProfile {
    /// Profile of `times[method][problem]` (seconds, `inf` for a miss) on the
    /// default grid of [`DEFAULT_TAU_POINTS`] points. A NaN time never
    /// compares `<= tau`, so it counts as a miss.
    ///
    /// # Panics
    /// If `times` is not `methods.len()` rows of `problems.len()` times: the
    /// caller builds the matrix from these very lists.
    pub fn new(methods: Vec<String>, problems: Vec<String>, times: Vec<Vec<f64>>) -> Self {
        Self::with_grid(methods, problems, times, DEFAULT_TAU_POINTS)
    }

    /// [`PerformanceProfile::new`] on a grid of `num_points` values of `tau`.
    ///
    /// # Panics
    /// As [`PerformanceProfile::new`], and if `num_points < 2`.
    pub fn with_grid(
        methods: Vec<String>,
        problems: Vec<String>,
        times: Vec<Vec<f64>>,
        num_points: usize,
    ) -> Self {
        assert_eq!(
            times.len(),
            methods.len(),
            "performance profile: one row of times per method"
        );
        for (m, row) in methods.iter().zip(&times) {
            assert_eq!(
                row.len(),
                problems.len(),
                "performance profile: method {m} needs one time per problem"
            );
        }
        let ratios = performance_ratios(&times);
        let taus = tau_grid(num_points);
        let rho: Vec<Vec<f64>> = ratios.iter().map(|r| profile_curve(r, &taus)).collect();
        let score = rho.iter().map(|r| profile_score(r, &taus)).collect();
        Self {
            methods,
            problems,
            ratios,
            taus,
            rho,
            score,
        }
    }

    /// How far a score on this grid can be from the exact integral of the
    /// step function `rho`: the trapezoid rule is exact on every grid
    /// interval without a jump, and on an interval of width `h` holding a
    /// jump of height `j` it errs by at most `h * j / 2`. Jumps add up to at
    /// most 1, so the score errs by at most `h / (2 * (MAX_TAU - 1))`, which
    /// is `1 / (2 * (num_points - 1))` on a linspace grid.
    pub fn trapezoid_error_bound(&self) -> f64 {
        1.0 / (2.0 * (self.taus.len() - 1) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INF: f64 = f64::INFINITY;

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    #[test]
    fn median_counts_misses() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        // One miss of three: the middle value is still finite.
        assert_eq!(median(&[INF, 1.0, 2.0]), 2.0);
        // Two of three missed: the median is a miss.
        assert_eq!(median(&[INF, 1.0, INF]), INF);
        // Even count with a miss in the middle pair: inf.
        assert_eq!(median(&[1.0, INF, 2.0, INF]), INF);
        assert_eq!(median(&[1.0, 2.0, 3.0, INF]), 2.5);
        assert_eq!(median(&[INF, INF]), INF);
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[f64::MAX, f64::MAX]), f64::MAX);
    }

    #[test]
    fn bootstrap_is_deterministic_and_covers_the_median() {
        let xs = [1.2, 0.9, 1.5, 1.1, 1.0, 1.3, 0.8, 1.4, 1.05, 1.25];
        let a = bootstrap_ci(&xs, median, 0.95, 2000, 7);
        let b = bootstrap_ci(&xs, median, 0.95, 2000, 7);
        assert_eq!(a, b);
        let m = median(&xs);
        assert!(a.0 <= m && m <= a.1, "{a:?} should contain {m}");
        assert!(
            a.0 < a.1,
            "ten distinct values give a non-degenerate interval"
        );
        // The bounds are order statistics of medians of the sample, so they
        // lie within the sample's range.
        assert!(a.0 >= 0.8 && a.1 <= 1.5);
        // Another seed draws other resamples (the interval may or may not
        // move, but the draws must differ: check with a statistic that sees
        // every draw).
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
        assert_ne!(
            bootstrap_ci(&xs, mean, 0.95, 2000, 7),
            bootstrap_ci(&xs, mean, 0.95, 2000, 8)
        );
    }

    #[test]
    fn bootstrap_edge_cases() {
        assert_eq!(bootstrap_ci(&[2.5], median, 0.95, 2000, 1), (2.5, 2.5));
        assert_eq!(bootstrap_ci(&[INF], median, 0.95, 2000, 1), (INF, INF));
        let (lo, hi) = bootstrap_ci(&[], median, 0.95, 2000, 1);
        assert!(lo.is_nan() && hi.is_nan());
        assert_eq!(bootstrap_ci(&[3.0; 5], median, 0.95, 100, 1), (3.0, 3.0));
        // Four misses of five: a resample's median is finite only if at
        // least 3 of its 5 draws hit the one finite value, P = 0.058. That
        // is above the 2.5 % tail, so the lower bound is 1 and the upper inf.
        let (lo, hi) = bootstrap_ci(&[1.0, INF, INF, INF, INF], median, 0.95, 2000, 3);
        assert_eq!((lo, hi), (1.0, INF));
        // All misses: (inf, inf), not NaN.
        assert_eq!(bootstrap_ci(&[INF; 4], median, 0.95, 2000, 3), (INF, INF));
    }

    /// The 95 % interval of the median must cover the true median about 95 %
    /// of the time. 400 independent samples of 31 draws from Exp(1) (true
    /// median ln 2); with true coverage 0.95 the count of covers is
    /// Binomial(400, 0.95): mean 380, sd 4.4. Accept 360..=396 (-4.5 sd to
    /// +3.6 sd; the percentile bootstrap of a median is slightly off nominal
    /// at n = 31, and seeds 1, 2 and 2024 gave 376, 377 and 381). A broken
    /// resampler fails: drawing without replacement gives a zero-width
    /// interval (coverage 0), and a 50 % interval covers 239 times.
    #[test]
    fn bootstrap_interval_has_nominal_coverage() {
        let mut rng = ChaCha8Rng::seed_from_u64(2024);
        // Exp(1) by inversion; `1 - u` keeps the logarithm finite.
        let mut exp = || -(1.0 - rng.random::<f64>()).ln();
        let truth = std::f64::consts::LN_2;
        let reps = 400;
        let covered = (0..reps)
            .filter(|&rep| {
                let xs: Vec<f64> = (0..31).map(|_| exp()).collect();
                let (lo, hi) = bootstrap_ci(&xs, median, 0.95, 1000, rep);
                lo <= truth && truth <= hi
            })
            .count();
        assert!(
            (360..=396).contains(&covered),
            "95% interval covered the true median {covered} times of {reps}"
        );
    }

    #[test]
    fn paired_speedups_with_misses() {
        let reference = [2.0, 4.0, INF, INF, 3.0, 0.0, f64::NAN];
        let method = [1.0, INF, 2.0, INF, 3.0, 0.0, 1.0];
        let p = paired_speedups(&reference, &method);
        assert_eq!(p.ratios, vec![2.0, 0.0, INF, 1.0, 1.0]);
        assert_eq!(p.dropped, 2);

        let s = speedup_summary(&reference, &method, 11);
        assert_eq!((s.pairs, s.dropped), (5, 2));
        // Sorted ratios 0, 1, 1, 2, inf: the median is 1.
        assert_eq!(s.median, 1.0);
        assert!(s.lo <= 1.0 && 1.0 <= s.hi);
        assert_eq!(s, speedup_summary(&reference, &method, 11));

        let all_missed = speedup_summary(&[INF; 3], &[INF; 3], 0);
        assert_eq!((all_missed.pairs, all_missed.dropped), (0, 3));
        assert!(all_missed.median.is_nan() && all_missed.lo.is_nan());
    }

    #[test]
    #[should_panic(expected = "pair trials by seed")]
    fn paired_speedups_need_equal_lengths() {
        paired_speedups(&[1.0, 2.0], &[1.0]);
    }

    #[test]
    fn geometric_mean_skips_misses() {
        let (g, used) = geometric_mean_speedup(&[2.0, 8.0, 0.0, INF, f64::NAN]).unwrap();
        assert_eq!(used, 2);
        assert!((g - 4.0).abs() < 1e-12);
        assert_eq!(geometric_mean_speedup(&[0.0, INF]), None);
        assert_eq!(geometric_mean_speedup(&[]), None);
    }

    #[test]
    fn tau_grid_is_a_linspace_with_exact_ends() {
        let g = tau_grid(DEFAULT_TAU_POINTS);
        assert_eq!(g.len(), 1001);
        assert_eq!((g[0], g[1000]), (1.0, 4.0));
        assert!((g[500] - 2.5).abs() < 1e-12);
        assert!(g.windows(2).all(|w| (w[1] - w[0] - 0.003).abs() < 1e-12));
    }

    /// Two methods on three problems, computed by hand.
    ///
    /// Times A = [1, 2, 3], B = [2, 1, miss]; best per problem [1, 1, 3].
    /// Ratios A = [1, 2, 1], B = [2, 1, inf].
    /// rho_A = 2/3 on [1, 2) and 1 on [2, 4]; exact B_A = (2/3 + 2)/3 = 8/9.
    /// rho_B = 1/3 on [1, 2) and 2/3 on [2, 4]; exact B_B = (1/3 + 4/3)/3 = 5/9.
    #[test]
    fn profile_two_methods_three_problems() {
        let times = vec![vec![1.0, 2.0, 3.0], vec![2.0, 1.0, INF]];
        let p = PerformanceProfile::new(names("m", 2), names("p", 3), times.clone());
        assert_eq!(p.ratios, vec![vec![1.0, 2.0, 1.0], vec![2.0, 1.0, INF]]);
        let at = |m: usize, tau: f64| profile_curve(&p.ratios[m], &[tau])[0];
        for (tau, a, b) in [(1.0, 2.0 / 3.0, 1.0 / 3.0), (1.999, 2.0 / 3.0, 1.0 / 3.0)]
            .into_iter()
            .chain([
                (2.0, 1.0, 2.0 / 3.0),
                (4.0, 1.0, 2.0 / 3.0),
                (1e9, 1.0, 2.0 / 3.0),
            ])
        {
            assert_eq!((at(0, tau), at(1, tau)), (a, b), "rho at tau = {tau}");
        }
        let bound = p.trapezoid_error_bound();
        assert_eq!(bound, 5e-4);
        assert!((p.score[0] - 8.0 / 9.0).abs() <= bound, "{}", p.score[0]);
        assert!((p.score[1] - 5.0 / 9.0).abs() <= bound, "{}", p.score[1]);

        // On a 7-point grid (step 0.5) tau = 2 is a grid point and the jump
        // sits in [1.5, 2]; by hand, A's trapezoid area is
        // 0.5 * 2/3 + 0.5 * (2/3 + 1)/2 + 2 * 1 = 2.75, so B_A = 11/12, which
        // is 8/9 + 0.5 * (1/3) / 2 / 3: the error is exactly the bound's
        // h * j / 2 / 3 for the one jump j = 1/3.
        let coarse = PerformanceProfile::with_grid(names("m", 2), names("p", 3), times, 7);
        assert_eq!(coarse.taus, vec![1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]);
        assert_eq!(
            coarse.rho[0],
            vec![2.0 / 3.0, 2.0 / 3.0, 1.0, 1.0, 1.0, 1.0, 1.0]
        );
        assert!((coarse.score[0] - 11.0 / 12.0).abs() < 1e-12);
        assert!((coarse.score[0] - 8.0 / 9.0).abs() <= coarse.trapezoid_error_bound());
    }

    /// Best everywhere scores 1; twice the best everywhere scores 2/3 on the
    /// step function (rho jumps from 0 to 1 at tau = 2: area 2 over span 3);
    /// missing everything, or being more than 4x slower, scores 0.
    #[test]
    fn profile_extremes() {
        let times = vec![
            vec![1.0, 10.0, 0.5],
            vec![2.0, 20.0, 1.0],
            vec![INF, INF, INF],
            vec![5.0, 50.0, 2.5],
        ];
        let p = PerformanceProfile::new(names("m", 4), names("p", 3), times);
        assert!((p.score[0] - 1.0).abs() < 1e-12, "{}", p.score[0]);
        assert!(p.rho[0].iter().all(|&r| r == 1.0));
        // 2 is not a grid point (1.999, 2.002 are), so the trapezoid differs
        // from 2/3, by less than the stated bound.
        assert!(
            (p.score[1] - 2.0 / 3.0).abs() <= p.trapezoid_error_bound(),
            "{}",
            p.score[1]
        );
        assert_ne!(p.score[1], 2.0 / 3.0);
        assert_eq!(p.score[2], 0.0);
        assert!(p.rho[2].iter().all(|&r| r == 0.0));
        assert_eq!(p.ratios[3], vec![5.0, 5.0, 5.0]);
        assert_eq!(p.score[3], 0.0);
    }

    #[test]
    fn profile_problem_every_method_missed() {
        let times = vec![vec![1.0, INF], vec![1.0, INF]];
        let p = PerformanceProfile::new(names("m", 2), names("p", 2), times);
        assert_eq!(p.ratios, vec![vec![1.0, INF], vec![1.0, INF]]);
        // Half the problems solved at every tau.
        assert!((p.score[0] - 0.5).abs() < 1e-12);
        assert_eq!(p.score[0], p.score[1]);
    }

    #[test]
    fn profile_counts_nan_as_a_miss() {
        let times = vec![vec![1.0, f64::NAN], vec![2.0, 1.0]];
        let p = PerformanceProfile::new(names("m", 2), names("p", 2), times);
        assert_eq!(p.ratios[1], vec![2.0, 1.0]);
        assert!(p.ratios[0][1].is_nan());
        assert_eq!(*p.rho[0].last().unwrap(), 0.5);
    }

    #[test]
    #[should_panic(expected = "method m0 needs one time per problem")]
    fn profile_rejects_a_ragged_matrix() {
        PerformanceProfile::new(names("m", 1), names("p", 2), vec![vec![1.0]]);
    }
}
