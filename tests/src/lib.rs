//! Test support for end-to-end tests in network namespaces.
//!
//! Everything a test builds lives in namespaces it creates and removes: [`netns::NetNs`]
//! guards delete their namespace (and with it every veth end inside) on drop, servers are
//! threads of the test process bound inside a pod namespace, and [`agent::Agent`] kills its
//! agent and removes its bpffs pin directory on drop. Nothing is attached to, or addressed
//! on, the machine's own interfaces. See tests/README.md for the topology.
pub mod agent;
pub mod netns;
pub mod servers;
pub mod topology;

use std::time::{Duration, Instant};

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
