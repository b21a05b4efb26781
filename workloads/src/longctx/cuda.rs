//! The decode-attention step of `long-context` on an NVIDIA GPU (feature
//! `cuda`): our kernels in `decode_attn.cu`, compiled at run time with NVRTC
//! for `compute_90`, the host code that lays a step's cache out on the
//! device, and its timing against the memory-traffic floor. The problem,
//! its float64 reference and the byte count of the floor are in
//! [`super::kernel`].
//!
//! Kernels. Dense, windowed and clustered steps are one launch of a
//! split-K kernel (flash-decoding: Dao et al., "Flash-Decoding for
//! long-context inference", 2023): block `(s, h)` reads split `s` of KV head
//! `h`'s rows once, in 16-byte loads, for the four query heads that share
//! the KV head (grouped-query attention: no KV row is read twice), in f32
//! with an online softmax, and the last block of a head to finish combines
//! the splits (no second launch). Within a block the four warps work
//! on their own rows of each tile. In the register kernels (now block-topk's
//! short selections only) each warp prefetches its next rows into
//! registers while it computes, with no block-wide barrier until the
//! split's end; an earlier version with block-wide tiles, and one with a
//! 4-stage `cp.async` shared-memory pipeline, both stayed 10-25% above the
//! floor from 64k up on the H100. Every other step now reads its tiles
//! from shared memory, where bulk copies bring them (below).
//! The rows are the selection's rows in order: one range (dense; the
//! clustered cache, with its `ln(count)` bias; Chelsea, arXiv 2506.11418),
//! two ranges (StreamingLLM's sinks and window, arXiv 2309.17453), or a
//! list of 16-row pages. Split `s` of `S` takes every `S`-th 32-row tile
//! (interleaved, so a head's blocks sweep its rows front to back together;
//! 1-3% faster than contiguous spans, which remain selectable). Block-topk
//! (Quest, arXiv 2406.10774) is three launches: page scores over the
//! min/max metadata (which also histograms the scores' top bits), an exact
//! top-k per KV head (the rest of a radix select over the scores'
//! order-preserving bits, then compaction by warp scans), and the same
//! attention kernel over the selected pages. The top-k block copies its
//! head's scores into shared memory when they fit (up to about 850k rows
//! of context), so that its passes read no L2, and the top-k and attention
//! launches are programmatic dependent launches (each kernel's launch and
//! block set-up overlap the previous kernel; it waits on
//! `griddepcontrol.wait` before reading the previous kernel's results).
//! Measured on the H100 at 512k: step 0.156 -> 0.151 ms, top-k 21 -> 17 us
//! (of which the dependent launches about 2 us; the copy to shared memory
//! alone changes little: the top-k's cost is not its passes over L2).
//! Nsight Compute on the H100 at 512k: the top-k's 8 blocks are bound by
//! instruction latency (0.67 instructions issued per cycle and scheduler,
//! 8 of 132 SMs busy); the scoring reads at 2.55 TB/s, its occupancy held
//! to 2 blocks per SM by 104 registers. Again on an H200 at 512k after
//! the two-FMA scoring below (2026-11-29; `ncu-*.txt` in
//! `results/runs/2026-11-29-h200-long-context-decode-step-32-layers-a`):
//! the top-k alone takes 18.8 us, of which its 8 SMs are active about
//! 33k cycles, issuing 2.67 instructions a cycle each (0.67 per
//! scheduler, 11.9 cycles between a warp's instructions) for 702k warp
//! instructions in all: about 2,700 per warp, where our rough count of
//! its five passes over 32 keys a thread, three bin searches and the
//! ballots comes to about half that. The scoring takes 37.7 us alone (3.56 TB/s, 58
//! registers, 47% occupancy). Since then the top-k reads its keys as
//! 16-byte words in every pass (no bounds check per key: the padding of
//! the key buffer stays 0, which no pass counts) and compacts a word per
//! lane with two warp scans per round instead of two ballots per 32 keys
//! (51 -> 32 registers). A/B in one session, two alternating rounds of
//! `decode_step_timings` through `BENCH_SUITE_DECODE_ATTN_CU`
//! (`topk-words-ab.txt` in the same folder): the top-k at 512k 16.4 ->
//! 14.8 us, the step 0.1128 -> 0.1112 ms; at 4k 5.7 -> 4.7 us, the step
//! 0.0160 -> 0.0151 ms; at 128k unchanged (0.0391-0.0393 ms).
//! The top-k spread over a thread block cluster of 8 blocks per head
//! (`topk_select_cluster`: each block stages and passes over an eighth of
//! the keys, and the blocks sum their radix histograms and exchange their
//! counts through distributed shared memory, three cluster barriers in
//! all) was first tried on the H100 (2026-11-27, not kept then): about
//! 10 us more fixed time, 18-20 us in all as a dependent launch, and
//! 0.148 against 0.151 ms a step at 512k as an ordinary one. Re-written on
//! 2026-11-29 and measured on an H200 (`block_topk_launch_sweep`, in
//! `results/runs/2026-11-29-h200-long-context-quest-topk-cluster`): the
//! cluster still costs more below 512k (it executes 2.26M warp
//! instructions at 512k against the one-block kernel's 0.61M, mostly the
//! per-block fixed part, and takes 13.1 us alone against 17.2 in Nsight
//! Compute), but as an ordinary launch at 512k the step takes 0.1081 ms
//! against 0.1110-0.1116 for every form on one block; and at 256k the
//! one-block top-k as an ordinary launch takes 0.0630 against 0.0691 ms
//! as a dependent one. So both are kept, each from the context where it
//! was measured to win (`CLUSTER_TOPK_PAGES`, `ORDINARY_TOPK_PAGES`).
//! Capping the scoring's registers for 3 or 4 blocks per SM (2026-11-27)
//! changed nothing or slowed it (0.052 -> 0.068 ms at 4); that code was
//! not kept in the repository, so its figures cannot be re-measured from
//! it; the chained steps can (`with_chain`). Also tried and not kept
//! (commit 24a96d9 has it): the top-k in three passes over the keys instead
//! of five (the second radix histogram built while staging the keys, the
//! last pass and the per-warp counts from a list of the keys left in the
//! 22-bit bin). It passed every check, exact ties included, and changed
//! nothing (top-k 17.2 us at 512k, step 0.151 ms), so the passes are not
//! where the top-k's time goes. Nor are the scoring's shared-memory
//! histogram atomics (one per page, mostly on one bin): adding runs of
//! equal bins with one atomic each made the scoring slower (0.052 ->
//! 0.055 ms at 512k, two alternating rounds; not kept). The top-k's own
//! shared-memory atomics are not either: aggregating equal bins within a
//! warp (`__match_any_sync`) in its second and third passes took the top-k
//! from 17.2 to 46.8 us at 512k (2026-11-27, through
//! `BENCH_SUITE_DECODE_ATTN_CU`; not kept).
//! The scoring was issue-bound, not read-bound: it summed 16 operations per
//! channel and page (four query heads, two products, a max, an add). Since
//! a page's min is at most its max, it now sums the group's positive and
//! negative query parts once per block and takes two FMAs per channel and
//! page (decode_attn.cu; 104 -> 58 registers). Measured on an H200
//! (2026-11-29, `decode_step_timings` alternating the new source and the
//! old one through `BENCH_SUITE_DECODE_ATTN_CU`, two rounds each): scores
//! at 512k 0.0420-0.0424 -> 0.0377-0.0379 ms, the step 0.1205 -> 0.1156
//! ms (4.4x -> 4.5x faster than dense); at 128k 0.0459 -> 0.0443 ms.
//! Tried the same day and not kept: cutting the KV heads into 2, 4 or 8
//! groups, each scored on the main stream in turn and then selected and
//! attended on a stream of its own, so that one group's top-k would run
//! beside the next group's scoring and attention (also with a 256-thread
//! top-k that fits on an SM beside two scoring blocks, with fewer scoring
//! blocks per SM, and with SMs left free of scoring). Every grouped layout
//! was slower on the H200: at 512k, 10%, 0.1286-0.1969 ms against 0.1222
//! ms ungrouped; the parts show no overlap (two groups: scores 0.0457 ms,
//! then top-k 0.0165 and attention 0.0610 more, against 0.0422, 0.0178 and
//! 0.0623), the narrow top-k alone took 0.032 ms against 0.018, and scoring
//! with one block per SM 0.0567 ms against 0.0423. The code, its tests and the
//! figures are in `results/runs/2026-11-29-h200-long-context-quest-parts`
//! (`head-groups.patch` applies to commit 4eb7355).
//! Also tried that day and not kept: the scores and the top-k in one
//! cooperative launch (`quest_select`): each block keeps its pages' keys in
//! shared memory, and the 66 blocks of a KV head finish the radix select
//! together, their histograms summed in global memory, with a barrier of
//! the head's blocks after each pass and before the compaction (four in
//! all). It passed every check, exact ties included, but its barriers
//! cost more than the launch they save: at 512k, 10%, 0.1148-0.1150 ms
//! against 0.1157-0.1158 ms in two launches, and at 4k 0.0209 against
//! 0.0161 ms, the selection alone about 10 us where the two-launch top-k
//! takes 5.7 (`fused-select.patch`, applying to commit ffca587, and its
//! timings, in the same folder).
//! What any kernel with the dense step's grid pays here
//! (`dense_floor_diagnostics`, H100, medians of 50 replays): a graph node
//! that does nothing costs 1.1 us at 4k (a graph of 13 steps) and 4-5 us
//! from 64k (graphs of 1 to 3 steps share a replay's own overhead among
//! fewer nodes); a kernel that only reads the dense step's rows with
//! its grid and 16-byte loads, computing nothing, takes 1.92x the floor at
//! 4k (dense: 2.11x), and 1.70x / 1.24x / 1.22x at 16k / 64k / 128k, where
//! dense, with its register prefetch, is faster (1.34x / 1.08x / 1.02x).
//! So at 4k the step's arithmetic costs about 10% and the rest is reading
//! 16.8 MB with 256 blocks at about half the copy bandwidth of the floor's
//! 1 GiB copy; the issue's 1.5x at 4k would need a faster way to read the
//! cache, not a faster softmax. How fast it can be read (same test, same
//! H100, 2026-11-27): a device-to-device copy that moves the step's bytes
//! (half read, half written; copies back to back from 24 buffers) takes
//! 1.53x the floor at 4k (1.15x / 1.03x / 1.02x at 16k / 64k / 128k), and
//! the read-only kernel with 64 or 128 splits instead of 32 (each warp
//! reading 2 tiles or 1, not 4 one after the other) 1.46x / 1.29x. Dense
//! itself gets slower with more splits (`dense_split_sweep` at 4k: 2.59x
//! at 64, 3.17x at 128): at 3 blocks per SM its 512 or 1024 blocks take
//! more than one wave, and the combine reads more partials. Issuing the
//! combine's loads together (every split's max and sum at once, 16
//! splits' outputs at a time) took 4k from 0.0120 to 0.0117 ms (2.13x to
//! 2.08x). Tried and not kept: staging each split into shared memory with
//! `cp.async` (every warp's copies of all its tiles in flight at once, one
//! commit group per tile, computing from shared memory; 2 blocks per SM),
//! which passed the reference check and took 2.49x against 2.06x.
//!
//! Range steps (dense, sink windows) use bulk copies (`attn_ranges_tma`),
//! and so do the clustered cache (`attn_ranges_bias_tma`, each stage with
//! its tile's biases) and block-topk's pages from 4,096 selected rows per
//! KV head (`attn_pages_tma`, a copy per page a tile touches; `from_step`
//! and `with_ring_rule` have the figures): thread 0 copies whole tiles of K and V with
//! `cp.async.bulk`, completing on one mbarrier per stage, into a ring of 4
//! stages of 16 KB; the warps read their rows from shared memory, so the
//! loads in flight hold no registers. With 16 splits per head it took 4k
//! to 1.99x (the register kernel 2.08x in the same run; 1.95x in the
//! five-trial run) and 16k to 1.29x (1.31x-1.34x). The same kernel with 8,
//! 12, 20 and 32 splits took 3.05x, 2.62x, 2.50x and 2.15x at 4k (H100,
//! `BENCH_SUITE_SHORT_SPLITS`, 2026-11-27). Tried before it and not kept:
//! four tiles in flight per warp in registers (a ring of four tiles) at 2
//! blocks per SM, 2.24x at 4k against 2.08x. Until 2026-11-29 steps of
//! more than 16k rows per KV head loaded into registers (on the H100
//! dense was at 1.04x its floor or below from 64k up); on an H200 the
//! register kernel stayed at 1.07-1.13x there while bulk copies, two
//! blocks per SM and chained, took dense at 64k from 0.0717 to 0.0690 ms
//! (1.13x to 1.09x), at 128k from 0.1360 to 0.1323 (1.07x to 1.04x) and
//! at 512k from 0.5686 to 0.5314 (1.12x to 1.05x), and the window at 10%
//! of 512k from 0.0590 to 0.0568 ms (`long_ring_sweep`, one lease).
//! Splits per KV head: one block per resident slot ((SMs x resident
//! blocks) / KV heads: 33 with bulk copies on 132 SMs, 49 with loads into
//! registers), or, up to 4k rows, 16 with bulk copies and 32 with the
//! register kernels, where fewer partials to combine win (measured by the
//! `dense_split_sweep`, `range_split_sweep` and `long_ring_sweep` tests;
//! `plan_splits` gives the figures).
//!
//! Tuning without a rebuild (a machine with a GPU may have no Rust
//! toolchain): `BENCH_SUITE_DECODE_ATTN_CU` names another decode_attn.cu to
//! compile instead of the built-in one (a warning says so), and
//! `BENCH_SUITE_SHORT_SPLITS` replaces the 16 splits of the shortest bulk-copy
//! steps. Published runs use neither.
//!
//! What is timed, and why so. One step is everything the step kind does on
//! the device, selection included, from its inputs (the query, the cache,
//! the metadata) to the output, on one stream. A decoder runs these steps
//! back to back, one per layer, each layer with its own cache, under a CUDA
//! graph; so does the timing: a graph of `layers` steps, each over its own
//! copy of the cache (at least the modelled decoder's 32 layers, and at
//! least as many as it takes for the steps of one graph to read 4 times
//! the L2 cache, so that no step finds its data in L2 left there by the
//! previous replay; fewer only where the copies would not fit in 60% of
//! the free device memory), replayed back to back with
//! CUDA events around each replay; a step's time is a replay's time over
//! `layers`, and the reported figure is the median over replays after
//! warm-up. Launch costs are then what a decoder pays between graph nodes,
//! not the host's launch latency. Chaining the steps (`with_chain(true)`:
//! the first kernel of every step a programmatic dependent launch on the
//! kernel before it, waiting for its results before reading anything, so
//! that only launch and block set-up overlap, as a decoder could do with
//! its QKV projection) was measured on the H100 and gained nothing (dense
//! at 4k: 12.3 us chained, 12.0 us not; 16k: 31.4 against 30.3 us), so it
//! was off until 2026-11-29. Measured since on an H200, two kinds of
//! bulk-copy step are chained (`with_ring_rule`): those whose splits
//! outgrow the ring of 4 stages in a grid of one block per SM (dense at
//! 4k), which take the ring of 8 (0.0098 against 0.0105 ms), and every
//! one of more than 4k rows per KV head (1-3% faster).
//! `decode_step_timings` prints dense chained and not, and a third form,
//! chained with `Variant::Prefetch`: every step asks for its own rows to
//! be brought into L2 before it waits on the step before it, so that its
//! reads could overlap that step's tail. Measured on an H200 (2026-11-29,
//! `prefetch_chain_sweep` and `decode_step_timings`, in
//! results/runs/2026-11-29-h200-long-context-decode-step-32-layers-f), it
//! is slower everywhere: dense chained at 4k 0.0121 -> 0.0124 ms, at 512k
//! 0.531 -> 0.693 ms; at 32 splits, where chaining alone helps at 4k
//! (0.0100 against 0.0108 ms), prefetching adds 0.0004 ms. So no step uses
//! it. The floor is the step's bytes
//! ([`super::kernel::Step::bytes`]) over the copy bandwidth measured here
//! (a device-to-device copy of 1 GiB, counting bytes read and written).
//! Set-up (data generation, upload, compile, graph capture) is untimed,
//! and so is the check of one step's output against the float64 reference.

