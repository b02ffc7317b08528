//! Per-Service health checks on `spec.healthCheckNodePort`, as kube-proxy serves them.
//!
//! A cloud load balancer in front of a Service of type `LoadBalancer` with
//! `externalTrafficPolicy: Local` sends its traffic only to the nodes that have endpoints of
//! the Service. It finds them by asking every node over HTTP on the Service's
//! `healthCheckNodePort`; the node's proxy answers. The answer here is kube-proxy's
//! (`pkg/proxy/healthcheck/service_health.go`, `hcHandler.ServeHTTP`):
//! - any method, any path;
//! - 200 when the node has at least one local ready endpoint of the Service and the agent
//!   itself is healthy (the `/livez` rule of [`crate::telemetry`], node eligibility aside),
//!   503 otherwise;
//! - headers `Content-Type: application/json`, `X-Content-Type-Options: nosniff` and
//!   `X-Load-Balancing-Endpoint-Weight: <count>`;
//! - a JSON body naming the Service, with `localEndpoints` and `serviceProxyHealthy`.
//!
//! The count is kube-proxy's `EndpointsMap.LocalReadyEndpoints` (`pkg/proxy/endpoints.go`):
//! the distinct IPs of the Service's endpoints that are on this node and *ready*. Endpoints
//! that are serving but terminating are not counted, even when they are the only local ones
//! and the datapath still sends new connections to them (KEP-1669): a node whose pods are
//! all going away answers 503, so that the load balancer drains it while its last pods
//! finish.
//!
//! kube-proxy opens one listener per such Service on every address `--nodeport-addresses`
//! selects (all addresses when it selects everything), reading the addresses once at
//! start-up; a port that cannot be bound is logged and tried again at the next sync. Here:
//! - [`desired_table`] is the reference, a pure function of the objects;
//!   [`HealthChecks`] keeps the same table up to date from the keys of changed objects, so a
//!   change costs in proportion to the objects it touches;
//! - two Services with the same port: the one whose (namespace, name) sorts first serves it,
//!   and the other is reported naming both (kube-proxy lets the first to bind win);
//! - [`Server`] owns the listeners: it opens and closes them as the table changes, and
//!   retries a port that could not be bound every [`RETRY_EVERY`] with one warning naming
//!   the Service, the address and the reason.
use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use k8s_openapi::api::core::v1::Endpoints;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    model::{Key, NodePortAddresses, ObjectRef, Objects, Problem},
    services::CompactService,
    slices::CompactSlice,
    state::{ChangedKeys, SliceIndex},
    telemetry::Telemetry,
};

/// How often a health-check port that could not be bound is tried again.
pub const RETRY_EVERY: Duration = Duration::from_secs(5);

/// The header in which kube-proxy also reports the count, for load balancers that weigh
/// nodes by it.
const ENDPOINT_WEIGHT: HeaderName = HeaderName::from_static("x-load-balancing-endpoint-weight");

/// The health check served on one port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// Its ready endpoints on this node (distinct IPs).
    pub local_endpoints: usize,
}

/// Health checks by port.
pub type Table = BTreeMap<u16, HealthCheck>;

/// The port on which `svc` asks this node for a health check: `Ok(None)` when it asks for
/// none (as kube-proxy's `NeedsHealthCheck`: type `LoadBalancer` with
/// `externalTrafficPolicy: Local`, and a Service kube-proxy proxies at all: an IPv4
/// ClusterIP, at least one port, no `service-proxy-name` label), `Err` with the reason
/// when it asks for one that cannot be served (no or an invalid `healthCheckNodePort`;
/// an apiserver always allocates one, a hand-written manifest may lack it).
pub fn health_check_node_port(svc: &CompactService) -> Result<Option<u16>, String> {
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(None);
    };
    if spec.type_.as_deref() != Some("LoadBalancer")
        || spec.external_traffic_policy.as_deref() != Some("Local")
        || spec.ports.as_ref().is_none_or(Vec::is_empty)
        || svc.other_proxy
    {
        return Ok(None);
    }
    let ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) => vec![ip.as_str()],
        _ => Vec::new(),
    };
    if ips.iter().any(|ip| ip.eq_ignore_ascii_case("None"))
        || !ips.iter().any(|ip| ip.parse::<Ipv4Addr>().is_ok())
    {
        return Ok(None);
    }
    match spec.health_check_node_port {
        None | Some(0) => Err("type LoadBalancer with externalTrafficPolicy Local has no \
                               spec.healthCheckNodePort; no health check is served for it"
            .to_owned()),
        Some(p) => match u16::try_from(p) {
            Ok(port) => Ok(Some(port)),
            Err(_) => Err(format!(
                "healthCheckNodePort {p} is not a valid port; no health check is served for it"
            )),
        },
    }
}

