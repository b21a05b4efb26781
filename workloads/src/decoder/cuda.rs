//! The decoder on an NVIDIA GPU, through candle's CUDA backend (cargo
//! feature `gpu-decoder`; build it with `scripts/cuda-toolchain.sh`).
//!
//! Every build compiles this module. Without a GPU, [`CudaModel::on_cpu`]
//! runs the same candle graph on candle's CPU backend: slow, and with other
//! summation orders, but the same RoPE tables, masks, cache writes and
//! gathers, so the tests of `workloads/tests/decoder.rs` check this
//! decoder's logic against [`Decoder`](super::Decoder) in CI, and on a GPU
//! machine its CUDA run as well.
//!
//! [`CudaModel`] copies a loaded [`Model`]'s quantized blocks to the GPU as
//! they are (no re-quantization); [`CudaDecoder`] runs one sequence over a
//! KV cache in GPU memory with the same entry points and meaning as the CPU
//! [`Decoder`](super::Decoder) ([`Engine`]): prefill, verification of a
//! draft tree in one forward (every node attends to the committed sequence
//! and its own ancestors, masked), accept, truncate.
//!
//! The forward per layer: RMS norm, q/k/v by candle's quantized matmuls
//! (llama.cpp's MMVQ kernel for up to 8 rows, MMQ above: activations are
//! quantized to 8 bits per 32 values, as on the CPU), biases, RoPE at each
//! node's own position (from the same `f32` tables as the CPU; the
//! queries' tables carry the attention scale), the new keys and values
//! written into the cache after the committed positions, attention in
//! `f32` reading the cache's used rows in place (the query heads of a
//! group share their KV head without repeating it): for a single row (a
//! decode step) our split-K kernel (`split_attn.rs`), for blocks
//! (prompt chunks, draft trees) cuBLAS matmuls with an additive tree mask
//! where a row may not see every position; then the output
//! projection, and the SwiGLU MLP (gate and up stacked into one matrix
//! where their formats agree). Logits come back to the host per wanted
//! row.
//!
//! **Not batch-invariant.** Unlike the CPU decoder, a row's logits here
//! depend on how many rows share its forward: candle picks MMVQ or MMQ by
//! the row count, and cuBLAS picks its GEMM algorithm by shape, and each
//! sums in its own order. Each difference is rounding-level, but an 8-bit
//! activation that rounds the other way moves every later layer: on
//! Qwen2.5-Coder-1.5B a verification tree's logits differ from single steps
//! by up to 0.36 (of a 30-logit span; the `gpu` tests of
//! `workloads/tests/decoder.rs` bound these differences). Greedy
//! speculative decoding can then leave greedy decoding's path where the
//! target's two best logits are nearly tied; the SpecTr workload counts
//! only other divergences against a configuration (see its README). Making
//! it impossible would take our own row-wise kernels.
//!
//! Supported: what the CPU decoder loads, with RoPE over the whole head
//! (`rope_dim == head_dim`, true of SmolLM2 and Qwen2.5), over a dense
//! cache. Of the long-context workload's policies ([`KvCache`](super::KvCache),
//! run on the CPU decoder), three read rules are here too
//! ([`CudaDecoder::set_read_rule`], each tested against its CPU cache):
//! StreamingLLM's sinks and window, read as runs of the cache in place;
//! Quest's top pages per KV head, scored from per-page key bounds kept as
//! pages fill (on a GPU one kernel scores and ranks them,
//! `quest_top_pages`, and the split-K kernel reads them through their
//! list; elsewhere candle's ops score them, candle sorts them, and they are
//! gathered before cuBLAS's attention); and ChunkLLM's training-free chunk
//! selection, per KV head or by the layers' vote, whose selecting steps
//! bring every layer's attention to the host after the last layer (a
//! layer's choice serves the steps after it) to rank the chunks there with
//! the CPU cache's own functions, and whose other steps read the chosen
//! rows through a row list per KV head (one call of the split-K kernel
//! with pages of one row, the lists padded to one length and each KV head
//! reading its own count). The long-context workload's decoder variants
//! use them for `sink-window`, `block-topk`, `chunk-select` and
//! `chunk-select-vote` with `--device cuda`. Quest's and ChunkLLM's rules
//! keep every row, as the papers do; the sink window evicts in steps,
//! holding at most a window more than the CPU cache.
//!
//! Speed (H100, Qwen2.5-Coder 0.5B and 1.5B; the test `gpu_call_costs` of
//! `workloads/tests/decoder.rs` and the records of
//! `results/runs/2026-11-27-h100-spectr-qwen-gpu-breakdown`): a decode
//! step costs 8.9 ms (0.5B) and 7.3 ms (1.5B) with a 120-token context,
//! far above the 1.5B's weight-bandwidth floor of 0.33 ms, and a draft tree
//! of up to 33 nodes 1.3-2.1 steps. The forward launches about 35 kernels
//! per layer, each allocating its output, with no CUDA graphs; the smaller
//! model is no cheaper, so the weights are not the cost, and the host side
//! of those launches (about 7.5 microseconds each for the 1.5B's step) is
//! the likely one. Removing six launches per layer (the scale, the mask of
//! a single row, the cache copies, a stacked gate/up) lowered the medians
//! by 0-16%, within the host's noise
//! (`results/runs/2026-11-27-h100-gpu-decoder-launches-ab`).
//!
//! Two later changes, measured on H200s (2026-11-28):
//! - cudarc's event tracking is off for this decoder's device: cudarc
//!   created and destroyed two events per allocation, one per op output,
//!   that nothing waited on (candle runs one stream). No effect could be
//!   told from the host's noise (a step of the 0.5B at 4.6-7.1 ms either
//!   way; `results/runs/2026-11-28-h200-long-context-gpu-evict`).
//! - Single rows attend through the split-K kernel: through cuBLAS, a
//!   step grew with the context (dense decoded the needle grid's 8k
//!   prompts at 97 tokens/s and its 1k prompts at 136); with the kernel
//!   it does not (170 and 168 tokens/s, the same machine; answers
//!   unchanged; `results/runs/2026-11-28-h200-long-context-gpu-split-attn`).
//!   Quest's rule scores and ranks its pages in one launch and the split-K
//!   kernel reads them through their list (no gather): 1.5x its decode
//!   rate through candle's ops and a gather, about 0.8x dense's
//!   (`results/runs/2026-11-28-h200-long-context-gpu-quest-pages`).
//!   `BENCH_SUITE_GPU_ATTN=cublas` keeps the cuBLAS path (and Quest's
//!   candle ops), for A/B timing; the long-context records name the path
//!   in their note.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::kernels::{self, RopeStyle};
use super::model::{accepted_path, block_layout, DraftTree};
use super::{Config, DecoderError, Engine, Model, Reads, Verification};
use crate::longctx::chunk_select::{top_chunks, vote_chunks};

#[cfg(feature = "gpu-decoder")]
use super::split_attn::SplitAttn as Split;

/// Without candle's CUDA backend there is no split-K kernel.
#[cfg(not(feature = "gpu-decoder"))]
enum Split {}

#[cfg(not(feature = "gpu-decoder"))]
impl Split {
    fn handles(_: usize, _: usize, _: usize) -> bool {
        false
    }

    fn attend(&self, _: &Tensor, _: &[(Tensor, Tensor)]) -> candle_core::Result<Tensor> {
        match *self {}
    }

    fn attend_pages(
        &self,
        _: &Tensor,
        _: &(Tensor, Tensor),
        _: (&Tensor, usize),
        _: &(Tensor, Tensor),
    ) -> candle_core::Result<Tensor> {
        match *self {}
    }

    fn attend_rows(
        &self,
        _: &Tensor,
        _: &(Tensor, Tensor),
        _: (&Tensor, &Tensor),
        _: &(Tensor, Tensor),
    ) -> candle_core::Result<Tensor> {
        match *self {}
    }

