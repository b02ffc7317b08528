//! The agent fed from the Kubernetes API: the in-repo fake apiserver runs in the test
//! process with its socket in the node namespace, the real agent watches it through a
//! kubeconfig, and Services created through the API (with `kubectl` when it is on PATH)
//! carry real traffic. Also the operator surface: `/healthz`, `/livez` and `/metrics`.
//!
//! Run as root: `cargo xtask test` (or `cargo test --release -p tests --test kube`).
use std::{
    collections::BTreeSet,
    io::{self, BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant, SystemTime},
};

use fake_apiserver::FakeApiServer;
use serde_json::{Value, json};
use tests::{
    agent::{Agent, http_get, series_value},
    netns::NetNs,
    require_root,
    servers::{self, Server},
    topology::{Host, Topology},
    wait_until,
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const OTHER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const FOREIGN_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const TIMEOUT: Duration = Duration::from_secs(3);
/// The agent's default `--healthz-bind-address` and `--metrics-bind-address` ports.
const HEALTHZ_PORT: u16 = 10256;
const METRICS_PORT: u16 = 10249;
/// How long the API server stays down in the outage test.
const OUTAGE: Duration = Duration::from_secs(30);

/// Fields drop in declaration order: agent first, then the apiserver and its runtime,
/// then servers and namespaces.
struct Env {
    agent: Agent,
    kubectl: Option<Kubectl>,
    api: FakeApiServer,
    _runtime: tokio::runtime::Runtime,
    _servers: Vec<Server>,
    topo: Topology,
}

/// One client, three pods serving TCP on 8080, the fake apiserver listening on the node's
/// loopback, and an agent watching it (ready once the empty initial lists are applied).
fn env() -> Env {
    env_with_args(&[])
}

/// [`env`], with more flags for the agent.
fn env_with_args(args: &[&str]) -> Env {
    require_root();
    let topo = Topology::new(1, 3);
    let servers = (1..=3)
        .map(|i| servers::tcp(&topo.pods[i - 1].ns, &format!("pod-{i}"), 8080))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = topo
        .node
        .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the fake apiserver in the node namespace");
    let api = {
        let _entered = runtime.enter();
        FakeApiServer::from_listener(listener).expect("fake apiserver")
    };
    let agent = Agent::start_with_kubeconfig_and_args(&topo.node, &api.kubeconfig(), args);
    let kubectl = Kubectl::find(&topo.node, &agent);
    Env {
        agent,
        kubectl,
        api,
        _runtime: runtime,
        _servers: servers,
        topo,
    }
}

/// `kubectl` run in the node namespace against the fake, with the agent's kubeconfig.
struct Kubectl {
    netns: String,
    kubeconfig: PathBuf,
    dir: PathBuf,
    files: AtomicU32,
}

impl Kubectl {
    /// `None` (with a note on stderr) when kubectl is not on PATH.
    fn find(node: &NetNs, agent: &Agent) -> Option<Self> {
        let found = Command::new("kubectl")
            .args(["version", "--client"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            eprintln!("kubectl is not on PATH: skipped; objects are written through the fake");
            return None;
        }
        Some(Self {
            netns: node.path(),
            kubeconfig: agent.dir.join("kubeconfig"),
            dir: agent.dir.clone(),
            files: AtomicU32::new(0),
        })
    }

    /// Runs kubectl with `args`; panics with its output if it fails.
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.netns))
            .arg("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("kubectl-cache"))
            .args(args)
            .output()
            .expect("run kubectl");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "kubectl {args:?} failed: {text}");
        text
    }

    /// Writes `object` to a fresh manifest file and returns its path.
    fn file(&self, object: &Value) -> String {
        let n = self.files.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("object-{n}.json"));
        std::fs::write(&path, object.to_string()).expect("write manifest");
        path.display().to_string()
    }
}

impl Env {
    /// Creates `object` as an operator would: `kubectl apply` (client-side).
    fn create(&self, object: &Value) {
        match &self.kubectl {
            Some(k) => {
                let out = k.run(&["apply", "--validate=false", "-f", &k.file(object)]);
                assert!(out.contains("created"), "{out}");
            }
            None => {
                self.api.upsert(object.clone()).expect("create");
            }
        }
    }

    /// Updates `object`: `kubectl apply --server-side`.
    fn update(&self, object: &Value) {
        match &self.kubectl {
            Some(k) => {
                let file = k.file(object);
                k.run(&["apply", "--server-side", "--validate=false", "-f", &file]);
            }
            None => {
                self.api.upsert(object.clone()).expect("update");
            }
        }
    }

