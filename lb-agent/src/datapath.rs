//! Loading the datapath into the kernel, pinning what must outlive the agent, and
//! attaching the TC programs to devices.
//!
//! Pinned under `--bpffs-root`:
//! - the services, backends, connection-tracking, affinity and source ranges maps
//!   (`<root>/<MAP>`), so a
//!   restarted agent finds the tables and the live flows where it left them;
//! - the tcx links (`<root>/links/<ifindex>_<dir>_<ifname>`), so the datapath keeps
//!   translating while the agent is down (a crash, `kill -9`, an upgrade). A new agent
//!   swaps its freshly loaded programs into those links atomically (`bpf_link_update`):
//!   no packet ever sees a device without a program.
//!
//! - with `--cgroup-path`, the cgroup `sock_addr` links of the socket hooks
//!   (`<root>/links/cgroup_<cgroup id>_<hook>`), taken over the same way.
//!
//! On kernels without tcx (before 6.6), the programs sit in `cls_bpf` filters of a
//! `clsact` qdisc instead, at a fixed priority and handle per direction
//! ([`crate::features`]): the filters outlive the agent by themselves, and a new agent
//! replaces their programs in place (a netlink filter change, no gap). Nothing is pinned
//! for them; detaching deletes the filters by program name.
//!
//! A clean shutdown (SIGINT/SIGTERM) detaches the programs and removes the link pins; the
//! maps stay pinned, so the next agent re-adopts the established flows.
use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    fs, io,
    os::fd::{AsFd as _, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        HashMap as BpfHashMap, MapData, MapInfo, PerCpuArray,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, Program, ProgramError, SchedClassifier,
        TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{
            NlOptions, SchedClassifierLink, TcAttachOptions, qdisc_add_clsact, qdisc_detach_program,
        },
        xdp::XdpLink,
    },
};
use lb_common::{
    Backend, METRICS_LEN, SOURCE_RANGE_KEY_LEN, ServiceKey, ServiceValue, SourceRangeKey, map_names,
};
use tracing::{debug, info, warn};

use crate::{
    features::{
        Feature, Features, NETLINK_HANDLE, NETLINK_PRIORITY, Probe, SOCK_HOOKS, SockHook, TcAttach,
        XDP_SINCE,
    },
    maps::{MapError, ServiceMaps},
    model::Cidr,
};

/// The eBPF object built by `build.rs` (absent when built with `AYA_BUILD_SKIP=1`).
#[cfg(embedded_obj)]
static EMBEDDED_OBJECT: Option<&[u8]> =
    Some(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb")));
#[cfg(not(embedded_obj))]
static EMBEDDED_OBJECT: Option<&[u8]> = None;

const INGRESS_DIR: &str = "ingress";
const EGRESS_DIR: &str = "egress";
const XDP_DIR: &str = "xdp";

/// Pin name of a device's link. bpffs refuses names with a dot, which device names may
/// have (`eth0.100`); the ifindex makes the name unique even when a name is reused.
fn link_pin_name(ifindex: u32, dir: &str, device: &str) -> String {
    format!("{ifindex}_{dir}_{}", device.replace('.', "_"))
}

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is mounted when it is not mounted yet.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// The TC ingress program: DNAT of traffic to frontends.
pub const INGRESS_PROG: &str = "lb_tc_ingress";
/// The TC egress program: reverse NAT of replies.
pub const EGRESS_PROG: &str = "lb_tc_egress";
/// The XDP program: translation of external traffic before the TC ingress program.
pub const XDP_PROG: &str = "lb_xdp";

/// How `--xdp` attaches the XDP program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum XdpAttachMode {
    /// Native (in the driver) where the driver supports it, generic otherwise.
    #[default]
    Auto,
    /// Native only: a device whose driver has no XDP support is an error.
    Native,
    /// Generic (in the kernel's receive path, after the socket buffer is built).
    Generic,
}

/// Where and how the XDP program is attached (`--xdp`, `--xdp-mode`).
#[derive(Debug, Clone)]
pub struct XdpConfig {
    /// The devices (they also get the TC programs).
    pub devices: DevicePatterns,
    /// The attach mode.
    pub mode: XdpAttachMode,
}

/// Why the datapath could not be set up. Each message names the fix.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// Not root / no CAP_BPF + CAP_NET_ADMIN.
    #[error(
        "not enough privilege: lb-agent needs to run as root (uid 0) with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (and CAP_SYS_ADMIN if it has to mount bpffs)"
    )]
    Privilege,
    /// bpffs missing and could not be mounted.
    #[error("no bpffs: {path} is not a bpf filesystem and mounting one failed: {source}")]
    NoBpffs {
        /// The mount point.
        path: String,
        /// The mount error.
        #[source]
        source: io::Error,
    },
    /// The pin directory is unusable.
    #[error("cannot use pin directory {path}: {source}")]
    PinDir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The kernel lacks something the datapath needs.
    #[error("this kernel ({kernel}) lacks {feature}: {detail}")]
    KernelFeature {
        /// Running kernel.
        kernel: String,
        /// The missing feature.
        feature: &'static str,
        /// What failed.
        detail: String,
    },
    /// No eBPF object available.
    #[error(
        "this lb-agent was built without the eBPF object (AYA_BUILD_SKIP); pass --ebpf-object PATH"
    )]
    NoObject,
    /// Loading the object failed.
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// `--cgroup-path` is not a cgroup v2 directory, or the hooks cannot be attached there.
    #[error("cannot attach the socket hooks to cgroup {path}: {source}")]
    Cgroup {
        /// The cgroup directory.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// Attaching to a device failed.
    #[error("attaching {prog} to {device} failed: {source}")]
    Attach {
        /// Program name.
        prog: &'static str,
        /// Device name.
        device: String,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Result alias for this module.
pub type Result<T, E = DatapathError> = std::result::Result<T, E>;

fn kernel_string() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Checks privileges and bpffs, mounting it at /sys/fs/bpf if needed, and creates the pin
/// directories under `root`.
pub fn prepare(root: &Path) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(DatapathError::Privilege);
    }
    if !is_bpffs(Path::new(BPFFS_MOUNT)) {
        fs::create_dir_all(BPFFS_MOUNT).map_err(|source| DatapathError::NoBpffs {
            path: BPFFS_MOUNT.to_owned(),
            source,
        })?;
        mount_bpffs(BPFFS_MOUNT).map_err(|source| DatapathError::NoBpffs {
            path: BPFFS_MOUNT.to_owned(),
            source,
        })?;
        info!(path = BPFFS_MOUNT, "mounted bpffs");
        if private_mount_namespace() {
            // e.g. under `ip netns exec`, which remounts /sys: this bpffs instance dies
            // with the namespace, and with it the pins meant to outlive the agent.
            warn!(
                "bpffs was mounted inside a private mount namespace: pinned maps and links \
                 will not outlive this process (enter only the network namespace, e.g. \
                 `nsenter --net=/run/netns/NAME`, to keep the host's bpffs)"
            );
        }
    }
    for dir in [root.to_path_buf(), root.join("links")] {
        fs::create_dir_all(&dir).map_err(|source| DatapathError::PinDir {
            path: dir.clone(),
            source,
        })?;
    }
    if !is_bpffs(root) {
        return Err(DatapathError::NoBpffs {
            path: root.display().to_string(),
            source: io::Error::other("the pin directory must be on a bpf filesystem"),
        });
    }
    Ok(())
}

