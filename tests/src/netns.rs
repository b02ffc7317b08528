//! Network namespaces: RAII guards, commands inside them, and code run inside them.
use std::{
    fs::File,
    mem::ManuallyDrop,
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

/// A named network namespace (`/run/netns/NAME`), deleted on drop (also when a test
/// panics), and with it every interface inside it.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A number unique within this process: one per fixture (topology) built.
pub fn next_id() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// `lbt-<pid>-<n>`: a name prefix unique to this process and fixture number `n`, so that
/// concurrent test runs never share a namespace or a pin directory.
pub fn unique_prefix(n: u32) -> String {
    format!("lbt-{}-{n}", std::process::id())
}

impl NetNs {
    /// Creates namespace `name` with `lo` up.
    pub fn new(name: &str) -> Self {
        run(Command::new("ip").args(["netns", "add", name]));
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the namespace file, for `nsenter --net=` and `setns`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `ip -n NAME ARGS`, panicking on failure.
    pub fn ip(&self, args: &[&str]) -> Output {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key_value: &str) {
        run_in(self, &["sysctl", "-qw", key_value]);
    }

    /// Runs `f` on a thread that has entered this network namespace, and returns its
    /// result. Sockets created by `f` belong to this namespace for their whole life, even
    /// when they are used from other threads afterwards.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Leaves the namespace in place after this guard is gone (`cargo xtask demo --keep`);
    /// returns its name.
    pub fn persist(self) -> String {
        ManuallyDrop::new(self).name.clone()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &str) {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: valid fd; CLONE_NEWNET affects only this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// `ip netns exec NAME ARGV...`, ready to be run or spawned. (It also gives the command a
/// private /sys; see `agent.rs` for why the agent is started differently.)
pub fn command_in(ns: &NetNs, argv: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name]).args(argv);
    cmd
}

/// Runs `argv` inside `ns` (`ip netns exec`), panicking with its output on failure.
pub fn run_in(ns: &NetNs, argv: &[&str]) -> Output {
    run(&mut command_in(ns, argv))
}

/// Runs a command and panics with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}
