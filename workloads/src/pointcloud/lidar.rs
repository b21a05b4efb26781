//! A ray-cast spinning-LiDAR simulator over procedurally generated streets,
//! written for this project: the data of the `point-cloud-sla` workload's
//! synthetic variants, since Waymo and nuScenes frames cannot be shipped.
//!
//! What it models. A [`Sensor`] fires every beam at every azimuth step of
//! one revolution; each ray returns the first surface it meets (occlusion),
//! if that is within the maximum range, with Gaussian range noise; a small
//! random fraction of returns is dropped. Range-dependent density (rings
//! that spread with distance, dense near the vehicle) follows from the
//! geometry. The world ([`Scene::street`]) is a flat ground plane and a
//! straight street: raised sidewalks, buildings on both sides (continuous
//! city blocks, houses behind yards, or open lots, with gaps, varied
//! set-backs and cross streets), rows of houses and trees behind them out
//! past the sensor's range, parked cars and moving traffic, poles with lamp
//! arms, street and garden trees (trunk + ellipsoid crown), hedges and
//! bushes, and pedestrians. Foliage returns from inside its volume
//! ([`Material::Foliage`]), as real crowns do. Everything is deterministic
//! in a `u64` seed (ChaCha8 streams, one per street block and per sweep).
//!
//! Speed. A uniform 2-D grid of 2 m cells over object footprints,
//! walked cell by cell along each ray (Amanatides and Woo), so a ray tests
//! only the objects near it and stops at the first cell beyond its nearest
//! hit. A Waymo-like sweep (169,600 rays) takes about 21 ms on one core of
//! the development machine (release build; 15-25 ms over 20 seeds).
//!
//! Frames. [`waymo_like`] is one [`WAYMO_TOP`] sweep in the vehicle frame
//! (origin on the ground under the sensor), voxelised with ScatterFormer's
//! Waymo grid ([`voxel::WAYMO`]); [`nuscenes_like`] one [`NUSCENES`] sweep
//! in the lidar frame (origin at the sensor, ground at -1.84 m) with the
//! nuScenes grid. The vehicle heads along the street with a small random
//! yaw. [`scaling`] accumulates a drive for the 10k-1M voxel chart.
//!
//! Measured against published sweep sizes (seeds 0-19; `cargo run`-style
//! release build; the tests check seeds 0-2):
//!
//! | | published | measured here |
//! |---|---|---|
//! | Waymo top LiDAR returns per sweep | at most 169,600 (its range image is 64 x 2,650; Sun et al., CVPR 2020, range truncated at 75 m) | 146,976-160,967 (mean 154,724) |
//! | nuScenes HDL-32E returns per sweep | ~34k points per frame (NVIDIA NCore's nuScenes converter docs, nvidia.github.io/ncore), of 32 x 1,080 = 34,560 ray slots | 29,993-32,981 (mean 31,609) |
//!
//! No primary source for the Waymo top LiDAR's *valid* returns per frame
//! was found; the 64 x 2,650 range image bounds it, and the 150k-180k band
//! this simulator aims for is the project's own target. Our returns fall
//! short of the bound mostly in the near-horizontal beams (+2.4 to -1.5
//! degrees), which pass over low suburban houses to the open sky, as real
//! ones do.
//!
//! Voxels and windows (stage-1, after the stem's z stride; see
//! [`voxel`] for how the stem's sparse conv dilates z):
//!
//! | frame | voxels | windows | voxels per window: median, mean, p99, max |
//! |---|---|---|---|
//! | waymo-like, seed 0 | 33,657 | 641 | 28, 52.5, 283, 316 |
//! | waymo-like, seeds 0-19 | 20,945-36,693 (median 32,093) | 432-768 | 26-32, 46-63, 260-315, 312-459 |
//! | nuscenes-like, seed 0 | 10,131 | 140 | 31.5, 72.4, 446, 551 |
//! | reference (a similar generator, quoted in the task) | 37,511 | 1,437 | 9, 26, 250, 893 |
//!
//! The waymo-like frames are in the reference's voxel regime with a long
//! tail (max/median 10.4-15.8 over 20 seeds), but less extreme: the stem's
//! z dilation puts a flat ground at z = 0 (input level 10, even) into two
//! stage-1 levels, doubling the sparse ground-only windows that set the
//! median, and ray casting leaves the ground behind buildings unseen, so
//! fewer (and fuller) windows are occupied than in the reference.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::voxel::{self, GridConfig, Windowed};
use crate::seed::{derive, mix64};

/// A spinning multi-beam LiDAR: every azimuth step fires every beam once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sensor {
    pub name: &'static str,
    pub beams: u32,
    /// Elevation of the highest beam, degrees above the horizon.
    pub elevation_top_deg: f64,
    /// Elevation of the lowest beam (negative: below the horizon).
    pub elevation_bottom_deg: f64,
    /// `None`: beams evenly spaced in elevation. `Some(e)`: the spacing
    /// grows as `1 + |elevation| / e`, so beams crowd near the horizon,
    /// where far objects are.
    pub horizon_scale_deg: Option<f64>,
    /// Azimuth steps per revolution.
    pub azimuth_steps: u32,
    /// Height of the optical centre above the ground, metres.
    pub height_m: f64,
    /// Returns beyond this range are not reported.
    pub max_range_m: f64,
    /// Standard deviation of the Gaussian range noise, metres.
    pub range_noise_m: f64,
    /// Probability that a return is lost (dark or specular surfaces, ...).
    pub dropout: f64,
}

/// The Waymo Open Dataset's top LiDAR as its paper and range images
/// describe it: 64 beams over [-17.6, +2.4] degrees, 2,650 azimuth columns,
/// range truncated at 75 m; mounted about 2 m above the ground.
pub const WAYMO_TOP: Sensor = Sensor {
    name: "waymo-top",
    beams: 64,
    elevation_top_deg: 2.4,
    elevation_bottom_deg: -17.6,
    horizon_scale_deg: Some(40.0),
    azimuth_steps: 2650,
    height_m: 2.0,
    max_range_m: 75.0,
    range_noise_m: 0.02,
    dropout: 0.01,
};

/// nuScenes' Velodyne HDL-32E as the dataset states it: 32 beams over
/// [-30, +10] degrees (evenly spaced here), 20 Hz, usable returns to 70 m,
/// +-2 cm accuracy; about 1,080 azimuth steps per revolution; mounted
/// 1.84 m above the ground.
pub const NUSCENES: Sensor = Sensor {
    name: "nuscenes-hdl32e",
    beams: 32,
    elevation_top_deg: 10.0,
    elevation_bottom_deg: -30.0,
    horizon_scale_deg: None,
    azimuth_steps: 1080,
    height_m: 1.84,
    max_range_m: 70.0,
    range_noise_m: 0.02,
    dropout: 0.01,
};

impl Sensor {
    /// Beam elevations in radians, highest first.
    pub fn elevations_rad(&self) -> Vec<f64> {
        let n = self.beams.max(1) as usize;
        let (top, bottom) = (self.elevation_top_deg, self.elevation_bottom_deg);
        // Evenly spaced in a warped angle F(e); the spacing in e is then
        // proportional to 1 / F'(e) = 1 + |e| / scale.
        let scale = self.horizon_scale_deg;
        let warp = |e: f64| match scale {
            None => e,
            Some(s) => e.signum() * s * (e.abs() / s).ln_1p(),
        };
        let unwarp = |f: f64| match scale {
            None => f,
            Some(s) => f.signum() * s * (f.abs() / s).exp_m1(),
        };
        let (f0, f1) = (warp(top), warp(bottom));
        (0..n)
            .map(|i| {
                let u = if n == 1 {
                    0.0
                } else {
                    i as f64 / (n - 1) as f64
                };
                unwarp(f0 + (f1 - f0) * u).to_radians()
            })
            .collect()
    }