/// What [`cleanup`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cleanup {
    /// Program links unpinned (each detached a program from a device).
    pub links: usize,
    /// Other pins (maps) removed.
    pub maps: usize,
}

/// Removes everything the agent pinned under `root` (`lb-agent --cleanup`): the program
/// links first, whose last reference is the pin, so removing it detaches the program from
/// its device, then the maps, then the directories. Nothing under `root` is not an
/// error; a `root` that is not on bpffs is refused rather than deleted.
pub fn cleanup(root: &Path) -> Result<Cleanup> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(DatapathError::Privilege);
    }
    let mut done = Cleanup::default();
    if !root.exists() {
        return Ok(done);
    }
    if !is_bpffs(root) {
        return Err(DatapathError::NoBpffs {
            path: root.display().to_string(),
            source: io::Error::other("not on a bpf filesystem: refusing to remove it"),
        });
    }
    let remove = |path: &Path, count: &mut usize| -> Result<()> {
        fs::remove_file(path).map_err(|source| DatapathError::PinDir {
            path: path.to_path_buf(),
            source,
        })?;
        *count += 1;
        Ok(())
    };
    let links = root.join("links");
    for entry in fs::read_dir(&links).into_iter().flatten().flatten() {
        // Releasing the last reference detaches too, but the kernel does that later, in a
        // work queue: detach first, so that traffic is untranslated when this returns.
        if let Err(e) = detach_pinned_link(&entry.path()) {
            warn!(pin = %entry.path().display(), error = %e, "cannot detach link; removing its pin");
        }
        remove(&entry.path(), &mut done.links)?;
    }
    // Netlink TC filters (kernels without tcx) have no pins: found by program name.
    for device in list_devices().into_keys() {
        done.links += detach_netlink(&device);
    }
    for entry in fs::read_dir(root).into_iter().flatten().flatten() {
        if entry.path() != links {
            remove(&entry.path(), &mut done.maps)?;
        }
    }
    for dir in [links.as_path(), root] {
        match fs::remove_dir(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(DatapathError::PinDir {
                    path: dir.to_path_buf(),
                    source: e,
                });
            }
            _ => {}
        }
    }
    Ok(done)
}

/// Deletes the agent's netlink TC filters (by program name) on `device`; returns how many
/// directions had one.
fn detach_netlink(device: &str) -> usize {
    [
        (INGRESS_PROG, TcAttachType::Ingress),
        (EGRESS_PROG, TcAttachType::Egress),
    ]
    .into_iter()
    .filter(|(prog, attach_type)| qdisc_detach_program(device, *attach_type, prog).is_ok())
    .count()
}

