//! Voxelisation and windowing the way ScatterFormer's released configs do it.
//!
//! Source: github.com/skyhehe123/ScatterFormer at commit
//! a23f434f8fd1f0f2913532e75a614c91f49dc7eb, files
//! `tools/cfgs/{waymo,nuscenes}_models/scatterformer.yaml` and
//! `pcdet/models/backbones_3d/scatterformer.py`. What this module reproduces:
//!
//! | | Waymo | nuScenes |
//! |---|---|---|
//! | `POINT_CLOUD_RANGE` | x, y in [-76.8, 76.8), z in [-2, 4) m | x, y in [-54, 54), z in [-5, 3) m |
//! | `VOXEL_SIZE` | 0.32 x 0.32 x 0.1875 m | 0.3 x 0.3 x 0.2 m |
//! | input grid (x, y, z) | 480 x 480 x 32 | 360 x 360 x 40 |
//! | after the stem's z-stride-2 conv | 480 x 480 x 16 | 360 x 360 x 20 |
//! | `WIN_SIZE` (x, y cells; whole z column) | 12 | 20 |
//! | windows | 40 x 40 | 18 x 18 |
//!
//! The steps, in the order the model applies them:
//!
//! 1. `DynamicVoxelVFE`: a point's voxel is `floor((p - min) / voxel)`;
//!    points whose voxel falls outside the grid are dropped (the dataset's
//!    `mask_points_and_boxes_outside_range` only masks x and y; the VFE's
//!    bounds check drops the rest). The grid size is
//!    `round((max - min) / voxel)`, as pcdet's `VoxelGenerator` computes it.
//! 2. The backbone's stem: submanifold convs (which keep the set of active
//!    voxels), then `post_act_block(dim, dim, (3, 1, 1), stride=(2, 1, 1),
//!    padding=0, conv_type='spconv')` on a sparse shape whose z extent is the
//!    grid's plus one (`self.sparse_shape = grid_size[::-1] + [1, 0, 0]`).
//!    A regular (not submanifold) sparse conv activates every output site
//!    whose receptive field holds an active input, so an input at z level
//!    `p` activates the outputs `o` with `2o <= p <= 2o + 2`: one output for
//!    odd `p` (and `p = 0`), two for even `p >= 2`. This dilation is what the
//!    attention layers see, so it is reproduced here rather than a plain
//!    `p / 2` (which would undercount: a flat ground at an even level gives
//!    two stage-1 voxels per column, not one).
//! 3. `ScatterFormerLayer3x.forward`: window coordinates are
//!    `(batch, y // win, x // win)` (the indices are `(b, z, y, x)`), made
//!    dense by `torch.unique(..., dim=0)` (lexicographic, so windows come in
//!    raster order of `(wy, wx)`), then the voxels are sorted by window and
//!    `counts = bincount`, `offsets = exclusive cumsum` are passed to the
//!    scattered linear attention. [`Windowed`] is that layout. Inside a
//!    window the model's order is whatever `torch.sort` leaves; ours is the
//!    raster order of `(y, x, z)` so that it is deterministic.
//!
//! Stage 2 of the backbone (after a stride-2 conv in all three axes) is not
//! modelled: the workload times the stage-1 attention.

use crate::seed::mix64;

/// A voxel grid and its attention windows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GridConfig {
    pub name: &'static str,
    /// Voxel edge lengths (x, y, z) in metres.
    pub voxel_m: [f64; 3],
    /// Lower corner (inclusive) of the grid, metres.
    pub min_m: [f64; 3],
    /// Upper corner (exclusive) of the grid, metres.
    pub max_m: [f64; 3],
    /// The stem's stride in z: 1 (no z downsampling) or 2 (ScatterFormer's
    /// kernel-3, stride-2, padding-0 sparse conv; see the module docs).
    pub z_stride: u32,
    /// Window size in stage-1 cells along (x, y); a window spans all z.
    pub window: [u32; 2],
}

/// ScatterFormer's Waymo configuration (`waymo_models/scatterformer.yaml`).
pub const WAYMO: GridConfig = GridConfig {
    name: "waymo",
    voxel_m: [0.32, 0.32, 0.1875],
    min_m: [-76.8, -76.8, -2.0],
    max_m: [76.8, 76.8, 4.0],
    z_stride: 2,
    window: [12, 12],
};