    /// Rays per revolution.
    pub fn rays(&self) -> usize {
        self.beams as usize * self.azimuth_steps as usize
    }
}

/// A primitive solid. Boxes and cylinders stand upright; `z` is their
/// vertical extent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shape {
    /// A box with vertical sides, rotated by `yaw` radians about z.
    Box {
        center: [f64; 2],
        half: [f64; 2],
        yaw: f64,
        z: [f64; 2],
    },
    /// A vertical cylinder.
    Cylinder {
        center: [f64; 2],
        radius: f64,
        z: [f64; 2],
    },
    /// An axis-aligned ellipsoid.
    Ellipsoid { center: [f64; 3], radii: [f64; 3] },
}

/// How a ray interacts with an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Material {
    /// The first surface returns.
    Solid,
    /// Foliage: the return comes from inside the volume, at an exponentially
    /// distributed depth (mean [`FOLIAGE_DEPTH_M`]); a ray whose sampled
    /// depth exceeds the chord passes through. This gives crowns the
    /// volumetric scatter real returns show instead of a hard shell.
    Foliage,
}

/// Mean penetration depth of a ray into foliage, metres.
pub const FOLIAGE_DEPTH_M: f64 = 0.6;

/// Constant-velocity motion in the ground plane.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Motion {
    pub velocity: [f64; 2],
    /// The x of the vehicle the object belongs to: parts of one vehicle wrap
    /// around the street's ends together.
    pub anchor_x: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Object {
    pub shape: Shape,
    pub material: Material,
    pub motion: Option<Motion>,
}

impl Object {
    pub fn solid(shape: Shape) -> Object {
        Object {
            shape,
            material: Material::Solid,
            motion: None,
        }
    }
}

/// A scene: the ground plane z = 0 plus objects.
#[derive(Debug, Clone, Default)]
pub struct Scene {
    pub objects: Vec<Object>,
    /// Moving objects wrap around within this x interval (so that a long
    /// drive keeps its traffic); `None`: they drive on forever.
    pub wrap_x: Option<[f64; 2]>,
}

/// Where and when a sweep is taken: the sensor stands `height_m` above the
/// ground point `(x, y)`; moving objects are where they are at `time_s`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pose {
    pub x: f64,
    pub y: f64,
    pub time_s: f64,
}

/// Lane width, metres.
const LANE_M: f64 = 3.5;
/// The street is generated in independent blocks of this length, each from
/// its own seed, so a longer street extends a shorter one.
const BLOCK_M: f64 = 48.0;

/// Street-wide layout, drawn once per scene.
#[derive(Debug, Clone, Copy)]
struct Layout {
    lanes: u32,
    parking: [bool; 2],
    road_half: f64,
    sidewalk: [f64; 2],
    setback: [f64; 2],
    tree_spacing: f64,
    urban: f64,
}

impl Layout {
    fn draw(seed: u64, urban: f64) -> Layout {
        let mut rng = ChaCha8Rng::seed_from_u64(derive(seed, &["layout"]));
        let lanes = if rng.random_bool(0.5) { 1 } else { 2 };
        let parking = [rng.random_bool(0.8), rng.random_bool(0.8)];
        Layout {
            lanes,
            parking,
            road_half: f64::from(lanes) * LANE_M + 2.2,
            sidewalk: [rng.random_range(2.5..5.0), rng.random_range(2.5..5.0)],
            setback: [rng.random_range(0.0..5.0), rng.random_range(0.0..5.0)],
            tree_spacing: rng.random_range(7.0..14.0),
            urban,
        }
    }

    /// The y of the ego vehicle: the centre of the rightmost driving lane
    /// heading +x (right-hand traffic, the -y side).
    fn ego_y(&self) -> f64 {
        -LANE_M / 2.0
    }
}

impl Scene {
    /// Ground plane only.
    pub fn empty() -> Scene {
        Scene::default()
    }

    /// A straight street along x covering at least `[x_from, x_to)`:
    /// buildings on both sides with gaps and varied set-backs, sidewalks,
    /// parked and moving vehicles, poles, trees (trunk + ellipsoid crown),
    /// bushes and pedestrians. Every block of the street comes from its own
    /// seed, so the same `seed` always gives the same street.
    ///
    /// `urban` in [0, 1] is the share of block sides lined by continuous
    /// city buildings (and of taller rows behind them); the rest are
    /// suburban houses behind yards or open lots. Suburbs let the sensor see
    /// far between houses; city streets return more of the near-horizontal
    /// rays.
    pub fn street(seed: u64, x_from: f64, x_to: f64, urban: f64) -> Scene {
        let layout = Layout::draw(seed, urban.clamp(0.0, 1.0));
        let b0 = (x_from / BLOCK_M).floor() as i64;
        let b1 = (x_to / BLOCK_M).ceil() as i64;
        let mut objects = Vec::new();
        for b in b0..b1 {
            street_block(seed, &layout, b, &mut objects);
        }
        Scene {
            objects,
            wrap_x: Some([b0 as f64 * BLOCK_M, b1 as f64 * BLOCK_M]),
        }
    }

    /// The y of the ego lane in [`Scene::street`] scenes of this seed.
    pub fn street_ego_y(seed: u64) -> f64 {
        Layout::draw(seed, 0.0).ego_y()
    }
}

fn car(
    rng: &mut ChaCha8Rng,
    x: f64,
    y: f64,
    yaw: f64,
    motion: Option<Motion>,
    out: &mut Vec<Object>,
) {
    let big = rng.random_bool(0.12);
    let (len, wid, h) = if big {
        (
            rng.random_range(6.0..11.0),
            rng.random_range(2.2..2.5),
            rng.random_range(2.4..3.4),
        )
    } else {
        (
            rng.random_range(3.8..5.0),
            rng.random_range(1.7..1.95),
            rng.random_range(1.4..1.65),
        )
    };
    let (c, s) = (yaw.cos(), yaw.sin());
    let push = |shape, out: &mut Vec<Object>| {
        out.push(Object {
            shape,
            material: Material::Solid,
            motion,
        })
    };
    if big {
        push(
            Shape::Box {
                center: [x, y],
                half: [len / 2.0, wid / 2.0],
                yaw,
                z: [0.35, h],
            },
            out,
        );
        return;
    }
    // Body, with ground clearance (rays pass under it), then a shorter,
    // narrower cabin set back a little.
    push(
        Shape::Box {
            center: [x, y],
            half: [len / 2.0, wid / 2.0],
            yaw,
            z: [0.25, 0.95],
        },
        out,
    );
    let back = -0.06 * len;
    push(
        Shape::Box {
            center: [x + c * back, y + s * back],
            half: [len * 0.28, wid / 2.0 - 0.08],
            yaw,
            z: [0.95, h],
        },
        out,
    );
}

