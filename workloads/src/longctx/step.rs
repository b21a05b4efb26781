//! The `decode-step` variant of `long-context`: one decoding step of one
//! attention layer at Llama-3-8B shapes (32 query heads, 8 KV heads, head
//! dimension 128, bf16 cache, batch 1), at contexts from 4k to 512k, over a
//! dense, a page-selected (Quest), a clustered and a windowed cache.
//!
//! The problem, its data, the CPU step and the float64 reference are in
//! [`kernel`](super::kernel); our CUDA kernels in [`cuda`](super::cuda)
//! (feature `cuda`). The time-to-result of a configuration is the median
//! step time over repeated steps after warm-up: on the CPU, wall time of
//! [`Step::run_cpu`]; on a GPU, CUDA-event time of a captured graph of
//! steps, each over its own copy of the cache so that replays do not run
//! out of L2 (`cuda.rs` explains). Quality is the step output's largest
//! relative error against the float64 reference over the same selection,
//! divided by [`TOLERANCE`]; for page selection the chosen pages are also
//! checked against a float64 top-k (swaps allowed only at near-ties).
//!
//! On a GPU, the PyTorch peers run in the same trial through
//! `scripts/peer_decode_attn.py` (one call per trial for every context and
//! budget): cuDNN's `scaled_dot_product_attention` with native GQA, the
//! Hugging Face step that expands the KV heads first, and Quest composed
//! from torch ops. They time themselves the same way (graphs, events,
//! median) and check their own outputs against float64; their records take
//! that check's error over the bf16 output tolerance of the script.
//! The call is stopped after [`PEER_TIMEOUT_S`] (`BENCH_SUITE_PEER_TIMEOUT_S`
//! overrides it; `workloads::child`), and a failed call is not repeated: the
//! trial's peer configurations then score infinity with its reason.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use super::kernel::{max_rel_err, DenseCache, Shape, Step, StepKind, TOLERANCE};
use crate::child::{peer_timeout, spawn_logged, stderr_tail, wait_limited, PEER_TIMEOUT_VAR};
use crate::clock::Stopwatch;
use crate::contract::*;
use crate::stats::median;
use crate::{Device, WorkloadError};

/// Contexts of the variant's `context` axis.
pub const CONTEXTS: &[f64] = &[4096.0, 16384.0, 65536.0, 131072.0, 524288.0];
/// Timed CPU steps per configuration (after one warm-up step).
const CPU_REPS: usize = 5;
/// Timed graph replays per GPU configuration.
#[cfg(feature = "cuda")]
const GPU_REPS: usize = 50;
/// Replays per peer configuration (the script's `--repeats`).
const PEER_REPS: usize = 30;
/// The peer script's own check: bf16 outputs against float64 (it rounds the
/// output to bf16, unit roundoff 2^-8, so 1e-2 allows a few ulps).
const PEER_TOLERANCE: f64 = 1e-2;
/// The budgets of the peers' Quest, as the entries' grid.
const PEER_FRACS: &[f64] = super::BUDGETS;

/// The peer script's results of one trial, by (implementation, context,
/// budget in millionths).
type PeerResults = Rc<BTreeMap<(String, usize, u64), serde_json::Value>>;
/// Longest the trial's one peer script call may take (seconds) before the
/// harness stops it and every peer configuration of the trial scores
/// infinity (`BENCH_SUITE_PEER_TIMEOUT_S` overrides it). The call times
/// every context and budget; the whole five-trial H100 run, our kernels
/// and tests included, took 226 s of device time (2026-11-27), so a call
/// still running after ten minutes is stuck.
const PEER_TIMEOUT_S: u64 = 600;

/// Ids of the PyTorch peers, and what the script calls them.
const PEERS: &[(&str, &str)] = &[
    ("sdpa-gqa", "sdpa-gqa-cudnn"),
    ("hf-repeat-kv", "hf-repeat-kv"),
    ("quest-torch", "quest-torch"),
];

