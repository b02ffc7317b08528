//! ClusterIP load balancing end to end: real agent, real programs in the kernel, real TCP
//! and UDP through veth pairs, on a node whose FORWARD chain drops `ctstate INVALID`.
//!
//! Run as root: `cargo xtask test` (or `cargo test --release -p tests -- --test-threads=1`).
use std::{
    collections::BTreeMap,
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use tests::{
    agent::Agent,
    require_root,
    servers::{self, Server},
    topology::{Host, Topology},
    wait_until,
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TIMEOUT: Duration = Duration::from_secs(3);

/// Agent first, then servers, then the namespaces: fields drop in declaration order.
struct Env {
    agent: Agent,
    servers: Vec<Server>,
    topo: Topology,
}

/// A topology with `clients` clients and three pods (pod-1..pod-3) serving TCP on 8080 and
/// 9100 and UDP on 5353, and an agent started on `manifests`.
fn env(clients: usize, manifests: &[(&str, &str)]) -> Env {
    require_root();
    let topo = Topology::new(clients, 3);
    let mut srv = Vec::new();
    for (i, pod) in topo.pods.iter().enumerate() {
        let name = format!("pod-{}", i + 1);
        srv.push(servers::tcp(&pod.ns, &name, 8080));
        srv.push(servers::tcp(&pod.ns, &format!("{name}-metrics"), 9100));
        srv.push(servers::udp(&pod.ns, &name, 5353));
    }
    let agent = Agent::start(&topo.node, manifests);
    Env {
        agent,
        servers: srv,
        topo,
    }
}

fn pod_ips(env: &Env, which: &[usize]) -> Vec<Ipv4Addr> {
    which.iter().map(|i| env.topo.pods[i - 1].ip).collect()
}

fn all_pods() -> Vec<Ipv4Addr> {
    (1..=3).map(|i| Ipv4Addr::new(10, 201, i, 2)).collect()
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

/// An EndpointSlice of Service `service`. `ports`: (name, port, protocol).
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

fn web(ips: &[Ipv4Addr]) -> [(String, String); 2] {
    [
        (
            "web.yaml".into(),
            service("web", "10.96.0.10", &[("http", 80, "TCP", "8080")], ""),
        ),
        (
            "web-slice.yaml".into(),
            slice("web-1", "web", ips, &[("http", 8080, "TCP")]),
        ),
    ]
}

fn dns(ips: &[Ipv4Addr]) -> [(String, String); 2] {
    [
        (
            "dns.yaml".into(),
            service("dns", "10.96.0.53", &[("dns", 53, "UDP", "5353")], ""),
        ),
        (
            "dns-slice.yaml".into(),
            slice("dns-1", "dns", ips, &[("dns", 5353, "UDP")]),
        ),
    ]
}

fn refs(files: &[(String, String)]) -> Vec<(&str, &str)> {
    files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect()
}

/// Connects from `client` to `addr:port` and returns the greeting's first word (the pod's
/// name) and the peer address the pod saw.
fn hello(client: &Host, addr: Ipv4Addr, port: u16) -> io::Result<(String, String)> {
    client.ns.run(move || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from((addr, port)), TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut line = String::new();
        BufReader::new(&mut s).read_line(&mut line)?;
        let mut words = line.split_whitespace();
        Ok((
            words.next().unwrap_or_default().to_owned(),
            words.next().unwrap_or_default().to_owned(),
        ))
    })
}

fn pod_of(client: &Host, addr: Ipv4Addr, port: u16) -> String {
    hello(client, addr, port)
        .unwrap_or_else(|e| panic!("connect to {addr}:{port}: {e}"))
        .0
}

/// Sends one datagram from a fresh connected socket and returns the answer.
fn udp_ask(client: &Host, addr: Ipv4Addr, port: u16) -> io::Result<String> {
    client.ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect((addr, port))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.send(b"hi")?;
        let mut buf = [0u8; 256];
        let n = s.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
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
    let files = web(&all_pods());
    let env = env(1, &refs(&files));
    let client = &env.topo.clients[0];
    let hits = tally((0..300).map(|_| pod_of(client, CLUSTER_IP, 80)));
    assert_eq!(hits.len(), 3, "every pod must get connections: {hits:?}");
    for (pod, n) in &hits {
        // Uniform would be 100 each; these bounds fail only for a real skew.
        assert!(
            (60..=141).contains(n),
            "{pod} got {n} of 300 connections: {hits:?}"
        );
    }
}

#[test]
fn client_source_address_is_preserved() {
    let files = web(&all_pods());
    let env = env(1, &refs(&files));
    let client = &env.topo.clients[0];
    let (_, peer) = hello(client, CLUSTER_IP, 80).expect("connect");
    assert!(
        peer.starts_with(&format!("{}:", client.ip)),
        "pod saw {peer}, not the client"
    );
}

#[test]
fn client_ip_affinity_keeps_a_client_on_one_pod() {
    let files = [
        (
            "web.yaml".to_owned(),
            service(
                "web",
                "10.96.0.10",
                &[("http", 80, "TCP", "8080")],
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 300\n",
            ),
        ),
        (
            "web-slice.yaml".to_owned(),
            slice("web-1", "web", &all_pods(), &[("http", 8080, "TCP")]),
        ),
    ];
    let env = env(2, &refs(&files));
    for client in &env.topo.clients {
        let hits = tally((0..30).map(|_| pod_of(client, CLUSTER_IP, 80)));
        assert_eq!(
            hits.len(),
            1,
            "client {} was spread over {hits:?}",
            client.ip
        );
    }
}

#[test]
fn udp_is_balanced_and_replies_come_from_the_cluster_ip() {
    let files = dns(&all_pods());
    let env = env(1, &refs(&files));
    let client = &env.topo.clients[0];
    let mut names = Vec::new();
    for _ in 0..60 {
        // A connected UDP socket only accepts datagrams from the address it connected
        // to, so an answer proves the reply's source was translated back.
        let answer = udp_ask(client, Ipv4Addr::new(10, 96, 0, 53), 53).expect("udp answer");
        let mut words = answer.split_whitespace();
        names.push(words.next().unwrap_or_default().to_owned());
        let peer = words.next().unwrap_or_default();
        assert!(
            peer.starts_with(&format!("{}:", client.ip)),
            "pod saw {peer}"
        );
    }
    assert_eq!(tally(names).len(), 3, "UDP flows must use every pod");
}

#[test]
fn multi_port_service_with_a_named_target_port() {
    let files = [
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
            "multi-slice.yaml".to_owned(),
            slice(
                "multi-1",
                "multi",
                &all_pods(),
                &[("http", 8080, "TCP"), ("metrics", 9100, "TCP")],
            ),
        ),
    ];
    let env = env(1, &refs(&files));
    let client = &env.topo.clients[0];
    let vip = Ipv4Addr::new(10, 96, 0, 20);
    assert!(pod_of(client, vip, 80).starts_with("pod-"));
    assert!(
        !pod_of(client, vip, 80).ends_with("-metrics"),
        "port 80 must reach the web server"
    );
    assert!(
        pod_of(client, vip, 9100).ends_with("-metrics"),
        "port 9100 must reach the metrics server"
    );
}

#[test]
fn selectorless_service_with_hand_written_endpoints() {
    let endpoints = "apiVersion: v1\nkind: Endpoints\nmetadata:\n  name: ext\nsubsets:\n- addresses:\n  - ip: 10.201.2.2\n  ports:\n  - name: db\n    port: 8080\n";
    let files = [
        (
            "ext.yaml".to_owned(),
            service("ext", "10.96.0.30", &[("db", 5432, "TCP", "8080")], ""),
        ),
        ("ext-endpoints.yaml".to_owned(), endpoints.to_owned()),
    ];
    let env = env(1, &refs(&files));
    let client = &env.topo.clients[0];
    for _ in 0..10 {
        assert_eq!(pod_of(client, Ipv4Addr::new(10, 96, 0, 30), 5432), "pod-2");
    }
}

#[test]
fn headless_and_foreign_services_are_left_alone() {
    let headless = service("hl", "None", &[("http", 80, "TCP", "8080")], "");
    let foreign = service("other", "10.96.0.40", &[("http", 80, "TCP", "8080")], "").replace(
        "  name: other\n",
        "  name: other\n  labels:\n    service.kubernetes.io/service-proxy-name: someone-else\n",
    );
    let files = [
        ("hl.yaml".to_owned(), headless),
        (
            "hl-slice.yaml".to_owned(),
            slice("hl-1", "hl", &all_pods(), &[("http", 8080, "TCP")]),
        ),
        ("other.yaml".to_owned(), foreign),
        (
            "other-slice.yaml".to_owned(),
            slice("other-1", "other", &all_pods(), &[("http", 8080, "TCP")]),
        ),
    ];
    let env = env(1, &refs(&files));
    let client = &env.topo.clients[0];
    // Pod IPs are reached directly, untouched.
    for (i, ip) in pod_ips(&env, &[1, 2, 3]).into_iter().enumerate() {
        assert_eq!(pod_of(client, ip, 8080), format!("pod-{}", i + 1));
    }
    // The foreign Service's ClusterIP is not translated: the node has no route for it.
    let err = hello(client, Ipv4Addr::new(10, 96, 0, 40), 80).expect_err("must not be translated");
    assert_ne!(
        err.kind(),
        io::ErrorKind::ConnectionRefused,
        "rejected as if it were ours: {err}"
    );
}

#[test]
fn service_without_endpoints_and_undefined_ports_are_refused() {
    let files = [
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
            slice(
                "web-1",
                "web",
                &[],
                &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
            ),
        ),
    ];
    let env = env(1, &refs(&files));
    let client = &env.topo.clients[0];
    for (port, what) in [(80, "no endpoints"), (81, "undefined port")] {
        let err = hello(client, CLUSTER_IP, port).expect_err(what);
        assert_eq!(
            err.kind(),
            io::ErrorKind::ConnectionRefused,
            "{what}: {err}"
        );
    }
    let err = udp_ask(client, CLUSTER_IP, 53).expect_err("udp without endpoints");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "udp: {err}");

    // Endpoints appear: the same Service now answers.
    env.agent.change(|a| {
        a.write(
            "web-slice.yaml",
            &slice(
                "web-1",
                "web",
                &all_pods(),
                &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
            ),
        )
    });
    assert!(pod_of(client, CLUSTER_IP, 80).starts_with("pod-"));
}

