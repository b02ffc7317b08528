//! What the running kernel offers the datapath, probed when the agent starts.
//!
//! The programs need a handful of map types and helpers (all present since Linux 4.x) and
//! a way to sit on a device's TC hooks. Two ways exist: tcx links (Linux 6.6), which can
//! be pinned and swapped atomically, and the older netlink TC API: a `clsact` qdisc with a
//! `cls_bpf` filter in direct-action mode, replaced in place by the next agent. The agent
//! takes tcx where it exists and netlink TC otherwise, and refuses to start, naming the
//! missing feature and the kernel that has it, when neither works or when a map type or
//! helper is missing.
//!
//! Each probe asks the kernel (a trivial program or map, a link creation that fails in a
//! telling way, a filter on the loopback device of a private network namespace) rather
//! than trusting the version number: distribution kernels backport and configure out.
use std::{
    fmt, io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

use aya::{
    maps::MapType,
    programs::{
        ProgramType, SchedClassifier, TcAttachType,
        tc::{NlOptions, TcAttachOptions, TcHandle, qdisc_add_clsact},
    },
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};

/// How the programs are attached to devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcAttach {
    /// tcx links, pinned under `--bpffs-root/links` (Linux 6.6).
    Tcx,
    /// A `clsact` qdisc and a direct-action `cls_bpf` filter per direction, at
    /// [`NETLINK_PRIORITY`] / [`NETLINK_HANDLE`] (Linux 4.5).
    Netlink,
}

/// Priority of the agent's `cls_bpf` filters (netlink TC). Fixed, so that a new agent
/// finds its predecessor's filter and replaces its program in place.
pub const NETLINK_PRIORITY: u16 = 1;
/// Handle of the agent's `cls_bpf` filters (netlink TC), fixed for the same reason.
pub const NETLINK_HANDLE: TcHandle = TcHandle::new(0, 1);

/// The outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The kernel has it.
    Yes,
    /// The kernel does not have it; why.
    No(String),
    /// It could not be probed (e.g. no privilege for a private network namespace); why.
    Unknown(String),
}

impl Probe {
    fn from_result<E: fmt::Display>(r: Result<bool, E>) -> Self {
        match r {
            Ok(true) => Self::Yes,
            Ok(false) => Self::No("refused by the kernel".into()),
            Err(e) => Self::Unknown(e.to_string()),
        }
    }

    /// Whether the kernel has it (unknown counts as no).
    pub fn yes(&self) -> bool {
        matches!(self, Self::Yes)
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Yes => f.write_str("yes"),
            Self::No(why) => write!(f, "no ({why})"),
            Self::Unknown(why) => write!(f, "unknown ({why})"),
        }
    }
}

/// One probed feature: a stable name, the first kernel that has it, the result.
#[derive(Debug, Clone)]
pub struct Feature {
    /// Stable name (`map:lru_hash`, `helper:skb_change_tail`, `tcx`, ...).
    pub name: &'static str,
    /// The first mainline kernel that has it.
    pub since: &'static str,
    /// The result.
    pub probe: Probe,
}

/// Everything probed.
#[derive(Debug, Clone)]
pub struct Features {
    /// `uname -r`.
    pub kernel: String,
    /// Required by the programs whichever attach method is used.
    pub required: Vec<Feature>,
    /// tcx links.
    pub tcx: Feature,
    /// clsact + cls_bpf direct-action over netlink.
    pub netlink_tc: Feature,
    /// The cgroup `sock_addr` hooks ([`SOCK_HOOKS`], in that order), probed by loading
    /// their programs; only needed with `--cgroup-path`.
    pub sock_hooks: Vec<Feature>,
    /// The XDP program, probed by loading it; only needed with `--xdp`.
    pub xdp: Feature,
}

/// Name of the XDP feature line.
pub const XDP_FEATURE: &str = "xdp (program and bpf_link)";
/// First kernel with XDP bpf_links, which the agent pins so that XDP outlives it.
pub const XDP_SINCE: &str = "5.9";

impl Feature {
    /// The XDP feature before it is probed.
    pub fn xdp_unprobed() -> Self {
        Self {
            name: XDP_FEATURE,
            since: XDP_SINCE,
            probe: Probe::Unknown("not probed".into()),
        }
    }
}