pub(crate) fn step_kind(entry: &str, frac: f64) -> Result<StepKind, WorkloadError> {
    Ok(match entry {
        "dense" => StepKind::Dense,
        "block-topk" => StepKind::block_topk(frac),
        "kv-cluster" => StepKind::Cluster { frac },
        "sink-window" => StepKind::window(frac),
        other => {
            return Err(WorkloadError::Config(format!(
                "entry `{other}` has no decode-step kernel; the variant runs dense, block-topk, \
                 kv-cluster, sink-window and, with --device cuda, the PyTorch peers"
            )))
        }
    })
}

pub fn peer_script() -> PathBuf {
    std::env::var_os("BENCH_SUITE_PEER_DECODE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("scripts/peer_decode_attn.py"))
}

pub struct LoadedStep {
    device: Device,
    #[cfg(feature = "cuda")]
    gpu: Option<super::cuda::DecodeGpu>,
}

pub fn load(ctx: &LoadContext<'_>) -> Result<Box<dyn Loaded>, WorkloadError> {
    #[cfg(feature = "cuda")]
    let gpu = match ctx.device {
        Device::Cuda(i) => Some(super::cuda::DecodeGpu::new(i)?),
        Device::Cpu => None,
    };
    #[cfg(not(feature = "cuda"))]
    if ctx.device != Device::Cpu {
        return Err(WorkloadError::Device(
            "this build has no CUDA support; rebuild with `--features cuda`".into(),
        ));
    }
    Ok(Box::new(LoadedStep {
        device: ctx.device,
        #[cfg(feature = "cuda")]
        gpu,
    }))
}

impl Loaded for LoadedStep {
    fn trial(&self, ctx: &TrialContext<'_>) -> Result<Box<dyn TrialData + '_>, WorkloadError> {
        Ok(Box::new(StepTrial {
            loaded: self,
            caches: RefCell::new(BTreeMap::new()),
            peers: RefCell::new(None),
            seed: ctx.seed,
        }))
    }
}

struct StepTrial<'l> {
    loaded: &'l LoadedStep,
    /// The dense cache of each context, generated once per trial and kept
    /// for every entry (the runner goes through each entry's contexts in
    /// turn): 3 GiB of bf16 for all five.
    caches: RefCell<BTreeMap<usize, Arc<DenseCache>>>,
    /// The peer script's results for this trial, by (impl, context,
    /// budget in millionths), or why the call failed (not repeated for the
    /// trial's other peer configurations).
    peers: RefCell<Option<Result<PeerResults, String>>>,
    seed: u64,
}

impl StepTrial<'_> {
    fn cache(&self, n: usize) -> Result<Arc<DenseCache>, WorkloadError> {
        if let Some(c) = self.caches.borrow().get(&n) {
            return Ok(c.clone());
        }
        let c = Arc::new(DenseCache::generate(Shape::llama3_8b(n), self.seed)?);
        self.caches.borrow_mut().insert(n, c.clone());
        Ok(c)
    }

    /// Every peer configuration of the trial, timed by one script call
    /// (made once; a failed call fails every peer configuration of the
    /// trial with the same reason).
    fn peers(&self, python: &str, script: &std::path::Path) -> Result<PeerResults, WorkloadError> {
        if let Some(p) = &*self.peers.borrow() {
            return p.clone().map_err(WorkloadError::Other);
        }
        let got = self.call_peers(python, script);
        if let Err(WorkloadError::Other(why)) = &got {
            *self.peers.borrow_mut() = Some(Err(why.clone()));
        }
        let p = got?;
        *self.peers.borrow_mut() = Some(Ok(p.clone()));
        Ok(p)
    }

    fn call_peers(
        &self,
        python: &str,
        script: &std::path::Path,
    ) -> Result<PeerResults, WorkloadError> {
        if !script.exists() {
            return Err(WorkloadError::Config(format!(
                "peer script {} not found; run from the repository root or set \
                 BENCH_SUITE_PEER_DECODE",
                script.display()
            )));
        }
        let join = |xs: &[f64], f: &dyn Fn(f64) -> String| {
            xs.iter().map(|&x| f(x)).collect::<Vec<_>>().join(",")
        };
        let out = std::env::temp_dir().join(format!(
            "bench-suite-decode-peers-{}-{}.json",
            std::process::id(),
            self.seed
        ));
        let limit = peer_timeout(PEER_TIMEOUT_S)?;
        let mut cmd = Command::new(python);
        cmd.arg(script)
            .args([
                "--contexts",
                &join(CONTEXTS, &|x| format!("{}", x as usize)),
            ])
            .args(["--fracs", &join(PEER_FRACS, &|x| format!("{x}"))])
            .args([
                "--impls",
                &PEERS.iter().map(|p| p.1).collect::<Vec<_>>().join(","),
            ])
            .args(["--repeats", &PEER_REPS.to_string()])
            .args(["--seed", &(self.seed % 1_000_000_007).to_string()])
            .args(["--device", "cuda"])
            .arg("--out")
            .arg(&out);
        let stderr = out.with_extension("stderr.txt");
        let log = std::fs::File::create(&stderr)
            .map_err(|e| WorkloadError::Other(format!("{}: {e}", stderr.display())))?;
        let child = spawn_logged(cmd, log).map_err(|e| {
            WorkloadError::Config(format!(
                "cannot start `{python}` for the peer script ({e}); set BENCH_SUITE_PYTHON"
            ))
        })?;
        let ran = wait_limited(child, limit)
            .map_err(|e| WorkloadError::Other(format!("waiting for the peer script: {e}")));
        let tail = stderr_tail(&stderr, 6);
        let _ = std::fs::remove_file(&stderr);
        match ran? {
            None => {
                let _ = std::fs::remove_file(&out);
                return Err(WorkloadError::Other(format!(
                    "peer script did not finish within {} s and was stopped \
                     ({PEER_TIMEOUT_VAR} raises the limit); its last output: {tail}",
                    limit.as_secs()
                )));
            }
            Some(status) if !status.success() => {
                let _ = std::fs::remove_file(&out);
                return Err(WorkloadError::Other(format!(
                    "peer script failed ({status}): {tail}"
                )));
            }
            Some(_) => {}
        }
        let text = std::fs::read_to_string(&out)
            .map_err(|e| WorkloadError::Other(format!("{}: {e}", out.display())))?;
        let _ = std::fs::remove_file(&out);
        let j: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| WorkloadError::Other(format!("{}: {e}", out.display())))?;
        let mut map = BTreeMap::new();
        for r in j["results"].as_array().into_iter().flatten() {
            let (Some(imp), Some(n), Some(f)) = (
                r["impl"].as_str(),
                r["context"].as_u64(),
                r["frac"].as_f64(),
            ) else {
                continue;
            };
            let mut r = r.clone();
            r["copy_bw_bytes_per_s"] = j["copy_bw_bytes_per_s"].clone();
            r["torch"] = j["torch"].clone();
            map.insert((imp.to_string(), n as usize, micro(f)), r);
        }
        Ok(Rc::new(map))
    }
}

