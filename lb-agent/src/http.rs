//! The agent's HTTP surface, on kube-proxy's ports and paths:
//! - the health server (`--healthz-bind-address`, default `0.0.0.0:10256`): `/healthz`
//!   and `/livez`, with kube-proxy's status codes and JSON bodies (see [`crate::telemetry`]);
//! - the metrics server (`--metrics-bind-address`, default `127.0.0.1:10249`): `/metrics`
//!   in the Prometheus text format, and a plain `/healthz` (`ok`) as kube-proxy has there.
use std::{net::SocketAddr, path::Path, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use lb_common::{AffinityKey, AffinityValue, Backend, CtKey, CtValue, ServiceKey, ServiceValue};
use tokio::sync::watch;
use tracing::warn;

use crate::{
    datapath,
    kube_source::NodeState,
    telemetry::{EXPOSITION_CONTENT_TYPE, Exposition, HealthReport, Telemetry},
};

/// Why an HTTP server could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The bind address is not `IP:PORT`.
    #[error("{flag}: {value:?} is not an IP:PORT address")]
    Address {
        /// The flag that gave it.
        flag: &'static str,
        /// What was given.
        value: String,
    },
    /// Binding failed (address in use, not local...).
    #[error("{flag}: cannot listen on {addr}")]
    Bind {
        /// The flag that gave it.
        flag: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl HttpError {
    /// Stable label for failure counters.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Address { .. } => "address",
            Self::Bind { .. } => "bind",
        }
    }
}

/// Binds `value` (`IP:PORT`) for `flag`; an empty value disables the server (`None`).
pub async fn bind(
    flag: &'static str,
    value: &str,
) -> Result<Option<tokio::net::TcpListener>, HttpError> {
    if value.is_empty() {
        return Ok(None);
    }
    let addr: SocketAddr = value.parse().map_err(|_| HttpError::Address {
        flag,
        value: value.to_owned(),
    })?;
    tokio::net::TcpListener::bind(addr)
        .await
        .map(Some)
        .map_err(|source| HttpError::Bind { flag, addr, source })
}

/// Entry counts and capacities of the pinned maps, read through their pins so that the
/// sync loop keeps sole use of its own handles.
pub struct MapStats {
    services: Pinned<ServiceKey, ServiceValue>,
    backends: Pinned<u32, Backend>,
    ct: Pinned<CtKey, CtValue>,
    affinity: Pinned<AffinityKey, AffinityValue>,
}

/// A pinned hash map and its capacity.
struct Pinned<K, V> {
    map: BpfHashMap<MapData, K, V>,
    capacity: u32,
}

impl<K: aya::Pod, V: aya::Pod> Pinned<K, V> {
    fn open(root: &Path, name: &str) -> Result<Self, aya::maps::MapError> {
        let data = MapData::from_pin(root.join(name))?;
        let capacity = data.info()?.max_entries();
        let map = BpfHashMap::try_from(Map::from_map_data(data)?)?;
        Ok(Self { map, capacity })
    }

    /// `(entries, capacity)`, entries counted key by key. A hash map never holds more
    /// than its capacity, so the count stops there: keys that move while the datapath
    /// updates the map (which can restart the walk) cannot make it run away.
    fn count(&self) -> (u64, u64) {
        let entries = self
            .map
            .keys()
            .take(self.capacity as usize)
            .take_while(Result::is_ok)
            .count();
        (entries as u64, u64::from(self.capacity))
    }
}

impl MapStats {
    /// Opens the maps pinned under `root`.
    pub fn open(root: &Path) -> Result<Self, aya::maps::MapError> {
        use lb_common::map_names;
        Ok(Self {
            services: Pinned::open(root, map_names::SERVICES)?,
            backends: Pinned::open(root, map_names::BACKENDS)?,
            ct: Pinned::open(root, map_names::CT)?,
            affinity: Pinned::open(root, map_names::AFFINITY)?,
        })
    }

    /// `(map name, entries, capacity)` for every map.
    fn counts(&self) -> [(&'static str, (u64, u64)); 4] {
        use lb_common::map_names;
        [
            (map_names::SERVICES, self.services.count()),
            (map_names::BACKENDS, self.backends.count()),
            (map_names::CT, self.ct.count()),
            (map_names::AFFINITY, self.affinity.count()),
        ]
    }
}

/// What the servers read.
#[derive(Clone)]
pub struct Sources {
    /// Control-plane state.
    pub telemetry: Arc<Telemetry>,
    /// This node as the API shows it (`Unknown` without the API: eligible).
    pub node: watch::Receiver<NodeState>,
    /// The datapath's decision counters.
    pub datapath: Arc<datapath::Metrics>,
    /// The pinned maps.
    pub maps: Arc<MapStats>,
}

fn health_response(report: HealthReport) -> Response {
    let status = StatusCode::from_u16(report.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        report.body,
    )
        .into_response()
}

async fn healthz(State(s): State<Sources>) -> Response {
    let eligible = s.node.borrow().eligible();
    health_response(s.telemetry.healthz(eligible))
}

async fn livez(State(s): State<Sources>) -> Response {
    health_response(s.telemetry.livez())
}

async fn metrics(State(s): State<Sources>) -> Response {
    // Counting map entries walks the maps with one system call per key: off the runtime.
    let text = tokio::task::spawn_blocking(move || render(&s)).await;
    match text {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, EXPOSITION_CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Err(e) => {
            warn!(error = %e, "rendering metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// The whole `/metrics` text.
fn render(s: &Sources) -> String {
    let mut out = Exposition::default();
    s.telemetry.expose(&mut out);
    let counts = s.maps.counts();
    out.family(
        "lb_map_entries",
        "gauge",
        "Entries in each BPF map (LB4_CT: connection-tracking entries, two per flow)",
    );
    for (name, (entries, _)) in &counts {
        out.sample("lb_map_entries", &[("map", name)], *entries as f64);
    }
    out.family(
        "lb_map_capacity",
        "gauge",
        "Maximum entries of each BPF map",
    );
    for (name, (_, capacity)) in &counts {
        out.sample("lb_map_capacity", &[("map", name)], *capacity as f64);
    }
    out.family(
        "lb_datapath_packets_total",
        "counter",
        "Packets seen by the TC and XDP programs, by decision (reason) and direction (ingress, egress, xdp)",
    );
    for (reason, direction, n) in s.datapath.snapshot() {
        out.sample(
            "lb_datapath_packets_total",
            &[("reason", reason), ("direction", direction)],
            n as f64,
        );
    }
    out.finish()
}

/// Serves `/healthz` and `/livez` on `listener` until the task is aborted.
pub fn serve_health(
    listener: tokio::net::TcpListener,
    sources: Sources,
) -> tokio::task::JoinHandle<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(sources);
    spawn_server(listener, app, "health")
}

/// Serves `/metrics` (and a plain `/healthz`) on `listener` until the task is aborted.
pub fn serve_metrics(
    listener: tokio::net::TcpListener,
    sources: Sources,
) -> tokio::task::JoinHandle<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(sources);
    spawn_server(listener, app, "metrics")
}

fn spawn_server(
    listener: tokio::net::TcpListener,
    app: Router,
    what: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(server = what, error = %e, "HTTP server stopped");
        }
    })
}