use std::cell::OnceCell;
use std::sync::Arc;

use cudarc::driver::sys::{
    self as cu, CUdevice_attribute, CUevent_flags, CUfunction_attribute, CUgraphInstantiate_flags,
    CUlaunchAttribute, CUlaunchAttributeID, CUlaunchAttributeValue, CUlaunchConfig,
    CUstreamCaptureMode,
};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use half::slice::HalfFloatSliceExt;

use super::kernel::{max_rel_err, Selection, Shape, Step, StepKind, StepOutput, PAGE};
use crate::stats::median;
use crate::WorkloadError;

const SOURCE: &str = include_str!("decode_attn.cu");
/// Threads of an attention block, rows of a tile, largest number of splits
/// per KV head, most pages one paged split may span (`ATT_THREADS`, `TILE`,
/// `MAX_SPLITS`, `MAX_SPAN_PAGES` in decode_attn.cu).
const ATT_THREADS: u32 = 128;
const TILE: usize = 32;
pub const MAX_SPLITS: usize = 256;
const MAX_SPAN_PAGES: usize = 1024;
/// Rows per KV head up to which a step takes few splits: `SHORT_SPLITS`
/// with the bulk-copy kernel, 32 with the others (see `plan_splits`).
const FEW_ROWS: usize = 4096;
/// Splits per KV head of a step of at most `FEW_ROWS` rows with the
/// bulk-copy kernel; `BENCH_SUITE_SHORT_SPLITS` replaces it, for tuning.
const SHORT_SPLITS: usize = 16;
/// Stages of the bulk-copy kernel's ring (`TMA_STAGES` in decode_attn.cu;
/// `attn_ranges_tma8` has twice as many).
const TMA_STAGES: usize = 4;
/// Dynamic shared memory of `attn_ranges_tma`: `TMA_STAGES` tiles of K and
/// V in bf16.
const TMA_SMEM: usize = TMA_STAGES * 2 * TILE * HEAD_DIM * 2;
/// `SHORT_SPLITS`, or `BENCH_SUITE_SHORT_SPLITS` where set (tuning only).
fn short_splits() -> Result<usize, WorkloadError> {
    crate::device::tuning_count(
        "BENCH_SUITE_SHORT_SPLITS",
        "splits per KV head for short steps",
        SHORT_SPLITS,
    )
}

/// Threads of the page-scoring and top-k blocks; bins of the first
/// radix-select histogram (`SC_THREADS`, `SEL_THREADS`, `HIST1`).
const SC_THREADS: u32 = 256;
const SEL_THREADS: u32 = 1024;
const HIST1: usize = 2048;
/// Pages one scoring block visits per round (16 half-warps, unrolled 4).
const SC_ROUND: usize = 64;
/// Static shared memory of `topk_select` (at most; its dynamic shared
/// memory holds one head's keys).
const SEL_STATIC_SMEM: usize = 4 * HIST1 + 1024;
/// Blocks per KV head of `topk_select_cluster` (one thread block cluster),
/// and its static shared memory (at most; its dynamic shared memory holds
/// its share of a head's keys).
const SEL_CLUSTER: usize = 8;
const SEL_CLUSTER_STATIC_SMEM: usize = 4 * (2 * HIST1 + 1024) + 1024;
/// Quest's top-k runs on a cluster of `SEL_CLUSTER` blocks per KV head from
/// `CLUSTER_TOPK_PAGES` pages per head, on one block below; from
/// `ORDINARY_TOPK_PAGES` it is an ordinary launch, not a dependent one
/// (the attention after it stays dependent). Measured on an H200 at 10%
/// (`block_topk_launch_sweep`, 2026-11-29, two rounds agreeing within
/// 0.0006 ms): at 256k (16,384 pages) the one-block top-k as an ordinary
/// launch took 0.0630 ms a step against 0.0691 as a dependent one; at 512k
/// (32,768 pages) the cluster top-k as an ordinary launch 0.1081 against
/// 0.1110-0.1116 for every form on one block; from 16k to 128k the
/// dependent one-block top-k was the fastest or within 0.0002 ms, and the
/// cluster 0.004-0.006 ms slower (its three cluster barriers and summed
/// histograms cost more than the passes they share out). Between 256k and
/// 512k the cluster was not measured.
const CLUSTER_TOPK_PAGES: usize = 32_768;
const ORDINARY_TOPK_PAGES: usize = 16_384;
/// The shapes the kernels are compiled for.
const HEAD_DIM: usize = 128;
const GROUP: usize = 4;
/// The layers of one timed graph read at least this many times the L2.
const L2_MULTIPLE: usize = 4;
/// A timed graph holds at least the modelled decoder's layers (Llama-3-8B
/// has 32), each over its own copy of the cache, as a decoder's graph of
/// one token does: a replay's own start-up cost is then shared among as
/// many steps as a decoder shares it among. Until 2026-11-29 a graph held
/// only as many steps as the L2 rule asks (one from 128k up), which
/// charged that cost, about 4 us, to a single step.
const MODEL_LAYERS: usize = 32;
const MAX_LAYERS: usize = 64;
/// Copies of the caches may take at most this share of free device memory.
const MEMORY_SHARE: f64 = 0.6;

fn dev(what: &str, e: impl std::fmt::Display) -> WorkloadError {
    WorkloadError::Device(format!("{what}: {e}"))
}

/// A CUDA context with the decode-attention kernels loaded, and one
/// capturable stream.
pub struct DecodeGpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    pub name: String,
    /// Wall seconds NVRTC and the module load took (reported, never timed).
    pub compile_s: f64,
    sms: usize,
    l2_bytes: usize,
    /// Shared memory one block may have, opting in.
    smem_optin: usize,
    copy_bw: OnceCell<f64>,
}

impl DecodeGpu {
    pub fn new(ordinal: usize) -> Result<Self, WorkloadError> {
        let ctx = crate::device::cuda_context(ordinal)?;
        // One stream, used in order: cudarc's per-buffer event tracking
        // would only add host work, and events cannot be recorded inside a
        // graph capture.
        // SAFETY: no buffer of this context is ever used on a second stream.
        unsafe { ctx.disable_event_tracking() };
        // Not the legacy default stream: it cannot be captured into a graph.
        let stream = ctx.new_stream().map_err(|e| dev("creating a stream", e))?;
        let source = crate::device::kernel_source("BENCH_SUITE_DECODE_ATTN_CU", SOURCE)?;
        let t0 = std::time::Instant::now();
        let ptx = compile_ptx_with_opts(
            source,
            CompileOptions {
                arch: Some("compute_90"),
                ..Default::default()
            },
        )
        .map_err(|e| dev("NVRTC could not compile decode_attn.cu", e))?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| dev("loading the compiled kernels", e))?;
        let compile_s = t0.elapsed().as_secs_f64();
        let attr = |a| {
            ctx.attribute(a)
                .map(|x| x.max(1) as usize)
                .map_err(|e| dev("device attribute", e))
        };
        let sms = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let l2_bytes = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?;
        let smem_optin =
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        Ok(DecodeGpu {
            ctx,
            stream,
            module,
            name,
            compile_s,
            sms,
            l2_bytes,
            smem_optin,
            copy_bw: OnceCell::new(),
        })
    }

    fn function(&self, name: &str) -> Result<CudaFunction, WorkloadError> {
        self.module
            .load_function(name)
            .map_err(|e| dev(&format!("kernel `{name}`"), e))
    }

    /// A bulk-copy kernel, allowed `smem` bytes of dynamic shared memory.
    fn bulk_copy_kernel(&self, name: &str, smem: usize) -> Result<CudaFunction, WorkloadError> {
        let f = self.function(name)?;
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(|e| dev("bulk-copy shared memory", e))?;
        Ok(f)
    }

    /// Device-to-device copy bandwidth in bytes per second (bytes read plus
    /// bytes written), the median of 10 copies of 1 GiB after 2 warm-up
    /// copies: the denominator of the memory-traffic floor. Measured once
    /// per context.
    pub fn copy_bandwidth(&self) -> Result<f64, WorkloadError> {
        if let Some(&bw) = self.copy_bw.get() {
            return Ok(bw);
        }
        let n = 1usize << 28;
        let src: CudaSlice<f32> = self.stream.alloc_zeros(n).map_err(|e| dev("alloc", e))?;
        let mut dst: CudaSlice<f32> = self.stream.alloc_zeros(n).map_err(|e| dev("alloc", e))?;
        let mut times = Vec::new();
        for i in 0..12 {
            let (start, end) = (self.event()?, self.event()?);
            start.record(&self.stream).map_err(|e| dev("event", e))?;
            self.stream
                .memcpy_dtod(&src, &mut dst)
                .map_err(|e| dev("memcpy", e))?;
            end.record(&self.stream).map_err(|e| dev("event", e))?;
            let ms = start.elapsed_ms(&end).map_err(|e| dev("event", e))?;
            if i >= 2 {
                times.push(ms as f64 / 1e3);
            }
        }
        let bw = 2.0 * (n * 4) as f64 / median(&times);
        let _ = self.copy_bw.set(bw);
        Ok(bw)
    }

    fn event(&self) -> Result<cudarc::driver::CudaEvent, WorkloadError> {
        self.ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| dev("event", e))
    }

    fn synchronize(&self) -> Result<(), WorkloadError> {
        self.stream.synchronize().map_err(|e| dev("synchronize", e))
    }
}

/// Kernel arguments for [`launch_raw`], one 8-byte slot each (a kernel
/// reads the first 4 bytes of the slot of an `int` or `float`: the low
/// half, on a little-endian host).
#[derive(Default)]
struct RawArgs(Vec<u64>);

