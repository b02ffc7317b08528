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
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Service, ServiceSpec},
    discovery::v1::EndpointSlice,
};
use lb_common::proto;
use serde_json::json;

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

/// All objects a source currently holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Objects {
    /// Services by (namespace, name).
    pub services: BTreeMap<Key, Service>,
    /// EndpointSlices by (namespace, name).
    pub endpoint_slices: BTreeMap<Key, EndpointSlice>,
    /// v1 Endpoints by (namespace, name) (the Service's name).
    pub endpoints: BTreeMap<Key, Endpoints>,
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

/// A Service port on one ClusterIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    /// The ClusterIP.
    pub addr: Ipv4Addr,
    /// The Service port.
    pub port: u16,
    /// The protocol.
    pub proto: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto.as_str())
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
    /// The Service that defines this frontend.
    pub owner: ObjectRef,
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
    /// Backends that take new connections, sorted.
    pub active: Vec<BackendAddr>,
    /// Known backends that keep their established flows but take no new ones, sorted.
    pub terminating: Vec<BackendAddr>,
    /// `sessionAffinity: ClientIP` timeout, if set.
    pub affinity_timeout_s: Option<u32>,
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
}

/// Computes the desired tables from `objects`.
///
/// This is the reference: [`crate::state::DesiredCache`] keeps the same result up to date
/// one Service at a time, and its tests compare the two.
pub fn desired_state(objects: &Objects) -> Desired {
    let mut problems = BTreeSet::new();
    let mut services: BTreeMap<Frontend, DesiredService> = BTreeMap::new();
    let slices_by_service = group_slices(objects);

    // BTreeMap order is (namespace, name): the first claimant of a frontend keeps it.
    for (key, svc) in &objects.services {
        let slices = slices_by_service
            .get(&(key.0.as_str(), key.1.as_str()))
            .map_or(&[][..], Vec::as_slice);
        let claims = service_claims(objects, key, svc, slices);
        for (fe, entry) in &claims.frontends {
            services.entry(*fe).or_insert_with(|| entry.clone());
        }
        problems.extend(claims.problems_with(|fe| services.get(fe).map(|s| &s.owner)));
    }
    Desired {
        services,
        problems: problems.into_iter().collect(),
    }
}

/// What one Service asks for on its own, before frontend conflicts with other Services
/// are settled: the unit that [`desired_state`] and the incremental cache both compute.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceClaims {
    /// The Service.
    pub owner: ObjectRef,
    /// Each frontend the Service defines, with its first definition.
    pub frontends: BTreeMap<Frontend, DesiredService>,
    /// Frontends the Service defines more than once.
    pub repeated: BTreeSet<Frontend>,
    /// Problems with the Service itself (frontend conflicts aside).
    pub problems: BTreeSet<Problem>,
}

impl ServiceClaims {
    /// The Service's problems once `winner` tells which Service holds each frontend: its
    /// own, plus one per frontend lost to another Service, or repeated while held.
    pub fn problems_with<'o>(
        &self,
        mut winner: impl FnMut(&Frontend) -> Option<&'o ObjectRef>,
    ) -> BTreeSet<Problem> {
        let mut problems = self.problems.clone();
        for fe in self.frontends.keys() {
            let reason = match winner(fe) {
                Some(w) if *w != self.owner => {
                    format!("{fe} is already claimed by {w}; this port is ignored")
                }
                _ if self.repeated.contains(fe) => {
                    format!("{fe} is defined twice in this Service; the second is ignored")
                }
                _ => continue,
            };
            problems.insert(Problem::new(self.owner.clone(), reason));
        }
        problems
    }
}

