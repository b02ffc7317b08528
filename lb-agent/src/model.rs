//! The desired state: Kubernetes objects in, service and backend tables out.
//!
//! [`desired_state`] is a pure function: the same objects always give the same tables,
//! whatever the order they arrived in, and nothing here touches the kernel. Both sources
//! (the manifests directory and the Kubernetes API) feed it; `apply` writes its result.
//!
//! The semantics are kube-proxy's:
//! - Services of type `ExternalName`, headless Services (`clusterIP: None`) and Services
//!   labelled `service.kubernetes.io/service-proxy-name` get no entries.
//! - Each Service port is a frontend per ClusterIP. Its endpoints are the EndpointSlice
//!   ports with the *same name* (and protocol) as the Service port: that is how a
//!   `targetPort` given by name resolves, the endpoint controller having written the
//!   resolved number into the slice.
//! - Ready endpoints take new connections. When none is ready, endpoints that are serving
//!   and terminating do (KEP-1669). Every other known endpoint keeps its established flows
//!   but gets no new one.
//! - A selectorless Service may be backed by a hand-written v1 `Endpoints` object; it is
//!   used when no EndpointSlice exists for the Service, as the EndpointSlice mirroring
//!   controller would mirror it.
//! - Besides its ClusterIPs, a Service port is a frontend on every node address that
//!   answers NodePorts (type `NodePort` or `LoadBalancer`, `nodePort` within the NodePort
//!   range), on each `externalIPs` entry, and on each `status.loadBalancer.ingress` IP
//!   (type `LoadBalancer`; `ipMode: Proxy` ingresses are left to the load balancer).
//!   Only clients within `loadBalancerSourceRanges` may reach the LoadBalancer IPs.
//! - Traffic policies: with `internalTrafficPolicy: Local` the ClusterIPs, and with
//!   `externalTrafficPolicy: Local` the NodePorts, externalIPs and LoadBalancer IPs, use
//!   only endpoints on this node ([`NodeContext::node_name`]), with the KEP-1669 fallback
//!   applied per locality (local ready ones, else local serving-terminating ones). When a
//!   policy leaves a frontend without endpoints while the Service has some elsewhere, its
//!   traffic is dropped; a Service without any usable endpoint is rejected.
//! - Beyond kube-proxy: the annotation `lb.dev/backend-selection: maglev` gives a Service's
//!   NodePorts, externalIPs and LoadBalancer IPs Maglev consistent hashing, so that every
//!   node picks the same backend for a client flow (`random`, the default, picks any).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use k8s_openapi::api::core::v1::Endpoints;
use lb_common::proto;
use serde_json::json;

use crate::services::{CompactService, CompactServiceSpec};
use crate::slices::CompactSlice;

/// Label that hands a Service to another proxy.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label the endpoint controller puts on slices of headless Services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label naming the Service an EndpointSlice belongs to.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when not given.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// Largest affinity timeout the API accepts (one day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;
/// Service annotation that chooses how new flows pick a backend: `random` (the default)
/// or `maglev`.
pub const ANNOTATION_BACKEND_SELECTION: &str = "lb.dev/backend-selection";

/// Names an object in messages: `Service default/web`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// `Service`, `EndpointSlice`, `Endpoints`, ...
    pub kind: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectRef {
    /// A reference to `kind namespace/name`.
    pub fn new(kind: &str, namespace: &str, name: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// Something wrong with an object: reported, never fatal to other objects.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// The object at fault.
    pub object: ObjectRef,
    /// What is wrong, in words an operator can act on.
    pub reason: String,
}

impl Problem {
    /// A problem with `object`.
    pub fn new(object: ObjectRef, reason: impl Into<String>) -> Self {
        Self {
            object,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

/// Namespace and name, the key of every object map.
pub type Key = (String, String);

/// The lowest and highest NodePort the apiserver hands out by default
/// (`--service-node-port-range`).
pub const DEFAULT_NODEPORT_RANGE: (u16, u16) = (30_000, 32_767);

/// What the desired state depends on besides the objects: where the agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeContext {
    /// This node's name, as endpoints' `nodeName` gives it: endpoints with this name are
    /// local for the `Local` traffic policies.
    pub node_name: String,
    /// The node's addresses that answer NodePorts (`--nodeport-addresses` applied).
    pub nodeport_addrs: BTreeSet<Ipv4Addr>,
    /// NodePorts outside this inclusive range are reported and not programmed.
    pub nodeport_range: (u16, u16),
    /// `--external-ip-cidrs`: when set, only `externalIPs` within these prefixes are
    /// translated, and the others are reported (the guard against CVE-2020-8554, where
    /// anyone allowed to create a Service could capture traffic to any address by naming
    /// it as an externalIP). `None`: every externalIP, as kube-proxy does.
    pub external_ip_cidrs: Option<Vec<Cidr>>,
}

impl Default for NodeContext {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            nodeport_addrs: BTreeSet::new(),
            nodeport_range: DEFAULT_NODEPORT_RANGE,
            external_ip_cidrs: None,
        }
    }
}

/// A flag's list of IPv4 prefixes: `--external-ip-cidrs` (the prefixes within which
/// externalIPs are admitted), `--cluster-cidr` (the pods' addresses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrList(pub Vec<Cidr>);

impl CidrList {
    /// Parses the flag: comma-separated IPv4 CIDRs; IPv6 ones are accepted and match
    /// nothing, as this datapath is IPv4 only. Empty: an empty list.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut cidrs = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match parse_cidr(item) {
                Some(ParsedCidr::V4(c)) => cidrs.push(c),
                Some(ParsedCidr::V6) => {}
                None => return Err(format!("{item:?} is not a CIDR (ADDR/LEN)")),
            }
        }
        Ok(Self(cidrs))
    }
}

/// An IPv4 prefix (`10.0.0.0/8`), host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    /// The network address.
    pub addr: Ipv4Addr,
    /// The prefix length, 0..=32.
    pub len: u8,
}

impl Cidr {
    /// Whether `ip` is within the prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.addr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A parsed `ADDR/LEN`: IPv4 (host bits cleared, as Kubernetes' own parser does) or IPv6
/// (only recognised, to be skipped like kube-proxy skips the other family).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParsedCidr {
    /// An IPv4 prefix.
    V4(Cidr),
    /// An IPv6 prefix.
    V6,
}

/// Parses `ADDR/LEN` (surrounding blanks allowed).
pub fn parse_cidr(text: &str) -> Option<ParsedCidr> {
    let (addr, len) = text.trim().split_once('/')?;
    let len: u8 = len.parse().ok()?;
    match addr.parse::<IpAddr>().ok()? {
        IpAddr::V4(a) if len <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            Some(ParsedCidr::V4(Cidr {
                addr: Ipv4Addr::from(u32::from(a) & mask),
                len,
            }))
        }
        IpAddr::V6(_) if len <= 128 => Some(ParsedCidr::V6),
        _ => None,
    }
}

/// `--nodeport-addresses`: which of the node's addresses answer NodePorts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NodePortAddresses {
    /// Every address of the node except loopback ones (the default).
    #[default]
    All,
    /// The node's primary address: the first address of the device of the default route.
    Primary,
    /// The addresses within any of these prefixes.
    Within(Vec<Cidr>),
}

impl NodePortAddresses {
    /// Parses the flag: `primary`, or comma-separated IPv4 CIDRs (IPv6 ones are accepted
    /// and match nothing, as this datapath is IPv4 only). Empty means all.
    pub fn parse(text: &str) -> Result<Self, String> {
        let items: Vec<&str> = text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if items.is_empty() {
            return Ok(Self::All);
        }
        if items == ["primary"] {
            return Ok(Self::Primary);
        }
        let mut cidrs = Vec::new();
        for item in items {
            match parse_cidr(item) {
                Some(ParsedCidr::V4(c)) => cidrs.push(c),
                Some(ParsedCidr::V6) => {}
                None if item == "primary" => {
                    return Err("`primary` cannot be combined with CIDRs".to_owned());
                }
                None => return Err(format!("{item:?} is not a CIDR (ADDR/LEN) nor `primary`")),
            }
        }
        Ok(Self::Within(cidrs))
    }

    /// The addresses, among the node's `addrs`, that answer NodePorts; `primary` is the
    /// node's primary address, if it has one.
    pub fn select(&self, addrs: &[Ipv4Addr], primary: Option<Ipv4Addr>) -> BTreeSet<Ipv4Addr> {
        match self {
            Self::All => addrs
                .iter()
                .filter(|a| !a.is_loopback() && !a.is_unspecified())
                .copied()
                .collect(),
            Self::Primary => primary.into_iter().collect(),
            Self::Within(cidrs) => addrs
                .iter()
                .filter(|a| cidrs.iter().any(|c| c.contains(**a)))
                .copied()
                .collect(),
        }
    }
}

/// All objects a source currently holds.
///
/// The objects are shared (`Arc`): a source, the sync loop and a snapshot of it hold the
/// same allocation, so keeping a copy costs a pointer per object, and an object that did
/// not change is recognised by its address before any field is compared.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Objects {
    /// Services by (namespace, name).
    pub services: BTreeMap<Key, Arc<CompactService>>,
    /// EndpointSlices by (namespace, name), in the compact form both sources make.
    pub endpoint_slices: BTreeMap<Key, Arc<CompactSlice>>,
    /// v1 Endpoints by (namespace, name) (the Service's name).
    pub endpoints: BTreeMap<Key, Arc<Endpoints>>,
}

/// L4 protocol of a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => proto::TCP,
            Self::Udp => proto::UDP,
        }
    }

    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

/// A Service port on one address: a ClusterIP, a node address (NodePort), an externalIP
/// or a LoadBalancer IP. Whatever its kind, the datapath knows a frontend by this triple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    /// The address.
    pub addr: Ipv4Addr,
    /// The Service port (the nodePort for a NodePort frontend).
    pub port: u16,
    /// The protocol.
    pub proto: Protocol,
    /// Which clients the entry is for.
    pub scope: Scope,
}

impl Frontend {
    /// The frontend (addr, port, proto) as every client sees it.
    pub fn new(addr: Ipv4Addr, port: u16, proto: Protocol) -> Self {
        Self {
            addr,
            port,
            proto,
            scope: Scope::All,
        }
    }

    /// The same frontend at scope `scope`.
    pub fn with_scope(self, scope: Scope) -> Self {
        Self { scope, ..self }
    }
}

/// Which clients a frontend entry is for.
///
/// A NodePort, externalIP or LoadBalancer IP with `externalTrafficPolicy: Local` has two
/// entries, as kube-proxy has two chains for it: the frontend itself, with this node's
/// endpoints, for clients outside the cluster; and an [`Scope::Internal`] twin with every
/// endpoint of the Service, for clients inside it (the node's own sockets, and pods when
/// `--cluster-cidr` tells their addresses). Such clients never need their address kept
/// (they are not the external clients the policy is for), and a pod on a node without
/// endpoints would otherwise lose its own cluster's Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Scope {
    /// Every client (the only scope of most frontends).
    #[default]
    All,
    /// Clients inside the cluster, where the frontend's `All` entry says it has a twin.
    Internal,
}

impl Scope {
    /// The `ServiceKey::scope` value.
    pub fn number(self) -> u8 {
        match self {
            Self::All => lb_common::SCOPE_ALL,
            Self::Internal => lb_common::SCOPE_INTERNAL,
        }
    }

    /// The scope of a `ServiceKey::scope` value.
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::SCOPE_ALL => Some(Self::All),
            lb_common::SCOPE_INTERNAL => Some(Self::Internal),
            _ => None,
        }
    }
}

