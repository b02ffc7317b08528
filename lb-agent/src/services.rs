//! The form in which the agent keeps a Service: the fields the model and the health checks
//! read, made at ingest by both sources.
//!
//! A k8s-openapi `Service` is 824 bytes before any of its strings (every field the API
//! defines is there, most of them empty); a [`CompactService`] keeps the dozen fields that
//! decide the frontends, with the same names and the same meaning (absent stays absent),
//! so that reading one gives the same result as reading the object it came from.
use k8s_openapi::api::core::v1::{Service, ServicePort};

use crate::model::{ANNOTATION_BACKEND_SELECTION, LABEL_SERVICE_PROXY_NAME};

/// A Service as the agent keeps it (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactService {
    /// The Service's namespace.
    pub namespace: Box<str>,
    /// The Service's name.
    pub name: Box<str>,
    /// Labelled `service.kubernetes.io/service-proxy-name`: another proxy handles it.
    pub other_proxy: bool,
    /// The value of the `lb.dev/backend-selection` annotation, if any.
    pub backend_selection: Option<Box<str>>,
    /// The fields of `spec` the agent reads (`None`: the object has no spec).
    pub spec: Option<CompactServiceSpec>,
    /// `status.loadBalancer.ingress`.
    pub lb_ingress: Box<[LoadBalancerIngress]>,
}

/// The fields of a Service's `spec` the agent reads, as the API spells them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactServiceSpec {
    /// `type`.
    pub type_: Option<String>,
    /// `clusterIP`.
    pub cluster_ip: Option<String>,
    /// `clusterIPs`.
    pub cluster_ips: Option<Vec<String>>,
    /// `ports`.
    pub ports: Option<Vec<CompactServicePort>>,
    /// `sessionAffinity`.
    pub session_affinity: Option<String>,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub affinity_timeout_seconds: Option<i32>,
    /// `internalTrafficPolicy`.
    pub internal_traffic_policy: Option<String>,
    /// `externalTrafficPolicy`.
    pub external_traffic_policy: Option<String>,
    /// `externalIPs`.
    pub external_ips: Option<Vec<String>>,
    /// `loadBalancerSourceRanges`.
    pub load_balancer_source_ranges: Option<Vec<String>>,
    /// `healthCheckNodePort`.
    pub health_check_node_port: Option<i32>,
}

/// One entry of a Service's `spec.ports` (the target port resolves through the
/// EndpointSlices, so it is not kept).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactServicePort {
    /// `name`.
    pub name: Option<String>,
    /// `port`.
    pub port: i32,
    /// `protocol`.
    pub protocol: Option<String>,
    /// `nodePort`.
    pub node_port: Option<i32>,
}

/// One entry of `status.loadBalancer.ingress`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadBalancerIngress {
    /// `ip`.
    pub ip: Option<String>,
    /// `ipMode`.
    pub ip_mode: Option<String>,
}

impl From<&Service> for CompactService {
    fn from(svc: &Service) -> Self {
        let meta = &svc.metadata;
        let spec = svc.spec.as_ref().map(|s| CompactServiceSpec {
            type_: s.type_.clone(),
            cluster_ip: s.cluster_ip.clone(),
            cluster_ips: s.cluster_ips.clone(),
            ports: s
                .ports
                .as_ref()
                .map(|p| p.iter().map(CompactServicePort::from).collect()),
            session_affinity: s.session_affinity.clone(),
            affinity_timeout_seconds: s
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds),
            internal_traffic_policy: s.internal_traffic_policy.clone(),
            external_traffic_policy: s.external_traffic_policy.clone(),
            external_ips: s.external_ips.clone(),
            load_balancer_source_ranges: s.load_balancer_source_ranges.clone(),
            health_check_node_port: s.health_check_node_port,
        });
        let lb_ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .map(|i| LoadBalancerIngress {
                ip: i.ip.clone(),
                ip_mode: i.ip_mode.clone(),
            })
            .collect();
        Self {
            namespace: meta.namespace.as_deref().unwrap_or_default().into(),
            name: meta.name.as_deref().unwrap_or_default().into(),
            other_proxy: meta
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME)),
            backend_selection: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_BACKEND_SELECTION))
                .map(|v| v.as_str().into()),
            spec,
            lb_ingress,
        }
    }
}

impl From<Service> for CompactService {
    fn from(svc: Service) -> Self {
        Self::from(&svc)
    }
}

impl From<&ServicePort> for CompactServicePort {
    fn from(p: &ServicePort) -> Self {
        Self {
            name: p.name.clone(),
            port: p.port,
            protocol: p.protocol.clone(),
            node_port: p.node_port,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{
        ClientIPConfig, LoadBalancerStatus, ServiceSpec, ServiceStatus, SessionAffinityConfig,
    };

    use super::*;

    #[test]
    fn keeps_the_fields_the_agent_reads() {
        let mut svc = Service {
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                cluster_ip: Some("10.96.0.10".into()),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    node_port: Some(30080),
                    ..Default::default()
                }]),
                session_affinity: Some("ClientIP".into()),
                session_affinity_config: Some(SessionAffinityConfig {
                    client_ip: Some(ClientIPConfig {
                        timeout_seconds: Some(60),
                    }),
                }),
                health_check_node_port: Some(32000),
                ..Default::default()
            }),
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(vec![k8s_openapi::api::core::v1::LoadBalancerIngress {
                        ip: Some("192.0.2.1".into()),
                        ip_mode: Some("VIP".into()),
                        ..Default::default()
                    }]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        svc.metadata.namespace = Some("ns".into());
        svc.metadata.name = Some("web".into());
        let c = CompactService::from(&svc);
        assert_eq!(
            (&*c.namespace, &*c.name, c.other_proxy),
            ("ns", "web", false)
        );
        let spec = c.spec.as_ref().unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.affinity_timeout_seconds, Some(60));
        assert_eq!(spec.health_check_node_port, Some(32000));
        let ports = spec.ports.as_ref().unwrap();
        assert_eq!((ports[0].port, ports[0].node_port), (80, Some(30080)));
        assert_eq!(c.lb_ingress[0].ip.as_deref(), Some("192.0.2.1"));
        assert_eq!(c.lb_ingress[0].ip_mode.as_deref(), Some("VIP"));

        svc.metadata.labels = Some(BTreeMap::from([(
            LABEL_SERVICE_PROXY_NAME.to_owned(),
            "other".to_owned(),
        )]));
        svc.spec = None;
        let c = CompactService::from(svc);
        assert!(c.other_proxy && c.spec.is_none());
    }
}