    /// Deletes `object`: `kubectl delete`.
    fn remove(&self, object: &Value) {
        match &self.kubectl {
            Some(k) => {
                let out = k.run(&["delete", "-f", &k.file(object)]);
                assert!(out.contains("deleted"), "{out}");
            }
            None => {
                let kind = object["kind"].as_str().unwrap_or_default();
                let name = object["metadata"]["name"].as_str().unwrap_or_default();
                assert!(self.api.delete(kind, "default", name), "{kind} {name}");
            }
        }
    }

    fn client(&self) -> &Host {
        &self.topo.clients[0]
    }

    fn pod(&self, i: usize) -> &Host {
        &self.topo.pods[i]
    }
}

fn service_named(name: &str, ip: Ipv4Addr) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "clusterIP": ip.to_string(),
            "clusterIPs": [ip.to_string()],
            "ports": [{ "name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080 }],
        },
    })
}

fn service() -> Value {
    service_named("web", CLUSTER_IP)
}

/// An endpoint of `pod` with these conditions.
fn endpoint(pod: &Host, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({
        "addresses": [pod.ip.to_string()],
        "conditions": { "ready": ready, "serving": serving, "terminating": terminating },
    })
}

fn ready(pod: &Host) -> Value {
    endpoint(pod, true, true, false)
}

/// EndpointSlice `<service>-1` of `service` with `endpoints`.
fn slice_of(service: &str, endpoints: Vec<Value>) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-1"),
            "namespace": "default",
            "labels": { "kubernetes.io/service-name": service },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
    })
}

fn slice(pods: &[&Host]) -> Value {
    slice_of("web", pods.iter().map(|p| ready(p)).collect())
}

/// Connects from `client` and returns the name of the pod that greets.
fn hello(client: &Host, addr: Ipv4Addr, port: u16) -> io::Result<String> {
    client.ns.run(move || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from((addr, port)), TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut line = String::new();
        BufReader::new(&mut s).read_line(&mut line)?;
        Ok(line
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned())
    })
}

/// The pods that answer `n` new connections to `addr`:80 (failures count as `!error`).
fn answering(client: &Host, addr: Ipv4Addr, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|_| hello(client, addr, 80).unwrap_or_else(|e| format!("!{e}")))
        .collect()
}

fn only(pod: &str) -> BTreeSet<String> {
    BTreeSet::from([pod.to_owned()])
}

/// `/healthz` or `/livez` of the agent: (status, JSON body).
fn health(env: &Env, path: &str) -> (u16, Value) {
    let (status, body) = http_get(&env.topo.node, HEALTHZ_PORT, path).expect(path);
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    (status, json)
}