/// The map types of `lb-ebpf/src/maps.rs`.
const MAPS: [(&str, MapType, &str); 4] = [
    ("map:hash", MapType::Hash, "3.19"),
    ("map:lru_hash", MapType::LruHash, "4.10"),
    ("map:lpm_trie", MapType::LpmTrie, "4.11"),
    ("map:percpu_array", MapType::PerCpuArray, "4.6"),
];

/// The helpers the programs call, directly or through aya-ebpf's `TcContext` and map
/// methods.
const HELPERS: [(&str, BpfHelper, &str); 11] = [
    (
        "helper:map_lookup_elem",
        BpfHelper::BPF_FUNC_map_lookup_elem,
        "3.19",
    ),
    (
        "helper:map_update_elem",
        BpfHelper::BPF_FUNC_map_update_elem,
        "3.19",
    ),
    (
        "helper:map_delete_elem",
        BpfHelper::BPF_FUNC_map_delete_elem,
        "3.19",
    ),
    (
        "helper:ktime_get_ns",
        BpfHelper::BPF_FUNC_ktime_get_ns,
        "4.1",
    ),
    (
        "helper:get_prandom_u32",
        BpfHelper::BPF_FUNC_get_prandom_u32,
        "4.1",
    ),
    (
        "helper:skb_load_bytes",
        BpfHelper::BPF_FUNC_skb_load_bytes,
        "4.5",
    ),
    (
        "helper:skb_store_bytes",
        BpfHelper::BPF_FUNC_skb_store_bytes,
        "4.1",
    ),
    (
        "helper:l3_csum_replace",
        BpfHelper::BPF_FUNC_l3_csum_replace,
        "4.1",
    ),
    (
        "helper:l4_csum_replace",
        BpfHelper::BPF_FUNC_l4_csum_replace,
        "4.1",
    ),
    ("helper:redirect", BpfHelper::BPF_FUNC_redirect, "4.4"),
    (
        "helper:skb_change_tail",
        BpfHelper::BPF_FUNC_skb_change_tail,
        "4.9",
    ),
];

/// The oldest kernel the project is tested on (netlink TC); with tcx, 6.6.
pub const MIN_KERNEL: &str = "6.1";

impl Features {
    /// Probes the running kernel. `prog` is a loaded TC program of the datapath, used to
    /// probe the attach methods; `bpffs` says whether the pin directory is on bpffs.
    pub fn probe(prog: &mut SchedClassifier, bpffs: bool) -> Self {
        let required = required(bpffs);
        let tcx = Feature {
            name: "tcx",
            since: "6.6",
            probe: match prog.fd() {
                Ok(fd) => probe_tcx(fd.as_fd()),
                Err(e) => Probe::Unknown(e.to_string()),
            },
        };
        let netlink_tc = Feature {
            name: "netlink_tc (clsact + cls_bpf da)",
            since: "4.5",
            // Probed with tcx too: the fallback is then known to work on this kernel.
            probe: probe_netlink_tc(prog),
        };
        Self {
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into()),
            required,
            tcx,
            netlink_tc,
            sock_hooks: Vec::new(),
            xdp: Feature::xdp_unprobed(),
        }
    }

    /// How to attach, or the first missing feature (name, first kernel with it, why).
    pub fn attach_mode(&self) -> Result<TcAttach, (&'static str, String)> {
        if let Some(f) = self.required.iter().find(|f| !f.probe.yes()) {
            return Err((f.name, missing_detail(f)));
        }
        if self.tcx.probe.yes() {
            return Ok(TcAttach::Tcx);
        }
        match &self.netlink_tc.probe {
            // Without the privilege to probe, trying is the probe: an attach failure
            // names the device and the netlink error.
            Probe::Yes | Probe::Unknown(_) => Ok(TcAttach::Netlink),
            Probe::No(why) => Err((
                "TC attachment (tcx or clsact + cls_bpf)",
                format!(
                    "no tcx (Linux 6.6) and netlink TC failed: {why}; load the sch_ingress \
                     and cls_bpf modules or use Linux {MIN_KERNEL} or newer with them"
                ),
            )),
        }
    }

    /// Every feature in order: the required ones, then tcx and netlink TC, then the
    /// socket hooks, then XDP.
    pub fn all(&self) -> impl Iterator<Item = &Feature> {
        self.required
            .iter()
            .chain([&self.tcx, &self.netlink_tc])
            .chain(&self.sock_hooks)
            .chain([&self.xdp])
    }
}

