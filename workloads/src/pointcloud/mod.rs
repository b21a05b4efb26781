//! Workload `point-cloud-sla`: ScatterFormer's Scattered Linear Attention
//! (He et al., "ScatterFormer: Efficient Voxel Transformer with Scattered
//! Linear Attention", ECCV 2024, arXiv 2401.00912) against the sort-and-pad
//! window attention it replaces.
//!
//! The operator: q, k, v laid out [N, heads, d] over the non-empty voxels of
//! a LiDAR frame, voxels grouped by window (ScatterFormer's backbone sorts
//! them by window once per stage and hands every layer `offsets`/`counts`);
//! per window and head, linear attention with ReLU features, no scaling and
//! a 1e-6 guard on the normaliser, accumulated in f32. The entries compute
//! one layer's attention over a whole frame:
//!
//! - `sla` (method): Scattered Linear Attention on the variable-length
//!   windows directly, no sorting or padding: [`sla`] on the CPU, our NVRTC
//!   kernel ([`cuda`], `kernels.cu`) with `--device cuda` (`sla-cuda` in the
//!   issue's words: the same entry on the GPU).
//! - `padded-linear-attention` (baseline): the same linear attention on
//!   windows padded to power-of-two groups: the cost of sort-and-pad alone.
//! - `padded-window-attention` (reference baseline): softmax attention in
//!   each padded window (SST/DSVT style), the approach the paper replaces.
//! - `pytorch-scatter`, `authors-triton`, `authors-triton-kernels` (GPU
//!   only): peers timed by `scripts/peer_sla.py` in the same run: the
//!   operator as a PyTorch user writes it (`index_add_`), and the authors'
//!   own Triton kernels loaded from their repository (fetched by
//!   `scripts/fetch-scatterformer.sh`, never copied here), as their model
//!   calls them and alone.
//!
//! Every configuration is a pass (`backward` = 0: forward; 1: forward plus
//! backward) and a precision (`bits` = 32: f32; 16: bf16 storage with f32
//! accumulation). Time-to-result is the median of repeated launches after
//! warm-up. On the GPU each launch is timed with its own CUDA events as
//! device time from a cold L2, the host's submission left out
//! ([`crate::device::ColdStart`]); the same launches timed on an idle
//! device, submission included, are recorded beside (`launch_s`). The
//! quality is the largest norm-wise
//! relative error of the output and the gradients against a float64
//! reference on the same inputs, divided by the tolerance of the precision
//! ([`sla::tolerance`]); the target is 1 (within tolerance).
//!
//! Modules: [`lidar`] (the ray-cast LiDAR simulator), [`voxel`]
//! (voxelisation and windows), [`stereo`] (the Middlebury capture),
//! [`sla`] (the CPU operator and its float64 reference), [`packing`] (how
//! the tensor-core forward kernel shares windows among warps), `cuda`
//! (feature `cuda`: the kernels' host side).

pub mod lidar;
pub mod packing;
pub mod sla;
pub mod stereo;
pub mod voxel;

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
mod peer;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;

use baselines::window_attention::{self as wa, Grads64, Scalar, Shape};
use half::bf16;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::clock::Stopwatch;
use crate::contract::*;
use crate::stats::median;
use crate::{seed, Device, WorkloadError};
use voxel::Windowed;

pub struct PointCloudSla;

/// The paper's Waymo configuration: 128 channels as 4 heads of 32.
pub const HEADS: usize = 4;
pub const DIM: usize = 32;

const TARGET: Target = Target {
    value: 1.0,
    source: "largest relative error of output and gradients against float64, over the precision's tolerance (f32 1e-4, bf16 1e-2; see sla::tolerance)",
};

const PASS_AND_PRECISION: &[Param] = &[
    Param {
        name: "backward",
        values: &[0.0, 1.0],
    },
    Param {
        name: "bits",
        values: &[32.0, 16.0],
    },
];

/// What a paired comparison between two entries must share: the scene
/// size (of `scaling`), the pass and the precision.
const SAME_POINT: &[&str] = &["voxels", "backward", "bits"];

/// Scene sizes of the `scaling` variant (non-empty voxels).
pub const SCALING_VOXELS: &[f64] = &[1e4, 3e4, 1e5, 3e5, 1e6];