impl RawArgs {
    fn ptr<T>(&mut self, x: &CudaSlice<T>, st: &CudaStream) -> &mut Self {
        let (p, _sync) = x.device_ptr(st);
        self.0.push(p);
        self
    }
    fn i32(&mut self, x: i32) -> &mut Self {
        self.0.push(x as u32 as u64);
        self
    }
    fn i64(&mut self, x: i64) -> &mut Self {
        self.0.push(x as u64);
        self
    }
    fn f32(&mut self, x: f32) -> &mut Self {
        self.0.push(x.to_bits() as u64);
        self
    }
}

/// Launches `f` on `st` through `cuLaunchKernelEx`; with `pdl`, as a
/// programmatic dependent launch: its blocks may start once every block of
/// the previous kernel on the stream has run `griddepcontrol.launch_dependents`
/// (or ended), and must run `griddepcontrol.wait` before they read that
/// kernel's results.
///
/// # Safety
/// `args` must match the kernel's parameters, and the buffers it names
/// must outlive the launch.
unsafe fn launch_raw(
    ctx: &CudaContext,
    st: &CudaStream,
    f: &CudaFunction,
    cfg: LaunchConfig,
    args: &mut RawArgs,
    pdl: bool,
) -> Result<(), WorkloadError> {
    ctx.bind_to_thread()
        .map_err(|e| dev("binding the context", e))?;
    let mut attr = CUlaunchAttribute {
        id: CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value: CUlaunchAttributeValue {
            programmaticStreamSerializationAllowed: 1,
        },
    };
    let lc = CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: st.cu_stream(),
        attrs: &mut attr,
        numAttrs: pdl as u32,
    };
    let mut params: Vec<*mut std::ffi::c_void> = args
        .0
        .iter_mut()
        .map(|x| x as *mut u64 as *mut std::ffi::c_void)
        .collect();
    cu::cuLaunchKernelEx(
        &lc,
        f.cu_function(),
        params.as_mut_ptr(),
        std::ptr::null_mut(),
    )
    .result()
    .map_err(|e| dev("launch", e))
}

/// Dynamic shared memory of a top-k that stages its keys: a head's
/// `key_stride` words, or on a cluster one block's share of whole 16-byte
/// words.
fn staged_bytes(key_stride: usize, cluster: bool) -> usize {
    if cluster {
        16 * (key_stride / 4).div_ceil(SEL_CLUSTER)
    } else {
        4 * key_stride
    }
}

/// Whether that top-k's staged keys fit in a block's shared memory.
fn stage_fits(key_stride: usize, cluster: bool, smem_optin: usize) -> bool {
    let fixed = if cluster {
        SEL_CLUSTER_STATIC_SMEM
    } else {
        SEL_STATIC_SMEM
    };
    fixed + staged_bytes(key_stride, cluster) <= smem_optin
}

/// One layer's copy of what a step reads.
struct Layer {
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
    meta: Option<CudaSlice<u16>>,
    bias: Option<CudaSlice<f32>>,
}

/// Range steps without a bias (dense, windowed): the only steps that the
/// ring of 8 and the prefetching kernels serve.
fn plain_range(step: &Step) -> bool {
    step.bias().is_none() && !matches!(step.kind, StepKind::BlockTopk { .. })
}

/// The attention kernels of `step`'s kind: loading into registers, bulk
/// copies on a ring of `TMA_STAGES`, and on a ring of twice that where it
/// is built (range steps without a bias).
fn kernels(step: &Step) -> (&'static str, &'static str, Option<&'static str>) {
    if matches!(step.kind, StepKind::BlockTopk { .. }) {
        ("attn_pages", "attn_pages_tma", None)
    } else if step.bias().is_some() {
        ("attn_ranges_bias", "attn_ranges_bias_tma", None)
    } else {
        ("attn_ranges", "attn_ranges_tma", Some("attn_ranges_tma8"))
    }
}

/// The ring-of-4 bulk-copy kernel of a range step (`step` not block-topk)
/// that starts its first tiles before it waits on the kernel before it
/// (decode_attn.cu, attn_body's EARLY); `with_ring_rule` says when.
fn early_kernel(step: &Step) -> &'static str {
    if step.bias().is_some() {
        "attn_ranges_bias_tma_early"
    } else {
        "attn_ranges_tma_early"
    }
}

/// Floats of zeros after a step's biases on the device: a bulk copy of a
/// tile's biases starts up to 3 floats early and ends up to 3 late (see
/// `attn_ranges_bias_tma`).
const BIAS_PAD: usize = 8;

/// Which attention kernel a bench launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Normal,
    /// Deliberately wrong: the combine leaves out each head's last split
    /// (dense and window steps only), for the test that the check catches it.
    DropLastSplit,
    /// Timing diagnostics for dense steps, never checked (their output is
    /// not attention): a kernel that reads exactly the dense step's rows
    /// with the register kernel's grid and loads and computes nothing, and
    /// one that does nothing (both unchained; `with_splits` after them sets
    /// another grid). Time them with [`DecodeBench::time_part`].
    ReadOnly,
    Empty,
    /// For timing the choice: the step's kernel that loads into registers
    /// (two tiles in flight per warp) instead of its bulk-copy one, with
    /// the splits the register kernel gets, unchained.
    Registers,
    /// For timing chained steps (range steps without a bias): the step's
    /// kernel asks for its rows to be brought into L2 before it waits on
    /// the kernel before it (`cp.async.bulk.prefetch.L2`; a hint, the
    /// result is the same). Under an ordinary launch there is nothing to
    /// overlap. Measured slower at every context (module docs), so only
    /// the tests and the sweeps use it.
    Prefetch,
}

/// How much of a step to launch: block-topk's parts can be timed alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upto {
    /// Page scores only.
    Score,
    /// Page scores and the top-k selection.
    Select,
    /// The whole step.
    All,
}

/// How the rows of a step are cut into splits.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Logical rows per KV head, rows per split, splits per KV head.
    total: usize,
    span: usize,
    splits: usize,
    /// Splits take every `splits`-th tile instead of a contiguous span.
    interleave: bool,
}

/// What [`DecodeBench::time`] measured.
#[derive(Debug, Clone)]
pub struct Timing {
    /// Median seconds per step.
    pub median_s: f64,
    /// Bytes the step must move over the copy bandwidth.
    pub floor_s: f64,
    pub bytes: u64,
    /// Copy bandwidth the floor used, bytes per second.
    pub copy_bw: f64,
    /// Largest relative error of one step's output against the float64
    /// reference over the step's own selection (after checking that
    /// selection).
    pub rel_err_vs_cpu_ref: f64,
    /// Pages on which the GPU's top-k differs from the float64 top-k by a
    /// near tie (block-topk).
    pub near_tie_swaps: usize,
    /// Steps per replay, splits per KV head.
    pub layers: usize,
    pub splits: usize,
    /// Seconds per step of every replay.
    pub samples_s: Vec<f64>,
}

impl Timing {
    pub fn ratio_to_floor(&self) -> f64 {
        self.median_s / self.floor_s
    }
}

/// One step kind at one context on the device, ready to run repeatedly.
pub struct DecodeBench<'g> {
    gpu: &'g DecodeGpu,
    pub step: Step,
    layers: Vec<Layer>,
    q: CudaSlice<u16>,
    out: CudaSlice<f32>,
    part_o: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
    counters: CudaSlice<u32>,
    keys: CudaSlice<u32>,
    hist: CudaSlice<u32>,
    pages: CudaSlice<i32>,
    /// Stands in for the bias of kinds without one (never read).
    no_bias: CudaSlice<f32>,
    attn: CudaFunction,
    /// Dynamic shared memory of `attn` (the bulk-copy kernel's stages).
    attn_smem: u32,
    score: CudaFunction,
    /// Scoring blocks resident per SM.
    score_resident: usize,
    select: CudaFunction,
    select_cluster: CudaFunction,
    /// Words per KV head in `keys` (pages rounded up to a multiple of 4).
    key_stride: usize,
    /// The top-k copies a head's keys (its share, on a cluster) into
    /// shared memory first, where they fit.
    staged: bool,
    /// The top-k runs on a cluster of `SEL_CLUSTER` blocks per KV head.
    cluster: bool,
    /// Top-k and attention are programmatic dependent launches.
    pdl: bool,
    /// Each of them separately (tuning); unless set, both follow `pdl`,
    /// except that the top-k is ordinary from `ORDINARY_TOPK_PAGES` pages.
    pdl_parts: Option<(bool, bool)>,
    /// The first kernel of every step is a programmatic dependent launch
    /// on the kernel before it (see the module docs).
    chain: bool,
    /// The bulk-copy ring and chaining follow the plan
    /// ([`DecodeBench::with_ring_rule`]); cleared once a caller picks the
    /// ring or another kernel.
    ring_auto: bool,
    /// Whether the ring-of-4 kernel is the early-start one (`early_kernel`).
    early: bool,
    plan: Plan,
    graph: Option<CudaGraph>,
    /// Diagnostics only ([`Self::with_layers`]): a graph of this many
    /// steps, all over layer 0's cache.
    alias: Option<usize>,
}

impl<'g> DecodeBench<'g> {
    /// Generates the data of `kind` at `shape` and sets the step up on the
    /// device (untimed).
    pub fn new(
        gpu: &'g DecodeGpu,
        shape: Shape,
        kind: StepKind,
        seed: u64,
    ) -> Result<Self, WorkloadError> {
        Self::from_step(gpu, Step::generate(shape, kind, seed)?)
    }

