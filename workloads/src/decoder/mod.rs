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
//! Long-context work plugs an eviction or compression policy in as another
//! [`KvCache`] (see [`kv`] for the contract) through
//! [`Decoder::with_cache`].

pub mod kernels;
pub mod kv;
pub mod model;
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
}

impl From<DecoderError> for crate::WorkloadError {
    fn from(e: DecoderError) -> Self {
        crate::WorkloadError::Other(format!("decoder: {e}"))
    }
}