static SPEC: WorkloadSpec = WorkloadSpec {
    id: "point-cloud-sla",
    version: 1,
    title: "Point-cloud window attention: ScatterFormer's Scattered Linear Attention vs sort-and-pad",
    summary: "One layer of window attention over a whole LiDAR frame: Scattered Linear Attention on variable-length windows against padded linear and padded softmax window attention, on CPU and CUDA, forward and backward, f32 and bf16.",
    papers: &[Paper {
        title: "ScatterFormer: Efficient Voxel Transformer with Scattered Linear Attention",
        arxiv: "2401.00912",
        section: "Sec. 3.2 (Scattered Linear Attention), its chunk-wise GPU algorithm; released code pcdet/models/backbones_3d/scatterformer.py (SLALayer) at a23f434",
    }],
    metric: Metric {
        name: "err_over_tol",
        description: "largest norm-wise relative error of output and gradients against float64, divided by the tolerance of the precision",
        direction: Direction::LowerIsBetter,
    },
    variants: &[
        Variant {
            id: "waymo-like",
            description: "One sweep of the project's ray-cast 64-beam LiDAR over a procedural street, voxelised as ScatterFormer's Waymo config (0.32 x 0.32 x 0.1875 m, z halved by the stem, 12 x 12 windows over the whole column).",
            role: VariantRole::Default,
            profiles: &[Profile::Quick, Profile::Full],
            target: TARGET,
            budget: Budget {
                quick_s: 60.0,
                full_s: 600.0,
            },
            params: &[],
        },
        Variant {
            id: "nuscenes-like",
            description: "One sweep of the 32-beam sensor, voxelised as ScatterFormer's nuScenes config (0.3 x 0.3 x 0.2 m, z halved, 20 x 20 windows).",
            role: VariantRole::Standard,
            profiles: &[Profile::Full],
            target: TARGET,
            budget: Budget {
                quick_s: 60.0,
                full_s: 600.0,
            },
            params: &[],
        },
        Variant {
            id: "stereo-middlebury",
            description: "A real capture: the Middlebury 2014 Motorcycle stereo pair's disparity (from the scikit-image wheel) back-projected to 3-D and voxelised (see stereo.rs).",
            role: VariantRole::Standard,
            profiles: &[Profile::Full],
            target: TARGET,
            budget: Budget {
                quick_s: 60.0,
                full_s: 600.0,
            },
            params: &[],
        },
        Variant {
            id: "scaling",
            description: "The same generator at 10k to 1M non-empty voxels (Waymo grid and windows), for the scaling chart.",
            role: VariantRole::Standard,
            profiles: &[Profile::Full],
            target: TARGET,
            budget: Budget {
                quick_s: 120.0,
                full_s: 1800.0,
            },
            params: &[Param {
                name: "voxels",
                values: SCALING_VOXELS,
            }],
        },
    ],
    entries: &[
        Entry {
            id: "padded-window-attention",
            kind: EntryKind::Reference,
            description: "Sort-and-pad: voxels gathered into windows padded to power-of-two groups, softmax attention (1/sqrt(d)) per padded window with pad keys masked, results scattered back.",
            grid: PASS_AND_PRECISION,
            fixed: &[],
            variants: &[],
            cuda_only: false,
            cpu_only_variants: &[],
        },
        Entry {
            id: "padded-linear-attention",
            kind: EntryKind::Baseline,
            description: "The same gather-into-padded-groups and scatter-back around SLA's own linear attention: isolates the cost of sort-and-pad.",
            grid: PASS_AND_PRECISION,
            fixed: &[],
            variants: &[],
            cuda_only: false,
            cpu_only_variants: &[],
        },
        Entry {
            id: "sla",
            kind: EntryKind::Method,
            description: "Scattered Linear Attention: per-window d x d states accumulated over the variable-length windows directly, no sorting or padding (our CPU code, or our CUDA kernel with --device cuda).",
            grid: PASS_AND_PRECISION,
            fixed: &[],
            variants: &[],
            cuda_only: false,
            cpu_only_variants: &[],
        },
        Entry {
            id: "pytorch-scatter",
            kind: EntryKind::Baseline,
            description: "The operator written the way a PyTorch user would (index_add_ into per-window states, autograd backward), timed by scripts/peer_sla.py.",
            grid: PASS_AND_PRECISION,
            fixed: &[],
            variants: &[],
            cuda_only: true,
            cpu_only_variants: &[],
        },
        Entry {
            id: "authors-triton",
            kind: EntryKind::Baseline,
            description: "The authors' Triton kernels (skyhehe123/ScatterFormer at a23f434, loaded from their file at run time) as their SLALayer calls them, with the normaliser in torch ops.",
            grid: PASS_AND_PRECISION,
            fixed: &[],
            variants: &[],
            cuda_only: true,
            cpu_only_variants: &[],
        },
        Entry {
            id: "authors-triton-kernels",
            kind: EntryKind::Baseline,
            description: "The authors' two Triton kernels alone (state, then state times q), without the normaliser: the lower bound of their path.",
            grid: PASS_AND_PRECISION,
            fixed: &[],
            variants: &[],
            cuda_only: true,
            cpu_only_variants: &[],
        },
    ],
    figures: &[
        Figure {
            key: "voxels",
            label: "non-empty voxels",
        },
        Figure {
            key: "windows",
            label: "windows",
        },
        Figure {
            key: "voxels_per_s",
            label: "voxels per second",
        },
        Figure {
            key: "forward_s",
            label: "forward (s)",
        },
        Figure {
            key: "backward_s",
            label: "backward (s)",
        },
        Figure {
            key: "workspace_bytes",
            label: "workspace (bytes)",
        },
        Figure {
            key: "forward_voxels_per_warp",
            label: "forward voxels per warp (autotuned)",
        },
        Figure {
            key: "forward_cluster",
            label: "forward schedule: 1 thread-block clusters, 0 grouped (autotuned)",
        },
        Figure {
            key: "backward_tensor_cores",
            label: "backward kernel: 1 tensor cores, 0 FMA",
        },
        Figure {
            key: "floor_ratio",
            label: "time / memory-traffic floor",
        },
        Figure {
            key: "err_out",
            label: "output rel. error",
        },
        Figure {
            key: "err_grad",
            label: "gradient rel. error",
        },
    ],
    // The GPU peers as ratios to our kernel, paired by trial in one run
    // (the "reported as ratios to sla-cuda"); the columns appear
    // where a peer ran.
    comparisons: &[
        Comparison {
            baseline: "pytorch-scatter",
            same: SAME_POINT,
            label: "speedup vs pytorch-scatter",
        },
        Comparison {
            baseline: "authors-triton",
            same: SAME_POINT,
            label: "speedup vs authors-triton",
        },
        Comparison {
            baseline: "authors-triton-kernels",
            same: SAME_POINT,
            label: "speedup vs authors-triton-kernels",
        },
    ],
    charts: &[
        Chart {
            id: "latency-forward",
            title: "Forward latency against scene size (f32)",
            x: Source::Param("voxels"),
            x_label: "non-empty voxels",
            y: Source::TimeToResult,
            y_label: "forward latency (s, median)",
            series: Series::Entries,
            entries: &[],
            theory: None,
            log_x: true,
            log_y: true,
            only: &[("backward", 0.0), ("bits", 32.0)],
        },
        Chart {
            id: "latency-forward-backward",
            title: "Forward + backward latency against scene size (f32)",
            x: Source::Param("voxels"),
            x_label: "non-empty voxels",
            y: Source::TimeToResult,
            y_label: "forward + backward latency (s, median)",
            series: Series::Entries,
            entries: &[],
            theory: None,
            log_x: true,
            log_y: true,
            only: &[("backward", 1.0), ("bits", 32.0)],
        },
        Chart {
            id: "breakdown",
            title: "Forward and backward time per entry (f32)",
            x: Source::Figure("voxels"),
            x_label: "non-empty voxels",
            y: Source::Figure("backward_s"),
            y_label: "seconds (median)",
            series: Series::Figures(&[("forward", "forward_s"), ("backward", "backward_s")]),
            entries: &["sla"],
            theory: None,
            log_x: true,
            log_y: true,
            only: &[("backward", 1.0), ("bits", 32.0)],
        },
        Chart {
            id: "occupancy",
            title: "Voxels per window (quantile function of the windows)",
            x: Source::Param("voxels"),
            x_label: "fraction of windows",
            y: Source::Figure("occ_p50"),
            y_label: "voxels in the window",
            series: Series::Curve(&[
                (0.1, "occ_p10"),
                (0.25, "occ_p25"),
                (0.5, "occ_p50"),
                (0.75, "occ_p75"),
                (0.9, "occ_p90"),
                (0.99, "occ_p99"),
                (1.0, "occ_max"),
            ]),
            entries: &["padded-window-attention"],
            theory: None,
            log_x: false,
            log_y: true,
            only: &[("backward", 0.0), ("bits", 32.0)],
        },
    ],
    claims: &[
        "ScatterFormer (ECCV 2024): the chunk-wise SLA operator runs in under 1 ms on moderate GPUs for a Waymo frame, and avoids the sorting and padding of window transformers such as SST, DSVT and FlatFormer.",
    ],
};