#[test]
fn removing_an_endpoint_stops_new_connections_to_it() {
    let files = web(&all_pods());
    let env = env(1, &refs(&files));
    let client = &env.topo.clients[0];
    let hits = tally((0..60).map(|_| pod_of(client, CLUSTER_IP, 80)));
    assert!(hits.contains_key("pod-3"), "{hits:?}");

    let before = env.agent.syncs();
    env.agent
        .write("web-slice.yaml", &web(&pod_ips(&env, &[1, 2]))[1].1);
    // The manifests are polled every 100 ms here; the edit is live well within a second.
    wait_until(
        "the agent to apply the edit",
        Duration::from_secs(1),
        || env.agent.syncs() > before,
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
    let files = dns(&all_pods());
    let env = env(1, &refs(&files));
    let client = &env.topo.clients[0];
    let vip = Ipv4Addr::new(10, 96, 0, 53);
    // One long-lived UDP socket, as a resolver or a metrics agent keeps.
    let sock = client.ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect((vip, 53)).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s
    });
    let ask = |s: &UdpSocket| -> String {
        s.send(b"hi").unwrap();
        let mut buf = [0u8; 256];
        let n = s.recv(&mut buf).expect("answer");
        String::from_utf8_lossy(&buf[..n])
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let first = ask(&sock);
    for _ in 0..5 {
        assert_eq!(
            ask(&sock),
            first,
            "an established UDP flow must keep its pod"
        );
    }
    let n: usize = first.trim_start_matches("pod-").parse().unwrap();
    let rest: Vec<usize> = (1..=3).filter(|i| *i != n).collect();
    env.agent.change(|a| {
        a.write(
            "dns-slice.yaml",
            &slice(
                "dns-1",
                "dns",
                &pod_ips(&env, &rest),
                &[("dns", 5353, "UDP")],
            ),
        )
    });
    let next = ask(&sock);
    assert_ne!(next, first, "the UDP flow stayed on the removed pod");
    for _ in 0..5 {
        assert_eq!(ask(&sock), next, "the moved flow must stay on its new pod");
    }
}

