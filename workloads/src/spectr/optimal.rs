//! The optimal draft selection for small vocabularies: optimal transport
//! with membership cost (Sun et al., "SpecTr", arXiv 2310.15141: the
//! abstract's "transport plan computed via linear programming"; the section
//! number is not verified, see the README's provenance note).
//!
//! With `k` draft tokens `X = (X_1..X_k)` i.i.d. from `p` and a target `q`,
//! a draft selection is a coupling `pi` of `p^k` (on tuples) and `q`; its
//! acceptance is `P(Y in {X_1..X_k})`. The best one solves a linear program
//! over `|V|^k x |V|` variables (the paper's "OTM-k", exponential in `k`):
//!
//! ```text
//! maximise   sum_{x, y in x} pi(x, y)
//! subject to sum_y pi(x, y) = p^k(x)  for every tuple x,
//!            sum_x pi(x, y) = q(y)    for every token y,   pi >= 0.
//! ```
//!
//! [`OptimalCoupling::solve`] solves it with `microlp` for `|V| <= 6`,
//! `k <= 3` and keeps the plan, so a decoder can draw `Y | X` from it
//! (`decode::with_coupling`).
//!
//! The optimum also has a closed form, [`min_cut_acceptance`]: matching as
//! much mass as possible between tuples and tokens (an edge wherever `y`
//! is in the tuple) is a max-flow problem, and by max-flow/min-cut
//!
//! ```text
//! OPT = min over S subset of V of  q(V \ S) + 1 - (1 - p(S))^k ,
//! ```
//!
//! the second term being `P(some X_i in S)`, the mass of the tuples
//! adjacent to `S`. Any partial matching extends to a full coupling by
//! pairing the unmatched masses arbitrarily, so the flow value is the best
//! acceptance. The paper states this quantity as the bound that the optimum
//! meets; the tests check LP == formula on random cases, `OPT = sum min(p,
//! q)` for `k = 1`, and `(1 - 1/e) OPT <= K-SEQ <= OPT`.

use microlp::{ComparisonOp, OptimizationDirection, Problem};
use rand::Rng;

use crate::WorkloadError;

/// The LP is solved only up to these sizes (`6^3 * 6 = 1296` variables).
pub const MAX_VOCAB: usize = 6;
pub const MAX_K: usize = 3;

/// An optimal coupling of `p^k` and `q`, kept as the law of `Y` given each
/// draft tuple.
#[derive(Debug, Clone)]
pub struct OptimalCoupling {
    k: usize,
    p: Vec<f64>,
    q: Vec<f64>,
    /// Row `x` (tuple index `sum_i X_i |V|^i`): the law of `Y` given `X = x`.
    conditional: Vec<Vec<f64>>,
    acceptance: f64,
}

impl OptimalCoupling {
    /// Solves the LP for `k` drafts.
    ///
    /// Errors if the sizes exceed [`MAX_VOCAB`] or [`MAX_K`], the
    /// distributions differ in length, or the solver fails.
    pub fn solve(p: &[f64], q: &[f64], k: usize) -> Result<Self, WorkloadError> {
        let v = p.len();
        if v != q.len() || v == 0 || v > MAX_VOCAB || k == 0 || k > MAX_K {
            return Err(WorkloadError::Config(format!(
                "optimal coupling: needs equal vocabularies of 1..={MAX_VOCAB} tokens and \
                 1..={MAX_K} drafts, got |p| = {}, |q| = {}, k = {k}",
                p.len(),
                q.len()
            )));
        }
        let tuples = v.pow(k as u32);
        let mut lp = Problem::new(OptimizationDirection::Maximize);
        let mut vars = Vec::with_capacity(tuples * v);
        for x in 0..tuples {
            for y in 0..v {
                let hit = tuple_contains(x, v, k, y);
                vars.push(lp.add_var(if hit { 1.0 } else { 0.0 }, (0.0, f64::INFINITY)));
            }
        }
        let p_tuple: Vec<f64> = (0..tuples).map(|x| tuple_prob(p, x, k)).collect();
        for (x, &px) in p_tuple.iter().enumerate() {
            let row: Vec<_> = (0..v).map(|y| (vars[x * v + y], 1.0)).collect();
            lp.add_constraint(row.as_slice(), ComparisonOp::Eq, px);
        }
        // The last column constraint is implied by the others (total mass);
        // leaving it out keeps the system of full rank.
        for (y, &qy) in q.iter().enumerate().take(v - 1) {
            let col: Vec<_> = (0..tuples).map(|x| (vars[x * v + y], 1.0)).collect();
            lp.add_constraint(col.as_slice(), ComparisonOp::Eq, qy);
        }
        let solution = lp
            .solve()
            .map_err(|e| WorkloadError::Other(format!("optimal coupling: LP failed: {e}")))?
            .into_solution()
            .map_err(|_| WorkloadError::Other("optimal coupling: LP interrupted".into()))?;
        let conditional = (0..tuples)
            .map(|x| {
                let row: Vec<f64> = (0..v)
                    .map(|y| solution.var_value(vars[x * v + y]).max(0.0))
                    .collect();
                let total: f64 = row.iter().sum();
                if p_tuple[x] > 0.0 && total > 0.0 {
                    row.iter().map(|w| w / total).collect()
                } else {
                    // A tuple that never occurs: any law will do.
                    q.to_vec()
                }
            })
            .collect();
        Ok(OptimalCoupling {
            k,
            p: p.to_vec(),
            q: q.to_vec(),
            conditional,
            acceptance: solution.objective(),
        })
    }