/// What kind of address a frontend is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    /// A ClusterIP (internal traffic).
    ClusterIp,
    /// A node address with a nodePort.
    NodePort,
    /// An `externalIPs` entry.
    ExternalIp,
    /// A `status.loadBalancer.ingress` IP.
    LoadBalancer,
}

impl FrontendKind {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::ExternalIp => "externalIP",
            Self::LoadBalancer => "LoadBalancer",
        }
    }

    /// Whether the frontend is reached from outside the cluster network, so that
    /// `externalTrafficPolicy` applies to it.
    pub fn is_external(self) -> bool {
        self != Self::ClusterIp
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto.as_str())?;
        match self.scope {
            Scope::All => Ok(()),
            Scope::Internal => f.write_str(" (in-cluster clients)"),
        }
    }
}

/// A pod endpoint: address and target port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    /// Pod IP.
    pub addr: Ipv4Addr,
    /// Target port.
    pub port: u16,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.addr, self.port)
    }
}

/// What one frontend should look like in the maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredService {
    /// The Service that defines this frontend (one allocation shared by all its entries).
    pub owner: Arc<ObjectRef>,
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
    /// Backends that take new connections, sorted.
    pub active: Vec<BackendAddr>,
    /// Known backends that keep their established flows but take no new ones, sorted.
    pub terminating: Vec<BackendAddr>,
    /// `sessionAffinity: ClientIP` timeout, if set.
    pub affinity_timeout_s: Option<u32>,
    /// The kind of address the frontend is on.
    pub kind: FrontendKind,
    /// Only clients within these prefixes may open flows (`loadBalancerSourceRanges`);
    /// `None`: any client. `Some` and empty: no client.
    pub source_ranges: Option<Vec<Cidr>>,
    /// With no active backend, drop rather than reject: a `Local` traffic policy leaves
    /// this frontend without endpoints while the Service has endpoints elsewhere.
    pub drop_when_empty: bool,
    /// Backends (of `active` and `terminating`) that run on another node, reached through
    /// this north-south frontend: their flows get the node's address as source, so that
    /// replies come back through this node. Sorted; empty for ClusterIPs.
    pub snat: Vec<BackendAddr>,
    /// New flows pick their backend by Maglev consistent hashing of the client address
    /// and port, the same on every node ([`ANNOTATION_BACKEND_SELECTION`]); only for
    /// north-south frontends.
    pub maglev: bool,
    /// Clients inside the cluster use this frontend's [`Scope::Internal`] twin instead
    /// (an external frontend with `externalTrafficPolicy: Local`).
    pub internal_twin: bool,
}

/// The desired tables plus everything that was wrong with the input.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    /// Frontends and their backends.
    pub services: BTreeMap<Frontend, DesiredService>,
    /// Problems found, sorted.
    pub problems: Vec<Problem>,
}

impl Desired {
    /// The tables as JSON (`lb-agent --dry-run`).
    pub fn to_json(&self) -> serde_json::Value {
        let services: Vec<_> = self
            .services
            .iter()
            .map(|(fe, svc)| {
                json!({
                    "frontend": fe.to_string(),
                    "service": format!("{}/{}", svc.owner.namespace, svc.owner.name),
                    "port_name": svc.port_name,
                    "backends": svc.active.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "terminating": svc.terminating.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "session_affinity_timeout_s": svc.affinity_timeout_s,
                    "kind": svc.kind.as_str(),
                    "source_ranges": svc.source_ranges.as_ref().map(|r| r.iter().map(ToString::to_string).collect::<Vec<_>>()),
                    "drop_when_empty": svc.drop_when_empty,
                    "snat": svc.snat.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "backend_selection": if svc.maglev { "maglev" } else { "random" },
                    "internal_twin": svc.internal_twin,
                })
            })
            .collect();
        let problems: Vec<_> = self.problems.iter().map(ToString::to_string).collect();
        json!({ "services": services, "problems": problems })
    }
}

/// One endpoint as seen in a slice, with its conditions resolved.
#[derive(Debug, Clone, Copy)]
struct Seen {
    backend: BackendAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    /// On this node (`nodeName` is [`NodeContext::node_name`]).
    local: bool,
}

/// Computes the desired tables from `objects` for the node `ctx` describes.
///
/// This is the reference: [`crate::state::DesiredCache`] keeps the same result up to date
/// one Service at a time, and its tests compare the two.
pub fn desired_state(objects: &Objects, ctx: &NodeContext) -> Desired {
    let mut problems = BTreeSet::new();
    let mut services: BTreeMap<Frontend, DesiredService> = BTreeMap::new();
    let slices_by_service = group_slices(objects);

    // BTreeMap order is (namespace, name): the first claimant of a frontend keeps it.
    for (key, svc) in &objects.services {
        let slices = slices_by_service
            .get(&(key.0.as_str(), key.1.as_str()))
            .map_or(&[][..], Vec::as_slice);
        let claims = service_claims(objects, key, svc, slices, ctx);
        for (fe, entry) in claims.frontends.iter() {
            services.entry(*fe).or_insert_with(|| entry.clone());
        }
        problems.extend(claims.problems_with(|fe| services.get(fe).map(|s| &*s.owner)));
    }
    Desired {
        services,
        problems: problems.into_iter().collect(),
    }
}

/// The frontends one Service claims, with their entries, sorted by frontend. A Service has
/// a handful, so they sit in one vector: a map would allocate a node for eleven entries
/// per Service, the largest part of the cache at 100,000 Services.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FrontendClaims(Vec<(Frontend, Arc<DesiredService>)>);

impl FrontendClaims {
    /// The entry claimed for `fe`.
    pub fn get(&self, fe: &Frontend) -> Option<&DesiredService> {
        self.get_shared(fe).map(|e| &**e)
    }

    /// The entry claimed for `fe`, as the allocation the settled table shares.
    pub fn get_shared(&self, fe: &Frontend) -> Option<&Arc<DesiredService>> {
        let i = self.0.binary_search_by(|(f, _)| f.cmp(fe)).ok()?;
        Some(&self.0[i].1)
    }

    /// Whether `fe` is claimed.
    pub fn contains_key(&self, fe: &Frontend) -> bool {
        self.get(fe).is_some()
    }

    /// The claimed frontends, in order.
    pub fn keys(&self) -> impl Iterator<Item = &Frontend> {
        self.0.iter().map(|(f, _)| f)
    }

    /// The claimed frontends with their entries, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&Frontend, &DesiredService)> {
        self.0.iter().map(|(f, e)| (f, &**e))
    }

    /// How many frontends are claimed.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Claims `fe` with `entry` unless it is claimed already; whether it was new.
    fn insert_new(&mut self, fe: Frontend, entry: DesiredService) -> bool {
        match self.0.binary_search_by(|(f, _)| f.cmp(&fe)) {
            Ok(_) => false,
            Err(i) => {
                self.0.insert(i, (fe, Arc::new(entry)));
                true
            }
        }
    }
}

/// What one Service asks for on its own, before frontend conflicts with other Services
/// are settled: the unit that [`desired_state`] and the incremental cache both compute.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceClaims {
    /// The Service (shared with its entries).
    pub owner: Arc<ObjectRef>,
    /// Each frontend the Service defines, with its first definition.
    pub frontends: FrontendClaims,
    /// Frontends the Service defines more than once.
    pub repeated: BTreeSet<Frontend>,
    /// Problems with the Service itself (frontend conflicts aside).
    pub problems: BTreeSet<Problem>,
}

impl ServiceClaims {
    /// Claims `fe` with `entry`, unless the Service already did (then it is repeated).
    fn claim(&mut self, fe: Frontend, entry: DesiredService) {
        if !self.frontends.insert_new(fe, entry) {
            self.repeated.insert(fe);
        }
    }

    /// The Service's problems once `winner` tells which Service holds each frontend: its
    /// own, plus one per frontend lost to another Service, or repeated while held. A
    /// nodePort is one problem whatever the number of node addresses.
    pub fn problems_with<'o>(
        &self,
        mut winner: impl FnMut(&Frontend) -> Option<&'o ObjectRef>,
    ) -> BTreeSet<Problem> {
        let mut problems = self.problems.clone();
        // A twin shares its frontend's fate: reported once, with the frontend.
        for (fe, entry) in self
            .frontends
            .iter()
            .filter(|(fe, _)| fe.scope == Scope::All)
        {
            let what = match entry.kind {
                FrontendKind::NodePort => format!("nodePort {}/{}", fe.port, fe.proto.as_str()),
                _ => fe.to_string(),
            };
            let reason = match winner(fe) {
                Some(w) if *w != *self.owner => {
                    format!("{what} is already claimed by {w}; this port is ignored")
                }
                _ if self.repeated.contains(fe) => {
                    format!("{what} is defined twice in this Service; the second is ignored")
                }
                _ => continue,
            };
            problems.insert(Problem::new(ObjectRef::clone(&self.owner), reason));
        }
        problems
    }
}

