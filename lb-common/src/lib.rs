//! Types shared by the datapath (`lb-ebpf`) and the agent (`lb-agent`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding, so the byte layout the
//! kernel sees is the one written here, on both sides. Addresses and ports are stored in
//! network byte order, exactly as they appear in packet headers; the field names say so
//! with a `_be` suffix. No `bool`, `Option` or Rust enum appears in a map value: flags and
//! states are integers with named constants.
#![no_std]

use core::mem::size_of;

/// Names of the maps, as the loader and the pin directory see them.
pub mod map_names {
    /// Frontends and their backend slots: [`ServiceKey`](super::ServiceKey) ->
    /// [`ServiceValue`](super::ServiceValue).
    pub const SERVICES: &str = "LB4_SERVICES";
    /// Backend id -> [`Backend`](super::Backend).
    pub const BACKENDS: &str = "LB4_BACKENDS";
    /// Connection tracking: [`CtKey`](super::CtKey) -> [`CtValue`](super::CtValue).
    pub const CT: &str = "LB4_CT";
    /// `sessionAffinity: ClientIP`: [`AffinityKey`](super::AffinityKey) ->
    /// [`AffinityValue`](super::AffinityValue).
    pub const AFFINITY: &str = "LB4_AFFINITY";
    /// Per-CPU counters indexed by [`metric_index`](super::metric_index).
    pub const METRICS: &str = "LB_METRICS";
    /// `loadBalancerSourceRanges`: LPM trie of (service id, client prefix)
    /// ([`SourceRangeKey`](super::SourceRangeKey)) -> `u32` (always 1).
    pub const SOURCE_RANGES: &str = "LB4_SOURCE_RANGES";
    /// Maglev lookup tables of the frontends flagged
    /// [`SVC_F_MAGLEV`](super::SVC_F_MAGLEV): service id (`u32`) ->
    /// [`MaglevTable`](super::MaglevTable).
    pub const MAGLEV: &str = "LB4_MAGLEV";
    /// The cluster's pod address ranges (`lb-agent --cluster-cidr`): LPM trie of client
    /// prefixes (`u32` address, network byte order) -> `u32` (always 1). Clients within
    /// them reach the [`SCOPE_INTERNAL`](super::SCOPE_INTERNAL) twin of a frontend that
    /// has one. Not pinned: each agent writes it before its programs are attached.
    pub const CLUSTER_CIDRS: &str = "LB4_CLUSTER_CIDRS";

    /// Maps pinned under the bpffs root so that they outlive the agent.
    pub const PINNED: [&str; 6] = [SERVICES, BACKENDS, CT, AFFINITY, SOURCE_RANGES, MAGLEV];
}

/// Default capacities; the agent may override them at load time.
pub mod capacity {
    /// Frontend entries plus one entry per backend slot.
    pub const SERVICES: u32 = 262_144;
    /// Backends over all Services (a backend belongs to one Service).
    pub const BACKENDS: u32 = 262_144;
    /// Tracked flows; each flow uses two entries (forward and reverse).
    pub const CT: u32 = 524_288;
    /// Client/Service pairs with session affinity.
    pub const AFFINITY: u32 = 131_072;
    /// Allowed client prefixes over all LoadBalancer frontends.
    pub const SOURCE_RANGES: u32 = 65_536;
    /// Maglev tables (one per Maglev frontend, 64 KiB each). The map is not
    /// preallocated, so only the tables in use take memory; this bounds the total at
    /// 256 MiB.
    pub const MAGLEV: u32 = 4_096;
    /// Prefixes of `--cluster-cidr`.
    pub const CLUSTER_CIDRS: u32 = 64;
}

/// IP protocol numbers as carried in the IPv4 header.
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// SCTP.
    pub const SCTP: u8 = 132;
}

