//! ClusterIP load balancing end to end: real agent, real programs in the kernel, real TCP
//! and UDP through veth pairs, on a node whose FORWARD chain drops `ctstate INVALID`.
//!
//! Run as root: `cargo xtask test` (or `cargo test --release -p tests -- --test-threads=1`).
use std::{
    collections::BTreeMap,
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use tests::{
    agent::Agent,
    clients::{Greeting, Held, tcp_connect, tcp_hello, udp_ask, udp_connect},
    missing_kernel_feature, require_root,
    servers::{self, Server},
    topology::{Host, Topology},
    wait_until,
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const TIMEOUT: Duration = Duration::from_secs(3);
/// A refusal arrives at once; this bound only keeps a broken datapath from hanging the
/// test. The assertions are on the error kind, never on this timeout.
const REFUSAL_BOUND: Duration = Duration::from_secs(2);

/// Manifest files: (file name, content).
type Files = Vec<(String, String)>;

/// Agent first, then servers, then the namespaces: fields drop in declaration order.
struct Env {
    agent: Agent,
    servers: Vec<Server>,
    topo: Topology,
}

impl Env {
    /// The addresses of pods `which` (1-based, as their names).
    fn pods(&self, which: &[usize]) -> Vec<Ipv4Addr> {
        which.iter().map(|i| self.topo.pods[i - 1].ip).collect()
    }
}

/// A topology with `clients` clients and three pods (pod-1..pod-3) serving TCP on 8080 and
/// 9100 and UDP on 5353, and an agent started on the manifests `files` makes from the pods'
/// addresses. `None` (after printing why) if the kernel cannot run these tests.
fn env(clients: usize, files: impl FnOnce(&[Ipv4Addr]) -> Files) -> Option<Env> {
    require_root();
    if let Some(why) = missing_kernel_feature() {
        eprintln!("skipped: {why}");
        return None;
    }
    let topo = Topology::builder().clients(clients).pods(3).build();
    let mut srv = Vec::new();
    for (i, pod) in topo.pods.iter().enumerate() {
        let name = format!("pod-{}", i + 1);
        srv.push(servers::tcp(&pod.ns, &name, 8080));
        srv.push(servers::tcp(&pod.ns, &format!("{name}-metrics"), 9100));
        srv.push(servers::udp(&pod.ns, &name, 5353));
    }
    let files = files(&topo.pod_ips());
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let agent = Agent::start(&topo.node, &refs);
    Some(Env {
        agent,
        servers: srv,
        topo,
    })
}

/// A Service manifest. `ports`: (name, port, protocol, targetPort).
fn service(name: &str, ip: &str, ports: &[(&str, u16, &str, &str)], extra_spec: &str) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  clusterIP: {ip}\n{extra_spec}  ports:\n"
    );
    for (pname, port, proto, target) in ports {
        s += &format!(
            "  - name: \"{pname}\"\n    port: {port}\n    protocol: {proto}\n    targetPort: {target}\n"
        );
    }
    s
}

/// An EndpointSlice of Service `service`, every endpoint ready. `ports`: (name, port,
/// protocol).
fn slice(name: &str, service: &str, ips: &[Ipv4Addr], ports: &[(&str, u16, &str)]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nendpoints:\n"
    );
    if ips.is_empty() {
        s = s.replace("endpoints:\n", "endpoints: []\n");
    }
    for ip in ips {
        s += &format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n");
    }
    s += "ports:\n";
    for (pname, port, proto) in ports {
        s += &format!("- name: \"{pname}\"\n  port: {port}\n  protocol: {proto}\n");
    }
    s
}

/// Service `web`: 10.96.0.10:80/TCP -> 8080 on `ips`.
fn web(ips: &[Ipv4Addr]) -> Files {
    vec![
        (
            "web.yaml".into(),
            service("web", "10.96.0.10", &[("http", 80, "TCP", "8080")], ""),
        ),
        ("web-slice.yaml".into(), web_slice(ips)),
    ]
}

fn web_slice(ips: &[Ipv4Addr]) -> String {
    slice("web-1", "web", ips, &[("http", 8080, "TCP")])
}

/// Service `dns`: 10.96.0.53:53/UDP -> 5353 on `ips`.
fn dns(ips: &[Ipv4Addr]) -> Files {
    vec![
        (
            "dns.yaml".into(),
            service("dns", "10.96.0.53", &[("dns", 53, "UDP", "5353")], ""),
        ),
        ("dns-slice.yaml".into(), dns_slice(ips)),
    ]
}