/// The number of distinct IPs among the ready endpoints on node `node` of one Service,
/// given its EndpointSlices (as [`CompactSlice::service`] assigns them) or, when it has
/// none, its v1 Endpoints (read as the mirroring controller would turn them into a slice).
///
/// As kube-proxy reads slices: IPv4 slices only; ports without a number (or 0) carry no
/// endpoint (a port without a name is the unnamed one, as the API defaults it); an endpoint
/// is its first address; `ready` absent counts as ready; an endpoint listed twice for the
/// same port (two slices) counts with a non-terminating entry over a terminating one.
/// Terminating endpoints are not ready, so they never count.
pub fn local_ready_endpoints<'a>(
    slices: impl IntoIterator<Item = &'a CompactSlice>,
    endpoints: Option<&Endpoints>,
    node: &str,
) -> usize {
    if node.is_empty() {
        return 0;
    }
    let mut slices = slices.into_iter().peekable();
    if slices.peek().is_none() {
        return endpoints.map_or(0, |e| local_ready_addresses(e, node));
    }
    /// What the entries for one (port, IP) say.
    #[derive(Default)]
    struct Seen {
        /// A non-terminating entry exists.
        live: bool,
        /// A non-terminating entry is local and ready.
        live_counts: bool,
        /// A terminating entry is local and ready (only used without a live one).
        terminating_counts: bool,
    }
    let mut seen: BTreeMap<(&str, &str, i32, Ipv4Addr), Seen> = BTreeMap::new();
    // Compact slices hold IPv4 endpoints only, each its first address with its conditions
    // resolved, and ports with a number (see `crate::slices`).
    for slice in slices {
        for port in &slice.ports {
            let (name, proto) = (&*port.name, port.protocol.as_str());
            for ep in &slice.endpoints {
                let counts = ep.ready && ep.is_on(node);
                let s = seen.entry((name, proto, port.port, ep.addr)).or_default();
                if ep.terminating {
                    s.terminating_counts |= counts;
                } else {
                    s.live = true;
                    s.live_counts |= counts;
                }
            }
        }
    }
    let counted: BTreeSet<Ipv4Addr> = seen
        .into_iter()
        .filter(|(_, s)| {
            if s.live {
                s.live_counts
            } else {
                s.terminating_counts
            }
        })
        .map(|((.., ip), _)| ip)
        .collect();
    counted.len()
}

/// [`local_ready_endpoints`] for a Service without slices: the ready addresses on `node`
/// of the subsets that have a usable port.
fn local_ready_addresses(endpoints: &Endpoints, node: &str) -> usize {
    let mut ips = BTreeSet::new();
    for subset in endpoints.subsets.iter().flatten() {
        if !subset.ports.iter().flatten().any(|p| p.port != 0) {
            continue;
        }
        for a in subset.addresses.iter().flatten() {
            if a.node_name.as_deref() == Some(node)
                && let Ok(ip) = a.ip.parse::<Ipv4Addr>()
            {
                ips.insert(ip);
            }
        }
    }
    ips.len()
}

/// The table the node `node` serves for these objects, and the problems found: the
/// reference that [`HealthChecks`] keeps up to date incrementally. Objects are keyed by
/// their namespace and name.
pub fn desired_table<'a>(
    services: impl IntoIterator<Item = &'a CompactService>,
    slices: impl IntoIterator<Item = &'a CompactSlice>,
    endpoints: impl IntoIterator<Item = &'a Endpoints>,
    node: &str,
) -> (Table, BTreeSet<Problem>) {
    let key = |m: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        (
            m.namespace.as_deref().unwrap_or_default(),
            m.name.as_deref().unwrap_or_default(),
        )
    };
    let mut slices_of: BTreeMap<(&str, &str), Vec<&CompactSlice>> = BTreeMap::new();
    for slice in slices {
        if let Some(service) = slice.service() {
            slices_of
                .entry((&slice.namespace, service))
                .or_default()
                .push(slice);
        }
    }
    let endpoints: BTreeMap<(&str, &str), &Endpoints> = endpoints
        .into_iter()
        .map(|e| (key(&e.metadata), e))
        .collect();
    let mut claims: Claims = BTreeMap::new();
    let mut problems = BTreeSet::new();
    for svc in services {
        let (ns, name) = (&*svc.namespace, &*svc.name);
        match health_check_node_port(svc) {
            Ok(None) => {}
            Ok(Some(port)) => {
                let count = local_ready_endpoints(
                    slices_of.get(&(ns, name)).into_iter().flatten().copied(),
                    endpoints.get(&(ns, name)).copied(),
                    node,
                );
                claims
                    .entry(port)
                    .or_default()
                    .insert((ns.to_owned(), name.to_owned()), count);
            }
            Err(reason) => {
                problems.insert(Problem::new(ObjectRef::new("Service", ns, name), reason));
            }
        }
    }
    problems.extend(clash_problems(&claims));
    (settle(&claims), problems)
}

/// The Services asking for each port, with their counts.
type Claims = BTreeMap<u16, BTreeMap<Key, usize>>;

/// Each port's health check: the claimant whose key sorts first.
fn settle(claims: &Claims) -> Table {
    claims
        .iter()
        .filter_map(|(port, claimants)| {
            let ((ns, name), count) = claimants.first_key_value()?;
            Some((
                *port,
                HealthCheck {
                    namespace: ns.clone(),
                    name: name.clone(),
                    local_endpoints: *count,
                },
            ))
        })
        .collect()
}

/// One problem for every claimant of a port but the first, naming the first.
fn clash_problems(claims: &Claims) -> impl Iterator<Item = Problem> + '_ {
    claims.iter().flat_map(|(port, claimants)| {
        let mut keys = claimants.keys();
        let winner = keys
            .next()
            .map(|(ns, name)| ObjectRef::new("Service", ns, name));
        keys.map(move |(ns, name)| {
            let winner = winner.as_ref().map(ToString::to_string).unwrap_or_default();
            Problem::new(
                ObjectRef::new("Service", ns, name),
                format!(
                    "healthCheckNodePort {port} is already used by {winner}; no health check \
                     is served for this Service on this node"
                ),
            )
        })
    })
}

