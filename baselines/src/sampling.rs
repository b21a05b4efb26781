//! Reference samplers on plain probability vectors.
//!
//! * [`sample_categorical`]: one draw by inversion of the cumulative sum.
//! * [`speculative_step`]: one token of standard speculative sampling
//!   (Leviathan et al., arXiv 2211.17192, Sec. 2.3; Chen et al., arXiv
//!   2302.01318, Alg. 2): a draft token `x ~ p` is kept with probability
//!   `min(1, q(x)/p(x))`, otherwise a token is drawn from the residual
//!   `max(0, q - p)`, normalised. The output is distributed exactly as `q`.
//! * [`autoregressive`]: one token at a time from a next-token function.
//!
//! These favour clarity over speed; the SpecTr workload's K-SEQ sampler with
//! `k = 1` must make the same decisions as [`speculative_step`] from the same
//! random numbers, and its tests check that.

use rand::Rng;

/// One index drawn from `weights`, which must be non-negative with a
/// positive, finite sum; they need not sum to one.
///
/// Inversion: the first index whose running sum exceeds `u * total`, with
/// `u ~ U[0, 1)`. Should rounding leave `u * total` beyond the final running
/// sum, the last index with positive weight is returned, so an index of zero
/// weight is never returned.
///
/// # Panics
/// If the weights have no positive, finite total.
pub fn sample_categorical<R: Rng + ?Sized>(weights: &[f64], rng: &mut R) -> usize {
    let total: f64 = weights.iter().sum();
    assert!(
        total > 0.0 && total.is_finite(),
        "sample_categorical: weights must have a positive, finite sum (got {total})"
    );
    let target = rng.random::<f64>() * total;
    invert(weights.iter().copied(), target)
}

/// The first index whose running sum exceeds `target`, else the last index
/// of positive weight.
fn invert(weights: impl Iterator<Item = f64>, target: f64) -> usize {
    let mut acc = 0.0;
    let mut last_positive = 0;
    for (i, w) in weights.enumerate() {
        if w > 0.0 {
            acc += w;
            if target < acc {
                return i;
            }
            last_positive = i;
        }
    }
    last_positive
}

/// What one speculative-sampling step emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecStep {
    /// The draft token was kept.
    Accepted(usize),
    /// The draft was rejected and this token came from the residual.
    Resampled(usize),
}

impl SpecStep {
    pub fn token(self) -> usize {
        match self {
            SpecStep::Accepted(t) | SpecStep::Resampled(t) => t,
        }
    }
}

/// One step of standard speculative sampling: `draft` was drawn from `p`;
/// the result is distributed as `q`.
///
/// Random numbers used, in order: one `u ~ U[0, 1)` for the acceptance test
/// (`u * p[draft] < q[draft]`, i.e. `u < q/p` without a division), then, on
/// rejection only, one more for the residual draw. Should the residual have
/// no mass, which in exact arithmetic means rejection was impossible, the
/// token is drawn from `q` itself.
///
/// # Panics
/// If `p` and `q` differ in length or `draft` is out of range.
pub fn speculative_step<R: Rng + ?Sized>(
    p: &[f64],
    q: &[f64],
    draft: usize,
    rng: &mut R,
) -> SpecStep {
    assert_eq!(p.len(), q.len(), "draft and target vocabularies differ");
    let u = rng.random::<f64>();
    if u * p[draft] < q[draft] {
        return SpecStep::Accepted(draft);
    }
    let residual = |i: usize| (q[i] - p[i]).max(0.0);
    let total: f64 = (0..q.len()).map(residual).sum();
    if total > 0.0 {
        let target = rng.random::<f64>() * total;
        SpecStep::Resampled(invert((0..q.len()).map(residual), target))
    } else {
        SpecStep::Resampled(sample_categorical(q, rng))
    }
}

/// `n` tokens sampled one at a time: token `t` is drawn from
/// `next_dist(prompt ++ tokens[..t])`. Returns the new tokens only.
pub fn autoregressive<R, F>(mut next_dist: F, prompt: &[u32], n: usize, rng: &mut R) -> Vec<u32>
where
    R: Rng + ?Sized,
    F: FnMut(&[u32]) -> Vec<f64>,
{
    let mut context = prompt.to_vec();
    context.reserve(n);
    for _ in 0..n {
        let dist = next_dist(&context);
        context.push(sample_categorical(&dist, rng) as u32);
    }
    context.split_off(prompt.len())
}

#[cfg(test)]
mod tests {
    //! Each sampler is checked against its exact target with a chi-square
    //! goodness-of-fit test at a fixed seed. With `N` draws, a sampler whose
    //! law is off by total variation `d` from the target has a noncentrality
    //! of at least `4 N d^2` (Cauchy-Schwarz), so `N = 200_000` gives at least
    //! 80 at `d = 1%`, far above the rejection threshold of the statistics
    //! used here (at most 25 cells, threshold at p = 1e-4 near 54). The tests
    //! require `p > 1e-4` of the right sampler and `p < 1e-12` of a wrong one.

    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use statrs::distribution::{ChiSquared, ContinuousCDF};