/// Detaches the BPF link pinned at `path` from whatever it is attached to, now
/// (`BPF_OBJ_GET`, then `BPF_LINK_DETACH`); the link object lives on until its pin goes.
fn detach_pinned_link(path: &Path) -> io::Result<()> {
    const BPF_LINK_DETACH: libc::c_long = 34;
    let link = open_pinned(path)?;
    let detach: [u32; 2] = [link.as_raw_fd() as u32, 0];
    // SAFETY: bpf(2) reads `size_of_val(&detach)` bytes of the link_detach attribute we
    // own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            detach.as_ptr(),
            std::mem::size_of_val(&detach),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A descriptor of the BPF object pinned at `path` (`BPF_OBJ_GET`).
fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    const BPF_OBJ_GET: libc::c_long = 7;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let get = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: bpf(2) reads `size_of::<ObjGet>()` bytes of the attribute we own; the path
    // outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &get as *const ObjGet,
            std::mem::size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn private_mount_namespace() -> bool {
    match (
        fs::read_link("/proc/self/ns/mnt"),
        fs::read_link("/proc/1/ns/mnt"),
    ) {
        (Ok(own), Ok(init)) => own != init,
        _ => false,
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

fn mount_bpffs(target: &str) -> io::Result<()> {
    let src = CString::new("bpffs").expect("static string");
    let tgt = CString::new(target).expect("static string");
    let fstype = CString::new("bpf").expect("static string");
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Expected (key size, value size) of each pinned map.
fn expected_layout(name: &str) -> Option<(u32, u32)> {
    use std::mem::size_of;
    let sizes = match name {
        map_names::SERVICES => (size_of::<ServiceKey>(), size_of::<ServiceValue>()),
        map_names::BACKENDS => (size_of::<u32>(), size_of::<Backend>()),
        map_names::CT => (
            size_of::<lb_common::CtKey>(),
            size_of::<lb_common::CtValue>(),
        ),
        map_names::AFFINITY => (
            size_of::<lb_common::AffinityKey>(),
            size_of::<lb_common::AffinityValue>(),
        ),
        map_names::SOURCE_RANGES => (SOURCE_RANGE_KEY_LEN, size_of::<u32>()),
        map_names::MAGLEV => (size_of::<u32>(), size_of::<lb_common::MaglevTable>()),
        lb_common::sock::MAP => (
            size_of::<lb_common::SockNatKey>(),
            size_of::<lb_common::SockNatValue>(),
        ),
        _ => return None,
    };
    Some((sizes.0 as u32, sizes.1 as u32))
}

/// Pinned maps whose layout or capacity differs from what this agent loads (left by
/// another version, or by a run with other `--*-map-size` values) cannot be reused: they
/// are unpinned, with a warning naming the difference, and recreated empty.
fn drop_incompatible_pins(root: &Path, sizes: &MapSizes) {
    let wanted: BTreeMap<&str, u32> = sizes.by_name().into_iter().collect();
    for name in map_names::PINNED.into_iter().chain(lb_common::sock::PINNED) {
        let path = root.join(name);
        let Ok(info) = MapInfo::from_pin(&path) else {
            continue;
        };
        let Some((k, v)) = expected_layout(name) else {
            continue;
        };
        let entries = wanted.get(name).copied().unwrap_or(info.max_entries());
        if info.key_size() != k || info.value_size() != v || info.max_entries() != entries {
            warn!(
                map = name,
                found = %format!("key {} value {} entries {}", info.key_size(), info.value_size(), info.max_entries()),
                wanted = %format!("key {k} value {v} entries {entries}"),
                "pinned map differs from this agent's; recreating it empty"
            );
            if let Err(e) = fs::remove_file(&path) {
                warn!(map = name, error = %e, "cannot remove the pinned map");
            }
        }
    }
}

/// Capacities of the maps (entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    /// Services map: one entry per frontend, per backend slot and per Service address.
    pub services: u32,
    /// Backends map.
    pub backends: u32,
    /// Connection tracking: two entries per flow.
    pub ct: u32,
    /// Session affinity: one entry per (client, Service) pair.
    pub affinity: u32,
    /// Maglev tables: one per frontend of a Service with `lb.dev/backend-selection:
    /// maglev`. Each takes 64 KiB, allocated when written (the map is not preallocated),
    /// so this bounds the memory rather than reserving it.
    pub maglev: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        use lb_common::capacity;
        Self {
            services: capacity::SERVICES,
            backends: capacity::BACKENDS,
            ct: capacity::CT,
            affinity: capacity::AFFINITY,
            maglev: capacity::MAGLEV,
        }
    }
}

impl MapSizes {
    fn by_name(&self) -> [(&'static str, u32); 5] {
        [
            (map_names::SERVICES, self.services),
            (map_names::BACKENDS, self.backends),
            (map_names::CT, self.ct),
            (map_names::AFFINITY, self.affinity),
            (map_names::MAGLEV, self.maglev),
        ]
    }
}

/// The loaded datapath: programs, maps and the devices it is attached to.
pub struct Datapath {
    ebpf: Ebpf,
    root: PathBuf,
    /// tcx links; netlink TC filters when false.
    tcx: bool,
    features: Features,
    attached: BTreeMap<String, Attachment>,
    /// Link pins of the socket hooks attached to the `--cgroup-path` cgroup.
    cgroup_links: Vec<PathBuf>,
    /// `--xdp`: devices that also get the XDP program.
    xdp: Option<XdpConfig>,
}

struct Attachment {
    ifindex: u32,
    links: Vec<PathBuf>,
}

impl Datapath {
    /// Loads the programs (from `object`, or the embedded object), reusing maps pinned
    /// under `root` so that services and live flows survive a restart.
    pub fn load(root: &Path, object: Option<&Path>) -> Result<Self> {
        Self::load_sized(root, object, &MapSizes::default())
    }

    /// [`Datapath::load`] with map capacities other than the defaults.
    pub fn load_sized(root: &Path, object: Option<&Path>, sizes: &MapSizes) -> Result<Self> {
        drop_incompatible_pins(root, sizes);
        let netns_cookie = own_netns_cookie();
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(root);
        // Not required to exist: an object given with --ebpf-object may predate the socket
        // hooks, which are then reported missing by the probe below.
        loader.override_global(NODE_NETNS_COOKIE, &netns_cookie, false);
        for (name, size) in sizes.by_name() {
            loader.map_max_entries(name, size);
        }
        let loaded = match object {
            Some(path) => loader.load_file(path),
            None => loader.load(EMBEDDED_OBJECT.ok_or(DatapathError::NoObject)?),
        };
        let mut ebpf = loaded.map_err(|e| classify_load_error(Box::new(e)))?;
        for name in [INGRESS_PROG, EGRESS_PROG] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| DatapathError::Load(format!("program {name} missing").into()))?
                .try_into()
                .map_err(|e: ProgramError| DatapathError::Load(Box::new(e)))?;
            prog.load().map_err(|e| classify_load_error(Box::new(e)))?;
        }
        let features = {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(INGRESS_PROG)
                .expect("loaded above")
                .try_into()
                .expect("loaded above");
            Features::probe(prog, is_bpffs(root))
        };
        let mut features = features;
        features.sock_hooks = SOCK_HOOKS
            .iter()
            .map(|hook| load_sock_hook(&mut ebpf, hook))
            .collect();
        features.xdp = load_xdp(&mut ebpf);
        info!("{features}");
        let mode =
            features
                .attach_mode()
                .map_err(|(feature, detail)| DatapathError::KernelFeature {
                    kernel: kernel_string(),
                    feature,
                    detail,
                })?;
        let tcx = mode == TcAttach::Tcx;
        info!(root = %root.display(), attach = ?mode, "datapath loaded");
        Ok(Self {
            ebpf,
            root: root.to_path_buf(),
            tcx,
            features,
            attached: BTreeMap::new(),
            cgroup_links: Vec::new(),
            xdp: None,
        })
    }

    /// Attaches the XDP program too, to the devices of `config` (call before the first
    /// `sync_devices`). Fails, naming the reason, if this kernel cannot run it.
    pub fn enable_xdp(&mut self, config: XdpConfig) -> Result<()> {
        if !self.features.xdp.probe.yes() {
            return Err(DatapathError::KernelFeature {
                kernel: kernel_string(),
                feature: self.features.xdp.name,
                detail: format!(
                    "{}; it needs Linux {} or newer (run without --xdp to use the TC path \
                     alone)",
                    self.features.xdp.probe, self.features.xdp.since
                ),
            });
        }
        info!(devices = ?config.devices, mode = ?config.mode, "XDP enabled");
        self.xdp = Some(config);
        Ok(())
    }

    /// Attach devices through netlink TC even where tcx exists, so that a host with tcx
    /// can also exercise the path kernels before 6.6 take (the agent's hidden
    /// `--force-netlink-tc`). Call before the first `sync_devices`.
    pub fn force_netlink_tc(&mut self) -> Result<()> {
        if let Probe::No(why) = &self.features.netlink_tc.probe {
            return Err(DatapathError::KernelFeature {
                kernel: kernel_string(),
                feature: self.features.netlink_tc.name,
                detail: why.clone(),
            });
        }
        info!("attaching through netlink TC (--force-netlink-tc)");
        self.tcx = false;
        Ok(())
    }

    /// What the kernel offers, as probed at load.
    pub fn features(&self) -> &Features {
        &self.features
    }

    /// A loaded program, for `BPF_PROG_TEST_RUN` in tests and benchmarks.
    pub fn program(&self, name: &str) -> Option<&SchedClassifier> {
        self.ebpf.program(name).and_then(|p| p.try_into().ok())
    }

    /// The loaded XDP program, for `BPF_PROG_TEST_RUN` in tests and benchmarks (`None` if
    /// this kernel could not load it).
    pub fn xdp_program(&self) -> Option<&Xdp> {
        self.ebpf
            .program(XDP_PROG)
            .and_then(|p| p.try_into().ok())
            .filter(|_| self.features.xdp.probe.yes())
    }

    /// Takes the services and backends maps out as a [`ServiceMaps`].
    pub fn service_maps(&mut self) -> Result<BpfMaps> {
        let services = self.take_map(map_names::SERVICES)?;
        let backends = self.take_map(map_names::BACKENDS)?;
        let services =
            BpfHashMap::try_from(services).map_err(|e| DatapathError::Load(Box::new(e)))?;
        let backends =
            BpfHashMap::try_from(backends).map_err(|e| DatapathError::Load(Box::new(e)))?;
        let ranges = self.take_map(map_names::SOURCE_RANGES)?;
        let source_ranges =
            LpmTrie::try_from(ranges).map_err(|e| DatapathError::Load(Box::new(e)))?;
        let maglev = self.take_map(map_names::MAGLEV)?;
        let maglev = BpfHashMap::try_from(maglev).map_err(|e| DatapathError::Load(Box::new(e)))?;
        Ok(BpfMaps {
            services,
            backends,
            source_ranges,
            maglev,
        })
    }

    /// Writes the cluster's pod prefixes (`--cluster-cidr`): new flows from them to a
    /// `Local` external frontend use its in-cluster twin. Call before the first
    /// `sync_devices`, so that the programs never run without them.
    pub fn set_cluster_cidrs(&mut self, cidrs: &[Cidr]) -> Result<()> {
        if cidrs.is_empty() {
            return Ok(());
        }
        let map = self
            .ebpf
            .map_mut(map_names::CLUSTER_CIDRS)
            .ok_or_else(|| DatapathError::Load("map LB4_CLUSTER_CIDRS missing".into()))?;
        let mut trie: LpmTrie<_, u32, u32> =
            LpmTrie::try_from(map).map_err(|e| DatapathError::Load(Box::new(e)))?;
        for c in cidrs {
            let key = LpmKey::new(u32::from(c.len), u32::from(c.addr).to_be());
            trie.insert(&key, 1, 0)
                .map_err(|e| DatapathError::Load(format!("--cluster-cidr {c}: {e}").into()))?;
        }
        info!(cidrs = ?cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(), "cluster CIDRs set");
        Ok(())
    }

    /// Takes the per-CPU counters out.
    pub fn metrics(&mut self) -> Result<Metrics> {
        let map = self.take_map(map_names::METRICS)?;
        let counters = PerCpuArray::try_from(map).map_err(|e| DatapathError::Load(Box::new(e)))?;
        Ok(Metrics { counters })
    }

    fn take_map(&mut self, name: &str) -> Result<aya::maps::Map> {
        self.ebpf
            .take_map(name)
            .ok_or_else(|| DatapathError::Load(format!("map {name} missing").into()))
    }

    /// Attaches to every existing device matching `patterns` that is not attached yet,
    /// and forgets devices that went away. Returns the names newly attached. One device
    /// failing does not stop the others; its error is logged and retried next time.
    pub fn sync_devices(&mut self, patterns: &DevicePatterns) -> Vec<String> {
        let present = list_devices();
        let gone: Vec<String> = self
            .attached
            .iter()
            .filter(|(name, a)| present.get(*name) != Some(&a.ifindex))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(a) = self.attached.remove(&name) {
                debug!(device = %name, "device gone");
                // The kernel already detached the links; only the pins remain.
                for pin in a.links {
                    let _ = fs::remove_file(pin);
                }
            }
        }
        let mut added = Vec::new();
        for (name, ifindex) in present {
            if self.attached.contains_key(&name) || !patterns.matches(&name) {
                continue;
            }
            match self.attach(&name, ifindex) {
                Ok(links) => {
                    info!(device = %name, ifindex, "attached");
                    self.attached
                        .insert(name.clone(), Attachment { ifindex, links });
                    added.push(name);
                }
                Err(e) => warn!(device = %name, error = %e, "cannot attach; will retry"),
            }
        }
        added
    }

    /// Names of the devices the programs are attached to.
    pub fn devices(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }

    fn attach(&mut self, device: &str, ifindex: u32) -> Result<Vec<PathBuf>> {
        let mut pins = self.attach_tc(device, ifindex)?;
        if self.xdp.as_ref().is_some_and(|x| x.devices.matches(device)) {
            // After TC: what XDP leaves to the stack must find the TC program there.
            pins.push(self.attach_xdp(device, ifindex)?);
        }
        Ok(pins)
    }

    /// The XDP program on `device`, through a pinned bpf_link: a link a previous agent
    /// left gets our program in place (one atomic swap, in the mode it was attached in);
    /// otherwise native mode is tried first (with `auto`), then generic.
    fn attach_xdp(&mut self, device: &str, ifindex: u32) -> Result<PathBuf> {
        let mode = self.xdp.as_ref().map(|x| x.mode).unwrap_or_default();
        let pin = self
            .root
            .join("links")
            .join(link_pin_name(ifindex, XDP_DIR, device));
        let err = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::Attach {
            prog: XDP_PROG,
            device: device.to_owned(),
            source,
        };
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(XDP_PROG)
            .expect("probed at load")
            .try_into()
            .expect("probed at load");
        let (link_id, how) = match PinnedLink::from_pin(&pin) {
            Ok(old) => {
                let link: XdpLink = FdLink::from(old).try_into().map_err(|e| err(Box::new(e)))?;
                let id = prog.attach_to_link(link).map_err(|e| err(Box::new(e)))?;
                (id, "replaced in place")
            }
            Err(_) => match mode {
                XdpAttachMode::Native => (
                    prog.attach_to_if_index(ifindex, XdpMode::Driver)
                        .map_err(|e| err(Box::new(e)))?,
                    "native",
                ),
                XdpAttachMode::Generic => (
                    prog.attach_to_if_index(ifindex, XdpMode::Skb)
                        .map_err(|e| err(Box::new(e)))?,
                    "generic",
                ),
                XdpAttachMode::Auto => match prog.attach_to_if_index(ifindex, XdpMode::Driver) {
                    Ok(id) => (id, "native"),
                    Err(e) => {
                        debug!(device, error = %e, "no native XDP; trying generic");
                        (
                            prog.attach_to_if_index(ifindex, XdpMode::Skb)
                                .map_err(|e| err(Box::new(e)))?,
                            "generic",
                        )
                    }
                },
            },
        };
        let link = prog.take_link(link_id).map_err(|e| err(Box::new(e)))?;
        let fd_link: FdLink = link.try_into().map_err(|e| {
            err(format!(
                "the kernel attached XDP without a bpf_link (Linux {XDP_SINCE}), which \
                 could not outlive the agent: {e}"
            )
            .into())
        })?;
        let _ = fs::remove_file(&pin);
        fd_link.pin(&pin).map_err(|e| err(Box::new(e)))?;
        info!(device, mode = how, "XDP attached");
        Ok(pin)
    }

    fn attach_tc(&mut self, device: &str, ifindex: u32) -> Result<Vec<PathBuf>> {
        if !self.tcx {
            self.attach_netlink(device)?;
            return Ok(Vec::new());
        }
        let mut pins = Vec::new();
        for (prog_name, attach_type, dir) in [
            (INGRESS_PROG, TcAttachType::Ingress, INGRESS_DIR),
            (EGRESS_PROG, TcAttachType::Egress, EGRESS_DIR),
        ] {
            let pin = self
                .root
                .join("links")
                .join(link_pin_name(ifindex, dir, device));
            let err = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::Attach {
                prog: prog_name,
                device: device.to_owned(),
                source,
            };
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(prog_name)
                .expect("checked at load")
                .try_into()
                .expect("checked at load");
            let link_id = match PinnedLink::from_pin(&pin) {
                // A previous agent left its link: swap our program in atomically.
                Ok(old) => {
                    let link: SchedClassifierLink =
                        FdLink::from(old).try_into().map_err(|e| err(Box::new(e)))?;
                    prog.attach_to_link(link).map_err(|e| err(Box::new(e)))?
                }
                Err(_) => prog
                    .attach_with_options(
                        device,
                        attach_type,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(|e| err(Box::new(e)))?,
            };
            let link = prog.take_link(link_id).map_err(|e| err(Box::new(e)))?;
            let fd_link: FdLink = link.try_into().map_err(|e| err(Box::new(e)))?;
            // Replace a stale pin (same name, link no longer valid) rather than fail.
            let _ = fs::remove_file(&pin);
            fd_link.pin(&pin).map_err(|e| err(Box::new(e)))?;
            pins.push(pin);
        }
        Ok(pins)
    }

    /// Netlink TC (no tcx): a `clsact` qdisc and one direct-action `cls_bpf` filter per
    /// direction at the fixed priority and handle. A filter left by a previous agent gets
    /// our program in place (a change of the existing filter, so that no packet sees the
    /// device without one); otherwise it is created.
    fn attach_netlink(&mut self, device: &str) -> Result<()> {
        // Already there when a previous agent attached; a real failure shows in the
        // attach below.
        let _ = qdisc_add_clsact(device);
        for (prog_name, attach_type) in [
            (INGRESS_PROG, TcAttachType::Ingress),
            (EGRESS_PROG, TcAttachType::Egress),
        ] {
            let err = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::Attach {
                prog: prog_name,
                device: device.to_owned(),
                source,
            };
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(prog_name)
                .expect("checked at load")
                .try_into()
                .expect("checked at load");
            let existing = SchedClassifierLink::attached(
                device,
                attach_type,
                NETLINK_PRIORITY,
                NETLINK_HANDLE,
                None,
            )
            .map_err(|e| err(Box::new(e)))?;
            let link_id = match prog.attach_to_link(existing) {
                Ok(id) => id,
                // No filter of ours there yet (ENOENT without NLM_F_CREATE): create it.
                Err(_) => prog
                    .attach_with_options(
                        device,
                        attach_type,
                        TcAttachOptions::Netlink(NlOptions {
                            priority: NETLINK_PRIORITY,
                            handle: NETLINK_HANDLE,
                            classid: None,
                        }),
                    )
                    .map_err(|e| err(Box::new(e)))?,
            };
            let link = prog.take_link(link_id).map_err(|e| err(Box::new(e)))?;
            // Dropping a netlink link deletes the filter; the filter must outlive the
            // agent, as a pinned tcx link does. The link holds no descriptor: nothing
            // leaks.
            std::mem::forget(link);
        }
        Ok(())
    }

    /// Removes link pins whose device no longer exists (left by a crashed agent), and
    /// detaches XDP from devices `--xdp` no longer names.
    pub fn remove_stale_link_pins(&self) {
        let present = list_devices();
        let Ok(entries) = fs::read_dir(self.root.join("links")) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(CGROUP_PIN_PREFIX) {
                // Not a device's: `sync_cgroup` keeps or removes these.
                continue;
            }
            let live = present.iter().any(|(dev, idx)| {
                [INGRESS_DIR, EGRESS_DIR]
                    .iter()
                    .any(|dir| link_pin_name(*idx, dir, dev) == name)
            });
            let xdp_device = present
                .iter()
                .find(|(dev, idx)| link_pin_name(**idx, XDP_DIR, dev) == name);
            if let Some((dev, _)) = xdp_device {
                if !self.xdp.as_ref().is_some_and(|x| x.devices.matches(dev)) {
                    info!(device = %dev, "XDP no longer requested there: detaching it");
                    if let Err(e) = detach_pinned_link(&entry.path()) {
                        warn!(device = %dev, error = %e, "cannot detach XDP");
                    }
                    let _ = fs::remove_file(entry.path());
                }
                continue;
            }
            if !live {
                debug!(pin = %name, "removing stale link pin");
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Detaches from every device and removes the link pins (clean shutdown). The maps
    /// stay pinned so that the next agent re-adopts services and live flows.
    pub fn detach_all(&mut self) {
        for pin in std::mem::take(&mut self.cgroup_links) {
            remove_cgroup_link(&pin);
            info!(pin = %pin.display(), "socket hook detached");
        }
        for (name, a) in std::mem::take(&mut self.attached) {
            if !self.tcx {
                detach_netlink(&name);
            }
            for pin in a.links {
                match PinnedLink::from_pin(&pin) {
                    Ok(link) => match link.unpin() {
                        // Dropping the last fd of an unpinned link detaches it.
                        Ok(fd_link) => drop(fd_link),
                        Err(e) => warn!(device = %name, error = %e, "cannot unpin link"),
                    },
                    Err(e) => debug!(device = %name, error = %e, "link pin already gone"),
                }
            }
            info!(device = %name, "detached");
        }
    }
}

/// Name of the global that tells the socket hooks which network namespace is the node's.
const NODE_NETNS_COOKIE: &str = "NODE_NETNS_COOKIE";
/// Pin names of socket hook links start with this (`cgroup_<cgroup id>_<hook>`).
const CGROUP_PIN_PREFIX: &str = "cgroup_";
/// `statfs` magic of cgroup v2.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`, Linux 5.14), or 0
/// if the kernel cannot tell: the socket hooks then treat every namespace as the node's,
/// except for loopback frontends.
fn own_netns_cookie() -> u64 {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain socket(2) call.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return 0;
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket, and an out buffer of the size given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 { cookie } else { 0 }
}

/// Loads the XDP program; the outcome is its feature probe. The program and its bpf_link
/// are what `--xdp` needs; the probe cannot attach, so a kernel between 4.8 and 5.9 (XDP,
/// no XDP bpf_link) shows here as yes and fails at attach, naming the reason.
fn load_xdp(ebpf: &mut Ebpf) -> Feature {
    Feature {
        probe: load_probe(ebpf, XDP_PROG, Xdp::load),
        ..Feature::xdp_unprobed()
    }
}

/// Loads one socket hook program; the outcome is its feature probe.
fn load_sock_hook(ebpf: &mut Ebpf, hook: &SockHook) -> Feature {
    Feature {
        name: hook.feature,
        since: hook.since,
        probe: load_probe(ebpf, hook.prog, CgroupSockAddr::load),
    }
}

/// Loads the optional program `name` of type `P` with `load`, as the probe of its
/// feature: a failure is a no, cut to one line by [`verifier_summary`].
fn load_probe<P>(
    ebpf: &mut Ebpf,
    name: &str,
    load: impl FnOnce(&mut P) -> Result<(), ProgramError>,
) -> Probe
where
    for<'a> &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let Some(prog) = ebpf.program_mut(name) else {
        return Probe::No("not in the eBPF object".into());
    };
    match <&mut P>::try_from(prog).and_then(load) {
        Ok(()) => Probe::Yes,
        Err(e) => {
            debug!(prog = name, error = ?e, "program does not load");
            Probe::No(verifier_summary(&e.to_string()))
        }
    }
}

/// A load error cut to one line: the error, then the verifier's last words (its full
/// log, hundreds of lines, is in the debug log).
fn verifier_summary(error: &str) -> String {
    let Some((head, log)) = error.split_once("Verifier output:") else {
        return error.to_owned();
    };
    let last: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("verification time"))
        .filter(|l| !l.starts_with("stack depth") && !l.starts_with("processed "))
        .collect();
    let tail = last[last.len().saturating_sub(2)..].join("; ");
    format!("{} verifier: {tail}", head.trim().trim_end_matches('.'))
}