/// What Service `key` claims on the node `ctx` describes, given its EndpointSlices (as
/// [`CompactSlice::service`] assigns them; none: its v1 Endpoints are used).
pub fn service_claims(
    objects: &Objects,
    key: &Key,
    svc: &CompactService,
    slices: &[&CompactSlice],
    ctx: &NodeContext,
) -> ServiceClaims {
    let (ns, name) = (key.0.as_str(), key.1.as_str());
    let owner = ObjectRef::new("Service", ns, name);
    let shared_owner = Arc::new(owner.clone());
    let mut claims = ServiceClaims {
        owner: shared_owner.clone(),
        frontends: FrontendClaims::default(),
        repeated: BTreeSet::new(),
        problems: BTreeSet::new(),
    };
    let problems = &mut claims.problems;
    let Some(spec) = svc.spec.as_ref() else {
        return claims;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return claims;
    }
    if svc.other_proxy {
        return claims;
    }
    let ips = cluster_ips(spec);
    if ips.iter().any(|ip| ip.eq_ignore_ascii_case("None")) || ips.is_empty() {
        return claims;
    }
    let mut addrs = Vec::new();
    let mut v6 = Vec::new();
    for ip in &ips {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => addrs.push(v4),
            Ok(IpAddr::V6(_)) => v6.push(ip.as_str()),
            Err(_) => {
                problems.insert(Problem::new(
                    owner.clone(),
                    format!("clusterIP {ip:?} is not a valid IP address; skipped"),
                ));
            }
        }
    }
    if !v6.is_empty() {
        // One note per Service: a dual-stack Service still works over IPv4.
        problems.insert(Problem::new(
            owner.clone(),
            format!(
                "IPv6 is not supported yet; ClusterIP {} skipped",
                v6.join(", ")
            ),
        ));
    }
    if addrs.is_empty() {
        return claims;
    }
    let (affinity, affinity_problem) = affinity_timeout(spec);
    if let Some(reason) = affinity_problem {
        problems.insert(Problem::new(owner.clone(), reason));
    }
    let (maglev, selection_problem) = backend_selection(svc);
    if let Some(reason) = selection_problem {
        problems.insert(Problem::new(owner.clone(), reason));
    }
    let endpoints = endpoints_of(objects, ns, name, slices, &ctx.node_name);
    let north_south = NorthSouth::of(
        svc,
        spec,
        &owner,
        ctx.external_ip_cidrs.as_deref(),
        problems,
    );
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    // As kube-proxy: the external policy only counts for a Service reachable from
    // outside (a ClusterIP Service has nothing it could apply to).
    let external_local =
        spec.external_traffic_policy.as_deref() == Some("Local") && north_south.reachable;
    let mut claimed: Vec<(Frontend, DesiredService)> = Vec::new();
    for port in spec.ports.iter().flatten() {
        let port_name = port.name.clone().unwrap_or_default();
        let what = if port_name.is_empty() {
            format!("port {}", port.port)
        } else {
            format!("port {:?} ({})", port_name, port.port)
        };
        let proto = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => {
                problems.insert(Problem::new(
                    owner.clone(),
                    format!("{what}: SCTP is not supported yet; skipped"),
                ));
                continue;
            }
            other => {
                problems.insert(Problem::new(
                    owner.clone(),
                    format!("{what}: unknown protocol {other:?}; skipped"),
                ));
                continue;
            }
        };
        let Ok(svc_port) = u16::try_from(port.port) else {
            problems.insert(Problem::new(
                owner.clone(),
                format!("{what}: port out of range"),
            ));
            continue;
        };
        if svc_port == 0 {
            problems.insert(Problem::new(
                owner.clone(),
                format!("{what}: port must not be 0"),
            ));
            continue;
        }
        let eps = categorize(&endpoints, &port_name, proto);
        // kube-proxy's "all locally reachable endpoints": when even those are none, every
        // frontend of the port rejects; otherwise a frontend left empty by its policy drops.
        // A Service reachable from outside always uses the cluster's endpoints: its
        // external frontends' in-cluster twins do, even under two `Local` policies.
        let uses_cluster = !internal_local || north_south.reachable;
        let uses_local = internal_local || external_local;
        let reachable =
            (uses_cluster && !eps.cluster.is_empty()) || (uses_local && !eps.local.is_empty());
        let entry = |kind: FrontendKind| {
            let local = if kind.is_external() {
                external_local
            } else {
                internal_local
            };
            let active = if local { &eps.local } else { &eps.cluster };
            DesiredService {
                owner: shared_owner.clone(),
                port_name: port_name.clone(),
                active: active.iter().copied().collect(),
                terminating: eps.known.difference(active).copied().collect(),
                affinity_timeout_s: affinity,
                kind,
                source_ranges: (kind == FrontendKind::LoadBalancer)
                    .then(|| north_south.source_ranges.clone())
                    .flatten(),
                drop_when_empty: active.is_empty() && reachable,
                snat: if kind.is_external() {
                    eps.remote.iter().copied().collect()
                } else {
                    Vec::new()
                },
                // A ClusterIP is served by the client's own node: consistency between
                // nodes buys nothing there, and each table costs 64 KiB of kernel memory.
                maglev: maglev && kind.is_external(),
                internal_twin: local && kind.is_external(),
            }
        };
        // The in-cluster twin of a `Local` external frontend: every endpoint, as for a
        // `Cluster` policy, minus what only external clients need (source ranges are
        // checked on the frontend itself; pods and the node need no source NAT; Maglev
        // is for flows that any node may receive).
        let twin = |kind: FrontendKind| DesiredService {
            owner: shared_owner.clone(),
            port_name: port_name.clone(),
            active: eps.cluster.iter().copied().collect(),
            terminating: eps.known.difference(&eps.cluster).copied().collect(),
            affinity_timeout_s: affinity,
            kind,
            source_ranges: None,
            drop_when_empty: false,
            snat: Vec::new(),
            maglev: false,
            internal_twin: false,
        };
        let mut wanted: Vec<(Frontend, FrontendKind)> = Vec::new();
        let at = |addr: Ipv4Addr, port: u16| Frontend::new(addr, port, proto);
        wanted.extend(
            addrs
                .iter()
                .map(|a| (at(*a, svc_port), FrontendKind::ClusterIp)),
        );
        // An absent (or 0) nodePort: none allocated, e.g. `allocateLoadBalancerNodePorts:
        // false`.
        if let Some(np) = port.node_port.filter(|p| *p != 0 && north_south.node_ports) {
            let (lo, hi) = ctx.nodeport_range;
            match u16::try_from(np).ok().filter(|p| (lo..=hi).contains(p)) {
                Some(np) => wanted.extend(
                    ctx.nodeport_addrs
                        .iter()
                        .map(|a| (at(*a, np), FrontendKind::NodePort)),
                ),
                None => {
                    problems.insert(Problem::new(
                        owner.clone(),
                        format!(
                            "{what}: nodePort {np} is outside the NodePort range {lo}-{hi}; \
                             no NodePort for this port"
                        ),
                    ));
                }
            }
        }
        wanted.extend(
            north_south
                .external_ips
                .iter()
                .map(|a| (at(*a, svc_port), FrontendKind::ExternalIp)),
        );
        wanted.extend(
            north_south
                .lb_ips
                .iter()
                .map(|a| (at(*a, svc_port), FrontendKind::LoadBalancer)),
        );
        for (fe, kind) in wanted {
            if external_local && kind.is_external() {
                claimed.push((fe.with_scope(Scope::Internal), twin(kind)));
            }
            claimed.push((fe, entry(kind)));
        }
    }
    for (fe, entry) in claimed {
        claims.claim(fe, entry);
    }
    // The cache keeps the claims of every Service: no spare capacity.
    claims.frontends.0.shrink_to_fit();
    claims
}

/// The north-south side of a Service: what it asks for beyond its ClusterIPs.
struct NorthSouth {
    /// Type `NodePort` or `LoadBalancer`: its ports' nodePorts are served.
    node_ports: bool,
    /// Valid IPv4 `externalIPs`.
    external_ips: BTreeSet<Ipv4Addr>,
    /// IPv4 LoadBalancer ingress IPs (type `LoadBalancer`).
    lb_ips: BTreeSet<Ipv4Addr>,
    /// `loadBalancerSourceRanges`, if the Service restricts its LoadBalancer IPs.
    source_ranges: Option<Vec<Cidr>>,
    /// Reachable from outside the cluster network at all.
    reachable: bool,
}

impl NorthSouth {
    fn of(
        svc: &CompactService,
        spec: &CompactServiceSpec,
        owner: &ObjectRef,
        allowed_external: Option<&[Cidr]>,
        problems: &mut BTreeSet<Problem>,
    ) -> Self {
        let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
        let load_balancer = type_ == "LoadBalancer";
        let node_ports = load_balancer || type_ == "NodePort";
        let mut note = |reason: String| {
            problems.insert(Problem::new(owner.clone(), reason));
        };
        let mut external_ips = BTreeSet::new();
        for ip in spec.external_ips.iter().flatten() {
            let ip = ip.trim();
            match ip.parse::<IpAddr>() {
                Ok(IpAddr::V4(v4))
                    if allowed_external.is_some_and(|a| !a.iter().any(|c| c.contains(v4))) =>
                {
                    note(format!(
                        "externalIP {ip} is outside --external-ip-cidrs; skipped"
                    ));
                }
                Ok(IpAddr::V4(v4)) => {
                    external_ips.insert(v4);
                }
                Ok(IpAddr::V6(_)) => {
                    note(format!(
                        "IPv6 is not supported yet; externalIP {ip} skipped"
                    ));
                }
                // kube-proxy skips blank entries silently (the API does not validate them).
                Err(_) if ip.is_empty() => {}
                Err(_) => note(format!(
                    "externalIP {ip:?} is not a valid IP address; skipped"
                )),
            }
        }
        let mut lb_ips = BTreeSet::new();
        if load_balancer {
            for ing in &svc.lb_ingress {
                // `Proxy`: the load balancer delivers to the node with its own address as
                // destination; the node must not take the IP for itself.
                if ing.ip_mode.as_deref() == Some("Proxy") {
                    continue;
                }
                match ing.ip.as_deref().map(|ip| ip.trim().parse::<IpAddr>()) {
                    Some(Ok(IpAddr::V4(v4))) => {
                        lb_ips.insert(v4);
                    }
                    Some(Ok(IpAddr::V6(_))) | None => {}
                    Some(Err(_)) => note(format!(
                        "status.loadBalancer.ingress IP {:?} is not a valid IP address; skipped",
                        ing.ip.as_deref().unwrap_or_default()
                    )),
                }
            }
        }
        let mut source_ranges = None;
        if let Some(ranges) = &spec.load_balancer_source_ranges {
            let (mut v4, mut invalid) = (Vec::new(), Vec::new());
            for r in ranges {
                match parse_cidr(r) {
                    Some(ParsedCidr::V4(c)) => v4.push(c),
                    // The other family restricts the other family's IPs only.
                    Some(ParsedCidr::V6) => {}
                    None if r.trim().is_empty() => {}
                    None => invalid.push(format!("{:?}", r.trim())),
                }
            }
            v4.sort();
            v4.dedup();
            if !invalid.is_empty() {
                // kube-proxy skips invalid entries and keeps the valid ones. With none left
                // it would let everyone in; a list meant to restrict fails closed here.
                let outcome = if v4.is_empty() {
                    "no valid range is left, so its LoadBalancer IPs accept no client"
                } else {
                    "the other ranges apply"
                };
                note(format!(
                    "loadBalancerSourceRanges: {} not a valid CIDR; ignored, and {outcome}",
                    if invalid.len() == 1 {
                        format!("{} is", invalid[0])
                    } else {
                        format!("{} are", invalid.join(", "))
                    }
                ));
            }
            if !v4.is_empty() || !invalid.is_empty() {
                source_ranges = Some(v4);
            }
        }
        let reachable = node_ports || !external_ips.is_empty() || !lb_ips.is_empty();
        Self {
            node_ports,
            external_ips,
            lb_ips,
            source_ranges,
            reachable,
        }
    }
}

/// `spec.clusterIPs`, or `spec.clusterIP` when the list is absent (older objects).
fn cluster_ips(spec: &CompactServiceSpec) -> Vec<String> {
    match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.clone()],
        _ => Vec::new(),
    }
}

/// Whether the Service asks for Maglev backend selection, and a note when its annotation
/// has a value other than `maglev` or `random` (then `random` applies).
fn backend_selection(svc: &CompactService) -> (bool, Option<String>) {
    match svc.backend_selection.as_deref() {
        None | Some("random") => (false, None),
        Some("maglev") => (true, None),
        Some(other) => (
            false,
            Some(format!(
                "annotation {ANNOTATION_BACKEND_SELECTION}: {other:?} is neither \"maglev\" \
                 nor \"random\"; using random"
            )),
        ),
    }
}

/// The `sessionAffinity: ClientIP` timeout, clamped to what the API accepts, and a note
/// when it had to be clamped (a hand-written manifest is not validated by an apiserver).
fn affinity_timeout(spec: &CompactServiceSpec) -> (Option<u32>, Option<String>) {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return (None, None);
    }
    let Some(t) = spec.affinity_timeout_seconds else {
        return (Some(DEFAULT_AFFINITY_TIMEOUT_S), None);
    };
    let clamped = u32::try_from(t)
        .unwrap_or(0)
        .clamp(1, MAX_AFFINITY_TIMEOUT_S);
    let problem = (i64::from(t) != i64::from(clamped)).then(|| {
        format!(
            "sessionAffinityConfig.clientIP.timeoutSeconds {t} is outside \
             1..={MAX_AFFINITY_TIMEOUT_S}; using {clamped}"
        )
    });
    (Some(clamped), problem)
}

/// Slices by the (namespace, name) of the Service they belong to (see
/// [`CompactSlice::service`]).
fn group_slices(objects: &Objects) -> BTreeMap<(&str, &str), Vec<&CompactSlice>> {
    let mut out: BTreeMap<(&str, &str), Vec<&CompactSlice>> = BTreeMap::new();
    for ((ns, _), slice) in &objects.endpoint_slices {
        if let Some(service) = slice.service() {
            out.entry((ns.as_str(), service)).or_default().push(slice);
        }
    }
    out
}