#[test]
fn established_connection_survives_agent_kill_and_restart() {
    let files = web(&all_pods());
    let mut env = env(1, &refs(&files));
    let client = &env.topo.clients[0];
    let mut conn = client.ns.run(move || {
        let s = TcpStream::connect_timeout(&SocketAddr::from((CLUSTER_IP, 80)), TIMEOUT).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s
    });
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let pod = line.split_whitespace().next().unwrap().to_owned();
    let mut exchange = |msg: &str| {
        conn.write_all(format!("{msg}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        reader
            .read_line(&mut answer)
            .unwrap_or_else(|e| panic!("after {msg}: {e}"));
        assert_eq!(answer, format!("{pod}: {msg}\n"));
    };
    exchange("before");

    env.agent.kill9();
    exchange("while-the-agent-is-down");
    let hits = tally((0..10).map(|_| pod_of(client, CLUSTER_IP, 80)));
    assert!(
        !hits.is_empty(),
        "new connections work while the agent is down"
    );

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
    // Nothing was lost: read() would fail on a reset connection.
    conn.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1];
    assert!(matches!(conn.read(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock));
}

#[test]
fn devices_that_appear_later_are_attached() {
    let files = web(&all_pods());
    let mut env = env(1, &refs(&files));
    // A new pod starts after the agent: its veth appears on the node, then its endpoint
    // is published. Traffic must reach it through the datapath on the new device.
    let idx = env.topo.add_pod();
    let pod = &env.topo.pods[idx];
    env.servers.push(servers::tcp(&pod.ns, "pod-new", 8080));
    let ip = pod.ip;
    env.agent
        .change(|a| a.write("web-slice.yaml", &web(&[ip])[1].1));
    let client = &env.topo.clients[0];
    wait_until(
        "the new pod to be reached through the ClusterIP",
        Duration::from_secs(5),
        || hello(client, CLUSTER_IP, 80).is_ok_and(|(p, _)| p == "pod-new"),
    );
    for _ in 0..10 {
        assert_eq!(pod_of(client, CLUSTER_IP, 80), "pod-new");
    }
}