/// Key of the services map.
///
/// A Service port is a *frontend*: (address, port, protocol). Slot 0 of a frontend holds
/// its [`ServiceValue`] header (`count`, flags, ids); slots `1..=count` each hold one
/// backend id. A lookup with slot 0 therefore finds the frontend, and
/// `slot = 1 + random % count` finds the chosen backend.
///
/// An entry with `port_be == 0`, `proto == 0` and slot 0 marks an address as a Service
/// address ([`SVC_F_ADDR_MARKER`]), so that traffic to a port the Service does not define
/// is rejected rather than routed. Only ClusterIPs get one: NodePorts live on the node's
/// own addresses, and externalIPs and LoadBalancer IPs may too, where every other port
/// belongs to the node.
///
/// Every kind of frontend (ClusterIP, NodePort on each node address, externalIP,
/// LoadBalancer ingress IP) is keyed the same way, by the destination the client uses, so
/// the datapath finds any of them with one lookup. Two kinds can never share a key: the
/// agent gives an (address, port, protocol) to one Service port only.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(C)]
pub struct ServiceKey {
    /// Frontend IPv4 address, network byte order.
    pub addr_be: u32,
    /// Frontend port, network byte order.
    pub port_be: u16,
    /// IP protocol number ([`proto`]).
    pub proto: u8,
    /// [`SCOPE_ALL`] for a frontend as every client sees it; [`SCOPE_INTERNAL`] for its
    /// twin that clients inside the cluster use instead ([`SVC_F_INTERNAL_SCOPE`]).
    pub scope: u8,
    /// 0 for the frontend header, `1..=count` for backend slots.
    pub slot: u16,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}

impl ServiceKey {
    /// Key of slot `slot` of the frontend (addr, port, proto).
    pub const fn new(addr_be: u32, port_be: u16, proto: u8, slot: u16) -> Self {
        Self {
            addr_be,
            port_be,
            proto,
            scope: SCOPE_ALL,
            slot,
            _pad: [0; 2],
        }
    }

    /// The same key at scope `scope`.
    pub const fn with_scope(mut self, scope: u8) -> Self {
        self.scope = scope;
        self
    }

    /// Key of the marker entry that says `addr_be` belongs to a Service.
    pub const fn addr_marker(addr_be: u32) -> Self {
        Self::new(addr_be, 0, 0, 0)
    }
}

/// The Service uses `sessionAffinity: ClientIP`.
pub const SVC_F_AFFINITY: u16 = 1 << 0;
/// This slot-0 entry only marks its address as a Service address.
pub const SVC_F_ADDR_MARKER: u16 = 1 << 1;
/// New flows are accepted only from the client prefixes listed for this `service_id` in
/// the source ranges map (`loadBalancerSourceRanges`); others are dropped.
pub const SVC_F_SOURCE_RANGES: u16 = 1 << 2;
/// With `count == 0`, drop instead of reject: the Service has endpoints, but none on this
/// node, and a traffic policy of `Local` applies to this frontend (kube-proxy drops too).
pub const SVC_F_DROP_EMPTY: u16 = 1 << 3;
/// The frontend is reached from outside the cluster network (NodePort, externalIP,
/// LoadBalancer IP), so its address gets no marker: other ports there may belong to the
/// node itself. Only the agent reads this flag (to re-adopt markers after a restart).
pub const SVC_F_EXTERNAL: u16 = 1 << 4;

/// New flows pick their backend from the frontend's Maglev table ([`map_names::MAGLEV`],
/// keyed by `service_id`) at [`maglev_flow_hash`] of the packet, so that every node picks
/// the same backend for the same client flow. Session affinity, when set, is looked at
/// first. Without a usable table entry the datapath falls back to a random slot.
pub const SVC_F_MAGLEV: u16 = 1 << 5;

/// This frontend has a twin at [`SCOPE_INTERNAL`] (same address, port and protocol) that
/// new flows from inside the cluster use: the node's own sockets, and clients within
/// [`map_names::CLUSTER_CIDRS`]. It is how `externalTrafficPolicy: Local` treats traffic
/// that never left the cluster, as kube-proxy does: such a client is sent to any endpoint
/// of the Service rather than to this node's only (the twin holds the cluster-wide set).
/// Source ranges are still checked against this header; without a twin entry the header
/// applies to every client.
pub const SVC_F_INTERNAL_SCOPE: u16 = 1 << 6;

/// Scope of a frontend entry every client uses (the default).
pub const SCOPE_ALL: u8 = 0;
/// Scope of the twin entry clients inside the cluster use ([`SVC_F_INTERNAL_SCOPE`]).
pub const SCOPE_INTERNAL: u8 = 1;