impl Workload for PointCloudSla {
    fn spec(&self) -> &'static WorkloadSpec {
        &SPEC
    }

    fn load(&self, ctx: &LoadContext<'_>) -> Result<Box<dyn Loaded>, WorkloadError> {
        let gpu = match ctx.device {
            Device::Cpu => None,
            Device::Cuda(ordinal) => Some(GpuSide::open(ordinal)?),
        };
        // A real capture does not change with the seed: load it once.
        let capture = match ctx.variant.id {
            "stereo-middlebury" => Some(Rc::new(stereo::middlebury()?)),
            _ => None,
        };
        Ok(Box::new(LoadedSla {
            variant: ctx.variant.id,
            profile: ctx.profile,
            capture,
            gpu,
        }))
    }
}

/// Repeats of one timed configuration (after warm-up) and warm-up runs.
fn repeats(profile: Profile, device: bool) -> (usize, usize) {
    match (profile, device) {
        (Profile::Quick, false) => (3, 1),
        (Profile::Full, false) => (5, 1),
        (Profile::Quick, true) => (20, 5),
        (Profile::Full, true) => (50, 10),
    }
}

#[cfg(feature = "cuda")]
struct GpuSide {
    gpu: cuda::Gpu,
    /// Device-to-device copy bandwidth (bytes moved per second).
    bandwidth: f64,
}

#[cfg(feature = "cuda")]
impl GpuSide {
    fn open(ordinal: usize) -> Result<Self, WorkloadError> {
        let gpu = cuda::Gpu::new(ordinal)?;
        let bandwidth = gpu.copy_bandwidth(1 << 28, 20)?;
        Ok(GpuSide { gpu, bandwidth })
    }
}

#[cfg(not(feature = "cuda"))]
struct GpuSide;