    /// Uploads `step`'s data, one copy per layer of the timed graph, and
    /// plans the splits (untimed).
    pub fn from_step(gpu: &'g DecodeGpu, step: Step) -> Result<Self, WorkloadError> {
        let s = step.shape();
        if s.head_dim != HEAD_DIM || s.group() != GROUP {
            return Err(WorkloadError::Config(format!(
                "the CUDA kernels are compiled for head dimension {HEAD_DIM} and {GROUP} query heads per KV head; got {} and {}",
                s.head_dim,
                s.group()
            )));
        }
        if let StepKind::BlockTopk { page, .. } = step.kind {
            if page != PAGE {
                return Err(WorkloadError::Config(format!(
                    "the CUDA kernels read Quest pages of {PAGE} rows; got {page}"
                )));
            }
        }
        // The bulk-copy kernel with a bias copies one run of biases a tile.
        if step.bias().is_some() && step.fixed_ranges().is_none_or(|r| r.len() != 1) {
            return Err(WorkloadError::Config(
                "the CUDA kernels take a bias with one range of rows only".into(),
            ));
        }
        let st = &gpu.stream;
        let up16 = |x: &[half::bf16]| {
            st.clone_htod(x.reinterpret_cast())
                .map_err(|e| dev("upload", e))
        };
        let (k, v, _) = step.kv();
        let first = Layer {
            k: up16(k)?,
            v: up16(v)?,
            meta: if step.meta.is_empty() {
                None
            } else {
                Some(up16(&step.meta)?)
            },
            bias: match step.bias() {
                Some(b) => {
                    let padded: Vec<f32> = b.iter().copied().chain([0.0; BIAS_PAD]).collect();
                    Some(st.clone_htod(&padded).map_err(|e| dev("upload", e))?)
                }
                None => None,
            },
        };
        let stored = 2 * (k.len() + step.meta.len()) + 4 * step.bias().map_or(0, |b| b.len());
        let read = step.bytes().total() as usize;
        // Buffers of earlier steps are freed stream-ordered: their memory
        // returns to the device (and counts as free) only at a
        // synchronisation.
        gpu.ctx.synchronize().map_err(|e| dev("synchronize", e))?;
        let (free, _) = gpu.ctx.mem_get_info().map_err(|e| dev("memory info", e))?;
        let fit = ((free as f64 * MEMORY_SHARE) / stored as f64) as usize + 1;
        let n_layers = (L2_MULTIPLE * gpu.l2_bytes)
            .div_ceil(read)
            .clamp(MODEL_LAYERS, MAX_LAYERS)
            .min(fit.max(1));
        let mut layers = vec![first];
        for _ in 1..n_layers {
            let copy = |x: &CudaSlice<u16>| -> Result<CudaSlice<u16>, WorkloadError> {
                // SAFETY: filled by the copy below before any use.
                let mut y = unsafe { st.alloc::<u16>(x.len()) }.map_err(|e| dev("alloc", e))?;
                st.memcpy_dtod(x, &mut y).map_err(|e| dev("copy", e))?;
                Ok(y)
            };
            let l0 = &layers[0];
            let layer = Layer {
                k: copy(&l0.k)?,
                v: copy(&l0.v)?,
                meta: l0.meta.as_ref().map(copy).transpose()?,
                bias: match &l0.bias {
                    Some(b) => {
                        // SAFETY: filled by the copy below before any use.
                        let mut y =
                            unsafe { st.alloc::<f32>(b.len()) }.map_err(|e| dev("alloc", e))?;
                        st.memcpy_dtod(b, &mut y).map_err(|e| dev("copy", e))?;
                        Some(y)
                    }
                    None => None,
                },
            };
            layers.push(layer);
        }
        let zeros32 = |n: usize| st.alloc_zeros::<u32>(n.max(1)).map_err(|e| dev("alloc", e));
        let zerosf = |n: usize| st.alloc_zeros::<f32>(n.max(1)).map_err(|e| dev("alloc", e));
        let kvh = s.kv_heads;
        // Range steps bring their tiles in with bulk copies, four in flight
        // per block (`attn_ranges_tma`, `attn_ranges_bias_tma`;
        // `with_ring_rule` may take the ring of 8 where there is no bias),
        // block-topk's pages from `FEW_ROWS` selected rows per KV head
        // (`attn_pages_tma`). Measured on an H200
        // (`decode_step_timings`, `block_topk_split_sweep`, 2026-11-29): at
        // 10% the step took 0.1045 against 0.1052 ms at 512k, 0.0385
        // against 0.0390 at 128k and 0.0261 against 0.0268 at 64k, but
        // 0.0155 against 0.0151 at 4k (410 rows) and, at 16k (1,638 rows),
        // 0.0167 at best against 0.0167.
        let paged = matches!(step.kind, StepKind::BlockTopk { .. });
        let tma = !(paged && step.rows_read() < FEW_ROWS);
        let (registers, bulk, _) = kernels(&step);
        let attn = if tma {
            gpu.bulk_copy_kernel(bulk, TMA_SMEM)?
        } else {
            gpu.function(registers)?
        };
        let score = gpu.function("quest_score")?;
        let select = gpu.function("topk_select")?;
        let select_cluster = gpu.function("topk_select_cluster")?;
        let key_stride = step.n_pages().div_ceil(4) * 4;
        for (f, cluster) in [(&select, false), (&select_cluster, true)] {
            let bytes = staged_bytes(key_stride, cluster);
            if stage_fits(key_stride, cluster, gpu.smem_optin) {
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
                .map_err(|e| dev("top-k shared memory", e))?;
            }
        }
        let mut bench = DecodeBench {
            gpu,
            q: up16(&step.cache.q)?,
            out: zerosf(s.q_heads * s.head_dim)?,
            part_o: zerosf(kvh * MAX_SPLITS * GROUP * HEAD_DIM)?,
            part_ml: zerosf(kvh * MAX_SPLITS * GROUP * 2)?,
            counters: zeros32(kvh)?,
            // Zeroed once: the scoring writes only the first n_pages words
            // of each head, and topk_select reads the padding up to the
            // stride as keys of 0, which no pass counts.
            keys: zeros32(kvh * key_stride)?,
            hist: zeros32(kvh * HIST1)?,
            pages: st
                .alloc_zeros::<i32>((kvh * step.pages_kept()).max(1))
                .map_err(|e| dev("alloc", e))?,
            no_bias: zerosf(1)?,
            attn,
            attn_smem: if tma { TMA_SMEM as u32 } else { 0 },
            score_resident: score
                .occupancy_max_active_blocks_per_multiprocessor(SC_THREADS, 0, None)
                .map_err(|e| dev("occupancy", e))?
                .max(1) as usize,
            score,
            select,
            select_cluster,
            key_stride,
            staged: true,
            cluster: step.n_pages() >= CLUSTER_TOPK_PAGES,
            pdl: true,
            pdl_parts: None,
            chain: false,
            ring_auto: true,
            early: false,
            plan: Plan {
                total: 0,
                span: 0,
                splits: 0,
                interleave: true,
            },
            graph: None,
            alias: None,
            layers,
            step,
        };
        bench.plan = bench.plan_splits(None, true)?;
        let bench = bench.with_ring_rule()?;
        gpu.synchronize()?;
        Ok(bench)
    }

    /// The default ring and chaining of a bulk-copy step, for its plan;
    /// re-applied whenever the plan changes, until a caller picks the ring
    /// ([`DecodeBench::with_ring`]) or another kernel
    /// ([`DecodeBench::with_variant`]). Where a split holds more tiles
    /// than the ring has stages and the grid is one block per SM anyway
    /// (dense at 4k: 8 tiles of 32 rows at 16 splits, 128 blocks), the
    /// ring of 8, which fits one block per SM, keeps them all in flight,
    /// and the steps are chained; otherwise the ring of 4, chained for
    /// steps of more than `FEW_ROWS` rows. Measured on an H200
    /// (`prefetch_chain_sweep`, 2026-11-29, in
    /// results/runs/2026-11-29-h200-long-context-decode-step-32-layers-g):
    /// dense at 4k 0.0105 ms with 4 stages, 0.0103 with 8, 0.0098 with 8
    /// chained (0.0120 chained with 4). Where the grid needs two blocks per
    /// SM the ring of 8 is slower (dense at 16k, 32 splits: 0.0293 against
    /// 0.0237 ms; the window at 10% of 64k: 0.0166 against 0.0138).
    /// Chaining the ring of 4 at 32 or 33 splits: dense at 16k 0.0230
    /// against 0.0235 ms (the same sweep), at 64k 0.0690 against 0.0700,
    /// at 512k 0.5314 against 0.5324, the window at 25% of 128k 0.0385
    /// against 0.0397 (`long_ring_sweep`, 2026-11-29). The clustered
    /// cache, whose biases came to bulk copies the same day, follows the
    /// same rule on its ring of 4: at 10%, 64k 0.0133 ms chained against
    /// 0.0139 not and 0.0139 with loads into registers, 512k 0.0587,
    /// 0.0591 and 0.0593; at 16k (1,638 rows) 0.0079 against 0.0082 with
    /// registers, but at 4k (410 rows) 0.0073 against 0.0071
    /// (`decode_step_timings`).
    ///
    /// Chained steps on the ring of 4 whose splits hold more than 8 tiles
    /// take the early-start kernel ([`early_kernel`]), which issues its
    /// first tiles before waiting on the step before. Measured on an H200
    /// (2026-11-29, `decode_step_timings` with the test binaries before
    /// and after, two alternating rounds, `ab.txt` in
    /// results/runs/2026-11-29-h200-long-context-decode-step-early-start):
    /// dense at 16k 0.0227 -> 0.0226 ms, at 64k 0.0687 -> 0.0660, at 128k
    /// 0.1296 -> 0.1249 and at 512k 0.4952 -> 0.4837; at 10% of 512k the
    /// window 0.0562 -> 0.0544 and the clustered cache 0.0585 -> 0.0572;
    /// at 10% of 128k (12 tiles a split) both 1-2% slower (0.0198 ->
    /// 0.0200 ms). Started early, shorter splits got slower (every range
    /// step by bulk copies early: dense at 4k, 8 tiles on the ring of 8,
    /// 0.0098 -> 0.0107 ms; the window at 10% of 64k, 6 tiles, 0.0132 ->
    /// 0.0139), and the test on the tile count inside every bulk-copy
    /// kernel cost the short steps 2-3%, hence kernels of their own.
    fn with_ring_rule(self) -> Result<Self, WorkloadError> {
        // Block-topk's pages keep the ring of 4, unchained.
        let paged = matches!(self.step.kind, StepKind::BlockTopk { .. });
        if !self.ring_auto || self.attn_smem == 0 || paged {
            return Ok(self);
        }
        let tiles = self
            .plan
            .total
            .div_ceil(TILE)
            .div_ceil(self.plan.splits.max(1));
        let blocks = self.plan.splits * self.step.shape().kv_heads;
        // The ring of 8 is built without a bias only.
        let deep = tiles > TMA_STAGES && blocks <= self.gpu.sms && plain_range(&self.step);
        let long = self.plan.total > FEW_ROWS;
        let early = !deep && long && tiles > 2 * TMA_STAGES;
        let mut bench = self.set_ring(if deep { 2 * TMA_STAGES } else { TMA_STAGES }, early)?;
        bench.chain = deep || long;
        Ok(bench)
    }

    /// Stages of the bulk-copy kernel's ring (`TMA_STAGES` or twice that;
    /// by default a rule picks it from the plan, `with_ring_rule`), for
    /// tests and timing; the ring then stays as picked. The ring of 8 is
    /// built for range steps without a bias only. A step that loads into
    /// registers (block-topk's short selections, `Variant::Registers`)
    /// switches to bulk copies, with the splits `plan_splits` gives them.
    pub fn with_ring(mut self, stages: usize) -> Result<Self, WorkloadError> {
        self.ring_auto = false;
        let registers = self.attn_smem == 0;
        let mut bench = self.set_ring(stages, false)?;
        if registers {
            bench.plan = bench.plan_splits(None, bench.plan.interleave)?;
        }
        Ok(bench)
    }

    fn set_ring(mut self, stages: usize, early: bool) -> Result<Self, WorkloadError> {
        let (_, four, eight) = kernels(&self.step);
        let (name, smem) = match (stages, eight) {
            (TMA_STAGES, _) if early => (early_kernel(&self.step), TMA_SMEM),
            (TMA_STAGES, _) => (four, TMA_SMEM),
            (x, Some(eight)) if x == 2 * TMA_STAGES => (eight, 2 * TMA_SMEM),
            _ => {
                return Err(WorkloadError::Config(format!(
                    "a ring of {stages} stages is not built for this step; {TMA_STAGES} is, and {} for range steps",
                    2 * TMA_STAGES
                )))
            }
        };
        self.attn = self.gpu.bulk_copy_kernel(name, smem)?;
        self.attn_smem = smem as u32;
        self.early = early && stages == TMA_STAGES;
        self.graph = None;
        Ok(self)
    }

    /// Replaces the default number of splits per KV head (for tuning).
    pub fn with_splits(mut self, splits: usize) -> Result<Self, WorkloadError> {
        self.plan = self.plan_splits(Some(splits), self.plan.interleave)?;
        self.graph = None;
        self.with_ring_rule()
    }

    /// Interleaved tiles per split (`true`, the default) or contiguous
    /// spans (`false`; see decode_attn.cu), keeping the number of splits.
    pub fn with_interleave(mut self, interleave: bool) -> Result<Self, WorkloadError> {
        self.plan = self.plan_splits(Some(self.plan.splits), interleave)?;
        self.graph = None;
        self.with_ring_rule()
    }

    /// Block-topk: whether the top-k kernel copies the keys into shared
    /// memory (`true` only where they fit, the default there) and whether
    /// top-k and attention are programmatic dependent launches (default
    /// `true`, with the top-k ordinary from `ORDINARY_TOPK_PAGES` pages),
    /// for tests and timing.
    pub fn with_topk_options(mut self, staged: bool, pdl: bool) -> Self {
        self.staged = staged;
        self.pdl = pdl;
        self.graph = None;
        self
    }

    /// Block-topk: whether the top-k runs on a cluster of blocks per KV
    /// head (the default from `CLUSTER_TOPK_PAGES` pages) or on one block,
    /// for tests and timing.
    pub fn with_topk_cluster(mut self, cluster: bool) -> Self {
        self.cluster = cluster;
        self.graph = None;
        self
    }

    /// Block-topk, for tuning: whether the top-k and whether the attention
    /// are programmatic dependent launches, each on its own.
    pub fn with_dependent_launches(mut self, select: bool, attention: bool) -> Self {
        self.pdl_parts = Some((select, attention));
        self.graph = None;
        self
    }

    /// Whether the top-k and the attention of a block-topk step are
    /// dependent launches.
    fn dependent_launches(&self) -> (bool, bool) {
        let n_pages = self.step.n_pages();
        self.pdl_parts
            .unwrap_or((self.pdl && n_pages < ORDINARY_TOPK_PAGES, self.pdl))
    }

    /// Whether the top-k launched now stages its keys in shared memory.
    fn stages_keys(&self) -> bool {
        self.staged && stage_fits(self.key_stride, self.cluster, self.gpu.smem_optin)
    }

    /// For timing diagnostics: graphs of the first `n` layers (at most
    /// [`Self::layers`]), or with `aliased` of `n` steps that all read
    /// layer 0's cache (what the graph of one replayed layer reads).
    pub fn with_layers(mut self, n: usize, aliased: bool) -> Self {
        let n = n.max(1);
        self.layers.truncate(if aliased { 1 } else { n });
        self.alias = aliased.then_some(n);
        self.graph = None;
        self
    }

    /// Steps in a timed graph.
    fn steps(&self) -> usize {
        self.alias.unwrap_or(self.layers.len())
    }

    /// Whether every step is a programmatic dependent launch on the step
    /// before it (default `false`; see the module docs).
    pub fn with_chain(mut self, chain: bool) -> Self {
        self.chain = chain;
        self.graph = None;
        self
    }