/// The id of the cgroup v2 directory `path` (its inode number), after checking that it is
/// one.
fn cgroup_id(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: statfs writes into the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.f_type as i64 != CGROUP2_SUPER_MAGIC {
        return Err(io::Error::other(
            "not a cgroup v2 directory (the hooks need the unified hierarchy, usually \
             /sys/fs/cgroup)",
        ));
    }
    Ok(fs::metadata(path)?.ino())
}

/// Gives the link pinned at `pin` the program `prog` (`BPF_LINK_UPDATE`): the hook never
/// goes without a program.
fn update_pinned_link(pin: &Path, prog: BorrowedFd<'_>) -> io::Result<()> {
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let link = open_pinned(pin)?;
    // link_fd, new_prog_fd, flags, old_prog_fd.
    let attr: [u32; 4] = [link.as_raw_fd() as u32, prog.as_raw_fd() as u32, 0, 0];
    // SAFETY: bpf(2) reads `size_of_val(&attr)` bytes of the link_update attribute we own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches the socket hook link pinned at `pin` and removes the pin.
fn remove_cgroup_link(pin: &Path) {
    if let Err(e) = detach_pinned_link(pin) {
        debug!(pin = %pin.display(), error = %e, "cannot detach socket hook link");
    }
    if let Err(e) = fs::remove_file(pin)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(pin = %pin.display(), error = %e, "cannot remove socket hook link pin");
    }
}

