//! bench-suite