/// ScatterFormer's nuScenes configuration (`nuscenes_models/scatterformer.yaml`).
pub const NUSCENES: GridConfig = GridConfig {
    name: "nuscenes",
    voxel_m: [0.3, 0.3, 0.2],
    min_m: [-54.0, -54.0, -5.0],
    max_m: [54.0, 54.0, 3.0],
    z_stride: 2,
    window: [20, 20],
};

impl GridConfig {
    /// Input grid size (x, y, z) in voxels: `round((max - min) / voxel)`.
    pub fn dims(&self) -> [u32; 3] {
        std::array::from_fn(|a| ((self.max_m[a] - self.min_m[a]) / self.voxel_m[a]).round() as u32)
    }

    /// The grid the windows tile: [`dims`](Self::dims) with z after the stem.
    pub fn stage1_dims(&self) -> [u32; 3] {
        let [x, y, z] = self.dims();
        let z1 = match self.z_stride {
            0 | 1 => z,
            // Output size of a kernel-3, padding-0 conv over z + 1 levels.
            s => (z + 1).saturating_sub(3) / s + 1,
        };
        [x, y, z1]
    }

    /// Windows along (x, y): the stage-1 extent divided by the window size,
    /// rounded up (a partial window at the far edge is still a window).
    pub fn windows_xy(&self) -> [u32; 2] {
        let d = self.stage1_dims();
        [d[0].div_ceil(self.window[0]), d[1].div_ceil(self.window[1])]
    }

    /// The input voxel of a point, or `None` outside the grid. Computed in
    /// `f32`, as the model's `DynamicVoxelVFE` does on float32 tensors, so
    /// that points on a cell boundary land where they land there.
    pub fn voxel_of(&self, p: [f32; 3]) -> Option<[u32; 3]> {
        let dims = self.dims();
        let mut v = [0u32; 3];
        for a in 0..3 {
            let c = ((p[a] - self.min_m[a] as f32) / self.voxel_m[a] as f32).floor();
            if c.is_nan() || c < 0.0 || c >= dims[a] as f32 {
                return None;
            }
            v[a] = c as u32;
        }
        Some(v)
    }

    /// The stage-1 z levels an input z level activates (see the module docs):
    /// `(first, second)`, where `second` is `Some` only for the even levels
    /// that feed two outputs.
    pub fn stem_levels(&self, z: u32) -> (u32, Option<u32>) {
        match self.z_stride {
            0 | 1 => (z, None),
            s => {
                let out = self.stage1_dims()[2];
                // Outputs o with s*o <= z <= s*o + 2.
                let hi = (z / s).min(out.saturating_sub(1));
                let lo = z.saturating_sub(2).div_ceil(s);
                if lo < hi {
                    (lo, Some(hi))
                } else {
                    (hi, None)
                }
            }
        }
    }

    /// Appends the stage-1 voxels of `points` to `out` (with repeats; one or
    /// two per point) and returns how many points fell inside the grid.
    pub fn stage1_voxels(&self, points: &[[f32; 3]], out: &mut Vec<[u32; 3]>) -> usize {
        let mut in_range = 0;
        out.reserve(points.len());
        for &p in points {
            if let Some([x, y, z]) = self.voxel_of(p) {
                in_range += 1;
                let (z0, z1) = self.stem_levels(z);
                out.push([x, y, z0]);
                if let Some(z1) = z1 {
                    out.push([x, y, z1]);
                }
            }
        }
        in_range
    }

    /// The window index `(wx, wy)` of a stage-1 voxel.
    pub fn window_xy_of(&self, c: [u32; 3]) -> [u32; 2] {
        [c[0] / self.window[0], c[1] / self.window[1]]
    }

    /// A sort key whose order is the [`Windowed`] order: windows in raster
    /// order of `(wy, wx)`, then `(y, x, z)` raster order inside a window.
    fn order_key(&self, c: [u32; 3]) -> u64 {
        let [wx, wy] = self.window.map(u64::from);
        let nwx = u64::from(self.windows_xy()[0]);
        let nz = u64::from(self.stage1_dims()[2]);
        let (x, y, z) = (u64::from(c[0]), u64::from(c[1]), u64::from(c[2]));
        let window = (y / wy) * nwx + x / wx;
        ((window * wy + y % wy) * wx + x % wx) * nz + z
    }
}