    /// The optimal acceptance probability, `max_pi P(Y in X)`.
    pub fn acceptance(&self) -> f64 {
        self.acceptance
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// The draft and target distributions the coupling was solved for.
    pub fn marginals(&self) -> (&[f64], &[f64]) {
        (&self.p, &self.q)
    }

    /// Draws `Y` given the draft tuple `draws` (length `k`). Over `draws ~
    /// p^k`, `Y ~ q` up to the LP's feasibility tolerance (1e-7 per
    /// constraint).
    pub fn sample<R: Rng + ?Sized>(&self, draws: &[u32], rng: &mut R) -> u32 {
        debug_assert_eq!(draws.len(), self.k);
        let v = self.p.len();
        let x = draws
            .iter()
            .rev()
            .fold(0usize, |acc, &d| acc * v + d as usize);
        baselines::sampling::sample_categorical(&self.conditional[x], rng) as u32
    }
}

/// Tuple `x` in base `v`, digit `i` being draft `i`.
fn tuple_digits(mut x: usize, v: usize, k: usize) -> impl Iterator<Item = usize> {
    (0..k).map(move |_| {
        let d = x % v;
        x /= v;
        d
    })
}

fn tuple_contains(x: usize, v: usize, k: usize, y: usize) -> bool {
    tuple_digits(x, v, k).any(|d| d == y)
}

fn tuple_prob(p: &[f64], x: usize, k: usize) -> f64 {
    tuple_digits(x, p.len(), k).map(|d| p[d]).product()
}

/// The optimal acceptance by the max-flow/min-cut formula (see the module
/// docs): `min_S q(V \ S) + 1 - (1 - p(S))^k` over all subsets `S`.
///
/// # Panics
/// If the vocabulary has more than 24 tokens (2^24 subsets).
pub fn min_cut_acceptance(p: &[f64], q: &[f64], k: usize) -> f64 {
    let v = p.len();
    assert!(v <= 24, "min_cut_acceptance enumerates 2^|V| subsets");
    assert_eq!(v, q.len());
    (0u32..1 << v)
        .map(|s| {
            let (mut p_in, mut q_out) = (0.0, 0.0);
            for y in 0..v {
                if s >> y & 1 == 1 {
                    p_in += p[y];
                } else {
                    q_out += q[y];
                }
            }
            q_out + 1.0 - (1.0 - p_in).max(0.0).powi(k as i32)
        })
        .fold(f64::INFINITY, f64::min)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spectr::kseq;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn random_dist(n: usize, rng: &mut impl Rng) -> Vec<f64> {
        let mut d: Vec<f64> = (0..n)
            .map(|_| {
                // Some exact zeros, some peaked entries.
                if rng.random::<f64>() < 0.15 {
                    0.0
                } else {
                    (3.0 * rng.random::<f64>()).exp()
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

    #[test]
    fn lp_equals_the_min_cut_formula_and_bounds_kseq() {
        // LP tolerance is 1e-7 per constraint, so the objective can be off
        // by a few 1e-7; 1e-6 leaves room for that and nothing more.
        let mut rng = ChaCha8Rng::seed_from_u64(80);
        for case in 0..60 {
            let v = 2 + case % 5;
            let p = random_dist(v, &mut rng);
            let q = random_dist(v, &mut rng);
            for k in 1..=MAX_K {
                let lp = OptimalCoupling::solve(&p, &q, k).unwrap().acceptance();
                let cut = min_cut_acceptance(&p, &q, k);
                assert!(
                    (lp - cut).abs() < 1e-6,
                    "case {case} k {k}: LP {lp} vs cut {cut}"
                );
                let (_, beta) = kseq::solve_rho(&p, &q, k);
                let ks = kseq::acceptance(beta, k);
                let bound = (1.0 - (-1.0f64).exp()) * cut;
                assert!(
                    ks <= cut + 1e-9,
                    "case {case} k {k}: K-SEQ {ks} above OPT {cut}"
                );
                assert!(
                    ks >= bound - 1e-9,
                    "case {case} k {k}: K-SEQ {ks} below bound {bound}"
                );
            }
            let overlap: f64 = p.iter().zip(&q).map(|(a, b)| a.min(*b)).sum();
            assert!((min_cut_acceptance(&p, &q, 1) - overlap).abs() < 1e-12);
        }
    }

    #[test]
    fn the_plan_has_the_right_marginals() {
        let p = [0.5, 0.3, 0.2, 0.0];
        let q = [0.1, 0.2, 0.3, 0.4];
        let c = OptimalCoupling::solve(&p, &q, 2).unwrap();
        let v = p.len();
        let mut y_law = [0.0; 4];
        let mut accept = 0.0;
        for x in 0..v * v {
            let px = tuple_prob(&p, x, 2);
            for (y, (law, &w)) in y_law.iter_mut().zip(&c.conditional[x]).enumerate() {
                *law += px * w;
                if tuple_contains(x, v, 2, y) {
                    accept += px * w;
                }
            }
        }
        for (got, want) in y_law.iter().zip(&q) {
            assert!((got - want).abs() < 1e-6, "{y_law:?}");
        }
        assert!((accept - c.acceptance()).abs() < 1e-6);
        // Token 3 is never drafted, so at most 0.6 can be accepted.
        assert!((c.acceptance() - min_cut_acceptance(&p, &q, 2)).abs() < 1e-6);
        assert!(c.acceptance() <= 0.6 + 1e-9);
    }

    #[test]
    fn sizes_beyond_the_lp_are_refused() {
        let p = vec![1.0 / 7.0; 7];
        assert!(OptimalCoupling::solve(&p, &p, 2).is_err());
        assert!(OptimalCoupling::solve(&[0.5, 0.5], &[0.5, 0.5], 4).is_err());
        assert!(OptimalCoupling::solve(&[0.5, 0.5], &[1.0], 1).is_err());
    }
}
