//! Test helpers shared by the `long-context` modules: seeded random data,
//! a dense cache built from it, float64 reference attention to check the
//! caches against, and the untimed set-up of the end-to-end tests.
//!
//! The references compute in f64 from the raw keys and values on their own,
//! never through `attend_segments` or a cache, so that a test comparing a
//! cache's output with them compares two independent computations.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{LongContext, SPEC};
use crate::clock::{CpuClock, Stopwatch};
use crate::contract::*;
use crate::decoder::{DenseKv, KvCache, KvShape};

/// `n` floats drawn uniformly from [-1, 1).
pub fn uniform(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// A dense cache holding the rows `k` and `v` (whole rows, every KV head)
/// in every layer, with room for 8 more.
pub fn dense_of(shape: KvShape, k: &[f32], v: &[f32]) -> DenseKv {
    let mut dense = DenseKv::new(shape, k.len() / shape.kv_dim() + 8);
    for l in 0..shape.n_layers {
        dense.append(l, 0, k, v);
    }
    dense
}

/// Float64 softmax attention of every query head in `q` (`hd` floats each)
/// over `rows`, the (key, value) pairs of one KV head (`hd` floats each),
/// in order.
pub fn attention_f64(q: &[f32], hd: usize, rows: &[(&[f32], &[f32])]) -> Vec<f64> {
    let biased: Vec<(&[f32], &[f32], f64)> = rows.iter().map(|&(k, v)| (k, v, 0.0)).collect();
    attention_f64_biased(q, hd, &biased)
}

/// [`attention_f64`] over (key, value, bias) rows: each row's bias is added
/// to its scaled score before the softmax.
pub fn attention_f64_biased(q: &[f32], hd: usize, rows: &[(&[f32], &[f32], f64)]) -> Vec<f64> {
    let mut out = vec![0f64; q.len()];
    for (h, qh) in q.chunks(hd).enumerate() {
        let s: Vec<f64> = rows
            .iter()
            .map(|(k, _, b)| {
                qh.iter()
                    .zip(*k)
                    .map(|(&x, &y)| x as f64 * y as f64)
                    .sum::<f64>()
                    / (hd as f64).sqrt()
                    + b
            })
            .collect();
        let m = s.iter().copied().fold(f64::MIN, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for ((_, v, _), p) in rows.iter().zip(&e) {
            for j in 0..hd {
                out[h * hd + j] += v[j] as f64 * p / z;
            }
        }
    }
    out
}

/// Float64 softmax attention of every query head in `q` (`hd` floats each)
/// over KV head `g` of `rows` (whole rows, every KV head), in order.
///
/// Unlike [`attention_f64`] it divides by the normaliser once, after
/// summing, rather than term by term. The two agree to about 1e-16; both
/// are kept so that each test compares against the exact reference values
/// it was written and tuned against.
pub fn attention_f64_of_head(
    q: &[f32],
    hd: usize,
    g: usize,
    rows: &[(&[f32], &[f32])],
) -> Vec<f64> {
    let off = g * hd;
    let kv: Vec<(&[f32], &[f32])> = rows
        .iter()
        .map(|(k, v)| (&k[off..off + hd], &v[off..off + hd]))
        .collect();
    let mut out = vec![0f64; q.len()];
    for (h, qh) in q.chunks_exact(hd).enumerate() {
        let s: Vec<f64> = kv
            .iter()
            .map(|(k, _)| {
                qh.iter()
                    .zip(*k)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
                    / (hd as f64).sqrt()
            })
            .collect();
        let m = s.iter().copied().fold(f64::MIN, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for (j, o) in out[h * hd..(h + 1) * hd].iter_mut().enumerate() {
            *o = kv
                .iter()
                .zip(&e)
                .map(|((_, v), p)| v[j] as f64 * p)
                .sum::<f64>()
                / z;
        }
    }
    out
}

/// Asserts `got` is within `tol` of `want`, relative to `1 + |want|`, at
/// every index; `what` names the case in the failure message.
pub fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    for (g, w) in got.iter().zip(want) {
        assert!(
            (*g as f64 - w).abs() <= tol * (1.0 + w.abs()),
            "{what}: {g} vs {w}"
        );
    }
}

/// A variant of the workload loaded on the CPU (variant seed 1), from which
/// the end-to-end tests draw their trial.
pub struct CpuLoad {
    variant: &'static Variant,
    profile: Profile,
    loaded: Box<dyn Loaded>,
}

impl CpuLoad {
    pub fn new(variant: &str, profile: Profile) -> CpuLoad {
        CpuLoad::on(variant, profile, false)
    }

    /// As [`CpuLoad::new`], with the decoder variants on the GPU decoder's
    /// candle graph run on the CPU (`Backend::Graph`).
    pub fn graph(variant: &str, profile: Profile) -> CpuLoad {
        CpuLoad::on(variant, profile, true)
    }

    fn on(variant: &str, profile: Profile, graph: bool) -> CpuLoad {
        let variant = SPEC.variant(variant).unwrap();
        let ctx = LoadContext {
            variant,
            profile,
            device: crate::Device::Cpu,
            seed: 1,
        };
        let loaded = if graph {
            super::load_decoders(&ctx, true)
        } else {
            LongContext.load(&ctx)
        }
        .unwrap();
        CpuLoad {
            variant,
            profile,
            loaded,
        }
    }

    /// Trial 0, drawn with trial seed `seed`.
    pub fn trial(&self, seed: u64) -> Box<dyn TrialData + '_> {
        self.loaded
            .trial(&TrialContext {
                variant: self.variant,
                profile: self.profile,
                device: crate::Device::Cpu,
                trial: 0,
                seed,
            })
            .unwrap()
    }
}

/// Sets up entry `id` with `params` on `trial`, runs it under a CPU
/// stopwatch (600 s budget) and evaluates it: the outcome and the seconds
/// the stopwatch timed.
pub fn run_entry(trial: &dyn TrialData, id: &str, params: &str) -> (Outcome, f64) {
    let clock = CpuClock::default();
    let entry = SPEC.entry(id).unwrap();
    let mut job = trial.setup(entry, &params.parse().unwrap()).unwrap();
    let mut sw = Stopwatch::new(&clock, 600.0);
    sw.start();
    job.run(&mut sw).unwrap();
    let timed = sw.stop();
    (job.evaluate().unwrap(), timed)
}