#[cfg(not(feature = "cuda"))]
impl GpuSide {
    fn open(_ordinal: usize) -> Result<Self, WorkloadError> {
        Err(WorkloadError::Device(
            "this binary was built without CUDA; rebuild with `--features cuda` (see README, \"On a GPU\")"
                .into(),
        ))
    }
}

struct LoadedSla {
    variant: &'static str,
    profile: Profile,
    capture: Option<Rc<Windowed>>,
    gpu: Option<GpuSide>,
}

impl Loaded for LoadedSla {
    fn trial(&self, ctx: &TrialContext<'_>) -> Result<Box<dyn TrialData + '_>, WorkloadError> {
        Ok(Box::new(TrialSla {
            loaded: self,
            seed: ctx.seed,
            scenes: RefCell::new(BTreeMap::new()),
            reference: RefCell::new(BTreeMap::new()),
            #[cfg(feature = "cuda")]
            peers: RefCell::new(BTreeMap::new()),
        }))
    }
}

/// One frame with its features, shared by every entry of a trial.
pub struct Scene {
    pub windowed: Rc<Windowed>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub dout: Vec<f32>,
    half: RefCell<Option<Rc<[Vec<bf16>; 4]>>>,
}

impl Scene {
    /// Features from a fixed-seed standard normal generator (the paper's
    /// inputs are a trained layer's projections, which we do not have).
    pub fn new(windowed: Rc<Windowed>, seed: u64) -> Self {
        let len = windowed.n_voxels() * HEADS * DIM;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut draw = || -> Vec<f32> {
            (0..len)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect::<Vec<f32>>()
        };
        let (q, k, v, dout) = (draw(), draw(), draw(), draw());
        Scene {
            windowed,
            q,
            k,
            v,
            dout,
            half: RefCell::new(None),
        }
    }

    fn shape(&self) -> Shape {
        Shape {
            n: self.windowed.n_voxels(),
            heads: HEADS,
            dim: DIM,
        }
    }

    /// The inputs rounded to bf16 (computed once).
    fn bf16(&self) -> Rc<[Vec<bf16>; 4]> {
        self.half
            .borrow_mut()
            .get_or_insert_with(|| {
                let r = |x: &[f32]| x.iter().map(|&v| bf16::from_f32(v)).collect();
                Rc::new([r(&self.q), r(&self.k), r(&self.v), r(&self.dout)])
            })
            .clone()
    }

    /// Scene figures recorded with every configuration.
    fn figures(&self, out: &mut Outcome) {
        let occ = self.windowed.occupancy();
        let mut sizes: Vec<u32> = self.windowed.counts.clone();
        sizes.sort_unstable();
        let q = |p: f64| sizes[((sizes.len() - 1) as f64 * p).round() as usize] as f64;
        for (k, v) in [
            ("voxels", occ.voxels as f64),
            ("windows", occ.windows as f64),
            ("occ_mean", occ.mean),
            ("occ_p10", q(0.10)),
            ("occ_p25", q(0.25)),
            ("occ_p50", q(0.50)),
            ("occ_p75", q(0.75)),
            ("occ_p90", q(0.90)),
            ("occ_p99", q(0.99)),
            ("occ_max", occ.max as f64),
        ] {
            out.figures.insert(k.into(), v);
        }
    }
}

/// Which float64 reference an entry is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum RefKind {
    Linear,
    Softmax,
}

/// (scene size, reference kind, bits).
type RefKey = (usize, RefKind, u32);

struct TrialSla<'l> {
    loaded: &'l LoadedSla,
    seed: u64,
    /// Scenes by size (0: the variant's own frame).
    scenes: RefCell<BTreeMap<usize, Rc<Scene>>>,
    /// The references of the scene size in use, by (size, kind, bits).
    reference: RefCell<BTreeMap<RefKey, Rc<Checked>>>,
    /// Each peer script call of the trial, by (implementation, scene size,
    /// bits): its result, or why it failed.
    #[cfg(feature = "cuda")]
    peers: RefCell<BTreeMap<(String, usize, u32), PeerCall>>,
}

/// One peer script call's result, or why it failed (not repeated).
#[cfg(feature = "cuda")]
type PeerCall = Result<Rc<peer::PeerResult>, String>;

impl TrialSla<'_> {
    fn scene(&self, size: usize) -> Result<Rc<Scene>, WorkloadError> {
        if let Some(s) = self.scenes.borrow().get(&size) {
            return Ok(s.clone());
        }
        let scene_seed = seed::derive(self.seed, &["scene", &size.to_string()]);
        let windowed = match self.loaded.variant {
            "waymo-like" => Rc::new(lidar::waymo_like(scene_seed)),
            "nuscenes-like" => Rc::new(lidar::nuscenes_like(scene_seed)),
            "stereo-middlebury" => self
                .loaded
                .capture
                .clone()
                .expect("loaded with the variant"),
            "scaling" => Rc::new(lidar::scaling(size, scene_seed)),
            other => {
                return Err(WorkloadError::Config(format!(
                    "point-cloud-sla has no variant `{other}`"
                )))
            }
        };
        let scene = Rc::new(Scene::new(
            windowed,
            seed::derive(self.seed, &["features", &size.to_string()]),
        ));
        self.scenes.borrow_mut().insert(size, scene.clone());
        Ok(scene)
    }

    fn reference(&self, size: usize, scene: &Scene, kind: RefKind, bits: u32) -> Rc<Checked> {
        let key = (size, kind, bits);
        if let Some(r) = self.reference.borrow().get(&key) {
            return r.clone();
        }
        // Keep only the references of one scene size: those of a large
        // frame are big.
        self.reference.borrow_mut().retain(|k, _| k.0 == size);
        let checked = Rc::new(Checked::new(scene, kind, bits, self.seed));
        self.reference.borrow_mut().insert(key, checked.clone());
        checked
    }
}

