//! Traffic from the node itself (host processes, hostNetwork pods, kubelet) through the
//! cgroup socket hooks: real agent with `--cgroup-path`, real programs, real TCP and UDP.
//!
//! Each test creates a child cgroup of this machine's cgroup v2 hierarchy, gives it to the
//! agent, and runs `lbt-client` inside it and inside the node namespace, so that the hooks
//! see exactly the processes the test starts there. Nothing is attached at the root
//! cgroup; the guard kills what is left in the child and removes it, also on failure.
//!
//! Run as root: `cargo xtask test` (or `cargo test --release -p tests --test hostnet --
//! --test-threads=1`).
use std::{
    collections::BTreeSet,
    fs,
    io::{self, ErrorKind},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use tests::{
    agent::{Agent, agent_binary, datapath_packets},
    clients::tcp_hello,
    missing_kernel_feature, require_root,
    servers::{self, Server},
    topology::Topology,
    wait_until,
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const LOCAL_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const TCP_NODE_PORT: u16 = 30080;
const UDP_NODE_PORT: u16 = 30053;
const LOCAL_TCP_NODE_PORT: u16 = 30081;
const LOCAL_UDP_NODE_PORT: u16 = 30054;
/// A refusal comes back from the connect call itself; this bound only says "at once" in
/// a way a busy 2-CPU machine still meets (a packet lost instead would take the client's
/// full timeout, `CLIENT_TIMEOUT_MS`).
const REFUSAL_BOUND: Duration = Duration::from_millis(1000);
const CLIENT_TIMEOUT_MS: &str = "3000";

/// A child cgroup of the machine's cgroup v2 hierarchy, named after this process. Dropping
/// it kills whatever still runs in it, waits until it is empty and removes it.
struct Cgroup {
    path: PathBuf,
}

static CGROUPS: AtomicU32 = AtomicU32::new(0);

impl Cgroup {
    /// `None` (after printing why) when the machine has no cgroup v2 hierarchy.
    fn new() -> Option<Self> {
        let Some(root) = cgroup2_mount() else {
            eprintln!("skipped: no cgroup v2 hierarchy is mounted");
            return None;
        };
        let n = CGROUPS.fetch_add(1, Ordering::Relaxed);
        let path = root.join(format!("lbt-hostnet-{}-{n}", std::process::id()));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Some(Self { path })
    }

    fn procs(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let start = Instant::now();
        loop {
            let procs = self.procs();
            if procs.is_empty() || start.elapsed() > Duration::from_secs(5) {
                break;
            }
            for pid in procs {
                // SAFETY: kill(2); these are the test's own client processes.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Err(e) = fs::remove_dir(&self.path) {
            eprintln!("cannot remove cgroup {}: {e}", self.path.display());
        }
    }
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid
/// hosts).
fn cgroup2_mount() -> Option<PathBuf> {
    fs::read_to_string("/proc/self/mounts")
        .ok()?
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
}

/// What one `lbt-client` run printed.
#[derive(Debug)]
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    /// The answer lines, split into words: `POD PEER [peer=ADDR|from=ADDR]`.
    fn lines(&self) -> Vec<Vec<String>> {
        self.stdout
            .lines()
            .map(|l| l.split_whitespace().map(String::from).collect())
            .collect()
    }
}

/// Agent first (its pins go, and with them the hooks), then the cgroup, the servers and
/// the namespaces: fields drop in declaration order.
struct Env {
    agent: Agent,
    cgroup: Cgroup,
    _servers: Vec<Server>,
    topo: Topology,
}

impl Env {
    /// Runs `lbt-client ARGS` in the node namespace, inside the test's cgroup when
    /// `in_cgroup`, and waits for it.
    fn client(&self, in_cgroup: bool, args: &[&str]) -> Run {
        let netns = format!("--net={}", self.topo.node.path());
        let client = env!("CARGO_BIN_EXE_lbt-client");
        let mut cmd = if in_cgroup {
            // The shell moves itself into the cgroup, then becomes the client.
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(r#"echo $$ > "$0" && exec "$@""#)
                .arg(self.cgroup.path.join("cgroup.procs"));
            c
        } else {
            Command::new("env")
        };
        cmd.arg("nsenter")
            .arg(netns)
            .arg(client)
            .args(args)
            .args(["--timeout-ms", CLIENT_TIMEOUT_MS]);
        let started = Instant::now();
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        Run {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took: started.elapsed(),
        }
    }

    /// [`Env::client`] that must succeed.
    fn ok(&self, in_cgroup: bool, args: &[&str]) -> Vec<Vec<String>> {
        let run = self.client(in_cgroup, args);
        assert!(run.ok, "lbt-client {args:?} failed: {run:?}");
        run.lines()
    }

    /// Checks that `line` is an answer of one of the pods, which saw the node's own address
    /// on its link (the address a host process gets), and returns the pod's name.
    fn answered_by_pod_to_node(&self, line: &[String]) -> String {
        let pod = line.first().expect("pod name").clone();
        let k: usize = pod
            .strip_prefix("pod-")
            .and_then(|k| k.parse().ok())
            .unwrap_or_else(|| panic!("not a pod answer: {line:?}"));
        let node_ip = self.topo.pods[k - 1].veth.node_ip;
        let peer = line.get(1).expect("peer");
        assert!(
            peer.starts_with(&format!("{node_ip}:")),
            "{pod} saw {peer}, not the node's address {node_ip}"
        );
        pod
    }

    /// The node's own address on the first client link: a NodePort address.
    fn node_addr(&self) -> Ipv4Addr {
        self.topo.clients[0].veth.node_ip
    }
}

fn addr(ip: Ipv4Addr, port: u16) -> String {
    format!("{ip}:{port}")
}

/// Service `web` (ClusterIP 10.96.0.10, NodePort): http 80/TCP -> 8080 (nodePort 30080),
/// dns 53/UDP -> 5353 (nodePort 30053) on `pods`; and Service `empty` (10.96.0.20) with
/// the same ports and no endpoint.
fn manifests(pods: &[Ipv4Addr]) -> Vec<(String, String)> {
    let service = |name: &str, ip: Ipv4Addr, node_ports: bool| {
        let np = |port: u16| {
            if node_ports {
                format!("    nodePort: {port}\n")
            } else {
                String::new()
            }
        };
        let type_ = if node_ports { "NodePort" } else { "ClusterIP" };
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  type: {type_}\n  \
             clusterIP: {ip}\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    \
             targetPort: 8080\n{}  - name: dns\n    port: 53\n    protocol: UDP\n    \
             targetPort: 5353\n{}",
            np(TCP_NODE_PORT),
            np(UDP_NODE_PORT),
        )
    };
    let slice = |name: &str, ips: &[Ipv4Addr]| {
        let mut s = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  \
             labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nendpoints:"
        );
        if ips.is_empty() {
            s += " []";
        }
        s += "\n";
        for ip in ips {
            s += &format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n");
        }
        s + "ports:\n- name: http\n  port: 8080\n  protocol: TCP\n- name: dns\n  port: 5353\n  \
             protocol: UDP\n"
    };
    // `web` again with `externalTrafficPolicy: Local` on other nodePorts. Its endpoints
    // name no node, so none of them is this node's.
    let local = service("local", LOCAL_IP, true)
        .replace(
            "  type: NodePort\n",
            "  type: NodePort\n  externalTrafficPolicy: Local\n",
        )
        .replace(
            &format!("nodePort: {TCP_NODE_PORT}"),
            &format!("nodePort: {LOCAL_TCP_NODE_PORT}"),
        )
        .replace(
            &format!("nodePort: {UDP_NODE_PORT}"),
            &format!("nodePort: {LOCAL_UDP_NODE_PORT}"),
        );
    vec![
        ("web.yaml".into(), service("web", CLUSTER_IP, true)),
        ("web-slice.yaml".into(), slice("web", pods)),
        ("empty.yaml".into(), service("empty", EMPTY_IP, false)),
        ("empty-slice.yaml".into(), slice("empty", &[])),
        ("local.yaml".into(), local),
        ("local-slice.yaml".into(), slice("local", pods)),
    ]
}

/// One client, three pods serving TCP 8080 and UDP 5353, a fresh child cgroup and an
/// agent on [`manifests`] with `--cgroup-path` of that cgroup and `more_args`. `None`
/// (after printing why) if this machine cannot run these tests.
fn env(more_args: &[&str]) -> Option<Env> {
    require_root();
    if let Some(why) = missing_kernel_feature() {
        eprintln!("skipped: {why}");
        return None;
    }
    let cgroup = Cgroup::new()?;
    let topo = Topology::builder().clients(1).pods(3).build();
    let mut srv = Vec::new();
    for (i, pod) in topo.pods.iter().enumerate() {
        let name = format!("pod-{}", i + 1);
        srv.push(servers::tcp(&pod.ns, &name, 8080));
        srv.push(servers::udp(&pod.ns, &name, 5353));
    }
    let files = manifests(&topo.pod_ips());
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let cgroup_arg = cgroup.path.display().to_string();
    let mut args = vec!["--cgroup-path", cgroup_arg.as_str()];
    args.extend(more_args);
    let agent = Agent::start_with_args(&topo.node, &refs, &args);
    Some(Env {
        agent,
        cgroup,
        _servers: srv,
        topo,
    })
}

/// Pins of the socket hook links under the agent's pin directory.
fn hook_pins(root: &Path) -> BTreeSet<String> {
    fs::read_dir(root.join("links"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("cgroup_"))
        .collect()
}

#[test]
fn host_reaches_cluster_ip_over_tcp_with_the_service_as_peer() {
    let Some(env) = env(&[]) else { return };
    let target = addr(CLUSTER_IP, 80);
    let lines = env.ok(true, &["tcp", &target, "--count", "30", "--peer"]);
    assert_eq!(lines.len(), 30, "{lines:?}");
    let mut pods = BTreeSet::new();
    for line in &lines {
        pods.insert(env.answered_by_pod_to_node(line));
        // getpeername(2) of the connected socket: the Service, not the pod.
        assert_eq!(line.get(2), Some(&format!("peer={target}")), "{line:?}");
    }
    // Random choice per connection, as in the TC path: 30 connections miss one of three
    // pods with odds of about 1 in 60,000.
    assert_eq!(pods.len(), 3, "connections went to {pods:?} only");
    // Counted by the hooks: each connect translated, each getpeername shown the Service.
    let node = &env.topo.node;
    assert!(datapath_packets(node, "new_flow", "socket") >= 30);
    assert!(datapath_packets(node, "reply", "socket") >= 30);
}

#[test]
fn host_reaches_cluster_ip_over_udp_with_replies_from_the_service() {
    let Some(env) = env(&[]) else { return };
    let target = addr(CLUSTER_IP, 53);
    // Connected socket: one backend for the socket's life, the Service as its peer (it
    // only accepts datagrams from its peer, so answers also prove the translation).
    let lines = env.ok(true, &["udp", &target, "--count", "5", "--peer"]);
    assert_eq!(lines.len(), 5, "{lines:?}");
    let pods: BTreeSet<String> = lines
        .iter()
        .map(|l| env.answered_by_pod_to_node(l))
        .collect();
    assert_eq!(
        pods.len(),
        1,
        "one connected socket, one backend: {lines:?}"
    );
    for line in &lines {
        assert_eq!(line.get(2), Some(&format!("peer={target}")), "{line:?}");
    }
    // Unconnected socket: each datagram is translated (sendmsg4), every answer shows the
    // Service as its source (recvmsg4), and the socket's datagrams stay on one backend.
    let lines = env.ok(true, &["udp-sendto", &target, "--count", "5"]);
    assert_eq!(lines.len(), 5, "{lines:?}");
    let pods: BTreeSet<String> = lines
        .iter()
        .map(|l| env.answered_by_pod_to_node(l))
        .collect();
    assert_eq!(pods.len(), 1, "datagrams of one socket spread: {lines:?}");
    for line in &lines {
        assert_eq!(line.get(2), Some(&format!("from={target}")), "{line:?}");
    }
}

#[test]
fn host_reaches_node_ports_on_its_own_address_but_not_on_localhost_by_default() {
    let Some(env) = env(&[]) else { return };
    let node = env.node_addr();
    let tcp = addr(node, TCP_NODE_PORT);
    for line in env.ok(true, &["tcp", &tcp, "--count", "5", "--peer"]) {
        env.answered_by_pod_to_node(&line);
        assert_eq!(line.get(2), Some(&format!("peer={tcp}")), "{line:?}");
    }
    let udp = addr(node, UDP_NODE_PORT);
    for line in env.ok(true, &["udp-sendto", &udp, "--count", "3"]) {
        env.answered_by_pod_to_node(&line);
        assert_eq!(line.get(2), Some(&format!("from={udp}")), "{line:?}");
    }
    // Without --nodeport-localhost, 127.0.0.1 is the node's loopback: nothing listens.
    let run = env.client(
        true,
        &["tcp", &addr(Ipv4Addr::LOCALHOST, TCP_NODE_PORT), "--peer"],
    );
    assert!(!run.ok, "127.0.0.1:{TCP_NODE_PORT} answered: {run:?}");
    assert!(run.stderr.contains("refused"), "{run:?}");
}

#[test]
fn host_reaches_a_local_policy_node_port_without_local_endpoints_through_any_endpoint() {
    let Some(env) = env(&[]) else { return };
    let node = env.node_addr();
    // The node is inside the cluster: kube-proxy sends its own traffic to any endpoint of
    // a `Local` Service, and so do the hooks, through the frontend's in-cluster twin.
    let tcp = addr(node, LOCAL_TCP_NODE_PORT);
    let lines = env.ok(true, &["tcp", &tcp, "--count", "20", "--peer"]);
    assert_eq!(lines.len(), 20, "{lines:?}");
    let mut pods = BTreeSet::new();
    for line in &lines {
        pods.insert(env.answered_by_pod_to_node(line));
        assert_eq!(line.get(2), Some(&format!("peer={tcp}")), "{line:?}");
    }
    assert!(pods.len() > 1, "one pod only: {pods:?}");
    let udp = addr(node, LOCAL_UDP_NODE_PORT);
    for line in env.ok(true, &["udp-sendto", &udp, "--count", "3"]) {
        env.answered_by_pod_to_node(&line);
        assert_eq!(line.get(2), Some(&format!("from={udp}")), "{line:?}");
    }
    // A client outside the cluster still finds no endpoint on this node: dropped, so
    // that its load balancer sends it to a node that has one.
    let client = &env.topo.clients[0];
    let answer = client.ns.run(move || {
        tcp_hello(
            SocketAddr::from((node, LOCAL_TCP_NODE_PORT)),
            Duration::from_millis(800),
        )
    });
    let dropped = |e: &io::Error| matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock);
    assert!(
        answer.as_ref().is_err_and(dropped),
        "an external client got {answer:?}"
    );
    assert!(datapath_packets(&env.topo.node, "no_local_backend", "ingress") >= 1);
}

#[test]
fn localhost_node_ports_with_the_flag() {
    let Some(env) = env(&["--nodeport-localhost"]) else {
        return;
    };
    let tcp = addr(Ipv4Addr::LOCALHOST, TCP_NODE_PORT);
    for line in env.ok(true, &["tcp", &tcp, "--count", "5", "--peer"]) {
        env.answered_by_pod_to_node(&line);
        assert_eq!(line.get(2), Some(&format!("peer={tcp}")), "{line:?}");
    }
    let udp = addr(Ipv4Addr::LOCALHOST, UDP_NODE_PORT);
    for line in env.ok(true, &["udp-sendto", &udp, "--count", "3"]) {
        env.answered_by_pod_to_node(&line);
        assert_eq!(line.get(2), Some(&format!("from={udp}")), "{line:?}");
    }
    // Still only inside the cgroup: elsewhere the node's loopback has nothing there.
    let run = env.client(false, &["tcp", &tcp]);
    assert!(!run.ok, "outside the cgroup, {tcp} answered: {run:?}");
}

#[test]
fn service_without_endpoints_or_port_is_refused_at_once() {
    let Some(env) = env(&[]) else { return };
    for (mode, target) in [
        ("tcp", addr(EMPTY_IP, 80)),
        ("udp", addr(EMPTY_IP, 53)),
        ("udp-sendto", addr(EMPTY_IP, 53)),
        // A port the Service does not define, as the TC path rejects it.
        ("tcp", addr(CLUSTER_IP, 81)),
    ] {
        let run = env.client(true, &[mode, &target]);
        assert!(!run.ok, "{mode} {target} answered: {run:?}");
        assert!(
            run.stderr.contains("Connection refused"),
            "{mode} {target}: not refused: {run:?}"
        );
        assert!(
            run.took < REFUSAL_BOUND,
            "{mode} {target}: refusal took {:?}",
            run.took
        );
    }
    let node = &env.topo.node;
    assert!(datapath_packets(node, "no_backend", "socket") >= 3);
    assert!(datapath_packets(node, "no_port", "socket") >= 1);
}

#[test]
fn processes_outside_the_cgroup_are_not_translated() {
    let Some(env) = env(&[]) else { return };
    let target = addr(CLUSTER_IP, 80);
    // The node has no route to the Service range: untranslated, the connect fails.
    let run = env.client(false, &["tcp", &target]);
    assert!(!run.ok, "outside the cgroup, {target} answered: {run:?}");
    assert!(run.stderr.contains("unreachable"), "{run:?}");
    // Inside, the same call works: the difference is the cgroup alone.
    env.ok(true, &["tcp", &target]);
}

#[test]
fn socket_hooks_survive_restarts_and_cleanup_removes_them() {
    let Some(mut env) = env(&[]) else { return };
    let target = addr(CLUSTER_IP, 80);
    let pins = hook_pins(&env.agent.root);
    assert_eq!(
        pins.len(),
        4,
        "connect4, sendmsg4, recvmsg4, getpeername4: {pins:?}"
    );
    // The hooks keep translating while no agent runs.
    env.agent.kill9();
    env.ok(true, &["tcp", &target, "--peer"]);
    // A new agent takes the pinned links over: the same pins, still translating.
    env.agent.restart();
    assert_eq!(hook_pins(&env.agent.root), pins);
    env.ok(true, &["tcp", &target, "--peer"]);
    env.ok(true, &["udp-sendto", &addr(CLUSTER_IP, 53)]);
    env.agent.terminate();
    let out = Command::new(agent_binary())
        .arg("--cleanup")
        .arg("--bpffs-root")
        .arg(&env.agent.root)
        .output()
        .expect("run lb-agent --cleanup");
    assert!(
        out.status.success(),
        "--cleanup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(hook_pins(&env.agent.root).is_empty());
    // Detached: the cgroup's processes are on their own again.
    wait_until("the hooks to be detached", Duration::from_secs(5), || {
        !env.client(true, &["tcp", &target]).ok
    });
}

#[test]
fn connection_rate_through_the_hooks_is_reported() {
    let Some(env) = env(&[]) else { return };
    let pod = addr(env.topo.pods[0].ip, 8080);
    let service = addr(CLUSTER_IP, 80);
    let mut report = Vec::new();
    for (what, target) in [("pod IP", &pod), ("ClusterIP", &service)] {
        let lines = env.ok(
            true,
            &["crr", target, "--seconds", "2", "--count", "1000000"],
        );
        // `crr COUNT SECONDS`
        let words = lines.first().expect("crr line");
        let count: f64 = words[1].parse().expect("count");
        let secs: f64 = words[2].parse().expect("seconds");
        report.push(format!("{what}: {:.0} connections/s", count / secs));
    }
    eprintln!(
        "host TCP_CRR through the socket hooks: {}",
        report.join(", ")
    );
}