impl Datapath {
    /// Attaches the socket hooks to the cgroup v2 directory `cgroup` (`--cgroup-path`),
    /// taking over the links a previous agent pinned for it (their programs are swapped,
    /// so no connection made meanwhile goes untranslated), and detaches hooks pinned for
    /// any other cgroup or no longer wanted. `None` detaches every socket hook this pin
    /// directory holds: attaching at a cgroup is the operator's explicit choice. Hooks
    /// the kernel lacks are left out with a warning naming them and the kernel that has
    /// them; without `connect4` this fails. Returns the hooks attached.
    pub fn sync_cgroup(&mut self, cgroup: Option<&Path>) -> Result<Vec<&'static str>> {
        let links = self.root.join("links");
        self.cgroup_links.clear();
        let mut wanted: Vec<(SockHook, PathBuf)> = Vec::new();
        let mut target = None;
        if let Some(path) = cgroup {
            let err = |source| DatapathError::Cgroup {
                path: path.to_path_buf(),
                source,
            };
            let id = cgroup_id(path).map_err(err)?;
            let plan = self.features.sock_plan().map_err(|(feature, detail)| {
                DatapathError::KernelFeature {
                    kernel: kernel_string(),
                    feature,
                    detail,
                }
            })?;
            for skipped in &plan.skipped {
                warn!(cgroup = %path.display(), "socket hook left out: {skipped}");
            }
            wanted = plan
                .attach
                .into_iter()
                .map(|hook| {
                    let pin = links.join(format!("{CGROUP_PIN_PREFIX}{id}_{}", hook.hook));
                    (hook, pin)
                })
                .collect();
            target = Some((path, fs::File::open(path).map_err(err)?));
        }
        // Hooks of another cgroup (the flag changed) or left out now: detached first, so
        // that a cgroup never has two of ours on one hook.
        for entry in fs::read_dir(&links).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(CGROUP_PIN_PREFIX)
                && !wanted.iter().any(|(_, p)| *p == entry.path())
            {
                info!(pin = %name, "detaching a socket hook no longer wanted");
                remove_cgroup_link(&entry.path());
            }
        }
        let Some((path, dir)) = target else {
            return Ok(Vec::new());
        };
        let mut attached = Vec::new();
        for (hook, pin) in wanted {
            let err = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::Attach {
                prog: hook.prog,
                device: format!("cgroup {}", path.display()),
                source,
            };
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(hook.prog)
                .expect("probed at load")
                .try_into()
                .expect("probed at load");
            let prog_fd = prog.fd().map_err(|e| err(Box::new(e)))?;
            // A previous agent's link: swap our program in.
            let taken_over = pin.exists() && update_pinned_link(&pin, prog_fd.as_fd()).is_ok();
            if !taken_over {
                let _ = fs::remove_file(&pin);
                let id = prog
                    .attach(&dir, CgroupAttachMode::Single)
                    .map_err(|e| err(Box::new(e)))?;
                let link = prog.take_link(id).map_err(|e| err(Box::new(e)))?;
                let fd_link: FdLink = link.try_into().map_err(|e| err(Box::new(e)))?;
                fd_link.pin(&pin).map_err(|e| err(Box::new(e)))?;
            }
            debug!(hook = hook.hook, taken_over, "socket hook attached");
            attached.push(hook.hook);
            self.cgroup_links.push(pin);
        }
        info!(cgroup = %path.display(), hooks = ?attached, "socket hooks attached");
        Ok(attached)
    }
}