fn dns_slice(ips: &[Ipv4Addr]) -> String {
    slice("dns-1", "dns", ips, &[("dns", 5353, "UDP")])
}

/// Connects from `client` to `addr:port` (giving up after `timeout`) and returns the
/// greeting: which pod answered, and the client address it saw.
fn hello_within(
    client: &Host,
    addr: Ipv4Addr,
    port: u16,
    timeout: Duration,
) -> io::Result<Greeting> {
    client
        .ns
        .run(move || tcp_hello(SocketAddr::from((addr, port)), timeout))
}

fn hello(client: &Host, addr: Ipv4Addr, port: u16) -> io::Result<Greeting> {
    hello_within(client, addr, port, TIMEOUT)
}

/// The name of the pod that answers a new connection from `client` to `addr:port`.
fn pod_of(client: &Host, addr: Ipv4Addr, port: u16) -> String {
    hello(client, addr, port)
        .unwrap_or_else(|e| panic!("connect to {addr}:{port}: {e}"))
        .pod
}

/// Sends one datagram from a fresh connected socket in `client` and returns the answer.
fn udp_once(client: &Host, addr: Ipv4Addr, port: u16, timeout: Duration) -> io::Result<Greeting> {
    client.ns.run(move || {
        let socket = udp_connect(SocketAddr::from((addr, port)), timeout)?;
        udp_ask(&socket)
    })
}

fn tally(names: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in names {
        *m.entry(n).or_default() += 1;
    }
    m
}

#[test]
fn connections_spread_over_all_ready_pods() {
    let Some(env) = env(1, web) else { return };
    let client = &env.topo.clients[0];
    let hits = tally((0..300).map(|_| pod_of(client, CLUSTER_IP, 80)));
    assert_eq!(hits.len(), 3, "every pod must get connections: {hits:?}");
    for (pod, n) in &hits {
        // 20% to 47% of 300. Uniform would be 100 each; these bounds fail only for a real
        // skew (a fair coin leaves them with odds below one in a million).
        assert!(
            (60..=141).contains(n),
            "{pod} got {n} of 300 connections: {hits:?}"
        );
    }
}

#[test]
fn client_source_address_is_preserved() {
    let Some(env) = env(1, web) else { return };
    let client = &env.topo.clients[0];
    let g = hello(client, CLUSTER_IP, 80).expect("connect");
    assert!(
        g.peer.starts_with(&format!("{}:", client.ip)),
        "pod saw {}, not the client",
        g.peer
    );
}

#[test]
fn client_ip_affinity_keeps_a_client_on_one_pod() {
    let Some(env) = env(2, |pods| {
        vec![
            (
                "web.yaml".to_owned(),
                service(
                    "web",
                    "10.96.0.10",
                    &[("http", 80, "TCP", "8080")],
                    "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 300\n",
                ),
            ),
            ("web-slice.yaml".to_owned(), web_slice(pods)),
        ]
    }) else {
        return;
    };
    let mut chosen = Vec::new();
    for client in &env.topo.clients {
        let hits = tally((0..30).map(|_| pod_of(client, CLUSTER_IP, 80)));
        assert_eq!(
            hits.len(),
            1,
            "client {} was spread over {hits:?}",
            client.ip
        );
        chosen.extend(hits.into_keys());
    }
    // Each client sticks to its own pod; which one is random, so two clients may share.
    eprintln!("affinity: clients stuck to {chosen:?}");
}

#[test]
fn udp_is_balanced_and_replies_come_from_the_cluster_ip() {
    let Some(env) = env(1, dns) else { return };
    let client = &env.topo.clients[0];
    let mut names = Vec::new();
    for _ in 0..60 {
        // A connected UDP socket only accepts datagrams from the address it connected
        // to, so an answer proves the reply's source was translated back.
        let g = udp_once(client, DNS_IP, 53, TIMEOUT).expect("udp answer");
        assert!(
            g.peer.starts_with(&format!("{}:", client.ip)),
            "pod saw {}",
            g.peer
        );
        names.push(g.pod);
    }
    let hits = tally(names);
    assert_eq!(hits.len(), 3, "UDP flows must use every pod: {hits:?}");
}