/// Endpoint entries of one Service, per (port name, protocol).
type PortEndpoints = BTreeMap<(String, Protocol), Vec<Seen>>;

fn parse_protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

fn endpoints_of(
    objects: &Objects,
    ns: &str,
    name: &str,
    slices: &[&CompactSlice],
    node_name: &str,
) -> PortEndpoints {
    let is_local = |n: Option<&String>| !node_name.is_empty() && n.is_some_and(|n| n == node_name);
    let mut out = PortEndpoints::new();
    // A Service without slices is read from its v1 Endpoints, as the mirroring
    // controller would have turned them into a slice.
    match (!slices.is_empty()).then_some(slices) {
        Some(slices) => {
            // Compact slices hold IPv4 endpoints only, each its first address with its
            // conditions resolved as kube-proxy resolves them (see `crate::slices`).
            for slice in slices {
                for port in &slice.ports {
                    let Some(proto) = port.protocol.protocol() else {
                        continue;
                    };
                    // kube-proxy ignores a slice port without a usable number.
                    let Ok(number) = u16::try_from(port.port) else {
                        continue;
                    };
                    let entry = out.entry((port.name.to_string(), proto)).or_default();
                    for ep in &slice.endpoints {
                        entry.push(Seen {
                            backend: BackendAddr {
                                addr: ep.addr,
                                port: number,
                            },
                            ready: ep.ready,
                            serving: ep.serving,
                            terminating: ep.terminating,
                            local: ep.is_on(node_name),
                        });
                    }
                }
            }
        }
        None => {
            let Some(eps) = objects.endpoints.get(&(ns.to_owned(), name.to_owned())) else {
                return out;
            };
            for subset in eps.subsets.iter().flatten() {
                for port in subset.ports.iter().flatten() {
                    let Some(proto) = parse_protocol(port.protocol.as_deref()) else {
                        continue;
                    };
                    let Some(number) = u16::try_from(port.port).ok().filter(|n| *n != 0) else {
                        continue;
                    };
                    let entry = out
                        .entry((port.name.clone().unwrap_or_default(), proto))
                        .or_default();
                    for (list, ready) in [
                        (&subset.addresses, true),
                        (&subset.not_ready_addresses, false),
                    ] {
                        for a in list.iter().flatten() {
                            let Ok(addr) = a.ip.parse::<Ipv4Addr>() else {
                                continue;
                            };
                            entry.push(Seen {
                                backend: BackendAddr { addr, port: number },
                                ready,
                                serving: ready,
                                terminating: false,
                                local: is_local(a.node_name.as_ref()),
                            });
                        }
                    }
                }
            }
        }
    }
    out
}

/// The endpoints of one Service port, sorted and de-duplicated, split the way kube-proxy
/// splits them by condition and locality.
struct Categorized {
    /// Endpoints for a `Cluster` policy: the ready ones, else the serving-terminating ones
    /// (KEP-1669).
    cluster: BTreeSet<BackendAddr>,
    /// Endpoints for a `Local` policy: the same rule among the endpoints on this node.
    local: BTreeSet<BackendAddr>,
    /// Every known endpoint (the ones not used by a frontend keep their established flows).
    known: BTreeSet<BackendAddr>,
    /// Known endpoints not on this node.
    remote: BTreeSet<BackendAddr>,
}

/// Categorizes the endpoints of one Service port. An endpoint listed twice (two slices)
/// counts with its best conditions.
fn categorize(endpoints: &PortEndpoints, port_name: &str, proto: Protocol) -> Categorized {
    let Some(seen) = endpoints.get(&(port_name.to_owned(), proto)) else {
        return Categorized {
            cluster: BTreeSet::new(),
            local: BTreeSet::new(),
            known: BTreeSet::new(),
            remote: BTreeSet::new(),
        };
    };
    let mut merged: BTreeMap<BackendAddr, Seen> = BTreeMap::new();
    for s in seen {
        merged
            .entry(s.backend)
            .and_modify(|m| {
                m.ready |= s.ready;
                m.serving |= s.serving;
                m.terminating &= s.terminating;
                m.local |= s.local;
            })
            .or_insert(*s);
    }
    let usable = |local_only: bool| {
        let among = || merged.values().filter(move |s| !local_only || s.local);
        let ready: BTreeSet<BackendAddr> = among().filter(|s| s.ready).map(|s| s.backend).collect();
        if ready.is_empty() {
            among()
                .filter(|s| s.serving && s.terminating)
                .map(|s| s.backend)
                .collect()
        } else {
            ready
        }
    };
    Categorized {
        cluster: usable(false),
        local: usable(true),
        known: merged.keys().copied().collect(),
        remote: merged
            .values()
            .filter(|s| !s.local)
            .map(|s| s.backend)
            .collect(),
    }
}

