//! Child processes with a time limit: the GPU peer scripts of
//! `point-cloud-sla` run as Python processes that the harness waits for,
//! and one that hangs must not stall the whole run.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use wait_timeout::ChildExt;

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