fn classify_load_error(e: Box<dyn std::error::Error + Send + Sync>) -> DatapathError {
    let text = format!("{e:?}");
    // The verifier log and errno say what is missing; map the common cases to a feature
    // name an operator can act on.
    if text.contains("EPERM") || text.contains("Operation not permitted") {
        return DatapathError::Privilege;
    }
    // A map type or helper the kernel lacks: name it rather than quote the verifier.
    if let Some((feature, detail)) = crate::features::missing_required() {
        return DatapathError::KernelFeature {
            kernel: kernel_string(),
            feature,
            detail,
        };
    }
    if text.contains("BTF") && text.contains("not supported") {
        return DatapathError::KernelFeature {
            kernel: kernel_string(),
            feature: "BTF",
            detail: text,
        };
    }
    DatapathError::Load(e)
}

/// Current network devices of this network namespace: name -> ifindex.
///
/// Asked of the kernel (`if_nameindex`) rather than read from /sys/class/net, which shows
/// the devices of whichever namespace /sys was mounted in.
pub fn list_devices() -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    // SAFETY: returns a heap array terminated by a zero entry, or null on error.
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        return out;
    }
    let mut cur = head;
    // SAFETY: walking the array up to its terminator, then freeing it once.
    unsafe {
        while (*cur).if_index != 0 && !(*cur).if_name.is_null() {
            let name = std::ffi::CStr::from_ptr((*cur).if_name)
                .to_string_lossy()
                .into_owned();
            out.insert(name, (*cur).if_index);
            cur = cur.add(1);
        }
        libc::if_freenameindex(head);
    }
    out
}