#[cfg(test)]
pub mod fixtures {
    //! Builders for test objects.
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::{
            core::v1::{
                ClientIPConfig, EndpointAddress, EndpointPort as CorePort, EndpointSubset,
                Endpoints, LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort,
                ServiceSpec, ServiceStatus, SessionAffinityConfig,
            },
            discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
        },
        apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
    };

    use super::*;

    fn meta(ns: &str, name: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: Some(ns.to_owned()),
            name: Some(name.to_owned()),
            ..Default::default()
        }
    }

    /// `Service` builder.
    pub struct Svc(pub Service);

    /// A ClusterIP Service with no ports yet.
    pub fn svc(ns: &str, name: &str) -> Svc {
        Svc(Service {
            metadata: meta(ns, name),
            spec: Some(ServiceSpec::default()),
            ..Default::default()
        })
    }

    impl Svc {
        fn spec(&mut self) -> &mut ServiceSpec {
            self.0.spec.get_or_insert_with(Default::default)
        }
        /// Sets `clusterIP` and `clusterIPs`.
        pub fn cluster_ip(mut self, ip: &str) -> Self {
            self.spec().cluster_ip = Some(ip.to_owned());
            self.spec().cluster_ips = Some(vec![ip.to_owned()]);
            self
        }
        /// Sets `clusterIP` only (objects written before dual-stack).
        pub fn cluster_ip_only(mut self, ip: &str) -> Self {
            self.spec().cluster_ip = Some(ip.to_owned());
            self
        }
        /// Sets `clusterIPs` only.
        pub fn cluster_ips(mut self, ips: &[&str]) -> Self {
            self.spec().cluster_ips = Some(ips.iter().map(|s| (*s).to_owned()).collect());
            self
        }
        /// Adds a port (`target` is a named or numbered targetPort).
        pub fn port(mut self, name: &str, port: i32, proto: &str, target: &str) -> Self {
            let target = match target.parse::<i32>() {
                Ok(n) => IntOrString::Int(n),
                Err(_) => IntOrString::String(target.to_owned()),
            };
            self.spec()
                .ports
                .get_or_insert_with(Vec::new)
                .push(ServicePort {
                    name: (!name.is_empty()).then(|| name.to_owned()),
                    port,
                    protocol: Some(proto.to_owned()),
                    target_port: Some(target),
                    ..Default::default()
                });
            self
        }
        /// Sets the `nodePort` of the port added last.
        pub fn node_port(mut self, node_port: i32) -> Self {
            if let Some(p) = self.spec().ports.as_mut().and_then(|p| p.last_mut()) {
                p.node_port = Some(node_port);
            }
            self
        }
        /// Sets `spec.externalIPs`.
        pub fn external_ips(mut self, ips: &[&str]) -> Self {
            self.spec().external_ips = Some(ips.iter().map(|s| (*s).to_owned()).collect());
            self
        }
        /// Adds a `status.loadBalancer.ingress` entry (`ip_mode`: `None` for absent).
        pub fn lb_ingress(mut self, ip: &str, ip_mode: Option<&str>) -> Self {
            self.0
                .status
                .get_or_insert_with(ServiceStatus::default)
                .load_balancer
                .get_or_insert_with(LoadBalancerStatus::default)
                .ingress
                .get_or_insert_with(Vec::new)
                .push(LoadBalancerIngress {
                    ip: Some(ip.to_owned()),
                    ip_mode: ip_mode.map(str::to_owned),
                    ..Default::default()
                });
            self
        }
        /// Sets `spec.loadBalancerSourceRanges`.
        pub fn source_ranges(mut self, ranges: &[&str]) -> Self {
            self.spec().load_balancer_source_ranges =
                Some(ranges.iter().map(|s| (*s).to_owned()).collect());
            self
        }
        /// Sets `spec.externalTrafficPolicy`.
        pub fn etp(mut self, policy: &str) -> Self {
            self.spec().external_traffic_policy = Some(policy.to_owned());
            self
        }
        /// Sets `spec.internalTrafficPolicy`.
        pub fn itp(mut self, policy: &str) -> Self {
            self.spec().internal_traffic_policy = Some(policy.to_owned());
            self
        }
        /// Sets `spec.type`.
        pub fn type_(mut self, t: &str) -> Self {
            self.spec().type_ = Some(t.to_owned());
            self
        }
        /// Adds a label.
        pub fn label(mut self, k: &str, v: &str) -> Self {
            self.0
                .metadata
                .labels
                .get_or_insert_with(BTreeMap::new)
                .insert(k.to_owned(), v.to_owned());
            self
        }
        /// Annotation `k: v`.
        pub fn annotation(mut self, k: &str, v: &str) -> Self {
            self.0
                .metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(k.to_owned(), v.to_owned());
            self
        }
        /// `sessionAffinity: ClientIP` with an optional timeout.
        pub fn affinity(mut self, timeout: Option<i32>) -> Self {
            self.spec().session_affinity = Some("ClientIP".to_owned());
            self.spec().session_affinity_config = timeout.map(|t| SessionAffinityConfig {
                client_ip: Some(ClientIPConfig {
                    timeout_seconds: Some(t),
                }),
            });
            self
        }
    }

    /// `EndpointSlice` builder.
    pub struct Slice(pub EndpointSlice);

    /// An IPv4 slice of Service `service`.
    pub fn slice(ns: &str, name: &str, service: &str) -> Slice {
        let mut m = meta(ns, name);
        m.labels = Some(BTreeMap::from([(
            LABEL_SERVICE_NAME.to_owned(),
            service.to_owned(),
        )]));
        Slice(EndpointSlice {
            metadata: m,
            address_type: "IPv4".to_owned(),
            endpoints: Vec::new(),
            ports: Some(Vec::new()),
        })
    }

    impl Slice {
        /// Adds an endpoint with explicit conditions (`None` = absent).
        pub fn endpoint_with(
            mut self,
            ip: &str,
            ready: Option<bool>,
            serving: Option<bool>,
            terminating: Option<bool>,
        ) -> Self {
            self.0.endpoints.push(Endpoint {
                addresses: vec![ip.to_owned()],
                conditions: Some(EndpointConditions {
                    ready,
                    serving,
                    terminating,
                }),
                ..Default::default()
            });
            self
        }
        /// Sets the `nodeName` of the endpoint added last.
        pub fn on(mut self, node: &str) -> Self {
            if let Some(ep) = self.0.endpoints.last_mut() {
                ep.node_name = Some(node.to_owned());
            }
            self
        }
        /// Adds a ready endpoint.
        pub fn ready(self, ip: &str) -> Self {
            self.endpoint_with(ip, Some(true), Some(true), Some(false))
        }
        /// Adds a port.
        pub fn port(mut self, name: &str, port: i32, proto: &str) -> Self {
            self.0
                .ports
                .get_or_insert_with(Vec::new)
                .push(EndpointPort {
                    name: (!name.is_empty()).then(|| name.to_owned()),
                    port: Some(port),
                    protocol: Some(proto.to_owned()),
                    app_protocol: None,
                });
            self
        }
        /// Adds a port with every field as given (`None`: absent).
        pub fn raw_port(
            mut self,
            name: Option<&str>,
            port: Option<i32>,
            proto: Option<&str>,
        ) -> Self {
            self.0
                .ports
                .get_or_insert_with(Vec::new)
                .push(EndpointPort {
                    name: name.map(str::to_owned),
                    port,
                    protocol: proto.map(str::to_owned),
                    app_protocol: None,
                });
            self
        }
        /// Sets the address type.
        pub fn address_type(mut self, t: &str) -> Self {
            self.0.address_type = t.to_owned();
            self
        }
        /// Adds a label.
        pub fn label(mut self, k: &str, v: &str) -> Self {
            self.0
                .metadata
                .labels
                .get_or_insert_with(BTreeMap::new)
                .insert(k.to_owned(), v.to_owned());
            self
        }
    }

    /// A v1 Endpoints object with one subset.
    pub fn endpoints(
        ns: &str,
        name: &str,
        ready: &[&str],
        not_ready: &[&str],
        ports: &[(&str, i32, &str)],
    ) -> Endpoints {
        let addrs = |ips: &[&str]| {
            Some(
                ips.iter()
                    .map(|ip| EndpointAddress {
                        ip: (*ip).to_owned(),
                        ..Default::default()
                    })
                    .collect(),
            )
        };
        Endpoints {
            metadata: meta(ns, name),
            subsets: Some(vec![EndpointSubset {
                addresses: addrs(ready),
                not_ready_addresses: addrs(not_ready),
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, p, pr)| CorePort {
                            name: (!n.is_empty()).then(|| (*n).to_owned()),
                            port: *p,
                            protocol: Some((*pr).to_owned()),
                            app_protocol: None,
                        })
                        .collect(),
                ),
            }]),
        }
    }

    /// Collects objects.
    #[derive(Default)]
    pub struct World(pub Objects);

    impl World {
        /// Adds a Service.
        pub fn svc(mut self, s: Svc) -> Self {
            let k = key(&s.0.metadata);
            self.0
                .services
                .insert(k, Arc::new(CompactService::from(&s.0)));
            self
        }
        /// Adds a slice.
        pub fn slice(mut self, s: Slice) -> Self {
            let k = key(&s.0.metadata);
            self.0
                .endpoint_slices
                .insert(k, Arc::new(CompactSlice::from(&s.0)));
            self
        }
        /// Adds an Endpoints object.
        pub fn endpoints(mut self, e: Endpoints) -> Self {
            let k = key(&e.metadata);
            self.0.endpoints.insert(k, e.into());
            self
        }
    }

    fn key(m: &ObjectMeta) -> Key {
        (
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{fixtures::*, *};

    fn fe(ip: &str, port: u16, proto: Protocol) -> Frontend {
        Frontend::new(ip.parse().unwrap(), port, proto)
    }

    fn b(ip: &str, port: u16) -> BackendAddr {
        BackendAddr {
            addr: ip.parse().unwrap(),
            port,
        }
    }

    fn web() -> World {
        World::default()
            .svc(
                svc("default", "web")
                    .cluster_ip("10.96.0.10")
                    .port("http", 80, "TCP", "8080"),
            )
            .slice(
                slice("default", "web-1", "web")
                    .ready("10.0.0.1")
                    .ready("10.0.0.2")
                    .port("http", 8080, "TCP"),
            )
    }

    #[test]
    fn clusterip_service_with_ready_endpoints() {
        let d = desired_state(&web().0, &NodeContext::default());
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        let s = &d.services[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(s.active, vec![b("10.0.0.1", 8080), b("10.0.0.2", 8080)]);
        assert!(s.terminating.is_empty());
        assert_eq!(s.affinity_timeout_s, None);
        assert_eq!(*s.owner, ObjectRef::new("Service", "default", "web"));
    }

    #[test]
    fn skipped_services() {
        let w = World::default()
            .svc(
                svc("default", "headless")
                    .cluster_ip("None")
                    .port("", 80, "TCP", "80"),
            )
            .svc(
                svc("default", "ext")
                    .type_("ExternalName")
                    .port("", 80, "TCP", "80"),
            )
            .svc(
                svc("default", "other")
                    .cluster_ip("10.96.0.11")
                    .label(LABEL_SERVICE_PROXY_NAME, "someone-else")
                    .port("", 80, "TCP", "80"),
            )
            .svc(svc("default", "noip").port("", 80, "TCP", "80"));
        let d = desired_state(&w.0, &NodeContext::default());
        assert!(d.services.is_empty());
        assert!(d.problems.is_empty());
    }

    #[test]
    fn named_target_port_resolves_through_slice_port_names() {
        let w = World::default()
            .svc(
                svc("default", "multi")
                    .cluster_ip("10.96.0.20")
                    .port("http", 80, "TCP", "web")
                    .port("metrics", 9100, "TCP", "9100"),
            )
            .slice(
                slice("default", "multi-a", "multi")
                    .ready("10.0.0.1")
                    .port("http", 8080, "TCP")
                    .port("metrics", 9100, "TCP"),
            );
        let d = desired_state(&w.0, &NodeContext::default());
        assert_eq!(
            d.services[&fe("10.96.0.20", 80, Protocol::Tcp)].active,
            vec![b("10.0.0.1", 8080)]
        );
        assert_eq!(
            d.services[&fe("10.96.0.20", 9100, Protocol::Tcp)].active,
            vec![b("10.0.0.1", 9100)]
        );
    }

    #[test]
    fn slices_merge_and_deduplicate() {
        let w = web().slice(
            slice("default", "web-2", "web")
                .ready("10.0.0.2")
                .ready("10.0.0.3")
                .port("http", 8080, "TCP"),
        );
        let d = desired_state(&w.0, &NodeContext::default());
        assert_eq!(
            d.services[&fe("10.96.0.10", 80, Protocol::Tcp)].active,
            vec![
                b("10.0.0.1", 8080),
                b("10.0.0.2", 8080),
                b("10.0.0.3", 8080)
            ]
        );
    }

    #[test]
    fn slices_of_other_services_namespaces_and_filtered_labels_are_ignored() {
        let w = web()
            .slice(
                slice("other", "web-x", "web")
                    .ready("10.9.0.1")
                    .port("http", 8080, "TCP"),
            )
            .slice(
                slice("default", "api-1", "api")
                    .ready("10.9.0.2")
                    .port("http", 8080, "TCP"),
            )
            .slice(
                slice("default", "web-h", "web")
                    .label(LABEL_HEADLESS, "")
                    .ready("10.9.0.3")
                    .port("http", 8080, "TCP"),
            )
            .slice(
                slice("default", "web-v6", "web")
                    .address_type("IPv6")
                    .ready("fd00::1")
                    .port("http", 8080, "TCP"),
            );
        let d = desired_state(&w.0, &NodeContext::default());
        assert_eq!(
            d.services[&fe("10.96.0.10", 80, Protocol::Tcp)]
                .active
                .len(),
            2
        );
    }

    #[test]
    fn conditions_follow_kube_proxy() {
        let w = World::default()
            .svc(
                svc("default", "web")
                    .cluster_ip("10.96.0.10")
                    .port("", 80, "TCP", "80"),
            )
            .slice(
                slice("default", "web-1", "web")
                    .endpoint_with("10.0.0.1", None, None, None) // absent: ready
                    .endpoint_with("10.0.0.2", Some(false), Some(true), Some(true)) // serving-terminating
                    .endpoint_with("10.0.0.3", Some(false), Some(false), Some(false)) // not ready
                    .port("", 80, "TCP"),
            );
        let d = desired_state(&w.0, &NodeContext::default());
        let s = &d.services[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(s.active, vec![b("10.0.0.1", 80)]);
        assert_eq!(s.terminating, vec![b("10.0.0.2", 80), b("10.0.0.3", 80)]);
    }

    #[test]
    fn serving_terminating_endpoints_serve_when_none_is_ready() {
        let w = World::default()
            .svc(
                svc("default", "web")
                    .cluster_ip("10.96.0.10")
                    .port("", 80, "TCP", "80"),
            )
            .slice(
                slice("default", "web-1", "web")
                    .endpoint_with("10.0.0.2", Some(false), Some(true), Some(true))
                    .endpoint_with("10.0.0.3", Some(false), Some(false), Some(true))
                    .port("", 80, "TCP"),
            );
        let d = desired_state(&w.0, &NodeContext::default());
        let s = &d.services[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(s.active, vec![b("10.0.0.2", 80)]);
        assert_eq!(s.terminating, vec![b("10.0.0.3", 80)]);
    }

    #[test]
    fn no_endpoints_gives_an_empty_frontend() {
        let w = World::default().svc(
            svc("default", "web")
                .cluster_ip("10.96.0.10")
                .port("", 80, "TCP", "80"),
        );
        let d = desired_state(&w.0, &NodeContext::default());
        assert!(
            d.services[&fe("10.96.0.10", 80, Protocol::Tcp)]
                .active
                .is_empty()
        );
    }

    #[test]
    fn selectorless_service_uses_endpoints_unless_a_slice_exists() {
        let w = World::default()
            .svc(
                svc("default", "ext")
                    .cluster_ip("10.96.0.30")
                    .port("db", 5432, "TCP", "5432"),
            )
            .endpoints(endpoints(
                "default",
                "ext",
                &["192.168.1.10"],
                &["192.168.1.11"],
                &[("db", 5432, "TCP")],
            ));
        let d = desired_state(&w.0, &NodeContext::default());
        let s = &d.services[&fe("10.96.0.30", 5432, Protocol::Tcp)];
        assert_eq!(s.active, vec![b("192.168.1.10", 5432)]);
        assert_eq!(s.terminating, vec![b("192.168.1.11", 5432)]);

        let w = w.slice(
            slice("default", "ext-1", "ext")
                .ready("192.168.1.20")
                .port("db", 5432, "TCP"),
        );
        let d = desired_state(&w.0, &NodeContext::default());
        assert_eq!(
            d.services[&fe("10.96.0.30", 5432, Protocol::Tcp)].active,
            vec![b("192.168.1.20", 5432)]
        );
    }

    #[test]
    fn udp_and_protocol_matching() {
        let w = World::default()
            .svc(
                svc("kube-system", "dns")
                    .cluster_ip("10.96.0.53")
                    .port("dns", 53, "UDP", "53")
                    .port("dns-tcp", 53, "TCP", "53"),
            )
            .slice(
                slice("kube-system", "dns-1", "dns")
                    .ready("10.0.0.5")
                    .port("dns", 53, "UDP")
                    .port("dns-tcp", 53, "TCP"),
            );
        let d = desired_state(&w.0, &NodeContext::default());
        assert_eq!(d.services.len(), 2);
        assert_eq!(
            d.services[&fe("10.96.0.53", 53, Protocol::Udp)].active,
            vec![b("10.0.0.5", 53)]
        );
    }

    #[test]
    fn bad_ports_and_protocols_are_reported_and_others_kept() {
        let w = World::default().svc(
            svc("default", "bad")
                .cluster_ip("10.96.0.40")
                .port("s", 80, "SCTP", "80")
                .port("x", 81, "QUIC", "81")
                .port("zero", 0, "TCP", "80")
                .port("big", 70000, "TCP", "80")
                .port("ok", 82, "TCP", "82"),
        );
        let d = desired_state(&w.0, &NodeContext::default());
        assert_eq!(d.services.len(), 1);
        assert_eq!(d.problems.len(), 4, "{:#?}", d.problems);
        let text: Vec<String> = d.problems.iter().map(ToString::to_string).collect();
        assert!(
            text.iter().all(|t| t.starts_with("Service default/bad: ")),
            "{text:?}"
        );
        assert!(text.iter().any(|t| t.contains("SCTP is not supported")));
        assert!(text.iter().any(|t| t.contains("unknown protocol \"QUIC\"")));
    }

    #[test]
    fn invalid_and_ipv6_cluster_ips_are_reported() {
        let w = World::default()
            .svc(
                svc("default", "v6")
                    .cluster_ips(&["fd00::10"])
                    .port("", 80, "TCP", "80"),
            )
            .svc(
                svc("default", "junk")
                    .cluster_ip("10.96.0.999")
                    .port("", 80, "TCP", "80"),
            )
            .svc(
                svc("default", "dual")
                    .cluster_ips(&["10.96.0.50", "fd00::50"])
                    .port("", 80, "TCP", "80"),
            );
        let d = desired_state(&w.0, &NodeContext::default());
        assert_eq!(
            d.services.keys().copied().collect::<Vec<_>>(),
            vec![fe("10.96.0.50", 80, Protocol::Tcp)]
        );
        assert_eq!(d.problems.len(), 3, "{:#?}", d.problems);
    }

    #[test]
    fn conflicting_frontends_first_service_wins() {
        let w = World::default()
            .svc(
                svc("default", "a")
                    .cluster_ip("10.96.0.10")
                    .port("", 80, "TCP", "80"),
            )
            .svc(
                svc("default", "b")
                    .cluster_ip("10.96.0.10")
                    .port("", 80, "TCP", "80"),
            )
            .svc(
                svc("default", "c")
                    .cluster_ip("10.96.0.10")
                    .port("", 80, "UDP", "80"),
            );
        let d = desired_state(&w.0, &NodeContext::default());
        assert_eq!(
            d.services[&fe("10.96.0.10", 80, Protocol::Tcp)].owner.name,
            "a"
        );
        assert_eq!(
            d.services[&fe("10.96.0.10", 80, Protocol::Udp)].owner.name,
            "c"
        );
        assert_eq!(d.problems.len(), 1);
        assert_eq!(
            d.problems[0].to_string(),
            "Service default/b: 10.96.0.10:80/TCP is already claimed by Service default/a; this port is ignored"
        );
    }

    #[test]
    fn slices_labelled_for_another_proxy_are_ignored() {
        let w = web().slice(
            slice("default", "web-p", "web")
                .label(LABEL_SERVICE_PROXY_NAME, "other")
                .ready("10.9.0.1")
                .port("http", 8080, "TCP"),
        );
        let d = desired_state(&w.0, &NodeContext::default());
        assert_eq!(
            d.services[&fe("10.96.0.10", 80, Protocol::Tcp)].active,
            vec![b("10.0.0.1", 8080), b("10.0.0.2", 8080)]
        );
    }

    #[test]
    fn unnamed_ports_match_absent_or_empty_names_and_protocol_must_match() {
        let w = World::default()
            .svc(
                svc("default", "web")
                    .cluster_ip("10.96.0.10")
                    .port("", 80, "TCP", "8080"),
            )
            .slice(slice("default", "web-1", "web").ready("10.0.0.1").raw_port(
                Some(""),
                Some(8080),
                None,
            ))
            .slice(slice("default", "web-2", "web").ready("10.0.0.2").raw_port(
                None,
                Some(8080),
                Some("TCP"),
            ))
            .slice(
                slice("default", "web-3", "web")
                    .ready("10.0.0.3")
                    .raw_port(None, Some(8080), Some("UDP"))
                    .raw_port(Some("http"), Some(8080), Some("TCP"))
                    .raw_port(None, Some(0), None)
                    .raw_port(None, None, None),
            );
        let d = desired_state(&w.0, &NodeContext::default());
        assert_eq!(
            d.services[&fe("10.96.0.10", 80, Protocol::Tcp)].active,
            vec![b("10.0.0.1", 8080), b("10.0.0.2", 8080)]
        );
    }

    #[test]
    fn port_name_mismatch_leaves_the_frontend_without_endpoints() {
        let w = World::default()
            .svc(
                svc("default", "web")
                    .cluster_ip("10.96.0.10")
                    .port("http", 80, "TCP", "http"),
            )
            .slice(
                slice("default", "web-1", "web")
                    .ready("10.0.0.1")
                    .port("web", 8080, "TCP"),
            );
        let d = desired_state(&w.0, &NodeContext::default());
        let s = &d.services[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert!(s.active.is_empty() && s.terminating.is_empty());
        assert_eq!(s.port_name, "http");
    }

    #[test]
    fn an_endpoint_in_two_slices_counts_with_its_best_conditions() {
        let w = World::default()
            .svc(
                svc("default", "web")
                    .cluster_ip("10.96.0.10")
                    .port("", 80, "TCP", "80"),
            )
            .slice(
                slice("default", "web-1", "web")
                    .endpoint_with("10.0.0.1", Some(false), Some(false), Some(true))
                    .port("", 80, "TCP"),
            )
            .slice(
                slice("default", "web-2", "web")
                    .ready("10.0.0.1")
                    .port("", 80, "TCP"),
            );
        let d = desired_state(&w.0, &NodeContext::default());
        let s = &d.services[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(s.active, vec![b("10.0.0.1", 80)]);
        assert!(s.terminating.is_empty());
    }

    #[test]
    fn absent_serving_counts_as_true_like_kube_proxy() {
        let w = World::default()
            .svc(
                svc("default", "web")
                    .cluster_ip("10.96.0.10")
                    .port("", 80, "TCP", "80"),
            )
            .slice(
                slice("default", "web-1", "web")
                    .endpoint_with("10.0.0.1", Some(false), None, Some(true))
                    .endpoint_with("10.0.0.2", Some(false), None, None)
                    .port("", 80, "TCP"),
            );
        let d = desired_state(&w.0, &NodeContext::default());
        let s = &d.services[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(
            s.active,
            vec![b("10.0.0.1", 80)],
            "serving-terminating fallback"
        );
        assert_eq!(s.terminating, vec![b("10.0.0.2", 80)]);
    }

    #[test]
    fn endpoints_of_other_namespaces_are_not_used() {
        let w = World::default()
            .svc(
                svc("default", "ext")
                    .cluster_ip("10.96.0.30")
                    .port("", 5432, "TCP", "5432"),
            )
            .endpoints(endpoints(
                "other",
                "ext",
                &["192.168.1.10"],
                &[],
                &[("", 5432, "TCP")],
            ));
        let d = desired_state(&w.0, &NodeContext::default());
        assert!(
            d.services[&fe("10.96.0.30", 5432, Protocol::Tcp)]
                .active
                .is_empty()
        );
    }

    #[test]
    fn cluster_ip_is_used_when_cluster_ips_is_absent() {
        let w = World::default().svc(
            svc("default", "old")
                .cluster_ip_only("10.96.0.60")
                .port("", 80, "UDP", "80"),
        );
        let d = desired_state(&w.0, &NodeContext::default());
        assert!(
            d.services
                .contains_key(&fe("10.96.0.60", 80, Protocol::Udp))
        );
        assert!(d.problems.is_empty());
    }

    #[test]
    fn ipv6_is_reported_once_per_service() {
        let w = World::default().svc(
            svc("default", "v6")
                .cluster_ips(&["fd00::10", "fd00::11"])
                .port("a", 80, "TCP", "80")
                .port("b", 81, "TCP", "81"),
        );
        let d = desired_state(&w.0, &NodeContext::default());
        assert!(d.services.is_empty());
        assert_eq!(
            d.problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["Service default/v6: IPv6 is not supported yet; ClusterIP fd00::10, fd00::11 skipped"]
        );
    }

    #[test]
    fn a_port_repeated_within_a_service_keeps_the_first() {
        let w = World::default()
            .svc(
                svc("default", "dup")
                    .cluster_ip("10.96.0.10")
                    .port("a", 80, "TCP", "8080")
                    .port("b", 80, "TCP", "9090"),
            )
            .slice(
                slice("default", "dup-1", "dup")
                    .ready("10.0.0.1")
                    .port("a", 8080, "TCP")
                    .port("b", 9090, "TCP"),
            );
        let d = desired_state(&w.0, &NodeContext::default());
        let s = &d.services[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(
            (s.port_name.as_str(), s.active.clone()),
            ("a", vec![b("10.0.0.1", 8080)])
        );
        assert_eq!(
            d.problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            [
                "Service default/dup: 10.96.0.10:80/TCP is defined twice in this Service; the second is ignored"
            ]
        );
    }

    #[test]
    fn session_affinity_timeouts() {
        let base = |t| {
            World::default().svc(
                svc("default", "s")
                    .cluster_ip("10.96.0.10")
                    .port("", 80, "TCP", "80")
                    .affinity(t),
            )
        };
        let timeout = |t| {
            let d = desired_state(&base(t).0, &NodeContext::default());
            let problems: Vec<String> = d.problems.iter().map(ToString::to_string).collect();
            (
                d.services.values().next().unwrap().affinity_timeout_s,
                problems,
            )
        };
        assert_eq!(timeout(None), (Some(10_800), vec![]));
        assert_eq!(timeout(Some(60)), (Some(60), vec![]));
        assert_eq!(timeout(Some(86_400)), (Some(86_400), vec![]));
        let (t, p) = timeout(Some(0));
        assert_eq!(t, Some(1));
        assert_eq!(
            p,
            [
                "Service default/s: sessionAffinityConfig.clientIP.timeoutSeconds 0 is outside 1..=86400; using 1"
            ]
        );
        assert_eq!(timeout(Some(100_000)).0, Some(86_400));
        assert_eq!(timeout(Some(-5)).0, Some(1));

        // Without `sessionAffinity: ClientIP`, no affinity whatever the config says.
        let mut w = base(Some(60));
        for s in w.0.services.values_mut() {
            Arc::make_mut(s).spec.as_mut().unwrap().session_affinity = Some("None".into());
        }
        assert_eq!(
            desired_state(&w.0, &NodeContext::default())
                .services
                .values()
                .next()
                .unwrap()
                .affinity_timeout_s,
            None
        );
    }

    const NODE: &str = "node-a";

    /// A node named [`NODE`] whose NodePorts answer on two addresses.
    fn node() -> NodeContext {
        NodeContext {
            node_name: NODE.to_owned(),
            nodeport_addrs: BTreeSet::from([
                "192.168.0.10".parse().unwrap(),
                "10.200.0.1".parse().unwrap(),
            ]),
            ..NodeContext::default()
        }
    }

    fn kinds(d: &Desired) -> Vec<(String, FrontendKind)> {
        d.services
            .iter()
            .map(|(fe, s)| (fe.to_string(), s.kind))
            .collect()
    }

    fn texts(d: &Desired) -> Vec<String> {
        d.problems.iter().map(ToString::to_string).collect()
    }

    /// `web` as a NodePort Service (nodePort 30080) with one endpoint here, one elsewhere.
    fn web_np(extra: impl FnOnce(Svc) -> Svc) -> World {
        World::default()
            .svc(extra(
                svc("default", "web")
                    .type_("NodePort")
                    .cluster_ip("10.96.0.10")
                    .port("http", 80, "TCP", "8080")
                    .node_port(30080),
            ))
            .slice(
                slice("default", "web-1", "web")
                    .ready("10.0.0.1")
                    .on(NODE)
                    .ready("10.0.0.2")
                    .on("node-b")
                    .port("http", 8080, "TCP"),
            )
    }

    #[test]
    fn maglev_annotation_applies_to_north_south_frontends_and_a_bad_value_is_reported() {
        let selection = |value: Option<&str>| {
            let world = web_np(|s| {
                let s = s.external_ips(&["203.0.113.7"]);
                match value {
                    Some(v) => s.annotation(ANNOTATION_BACKEND_SELECTION, v),
                    None => s,
                }
            })
            // Another Service, without the annotation, is never affected.
            .svc(
                svc("default", "other")
                    .cluster_ip("10.96.0.11")
                    .port("", 80, "TCP", "80"),
            );
            let d = desired_state(&world.0, &node());
            let maglev: Vec<(String, bool)> = d
                .services
                .iter()
                .map(|(fe, s)| (fe.to_string(), s.maglev))
                .collect();
            (maglev, texts(&d))
        };
        let all = |cluster_ip: bool, external: bool| {
            vec![
                ("10.96.0.10:80/TCP".to_owned(), cluster_ip),
                ("10.96.0.11:80/TCP".to_owned(), false),
                ("10.200.0.1:30080/TCP".to_owned(), external),
                ("192.168.0.10:30080/TCP".to_owned(), external),
                ("203.0.113.7:80/TCP".to_owned(), external),
            ]
        };
        assert_eq!(selection(Some("maglev")), (all(false, true), vec![]));
        assert_eq!(selection(Some("random")), (all(false, false), vec![]));
        assert_eq!(selection(None), (all(false, false), vec![]));
        assert_eq!(
            selection(Some("Maglev")),
            (
                all(false, false),
                vec![
                    "Service default/web: annotation lb.dev/backend-selection: \"Maglev\" is \
                     neither \"maglev\" nor \"random\"; using random"
                        .to_owned()
                ]
            )
        );
    }

    #[test]
    fn nodeport_is_a_frontend_on_every_node_address() {
        let d = desired_state(&web_np(|s| s).0, &node());
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        assert_eq!(
            kinds(&d),
            [
                ("10.96.0.10:80/TCP".to_owned(), FrontendKind::ClusterIp),
                ("10.200.0.1:30080/TCP".to_owned(), FrontendKind::NodePort),
                ("192.168.0.10:30080/TCP".to_owned(), FrontendKind::NodePort),
            ]
        );
        let np = &d.services[&fe("192.168.0.10", 30080, Protocol::Tcp)];
        assert_eq!(np.active, vec![b("10.0.0.1", 8080), b("10.0.0.2", 8080)]);
        assert_eq!(np.source_ranges, None);
        assert!(!np.drop_when_empty);
        assert_eq!(np.snat, vec![b("10.0.0.2", 8080)], "the endpoint on node-b");
        assert!(
            d.services[&fe("10.96.0.10", 80, Protocol::Tcp)]
                .snat
                .is_empty(),
            "ClusterIP traffic keeps its source"
        );

        // A ClusterIP Service's nodePort (not valid in the API) opens nothing.
        let w = web_np(|s| s.type_("ClusterIP"));
        assert_eq!(desired_state(&w.0, &node()).services.len(), 1);
        // Without node addresses (all filtered out by --nodeport-addresses), no NodePort.
        assert_eq!(
            desired_state(&web_np(|s| s).0, &NodeContext::default())
                .services
                .len(),
            1
        );
    }

    #[test]
    fn nodeport_out_of_range_is_reported_and_the_rest_kept() {
        let w = web_np(|s| s.port("metrics", 9100, "TCP", "9100").node_port(40000)).svc(
            svc("default", "other")
                .type_("NodePort")
                .cluster_ip("10.96.0.11")
                .port("", 81, "UDP", "81")
                .node_port(30081),
        );
        let d = desired_state(&w.0, &node());
        assert_eq!(
            texts(&d),
            [
                "Service default/web: port \"metrics\" (9100): nodePort 40000 is outside the \
                 NodePort range 30000-32767; no NodePort for this port"
            ]
        );
        // web's ClusterIP ports and its valid nodePort, and the other Service, all stay.
        assert!(
            d.services
                .contains_key(&fe("10.96.0.10", 9100, Protocol::Tcp))
        );
        assert!(
            d.services
                .contains_key(&fe("10.200.0.1", 30080, Protocol::Tcp))
        );
        assert!(
            d.services
                .contains_key(&fe("10.200.0.1", 30081, Protocol::Udp))
        );
        assert!(
            !d.services
                .contains_key(&fe("10.200.0.1", 40000, Protocol::Tcp))
        );
        // A configured range applies.
        let narrow = NodeContext {
            nodeport_range: (30000, 30080),
            ..node()
        };
        let d = desired_state(&w.0, &narrow);
        assert_eq!(d.problems.len(), 2, "{:?}", d.problems);
    }

    #[test]
    fn a_nodeport_clash_keeps_the_first_service_and_names_both() {
        let w = web_np(|s| s)
            .svc(
                svc("default", "zzz")
                    .type_("NodePort")
                    .cluster_ip("10.96.0.12")
                    .port("a", 80, "TCP", "80")
                    .node_port(30080)
                    .port("b", 80, "UDP", "80")
                    .node_port(30080),
            )
            .svc(
                svc("default", "aaa")
                    .type_("LoadBalancer")
                    .cluster_ip("10.96.0.13")
                    .port("", 443, "TCP", "443")
                    .node_port(30443),
            );
        let d = desired_state(&w.0, &node());
        for addr in ["10.200.0.1", "192.168.0.10"] {
            assert_eq!(
                d.services[&fe(addr, 30080, Protocol::Tcp)].owner.name,
                "web"
            );
            // Another protocol is another frontend.
            assert_eq!(
                d.services[&fe(addr, 30080, Protocol::Udp)].owner.name,
                "zzz"
            );
            assert_eq!(
                d.services[&fe(addr, 30443, Protocol::Tcp)].owner.name,
                "aaa"
            );
        }
        // One problem for the nodePort, however many node addresses there are.
        assert_eq!(
            texts(&d),
            [
                "Service default/zzz: nodePort 30080/TCP is already claimed by Service \
                 default/web; this port is ignored"
            ]
        );
    }

    #[test]
    fn external_ips_and_load_balancer_ingress_ips_are_frontends() {
        let w = World::default().svc(
            svc("default", "lb")
                .type_("LoadBalancer")
                .cluster_ip("10.96.0.20")
                .port("", 80, "TCP", "8080")
                .node_port(30090)
                .external_ips(&["203.0.113.5", " ", "junk", "fd00::5"])
                .lb_ingress("198.51.100.7", None)
                .lb_ingress("198.51.100.8", Some("Proxy"))
                .lb_ingress("198.51.100.9", Some("VIP")),
        );
        let d = desired_state(&w.0, &node());
        assert_eq!(
            kinds(&d),
            [
                ("10.96.0.20:80/TCP".to_owned(), FrontendKind::ClusterIp),
                ("10.200.0.1:30090/TCP".to_owned(), FrontendKind::NodePort),
                ("192.168.0.10:30090/TCP".to_owned(), FrontendKind::NodePort),
                ("198.51.100.7:80/TCP".to_owned(), FrontendKind::LoadBalancer),
                ("198.51.100.9:80/TCP".to_owned(), FrontendKind::LoadBalancer),
                ("203.0.113.5:80/TCP".to_owned(), FrontendKind::ExternalIp),
            ]
        );
        assert_eq!(
            texts(&d),
            [
                "Service default/lb: IPv6 is not supported yet; externalIP fd00::5 skipped",
                "Service default/lb: externalIP \"junk\" is not a valid IP address; skipped",
            ]
        );
        // Ingress IPs count only for type LoadBalancer; externalIPs for any type.
        let mut w = w;
        for s in w.0.services.values_mut() {
            Arc::make_mut(s).spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        }
        let d = desired_state(&w.0, &node());
        assert_eq!(
            kinds(&d),
            [
                ("10.96.0.20:80/TCP".to_owned(), FrontendKind::ClusterIp),
                ("203.0.113.5:80/TCP".to_owned(), FrontendKind::ExternalIp),
            ]
        );
    }

    #[test]
    fn external_ips_outside_the_allowed_cidrs_are_refused() {
        let w = World::default()
            .svc(
                svc("default", "a")
                    .cluster_ip("10.96.0.21")
                    .port("", 80, "TCP", "8080")
                    .external_ips(&["203.0.113.5", "192.0.2.1"]),
            )
            .svc(
                svc("default", "b")
                    .cluster_ip("10.96.0.22")
                    .port("", 80, "TCP", "8080"),
            );
        let guarded = |cidrs: &str| NodeContext {
            external_ip_cidrs: Some(CidrList::parse(cidrs).unwrap().0),
            ..node()
        };
        let d = desired_state(&w.0, &guarded("203.0.113.0/24, fd00::/8"));
        assert_eq!(
            kinds(&d),
            [
                ("10.96.0.21:80/TCP".to_owned(), FrontendKind::ClusterIp),
                ("10.96.0.22:80/TCP".to_owned(), FrontendKind::ClusterIp),
                ("203.0.113.5:80/TCP".to_owned(), FrontendKind::ExternalIp),
            ]
        );
        assert_eq!(
            texts(&d),
            ["Service default/a: externalIP 192.0.2.1 is outside --external-ip-cidrs; skipped"]
        );
        // An empty list admits none; the ClusterIPs are untouched.
        let d = desired_state(&w.0, &guarded(""));
        assert_eq!(kinds(&d).len(), 2);
        assert_eq!(texts(&d).len(), 2);
        assert!(CidrList::parse("10.0.0.0/8,junk").is_err());
    }

    /// A LoadBalancer Service whose addresses and nodePort are unique to `n`.
    fn lb_with_ranges(name: &str, n: u8, ranges: &[&str]) -> Svc {
        svc("default", name)
            .type_("LoadBalancer")
            .cluster_ip(&format!("10.96.0.{}", 30 + n))
            .port("", 80, "TCP", "80")
            .node_port(30100 + i32::from(n))
            .external_ips(&[&format!("203.0.113.{}", 30 + n)])
            .lb_ingress(&format!("198.51.100.{}", 30 + n), None)
            .source_ranges(ranges)
    }

    #[test]
    fn source_ranges_restrict_only_the_load_balancer_ips() {
        let w = World::default().svc(lb_with_ranges(
            "lb",
            0,
            &["10.1.2.3/16", " 192.0.2.0/24 ", "2001:db8::/32"],
        ));
        let d = desired_state(&w.0, &node());
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        for (fe, s) in &d.services {
            if s.kind == FrontendKind::LoadBalancer {
                assert_eq!(
                    s.source_ranges
                        .iter()
                        .flatten()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>(),
                    ["10.1.0.0/16", "192.0.2.0/24"],
                    "host bits are cleared, IPv6 ranges left to IPv6"
                );
            } else {
                assert_eq!(s.source_ranges, None, "{fe}");
            }
        }
    }

    #[test]
    fn invalid_source_ranges_are_reported_and_an_all_invalid_list_fails_closed() {
        let w = World::default()
            .svc(lb_with_ranges(
                "mixed",
                1,
                &["10.0.0.0/8", "10.0.0.0/33", "nonsense"],
            ))
            .svc(lb_with_ranges("broken", 2, &["10.0.0.0"]))
            .svc(lb_with_ranges("v6only", 3, &["2001:db8::/32"]));
        let d = desired_state(&w.0, &node());
        let ranges = |ip: &str| {
            d.services[&fe(ip, 80, Protocol::Tcp)]
                .source_ranges
                .clone()
                .map(|r| r.iter().map(ToString::to_string).collect::<Vec<_>>())
        };
        assert_eq!(ranges("198.51.100.31"), Some(vec!["10.0.0.0/8".to_owned()]));
        assert_eq!(ranges("198.51.100.32"), Some(vec![]), "fails closed");
        assert_eq!(ranges("198.51.100.33"), None, "no IPv4 restriction");
        assert_eq!(
            texts(&d),
            [
                "Service default/broken: loadBalancerSourceRanges: \"10.0.0.0\" is not a valid \
                 CIDR; ignored, and no valid range is left, so its LoadBalancer IPs accept no \
                 client",
                "Service default/mixed: loadBalancerSourceRanges: \"10.0.0.0/33\", \"nonsense\" \
                 are not a valid CIDR; ignored, and the other ranges apply",
            ]
        );
        // The Services keep every other frontend.
        assert_eq!(d.services.len(), 3 * 5);
    }

    #[test]
    fn external_traffic_policy_local_uses_only_this_nodes_endpoints() {
        let w = web_np(|s| s.etp("Local").external_ips(&["203.0.113.40"]));
        let d = desired_state(&w.0, &node());
        let cluster_ip = &d.services[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(
            cluster_ip.active,
            vec![b("10.0.0.1", 8080), b("10.0.0.2", 8080)]
        );
        for ext in [
            fe("192.168.0.10", 30080, Protocol::Tcp),
            fe("203.0.113.40", 80, Protocol::Tcp),
        ] {
            let s = &d.services[&ext];
            assert_eq!(s.active, vec![b("10.0.0.1", 8080)], "{ext}");
            assert_eq!(s.terminating, vec![b("10.0.0.2", 8080)], "keeps its flows");
            assert!(!s.drop_when_empty);
        }
        // On another node with no endpoint of its own, external traffic is dropped while
        // the ClusterIP still balances over all.
        let elsewhere = NodeContext {
            node_name: "node-c".into(),
            ..node()
        };
        let d = desired_state(&w.0, &elsewhere);
        let np = &d.services[&fe("192.168.0.10", 30080, Protocol::Tcp)];
        assert!(np.active.is_empty() && np.drop_when_empty);
        assert_eq!(
            d.services[&fe("10.96.0.10", 80, Protocol::Tcp)]
                .active
                .len(),
            2
        );
        assert!(!d.services[&fe("10.96.0.10", 80, Protocol::Tcp)].drop_when_empty);
    }

    #[test]
    fn a_local_external_frontend_has_an_in_cluster_twin_with_every_endpoint() {
        let w = web_np(|s| s.etp("Local").external_ips(&["203.0.113.40"]));
        let elsewhere = NodeContext {
            node_name: "node-c".into(),
            ..node()
        };
        // With an endpoint here and without one: the twin is the same.
        for ctx in [node(), elsewhere] {
            let d = desired_state(&w.0, &ctx);
            for ext in [
                fe("192.168.0.10", 30080, Protocol::Tcp),
                fe("203.0.113.40", 80, Protocol::Tcp),
            ] {
                let outer = &d.services[&ext];
                assert!(outer.internal_twin, "{ext}");
                let twin = &d.services[&ext.with_scope(Scope::Internal)];
                assert_eq!(
                    twin.active,
                    vec![b("10.0.0.1", 8080), b("10.0.0.2", 8080)],
                    "{ext}"
                );
                assert_eq!(twin.kind, outer.kind);
                assert!(twin.terminating.is_empty() && twin.snat.is_empty());
                assert!(!twin.drop_when_empty && !twin.internal_twin && !twin.maglev);
                assert_eq!(twin.source_ranges, None);
            }
            let cluster_ip = fe("10.96.0.10", 80, Protocol::Tcp);
            assert!(!d.services[&cluster_ip].internal_twin);
            assert!(
                !d.services
                    .contains_key(&cluster_ip.with_scope(Scope::Internal))
            );
        }
        // `Cluster`: no twin at all.
        let d = desired_state(&web_np(|s| s.external_ips(&["203.0.113.40"])).0, &node());
        assert!(
            d.services
                .iter()
                .all(|(f, s)| f.scope == Scope::All && !s.internal_twin)
        );
        // A clash over a `Local` frontend is one problem, not one more for its twin.
        let w = w.svc(
            svc("default", "zz-other")
                .cluster_ip("10.96.0.11")
                .port("http", 80, "TCP", "8080")
                .external_ips(&["203.0.113.40"])
                .etp("Local"),
        );
        let d = desired_state(&w.0, &node());
        let clashes: Vec<_> = d
            .problems
            .iter()
            .filter(|p| p.to_string().contains("already claimed"))
            .collect();
        assert_eq!(clashes.len(), 1, "{clashes:?}");
        assert_eq!(
            d.services[&fe("203.0.113.40", 80, Protocol::Tcp).with_scope(Scope::Internal)]
                .owner
                .name,
            "web"
        );
    }

    #[test]
    fn internal_traffic_policy_local_and_rejects_without_any_endpoint() {
        let w = web_np(|s| s.itp("Local"));
        let d = desired_state(&w.0, &node());
        let cip = &d.services[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(cip.active, vec![b("10.0.0.1", 8080)]);
        let np = &d.services[&fe("10.200.0.1", 30080, Protocol::Tcp)];
        assert_eq!(np.active.len(), 2, "the external policy is Cluster");
        let elsewhere = NodeContext {
            node_name: "node-c".into(),
            ..node()
        };
        let d = desired_state(&w.0, &elsewhere);
        let cip = &d.services[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert!(cip.active.is_empty() && cip.drop_when_empty);

        // Both policies Local and nothing local: the in-cluster twins of the external
        // frontends still reach every endpoint, so every frontend drops rather than
        // rejects, as kube-proxy does (its cluster chain exists for the short-circuit).
        let w = web_np(|s| s.itp("Local").etp("Local"));
        let d = desired_state(&w.0, &elsewhere);
        for (f, s) in &d.services {
            match f.scope {
                Scope::All => assert!(s.active.is_empty() && s.drop_when_empty, "{f}"),
                Scope::Internal => assert_eq!(s.active.len(), 2, "{f}"),
            }
        }
        // Both Local on a Service nobody reaches from outside: nothing is reachable from
        // this node at all, so its ClusterIP rejects.
        let w = web_np(|s| s.itp("Local").etp("Local").type_("ClusterIP"));
        let d = desired_state(&w.0, &elsewhere);
        assert!(
            d.services
                .values()
                .all(|s| s.active.is_empty() && !s.drop_when_empty)
        );
        // A Service without endpoints rejects whatever its policies.
        let w = World::default().svc(
            svc("default", "empty")
                .type_("NodePort")
                .cluster_ip("10.96.0.50")
                .port("", 80, "TCP", "80")
                .node_port(30050)
                .etp("Local")
                .itp("Local"),
        );
        let d = desired_state(&w.0, &node());
        assert!(d.services.values().all(|s| !s.drop_when_empty));
    }

    #[test]
    fn external_policy_of_a_service_not_reachable_from_outside_is_ignored() {
        let w = web_np(|s| s.type_("ClusterIP").etp("Local"));
        let elsewhere = NodeContext {
            node_name: "node-c".into(),
            ..node()
        };
        let d = desired_state(&w.0, &elsewhere);
        let cip = &d.services[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(cip.active.len(), 2);
    }

    #[test]
    fn terminating_fallback_applies_per_locality() {
        let w = World::default()
            .svc(
                svc("default", "web")
                    .type_("NodePort")
                    .cluster_ip("10.96.0.10")
                    .port("", 80, "TCP", "80")
                    .node_port(30080)
                    .etp("Local"),
            )
            .slice(
                slice("default", "web-1", "web")
                    // Here: one serving-terminating, one not serving.
                    .endpoint_with("10.0.0.1", Some(false), Some(true), Some(true))
                    .on(NODE)
                    .endpoint_with("10.0.0.2", Some(false), Some(false), Some(true))
                    .on(NODE)
                    // Elsewhere: ready.
                    .ready("10.0.0.3")
                    .on("node-b")
                    .port("", 80, "TCP"),
            );
        let d = desired_state(&w.0, &node());
        assert_eq!(
            d.services[&fe("10.96.0.10", 80, Protocol::Tcp)].active,
            vec![b("10.0.0.3", 80)],
            "cluster-wide, ready endpoints win"
        );
        let np = &d.services[&fe("10.200.0.1", 30080, Protocol::Tcp)];
        assert_eq!(
            np.active,
            vec![b("10.0.0.1", 80)],
            "locally, no ready endpoint: the serving-terminating one"
        );
    }

    #[test]
    fn endpoints_objects_carry_node_names_too() {
        let mut eps = endpoints(
            "default",
            "ext",
            &["192.168.1.10", "192.168.1.11"],
            &[],
            &[("", 80, "TCP")],
        );
        if let Some(subsets) = eps.subsets.as_mut() {
            subsets[0].addresses.as_mut().unwrap()[0].node_name = Some(NODE.to_owned());
        }
        let w = World::default()
            .svc(
                svc("default", "ext")
                    .cluster_ip("10.96.0.30")
                    .port("", 80, "TCP", "80")
                    .itp("Local"),
            )
            .endpoints(eps);
        let d = desired_state(&w.0, &node());
        assert_eq!(
            d.services[&fe("10.96.0.30", 80, Protocol::Tcp)].active,
            vec![b("192.168.1.10", 80)]
        );
    }

    #[test]
    fn nodeport_addresses_flag() {
        let addrs: Vec<Ipv4Addr> = ["127.0.0.1", "10.0.0.5", "192.168.7.1", "192.168.8.1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let primary = Some("10.0.0.5".parse().unwrap());
        let pick = |flag: &str| {
            NodePortAddresses::parse(flag)
                .unwrap()
                .select(&addrs, primary)
                .into_iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(pick(""), ["10.0.0.5", "192.168.7.1", "192.168.8.1"]);
        assert_eq!(pick("primary"), ["10.0.0.5"]);
        assert_eq!(
            pick("192.168.7.0/24, 127.0.0.0/8"),
            ["127.0.0.1", "192.168.7.1"]
        );
        assert_eq!(pick("fd00::/8"), Vec::<String>::new());
        assert!(NodePortAddresses::parse("10.0.0.0/8,primary").is_err());
        assert!(NodePortAddresses::parse("10.0.0.0").is_err());
        assert_eq!(
            NodePortAddresses::parse("primary")
                .unwrap()
                .select(&addrs, None),
            BTreeSet::new()
        );
    }

    #[test]
    fn deterministic_whatever_the_insertion_order() {
        let a = web().slice(
            slice("default", "web-2", "web")
                .ready("10.0.0.9")
                .port("http", 8080, "TCP"),
        );
        let mut b = Objects::default();
        for (k, v) in a.0.endpoint_slices.iter().rev() {
            b.endpoint_slices.insert(k.clone(), v.clone());
        }
        for (k, v) in a.0.services.iter().rev() {
            b.services.insert(k.clone(), v.clone());
        }
        assert_eq!(
            desired_state(&a.0, &NodeContext::default()),
            desired_state(&b, &NodeContext::default())
        );
    }
}