    fn quest_scores(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> candle_core::Result<Tensor> {
        match *self {}
    }

    fn ranks(_: usize) -> bool {
        false
    }

    fn quest_top_pages(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: usize,
    ) -> candle_core::Result<Tensor> {
        match *self {}
    }
}

/// Attention through cuBLAS matmuls, for any rows: `qg` is `[1, kv_heads,
/// group * t, head_dim]` (scaled), `kv` the runs of keys and values read in
/// place, `mask` the additive `[t, cols]` mask where rows may not see every
/// column. Returns `[t, heads * head_dim]`.
fn attend_blas(
    qg: &Tensor,
    kv: &[(Tensor, Tensor)],
    mask: Option<&Tensor>,
    (t, cols, n_rep): (usize, usize, usize),
) -> candle_core::Result<Tensor> {
    let (_, nkv, _, hd) = qg.dims4()?;
    let nh = nkv * n_rep;
    let mut scores = kv
        .iter()
        .map(|(kk, _)| qg.matmul(&kk.t()?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let scores = match scores.len() {
        1 => scores.pop().expect("one run"),
        _ => Tensor::cat(&scores, 3)?,
    };
    let mut att = scores.reshape((1, nkv, n_rep, t, cols))?;
    if let Some(mask) = mask {
        att = att.broadcast_add(mask)?;
    }
    let att = candle_nn::ops::softmax_last_dim(&att)?.reshape((1, nkv, n_rep * t, cols))?;
    // The weighted sum of values, run by run.
    let mut o: Option<Tensor> = None;
    let mut col = 0;
    for (_, vv) in kv {
        let n = vv.dim(2)?;
        let part = match kv.len() {
            1 => att.matmul(vv)?,
            _ => att.narrow(3, col, n)?.contiguous()?.matmul(vv)?,
        };
        col += n;
        o = Some(match o {
            Some(acc) => (acc + part)?,
            None => part,
        });
    }
    let o = o.expect("the block is always read");
    o.reshape((1, nh, t, hd))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((t, nh * hd))
}

/// ChunkLLM's attention at a selecting row of one layer: the softmax of
/// the row's queries `qg`, `[1, kv_heads, group, head_dim]` (scaled), over
/// rows `0..=base` of the layer's keys `k` (the committed ones and the row
/// itself), summed over each KV head's group: `[1, kv_heads, base + 1]`,
/// left on the device.
fn chunk_probs(qg: &Tensor, k: &Tensor, base: usize) -> candle_core::Result<Tensor> {
    let keys = k.narrow(2, 0, base + 1)?;
    candle_nn::ops::softmax_last_dim(&qg.matmul(&keys.t()?)?)?.sum(2)
}

/// The chunk masses of a selecting row: every layer's [`chunk_probs`]
/// brought to the host at once (one wait for the device per step, not one
/// per layer), each summed in `f64` over each of `spans` (committed
/// positions). Per layer, per KV head, per span.
fn chunk_masses(
    probs: &[Tensor],
    base: usize,
    spans: &[(usize, usize)],
) -> candle_core::Result<Vec<Vec<Vec<f64>>>> {
    let kv_heads = probs.first().map(|p| p.dim(1)).transpose()?.unwrap_or(0);
    let all = Tensor::cat(probs, 0)?.flatten_all()?.to_vec1::<f32>()?;
    let head = |row: &[f32]| -> Vec<f64> {
        spans
            .iter()
            .map(|&(a, b)| row[a..b].iter().map(|&x| f64::from(x)).sum())
            .collect()
    };
    Ok(all
        .chunks_exact((base + 1) * kv_heads.max(1))
        .map(|layer| layer.chunks_exact(base + 1).map(head).collect())
        .collect())
}

/// Attention of a single row `qg`, `[1, kv_heads, group, head_dim]`
/// (scaled), over what [`ReadRule::ChunkSelect`] chose in one layer: per
/// KV head `h`, the rows `rows[h]` of the layer's cache `(k, v)` (`[n]`
/// `u32`, or none), then its rows `tail..=base`. With the split-K kernel,
/// one call reads every KV head's rows through `list`, the same lists
/// padded to one length with each head's count (the heads read different
/// numbers of rows); else each KV head is its own gather and cuBLAS
/// attention. Returns `[1, heads * head_dim]`.
fn attend_chosen(
    split: Option<&Split>,
    qg: &Tensor,
    (k, v): (&Tensor, &Tensor),
    (rows, list): (&[Option<Tensor>], Option<&(Tensor, Tensor)>),
    (tail, base): (usize, usize),
) -> candle_core::Result<Tensor> {
    let (_, _, n_rep, hd) = qg.dims4()?;
    let longest = list.map(|(l, _)| l.dim(2)).transpose()?.unwrap_or(0);
    if let Some(split) = split.filter(|_| Split::handles(n_rep, hd, longest + base + 1 - tail)) {
        let newest = (
            k.narrow(2, tail, base + 1 - tail)?,
            v.narrow(2, tail, base + 1 - tail)?,
        );
        let cache = (k.clone(), v.clone());
        return match list {
            Some((l, counts)) => split.attend_rows(qg, &cache, (l, counts), &newest),
            None => split.attend(qg, &[newest]),
        };
    }
    let mut outs = Vec::with_capacity(rows.len());
    for (h, list) in rows.iter().enumerate() {
        let qh = qg.narrow(1, h, 1)?.contiguous()?;
        let (kh, vh) = (k.narrow(1, h, 1)?, v.narrow(1, h, 1)?);
        let newest = (
            kh.narrow(2, tail, base + 1 - tail)?,
            vh.narrow(2, tail, base + 1 - tail)?,
        );
        let chosen = list.as_ref().map(|l| l.dim(0)).transpose()?.unwrap_or(0);
        let cols = chosen + base + 1 - tail;
        outs.push(match list {
            Some(list) => {
                let picked = (kh.index_select(list, 2)?, vh.index_select(list, 2)?);
                attend_blas(&qh, &[picked, newest], None, (1, cols, n_rep))?
            }
            None => attend_blas(&qh, &[newest], None, (1, cols, n_rep))?,
        });
    }
    Tensor::cat(&outs, 1)
}

fn gpu_err(e: candle_core::Error) -> DecoderError {
    DecoderError::Device(e.to_string())
}

struct CudaLayer {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    bq: Option<Tensor>,
    bk: Option<Tensor>,
    bv: Option<Tensor>,
    wo: QMatMul,
    ffn_norm: Tensor,
    gate_up: GateUp,
    down: QMatMul,
}

impl CudaLayer {
    /// The residual MLP block: `x + down(silu(gate(h)) * up(h))`, `h` the
    /// RMS-normed `x`.
    fn mlp(&self, x: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
        let h = candle_nn::ops::rms_norm(x, &self.ffn_norm, eps)?;
        let (g, u) = self.gate_up.forward(&h)?;
        x + self.down.forward(&(g.silu()? * u)?)?
    }
}

/// The MLP's two input projections: one matrix with the gate's rows above
/// the up projection's where both have one format (one quantization of the
/// input and one matmul launch instead of two; each output row is the same
/// dot product either way), else apart.
enum GateUp {
    Stacked { w: QMatMul, ff: usize },
    Apart { gate: QMatMul, up: QMatMul },
}

impl GateUp {
    fn new(
        gate: &QTensor,
        up: &QTensor,
        q: impl Fn(&QTensor) -> Result<QMatMul, DecoderError>,
        device: &Device,
    ) -> Result<GateUp, DecoderError> {
        let (ff, k) = gate.shape().dims2().map_err(gpu_err)?;
        if gate.dtype() != up.dtype() || up.shape().dims2().map_err(gpu_err)? != (ff, k) {
            return Ok(GateUp::Apart {
                gate: q(gate)?,
                up: q(up)?,
            });
        }
        // Quantized rows are independent runs of blocks, so stacking the
        // two matrices is concatenating their bytes.
        let mut bytes = gate.data().map_err(gpu_err)?.into_owned();
        bytes.extend_from_slice(&up.data().map_err(gpu_err)?);
        let storage = QStorage::from_data(bytes.into(), device, gate.dtype()).map_err(gpu_err)?;
        let w = QTensor::new(storage, (2 * ff, k)).map_err(gpu_err)?;
        Ok(GateUp::Stacked {
            w: QMatMul::from_qtensor(w).map_err(gpu_err)?,
            ff,
        })
    }

    /// (gate, up) projections of `h`, `[t, ff]` each.
    fn forward(&self, h: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        match self {
            GateUp::Stacked { w, ff } => {
                let y = w.forward(h)?;
                Ok((y.narrow(1, 0, *ff)?, y.narrow(1, *ff, *ff)?))
            }
            GateUp::Apart { gate, up } => Ok((gate.forward(h)?, up.forward(h)?)),
        }
    }
}

/// A model's weights in GPU memory, shareable between decoders.
pub struct CudaModel {
    config: Config,
    device: Device,
    /// The split-K attention kernels of single-row forwards; `None` on
    /// candle's CPU backend, or with `BENCH_SUITE_GPU_ATTN=cublas`.
    split: Option<Split>,
    embed: QMatMul,
    layers: Vec<CudaLayer>,
    out_norm: Tensor,
    /// `None`: tied, the output projection is `embed`.
    output: Option<QMatMul>,
}

impl std::fmt::Debug for CudaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaModel({:?})", self.config)
    }
}

impl CudaModel {
    /// Copies `model` to GPU `ordinal`. Fails with a clear error where there
    /// is no GPU or driver, or where the binary was built without the
    /// `gpu-decoder` feature.
    pub fn new(model: &Model, ordinal: usize) -> Result<CudaModel, DecoderError> {
        let device = Device::new_cuda(ordinal).map_err(|e| {
            DecoderError::Device(format!(
                "no CUDA device {ordinal} ({e}); the GPU decoder needs an NVIDIA GPU and driver"
            ))
        })?;
        #[cfg(feature = "gpu-decoder")]
        let split = if let Device::Cuda(d) = &device {
            // Candle runs this device's work on one stream and never puts
            // cudarc in multi-stream mode, so cudarc waits on none of the
            // two events it creates (and later destroys) for every
            // allocation, one per op output: host cost only. Turned off
            // before the weights are copied, so no tensor of this model
            // has them.
            // SAFETY: one stream; nothing here shares a tensor with another.
            unsafe { d.disable_event_tracking() };
            match std::env::var("BENCH_SUITE_GPU_ATTN").as_deref() {
                Ok("cublas") => {
                    eprintln!("warning: BENCH_SUITE_GPU_ATTN=cublas: decode attention through cuBLAS, not the split-K kernel");
                    None
                }
                Ok("split") | Err(_) => Some(Split::new(d).map_err(gpu_err)?),
                Ok(other) => {
                    return Err(DecoderError::Device(format!(
                        "BENCH_SUITE_GPU_ATTN={other}: expected `split` (the default) or `cublas`"
                    )))
                }
            }
        } else {
            None
        };
        #[cfg(not(feature = "gpu-decoder"))]
        let split = None;
        CudaModel::on_device(model, device, split)
    }