/// Voxels of a frame checked against float64: all of them up to this many;
/// beyond, a seeded sample of whole windows of about this many voxels.
/// Windows do not interact, so a sample of windows checks the operator as
/// a whole frame would; it keeps a 1M-voxel reference at 0.4 GB, not 4 GB.
pub const CHECKED_VOXELS: usize = 100_000;

/// A float64 reference over the checked windows of a frame.
pub struct Checked {
    /// Voxels checked, in the order of the reference's rows.
    rows: Vec<usize>,
    grads: Grads64,
}

impl Checked {
    fn new(scene: &Scene, kind: RefKind, bits: u32, seed: u64) -> Self {
        let w = &scene.windowed;
        let mut windows: Vec<usize> = (0..w.n_windows()).collect();
        if w.n_voxels() > CHECKED_VOXELS {
            use rand::seq::SliceRandom;
            windows.shuffle(&mut ChaCha8Rng::seed_from_u64(seed::derive(
                seed,
                &["checked"],
            )));
            let mut total = 0;
            windows.retain(|&i| {
                let keep = total < CHECKED_VOXELS;
                total += w.counts[i] as usize;
                keep
            });
            windows.sort_unstable();
        }
        let mut rows = Vec::new();
        let (mut offsets, mut counts) = (Vec::new(), Vec::new());
        for &i in &windows {
            offsets.push(rows.len() as u32);
            counts.push(w.counts[i]);
            rows.extend((0..w.counts[i] as usize).map(|r| w.offsets[i] as usize + r));
        }
        let row = HEADS * DIM;
        let pick = |x: &[f32]| -> Vec<f64> {
            rows.iter()
                .flat_map(|&r| x[r * row..(r + 1) * row].iter().map(|&v| v as f64))
                .collect()
        };
        // bf16 configurations are checked against the bf16-rounded inputs,
        // so the error measures the operator, not the input rounding.
        let [q, k, v, d] = if bits == 16 {
            let h = scene.bf16();
            let back = |x: &[bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
            [0, 1, 2, 3].map(|i| pick(&back(&h[i])))
        } else {
            [&scene.q, &scene.k, &scene.v, &scene.dout].map(|x| pick(x))
        };
        let shape = Shape {
            n: rows.len(),
            heads: HEADS,
            dim: DIM,
        };
        let grads = match kind {
            RefKind::Linear => sla::reference_f64(&q, &k, &v, &d, &offsets, &counts, shape),
            RefKind::Softmax => {
                wa::softmax_window_reference_f64(&q, &k, &v, &d, &offsets, &counts, shape)
            }
        };
        Checked { rows, grads }
    }

    /// The checked rows of a full-frame result.
    fn pick(&self, x: &[f32]) -> Vec<f32> {
        let row = HEADS * DIM;
        self.rows
            .iter()
            .flat_map(|&r| x[r * row..(r + 1) * row].iter().copied())
            .collect()
    }
}

/// What the entries compute, on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Sla,
    PaddedLinear,
    PaddedSoftmax,
}

impl Op {
    fn of(entry: &str) -> Option<Op> {
        match entry {
            "sla" => Some(Op::Sla),
            "padded-linear-attention" => Some(Op::PaddedLinear),
            "padded-window-attention" => Some(Op::PaddedSoftmax),
            _ => None,
        }
    }

    fn reference(self) -> RefKind {
        match self {
            Op::PaddedSoftmax => RefKind::Softmax,
            _ => RefKind::Linear,
        }
    }
}

/// The parameters every configuration has.
struct Config {
    size: usize,
    backward: bool,
    bits: u32,
}

impl Config {
    fn of(params: &Params) -> Result<Self, WorkloadError> {
        let bits = params.usize("bits")? as u32;
        if bits != 32 && bits != 16 {
            return Err(WorkloadError::Config(format!(
                "bits must be 32 (f32) or 16 (bf16), got {bits}"
            )));
        }
        Ok(Config {
            size: params.get("voxels").map_or(0, |v| v as usize),
            backward: params.usize("backward")? == 1,
            bits,
        })
    }
}

