//! The hardware fingerprint every run records, and the git commit.
//!
//! Results are only comparable on the same hardware: `hardware_id` is a
//! short hash of the fields that change performance (CPU model and cores,
//! memory in GiB, GPU name, driver and CUDA version, OS name); the host name
//! is recorded but left out of the id, so identical runners in a CI matrix
//! share one id and their shards merge.

use std::process::Command;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    pub name: String,
    pub driver: String,
    pub cuda: String,
    pub memory_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub hardware_id: String,
    pub cpu_model: String,
    pub cpu_cores: usize,
    pub memory_gib: f64,
    pub gpus: Vec<Gpu>,
    pub os: String,
    pub kernel: String,
    pub hostname: String,
    /// The decoder's dot-product kernels in this process
    /// ([`workloads::decoder::kernels::kernel_path`]): `avx512-vnni`, `avx2`
    /// or `candle`. Not part of `hardware_id` (it follows from the CPU,
    /// unless `BENCH_SUITE_NO_AVX512` is set); empty in runs recorded
    /// before it existed.
    #[serde(default)]
    pub cpu_kernels: String,
}

impl Fingerprint {
    /// Reads this machine.
    pub fn detect() -> Fingerprint {
        let mut sys = sysinfo::System::new();
        sys.refresh_memory();
        sys.refresh_cpu_list(sysinfo::CpuRefreshKind::nothing());
        let cpu_model = sys
            .cpus()
            .first()
            .map(|c| c.brand().trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into());
        let cpu_cores = std::thread::available_parallelism().map_or(sys.cpus().len(), |n| n.get());
        let memory_gib = (sys.total_memory() as f64 / (1u64 << 30) as f64 * 10.0).round() / 10.0;
        let mut fp = Fingerprint::new(
            cpu_model,
            cpu_cores,
            memory_gib,
            detect_gpus(),
            sysinfo::System::long_os_version().unwrap_or_else(|| std::env::consts::OS.into()),
            sysinfo::System::kernel_version().unwrap_or_default(),
            sysinfo::System::host_name().unwrap_or_else(|| "unknown".into()),
        );
        fp.cpu_kernels = workloads::decoder::kernels::kernel_path().to_string();
        fp
    }

    pub fn new(
        cpu_model: String,
        cpu_cores: usize,
        memory_gib: f64,
        gpus: Vec<Gpu>,
        os: String,
        kernel: String,
        hostname: String,
    ) -> Fingerprint {
        let mut key = format!("{cpu_model}|{cpu_cores}|{:.0}|{os}", memory_gib.round());
        for g in &gpus {
            key.push_str(&format!("|{}|{}|{}", g.name, g.driver, g.cuda));
        }
        let hardware_id = format!("{:016x}", workloads::seed::derive(0, &[&key]))[..12].to_string();
        Fingerprint {
            hardware_id,
            cpu_model,
            cpu_cores,
            memory_gib,
            gpus,
            os,
            kernel,
            hostname,
            cpu_kernels: String::new(),
        }
    }

    /// One line for tables: `AMD EPYC 9B14 x2, 23.5 GiB, NVIDIA H100 80GB HBM3`.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} x{}, {:.1} GiB",
            self.cpu_model, self.cpu_cores, self.memory_gib
        );
        if !self.cpu_kernels.is_empty() {
            s.push_str(&format!(" ({} kernels)", self.cpu_kernels));
        }
        for g in &self.gpus {
            s.push_str(&format!(
                ", {} (driver {}, CUDA {})",
                g.name, g.driver, g.cuda
            ));
        }
        s
    }

    /// A short device label for directory names: `cpu` or the GPU model.
    pub fn device_label(&self, cuda: bool) -> String {
        match (cuda, self.gpus.first()) {
            (true, Some(g)) => g
                .name
                .split_whitespace()
                .find(|w| w.chars().any(|c| c.is_ascii_digit()))
                .unwrap_or("gpu")
                .to_ascii_lowercase(),
            _ => "cpu".into(),
        }
    }
}

/// Asks `nvidia-smi`, if present; a machine without it has no GPUs for us.
fn detect_gpus() -> Vec<Gpu> {
    let query = Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,driver_version,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .output();
    let Ok(out) = query else { return Vec::new() };
    if !out.status.success() {
        return Vec::new();
    }
    let cuda = Command::new("nvidia-smi")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.split("CUDA Version:")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next().map(str::to_string))
        })
        .unwrap_or_else(|| "unknown".into());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            (f.len() >= 3).then(|| Gpu {
                name: f[0].into(),
                driver: f[1].into(),
                cuda: cuda.clone(),
                memory_mib: f[2].parse().unwrap_or(0),
            })
        })
        .collect()
}

/// The commit the results were produced from: `BENCH_SUITE_COMMIT` when set
/// (a machine that runs a copied binary in a copied tree, whose git
/// metadata may be stale), else the working tree's HEAD (with `-dirty` if it
/// has changes), else the commit the binary was built from.
pub fn git_commit() -> String {
    if let Some(c) = std::env::var("BENCH_SUITE_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
    {
        return c.trim().to_string();
    }
    let run = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match run(&["rev-parse", "HEAD"]) {
        Some(head) if !head.is_empty() => {
            let dirty = run(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{head}-dirty")
            } else {
                head
            }
        }
        _ => format!("{} (built)", env!("BENCH_SUITE_BUILD_COMMIT")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_id_ignores_host_and_kernel_but_not_hardware() {
        let fp = |cpu: &str, host: &str, kernel: &str| {
            Fingerprint::new(
                cpu.into(),
                2,
                23.5,
                vec![],
                "Debian 12".into(),
                kernel.into(),
                host.into(),
            )
        };
        let a = fp("EPYC", "runner-1", "6.1");
        assert_eq!(a.hardware_id, fp("EPYC", "runner-2", "6.2").hardware_id);
        assert_ne!(a.hardware_id, fp("Xeon", "runner-1", "6.1").hardware_id);
        assert_eq!(a.hardware_id.len(), 12);
        assert_eq!(a.device_label(true), "cpu");
    }

    #[test]
    fn runs_recorded_before_the_kernel_field_still_load() {
        let mut a = Fingerprint::new(
            "EPYC".into(),
            2,
            23.5,
            vec![],
            "Debian 12".into(),
            "6.1".into(),
            "h".into(),
        );
        let mut json = serde_json::to_value(&a).unwrap();
        json.as_object_mut().unwrap().remove("cpu_kernels");
        let old: Fingerprint = serde_json::from_value(json).unwrap();
        assert_eq!(old, a);
        assert_eq!(a.describe(), "EPYC x2, 23.5 GiB");
        a.cpu_kernels = "avx2".into();
        assert_eq!(a.describe(), "EPYC x2, 23.5 GiB (avx2 kernels)");
    }
}