    /// The same graph on candle's CPU backend (see the module doc): for
    /// testing this decoder where there is no GPU, not for speed.
    pub fn on_cpu(model: &Model) -> Result<CudaModel, DecoderError> {
        CudaModel::on_device(model, Device::Cpu, None)
    }

    fn on_device(
        model: &Model,
        device: Device,
        split: Option<Split>,
    ) -> Result<CudaModel, DecoderError> {
        let c = model.config().clone();
        if c.rope_dim != c.head_dim {
            return Err(DecoderError::Unsupported {
                what: "partial RoPE on the GPU".into(),
                problem: format!(
                    "rope over {} of {} dimensions; only the CPU decoder handles it",
                    c.rope_dim, c.head_dim
                ),
            });
        }
        let q = |t: &QTensor| -> Result<QMatMul, DecoderError> {
            let data = t.data().map_err(gpu_err)?;
            let storage = QStorage::from_data(data, &device, t.dtype()).map_err(gpu_err)?;
            let t = QTensor::new(storage, t.shape().clone()).map_err(gpu_err)?;
            QMatMul::from_qtensor(t).map_err(gpu_err)
        };
        let v = |x: &[f32]| Tensor::from_slice(x, x.len(), &device).map_err(gpu_err);
        let vo = |x: &Option<Vec<f32>>| x.as_deref().map(v).transpose();
        let layers = model
            .layers
            .iter()
            .map(|l| {
                Ok(CudaLayer {
                    attn_norm: v(&l.attn_norm)?,
                    wq: q(l.wq.tensor())?,
                    wk: q(l.wk.tensor())?,
                    wv: q(l.wv.tensor())?,
                    bq: vo(&l.bq)?,
                    bk: vo(&l.bk)?,
                    bv: vo(&l.bv)?,
                    wo: q(l.wo.tensor())?,
                    ffn_norm: v(&l.ffn_norm)?,
                    gate_up: GateUp::new(l.gate.tensor(), l.up.tensor(), q, &device)?,
                    down: q(l.down.tensor())?,
                })
            })
            .collect::<Result<Vec<_>, DecoderError>>()?;
        Ok(CudaModel {
            embed: q(model.embed.tensor())?,
            output: model.output.as_ref().map(|o| q(o.tensor())).transpose()?,
            out_norm: v(&model.out_norm)?,
            layers,
            config: c,
            device,
            split,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// How single-row forwards attend, for records: `split-K kernel`,
    /// `cuBLAS` (`BENCH_SUITE_GPU_ATTN=cublas`, or a shape the kernel does
    /// not serve), or candle's CPU matmuls.
    pub fn decode_attention(&self) -> &'static str {
        let c = &self.config;
        let group = c.n_heads / c.n_kv_heads;
        match (&self.split, &self.device) {
            (Some(_), _) if Split::handles(group, c.head_dim, 1) => "split-K kernel",
            (Some(_), _) => "cuBLAS (a shape the split-K kernel does not serve)",
            (None, Device::Cpu) => "candle CPU matmuls",
            (None, _) => "cuBLAS",
        }
    }

    /// Set-up, before any clock: launches each kernel a decode launches
    /// once, on throwaway decoders (a prefill of one full chunk and a
    /// partial one, forks, and single steps under each [`ReadRule`]). The
    /// first launch of each kernel module loads it (candle's kernels are
    /// compiled from PTX then) and the first matmul starts cuBLAS. Without
    /// this, those costs landed in the first timed prefill: 26.7 s against
    /// about 4 s in later trials for the long-context needle grid on an
    /// H200 (`results/runs/2026-11-28-h200-long-context-needle-gpu/no-warm-up`);
    /// and before it warmed Quest's rule too, about 1.2 s landed in that
    /// entry's first trial. The model holds no state, so nothing a later
    /// decoder computes changes.
    pub fn warm_up(self: &Arc<Self>) -> Result<(), DecoderError> {
        let vocab = self.config.vocab_size as u32;
        let prompt: Vec<u32> = (0..(CHUNK + CHUNK / 2) as u32)
            .map(|i| (i * 7919 + 13) % vocab)
            .collect();
        let mut dense = CudaDecoder::new(self.clone());
        dense.prefill(&prompt)?;
        let mut windowed = dense.fork()?;
        windowed.set_read_rule(ReadRule::SinkWindow {
            sinks: 4,
            budget: 64,
        });
        let mut paged = dense.fork()?;
        paged.set_read_rule(ReadRule::TopPages {
            page: 16,
            dense_layers: 0,
            budget: 64,
        });
        // Chunk selection with chunks of two positions: of the steps
        // below, the first, second and fourth select, the third reads.
        let mut chunked = dense.fork()?;
        chunked.set_read_rule(ReadRule::ChunkSelect {
            budget: 64,
            cap: 2,
            vote: false,
            boundary: Boundaries(vec![false; vocab as usize].into()),
        });
        for &t in &prompt[..4] {
            for d in [&mut dense, &mut windowed, &mut paged, &mut chunked] {
                d.prefill(&[t])?;
            }
        }
        Ok(())
    }

    fn output(&self) -> &QMatMul {
        self.output.as_ref().unwrap_or(&self.embed)
    }
}

/// A verification's keys and values stay where the forward wrote them
/// (after the committed positions, in tree order) until `accept`.
struct Pending {
    base: usize,
    tokens: Vec<u32>,
    paths: Vec<Vec<usize>>,
}

/// Which committed positions attention reads (see
/// [`CudaDecoder::set_read_rule`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ReadRule {
    /// Every committed position.
    #[default]
    Dense,
    /// StreamingLLM's attention sinks and rolling window (arXiv 2309.17453,
    /// Section 3.2): of the committed positions, the first
    /// `min(sinks, budget)` and the newest `budget` minus those (the
    /// window). The rule of the CPU cache `longctx::sink_window::SinkWindowKv`,
    /// and evicting like it, in steps: once the rows held reach the sinks
    /// and two windows, the next forward first rebuilds the cache with the
    /// sinks and the newest window only. After a single step it holds
    /// between `budget` and `budget` plus a window of rows (the CPU cache:
    /// `budget`); a block of `t` rows can add `t - 1` more until the next
    /// forward. After an eviction a truncation that would need an evicted
    /// row fails, as there.
    SinkWindow { sinks: usize, budget: usize },
    /// Quest's query-aware page selection (arXiv 2406.10774, Section 3.4,
    /// Algorithm 1), as the CPU cache `longctx::quest::QuestKv` does it:
    /// once more than `budget` positions are committed, each KV head of
    /// each layer from `dense_layers` on reads the committed part of the
    /// page in flight and the `(budget - that part) / page` full pages
    /// with the highest criticality, summed over the head's query group
    /// (`sum_i max(q_i * max_i, q_i * min_i)` over the page's key bounds).
    /// Single-row forwards only (the long-context workload's steps): in a
    /// block every row would select for itself.
    TopPages {
        page: usize,
        dense_layers: usize,
        budget: usize,
    },
    /// ChunkLLM's chunk selection in its training-free form (arXiv
    /// 2510.02361, Sec. 2.3), as the CPU cache
    /// `longctx::chunk_select::ChunkSelectKv` makes it for `chunk-select`
    /// (`vote: false`) and `chunk-select-vote` (`vote: true`). A chunk ends
    /// at a token that `boundary` marks or at `cap` positions. A *selection
    /// step* (the first forward under the rule, every one whose token ends
    /// a chunk, and one after a chunk closed since the last selection)
    /// reads every committed row, and its attention probabilities summed
    /// per chunk rank the chunks: per (layer, KV head) over the head's
    /// query group, taken while they fit in `budget + 1 - cap` positions
    /// (`longctx::chunk_select::top_chunks`), or, with `vote`, per layer
    /// over all its query heads, then the layers' vote with local chunks
    /// (`longctx::chunk_select::vote_chunks`), one choice for every layer.
    /// Later steps read the chosen chunks and every position from the
    /// selection step on (at least the newest `cap - 1`). Every row is
    /// kept, as ChunkLLM keeps them. Single-row forwards only.
    ChunkSelect {
        budget: usize,
        cap: usize,
        vote: bool,
        boundary: Boundaries,
    },
}

/// Which vocabulary tokens end a chunk ([`ReadRule::ChunkSelect`]): entry
/// `t` is set where token `t` does (a token outside the table does not).
#[derive(Clone, PartialEq, Eq)]
pub struct Boundaries(pub Arc<[bool]>);

impl Boundaries {
    fn ends_chunk(&self, t: u32) -> bool {
        self.0.get(t as usize).copied().unwrap_or(false)
    }
}

impl std::fmt::Debug for Boundaries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let marked = self.0.iter().filter(|&&b| b).count();
        write!(f, "Boundaries({marked} of {} tokens)", self.0.len())
    }
}

