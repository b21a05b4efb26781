//! Child processes with a time limit: the GPU peer scripts of
//! `point-cloud-sla` and `long-context` run as Python processes that the
//! harness waits for, and one that hangs must not stall the whole run.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use wait_timeout::ChildExt;

use crate::WorkloadError;

/// The environment variable that overrides every peer script's limit.
pub const PEER_TIMEOUT_VAR: &str = "BENCH_SUITE_PEER_TIMEOUT_S";

/// A peer script's time limit: `default_s` seconds, or
/// `BENCH_SUITE_PEER_TIMEOUT_S` where set (an error naming the variable if
/// it is not a positive number of seconds).
pub fn peer_timeout(default_s: u64) -> Result<Duration, WorkloadError> {
    parse_timeout(std::env::var(PEER_TIMEOUT_VAR).ok().as_deref(), default_s)
}

fn parse_timeout(raw: Option<&str>, default_s: u64) -> Result<Duration, WorkloadError> {
    match raw {
        None => Ok(Duration::from_secs(default_s)),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(s) if s > 0 => Ok(Duration::from_secs(s)),
            _ => Err(WorkloadError::Config(format!(
                "{PEER_TIMEOUT_VAR}={v:?} is not a positive number of seconds; unset it or give \
                 one such as {default_s}"
            ))),
        },
    }
}

/// The last `lines` lines of a child's standard-error file, joined with
/// ` | ` (invalid UTF-8 replaced), for an error message.
pub fn stderr_tail(path: &std::path::Path, lines: usize) -> String {
    let err = std::fs::read(path).unwrap_or_default();
    let err = String::from_utf8_lossy(&err);
    let tail: Vec<&str> = err.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// How long a stopped child may take to exit before the harness moves on.
pub const KILL_GRACE: Duration = Duration::from_secs(10);

/// Starts `cmd` with no standard input or output and its standard error to
/// the file `stderr` (a file, so that a chatty child never blocks on a full
/// pipe). The child stays in the harness's process group, so that an
/// interrupt from the terminal stops it along with the harness.
pub fn spawn_logged(mut cmd: Command, stderr: std::fs::File) -> std::io::Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
}

/// Waits at most `limit` for `child`: its exit status, or `None` if it was
/// still running then. A child past its limit is killed (SIGKILL) and
/// reaped if it exits within [`KILL_GRACE`]; one stuck in the kernel (a
/// driver call) is left behind rather than waited for without end.
pub fn wait_limited(mut child: Child, limit: Duration) -> std::io::Result<Option<ExitStatus>> {
    if let Some(status) = child.wait_timeout(limit)? {
        return Ok(Some(status));
    }
    let _ = child.kill();
    child.wait_timeout(KILL_GRACE)?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn the_time_limit_comes_from_the_default_or_the_variable() {
        assert_eq!(parse_timeout(None, 300).unwrap(), Duration::from_secs(300));
        assert_eq!(
            parse_timeout(Some(" 42 "), 300).unwrap(),
            Duration::from_secs(42)
        );
        for bad in ["0", "-3", "ten", ""] {
            let e = parse_timeout(Some(bad), 300).unwrap_err().to_string();
            assert!(
                e.contains(PEER_TIMEOUT_VAR) && e.contains("300"),
                "{bad}: {e}"
            );
        }
    }

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    }

    /// A fresh standard-error file in the system's temporary directory.
    fn log(tag: &str) -> (PathBuf, std::fs::File) {
        let p = std::env::temp_dir().join(format!(
            "bench-suite-child-{}-{tag}.txt",
            std::process::id()
        ));
        let f = std::fs::File::create(&p).unwrap();
        (p, f)
    }

    #[test]
    fn a_child_past_its_limit_is_stopped_with_its_output_kept() {
        let (p, f) = log("limit");
        let t = std::time::Instant::now();
        let child = spawn_logged(sh("echo started >&2; exec sleep 60"), f).unwrap();
        let ran = wait_limited(child, Duration::from_secs(2)).unwrap();
        assert!(
            ran.is_none(),
            "a child still running at its limit reports None"
        );
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "stopped, not waited for: {:?}",
            t.elapsed()
        );
        assert_eq!(std::fs::read_to_string(&p).unwrap().trim(), "started");
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn a_finished_child_reports_its_status_and_output() {
        let (p, f) = log("status");
        let child = spawn_logged(sh("echo oops >&2; exit 3"), f).unwrap();
        let ran = wait_limited(child, Duration::from_secs(60)).unwrap();
        assert_eq!(ran.and_then(|s| s.code()), Some(3));
        assert_eq!(std::fs::read_to_string(&p).unwrap().trim(), "oops");
        let _ = std::fs::remove_file(&p);
        let (_, f) = log("status");
        let ran = wait_limited(
            spawn_logged(sh("true"), f).unwrap(),
            Duration::from_secs(60),
        );
        assert!(ran.unwrap().is_some_and(|s| s.success()));
        let (_, f) = log("status");
        assert!(spawn_logged(Command::new("/nonexistent/bench-suite-python"), f).is_err());
    }
}