#[test]
fn multi_port_service_with_a_named_target_port() {
    let Some(env) = env(1, |pods| {
        vec![
            (
                "multi.yaml".to_owned(),
                service(
                    "multi",
                    "10.96.0.20",
                    &[("http", 80, "TCP", "web"), ("metrics", 9100, "TCP", "9100")],
                    "",
                ),
            ),
            (
                // The endpoints controller resolves `targetPort: web` against the pods and
                // publishes the number under the Service port's name.
                "multi-slice.yaml".to_owned(),
                slice(
                    "multi-1",
                    "multi",
                    pods,
                    &[("http", 8080, "TCP"), ("metrics", 9100, "TCP")],
                ),
            ),
        ]
    }) else {
        return;
    };
    let client = &env.topo.clients[0];
    let vip = Ipv4Addr::new(10, 96, 0, 20);
    for _ in 0..10 {
        let web = pod_of(client, vip, 80);
        assert!(
            web.starts_with("pod-") && !web.ends_with("-metrics"),
            "port 80 must reach the web server (8080), got {web}"
        );
        let metrics = pod_of(client, vip, 9100);
        assert!(
            metrics.ends_with("-metrics"),
            "port 9100 must reach the metrics server, got {metrics}"
        );
    }
}

#[test]
fn selectorless_service_with_hand_written_endpoints() {
    let Some(env) = env(1, |pods| {
        let endpoints = format!(
            "apiVersion: v1\nkind: Endpoints\nmetadata:\n  name: ext\nsubsets:\n- addresses:\n  - ip: {}\n  ports:\n  - name: db\n    port: 8080\n",
            pods[1]
        );
        vec![
            (
                "ext.yaml".to_owned(),
                service("ext", "10.96.0.30", &[("db", 5432, "TCP", "8080")], ""),
            ),
            ("ext-endpoints.yaml".to_owned(), endpoints),
        ]
    }) else {
        return;
    };
    let client = &env.topo.clients[0];
    for _ in 0..10 {
        assert_eq!(pod_of(client, Ipv4Addr::new(10, 96, 0, 30), 5432), "pod-2");
    }
}

#[test]
fn headless_and_foreign_services_are_left_alone() {
    let Some(env) = env(1, |pods| {
        let foreign = service("other", "10.96.0.40", &[("http", 80, "TCP", "8080")], "")
            .replace(
                "  name: other\n",
                "  name: other\n  labels:\n    service.kubernetes.io/service-proxy-name: someone-else\n",
            );
        vec![
            (
                "hl.yaml".to_owned(),
                service("hl", "None", &[("http", 80, "TCP", "8080")], ""),
            ),
            (
                "hl-slice.yaml".to_owned(),
                slice("hl-1", "hl", pods, &[("http", 8080, "TCP")]),
            ),
            ("other.yaml".to_owned(), foreign),
            (
                "other-slice.yaml".to_owned(),
                slice("other-1", "other", pods, &[("http", 8080, "TCP")]),
            ),
        ]
    }) else {
        return;
    };
    let client = &env.topo.clients[0];
    // Pod IPs are reached directly, untouched: the pod sees the client's own address.
    for (i, ip) in env.pods(&[1, 2, 3]).into_iter().enumerate() {
        let g = hello(client, ip, 8080).expect("connect to a pod IP");
        assert_eq!(g.pod, format!("pod-{}", i + 1));
        assert!(g.peer.starts_with(&format!("{}:", client.ip)), "{g:?}");
    }
    // Nothing in the ClusterIP range is translated: neither the foreign Service's address
    // nor any other reaches a pod, and none is rejected as if it were ours (the node has
    // no route for the range, so the client gets "unreachable" or a timeout).
    for vip in [Ipv4Addr::new(10, 96, 0, 40), Ipv4Addr::new(10, 96, 0, 11)] {
        let err = hello_within(client, vip, 80, REFUSAL_BOUND).expect_err("must not be translated");
        assert_ne!(
            err.kind(),
            io::ErrorKind::ConnectionRefused,
            "{vip} rejected as if it were ours: {err}"
        );
    }
}