fn tree(rng: &mut ChaCha8Rng, x: f64, y: f64, out: &mut Vec<Object>) {
    // The crown starts at `trunk_h`: rays heading for the ground a few
    // tens of metres away pass under it, near-horizontal ones end in it.
    let trunk_h = rng.random_range(2.0..3.5);
    out.push(Object::solid(Shape::Cylinder {
        center: [x, y],
        radius: rng.random_range(0.12..0.25),
        z: [0.0, trunk_h + 0.5],
    }));
    let rxy = rng.random_range(1.5..3.5);
    let rz = rng.random_range(1.5..3.0);
    out.push(Object {
        shape: Shape::Ellipsoid {
            center: [x, y, trunk_h + rz],
            radii: [rxy, rxy * rng.random_range(0.85..1.15), rz],
        },
        material: Material::Foliage,
        motion: None,
    });
}

fn bush(rng: &mut ChaCha8Rng, x: f64, y: f64, out: &mut Vec<Object>) {
    let rz = rng.random_range(0.4..0.9);
    out.push(Object {
        shape: Shape::Ellipsoid {
            center: [x, y, 0.8 * rz],
            radii: [rng.random_range(0.5..1.6), rng.random_range(0.5..1.2), rz],
        },
        material: Material::Foliage,
        motion: None,
    });
}

/// A hedge along x from `x_from` to `x_to`: a chain of overlapping foliage
/// ellipsoids.
fn hedge(rng: &mut ChaCha8Rng, x_from: f64, x_to: f64, y: f64, out: &mut Vec<Object>) {
    let h = rng.random_range(0.5..0.9);
    let mut x = x_from + 0.8;
    while x < x_to - 0.8 {
        out.push(Object {
            shape: Shape::Ellipsoid {
                center: [x, y, 0.9 * h],
                radii: [1.2, rng.random_range(0.45..0.7), h],
            },
            material: Material::Foliage,
            motion: None,
        });
        x += 1.6;
    }
}

/// What lines one side of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frontage {
    /// Terraced city buildings, tall and short, with the odd gap.
    Dense,
    /// Detached low houses set back behind yards.
    Suburban,
    /// A parking lot or an empty lot.
    Open,
}

/// Places buildings along `[x_from, x_to)` at distance `front()` from the
/// street axis on `side`, skipping the cross-street band. Gaps, lengths,
/// depths and heights come from the closures; vegetation or cars fill wide
/// gaps.
struct Row<'a> {
    side: f64,
    cross: Option<[f64; 2]>,
    gap: &'a dyn Fn(&mut ChaCha8Rng) -> f64,
    len: &'a dyn Fn(&mut ChaCha8Rng) -> f64,
    depth: &'a dyn Fn(&mut ChaCha8Rng) -> f64,
    height: &'a dyn Fn(&mut ChaCha8Rng) -> f64,
    front: &'a dyn Fn(&mut ChaCha8Rng) -> f64,
}

impl Row<'_> {
    /// Returns the `(x_from, x_to, front)` of every building placed.
    fn place(
        &self,
        rng: &mut ChaCha8Rng,
        x_from: f64,
        x_to: f64,
        out: &mut Vec<Object>,
    ) -> Vec<[f64; 3]> {
        let mut placed = Vec::new();
        let mut x = x_from;
        while x < x_to - 4.0 {
            x += (self.gap)(rng);
            let mut len = (self.len)(rng).min(x_to - x);
            if let Some([c0, c1]) = self.cross {
                if x + len > c0 && x < c1 {
                    if x >= c0 - 4.0 {
                        x = c1;
                        continue;
                    }
                    len = c0 - x;
                }
            }
            if len < 4.0 {
                break;
            }
            let front = (self.front)(rng);
            let depth = (self.depth)(rng);
            out.push(Object::solid(Shape::Box {
                center: [x + len / 2.0, self.side * (front + depth / 2.0)],
                half: [len / 2.0, depth / 2.0],
                yaw: 0.0,
                z: [0.0, (self.height)(rng)],
            }));
            placed.push([x, x + len, front]);
            x += len;
        }
        placed
    }
}

