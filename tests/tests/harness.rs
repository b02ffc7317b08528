//! The test network itself, without the agent: plain routing through the node namespace,
//! the veth fixture's facts, the helper binaries, and clean-up. If these fail, the
//! ClusterIP tests cannot mean anything.
//!
//! Run as root: `cargo xtask test` (or `cargo test --release -p tests --test harness`).
use std::{
    io::Write,
    net::{SocketAddr, UdpSocket},
    path::Path,
    process::Stdio,
    time::Duration,
};

use tests::{
    clients::{tcp_hello, udp_ask, udp_connect},
    missing_kernel_feature,
    netns::{command_in, run_in},
    require_root, servers,
    topology::{Topology, iptables, parse_mac},
    wait_until,
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn topology(clients: usize, pods: usize) -> Option<Topology> {
    require_root();
    if let Some(why) = missing_kernel_feature() {
        eprintln!("skipped: {why}");
        return None;
    }
    Some(Topology::builder().clients(clients).pods(pods).build())
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

#[test]
fn clients_reach_pods_through_the_node_by_plain_routing() {
    let Some(topo) = topology(2, 3) else { return };
    let _servers: Vec<_> = topo
        .pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let name = format!("pod-{}", i + 1);
            (
                servers::tcp(&p.ns, &name, 8080),
                servers::udp(&p.ns, &name, 5353),
            )
        })
        .collect();
    for client in &topo.clients {
        for (i, pod) in topo.pods.iter().enumerate() {
            let addr = SocketAddr::from((pod.ip, 8080));
            let g = client
                .ns
                .run(move || tcp_hello(addr, TIMEOUT))
                .unwrap_or_else(|e| panic!("{} -> {addr}: {e}", client.ip));
            assert_eq!(g.pod, format!("pod-{}", i + 1));
            // Routed, not NATed: the pod sees the client's own address.
            assert!(g.peer.starts_with(&format!("{}:", client.ip)), "{g:?}");
            let addr = SocketAddr::from((pod.ip, 5353));
            let g = client
                .ns
                .run(move || udp_ask(&udp_connect(addr, TIMEOUT)?))
                .unwrap_or_else(|e| panic!("udp {} -> {addr}: {e}", client.ip));
            assert_eq!(g.pod, format!("pod-{}", i + 1));
        }
    }
}

#[test]
fn veth_fixture_describes_the_links() {
    let Some(topo) = topology(1, 2) else { return };
    let hosts: Vec<_> = topo.clients.iter().chain(&topo.pods).collect();
    for h in &hosts {
        let v = &h.veth;
        assert_eq!(v.peer_ip, h.ip);
        assert_eq!(v.peer_name, "eth0");
        assert!(v.node_name.starts_with("veth-"), "{v:?}");
        assert!(v.node_ifindex > 0 && v.peer_ifindex > 0, "{v:?}");
        assert_ne!(v.node_mac, v.peer_mac);
        // The host resolves its gateway to the node end's MAC (a datagram to the
        // gateway's discard port makes it ask).
        let gateway = SocketAddr::from((v.node_ip, 9));
        h.ns.run(move || {
            UdpSocket::bind("0.0.0.0:0")
                .and_then(|s| s.send_to(b"x", gateway))
                .expect("send to the gateway")
        });
        let mut neigh = String::new();
        wait_until("the gateway's MAC to be resolved", TIMEOUT, || {
            let out = h.ns.ip(&["neigh", "show", &v.node_ip.to_string()]);
            neigh = String::from_utf8_lossy(&out.stdout).into_owned();
            neigh.contains("lladdr ")
        });
        let lladdr = neigh
            .split_once("lladdr ")
            .and_then(|(_, r)| r.split_whitespace().next())
            .and_then(parse_mac);
        assert_eq!(lladdr, Some(v.node_mac), "{neigh}");
        let link = topo.node.ip(&["-o", "link", "show", "dev", &v.node_name]);
        assert!(
            String::from_utf8_lossy(&link.stdout).starts_with(&format!("{}:", v.node_ifindex)),
            "{v:?}"
        );
    }
    // Every address is distinct, and topologies built one after another differ.
    let other = Topology::new(1, 1);
    assert_ne!(other.clients[0].ip, topo.clients[0].ip);
    assert_ne!(other.pods[0].ip, topo.pods[0].ip);
}

#[test]
fn node_drops_invalid_packets_in_forward() {
    let Some(topo) = topology(1, 1) else { return };
    let rules = run_in(&topo.node, &[iptables(), "-S", "FORWARD"]);
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        rules.contains("-A FORWARD -m conntrack --ctstate INVALID -j DROP"),
        "{rules}"
    );
    let forward = run_in(&topo.node, &["sysctl", "-n", "net.ipv4.ip_forward"]);
    assert_eq!(String::from_utf8_lossy(&forward.stdout).trim(), "1");
}

#[test]
fn helper_binaries_serve_and_ask_across_namespaces() {
    let Some(topo) = topology(1, 1) else { return };
    let server = Path::new(env!("CARGO_BIN_EXE_lbt-server"));
    let _pod = servers::spawn(server, &topo.pods[0].ns, "pod-x", &[8080], &[5353]);
    let pod_ip = topo.pods[0].ip;
    let client_bin = env!("CARGO_BIN_EXE_lbt-client");
    let ask = |args: &[&str]| {
        let mut argv = vec![client_bin];
        argv.extend(args);
        let out = run_in(&topo.clients[0].ns, &argv);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let tcp = ask(&["tcp", &format!("{pod_ip}:8080"), "--count", "3"]);
    assert_eq!(tcp.lines().count(), 3, "{tcp}");
    assert!(tcp.lines().all(|l| l.starts_with("pod-x 10.200.")), "{tcp}");
    let udp = ask(&["udp", &format!("{pod_ip}:5353"), "--count", "2"]);
    assert_eq!(udp.lines().count(), 2, "{udp}");
    assert!(udp.lines().all(|l| l.starts_with("pod-x ")), "{udp}");

    // `hold` exchanges a line per stdin line on one connection.
    let mut hold = command_in(
        &topo.clients[0].ns,
        &[client_bin, "hold", &format!("{pod_ip}:8080")],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .spawn()
    .expect("run lbt-client hold");
    hold.stdin
        .take()
        .expect("stdin")
        .write_all(b"one\ntwo\n")
        .expect("write to lbt-client");
    let out = hold.wait_with_output().expect("lbt-client hold");
    assert!(out.status.success(), "{out:?}");
    let out = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(&lines[1..], ["pod-x: one", "pod-x: two"], "{out}");

    // A port nobody listens on: a clear refusal, exit code 1.
    let refused = command_in(
        &topo.clients[0].ns,
        &[client_bin, "tcp", &format!("{pod_ip}:9")],
    )
    .output()
    .expect("run lbt-client");
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("refused"),
        "{refused:?}"
    );
}

#[test]
fn everything_is_removed_when_the_guards_drop() {
    let Some(topo) = topology(1, 1) else { return };
    let names = [
        topo.node.name().to_owned(),
        topo.clients[0].ns.name().to_owned(),
        topo.pods[0].ns.name().to_owned(),
    ];
    let server = Path::new(env!("CARGO_BIN_EXE_lbt-server"));
    let pod = servers::spawn(server, &topo.pods[0].ns, "pod-x", &[8080], &[]);
    let pid = pod.id();
    assert!(names.iter().all(|n| netns_exists(n)));
    drop(pod);
    // Killed and reaped: no such process any more (not even a zombie).
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    drop(topo);
    for n in &names {
        assert!(!netns_exists(n), "namespace {n} is left behind");
    }
}
