//! The CUDA side of `point-cloud-sla` (feature `cuda`): our kernels in
//! `kernels.cu`, compiled at run time with NVRTC for `compute_90`, and the
//! host code that lays a scene out on the device, launches an operator and
//! times it with CUDA events ([`Timing`]).
//!
//! What is metadata and what is work. Everything derived from the window
//! sizes alone (the offsets, the work list that packs small windows into
//! blocks, the padded layout and the voxel-to-padded-row map) is built once
//! per layout, on the host, untimed: ScatterFormer's backbone and the
//! SST/DSVT-style window transformers alike compute it once per stage and
//! reuse it in every layer of the stage. What every layer pays, and what is
//! timed, is the data movement and the arithmetic: for the padded baselines
//! that is zeroing the padded buffers, gathering q, k, v into them (the
//! "sort" of the features into window order), attention on the padded
//! groups, and scattering the results back.
//!
//! The SLA forward kernel (and the padded-linear baseline, which runs the
//! same kernel on padded groups) multiplies on tensor cores: f32 inputs in
//! f32 accuracy (3xTF32), bf16 inputs with bf16 operands and f32
//! accumulation (see kernels.cu). For tuning on a GPU machine without
//! a Rust toolchain: `BENCH_SUITE_SLA_CU` compiles another kernels.cu,
//! `BENCH_SUITE_SLA_SMALL` changes the largest window given one warp and
//! `BENCH_SUITE_SLA_GROUP` fixes the grouped forward schedule's voxels per
//! warp instead of autotuning it (each with a warning; published runs set
//! none). `sla_forward_sweep` times kernel sources and schedules side by
//! side, each beside the forward kernel with one FMA per lane and element
//! ([`Op::SlaFfma`]).
//!
//! Forward schedules ([`Schedule`]): the block list gives every window over
//! `SMALL` voxels a block of eight warps; the grouped list ([`packing`])
//! gives a window warps in proportion to its voxels. The forward uses the
//! grouped list with its share autotuned per layout in set-up
//! (measurements at [`PER_WARP_CANDIDATES`]).

use std::sync::Arc;

use crate::device::ColdStart;
pub use crate::device::Timing;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

use crate::pointcloud::packing;
use crate::stats::median;
use crate::WorkloadError;

const SOURCE: &str = include_str!("kernels.cu");
/// Warps per block of the SLA kernels (`WARPS` in kernels.cu).
const WARPS: usize = packing::WARPS;
/// Dynamic shared memory of the tensor-core forward kernel: per warp a
/// staging area of 16 rows and a 32-row state tile, rows of 40 floats
/// (`FWD_WARP_FLOATS` in kernels.cu).
const FWD_SMEM: u32 = (WARPS * (16 + 32) * 40 * 4) as u32;
/// Dynamic shared memory of the tensor-core backward kernel: per warp two
/// staging areas of 16 rows and a 32-row state tile, rows of 40 floats
/// (`BWD_WARP_FLOATS` in kernels.cu).
const BWD_SMEM: u32 = (WARPS * (16 + 16 + 32) * 40 * 4) as u32;
/// Windows with more voxels than this get a whole block (`SMALL`). 32
/// measured best on an H100 among 16, 32, 64 and 128 with the FMA kernel
/// (Waymo-like frames; larger values leave big windows to one warp), and
/// with tensor cores against 64 on an H100 (64: 11% slower on a Waymo-like
/// frame, 2% faster at 300k voxels) and against 16 and 64 on an H200 (16:
/// 8% slower on the frame); `sla_forward_sweep`, 2026-11-27.
const SMALL: u32 = 32;
/// Voxels per warp among which the forward schedule is autotuned, once per
/// layout in untimed set-up ([`Problem::new`]). Measured on an H200
/// (`sla_forward_sweep`, one session, 2026-11-27, f32 / bf16) the best
/// share grows with the scene and depends on its windows: 16 at 10k
/// voxels (0.0233 / 0.0220 ms; the block list 0.0272 / 0.0249), 64 on a
/// Waymo-like frame of 27k (0.0431 / 0.0372; block list 0.0452 / 0.0418),
/// 64 on a nuScenes-like frame of 9.4k with a few very large windows
/// (0.0247 / 0.0236; block list 0.0297 / 0.0283), 64 at 100k, 128-256 at
/// 300k and 256 at 1M (0.7535 / 0.8214 ms; block list 0.9414 / 0.9332).
/// No fixed share is within 10% of the best at every size, so each layout
/// gets the fastest of these, as Triton's autotuner picks a kernel
/// configuration per shape. In the workload's own timing, on the run's
/// scenes, alternating r4's binary (block list) and r5's twice on one H100
/// (`ab-records.jsonl` of the r5 run, 2026-11-27), the autotuned grouped
/// schedule made the f32 forward 2-11% faster (1M voxels 0.98 -> 0.87 ms)
/// but the bf16 forward of that time (TF32 tensor cores) 2-6% slower at
/// five of seven sizes and frames, so bf16 kept the block list until its
/// own bf16 tensor-core kernel (`sla_fwd_bf16mma`), with which the
/// autotuned grouped schedule beat the block list at every size and frame
/// of the sweep (H100, 2026-11-28, medians of two rounds: Waymo-like frame
/// 0.0255 against 0.0304 ms, 1M voxels 0.611 against 0.657 ms).
/// The shares between the powers of two were added on 2026-11-29 after a
/// sweep on an H200 (`results/runs/2026-11-29-h200-point-cloud-sla-shares`,
/// f32 / bf16, ms): on the Waymo-like frame `g48` took 0.0350 / 0.0221
/// where the powers of two gave at best 0.0372 / 0.0225 (`c64` / `g64`);
/// at 30k voxels `g48` 0.0229 in bf16 against 0.0244; at 10k `c24`
/// 0.0214 in f32 against 0.0223.
const PER_WARP_CANDIDATES: &[u32] = &[8, 16, 24, 32, 48, 64, 96, 128, 192, 256];
/// Voxels per warp of the cluster schedules the autotuner also tries
/// ([`Schedule::Cluster`]). Measured on an H200 (`sla_forward_sweep`,
/// 2026-11-28, f32 / bf16, ms): on the nuScenes-like frame, whose largest
/// window bounds the time, `c32` took 0.0219 / 0.0166 against the best
/// grouped share's 0.0284 / 0.0179; on the Waymo-like frame `c64` tied
/// with `g64` (0.0396 / 0.0239 against 0.0405 / 0.0240); at 10k voxels and
/// from 100k up the grouped shares were as fast or faster (1M voxels: `c64`
/// 0.879 / 0.526, `g64` 0.848 / 0.524). Smaller shares (`c8`, `c16`) were
/// slower everywhere; `c24` and `c48` were added with the grouped shares
/// between the powers of two (above).
const CLUSTER_PER_WARP_CANDIDATES: &[u32] = &[24, 32, 48, 64];
/// Forward launches per candidate while autotuning: warm-up, then timed
/// (the median decides).
const AUTOTUNE_WARM: usize = 2;
const AUTOTUNE_REPS: usize = 10;

/// How the tensor-core forward kernel (`Op::Sla`, and the padded-linear
/// baseline's attention) shares windows among warps. The backward and the
/// FMA forward kernel always use the block-per-big-window list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Windows over `small` voxels get a whole block of eight warps; the
    /// rest are packed eight to a block, one warp each (`WorkList`).
    Blocks { small: u32 },
    /// A window gets about one warp per `per_warp` voxels, up to eight,
    /// and windows are packed into blocks by warp count ([`packing`]).
    Grouped { per_warp: u32 },
    /// As `Grouped`, but a window given more than eight warps (up to 32)
    /// spans up to [`packing::CLUSTER`] blocks of a thread-block cluster,
    /// which sum its state in distributed shared memory
    /// ([`packing::cluster_items`], `sla_fwd_cluster_*`): the largest
    /// windows, which bound small scenes (the r7 run's Nsight Compute
    /// profile), get four times the warps. The autotuner tries it
    /// ([`CLUSTER_PER_WARP_CANDIDATES`]); the tuning sweep takes it as
    /// `c32`, and the kernel test checks it against float64.
    Cluster { per_warp: u32 },
}

