//! Stand-alone reference implementations.