/// What Service `key` claims, given its EndpointSlices (as [`slice_service`] assigns
/// them; none: its v1 Endpoints are used).
pub fn service_claims(
    objects: &Objects,
    key: &Key,
    svc: &Service,
    slices: &[&EndpointSlice],
) -> ServiceClaims {
    let (ns, name) = (key.0.as_str(), key.1.as_str());
    let owner = ObjectRef::new("Service", ns, name);
    let mut claims = ServiceClaims {
        owner: owner.clone(),
        frontends: BTreeMap::new(),
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
    if svc
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME))
    {
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
    let endpoints = endpoints_of(objects, ns, name, slices);
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
        let (active, terminating) = select_endpoints(&endpoints, &port_name, proto);
        for addr in &addrs {
            let fe = Frontend {
                addr: *addr,
                port: svc_port,
                proto,
            };
            if claims.frontends.contains_key(&fe) {
                claims.repeated.insert(fe);
                continue;
            }
            claims.frontends.insert(
                fe,
                DesiredService {
                    owner: owner.clone(),
                    port_name: port_name.clone(),
                    active: active.clone(),
                    terminating: terminating.clone(),
                    affinity_timeout_s: affinity,
                },
            );
        }
    }
    claims
}

/// `spec.clusterIPs`, or `spec.clusterIP` when the list is absent (older objects).
fn cluster_ips(spec: &ServiceSpec) -> Vec<String> {
    match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.clone()],
        _ => Vec::new(),
    }
}