fn scrape(env: &Env) -> String {
    let (status, body) = http_get(&env.topo.node, METRICS_PORT, "/metrics").expect("/metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// `t` as RFC 3339 in UTC, as Kubernetes writes timestamps.
fn rfc3339(t: SystemTime) -> String {
    let d = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970");
    let secs = d.as_secs();
    // Days since 1970-01-01 to a civil date (proleptic Gregorian calendar).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

#[test]
fn service_created_through_the_api_carries_traffic() {
    let env = env();
    let client = env.client();
    env.api.upsert(service()).expect("create the Service");
    env.api
        .upsert(slice(&[env.pod(0)]))
        .expect("create the EndpointSlice");
    wait_until(
        "traffic to pod-1 through the ClusterIP",
        Duration::from_secs(1),
        || hello(client, CLUSTER_IP, 80).is_ok_and(|pod| pod == "pod-1"),
    );

    // A change to the slice moves new connections.
    env.api
        .upsert(slice(&[env.pod(1)]))
        .expect("update the EndpointSlice");
    wait_until(
        "traffic to pod-2 after the update",
        Duration::from_secs(1),
        || hello(client, CLUSTER_IP, 80).is_ok_and(|pod| pod == "pod-2"),
    );

    // Deleting the Service removes the frontend: connections are refused.
    assert!(env.api.delete("Service", "default", "web"));
    wait_until(
        "the ClusterIP to be refused",
        Duration::from_secs(1),
        || hello(client, CLUSTER_IP, 80).is_err(),
    );
    assert!(
        env.agent.log().contains("lb-agent ready"),
        "{}",
        env.agent.log()
    );
}

/// What an operator does with kubectl: create a Service and its EndpointSlice, scale the
/// endpoints up and down, delete both.
#[test]
fn kubectl_create_scale_and_delete() {
    let env = env();
    let client = env.client();
    env.create(&service());
    env.create(&slice(&[env.pod(0)]));
    wait_until(
        "pod-1 through the ClusterIP within a second of the create",
        Duration::from_secs(1),
        || hello(client, CLUSTER_IP, 80).is_ok_and(|pod| pod == "pod-1"),
    );

    env.update(&slice(&[env.pod(0), env.pod(1), env.pod(2)]));
    let mut seen = BTreeSet::new();
    wait_until(
        "all three pods to answer after scaling up",
        Duration::from_secs(10),
        || {
            seen.extend(hello(client, CLUSTER_IP, 80).ok());
            seen.len() == 3
        },
    );

    env.update(&slice(&[env.pod(1)]));
    wait_until(
        "only pod-2 to answer after scaling down",
        Duration::from_secs(5),
        || answering(client, CLUSTER_IP, 6) == only("pod-2"),
    );

    env.remove(&slice(&[env.pod(1)]));
    env.remove(&service());
    wait_until(
        "the ClusterIP to be refused after the delete",
        Duration::from_secs(2),
        || hello(client, CLUSTER_IP, 80).is_err(),
    );
}

/// Headless Services and Services of another proxy (`service.kubernetes.io/
/// service-proxy-name`) are left alone, as kube-proxy leaves them: the watches select
/// them out, and they raise no problem.
#[test]
fn headless_and_foreign_services_are_ignored() {
    let env = env();
    let client = env.client();
    const PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

    let mut foreign = service_named("foreign", FOREIGN_IP);
    foreign["metadata"]["labels"] = json!({ PROXY_NAME: "other-proxy" });
    let mut foreign_slice = slice_of("foreign", vec![ready(env.pod(2))]);
    foreign_slice["metadata"]["labels"][PROXY_NAME] = json!("other-proxy");
    let mut headless = service_named("headless", Ipv4Addr::UNSPECIFIED);
    headless["spec"]["clusterIP"] = json!("None");
    headless["spec"]["clusterIPs"] = json!(["None"]);
    let mut headless_slice = slice_of("headless", vec![ready(env.pod(2))]);
    headless_slice["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
    for object in [&foreign, &foreign_slice, &headless, &headless_slice] {
        env.create(object);
    }
    // Created last: once it carries traffic, the agent has seen everything before it.
    env.create(&service());
    env.create(&slice(&[env.pod(0)]));
    wait_until(
        "pod-1 through the ClusterIP",
        Duration::from_secs(2),
        || hello(client, CLUSTER_IP, 80).is_ok_and(|pod| pod == "pod-1"),
    );

    assert!(
        hello(client, FOREIGN_IP, 80).is_err(),
        "another proxy's Service was translated"
    );
    let metrics = scrape(&env);
    assert_eq!(
        series_value(&metrics, "lb_config_problems"),
        Some(0.0),
        "{metrics}"
    );
}

/// KEP-1669: with no ready endpoint, the serving terminating ones take new connections;
/// once a ready endpoint exists, it takes them all.
#[test]
fn terminating_endpoints_serve_when_none_is_ready() {
    let env = env();
    let client = env.client();
    env.create(&service());
    let terminating = vec![
        endpoint(env.pod(0), false, true, true),
        endpoint(env.pod(1), false, false, true),
    ];
    env.create(&slice_of("web", terminating.clone()));
    wait_until(
        "the serving terminating endpoint (pod-1) alone to answer",
        Duration::from_secs(5),
        || answering(client, CLUSTER_IP, 6) == only("pod-1"),
    );

    let mut with_ready = terminating;
    with_ready.push(ready(env.pod(2)));
    env.update(&slice_of("web", with_ready));
    wait_until(
        "the ready endpoint (pod-3) alone to answer",
        Duration::from_secs(5),
        || answering(client, CLUSTER_IP, 6) == only("pod-3"),
    );
}

/// The API server is down for 30 s while objects change: established and new connections
/// keep working on the last state, health stays good (nothing is queued), and the agent
/// converges once the server is back.
#[test]
fn api_outage_keeps_the_last_state_and_converges() {
    let env = env();
    let client = env.client();
    env.api.upsert(service()).expect("create");
    env.api.upsert(slice(&[env.pod(0)])).expect("create");
    wait_until(
        "pod-1 through the ClusterIP",
        Duration::from_secs(2),
        || hello(client, CLUSTER_IP, 80).is_ok_and(|pod| pod == "pod-1"),
    );
    let held = client
        .ns
        .run(|| TcpStream::connect_timeout(&SocketAddr::from((CLUSTER_IP, 80)), TIMEOUT))
        .expect("held connection");
    held.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut held_reader = BufReader::new(held.try_clone().expect("clone"));
    let mut greeting = String::new();
    held_reader.read_line(&mut greeting).expect("greeting");
    assert!(greeting.starts_with("pod-1 "), "{greeting}");

    env.api.set_unavailable(true);
    // Changes the agent cannot see until the server is back.
    env.api.upsert(slice(&[env.pod(1)])).expect("update");
    env.api
        .upsert(service_named("second", OTHER_IP))
        .expect("create");
    env.api
        .upsert(slice_of("second", vec![ready(env.pod(2))]))
        .expect("create");

    let down_since = Instant::now();
    let mut probes = 0;
    while down_since.elapsed() < OUTAGE {
        assert_eq!(
            hello(client, CLUSTER_IP, 80).expect("new connection during the outage"),
            "pod-1"
        );
        let line = format!("probe {probes}\n");
        (&held)
            .write_all(line.as_bytes())
            .expect("write on the held connection");
        let mut echo = String::new();
        held_reader
            .read_line(&mut echo)
            .expect("echo on the held connection");
        assert_eq!(echo, format!("pod-1: probe {probes}\n"));
        let (status, body) = health(&env, "/healthz");
        assert_eq!(status, 200, "{body}");
        probes += 1;
        // The outage lasts a fixed time; this paces the probes through it.
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(probes >= 10, "only {probes} probes in {OUTAGE:?}");

    env.api.set_unavailable(false);
    // The watchers retry with exponential backoff (up to about 30 s between attempts).
    wait_until(
        "the agent to converge after the API server is back",
        Duration::from_secs(60),
        || {
            hello(client, CLUSTER_IP, 80).is_ok_and(|p| p == "pod-2")
                && hello(client, OTHER_IP, 80).is_ok_and(|p| p == "pod-3")
        },
    );
}

/// Objects deleted while the agent's watches were down, with the history compacted so
/// that resuming fails with 410 Gone: the relist drops their entries.
#[test]
fn relist_after_410_drops_objects_deleted_meanwhile() {
    let env = env();
    let client = env.client();
    env.api.upsert(service()).expect("create");
    env.api.upsert(slice(&[env.pod(0)])).expect("create");
    env.api
        .upsert(service_named("second", OTHER_IP))
        .expect("create");
    env.api
        .upsert(slice_of("second", vec![ready(env.pod(1))]))
        .expect("create");
    wait_until("both Services to answer", Duration::from_secs(2), || {
        hello(client, CLUSTER_IP, 80).is_ok_and(|p| p == "pod-1")
            && hello(client, OTHER_IP, 80).is_ok_and(|p| p == "pod-2")
    });

    env.api.set_unavailable(true);
    assert!(env.api.delete("Service", "default", "second"));
    assert!(env.api.delete("EndpointSlice", "default", "second-1"));
    env.api.compact();
    env.api.set_unavailable(false);

    // Without its slice the Service rejects connections (refused); without the Service
    // there is no frontend, and the node has no route for the ClusterIP.
    wait_until(
        "the deleted Service's frontend to go after the relist",
        Duration::from_secs(30),
        || hello(client, OTHER_IP, 80).is_err_and(|e| e.kind() != io::ErrorKind::ConnectionRefused),
    );
    assert_eq!(hello(client, CLUSTER_IP, 80).expect("web"), "pod-1");
    let relisted = env
        .api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/services?") && !r.contains("watch=true"))
        .count();
    assert!(relisted >= 2, "{:#?}", env.api.requests());
    let metrics = scrape(&env);
    assert!(
        series_value(&metrics, r#"lb_watch_restarts_total{resource="services"}"#)
            .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
}

/// `/healthz` and `/livez` with kube-proxy's meaning and bodies, node eligibility from the
/// Node object, `/metrics` with kube-proxy's and lb's metrics, and JSON logs.
#[test]
fn health_and_metrics_endpoints() {
    let env = env_with_args(&["--hostname-override", "node-a", "--log-format", "json"]);
    let client = env.client();

    // Changed "now", as an endpoint controller would stamp it.
    let mut web_slice = slice(&[env.pod(0)]);
    web_slice["metadata"]["annotations"] =
        json!({ "endpoints.kubernetes.io/last-change-trigger-time": rfc3339(SystemTime::now()) });
    env.api.upsert(service()).expect("create");
    env.api.upsert(web_slice).expect("create");
    wait_until(
        "pod-1 through the ClusterIP",
        Duration::from_secs(2),
        || hello(client, CLUSTER_IP, 80).is_ok_and(|pod| pod == "pod-1"),
    );

    // Synced, and no Node object yet: healthy and eligible.
    let (status, body) = health(&env, "/healthz");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["nodeEligible"], json!(true), "{body}");
    let (last, now) = (body["lastUpdated"].as_str(), body["currentTime"].as_str());
    assert!(last.is_some_and(|l| l.ends_with(" +0000 UTC")), "{body}");
    assert_eq!(
        last, now,
        "a healthy answer reports lastUpdated = currentTime"
    );
    let (status, body) = health(&env, "/livez");
    assert_eq!(status, 200, "{body}");
    assert!(body.get("nodeEligible").is_none() && body["lastUpdated"].is_string());

    // The cluster autoscaler taints the node for deletion: /healthz fails (so external
    // load balancers drain the node), /livez does not.
    let node = |taints: Value, deleting: bool| {
        let mut node = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": "node-a", "labels": { "kubernetes.io/hostname": "node-a" } },
            "spec": { "taints": taints },
            "status": { "addresses": [{ "type": "InternalIP", "address": "192.0.2.10" }] },
        });
        if deleting {
            node["metadata"]["deletionTimestamp"] = json!(rfc3339(SystemTime::now()));
        }
        node
    };
    let autoscaler =
        json!([{ "key": "ToBeDeletedByClusterAutoscaler", "value": "1", "effect": "NoSchedule" }]);
    env.api.upsert(node(json!([]), false)).expect("node");
    env.api.upsert(node(autoscaler, false)).expect("node");
    wait_until(
        "/healthz to fail for a tainted node",
        Duration::from_secs(5),
        || health(&env, "/healthz").0 == 503,
    );
    let (_, body) = health(&env, "/healthz");
    assert_eq!(body["nodeEligible"], json!(false), "{body}");
    assert_eq!(health(&env, "/livez").0, 200);

    env.api.upsert(node(json!([]), false)).expect("node");
    wait_until(
        "/healthz to pass once the taint is gone",
        Duration::from_secs(5),
        || health(&env, "/healthz").0 == 200,
    );
    env.api.upsert(node(json!([]), true)).expect("node");
    wait_until(
        "/healthz to fail for a node being deleted",
        Duration::from_secs(5),
        || health(&env, "/healthz").0 == 503,
    );
    assert_eq!(health(&env, "/livez").0, 200);

    // The metrics server: kube-proxy's names where the meaning is the same, lb's own
    // for the maps and the datapath.
    let (status, ok) = http_get(&env.topo.node, METRICS_PORT, "/healthz").expect("/healthz");
    assert_eq!((status, ok.as_str()), (200, "ok"));
    let metrics = scrape(&env);
    for family in [
        "kubeproxy_sync_proxy_rules_duration_seconds histogram",
        "kubeproxy_sync_full_proxy_rules_duration_seconds histogram",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds histogram",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds gauge",
        "kubeproxy_network_programming_duration_seconds histogram",
        "kubeproxy_proxy_healthz_total counter",
        "kubeproxy_proxy_livez_total counter",
        "lb_map_entries gauge",
        "lb_map_capacity gauge",
        "lb_datapath_packets_total counter",
        "lb_watch_restarts_total counter",
        "lb_sync_errors_total counter",
        "lb_config_problems gauge",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {family}\n")),
            "{family}:\n{metrics}"
        );
    }
    let value = |series: &str| {
        series_value(&metrics, series).unwrap_or_else(|| panic!("{series}:\n{metrics}"))
    };
    assert_eq!(
        value("kubeproxy_sync_full_proxy_rules_duration_seconds_count"),
        1.0
    );
    assert!(value("kubeproxy_sync_partial_proxy_rules_duration_seconds_count") >= 1.0);
    assert!(value("kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 1.0e9);
    assert!(value("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds") > 1.0e9);
    assert!(value("kubeproxy_network_programming_duration_seconds_count") >= 1.0);
    assert!(value(r#"kubeproxy_proxy_healthz_total{code="503"}"#) >= 1.0);
    assert!(value(r#"lb_map_entries{map="LB4_SERVICES"}"#) >= 1.0);
    assert!(value(r#"lb_map_entries{map="LB4_CT"}"#) >= 2.0);
    assert!(value(r#"lb_map_capacity{map="LB4_CT"}"#) > 0.0);
    assert!(value(r#"lb_datapath_packets_total{reason="new_flow",direction="ingress"}"#) >= 1.0);
    assert_eq!(value("lb_config_problems"), 0.0);

    // --log-format json: one JSON object per line.
    let log = env.agent.log();
    let ready = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["message"] == json!("lb-agent ready"));
    assert!(ready.is_some(), "{log}");
}
