//! A two-node test network: two external clients and two node namespaces on one shared
//! bridge (the LAN), each node routing to pod namespaces of its own. Drawn in
//! tests/README.md.
//!
//! ```text
//!  client ns          switch ns (bridge br0)          node ns i (i = 1, 2)       pod ns i.k
//!  eth0 10.210.B.2 ---- sw-c  sw-n1  sw-n2 ---- veth-up 10.210.B.(10+i)      eth0 10.(210+i).C.2
//!  eth0 10.210.B.3 ---- sw-c2                        veth-pK 10.(210+i).C.1 ----
//!  (other client ns)
//! ```
//!
//! The clients reach the nodes' LAN addresses directly (NodePorts) and send `10.96.0.0/12`
//! (ClusterIPs, externalIPs, LoadBalancer IPs in the tests) to node 1. Each node routes the
//! other node's pod subnets through it, so pods reach each other; the nodes have no route
//! for Service addresses.
use std::net::Ipv4Addr;

use crate::netns::{NetNs, next_id, unique_prefix};

/// Address blocks: clusters built one after another get different addresses.
const BLOCKS: u32 = 32;

/// A namespace with one address (a client or a pod).
#[derive(Debug)]
pub struct Member {
    /// Its namespace.
    pub ns: NetNs,
    /// Its address, on its `eth0`.
    pub ip: Ipv4Addr,
}

/// One node: its namespace, its LAN address and its pods.
#[derive(Debug)]
pub struct ClusterNode {
    /// The node's name, as endpoints' `nodeName` and the agent's `--hostname-override`
    /// give it: `node-1`, `node-2`.
    pub name: String,
    /// The node's address on the LAN (its `veth-up`).
    pub ip: Ipv4Addr,
    /// Pod namespaces; tests name their servers after them.
    pub pods: Vec<Member>,
    /// The node namespace. Declared after the pods so it is deleted after them.
    pub ns: NetNs,
}

impl ClusterNode {
    /// The wrapper ([`crate::agent::Agent::start_under`]) that starts this node's agent
    /// with its node name. The devices every test agent attaches to
    /// ([`crate::topology::NODE_DEVICES`]) cover `veth-up` and the pod veths.
    pub fn agent_wrapper(&self) -> Vec<String> {
        vec![
            "sh".into(),
            "-c".into(),
            format!("exec \"$@\" --hostname-override {}", self.name),
            "sh".into(),
        ]
    }
}

/// The whole network. Dropping it deletes every namespace, and with them every link.
#[derive(Debug)]
pub struct Cluster {
    /// The external client, `10.210.B.2`.
    pub client: Member,
    /// A second external client, `10.210.B.3`, with the same routes.
    pub other_client: Member,
    /// The two nodes.
    pub nodes: Vec<ClusterNode>,
    /// The switch. Declared last so it is deleted last.
    _switch: NetNs,
}

impl Cluster {
    /// Two nodes with `pods_per_node` pods each (at most 7), and two external clients.
    pub fn new(pods_per_node: usize) -> Self {
        assert!((1..=7).contains(&pods_per_node), "1 to 7 pods per node");
        let n = next_id();
        let prefix = unique_prefix(n);
        let block = (n % BLOCKS) as u8;
        let switch = NetNs::new(&format!("{prefix}-sw"));
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        let lan = |host: u8| Ipv4Addr::new(10, 210, block, host);

        let client_at = |name: &str, port: &str, host: u8| {
            let ns = NetNs::new(&format!("{prefix}-{name}"));
            plug(&switch, port, &ns, "eth0");
            ns.ip(&["addr", "add", &format!("{}/24", lan(host)), "dev", "eth0"]);
            ns.ip(&["link", "set", "eth0", "up"]);
            ns.ip(&["route", "add", "10.96.0.0/12", "via", &lan(11).to_string()]);
            crate::wire_checksums(&ns, "eth0");
            Member { ns, ip: lan(host) }
        };
        let client = client_at("c", "sw-c", 2);
        let other_client = client_at("c2", "sw-c2", 3);

        let mut nodes = Vec::new();
        for i in 1..=2u8 {
            let ns = NetNs::new(&format!("{prefix}-n{i}"));
            ns.sysctl("net.ipv4.ip_forward=1");
            ns.sysctl("net.ipv4.conf.all.rp_filter=0");
            plug(&switch, &format!("sw-n{i}"), &ns, "veth-up");
            let ip = lan(10 + i);
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "veth-up"]);
            ns.ip(&["link", "set", "veth-up", "up"]);
            let mut pods = Vec::new();
            for k in 1..=pods_per_node as u8 {
                let third = block * 8 + k;
                let pod_ns = NetNs::new(&format!("{prefix}-n{i}p{k}"));
                let dev = format!("veth-p{k}");
                ns.ip(&[
                    "link",
                    "add",
                    &dev,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    pod_ns.name(),
                ]);
                let gw = Ipv4Addr::new(10, 210 + i, third, 1);
                let pod_ip = Ipv4Addr::new(10, 210 + i, third, 2);
                ns.ip(&["addr", "add", &format!("{gw}/24"), "dev", &dev]);
                ns.ip(&["link", "set", &dev, "up"]);
                pod_ns.ip(&["addr", "add", &format!("{pod_ip}/24"), "dev", "eth0"]);
                pod_ns.ip(&["link", "set", "eth0", "up"]);
                pod_ns.ip(&["route", "add", "default", "via", &gw.to_string()]);
                pods.push(Member {
                    ns: pod_ns,
                    ip: pod_ip,
                });
            }
            nodes.push(ClusterNode {
                name: format!("node-{i}"),
                ip,
                pods,
                ns,
            });
        }
        // Each node reaches the other's pods through it.
        for (me, other) in [(0, 1), (1, 0)] {
            let via = nodes[other].ip.to_string();
            for pod in &nodes[other].pods {
                let o = pod.ip.octets();
                let subnet = format!("{}.{}.{}.0/24", o[0], o[1], o[2]);
                nodes[me].ns.ip(&["route", "add", &subnet, "via", &via]);
            }
        }
        Self {
            client,
            other_client,
            nodes,
            _switch: switch,
        }
    }
}

/// Links `ns`'s `dev` to the switch's bridge through port `port`.
fn plug(switch: &NetNs, port: &str, ns: &NetNs, dev: &str) {
    switch.ip(&[
        "link",
        "add",
        port,
        "type",
        "veth",
        "peer",
        "name",
        dev,
        "netns",
        ns.name(),
    ]);
    switch.ip(&["link", "set", port, "master", "br0"]);
    switch.ip(&["link", "set", port, "up"]);
}