impl TrialData for TrialSla<'_> {
    fn setup(&self, entry: &Entry, params: &Params) -> Result<Box<dyn Job + '_>, WorkloadError> {
        let cfg = Config::of(params)?;
        let scene = self.scene(cfg.size)?;
        let (reps, warm) = repeats(self.loaded.profile, self.loaded.gpu.is_some());
        if let Some(gpu) = &self.loaded.gpu {
            return gpu_job(self, gpu, entry.id, scene, cfg, reps, warm);
        }
        let op = Op::of(entry.id).ok_or_else(|| {
            WorkloadError::Config(format!("entry `{}` runs only with --device cuda", entry.id))
        })?;
        let job: Box<dyn Job + '_> = if cfg.bits == 16 {
            let h = scene.bf16();
            Box::new(CpuJob::<bf16, _>::new(
                self,
                op,
                scene.clone(),
                h,
                cfg,
                reps,
                warm,
            ))
        } else {
            Box::new(CpuJob::<f32, _>::new(
                self,
                op,
                scene.clone(),
                (),
                cfg,
                reps,
                warm,
            ))
        };
        Ok(job)
    }
}

/// Where a CPU job's inputs live for its element type.
trait Inputs<T> {
    fn get<'s>(&'s self, scene: &'s Scene) -> [&'s [T]; 4];
}

impl Inputs<f32> for () {
    fn get<'s>(&'s self, scene: &'s Scene) -> [&'s [f32]; 4] {
        [&scene.q, &scene.k, &scene.v, &scene.dout]
    }
}

impl Inputs<bf16> for Rc<[Vec<bf16>; 4]> {
    fn get<'s>(&'s self, _scene: &'s Scene) -> [&'s [bf16]; 4] {
        [&self[0], &self[1], &self[2], &self[3]]
    }
}

struct CpuJob<'t, T: Scalar, I: Inputs<T>> {
    trial: &'t TrialSla<'t>,
    op: Op,
    scene: Rc<Scene>,
    inputs: I,
    cfg: Config,
    reps: usize,
    out: [Vec<T>; 4],
    totals: Vec<f64>,
    forwards: Vec<f64>,
    workspace_bytes: usize,
}

impl<'t, T: Scalar + Default, I: Inputs<T>> CpuJob<'t, T, I> {
    fn new(
        trial: &'t TrialSla<'t>,
        op: Op,
        scene: Rc<Scene>,
        inputs: I,
        cfg: Config,
        reps: usize,
        warm: usize,
    ) -> Self {
        let len = scene.q.len();
        let mut job = CpuJob {
            trial,
            op,
            scene,
            inputs,
            cfg,
            reps,
            out: std::array::from_fn(|_| vec![T::default(); len]),
            totals: Vec::new(),
            forwards: Vec::new(),
            workspace_bytes: 0,
        };
        // Warm-up (untimed): page in the outputs, spin up the thread pool.
        for _ in 0..warm {
            job.once(None);
        }
        job
    }

    /// One forward (and backward) pass; with a stopwatch, records the times.
    fn once(&mut self, sw: Option<&Stopwatch<'_>>) {
        let t0 = sw.map(|s| s.elapsed());
        let [q, k, v, dout] = self.inputs.get(&self.scene);
        let (o, c) = (&self.scene.windowed.offsets, &self.scene.windowed.counts);
        let shape = self.scene.shape();
        let [out, dq, dk, dv] = &mut self.out;
        self.workspace_bytes = match self.op {
            Op::Sla => sla::forward(q, k, v, o, c, shape, out).workspace_bytes,
            Op::PaddedLinear => {
                wa::padded_linear_forward(q, k, v, o, c, shape, out).workspace_bytes
            }
            Op::PaddedSoftmax => {
                wa::padded_softmax_forward(q, k, v, o, c, shape, out).workspace_bytes
            }
        };
        let t1 = sw.map(|s| s.elapsed());
        if self.cfg.backward {
            let ws = match self.op {
                Op::Sla => sla::backward(q, k, v, dout, o, c, shape, dq, dk, dv).workspace_bytes,
                Op::PaddedLinear => {
                    wa::padded_linear_backward(q, k, v, dout, o, c, shape, dq, dk, dv)
                        .workspace_bytes
                }
                Op::PaddedSoftmax => {
                    wa::padded_softmax_backward(q, k, v, dout, o, c, shape, dq, dk, dv)
                        .workspace_bytes
                }
            };
            self.workspace_bytes = self.workspace_bytes.max(ws);
        }
        if let (Some(sw), Some(t0), Some(t1)) = (sw, t0, t1) {
            self.forwards.push(t1 - t0);
            self.totals.push(sw.elapsed() - t0);
        }
    }
}

impl<T: Scalar + Default, I: Inputs<T>> Job for CpuJob<'_, T, I> {
    fn run(&mut self, sw: &mut Stopwatch<'_>) -> Result<(), WorkloadError> {
        for _ in 0..self.reps {
            sw.check()?;
            self.once(Some(sw));
        }
        Ok(())
    }

    fn evaluate(self: Box<Self>) -> Result<Outcome, WorkloadError> {
        let reference = self.trial.reference(
            self.cfg.size,
            &self.scene,
            self.op.reference(),
            self.cfg.bits,
        );
        let [out, dq, dk, dv] = &self.out;
        let f = |x: &[T]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
        let errs = Errors::of(
            &f(out),
            self.cfg.backward.then(|| [f(dq), f(dk), f(dv)]),
            &reference,
        );
        let mut outcome = errs.outcome(self.cfg.bits);
        timing_figures(
            &mut outcome,
            &self.totals,
            &self.forwards,
            self.cfg.backward,
            self.scene.windowed.n_voxels(),
        );
        outcome
            .figures
            .insert("workspace_bytes".into(), self.workspace_bytes as f64);
        // The baselines keep their padded buffers for the next call (as a
        // caching allocator would); give them back between configurations.
        wa::release_workspace();
        self.scene.figures(&mut outcome);
        Ok(outcome)
    }
}

