//! The `stereo-middlebury` variant: a real capture instead of a simulated
//! one. The Middlebury 2014 "Motorcycle" scene (Scharstein et al., "High-
//! resolution stereo datasets with subpixel-accurate ground truth", GCPR
//! 2014), whose ground-truth disparity map scikit-image ships downscaled 4x
//! (`skimage/data/motorcycle_disp.npz`: 741 x 500 float32, +inf where there
//! is no ground truth; fetched by `scripts/fetch-assets.sh middlebury`).
//!
//! Every valid pixel is back-projected to 3-D with the scene's calibration
//! and the cloud is voxelised like a LiDAR frame.
//!
//! Calibration. Middlebury's `Motorcycle-perfect/calib.txt` (full
//! resolution, 2964 x 2000) gives `cam0 = [3979.911 0 1244.772; 0 3979.911
//! 1019.507; 0 0 1]`, `cam1` with `cx = 1369.115`, `doffs = 124.343`,
//! `baseline = 193.001` (mm). scikit-image's `data.stereo_motorcycle`
//! docstring gives the same values divided by 4 for its downscaled copy
//! (focal length 994.978 px, principal point (311.193, 254.877) px, doffs
//! 31.086 px, baseline 193.001 mm); [`MOTORCYCLE_QUARTER`] holds those. (An
//! exact 4x box downscale would also shift the principal point by 3/8 px,
//! about 1 mm at the scene's depth; we use the published values.) Depth is
//! `Z = f * B / (d + doffs)`, then `X = (u - cx) Z / f`, `Y = (v - cy) Z / f`.
//!
//! Frame and grid. Points go to a LiDAR-like frame (x right, y forward =
//! camera depth, z up = -Y), origin at the left camera, so that windows tile
//! the horizontal plane and a window spans the vertical column, as
//! ScatterFormer's do. The scene is about 3.3 m wide, 1.8 m tall and 2.1 m
//! to 5.0 m deep, so [`GRID`] uses 1 cm x 1 cm x 6.25 cm voxels over x in
//! [-1.92, 1.92), y in [2.0, 5.36), z in [-0.6, 1.4): 384 x 336 x 32 cells,
//! the Waymo config's 32 z levels (16 after the stem's stride) and 12 x 12
//! windows (32 x 28 of them). A 1 cm cell holds several pixels at this
//! range (a pixel spans 2-5 mm), so surfaces are solid, unlike a LiDAR's.
//!
//! Measured (`cargo test -p workloads --lib pointcloud::stereo -- --nocapture`;
//! the numbers are fixed by the asset): 343,274 valid pixels, all inside the
//! grid; 60,226 non-empty stage-1 voxels in 433 windows; voxels per window
//! mean 139.1, median 107, p90 300, p99 595, max 686. The left image is not
//! fetched: the workload's voxel features are synthetic, so only geometry
//! is needed.

use std::io::Read;
use std::path::Path;

use super::voxel::{voxelise, GridConfig, Windowed};
use crate::assets::{self, MIDDLEBURY_MOTORCYCLE_DISP};
use crate::WorkloadError;

/// A rectified stereo pair's calibration, in the image's pixel units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calib {
    pub focal_px: f64,
    pub cx_px: f64,
    pub cy_px: f64,
    /// `cx` of the right camera minus `cx` of the left.
    pub doffs_px: f64,
    pub baseline_m: f64,
}

/// Middlebury 2014 Motorcycle, calibration for the 4x-downscaled images
/// (the full-resolution `calib.txt` divided by 4; see the module docs).
pub const MOTORCYCLE_QUARTER: Calib = Calib {
    focal_px: 3979.911 / 4.0,
    cx_px: 1244.772 / 4.0,
    cy_px: 1019.507 / 4.0,
    doffs_px: 124.343 / 4.0,
    baseline_m: 0.193001,
};

/// The voxel grid for the Motorcycle scene (see the module docs).
pub const GRID: GridConfig = GridConfig {
    name: "middlebury",
    voxel_m: [0.01, 0.01, 0.0625],
    min_m: [-1.92, 2.0, -0.6],
    max_m: [1.92, 5.36, 1.4],
    z_stride: 2,
    window: [12, 12],
};

/// A row-major 2-D float32 image.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

