//! The test network: client namespaces -> a node namespace (where the agent runs and the
//! programs attach) -> pod namespaces. Drawn in tests/README.md.
use std::net::Ipv4Addr;

use crate::netns::{NetNs, unique_prefix};

/// Devices of the node namespace that face clients and pods; the agent attaches to
/// [`NODE_DEVICES`].
pub const NODE_DEVICES: &str = "lbc*,lbp*";
/// Where Service ClusterIPs are taken from in the tests.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

/// A client or a pod: its namespace and its address.
#[derive(Debug)]
pub struct Host {
    /// Its namespace.
    pub ns: NetNs,
    /// Its address (on its `eth0`).
    pub ip: Ipv4Addr,
    /// The node's address on the link to it (its default gateway).
    pub gateway: Ipv4Addr,
    /// The node-side device of the link.
    pub node_device: String,
}

/// The whole test network.
#[derive(Debug)]
pub struct Topology {
    /// Client namespaces (`10.200.N.2`).
    pub clients: Vec<Host>,
    /// Pod namespaces (`10.201.N.2`), named pod-1, pod-2, ... by their servers.
    pub pods: Vec<Host>,
    prefix: String,
    /// The node namespace. Declared last so it is deleted after the hosts.
    pub node: NetNs,
}

impl Topology {
    /// Builds `clients` client namespaces and `pods` pod namespaces around one node
    /// namespace. The node forwards, and its FORWARD chain drops `ctstate INVALID` (as
    /// kube-proxy's rules and hardened hosts do), so every test checks that netfilter sees
    /// consistent flows.
    pub fn new(clients: usize, pods: usize) -> Self {
        let prefix = unique_prefix();
        let node = NetNs::new(&format!("{prefix}-node"));
        node.sysctl("net.ipv4.ip_forward=1");
        // Replies to rejected packets and redirects must not be filtered by rp_filter.
        node.sysctl("net.ipv4.conf.all.rp_filter=0");
        node.exec(
            "iptables",
            &[
                "-A",
                "FORWARD",
                "-m",
                "conntrack",
                "--ctstate",
                "INVALID",
                "-j",
                "DROP",
            ],
        );
        let mut t = Self {
            clients: Vec::new(),
            pods: Vec::new(),
            prefix: prefix.clone(),
            node,
        };
        for i in 1..=clients {
            let host = t.link(&format!("{prefix}-c{i}"), &format!("lbc{i}"), 200, i);
            t.clients.push(host);
        }
        for _ in 0..pods {
            t.add_pod();
        }
        t
    }

    /// Adds one more pod namespace (`10.201.N.2`, node device `lbpN`), as a new pod's veth
    /// appears on a running node. Returns its index in [`Topology::pods`].
    pub fn add_pod(&mut self) -> usize {
        let i = self.pods.len() + 1;
        let host = self.link(&format!("{}-p{i}", self.prefix), &format!("lbp{i}"), 201, i);
        self.pods.push(host);
        i - 1
    }

    /// A host namespace linked to the node by a veth pair created directly inside the two
    /// namespaces, addressed `10.<net>.<i>.2/24` with the node at `.1`.
    fn link(&self, ns_name: &str, node_dev: &str, net: u8, i: usize) -> Host {
        let ns = NetNs::new(ns_name);
        let i = u8::try_from(i).expect("fewer than 256 hosts");
        let ip = Ipv4Addr::new(10, net, i, 2);
        let gateway = Ipv4Addr::new(10, net, i, 1);
        self.node.ip(&[
            "link", "add", node_dev, "type", "veth", "peer", "name", "eth0", "netns", ns_name,
        ]);
        self.node
            .ip(&["addr", "add", &format!("{gateway}/24"), "dev", node_dev]);
        self.node.ip(&["link", "set", node_dev, "up"]);
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["route", "add", "default", "via", &gateway.to_string()]);
        Host {
            ns,
            ip,
            gateway,
            node_device: node_dev.to_owned(),
        }
    }
}
