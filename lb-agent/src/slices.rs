//! The form in which the agent keeps an EndpointSlice: only what the model, the health
//! checks and the telemetry read, made at ingest by both sources.
//!
//! A k8s-openapi `EndpointSlice` of ten endpoints takes about 5 KiB in memory (an
//! `Option<String>` or a map per field the API defines, a `String` per address); a
//! [`CompactSlice`] of the same takes a few hundred bytes: each endpoint is its first
//! address parsed, its three conditions and a shared node name. At 100,000 Services this is
//! most of the agent's memory.
//!
//! What is left out is what every reader leaves out, so reading a compact slice gives the
//! same result as reading the object it came from:
//! - a slice whose `addressType` is not `IPv4` keeps no ports and no endpoints (it still
//!   counts as a slice of its Service, so the Service's v1 Endpoints stay unused);
//! - a port without a number, or with number 0, is dropped;
//! - an endpoint whose first address is not an IPv4 address is dropped;
//! - absent conditions are resolved as kube-proxy resolves them.
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    sync::{Arc, Mutex, PoisonError},
    time::SystemTime,
};

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};

use crate::model::{LABEL_HEADLESS, LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME, Protocol};
use crate::telemetry::TRIGGER_TIME_ANNOTATION;

/// An EndpointSlice as the agent keeps it (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactSlice {
    /// The slice's namespace.
    pub namespace: Box<str>,
    /// The slice's name.
    pub name: Box<str>,
    /// The Service (in the same namespace) the slice belongs to: its
    /// `kubernetes.io/service-name` label, or `None` when kube-proxy's label selector
    /// leaves the slice out (headless, handed to another proxy, or no such label).
    pub service: Option<Box<str>>,
    /// The ports (none for a slice that is not `IPv4`).
    pub ports: Box<[SlicePort]>,
    /// The endpoints (none for a slice that is not `IPv4`).
    pub endpoints: Box<[SliceEndpoint]>,
    /// The `endpoints.kubernetes.io/last-change-trigger-time` annotation, if it is a valid
    /// timestamp.
    pub trigger_time: Option<SystemTime>,
}

/// One port of a slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    /// The port's name ("" when unnamed, as the API defaults it).
    pub name: Box<str>,
    /// The port number (never 0; the API allows no more than 65535, which readers check).
    pub port: i32,
    /// The protocol (`TCP` when absent).
    pub protocol: SliceProtocol,
}

/// The protocol of a slice port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SliceProtocol {
    /// `TCP`.
    Tcp,
    /// `UDP`.
    Udp,
    /// Another protocol (`SCTP`, or anything else the object says).
    Other(Box<str>),
}

impl SliceProtocol {
    /// The Kubernetes spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Other(p) => p,
        }
    }

    /// The frontend protocol it is, if the datapath handles it.
    pub fn protocol(&self) -> Option<Protocol> {
        match self {
            Self::Tcp => Some(Protocol::Tcp),
            Self::Udp => Some(Protocol::Udp),
            Self::Other(_) => None,
        }
    }

    fn parse(p: Option<&str>) -> Self {
        match p.unwrap_or("TCP") {
            "TCP" => Self::Tcp,
            "UDP" => Self::Udp,
            other => Self::Other(other.into()),
        }
    }
}

/// One endpoint of a slice, with its conditions resolved as kube-proxy resolves them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// Its first address (kube-proxy uses no other).
    pub addr: Ipv4Addr,
    /// `ready` (absent: true).
    pub ready: bool,
    /// `serving` (absent: true, as the API documents it; not `ready`).
    pub serving: bool,
    /// `terminating` (absent: false).
    pub terminating: bool,
    /// `nodeName`, shared among the endpoints on the same node.
    pub node_name: Option<Arc<str>>,
}

impl SliceEndpoint {
    /// Whether the endpoint runs on node `node` (never for an empty `node`).
    pub fn is_on(&self, node: &str) -> bool {
        !node.is_empty() && self.node_name.as_deref() == Some(node)
    }

