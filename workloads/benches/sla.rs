//! SLA against the sort-and-pad baselines, forward, `f32`, at the paper's
//! Waymo configuration (4 heads of 32 channels, C = 128).
//!
//! Layouts are random with a long-tailed window size: lognormal with median
//! 9 and mean 26 voxels (`mu = ln 9`, `sigma = 1.457`), rounded, at least 1
//! and capped at 900, drawn until the scene has `n` voxels. `q`, `k`, `v` are
//! uniform in [-1, 1). Each size prints its layout (windows, mean, largest,
//! padded slots per voxel) once before it is timed.
//!
//! `cargo bench -p workloads --bench sla -- --warm-up-time 1
//! --measurement-time 3`; a filter such as `sla_forward_f32/10000` runs one
//! size. Sizes: 10k, 100k, and 1M voxels (1M needs about 5 GiB of memory
//! for the padded baselines' buffers).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal};
use std::hint::black_box;

use baselines::window_attention::{padded_linear_forward, padded_softmax_forward, PadPlan};
use workloads::pointcloud::sla::{self, Shape};

const HEADS: usize = 4;
const DIM: usize = 32;
const MAX_WINDOW: u32 = 900;

/// `(offsets, counts)` of windows with lognormal sizes summing to `n`.
fn layout(n: usize, rng: &mut ChaCha8Rng) -> (Vec<u32>, Vec<u32>) {
    let sizes = LogNormal::new(9f64.ln(), 1.457).expect("valid lognormal");
    let (mut offsets, mut counts, mut total) = (Vec::new(), Vec::new(), 0usize);
    while total < n {
        let c = (sizes.sample(rng).round() as u32).clamp(1, MAX_WINDOW);
        let c = c.min((n - total) as u32);
        offsets.push(total as u32);
        counts.push(c);
        total += c as usize;
    }
    (offsets, counts)
}

fn forward(c: &mut Criterion) {
    for n in [10_000usize, 100_000, 1_000_000] {
        let mut rng = ChaCha8Rng::seed_from_u64(n as u64);
        let (offsets, counts) = layout(n, &mut rng);
        let shape = Shape {
            n,
            heads: HEADS,
            dim: DIM,
        };
        let mut tensor = || -> Vec<f32> {
            (0..shape.len())
                .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                .collect()
        };
        let (q, k, v) = (tensor(), tensor(), tensor());
        let mut out = vec![0.0f32; shape.len()];
        let plan = PadPlan::new(&counts);
        eprintln!(
            "n = {n}: {} windows, mean {:.1} voxels, largest {}, {:.2} padded slots per voxel",
            counts.len(),
            n as f64 / counts.len() as f64,
            counts.iter().max().unwrap(),
            plan.padded_slots() as f64 / n as f64
        );

        let mut group = c.benchmark_group(format!("sla_forward_f32/{n}"));
        group.throughput(Throughput::Elements(n as u64));
        if n >= 1_000_000 {
            group.sample_size(10);
        }
        group.bench_function("sla", |b| {
            b.iter(|| sla::forward(&q, &k, &v, &offsets, &counts, shape, black_box(&mut out)))
        });
        group.bench_function("padded_linear", |b| {
            b.iter(|| {
                padded_linear_forward(&q, &k, &v, &offsets, &counts, shape, black_box(&mut out))
            })
        });
        group.bench_function("padded_softmax", |b| {
            b.iter(|| {
                padded_softmax_forward(&q, &k, &v, &offsets, &counts, shape, black_box(&mut out))
            })
        });
        group.finish();
    }
}

criterion_group!(benches, forward);
criterion_main!(benches);