/// `--devices`: comma-separated names or globs (`*` and `?`).
#[derive(Debug, Clone)]
pub struct DevicePatterns(Vec<String>);

impl DevicePatterns {
    /// Parses `veth*,eth0`.
    pub fn parse(list: &str) -> Self {
        Self(
            list.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        )
    }

    /// Whether `name` matches any pattern.
    pub fn matches(&self, name: &str) -> bool {
        self.0
            .iter()
            .any(|p| glob_match(p.as_bytes(), name.as_bytes()))
    }
}

fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    match (pattern.first(), text.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            glob_match(&pattern[1..], text) || (!text.is_empty() && glob_match(pattern, &text[1..]))
        }
        (Some(b'?'), Some(_)) => glob_match(&pattern[1..], &text[1..]),
        (Some(p), Some(t)) if p == t => glob_match(&pattern[1..], &text[1..]),
        _ => false,
    }
}

/// The services, backends, source ranges and Maglev maps as the kernel holds them.
pub struct BpfMaps {
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    backends: BpfHashMap<MapData, u32, Backend>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u32>,
    maglev: BpfHashMap<MapData, u32, lb_common::MaglevTable>,
}

/// The LPM key of a source range: the service id always matches (32 bits), the client
/// address by `len` bits.
fn lpm_key(key: &SourceRangeKey, len: u8) -> LpmKey<SourceRangeKey> {
    LpmKey::new(32 + u32::from(len), *key)
}

fn map_io(e: aya::maps::MapError) -> io::Error {
    match e {
        aya::maps::MapError::SyscallError(s) => s.io_error,
        other => io::Error::other(other.to_string()),
    }
}

/// The result of a map delete, where a key that is already gone counts as success.
fn removed(
    result: Result<(), aya::maps::MapError>,
    map: &'static str,
    key: impl FnOnce() -> String,
) -> Result<(), MapError> {
    match result {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(s))
            if s.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(MapError {
            map,
            op: "remove",
            key: key(),
            source: map_io(e),
        }),
    }
}

impl ServiceMaps for BpfMaps {
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapError> {
        self.services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| MapError {
                map: map_names::SERVICES,
                op: "iterate",
                key: String::new(),
                source: map_io(e),
            })
    }

    fn backends(&self) -> Result<Vec<(u32, Backend)>, MapError> {
        self.backends
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| MapError {
                map: map_names::BACKENDS,
                op: "iterate",
                key: String::new(),
                source: map_io(e),
            })
    }

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapError> {
        self.services.insert(key, value, 0).map_err(|e| MapError {
            map: map_names::SERVICES,
            op: "insert",
            key: format!("{key:?}"),
            source: map_io(e),
        })
    }

    fn del_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        removed(self.services.remove(key), map_names::SERVICES, || {
            format!("{key:?}")
        })
    }

    fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<(), MapError> {
        self.backends.insert(id, backend, 0).map_err(|e| MapError {
            map: map_names::BACKENDS,
            op: "insert",
            key: id.to_string(),
            source: map_io(e),
        })
    }

    fn del_backend(&mut self, id: u32) -> Result<(), MapError> {
        removed(self.backends.remove(&id), map_names::BACKENDS, || {
            id.to_string()
        })
    }

    fn source_ranges(&self) -> Result<Vec<(SourceRangeKey, u8)>, MapError> {
        let mut out = Vec::new();
        for entry in self.source_ranges.iter() {
            let (k, _) = entry.map_err(|e| MapError {
                map: map_names::SOURCE_RANGES,
                op: "iterate",
                key: String::new(),
                source: map_io(e),
            })?;
            let len = k.prefix_len().saturating_sub(32).min(32) as u8;
            out.push((k.data(), len));
        }
        Ok(out)
    }

    fn put_source_range(&mut self, key: &SourceRangeKey, len: u8) -> Result<(), MapError> {
        self.source_ranges
            .insert(&lpm_key(key, len), 1, 0)
            .map_err(|e| MapError {
                map: map_names::SOURCE_RANGES,
                op: "insert",
                key: format!("{key:?}/{len}"),
                source: map_io(e),
            })
    }

    fn del_source_range(&mut self, key: &SourceRangeKey, len: u8) -> Result<(), MapError> {
        removed(
            self.source_ranges.remove(&lpm_key(key, len)),
            map_names::SOURCE_RANGES,
            || format!("{key:?}/{len}"),
        )
    }

    fn maglev_tables(&self) -> Result<crate::maps::MaglevTables, MapError> {
        let mut out = Vec::new();
        for entry in self.maglev.iter() {
            let (id, table) = entry.map_err(|e| MapError {
                map: map_names::MAGLEV,
                op: "iterate",
                key: String::new(),
                source: map_io(e),
            })?;
            out.push((id, table[..].into()));
        }
        Ok(out)
    }

    fn put_maglev(&mut self, service_id: u32, table: &[u32]) -> Result<(), MapError> {
        let error = |source| MapError {
            map: map_names::MAGLEV,
            op: "insert",
            key: service_id.to_string(),
            source,
        };
        let table: &lb_common::MaglevTable = table.try_into().map_err(|_| {
            error(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a table of {} entries, {} expected",
                    table.len(),
                    lb_common::MAGLEV_TABLE_SIZE
                ),
            ))
        })?;
        self.maglev
            .insert(service_id, table, 0)
            .map_err(|e| error(map_io(e)))
    }

    fn del_maglev(&mut self, service_id: u32) -> Result<(), MapError> {
        removed(self.maglev.remove(&service_id), map_names::MAGLEV, || {
            service_id.to_string()
        })
    }
}