/// One block `[b * BLOCK_M, (b + 1) * BLOCK_M)` of the street, both sides.
fn street_block(seed: u64, layout: &Layout, b: i64, out: &mut Vec<Object>) {
    let mut rng = ChaCha8Rng::seed_from_u64(derive(seed, &["block", &b.to_string()]));
    let (x0, x1) = (b as f64 * BLOCK_M, (b + 1) as f64 * BLOCK_M);
    let rh = layout.road_half;
    // A cross street: a band where nothing lines the street, opening the
    // view sideways to the sensor's full range.
    let cross = rng.random_bool(0.4).then(|| {
        let w = rng.random_range(14.0..24.0);
        let c = rng.random_range(x0 + w / 2.0..x1 - w / 2.0);
        [c - w / 2.0, c + w / 2.0]
    });
    let in_cross = |x: f64| cross.is_some_and(|[c0, c1]| x > c0 - 1.0 && x < c1 + 1.0);
    for (si, side) in [-1.0f64, 1.0].into_iter().enumerate() {
        let walk_out = rh + layout.sidewalk[si];
        // Raised sidewalk.
        out.push(Object::solid(Shape::Box {
            center: [(x0 + x1) / 2.0, side * (rh + walk_out) / 2.0],
            half: [BLOCK_M / 2.0, layout.sidewalk[si] / 2.0],
            yaw: 0.0,
            z: [0.0, 0.15],
        }));
        let line = walk_out + layout.setback[si];
        let f: f64 = rng.random();
        let frontage = if f < layout.urban {
            Frontage::Dense
        } else if f < layout.urban + 0.55 * (1.0 - layout.urban) {
            Frontage::Suburban
        } else {
            Frontage::Open
        };
        let placed = match frontage {
            Frontage::Dense => Row {
                side,
                cross,
                gap: &|r| {
                    let g: f64 = r.random();
                    if g < 0.35 {
                        r.random_range(0.0..0.6)
                    } else if g < 0.8 {
                        r.random_range(2.0..8.0)
                    } else {
                        r.random_range(12.0..25.0)
                    }
                },
                len: &|r| r.random_range(8.0..35.0),
                depth: &|r| r.random_range(8.0..25.0),
                height: &|r| {
                    if r.random_bool(0.6) {
                        r.random_range(4.0..12.0)
                    } else {
                        r.random_range(12.0..40.0)
                    }
                },
                front: &|r| {
                    line + if r.random_bool(0.5) {
                        r.random_range(0.0..5.0)
                    } else {
                        0.0
                    }
                },
            }
            .place(&mut rng, x0, x1, out),
            Frontage::Suburban => Row {
                side,
                cross,
                gap: &|r| r.random_range(5.0..20.0),
                len: &|r| r.random_range(9.0..16.0),
                depth: &|r| r.random_range(8.0..14.0),
                height: &|r| r.random_range(3.5..7.0),
                front: &|r| line + r.random_range(6.0..20.0),
            }
            .place(&mut rng, x0, x1, out),
            Frontage::Open => {
                // A lot: rows of parked cars and a few trees.
                if rng.random_bool(0.5) {
                    let ly = line + rng.random_range(3.0..10.0);
                    for row in 0..rng.random_range(1..3) {
                        let mut cx = x0 + rng.random_range(1.0..4.0);
                        while cx < x1 - 2.0 {
                            if !in_cross(cx) && rng.random_bool(0.6) {
                                let y = side * (ly + 7.0 * f64::from(row));
                                car(&mut rng, cx, y, std::f64::consts::FRAC_PI_2, None, out);
                            }
                            cx += 2.7;
                        }
                    }
                }
                for _ in 0..rng.random_range(1..7) {
                    let tx = rng.random_range(x0..x1);
                    let ty = side * (line + rng.random_range(2.0..30.0));
                    if !in_cross(tx) {
                        tree(&mut rng, tx, ty, out);
                    }
                }
                Vec::new()
            }
        };
        // Yards: annexes, bushes and garden trees in front of buildings;
        // wide gaps hold a tree or a few cars.
        let mut prev_end = x0;
        for &[bx0, bx1, front] in &placed {
            let yard = front - walk_out;
            if yard > 2.5 && frontage == Frontage::Dense && rng.random_bool(0.3) {
                // A low annex (shop front, porch) in front of the building.
                let d = rng.random_range(1.5..yard.min(4.0));
                let l = (bx1 - bx0) * rng.random_range(0.3..0.9);
                out.push(Object::solid(Shape::Box {
                    center: [(bx0 + bx1) / 2.0, side * (front - d / 2.0)],
                    half: [l / 2.0, d / 2.0],
                    yaw: 0.0,
                    z: [0.0, rng.random_range(2.5..4.5)],
                }));
            } else if yard > 1.5 {
                if rng.random_bool(0.5) {
                    hedge(&mut rng, bx0, bx1, side * (walk_out + 0.7), out);
                }
                for _ in 0..rng.random_range(0..4) {
                    let x = rng.random_range(bx0..bx1);
                    let y = side * rng.random_range(walk_out + 0.7..front - 0.5);
                    bush(&mut rng, x, y, out);
                }
                if yard > 6.0 && rng.random_bool(0.6) {
                    let x = rng.random_range(bx0..bx1);
                    let y = side * rng.random_range(walk_out + 2.0..front - 2.0);
                    tree(&mut rng, x, y, out);
                }
            }
            let gap = bx0 - prev_end;
            if gap > 6.0 && !in_cross(prev_end + gap / 2.0) {
                let gx = prev_end + gap / 2.0;
                let gy = side * (line + rng.random_range(2.0..10.0));
                if rng.random_bool(0.5) {
                    tree(&mut rng, gx, gy, out);
                } else {
                    for k in 0..rng.random_range(1..4) {
                        let cx = prev_end + 2.0 + 2.6 * k as f64;
                        if cx < bx0 - 1.5 {
                            car(&mut rng, cx, gy, std::f64::consts::FRAC_PI_2, None, out);
                        }
                    }
                }
            }
            prev_end = bx1;
        }
        // Behind the frontage, more rows of buildings out past the
        // sensor's range, with yards and trees between them: the ground
        // between rows is seen through the gaps, while near-horizontal rays
        // end on some row, as in a suburb.
        let mut y_row = placed.iter().map(|p| p[2]).fold(line, f64::max)
            + if frontage == Frontage::Open {
                rng.random_range(30.0..60.0)
            } else {
                rng.random_range(22.0..35.0)
            };
        while y_row < 90.0 {
            let dense = rng.random_bool(layout.urban.max(0.2));
            let front = y_row;
            let kind: f64 = rng.random();
            if kind < 0.4 {
                Row {
                    side,
                    cross,
                    gap: &|r| r.random_range(5.0..20.0),
                    len: &|r| r.random_range(8.0..16.0),
                    depth: &|r| r.random_range(8.0..14.0),
                    height: &|r| {
                        if dense {
                            r.random_range(8.0..25.0)
                        } else {
                            r.random_range(5.0..12.0)
                        }
                    },
                    front: &|r| front + r.random_range(0.0..4.0),
                }
                .place(&mut rng, x0, x1, out);
            } else if kind < 0.92 {
                // A row of trees (a park edge, a garden line).
                let mut tx = x0 + rng.random_range(0.0..6.0);
                while tx < x1 {
                    if !in_cross(tx) {
                        let ty = side * (front + rng.random_range(-5.0..5.0));
                        tree(&mut rng, tx, ty, out);
                    }
                    tx += rng.random_range(4.0..9.0);
                }
            }
            for _ in 0..rng.random_range(0..4) {
                let tx = rng.random_range(x0..x1);
                let ty = side * (y_row - rng.random_range(3.0..12.0));
                if !in_cross(tx) {
                    tree(&mut rng, tx, ty, out);
                }
            }
            y_row += rng.random_range(25.0..38.0);
        }
        // Street trees and poles along the kerb.
        let mut t = x0 + rng.random_range(0.0..layout.tree_spacing);
        while t < x1 {
            if !in_cross(t) && rng.random_bool(0.8) {
                let ty = side * (rh + rng.random_range(0.8..1.5));
                tree(&mut rng, t, ty, out);
            }
            t += layout.tree_spacing * rng.random_range(0.8..1.2);
        }
        let mut p = x0 + rng.random_range(0.0..30.0);
        while p < x1 {
            let h = rng.random_range(4.0..9.0);
            let py = side * (rh + 0.4);
            out.push(Object::solid(Shape::Cylinder {
                center: [p, py],
                radius: rng.random_range(0.08..0.15),
                z: [0.0, h],
            }));
            if h > 6.0 {
                // A lamp arm over the road.
                out.push(Object::solid(Shape::Box {
                    center: [p, py - side * 0.9],
                    half: [0.1, 0.9],
                    yaw: 0.0,
                    z: [h - 0.25, h - 0.05],
                }));
            }
            p += rng.random_range(20.0..35.0);
        }
        // Parked cars along the kerb.
        if layout.parking[si] {
            let py = side * (rh - 1.1);
            let mut c = x0 + rng.random_range(0.0..4.0);
            while c < x1 - 2.5 {
                if !in_cross(c + 2.5) && rng.random_bool(0.7) {
                    let yaw = rng.random_range(-0.04..0.04);
                    let y = py + rng.random_range(-0.15..0.15);
                    car(&mut rng, c + 2.5, y, yaw, None, out);
                    c += 5.5;
                }
                c += rng.random_range(0.6..4.0);
            }
        }
        // Pedestrians on the sidewalk, alone or in small groups.
        for _ in 0..rng.random_range(0..4) {
            let gx = rng.random_range(x0..x1);
            let gy = side * rng.random_range(rh + 0.5..walk_out - 0.3);
            for k in 0..rng.random_range(1..4) {
                out.push(Object::solid(Shape::Cylinder {
                    center: [gx + 0.6 * k as f64, gy + rng.random_range(-0.3..0.3)],
                    radius: rng.random_range(0.2..0.28),
                    z: [0.0, rng.random_range(1.5..1.9)],
                }));
            }
        }
        // Moving traffic: right-hand, so the -y side drives +x. The ego's
        // lane (the inner -y lane) is left free.
        for lane in 0..layout.lanes {
            if side < 0.0 && lane == 0 {
                continue;
            }
            let ly = side * LANE_M * (f64::from(lane) + 0.5);
            let mut c = x0 + rng.random_range(0.0..30.0);
            while c < x1 {
                let v = -side * rng.random_range(6.0..14.0);
                let motion = Some(Motion {
                    velocity: [v, 0.0],
                    anchor_x: c,
                });
                car(&mut rng, c, ly, 0.0, motion, out);
                c += rng.random_range(20.0..60.0);
            }
        }
    }
}