    fn of(ep: &Endpoint) -> Option<Self> {
        let addr = ep.addresses.first()?.parse::<Ipv4Addr>().ok()?;
        let c = ep.conditions.as_ref();
        Some(Self {
            addr,
            ready: c.and_then(|c| c.ready).unwrap_or(true),
            serving: c.and_then(|c| c.serving).unwrap_or(true),
            terminating: c.and_then(|c| c.terminating).unwrap_or(false),
            node_name: ep.node_name.as_deref().map(node_name),
        })
    }
}

impl CompactSlice {
    /// The Service the slice belongs to (see [`CompactSlice::service`]).
    pub fn service(&self) -> Option<&str> {
        self.service.as_deref()
    }
}

impl From<&EndpointSlice> for CompactSlice {
    fn from(slice: &EndpointSlice) -> Self {
        let ipv4 = slice.address_type == "IPv4";
        let ports: Box<[SlicePort]> = if ipv4 {
            slice.ports.iter().flatten().filter_map(port).collect()
        } else {
            Box::default()
        };
        let endpoints: Box<[SliceEndpoint]> = if ipv4 {
            slice
                .endpoints
                .iter()
                .filter_map(SliceEndpoint::of)
                .collect()
        } else {
            Box::default()
        };
        let meta = &slice.metadata;
        Self {
            namespace: meta.namespace.as_deref().unwrap_or_default().into(),
            name: meta.name.as_deref().unwrap_or_default().into(),
            service: slice_service(slice).map(Into::into),
            ports,
            endpoints,
            trigger_time: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
                .and_then(|v| v.parse::<jiff::Timestamp>().ok())
                .map(SystemTime::from),
        }
    }
}

impl From<EndpointSlice> for CompactSlice {
    fn from(slice: EndpointSlice) -> Self {
        Self::from(&slice)
    }
}

fn port(p: &EndpointPort) -> Option<SlicePort> {
    Some(SlicePort {
        name: p.name.as_deref().unwrap_or_default().into(),
        port: p.port.filter(|n| *n != 0)?,
        protocol: SliceProtocol::parse(p.protocol.as_deref()),
    })
}

/// The name of the Service (in the slice's namespace) that `slice` belongs to, or `None`
/// for a slice that kube-proxy's label selector leaves out.
fn slice_service(slice: &EndpointSlice) -> Option<&str> {
    let labels = slice.metadata.labels.as_ref()?;
    if labels.contains_key(LABEL_HEADLESS) || labels.contains_key(LABEL_SERVICE_PROXY_NAME) {
        return None;
    }
    labels.get(LABEL_SERVICE_NAME).map(String::as_str)
}

/// The node names in use, each held once: a cluster has far fewer nodes than endpoints.
struct NodeNames {
    names: BTreeSet<Arc<str>>,
    /// Size at which names no longer used by any slice are dropped.
    prune_at: usize,
}

static NODE_NAMES: Mutex<NodeNames> = Mutex::new(NodeNames {
    names: BTreeSet::new(),
    prune_at: 1024,
});

