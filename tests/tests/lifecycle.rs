//! The agent's life on a node as an operator sees it: it runs with the DaemonSet's
//! capabilities and nothing more, its programs keep translating after it stops (as
//! kube-proxy's rules stay when kube-proxy stops), and `--cleanup` removes them and its
//! masquerade rule.
//!
//! Run as root: `cargo xtask test` (or `cargo test --release -p tests --test lifecycle`).
use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use tests::{
    agent::{Agent, agent_binary, datapath_packets},
    clients::{Held, tcp_connect, tcp_hello},
    missing_kernel_feature,
    netns::run_in,
    require_root,
    servers::{self, Server},
    topology::{Topology, iptables},
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TIMEOUT: Duration = Duration::from_secs(3);

fn web(pods: &[Ipv4Addr]) -> Vec<(&'static str, String)> {
    let mut slice = String::from(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nendpoints:\n",
    );
    for ip in pods {
        slice += &format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n");
    }
    slice += "ports:\n- name: http\n  port: 8080\n  protocol: TCP\n";
    vec![
        (
            "web.yaml",
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    targetPort: 8080\n".to_owned(),
        ),
        ("web-slice.yaml", slice),
    ]
}

/// Agent first, then servers, then namespaces: fields drop in declaration order.
struct Env {
    agent: Agent,
    _servers: Vec<Server>,
    topo: Topology,
}

fn env(wrapper: &[&str]) -> Option<Env> {
    require_root();
    if let Some(why) = missing_kernel_feature() {
        eprintln!("skipped: {why}");
        return None;
    }
    let topo = Topology::builder().clients(1).pods(2).build();
    let servers = topo
        .pods
        .iter()
        .enumerate()
        .map(|(i, pod)| servers::tcp(&pod.ns, &format!("pod-{}", i + 1), 8080))
        .collect();
    let files = web(&topo.pod_ips());
    let refs: Vec<(&str, &str)> = files.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let agent = Agent::start_under(&topo.node, &refs, wrapper);
    Some(Env {
        agent,
        _servers: servers,
        topo,
    })
}

/// Whether the node's nat table holds the agent's masquerade rule.
fn has_snat_rule(env: &Env) -> bool {
    let out = run_in(
        &env.topo.node,
        &[iptables(), "-w", "-t", "nat", "-S", "POSTROUTING"],
    );
    String::from_utf8_lossy(&out.stdout).contains("MASQUERADE")
}

/// The pod that answers a new connection to the ClusterIP, or the error.
fn ask(env: &Env) -> std::io::Result<String> {
    env.topo.clients[0]
        .ns
        .run(move || tcp_hello(SocketAddr::from((CLUSTER_IP, 80)), TIMEOUT))
        .map(|g| g.pod)
}

#[test]
fn runs_with_only_the_daemonsets_capabilities() {
    // deploy/daemonset.yaml: uid 0, every capability dropped but BPF, NET_ADMIN and
    // PERFMON. setpriv leaves exactly those in the bounding set, so the agent (and what it
    // execs) can never hold any other.
    let Some(env) = env(&[
        "setpriv",
        "--bounding-set=-all,+bpf,+net_admin,+perfmon",
        "--inh-caps=-all",
        "--",
    ]) else {
        return;
    };
    let status = std::fs::read_to_string(format!(
        "/proc/{}/status",
        env.agent.pid().expect("agent running")
    ))
    .unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap_or(u64::MAX));
    // nsenter execs setpriv, which execs the agent: the pid is the agent's once it is
    // ready. CAP_NET_ADMIN 12, CAP_PERFMON 38, CAP_BPF 39.
    let wanted = (1u64 << 12) | (1 << 38) | (1 << 39);
    assert_eq!(eff, Some(wanted), "agent capabilities:\n{status}");
    for _ in 0..10 {
        let pod = ask(&env).expect("connect through the ClusterIP");
        assert!(pod.starts_with("pod-"), "answered by {pod}");
    }
}

#[test]
fn programs_outlive_the_agent_until_cleanup() {
    let Some(mut env) = env(&[]) else { return };
    assert!(ask(&env).expect("connect").starts_with("pod-"));
    assert!(has_snat_rule(&env), "the agent adds its masquerade rule");

    // SIGTERM, as a DaemonSet rolling update sends it: nothing is detached.
    env.agent.terminate();
    assert!(
        env.agent.log().contains("programs stay attached"),
        "{}",
        env.agent.log()
    );
    for _ in 0..5 {
        let pod = ask(&env).expect("the ClusterIP still works after the agent stopped");
        assert!(pod.starts_with("pod-"), "answered by {pod}");
    }

    // `lb-agent --cleanup` on the node: programs detached, pins gone.
    let root = env.agent.root.clone();
    let out = Command::new("nsenter")
        .arg(format!("--net={}", env.topo.node.path()))
        .arg(agent_binary())
        .arg("--cleanup")
        .arg("--bpffs-root")
        .arg(&root)
        .env("NO_COLOR", "1")
        .output()
        .expect("run lb-agent --cleanup");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "--cleanup failed: {log}");
    assert!(log.contains("removed the datapath"), "{log}");
    assert!(!root.exists(), "{} is left after --cleanup", root.display());
    assert!(!has_snat_rule(&env), "--cleanup leaves the masquerade rule");
    // Without translation the ClusterIP is just an address nobody has.
    assert!(
        ask(&env).is_err(),
        "the ClusterIP still answers after --cleanup"
    );

    // A second cleanup finds nothing and says so without failing.
    let again = Command::new(agent_binary())
        .arg("--cleanup")
        .arg("--bpffs-root")
        .arg(&root)
        .env("NO_COLOR", "1")
        .output()
        .expect("run lb-agent --cleanup");
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