impl Schedule {
    /// `32` (blocks, the given threshold), `g32` (grouped, voxels per
    /// warp) or `c32` (clusters, voxels per warp), as the tuning sweep
    /// takes it.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let per_warp = |n: &str| n.parse().ok().filter(|&n| n > 0);
        if let Some(n) = s.strip_prefix('g') {
            per_warp(n).map(|per_warp| Schedule::Grouped { per_warp })
        } else if let Some(n) = s.strip_prefix('c') {
            per_warp(n).map(|per_warp| Schedule::Cluster { per_warp })
        } else {
            s.parse().ok().map(|small| Schedule::Blocks { small })
        }
    }
}
/// Smallest padded length of the sort-and-pad baselines.
pub const MIN_PAD: u32 = 8;
/// Queries per tile of the softmax kernels, and tiles per block.
const TILE: u32 = 32;
const TILES_PER_BLOCK: u32 = 4;

fn dev(what: &str, e: impl std::fmt::Display) -> WorkloadError {
    WorkloadError::Device(format!("{what}: {e}"))
}

/// An element type the kernels are instantiated for.
pub trait GpuElem: DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + 'static {
    const SUFFIX: &'static str;
    fn to_f32(self) -> f32;
}

impl GpuElem for f32 {
    const SUFFIX: &'static str = "f32";
    fn to_f32(self) -> f32 {
        self
    }
}

/// bf16 travels as its bit pattern.
impl GpuElem for u16 {
    const SUFFIX: &'static str = "bf16";
    fn to_f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
}

/// A CUDA context with the workload's kernels loaded.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    cold: ColdStart,
    pub name: String,
    /// Wall seconds NVRTC took (reported, never timed).
    pub compile_s: f64,
}

impl Gpu {
    /// The built-in kernels, or those of `BENCH_SUITE_SLA_CU` (tuning).
    pub fn new(ordinal: usize) -> Result<Self, WorkloadError> {
        let source = crate::device::kernel_source("BENCH_SUITE_SLA_CU", SOURCE)?;
        Self::with_source(ordinal, &source)
    }

    /// The kernels compiled from `source` (a kernels.cu).
    pub fn with_source(ordinal: usize, source: &str) -> Result<Self, WorkloadError> {
        let ctx = crate::device::cuda_context(ordinal)?;
        // One stream, used in order: cudarc's per-buffer event tracking only
        // adds host work to every launch here.
        // SAFETY: no buffer of this context is ever used on a second stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let t0 = std::time::Instant::now();
        let ptx = compile_ptx_with_opts(
            source,
            CompileOptions {
                arch: Some("compute_90"),
                options: vec!["-DHEAD_DIM=32".into()],
                ..Default::default()
            },
        )
        .map_err(|e| dev("NVRTC could not compile kernels.cu", e))?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| dev("loading the compiled kernels", e))?;
        let compile_s = t0.elapsed().as_secs_f64();
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let cold = ColdStart::new(&ctx, &stream)?;
        Ok(Gpu {
            ctx,
            stream,
            module,
            cold,
            name,
            compile_s,
        })
    }

    fn function(&self, name: &str) -> Result<CudaFunction, WorkloadError> {
        self.module
            .load_function(name)
            .map_err(|e| dev(&format!("kernel `{name}`"), e))
    }

    /// Device-to-device copy bandwidth in bytes per second (bytes read plus
    /// bytes written), the median of `repeats` copies of `bytes` bytes: the
    /// denominator of the memory-traffic floor.
    pub fn copy_bandwidth(&self, bytes: usize, repeats: usize) -> Result<f64, WorkloadError> {
        let n = bytes / 4;
        let src: CudaSlice<f32> = self.stream.alloc_zeros(n).map_err(|e| dev("alloc", e))?;
        let mut dst: CudaSlice<f32> = self.stream.alloc_zeros(n).map_err(|e| dev("alloc", e))?;
        let mut times = Vec::with_capacity(repeats);
        for _ in 0..repeats + 2 {
            let t = self.time(Timing::Device, || {
                self.stream
                    .memcpy_dtod(&src, &mut dst)
                    .map_err(|e| dev("memcpy", e))
            })?;
            times.push(t);
        }
        times.drain(..2);
        Ok(2.0 * (n * 4) as f64 / median(&times))
    }

    /// Seconds between two events recorded around `f`'s launches, taken
    /// as `timing` says.
    pub fn time(
        &self,
        timing: Timing,
        f: impl FnOnce() -> Result<(), WorkloadError>,
    ) -> Result<f64, WorkloadError> {
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.ctx.new_event(flags).map_err(|e| dev("event", e))?;
        let end = self.ctx.new_event(flags).map_err(|e| dev("event", e))?;
        match timing {
            Timing::Device => self.cold.prepare(&self.stream)?,
            Timing::Launch => self.synchronize()?,
        }
        start.record(&self.stream).map_err(|e| dev("event", e))?;
        f()?;
        end.record(&self.stream).map_err(|e| dev("event", e))?;
        let ms = start.elapsed_ms(&end).map_err(|e| dev("event", e))?;
        Ok(ms as f64 / 1e3)
    }

    pub fn synchronize(&self) -> Result<(), WorkloadError> {
        self.stream.synchronize().map_err(|e| dev("synchronize", e))
    }
}

/// Which operator a [`Problem`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Sla,
    /// SLA with the forward kernel that gives each lane one column of the
    /// state and one FMA per element (the kernel before tensor cores, with
    /// row prefetching), for A/B timing; the backward pass is `Sla`'s.
    SlaFfma,
    PaddedLinear,
    PaddedSoftmax,
    /// A deliberately wrong SLA forward pass (drops each window's last
    /// voxel from the state), for the test that a broken kernel fails.
    SlaBroken,
}

/// Which kernel computes SLA's backward pass (and padded-linear's).
/// Tensor cores by default: on an H200 they made forward + backward
/// 1.45-1.83x faster than the FMA kernel on every scene of
/// `sla_backward_sweep`, in both precisions (2026-11-28; figures in
/// kernels.cu at `sla_bwd_mma`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backward {
    /// One FMA per lane and state element (`sla_bwd_*`), kept for A/B
    /// timing.
    Fma,
    /// On tensor cores, TF32 with split operands (`sla_bwd_mma_*`).
    TensorCore,
}

impl Backward {
    /// `BENCH_SUITE_SLA_BWD`: `mma` (the default) or `fma`.
    pub fn from_env() -> Result<Self, WorkloadError> {
        match std::env::var("BENCH_SUITE_SLA_BWD").as_deref() {
            Err(_) | Ok("mma") => Ok(Backward::TensorCore),
            Ok("fma") => Ok(Backward::Fma),
            Ok(other) => Err(WorkloadError::Config(format!(
                "BENCH_SUITE_SLA_BWD={other} names no backward kernel; give `fma` or `mma`"
            ))),
        }
    }

    fn kernel(self, suffix: &str) -> String {
        match self {
            Backward::Fma => format!("sla_bwd_{suffix}"),
            Backward::TensorCore => format!("sla_bwd_mma_{suffix}"),
        }
    }
}

/// The SLA work list: windows over `SMALL` voxels one per block, biggest
/// first; the rest packed `WARPS` to a block (-1 fills the last block).
/// With a grouped forward schedule, also the forward kernel's own list.
struct WorkList {
    big: CudaSlice<i32>,
    n_big: i32,
    small: CudaSlice<i32>,
    blocks: u32,
    /// The grouped forward kernel's items (`packing::grouped_items`, or
    /// `packing::cluster_items` when `cluster`) and its blocks.
    grouped: Option<(CudaSlice<i32>, u32)>,
    cluster: bool,
    /// The window sizes the lists were built from (for re-grouping).
    counts: Vec<u32>,
}