/// [`ReadRule::ChunkSelect`]'s chunks and selections. Selections are never
/// written in place, so a fork shares their row lists.
#[derive(Clone, Default)]
struct Chunking {
    /// Exclusive ends of the closed chunks (committed positions).
    ends: Vec<u32>,
    /// Selections, oldest first.
    history: Vec<ChunkChoice>,
    /// Rows of the last forward under the rule (the CPU cache counts a
    /// byte per row of the block in flight).
    block: usize,
}

#[derive(Clone)]
struct ChunkChoice {
    /// Position of the query that made it.
    pos: usize,
    /// Per `layer * kv_heads + h`: the chosen chunks, position ranges in
    /// order.
    chunks: Vec<Vec<(usize, usize)>>,
    /// Per `layer * kv_heads + h`: the chosen rows in order, `[n]` `u32`
    /// on the model's device (`None`: no row).
    rows: Vec<Option<Tensor>>,
    /// Per layer, for the split-K kernel: the KV heads' row lists padded to
    /// the longest, `[1, kv_heads, n]`, and their lengths, `[kv_heads]`
    /// (`None`: no KV head chose a row).
    lists: Vec<Option<(Tensor, Tensor)>>,
}

impl Chunking {
    /// The first position of the open chunk.
    fn start(&self) -> usize {
        self.ends.last().map_or(0, |&e| e as usize)
    }

    /// Whether position `p`, holding `token`, ends the open chunk: if
    /// `boundary` marks the token or the chunk reaches `cap` positions.
    fn ends_at(&self, p: usize, token: u32, boundary: &Boundaries, cap: usize) -> bool {
        boundary.ends_chunk(token) || p + 1 - self.start() >= cap
    }

    /// Commits position `p`, holding `token`, closing the open chunk there
    /// where it ends ([`Chunking::ends_at`]).
    fn close(&mut self, p: usize, token: u32, boundary: &Boundaries, cap: usize) {
        if self.ends_at(p, token, boundary, cap) {
            self.ends.push(p as u32 + 1);
        }
    }
}

impl ChunkChoice {
    /// Bytes as `ChunkSelectKv` counts a selection: its position and two
    /// `usize` per chunk, per (layer, KV head).
    fn bytes(&self) -> usize {
        self.chunks.iter().map(|c| 8 + 16 * c.len()).sum()
    }
}

/// What a forward under [`ReadRule::ChunkSelect`] does.
enum ChunkStep {
    /// Read everything and choose: the chunks ranked, as position ranges
    /// (the closed ones, then the open one before the query).
    Select(Vec<(usize, usize)>),
    /// Read the choice `history[choice]` and the positions from `tail` on.
    Read { choice: usize, tail: usize },
}

/// One sequence on the GPU: see the module doc.
pub struct CudaDecoder {
    model: Arc<CudaModel>,
    /// Per layer, `[1, kv_heads, capacity, head_dim]`, `f32`.
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    capacity: usize,
    tokens: Vec<u32>,
    pending: Option<Pending>,
    last: Vec<f32>,
    rule: ReadRule,
    /// [`ReadRule::SinkWindow`]: positions after the sinks dropped from the
    /// cache; position `p` past the sinks sits in row `p - evicted`.
    evicted: usize,
    /// [`ReadRule::TopPages`]: per layer, the channel-wise minima and
    /// maxima of the keys of the first full pages, `[1, kv_heads, pages,
    /// head_dim]` (`None`: no page yet). Never written in place, so a fork
    /// shares them.
    page_lo: Vec<Option<Tensor>>,
    page_hi: Vec<Option<Tensor>>,
    /// [`ReadRule::ChunkSelect`]: chunks and selections.
    chunks: Chunking,
    /// Rows read, counted as the CPU caches count them ([`Reads`]).
    reads: Reads,
}

