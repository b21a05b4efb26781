//! Stand-alone reference implementations (the ground floor).
//!
//! Nothing here knows about workloads, budgets or the runner: each module is
//! a plain, obviously-correct implementation that a workload adapts to its
//! own method trait and that faster methods are checked against.
//!
//! Where to start: [`sampling`] holds the samplers that speculative decoding
//! must reproduce exactly: categorical sampling by inversion, one step of
//! standard speculative sampling, and autoregressive sampling from a
//! next-token function.

pub mod sampling;
pub mod window_attention;