    /// Switches to a deliberately broken attention kernel.
    pub fn with_variant(mut self, variant: Variant) -> Result<Self, WorkloadError> {
        // A variant's kernel stays whatever the plan becomes.
        self.ring_auto &= variant == Variant::Normal;
        if variant != Variant::Normal {
            self.early = false;
        }
        let kernel = match variant {
            Variant::Normal => None,
            Variant::DropLastSplit => {
                if !matches!(self.step.kind, StepKind::Dense | StepKind::Window { .. }) {
                    return Err(WorkloadError::Config(
                        "the drop-last-split kernel exists for dense and window steps only".into(),
                    ));
                }
                Some("attn_ranges_drop_last")
            }
            Variant::Registers => {
                self.attn = self.gpu.function(kernels(&self.step).0)?;
                self.attn_smem = 0;
                // With the splits the register kernel would have, unchained
                // (its measured choice).
                self.plan = self.plan_splits(None, self.plan.interleave)?;
                self.chain = false;
                None
            }
            Variant::Prefetch => {
                if !plain_range(&self.step) {
                    return Err(WorkloadError::Config(
                        "the prefetching variant exists for range steps without a bias".into(),
                    ));
                }
                if self.attn_smem > 0 {
                    self.attn = self.gpu.bulk_copy_kernel("attn_ranges_tma_pf", TMA_SMEM)?;
                    self.attn_smem = TMA_SMEM as u32;
                } else {
                    self.attn = self.gpu.function("attn_ranges_pf")?;
                }
                None
            }
            Variant::ReadOnly | Variant::Empty => {
                if !matches!(self.step.kind, StepKind::Dense) {
                    return Err(WorkloadError::Config(
                        "the read-only and empty diagnostics exist for dense steps only".into(),
                    ));
                }
                Some(if variant == Variant::ReadOnly {
                    "attn_read_only"
                } else {
                    "attn_empty"
                })
            }
        };
        if let Some(name) = kernel {
            self.attn = self.gpu.function(name)?;
            self.attn_smem = 0;
        }
        if matches!(variant, Variant::ReadOnly | Variant::Empty) {
            // The diagnostics read as the register kernel would (its
            // splits, unchained), not with the bulk-copy step's grid.
            self.plan = self.plan_splits(None, self.plan.interleave)?;
            self.chain = false;
        }
        self.graph = None;
        Ok(self)
    }

    /// Steps per timed graph replay.
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    pub fn splits(&self) -> usize {
        self.plan.splits
    }

    /// Stages of the bulk-copy ring the step's kernel uses; 0 where it
    /// loads into registers.
    pub fn ring(&self) -> usize {
        self.attn_smem as usize / (TMA_SMEM / TMA_STAGES)
    }

    /// Whether the steps of the timed graph are chained.
    pub fn chained(&self) -> bool {
        self.chain
    }

    /// Whether the step's kernel starts its first tiles before it waits on
    /// the kernel before it (`with_ring_rule`).
    pub fn early_start(&self) -> bool {
        self.early
    }

    fn plan_splits(&self, splits: Option<usize>, interleave: bool) -> Result<Plan, WorkloadError> {
        let total = self.step.rows_read();
        let wanted = match splits {
            Some(x) => x,
            None => {
                let resident = self
                    .attn
                    .occupancy_max_active_blocks_per_multiprocessor(
                        ATT_THREADS,
                        self.attn_smem as usize,
                        None,
                    )
                    .map_err(|e| dev("occupancy", e))?
                    .max(1) as usize;
                // One block per resident slot (all start at once and finish
                // together); for short steps fewer, which have less to
                // combine. Measured by `dense_split_sweep` and
                // `range_split_sweep` on an H200 in graphs of 32 layers
                // (2026-11-29, figures in
                // results/runs/2026-11-29-h200-long-context-decode-step-32-layers-a):
                // up to 4,096 rows 16 splits with bulk copies (dense 4k:
                // 0.0104 ms, 32: 0.0107) and 32 with loads into
                // registers; above that a slot per block (with bulk
                // copies two blocks per SM, 33 splits on 132 SMs: dense at
                // 16k took 0.0231 ms at 32 against 0.0273 at 16, the window
                // at 10% of 128k, 13,107 rows, 0.0201 against 0.0234, and
                // `long_ring_sweep`, 2026-11-29, dense at 64k 0.0700 at 33
                // against 0.0715 at 32 and 0.0894 at 66, at 512k 0.5324
                // against 0.5443 and 0.5403; with loads into registers
                // three, 49: the clustered cache at
                // 10% of 64k, 6,554 rows: 0.0137 at 49 against 0.0143 at
                // 32; at 128k 0.0206 against 0.0219). Until then 16 and
                // 32 held up to 16,384 rows, as measured on an H100 in
                // graphs of as many steps as the L2 rule asked. Block-topk's
                // attention, which starts as a dependent launch behind its
                // top-k, takes a slot per block from 4,096 selected rows
                // (`block_topk_split_sweep`, H200, 2026-11-29: 10% of 64k
                // 0.0291 -> 0.0283 ms, of 128k 0.0442 -> 0.0398 ms, 50% of
                // 16k 0.0282 -> 0.0260 ms; 10% of 16k, 1,638 rows, 0.0179
                // ms at 32 against 0.0187 ms).
                let slots = self.gpu.sms * resident / self.step.shape().kv_heads;
                let paged = matches!(self.step.kind, StepKind::BlockTopk { .. });
                let tma = self.attn_smem > 0;
                let few = if paged {
                    total < FEW_ROWS
                } else {
                    total <= FEW_ROWS
                };
                let per_head = match (few, tma) {
                    (true, true) => short_splits()?,
                    (true, false) => 32,
                    (false, _) => slots,
                };
                per_head.min(total.div_ceil(TILE))
            }
        }
        .clamp(1, MAX_SPLITS);
        // A paged split keeps its page ids in shared memory: two per tile
        // when interleaved; a contiguous span that starts mid-page touches
        // at most two pages beyond span / 16.
        let fewest = match (self.step.kind, interleave) {
            (StepKind::BlockTopk { .. }, true) => total.div_ceil(TILE).div_ceil(MAX_SPAN_PAGES / 2),
            (StepKind::BlockTopk { .. }, false) => total.div_ceil((MAX_SPAN_PAGES - 2) * PAGE),
            _ => 1,
        };
        if fewest > MAX_SPLITS {
            return Err(WorkloadError::Config(format!(
                "block-topk: {total} selected rows per KV head need more than {MAX_SPLITS} splits; lower the fraction"
            )));
        }
        let wanted = wanted.max(fewest);
        if interleave {
            // Every split gets at least one tile.
            let splits = wanted.min(total.div_ceil(TILE));
            return Ok(Plan {
                total,
                span: 0,
                splits,
                interleave,
            });
        }
        let span = total.div_ceil(wanted);
        Ok(Plan {
            total,
            span,
            splits: total.div_ceil(span),
            interleave,
        })
    }