/// The shared copy of node name `name`.
fn node_name(name: &str) -> Arc<str> {
    // The set holds plain strings: a panic elsewhere cannot leave it inconsistent.
    let mut nodes = NODE_NAMES.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(n) = nodes.names.get(name) {
        return n.clone();
    }
    if nodes.names.len() >= nodes.prune_at {
        nodes.names.retain(|n| Arc::strong_count(n) > 1);
        nodes.prune_at = (nodes.names.len() * 2).max(1024);
    }
    let n: Arc<str> = name.into();
    nodes.names.insert(n.clone());
    n
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::discovery::v1::EndpointConditions;

    use super::*;

    fn endpoint(addrs: &[&str], node: Option<&str>, c: Option<EndpointConditions>) -> Endpoint {
        Endpoint {
            addresses: addrs.iter().map(|a| (*a).to_owned()).collect(),
            conditions: c,
            node_name: node.map(str::to_owned),
            ..Default::default()
        }
    }

    fn slice(address_type: &str, endpoints: Vec<Endpoint>) -> EndpointSlice {
        let mut s = EndpointSlice {
            address_type: address_type.to_owned(),
            endpoints,
            ports: Some(vec![
                EndpointPort {
                    name: Some("http".into()),
                    port: Some(8080),
                    protocol: None,
                    app_protocol: Some("http".into()),
                },
                EndpointPort {
                    name: None,
                    port: None,
                    protocol: Some("UDP".into()),
                    app_protocol: None,
                },
                EndpointPort {
                    name: None,
                    port: Some(53),
                    protocol: Some("SCTP".into()),
                    app_protocol: None,
                },
            ]),
            ..Default::default()
        };
        s.metadata.namespace = Some("ns".into());
        s.metadata.name = Some("web-1".into());
        s.metadata.labels = Some(BTreeMap::from([(
            LABEL_SERVICE_NAME.to_owned(),
            "web".to_owned(),
        )]));
        s
    }

    #[test]
    fn keeps_what_the_readers_use_with_conditions_resolved() {
        let c = |ready, serving, terminating| {
            Some(EndpointConditions {
                ready,
                serving,
                terminating,
            })
        };
        let s = CompactSlice::from(slice(
            "IPv4",
            vec![
                endpoint(&["10.0.0.1", "10.0.0.9"], Some("n1"), None),
                endpoint(&["10.0.0.2"], Some("n1"), c(Some(false), None, Some(true))),
                endpoint(&["fd00::1", "10.0.0.3"], None, None),
                endpoint(&[], None, None),
            ],
        ));
        assert_eq!((&*s.namespace, &*s.name), ("ns", "web-1"));
        assert_eq!(s.service(), Some("web"));
        let ports: Vec<_> = s
            .ports
            .iter()
            .map(|p| (&*p.name, p.port, p.protocol.as_str()))
            .collect();
        assert_eq!(ports, [("http", 8080, "TCP"), ("", 53, "SCTP")]);
        let eps: Vec<_> = s
            .endpoints
            .iter()
            .map(|e| (e.addr.to_string(), e.ready, e.serving, e.terminating))
            .collect();
        assert_eq!(
            eps,
            [
                ("10.0.0.1".to_owned(), true, true, false),
                ("10.0.0.2".to_owned(), false, true, true),
            ]
        );
        assert!(s.endpoints[0].is_on("n1") && !s.endpoints[0].is_on("n2"));
        assert!(!s.endpoints[0].is_on(""));
        // One copy of a node name, whatever the number of endpoints on it.
        let (a, b) = (&s.endpoints[0].node_name, &s.endpoints[1].node_name);
        assert!(Arc::ptr_eq(a.as_ref().unwrap(), b.as_ref().unwrap()));
    }

    #[test]
    fn other_address_types_keep_nothing_but_their_owner() {
        let s = CompactSlice::from(slice("IPv6", vec![endpoint(&["fd00::1"], None, None)]));
        assert_eq!(s.service(), Some("web"));
        assert!(s.ports.is_empty() && s.endpoints.is_empty());
    }

    #[test]
    fn labels_decide_the_owner_and_the_trigger_time_is_parsed() {
        let mut k = slice("IPv4", Vec::new());
        k.metadata.annotations = Some(BTreeMap::from([(
            TRIGGER_TIME_ANNOTATION.to_owned(),
            "2024-05-01T10:00:00Z".to_owned(),
        )]));
        let s = CompactSlice::from(&k);
        let want: jiff::Timestamp = "2024-05-01T10:00:00Z".parse().unwrap();
        assert_eq!(s.trigger_time, Some(SystemTime::from(want)));
        for label in [LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME] {
            let mut k = k.clone();
            let labels = k.metadata.labels.as_mut().unwrap();
            labels.insert(label.to_owned(), String::new());
            assert_eq!(CompactSlice::from(&k).service(), None, "{label}");
        }
        k.metadata.labels = None;
        assert_eq!(CompactSlice::from(&k).service(), None);
    }
}
