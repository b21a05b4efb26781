//! Synthetic draft/target pairs with controlled divergence.
//!
//! Each pair is context-independent: every step draws from the same draft
//! distribution p and target distribution q, so the closed forms hold
//! exactly (acceptance sum_x min(p, q) for one draft, block efficiency
//! (1 - a^(L+1)) / (1 - a) with i.i.d. steps). The target is
//! q = softmax(sharpness * g) with g standard normal; the draft perturbs the
//! logits, p = softmax(sharpness * g + sigma * e) with e standard normal, so
//! `sigma` controls the divergence (sigma = 0 gives p = q).

use rand::Rng;
use rand_distr::StandardNormal;

use super::lm::{Dist, LanguageModel};

/// A model that ignores its context.
#[derive(Debug, Clone)]
pub struct Fixed(pub Dist);

impl LanguageModel for Fixed {
    fn vocab_size(&self) -> usize {
        self.0.len()
    }

    fn next_dists(&self, contexts: &[&[u32]]) -> Vec<Dist> {
        contexts.iter().map(|_| self.0.clone()).collect()
    }
}

/// How a pair is drawn.
#[derive(Debug, Clone, Copy)]
pub struct PairSpec {
    pub vocab: usize,
    pub sharpness: f64,
    pub sigma: f64,
}

fn softmax(logits: &[f64]) -> Dist {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = logits.iter().map(|&z| (z - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Draws (draft, target).
pub fn draw_pair(spec: PairSpec, rng: &mut impl Rng) -> (Fixed, Fixed) {
    let g: Vec<f64> = (0..spec.vocab)
        .map(|_| spec.sharpness * rng.sample::<f64, _>(StandardNormal))
        .collect();
    let e: Vec<f64> = g
        .iter()
        .map(|&gi| gi + spec.sigma * rng.sample::<f64, _>(StandardNormal))
        .collect();
    (Fixed(softmax(&e)), Fixed(softmax(&g)))
}

/// sum_x min(p(x), q(x)): the one-draft acceptance probability.
pub fn overlap(p: &[f64], q: &[f64]) -> f64 {
    p.iter().zip(q).map(|(a, b)| a.min(*b)).sum()
}

/// Expected tokens per target call of speculative sampling with i.i.d.
/// steps of acceptance `a` and `l` draft positions (Leviathan et al., eq. 1).
pub fn block_efficiency_closed_form(a: f64, l: usize) -> f64 {
    if (1.0 - a).abs() < 1e-12 {
        (l + 1) as f64
    } else {
        (1.0 - a.powi(l as i32 + 1)) / (1.0 - a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn pairs_are_distributions_and_sigma_controls_divergence() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut last = 1.0;
        for sigma in [0.0, 0.5, 1.0, 2.0] {
            let (p, q) = draw_pair(
                PairSpec {
                    vocab: 1000,
                    sharpness: 2.0,
                    sigma,
                },
                &mut rand_chacha::ChaCha8Rng::seed_from_u64(7),
            );
            assert!((p.0.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            assert!((q.0.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            let a = overlap(&p.0, &q.0);
            assert!(a <= last + 1e-12, "overlap must fall as sigma grows");
            last = a;
        }
        assert!(last < 0.8);
        let (p, q) = draw_pair(
            PairSpec {
                vocab: 4,
                sharpness: 1.0,
                sigma: 0.0,
            },
            &mut rng,
        );
        assert!((overlap(&p.0, &q.0) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn closed_form_matches_the_geometric_series() {
        let a: f64 = 0.7;
        let series: f64 = (0..=4).map(|i| a.powi(i)).sum();
        assert!((block_efficiency_closed_form(a, 4) - series).abs() < 1e-12);
        assert_eq!(block_efficiency_closed_form(1.0, 4), 5.0);
    }
}
