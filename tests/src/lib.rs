//! Test support for end-to-end tests in network namespaces.
//!
//! Everything a test builds lives in namespaces it creates and removes: [`netns::NetNs`]
//! guards delete their namespace (and with it every veth end inside) on drop, servers are
//! threads of the test process bound inside a pod namespace, [`process::Proc`] kills and
//! reaps a spawned process on drop, and [`agent::Agent`] kills its agent and removes its
//! bpffs pin directory on drop. Nothing is attached to, or addressed on, the machine's own
//! interfaces. See tests/README.md for the topology.
pub mod agent;
pub mod clients;
pub mod cluster;
pub mod netns;
pub mod process;
pub mod servers;
pub mod topology;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Polls `pred` every 20 ms until it returns true or `timeout` passes; panics with `what`
/// on timeout. Tests wait for conditions with this, never with fixed sleeps.
pub fn wait_until(what: &str, timeout: Duration, mut pred: impl FnMut() -> bool) {
    let start = Instant::now();
    while !pred() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Panics unless running as root (the tests create namespaces and load BPF programs).
pub fn require_root() {
    if !is_root() {
        panic!("the end-to-end tests need root: run them with `cargo xtask test` as root");
    }
}

/// Why these tests cannot run on this kernel, if it lacks something they need: the `bpf`
/// system call or network namespaces. Anything else missing is a failure, not a skip.
pub fn missing_kernel_feature() -> Option<String> {
    if !Path::new("/proc/self/ns/net").exists() {
        return Some("the kernel has no network namespaces (CONFIG_NET_NS)".into());
    }
    // BPF_MAP_CREATE with no attributes: EINVAL where bpf(2) exists, ENOSYS where not.
    // SAFETY: a null attribute pointer with size 0 is rejected before any access.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 0, std::ptr::null::<u8>(), 0) };
    if rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        return Some("the kernel has no bpf(2) system call (CONFIG_BPF_SYSCALL)".into());
    }
    None
}

/// Path of a binary of this workspace's release build: `target/release/NAME` (cargo's
/// `CARGO_TARGET_DIR` is not consulted: the workspace keeps the default).
pub fn workspace_binary(name: &str) -> PathBuf {
    let tests_crate = Path::new(env!("CARGO_MANIFEST_DIR"));
    tests_crate
        .parent()
        .unwrap_or(tests_crate)
        .join("target/release")
        .join(name)
}