/// Relative errors of one configuration's results.
struct Errors {
    out: f64,
    grad: Option<f64>,
    /// Voxels compared with the float64 reference.
    checked: usize,
}

impl Errors {
    fn of(out: &[f32], grads: Option<[Vec<f32>; 3]>, reference: &Checked) -> Self {
        let r = &reference.grads;
        let err = |got: &[f32], want: &[f64]| sla::max_rel_err(&reference.pick(got), want);
        Errors {
            out: err(out, &r.out),
            grad: grads
                .map(|[dq, dk, dv]| err(&dq, &r.dq).max(err(&dk, &r.dk)).max(err(&dv, &r.dv))),
            checked: reference.rows.len(),
        }
    }

    fn outcome(&self, bits: u32) -> Outcome {
        let worst = self.grad.map_or(self.out, |g| g.max(self.out));
        let mut o = Outcome::new(worst / sla::tolerance(bits))
            .figure("err_out", self.out)
            .figure("checked_voxels", self.checked as f64);
        if let Some(g) = self.grad {
            o = o.figure("err_grad", g);
        }
        o
    }
}

/// Time-to-result is the median repeat; forward and backward medians are
/// recorded beside it.
fn timing_figures(o: &mut Outcome, totals: &[f64], forwards: &[f64], backward: bool, n: usize) {
    let t = median(totals);
    o.measured_time_s = Some(t);
    o.figures.insert("voxels_per_s".into(), n as f64 / t);
    if !forwards.is_empty() {
        let f = median(forwards);
        o.figures.insert("forward_s".into(), f);
        if backward {
            o.figures.insert("backward_s".into(), t - f);
        }
    }
}

/// The median of the samples taken on an idle device ([`cuda::Timing`]'s
/// `Launch`), beside the time-to-result; nothing when there are none.
#[cfg(feature = "cuda")]
fn launch_figure(o: &mut Outcome, samples: &[f64]) {
    if !samples.is_empty() {
        o.figures.insert("launch_s".into(), median(samples));
    }
}

#[cfg(not(feature = "cuda"))]
fn gpu_job<'t>(
    _trial: &'t TrialSla<'t>,
    _gpu: &'t GpuSide,
    _entry: &str,
    _scene: Rc<Scene>,
    _cfg: Config,
    _reps: usize,
    _warm: usize,
) -> Result<Box<dyn Job + 't>, WorkloadError> {
    unreachable!("GpuSide cannot be opened without the cuda feature")
}

#[cfg(feature = "cuda")]
fn gpu_job<'t>(
    trial: &'t TrialSla<'t>,
    gpu: &'t GpuSide,
    entry: &str,
    scene: Rc<Scene>,
    cfg: Config,
    reps: usize,
    warm: usize,
) -> Result<Box<dyn Job + 't>, WorkloadError> {
    let op = match Op::of(entry) {
        Some(Op::Sla) => cuda::Op::Sla,
        Some(Op::PaddedLinear) => cuda::Op::PaddedLinear,
        Some(Op::PaddedSoftmax) => cuda::Op::PaddedSoftmax,
        None => {
            return Ok(Box::new(peer::PeerJob::new(
                trial,
                entry,
                scene,
                cfg,
                Op::Sla.reference(),
            )?))
        }
    };
    let reference = match op {
        cuda::Op::PaddedSoftmax => RefKind::Softmax,
        _ => RefKind::Linear,
    };
    if cfg.bits == 16 {
        let h = scene.bf16();
        let bits = |x: &[bf16]| x.iter().map(|v| v.to_bits()).collect::<Vec<u16>>();
        let (q, k, v, d) = (bits(&h[0]), bits(&h[1]), bits(&h[2]), bits(&h[3]));
        gpu_job_typed::<u16>(
            trial,
            gpu,
            op,
            reference,
            scene,
            cfg,
            reps,
            warm,
            [&q, &k, &v, &d],
        )
    } else {
        let s = scene.clone();
        gpu_job_typed::<f32>(
            trial,
            gpu,
            op,
            reference,
            scene,
            cfg,
            reps,
            warm,
            [&s.q, &s.k, &s.v, &s.dout],
        )
    }
}

