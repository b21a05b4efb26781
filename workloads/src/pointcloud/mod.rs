//! Workload `point-cloud-sla`: ScatterFormer's Scattered Linear Attention
//! (He et al., "ScatterFormer: Efficient Voxel Transformer with Scattered
//! Linear Attention", ECCV 2024, arXiv 2401.00912) against the sort-and-pad
//! window attention it replaces. (Work in progress: the spec lands with the
//! jobs.)
//!
//! Modules: [`lidar`] (the ray-cast LiDAR simulator), [`voxel`]
//! (voxelisation and windows), [`stereo`] (the Middlebury capture),
//! [`sla`] (the CPU operator and its float64 reference).

pub mod lidar;
pub mod sla;
pub mod stereo;
pub mod voxel;
#[cfg(feature = "cuda")]
pub mod cuda;