/// Where [`HealthChecks::update`] reads the current objects, whatever container the
/// source keeps them in.
pub trait ObjectLookup {
    /// The Service `key`, if it exists.
    fn service(&self, key: &Key) -> Option<&CompactService>;
    /// The EndpointSlice `key`, if it exists.
    fn endpoint_slice(&self, key: &Key) -> Option<&CompactSlice>;
    /// The v1 Endpoints `key`, if they exist.
    fn endpoints(&self, key: &Key) -> Option<&Endpoints>;
}

impl ObjectLookup for Objects {
    fn service(&self, key: &Key) -> Option<&CompactService> {
        self.services.get(key).map(Borrow::<CompactService>::borrow)
    }
    fn endpoint_slice(&self, key: &Key) -> Option<&CompactSlice> {
        self.endpoint_slices
            .get(key)
            .map(Borrow::<CompactSlice>::borrow)
    }
    fn endpoints(&self, key: &Key) -> Option<&Endpoints> {
        self.endpoints.get(key).map(Borrow::<Endpoints>::borrow)
    }
}

/// [`desired_table`] kept up to date one Service at a time: after every
/// [`HealthChecks::update`], [`HealthChecks::table`] and [`HealthChecks::problems`] are
/// what `desired_table` gives for the same objects.
///
/// It keeps its own index of which EndpointSlices belong to which Service (keys only), so
/// that a changed slice costs a lookup, and only Services that ask for a health check have
/// their endpoints counted.
#[derive(Debug, Clone, Default)]
pub struct HealthChecks {
    node: String,
    /// The port and count of each Service that asks for a health check.
    wanted: BTreeMap<Key, (u16, usize)>,
    /// Services that ask for one that cannot be served, and why.
    invalid: BTreeMap<Key, String>,
    /// The Services asking for each port, with their counts.
    claims: Claims,
    /// Which EndpointSlices belong to which Service.
    slices: SliceIndex,
}

impl HealthChecks {
    /// Health checks of node `node`, for no objects yet.
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            ..Self::default()
        }
    }

    /// Brings the table to `objects`, given the keys of the Services, EndpointSlices and
    /// v1 Endpoints that changed since the previous call (every changed key must be named;
    /// naming more only costs time; the first call names every object).
    pub fn update<'k>(
        &mut self,
        objects: &impl ObjectLookup,
        services: impl IntoIterator<Item = &'k Key>,
        slices: impl IntoIterator<Item = &'k Key>,
        endpoints: impl IntoIterator<Item = &'k Key>,
    ) {
        let mut dirty: BTreeSet<Key> = services.into_iter().cloned().collect();
        dirty.extend(endpoints.into_iter().cloned());
        for key in slices {
            let owner = objects.endpoint_slice(key).and_then(CompactSlice::service);
            self.slices.update(key, owner, &mut dirty);
        }
        for key in dirty {
            self.recompute(objects, key);
        }
    }

    /// [`HealthChecks::update`] for the keys a [`ChangedKeys`] names.
    pub fn update_changed(&mut self, objects: &Objects, changed: &ChangedKeys) {
        self.update(
            objects,
            &changed.services,
            &changed.endpoint_slices,
            &changed.endpoints,
        );
    }

    fn recompute(&mut self, objects: &impl ObjectLookup, key: Key) {
        if let Some((port, _)) = self.wanted.remove(&key)
            && let Entry::Occupied(mut e) = self.claims.entry(port)
        {
            e.get_mut().remove(&key);
            if e.get().is_empty() {
                e.remove();
            }
        }
        self.invalid.remove(&key);
        let Some(svc) = objects.service(&key) else {
            return;
        };
        match health_check_node_port(svc) {
            Ok(None) => {}
            Ok(Some(port)) => {
                let slices = self
                    .slices
                    .slices_of(&key)
                    .filter_map(|s| objects.endpoint_slice(&s));
                let count = local_ready_endpoints(slices, objects.endpoints(&key), &self.node);
                self.claims
                    .entry(port)
                    .or_default()
                    .insert(key.clone(), count);
                self.wanted.insert(key, (port, count));
            }
            Err(reason) => {
                self.invalid.insert(key, reason);
            }
        }
    }

    /// The health checks to serve, by port.
    pub fn table(&self) -> Table {
        settle(&self.claims)
    }

    /// What cannot be served, and why: Services without a usable port, and the Services
    /// that lost a port to another.
    pub fn problems(&self) -> impl Iterator<Item = Problem> + '_ {
        self.invalid
            .iter()
            .map(|((ns, name), reason)| {
                Problem::new(ObjectRef::new("Service", ns, name), reason.clone())
            })
            .chain(clash_problems(&self.claims))
    }
}

