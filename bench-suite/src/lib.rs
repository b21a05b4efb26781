//! The top floor: the runner that applies the time-to-result rules, the
//! records it writes, the scoring, and the renderers.
//!
//! Where to start: [`plan`] turns a command line into (workload, variant,
//! entry) units, [`runner`] executes them under the rules in RULES.md and
//! appends [`records`]; [`summary`] turns records into medians, intervals,
//! paired speedups and performance profiles (with [`stats`]); [`report`]
//! and [`charts`] render those, and [`merge`] and [`compare`] work on saved
//! result directories. The binary (`src/main.rs`) only parses and wires.

pub mod charts;
pub mod compare;
pub mod fingerprint;
pub mod merge;
pub mod pairs;
pub mod plan;
pub mod predict;
pub mod records;
pub mod report;
pub mod runner;
pub mod stats;
pub mod summary;