impl WorkList {
    /// Windows of at most `small_max` voxels get one warp; `per_warp`
    /// builds the grouped forward list as well (the cluster list with
    /// `cluster`).
    fn new(
        stream: &Arc<CudaStream>,
        counts: &[u32],
        small_max: u32,
        per_warp: Option<u32>,
        cluster: bool,
    ) -> Result<Self, WorkloadError> {
        let grouped = match per_warp {
            Some(pw) => Some(Self::grouped(stream, counts, pw, cluster)?),
            None => None,
        };
        let mut big: Vec<i32> = (0..counts.len() as i32)
            .filter(|&w| counts[w as usize] > small_max)
            .collect();
        big.sort_by_key(|&w| std::cmp::Reverse(counts[w as usize]));
        let mut small: Vec<i32> = (0..counts.len() as i32)
            .filter(|&w| counts[w as usize] <= small_max)
            .collect();
        let small_blocks = small.len().div_ceil(WARPS);
        small.resize(small_blocks * WARPS, -1);
        let blocks = (big.len() + small_blocks) as u32;
        let n_big = big.len() as i32;
        // A zero-length buffer cannot be allocated; keep one slot.
        big.push(-1);
        small.push(-1);
        Ok(WorkList {
            big: stream.clone_htod(&big).map_err(|e| dev("upload", e))?,
            n_big,
            small: stream.clone_htod(&small).map_err(|e| dev("upload", e))?,
            blocks,
            grouped,
            cluster,
            counts: counts.to_vec(),
        })
    }

    /// The grouped (or cluster) forward list with `per_warp` voxels a
    /// warp, uploaded.
    fn grouped(
        stream: &Arc<CudaStream>,
        counts: &[u32],
        per_warp: u32,
        cluster: bool,
    ) -> Result<(CudaSlice<i32>, u32), WorkloadError> {
        let items = if cluster {
            packing::cluster_items(counts, per_warp)
        } else {
            packing::grouped_items(counts, per_warp)
        };
        let mut items = items.map_err(WorkloadError::Config)?;
        let blocks = (items.len() / WARPS) as u32;
        // A zero-length buffer cannot be allocated; keep one slot.
        items.push(0);
        Ok((
            stream.clone_htod(&items).map_err(|e| dev("upload", e))?,
            blocks,
        ))
    }

    /// Rebuilds the forward list with `per_warp` voxels a warp, as the
    /// cluster list when `cluster`.
    fn regroup(
        &mut self,
        stream: &Arc<CudaStream>,
        per_warp: u32,
        cluster: bool,
    ) -> Result<(), WorkloadError> {
        self.grouped = Some(Self::grouped(stream, &self.counts, per_warp, cluster)?);
        self.cluster = cluster;
        Ok(())
    }

    /// The forward kernel's list arguments (big, n_big, small) and blocks.
    fn forward(&self) -> (&CudaSlice<i32>, i32, &CudaSlice<i32>, u32) {
        match &self.grouped {
            Some((items, blocks)) => (&self.big, 0, items, *blocks),
            None => (&self.big, self.n_big, &self.small, self.blocks),
        }
    }
}

/// Windows padded to power-of-two lengths (at least [`MIN_PAD`]), grouped by
/// padded length, as the sort-and-pad approach lays them out.
pub struct PadPlan {
    /// Padded length and first padded row of each window.
    pub plen: Vec<u32>,
    pub pbase: Vec<u32>,
    /// Padded row of every voxel.
    pub pad_row: Vec<u32>,
    pub rows: usize,
}

impl PadPlan {
    pub fn new(offsets: &[u32], counts: &[u32]) -> Self {
        let plen: Vec<u32> = counts
            .iter()
            .map(|&c| c.max(MIN_PAD).next_power_of_two())
            .collect();
        // Group windows by padded length (stable: window order within a
        // bucket), then lay buckets out one after another.
        let mut order: Vec<usize> = (0..counts.len()).collect();
        order.sort_by_key(|&w| plen[w]);
        let mut pbase = vec![0u32; counts.len()];
        let mut next = 0u32;
        for &w in &order {
            pbase[w] = next;
            next += plen[w];
        }
        let n: usize = counts.iter().map(|&c| c as usize).sum();
        let mut pad_row = vec![0u32; n];
        for w in 0..counts.len() {
            for r in 0..counts[w] {
                pad_row[(offsets[w] + r) as usize] = pbase[w] + r;
            }
        }
        PadPlan {
            plen,
            pbase,
            pad_row,
            rows: next as usize,
        }
    }
}

struct PadDevice<T> {
    pad_row: CudaSlice<u32>,
    pbase: CudaSlice<u32>,
    plen: CudaSlice<u32>,
    count: CudaSlice<u32>,
    tile_win: CudaSlice<u32>,
    tile_q0: CudaSlice<u32>,
    n_tiles: i32,
    /// The SLA kernel's work list over the padded windows.
    work: WorkList,
    rows: usize,
    q: CudaSlice<T>,
    k: CudaSlice<T>,
    v: CudaSlice<T>,
    out: CudaSlice<T>,
    dout: CudaSlice<T>,
    dq: CudaSlice<T>,
    dk: CudaSlice<T>,
    dv: CudaSlice<T>,
    lse: CudaSlice<f32>,
    delta: CudaSlice<f32>,
}

/// One scene on the device, ready to run one operator repeatedly.
pub struct Problem<'g, T: GpuElem> {
    gpu: &'g Gpu,
    op: Op,
    n: usize,
    heads: usize,
    dim: usize,
    n_windows: usize,
    offsets: CudaSlice<u32>,
    counts: CudaSlice<u32>,
    work: WorkList,
    /// The tensor-core forward kernel's schedule.
    forward: Schedule,
    pad: Option<PadDevice<T>>,
    q: CudaSlice<T>,
    k: CudaSlice<T>,
    v: CudaSlice<T>,
    dout: CudaSlice<T>,
    out: CudaSlice<T>,
    dq: CudaSlice<T>,
    dk: CudaSlice<T>,
    dv: CudaSlice<T>,
    f: Kernels,
}

/// The tensor-core forward kernel for a schedule: the block list
/// (`per_warp` None), the grouped list, or the cluster list, with its
/// dynamic shared memory allowed.
fn tensor_core_forward<T: GpuElem>(
    gpu: &Gpu,
    per_warp: Option<u32>,
    cluster: bool,
) -> Result<CudaFunction, WorkloadError> {
    let suffix = T::SUFFIX;
    let name = if cluster {
        format!("sla_fwd_cluster_{suffix}")
    } else if per_warp.is_some() {
        format!("sla_fwd_grouped_{suffix}")
    } else {
        format!("sla_fwd_{suffix}")
    };
    let f = gpu.function(&name)?;
    f.set_attribute(
        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        FWD_SMEM as i32,
    )
    .map_err(|e| dev("shared memory of sla_fwd", e))?;
    Ok(f)
}

struct Kernels {
    sla_fwd: CudaFunction,
    /// Dynamic shared memory of `sla_fwd`'s launches.
    fwd_smem: u32,
    sla_bwd: CudaFunction,
    /// Dynamic shared memory of `sla_bwd`'s launches, and which it is.
    bwd_smem: u32,
    backward: Backward,
    broken: CudaFunction,
    gather: CudaFunction,
    scatter: CudaFunction,
    softmax_fwd: CudaFunction,
    softmax_dq: CudaFunction,
    softmax_dkv: CudaFunction,
}

/// Host inputs of a [`Problem`].
pub struct HostScene<'a, T> {
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
    pub dout: &'a [T],
    pub offsets: &'a [u32],
    pub counts: &'a [u32],
    pub heads: usize,
    pub dim: usize,
}