/// The addresses the health checks listen on, as kube-proxy chooses them: every address
/// (`0.0.0.0`) unless `--nodeport-addresses` selects fewer, then the node's addresses it
/// selects (`addrs`, `primary`: the node's addresses and its primary one, read at start).
pub fn bind_addresses(
    selection: Option<&NodePortAddresses>,
    addrs: &[Ipv4Addr],
    primary: Option<Ipv4Addr>,
) -> Vec<Ipv4Addr> {
    match selection {
        None | Some(NodePortAddresses::All) => vec![Ipv4Addr::UNSPECIFIED],
        Some(NodePortAddresses::Within(cidrs)) if cidrs.iter().any(|c| c.len == 0) => {
            vec![Ipv4Addr::UNSPECIFIED]
        }
        Some(selection) => selection.select(addrs, primary).into_iter().collect(),
    }
}

/// The JSON body kube-proxy answers with (tab-indented, no final newline).
pub fn body(check: &HealthCheck, healthy: bool) -> String {
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\
         \"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        quote(&check.namespace),
        quote(&check.name),
        check.local_endpoints,
    )
}

/// The answer on a port: `None` when the port is being closed (no Service any more).
fn respond(check: Option<&HealthCheck>, healthy: bool) -> Response {
    let Some(check) = check else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let status = if check.local_endpoints > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (ENDPOINT_WEIGHT, HeaderValue::from(check.local_endpoints)),
    ];
    (status, headers, body(check, healthy)).into_response()
}

/// Whether the agent counts as healthy (`serviceProxyHealthy`).
pub type HealthProbe = Arc<dyn Fn() -> bool + Send + Sync>;

/// What every listener reads when it answers.
struct Shared {
    table: watch::Receiver<Table>,
    healthy: HealthProbe,
}

async fn answer(State((port, shared)): State<(u16, Arc<Shared>)>) -> Response {
    let healthy = (shared.healthy)();
    let table = shared.table.borrow();
    respond(table.get(&port), healthy)
}

/// Aborts a task when dropped.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The listeners of the health checks, in a task of their own: [`Server::set`] hands it the
/// table, and it opens, keeps and closes listeners to match. Dropping the server closes
/// them all.
pub struct Server {
    tx: watch::Sender<Table>,
    _task: Task,
}

impl Server {
    /// Starts serving (nothing yet) on `addrs`, answering `serviceProxyHealthy` from
    /// `healthy`, and trying ports that could not be bound again every `retry_every`.
    pub fn start(addrs: Vec<Ipv4Addr>, healthy: HealthProbe, retry_every: Duration) -> Self {
        let (tx, rx) = watch::channel(Table::new());
        let shared = Arc::new(Shared {
            table: rx.clone(),
            healthy,
        });
        let task = tokio::spawn(manage(rx, addrs, shared, retry_every));
        Self {
            tx,
            _task: Task(task),
        }
    }

    /// Serves `table` from now on.
    pub fn set(&self, table: Table) {
        self.tx.send_if_modified(|current| {
            let changed = *current != table;
            if changed {
                *current = table;
            }
            changed
        });
    }
}

/// A port being served.
struct Open {
    owner: Key,
    _servers: Vec<Task>,
}

/// A port that could not be bound, as last reported.
#[derive(PartialEq, Eq)]
struct Failed {
    owner: Key,
    error: String,
}

async fn manage(
    mut rx: watch::Receiver<Table>,
    addrs: Vec<Ipv4Addr>,
    shared: Arc<Shared>,
    retry_every: Duration,
) {
    let mut open: BTreeMap<u16, Open> = BTreeMap::new();
    let mut failed: BTreeMap<u16, Failed> = BTreeMap::new();
    loop {
        let wanted: BTreeMap<u16, Key> = rx
            .borrow_and_update()
            .iter()
            .map(|(port, c)| (*port, (c.namespace.clone(), c.name.clone())))
            .collect();
        open.retain(|port, o| {
            let keep = wanted.contains_key(port);
            if !keep {
                info!(service = %svc_ref(&o.owner), port, "closed the health check");
            }
            keep
        });
        failed.retain(|port, _| wanted.contains_key(port));
        for (port, owner) in wanted {
            if let Some(o) = open.get_mut(&port) {
                if o.owner != owner {
                    info!(from = %svc_ref(&o.owner), to = %svc_ref(&owner), port, "health check handed over");
                    o.owner = owner;
                }
                continue;
            }
            match listen(&addrs, port).await {
                Ok(listeners) => {
                    let servers = listeners
                        .into_iter()
                        .map(|l| {
                            let app = Router::new()
                                .fallback(answer)
                                .with_state((port, shared.clone()));
                            Task(tokio::spawn(async move {
                                if let Err(e) = axum::serve(l, app).await {
                                    warn!(port, error = %e, "health check server stopped");
                                }
                            }))
                        })
                        .collect();
                    let again = failed.remove(&port).is_some();
                    info!(
                        service = %svc_ref(&owner),
                        port,
                        addresses = ?addrs,
                        "{}",
                        if again { "serving the health check now" } else { "serving the health check" }
                    );
                    open.insert(
                        port,
                        Open {
                            owner,
                            _servers: servers,
                        },
                    );
                }
                Err((addr, e)) => {
                    let now = Failed {
                        owner,
                        error: format!("cannot listen on {addr}: {e}"),
                    };
                    if failed.get(&port) != Some(&now) {
                        warn!(
                            "{}: healthCheckNodePort {port}: {}; trying again every {}s",
                            svc_ref(&now.owner),
                            now.error,
                            retry_every.as_secs_f64()
                        );
                    }
                    failed.insert(port, now);
                }
            }
        }
        let retry = tokio::time::sleep(retry_every);
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = retry, if !failed.is_empty() => {}
        }
    }
}

