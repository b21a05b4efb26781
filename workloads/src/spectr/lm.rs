//! What the samplers see of a language model: next-token distributions.
//!
//! The n-gram models (`ngram.rs`), the synthetic pairs (`synthetic.rs`) and
//! the GGUF decoder (through the adapter in `llm.rs`) all implement
//! [`LanguageModel`]. A model *call*
//! is one invocation of [`LanguageModel::next_dists`]; speculative methods
//! score every draft position of a block in one call, the way a transformer
//! scores k x (L + 1) tokens in one batched forward pass.

/// A next-token distribution over a vocabulary, probabilities summing to 1.
pub type Dist = Vec<f64>;

pub trait LanguageModel {
    fn vocab_size(&self) -> usize;

    /// The next-token distribution after each of `contexts` (each a full
    /// token prefix, prompt included), computed in one model call.
    fn next_dists(&self, contexts: &[&[u32]]) -> Vec<Dist>;

    /// One context; the same call, for one row.
    fn next_dist(&self, context: &[u32]) -> Dist {
        self.next_dists(&[context]).pop().expect("one row")
    }

    /// The law of each `tokens[j]` given `tokens[..j]`, for `j` in
    /// `first..tokens.len()`: what an evaluation needs to score a generated
    /// sequence. Not a sampler's call (samplers never use it); a model that
    /// can score a whole sequence in one pass (the decoder) overrides it.
    fn conditionals(&self, tokens: &[u32], first: usize) -> Vec<Dist> {
        (first..tokens.len())
            .map(|j| self.next_dist(&tokens[..j]))
            .collect()
    }
}