/// A primitive prepared for fast ray tests (trigonometry done once).
#[derive(Debug, Clone, Copy)]
struct Prim {
    kind: PrimKind,
    foliage: bool,
}

#[derive(Debug, Clone, Copy)]
enum PrimKind {
    Box {
        c: [f64; 2],
        half: [f64; 2],
        cos: f64,
        sin: f64,
        z: [f64; 2],
    },
    Cylinder {
        c: [f64; 2],
        r2: f64,
        z: [f64; 2],
    },
    Ellipsoid {
        c: [f64; 3],
        inv_r: [f64; 3],
    },
}

impl Prim {
    fn new(shape: Shape, shift: [f64; 2], material: Material) -> (Prim, [f64; 4]) {
        let foliage = material == Material::Foliage;
        let (kind, aabb) = match shape {
            Shape::Box {
                center,
                half,
                yaw,
                z,
            } => {
                let c = [center[0] + shift[0], center[1] + shift[1]];
                let (sin, cos) = yaw.sin_cos();
                let ex = cos.abs() * half[0] + sin.abs() * half[1];
                let ey = sin.abs() * half[0] + cos.abs() * half[1];
                (
                    PrimKind::Box {
                        c,
                        half,
                        cos,
                        sin,
                        z,
                    },
                    [c[0] - ex, c[1] - ey, c[0] + ex, c[1] + ey],
                )
            }
            Shape::Cylinder { center, radius, z } => {
                let c = [center[0] + shift[0], center[1] + shift[1]];
                (
                    PrimKind::Cylinder {
                        c,
                        r2: radius * radius,
                        z,
                    },
                    [c[0] - radius, c[1] - radius, c[0] + radius, c[1] + radius],
                )
            }
            Shape::Ellipsoid { center, radii } => {
                let c = [center[0] + shift[0], center[1] + shift[1], center[2]];
                (
                    PrimKind::Ellipsoid {
                        c,
                        inv_r: radii.map(|r| 1.0 / r),
                    },
                    [
                        c[0] - radii[0],
                        c[1] - radii[1],
                        c[0] + radii[0],
                        c[1] + radii[1],
                    ],
                )
            }
        };
        (Prim { kind, foliage }, aabb)
    }

    /// The parameter interval `[t_in, t_out]` in which the ray `o + t d`
    /// is inside the primitive, if it meets it at all.
    #[inline]
    fn interval(&self, o: [f64; 3], d: [f64; 3]) -> Option<(f64, f64)> {
        match self.kind {
            PrimKind::Box {
                c,
                half,
                cos,
                sin,
                z,
            } => {
                let (px, py) = (o[0] - c[0], o[1] - c[1]);
                let lo = [cos * px + sin * py, -sin * px + cos * py];
                let ld = [cos * d[0] + sin * d[1], -sin * d[0] + cos * d[1]];
                let (mut t0, mut t1) = slab(o[2], d[2], z[0], z[1])?;
                for a in 0..2 {
                    let (s0, s1) = slab(lo[a], ld[a], -half[a], half[a])?;
                    t0 = t0.max(s0);
                    t1 = t1.min(s1);
                }
                (t0 <= t1).then_some((t0, t1))
            }
            PrimKind::Cylinder { c, r2, z } => {
                let (px, py) = (o[0] - c[0], o[1] - c[1]);
                let a = d[0] * d[0] + d[1] * d[1];
                let b = px * d[0] + py * d[1];
                let cc = px * px + py * py - r2;
                let (z0, z1) = slab(o[2], d[2], z[0], z[1])?;
                if a == 0.0 {
                    // A vertical ray: inside the circle or not at all.
                    return (cc <= 0.0).then_some((z0, z1));
                }
                let disc = b * b - a * cc;
                if disc < 0.0 {
                    return None;
                }
                let sq = disc.sqrt();
                let t0 = ((-b - sq) / a).max(z0);
                let t1 = ((-b + sq) / a).min(z1);
                (t0 <= t1).then_some((t0, t1))
            }
            PrimKind::Ellipsoid { c, inv_r } => {
                let p: [f64; 3] = std::array::from_fn(|k| (o[k] - c[k]) * inv_r[k]);
                let q: [f64; 3] = std::array::from_fn(|k| d[k] * inv_r[k]);
                let a = q[0] * q[0] + q[1] * q[1] + q[2] * q[2];
                let b = p[0] * q[0] + p[1] * q[1] + p[2] * q[2];
                let cc = p[0] * p[0] + p[1] * p[1] + p[2] * p[2] - 1.0;
                let disc = b * b - a * cc;
                if disc < 0.0 {
                    return None;
                }
                let sq = disc.sqrt();
                Some(((-b - sq) / a, (-b + sq) / a))
            }
        }
    }
}

/// The interval in which `o + t d` lies in `[lo, hi]` along one axis.
#[inline]
fn slab(o: f64, d: f64, lo: f64, hi: f64) -> Option<(f64, f64)> {
    if d == 0.0 {
        return (lo <= o && o <= hi).then_some((f64::NEG_INFINITY, f64::INFINITY));
    }
    let inv = 1.0 / d;
    let (a, b) = ((lo - o) * inv, (hi - o) * inv);
    Some(if a <= b { (a, b) } else { (b, a) })
}

/// Uniform grid over object footprints: cell `(ix, iy)` lists the objects
/// whose bounding rectangle overlaps it (CSR layout).
struct Grid {
    x0: f64,
    y0: f64,
    cell: f64,
    nx: i32,
    ny: i32,
    start: Vec<u32>,
    items: Vec<u32>,
}

const CELL_M: f64 = 2.0;

impl Grid {
    fn build(aabbs: &[[f64; 4]], center: [f64; 2], half: f64) -> Grid {
        let (x0, y0) = (center[0] - half, center[1] - half);
        let n = (2.0 * half / CELL_M).ceil() as i32;
        let cells = (n * n) as usize;
        let range = |lo: f64, hi: f64, o: f64| {
            let a = (((lo - o) / CELL_M).floor() as i32).max(0);
            let b = (((hi - o) / CELL_M).floor() as i32).min(n - 1);
            a..=b
        };
        let mut count = vec![0u32; cells + 1];
        for bb in aabbs {
            for iy in range(bb[1], bb[3], y0) {
                for ix in range(bb[0], bb[2], x0) {
                    count[(iy * n + ix) as usize + 1] += 1;
                }
            }
        }
        for i in 0..cells {
            count[i + 1] += count[i];
        }
        let mut fill = count.clone();
        let mut items = vec![0u32; count[cells] as usize];
        for (k, bb) in aabbs.iter().enumerate() {
            for iy in range(bb[1], bb[3], y0) {
                for ix in range(bb[0], bb[2], x0) {
                    let c = (iy * n + ix) as usize;
                    items[fill[c] as usize] = k as u32;
                    fill[c] += 1;
                }
            }
        }
        Grid {
            x0,
            y0,
            cell: CELL_M,
            nx: n,
            ny: n,
            start: count,
            items,
        }
    }
}

/// The objects of a scene as one sweep sees them: moved to `time_s`,
/// culled to the sensor's range, and gridded.
struct Prepared {
    prims: Vec<Prim>,
    grid: Grid,
}

