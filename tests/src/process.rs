//! Spawned processes that cannot outlive the test that started them.
use std::{
    io,
    mem::ManuallyDrop,
    process::{Child, Command, ExitStatus},
    time::{Duration, Instant},
};

/// A child process, killed with SIGKILL and reaped when the guard is dropped (also when a
/// test panics).
#[derive(Debug)]
pub struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    /// Spawns `cmd`; `what` names it in panics.
    pub fn spawn(cmd: &mut Command, what: &str) -> Self {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({cmd:?}): {e}"));
        Self {
            child,
            what: what.to_owned(),
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The child's stdout, when it was spawned with `Stdio::piped()`.
    pub fn stdout(&mut self) -> Option<&mut std::process::ChildStdout> {
        self.child.stdout.as_mut()
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .try_wait()
            .unwrap_or_else(|e| panic!("wait for {}: {e}", self.what))
    }

    /// Sends SIGTERM and waits up to `grace` for the process to exit, then kills it.
    pub fn terminate(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < grace {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// Kills the process with SIGKILL (as a crash or an OOM kill would) and reaps it.
    pub fn kill(&mut self) {
        match self.child.kill() {
            Ok(()) => {}
            // Already exited (and possibly reaped by `exited`).
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {}
            Err(e) => panic!("kill {}: {e}", self.what),
        }
        let _ = self.child.wait();
    }

    /// Leaves the process running after this guard is gone (`cargo xtask demo --keep`);
    /// returns its pid.
    pub fn persist(self) -> u32 {
        ManuallyDrop::new(self).child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