/// Back-projects every pixel with a finite disparity (in the LiDAR-like
/// frame of the module docs).
pub fn back_project(disp: &Image, calib: &Calib) -> Vec<[f32; 3]> {
    let mut out = Vec::with_capacity(disp.data.len());
    for v in 0..disp.height {
        for u in 0..disp.width {
            let d = f64::from(disp.data[v * disp.width + u]);
            // A disparity at or below -doffs would put the point at or
            // behind infinity.
            if !d.is_finite() || d + calib.doffs_px <= 0.0 {
                continue;
            }
            let z = calib.focal_px * calib.baseline_m / (d + calib.doffs_px);
            let x = (u as f64 - calib.cx_px) * z / calib.focal_px;
            let y = (v as f64 - calib.cy_px) * z / calib.focal_px;
            out.push([x as f32, z as f32, -y as f32]);
        }
    }
    out
}

/// The Motorcycle frame, voxelised with [`GRID`], from the verified asset
/// in the assets folder.
pub fn middlebury() -> Result<Windowed, WorkloadError> {
    middlebury_in(&assets::dir())
}

/// [`middlebury`] from an explicit assets folder.
pub fn middlebury_in(dir: &Path) -> Result<Windowed, WorkloadError> {
    let disp = motorcycle_disparity_in(dir)?;
    Ok(voxelise(&back_project(&disp, &MOTORCYCLE_QUARTER), &GRID))
}

/// The Motorcycle disparity map (verified, then read).
pub fn motorcycle_disparity_in(dir: &Path) -> Result<Image, WorkloadError> {
    let asset = &MIDDLEBURY_MOTORCYCLE_DISP;
    let p = assets::verify_in(dir, asset)?;
    let corrupt = |problem: String| WorkloadError::CorruptAsset {
        path: p.display().to_string(),
        problem,
        fix: format!(
            "run `scripts/fetch-assets.sh {}`, which replaces it",
            asset.fetch_set
        ),
    };
    let bytes = std::fs::read(&p).map_err(|e| corrupt(format!("cannot read it: {e}")))?;
    let npy = first_zip_member(&bytes).map_err(corrupt)?;
    let img = parse_npy_f32_2d(&npy).map_err(corrupt)?;
    if (img.width, img.height) != (741, 500) {
        return Err(corrupt(format!(
            "{} x {} pixels, expected 741 x 500",
            img.width, img.height
        )));
    }
    Ok(img)
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, String> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| "truncated zip header".to_string())
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, String> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| "truncated zip header".to_string())
}

/// The first member of a zip archive (an `.npz` holds one `.npy` per
/// array; `np.savez` of one array writes `arr_0.npy` first), read from its
/// local header: stored or deflated, CRC-checked when the header carries
/// the CRC. This is all of the zip format an `.npz` needs, so it is done
/// here with `flate2` rather than with a zip crate.
pub fn first_zip_member(zip: &[u8]) -> Result<Vec<u8>, String> {
    if u32_at(zip, 0)? != 0x0403_4b50 {
        return Err("not a zip archive (no local file header at offset 0)".into());
    }
    let flags = u16_at(zip, 6)?;
    let method = u16_at(zip, 8)?;
    let crc = u32_at(zip, 14)?;
    let packed = u32_at(zip, 18)? as usize;
    let size = u32_at(zip, 22)? as usize;
    let name_len = usize::from(u16_at(zip, 26)?);
    let extra_len = usize::from(u16_at(zip, 28)?);
    let start = 30 + name_len + extra_len;
    let name = zip
        .get(30..30 + name_len)
        .map(String::from_utf8_lossy)
        .ok_or("truncated zip header")?;
    let data = zip.get(start..).ok_or("truncated zip member")?;
    if flags & 1 != 0 {
        return Err(format!("zip member {name} is encrypted"));
    }
    // Bit 3: sizes and CRC follow the data instead (streamed writers); then
    // only a self-delimiting (deflated) member can be read from here.
    let sizes_known = flags & 8 == 0 && size != 0xFFFF_FFFF && packed != 0xFFFF_FFFF;
    let out = match method {
        0 if sizes_known => data.get(..size).ok_or("truncated zip member")?.to_vec(),
        8 => {
            let mut out = Vec::with_capacity(if sizes_known { size } else { 0 });
            flate2::read::DeflateDecoder::new(data)
                .read_to_end(&mut out)
                .map_err(|e| format!("zip member {name}: bad deflate stream: {e}"))?;
            out
        }
        m => {
            return Err(format!(
                "zip member {name}: unsupported compression method {m}"
            ))
        }
    };
    if sizes_known {
        if out.len() != size {
            return Err(format!(
                "zip member {name}: {} bytes, header says {size}",
                out.len()
            ));
        }
        let mut c = flate2::Crc::new();
        c.update(&out);
        if c.sum() != crc {
            return Err(format!("zip member {name}: CRC mismatch"));
        }
    }
    Ok(out)
}