/// Non-empty voxels in window-contiguous order: window `w` holds voxels
/// `offsets[w] .. offsets[w] + counts[w]` (windows in raster order of their
/// `(y, x)` window index, voxels inside a window in `(y, x, z)` raster
/// order). This is the layout ScatterFormer's backbone keeps (it sorts once
/// per stage). Only non-empty windows are listed, as `torch.unique` does.
#[derive(Debug, Clone, PartialEq)]
pub struct Windowed {
    /// The grid the coordinates refer to.
    pub grid: GridConfig,
    /// Stage-1 voxel coordinates `[x, y, z]` (z after the stem's stride).
    pub coords: Vec<[u32; 3]>,
    pub offsets: Vec<u32>,
    pub counts: Vec<u32>,
    /// Input points that fell inside the grid.
    pub points_in_range: usize,
}

/// Window occupancy statistics (voxels per non-empty window). Quantiles
/// interpolate linearly between order statistics (numpy's default).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Occupancy {
    pub windows: usize,
    pub voxels: usize,
    pub mean: f64,
    pub median: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: u32,
}

impl Windowed {
    /// Builds the layout from stage-1 voxels in any order, with repeats.
    ///
    /// # Panics
    /// If a voxel lies outside `grid`'s stage-1 extent, or there are 2^32 or
    /// more voxels.
    pub fn from_voxels(
        grid: GridConfig,
        voxels: Vec<[u32; 3]>,
        points_in_range: usize,
    ) -> Windowed {
        let dims = grid.stage1_dims();
        let mut keyed: Vec<(u64, [u32; 3])> = voxels
            .into_iter()
            .map(|c| {
                assert!(
                    (0..3).all(|a| c[a] < dims[a]),
                    "voxel {c:?} outside the {} stage-1 grid {dims:?}",
                    grid.name
                );
                (grid.order_key(c), c)
            })
            .collect();
        keyed.sort_unstable_by_key(|&(k, _)| k);
        keyed.dedup_by_key(|&mut (k, _)| k);
        assert!(keyed.len() < u32::MAX as usize, "too many voxels");
        let coords: Vec<[u32; 3]> = keyed.into_iter().map(|(_, c)| c).collect();
        let mut offsets = Vec::new();
        let mut counts: Vec<u32> = Vec::new();
        let mut last = None;
        for (i, &c) in coords.iter().enumerate() {
            let w = grid.window_xy_of(c);
            if last != Some(w) {
                offsets.push(i as u32);
                counts.push(0);
                last = Some(w);
            }
            *counts.last_mut().expect("pushed above") += 1;
        }
        Windowed {
            grid,
            coords,
            offsets,
            counts,
            points_in_range,
        }
    }

    pub fn n_voxels(&self) -> usize {
        self.coords.len()
    }

    pub fn n_windows(&self) -> usize {
        self.counts.len()
    }

    /// The (dense, 0-based) window index of every voxel, as the model's
    /// `batch_win_inds` after its sort.
    pub fn window_of_voxel(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.coords.len());
        for (w, &n) in self.counts.iter().enumerate() {
            out.extend(std::iter::repeat_n(w as u32, n as usize));
        }
        out
    }

    /// The `(wx, wy)` grid position of window `w`.
    pub fn window_xy(&self, w: usize) -> [u32; 2] {
        self.grid
            .window_xy_of(self.coords[self.offsets[w] as usize])
    }

    pub fn occupancy(&self) -> Occupancy {
        let mut c = self.counts.clone();
        c.sort_unstable();
        let q = |p: f64| -> f64 {
            if c.is_empty() {
                return 0.0;
            }
            let pos = p * (c.len() - 1) as f64;
            let (lo, frac) = (pos.floor() as usize, pos - pos.floor());
            let hi = (lo + 1).min(c.len() - 1);
            f64::from(c[lo]) * (1.0 - frac) + f64::from(c[hi]) * frac
        };
        Occupancy {
            windows: c.len(),
            voxels: self.coords.len(),
            mean: if c.is_empty() {
                0.0
            } else {
                self.coords.len() as f64 / c.len() as f64
            },
            median: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            max: c.last().copied().unwrap_or(0),
        }
    }

    /// Keeps exactly `n` voxels (all of them if there are fewer), chosen by
    /// a seeded hash of their coordinates: a deterministic, spatially
    /// uniform thinning that does not depend on the voxels' order.
    pub fn thin_to(&self, n: usize, seed: u64) -> Windowed {
        if n >= self.coords.len() {
            return self.clone();
        }
        let salt = mix64(seed ^ 0x7468_696e_5f74_6f00);
        let mut keyed: Vec<(u64, [u32; 3])> = self
            .coords
            .iter()
            .map(|&c| {
                // Injective packing (x < 2^32, y < 2^21, z < 2^11 in any
                // realistic grid), then a bijective mix: distinct voxels get
                // distinct hashes, so the selection has no ties.
                let packed = (u64::from(c[0]) << 32) ^ (u64::from(c[1]) << 11) ^ u64::from(c[2]);
                (mix64(packed ^ salt), c)
            })
            .collect();
        if n > 0 {
            keyed.select_nth_unstable_by_key(n - 1, |&(h, _)| h);
        }
        keyed.truncate(n);
        let kept = keyed.into_iter().map(|(_, c)| c).collect();
        Windowed::from_voxels(self.grid, kept, self.points_in_range)
    }
}