/// The `sessionAffinity: ClientIP` timeout, clamped to what the API accepts, and a note
/// when it had to be clamped (a hand-written manifest is not validated by an apiserver).
fn affinity_timeout(spec: &ServiceSpec) -> (Option<u32>, Option<String>) {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return (None, None);
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    let Some(t) = timeout else {
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

/// The name of the Service (in the slice's namespace) that `slice` belongs to, or `None`
/// for a slice that kube-proxy's label selector leaves out.
pub fn slice_service(slice: &EndpointSlice) -> Option<&str> {
    let labels = slice.metadata.labels.as_ref()?;
    if labels.contains_key(LABEL_HEADLESS) || labels.contains_key(LABEL_SERVICE_PROXY_NAME) {
        return None;
    }
    labels.get(LABEL_SERVICE_NAME).map(String::as_str)
}

/// Slices by the (namespace, name) of the Service they belong to (see [`slice_service`]).
fn group_slices(objects: &Objects) -> BTreeMap<(&str, &str), Vec<&EndpointSlice>> {
    let mut out: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for ((ns, _), slice) in &objects.endpoint_slices {
        if let Some(service) = slice_service(slice) {
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
    slices: &[&EndpointSlice],
) -> PortEndpoints {
    let mut out = PortEndpoints::new();
    // A Service without slices is read from its v1 Endpoints, as the mirroring
    // controller would have turned them into a slice.
    match (!slices.is_empty()).then_some(slices) {
        Some(slices) => {
            for slice in slices {
                if slice.address_type != "IPv4" {
                    continue;
                }
                for port in slice.ports.iter().flatten() {
                    let (Some(number), Some(proto)) =
                        (port.port, parse_protocol(port.protocol.as_deref()))
                    else {
                        continue;
                    };
                    // kube-proxy ignores a slice port without a usable number.
                    let Some(number) = u16::try_from(number).ok().filter(|n| *n != 0) else {
                        continue;
                    };
                    let entry = out
                        .entry((port.name.clone().unwrap_or_default(), proto))
                        .or_default();
                    for ep in &slice.endpoints {
                        let c = ep.conditions.as_ref();
                        let ready = c.and_then(|c| c.ready).unwrap_or(true);
                        // As kube-proxy reads them, and as the API documents: an absent
                        // `serving` counts as true (not as `ready`), so a terminating
                        // endpoint without conditions other than `ready: false` still
                        // serves in the KEP-1669 fallback.
                        let serving = c.and_then(|c| c.serving).unwrap_or(true);
                        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                        // kube-proxy uses the first address of each endpoint.
                        let Some(Ok(addr)) = ep.addresses.first().map(|a| a.parse::<Ipv4Addr>())
                        else {
                            continue;
                        };
                        entry.push(Seen {
                            backend: BackendAddr { addr, port: number },
                            ready,
                            serving,
                            terminating,
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
                            });
                        }
                    }
                }
            }
        }
    }
    out
}

/// Splits the endpoints of one Service port into (active, terminating), both sorted and
/// de-duplicated. An endpoint listed twice (two slices) counts with its best conditions.
fn select_endpoints(
    endpoints: &PortEndpoints,
    port_name: &str,
    proto: Protocol,
) -> (Vec<BackendAddr>, Vec<BackendAddr>) {
    let Some(seen) = endpoints.get(&(port_name.to_owned(), proto)) else {
        return (Vec::new(), Vec::new());
    };
    let mut merged: BTreeMap<BackendAddr, Seen> = BTreeMap::new();
    for s in seen {
        merged
            .entry(s.backend)
            .and_modify(|m| {
                m.ready |= s.ready;
                m.serving |= s.serving;
                m.terminating &= s.terminating;
            })
            .or_insert(*s);
    }
    let ready: BTreeSet<BackendAddr> = merged
        .values()
        .filter(|s| s.ready)
        .map(|s| s.backend)
        .collect();
    let active: BTreeSet<BackendAddr> = if ready.is_empty() {
        merged
            .values()
            .filter(|s| s.serving && s.terminating)
            .map(|s| s.backend)
            .collect()
    } else {
        ready
    };
    let terminating = merged
        .keys()
        .filter(|b| !active.contains(b))
        .copied()
        .collect();
    (active.into_iter().collect(), terminating)
}

#[cfg(test)]
pub mod fixtures {
    //! Builders for test objects.
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::{
            core::v1::{
                ClientIPConfig, EndpointAddress, EndpointPort as CorePort, EndpointSubset,
                Endpoints, Service, ServicePort, ServiceSpec, SessionAffinityConfig,
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
            self.0.services.insert(k, s.0);
            self
        }
        /// Adds a slice.
        pub fn slice(mut self, s: Slice) -> Self {
            let k = key(&s.0.metadata);
            self.0.endpoint_slices.insert(k, s.0);
            self
        }
        /// Adds an Endpoints object.
        pub fn endpoints(mut self, e: Endpoints) -> Self {
            let k = key(&e.metadata);
            self.0.endpoints.insert(k, e);
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
        Frontend {
            addr: ip.parse().unwrap(),
            port,
            proto,
        }
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
        let d = desired_state(&web().0);
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        let s = &d.services[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(s.active, vec![b("10.0.0.1", 8080), b("10.0.0.2", 8080)]);
        assert!(s.terminating.is_empty());
        assert_eq!(s.affinity_timeout_s, None);
        assert_eq!(s.owner, ObjectRef::new("Service", "default", "web"));
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
        let d = desired_state(&w.0);
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
        let d = desired_state(&w.0);
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
        let d = desired_state(&w.0);
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
        let d = desired_state(&w.0);
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
        let d = desired_state(&w.0);
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
        let d = desired_state(&w.0);
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
        let d = desired_state(&w.0);
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
        let d = desired_state(&w.0);
        let s = &d.services[&fe("10.96.0.30", 5432, Protocol::Tcp)];
        assert_eq!(s.active, vec![b("192.168.1.10", 5432)]);
        assert_eq!(s.terminating, vec![b("192.168.1.11", 5432)]);

        let w = w.slice(
            slice("default", "ext-1", "ext")
                .ready("192.168.1.20")
                .port("db", 5432, "TCP"),
        );
        let d = desired_state(&w.0);
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
        let d = desired_state(&w.0);
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
        let d = desired_state(&w.0);
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
        let d = desired_state(&w.0);
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
        let d = desired_state(&w.0);
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
        let d = desired_state(&w.0);
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
        let d = desired_state(&w.0);
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
        let d = desired_state(&w.0);
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
        let d = desired_state(&w.0);
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
        let d = desired_state(&w.0);
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
        let d = desired_state(&w.0);
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
        let d = desired_state(&w.0);
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
        let d = desired_state(&w.0);
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
        let d = desired_state(&w.0);
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
            let d = desired_state(&base(t).0);
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
            s.spec.as_mut().unwrap().session_affinity = Some("None".into());
        }
        assert_eq!(
            desired_state(&w.0)
                .services
                .values()
                .next()
                .unwrap()
                .affinity_timeout_s,
            None
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
        assert_eq!(desired_state(&a.0), desired_state(&b));
    }
}