impl<'a, T> HostScene<'a, T> {
    /// `[q, k, v, dout]` in the workload's layout ([`HEADS`](super::HEADS)
    /// heads of [`DIM`](super::DIM)) over the windows `offsets`, `counts`.
    pub fn new([q, k, v, dout]: [&'a [T]; 4], offsets: &'a [u32], counts: &'a [u32]) -> Self {
        HostScene {
            q,
            k,
            v,
            dout,
            offsets,
            counts,
            heads: super::HEADS,
            dim: super::DIM,
        }
    }
}

/// Host copies of what an operator produced.
pub struct Outputs {
    pub out: Vec<f32>,
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
}

impl<'g, T: GpuElem> Problem<'g, T> {
    /// Uploads the scene and builds the layout metadata (untimed set-up):
    /// windows over `SMALL` voxels (tuning: `BENCH_SUITE_SLA_SMALL`) get a
    /// whole block in the backward and FMA kernels, and the tensor-core
    /// forward kernel gets the fastest grouped or cluster schedule
    /// ([`PER_WARP_CANDIDATES`], [`CLUSTER_PER_WARP_CANDIDATES`]) on this
    /// layout and GPU (autotuned here). SLA and padded-linear run the
    /// tensor-core backward.
    /// Tuning: `BENCH_SUITE_SLA_GROUP` fixes the grouped share instead;
    /// `BENCH_SUITE_SLA_BWD` picks the backward kernel ([`Backward`]).
    pub fn new(gpu: &'g Gpu, op: Op, s: &HostScene<'_, T>) -> Result<Self, WorkloadError> {
        let small = crate::device::tuning_count(
            "BENCH_SUITE_SLA_SMALL",
            "largest window given one warp",
            SMALL as usize,
        )?;
        let small = u32::try_from(small)
            .map_err(|_| WorkloadError::Config(format!("{small} voxels is not a window size")))?;
        let fixed = match std::env::var_os("BENCH_SUITE_SLA_GROUP") {
            None => None,
            Some(_) => {
                let pw = crate::device::tuning_count(
                    "BENCH_SUITE_SLA_GROUP",
                    "voxels per warp of the forward kernel, not autotuned",
                    32,
                )?;
                Some(u32::try_from(pw).map_err(|_| {
                    WorkloadError::Config(format!(
                        "BENCH_SUITE_SLA_GROUP={pw} is too many voxels per warp; give a count such as 32"
                    ))
                })?)
            }
        };
        let per_warp = fixed.unwrap_or(PER_WARP_CANDIDATES[0]);
        let mut p = Self::with_schedule(gpu, op, s, small, Schedule::Grouped { per_warp })?;
        if fixed.is_none() && matches!(op, Op::Sla | Op::PaddedLinear) {
            p.autotune_forward()?;
        }
        // SlaFfma keeps the FMA backward: it is the FMA comparison.
        // The other ops' kernels start as FMA ([`Self::with_schedule`]).
        let backward = Backward::from_env()?;
        if backward != Backward::Fma && matches!(op, Op::Sla | Op::PaddedLinear) {
            p.set_backward(backward)?;
        }
        Ok(p)
    }

    /// Picks the forward schedule: among the grouped shares
    /// ([`PER_WARP_CANDIDATES`]) and the cluster ones
    /// ([`CLUSTER_PER_WARP_CANDIDATES`]), the one with the smallest median
    /// forward time (the whole forward operator, so padded-linear's gathers
    /// included), which then stays.
    fn autotune_forward(&mut self) -> Result<(), WorkloadError> {
        let candidates = PER_WARP_CANDIDATES
            .iter()
            .map(|&per_warp| Schedule::Grouped { per_warp })
            .chain(
                CLUSTER_PER_WARP_CANDIDATES
                    .iter()
                    .map(|&per_warp| Schedule::Cluster { per_warp }),
            );
        let mut best = (f64::INFINITY, self.forward);
        for schedule in candidates {
            self.set_forward(schedule)?;
            for _ in 0..AUTOTUNE_WARM {
                self.launch(false)?;
            }
            let t = median(&self.time(false, AUTOTUNE_REPS, Timing::Device)?);
            if t < best.0 {
                best = (t, schedule);
            }
        }
        self.set_forward(best.1)
    }

    /// Switches the tensor-core forward kernel to a grouped or cluster
    /// schedule: its work list and its kernel.
    fn set_forward(&mut self, schedule: Schedule) -> Result<(), WorkloadError> {
        let (per_warp, cluster) =
            match schedule {
                Schedule::Grouped { per_warp } => (per_warp, false),
                Schedule::Cluster { per_warp } => (per_warp, true),
                Schedule::Blocks { .. } => return Err(WorkloadError::Config(
                    "the forward schedule can be switched between grouped and cluster lists only"
                        .into(),
                )),
            };
        let stream = self.gpu.stream.clone();
        self.forward_work().regroup(&stream, per_warp, cluster)?;
        self.f.sla_fwd = tensor_core_forward::<T>(self.gpu, Some(per_warp), cluster)?;
        self.forward = schedule;
        Ok(())
    }

    /// Switches the backward kernel (SLA's and padded-linear's).
    pub fn set_backward(&mut self, backward: Backward) -> Result<(), WorkloadError> {
        let f = self.gpu.function(&backward.kernel(T::SUFFIX))?;
        let smem = match backward {
            Backward::Fma => 0,
            Backward::TensorCore => {
                f.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    BWD_SMEM as i32,
                )
                .map_err(|e| dev("shared memory of sla_bwd_mma", e))?;
                BWD_SMEM
            }
        };
        self.f.sla_bwd = f;
        self.f.bwd_smem = smem;
        self.f.backward = backward;
        Ok(())
    }

    /// The operator this problem runs.
    pub fn op(&self) -> Op {
        self.op
    }

    /// The backward kernel in use.
    pub fn backward_kernel(&self) -> Backward {
        self.f.backward
    }

    /// The work list the tensor-core forward kernel reads.
    fn forward_work(&mut self) -> &mut WorkList {
        match &mut self.pad {
            Some(p) => &mut p.work,
            None => &mut self.work,
        }
    }

    /// The tensor-core forward kernel's schedule (what autotuning chose),
    /// or None for the ops that do not run that kernel.
    pub fn forward_schedule(&self) -> Option<Schedule> {
        matches!(self.op, Op::Sla | Op::PaddedLinear).then_some(self.forward)
    }

    /// As [`Problem::new`], with the forward kernel's schedule given and
    /// windows over `small` voxels getting a block in the other kernels (a
    /// `Blocks` forward schedule's own threshold replaces `small`).
    pub fn with_schedule(
        gpu: &'g Gpu,
        op: Op,
        s: &HostScene<'_, T>,
        small: u32,
        forward: Schedule,
    ) -> Result<Self, WorkloadError> {
        // The FMA forward kernel reads the block list only.
        let (small_max, per_warp, cluster) = match (forward, op) {
            (_, Op::SlaFfma) => (small, None, false),
            (Schedule::Blocks { small }, _) => (small, None, false),
            (Schedule::Grouped { per_warp }, _) => (small, Some(per_warp), false),
            (Schedule::Cluster { per_warp }, _) => (small, Some(per_warp), true),
        };
        if s.dim != 32 {
            return Err(WorkloadError::Config(format!(
                "the CUDA kernels map one head-dimension element to one lane and need d = 32, got {}",
                s.dim
            )));
        }
        let row = s.heads * s.dim;
        let n = s.q.len() / row;
        let st = &gpu.stream;
        let up32 = |x: &[u32]| st.clone_htod(x).map_err(|e| dev("upload", e));
        let up = |x: &[T]| st.clone_htod(x).map_err(|e| dev("upload", e));
        let zeros = |len: usize| {
            st.alloc_zeros::<T>(len.max(1))
                .map_err(|e| dev("device allocation", e))
        };
        let suffix = T::SUFFIX;
        let ffma = op == Op::SlaFfma;
        let (sla_fwd, fwd_smem) = if ffma {
            (gpu.function(&format!("sla_fwd_ffma_{suffix}"))?, 0)
        } else {
            (tensor_core_forward::<T>(gpu, per_warp, cluster)?, FWD_SMEM)
        };
        let f = Kernels {
            sla_fwd,
            fwd_smem,
            sla_bwd: gpu.function(&Backward::Fma.kernel(suffix))?,
            bwd_smem: 0,
            backward: Backward::Fma,
            broken: gpu.function(&format!("sla_fwd_broken_{suffix}"))?,
            gather: gpu.function(&format!("gather_rows_{suffix}"))?,
            scatter: gpu.function(&format!("scatter_rows_{suffix}"))?,
            softmax_fwd: gpu.function(&format!("softmax_fwd_{suffix}"))?,
            softmax_dq: gpu.function(&format!("softmax_bwd_dq_{suffix}"))?,
            softmax_dkv: gpu.function(&format!("softmax_bwd_dkv_{suffix}"))?,
        };
        let pad = match op {
            Op::PaddedLinear | Op::PaddedSoftmax => {
                let plan = PadPlan::new(s.offsets, s.counts);
                let mut tile_win = Vec::new();
                let mut tile_q0 = Vec::new();
                for (w, &p) in plan.plen.iter().enumerate() {
                    for q0 in (0..p).step_by(TILE as usize) {
                        tile_win.push(w as u32);
                        tile_q0.push(q0);
                    }
                }
                let rows = plan.rows;
                let padded_work = WorkList::new(st, &plan.plen, small_max, per_warp, cluster)?;
                let zf = |len: usize| {
                    st.alloc_zeros::<f32>(len.max(1))
                        .map_err(|e| dev("device allocation", e))
                };
                let softmax = op == Op::PaddedSoftmax;
                Some(PadDevice {
                    pad_row: up32(&plan.pad_row)?,
                    pbase: up32(&plan.pbase)?,
                    plen: up32(&plan.plen)?,
                    count: up32(s.counts)?,
                    n_tiles: tile_win.len() as i32,
                    tile_win: up32(&tile_win)?,
                    tile_q0: up32(&tile_q0)?,
                    work: padded_work,
                    rows,
                    q: zeros(rows * row)?,
                    k: zeros(rows * row)?,
                    v: zeros(rows * row)?,
                    out: zeros(rows * row)?,
                    dout: zeros(rows * row)?,
                    dq: zeros(rows * row)?,
                    dk: zeros(rows * row)?,
                    dv: zeros(rows * row)?,
                    lse: zf(if softmax { rows * s.heads } else { 0 })?,
                    delta: zf(if softmax { rows * s.heads } else { 0 })?,
                })
            }
            Op::Sla | Op::SlaFfma | Op::SlaBroken => None,
        };
        Ok(Problem {
            gpu,
            op,
            n,
            heads: s.heads,
            dim: s.dim,
            n_windows: s.counts.len(),
            offsets: up32(s.offsets)?,
            counts: up32(s.counts)?,
            work: WorkList::new(st, s.counts, small_max, per_warp, cluster)?,
            forward: match (per_warp, cluster) {
                (Some(per_warp), false) => Schedule::Grouped { per_warp },
                (Some(per_warp), true) => Schedule::Cluster { per_warp },
                (None, _) => Schedule::Blocks { small: small_max },
            },
            pad,
            q: up(s.q)?,
            k: up(s.k)?,
            v: up(s.v)?,
            dout: up(s.dout)?,
            out: zeros(n * row)?,
            dq: zeros(n * row)?,
            dk: zeros(n * row)?,
            dv: zeros(n * row)?,
            f,
        })
    }