impl std::fmt::Debug for CudaDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDecoder({} tokens)", self.tokens.len())
    }
}

/// Prompt positions per forward (the mask is rows x context).
const CHUNK: usize = 256;

impl CudaDecoder {
    pub fn new(model: Arc<CudaModel>) -> CudaDecoder {
        CudaDecoder {
            model,
            k: Vec::new(),
            v: Vec::new(),
            capacity: 0,
            tokens: Vec::new(),
            pending: None,
            last: Vec::new(),
            rule: ReadRule::Dense,
            evicted: 0,
            page_lo: Vec::new(),
            page_hi: Vec::new(),
            chunks: Chunking::default(),
            reads: Reads::default(),
        }
    }

    /// An independent copy: the same committed tokens, a copy of the
    /// cache in the same device memory, the same read rule, no pending
    /// verification and its read count at zero. To start several methods
    /// from one shared prefill.
    pub fn fork(&self) -> Result<CudaDecoder, DecoderError> {
        let copy = |x: &[Tensor]| {
            x.iter()
                .map(Tensor::copy)
                .collect::<candle_core::Result<Vec<_>>>()
                .map_err(gpu_err)
        };
        Ok(CudaDecoder {
            model: self.model.clone(),
            k: copy(&self.k)?,
            v: copy(&self.v)?,
            capacity: self.capacity,
            tokens: self.tokens.clone(),
            pending: None,
            last: self.last.clone(),
            rule: self.rule.clone(),
            evicted: self.evicted,
            page_lo: self.page_lo.clone(),
            page_hi: self.page_hi.clone(),
            chunks: self.chunks.clone(),
            reads: Reads::default(),
        })
    }

    /// What attention has read since this decoder was made, as the CPU
    /// caches count it: per layer, KV head and query row, the committed
    /// rows read out of the committed rows visible to dense attention.
    pub fn reads(&self) -> Reads {
        self.reads
    }

    /// Bytes of keys and values held for the committed positions (`f32`),
    /// as `DenseKv::bytes` counts them (evicted positions not), plus the
    /// page bounds of [`ReadRule::TopPages`] (as `QuestKv::bytes` counts
    /// its own) and the metadata of [`ReadRule::ChunkSelect`] (as
    /// `ChunkSelectKv::bytes` counts it: the boundary table as a bit set,
    /// the chunk ends, a byte per row of the last block, the selections).
    pub fn kv_bytes(&self) -> usize {
        let c = &self.model.config;
        let bounds: usize = self
            .page_lo
            .iter()
            .chain(&self.page_hi)
            .flatten()
            .map(|t| t.elem_count() * 4)
            .sum();
        let chunks = match &self.rule {
            ReadRule::ChunkSelect { boundary, .. } => {
                let ch = &self.chunks;
                8 * boundary.0.len().div_ceil(64)
                    + 4 * ch.ends.len()
                    + ch.block
                    + ch.history.iter().map(ChunkChoice::bytes).sum::<usize>()
            }
            _ => 0,
        };
        (self.tokens.len() - self.evicted) * c.n_layers * c.n_kv_heads * c.head_dim * 2 * 4
            + bounds
            + chunks
    }

    /// From the next forward on, attention reads what `rule` says (see
    /// [`ReadRule`]). Set after a dense prefill, it reproduces an entry's
    /// "dense prefill, then a sparse decode". [`ReadRule::Dense`] restores
    /// dense reads.
    pub fn set_read_rule(&mut self, rule: ReadRule) {
        if let ReadRule::TopPages { page, .. } = rule {
            assert!(page > 0, "a page of no positions");
        }
        assert!(
            self.evicted == 0 || rule == self.rule,
            "the sink window evicted rows another rule would read"
        );
        if rule != self.rule {
            self.page_lo.clear();
            self.page_hi.clear();
            self.chunks = Chunking::default();
            if let ReadRule::ChunkSelect { cap, boundary, .. } = &rule {
                assert!(*cap > 0, "chunks of no positions");
                for p in 0..self.tokens.len() {
                    self.chunks.close(p, self.tokens[p], boundary, *cap);
                }
            }
        }
        self.rule = rule;
    }

    /// [`ReadRule::ChunkSelect`]: what a forward of `tokens` at `base`
    /// does (`None` under other rules). A block of several rows is refused.
    fn chunk_step(&self, base: usize, tokens: &[u32]) -> Result<Option<ChunkStep>, DecoderError> {
        let ReadRule::ChunkSelect { cap, boundary, .. } = &self.rule else {
            return Ok(None);
        };
        if tokens.len() > 1 {
            return Err(DecoderError::Unsupported {
                what: "a block of several rows under chunk selection".into(),
                problem: format!(
                    "{} rows at position {base}; only a single row may select",
                    tokens.len()
                ),
            });
        }
        let ch = &self.chunks;
        let start = ch.start();
        let ends_chunk = ch.ends_at(base, tokens[0], boundary, *cap);
        let last = ch.history.len().checked_sub(1);
        let select = match last {
            None => true,
            Some(i) => ends_chunk || start > ch.history[i].pos + 1,
        };
        Ok(Some(match last {
            Some(choice) if !select => {
                let tail = ch.history[choice].pos.max(base.saturating_sub(cap - 1));
                ChunkStep::Read { choice, tail }
            }
            _ => {
                let mut spans = Vec::with_capacity(ch.ends.len() + 1);
                let mut a = 0;
                for &e in &ch.ends {
                    spans.push((a, e as usize));
                    a = e as usize;
                }
                if a < base {
                    spans.push((a, base));
                }
                ChunkStep::Select(spans)
            }
        }))
    }

    /// The runs `[start, end)` of cache rows a forward of `t` rows at
    /// position `base` reads, in position order; the last run ends with
    /// the block.
    fn runs(&self, base: usize, t: usize) -> Vec<(usize, usize)> {
        match self.rule {
            ReadRule::SinkWindow { sinks, budget } if base > budget => {
                let sinks = sinks.min(budget);
                let from = base - (budget - sinks) - self.evicted;
                let mut runs = vec![(0, sinks), (from, base + t - self.evicted)];
                runs.retain(|&(a, b)| b > a);
                runs
            }
            _ => vec![(0, base + t)],
        }
    }

    /// [`ReadRule::SinkWindow`]'s eviction before a forward at `base`: once
    /// the rows held reach the sinks and two windows, the cache is rebuilt
    /// with room for the sinks, two windows and a block, holding the sinks
    /// and the newest window; the old tensors, and the rows only they held,
    /// are freed.
    fn evict(&mut self, base: usize) -> Result<(), DecoderError> {
        let ReadRule::SinkWindow { sinks, budget } = self.rule else {
            return Ok(());
        };
        let sinks = sinks.min(budget);
        let window = budget - sinks;
        if base - self.evicted < sinks + 2 * window || base <= budget {
            return Ok(());
        }
        let c = &self.model.config;
        let cap = sinks + 2 * window + CHUNK;
        let from = base - window - self.evicted;
        let dev = &self.model.device;
        let rebuild = |old: &mut Vec<Tensor>| -> candle_core::Result<()> {
            for t in old.iter_mut() {
                let new = Tensor::zeros((1, c.n_kv_heads, cap, c.head_dim), DType::F32, dev)?;
                new.slice_set(&t.narrow(2, 0, sinks)?.contiguous()?, 2, 0)?;
                if window > 0 {
                    new.slice_set(&t.narrow(2, from, window)?.contiguous()?, 2, sinks)?;
                }
                *t = new;
            }
            Ok(())
        };
        rebuild(&mut self.k).map_err(gpu_err)?;
        rebuild(&mut self.v).map_err(gpu_err)?;
        self.capacity = cap;
        self.evicted = base - window - sinks;
        Ok(())
    }

