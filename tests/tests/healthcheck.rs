//! Health checks on `healthCheckNodePort` end to end: the real agent on each node of the
//! two-node network (`tests/src/cluster.rs`), reading manifests, answering an external
//! client over HTTP as kube-proxy's service health server does: 200 with the number of this
//! node's ready endpoints, 503 with 0 where there are none, following endpoint changes
//! live, closing the port with the Service, and reporting a port that two Services ask
//! for, or that another process holds, while the other health checks keep answering.
//!
//! Run as root: `cargo xtask test` (or `cargo test --release -p tests --test healthcheck --
//! --test-threads=1`).
use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use tests::{
    agent::Agent,
    cluster::{Cluster, ClusterNode},
    missing_kernel_feature,
    netns::NetNs,
    require_root, wait_until,
};

const HEALTH_PORT: u16 = 32_100;
const TIMEOUT: Duration = Duration::from_secs(3);
/// Longer than the agent's retry period for a port it could not bind (5 s).
const RETRY_WAIT: Duration = Duration::from_secs(12);

/// One HTTP answer.
#[derive(Debug)]
struct Reply {
    code: u16,
    /// The header lines, lower-cased.
    headers: String,
    body: serde_json::Value,
}

impl Reply {
    fn local_endpoints(&self) -> u64 {
        self.body["localEndpoints"].as_u64().unwrap_or(u64::MAX)
    }

    fn service(&self) -> String {
        format!(
            "{}/{}",
            self.body["service"]["namespace"].as_str().unwrap_or("?"),
            self.body["service"]["name"].as_str().unwrap_or("?")
        )
    }
}

/// `GET /healthz` to `addr:port` from namespace `ns`, with a plain HTTP/1.1 request.
fn get(ns: &NetNs, addr: Ipv4Addr, port: u16) -> io::Result<Reply> {
    let text = ns.run(move || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from((addr, port)), TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok::<_, io::Error>(out)
    })?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no end of headers in {text:?}")))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no status in {head:?}")))?;
    let body = serde_json::from_str(body)
        .map_err(|e| io::Error::other(format!("body {body:?} is not JSON: {e}")))?;
    Ok(Reply {
        code,
        headers: head.to_ascii_lowercase(),
        body,
    })
}

/// Waits until `node`'s health check on `port` answers `code` with `count` local endpoints
/// for Service `default/name`, and returns that answer.
fn wait_for(
    client: &NetNs,
    node: &ClusterNode,
    port: u16,
    name: &str,
    code: u16,
    count: u64,
) -> Reply {
    let mut last = None;
    wait_until(
        &format!(
            "{}:{port} to answer {code} with {count} for {name}",
            node.name
        ),
        Duration::from_secs(10),
        || {
            let r = get(client, node.ip, port);
            let ok = matches!(&r, Ok(r) if r.code == code
                && r.local_endpoints() == count
                && r.service() == format!("default/{name}"));
            last = Some(r);
            ok
        },
    );
    last.and_then(Result::ok).expect("an answer")
}

/// A Service `name` of type LoadBalancer with `externalTrafficPolicy: Local`, ClusterIP
/// 10.96.0.`n`, nodePort 30100+`n` and health-check port `health_port`.
fn service(name: &str, n: u8, health_port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  type: LoadBalancer\n  \
         clusterIP: 10.96.0.{n}\n  externalTrafficPolicy: Local\n  healthCheckNodePort: \
         {health_port}\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    \
         targetPort: 8080\n    nodePort: {}\n",
        30_100 + u16::from(n)
    )
}

/// An endpoint: its address, node, and conditions (`ready`, `serving`, `terminating`).
type Ep<'a> = (Ipv4Addr, &'a str, bool, bool, bool);

/// The EndpointSlice of Service `service`.
fn slice(service: &str, endpoints: &[Ep]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  \
         labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nendpoints:\n"
    );
    if endpoints.is_empty() {
        s = s.replace("endpoints:\n", "endpoints: []\n");
    }
    for (ip, node, ready, serving, terminating) in endpoints {
        s += &format!(
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: {ready}, serving: {serving}, \
             terminating: {terminating}}}\n  nodeName: {node}\n"
        );
    }
    s += "ports:\n- name: http\n  port: 8080\n  protocol: TCP\n";
    s
}

fn ready<'a>(ip: Ipv4Addr, node: &'a str) -> Ep<'a> {
    (ip, node, true, true, false)
}

fn terminating<'a>(ip: Ipv4Addr, node: &'a str) -> Ep<'a> {
    (ip, node, false, true, true)
}

/// Starts the agent on each of `nodes` with `files`.
fn start_agents(nodes: &[ClusterNode], files: &[(&str, String)]) -> Vec<Agent> {
    let refs: Vec<(&str, &str)> = files.iter().map(|(a, b)| (*a, b.as_str())).collect();
    nodes
        .iter()
        .map(|node| {
            let wrapper = node.agent_wrapper();
            let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
            Agent::start_under(&node.ns, &refs, &wrapper)
        })
        .collect()
}

fn skip() -> bool {
    require_root();
    if let Some(why) = missing_kernel_feature() {
        eprintln!("skipped: {why}");
        return true;
    }
    false
}