    const N: usize = 200_000;

    fn chi_square_p(counts: &[u64], probs: &[f64]) -> f64 {
        let n: u64 = counts.iter().sum();
        let mut stat = 0.0;
        let mut cells = 0;
        for (&c, &p) in counts.iter().zip(probs) {
            let e = p * n as f64;
            assert!(
                e >= 5.0,
                "test distributions keep every cell above 5 expected"
            );
            stat += (c as f64 - e).powi(2) / e;
            cells += 1;
        }
        ChiSquared::new((cells - 1) as f64).unwrap().sf(stat)
    }

    const P: [f64; 6] = [0.30, 0.05, 0.20, 0.10, 0.15, 0.20];
    const Q: [f64; 6] = [0.10, 0.25, 0.20, 0.30, 0.05, 0.10];

    #[test]
    fn categorical_matches_its_distribution() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut counts = [0u64; 6];
        for _ in 0..N {
            counts[sample_categorical(&P, &mut rng)] += 1;
        }
        let p = chi_square_p(&counts, &P);
        assert!(p > 1e-4, "p = {p}");
        // The same counts against another distribution are rejected.
        assert!(chi_square_p(&counts, &Q) < 1e-12);
    }

    #[test]
    fn categorical_never_returns_a_zero_weight_index() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let w = [0.0, 2.0, 0.0, 1.0, 0.0];
        for _ in 0..10_000 {
            let i = sample_categorical(&w, &mut rng);
            assert!(i == 1 || i == 3);
        }
        // Rounding past the end lands on the last positive weight.
        assert_eq!(invert(w.iter().copied(), 3.5), 3);
    }

    #[test]
    fn speculative_step_emits_the_target_distribution() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut counts = [0u64; 6];
        let mut accepted = 0u64;
        for _ in 0..N {
            let x = sample_categorical(&P, &mut rng);
            let step = speculative_step(&P, &Q, x, &mut rng);
            accepted += matches!(step, SpecStep::Accepted(_)) as u64;
            counts[step.token()] += 1;
        }
        let p = chi_square_p(&counts, &Q);
        assert!(p > 1e-4, "p = {p}");
        // Acceptance rate is sum_x min(p, q) = 0.60; its standard error at
        // N draws is about 0.0011, so 0.005 is more than 4 of them.
        let a = accepted as f64 / N as f64;
        assert!((a - 0.60).abs() < 0.005, "acceptance {a}");
    }

    #[test]
    fn speculative_step_without_the_residual_is_caught() {
        // A broken step that redraws from q on rejection (instead of the
        // residual) overweights tokens the draft already covers.
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut counts = [0u64; 6];
        for _ in 0..N {
            let x = sample_categorical(&P, &mut rng);
            let t = match speculative_step(&P, &Q, x, &mut rng) {
                SpecStep::Accepted(t) => t,
                SpecStep::Resampled(_) => sample_categorical(&Q, &mut rng),
            };
            counts[t] += 1;
        }
        assert!(chi_square_p(&counts, &Q) < 1e-12);
    }

    #[test]
    fn speculative_step_handles_disjoint_and_equal_supports() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let p = [0.5, 0.5, 0.0];
        let q = [0.0, 0.0, 1.0];
        for _ in 0..1000 {
            let x = sample_categorical(&p, &mut rng);
            assert_eq!(
                speculative_step(&p, &q, x, &mut rng),
                SpecStep::Resampled(2)
            );
        }
        for _ in 0..1000 {
            let x = sample_categorical(&p, &mut rng);
            assert_eq!(speculative_step(&p, &p, x, &mut rng), SpecStep::Accepted(x));
        }
    }

    #[test]
    fn autoregressive_matches_the_joint_of_two_tokens() {
        // Next-token law depends on the last token: a 3-token Markov chain.
        let table = [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.3, 0.4, 0.3]];
        let next = |ctx: &[u32]| table[*ctx.last().unwrap() as usize].to_vec();
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let mut counts = [0u64; 9];
        for _ in 0..N {
            let t = autoregressive(next, &[1], 2, &mut rng);
            counts[t[0] as usize * 3 + t[1] as usize] += 1;
        }
        let exact: Vec<f64> = (0..9)
            .map(|c| table[1][c / 3] * table[c / 3][c % 3])
            .collect();
        let p = chi_square_p(&counts, &exact);
        assert!(p > 1e-4, "p = {p}");
        // Ignoring the context (always the prompt's row) is caught.
        let mut wrong = [0u64; 9];
        for _ in 0..N {
            let t = autoregressive(|_: &[u32]| table[1].to_vec(), &[1], 2, &mut rng);
            wrong[t[0] as usize * 3 + t[1] as usize] += 1;
        }
        assert!(chi_square_p(&wrong, &exact) < 1e-12);
    }
}