/// The node's one netfilter rule: flows the datapath marks with [`lb_common::SNAT_MARK`]
/// (north-south flows to backends on other nodes) leave with the node's address and a
/// source port conntrack picks free (`--random-fully`), so that two clients using the same
/// port never collide; conntrack translates the replies back before the egress program
/// restores the frontend. Added once, if missing; `iptables-nft` is preferred.
pub fn ensure_snat_rule() -> io::Result<()> {
    snat_rule(true)
}

/// Removes the rule [`ensure_snat_rule`] adds (`lb-agent --cleanup`); absent is fine.
pub fn remove_snat_rule() -> io::Result<()> {
    snat_rule(false)
}

fn snat_rule(present: bool) -> io::Result<()> {
    let mark = format!("{:#x}/{:#x}", lb_common::SNAT_MARK, lb_common::SNAT_MARK);
    let rule = [
        "POSTROUTING",
        "-m",
        "mark",
        "--mark",
        mark.as_str(),
        "-m",
        "comment",
        "--comment",
        "lb: north-south flows to other nodes",
        "-j",
        "MASQUERADE",
        "--random-fully",
    ];
    let mut last = io::Error::other("no iptables found");
    for bin in ["iptables-nft", "iptables"] {
        let run = |op: &str| {
            std::process::Command::new(bin)
                .args(["-w", "-t", "nat", op])
                .args(rule)
                .output()
        };
        match run("-C") {
            Ok(out) if out.status.success() == present => return Ok(()),
            Ok(_) => {}
            Err(e) => {
                last = e;
                continue;
            }
        }
        let out = run(if present { "-A" } else { "-D" })?;
        if out.status.success() {
            return Ok(());
        }
        last = io::Error::other(format!(
            "{bin}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Err(last)
}

/// The IPv4 addresses of this network namespace's devices, and its primary address (the
/// first address of the device the default route leaves through), for NodePorts.
pub fn node_addresses() -> (Vec<std::net::Ipv4Addr>, Option<std::net::Ipv4Addr>) {
    let mut addrs: Vec<(String, std::net::Ipv4Addr)> = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free once below.
    if unsafe { libc::getifaddrs(&mut head) } == 0 {
        let mut cur = head;
        // SAFETY: walking the list the kernel gave us; every pointer is checked for null.
        unsafe {
            while !cur.is_null() {
                let ifa = &*cur;
                if !ifa.ifa_addr.is_null()
                    && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET
                    && !ifa.ifa_name.is_null()
                {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                    let name = std::ffi::CStr::from_ptr(ifa.ifa_name)
                        .to_string_lossy()
                        .into_owned();
                    addrs.push((name, ip));
                }
                cur = ifa.ifa_next;
            }
            libc::freeifaddrs(head);
        }
    }
    let default_dev = fs::read_to_string("/proc/net/route").ok().and_then(|t| {
        // `Iface Destination Gateway ...`, destination 00000000 is the default route.
        t.lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 1 && f[1] == "00000000")
            .map(|f| f[0].to_owned())
    });
    let primary = default_dev.and_then(|dev| {
        addrs
            .iter()
            .find(|(name, _)| *name == dev)
            .map(|(_, ip)| *ip)
    });
    (addrs.into_iter().map(|(_, ip)| ip).collect(), primary)
}

/// The datapath's per-CPU decision counters.
pub struct Metrics {
    counters: PerCpuArray<MapData, u64>,
}

impl Metrics {
    /// Sums over CPUs: `(reason name, direction name, count)` for every non-zero counter.
    pub fn snapshot(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut out = Vec::new();
        for idx in 0..METRICS_LEN {
            let Ok(values) = self.counters.get(&idx, 0) else {
                continue;
            };
            let total: u64 = values.iter().sum();
            if total > 0 {
                let reason = lb_common::reason::NAMES[(idx / lb_common::DIRS) as usize];
                let dir = lb_common::DIR_NAMES[(idx % lb_common::DIRS) as usize];
                out.push((reason, dir, total));
            }
        }
        out
    }
}

/// A netlink socket subscribed to link changes, so that new devices (pod veths) are
/// attached as soon as they appear instead of at the next periodic scan.
pub struct LinkMonitor {
    fd: tokio::io::unix::AsyncFd<OwnedFd>,
}

impl LinkMonitor {
    /// Opens the socket.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2) call.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: zeroed sockaddr_nl is valid; fields set below.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        // SAFETY: valid socket and address of the right size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is open and owned by the AsyncFd for its whole life.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(fd) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self { fd })
    }

    /// Waits until at least one link notification arrived, and drains the socket.
    pub async fn changed(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 8192];
            let mut got = false;
            loop {
                // SAFETY: reading into our buffer.
                let n = unsafe {
                    libc::recv(
                        self.fd.get_ref().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                    )
                };
                if n > 0 {
                    got = true;
                    continue;
                }
                let err = io::Error::last_os_error();
                if n < 0 && err.kind() == io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    break;
                }
                if n < 0 && err.raw_os_error() == Some(libc::ENOBUFS) {
                    // Overrun: we missed messages, which only means "rescan".
                    got = true;
                    continue;
                }
                return Err(err);
            }
            if got {
                return Ok(());
            }
        }
    }
}

/// Device names currently matching, for logs.
pub fn matching_devices(patterns: &DevicePatterns) -> BTreeSet<String> {
    list_devices()
        .into_keys()
        .filter(|n| patterns.matches(n))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn verifier_log_is_cut_to_its_last_words() {
        let e = "the BPF_PROG_LOAD syscall returned Permission denied (os error 13). Verifier \
                 output: 0: R1=ctx()\n357: (71) r3 = *(u8 *)(r1 +1)\ninvalid access to packet\n\
                 R1 offset is outside of the packet\nverification time 42648 usec\nstack depth \
                 216\nprocessed 1208 insns\n";
        assert_eq!(
            super::verifier_summary(e),
            "the BPF_PROG_LOAD syscall returned Permission denied (os error 13) verifier: invalid \
             access to packet; R1 offset is outside of the packet"
        );
        assert_eq!(super::verifier_summary("EPERM"), "EPERM");
    }

    use super::*;

    #[test]
    fn globs() {
        let p = DevicePatterns::parse("veth*, eth0,lbt-?x");
        assert!(p.matches("veth123"));
        assert!(p.matches("veth"));
        assert!(p.matches("eth0"));
        assert!(!p.matches("eth1"));
        assert!(p.matches("lbt-ax"));
        assert!(!p.matches("lbt-abx"));
        assert!(!p.matches("lo"));
    }

    #[test]
    fn layouts_known_for_every_pinned_map() {
        for name in map_names::PINNED.into_iter().chain(lb_common::sock::PINNED) {
            assert!(expected_layout(name).is_some(), "{name}");
        }
    }
}