/// Voxelises a point cloud into stage-1 voxels and windows (see the module
/// docs for each step and where it comes from).
pub fn voxelise(points: &[[f32; 3]], grid: &GridConfig) -> Windowed {
    let mut voxels = Vec::new();
    let in_range = grid.stage1_voxels(points, &mut voxels);
    Windowed::from_voxels(*grid, voxels, in_range)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Every structural property [`Windowed`] promises; shared with the
    /// other point-cloud modules' tests.
    pub(crate) fn check_layout(w: &Windowed) {
        let dims = w.grid.stage1_dims();
        assert_eq!(w.offsets.len(), w.counts.len());
        assert!(w.counts.iter().all(|&c| c > 0), "empty window listed");
        let mut next = 0u32;
        for (&o, &c) in w.offsets.iter().zip(&w.counts) {
            assert_eq!(o, next, "windows not contiguous");
            next += c;
        }
        assert_eq!(next as usize, w.n_voxels());
        for c in &w.coords {
            assert!((0..3).all(|a| c[a] < dims[a]), "{c:?} outside {dims:?}");
        }
        let win = w.window_of_voxel();
        assert_eq!(win.len(), w.n_voxels());
        let [nwx, _] = w.grid.windows_xy();
        let mut prev_raster = None;
        for (i, c) in w.coords.iter().enumerate() {
            let [wx, wy] = w.grid.window_xy_of(*c);
            assert_eq!(w.window_xy(win[i] as usize), [wx, wy], "voxel {i}");
            let raster = u64::from(wy) * u64::from(nwx) + u64::from(wx);
            let pos = (raster, c[1], c[0], c[2]);
            if let Some(p) = prev_raster {
                assert!(pos > p, "order or uniqueness broken at voxel {i}");
            }
            prev_raster = Some(pos);
        }
    }

    #[test]
    fn config_dimensions_match_the_released_configs() {
        assert_eq!(WAYMO.dims(), [480, 480, 32]);
        assert_eq!(WAYMO.stage1_dims(), [480, 480, 16]);
        assert_eq!(WAYMO.windows_xy(), [40, 40]);
        assert_eq!(NUSCENES.dims(), [360, 360, 40]);
        assert_eq!(NUSCENES.stage1_dims(), [360, 360, 20]);
        assert_eq!(NUSCENES.windows_xy(), [18, 18]);
    }

    #[test]
    fn stem_matches_a_brute_force_sparse_conv() {
        // Output o of a kernel-3, stride-2, padding-0 conv over Z + 1 levels
        // is active when any of inputs 2o, 2o + 1, 2o + 2 is.
        for grid in [WAYMO, NUSCENES] {
            let z_in = grid.dims()[2] + 1;
            let out = (z_in - 3) / 2 + 1;
            assert_eq!(out, grid.stage1_dims()[2]);
            for p in 0..grid.dims()[2] {
                let brute: Vec<u32> = (0..out).filter(|o| 2 * o <= p && p <= 2 * o + 2).collect();
                let (a, b) = grid.stem_levels(p);
                let ours: Vec<u32> = std::iter::once(a).chain(b).collect();
                assert_eq!(ours, brute, "{} level {p}", grid.name);
            }
        }
    }

    #[test]
    fn points_map_to_the_right_voxels_and_out_of_range_ones_are_dropped() {
        let g = WAYMO;
        assert_eq!(g.voxel_of([-76.8, -76.8, -2.0]), Some([0, 0, 0]));
        assert_eq!(g.voxel_of([0.0, 0.0, 0.0]), Some([240, 240, 10]));
        assert_eq!(g.voxel_of([76.7, 76.7, 3.99]), Some([479, 479, 31]));
        assert_eq!(g.voxel_of([76.8, 0.0, 0.0]), None);
        assert_eq!(g.voxel_of([0.0, 0.0, 4.0]), None);
        assert_eq!(g.voxel_of([0.0, 0.0, -2.01]), None);
        assert_eq!(g.voxel_of([f32::NAN, 0.0, 0.0]), None);
        let w = voxelise(&[[0.0, 0.0, 0.0], [0.1, 0.1, 0.0], [99.0, 0.0, 0.0]], &g);
        assert_eq!(w.points_in_range, 2);
        // One input voxel at even level 10: stage-1 levels 4 and 5.
        assert_eq!(w.coords, vec![[240, 240, 4], [240, 240, 5]]);
        assert_eq!((w.offsets.clone(), w.counts.clone()), (vec![0], vec![2]));
    }

    #[test]
    fn random_clouds_give_a_consistent_layout() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for grid in [WAYMO, NUSCENES] {
            let pts: Vec<[f32; 3]> = (0..20_000)
                .map(|_| {
                    std::array::from_fn(|a| {
                        let (lo, hi) = (grid.min_m[a], grid.max_m[a]);
                        // A little outside the grid too.
                        rng.random_range(lo - 1.0..hi + 1.0) as f32
                    })
                })
                .collect();
            let w = voxelise(&pts, &grid);
            check_layout(&w);
            assert!(w.points_in_range < pts.len() && w.points_in_range > pts.len() / 2);
            // Against a brute-force set of (window, voxel) pairs.
            let mut brute: Vec<[u32; 3]> = Vec::new();
            grid.stage1_voxels(&pts, &mut brute);
            brute.sort_unstable();
            brute.dedup();
            let mut ours = w.coords.clone();
            ours.sort_unstable();
            assert_eq!(ours, brute);
            let occ = w.occupancy();
            assert_eq!(occ.voxels, w.n_voxels());
            assert_eq!(occ.windows, w.n_windows());
            assert_eq!(occ.max, *w.counts.iter().max().unwrap());
        }
    }

    #[test]
    fn occupancy_quantiles_interpolate_like_numpy() {
        let grid = GridConfig {
            window: [1, 1],
            ..WAYMO
        };
        // Windows of 1, 2, 3 and 10 voxels (one per x column, z stacked).
        let mut voxels = Vec::new();
        for (x, n) in [(0u32, 1u32), (1, 2), (2, 3), (3, 10)] {
            voxels.extend((0..n).map(|z| [x, 0, z]));
        }
        let w = Windowed::from_voxels(grid, voxels, 16);
        let o = w.occupancy();
        assert_eq!((o.windows, o.voxels, o.max), (4, 16, 10));
        assert_eq!(o.mean, 4.0);
        assert_eq!(o.median, 2.5); // numpy.median([1, 2, 3, 10])
        assert!((o.p90 - 7.9).abs() < 1e-12); // numpy.percentile(.., 90)
        assert!((o.p99 - 9.79).abs() < 1e-12);
    }

    #[test]
    fn thinning_keeps_exactly_n_deterministically() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let pts: Vec<[f32; 3]> = (0..5_000)
            .map(|_| {
                std::array::from_fn(|a| rng.random_range(WAYMO.min_m[a]..WAYMO.max_m[a]) as f32)
            })
            .collect();
        let w = voxelise(&pts, &WAYMO);
        for n in [0, 1, 777, w.n_voxels() - 1, w.n_voxels(), w.n_voxels() + 5] {
            let t = w.thin_to(n, 9);
            assert_eq!(t.n_voxels(), n.min(w.n_voxels()));
            check_layout(&t);
            assert_eq!(t, w.thin_to(n, 9));
            // A subset of the original.
            assert!(t.coords.iter().all(|c| w
                .coords
                .binary_search_by_key(&WAYMO.order_key(*c), |d| WAYMO.order_key(*d))
                .is_ok()));
        }
        assert_ne!(w.thin_to(777, 9).coords, w.thin_to(777, 10).coords);
    }
}