impl Prepared {
    fn new(scene: &Scene, pose: Pose, reach: f64) -> Prepared {
        let mut prims = Vec::new();
        let mut aabbs = Vec::new();
        for obj in &scene.objects {
            let shift = match obj.motion {
                None => [0.0, 0.0],
                Some(m) => {
                    let mut dx = m.velocity[0] * pose.time_s;
                    if let Some([w0, w1]) = scene.wrap_x {
                        let moved = (m.anchor_x + dx - w0).rem_euclid(w1 - w0) + w0;
                        dx = moved - m.anchor_x;
                    }
                    [dx, m.velocity[1] * pose.time_s]
                }
            };
            let (prim, bb) = Prim::new(obj.shape, shift, obj.material);
            let near = bb[2] >= pose.x - reach
                && bb[0] <= pose.x + reach
                && bb[3] >= pose.y - reach
                && bb[1] <= pose.y + reach;
            if near {
                prims.push(prim);
                aabbs.push(bb);
            }
        }
        let grid = Grid::build(&aabbs, [pose.x, pose.y], reach);
        Prepared { prims, grid }
    }

    /// The nearest hit along `o + t d` (unit `d`) with `t < t_end`, walking
    /// the grid cells the ray crosses in order (Amanatides and Woo) so that
    /// only objects near the ray are tested, and stopping as soon as a hit
    /// lies before the next cell. `ray` salts the foliage draws.
    fn cast(&self, o: [f64; 3], d: [f64; 3], t_end: f64, ray: u64) -> Option<f64> {
        let g = &self.grid;
        let mut ix = ((o[0] - g.x0) / g.cell).floor() as i32;
        let mut iy = ((o[1] - g.y0) / g.cell).floor() as i32;
        let axis = |p: f64, dir: f64, origin: f64, i: i32| -> (i32, f64, f64) {
            if dir > 0.0 {
                let next = origin + f64::from(i + 1) * g.cell;
                (1, (next - p) / dir, g.cell / dir)
            } else if dir < 0.0 {
                let next = origin + f64::from(i) * g.cell;
                (-1, (next - p) / dir, -g.cell / dir)
            } else {
                (0, f64::INFINITY, f64::INFINITY)
            }
        };
        let (sx, mut tx, dtx) = axis(o[0], d[0], g.x0, ix);
        let (sy, mut ty, dty) = axis(o[1], d[1], g.y0, iy);
        let mut best = t_end;
        let mut hit = false;
        loop {
            if ix < 0 || iy < 0 || ix >= g.nx || iy >= g.ny {
                break;
            }
            let c = (iy * g.nx + ix) as usize;
            for &k in &g.items[g.start[c] as usize..g.start[c + 1] as usize] {
                let p = &self.prims[k as usize];
                let Some((t0, t1)) = p.interval(o, d) else {
                    continue;
                };
                if t1 <= 0.0 || t0 >= best {
                    continue;
                }
                let t = if p.foliage {
                    // Hash-based, so the draw is the same however often
                    // and in whatever order the object is tested.
                    let u =
                        (mix64(ray ^ mix64(u64::from(k) + 1)) >> 11) as f64 / (1u64 << 53) as f64;
                    let t = t0.max(0.0) - FOLIAGE_DEPTH_M * (1.0 - u).ln();
                    if t > t1 {
                        continue;
                    }
                    t
                } else {
                    t0.max(0.0)
                };
                if t < best {
                    best = t;
                    hit = true;
                }
            }
            let t_next = tx.min(ty);
            if t_next >= best {
                break;
            }
            if tx < ty {
                ix += sx;
                tx += dtx;
            } else {
                iy += sy;
                ty += dty;
            }
        }
        hit.then_some(best)
    }
}

/// One revolution of `sensor` at `pose` over `scene`: the returns in world
/// coordinates. The first surface along each ray returns (objects or the
/// ground plane z = 0), if it is within the maximum range; then Gaussian
/// range noise is added and a random fraction of returns is dropped.
/// Deterministic in `seed` (which also sets the azimuth of the first
/// column).
pub fn sweep(sensor: &Sensor, scene: &Scene, pose: Pose, seed: u64) -> Vec<[f32; 3]> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let reach = sensor.max_range_m + 1.0;
    let prepared = Prepared::new(scene, pose, reach);
    let elev: Vec<(f64, f64)> = sensor
        .elevations_rad()
        .into_iter()
        .map(|e| e.sin_cos())
        .collect();
    let steps = sensor.azimuth_steps.max(1);
    let az0: f64 = rng.random_range(0.0..std::f64::consts::TAU);
    let o = [pose.x, pose.y, sensor.height_m];
    let ray_salt = mix64(seed ^ 0x6c69_6461_725f_7261);
    let mut out = Vec::with_capacity(sensor.rays());
    for a in 0..steps {
        let az = az0 + std::f64::consts::TAU * f64::from(a) / f64::from(steps);
        let (saz, caz) = az.sin_cos();
        for (b, &(se, ce)) in elev.iter().enumerate() {
            let d = [ce * caz, ce * saz, se];
            let t_ground = if d[2] < 0.0 {
                -o[2] / d[2]
            } else {
                f64::INFINITY
            };
            let t_end = t_ground.min(sensor.max_range_m);
            let ray = ray_salt ^ (u64::from(a) << 8 | b as u64);
            let t = match prepared.cast(o, d, t_end, ray) {
                Some(t) => t,
                None if t_ground <= sensor.max_range_m => t_ground,
                None => continue,
            };
            // The dropout draw comes first so that every hit consumes the
            // same number of draws whether or not it is kept.
            let lost = rng.random_bool(sensor.dropout);
            let noise: f64 = rng.sample(StandardNormal);
            if lost {
                continue;
            }
            let r = t + sensor.range_noise_m * noise;
            out.push([
                (o[0] + d[0] * r) as f32,
                (o[1] + d[1] * r) as f32,
                (o[2] + d[2] * r) as f32,
            ]);
        }
    }
    out
}

/// Moves world points into a sensor-centred frame: x, y relative to the
/// pose, rotated by `-yaw`, z shifted by `-z_offset`.
fn to_frame(points: &mut [[f32; 3]], pose: Pose, yaw: f64, z_offset: f64) {
    let (s, c) = (-yaw).sin_cos();
    for p in points {
        let (x, y) = (f64::from(p[0]) - pose.x, f64::from(p[1]) - pose.y);
        *p = [
            (c * x - s * y) as f32,
            (s * x + c * y) as f32,
            (f64::from(p[2]) - z_offset) as f32,
        ];
    }
}

/// How urban [`waymo_like`] streets are: Waymo drove mostly in suburban
/// Phoenix and Mountain View and in San Francisco.
pub const WAYMO_URBAN: f64 = 0.3;
/// How urban [`nuscenes_like`] streets are: nuScenes drove in Boston's
/// Seaport and in Singapore's One North, Queenstown and Holland Village.
pub const NUSCENES_URBAN: f64 = 0.7;

