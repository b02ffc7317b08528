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

/// Set to `1` (or `generic`), this runs the end-to-end tests with the agents' XDP program
/// on the devices external traffic arrives on ([`XDP_DEVICES`]), in the agent's `auto`
/// (native on veth) or `generic` mode: `cargo xtask test` runs the north-south tests
/// both without and with it, so that the XDP and TC paths pass the same cases.
pub const XDP_ENV: &str = "LB_E2E_XDP";

/// The agents' `--xdp` in XDP mode: the node ends of the client links (`veth-cN`) and the
/// LAN device of the two-node network (`veth-up`).
pub const XDP_DEVICES: &str = "veth-c*,veth-up";

/// The agents' `--xdp-mode` when [`XDP_ENV`] asks for XDP, else `None`.
pub fn xdp_mode() -> Option<&'static str> {
    match std::env::var(XDP_ENV).as_deref() {
        Ok("1" | "auto" | "native") => Some("auto"),
        Ok("generic") => Some("generic"),
        _ => None,
    }
}

/// In XDP mode, turns transmit checksum offload off on `dev` of a client namespace `ns`.
/// A local socket's packet crosses a veth with a partial checksum (the sum of the
/// pseudo-header only), which no NIC ever delivers; the XDP program, like every XDP
/// program, rewrites complete checksums, so the clients send what a wire would carry.
pub fn wire_checksums(ns: &netns::NetNs, dev: &str) {
    if xdp_mode().is_some() {
        let owned = dev.to_owned();
        ns.run(move || tx_checksum_off(&owned))
            .unwrap_or_else(|e| panic!("turning transmit checksum offload off on {dev}: {e}"));
    }
}

/// `ETHTOOL_STXCSUM` (linux/ethtool.h): sets transmit checksum offload.
const ETHTOOL_STXCSUM: u32 = 0x17;

/// `ethtool -K DEV tx off` through the ethtool ioctl, in this thread's network namespace
/// (no tool needed: the VM guest has none).
pub fn tx_checksum_off(dev: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    /// `struct ethtool_value`.
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: 0,
    };
    // Any socket carries the ioctl.
    let sock = std::net::UdpSocket::bind(("127.0.0.1", 0))?;
    // SAFETY: an all-zero ifreq is valid (empty name, null data).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr
        .ifr_name
        .iter_mut()
        .zip(dev.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&raw mut value).cast();
    // SAFETY: SIOCETHTOOL with an ifreq whose data points at an ethtool_value that
    // outlives the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL as _, &raw mut ifr) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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
