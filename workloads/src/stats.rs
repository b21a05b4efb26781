//! Goodness-of-fit tests used by workload evaluation and sampler tests.