#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn gpu_job_typed<'t, T: cuda::GpuElem>(
    trial: &'t TrialSla<'t>,
    gpu: &'t GpuSide,
    op: cuda::Op,
    reference: RefKind,
    scene: Rc<Scene>,
    cfg: Config,
    reps: usize,
    warm: usize,
    x: [&[T]; 4],
) -> Result<Box<dyn Job + 't>, WorkloadError> {
    let w = &scene.windowed;
    let mut problem = cuda::Problem::new(
        &gpu.gpu,
        op,
        &cuda::HostScene::new(x, &w.offsets, &w.counts),
    )?;
    for _ in 0..warm {
        problem.launch(cfg.backward)?;
    }
    gpu.gpu.synchronize()?;
    Ok(Box::new(GpuJob {
        trial,
        gpu,
        problem,
        reference,
        scene,
        cfg,
        reps,
        totals: Vec::new(),
        launch_totals: Vec::new(),
        forwards: Vec::new(),
    }))
}

#[cfg(feature = "cuda")]
struct GpuJob<'t, T: cuda::GpuElem> {
    trial: &'t TrialSla<'t>,
    gpu: &'t GpuSide,
    problem: cuda::Problem<'t, T>,
    reference: RefKind,
    scene: Rc<Scene>,
    cfg: Config,
    reps: usize,
    totals: Vec<f64>,
    launch_totals: Vec<f64>,
    forwards: Vec<f64>,
}

#[cfg(feature = "cuda")]
impl<T: cuda::GpuElem> Job for GpuJob<'_, T> {
    fn run(&mut self, sw: &mut Stopwatch<'_>) -> Result<(), WorkloadError> {
        // `reps` samples, one launch each, the budget checked before each.
        let samples = |problem: &mut cuda::Problem<'_, T>, backward, timing| {
            let mut out = Vec::with_capacity(self.reps);
            for _ in 0..self.reps {
                sw.check()?;
                out.extend(problem.time(backward, 1, timing)?);
            }
            Ok::<_, WorkloadError>(out)
        };
        let backward = self.cfg.backward;
        self.totals = samples(&mut self.problem, backward, cuda::Timing::Device)?;
        // The same launches timed on an idle device, host submission and
        // warm L2 included (runs r1-r6's protocol), recorded beside.
        self.launch_totals = samples(&mut self.problem, backward, cuda::Timing::Launch)?;
        if backward {
            // The forward pass alone, for the breakdown.
            self.forwards = samples(&mut self.problem, false, cuda::Timing::Device)?;
            // Leave the backward results in place for evaluation.
            self.problem.launch(true)?;
        }
        self.gpu.gpu.synchronize()
    }

    fn evaluate(self: Box<Self>) -> Result<Outcome, WorkloadError> {
        let res = self.problem.outputs()?;
        let reference =
            self.trial
                .reference(self.cfg.size, &self.scene, self.reference, self.cfg.bits);
        let errs = Errors::of(
            &res.out,
            self.cfg.backward.then_some([res.dq, res.dk, res.dv]),
            &reference,
        );
        let mut o = errs.outcome(self.cfg.bits);
        let n = self.scene.windowed.n_voxels();
        timing_figures(&mut o, &self.totals, &self.forwards, self.cfg.backward, n);
        launch_figure(&mut o, &self.launch_totals);
        let t = o.measured_time_s.unwrap_or(f64::NAN);
        // The floor: q, k, v read and out written (forward); plus q, k, v,
        // dout read and dq, dk, dv written (backward), at the measured copy
        // bandwidth.
        let tensors = if self.cfg.backward { 11.0 } else { 4.0 };
        let bytes = tensors * (n * HEADS * DIM * std::mem::size_of::<T>()) as f64;
        let floor = bytes / self.gpu.bandwidth;
        o.figures.insert("floor_s".into(), floor);
        o.figures.insert("floor_ratio".into(), t / floor);
        o.figures.insert(
            "workspace_bytes".into(),
            self.problem.workspace_bytes(self.cfg.backward) as f64,
        );
        o.figures
            .insert("copy_bandwidth_bytes_per_s".into(), self.gpu.bandwidth);
        o.figures
            .insert("pad_ratio".into(), self.problem.pad_ratio());
        let (per_warp, cluster) = match self.problem.forward_schedule() {
            Some(cuda::Schedule::Grouped { per_warp }) => (Some(per_warp), 0.0),
            Some(cuda::Schedule::Cluster { per_warp }) => (Some(per_warp), 1.0),
            _ => (None, 0.0),
        };
        if let Some(per_warp) = per_warp {
            o.figures
                .insert("forward_voxels_per_warp".into(), per_warp as f64);
            o.figures.insert("forward_cluster".into(), cluster);
        }
        if self.cfg.backward && matches!(self.problem.op(), cuda::Op::Sla | cuda::Op::PaddedLinear)
        {
            let tc = self.problem.backward_kernel() == cuda::Backward::TensorCore;
            o.figures
                .insert("backward_tensor_cores".into(), f64::from(u8::from(tc)));
        }
        self.scene.figures(&mut o);
        Ok(o)
    }
}

/// The peer script, found from the working directory (the repository root)
/// unless `BENCH_SUITE_PEER_SLA` names it.
pub fn peer_script() -> PathBuf {
    std::env::var_os("BENCH_SUITE_PEER_SLA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("scripts/peer_sla.py"))
}