impl fmt::Display for Features {
    /// One line: `kernel 6.1.0: bpffs=yes ... tcx=no netlink_tc=yes`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kernel {}:", self.kernel)?;
        for feature in self.all() {
            let short = feature.name.split(' ').next().unwrap_or(feature.name);
            let value = match &feature.probe {
                Probe::Yes => "yes",
                Probe::No(_) => "no",
                Probe::Unknown(_) => "unknown",
            };
            write!(f, " {short}={value}")?;
        }
        Ok(())
    }
}

/// The features every attach method needs: bpffs, the program type, the map types and
/// the helpers.
fn required(bpffs: bool) -> Vec<Feature> {
    let mut required = vec![
        Feature {
            name: "bpffs",
            since: "4.4",
            probe: if bpffs {
                Probe::Yes
            } else {
                Probe::No("the pin directory is not on a bpf filesystem".into())
            },
        },
        Feature {
            name: "prog:sched_cls",
            since: "4.1",
            probe: Probe::from_result(is_program_supported(ProgramType::SchedClassifier)),
        },
    ];
    required.extend(MAPS.iter().map(|&(name, ty, since)| Feature {
        name,
        since,
        probe: Probe::from_result(is_map_supported(ty)),
    }));
    required.extend(HELPERS.iter().map(|&(name, helper, since)| Feature {
        name,
        since,
        probe: Probe::from_result(is_helper_supported(ProgramType::SchedClassifier, helper)),
    }));
    required
}

/// When loading the object or a program failed: the first required feature this kernel
/// lacks (name, and a detail naming the kernel that has it), which explains the failure
/// better than the verifier's log; `None` if they are all there.
pub fn missing_required() -> Option<(&'static str, String)> {
    required(true)
        .into_iter()
        .find(|f| !f.probe.yes())
        .map(|f| (f.name, missing_detail(&f)))
}

fn missing_detail(f: &Feature) -> String {
    format!(
        "{}; it arrived in Linux {} (lb-agent needs Linux {MIN_KERNEL} or newer)",
        f.probe, f.since
    )
}

/// tcx: `BPF_LINK_CREATE` with attach type `BPF_TCX_INGRESS` on ifindex 0. A kernel with
/// tcx looks the device up and answers ENODEV; one without rejects the attach type with
/// EINVAL. Nothing is attached either way.
fn probe_tcx(prog: BorrowedFd<'_>) -> Probe {
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_TCX_INGRESS: u32 = 46;
    // prog_fd, target_ifindex, attach_type, flags, then the zeroed per-type union.
    let mut attr = [0u32; 12];
    attr[0] = prog.as_raw_fd() as u32;
    attr[2] = BPF_TCX_INGRESS;
    // SAFETY: bpf(2) reads `size_of_val(&attr)` bytes of an attribute we own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc >= 0 {
        // SAFETY: the kernel returned a new descriptor; close it.
        drop(unsafe { OwnedFd::from_raw_fd(rc as i32) });
        return Probe::Yes;
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENODEV) => Probe::Yes,
        Some(libc::EINVAL) => Probe::No("BPF_TCX_INGRESS links are refused".into()),
        _ => Probe::Unknown(format!("BPF_LINK_CREATE: {err}")),
    }
}

/// netlink TC: a `clsact` qdisc and a direct-action `cls_bpf` filter running `prog` on the
/// loopback device of a network namespace private to a short-lived thread, which takes
/// both with it when it ends. Needs CAP_SYS_ADMIN for the namespace; without it the result
/// is unknown.
fn probe_netlink_tc(prog: &mut SchedClassifier) -> Probe {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: unshare only changes this thread's network namespace.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Probe::Unknown(format!(
                        "no private network namespace to probe in: {}",
                        io::Error::last_os_error()
                    ));
                }
                if let Err(e) = qdisc_add_clsact("lo") {
                    return Probe::No(format!("clsact qdisc (sch_ingress): {e}"));
                }
                let options = TcAttachOptions::Netlink(NlOptions {
                    priority: NETLINK_PRIORITY,
                    handle: NETLINK_HANDLE,
                    classid: None,
                });
                match prog.attach_with_options("lo", TcAttachType::Ingress, options) {
                    Ok(id) => {
                        // The namespace goes away with this thread; detach anyway so that
                        // the program holds no link to it.
                        let _ = prog.detach(id);
                        Probe::Yes
                    }
                    Err(e) => Probe::No(format!("cls_bpf direct-action filter: {e}")),
                }
            })
            .join()
            .unwrap_or_else(|_| Probe::Unknown("the probe thread panicked".into()))
    })
}

