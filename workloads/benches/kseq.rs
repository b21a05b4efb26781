//! K-SEQ cost over a 152,000-token vocabulary (the size of Qwen2's).
//!
//! The pair is realistic in shape: target logits are Gumbel noise scaled to
//! a spread of a few nats (a peaked softmax with a long tail), the draft's
//! logits are the target's plus independent noise, and both go through a
//! softmax at temperature 1. `solve_rho` is the root search alone;
//! `kseq_step` is a full step (root search, `k` acceptance tests, and the
//! residual draw when every draft is rejected) on fresh draft tokens.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::hint::black_box;

use workloads::spectr::kseq;

const VOCAB: usize = 152_000;

fn gumbel(rng: &mut impl Rng) -> f64 {
    let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    -(-u.ln()).ln()
}

fn softmax(logits: &[f64], temperature: f64) -> Vec<f64> {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut e: Vec<f64> = logits
        .iter()
        .map(|z| ((z - max) / temperature).exp())
        .collect();
    let total: f64 = e.iter().sum();
    e.iter_mut().for_each(|x| *x /= total);
    e
}

/// (draft, target) next-token distributions.
fn pair(seed: u64) -> (Vec<f64>, Vec<f64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let target: Vec<f64> = (0..VOCAB).map(|_| 3.0 * gumbel(&mut rng)).collect();
    let draft: Vec<f64> = target.iter().map(|z| z + gumbel(&mut rng)).collect();
    (softmax(&draft, 1.0), softmax(&target, 1.0))
}

fn bench(c: &mut Criterion) {
    let (p, q) = pair(1);
    let mut group = c.benchmark_group("kseq_152k");
    for k in [1usize, 4, 8] {
        group.bench_with_input(BenchmarkId::new("solve_rho", k), &k, |b, &k| {
            b.iter(|| kseq::solve_rho(black_box(&p), black_box(&q), k))
        });
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let draws: Vec<Vec<u32>> = (0..1024)
            .map(|_| {
                (0..k)
                    .map(|_| baselines::sampling::sample_categorical(&p, &mut rng) as u32)
                    .collect()
            })
            .collect();
        let mut i = 0;
        group.bench_with_input(BenchmarkId::new("kseq_step", k), &k, |b, _| {
            b.iter(|| {
                i = (i + 1) % draws.len();
                kseq::kseq_step(black_box(&p), black_box(&q), &draws[i], &mut rng)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
