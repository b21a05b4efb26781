//! Goodness-of-fit tests used by workload evaluation and sampler tests.
//!
//! Two tools, both for checking that a sampler is *exact*:
//!
//! * [`chi_square_gof`]: Pearson's test of counts against a known
//!   distribution (e.g. the exact joint law of the first tokens a decoder
//!   emits), with sparse cells pooled so the chi-square approximation holds.
//! * The randomised probability integral transform ([`pit_value`],
//!   [`pit_uniformity_p`]): for a token `y` emitted from a known discrete law
//!   `q`, `u = F(y - 1) + v q(y)` with `v ~ U(0, 1)` independent is exactly
//!   `U(0, 1)`. Applied token by token with each token's own conditional law
//!   (Rosenblatt's transform), a whole generated sequence becomes i.i.d.
//!   uniforms when, and only when, the sampler is exact; a histogram test of
//!   the `u`s then tests exactness over any number of positions and contexts
//!   at once.

use statrs::distribution::{ChiSquared, ContinuousCDF};

/// The outcome of a chi-square goodness-of-fit test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GofResult {
    /// Pearson's statistic over the pooled cells.
    pub statistic: f64,
    /// Degrees of freedom: pooled cells minus one.
    pub dof: usize,
    /// Upper-tail probability of `statistic`; `1` when nothing is testable
    /// (`dof == 0`), `0` when a cell of zero probability was observed.
    pub p_value: f64,
}

/// Cells whose expected count is below this are pooled (Cochran's rule).
const MIN_EXPECTED: f64 = 5.0;

/// The median of `xs` (the mean of the middle two for an even count; NaN
/// for none). Every workload's repeated timings go through this one.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// Pearson's chi-square test of `observed` counts against `expected_probs`
/// (normalised by their sum, so unnormalised weights are accepted).
///
/// Cells with expected count below 5 are pooled into one cell; if that pool
/// still expects fewer than 5, it is merged into the smallest remaining
/// cell. A count in a cell of probability zero is an impossible event: the
/// statistic is infinite and the p-value zero.
///
/// # Panics
/// If the slices differ in length or the probabilities have no positive sum.
pub fn chi_square_gof(observed: &[u64], expected_probs: &[f64]) -> GofResult {
    assert_eq!(
        observed.len(),
        expected_probs.len(),
        "chi_square_gof: {} counts against {} probabilities",
        observed.len(),
        expected_probs.len()
    );
    let total_p: f64 = expected_probs.iter().sum();
    assert!(
        total_p > 0.0,
        "chi_square_gof: probabilities sum to {total_p}"
    );
    let n = observed.iter().sum::<u64>() as f64;

    let mut cells: Vec<(f64, f64)> = Vec::with_capacity(observed.len());
    let (mut pool_obs, mut pool_exp) = (0.0, 0.0);
    for (&o, &p) in observed.iter().zip(expected_probs) {
        let e = n * p / total_p;
        if e <= 0.0 {
            if o > 0 {
                return GofResult {
                    statistic: f64::INFINITY,
                    dof: 0,
                    p_value: 0.0,
                };
            }
        } else if e < MIN_EXPECTED {
            pool_obs += o as f64;
            pool_exp += e;
        } else {
            cells.push((o as f64, e));
        }
    }
    if pool_exp > 0.0 {
        if pool_exp >= MIN_EXPECTED || cells.is_empty() {
            cells.push((pool_obs, pool_exp));
        } else {
            let smallest = cells
                .iter_mut()
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .expect("cells is not empty");
            smallest.0 += pool_obs;
            smallest.1 += pool_exp;
        }
    }
    let statistic: f64 = cells.iter().map(|&(o, e)| (o - e) * (o - e) / e).sum();
    let dof = cells.len().saturating_sub(1);
    let p_value = if dof == 0 {
        1.0
    } else {
        ChiSquared::new(dof as f64)
            .expect("positive degrees of freedom")
            .sf(statistic)
    };
    GofResult {
        statistic,
        dof,
        p_value,
    }
}

/// The randomised PIT of `token` under `dist`: `F(token - 1) + v * dist[token]`,
/// where `F` is the cumulative distribution and `v ~ U(0, 1)` is drawn by the
/// caller independently of the token. Exactly `U(0, 1)` when `token ~ dist`.
///
/// # Panics
/// If `token` is outside `dist`.
pub fn pit_value(dist: &[f64], token: u32, v_uniform: f64) -> f64 {
    let t = token as usize;
    let below: f64 = dist[..t].iter().sum();
    below + v_uniform * dist[t]
}