/// One sweep of a street scene as a dataset would store it. The vehicle
/// heads along the street with a small random yaw.
fn frame(seed: u64, sensor: &Sensor, urban: f64, z_offset: f64) -> Vec<[f32; 3]> {
    let scene_seed = derive(seed, &["scene"]);
    let reach = sensor.max_range_m + 30.0;
    let scene = Scene::street(scene_seed, -reach, reach, urban);
    let pose = Pose {
        x: 0.0,
        y: Scene::street_ego_y(scene_seed),
        time_s: 0.0,
    };
    let mut pts = sweep(sensor, &scene, pose, derive(seed, &["sweep", sensor.name]));
    let yaw = ChaCha8Rng::seed_from_u64(derive(seed, &["yaw"])).random_range(-0.1..0.1);
    to_frame(&mut pts, pose, yaw, z_offset);
    pts
}

/// A Waymo-like frame: one [`WAYMO_TOP`] sweep of a street, in the
/// vehicle frame (origin on the ground under the sensor, z up).
pub fn waymo_like_points(seed: u64) -> Vec<[f32; 3]> {
    frame(seed, &WAYMO_TOP, WAYMO_URBAN, 0.0)
}

/// A nuScenes-like frame: one [`NUSCENES`] sweep in the lidar frame
/// (origin at the sensor, so the ground is at -1.84 m).
pub fn nuscenes_like_points(seed: u64) -> Vec<[f32; 3]> {
    frame(seed, &NUSCENES, NUSCENES_URBAN, NUSCENES.height_m)
}

/// [`waymo_like_points`] voxelised with ScatterFormer's Waymo grid.
pub fn waymo_like(seed: u64) -> Windowed {
    voxel::voxelise(&waymo_like_points(seed), &voxel::WAYMO)
}

/// [`nuscenes_like_points`] voxelised with ScatterFormer's nuScenes grid.
pub fn nuscenes_like(seed: u64) -> Windowed {
    voxel::voxelise(&nuscenes_like_points(seed), &voxel::NUSCENES)
}

/// Distance between the poses of [`scaling`]'s drive, metres.
pub const DRIVE_STEP_M: f64 = 10.0;
/// Ego speed of [`scaling`]'s drive (one sweep per second), m/s.
pub const DRIVE_SPEED_MPS: f64 = 10.0;

/// A fast hasher for packed voxel keys (the keys are already well spread
/// after [`mix64`]; SipHash would only cost time).
#[derive(Default)]
struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = mix64(self.0 ^ u64::from(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = mix64(v);
    }
}