/// One cgroup `sock_addr` hook of the datapath (`--cgroup-path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockHook {
    /// The program in the eBPF object.
    pub prog: &'static str,
    /// The attach point, as the kernel names it (`connect4`, ...); also the link pin's
    /// suffix.
    pub hook: &'static str,
    /// Feature name, for logs and `--kernel-features`.
    pub feature: &'static str,
    /// The first mainline kernel with the attach point.
    pub since: &'static str,
    /// What is lost without it.
    pub without: &'static str,
}

/// The socket hooks, in the order they are attached and listed.
pub const SOCK_HOOKS: [SockHook; 4] = [
    SockHook {
        prog: "lb_sock_connect4",
        hook: "connect4",
        feature: "cgroup_sock_addr:connect4",
        since: "4.17",
        without: "no Service is reachable from the cgroup's processes",
    },
    SockHook {
        prog: "lb_sock_sendmsg4",
        hook: "sendmsg4",
        feature: "cgroup_sock_addr:sendmsg4",
        since: "4.18",
        without: "datagrams of unconnected UDP sockets to Services are not translated",
    },
    SockHook {
        prog: "lb_sock_recvmsg4",
        hook: "recvmsg4",
        feature: "cgroup_sock_addr:recvmsg4",
        since: "5.2",
        without: "replies to unconnected UDP sockets would show the backend, so sendmsg4 \
                  is left out too",
    },
    SockHook {
        prog: "lb_sock_getpeername4",
        hook: "getpeername4",
        feature: "cgroup_sock_addr:getpeername4",
        since: "5.8",
        without: "getpeername(2) on a translated socket shows the backend, not the Service",
    },
];

/// Which socket hooks to attach, given the probe results in [`SOCK_HOOKS`] order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SockPlan {
    /// The hooks to attach.
    pub attach: Vec<SockHook>,
    /// One warning per hook left out: the hook, the kernel that has it, what is lost.
    pub skipped: Vec<String>,
}