    /// [`ReadRule::TopPages`] in a forward at `base`: `(page, dense_layers,
    /// full pages wanted)`, the layers from `dense_layers` on selecting;
    /// `None` while the budget covers the committed rows (all are read).
    fn top_pages(&self, base: usize) -> Option<(usize, usize, usize)> {
        match self.rule {
            ReadRule::TopPages {
                page,
                dense_layers,
                budget,
            } if base > budget => Some((page, dense_layers, (budget - base % page) / page)),
            _ => None,
        }
    }

    /// Quest's selection in layer `l` for a single row whose queries are
    /// `qg`, `[1, kv_heads, n_rep, head_dim]`: per KV head, the keys and
    /// values of the `want` of the first `full` pages with the highest
    /// criticality summed over the head's query group (Quest's bound per
    /// query head, as `QuestKv` sums it), `[1, kv_heads, want * page,
    /// head_dim]`, the pages in order of criticality (attention does not
    /// depend on the order of what it reads). `offsets` is `0..page` as
    /// `f32`, `[1, 1, 1, page]`, made once per forward.
    fn top_pages_rows(
        &mut self,
        l: usize,
        qg: &Tensor,
        (page, full, want): (usize, usize, usize),
        offsets: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let pages = self.critical_pages(l, qg, (page, full, want))?;
        let c = &self.model.config;
        let (nkv, hd) = (c.n_kv_heads, c.head_dim);
        // Row indices page * size + offset, in f32 (exact below 2^24).
        let rows = pages
            .to_dtype(DType::F32)?
            .affine(page as f64, 0.0)?
            .unsqueeze(3)?
            .broadcast_add(offsets)?
            .to_dtype(DType::U32)?
            .reshape((1, nkv, want * page, 1))?
            .broadcast_as((1, nkv, want * page, hd))?
            .contiguous()?;
        Ok((self.k[l].gather(&rows, 2)?, self.v[l].gather(&rows, 2)?))
    }

    /// The `want` most critical of layer `l`'s first `full` pages per KV
    /// head, `[1, kv_heads, want]` (`u32`), most critical first: Quest's
    /// bound per query head, summed over the head's query group. With the
    /// split-K module loaded, one launch scores and ranks the pages (up to
    /// `MAX_RANKED_PAGES`; ties to the lower page, as `QuestKv` breaks
    /// them), or one launch scores them before candle's sort; else
    /// candle's ops and sort (whose order among exact ties is its own).
    fn critical_pages(
        &mut self,
        l: usize,
        qg: &Tensor,
        (page, full, want): (usize, usize, usize),
    ) -> candle_core::Result<Tensor> {
        let (lo, hi) = self.page_bounds(l, page, full)?;
        let crit = match &self.model.split {
            Some(split) if Split::ranks(full) && want > 0 => {
                return split.quest_top_pages(qg, &lo, &hi, want);
            }
            Some(split) => split.quest_scores(qg, &lo, &hi)?,
            None => {
                let q = qg.unsqueeze(3)?; // [1, kv_heads, n_rep, 1, head_dim]
                let upper = q.broadcast_mul(&hi.unsqueeze(2)?)?;
                let lower = q.broadcast_mul(&lo.unsqueeze(2)?)?;
                // [1, kv_heads, full]: per channel the larger product,
                // summed over channels, then over the group's query heads.
                upper.maximum(&lower)?.sum(4)?.sum(2)?.contiguous()?
            }
        };
        crit.arg_sort_last_dim(false)?.narrow(2, 0, want)
    }

    /// Brings layer `l`'s page bounds up to its first `full` pages (those
    /// committed since the last call), and returns them.
    fn page_bounds(
        &mut self,
        l: usize,
        page: usize,
        full: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let c = &self.model.config;
        if self.page_lo.len() <= l {
            self.page_lo.resize(c.n_layers, None);
            self.page_hi.resize(c.n_layers, None);
        }
        let have = self.page_lo[l].as_ref().map_or(0, |t| t.dims()[2]);
        if have < full {
            let rows = self.k[l]
                .narrow(2, have * page, (full - have) * page)?
                .contiguous()?
                .reshape((1, c.n_kv_heads, full - have, page, c.head_dim))?;
            let grow = |old: &Option<Tensor>, new: Tensor| match old {
                Some(o) => Tensor::cat(&[o, &new], 2),
                None => Ok(new),
            };
            self.page_lo[l] = Some(grow(&self.page_lo[l], rows.min(3)?)?);
            self.page_hi[l] = Some(grow(&self.page_hi[l], rows.max(3)?)?);
        }
        let (lo, hi) = (&self.page_lo[l], &self.page_hi[l]);
        let (lo, hi) = (lo.as_ref().expect("bounded"), hi.as_ref().expect("bounded"));
        Ok((lo.narrow(2, 0, full)?, hi.narrow(2, 0, full)?))
    }

