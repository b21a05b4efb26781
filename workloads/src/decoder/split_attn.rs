//! Split-K attention of one query row for the GPU decoder (feature
//! `gpu-decoder`): the kernels of `split_attn.cu`, compiled at run time with
//! NVRTC and launched on candle's stream as a candle custom op.
//!
//! Why. Through cuBLAS, a decode step's attention is two matmuls whose
//! shapes use few of the GPU's SMs: the `group` query rows of a KV head
//! against every key, and a reduction over every row for the values. On an
//! H200 a Qwen2.5-Coder-0.5B step took about 5 ms more at an 8k context
//! than at 1k (97-102 against 147-220 tokens/s), while the cache it reads at
//! 8k is 4 MB a layer, about a microsecond of bandwidth
//! (`results/runs/2026-11-28-h200-long-context-gpu-evict`). Splitting the
//! rows over blocks (flash-decoding: Dao et al., "Flash-Decoding for
//! long-context inference", 2023) puts the whole GPU on it.
//!
//! What. Block `(s, h)` takes split `s` of KV head `h`'s rows (at most two
//! runs of the cache, read in place: dense, or StreamingLLM's sinks and
//! window, or Quest's pages and the page in flight), scores them
//! for the `group` query heads that share the KV head (a warp per row),
//! takes the split's maximum and exponentials per query head, and sums the
//! values weighted by them; a second launch rescales the splits' partials
//! to their common maximum and normalises. Everything is `f32`, as on the
//! cuBLAS path it replaces. It serves single-row forwards (decode steps)
//! with `group <= 8` query heads per KV head and a head dimension that is
//! a multiple of 32 up to 128; anything else keeps the cuBLAS path.
//!
//! Quest (arXiv 2406.10774, Sec. 3.3) on the GPU decoder: the first run may
//! be a list of pages of the cache, read in place (no gather), and two kernels
//! score pages from their key bounds (`quest_scores`, a warp per page) or
//! score and rank them in one launch (`quest_top_pages`: a block per KV
//! head ranks every page against every other in shared memory, in the
//! order of the CPU's `QuestKv`, higher criticality first and ties to the
//! lower page; up to [`MAX_RANKED_PAGES`]). The decoder uses the second
//! where it fits and the first before candle's sort above it.
//!
//! ChunkLLM's chosen rows (`attend_rows`): pages of one row, each KV head's
//! list padded to the longest and read up to its own count, so the heads
//! read different numbers of rows in one launch.
//!
//! Checked against a float64 reference on random inputs (one and two runs,
//! splits that do not divide the rows, `group` 1 to 8, pages in no order,
//! rows per KV head with counts 700 and 0, the page scores) and the
//! selection against the CPU's order with exact ties, by
//! `split_attention_matches_float64` in
//! `workloads/tests/decoder.rs`; and through the decoder by that file's
//! `gpu::` tests against the CPU decoder and its caches. Both need a GPU
//! and the `gpu-decoder` feature; measured in
//! `results/runs/2026-11-28-h200-long-context-gpu-split-attn` and
//! `results/runs/2026-11-28-h200-long-context-gpu-quest-pages`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};

const SRC: &str = include_str!("split_attn.cu");

/// Threads per block of the partial kernel (8 warps).
const THREADS: u32 = 256;

/// Rows per split at least; more when the rows would need more than
/// [`MAX_SPLITS`] splits.
const MIN_ROWS_PER_SPLIT: usize = 64;
const MAX_SPLITS: usize = 256;

/// Dynamic shared memory the partial kernel may use without opting in.
const SHARED_LIMIT: usize = 48 * 1024;

/// The kernels, compiled and loaded once per model (set-up).
pub struct SplitAttn {
    partial: CudaFunction,
    combine: CudaFunction,
    scores: CudaFunction,
    top_pages: CudaFunction,
}

impl std::fmt::Debug for SplitAttn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SplitAttn")
    }
}

/// Rows per split and splits for `rows` rows.
fn plan(rows: usize) -> (usize, usize) {
    let per = rows
        .div_ceil(MAX_SPLITS)
        .max(MIN_ROWS_PER_SPLIT)
        .next_multiple_of(32);
    (per, rows.div_ceil(per))
}