#[test]
fn service_without_endpoints_and_undefined_ports_are_refused() {
    let ports = [("http", 8080, "TCP"), ("dns", 5353, "UDP")];
    let Some(env) = env(1, |_| {
        vec![
            (
                "web.yaml".to_owned(),
                service(
                    "web",
                    "10.96.0.10",
                    &[("http", 80, "TCP", "8080"), ("dns", 53, "UDP", "5353")],
                    "",
                ),
            ),
            (
                "web-slice.yaml".to_owned(),
                slice("web-1", "web", &[], &ports),
            ),
        ]
    }) else {
        return;
    };
    let client = &env.topo.clients[0];
    for (port, what) in [
        (80, "no endpoints"),
        (81, "a port the Service does not define"),
    ] {
        let err = hello_within(client, CLUSTER_IP, port, REFUSAL_BOUND).expect_err(what);
        assert_eq!(
            err.kind(),
            io::ErrorKind::ConnectionRefused,
            "TCP to {CLUSTER_IP}:{port} ({what}) must be refused, got: {err}"
        );
    }
    for (port, what) in [
        (53, "no endpoints"),
        (54, "a port the Service does not define"),
    ] {
        let err = udp_once(client, CLUSTER_IP, port, REFUSAL_BOUND).expect_err(what);
        assert_eq!(
            err.kind(),
            io::ErrorKind::ConnectionRefused,
            "UDP to {CLUSTER_IP}:{port} ({what}) must be refused, got: {err}"
        );
    }

    // Endpoints appear: the same Service now answers.
    let pods = env.topo.pod_ips();
    env.agent
        .change(|a| a.write("web-slice.yaml", &slice("web-1", "web", &pods, &ports)));
    assert!(pod_of(client, CLUSTER_IP, 80).starts_with("pod-"));
    assert!(
        udp_once(client, CLUSTER_IP, 53, TIMEOUT)
            .expect("udp answer")
            .pod
            .starts_with("pod-")
    );
}

#[test]
fn removing_an_endpoint_stops_new_connections_to_it() {
    let Some(env) = env(1, web) else { return };
    let client = &env.topo.clients[0];
    let hits = tally((0..60).map(|_| pod_of(client, CLUSTER_IP, 80)));
    assert!(hits.contains_key("pod-3"), "{hits:?}");

    env.agent
        .write("web-slice.yaml", &web_slice(&env.pods(&[1, 2])));
    // The edit is live within a second (the directory is polled every 100 ms here): from
    // then on, a batch of new connections never reaches pod-3.
    wait_until(
        "no new connection to reach pod-3",
        Duration::from_secs(1),
        || (0..15).all(|_| pod_of(client, CLUSTER_IP, 80) != "pod-3"),
    );
    let hits = tally((0..90).map(|_| pod_of(client, CLUSTER_IP, 80)));
    assert!(
        !hits.contains_key("pod-3"),
        "pod-3 still gets new connections: {hits:?}"
    );
    assert_eq!(hits.len(), 2, "{hits:?}");
}

#[test]
fn udp_flow_moves_off_a_removed_endpoint() {
    let Some(env) = env(1, dns) else { return };
    let client = &env.topo.clients[0];
    // One long-lived UDP socket, as a resolver or a metrics agent keeps.
    let sock = client
        .ns
        .run(move || udp_connect(SocketAddr::from((DNS_IP, 53)), TIMEOUT))
        .expect("udp socket");
    let ask = || udp_ask(&sock).expect("answer").pod;
    let first = ask();
    for _ in 0..5 {
        assert_eq!(ask(), first, "an established UDP flow must keep its pod");
    }
    let n: usize = first.trim_start_matches("pod-").parse().expect("pod-N");
    let rest: Vec<usize> = (1..=3).filter(|i| *i != n).collect();
    env.agent
        .change(|a| a.write("dns-slice.yaml", &dns_slice(&env.pods(&rest))));
    let next = ask();
    assert_ne!(next, first, "the UDP flow stayed on the removed pod");
    for _ in 0..5 {
        assert_eq!(ask(), next, "the moved flow must stay on its new pod");
    }
}

#[test]
fn established_connection_survives_agent_kill_and_restart() {
    let Some(mut env) = env(1, web) else { return };
    let client = &env.topo.clients[0];
    let (mut conn, greeting) = client
        .ns
        .run(move || tcp_connect(SocketAddr::from((CLUSTER_IP, 80)), TIMEOUT))
        .expect("connect");
    let mut held = Held::new(conn.try_clone().expect("clone"), greeting).expect("hold");
    let mut exchange = |msg: &str| held.exchange(msg);
    exchange("before");

    env.agent.kill9();
    exchange("while-the-agent-is-down");
    let hits = tally((0..10).map(|_| pod_of(client, CLUSTER_IP, 80)));
    assert!(
        !hits.is_empty(),
        "new connections work while the agent is down"
    );

    // A new agent on the same pin directory.
    env.agent.restart();
    assert!(
        env.agent
            .log()
            .lines()
            .rev()
            .find(|l| l.contains(" synced "))
            .is_some_and(|l| l.contains("writes=0")),
        "a restarted agent re-adopts the pinned tables without rewriting them"
    );
    exchange("after-restart");
    assert!(pod_of(client, CLUSTER_IP, 80).starts_with("pod-"));
    // Nothing was lost or reset: nothing is left to read, and read() would fail on a reset
    // connection.
    conn.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 1];
    assert!(matches!(conn.read(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock));
}

