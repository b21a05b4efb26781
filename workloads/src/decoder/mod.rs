//! The shared transformer decoder: GGUF checkpoints (`llama`: SmolLM2;
//! `qwen2`: Qwen2.5-Coder) run on the CPU over a pluggable KV cache.
//!
//! Where to start: [`Model::load`] reads weights (still quantized, as
//! candle `QTensor`s), hyper-parameters and the [`Tokenizer`] from one GGUF
//! file; a [`Decoder`] runs one sequence over a [`KvCache`] with
//! [`Decoder::prefill`], [`Decoder::step`], and, for speculative decoding,
//! [`Decoder::verify`] (all drafts in one call) then [`Decoder::accept`] or
//! [`Decoder::truncate`].
//!
//! The design promise is *batch invariance*: a position's logits are the
//! same bits whether it was computed alone, in a prompt chunk, or as a node
//! of a verification tree. Quantized matmuls quantize each activation row on
//! its own and compute each output element with one dot product
//! ([`kernels`]); attention walks a query's keys in sequence order with the
//! same arithmetic however many queries are in flight ([`kv`]). So greedy
//! speculative decoding emits exactly the tokens of greedy decoding.
//!
//! Threads: matmuls and attention run on candle's persistent thread pool,
//! sized by `CANDLE_NUM_THREADS` (else `RAYON_NUM_THREADS`, else the
//! physical cores). Results do not depend on the thread count.
//!
//! On an NVIDIA GPU (cargo feature `gpu-decoder`), [`cuda::CudaDecoder`]
//! runs the same model through candle's CUDA backend behind the same
//! [`Engine`] interface; [`Weights`] puts a model on a device.
//! It is not batch-invariant (see [`cuda`]). Every build compiles it: without
//! the feature its graph runs on the CPU ([`cuda::CudaModel::on_cpu`]), so
//! the tests check it against [`Decoder`] on machines without a GPU.
//!
//! Long-context work plugs an eviction or compression policy in as another
//! [`KvCache`] (see [`kv`] for the contract) through
//! [`Decoder::with_cache`].

pub mod cuda;
pub mod kernels;
pub mod kv;
pub mod model;
#[cfg(feature = "gpu-decoder")]
pub mod split_attn;
pub mod tokenizer;

pub use kv::{
    attend_segments, BlockKv, DenseKv, KvCache, KvShape, ReadCounter, Reads, Rows, Segment,
};
pub use model::{Arch, Config, Decoder, Model, Verification};
pub use tokenizer::{ChatTemplate, Tokenizer};

/// What can go wrong loading or running a model. Messages name the file,
/// tensor or key at fault.
#[derive(Debug, thiserror::Error)]
pub enum DecoderError {
    #[error("GGUF {path}: {problem}")]
    Gguf { path: String, problem: String },
    #[error("GGUF metadata `{key}`: {problem}")]
    Metadata { key: String, problem: String },
    #[error("unsupported {what}: {problem}")]
    Unsupported { what: String, problem: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("KV cache: {0}")]
    Cache(String),
    #[error("bad input: {0}")]
    Input(String),
    #[error("GPU: {0}")]
    Device(String),
}

/// One sequence being decoded, on whichever device: what the samplers use.
/// [`Decoder`] (CPU, any [`KvCache`]) and, with feature `gpu-decoder`,
/// [`cuda::CudaDecoder`] give these the meaning documented on [`Decoder`]'s
/// methods of the same names.
pub trait Engine: std::fmt::Debug {
    /// Committed tokens.
    fn tokens(&self) -> &[u32];
    /// Appends `tokens`; the logits after the last one.
    fn prefill(&mut self, tokens: &[u32]) -> Result<&[f32], DecoderError>;
    /// Appends `tokens`; the logits after each of `tokens[from..]`.
    fn prefill_logits(&mut self, tokens: &[u32], from: usize) -> Result<Vec<f32>, DecoderError>;
    /// Scores draft continuations of `root` in one forward (nothing committed).
    fn verify(&mut self, root: u32, drafts: &[&[u32]]) -> Result<Verification, DecoderError>;
    /// Commits the root and `n_accepted` tokens of draft `draft` of the last
    /// verification.
    fn accept(&mut self, draft: usize, n_accepted: usize) -> Result<(), DecoderError>;
    /// Forgets everything after the first `len` tokens.
    fn truncate(&mut self, len: usize) -> Result<(), DecoderError>;
}

/// A model's weights where its decoders run; makes fresh [`Engine`]s.
#[derive(Debug, Clone)]
pub enum Weights {
    Cpu(std::sync::Arc<Model>),
    /// The host model (tokenizer, configuration) and its GPU copy.
    #[cfg(feature = "gpu-decoder")]
    Cuda(std::sync::Arc<Model>, std::sync::Arc<cuda::CudaModel>),
}

impl Weights {
    /// `model` on `device` (a copy in GPU memory for a CUDA device).
    pub fn on(
        model: std::sync::Arc<Model>,
        device: crate::device::Device,
    ) -> Result<Weights, DecoderError> {
        match device {
            crate::device::Device::Cpu => Ok(Weights::Cpu(model)),
            #[cfg(feature = "gpu-decoder")]
            crate::device::Device::Cuda(ordinal) => {
                let gpu = cuda::CudaModel::new(&model, ordinal)?;
                Ok(Weights::Cuda(model, std::sync::Arc::new(gpu)))
            }
            #[cfg(not(feature = "gpu-decoder"))]
            crate::device::Device::Cuda(_) => Err(DecoderError::Device(
                "this binary has no GPU decoder; build it with \
                 `cargo build --release -p bench-suite --features cuda,gpu-decoder` \
                 after `scripts/cuda-toolchain.sh` (workloads/src/spectr/README.md, \"On a GPU\")"
                    .into(),
            )),
        }
    }

    /// The host-side model (configuration, tokenizer).
    pub fn model(&self) -> &std::sync::Arc<Model> {
        match self {
            Weights::Cpu(m) => m,
            #[cfg(feature = "gpu-decoder")]
            Weights::Cuda(m, _) => m,
        }
    }

    /// A decoder with an empty (dense) cache.
    pub fn engine(&self) -> Box<dyn Engine> {
        match self {
            Weights::Cpu(m) => Box::new(Decoder::new(m.clone())),
            #[cfg(feature = "gpu-decoder")]
            Weights::Cuda(_, g) => Box::new(cuda::CudaDecoder::new(g.clone())),
        }
    }
}

impl From<DecoderError> for crate::WorkloadError {
    fn from(e: DecoderError) -> Self {
        crate::WorkloadError::Other(format!("decoder: {e}"))
    }
}
