//! Clocks and the stopwatch that times a job.
//!
//! Every clock read first synchronises the device (AlgoPerf's `_get_time`
//! calls `torch.cuda.synchronize()` before `time.time()`), so asynchronous
//! GPU work is never left outside the measurement. Three clocks: [`CpuClock`],
//! `CudaClock` (feature `cuda`, synchronises the context's stream), and
//! [`MockClock`], whose time only moves when a job says it spent time, so
//! whole runs can be tested and snapshotted exactly (hyperfine's
//! `MockExecutor`).

use std::cell::Cell;
use std::time::{Duration, Instant};

use crate::WorkloadError;

/// A monotonic clock that synchronises its device before each read.
pub trait Clock {
    /// Seconds since an arbitrary origin, read after a device sync.
    fn now(&self) -> f64;

    /// Spend `seconds` of time: the mock clock advances, a real clock
    /// sleeps. Only test workloads use it.
    fn spend(&self, seconds: f64);

    fn name(&self) -> &'static str;
}

/// Wall clock for CPU work.
#[derive(Debug)]
pub struct CpuClock {
    origin: Instant,
}

impl Default for CpuClock {
    fn default() -> Self {
        CpuClock {
            origin: Instant::now(),
        }
    }
}

impl Clock for CpuClock {
    fn now(&self) -> f64 {
        self.origin.elapsed().as_secs_f64()
    }

    fn spend(&self, seconds: f64) {
        std::thread::sleep(Duration::from_secs_f64(seconds.max(0.0)));
    }

    fn name(&self) -> &'static str {
        "cpu"
    }
}

/// A clock whose time advances only through [`Clock::spend`].
#[derive(Debug, Default)]
pub struct MockClock {
    now: Cell<f64>,
}

impl Clock for MockClock {
    fn now(&self) -> f64 {
        self.now.get()
    }

    fn spend(&self, seconds: f64) {
        self.now.set(self.now.get() + seconds.max(0.0));
    }

    fn name(&self) -> &'static str {
        "mock"
    }
}

/// Wall clock that synchronises a CUDA context before every read.
#[cfg(feature = "cuda")]
pub struct CudaClock {
    ctx: std::sync::Arc<cudarc::driver::CudaContext>,
    origin: Instant,
}

#[cfg(feature = "cuda")]
impl CudaClock {
    pub fn new(ctx: std::sync::Arc<cudarc::driver::CudaContext>) -> Self {
        CudaClock {
            ctx,
            origin: Instant::now(),
        }
    }
}

#[cfg(feature = "cuda")]
impl Clock for CudaClock {
    fn now(&self) -> f64 {
        // A failed synchronise means the device is gone; the trial errors
        // out on its next CUDA call, so reading the time is still safe.
        let _ = self.ctx.synchronize();
        self.origin.elapsed().as_secs_f64()
    }

    fn spend(&self, seconds: f64) {
        std::thread::sleep(Duration::from_secs_f64(seconds.max(0.0)));
    }

    fn name(&self) -> &'static str {
        "cuda"
    }
}

/// Times one job: the runner starts and stops it; the job may pause it for
/// evaluation and must call [`Stopwatch::check`] in long loops.
pub struct Stopwatch<'c> {
    clock: &'c dyn Clock,
    budget_s: f64,
    /// Active seconds accumulated before the current running interval.
    banked: f64,
    /// Clock reading at the start of the current interval, if running.
    since: Option<f64>,
}

impl<'c> Stopwatch<'c> {
    pub fn new(clock: &'c dyn Clock, budget_s: f64) -> Self {
        Stopwatch {
            clock,
            budget_s,
            banked: 0.0,
            since: None,
        }
    }

    /// Starts (or resumes) timing, after a device sync.
    pub fn start(&mut self) {
        if self.since.is_none() {
            self.since = Some(self.clock.now());
        }
    }

    /// Stops timing, after a device sync; returns the active seconds.
    pub fn stop(&mut self) -> f64 {
        if let Some(t0) = self.since.take() {
            self.banked += self.clock.now() - t0;
        }
        self.banked
    }

    /// Active (timed) seconds so far.
    pub fn elapsed(&self) -> f64 {
        self.banked + self.since.map_or(0.0, |t0| self.clock.now() - t0)
    }

    pub fn budget_s(&self) -> f64 {
        self.budget_s
    }

    /// Cooperative cancellation: an error once the budget is spent.
    pub fn check(&self) -> Result<(), WorkloadError> {
        let elapsed = self.elapsed();
        if elapsed > self.budget_s {
            Err(WorkloadError::OverBudget {
                elapsed_s: elapsed,
                budget_s: self.budget_s,
            })
        } else {
            Ok(())
        }
    }

    /// Runs `f` with the clock paused (evaluation inside a training-style
    /// job is untimed, as in AlgoPerf).
    pub fn paused<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let running = self.since.is_some();
        self.stop();
        let out = f();
        if running {
            self.start();
        }
        out
    }

    /// Spends simulated time on the underlying clock (test workloads).
    pub fn spend(&self, seconds: f64) {
        self.clock.spend(seconds);
    }

    pub fn clock_name(&self) -> &'static str {
        self.clock.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine with a GPU: the CUDA clock opens, reads after a
    /// synchronise, and measures a sleep. Without a driver it says so and
    /// the device code path is exercised up to the clean error.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_clock_synchronises_and_measures() {
        match crate::device::cuda_context(0) {
            Ok(ctx) => {
                let clock = CudaClock::new(ctx);
                let t0 = clock.now();
                clock.spend(0.05);
                let dt = clock.now() - t0;
                assert!((0.05..0.5).contains(&dt), "measured {dt} s");
                println!("cuda clock ok: 50 ms sleep measured as {dt:.4} s");
            }
            Err(e) => {
                assert!(e.to_string().contains("no CUDA driver"), "{e}");
                println!("no GPU here: {e}");
            }
        }
    }

    #[test]
    fn stopwatch_excludes_paused_time_and_enforces_budget() {
        let clock = MockClock::default();
        let mut sw = Stopwatch::new(&clock, 1.0);
        clock.spend(5.0); // before start: set-up, not timed
        sw.start();
        sw.spend(0.25);
        sw.paused(|| clock.spend(10.0));
        sw.spend(0.5);
        assert!(sw.check().is_ok());
        sw.spend(0.5);
        assert!(matches!(sw.check(), Err(WorkloadError::OverBudget { .. })));
        assert_eq!(sw.stop(), 1.25);
        clock.spend(3.0);
        assert_eq!(sw.elapsed(), 1.25);
    }
}
