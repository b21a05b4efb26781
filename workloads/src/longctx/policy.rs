//! What a long-context method is to the workload: a way to build a
//! [`KvCache`] for one prompt, either from the shared dense prefill ([`Policy::from_dense`], methods
//! that only change what decoding reads) or empty, to run its own prefill
//! ([`Policy::empty`], methods that change prefill itself, such as DHSA).
//!
//! The budget is a number of positions per layer and KV head: how many a
//! compressing cache keeps, or how many a sparse cache lets one query read.
//! It is a fraction of the prompt's length, fixed when the cache is built,
//! so every method of a configuration works to the same figure.

use super::snapkv::WindowQueries;
use crate::decoder::{DenseKv, KvCache, KvShape};

/// Everything a policy is told about the prompt it will serve.
#[derive(Debug, Clone, Copy)]
pub struct Plan<'a> {
    pub shape: KvShape,
    /// Tokens in the prompt (the context length).
    pub context: usize,
    /// Positions per layer and KV head a step may keep or read.
    pub budget: usize,
    /// Token ids of the prompt, in order.
    pub prompt: &'a [u32],
    /// `boundary[t]`: token `t` of the vocabulary ends a sentence or a line
    /// (its text holds `.`, `!`, `?`, `;` or a newline). Chunking policies
    /// without a trained boundary predictor cut chunks there.
    pub boundary: &'a [bool],
    /// Positions the decoder may add after the prompt (answer tokens), so a
    /// cache can reserve room.
    pub max_new: usize,
    /// `whole_heads[layer * n_kv_heads + h]`: the method's own offline
    /// calibration marked this KV head to keep its whole cache
    /// (`kv-cluster`'s full-cache heads); empty for methods without one.
    pub whole_heads: &'a [bool],
    /// The prompt's last queries, recorded by the shared dense prefill
    /// (`snapkv`'s observation window); `None` where the prefill was not
    /// observed (the GPU decoder, a method's own prefill).
    pub window: Option<&'a WindowQueries>,
}

impl Plan<'_> {
    /// Whether token `t` ends a chunk (false for ids outside the table).
    pub fn is_boundary(&self, t: u32) -> bool {
        self.boundary.get(t as usize).copied().unwrap_or(false)
    }
}

/// A long-context method.
pub trait Policy: Sync {
    /// The entry id this policy implements.
    fn id(&self) -> &'static str;

    /// The cache to decode with, built from a dense prefill of
    /// `plan.prompt` (this work is timed: on its own the method would do
    /// it after its prefill).
    // Not a conversion of `self`: the policy builds a cache from `dense`.
    #[allow(clippy::wrong_self_convention)]
    fn from_dense(&self, dense: &DenseKv, plan: &Plan<'_>) -> Box<dyn KvCache>;

    /// For a method that changes prefill itself: an empty cache that the
    /// decoder prefills with the prompt (the prefill is then the method's
    /// own, and timed as such). `None` (the default) means the method
    /// starts from the shared dense prefill through [`Policy::from_dense`].
    fn empty(&self, plan: &Plan<'_>) -> Option<Box<dyn KvCache>> {
        let _ = plan;
        None
    }

    /// For a method that keeps some KV heads whole by an offline
    /// calibration (`kv-cluster`): the share of heads it keeps, which the
    /// workload's untimed set-up calibrates and passes in
    /// [`Plan::whole_heads`]. `None` (the default): no calibration.
    fn whole_share(&self) -> Option<f64> {
        None
    }
}