/// Parses a `.npy` file holding a C-ordered little-endian float32 2-D
/// array (format versions 1 to 3).
pub fn parse_npy_f32_2d(npy: &[u8]) -> Result<Image, String> {
    if npy.get(..6) != Some(b"\x93NUMPY".as_slice()) {
        return Err("not a .npy file (bad magic)".into());
    }
    let major = *npy.get(6).ok_or("truncated .npy header")?;
    let (header_len, header_start) = match major {
        1 => (usize::from(u16_at(npy, 8)?), 10),
        2 | 3 => (u32_at(npy, 8)? as usize, 12),
        v => return Err(format!(".npy format version {v} not supported")),
    };
    let header = npy
        .get(header_start..header_start + header_len)
        .map(String::from_utf8_lossy)
        .ok_or("truncated .npy header")?;
    let value_of = |key: &str| -> Result<&str, String> {
        let at = header
            .find(&format!("'{key}':"))
            .ok_or_else(|| format!(".npy header has no '{key}': {header}"))?;
        Ok(header[at + key.len() + 3..].trim_start())
    };
    let descr = value_of("descr")?;
    if !descr.starts_with("'<f4'") {
        return Err(format!(
            ".npy dtype {descr:.8}.. is not little-endian float32"
        ));
    }
    if !value_of("fortran_order")?.starts_with("False") {
        return Err(".npy array is Fortran-ordered".into());
    }
    let shape = value_of("shape")?;
    let dims: Vec<usize> = shape
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| format!("bad .npy shape {shape}"))?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|e| format!("bad .npy shape {s}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let [height, width] = dims[..] else {
        return Err(format!(".npy array has shape {dims:?}, expected 2-D"));
    };
    let body = &npy[header_start + header_len..];
    if body.len() != width * height * 4 {
        return Err(format!(
            ".npy data is {} bytes, {height} x {width} float32 needs {}",
            body.len(),
            width * height * 4
        ));
    }
    let data = body
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Image {
        width,
        height,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pointcloud::voxel::tests::check_layout;
    use std::io::Write;

    /// A `.npy` (format 1.0) of a float32 array, as numpy writes it.
    fn npy(height: usize, width: usize, data: &[f32]) -> Vec<u8> {
        npy_as("<f4", height, width, data)
    }

    /// [`npy`] with another dtype in the header (the data stay float32).
    fn npy_as(descr: &str, height: usize, width: usize, data: &[f32]) -> Vec<u8> {
        let mut header = format!(
            "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({height}, {width}), }}"
        );
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header.as_bytes());
        for v in data {
            out.extend(v.to_le_bytes());
        }
        out
    }

    /// A one-member zip (local header, data, no central directory: the
    /// reader needs no more).
    fn zip(name: &str, payload: &[u8], deflate: bool) -> Vec<u8> {
        let body = if deflate {
            let mut e =
                flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(payload).unwrap();
            e.finish().unwrap()
        } else {
            payload.to_vec()
        };
        let mut crc = flate2::Crc::new();
        crc.update(payload);
        let mut out = 0x0403_4b50u32.to_le_bytes().to_vec();
        out.extend(20u16.to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out.extend((if deflate { 8u16 } else { 0 }).to_le_bytes());
        out.extend([0u8; 4]);
        out.extend(crc.sum().to_le_bytes());
        out.extend((body.len() as u32).to_le_bytes());
        out.extend((payload.len() as u32).to_le_bytes());
        out.extend((name.len() as u16).to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out.extend(name.as_bytes());
        out.extend(body);
        out
    }

    #[test]
    fn npz_round_trips_stored_and_deflated() {
        let data: Vec<f32> = (0..11)
            .map(|i| i as f32 * 0.5 - 1.0)
            .chain([f32::INFINITY])
            .collect();
        let raw = npy(3, 4, &data);
        for deflate in [false, true] {
            let member = first_zip_member(&zip("arr_0.npy", &raw, deflate)).unwrap();
            assert_eq!(member, raw);
            let img = parse_npy_f32_2d(&member).unwrap();
            assert_eq!((img.width, img.height), (4, 3));
            assert_eq!(img.data, data);
        }
    }

    #[test]
    fn damaged_npz_is_rejected_with_a_reason() {
        let raw = npy(2, 2, &[1.0; 4]);
        let mut z = zip("arr_0.npy", &raw, false);
        let last = z.len() - 1;
        z[last] ^= 0xff;
        assert!(first_zip_member(&z).unwrap_err().contains("CRC"));
        assert!(first_zip_member(b"GIF89a....")
            .unwrap_err()
            .contains("not a zip"));
        let f64_npy = npy_as("<f8", 2, 1, &[1.0; 4]);
        assert!(parse_npy_f32_2d(&f64_npy).unwrap_err().contains("float32"));
        assert!(parse_npy_f32_2d(&raw[..raw.len() - 4])
            .unwrap_err()
            .contains("bytes"));
    }

    #[test]
    fn back_projection_inverts_the_pinhole_model() {
        // A fronto-parallel plane 3 m away, and one pixel with no ground
        // truth: disparity d = f B / Z - doffs everywhere else.
        let c = MOTORCYCLE_QUARTER;
        let (w, h) = (20, 10);
        let d = (c.focal_px * c.baseline_m / 3.0 - c.doffs_px) as f32;
        let mut data = vec![d; w * h];
        data[5] = f32::INFINITY;
        let pts = back_project(
            &Image {
                width: w,
                height: h,
                data,
            },
            &c,
        );
        assert_eq!(pts.len(), w * h - 1);
        for p in &pts {
            assert!((p[1] - 3.0).abs() < 1e-4, "{p:?}");
        }
        // Pixel (u, v) = (19, 9) is the last one.
        let last = pts[pts.len() - 1];
        let x = (19.0 - c.cx_px) * 3.0 / c.focal_px;
        let z = -(9.0 - c.cy_px) * 3.0 / c.focal_px;
        assert!((f64::from(last[0]) - x).abs() < 1e-4 && (f64::from(last[2]) - z).abs() < 1e-4);
    }

    #[test]
    fn calibration_matches_the_published_quarter_scale_values() {
        // scikit-image's `data.stereo_motorcycle` docstring.
        let c = MOTORCYCLE_QUARTER;
        assert!((c.focal_px - 994.978).abs() < 1e-3);
        assert!((c.cx_px - 311.193).abs() < 1e-3);
        assert!((c.cy_px - 254.877).abs() < 1e-3);
        assert!((c.doffs_px - 31.086).abs() < 1e-3);
        // doffs is the difference of the two cameras' principal points.
        assert!((c.doffs_px - (1369.115 - 1244.772) / 4.0).abs() < 1e-9);
        assert_eq!(GRID.dims(), [384, 336, 32]);
        assert_eq!(GRID.stage1_dims(), [384, 336, 16]);
    }

    #[test]
    fn middlebury_frame_is_a_plausible_cloud() {
        let dir = assets::dir();
        let disp = match motorcycle_disparity_in(&dir) {
            Ok(d) => d,
            Err(WorkloadError::MissingAsset { .. }) => {
                eprintln!(
                    "skipped: {} not fetched (scripts/fetch-assets.sh middlebury)",
                    dir.join(MIDDLEBURY_MOTORCYCLE_DISP.file).display()
                );
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let valid = disp.data.iter().filter(|d| d.is_finite()).count();
        assert_eq!(valid, 343_274);
        let pts = back_project(&disp, &MOTORCYCLE_QUARTER);
        assert_eq!(pts.len(), valid);
        // Depths between 2 m and 5.1 m, the scene 3-3.5 m wide.
        let (lo, hi) = pts.iter().fold((f32::MAX, f32::MIN), |(lo, hi), p| {
            (lo.min(p[1]), hi.max(p[1]))
        });
        assert!(lo > 2.0 && hi < 5.1, "depth {lo}..{hi}");
        let (xl, xh) = pts.iter().fold((f32::MAX, f32::MIN), |(lo, hi), p| {
            (lo.min(p[0]), hi.max(p[0]))
        });
        assert!(xh - xl > 3.0 && xh - xl < 3.5, "width {xl}..{xh}");
        let w = middlebury_in(&dir).unwrap();
        check_layout(&w);
        let o = w.occupancy();
        eprintln!("middlebury: {} points in range, {o:?}", w.points_in_range);
        assert_eq!(w.points_in_range, valid, "the grid holds the whole scene");
        assert!((20_000..100_000).contains(&o.voxels), "{o:?}");
        assert!(o.windows > 300, "{o:?}");
    }
}