impl SplitAttn {
    /// Compiles the kernels (NVRTC) and loads them on `device`.
    pub fn new(device: &CudaDevice) -> candle_core::Result<SplitAttn> {
        let ptx = nvrtc::compile_ptx(SRC)
            .map_err(|e| candle_core::Error::Msg(format!("split_attn.cu: {e}")))?
            .to_src();
        let load = |name| {
            device
                .get_or_load_custom_func(name, "bench_split_attn", &ptx)
                .map(|f| f.into_cuda_function())
        };
        Ok(SplitAttn {
            partial: load("split_attn_partial")?,
            combine: load("split_attn_combine")?,
            scores: load("quest_scores")?,
            top_pages: load("quest_top_pages")?,
        })
    }

    /// Whether [`SplitAttn::attend`] serves this shape.
    pub fn handles(group: usize, head_dim: usize, rows: usize) -> bool {
        let (per, _) = plan(rows);
        (1..=8).contains(&group)
            && head_dim.is_multiple_of(32)
            && (32..=128).contains(&head_dim)
            && (group * (head_dim + per)) * 4 <= SHARED_LIMIT
    }

    /// Attention of `q`, `[1, kv_heads, group, head_dim]` (scaled), over
    /// the rows of `runs` in order: one or two `(k, v)` pairs, each
    /// `[1, kv_heads, n, head_dim]` with rows of `head_dim` consecutive
    /// values (narrowed views of the cache qualify). Returns
    /// `[1, kv_heads * group * head_dim]`, query heads in order.
    pub fn attend(&self, q: &Tensor, runs: &[(Tensor, Tensor)]) -> candle_core::Result<Tensor> {
        let op = Op {
            attn: self,
            runs,
            pages: None,
            counts: None,
        };
        q.contiguous()?.apply_op1_no_bwd(&op)
    }

    /// As [`SplitAttn::attend`], but the first rows read are pages of a
    /// cache: `cache` is the whole `(k, v)` of a layer, `[1, kv_heads,
    /// capacity, head_dim]`, `pages` the page numbers read per KV head,
    /// `[1, kv_heads, n]` (`u32`, every page within the capacity), each of
    /// `page` rows; `tail` the run read after them (Quest's page in
    /// flight).
    pub fn attend_pages(
        &self,
        q: &Tensor,
        cache: &(Tensor, Tensor),
        (pages, page): (&Tensor, usize),
        tail: &(Tensor, Tensor),
    ) -> candle_core::Result<Tensor> {
        self.attend_listed(q, cache, (pages, page), None, tail)
    }

    /// As [`SplitAttn::attend_pages`] with pages of one row, where the KV
    /// heads read different numbers of rows: `rows` is `[1, kv_heads, n]`
    /// (`u32`), each KV head's list padded to the longest, and KV head `h`
    /// reads the first `counts[h]` of its list (`[kv_heads]`, `u32`, each
    /// at most `n`), then `tail`. ChunkLLM's chosen chunks per KV head.
    pub fn attend_rows(
        &self,
        q: &Tensor,
        cache: &(Tensor, Tensor),
        (rows, counts): (&Tensor, &Tensor),
        tail: &(Tensor, Tensor),
    ) -> candle_core::Result<Tensor> {
        self.attend_listed(q, cache, (rows, 1), Some(counts), tail)
    }

    /// The listed pages of `cache` (each KV head its first `counts[h]`
    /// entries where given), then `tail`: [`SplitAttn::attend_pages`] and
    /// [`SplitAttn::attend_rows`].
    fn attend_listed(
        &self,
        q: &Tensor,
        cache: &(Tensor, Tensor),
        (pages, page): (&Tensor, usize),
        counts: Option<&Tensor>,
        tail: &(Tensor, Tensor),
    ) -> candle_core::Result<Tensor> {
        let runs = [cache.clone(), tail.clone()];
        let pages = pages.contiguous()?;
        let counts = counts.map(Tensor::contiguous).transpose()?;
        let op = Op {
            attn: self,
            runs: &runs,
            pages: Some((&pages, page)),
            counts: counts.as_ref(),
        };
        q.contiguous()?.apply_op1_no_bwd(&op)
    }