impl Features {
    /// The socket hooks this kernel can run: `connect4` is required (without it the
    /// others have nothing to undo), the others are left out with a warning when
    /// missing, `sendmsg4` together with `recvmsg4` (a UDP reply the application cannot
    /// match is worse than no translation). An error names the missing feature.
    pub fn sock_plan(&self) -> Result<SockPlan, (&'static str, String)> {
        let has = |hook: &str| {
            SOCK_HOOKS
                .iter()
                .zip(&self.sock_hooks)
                .any(|(h, f)| h.hook == hook && f.probe.yes())
        };
        let connect = &SOCK_HOOKS[0];
        if !has(connect.hook) {
            let why = self
                .sock_hooks
                .first()
                .map_or_else(|| "not probed".to_owned(), |f| f.probe.to_string());
            return Err((
                connect.feature,
                format!(
                    "{why}; it arrived in Linux {} (--cgroup-path needs it; run without \
                     --cgroup-path to leave the node's own processes untranslated)",
                    connect.since
                ),
            ));
        }
        let mut plan = SockPlan {
            attach: Vec::new(),
            skipped: Vec::new(),
        };
        for hook in SOCK_HOOKS {
            let usable = match hook.hook {
                "sendmsg4" => has("sendmsg4") && has("recvmsg4"),
                other => has(other),
            };
            if usable {
                plan.attach.push(hook);
            } else {
                plan.skipped.push(format!(
                    "{} is not available (Linux {} or newer has it): {}",
                    hook.feature, hook.since, hook.without
                ));
            }
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feature(name: &'static str, probe: Probe) -> Feature {
        Feature {
            name,
            since: "4.1",
            probe,
        }
    }

    fn features(required: Probe, tcx: Probe, netlink: Probe) -> Features {
        Features {
            kernel: "6.1.0".into(),
            required: vec![
                feature("map:hash", Probe::Yes),
                feature("helper:redirect", required),
            ],
            tcx: feature("tcx", tcx),
            netlink_tc: feature("netlink_tc", netlink),
            sock_hooks: Vec::new(),
            xdp: Feature::xdp_unprobed(),
        }
    }

    #[test]
    fn tcx_is_preferred() {
        let f = features(Probe::Yes, Probe::Yes, Probe::Yes);
        assert_eq!(f.attach_mode(), Ok(TcAttach::Tcx));
    }

    #[test]
    fn netlink_without_tcx() {
        let no = || Probe::No("refused".into());
        let f = features(Probe::Yes, no(), Probe::Yes);
        assert_eq!(f.attach_mode(), Ok(TcAttach::Netlink));
        // Not probed (no privilege for a namespace): attaching is the probe.
        let f = features(Probe::Yes, no(), Probe::Unknown("EPERM".into()));
        assert_eq!(f.attach_mode(), Ok(TcAttach::Netlink));
    }

    #[test]
    fn refusals_name_the_feature_and_a_kernel() {
        let f = features(Probe::No("refused".into()), Probe::Yes, Probe::Yes);
        let (name, detail) = f.attach_mode().unwrap_err();
        assert_eq!(name, "helper:redirect");
        assert!(
            detail.contains("Linux 4.1") && detail.contains(MIN_KERNEL),
            "{detail}"
        );

        let f = features(
            Probe::Yes,
            Probe::No("refused".into()),
            Probe::No("no cls_bpf".into()),
        );
        let (name, detail) = f.attach_mode().unwrap_err();
        assert!(name.contains("tcx or clsact"), "{name}");
        assert!(
            detail.contains("no cls_bpf") && detail.contains("cls_bpf"),
            "{detail}"
        );
    }

    #[test]
    fn one_line_summary() {
        let f = features(Probe::Yes, Probe::No("x".into()), Probe::Yes);
        assert_eq!(
            f.to_string(),
            "kernel 6.1.0: map:hash=yes helper:redirect=yes tcx=no netlink_tc=yes xdp=unknown"
        );
    }
}

#[cfg(test)]
mod sock_tests {
    use super::*;

    fn with_hooks(probes: [bool; 4]) -> Features {
        Features {
            kernel: "6.1.0".into(),
            required: Vec::new(),
            tcx: Feature {
                name: "tcx",
                since: "6.6",
                probe: Probe::Yes,
            },
            netlink_tc: Feature {
                name: "netlink_tc",
                since: "4.5",
                probe: Probe::Yes,
            },
            sock_hooks: SOCK_HOOKS
                .iter()
                .zip(probes)
                .map(|(h, yes)| Feature {
                    name: h.feature,
                    since: h.since,
                    probe: if yes {
                        Probe::Yes
                    } else {
                        Probe::No("EINVAL".into())
                    },
                })
                .collect(),
            xdp: Feature::xdp_unprobed(),
        }
    }

    fn attached(plan: &SockPlan) -> Vec<&'static str> {
        plan.attach.iter().map(|h| h.hook).collect()
    }

    #[test]
    fn every_hook_on_a_new_kernel() {
        let plan = with_hooks([true; 4]).sock_plan().unwrap();
        assert_eq!(
            attached(&plan),
            ["connect4", "sendmsg4", "recvmsg4", "getpeername4"]
        );
        assert!(plan.skipped.is_empty());
    }

    #[test]
    fn missing_getpeername_is_skipped_with_its_kernel() {
        let plan = with_hooks([true, true, true, false]).sock_plan().unwrap();
        assert_eq!(attached(&plan), ["connect4", "sendmsg4", "recvmsg4"]);
        assert_eq!(plan.skipped.len(), 1);
        assert!(
            plan.skipped[0].contains("getpeername4") && plan.skipped[0].contains("5.8"),
            "{:?}",
            plan.skipped
        );
    }

    #[test]
    fn sendmsg_goes_with_recvmsg() {
        let plan = with_hooks([true, true, false, true]).sock_plan().unwrap();
        assert_eq!(attached(&plan), ["connect4", "getpeername4"]);
        assert_eq!(plan.skipped.len(), 2, "{:?}", plan.skipped);
    }

    #[test]
    fn no_connect_hook_is_refused_by_name() {
        let (name, detail) = with_hooks([false, true, true, true])
            .sock_plan()
            .unwrap_err();
        assert_eq!(name, "cgroup_sock_addr:connect4");
        assert!(
            detail.contains("4.17") && detail.contains("EINVAL"),
            "{detail}"
        );
        // Not probed at all (an object without the programs) is a refusal too.
        let mut f = with_hooks([true; 4]);
        f.sock_hooks.clear();
        assert!(f.sock_plan().is_err());
    }
}