fn micro(f: f64) -> u64 {
    (f * 1e6).round() as u64
}

impl TrialData for StepTrial<'_> {
    fn setup(&self, entry: &Entry, params: &Params) -> Result<Box<dyn Job + '_>, WorkloadError> {
        let n = params.usize("context")?;
        let frac = params.get("budget").unwrap_or(1.0);
        if let Some(&(_, script_id)) = PEERS.iter().find(|p| p.0 == entry.id) {
            let frac = if entry.id == "quest-torch" { frac } else { 1.0 };
            let python = std::env::var("BENCH_SUITE_PYTHON").unwrap_or_else(|_| "python3".into());
            let all = self.peers(&python, &peer_script())?;
            let r = all
                .get(&(script_id.to_string(), n, micro(frac)))
                .cloned()
                .ok_or_else(|| {
                    WorkloadError::Other(format!(
                        "the peer script returned no result for {script_id} at {n} tokens, \
                         budget {frac}"
                    ))
                })?;
            return Ok(Box::new(PeerJob { result: r }));
        }
        let kind = step_kind(entry.id, frac)?;
        let step = Step::new(self.cache(n)?, kind, self.seed)?;
        match self.loaded.device {
            Device::Cpu => {
                // Warm-up (untimed): page the cache in, start the pool.
                step.run_cpu();
                Ok(Box::new(CpuJob {
                    step,
                    samples: Vec::new(),
                    out: None,
                }))
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => {
                let gpu = self.loaded.gpu.as_ref().expect("a CUDA load opens a GPU");
                let bench = super::cuda::DecodeBench::from_step(gpu, step)?;
                Ok(Box::new(GpuJob {
                    bench,
                    timing: None,
                }))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => unreachable!("load refuses CUDA without the feature"),
        }
    }
}