    /// Enqueues one step (or its first parts) over layer `li`'s cache.
    fn launch_step(&mut self, li: usize, upto: Upto) -> Result<(), WorkloadError> {
        let s = self.step.shape();
        let st = &self.gpu.stream;
        let kvh = s.kv_heads;
        let layer = &self.layers[if self.alias.is_some() { 0 } else { li }];
        let launch_err = |e| dev("launch", e);
        let n_sel = self.step.pages_kept() as i32;
        let (start0, len0, start1) = match self.step.fixed_ranges() {
            Some(r) => (
                r[0].start as i32,
                r[0].len() as i32,
                r.get(1).map_or(0, |x| x.start) as i32,
            ),
            None => (0, 0, 0),
        };
        if let StepKind::BlockTopk { .. } = self.step.kind {
            let np = self.step.n_pages();
            let meta = layer.meta.as_ref().expect("block-topk has metadata");
            // One wave: as many blocks per head as fit on the device at
            // once, each whole rounds of SC_ROUND pages.
            let per_block = np
                .div_ceil((self.gpu.sms * self.score_resident / kvh).max(1))
                .div_ceil(SC_ROUND)
                .max(1)
                * SC_ROUND;
            let cfg = LaunchConfig {
                grid_dim: (np.div_ceil(per_block) as u32, kvh as u32, 1),
                block_dim: (SC_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let (np32, stride32, pb32) = (np as i32, self.key_stride as i32, per_block as i32);
            let mut a = RawArgs::default();
            a.ptr(&self.q, st)
                .ptr(meta, st)
                .i32(np32)
                .i32(stride32)
                .i32(pb32)
                .ptr(&self.keys, st)
                .ptr(&self.hist, st);
            // SAFETY: matches `quest_score` in decode_attn.cu (which waits
            // for the kernel before it before touching keys and hist); the
            // buffers live as long as `self`, which outlives the graph.
            unsafe { launch_raw(&self.gpu.ctx, st, &self.score, cfg, &mut a, self.chain)? };
            if upto == Upto::Score {
                return Ok(());
            }
            let staged = self.stages_keys();
            let cfg = LaunchConfig {
                grid_dim: if self.cluster {
                    (SEL_CLUSTER as u32, kvh as u32, 1)
                } else {
                    (kvh as u32, 1, 1)
                },
                block_dim: (SEL_THREADS, 1, 1),
                shared_mem_bytes: if staged {
                    staged_bytes(self.key_stride, self.cluster) as u32
                } else {
                    0
                },
            };
            let mut a = RawArgs::default();
            a.ptr(&self.keys, st)
                .ptr(&self.hist, st)
                .i32(np32)
                .i32(stride32)
                .i32(n_sel)
                .i32(staged as i32)
                .ptr(&self.pages, st);
            let f = if self.cluster {
                &self.select_cluster
            } else {
                &self.select
            };
            // SAFETY: matches `topk_select` and `topk_select_cluster` (whose
            // grid is whole clusters: SEL_CLUSTER blocks in x) in
            // decode_attn.cu, which wait for quest_score before reading its
            // results; the buffers live as long as `self`, and `self.gpu`
            // outlives the graph.
            let dependent = self.dependent_launches().0;
            unsafe { launch_raw(&self.gpu.ctx, st, f, cfg, &mut a, dependent)? };
        }
        if upto != Upto::All {
            return Ok(());
        }
        let (_, _, rows) = self.step.kv();
        let rows = rows as i64;
        let Plan {
            total,
            span,
            splits,
            interleave,
        } = self.plan;
        let (total, span, interleave) = (total as i32, span as i32, interleave as i32);
        let scale_log2 = std::f32::consts::LOG2_E / (s.head_dim as f32).sqrt();
        let cfg = LaunchConfig {
            grid_dim: (splits as u32, kvh as u32, 1),
            block_dim: (ATT_THREADS, 1, 1),
            shared_mem_bytes: self.attn_smem,
        };
        let paged = matches!(self.step.kind, StepKind::BlockTopk { .. });
        // Block-topk's attention depends on its top-k; any other step's
        // attention is its first kernel.
        let dependent = if paged {
            self.dependent_launches().1
        } else {
            self.chain
        };
        if dependent {
            let mut a = RawArgs::default();
            a.ptr(&self.q, st)
                .ptr(&layer.k, st)
                .ptr(&layer.v, st)
                .ptr(layer.bias.as_ref().unwrap_or(&self.no_bias), st)
                .ptr(&self.pages, st)
                .i32(n_sel)
                .i64(rows)
                .i32(start0)
                .i32(len0)
                .i32(start1)
                .i32(total)
                .i32(span)
                .i32(interleave)
                .f32(scale_log2)
                .ptr(&self.part_o, st)
                .ptr(&self.part_ml, st)
                .ptr(&self.counters, st)
                .ptr(&self.out, st);
            // SAFETY: matches `attn_*` (ATTN_ARGS) in decode_attn.cu,
            // which wait for the kernel before them before reading
            // anything; `splits` is at most MAX_SPLITS, the partial
            // buffers' capacity.
            return unsafe { launch_raw(&self.gpu.ctx, st, &self.attn, cfg, &mut a, true) };
        }
        let mut b = st.launch_builder(&self.attn);
        b.arg(&self.q)
            .arg(&layer.k)
            .arg(&layer.v)
            .arg(layer.bias.as_ref().unwrap_or(&self.no_bias))
            .arg(&self.pages)
            .arg(&n_sel)
            .arg(&rows)
            .arg(&start0)
            .arg(&len0)
            .arg(&start1)
            .arg(&total)
            .arg(&span)
            .arg(&interleave)
            .arg(&scale_log2)
            .arg(&mut self.part_o)
            .arg(&mut self.part_ml)
            .arg(&mut self.counters)
            .arg(&mut self.out);
        // SAFETY: matches `attn_*` (ATTN_ARGS) in decode_attn.cu; `splits`
        // is at most MAX_SPLITS, the partial buffers' capacity.
        unsafe { b.launch(cfg) }.map_err(launch_err)?;
        Ok(())
    }

    /// Runs one step over the first layer (untimed) and returns its output
    /// and the rows it read.
    pub fn run_once(&mut self) -> Result<StepOutput, WorkloadError> {
        self.launch_step(0, Upto::All)?;
        self.gpu.synchronize()?;
        self.download()
    }

    /// The output and the selection the last step left on the device.
    fn download(&self) -> Result<StepOutput, WorkloadError> {
        let st = &self.gpu.stream;
        let out = st.clone_dtoh(&self.out).map_err(|e| dev("download", e))?;
        let selection = match self.step.fixed_ranges() {
            Some(r) => Selection::Ranges(r),
            None => {
                let k = self.step.pages_kept();
                let p = st.clone_dtoh(&self.pages).map_err(|e| dev("download", e))?;
                Selection::Pages(
                    p.chunks(k)
                        .map(|c| c.iter().map(|&x| x as u32).collect())
                        .collect(),
                )
            }
        };
        Ok(StepOutput { out, selection })
    }

    /// One step checked against the float64 reference: the selection must
    /// be a valid top-k (near ties aside), and the output is compared over
    /// that selection. Returns the relative error and the near-tie swaps.
    pub fn check(&mut self) -> Result<(f64, usize), WorkloadError> {
        let got = self.run_once()?;
        self.check_output(got)
    }

    /// [`Self::check`] of what the last layer's step leaves after `reps`
    /// replays of the timed graph (every layer's cache holds the same
    /// data): catches steps of one graph that overlap wrongly.
    pub fn check_replayed(&mut self, reps: usize) -> Result<(f64, usize), WorkloadError> {
        if self.graph.is_none() {
            self.graph = Some(self.capture(Upto::All)?);
        }
        let graph = self.graph.as_ref().expect("captured above");
        for _ in 0..reps {
            graph.launch().map_err(|e| dev("graph launch", e))?;
        }
        self.gpu.synchronize()?;
        let got = self.download()?;
        self.check_output(got)
    }

    fn check_output(&self, got: StepOutput) -> Result<(f64, usize), WorkloadError> {
        let swaps = self.step.check_selection(&got.selection).map_err(|e| {
            WorkloadError::Other(format!(
                "{} at n = {}: the GPU's page selection is wrong: {e}",
                self.step.kind.name(),
                self.step.shape().n
            ))
        })?;
        let want = self.step.reference_f64(&got.selection);
        Ok((max_rel_err(&got.out, &want), swaps))
    }

    /// A graph of one step (or its first parts) per layer.
    fn capture(&mut self, upto: Upto) -> Result<CudaGraph, WorkloadError> {
        let st = self.gpu.stream.clone();
        st.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| dev("graph capture", e))?;
        let launched = (0..self.steps()).try_for_each(|li| self.launch_step(li, upto));
        // End the capture whatever happened, so the stream is usable again.
        let graph = st.end_capture(CUgraphInstantiate_flags(0));
        launched?;
        let graph = graph
            .map_err(|e| dev("graph instantiation", e))?
            .ok_or_else(|| dev("graph capture", "nothing was captured"))?;
        graph.upload().map_err(|e| dev("graph upload", e))?;
        Ok(graph)
    }

    /// Seconds per step of `reps` replays of `graph`, after 3 warm-up
    /// replays that stay queued ahead of the timed ones (so the device
    /// never idles between replays).
    fn replay_samples(&self, graph: &CudaGraph, reps: usize) -> Result<Vec<f64>, WorkloadError> {
        let gpu = self.gpu;
        let replay = || graph.launch().map_err(|e| dev("graph launch", e));
        let events: Vec<_> = (0..reps.max(1))
            .map(|_| Ok((gpu.event()?, gpu.event()?)))
            .collect::<Result<_, WorkloadError>>()?;
        for _ in 0..3 {
            replay()?;
        }
        for (start, end) in &events {
            start.record(&gpu.stream).map_err(|e| dev("event", e))?;
            replay()?;
            end.record(&gpu.stream).map_err(|e| dev("event", e))?;
        }
        gpu.synchronize()?;
        let layers = self.steps() as f64;
        events
            .iter()
            .map(|(a, b)| {
                a.elapsed_ms(b)
                    .map(|ms| ms as f64 / 1e3 / layers)
                    .map_err(|e| dev("event", e))
            })
            .collect()
    }

    /// Checks one step, then times `reps` replays of the graph of
    /// [`Self::layers`] steps after warm-up (see the module docs).
    pub fn time(&mut self, reps: usize) -> Result<Timing, WorkloadError> {
        let (rel_err, swaps) = self.check()?;
        if self.graph.is_none() {
            self.graph = Some(self.capture(Upto::All)?);
        }
        let copy_bw = self.gpu.copy_bandwidth()?;
        let graph = self.graph.as_ref().expect("captured above");
        let samples_s = self.replay_samples(graph, reps)?;
        let median_s = median(&samples_s);
        let bytes = self.step.bytes().total();
        Ok(Timing {
            median_s,
            floor_s: bytes as f64 / copy_bw,
            bytes,
            copy_bw,
            rel_err_vs_cpu_ref: rel_err,
            near_tie_swaps: swaps,
            layers: self.steps(),
            splits: self.plan.splits,
            samples_s,
        })
    }

    /// Median seconds per step of the first parts of a step (block-topk's
    /// scoring, or scoring and selection), timed as [`Self::time`] times a
    /// whole step; for seeing where a step's time goes.
    pub fn time_part(&mut self, upto: Upto, reps: usize) -> Result<f64, WorkloadError> {
        let graph = self.capture(upto)?;
        let t = median(&self.replay_samples(&graph, reps)?);
        if upto == Upto::Score {
            // Only topk_select clears the histogram that the scoring adds
            // to: without it, the next step would select from the sum of
            // every replay's histograms.
            self.gpu.synchronize()?;
            self.gpu
                .stream
                .memset_zeros(&mut self.hist)
                .map_err(|e| dev("clearing the histogram", e))?;
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    //! The kernels against the float64 reference of `kernel.rs`. These run
    //! only where a driver is present (the GPU machine: see shared GPU.md);
    //! elsewhere they print why and pass. The timing tables are `#[ignore]`d
    //! (run them with `--ignored` on the GPU machine).
    use super::*;
    use crate::longctx::kernel::{DenseCache, TOLERANCE};

    fn gpu() -> Option<DecodeGpu> {
        if !crate::device::driver_present() {
            eprintln!("no CUDA driver here: longctx CUDA kernel tests skipped");
            return None;
        }
        Some(DecodeGpu::new(0).expect("a driver is present, so the kernels must compile"))
    }

    /// One checked block-topk step at 10% of pages, with the top-k's
    /// options: (relative error, near-tie swaps).
    fn check_topk(
        gpu: &DecodeGpu,
        cache: &Arc<DenseCache>,
        seed: u64,
        staged: bool,
        pdl: bool,
        cluster: bool,
    ) -> (f64, usize) {
        let step = Step::new(cache.clone(), StepKind::block_topk(0.1), seed).unwrap();
        DecodeBench::from_step(gpu, step)
            .unwrap()
            .with_topk_options(staged, pdl)
            .with_topk_cluster(cluster)
            .check()
            .unwrap()
    }

    fn kinds() -> Vec<StepKind> {
        vec![
            StepKind::Dense,
            StepKind::block_topk(0.1),
            StepKind::block_topk(0.02),
            StepKind::Cluster { frac: 0.1 },
            StepKind::Cluster { frac: 0.37 },
            StepKind::window(0.1),
            StepKind::window(0.3),
        ]
    }

    /// Every kind at three contexts (one not a whole number of 64-row
    /// tiles), and dense at extreme split counts, against float64.
    #[test]
    fn every_kind_matches_the_float64_reference() {
        let Some(gpu) = gpu() else { return };
        for n in [4096, 20_016, 65_536] {
            let cache = Arc::new(DenseCache::generate(Shape::llama3_8b(n), 17).unwrap());
            for kind in kinds() {
                let step = Step::new(cache.clone(), kind, 17).unwrap();
                let mut bench = DecodeBench::from_step(&gpu, step).unwrap();
                if kind == StepKind::Dense {
                    // The rule of `with_ring_rule`: at 4k 8 tiles a split at
                    // 16 splits, the ring of 8; above, the ring of 4 with a
                    // block per resident slot (two per SM); both chained.
                    // Above 4k the splits hold more than 8 tiles, so they
                    // start early.
                    let ring = if n == 4096 { 8 } else { 4 };
                    assert_eq!(
                        (bench.ring(), bench.chained(), bench.early_start()),
                        (ring, true, n > 4096)
                    );
                    if n > 4096 {
                        assert_eq!(bench.splits(), gpu.sms * 2 / 8);
                    }
                }
                let (e, swaps) = bench.check().unwrap();
                eprintln!(
                    "{} {:.2} n={n} splits={} ring={} chained={} early={}: rel err {e:.2e}, {swaps} near-tie swaps",
                    kind.name(),
                    kind.frac(),
                    bench.splits(),
                    bench.ring(),
                    bench.chained(),
                    bench.early_start()
                );
                assert!(e <= TOLERANCE, "{} n={n}: {e:.3e}", kind.name());
                if matches!(kind, StepKind::BlockTopk { .. } | StepKind::Cluster { .. }) {
                    // Loads into registers (the choice until 2026-11-29,
                    // kept for timing it).
                    let step = Step::new(cache.clone(), kind, 17).unwrap();
                    let (e, _) = DecodeBench::from_step(&gpu, step)
                        .unwrap()
                        .with_variant(Variant::Registers)
                        .unwrap()
                        .check()
                        .unwrap();
                    eprintln!("  loaded into registers: rel err {e:.2e}");
                    assert!(e <= TOLERANCE, "registers n={n}: {e:.3e}");
                }
            }
        }
        let cache = Arc::new(DenseCache::generate(Shape::llama3_8b(4112), 3).unwrap());
        for kind in [
            StepKind::Dense,
            StepKind::block_topk(0.3),
            StepKind::window(0.2),
            // About 1,520 rows per KV head: contiguous spans put a tile's first
            // bias anywhere in a 16-byte word.
            StepKind::Cluster { frac: 0.37 },
        ] {
            for splits in [1, 7, MAX_SPLITS] {
                for interleave in [true, false] {
                    // Block-topk's 1,234 rows load into registers by
                    // default; the ring of 4 takes them by bulk copies
                    // (contiguous spans start mid-page). The other kinds
                    // use the ring of 4 either way, unless the rule picks 8.
                    for ring in [None, Some(TMA_STAGES)] {
                        let step = Step::new(cache.clone(), kind, 3).unwrap();
                        let mut bench = DecodeBench::from_step(&gpu, step).unwrap();
                        if let Some(r) = ring {
                            bench = bench.with_ring(r).unwrap();
                        }
                        let mut bench = bench
                            .with_splits(splits)
                            .unwrap()
                            .with_interleave(interleave)
                            .unwrap();
                        let (e, _) = bench.check().unwrap();
                        eprintln!(
                            "{} n=4112 splits={} interleave={interleave} ring={}: rel err {e:.2e}",
                            kind.name(),
                            bench.splits(),
                            bench.ring()
                        );
                        assert!(e <= TOLERANCE, "{kind:?} splits {splits}: {e:.3e}");
                    }
                }
            }
        }
        // Block-topk with the keys read from global memory in every pass,
        // with ordinary launches, and with the top-k on one block and on a
        // cluster, at a context whose pages are not a whole number of the
        // cluster's 16-byte words (20,016 rows: 1,251 pages).
        for n in [65_536, 20_016] {
            let cache = Arc::new(DenseCache::generate(Shape::llama3_8b(n), 5).unwrap());
            for (staged, pdl) in [(true, true), (false, true), (false, false), (true, false)] {
                for cluster in [false, true] {
                    let (e, swaps) = check_topk(&gpu, &cache, 5, staged, pdl, cluster);
                    eprintln!(
                        "block-topk n={n} staged={staged} pdl={pdl} cluster={cluster}: rel err {e:.2e}, {swaps} near-tie swaps"
                    );
                    assert!(
                        e <= TOLERANCE,
                        "n={n} staged={staged} pdl={pdl} cluster={cluster}: {e:.3e}"
                    );
                }
            }
        }
        let cache = Arc::new(DenseCache::generate(Shape::llama3_8b(4112), 3).unwrap());
        // Replays of a captured graph give the checked result too.
        let step = Step::new(cache.clone(), StepKind::block_topk(0.1), 3).unwrap();
        let mut bench = DecodeBench::from_step(&gpu, step).unwrap();
        let t = bench.time(3).unwrap();
        assert!(t.rel_err_vs_cpu_ref <= TOLERANCE && t.median_s > 0.0);
        let (e, _) = bench.check().unwrap();
        assert!(e <= TOLERANCE, "after replays: {e:.3e}");
        // The last layer of a chained graph (steps overlapping their
        // predecessors' tails), chained and not, for every kind.
        for n in [4096, 65_536] {
            let cache = Arc::new(DenseCache::generate(Shape::llama3_8b(n), 9).unwrap());
            for kind in kinds() {
                for chain in [true, false] {
                    let step = Step::new(cache.clone(), kind, 9).unwrap();
                    let mut bench = DecodeBench::from_step(&gpu, step)
                        .unwrap()
                        .with_chain(chain);
                    let (e, _) = bench.check_replayed(4).unwrap();
                    eprintln!(
                        "{} {:.2} n={n} chain={chain}, {} layers replayed: rel err {e:.2e}",
                        kind.name(),
                        kind.frac(),
                        bench.layers()
                    );
                    assert!(
                        e <= TOLERANCE,
                        "{} n={n} chain={chain}: {e:.3e}",
                        kind.name()
                    );
                }
            }
            // Range steps that prefetch their rows before waiting, chained,
            // and both bulk-copy rings.
            for kind in [StepKind::Dense, StepKind::window(0.3)] {
                let step = Step::new(cache.clone(), kind, 9).unwrap();
                let mut bench = DecodeBench::from_step(&gpu, step)
                    .unwrap()
                    .with_chain(true)
                    .with_variant(Variant::Prefetch)
                    .unwrap();
                let (e, _) = bench.check_replayed(4).unwrap();
                eprintln!(
                    "{} n={n} chained, prefetching: rel err {e:.2e}",
                    kind.name()
                );
                assert!(e <= TOLERANCE, "{} n={n} prefetch: {e:.3e}", kind.name());
                // Both rings of the bulk-copy kernel, unchained.
                for stages in [TMA_STAGES, 2 * TMA_STAGES] {
                    let step = Step::new(cache.clone(), kind, 9).unwrap();
                    let Ok(bench) = DecodeBench::from_step(&gpu, step)
                        .unwrap()
                        .with_ring(stages)
                    else {
                        continue; // not a bulk-copy step
                    };
                    let mut bench = bench.with_chain(false);
                    let (e, _) = bench.check_replayed(4).unwrap();
                    eprintln!("{} n={n} ring of {stages}: rel err {e:.2e}", kind.name());
                    assert!(
                        e <= TOLERANCE,
                        "{} n={n} ring {stages}: {e:.3e}",
                        kind.name()
                    );
                }
            }
        }
    }

    /// A kernel that leaves out the last split fails the same check.
    #[test]
    fn a_kernel_that_drops_the_last_split_fails_the_check() {
        let Some(gpu) = gpu() else { return };
        for (n, kind) in [(4096, StepKind::Dense), (65_536, StepKind::window(0.1))] {
            let step = Step::generate(Shape::llama3_8b(n), kind, 29).unwrap();
            // Contiguous spans: the last split is then the newest rows.
            let mut bench = DecodeBench::from_step(&gpu, step)
                .unwrap()
                .with_interleave(false)
                .unwrap()
                .with_variant(Variant::DropLastSplit)
                .unwrap();
            let (e, _) = bench.check().unwrap();
            eprintln!("broken {} n={n}: rel err {e:.2e}", kind.name());
            assert!(e > 10.0 * TOLERANCE, "the broken kernel passed: {e:.3e}");
        }
    }

    /// Timing block-topk's scoring alone leaves no histogram behind: the
    /// next whole step still selects the right pages.
    #[test]
    fn timing_the_scores_alone_leaves_the_next_step_right() {
        let Some(gpu) = gpu() else { return };
        let step = Step::generate(Shape::llama3_8b(8192), StepKind::block_topk(0.1), 3).unwrap();
        let mut bench = DecodeBench::from_step(&gpu, step).unwrap();
        bench.time_part(Upto::Score, 5).unwrap();
        let (err, _) = bench.check().unwrap();
        assert!(err <= TOLERANCE, "{err}");
    }

    #[test]
    fn copy_bandwidth_is_plausible() {
        let Some(gpu) = gpu() else { return };
        let bw = gpu.copy_bandwidth().unwrap();
        eprintln!(
            "device-to-device copy: {:.2} TB/s on {}",
            bw / 1e12,
            gpu.name
        );
        assert!(bw > 1e11 && bw < 2e13, "{bw}");
    }

    /// The table of the issue: every kind at 4k to 512k (override with
    /// LONGCTX_CONTEXTS=4096,65536), ms per step and ratio to the floor.
    #[test]
    #[ignore = "timing table for the GPU machine: run with --ignored"]
    fn decode_step_timings() {
        let Some(gpu) = gpu() else { return };
        let contexts: Vec<usize> = std::env::var("LONGCTX_CONTEXTS")
            .ok()
            .map(|s| s.split(',').map(|x| x.trim().parse().unwrap()).collect())
            .unwrap_or(vec![4096, 16_384, 65_536, 131_072, 524_288]);
        let bw = gpu.copy_bandwidth().unwrap();
        println!(
            "{}: copy {:.3} TB/s, compile {:.3} s",
            gpu.name,
            bw / 1e12,
            gpu.compile_s
        );
        println!("kind        frac  context   ms/step   floor_ms  ratio  layers splits  rel_err");
        for n in contexts {
            let cache = Arc::new(DenseCache::generate(Shape::llama3_8b(n), 1).unwrap());
            let mut dense_ms = f64::NAN;
            for kind in [
                StepKind::Dense,
                StepKind::block_topk(0.1),
                StepKind::Cluster { frac: 0.1 },
                StepKind::window(0.1),
            ] {
                let step = Step::new(cache.clone(), kind, 1).unwrap();
                let mut bench = DecodeBench::from_step(&gpu, step).unwrap();
                let t = bench.time(30).unwrap();
                let ms = t.median_s * 1e3;
                if kind == StepKind::Dense {
                    dense_ms = ms;
                }
                println!(
                    "{:<11} {:.2} {:>8} {:>9.4} {:>10.4} {:>6.3} {:>6} {:>6} {:>8.1e}  ({:.1}x faster than dense)",
                    kind.name(),
                    kind.frac(),
                    n,
                    ms,
                    t.floor_s * 1e3,
                    t.ratio_to_floor(),
                    t.layers,
                    t.splits,
                    t.rel_err_vs_cpu_ref,
                    dense_ms / ms
                );
                assert!(t.rel_err_vs_cpu_ref <= TOLERANCE, "{:?}", t);
                // One bench's copies at a time (32 of the cache at 512k).
                if kind == StepKind::Dense {
                    // The other chaining than the step's own (`with_ring_rule`).
                    let chain = !bench.chained();
                    drop(bench);
                    let mut other =
                        DecodeBench::from_step(&gpu, Step::new(cache.clone(), kind, 1).unwrap())
                            .unwrap()
                            .with_chain(chain);
                    let u = other.time(30).unwrap();
                    println!(
                        "    dense {} {:.4} ms ({:.3}x floor)",
                        if chain { "chained" } else { "unchained" },
                        u.median_s * 1e3,
                        u.ratio_to_floor()
                    );
                    drop(other);
                    let mut pf =
                        DecodeBench::from_step(&gpu, Step::new(cache.clone(), kind, 1).unwrap())
                            .unwrap()
                            .with_chain(true)
                            .with_variant(Variant::Prefetch)
                            .unwrap();
                    let u = pf.time(30).unwrap();
                    println!(
                        "    dense chained, rows prefetched into L2 before the wait {:.4} ms ({:.3}x floor)",
                        u.median_s * 1e3,
                        u.ratio_to_floor()
                    );
                    assert!(u.rel_err_vs_cpu_ref <= TOLERANCE, "{u:?}");
                } else if let StepKind::BlockTopk { .. } = kind {
                    let score = bench.time_part(Upto::Score, 30).unwrap();
                    let select = bench.time_part(Upto::Select, 30).unwrap();
                    println!(
                        "    block-topk parts: scores {:.4} ms, + top-k {:.4} ms, + attention {:.4} ms",
                        score * 1e3,
                        (select - score) * 1e3,
                        t.median_s * 1e3 - select * 1e3
                    );
                    drop(bench);
                    let regs =
                        DecodeBench::from_step(&gpu, Step::new(cache.clone(), kind, 1).unwrap())
                            .unwrap()
                            .with_variant(Variant::Registers)
                            .unwrap()
                            .time(30)
                            .unwrap();
                    assert!(regs.rel_err_vs_cpu_ref <= TOLERANCE, "{regs:?}");
                    println!(
                        "    block-topk with its pages loaded into registers {:.4} ms ({} splits)",
                        regs.median_s * 1e3,
                        regs.splits
                    );
                    let time_with = |staged: bool| {
                        DecodeBench::from_step(&gpu, Step::new(cache.clone(), kind, 1).unwrap())
                            .unwrap()
                            .with_topk_options(staged, false)
                            .time_part(Upto::All, 30)
                            .unwrap()
                    };
                    let no_pdl = time_with(true);
                    let neither = time_with(false);
                    println!(
                        "    block-topk without dependent launches {:.4} ms, and keys not staged {:.4} ms",
                        no_pdl * 1e3,
                        neither * 1e3
                    );
                    for cluster in [false, true] {
                        let mut b = DecodeBench::from_step(
                            &gpu,
                            Step::new(cache.clone(), kind, 1).unwrap(),
                        )
                        .unwrap()
                        .with_topk_cluster(cluster);
                        let all = b.time(30).unwrap();
                        let score = b.time_part(Upto::Score, 30).unwrap();
                        let select = b.time_part(Upto::Select, 30).unwrap();
                        println!(
                            "    top-k on {}: step {:.4} ms, scores {:.4}, + top-k {:.4}, + attention {:.4}",
                            if cluster { "a cluster" } else { "one block" },
                            all.median_s * 1e3,
                            score * 1e3,
                            (select - score) * 1e3,
                            (all.median_s - select) * 1e3
                        );
                        assert!(all.rel_err_vs_cpu_ref <= TOLERANCE, "{all:?}");
                    }
                } else if let StepKind::Cluster { .. } = kind {
                    drop(bench);
                    let fresh = || {
                        DecodeBench::from_step(&gpu, Step::new(cache.clone(), kind, 1).unwrap())
                            .unwrap()
                    };
                    let regs = fresh()
                        .with_variant(Variant::Registers)
                        .unwrap()
                        .time(30)
                        .unwrap();
                    let chained = fresh().with_chain(true).time(30).unwrap();
                    for u in [&regs, &chained] {
                        assert!(u.rel_err_vs_cpu_ref <= TOLERANCE, "{u:?}");
                    }
                    println!(
                        "    kv-cluster loading into registers {:.4} ms ({} splits); chained {:.4} ms",
                        regs.median_s * 1e3,
                        regs.splits,
                        chained.median_s * 1e3
                    );
                }
            }
        }
    }

    /// Exact ties in the page scores: every page repeats the keys of one
    /// of the first `m` pages, so whole groups of pages score the same
    /// bits. The selection must be the float64 reference's exactly (ties
    /// to the lower page index), with 585 tied pages holding the threshold
    /// (m = 7) and with all 4096 pages tied (m = 1).
    #[test]
    fn block_topk_breaks_exact_ties_to_the_lower_page() {
        let Some(gpu) = gpu() else { return };
        let shape = Shape::llama3_8b(65_536);
        let (n, d) = (shape.n, shape.head_dim);
        for m in [7, 1] {
            let mut cache = DenseCache::generate(shape, 9).unwrap();
            for head in cache.k.chunks_mut(n * d) {
                for p in m..n / PAGE {
                    let src = (p % m) * PAGE * d;
                    head.copy_within(src..src + PAGE * d, p * PAGE * d);
                }
            }
            let cache = Arc::new(cache);
            for staged in [true, false] {
                for cluster in [false, true] {
                    let (e, swaps) = check_topk(&gpu, &cache, 9, staged, true, cluster);
                    eprintln!(
                        "ties m={m} staged={staged} cluster={cluster}: rel err {e:.2e}, {swaps} swaps"
                    );
                    assert_eq!(
                        swaps, 0,
                        "m={m} staged={staged} cluster={cluster}: not the lower tied pages"
                    );
                    assert!(
                        e <= TOLERANCE,
                        "m={m} staged={staged} cluster={cluster}: {e:.3e}"
                    );
                }
            }
        }
    }

    /// What any kernel with the dense step's grid pays under the timing
    /// protocol (a graph of one node per layer, each over its own cache):
    /// a node that does nothing, and one that only reads the dense step's
    /// rows with the same grid and loads, beside the dense step and its
    /// floor.
    #[test]
    #[ignore = "timing diagnostics for the GPU machine: run with --ignored"]
    fn dense_floor_diagnostics() {
        let Some(gpu) = gpu() else { return };
        let bw = gpu.copy_bandwidth().unwrap();
        for n in [4096, 16_384, 65_536, 131_072] {
            let cache = Arc::new(DenseCache::generate(Shape::llama3_8b(n), 1).unwrap());
            let step = || Step::new(cache.clone(), StepKind::Dense, 1).unwrap();
            let floor = step().bytes().total() as f64 / bw;
            let dense = DecodeBench::from_step(&gpu, step())
                .unwrap()
                .time(50)
                .unwrap()
                .median_s;
            let diag = |v: Variant| {
                DecodeBench::from_step(&gpu, step())
                    .unwrap()
                    .with_variant(v)
                    .unwrap()
                    .time_part(Upto::All, 50)
                    .unwrap()
            };
            let (read, empty) = (diag(Variant::ReadOnly), diag(Variant::Empty));
            let two = DecodeBench::from_step(&gpu, step())
                .unwrap()
                .with_variant(Variant::Registers)
                .unwrap()
                .time(50)
                .unwrap()
                .median_s;
            println!(
                "floor-diag n={n}: dense loading into registers {:.4} ms ({:.2}x)",
                two * 1e3,
                two / floor
            );
            if n == 4096 {
                // More, shorter splits: fewer tiles in a row per block.
                for splits in [64, 128] {
                    let t = DecodeBench::from_step(&gpu, step())
                        .unwrap()
                        .with_variant(Variant::ReadOnly)
                        .unwrap()
                        .with_splits(splits)
                        .unwrap()
                        .time_part(Upto::All, 50)
                        .unwrap();
                    println!(
                        "floor-diag n={n}: read-only with {splits} splits {:.4} ms ({:.2}x)",
                        t * 1e3,
                        t / floor
                    );
                }
            }
            // The copy that moves the step's bytes (half read, half
            // written) takes the floor's time at the 1 GiB copy's rate.
            let copy = copy_time(&gpu, step().bytes().total() as usize / 2);
            println!(
                "floor-diag n={n}: floor {:.4} ms; dense {:.4} ms ({:.2}x); read-only {:.4} ms ({:.2}x); empty node {:.4} ms; copy of the step's bytes {:.4} ms ({:.2}x)",
                floor * 1e3,
                dense * 1e3,
                dense / floor,
                read * 1e3,
                read / floor,
                empty * 1e3,
                copy * 1e3,
                copy / floor
            );
        }
    }

    /// Median seconds of one device-to-device copy of `bytes` bytes: 20
    /// rounds (after 2 warm-up rounds) of copies back to back on one
    /// stream between event records, each copy from and to its own
    /// buffers, as many as make 4x the L2 cache in sources (so that no
    /// copy finds its source in L2), the round's time divided by them.
    fn copy_time(gpu: &DecodeGpu, bytes: usize) -> f64 {
        let n = bytes.div_ceil(4);
        let count = (200usize << 20).div_ceil(bytes).max(4);
        let srcs: Vec<CudaSlice<f32>> = (0..count)
            .map(|_| gpu.stream.alloc_zeros(n).unwrap())
            .collect();
        let mut dsts: Vec<CudaSlice<f32>> = (0..count)
            .map(|_| gpu.stream.alloc_zeros(n).unwrap())
            .collect();
        let mut times = Vec::new();
        for round in 0..22 {
            let (start, end) = (gpu.event().unwrap(), gpu.event().unwrap());
            start.record(&gpu.stream).unwrap();
            for (src, dst) in srcs.iter().zip(dsts.iter_mut()) {
                gpu.stream.memcpy_dtod(src, dst).unwrap();
            }
            end.record(&gpu.stream).unwrap();
            let ms = start.elapsed_ms(&end).unwrap();
            if round >= 2 {
                times.push(ms as f64 / 1e3 / count as f64);
            }
        }
        median(&times)
    }

    /// Times `kind` at each context with each split count (and the
    /// default), interleaved and, with `contiguous`, not.
    fn split_sweep(kind: StepKind, contexts: &[usize], splits: &[usize], contiguous: bool) {
        let Some(gpu) = gpu() else { return };
        for &n in contexts {
            let cache = Arc::new(DenseCache::generate(Shape::llama3_8b(n), 1).unwrap());
            let default = DecodeBench::from_step(&gpu, Step::new(cache.clone(), kind, 1).unwrap())
                .unwrap()
                .splits();
            for interleave in [true, false].into_iter().take(1 + contiguous as usize) {
                for &x in splits {
                    let step = Step::new(cache.clone(), kind, 1).unwrap();
                    let mut bench = DecodeBench::from_step(&gpu, step)
                        .unwrap()
                        .with_splits(x)
                        .unwrap()
                        .with_interleave(interleave)
                        .unwrap();
                    let t = bench.time(20).unwrap();
                    println!(
                        "sweep {} {:.2} n={n} interleave={interleave} splits={:>3} (default {default}): {:.4} ms, {:.3}x floor",
                        kind.name(),
                        kind.frac(),
                        t.splits,
                        t.median_s * 1e3,
                        t.ratio_to_floor()
                    );
                }
            }
        }
    }

    /// Split counts for dense steps, interleaved and contiguous (how the
    /// default of `plan_splits` was chosen).
    #[test]
    #[ignore = "tuning sweep for the GPU machine: run with --ignored"]
    fn dense_split_sweep() {
        split_sweep(
            StepKind::Dense,
            &[4096, 16_384, 65_536, 131_072],
            &[16, 24, 32, 40, 48, 64, 66, 96, 128],
            true,
        );
    }

    /// Dense at 4k and 16k, chained with rows prefetched into L2 before
    /// the wait (`Variant::Prefetch`), beside the same step unchained and
    /// chained without prefetching, with bulk copies (rings of 4 and 8
    /// stages, `with_ring`) and with loads into registers, at
    /// several split counts: whether prefetching or a deeper ring moves
    /// the short steps toward their floor, and with which splits.
    #[test]
    #[ignore = "tuning sweep for the GPU machine: run with --ignored"]
    fn prefetch_chain_sweep() {
        let Some(gpu) = gpu() else { return };
        for n in [4096, 16_384] {
            let cache = Arc::new(DenseCache::generate(Shape::llama3_8b(n), 1).unwrap());
            for splits in [16, 32, 64] {
                for (form, ring, variants, chain) in [
                    ("bulk", 4, &[][..], false),
                    ("bulk chained", 4, &[][..], true),
                    ("bulk chained prefetch", 4, &[Variant::Prefetch][..], true),
                    (
                        "registers chained prefetch",
                        4,
                        &[Variant::Registers, Variant::Prefetch][..],
                        true,
                    ),
                    ("bulk 8 stages", 8, &[][..], false),
                    ("bulk 8 stages chained", 8, &[][..], true),
                ] {
                    let step = Step::new(cache.clone(), StepKind::Dense, 1).unwrap();
                    let mut bench = DecodeBench::from_step(&gpu, step)
                        .unwrap()
                        .with_ring(ring)
                        .unwrap();
                    for &v in variants {
                        bench = bench.with_variant(v).unwrap();
                    }
                    let mut bench = bench.with_splits(splits).unwrap().with_chain(chain);
                    let t = bench.time(20).unwrap();
                    assert!(t.rel_err_vs_cpu_ref <= TOLERANCE, "{t:?}");
                    println!(
                        "prefetch-sweep n={n} splits={:>3} {form:<27}: {:.4} ms, {:.3}x floor",
                        t.splits,
                        t.median_s * 1e3,
                        t.ratio_to_floor()
                    );
                }
            }
        }
    }

    /// Long range steps with loads into registers (the choice above 16k
    /// rows per KV head until 2026-11-29) and with bulk copies: rings of
    /// 4 and 8 stages at several split counts, chained and not; whether
    /// the H200's bandwidth wants more bytes in flight per SM than two
    /// register tiles per warp give (it did: `with_ring_rule`).
    #[test]
    #[ignore = "tuning sweep for the GPU machine: run with --ignored"]
    fn long_ring_sweep() {
        let Some(gpu) = gpu() else { return };
        let cases = [
            (65_536, StepKind::Dense),
            (131_072, StepKind::Dense),
            (131_072, StepKind::window(0.25)),
            (524_288, StepKind::Dense),
            (524_288, StepKind::window(0.1)),
        ];
        let forms: [(&str, Option<usize>, Option<usize>, bool); 9] = [
            ("registers", None, None, false),
            ("bulk 4", Some(4), None, false),
            ("bulk 4", Some(4), Some(33), false),
            ("bulk 4 chained", Some(4), Some(33), true),
            ("bulk 4", Some(4), Some(66), false),
            ("bulk 8", Some(8), Some(16), false),
            ("bulk 8", Some(8), Some(17), false),
            ("bulk 8 chained", Some(8), Some(17), true),
            ("bulk 8", Some(8), Some(33), false),
        ];
        let mut last = 0;
        let mut cache = None;
        for (n, kind) in cases {
            if n != last {
                drop(cache.take()); // free the host copy before the next one
                cache = Some(Arc::new(
                    DenseCache::generate(Shape::llama3_8b(n), 1).unwrap(),
                ));
                last = n;
            }
            let cache = cache.as_ref().unwrap();
            for (form, ring, splits, chain) in forms {
                let step = Step::new(cache.clone(), kind, 1).unwrap();
                let bench = DecodeBench::from_step(&gpu, step).unwrap();
                let mut bench = match ring {
                    Some(r) => bench.with_ring(r).unwrap(),
                    None => bench.with_variant(Variant::Registers).unwrap(),
                };
                if let Some(x) = splits {
                    bench = bench.with_splits(x).unwrap();
                }
                let mut bench = bench.with_chain(chain);
                let t = bench.time(20).unwrap();
                assert!(t.rel_err_vs_cpu_ref <= TOLERANCE, "{t:?}");
                println!(
                    "long-ring {} {:.2} n={n} {form:<20} ring={} splits={:>3}: {:.4} ms, {:.3}x floor",
                    kind.name(),
                    kind.frac(),
                    bench.ring(),
                    t.splits,
                    t.median_s * 1e3,
                    t.ratio_to_floor()
                );
            }
        }
    }

    /// Dense from 128k up in graphs of 1 to 32 layers, each over its own
    /// copy of the cache, and of 32 steps that all read one copy: whether
    /// a step reads more slowly when every layer has its own cache.
    #[test]
    #[ignore = "timing diagnostics for the GPU machine: run with --ignored"]
    fn dense_layer_diagnostics() {
        let Some(gpu) = gpu() else { return };
        for n in [131_072, 524_288] {
            let cache = Arc::new(DenseCache::generate(Shape::llama3_8b(n), 1).unwrap());
            for (steps, aliased) in [(32, false), (16, false), (4, false), (1, false), (32, true)] {
                let step = Step::new(cache.clone(), StepKind::Dense, 1).unwrap();
                let mut bench = DecodeBench::from_step(&gpu, step)
                    .unwrap()
                    .with_layers(steps, aliased);
                let t = bench.time(20).unwrap();
                println!(
                    "layers dense n={n} steps={steps:>2} one copy={aliased}: {:.4} ms, {:.3}x floor",
                    t.median_s * 1e3,
                    t.ratio_to_floor()
                );
            }
        }
    }

    /// Split counts for the windowed and clustered steps at 64k to 512k
    /// (6k to 131k rows per KV head: how `plan_splits` was chosen for
    /// steps between 4k and 16k rows, and checked above).
    #[test]
    #[ignore = "tuning sweep for the GPU machine: run with --ignored"]
    fn range_split_sweep() {
        for frac in [0.1, 0.25] {
            for kind in [StepKind::window(frac), StepKind::Cluster { frac }] {
                split_sweep(
                    kind,
                    &[65_536, 131_072, 524_288],
                    &[16, 24, 32, 33, 49],
                    false,
                );
            }
        }
    }

    /// Quest's top-k on one block (B) or a cluster (C), each launch
    /// dependent (1) or ordinary (0): top-k then attention.
    #[test]
    #[ignore = "tuning sweep for the GPU machine: run with --ignored"]
    fn block_topk_launch_sweep() {
        let Some(gpu) = gpu() else { return };
        let contexts: Vec<usize> = std::env::var("LONGCTX_CONTEXTS")
            .ok()
            .map(|s| s.split(',').map(|x| x.trim().parse().unwrap()).collect())
            .unwrap_or(vec![16_384, 65_536, 131_072, 262_144, 524_288]);
        println!(
            "block-topk 10%: ms per step by top-k kernel and dependent launches (top-k, attention)"
        );
        for n in contexts {
            let cache = Arc::new(DenseCache::generate(Shape::llama3_8b(n), 1).unwrap());
            let mut line = format!("{n:>7}");
            for cluster in [false, true] {
                for (sel, att) in [(true, true), (false, true), (true, false), (false, false)] {
                    let step = Step::new(cache.clone(), StepKind::block_topk(0.1), 1).unwrap();
                    let t = DecodeBench::from_step(&gpu, step)
                        .unwrap()
                        .with_topk_cluster(cluster)
                        .with_dependent_launches(sel, att)
                        .time(30)
                        .unwrap();
                    assert!(t.rel_err_vs_cpu_ref <= TOLERANCE, "{t:?}");
                    line += &format!(
                        "  {}{}{} {:.4}",
                        if cluster { "C" } else { "B" },
                        sel as u8,
                        att as u8,
                        t.median_s * 1e3
                    );
                }
            }
            println!("{line}");
        }
    }

    /// Split counts for block-topk's attention (how the default of
    /// `plan_splits` for paged steps was chosen).
    #[test]
    #[ignore = "tuning sweep for the GPU machine: run with --ignored"]
    fn block_topk_split_sweep() {
        for frac in [0.1, 0.25, 0.5] {
            split_sweep(
                StepKind::block_topk(frac),
                &[4096, 16_384, 65_536, 131_072, 524_288],
                &[16, 24, 32, 33, 49],
                false,
            );
        }
    }
}
