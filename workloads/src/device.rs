//! Where a run executes, and the clock that goes with it.
//!
//! Without the `cuda` feature, asking for a CUDA device is a clean error
//! (candle's `dummy_cuda_backend.rs` does the same), never a panic.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::clock::{Clock, CpuClock};
use crate::WorkloadError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    pub fn is_cuda(self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// The clock for this device. A CUDA device needs the `cuda` feature and
    /// a driver; either missing is an error that says so.
    pub fn clock(self) -> Result<Box<dyn Clock>, WorkloadError> {
        match self {
            Device::Cpu => Ok(Box::new(CpuClock::default())),
            Device::Cuda(ordinal) => cuda_clock(ordinal),
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_clock(_ordinal: usize) -> Result<Box<dyn Clock>, WorkloadError> {
    Err(WorkloadError::Device(
        "this binary was built without CUDA; rebuild with `--features cuda` (see README, \"On a GPU\")"
            .into(),
    ))
}

#[cfg(feature = "cuda")]
fn cuda_clock(ordinal: usize) -> Result<Box<dyn Clock>, WorkloadError> {
    let ctx = cuda_context(ordinal)?;
    Ok(Box::new(crate::clock::CudaClock::new(ctx)))
}

/// Whether libcuda can be loaded. With `gpu-decoder`, candle links libcuda,
/// so a binary that runs has it.
#[cfg(feature = "cuda")]
pub fn driver_present() -> bool {
    #[cfg(feature = "gpu-decoder")]
    return true;
    // SAFETY: only probes whether the driver library can be loaded.
    #[cfg(not(feature = "gpu-decoder"))]
    unsafe {
        cudarc::driver::sys::is_culib_present()
    }
}

/// Opens a CUDA context, checking for the driver first: without one cudarc
/// panics instead of returning an error (see shared/GPU.md).
#[cfg(feature = "cuda")]
pub fn cuda_context(
    ordinal: usize,
) -> Result<std::sync::Arc<cudarc::driver::CudaContext>, WorkloadError> {
    if !driver_present() {
        return Err(WorkloadError::Device(
            "no CUDA driver (libcuda) found on this machine; use --device cpu".into(),
        ));
    }
    cudarc::driver::CudaContext::new(ordinal)
        .map_err(|e| WorkloadError::Device(format!("cannot open cuda:{ordinal}: {e}")))
}

/// How a CUDA-event sample is taken ([`ColdStart`]).
#[cfg(feature = "cuda")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timing {
    /// The device's time alone, from a cold L2: the published figure.
    Device,
    /// Events recorded on an idle, synchronised device: the sample also
    /// holds the host's submission of every launch, and the L2 keeps what
    /// the previous sample left there (what runs r1-r6 of `point-cloud-sla`
    /// reported).
    Launch,
}

/// Makes an event pair time the device alone. Before the start event, the
/// L2 is flushed (256 MiB zeroed, as `triton.testing.do_bench` does) and
/// the stream held by a kernel that spins for [`ColdStart::HOLD_NS`] (as
/// nvbench's blocking kernel does), so the host has queued the start
/// event, the timed launches and the end event before the device reaches
/// them. Without this, a sample taken on an idle device also measures how
/// fast the host submits the launches, and small inputs are read from L2,
/// not memory.
#[cfg(feature = "cuda")]
pub struct ColdStart {
    flush: std::cell::RefCell<cudarc::driver::CudaSlice<u8>>,
    hold: cudarc::driver::CudaFunction,
    _module: std::sync::Arc<cudarc::driver::CudaModule>,
}

#[cfg(feature = "cuda")]
impl ColdStart {
    /// Bytes zeroed to flush the L2 (50 MiB on an H100).
    pub const FLUSH_BYTES: usize = 256 << 20;
    /// How long the stream is held: far longer than the host takes to queue
    /// one sample (a few launches, or a Python call of a few kernels).
    pub const HOLD_NS: u64 = 1_000_000;
    const SOURCE: &'static str = r#"
extern "C" __global__ void hold_stream(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns);
}
"#;

    pub fn new(
        ctx: &std::sync::Arc<cudarc::driver::CudaContext>,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<Self, WorkloadError> {
        let err = |what: &str, e: &dyn fmt::Display| {
            WorkloadError::Device(format!("timing set-up ({what}): {e}"))
        };
        let ptx = cudarc::nvrtc::compile_ptx(Self::SOURCE)
            .map_err(|e| err("NVRTC could not compile the stream hold", &e))?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| err("loading the stream hold", &e))?;
        let hold = module
            .load_function("hold_stream")
            .map_err(|e| err("kernel hold_stream", &e))?;
        let flush = stream
            .alloc_zeros::<u8>(Self::FLUSH_BYTES)
            .map_err(|e| err("allocating the L2 flush buffer", &e))?;
        Ok(ColdStart {
            flush: std::cell::RefCell::new(flush),
            hold,
            _module: module,
        })
    }

    /// Queues the flush and the hold on `stream` (for [`Timing::Device`]).
    pub fn prepare(
        &self,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<(), WorkloadError> {
        let err = |e: cudarc::driver::DriverError| {
            WorkloadError::Device(format!("timing (L2 flush and stream hold): {e}"))
        };
        stream
            .memset_zeros(&mut *self.flush.borrow_mut())
            .map_err(err)?;
        self.hold_for(stream, Self::HOLD_NS).map_err(err)
    }

    /// Queues a kernel that spins for `ns` nanoseconds of device time.
    pub fn hold_for(
        &self,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        ns: u64,
    ) -> Result<(), cudarc::driver::DriverError> {
        use cudarc::driver::PushKernelArg;
        let mut b = stream.launch_builder(&self.hold);
        b.arg(&ns);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: hold_stream takes one u64 and touches no memory.
        unsafe { b.launch(cfg) }.map(|_| ())
    }
}

/// Kernel tuning on a GPU machine without a Rust toolchain: the CUDA
/// source a workload compiles with NVRTC is `builtin`, or the file that the
/// environment variable `var` names (same kernels and arguments), with a
/// warning. Published runs leave it unset.
#[cfg(feature = "cuda")]
pub fn kernel_source(var: &str, builtin: &str) -> Result<String, WorkloadError> {
    let Some(path) = std::env::var_os(var) else {
        return Ok(builtin.to_string());
    };
    let shown = std::path::Path::new(&path).display().to_string();
    eprintln!("warning: kernels compiled from {shown} ({var}), not the built-in source");
    std::fs::read_to_string(&path).map_err(|e| {
        WorkloadError::Device(format!(
            "reading {var}={shown}: {e}; unset {var} to use the built-in kernels"
        ))
    })
}

/// A positive count for kernel tuning: `default`, or the value of the
/// environment variable `var` where set (with a warning; anything but a
/// positive integer is an error). Published runs leave it unset.
#[cfg(feature = "cuda")]
pub fn tuning_count(var: &str, what: &str, default: usize) -> Result<usize, WorkloadError> {
    let Some(raw) = std::env::var_os(var) else {
        return Ok(default);
    };
    let n = positive_count(var, &raw, default)?;
    eprintln!("warning: {what} {n} ({var}), not {default}");
    Ok(n)
}

/// `raw` (the value of `var`) as a positive integer, or an error naming
/// the variable and what to give instead.
#[cfg(any(feature = "cuda", test))]
fn positive_count(
    var: &str,
    raw: &std::ffi::OsStr,
    default: usize,
) -> Result<usize, WorkloadError> {
    match raw.to_str().and_then(|v| v.trim().parse::<usize>().ok()) {
        Some(n) if n > 0 => Ok(n),
        _ => Err(WorkloadError::Config(format!(
            "{var}={raw:?} is not a positive integer; unset it or give a count such as {default}"
        ))),
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("unknown device `{s}`; valid devices: cpu, cuda, cuda:N (N = 0, 1, ...)");
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(bad),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuning_counts_must_be_positive_integers() {
        use std::ffi::OsStr;
        assert_eq!(positive_count("V", OsStr::new("16"), 8).unwrap(), 16);
        assert_eq!(positive_count("V", OsStr::new(" 3 "), 8).unwrap(), 3);
        for bad in ["0", "-2", "1.5", "", "many"] {
            let e = positive_count("V", OsStr::new(bad), 8)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("V=") && e.contains("positive integer") && e.contains('8'),
                "{e}"
            );
        }
    }

    #[test]
    fn parses_devices_and_rejects_junk() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "CPU"] {
            assert!(bad.parse::<Device>().unwrap_err().contains("valid devices"));
        }
    }
}