/// p-value of a chi-square test that `us` are uniform on `[0, 1)`, with
/// `bins` equal-width bins (values at or above 1, from rounding, go to the
/// last bin).
///
/// # Panics
/// If `bins` is zero.
pub fn pit_uniformity_p(us: &[f64], bins: usize) -> f64 {
    assert!(bins > 0, "pit_uniformity_p: need at least one bin");
    let mut counts = vec![0u64; bins];
    for &u in us {
        let b = ((u * bins as f64) as usize).min(bins - 1);
        counts[b] += 1;
    }
    chi_square_gof(&counts, &vec![1.0; bins]).p_value
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn draw(dist: &[f64], rng: &mut impl Rng) -> usize {
        baselines::sampling::sample_categorical(dist, rng)
    }

    #[test]
    fn statistic_and_p_value_match_a_hand_computed_case() {
        // Expected 50/50, observed 60/40: (10^2 + 10^2) / 50 = 4 on 1 dof,
        // whose upper tail is 0.0455 (tables: P(chi2_1 > 3.841) = 0.05).
        let r = chi_square_gof(&[60, 40], &[0.5, 0.5]);
        assert!((r.statistic - 4.0).abs() < 1e-12);
        assert_eq!(r.dof, 1);
        assert!((r.p_value - 0.045_500_26).abs() < 1e-6, "{}", r.p_value);
        // Unnormalised weights give the same answer.
        assert_eq!(chi_square_gof(&[60, 40], &[2.0, 2.0]), r);
        // A perfect fit.
        let r = chi_square_gof(&[10, 20, 30], &[1.0, 2.0, 3.0]);
        assert_eq!((r.statistic, r.dof, r.p_value), (0.0, 2, 1.0));
    }

    #[test]
    fn sparse_cells_are_pooled() {
        // 100 draws: cells expecting 1, 2 and 2 are pooled into one cell of
        // 5, leaving four cells and 3 dof.
        let probs = [0.01, 0.02, 0.02, 0.35, 0.3, 0.3];
        let r = chi_square_gof(&[1, 2, 2, 35, 30, 30], &probs);
        assert_eq!(r.dof, 3);
        assert_eq!(r.statistic, 0.0);
        // A pool that stays under 5 joins the smallest other cell.
        let r = chi_square_gof(&[1, 1, 48, 50], &[0.01, 0.01, 0.48, 0.5]);
        assert_eq!(r.dof, 1);
        // An impossible cell observed is a certain rejection.
        let r = chi_square_gof(&[1, 99], &[0.0, 1.0]);
        assert_eq!(r.p_value, 0.0);
        // Unobserved impossible cells are ignored.
        assert_eq!(chi_square_gof(&[0, 100], &[0.0, 1.0]).dof, 0);
    }

    // 100_000 draws: a sampler 1% off in total variation has noncentrality at
    // least 4 * N * 0.01^2 = 40 on 9 dof (threshold near 33 at p = 1e-4), and
    // the biased sampler below is 3% off (noncentrality >= 360).
    const N: usize = 100_000;
    const DIST: [f64; 10] = [0.3, 0.2, 0.1, 0.1, 0.08, 0.07, 0.05, 0.05, 0.03, 0.02];

    fn biased() -> Vec<f64> {
        let mut b = DIST.to_vec();
        b[0] -= 0.03;
        b[9] += 0.03;
        b
    }

    #[test]
    fn chi_square_passes_a_correct_sampler_and_rejects_a_biased_one() {
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        let mut good = [0u64; 10];
        let mut bad = [0u64; 10];
        let b = biased();
        for _ in 0..N {
            good[draw(&DIST, &mut rng)] += 1;
            bad[draw(&b, &mut rng)] += 1;
        }
        let pg = chi_square_gof(&good, &DIST).p_value;
        let pb = chi_square_gof(&bad, &DIST).p_value;
        assert!(pg > 1e-4, "correct sampler rejected: p = {pg}");
        assert!(pb < 1e-12, "biased sampler accepted: p = {pb}");
    }

    #[test]
    fn pit_values_cover_the_unit_interval() {
        assert_eq!(pit_value(&DIST, 0, 0.0), 0.0);
        assert!((pit_value(&DIST, 9, 1.0) - 1.0).abs() < 1e-12);
        assert!((pit_value(&DIST, 1, 0.5) - 0.4).abs() < 1e-12);
    }

    #[test]
    fn pit_passes_a_correct_sampler_and_rejects_a_biased_one() {
        // Each token comes from its own law (a different law per position),
        // as in a decoded sequence; only the per-token law is used.
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let laws = [DIST.to_vec(), DIST.iter().rev().copied().collect()];
        let b = biased();
        let mut good = Vec::with_capacity(N);
        let mut bad = Vec::with_capacity(N);
        for i in 0..N {
            let law = &laws[i % 2];
            let t = draw(law, &mut rng) as u32;
            good.push(pit_value(law, t, rng.random()));
            let t = draw(&b, &mut rng) as u32;
            bad.push(pit_value(&DIST, t, rng.random()));
        }
        let pg = pit_uniformity_p(&good, 20);
        let pb = pit_uniformity_p(&bad, 20);
        assert!(pg > 1e-4, "correct sampler rejected: p = {pg}");
        assert!(pb < 1e-12, "biased sampler accepted: p = {pb}");
    }
}