#[test]
fn each_node_answers_with_its_own_ready_endpoints_and_follows_changes() {
    if skip() {
        return;
    }
    let cluster = Cluster::new(2);
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let pod = |node: &ClusterNode, k: usize| node.pods[k].ip;
    let files = [
        ("web.yaml", service("web", 10, HEALTH_PORT)),
        (
            "web-slice.yaml",
            slice(
                "web",
                &[ready(pod(n1, 0), "node-1"), ready(pod(n1, 1), "node-1")],
            ),
        ),
    ];
    let agents = start_agents(&cluster.nodes, &files);
    let client = &cluster.client.ns;

    // Node 1 has both endpoints, node 2 none.
    let r = wait_for(client, n1, HEALTH_PORT, "web", 200, 2);
    assert!(
        r.headers.contains("content-type: application/json"),
        "{r:?}"
    );
    assert!(
        r.headers.contains("x-content-type-options: nosniff"),
        "{r:?}"
    );
    assert!(
        r.headers.contains("x-load-balancing-endpoint-weight: 2"),
        "{r:?}"
    );
    assert_eq!(r.body["serviceProxyHealthy"], true, "{r:?}");
    let r = wait_for(client, n2, HEALTH_PORT, "web", 503, 0);
    assert_eq!(r.body["serviceProxyHealthy"], true, "{r:?}");

    // Scaled: one endpoint on each node.
    let scaled = slice(
        "web",
        &[ready(pod(n1, 0), "node-1"), ready(pod(n2, 0), "node-2")],
    );
    for a in &agents {
        a.write("web-slice.yaml", &scaled);
    }
    wait_for(client, n1, HEALTH_PORT, "web", 200, 1);
    wait_for(client, n2, HEALTH_PORT, "web", 200, 1);

    // Node 2's only endpoint terminating (still serving): not counted, as kube-proxy
    // counts ready endpoints only, so that load balancers drain the node.
    let draining = slice(
        "web",
        &[
            ready(pod(n1, 0), "node-1"),
            terminating(pod(n2, 0), "node-2"),
        ],
    );
    for a in &agents {
        a.write("web-slice.yaml", &draining);
    }
    wait_for(client, n2, HEALTH_PORT, "web", 503, 0);
    wait_for(client, n1, HEALTH_PORT, "web", 200, 1);

    // The Service deleted: the port closes on both nodes.
    for a in &agents {
        a.remove("web.yaml");
    }
    for node in &cluster.nodes {
        wait_until(
            &format!("{}:{HEALTH_PORT} to close", node.name),
            Duration::from_secs(10),
            || matches!(get(client, node.ip, HEALTH_PORT), Err(e) if e.kind() == io::ErrorKind::ConnectionRefused),
        );
    }
    drop(agents);
}

#[test]
fn a_port_asked_for_twice_or_held_elsewhere_is_reported_while_the_others_answer() {
    if skip() {
        return;
    }
    let cluster = Cluster::new(1);
    let node = &cluster.nodes[0];
    let ip = node.pods[0].ip;
    let client = &cluster.client.ns;
    // Another process holds HEALTH_PORT + 2 on the node.
    let held = node.ns.run(|| {
        std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, HEALTH_PORT + 2)).expect("bind")
    });
    let files = [
        ("a.yaml", service("a", 11, HEALTH_PORT)),
        ("b.yaml", service("b", 12, HEALTH_PORT)),
        ("c.yaml", service("c", 13, HEALTH_PORT + 1)),
        ("d.yaml", service("d", 14, HEALTH_PORT + 2)),
        ("a-slice.yaml", slice("a", &[ready(ip, "node-1")])),
        ("c-slice.yaml", slice("c", &[ready(ip, "node-1")])),
        ("d-slice.yaml", slice("d", &[ready(ip, "node-1")])),
    ];
    let agents = start_agents(&cluster.nodes[..1], &files);
    let agent = &agents[0];

    // The first Service by namespace/name keeps the port; the other is reported, naming
    // both; the Service with a port of its own answers.
    wait_for(client, node, HEALTH_PORT, "a", 200, 1);
    wait_for(client, node, HEALTH_PORT + 1, "c", 200, 1);
    wait_until("the clash to be reported", TIMEOUT, || {
        agent.log().contains(&format!(
            "Service default/b: healthCheckNodePort {HEALTH_PORT} is already used by Service \
             default/a"
        ))
    });
    // The held port: reported with the Service, the address and the reason.
    let held_port = HEALTH_PORT + 2;
    wait_until("the held port to be reported", TIMEOUT, || {
        agent.log().contains(&format!(
            "Service default/d: healthCheckNodePort {held_port}: cannot listen on \
             0.0.0.0:{held_port}"
        ))
    });
    assert!(agent.log().contains("in use"), "{}", agent.log());

    // Released, the held port is taken within the retry period.
    drop(held);
    wait_until(
        "the released port to answer",
        RETRY_WAIT,
        || matches!(get(client, node.ip, held_port), Ok(r) if r.code == 200 && r.service() == "default/d"),
    );

    // The winner gone, the other Service takes the port over.
    agent.remove("a.yaml");
    wait_for(client, node, HEALTH_PORT, "b", 503, 0);
    wait_until("the clash to be resolved", TIMEOUT, || {
        agent
            .log()
            .contains("resolved: Service default/b: healthCheckNodePort")
    });
    wait_for(client, node, HEALTH_PORT + 1, "c", 200, 1);
    drop(agents);
}