/// Binds `port` on every address, or none of them: the address that failed and why.
async fn listen(
    addrs: &[Ipv4Addr],
    port: u16,
) -> Result<Vec<tokio::net::TcpListener>, (SocketAddr, std::io::Error)> {
    let mut out = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let at = SocketAddr::V4(SocketAddrV4::new(*addr, port));
        // On failure the ones bound so far are dropped (closed) with `out`.
        out.push(
            tokio::net::TcpListener::bind(at)
                .await
                .map_err(|e| (at, e))?,
        );
    }
    Ok(out)
}

fn svc_ref((ns, name): &Key) -> ObjectRef {
    ObjectRef::new("Service", ns, name)
}

/// The agent's health checks: the table kept from the objects, and the server answering
/// it on this node.
pub struct Manager {
    checks: HealthChecks,
    server: Server,
}

impl Manager {
    /// Starts the health checks of node `node`, on the addresses `nodeport_addresses`
    /// selects now, answering `serviceProxyHealthy` from `telemetry`. Needs a tokio
    /// runtime.
    pub fn start(
        node: &str,
        nodeport_addresses: Option<&NodePortAddresses>,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        let (addrs, primary) = crate::datapath::node_addresses();
        let bind = bind_addresses(nodeport_addresses, &addrs, primary);
        if bind.is_empty() {
            warn!(
                "--nodeport-addresses selects none of this node's addresses: health checks on \
                 healthCheckNodePorts are not served"
            );
        }
        let healthy: HealthProbe = Arc::new(move || telemetry.healthy());
        Self {
            checks: HealthChecks::new(node),
            server: Server::start(bind, healthy, RETRY_EVERY),
        }
    }

    /// Follows `objects` after the keys in `changed` changed (on the first call: every
    /// key).
    pub fn update_changed(&mut self, objects: &Objects, changed: &ChangedKeys) {
        self.checks.update_changed(objects, changed);
        self.server.set(self.checks.table());
    }

    /// See [`HealthChecks::problems`].
    pub fn problems(&self) -> impl Iterator<Item = Problem> + '_ {
        self.checks.problems()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use k8s_openapi::api::core::v1::{EndpointAddress, EndpointPort, EndpointSubset};

    use super::*;
    use crate::model::fixtures::{Slice, Svc, slice, svc};

    const NODE: &str = "node-a";

    /// A LoadBalancer Service with `externalTrafficPolicy: Local` and health-check port
    /// `port`.
    fn lb_local(ns: &str, name: &str, port: i32) -> Svc {
        let mut s = svc(ns, name)
            .cluster_ip("10.96.0.10")
            .port("http", 80, "TCP", "8080")
            .node_port(30080)
            .type_("LoadBalancer")
            .etp("Local");
        s.0.spec.as_mut().unwrap().health_check_node_port = Some(port);
        s
    }

    /// Test objects in plain maps (the agent's own container may differ).
    #[derive(Default, Clone)]
    struct World {
        services: BTreeMap<Key, CompactService>,
        slices: BTreeMap<Key, CompactSlice>,
        endpoints: BTreeMap<Key, Endpoints>,
    }