/// The TC attachment of kernels before 6.6 (a `clsact` qdisc and one direct-action
/// `cls_bpf` filter per direction, over netlink), forced on this kernel with the agent's
/// hidden `--force-netlink-tc`: the filters carry the traffic, and a new agent replaces
/// them in place under a held connection.
#[test]
fn netlink_tc_attachment_carries_a_connection_across_a_restart() {
    let Some(mut env) = env(&["sh", "-c", "exec \"$@\" --force-netlink-tc", "sh"]) else {
        return;
    };
    let dev = env.topo.clients[0].veth.node_name.clone();
    let filters = |env: &Env| {
        let out = run_in(
            &env.topo.node,
            &["tc", "filter", "show", "dev", &dev, "ingress"],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let shown = filters(&env);
    assert_eq!(
        shown.matches("direct-action").count(),
        1,
        "one cls_bpf filter on {dev}:\n{shown}\n{}",
        env.agent.log()
    );
    let (conn, greeting) = env.topo.clients[0]
        .ns
        .run(move || tcp_connect(SocketAddr::from((CLUSTER_IP, 80)), TIMEOUT))
        .expect("connect through the ClusterIP");
    let mut held = Held::new(conn, greeting).expect("hold the connection");
    let mut exchange = |msg: &str| held.exchange(msg);
    exchange("before");
    env.agent.kill9();
    env.agent.restart();
    exchange("after-restart");
    let shown = filters(&env);
    assert_eq!(
        shown.matches("direct-action").count(),
        1,
        "the new agent replaced the filter in place:\n{shown}"
    );
    assert!(ask(&env).expect("connect").starts_with("pod-"));
}

/// `--xdp`: the XDP program carries a connection on the client's device, keeps it while
/// the agent is down and across a restart (its pinned link gets the new program in place),
/// and is detached when a restarted agent is no longer asked for it, the TC path carrying
/// on the same flow.
#[test]
fn xdp_carries_a_connection_across_restarts_and_leaves_when_no_longer_asked_for() {
    let Some(mut env) = env(&[]) else { return };
    let dev = env.topo.clients[0].veth.node_name.clone();
    let xdp_progs = |env: &Env| {
        let out = run_in(&env.topo.node, &["ip", "-d", "link", "show", "dev", &dev]);
        String::from_utf8_lossy(&out.stdout)
            .matches("prog/xdp")
            .count()
    };
    assert_eq!(xdp_progs(&env), 0, "no XDP without --xdp");
    env.agent.restart_with_args(&["--xdp", &dev]);
    assert_eq!(xdp_progs(&env), 1, "{}", env.agent.log());
    let (conn, greeting) = env.topo.clients[0]
        .ns
        .run(move || tcp_connect(SocketAddr::from((CLUSTER_IP, 80)), TIMEOUT))
        .expect("connect through the ClusterIP");
    let mut held = Held::new(conn, greeting).expect("hold the connection");
    held.exchange("before");
    assert!(datapath_packets(&env.topo.node, "new_flow", "xdp") > 0);

    env.agent.kill9();
    assert_eq!(xdp_progs(&env), 1, "XDP outlives the agent");
    held.exchange("agent-down");
    env.agent.restart();
    assert_eq!(xdp_progs(&env), 1, "replaced in place, not added");
    held.exchange("after-restart");
    assert!(ask(&env).expect("connect").starts_with("pod-"));

    env.agent.restart_with_args(&[]);
    assert_eq!(xdp_progs(&env), 0, "detached: {}", env.agent.log());
    held.exchange("tc-only");
    assert!(ask(&env).expect("connect").starts_with("pod-"));
}

#[test]
fn cleanup_refuses_a_directory_that_is_not_bpffs() {
    require_root();
    let dir = std::env::temp_dir().join(format!("lb-cleanup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("keep"), "x").expect("write");
    let out = Command::new(agent_binary())
        .arg("--cleanup")
        .arg("--bpffs-root")
        .arg(&dir)
        .env("NO_COLOR", "1")
        .output()
        .expect("run lb-agent --cleanup");
    let kept = dir.join("keep").exists();
    let _ = std::fs::remove_dir_all(&dir);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "--cleanup accepted {}",
        dir.display()
    );
    assert!(log.contains("not on a bpf filesystem"), "{log}");
    assert!(kept, "--cleanup deleted files outside bpffs");
}