/// Value of the services map.
///
/// In slot 0: `count` is the number of backend slots that new connections may choose
/// from (0 means reject), `service_id` identifies the frontend (affinity and counters are
/// keyed by it), and `affinity_timeout_s` applies when [`SVC_F_AFFINITY`] is set.
/// In slots `1..=count`: `backend_id` names an entry of the backends map.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ServiceValue {
    /// Backend id (slots >= 1), 0 in slot 0.
    pub backend_id: u32,
    /// Number of backend slots (slot 0 only).
    pub count: u16,
    /// `SVC_F_*` flags (slot 0 only).
    pub flags: u16,
    /// Frontend id (slot 0 only), never 0 for a real frontend.
    pub service_id: u32,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds` (slot 0 only).
    pub affinity_timeout_s: u32,
}

/// Data of a source ranges key: the kernel key is `prefix_len: u32` followed by this,
/// with `prefix_len = 32 + client prefix length`, so the service id always matches
/// exactly and the client address by longest prefix.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(C)]
pub struct SourceRangeKey {
    /// The frontend's service id (all 32 bits are matched, so byte order is irrelevant).
    pub service_id: u32,
    /// Client prefix address, network byte order, host bits zero.
    pub addr_be: u32,
}

/// Length of the whole LPM key (`prefix_len` + [`SourceRangeKey`]).
pub const SOURCE_RANGE_KEY_LEN: usize = 4 + size_of::<SourceRangeKey>();

/// The backend takes new connections.
pub const BACKEND_ACTIVE: u8 = 0;
/// The backend is terminating: its established flows continue, it takes no new ones.
pub const BACKEND_TERMINATING: u8 = 1;

/// Flows to this backend through a north-south frontend leave the node with the node's
/// address as source ([`SNAT_MARK`]): the backend runs on another node, and its replies
/// must come back through this one to be translated.
pub const BACKEND_F_SNAT: u8 = 1 << 0;

/// Packet mark (bits within [`SNAT_MARK`]) that the datapath sets on the first packet of
/// a flow to a [`BACKEND_F_SNAT`] backend; the agent's one masquerade rule gives such
/// flows the node's address and a free source port, and conntrack undoes it on replies.
pub const SNAT_MARK: u32 = 0x0040_0000;

/// Value of the backends map (key: backend id, `u32`, never 0).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Backend {
    /// Pod IPv4 address, network byte order.
    pub addr_be: u32,
    /// Target port, network byte order.
    pub port_be: u16,
    /// IP protocol number.
    pub proto: u8,
    /// [`BACKEND_ACTIVE`] or [`BACKEND_TERMINATING`].
    pub state: u8,
    /// The frontend this backend serves.
    pub service_id: u32,
    /// `BACKEND_F_*` flags.
    pub flags: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
}

/// Entries of a Maglev table ([`MaglevTable`]).
///
/// A prime, as the Maglev permutation needs (every skip is then coprime with the size, so
/// each backend's preference list visits every entry). Balance is within about 1% while
/// the table has at least 100 entries per backend (up to about 160 backends). The table
/// (`4 * 16361 = 65444` bytes) leaves 92 bytes of a 64 KiB allocation for the kernel's
/// header of a hash map element (about 64 bytes): the map is not preallocated, each
/// element is allocated on its own, and a table a little larger would take 128 KiB.
pub const MAGLEV_TABLE_SIZE: usize = 16_361;

/// Value of the Maglev map: for each of [`MAGLEV_TABLE_SIZE`] entries, the id of an
/// active backend of the frontend (a key of the backends map).
pub type MaglevTable = [u32; MAGLEV_TABLE_SIZE];

/// Hash of a client flow for the Maglev lookup: entry `hash % MAGLEV_TABLE_SIZE` of the
/// frontend's table is its backend.
///
/// Only fields that are the same on every node for one client flow go in: the client
/// address and port, the destination port (the Service port, or the nodePort, which is
/// the same on every node) and the protocol; never the destination address (each node has
/// its own NodePort address) or node-local ids. Arguments are as in the packet (network
/// byte order read as native integers). The mix is Murmur3's block step and finalizer.
pub const fn maglev_flow_hash(saddr_be: u32, sport_be: u16, dport_be: u16, proto: u8) -> u32 {
    const fn block(h: u32, k: u32) -> u32 {
        let k = k
            .wrapping_mul(0xcc9e_2d51)
            .rotate_left(15)
            .wrapping_mul(0x1b87_3593);
        (h ^ k)
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64)
    }
    let mut h = 0x6c62_2f6d; // seed: any constant, the same on every node
    h = block(h, saddr_be);
    h = block(h, (sport_be as u32) << 16 | dport_be as u32);
    h = block(h, proto as u32);
    h ^= 12;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Connection tracking entry for the client -> frontend direction.
pub const CT_DIR_FORWARD: u8 = 0;
/// Connection tracking entry for the backend -> client (reply) direction.
pub const CT_DIR_REVERSE: u8 = 1;

/// Key of the connection tracking map.
///
/// A translated flow has two entries. The forward entry is keyed by the packet as the
/// client sends it (client -> frontend) and tells where to DNAT it. The reverse entry is
/// keyed by the reply as the backend sends it (backend -> client) and tells what source
/// to restore.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct CtKey {
    /// Source IPv4 address, network byte order.
    pub src_addr_be: u32,
    /// Destination IPv4 address, network byte order.
    pub dst_addr_be: u32,
    /// Source port, network byte order.
    pub src_port_be: u16,
    /// Destination port, network byte order.
    pub dst_port_be: u16,
    /// IP protocol number.
    pub proto: u8,
    /// [`CT_DIR_FORWARD`] or [`CT_DIR_REVERSE`].
    pub dir: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}

/// A FIN or RST was seen: the flow expires after [`CT_TIMEOUT_CLOSING_NS`].
pub const CT_F_CLOSING: u16 = 1 << 0;

/// Idle lifetime of an established TCP flow.
pub const CT_TIMEOUT_TCP_NS: u64 = 6 * 3600 * 1_000_000_000;
/// Idle lifetime of a UDP (or other non-TCP) flow.
pub const CT_TIMEOUT_UDP_NS: u64 = 120 * 1_000_000_000;
/// Lifetime of a TCP flow after FIN or RST.
pub const CT_TIMEOUT_CLOSING_NS: u64 = 10 * 1_000_000_000;
/// `last_seen_ns` is refreshed at most this often, to keep map writes off the fast path.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// Value of the connection tracking map.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct CtValue {
    /// Forward: backend address; reverse: frontend address (network byte order).
    pub nat_addr_be: u32,
    /// Forward: backend port; reverse: frontend port (network byte order).
    pub nat_port_be: u16,
    /// `CT_F_*` flags.
    pub flags: u16,
    /// The backend the flow is pinned to.
    pub backend_id: u32,
    /// The frontend the flow was addressed to.
    pub service_id: u32,
    /// `bpf_ktime_get_ns()` when the flow was last refreshed.
    pub last_seen_ns: u64,
}

// Hairpin flows: a pod reaching a frontend and balanced onto itself.

/// Source address of hairpin flows, `169.254.77.1`: link-local, never a pod's, a node's or
/// a Service's. A pod balanced onto itself would otherwise get a packet from its own
/// address, which its kernel drops as a martian, and would answer itself locally instead
/// of through the node. The datapath gives such flows this source, so the pod sees it as
/// its peer, and its replies leave through its default route back to the node, where the
/// datapath restores the frontend and sends them back to the pod.
pub const HAIRPIN_ADDR: [u8; 4] = [169, 254, 77, 1];
/// [`HAIRPIN_ADDR`] in network byte order (the header bytes read as a `u32`).
pub const HAIRPIN_ADDR_BE: u32 = u32::from_ne_bytes(HAIRPIN_ADDR);
/// Both entries of a hairpin flow carry this flag: the forward entry also rewrites the
/// source to [`HAIRPIN_ADDR`], and the reverse entry is keyed by the reply to that address
/// (backend -> [`HAIRPIN_ADDR`], client port) and restores both ends. Its packets are
/// sent straight back out of the device they came in on.
pub const CT_F_HAIRPIN: u16 = 1 << 1;

/// Key of the session affinity map.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct AffinityKey {
    /// Client IPv4 address, network byte order.
    pub client_addr_be: u32,
    /// Frontend id.
    pub service_id: u32,
}

/// Value of the session affinity map.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct AffinityValue {
    /// The backend this client sticks to.
    pub backend_id: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the last new connection that used this entry.
    pub last_used_ns: u64,
}

/// Why the datapath did what it did to a packet. Each reason has a per-CPU counter per
/// direction (see [`metric_index`]).
pub mod reason {
    /// New flow to a frontend, translated to a backend.
    pub const NEW_FLOW: u32 = 0;
    /// Packet of a tracked flow, translated to its backend.
    pub const ESTABLISHED: u32 = 1;
    /// Reply of a tracked flow, source restored to the frontend.
    pub const REPLY: u32 = 2;
    /// Not addressed to any frontend: passed untouched.
    pub const NOT_SERVICE: u32 = 3;
    /// The frontend has no ready backend: rejected (ICMP port unreachable).
    pub const NO_BACKEND: u32 = 4;
    /// Service address, but a port the Service does not define: rejected.
    pub const NO_PORT: u32 = 5;
    /// Tracked flow whose backend was removed: moved to a live backend.
    pub const RESELECTED: u32 = 6;
    /// Connection tracking entry could not be created: dropped (fail closed).
    pub const CT_FULL: u32 = 7;
    /// Malformed or truncated headers: passed untouched.
    pub const MALFORMED: u32 = 8;
    /// IP fragment or IP options to a frontend: dropped (cannot be translated safely).
    pub const UNSUPPORTED: u32 = 9;
    /// The packet could not be rewritten (helper failure): dropped.
    pub const REWRITE_FAILED: u32 = 10;
    /// A reject (ICMP) could not be built: dropped instead.
    pub const REJECT_FAILED: u32 = 11;
    /// Sticky client sent to its remembered backend.
    pub const AFFINITY_HIT: u32 = 12;
    /// New flow to a LoadBalancer IP from outside its `loadBalancerSourceRanges`: dropped.
    pub const SOURCE_RANGE_DENIED: u32 = 13;
    /// New flow to a frontend whose traffic policy is `Local` while no endpoint of the
    /// Service runs on this node: dropped, as kube-proxy does.
    pub const NO_LOCAL_BACKEND: u32 = 14;
    /// XDP: left to the TC path, which handles it as if XDP were not there (the first
    /// packet of a flow to a backend on another node, which needs the source NAT mark; a
    /// reject, which needs an ICMP reply built; a fragment; a hairpin).
    pub const DEFERRED: u32 = 15;
    /// Number of reasons.
    pub const COUNT: u32 = 16;

    /// Stable names, indexed by reason, used as metric labels.
    pub const NAMES: [&str; COUNT as usize] = [
        "new_flow",
        "established",
        "reply",
        "not_service",
        "no_backend",
        "no_port",
        "reselected",
        "ct_full",
        "malformed",
        "unsupported",
        "rewrite_failed",
        "reject_failed",
        "affinity_hit",
        "source_range_denied",
        "no_local_backend",
        "deferred",
    ];
}

/// Traffic entering a device (TC ingress).
pub const DIR_INGRESS: u32 = 0;
/// Traffic leaving a device (TC egress).
pub const DIR_EGRESS: u32 = 1;
/// Traffic entering a device, seen by the XDP program before the TC one.
pub const DIR_XDP: u32 = 2;
/// The node's own sockets, seen by the cgroup socket hooks (`connect`, `sendmsg`:
/// translated, refused or not a frontend; `recvmsg`, `getpeername`: the frontend shown,
/// counted as replies).
pub const DIR_SOCKET: u32 = 3;
/// Number of directions.
pub const DIRS: u32 = 4;
/// Names of the directions, indexed by direction, used as metric labels.
pub const DIR_NAMES: [&str; DIRS as usize] = ["ingress", "egress", "xdp", "socket"];
/// Size of the metrics array.
pub const METRICS_LEN: u32 = reason::COUNT * DIRS;

/// Index of the counter for `reason` in direction `dir` ([`DIR_INGRESS`], [`DIR_EGRESS`],
/// [`DIR_XDP`], [`DIR_SOCKET`]).
pub const fn metric_index(reason: u32, dir: u32) -> u32 {
    reason * DIRS + dir
}

// Layout checks: a change here is a change of the kernel ABI between agent versions
// (pinned maps outlive the agent), so it must be deliberate.
const _: () = assert!(size_of::<ServiceKey>() == 12);
const _: () = assert!(size_of::<ServiceValue>() == 16);
const _: () = assert!(size_of::<Backend>() == 16);
const _: () = assert!(size_of::<CtKey>() == 16);
const _: () = assert!(size_of::<CtValue>() == 24);
const _: () = assert!(size_of::<AffinityKey>() == 8);
const _: () = assert!(size_of::<AffinityValue>() == 16);
const _: () = assert!(size_of::<SourceRangeKey>() == 8);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each type is repr(C), Copy, has no padding bytes (checked by the size
    // assertions above) and every bit pattern is a valid value.
    unsafe impl aya::Pod for ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AffinityValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SourceRangeKey {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use core::mem::{align_of, offset_of};

    use super::*;

    #[test]
    fn service_key_layout() {
        assert_eq!(offset_of!(ServiceKey, addr_be), 0);
        assert_eq!(offset_of!(ServiceKey, port_be), 4);
        assert_eq!(offset_of!(ServiceKey, proto), 6);
        assert_eq!(offset_of!(ServiceKey, scope), 7);
        assert_eq!(offset_of!(ServiceKey, slot), 8);
        assert_eq!(offset_of!(ServiceKey, _pad), 10);
        assert_eq!(align_of::<ServiceKey>(), 4);
    }

    #[test]
    fn service_value_layout() {
        assert_eq!(offset_of!(ServiceValue, backend_id), 0);
        assert_eq!(offset_of!(ServiceValue, count), 4);
        assert_eq!(offset_of!(ServiceValue, flags), 6);
        assert_eq!(offset_of!(ServiceValue, service_id), 8);
        assert_eq!(offset_of!(ServiceValue, affinity_timeout_s), 12);
    }

    #[test]
    fn backend_layout() {
        assert_eq!(offset_of!(Backend, addr_be), 0);
        assert_eq!(offset_of!(Backend, port_be), 4);
        assert_eq!(offset_of!(Backend, proto), 6);
        assert_eq!(offset_of!(Backend, state), 7);
        assert_eq!(offset_of!(Backend, service_id), 8);
        assert_eq!(offset_of!(Backend, flags), 12);
        assert_eq!(offset_of!(Backend, _pad), 13);
    }

    #[test]
    fn ct_layout() {
        assert_eq!(offset_of!(CtKey, src_addr_be), 0);
        assert_eq!(offset_of!(CtKey, dst_addr_be), 4);
        assert_eq!(offset_of!(CtKey, src_port_be), 8);
        assert_eq!(offset_of!(CtKey, dst_port_be), 10);
        assert_eq!(offset_of!(CtKey, proto), 12);
        assert_eq!(offset_of!(CtKey, dir), 13);
        assert_eq!(offset_of!(CtValue, nat_addr_be), 0);
        assert_eq!(offset_of!(CtValue, nat_port_be), 4);
        assert_eq!(offset_of!(CtValue, flags), 6);
        assert_eq!(offset_of!(CtValue, backend_id), 8);
        assert_eq!(offset_of!(CtValue, service_id), 12);
        assert_eq!(offset_of!(CtValue, last_seen_ns), 16);
        assert_eq!(align_of::<CtValue>(), 8);
    }

    #[test]
    fn affinity_layout() {
        assert_eq!(offset_of!(AffinityKey, client_addr_be), 0);
        assert_eq!(offset_of!(AffinityKey, service_id), 4);
        assert_eq!(offset_of!(AffinityValue, backend_id), 0);
        assert_eq!(offset_of!(AffinityValue, last_used_ns), 8);
    }

    #[test]
    fn source_range_key_layout() {
        assert_eq!(offset_of!(SourceRangeKey, service_id), 0);
        assert_eq!(offset_of!(SourceRangeKey, addr_be), 4);
        assert_eq!(SOURCE_RANGE_KEY_LEN, 12);
    }

    #[test]
    fn metric_indices_are_dense_and_named() {
        assert_eq!(metric_index(reason::COUNT - 1, DIR_SOCKET), METRICS_LEN - 1);
        assert_eq!(reason::NAMES.len(), reason::COUNT as usize);
    }

    #[test]
    fn maglev_flow_hash_is_fixed_and_spreads_ports() {
        // The hash is part of the contract between nodes (and agent versions): a change
        // moves flows between backends.
        let client = u32::from_ne_bytes([10, 1, 0, 2]);
        let h = maglev_flow_hash(client, 40_000u16.to_be(), 80u16.to_be(), proto::TCP);
        assert_eq!(h, 679_371_310);
        assert_ne!(
            h,
            maglev_flow_hash(client, 40_000u16.to_be(), 80u16.to_be(), proto::UDP)
        );
        assert_ne!(
            h,
            maglev_flow_hash(client, 40_001u16.to_be(), 80u16.to_be(), proto::TCP)
        );
        assert_ne!(
            h,
            maglev_flow_hash(client, 40_000u16.to_be(), 81u16.to_be(), proto::TCP)
        );
        let mut hits = [0u32; 8];
        for port in 0..8000u16 {
            let h = maglev_flow_hash(0x0201_010a, port.to_be(), 80u16.to_be(), proto::TCP);
            hits[(h % 8) as usize] += 1;
        }
        assert!(hits.iter().all(|n| (900..1100).contains(n)), "{hits:?}");
    }

    #[test]
    fn marker_key_is_slot_zero_port_zero() {
        let k = ServiceKey::addr_marker(0x0a60_0001);
        assert_eq!((k.port_be, k.proto, k.slot), (0, 0, 0));
    }
}

// Socket-level translation (cgroup sock_addr hooks) for processes on the node itself.

/// Names, capacity and layout of the socket translation map.
pub mod sock {
    /// Socket translation: [`SockNatKey`](super::SockNatKey) ->
    /// [`SockNatValue`](super::SockNatValue).
    pub const MAP: &str = "LB4_SOCK_NAT";
    /// Pinned like [`map_names::PINNED`](super::map_names::PINNED), so that sockets opened
    /// before an agent restart keep their reverse translation.
    pub const PINNED: [&str; 1] = [MAP];
    /// Entries: a connected socket uses one, an unconnected UDP socket two per frontend
    /// it sends to.
    pub const CAPACITY: u32 = 131_072;
}

/// [`SockNatKey`] of the reverse entry: keyed by the backend a socket was sent to, it
/// gives the frontend the application asked for (recvmsg, getpeername).
pub const SOCK_DIR_REVERSE: u8 = 0;
/// [`SockNatKey`] of the forward entry of an unconnected UDP socket: keyed by the
/// frontend, it gives the backend its earlier datagrams went to, so that one socket's
/// datagrams to one frontend stay on one backend, as a conntrack flow would.
pub const SOCK_DIR_FORWARD: u8 = 1;

/// Key of the socket translation map.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct SockNatKey {
    /// Socket cookie (`bpf_get_socket_cookie`): unique per socket for the life of the
    /// system, never reused.
    pub cookie: u64,
    /// Reverse: backend address; forward: frontend address (network byte order).
    pub addr_be: u32,
    /// Reverse: backend port; forward: frontend port (network byte order).
    pub port_be: u16,
    /// IP protocol number.
    pub proto: u8,
    /// [`SOCK_DIR_REVERSE`] or [`SOCK_DIR_FORWARD`].
    pub dir: u8,
}

/// Value of the socket translation map.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct SockNatValue {
    /// Reverse: frontend address; forward: backend address (network byte order).
    pub addr_be: u32,
    /// Reverse: frontend port; forward: backend port (network byte order).
    pub port_be: u16,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
    /// The backend chosen.
    pub backend_id: u32,
    /// The frontend asked for.
    pub service_id: u32,
    /// `bpf_ktime_get_ns()` of the last use (forward entries expire like UDP flows).
    pub last_seen_ns: u64,
}

const _: () = assert!(size_of::<SockNatKey>() == 16);
const _: () = assert!(size_of::<SockNatValue>() == 24);

#[cfg(feature = "user")]
mod sock_pod {
    use super::*;
    // SAFETY: repr(C), Copy, no padding bytes (size assertions above), any bit pattern
    // is valid.
    unsafe impl aya::Pod for SockNatKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockNatValue {}
}

#[cfg(test)]
mod sock_tests {
    use core::mem::offset_of;

    use super::*;

    #[test]
    fn sock_nat_layout() {
        assert_eq!(offset_of!(SockNatKey, cookie), 0);
        assert_eq!(offset_of!(SockNatKey, addr_be), 8);
        assert_eq!(offset_of!(SockNatKey, port_be), 12);
        assert_eq!(offset_of!(SockNatKey, proto), 14);
        assert_eq!(offset_of!(SockNatKey, dir), 15);
        assert_eq!(offset_of!(SockNatValue, addr_be), 0);
        assert_eq!(offset_of!(SockNatValue, port_be), 4);
        assert_eq!(offset_of!(SockNatValue, _pad), 6);
        assert_eq!(offset_of!(SockNatValue, backend_id), 8);
        assert_eq!(offset_of!(SockNatValue, service_id), 12);
        assert_eq!(offset_of!(SockNatValue, last_seen_ns), 16);
    }
}