    fn key_of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
        (m.namespace.clone().unwrap(), m.name.clone().unwrap())
    }

    impl World {
        fn svc(mut self, s: Svc) -> Self {
            self.services
                .insert(key_of(&s.0.metadata), CompactService::from(&s.0));
            self
        }
        fn slice(mut self, s: Slice) -> Self {
            self.slices
                .insert(key_of(&s.0.metadata), CompactSlice::from(&s.0));
            self
        }
        fn table(&self) -> (Table, BTreeSet<Problem>) {
            desired_table(
                self.services.values(),
                self.slices.values(),
                self.endpoints.values(),
                NODE,
            )
        }
    }

    impl ObjectLookup for World {
        fn service(&self, key: &Key) -> Option<&CompactService> {
            self.services.get(key)
        }
        fn endpoint_slice(&self, key: &Key) -> Option<&CompactSlice> {
            self.slices.get(key)
        }
        fn endpoints(&self, key: &Key) -> Option<&Endpoints> {
            self.endpoints.get(key)
        }
    }

    fn check(ns: &str, name: &str, n: usize) -> HealthCheck {
        HealthCheck {
            namespace: ns.to_owned(),
            name: name.to_owned(),
            local_endpoints: n,
        }
    }

    fn web_slice() -> Slice {
        slice("default", "web-1", "web").port("http", 8080, "TCP")
    }

    #[test]
    fn counts_this_nodes_ready_endpoints() {
        let w = World::default()
            .svc(lb_local("default", "web", 32000))
            .slice(
                web_slice()
                    .ready("10.0.0.1")
                    .on(NODE)
                    .ready("10.0.0.2")
                    .on(NODE)
                    .ready("10.0.1.1")
                    .on("node-b"),
            );
        let (table, problems) = w.table();
        assert_eq!(table, Table::from([(32000, check("default", "web", 2))]));
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn not_ready_and_remote_endpoints_do_not_count() {
        let w = World::default()
            .svc(lb_local("default", "web", 32000))
            .slice(
                web_slice()
                    .endpoint_with("10.0.0.1", Some(false), Some(false), Some(false))
                    .on(NODE)
                    .ready("10.0.1.1")
                    .on("node-b")
                    .ready("10.0.1.2"), // no nodeName: not local
            );
        assert_eq!(
            w.table().0,
            Table::from([(32000, check("default", "web", 0))]),
            "still served, with 0 (503)"
        );
    }

    #[test]
    fn serving_terminating_endpoints_do_not_count_even_when_they_are_the_only_ones() {
        // kube-proxy counts ready endpoints only, so that load balancers drain a node whose
        // pods are terminating, although the datapath still serves them.
        let w = World::default()
            .svc(lb_local("default", "web", 32000))
            .slice(
                web_slice()
                    .endpoint_with("10.0.0.1", Some(false), Some(true), Some(true))
                    .on(NODE)
                    .endpoint_with("10.0.0.2", None, None, Some(true))
                    .on(NODE),
            );
        // The second has `ready` absent (counted as ready by kube-proxy) but is
        // terminating: an invalid combination the API never produces; it counts, as in
        // kube-proxy, which reads `ready` alone.
        assert_eq!(w.table().0[&32000].local_endpoints, 1);
        let w = World::default()
            .svc(lb_local("default", "web", 32000))
            .slice(
                web_slice()
                    .endpoint_with("10.0.0.1", Some(false), Some(true), Some(true))
                    .on(NODE),
            );
        assert_eq!(w.table().0[&32000].local_endpoints, 0);
    }

    #[test]
    fn an_ip_counts_once_across_ports_and_slices() {
        let w = World::default()
            .svc(lb_local("default", "web", 32000))
            .slice(
                web_slice()
                    .port("metrics", 9090, "TCP")
                    .ready("10.0.0.1")
                    .on(NODE),
            )
            .slice(
                slice("default", "web-2", "web")
                    .port("http", 8080, "TCP")
                    .ready("10.0.0.1")
                    .on(NODE)
                    .ready("10.0.0.3")
                    .on(NODE),
            );
        assert_eq!(w.table().0[&32000].local_endpoints, 2);
    }

    #[test]
    fn a_live_entry_wins_over_a_terminating_one_for_the_same_endpoint() {
        // The IP was reused by a new pod (not ready yet) while the old one terminates.
        let w = World::default()
            .svc(lb_local("default", "web", 32000))
            .slice(
                web_slice()
                    .endpoint_with("10.0.0.1", Some(true), Some(true), Some(true))
                    .on(NODE),
            )
            .slice(
                slice("default", "web-2", "web")
                    .port("http", 8080, "TCP")
                    .endpoint_with("10.0.0.1", Some(false), Some(false), Some(false))
                    .on(NODE),
            );
        assert_eq!(w.table().0[&32000].local_endpoints, 0);
    }

    #[test]
    fn slices_kube_proxy_ignores_carry_no_endpoint() {
        let w = World::default()
            .svc(lb_local("default", "web", 32000))
            // No port number.
            .slice(
                slice("default", "web-1", "web")
                    .raw_port(Some("http"), None, Some("TCP"))
                    .ready("10.0.0.1")
                    .on(NODE),
            )
            // IPv6.
            .slice(
                slice("default", "web-2", "web")
                    .address_type("IPv6")
                    .port("http", 8080, "TCP")
                    .ready("fd00::1")
                    .on(NODE),
            )
            // Another proxy's.
            .slice(
                slice("default", "web-3", "web")
                    .label(crate::model::LABEL_SERVICE_PROXY_NAME, "other")
                    .port("http", 8080, "TCP")
                    .ready("10.0.0.3")
                    .on(NODE),
            );
        assert_eq!(w.table().0[&32000].local_endpoints, 0);
    }

    #[test]
    fn v1_endpoints_are_read_when_the_service_has_no_slice() {
        let addr = |ip: &str, node: &str| EndpointAddress {
            ip: ip.to_owned(),
            node_name: Some(node.to_owned()),
            ..Default::default()
        };
        let mut w = World::default().svc(lb_local("default", "web", 32000));
        w.endpoints.insert(
            ("default".into(), "web".into()),
            Endpoints {
                metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                    namespace: Some("default".into()),
                    name: Some("web".into()),
                    ..Default::default()
                },
                subsets: Some(vec![EndpointSubset {
                    addresses: Some(vec![addr("10.0.0.1", NODE), addr("10.0.1.1", "node-b")]),
                    not_ready_addresses: Some(vec![addr("10.0.0.2", NODE)]),
                    ports: Some(vec![EndpointPort {
                        port: 8080,
                        ..Default::default()
                    }]),
                }]),
            },
        );
        assert_eq!(w.table().0[&32000].local_endpoints, 1);
        // A slice takes over from the Endpoints.
        let w = w.slice(
            web_slice()
                .ready("10.0.0.5")
                .on(NODE)
                .ready("10.0.0.6")
                .on(NODE),
        );
        assert_eq!(w.table().0[&32000].local_endpoints, 2);
    }

    #[test]
    fn only_load_balancers_with_a_local_external_policy_get_one() {
        let ready = || web_slice().ready("10.0.0.1").on(NODE);
        let cases: Vec<(&str, Svc)> = vec![
            (
                "ETP Cluster",
                lb_local("default", "web", 32000).etp("Cluster"),
            ),
            ("ETP absent", {
                let mut s = lb_local("default", "web", 32000);
                s.0.spec.as_mut().unwrap().external_traffic_policy = None;
                s
            }),
            (
                "NodePort",
                lb_local("default", "web", 32000).type_("NodePort"),
            ),
            (
                "headless",
                lb_local("default", "web", 32000).cluster_ip("None"),
            ),
            (
                "IPv6 only",
                lb_local("default", "web", 32000).cluster_ip("fd00::10"),
            ),
            (
                "another proxy's",
                lb_local("default", "web", 32000)
                    .label(crate::model::LABEL_SERVICE_PROXY_NAME, "other"),
            ),
            ("no ports", {
                let mut s = lb_local("default", "web", 32000);
                s.0.spec.as_mut().unwrap().ports = None;
                s
            }),
        ];
        for (what, s) in cases {
            let (table, problems) = World::default().svc(s).slice(ready()).table();
            assert!(table.is_empty(), "{what}: {table:?}");
            assert!(problems.is_empty(), "{what}: {problems:?}");
        }
    }

    #[test]
    fn a_missing_or_invalid_port_is_reported() {
        for (port, needle) in [
            (0, "has no spec.healthCheckNodePort"),
            (70_000, "70000 is not a valid port"),
            (-1, "-1 is not a valid port"),
        ] {
            let (table, problems) = World::default()
                .svc(lb_local("default", "web", port))
                .table();
            assert!(table.is_empty());
            let p: Vec<String> = problems.iter().map(ToString::to_string).collect();
            assert_eq!(p.len(), 1, "{p:?}");
            assert!(p[0].starts_with("Service default/web: "), "{}", p[0]);
            assert!(p[0].contains(needle), "{}", p[0]);
        }
    }

    #[test]
    fn a_clash_goes_to_the_first_service_and_names_both() {
        let w = World::default()
            .svc(lb_local("default", "b", 32000))
            .svc(lb_local("default", "a", 32000))
            .svc(lb_local("default", "c", 32001));
        let (table, problems) = w.table();
        assert_eq!(
            table,
            Table::from([
                (32000, check("default", "a", 0)),
                (32001, check("default", "c", 0)),
            ])
        );
        let p: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            p,
            [
                "Service default/b: healthCheckNodePort 32000 is already used by Service \
              default/a; no health check is served for this Service on this node"
            ]
        );
    }

    /// Every key of both worlds: what a caller that cannot tell what changed names.
    fn all_keys(a: &World, b: &World) -> (Vec<Key>, Vec<Key>, Vec<Key>) {
        let keys = |x: Vec<&Key>, y: Vec<&Key>| -> Vec<Key> {
            x.into_iter()
                .chain(y)
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        (
            keys(a.services.keys().collect(), b.services.keys().collect()),
            keys(a.slices.keys().collect(), b.slices.keys().collect()),
            keys(a.endpoints.keys().collect(), b.endpoints.keys().collect()),
        )
    }

    /// Keys whose object differs between `a` and `b`.
    fn changed_keys(a: &World, b: &World) -> (Vec<Key>, Vec<Key>, Vec<Key>) {
        fn diff<V: PartialEq>(x: &BTreeMap<Key, V>, y: &BTreeMap<Key, V>) -> Vec<Key> {
            x.keys()
                .chain(y.keys())
                .filter(|k| x.get(*k) != y.get(*k))
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        }
        (
            diff(&a.services, &b.services),
            diff(&a.slices, &b.slices),
            diff(&a.endpoints, &b.endpoints),
        )
    }

    fn assert_matches_reference(cache: &HealthChecks, w: &World, what: &str) {
        let (table, problems) = w.table();
        assert_eq!(cache.table(), table, "{what}: table");
        assert_eq!(
            cache.problems().collect::<BTreeSet<_>>(),
            problems,
            "{what}: problems"
        );
    }

    #[test]
    fn the_cache_follows_changes_like_the_reference() {
        let w0 = World::default();
        let w1 = World::default()
            .svc(lb_local("default", "a", 32000))
            .svc(lb_local("default", "b", 32000))
            .svc(svc("default", "plain").cluster_ip("10.96.0.11"))
            .slice(web_slice().ready("10.0.0.9").on(NODE))
            .slice(
                slice("default", "a-1", "a")
                    .port("http", 8080, "TCP")
                    .ready("10.0.0.1")
                    .on(NODE),
            )
            .slice(
                slice("default", "b-1", "b")
                    .port("http", 8080, "TCP")
                    .ready("10.0.0.2")
                    .on(NODE),
            );
        // Scale a up; the clash ends when a goes; b's slice moves to Service c.
        let w2 = w1.clone().slice(
            slice("default", "a-1", "a")
                .port("http", 8080, "TCP")
                .ready("10.0.0.1")
                .on(NODE)
                .ready("10.0.0.3")
                .on(NODE),
        );
        let w3 = {
            let mut w = w2.clone();
            w.services.remove(&("default".into(), "a".into()));
            w.svc(lb_local("default", "c", 32005)).slice(
                slice("default", "b-1", "c")
                    .port("http", 8080, "TCP")
                    .ready("10.0.0.2")
                    .on(NODE),
            )
        };
        let w4 = w3.clone().svc(lb_local("default", "b", 0));
        let steps = [w0, w1, w2, w3, w4];
        let mut cache = HealthChecks::new(NODE);
        for (i, pair) in steps.windows(2).enumerate() {
            let (s, l, e) = changed_keys(&pair[0], &pair[1]);
            cache.update(&pair[1], &s, &l, &e);
            assert_matches_reference(&cache, &pair[1], &format!("step {}", i + 1));
        }
        // Naming every key gives the same.
        let mut full = HealthChecks::new(NODE);
        let last = steps.last().unwrap();
        let (s, l, e) = all_keys(&World::default(), last);
        full.update(last, &s, &l, &e);
        assert_matches_reference(&full, last, "from scratch");
        assert_eq!(
            cache.table(),
            Table::from([(32005, check("default", "c", 1))])
        );
    }

    #[test]
    fn bind_addresses_follow_nodeport_addresses_like_kube_proxy() {
        let addrs = [
            Ipv4Addr::new(127, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 5),
            Ipv4Addr::new(192, 168, 1, 5),
        ];
        let primary = Some(Ipv4Addr::new(10, 0, 0, 5));
        let sel = |s: &str| NodePortAddresses::parse(s).unwrap();
        assert_eq!(
            bind_addresses(None, &addrs, primary),
            [Ipv4Addr::UNSPECIFIED]
        );
        assert_eq!(
            bind_addresses(Some(&sel("0.0.0.0/0")), &addrs, primary),
            [Ipv4Addr::UNSPECIFIED]
        );
        assert_eq!(
            bind_addresses(Some(&sel("192.168.0.0/16,127.0.0.0/8")), &addrs, primary),
            [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(192, 168, 1, 5)]
        );
        assert_eq!(
            bind_addresses(Some(&sel("primary")), &addrs, primary),
            [Ipv4Addr::new(10, 0, 0, 5)]
        );
        assert!(bind_addresses(Some(&sel("172.16.0.0/12")), &addrs, primary).is_empty());
    }

    #[test]
    fn the_body_is_kube_proxys() {
        assert_eq!(
            body(&check("default", "web", 2), true),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\
             \t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let v: serde_json::Value =
            serde_json::from_str(&body(&check("ns", "x", 0), false)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"service": {"namespace": "ns", "name": "x"},
                               "localEndpoints": 0, "serviceProxyHealthy": false})
        );
    }

    /// `GET path` on 127.0.0.1:`port`: the status line's code and the whole response.
    async fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
        use std::io::{Read, Write};
        let request = format!("GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n");
        let out = tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(request.as_bytes())?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok::<_, std::io::Error>(out)
        })
        .await
        .expect("client thread")?;
        let code = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_default();
        Ok((code, out))
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    async fn eventually<F: Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
        for _ in 0..200 {
            if f().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn the_server_answers_opens_and_closes_ports_and_retries_a_busy_one() {
        let healthy = Arc::new(AtomicBool::new(true));
        let probe: HealthProbe = {
            let healthy = healthy.clone();
            Arc::new(move || healthy.load(Ordering::Relaxed))
        };
        let server = Server::start(vec![Ipv4Addr::LOCALHOST], probe, Duration::from_millis(50));
        let (p1, p2) = (free_port(), free_port());
        // p2 is taken by someone else at first.
        let squatter = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, p2)).unwrap();
        server.set(Table::from([
            (p1, check("default", "web", 2)),
            (p2, check("default", "other", 1)),
        ]));
        eventually("p1 to answer", || async { get(p1, "/").await.is_ok() }).await;
        let (code, text) = get(p1, "/any/path?x=1").await.unwrap();
        assert_eq!(code, 200, "{text}");
        let lower = text.to_ascii_lowercase();
        assert!(lower.contains("content-type: application/json"), "{text}");
        assert!(lower.contains("x-content-type-options: nosniff"), "{text}");
        assert!(
            lower.contains("x-load-balancing-endpoint-weight: 2"),
            "{text}"
        );
        assert!(
            text.ends_with(&body(&check("default", "web", 2), true)),
            "{text}"
        );

        // The count, then the agent's own health, turn it to 503.
        server.set(Table::from([
            (p1, check("default", "web", 0)),
            (p2, check("default", "other", 1)),
        ]));
        eventually("503 without local endpoints", || async {
            get(p1, "/healthz").await.map(|r| r.0).unwrap_or(0) == 503
        })
        .await;
        server.set(Table::from([
            (p1, check("default", "web", 3)),
            (p2, check("default", "other", 1)),
        ]));
        healthy.store(false, Ordering::Relaxed);
        let (code, text) = get(p1, "/").await.unwrap();
        assert_eq!(code, 503, "{text}");
        assert!(text.contains("\"serviceProxyHealthy\": false"), "{text}");
        healthy.store(true, Ordering::Relaxed);

        // The busy port is served once its holder lets go.
        drop(squatter);
        eventually("p2 to be retried", || async {
            get(p2, "/").await.map(|r| r.0).unwrap_or(0) == 200
        })
        .await;

        // Gone from the table: closed.
        server.set(Table::from([(p2, check("default", "other", 1))]));
        eventually("p1 to close", || async { get(p1, "/").await.is_err() }).await;
        drop(server);
        eventually("p2 to close with the server", || async {
            get(p2, "/").await.is_err()
        })
        .await;
    }
}