/// Exactly `target_voxels` non-empty stage-1 voxels with the Waymo voxel
/// size, z range and windows, for the scaling chart.
///
/// How the size is reached: the ego drives along one long street (the
/// [`Scene::street`] generator) at [`DRIVE_SPEED_MPS`], taking a
/// [`WAYMO_TOP`] sweep every [`DRIVE_STEP_M`] (so moving vehicles move
/// between sweeps and leave trails, as in multi-sweep accumulation without
/// motion compensation). All sweeps are expressed in the first pose's
/// frame. The grid is [`voxel::WAYMO`] stretched along x to cover the drive
/// (y and z unchanged, x rounded up to whole windows). Sweeps are added until
/// the union has at least `target_voxels` voxels; then a seeded hash drops
/// the excess ([`Windowed::thin_to`]). Below one sweep's worth (about 30k
/// voxels) only the thinning acts, which is like a sparser sensor. Measured
/// (release build, two threads): 1M voxels from 84 sweeps (an 840 m drive,
/// 7,118 windows) in 2.3-2.8 s.
/// Sweeps run on two threads; the result does not depend on the thread
/// count.
pub fn scaling(target_voxels: usize, seed: u64) -> Windowed {
    let scene_seed = derive(seed, &["scaling-scene"]);
    // Generous: the drive adds well over 2,000 voxels per pose.
    let max_poses = 2 + target_voxels / 2_000;
    let drive_m = DRIVE_STEP_M * max_poses as f64;
    let scene = Scene::street(
        scene_seed,
        -WAYMO_TOP.max_range_m - 30.0,
        drive_m + 110.0,
        WAYMO_URBAN,
    );
    let y0 = Scene::street_ego_y(scene_seed);
    let g = voxel::WAYMO;
    let window_m = g.voxel_m[0] * f64::from(g.window[0]);
    // The Waymo grid's own x extent around every pose of the drive.
    let span_windows = ((drive_m + g.max_m[0] - g.min_m[0]) / window_m).ceil() + 1.0;
    let mut open = GridConfig {
        name: "waymo-drive",
        ..g
    };
    open.max_m[0] = g.min_m[0] + span_windows * window_m;

    let pose = |k: usize| Pose {
        x: DRIVE_STEP_M * k as f64,
        y: y0,
        time_s: DRIVE_STEP_M * k as f64 / DRIVE_SPEED_MPS,
    };
    let one = |k: usize| -> (Vec<[u32; 3]>, usize) {
        let p = pose(k);
        let mut pts = sweep(
            &WAYMO_TOP,
            &scene,
            p,
            derive(seed, &["scaling-sweep", &k.to_string()]),
        );
        to_frame(&mut pts, Pose { x: 0.0, ..p }, 0.0, 0.0);
        let mut vox = Vec::new();
        let n = open.stage1_voxels(&pts, &mut vox);
        (vox, n)
    };
    let pack = |c: [u32; 3]| (u64::from(c[0]) << 32) | (u64::from(c[1]) << 16) | u64::from(c[2]);
    let mut set: HashSet<u64, BuildHasherDefault<MixHasher>> = HashSet::default();
    let mut in_range = 0;
    let mut k = 0;
    'drive: while set.len() < target_voxels || k == 0 {
        assert!(
            k < max_poses,
            "scaling({target_voxels}): the drive ran out of street after {k} poses"
        );
        let batch: Vec<(Vec<[u32; 3]>, usize)> = std::thread::scope(|s| {
            let second = (k + 1 < max_poses).then(|| s.spawn(|| one(k + 1)));
            let mut v = vec![one(k)];
            if let Some(h) = second {
                v.push(h.join().expect("sweep thread panicked"));
            }
            v
        });
        for (vox, n) in batch {
            set.extend(vox.into_iter().map(pack));
            in_range += n;
            k += 1;
            if set.len() >= target_voxels {
                break 'drive;
            }
        }
    }
    let max_x = set.iter().map(|&p| (p >> 32) as u32).max().unwrap_or(0);
    let mut grid = open;
    let windows = f64::from(max_x / g.window[0] + 1);
    grid.max_m[0] = g.min_m[0] + windows * window_m;
    let voxels: Vec<[u32; 3]> = set
        .into_iter()
        .map(|p| {
            [
                (p >> 32) as u32,
                (p >> 16) as u32 & 0xffff,
                p as u32 & 0xffff,
            ]
        })
        .collect();
    Windowed::from_voxels(grid, voxels, in_range).thin_to(target_voxels, seed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pointcloud::voxel::tests::check_layout;
    use std::time::Instant;

    #[test]
    fn beam_tables_span_the_stated_field_of_view() {
        for s in [WAYMO_TOP, NUSCENES] {
            let e = s.elevations_rad();
            assert_eq!(e.len(), s.beams as usize);
            assert!((e[0].to_degrees() - s.elevation_top_deg).abs() < 1e-9);
            assert!((e[e.len() - 1].to_degrees() - s.elevation_bottom_deg).abs() < 1e-9);
            assert!(
                e.windows(2).all(|w| w[0] > w[1]),
                "{}: not descending",
                s.name
            );
        }
        // Waymo: spacing grows as 1 + |e| / 40 deg away from the horizon.
        let e = WAYMO_TOP.elevations_rad();
        let near = e
            .windows(2)
            .map(|w| w[0] - w[1])
            .fold(f64::INFINITY, f64::min);
        let ratio = (e[62] - e[63]) / near;
        assert!((1.35..1.45).contains(&ratio), "{ratio}");
        // nuScenes: even 40/31-degree spacing.
        let n = NUSCENES.elevations_rad();
        for w in n.windows(2) {
            assert!(((w[0] - w[1]).to_degrees() - 40.0 / 31.0).abs() < 1e-9);
        }
    }

    #[test]
    fn primitives_intersect_where_geometry_says() {
        let o = [0.0, 0.0, 1.0];
        let d = [1.0, 0.0, 0.0];
        let b = Prim::new(
            Shape::Box {
                center: [10.0, 0.0],
                half: [1.0, 1.0],
                yaw: std::f64::consts::FRAC_PI_4,
                z: [0.0, 2.0],
            },
            [0.0, 0.0],
            Material::Solid,
        )
        .0;
        let (t0, t1) = b.interval(o, d).unwrap();
        let r = 2f64.sqrt();
        assert!((t0 - (10.0 - r)).abs() < 1e-12 && (t1 - (10.0 + r)).abs() < 1e-12);
        // Over the top of it.
        assert!(b.interval([0.0, 0.0, 2.5], d).is_none());
        let c = Prim::new(
            Shape::Cylinder {
                center: [5.0, 0.0],
                radius: 0.5,
                z: [0.0, 1.7],
            },
            [0.0, 0.0],
            Material::Solid,
        )
        .0;
        let (t0, _) = c.interval(o, d).unwrap();
        assert!((t0 - 4.5).abs() < 1e-12);
        // From above, down onto its top cap.
        let down = [0.0, 0.0, -1.0];
        let (t0, t1) = c.interval([5.0, 0.1, 3.0], down).unwrap();
        assert!((t0 - 1.3).abs() < 1e-12 && (t1 - 3.0).abs() < 1e-12);
        let e = Prim::new(
            Shape::Ellipsoid {
                center: [20.0, 0.0, 1.0],
                radii: [2.0, 1.0, 1.0],
            },
            [0.0, 0.0],
            Material::Solid,
        )
        .0;
        let (t0, t1) = e.interval(o, d).unwrap();
        assert!((t0 - 18.0).abs() < 1e-12 && (t1 - 22.0).abs() < 1e-12);
    }

    #[test]
    fn a_box_in_front_of_the_sensor_shadows_what_is_behind_it() {
        // A 2 m wide, 3 m tall box 10-12 m ahead, and a wall at 30 m that
        // would return everywhere if nothing stood in the way.
        let mut scene = Scene::empty();
        scene.objects.push(Object::solid(Shape::Box {
            center: [11.0, 0.0],
            half: [1.0, 1.0],
            yaw: 0.0,
            z: [0.0, 3.0],
        }));
        scene.objects.push(Object::solid(Shape::Box {
            center: [30.5, 0.0],
            half: [0.5, 20.0],
            yaw: 0.0,
            z: [0.0, 10.0],
        }));
        let pose = Pose {
            x: 0.0,
            y: 0.0,
            time_s: 0.0,
        };
        let pts = sweep(&WAYMO_TOP, &scene, pose, 3);
        let wedge = (1.0f64 / 12.0).atan() * 0.95;
        let mut on_box = 0;
        let mut on_wall = 0;
        for p in &pts {
            let (x, y, z) = (f64::from(p[0]), f64::from(p[1]), f64::from(p[2]));
            let r = x.hypot(y);
            if y.atan2(x).abs() < wedge {
                assert!(r < 12.2, "return at {p:?} behind the box");
                if z > 0.1 && (9.9..12.1).contains(&x) {
                    on_box += 1;
                }
            } else if x > 29.9 && y.abs() < 10.0 {
                on_wall += 1;
            }
        }
        assert!(on_box > 300, "{on_box} returns on the box");
        assert!(on_wall > 1000, "{on_wall} returns on the wall");
    }

    #[test]
    fn ground_only_returns_follow_the_beam_geometry() {
        // Over bare ground, exactly the beams that meet the ground within
        // range return (less the dropout), at the expected radii.
        let pose = Pose {
            x: 0.0,
            y: 0.0,
            time_s: 0.0,
        };
        let s = NUSCENES;
        let pts = sweep(&s, &Scene::empty(), pose, 5);
        let hitting = s
            .elevations_rad()
            .iter()
            .filter(|e| **e < 0.0 && s.height_m / -e.tan() <= s.max_range_m)
            .count();
        let expected = (hitting * s.azimuth_steps as usize) as f64 * (1.0 - s.dropout);
        let sd = (expected * s.dropout).sqrt();
        assert!(
            (pts.len() as f64 - expected).abs() < 5.0 * sd,
            "{} returns, expected {expected}",
            pts.len()
        );
        assert!(pts.iter().all(|p| p[2].abs() < 0.15));
        let nearest = pts
            .iter()
            .map(|p| f64::from(p[0]).hypot(f64::from(p[1])))
            .fold(f64::INFINITY, f64::min);
        let expect_near = s.height_m / (-s.elevation_bottom_deg).to_radians().tan();
        assert!(
            (nearest - expect_near).abs() < 0.2,
            "{nearest} vs {expect_near}"
        );
    }

    #[test]
    fn sweeps_are_deterministic_per_seed() {
        assert_eq!(nuscenes_like_points(7), nuscenes_like_points(7));
        assert_ne!(nuscenes_like_points(7), nuscenes_like_points(8));
        let a = waymo_like(4);
        assert_eq!(a, waymo_like(4));
        assert_ne!(a.coords, waymo_like(5).coords);
    }

    #[test]
    fn return_counts_match_the_sensors() {
        for seed in 0..3 {
            let t = Instant::now();
            let w = waymo_like_points(seed).len();
            let tw = t.elapsed().as_secs_f64();
            let n = nuscenes_like_points(seed).len();
            eprintln!("seed {seed}: waymo {w} returns ({tw:.3} s), nuscenes {n}");
            assert!((150_000..=180_000).contains(&w), "waymo-like: {w} returns");
            assert!((30_000..=40_000).contains(&n), "nuscenes-like: {n} returns");
        }
    }

    #[test]
    fn waymo_like_frames_are_in_the_reference_regime() {
        for seed in 0..3 {
            let w = waymo_like(seed);
            check_layout(&w);
            let o = w.occupancy();
            eprintln!("waymo-like seed {seed}: {o:?}");
            assert!((25_000..=50_000).contains(&o.voxels), "{o:?}");
            assert!(f64::from(o.max) > 10.0 * o.median, "no long tail: {o:?}");
            let n = nuscenes_like(seed);
            check_layout(&n);
            eprintln!("nuscenes-like seed {seed}: {:?}", n.occupancy());
        }
    }

    #[test]
    fn scaling_returns_exactly_the_target() {
        for n in [10_000, 54_321, 150_000] {
            let t = Instant::now();
            let w = scaling(n, 1);
            eprintln!(
                "scaling({n}): {:.2} s, {:?}",
                t.elapsed().as_secs_f64(),
                w.occupancy()
            );
            assert_eq!(w.n_voxels(), n);
            check_layout(&w);
        }
        assert_eq!(scaling(20_000, 2), scaling(20_000, 2));
    }
}