fn step_figures(o: Outcome, step: &Step) -> Outcome {
    let b = step.bytes();
    o.figure("context", step.shape().n as f64)
        .figure("bytes_read", b.total() as f64)
        .figure("kv_bytes_read", b.kv as f64)
        .figure("meta_bytes_read", b.meta as f64)
        .figure("rows_read", step.rows_read() as f64)
        .figure(
            "read_share",
            step.rows_read() as f64 / step.shape().n as f64,
        )
}

struct CpuJob {
    step: Step,
    samples: Vec<f64>,
    out: Option<super::kernel::StepOutput>,
}

impl Job for CpuJob {
    fn run(&mut self, stopwatch: &mut Stopwatch<'_>) -> Result<(), WorkloadError> {
        for _ in 0..CPU_REPS {
            let t0 = Instant::now();
            let out = self.step.run_cpu();
            self.samples.push(t0.elapsed().as_secs_f64());
            self.out = Some(out);
            stopwatch.check()?;
        }
        Ok(())
    }

    fn evaluate(self: Box<Self>) -> Result<Outcome, WorkloadError> {
        let out = self.out.expect("run produced an output");
        let reference = self.step.reference_f64(&out.selection);
        let err = max_rel_err(&out.out, &reference);
        let (quality, note) = match self.step.check_selection(&out.selection) {
            Ok(swaps) => (
                err / TOLERANCE,
                format!("{swaps} near-tie page swaps against the float64 top-k"),
            ),
            Err(e) => (f64::INFINITY, format!("wrong page selection: {e}")),
        };
        let t = median(&self.samples);
        let mut o = Outcome::new(quality);
        o.measured_time_s = Some(t);
        o = step_figures(o, &self.step)
            .figure("rel_err", err)
            .figure("bytes_per_s", self.step.bytes().total() as f64 / t);
        o.note = Some(note);
        Ok(o)
    }
}

#[cfg(feature = "cuda")]
struct GpuJob<'g> {
    bench: super::cuda::DecodeBench<'g>,
    timing: Option<super::cuda::Timing>,
}

#[cfg(feature = "cuda")]
impl Job for GpuJob<'_> {
    fn run(&mut self, _stopwatch: &mut Stopwatch<'_>) -> Result<(), WorkloadError> {
        self.timing = Some(self.bench.time(GPU_REPS)?);
        Ok(())
    }

    fn evaluate(self: Box<Self>) -> Result<Outcome, WorkloadError> {
        let t = self.timing.expect("run timed the step");
        let mut o = Outcome::new(t.rel_err_vs_cpu_ref / TOLERANCE);
        o.measured_time_s = Some(t.median_s);
        o = step_figures(o, &self.bench.step)
            .figure("rel_err", t.rel_err_vs_cpu_ref)
            .figure("floor_s", t.floor_s)
            .figure("floor_ratio", t.ratio_to_floor())
            .figure("copy_bw_bytes_per_s", t.copy_bw)
            .figure("layers_in_graph", t.layers as f64)
            .figure("splits", t.splits as f64);
        o.note = Some(format!(
            "{} near-tie page swaps against the float64 top-k; {} timed replays",
            t.near_tie_swaps,
            t.samples_s.len()
        ));
        Ok(o)
    }
}