    /// Quest's criticality of each of `lo`'s pages, summed over the query
    /// heads of each KV head: `q` is `[1, kv_heads, group, head_dim]`,
    /// `lo` and `hi` the pages' channel-wise key minima and maxima,
    /// `[1, kv_heads, pages, head_dim]`. Returns `[1, kv_heads, pages]`.
    pub fn quest_scores(
        &self,
        q: &Tensor,
        lo: &Tensor,
        hi: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let op = Scores {
            attn: self,
            lo,
            hi,
            want: None,
        };
        q.contiguous()?.apply_op1_no_bwd(&op)
    }

    /// Whether [`SplitAttn::quest_top_pages`] serves `pages` pages: its
    /// block ranks every page against every other in shared memory.
    pub fn ranks(pages: usize) -> bool {
        pages <= MAX_RANKED_PAGES
    }

    /// Quest's selection in one launch: the `want` most critical of the
    /// pages per KV head (scored as [`SplitAttn::quest_scores`] scores
    /// them), most critical first, ties to the lower page as `QuestKv`
    /// breaks them; `[1, kv_heads, want]` (`u32`). At most
    /// [`MAX_RANKED_PAGES`] pages, `want` at most the pages.
    pub fn quest_top_pages(
        &self,
        q: &Tensor,
        lo: &Tensor,
        hi: &Tensor,
        want: usize,
    ) -> candle_core::Result<Tensor> {
        let op = Scores {
            attn: self,
            lo,
            hi,
            want: Some(want),
        };
        q.contiguous()?.apply_op1_no_bwd(&op)
    }
}

struct Op<'a> {
    attn: &'a SplitAttn,
    runs: &'a [(Tensor, Tensor)],
    /// The first run's rows as pages: `[1, kv_heads, n]` page numbers and
    /// the page size.
    pages: Option<(&'a Tensor, usize)>,
    /// With `pages`: how many of its list each KV head reads, `[kv_heads]`
    /// (`None`: all).
    counts: Option<&'a Tensor>,
}

/// Quest's page scores, or with `want` the top pages' numbers.
struct Scores<'a> {
    attn: &'a SplitAttn,
    lo: &'a Tensor,
    hi: &'a Tensor,
    want: Option<usize>,
}

/// Pages the one-launch selection ranks at most (`P^2` comparisons per
/// KV head, `P` floats of shared memory): 64k positions of 16-row pages.
pub const MAX_RANKED_PAGES: usize = 4096;

fn launch_err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// `q`'s `(kv_heads, group, head_dim)`, checked to be contiguous `f32`.
fn query_shape(
    q: &CudaStorage,
    ql: &Layout,
    what: &str,
) -> candle_core::Result<(usize, usize, usize)> {
    let (_, kv_heads, group, head_dim) = ql.shape().dims4()?;
    if !ql.is_contiguous() || q.dtype() != DType::F32 {
        candle_core::bail!("{what}: q must be contiguous f32");
    }
    Ok((kv_heads, group, head_dim))
}