    /// Bytes of device memory the operator needs beyond its inputs and
    /// outputs (the padded buffers; SLA keeps its state on chip).
    pub fn workspace_bytes(&self, backward: bool) -> usize {
        let Some(p) = &self.pad else { return 0 };
        let row = self.heads * self.dim * std::mem::size_of::<T>();
        let tensors = if backward { 8 } else { 4 };
        let stats = if self.op == Op::PaddedSoftmax {
            p.rows * self.heads * 4 * if backward { 2 } else { 1 }
        } else {
            0
        };
        p.rows * row * tensors + stats
    }

    /// Padded rows over real rows (1 for SLA).
    pub fn pad_ratio(&self) -> f64 {
        self.pad
            .as_ref()
            .map_or(1.0, |p| p.rows as f64 / self.n as f64)
    }

    /// Enqueues one forward pass, and the backward pass after it if asked.
    pub fn launch(&mut self, backward: bool) -> Result<(), WorkloadError> {
        match self.op {
            Op::Sla | Op::SlaFfma => {
                self.sla_fwd_direct()?;
                if backward {
                    self.sla_bwd_direct()?;
                }
            }
            Op::SlaBroken => {
                let st = &self.gpu.stream;
                let cfg = LaunchConfig {
                    grid_dim: (self.n_windows.div_ceil(WARPS) as u32, self.heads as u32, 1),
                    block_dim: ((WARPS * 32) as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                let (nw, h) = (self.n_windows as i32, self.heads as i32);
                let mut b = st.launch_builder(&self.f.broken);
                b.arg(&self.q)
                    .arg(&self.k)
                    .arg(&self.v)
                    .arg(&mut self.out)
                    .arg(&self.offsets)
                    .arg(&self.counts)
                    .arg(&nw)
                    .arg(&h);
                // SAFETY: argument list matches `sla_fwd_broken_*` in kernels.cu.
                unsafe { b.launch(cfg) }.map_err(|e| dev("launch", e))?;
            }
            Op::PaddedLinear | Op::PaddedSoftmax => self.padded(backward)?,
        }
        Ok(())
    }

    fn sla_cfg(&self, work: &WorkList) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (work.blocks.max(1), self.heads as u32, 1),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn sla_fwd_direct(&mut self) -> Result<(), WorkloadError> {
        let (big, n_big, small, blocks) = self.work.forward();
        let cfg = LaunchConfig {
            grid_dim: (blocks.max(1), self.heads as u32, 1),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: self.f.fwd_smem,
        };
        let h = self.heads as i32;
        let mut b = self.gpu.stream.launch_builder(&self.f.sla_fwd);
        b.arg(&self.q)
            .arg(&self.k)
            .arg(&self.v)
            .arg(&mut self.out)
            .arg(&self.offsets)
            .arg(&self.counts)
            .arg(big)
            .arg(&n_big)
            .arg(small)
            .arg(&h);
        // SAFETY: argument list matches `sla_fwd_*` in kernels.cu.
        unsafe { b.launch(cfg) }.map_err(|e| dev("launch sla_fwd", e))?;
        Ok(())
    }

    fn sla_bwd_direct(&mut self) -> Result<(), WorkloadError> {
        let cfg = LaunchConfig {
            shared_mem_bytes: self.f.bwd_smem,
            ..self.sla_cfg(&self.work)
        };
        let h = self.heads as i32;
        let mut b = self.gpu.stream.launch_builder(&self.f.sla_bwd);
        b.arg(&self.q)
            .arg(&self.k)
            .arg(&self.v)
            .arg(&self.dout)
            .arg(&mut self.dq)
            .arg(&mut self.dk)
            .arg(&mut self.dv)
            .arg(&self.offsets)
            .arg(&self.counts)
            .arg(&self.work.big)
            .arg(&self.work.n_big)
            .arg(&self.work.small)
            .arg(&h);
        // SAFETY: argument list matches `sla_bwd_*` in kernels.cu.
        unsafe { b.launch(cfg) }.map_err(|e| dev("launch sla_bwd", e))?;
        Ok(())
    }

    fn padded(&mut self, backward: bool) -> Result<(), WorkloadError> {
        let st = self.gpu.stream.clone();
        let row_len = (self.heads * self.dim) as i32;
        let n_rows = self.n as i64;
        let elems = self.n * self.heads * self.dim;
        let copy_cfg = LaunchConfig::for_num_elems(elems as u32);
        let h = self.heads as i32;
        let scale = 1.0f32 / (self.dim as f32).sqrt();
        let f = &self.f;
        let p = self.pad.as_mut().expect("padded op has a pad layout");
        let sla_cfg = LaunchConfig {
            grid_dim: (p.work.blocks.max(1), self.heads as u32, 1),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let soft_cfg = LaunchConfig {
            grid_dim: (
                (p.n_tiles as u32).div_ceil(TILES_PER_BLOCK).max(1),
                self.heads as u32,
                1,
            ),
            block_dim: (TILES_PER_BLOCK * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        let launch_err = |e| dev("launch", e);
        // Pad: zero the padded buffers, gather the rows into them.
        for (src, dst) in [
            (&self.q, &mut p.q),
            (&self.k, &mut p.k),
            (&self.v, &mut p.v),
        ] {
            st.memset_zeros(dst).map_err(|e| dev("memset", e))?;
            let mut b = st.launch_builder(&f.gather);
            b.arg(src)
                .arg(dst)
                .arg(&p.pad_row)
                .arg(&n_rows)
                .arg(&row_len);
            // SAFETY: matches `gather_rows_*`.
            unsafe { b.launch(copy_cfg) }.map_err(launch_err)?;
        }
        // Attention on the padded groups.
        if self.op == Op::PaddedLinear {
            let (big, n_big, small, blocks) = p.work.forward();
            let mut b = st.launch_builder(&f.sla_fwd);
            b.arg(&p.q)
                .arg(&p.k)
                .arg(&p.v)
                .arg(&mut p.out)
                .arg(&p.pbase)
                .arg(&p.plen)
                .arg(big)
                .arg(&n_big)
                .arg(small)
                .arg(&h);
            let cfg = LaunchConfig {
                grid_dim: (blocks.max(1), self.heads as u32, 1),
                shared_mem_bytes: f.fwd_smem,
                ..sla_cfg
            };
            // SAFETY: matches `sla_fwd_*`.
            unsafe { b.launch(cfg) }.map_err(launch_err)?;
        } else {
            let mut b = st.launch_builder(&f.softmax_fwd);
            b.arg(&p.q)
                .arg(&p.k)
                .arg(&p.v)
                .arg(&mut p.out)
                .arg(&mut p.lse)
                .arg(&p.tile_win)
                .arg(&p.tile_q0)
                .arg(&p.pbase)
                .arg(&p.plen)
                .arg(&p.count)
                .arg(&p.n_tiles)
                .arg(&h)
                .arg(&scale);
            // SAFETY: matches `softmax_fwd_*`.
            unsafe { b.launch(soft_cfg) }.map_err(launch_err)?;
        }
        // Un-pad the output.
        let mut b = st.launch_builder(&f.scatter);
        b.arg(&p.out)
            .arg(&mut self.out)
            .arg(&p.pad_row)
            .arg(&n_rows)
            .arg(&row_len);
        // SAFETY: matches `scatter_rows_*`.
        unsafe { b.launch(copy_cfg) }.map_err(launch_err)?;
        if !backward {
            return Ok(());
        }
        st.memset_zeros(&mut p.dout).map_err(|e| dev("memset", e))?;
        let mut b = st.launch_builder(&f.gather);
        b.arg(&self.dout)
            .arg(&mut p.dout)
            .arg(&p.pad_row)
            .arg(&n_rows)
            .arg(&row_len);
        // SAFETY: matches `gather_rows_*`.
        unsafe { b.launch(copy_cfg) }.map_err(launch_err)?;
        if self.op == Op::PaddedLinear {
            let mut b = st.launch_builder(&f.sla_bwd);
            b.arg(&p.q)
                .arg(&p.k)
                .arg(&p.v)
                .arg(&p.dout)
                .arg(&mut p.dq)
                .arg(&mut p.dk)
                .arg(&mut p.dv)
                .arg(&p.pbase)
                .arg(&p.plen)
                .arg(&p.work.big)
                .arg(&p.work.n_big)
                .arg(&p.work.small)
                .arg(&h);
            let cfg = LaunchConfig {
                shared_mem_bytes: f.bwd_smem,
                ..sla_cfg
            };
            // SAFETY: matches `sla_bwd_*`.
            unsafe { b.launch(cfg) }.map_err(launch_err)?;
        } else {
            let mut b = st.launch_builder(&f.softmax_dq);
            b.arg(&p.q)
                .arg(&p.k)
                .arg(&p.v)
                .arg(&p.out)
                .arg(&p.dout)
                .arg(&p.lse)
                .arg(&mut p.delta)
                .arg(&mut p.dq)
                .arg(&p.tile_win)
                .arg(&p.tile_q0)
                .arg(&p.pbase)
                .arg(&p.plen)
                .arg(&p.count)
                .arg(&p.n_tiles)
                .arg(&h)
                .arg(&scale);
            // SAFETY: matches `softmax_bwd_dq_*`.
            unsafe { b.launch(soft_cfg) }.map_err(launch_err)?;
            let mut b = st.launch_builder(&f.softmax_dkv);
            b.arg(&p.q)
                .arg(&p.k)
                .arg(&p.v)
                .arg(&p.dout)
                .arg(&p.lse)
                .arg(&p.delta)
                .arg(&mut p.dk)
                .arg(&mut p.dv)
                .arg(&p.tile_win)
                .arg(&p.tile_q0)
                .arg(&p.pbase)
                .arg(&p.plen)
                .arg(&p.count)
                .arg(&p.n_tiles)
                .arg(&h)
                .arg(&scale);
            // SAFETY: matches `softmax_bwd_dkv_*`.
            unsafe { b.launch(soft_cfg) }.map_err(launch_err)?;
        }
        for (src, dst) in [
            (&p.dq, &mut self.dq),
            (&p.dk, &mut self.dk),
            (&p.dv, &mut self.dv),
        ] {
            let mut b = st.launch_builder(&f.scatter);
            b.arg(src)
                .arg(dst)
                .arg(&p.pad_row)
                .arg(&n_rows)
                .arg(&row_len);
            // SAFETY: matches `scatter_rows_*`.
            unsafe { b.launch(copy_cfg) }.map_err(launch_err)?;
        }
        Ok(())
    }

    /// Times `repeats` launches one by one with CUDA events (after the
    /// caller's warm-up), each sample taken as `timing` says; seconds per
    /// launch.
    pub fn time(
        &mut self,
        backward: bool,
        repeats: usize,
        timing: Timing,
    ) -> Result<Vec<f64>, WorkloadError> {
        let gpu = self.gpu;
        (0..repeats)
            .map(|_| gpu.time(timing, || self.launch(backward)))
            .collect()
    }

    /// Copies the outputs back (untimed).
    pub fn outputs(&self) -> Result<Outputs, WorkloadError> {
        let st = &self.gpu.stream;
        let get = |x: &CudaSlice<T>| -> Result<Vec<f32>, WorkloadError> {
            let v = st.clone_dtoh(x).map_err(|e| dev("download", e))?;
            Ok(v.into_iter().take(self.q.len()).map(T::to_f32).collect())
        };
        Ok(Outputs {
            out: get(&self.out)?,
            dq: get(&self.dq)?,
            dk: get(&self.dk)?,
            dv: get(&self.dv)?,
        })
    }
}

#[cfg(test)]
mod tests {
    //! The CUDA kernels against the CPU's float64 references. These run
    //! only where a driver is present (the GPU machine: see shared GPU.md);
    //! elsewhere they print why and pass.
    use super::*;
    use crate::pointcloud::sla;
    use baselines::window_attention::{self as wa, Shape};
    use half::bf16;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    fn gpu() -> Option<Gpu> {
        if !crate::device::driver_present() {
            eprintln!("no CUDA driver here: CUDA kernel tests skipped");
            return None;
        }
        Some(Gpu::new(0).expect("a driver is present, so the kernels must compile"))
    }

    /// Window sizes from 1 to 900, many small and a long tail, so both the
    /// packed small-window path and the block-per-window path run, and
    /// padded lengths reach 1,024.
    fn layout(seed: u64) -> (Vec<u32>, Vec<u32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut counts: Vec<u32> = (0..300)
            .map(|_| {
                let u: f64 = rng.random();
                (1.0 + 8.0 * (-u.ln()).powf(1.8)) as u32
            })
            .map(|c| c.clamp(1, 900))
            .collect();
        counts.extend([1, 2, 31, 32, 33, 64, 65, 255, 256, 257, 893]);
        let mut offsets = Vec::with_capacity(counts.len());
        let mut next = 0;
        for &c in &counts {
            offsets.push(next);
            next += c;
        }
        (offsets, counts)
    }

    fn inputs(n: usize, seed: u64) -> [Vec<f32>; 4] {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        std::array::from_fn(|_| {
            (0..n * 4 * 32)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect()
        })
    }

    /// Largest relative error of `op`'s output and gradients, with the
    /// forward schedule given or (None) the default one.
    fn check<T: GpuElem>(
        gpu: &Gpu,
        op: Op,
        sched: Option<Schedule>,
        backward: Backward,
        x: [&[T]; 4],
        r: [&[f32]; 4],
        bits: u32,
    ) -> f64 {
        let (offsets, counts) = layout(7);
        let n: u32 = counts.iter().sum();
        let shape = Shape {
            n: n as usize,
            heads: 4,
            dim: 32,
        };
        let [q, k, v, d] = r.map(wa::to_f64);
        let reference = match op {
            Op::PaddedSoftmax => {
                wa::softmax_window_reference_f64(&q, &k, &v, &d, &offsets, &counts, shape)
            }
            _ => sla::reference_f64(&q, &k, &v, &d, &offsets, &counts, shape),
        };
        let scene = HostScene::new(x, &offsets, &counts);
        let mut p = match sched {
            None => Problem::new(gpu, op, &scene),
            Some(f) => Problem::with_schedule(gpu, op, &scene, SMALL, f),
        }
        .unwrap();
        p.set_backward(backward).unwrap();
        p.launch(op != Op::SlaBroken).unwrap();
        gpu.synchronize().unwrap();
        let o = p.outputs().unwrap();
        let mut worst = sla::max_rel_err(&o.out, &reference.out);
        if op != Op::SlaBroken {
            for (got, want) in [
                (&o.dq, &reference.dq),
                (&o.dk, &reference.dk),
                (&o.dv, &reference.dv),
            ] {
                worst = worst.max(sla::max_rel_err(got, want));
            }
        }
        eprintln!("{op:?} {sched:?} {backward:?} {bits}-bit: largest relative error {worst:.3e}");
        worst
    }

    #[test]
    fn kernels_match_the_float64_references_and_a_broken_one_fails() {
        let Some(gpu) = gpu() else { return };
        let (_, counts) = layout(7);
        let n: u32 = counts.iter().sum();
        let [q, k, v, d] = inputs(n as usize, 11);
        let f32s = [&q[..], &k[..], &v[..], &d[..]];
        let round = |x: &[f32]| -> Vec<bf16> { x.iter().map(|&v| bf16::from_f32(v)).collect() };
        let h = [round(&q), round(&k), round(&v), round(&d)];
        let bits16: Vec<Vec<u16>> = h
            .iter()
            .map(|x| x.iter().map(|v| v.to_bits()).collect())
            .collect();
        let back: Vec<Vec<f32>> = h
            .iter()
            .map(|x| x.iter().map(|v| v.to_f32()).collect())
            .collect();
        let b16 = [
            &bits16[0][..],
            &bits16[1][..],
            &bits16[2][..],
            &bits16[3][..],
        ];
        let r16 = [&back[0][..], &back[1][..], &back[2][..], &back[3][..]];
        // Every op with the default forward schedule; the tensor-core
        // forward (SLA and padded-linear) also with the block list (and
        // with every window one warp's, in every kernel), with
        // windows split among up to eight warps nearly always (4 voxels a
        // warp), with one warp per window (no block barrier), and with
        // clusters: windows over 32 voxels spanning two to four blocks (4
        // a warp), or only those over 128 (16 a warp).
        let schedules = [
            None,
            Some(Schedule::Blocks { small: SMALL }),
            Some(Schedule::Blocks { small: 1000 }),
            Some(Schedule::Grouped { per_warp: 4 }),
            Some(Schedule::Grouped { per_warp: 1000 }),
            Some(Schedule::Cluster { per_warp: 4 }),
            Some(Schedule::Cluster { per_warp: 16 }),
        ];
        // The backward on tensor cores with the block list's windows (over
        // SMALL voxels a block of eight warps, which sum their states) and
        // with every window one warp's (no block barrier).
        for op in [Op::Sla, Op::SlaFfma, Op::PaddedLinear, Op::PaddedSoftmax] {
            for sched in schedules {
                if sched.is_some() && !matches!(op, Op::Sla | Op::PaddedLinear) {
                    continue;
                }
                let mut backwards = vec![Backward::Fma];
                if matches!(op, Op::Sla | Op::PaddedLinear)
                    && matches!(sched, None | Some(Schedule::Blocks { .. }))
                {
                    backwards.push(Backward::TensorCore);
                }
                for bwd in backwards {
                    let e = check::<f32>(&gpu, op, sched, bwd, f32s, f32s, 32);
                    assert!(
                        e <= sla::tolerance(32),
                        "{op:?} {sched:?} {bwd:?} f32: {e:.3e}"
                    );
                    let e = check::<u16>(&gpu, op, sched, bwd, b16, r16, 16);
                    assert!(
                        e <= sla::tolerance(16),
                        "{op:?} {sched:?} {bwd:?} bf16: {e:.3e}"
                    );
                }
            }
        }
        let e = check::<f32>(&gpu, Op::SlaBroken, None, Backward::Fma, f32s, f32s, 32);
        assert!(
            e > 100.0 * sla::tolerance(32),
            "the broken kernel passed: {e:.3e}"
        );
    }

    /// Forward timings of SLA kernel variants on one set of scenes, for
    /// tuning on the GPU machine: every `.cu` file listed (comma-separated)
    /// in `BENCH_SUITE_SLA_SWEEP` (`builtin` for the built-in source), for
    /// every forward schedule in `BENCH_SUITE_SLA_SWEEP_SMALL`
    /// (comma-separated, [`Schedule::parse`]: `32` for the block list with
    /// that largest one-warp window, `g32` for the grouped list with that
    /// many voxels a warp, `c32` for the cluster list with that many (a
    /// source without `sla_fwd_cluster_*` cannot run it), `auto` for the
    /// autotuned schedule of [`Problem::new`]; default `32,auto`), the
    /// tensor-core forward
    /// beside the FMA forward ([`Op::SlaFfma`], block list) of the same
    /// source. Every output on
    /// the Waymo-like frame is checked against the float64 reference of
    /// its own (f32 or bf16-rounded) inputs. Reads the environment only.
    #[test]
    #[ignore = "tuning sweep for the GPU machine: run with --ignored"]
    fn sla_forward_sweep() {
        use crate::pointcloud::lidar;
        if gpu().is_none() {
            return;
        }
        let sources = std::env::var("BENCH_SUITE_SLA_SWEEP").unwrap_or_else(|_| "builtin".into());
        let smalls =
            std::env::var("BENCH_SUITE_SLA_SWEEP_SMALL").unwrap_or_else(|_| "32,auto".into());
        let mut scenes = vec![
            ("waymo-like".to_string(), lidar::waymo_like(1)),
            ("nuscenes-like".to_string(), lidar::nuscenes_like(1)),
        ];
        for size in [10_000, 30_000, 100_000, 300_000, 1_000_000] {
            scenes.push((format!("scaling {size}"), lidar::scaling(size, 1)));
        }
        // Inputs (f32, and bf16 bits) and, for the Waymo-like frame, the
        // float64 references of both: built once, untimed.
        type SceneData = ([Vec<f32>; 4], Vec<Vec<u16>>, Option<[sla::Grads64; 2]>);
        let data: Vec<SceneData> = scenes
            .iter()
            .map(|(name, w)| {
                let n = w.n_voxels();
                let x = inputs(n, 5);
                let b: Vec<Vec<u16>> = x
                    .iter()
                    .map(|y| y.iter().map(|&z| bf16::from_f32(z).to_bits()).collect())
                    .collect();
                let shape = Shape {
                    n,
                    heads: 4,
                    dim: 32,
                };
                let reference = |y: [Vec<f64>; 4]| {
                    sla::reference_f64(&y[0], &y[1], &y[2], &y[3], &w.offsets, &w.counts, shape)
                };
                let refs = (name == "waymo-like").then(|| {
                    let from_bits = |y: &Vec<u16>| -> Vec<f64> {
                        y.iter()
                            .map(|&z| f32::from_bits((z as u32) << 16) as f64)
                            .collect()
                    };
                    [
                        reference([0, 1, 2, 3].map(|i| wa::to_f64(&x[i]))),
                        reference([0, 1, 2, 3].map(|i| from_bits(&b[i]))),
                    ]
                });
                (x, b, refs)
            })
            .collect();
        let bw = gpu().unwrap().copy_bandwidth(1 << 30, 10).unwrap();
        for src in sources.split(',') {
            let gpu = if src == "builtin" {
                Gpu::with_source(0, SOURCE).unwrap()
            } else {
                let text = std::fs::read_to_string(src).expect("a kernel source to sweep");
                Gpu::with_source(0, &text).unwrap()
            };
            for (k, small) in smalls.split(',').enumerate() {
                // `auto`: Problem::new's autotuned schedule.
                let sched = (small.trim() != "auto")
                    .then(|| Schedule::parse(small).expect("BENCH_SUITE_SLA_SWEEP_SMALL"));
                for ((name, w), (x, b, refs)) in scenes.iter().zip(&data) {
                    let n = w.n_voxels();
                    // The FMA kernel once per source (it reads the block list).
                    let ops: &[Op] = if k == 0 {
                        &[Op::SlaFfma, Op::Sla]
                    } else {
                        &[Op::Sla]
                    };
                    for &op in ops {
                        let mut line = format!("{src} {sched:?} {op:?} {name} ({n} voxels):");
                        for bits in [32u32, 16] {
                            let want = refs.as_ref().map(|r| &r[usize::from(bits == 16)]);
                            let (t, err) = if bits == 32 {
                                let x = [&x[0][..], &x[1][..], &x[2][..], &x[3][..]];
                                time_forward::<f32>(&gpu, op, x, w, sched, want)
                            } else {
                                let b = [&b[0][..], &b[1][..], &b[2][..], &b[3][..]];
                                time_forward::<u16>(&gpu, op, b, w, sched, want)
                            };
                            let floor = (4 * n * 128 * (bits as usize / 8)) as f64 / bw;
                            push_timing(&mut line, &format!("{bits}-bit"), t, floor, err, bits);
                        }
                        eprintln!("{line}");
                    }
                }
            }
        }
    }

    /// Forward + backward timings of SLA with each backward kernel, for
    /// the GPU machine: medians of 30 calls after 5, f32 and bf16, on the
    /// Waymo-like and nuScenes-like frames and the 10k, 100k and 1M
    /// scaling scenes (autotuned forward). On the Waymo-like frame the
    /// output and gradients are checked against the float64 reference.
    #[test]
    #[ignore = "tuning sweep for the GPU machine: run with --ignored"]
    fn sla_backward_sweep() {
        use crate::pointcloud::lidar;
        let Some(gpu) = gpu() else { return };
        let mut scenes = vec![
            ("waymo-like".to_string(), lidar::waymo_like(1)),
            ("nuscenes-like".to_string(), lidar::nuscenes_like(1)),
        ];
        for size in [10_000, 100_000, 1_000_000] {
            scenes.push((format!("scaling {size}"), lidar::scaling(size, 1)));
        }
        let bw = gpu.copy_bandwidth(1 << 30, 10).unwrap();
        for (name, w) in &scenes {
            let n = w.n_voxels();
            let shape = Shape {
                n,
                heads: 4,
                dim: 32,
            };
            let x = inputs(n, 5);
            let b: Vec<Vec<u16>> = x
                .iter()
                .map(|y| y.iter().map(|&z| bf16::from_f32(z).to_bits()).collect())
                .collect();
            let mut line = format!("{name} ({n} voxels) forward + backward:");
            for bits in [32u32, 16] {
                // The float64 reference of the (rounded) inputs.
                let want = (name == "waymo-like").then(|| {
                    let y: [Vec<f64>; 4] = std::array::from_fn(|i| {
                        if bits == 32 {
                            wa::to_f64(&x[i])
                        } else {
                            b[i].iter()
                                .map(|&z| f32::from_bits((z as u32) << 16) as f64)
                                .collect()
                        }
                    });
                    sla::reference_f64(&y[0], &y[1], &y[2], &y[3], &w.offsets, &w.counts, shape)
                });
                let floor = (11 * n * 128 * (bits as usize / 8)) as f64 / bw;
                for bwd in [Backward::Fma, Backward::TensorCore] {
                    let (t, err) = if bits == 32 {
                        let x = [&x[0][..], &x[1][..], &x[2][..], &x[3][..]];
                        time_both::<f32>(&gpu, x, w, bwd, want.as_ref())
                    } else {
                        let b = [&b[0][..], &b[1][..], &b[2][..], &b[3][..]];
                        time_both::<u16>(&gpu, b, w, bwd, want.as_ref())
                    };
                    let label = format!("{bits}-bit {bwd:?}");
                    push_timing(&mut line, &label, t, floor, err, bits);
                }
            }
            eprintln!("{line}");
        }
    }

    /// Appends a sweep's timing (and error, which must be within the
    /// precision's tolerance) to its line.
    fn push_timing(
        line: &mut String,
        label: &str,
        t: f64,
        floor: f64,
        err: Option<f64>,
        bits: u32,
    ) {
        *line += &format!(
            " {label} {:.4} ms ({:.2}x floor){}",
            t * 1e3,
            t / floor,
            err.map_or(String::new(), |e| format!(" err {e:.1e}"))
        );
        if let Some(e) = err {
            assert!(e <= sla::tolerance(bits), "{line}");
        }
    }

    /// Median forward + backward time of SLA with the given backward
    /// kernel (and the largest relative error of output and gradients
    /// where a reference is given).
    fn time_both<T: GpuElem>(
        gpu: &Gpu,
        x: [&[T]; 4],
        w: &crate::pointcloud::voxel::Windowed,
        bwd: Backward,
        want: Option<&sla::Grads64>,
    ) -> (f64, Option<f64>) {
        let scene = HostScene::new(x, &w.offsets, &w.counts);
        let mut p = Problem::new(gpu, Op::Sla, &scene).unwrap();
        p.set_backward(bwd).unwrap();
        p.time(true, 5, Timing::Device).unwrap();
        let t = median(&p.time(true, 30, Timing::Device).unwrap());
        let err = want.map(|r| {
            gpu.synchronize().unwrap();
            let o = p.outputs().unwrap();
            [
                (&o.out, &r.out),
                (&o.dq, &r.dq),
                (&o.dk, &r.dk),
                (&o.dv, &r.dv),
            ]
            .iter()
            .map(|(got, want)| sla::max_rel_err(got, want))
            .fold(0.0, f64::max)
        });
        (t, err)
    }

    /// Median forward time of `op` over 50 launches after 10 (and the
    /// output's largest relative error where a reference is given).
    fn time_forward<T: GpuElem>(
        gpu: &Gpu,
        op: Op,
        x: [&[T]; 4],
        w: &crate::pointcloud::voxel::Windowed,
        sched: Option<Schedule>,
        want: Option<&sla::Grads64>,
    ) -> (f64, Option<f64>) {
        let scene = HostScene::new(x, &w.offsets, &w.counts);
        let mut p = match sched {
            None => Problem::new(gpu, op, &scene).unwrap(),
            Some(Schedule::Blocks { small }) => {
                Problem::with_schedule(gpu, op, &scene, small, Schedule::Blocks { small }).unwrap()
            }
            Some(g) => Problem::with_schedule(gpu, op, &scene, SMALL, g).unwrap(),
        };
        if sched.is_none() {
            eprintln!("  autotuned: {:?}", p.forward_schedule());
        }
        p.time(false, 10, Timing::Device).unwrap();
        let t = median(&p.time(false, 50, Timing::Device).unwrap());
        let err = want.map(|r| {
            gpu.synchronize().unwrap();
            sla::max_rel_err(&p.outputs().unwrap().out, &r.out)
        });
        (t, err)
    }

    /// The device protocol keeps the host's time out of a sample and the
    /// launch protocol keeps it in: a "call" that sleeps 0.5 ms on the host
    /// before a 1 us kernel. Also, the hold lasts what it was asked.
    #[test]
    fn device_timing_leaves_the_host_out() {
        let Some(gpu) = gpu() else { return };
        let med = |timing: Timing| {
            let t: Vec<f64> = (0..9)
                .map(|_| {
                    gpu.time(timing, || {
                        std::thread::sleep(std::time::Duration::from_micros(500));
                        gpu.cold
                            .hold_for(&gpu.stream, 1_000)
                            .map_err(|e| dev("hold", e))
                    })
                    .unwrap()
                })
                .collect();
            median(&t)
        };
        let (device, launch) = (med(Timing::Device), med(Timing::Launch));
        eprintln!("host sleep 0.5 ms + 1 us kernel: device {device:.2e} s, launch {launch:.2e} s");
        assert!(launch >= 5e-4 && device < 1e-4, "{device} {launch}");
        let held = gpu
            .time(Timing::Launch, || {
                gpu.cold
                    .hold_for(&gpu.stream, 200_000)
                    .map_err(|e| dev("hold", e))
            })
            .unwrap();
        assert!((2e-4..5e-4).contains(&held), "{held}");
    }

    #[test]
    fn copy_bandwidth_is_plausible() {
        let Some(gpu) = gpu() else { return };
        let bw = gpu.copy_bandwidth(1 << 28, 10).unwrap();
        eprintln!(
            "device-to-device copy: {:.2} TB/s on {}",
            bw / 1e12,
            gpu.name
        );
        assert!(bw > 1e11 && bw < 2e13, "{bw}");
    }
}