    /// [`ReadRule::ChunkSelect`]'s choice at the selecting row `base`, from
    /// the masses of `spans` per layer and KV head: per (layer, KV head)
    /// its top chunks, or with the vote one choice for all. The chosen
    /// rows go to the device once, for the steps that read them.
    fn choose_chunks(
        &self,
        base: usize,
        spans: &[(usize, usize)],
        masses: &[Vec<Vec<f64>>],
    ) -> candle_core::Result<ChunkChoice> {
        let ReadRule::ChunkSelect {
            budget, cap, vote, ..
        } = self.rule
        else {
            unreachable!("chunks are chosen under ReadRule::ChunkSelect only")
        };
        let chunks: Vec<Vec<(usize, usize)>> = if vote {
            // A layer's ballot weighs the chunks by all its query heads.
            let ballots: Vec<Vec<f64>> = masses
                .iter()
                .map(|heads| {
                    (0..spans.len())
                        .map(|c| heads.iter().map(|m| m[c]).sum())
                        .collect()
                })
                .collect();
            let all = vote_chunks(spans, &ballots, budget, cap);
            vec![all; masses.iter().map(Vec::len).sum()]
        } else {
            masses
                .iter()
                .flatten()
                .map(|m| top_chunks(spans, m, budget, cap))
                .collect()
        };
        let dev = &self.model.device;
        let rows = chunks
            .iter()
            .map(|c| {
                let rows: Vec<u32> = c.iter().flat_map(|&(a, b)| a as u32..b as u32).collect();
                (!rows.is_empty())
                    .then(|| Tensor::new(rows.as_slice(), dev))
                    .transpose()
            })
            .collect::<candle_core::Result<_>>()?;
        let nkv = self.model.config.n_kv_heads;
        let lists = chunks
            .chunks(nkv)
            .map(|layer| {
                let lens: Vec<u32> = layer
                    .iter()
                    .map(|c| c.iter().map(|&(a, b)| (b - a) as u32).sum())
                    .collect();
                let n = lens.iter().copied().max().unwrap_or(0) as usize;
                if n == 0 {
                    return Ok(None);
                }
                let mut padded = vec![0u32; nkv * n];
                for (list, c) in padded.chunks_exact_mut(n).zip(layer) {
                    let rows = c.iter().flat_map(|&(a, b)| a as u32..b as u32);
                    for (slot, r) in list.iter_mut().zip(rows) {
                        *slot = r;
                    }
                }
                Ok(Some((
                    Tensor::from_vec(padded, (1, nkv, n), dev)?,
                    Tensor::new(lens.as_slice(), dev)?,
                )))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(ChunkChoice {
            pos: base,
            chunks,
            rows,
            lists,
        })
    }

    /// Room for `n` positions (doubling, keeping what the cache holds).
    fn reserve(&mut self, n: usize) -> Result<(), DecoderError> {
        if n <= self.capacity {
            return Ok(());
        }
        let c = &self.model.config;
        let cap = n.next_power_of_two().max(512).min(c.context_length.max(n));
        let shape = (1, c.n_kv_heads, cap, c.head_dim);
        let dev = &self.model.device;
        let grow = |old: &mut Vec<Tensor>| -> Result<(), DecoderError> {
            let mut new = Vec::with_capacity(c.n_layers);
            for l in 0..c.n_layers {
                let t = Tensor::zeros(shape, DType::F32, dev).map_err(gpu_err)?;
                if let Some(o) = old.get(l) {
                    t.slice_set(o, 2, 0).map_err(gpu_err)?;
                }
                new.push(t);
            }
            *old = new;
            Ok(())
        };
        grow(&mut self.k)?;
        grow(&mut self.v)?;
        self.capacity = cap;
        Ok(())
    }

    /// Runs the block `tokens` (node `i`'s parent `parents[i] < i`, or
    /// `None` right after the committed tokens) through the model, writing
    /// its keys and values at positions `base..base + t` of the cache, and
    /// returns the logits of rows `want`, row-major.
    fn forward(
        &mut self,
        tokens: &[u32],
        parents: &[Option<usize>],
        want: &[usize],
    ) -> Result<Vec<f32>, DecoderError> {
        let m = self.model.clone();
        let c = &m.config;
        let (t, base) = (tokens.len(), self.tokens.len());
        if let Some(&bad) = tokens.iter().find(|&&x| x as usize >= c.vocab_size) {
            return Err(DecoderError::Input(format!(
                "token {bad} outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        let (depth, ancestors) = block_layout(parents, base, c.context_length)?;
        self.evict(base)?;
        // The cache row of position `base` (before the sinks, or with
        // nothing evicted, the same).
        let row = base - self.evicted;
        self.reserve(row + t)?;
        let dev = &m.device;
        let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let n_rep = nh / nkv;
        // The positions attention reads: `cols` of them, the block last
        // (in the layers that select pages, the selection's instead).
        let runs = self.runs(base, t);
        let cols: usize = runs.iter().map(|(a, b)| b - a).sum();
        let top = self.top_pages(base);
        if top.is_some() && t > 1 {
            return Err(DecoderError::Unsupported {
                what: "a block of several rows under Quest's page selection".into(),
                problem: format!(
                    "{t} rows at position {base}; each row would select its own pages"
                ),
            });
        }
        let chunk_step = self.chunk_step(base, tokens)?;
        let read_per_call = |l: usize, h: usize| match (&chunk_step, top) {
            (Some(ChunkStep::Read { choice, tail }), _) => {
                let chosen = &self.chunks.history[*choice].chunks[l * nkv + h];
                chosen.iter().map(|(a, b)| b - a).sum::<usize>() + base - tail
            }
            (_, Some((page, dense_layers, want))) if l >= dense_layers => want * page + base % page,
            _ => cols - t,
        };
        let mut reads = self.reads;
        for l in 0..c.n_layers {
            for h in 0..nkv {
                reads.calls += t as u64;
                reads.rows_read += (t * read_per_call(l, h)) as u64;
                reads.rows_visible += (t * base) as u64;
            }
        }
        self.reads = reads;
        // ChunkLLM's selection step: per layer, the attention of the row
        // per KV head (summed over its query group).
        let mut probs: Vec<Tensor> = Vec::new();

        // Host-side tables: RoPE per node position, and the additive mask
        // (every committed position; the block's own ancestors).
        let half = c.rope_dim / 2;
        let (mut cos, mut sin) = (vec![0f32; t * half], vec![0f32; t * half]);
        kernels::rope_tables(base, &depth, c.rope_dim, c.rope_base, &mut cos, &mut sin);
        // RoPE is linear in its tables, so the queries' tables carry the
        // attention scale 1 / sqrt(head_dim) (one launch fewer per layer).
        let scale = 1.0 / (hd as f32).sqrt();
        let (q_cos, q_sin): (Vec<f32>, Vec<f32>) = cos
            .iter()
            .zip(&sin)
            .map(|(c, s)| (c * scale, s * scale))
            .unzip();
        // Rows that may not see a column (a prompt chunk, a tree); a
        // single row sees every column it reads, so it needs no mask.
        let mask = (t > 1).then(|| {
            let mut mask = vec![0f32; t * cols];
            for (i, anc) in ancestors.iter().enumerate() {
                let row = &mut mask[i * cols + cols - t..(i + 1) * cols];
                row.fill(f32::NEG_INFINITY);
                for &a in anc {
                    row[a] = 0.0;
                }
            }
            mask
        });
        let run = || -> candle_core::Result<Vec<f32>> {
            let table = |x: Vec<f32>| Tensor::from_vec(x, (t, half), dev);
            let (cos, sin, q_cos, q_sin) = (table(cos)?, table(sin)?, table(q_cos)?, table(q_sin)?);
            let mask = mask
                .map(|m| Tensor::from_vec(m, (t, cols), dev))
                .transpose()?;
            let ids = Tensor::new(tokens, dev)?;
            // Quest's row offsets within a page, copied to the device once.
            let offsets = top
                .map(|(page, ..)| Tensor::arange(0f32, page as f32, dev)?.reshape((1, 1, 1, page)))
                .transpose()?;
            let mut x = m.embed.embedding(&ids)?; // [t, d]
            let rope = |x: &Tensor, cos: &Tensor, sin: &Tensor| match c.rope_style {
                RopeStyle::Neox => candle_nn::rotary_emb::rope(x, cos, sin),
                RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(x, cos, sin),
            };
            // [t, heads * hd] -> [1, heads, t, hd]
            let heads =
                |x: Tensor, n: usize| x.reshape((1, t, n, hd))?.transpose(1, 2)?.contiguous();
            let bias = |x: Tensor, b: &Option<Tensor>| match b {
                Some(b) => x.broadcast_add(b),
                None => Ok(x),
            };
            for (l, layer) in m.layers.iter().enumerate() {
                let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
                let q = heads(bias(layer.wq.forward(&h)?, &layer.bq)?, nh)?;
                let k = heads(bias(layer.wk.forward(&h)?, &layer.bk)?, nkv)?;
                let v = heads(bias(layer.wv.forward(&h)?, &layer.bv)?, nkv)?;
                let q = rope(&q, &q_cos, &q_sin)?;
                let k = rope(&k, &cos, &sin)?;
                self.k[l].slice_set(&k, 2, row)?;
                self.v[l].slice_set(&v, 2, row)?;
                // Query heads g * n_rep .. (g + 1) * n_rep share KV head g.
                let qg = q.reshape((1, nkv, n_rep * t, hd))?;
                match &chunk_step {
                    Some(ChunkStep::Select(_)) => {
                        probs.push(chunk_probs(&qg, &self.k[l], base)?);
                    }
                    Some(ChunkStep::Read { choice, tail }) => {
                        let (choice, tail) = (&self.chunks.history[*choice], *tail);
                        let rows = &choice.rows[l * nkv..(l + 1) * nkv];
                        let chosen = (rows, choice.lists[l].as_ref());
                        let cache = (&self.k[l], &self.v[l]);
                        let o = attend_chosen(m.split.as_ref(), &qg, cache, chosen, (tail, base))?;
                        x = (x + layer.wo.forward(&o)?)?;
                        x = layer.mlp(&x, c.rms_eps)?;
                        continue;
                    }
                    None => {}
                }
                // Both paths read each run of the cache in place (cuBLAS
                // with batch stride capacity x head_dim), without copying.
                let kv = match top {
                    Some((page, dense_layers, want)) if l >= dense_layers => {
                        // The selected pages, then the page in flight
                        // (its committed rows and the block).
                        let tail = base / page * page;
                        let flight = (
                            self.k[l].narrow(2, tail, base + t - tail)?,
                            self.v[l].narrow(2, tail, base + t - tail)?,
                        );
                        let rows = want * page + base + t - tail;
                        let split = m
                            .split
                            .as_ref()
                            .filter(|_| want > 0 && t == 1 && Split::handles(n_rep, hd, rows));
                        if let Some(split) = split {
                            // The kernel reads the pages through their list.
                            let pages = self.critical_pages(l, &qg, (page, base / page, want))?;
                            let cache = (self.k[l].clone(), self.v[l].clone());
                            let o = split.attend_pages(&qg, &cache, (&pages, page), &flight)?;
                            x = (x + layer.wo.forward(&o)?)?;
                            x = layer.mlp(&x, c.rms_eps)?;
                            continue;
                        }
                        let mut kv = Vec::with_capacity(2);
                        if want > 0 {
                            let offsets = offsets.as_ref().expect("made when pages are chosen");
                            let pages = (page, base / page, want);
                            kv.push(self.top_pages_rows(l, &qg, pages, offsets)?);
                        }
                        kv.push(flight);
                        kv
                    }
                    _ => runs
                        .iter()
                        .map(|&(a, b)| {
                            Ok((
                                self.k[l].narrow(2, a, b - a)?,
                                self.v[l].narrow(2, a, b - a)?,
                            ))
                        })
                        .collect::<candle_core::Result<Vec<_>>>()?,
                };
                let cols: usize = kv
                    .iter()
                    .map(|(k, _)| k.dim(2))
                    .sum::<candle_core::Result<usize>>()?;
                let split = m
                    .split
                    .as_ref()
                    .filter(|_| t == 1 && kv.len() <= 2 && Split::handles(n_rep, hd, cols));
                let o = match split {
                    Some(split) => split.attend(&qg, &kv)?,
                    None => attend_blas(&qg, &kv, mask.as_ref(), (t, cols, n_rep))?,
                };
                x = (x + layer.wo.forward(&o)?)?;
                x = layer.mlp(&x, c.rms_eps)?;
            }
            if let Some(ChunkStep::Select(spans)) = &chunk_step {
                let masses = chunk_masses(&probs, base, spans)?;
                let choice = self.choose_chunks(base, spans, &masses)?;
                self.chunks.history.push(choice);
            }
            if chunk_step.is_some() {
                self.chunks.block = t;
            }
            if want.is_empty() {
                return Ok(Vec::new());
            }
            let rows: Vec<u32> = want.iter().map(|&i| i as u32).collect();
            let x = x.index_select(&Tensor::new(rows.as_slice(), dev)?, 0)?;
            let h = candle_nn::ops::rms_norm(&x, &m.out_norm, c.rms_eps)?;
            m.output().forward(&h)?.flatten_all()?.to_vec1::<f32>()
        };
        run().map_err(gpu_err)
    }

    fn prefill_rows(&mut self, tokens: &[u32], from: usize) -> Result<Vec<f32>, DecoderError> {
        self.pending = None;
        let mut out = Vec::new();
        for (c, piece) in tokens.chunks(CHUNK).enumerate() {
            let parents: Vec<Option<usize>> = (0..piece.len()).map(|i| i.checked_sub(1)).collect();
            let want: Vec<usize> = (from.saturating_sub(c * CHUNK)..piece.len()).collect();
            out.extend(self.forward(piece, &parents, &want)?);
            if let ReadRule::ChunkSelect { cap, boundary, .. } = &self.rule {
                for (i, &tok) in piece.iter().enumerate() {
                    self.chunks
                        .close(self.tokens.len() + i, tok, boundary, *cap);
                }
            }
            self.tokens.extend_from_slice(piece);
        }
        Ok(out)
    }
}

impl Engine for CudaDecoder {
    fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    fn prefill(&mut self, tokens: &[u32]) -> Result<&[f32], DecoderError> {
        if tokens.is_empty() {
            return Err(DecoderError::Input("prefill of no tokens".into()));
        }
        self.last = self.prefill_rows(tokens, tokens.len() - 1)?;
        Ok(&self.last)
    }

    fn prefill_logits(&mut self, tokens: &[u32], from: usize) -> Result<Vec<f32>, DecoderError> {
        if from >= tokens.len() {
            return Err(DecoderError::Input(format!(
                "logits from row {from} of a prefill of {} tokens",
                tokens.len()
            )));
        }
        self.prefill_rows(tokens, from)
    }

    fn verify(&mut self, root: u32, drafts: &[&[u32]]) -> Result<Verification, DecoderError> {
        let tree = DraftTree::new(root, drafts);
        let all: Vec<usize> = (0..tree.tokens.len()).collect();
        self.pending = None;
        let logits = self.forward(&tree.tokens, &tree.parents, &all)?;
        self.pending = Some(Pending {
            base: self.tokens.len(),
            tokens: tree.tokens,
            paths: tree.paths.clone(),
        });
        Ok(Verification::new(
            self.model.config.vocab_size,
            logits,
            tree.paths,
        ))
    }

    fn accept(&mut self, draft: usize, n_accepted: usize) -> Result<(), DecoderError> {
        let p = self
            .pending
            .take()
            .ok_or_else(|| DecoderError::Input("accept without a verification".into()))?;
        let rows = accepted_path(&p.paths, p.base, self.tokens.len(), draft, n_accepted)?;
        // The path's nodes move to consecutive positions after `base`
        // (gathered first, so no source is overwritten before it is read).
        if rows.iter().enumerate().any(|(i, &r)| r != i) {
            let dev = &self.model.device;
            let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
            let row = p.base - self.evicted;
            let gather = || -> candle_core::Result<()> {
                let idx = Tensor::new(idx.as_slice(), dev)?;
                for cache in self.k.iter().chain(&self.v) {
                    let block = cache.narrow(2, row, p.tokens.len())?.contiguous()?;
                    let kept = block.index_select(&idx, 2)?;
                    cache.slice_set(&kept, 2, row)?;
                }
                Ok(())
            };
            gather().map_err(gpu_err)?;
        }
        self.tokens.extend(rows.iter().map(|&r| p.tokens[r]));
        Ok(())
    }

    fn truncate(&mut self, len: usize) -> Result<(), DecoderError> {
        self.pending = None;
        if len > self.tokens.len() {
            return Err(DecoderError::Input(format!(
                "truncate to {len} of {} tokens",
                self.tokens.len()
            )));
        }
        // After an eviction every read needs the newest window whole.
        if let ReadRule::SinkWindow { sinks, budget } = self.rule {
            let sinks = sinks.min(budget);
            let window = budget - sinks;
            if self.evicted > 0 && len < self.tokens.len() && len < sinks + self.evicted + window {
                return Err(DecoderError::Cache(format!(
                    "sink-window cache cannot truncate {} positions to {len}: positions \
                     {sinks}..{} were evicted and would be read again",
                    self.tokens.len(),
                    sinks + self.evicted
                )));
            }
        }
        // Positions past `len` are overwritten by the next forward, and
        // the bounds of pages no longer full are recomputed when they are.
        self.tokens.truncate(len);
        let ch = &mut self.chunks;
        ch.ends
            .truncate(ch.ends.partition_point(|&e| e as usize <= len));
        ch.history.retain(|s| s.pos < len);
        if let ReadRule::TopPages { page, .. } = self.rule {
            for b in self.page_lo.iter_mut().chain(&mut self.page_hi) {
                if let Some(t) = b {
                    let keep = t.dims()[2].min(len / page);
                    *b = (keep > 0)
                        .then(|| t.narrow(2, 0, keep))
                        .transpose()
                        .map_err(gpu_err)?;
                }
            }
        }
        Ok(())
    }
}