impl CustomOp1 for Scores<'_> {
    fn name(&self) -> &'static str {
        "quest-scores"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("Quest's page scores here run on CUDA only")
    }

    fn cuda_fwd(&self, q: &CudaStorage, ql: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (kv_heads, group, head_dim) = query_shape(q, ql, "Quest scores")?;
        let dev = q.device().clone();
        let (lo, ll) = self.lo.storage_and_layout();
        let (hi, hl) = self.hi.storage_and_layout();
        let (Storage::Cuda(lo), Storage::Cuda(hi)) = (&*lo, &*hi) else {
            candle_core::bail!("Quest scores: bounds not on the GPU");
        };
        let (lat, lhs, pages) = run_layout(ll, kv_heads, head_dim)?;
        let (hat, hhs, hpages) = run_layout(hl, kv_heads, head_dim)?;
        if (lhs, pages) != (hhs, hpages) {
            candle_core::bail!("Quest scores: minima and maxima laid out differently");
        }
        let (lo, hi) = (
            lo.as_cuda_slice::<f32>()?.slice(lat..),
            hi.as_cuda_slice::<f32>()?.slice(hat..),
        );
        let q = q.as_cuda_slice::<f32>()?.slice(ql.start_offset()..);
        let (hs, p, g, d) = (lhs as i64, pages as i32, group as i32, head_dim as i32);
        let stream = dev.cuda_stream();
        if let Some(want) = self.want {
            if want == 0 || want > pages || pages > MAX_RANKED_PAGES {
                candle_core::bail!("Quest's selection: {want} of {pages} pages");
            }
            // SAFETY: the ranks are a permutation, so the kernel writes
            // every one of the `want` slots per KV head.
            let mut top = unsafe { dev.alloc::<u32>(kv_heads * want) }?;
            let w = want as i32;
            let mut b = stream.launch_builder(&self.attn.top_pages);
            b.arg(&q)
                .arg(&lo)
                .arg(&hi)
                .arg(&hs)
                .arg(&p)
                .arg(&g)
                .arg(&d)
                .arg(&w);
            b.arg(&mut top);
            let cfg = LaunchConfig {
                grid_dim: (kv_heads as u32, 1, 1),
                block_dim: (1024, 1, 1),
                shared_mem_bytes: (pages * 4) as u32,
            };
            // SAFETY: the arguments match the kernel's signature, the views
            // cover every page (`run_layout`), and P floats fit in shared
            // memory (P <= MAX_RANKED_PAGES).
            unsafe { b.launch(cfg) }.map_err(launch_err)?;
            let storage = CudaStorage {
                slice: CudaStorageSlice::U32(top),
                device: dev,
            };
            return Ok((storage, Shape::from((1, kv_heads, want))));
        }
        // SAFETY: every element is written by the kernel.
        let mut crit = unsafe { dev.alloc::<f32>(kv_heads * pages) }?;
        let mut b = stream.launch_builder(&self.attn.scores);
        b.arg(&q).arg(&lo).arg(&hi).arg(&hs).arg(&p).arg(&g).arg(&d);
        b.arg(&mut crit);
        let cfg = LaunchConfig {
            grid_dim: (pages.div_ceil(8) as u32, kv_heads as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        if pages > 0 {
            // SAFETY: the arguments match the kernel's signature, and the
            // views cover every page (checked by `run_layout`).
            unsafe { b.launch(cfg) }.map_err(launch_err)?;
        }
        let storage = CudaStorage {
            slice: CudaStorageSlice::F32(crit),
            device: dev,
        };
        Ok((storage, Shape::from((1, kv_heads, pages))))
    }
}

/// A run's `(first element, head stride, rows)`, checked.
fn run_layout(
    l: &Layout,
    kv_heads: usize,
    head_dim: usize,
) -> candle_core::Result<(usize, usize, usize)> {
    let (dims, stride) = (l.dims(), l.stride());
    if dims.len() != 4 || dims[0] != 1 || dims[1] != kv_heads || dims[3] != head_dim {
        candle_core::bail!("split attention: a run of shape {dims:?}");
    }
    if stride[3] != 1 || (dims[2] > 1 && stride[2] != head_dim) {
        candle_core::bail!("split attention: a run with strides {stride:?}");
    }
    Ok((l.start_offset(), stride[1], dims[2]))
}

impl CustomOp1 for Op<'_> {
    fn name(&self) -> &'static str {
        "split-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("split attention runs on CUDA only")
    }

    fn cuda_fwd(&self, q: &CudaStorage, ql: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (kv_heads, group, head_dim) = query_shape(q, ql, "split attention")?;
        if self.runs.is_empty() || self.runs.len() > 2 {
            candle_core::bail!("split attention: {} runs (1 or 2)", self.runs.len());
        }
        let dev = q.device().clone();
        let guards: Vec<_> = self
            .runs
            .iter()
            .flat_map(|(k, v)| [k.storage_and_layout(), v.storage_and_layout()])
            .collect();
        let mut views = Vec::with_capacity(4);
        let mut shapes = Vec::with_capacity(4);
        for (storage, layout) in &guards {
            let Storage::Cuda(s) = &**storage else {
                candle_core::bail!("split attention: a run not on the GPU");
            };
            let (at, hs, n) = run_layout(layout, kv_heads, head_dim)?;
            views.push(s.as_cuda_slice::<f32>()?.slice(at..));
            shapes.push((hs as i64, n as i32));
        }
        for pair in shapes.chunks(2) {
            if pair[0] != pair[1] {
                candle_core::bail!("split attention: keys and values laid out differently");
            }
        }
        // One run: the second is the first again, with no rows.
        let (i1, n1) = if views.len() == 4 {
            (2, shapes[2].1)
        } else {
            (0, 0)
        };
        let (hs0, mut n0) = shapes[0];
        // Pages: the first run is the whole cache, read through the list.
        let page_list = match self.pages {
            Some((pages, page)) => {
                let (pl, ll) = pages.storage_and_layout();
                let np = ll.dims().get(2).copied().unwrap_or(0);
                if ll.dims() != [1, kv_heads, np] || page == 0 {
                    candle_core::bail!("split attention: a page list of shape {:?}", ll.dims());
                }
                n0 = (np * page) as i32;
                Some((pl, ll.start_offset(), page as i32))
            }
            None => None,
        };
        let list_view = match &page_list {
            Some((pl, at, _)) => match &**pl {
                Storage::Cuda(s) => Some(s.as_cuda_slice::<u32>()?.slice(*at..)),
                _ => candle_core::bail!("split attention: a page list not on the GPU"),
            },
            None => None,
        };
        let page = page_list.as_ref().map_or(0, |p| p.2);
        let count_list = match self.counts {
            Some(c) => {
                let (cs, cl) = c.storage_and_layout();
                if cl.dims() != [kv_heads] || page_list.is_none() {
                    candle_core::bail!("split attention: row counts of shape {:?}", cl.dims());
                }
                Some((cs, cl.start_offset()))
            }
            None => None,
        };
        let count_view = match &count_list {
            Some((cs, at)) => match &**cs {
                Storage::Cuda(s) => Some(s.as_cuda_slice::<u32>()?.slice(*at..)),
                _ => candle_core::bail!("split attention: row counts not on the GPU"),
            },
            None => None,
        };
        let per_head = i32::from(count_view.is_some());
        let hs1 = shapes[i1].0;
        let rows = (n0 + n1) as usize;
        let (per, splits) = plan(rows);
        if !SplitAttn::handles(group, head_dim, rows) {
            candle_core::bail!("split attention: group {group}, head_dim {head_dim}, {rows} rows");
        }
        let q = q.as_cuda_slice::<f32>()?.slice(ql.start_offset()..);
        let cells = kv_heads * splits * group;
        // SAFETY: every element is written by the kernels before it is read.
        let (mut po, mut pm, mut pl, mut out) = unsafe {
            (
                dev.alloc::<f32>(cells * head_dim)?,
                dev.alloc::<f32>(cells)?,
                dev.alloc::<f32>(cells)?,
                dev.alloc::<f32>(kv_heads * group * head_dim)?,
            )
        };
        let (g, d, c, s) = (group as i32, head_dim as i32, per as i32, splits as i32);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&self.attn.partial);
        b.arg(&q);
        b.arg(&views[0]).arg(&views[1]).arg(&hs0).arg(&n0);
        b.arg(&views[i1]).arg(&views[i1 + 1]).arg(&hs1).arg(&n1);
        // Without pages the kernel never reads the list; any pointer does.
        match &list_view {
            Some(l) => b.arg(l),
            None => b.arg(&q),
        };
        b.arg(&page);
        // Without counts the kernel never reads them; any pointer does.
        match &count_view {
            Some(cv) => b.arg(cv),
            None => b.arg(&q),
        };
        b.arg(&per_head);
        b.arg(&g).arg(&d).arg(&c).arg(&s);
        b.arg(&mut po).arg(&mut pm).arg(&mut pl);
        let cfg = LaunchConfig {
            grid_dim: (splits as u32, kv_heads as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: (group * (head_dim + per) * 4) as u32,
        };
        // SAFETY: the arguments match the kernel's signature; the views
        // cover every row the kernel reads (checked by `run_layout`), and
        // the outputs hold `cells` partials.
        unsafe { b.launch(cfg) }.map_err(launch_err)?;
        let mut b = stream.launch_builder(&self.attn.combine);
        b.arg(&po)
            .arg(&pm)
            .arg(&pl)
            .arg(&g)
            .arg(&d)
            .arg(&s)
            .arg(&mut out);
        let cfg = LaunchConfig {
            grid_dim: ((kv_heads * group) as u32, 1, 1),
            block_dim: (head_dim as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above; `out` holds one row per query head.
        unsafe { b.launch(cfg) }.map_err(launch_err)?;
        drop((views, list_view, count_view));
        drop((guards, page_list, count_list));
        let storage = CudaStorage {
            slice: CudaStorageSlice::F32(out),
            device: dev,
        };
        Ok((storage, Shape::from((1, kv_heads * group * head_dim))))
    }
}