/// A peer's result from the trial's script call (it timed itself).
struct PeerJob {
    result: serde_json::Value,
}

impl Job for PeerJob {
    fn run(&mut self, _stopwatch: &mut Stopwatch<'_>) -> Result<(), WorkloadError> {
        match self.result["status"].as_str() {
            Some("ok") => Ok(()),
            other => Err(WorkloadError::Other(format!(
                "peer reported `{}`: {}",
                other.unwrap_or("no status"),
                self.result["note"].as_str().unwrap_or("no reason given")
            ))),
        }
    }

    fn evaluate(self: Box<Self>) -> Result<Outcome, WorkloadError> {
        let r = &self.result;
        for key in ["median_ms", "rel_err", "floor_ms"] {
            if !r[key].is_number() {
                return Err(WorkloadError::Other(format!(
                    "{}: a result of `{}` has no number `{key}`; the script and this \
                     harness disagree on its output format",
                    peer_script().display(),
                    r["impl"].as_str().unwrap_or("?")
                )));
            }
        }
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        let err = f("rel_err");
        let mut o = Outcome::new(err / PEER_TOLERANCE);
        o.measured_time_s = Some(f("median_ms") / 1e3);
        o = o
            .figure("context", f("context"))
            .figure("rel_err", err)
            .figure("bytes_read", f("bytes"))
            .figure("floor_s", f("floor_ms") / 1e3)
            .figure("floor_ratio", f("ratio_to_floor"))
            .figure("copy_bw_bytes_per_s", f("copy_bw_bytes_per_s"))
            .figure("layers_in_graph", f("layers"));
        if r["selection_overlap"].is_number() {
            o = o.figure("selection_overlap", f("selection_overlap"));
        }
        o.note = Some(format!(
            "PyTorch {} ({}), checked against its own float64 reference; tolerance {PEER_TOLERANCE} for bf16 outputs",
            r["torch"].as_str().unwrap_or("?"),
            r["backend"].as_str().unwrap_or("?")
        ));
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failing peer call fails the trial's peer configurations with the
    /// script's own output, and is made once, not once per configuration.
    #[test]
    fn a_failed_peer_call_is_reported_and_not_repeated() {
        let dir =
            std::env::temp_dir().join(format!("bench-suite-step-peer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("peer.sh");
        let calls = dir.join("calls");
        std::fs::write(
            &script,
            format!(
                "echo call >> '{}'; echo 'no GPU here' >&2; exit 3\n",
                calls.display()
            ),
        )
        .unwrap();
        let loaded = LoadedStep {
            device: Device::Cpu,
            #[cfg(feature = "cuda")]
            gpu: None,
        };
        let trial = StepTrial {
            loaded: &loaded,
            caches: RefCell::new(BTreeMap::new()),
            peers: RefCell::new(None),
            seed: 1,
        };
        let first = trial.peers("sh", &script).unwrap_err().to_string();
        assert!(
            first.contains("no GPU here") && first.contains("exit status: 3"),
            "{first}"
        );
        let again = trial.peers("sh", &script).unwrap_err().to_string();
        assert_eq!(again, first);
        let n = std::fs::read_to_string(&calls).unwrap().lines().count();
        assert_eq!(n, 1, "the script ran once");
        let _ = std::fs::remove_dir_all(dir);
    }
}