#[test]
fn devices_that_appear_later_are_attached() {
    let Some(mut env) = env(1, web) else { return };
    // A new pod starts after the agent: its veth appears on the node, then its endpoint
    // is published. Traffic must reach it through the datapath on the new device.
    let idx = env.topo.add_pod();
    let pod = &env.topo.pods[idx];
    env.servers.push(servers::tcp(&pod.ns, "pod-new", 8080));
    let ip = pod.ip;
    env.agent
        .change(|a| a.write("web-slice.yaml", &web_slice(&[ip])));
    let client = &env.topo.clients[0];
    wait_until(
        "the new pod to be reached through the ClusterIP",
        Duration::from_secs(5),
        || hello(client, CLUSTER_IP, 80).is_ok_and(|g| g.pod == "pod-new"),
    );
    for _ in 0..10 {
        assert_eq!(pod_of(client, CLUSTER_IP, 80), "pod-new");
    }
}

/// The address the datapath gives hairpin flows as their source.
const HAIRPIN_IP: Ipv4Addr = Ipv4Addr::new(
    lb_common::HAIRPIN_ADDR[0],
    lb_common::HAIRPIN_ADDR[1],
    lb_common::HAIRPIN_ADDR[2],
    lb_common::HAIRPIN_ADDR[3],
);

/// Asserts `g` comes from `pod` and that it saw the hairpin address as its peer.
fn assert_hairpin(g: &Greeting, pod: &str) {
    assert_eq!(g.pod, pod, "answered by {}", g.pod);
    assert!(
        g.peer.starts_with(&format!("{HAIRPIN_IP}:")),
        "{pod} saw {} as its peer, not the hairpin address {HAIRPIN_IP}",
        g.peer
    );
}

#[test]
fn a_pod_balanced_onto_itself_through_its_service_is_answered() {
    // pod-1 is the only endpoint of both Services: every flow it opens to them comes back
    // to itself.
    let Some(env) = env(1, |pods| {
        let mut files = web(&pods[..1]);
        files.extend(dns(&pods[..1]));
        files
    }) else {
        return;
    };
    let pod = &env.topo.pods[0];
    for _ in 0..5 {
        let g = hello(pod, CLUSTER_IP, 80)
            .unwrap_or_else(|e| panic!("TCP from pod-1 to its own Service: {e}"));
        assert_hairpin(&g, "pod-1");
        // A connected UDP socket accepts the answer only from the ClusterIP.
        let g = udp_once(pod, DNS_IP, 53, TIMEOUT)
            .unwrap_or_else(|e| panic!("UDP from pod-1 to its own Service: {e}"));
        assert_hairpin(&g, "pod-1");
    }
    // Data both ways on an established hairpin connection.
    let (mut conn, greeting) = pod
        .ns
        .run(move || tcp_connect(SocketAddr::from((CLUSTER_IP, 80)), TIMEOUT))
        .expect("connect");
    assert_hairpin(&greeting, "pod-1");
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    for msg in ["one", "two", "three"] {
        conn.write_all(format!("{msg}\n").as_bytes())
            .unwrap_or_else(|e| panic!("send {msg}: {e}"));
        let mut answer = String::new();
        reader
            .read_line(&mut answer)
            .unwrap_or_else(|e| panic!("answer to {msg}: {e}"));
        assert_eq!(answer, format!("pod-1: {msg}\n"));
    }
    // The other pods and the client are not hairpins: pod-1 sees their own addresses.
    for other in [&env.topo.pods[1], &env.topo.clients[0]] {
        let g = hello(other, CLUSTER_IP, 80).expect("connect");
        assert_eq!(g.pod, "pod-1");
        assert!(g.peer.starts_with(&format!("{}:", other.ip)), "{g:?}");
        let g = udp_once(other, DNS_IP, 53, TIMEOUT).expect("udp answer");
        assert!(g.peer.starts_with(&format!("{}:", other.ip)), "{g:?}");
    }
}
