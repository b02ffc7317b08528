//! The test network: client namespaces -> a node namespace (where the agent runs and the
//! programs attach) -> pod namespaces. Drawn in tests/README.md.
use std::{net::Ipv4Addr, process::Command};

use crate::netns::{NetNs, next_id, run_in, unique_prefix};

/// The agent's `--devices` in the node namespace: the node ends of every client and pod
/// veth (`veth-cN`, `veth-pN`), including pods added later.
pub const NODE_DEVICES: &str = "veth*";
/// Where Service ClusterIPs are taken from in the tests. Nothing routes this range: only
/// the datapath delivers it.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// Hosts of one kind (clients or pods) per topology: the third octet of their addresses is
/// `8 * block + k`, k = 1..=7.
pub const MAX_HOSTS: usize = 7;
/// Address blocks: topologies built one after another get different addresses.
const BLOCKS: u32 = 32;

/// A veth pair between the node namespace and a host namespace.
#[derive(Debug, Clone)]
pub struct Veth {
    /// The node's end (`veth-cN` / `veth-pN`).
    pub node_name: String,
    /// Ifindex of the node's end, in the node namespace.
    pub node_ifindex: u32,
    /// MAC of the node's end.
    pub node_mac: [u8; 6],
    /// The node's address on the link (the host's default gateway).
    pub node_ip: Ipv4Addr,
    /// The host's end (`eth0`).
    pub peer_name: String,
    /// Ifindex of the host's end, in the host namespace.
    pub peer_ifindex: u32,
    /// MAC of the host's end.
    pub peer_mac: [u8; 6],
    /// The host's address.
    pub peer_ip: Ipv4Addr,
}

/// A client or a pod: its namespace, its address and its link to the node.
#[derive(Debug)]
pub struct Host {
    /// Its namespace.
    pub ns: NetNs,
    /// Its address (on its `eth0`).
    pub ip: Ipv4Addr,
    /// The link to the node.
    pub veth: Veth,
}

/// The whole test network. Dropping it deletes every namespace, and with them every veth.
#[derive(Debug)]
pub struct Topology {
    /// Client namespaces, addresses `10.200.B.2`.
    pub clients: Vec<Host>,
    /// Pod namespaces, addresses `10.201.B.2`; tests name their servers pod-1, pod-2, ...
    pub pods: Vec<Host>,
    prefix: String,
    block: u8,
    /// The node namespace. Declared last so it is deleted after the hosts.
    pub node: NetNs,
}

/// How to build a [`Topology`].
#[derive(Debug, Clone)]
pub struct TopologyBuilder {
    clients: usize,
    pods: usize,
    fixed: Option<(String, u8)>,
}

impl Topology {
    /// `clients` client namespaces and `pods` pod namespaces around one node namespace.
    pub fn new(clients: usize, pods: usize) -> Self {
        Self::builder().clients(clients).pods(pods).build()
    }

    /// A builder: one client and three pods unless told otherwise.
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder {
            clients: 1,
            pods: 3,
            fixed: None,
        }
    }

    /// The pods' addresses, in order.
    pub fn pod_ips(&self) -> Vec<Ipv4Addr> {
        self.pods.iter().map(|p| p.ip).collect()
    }

    /// Adds one more pod namespace (node device `veth-pN`), as a new pod's veth appears on
    /// a running node. Returns its index in [`Topology::pods`].
    pub fn add_pod(&mut self) -> usize {
        let k = self.pods.len() + 1;
        let host = self.link(&format!("{}-p{k}", self.prefix), "veth-p", 201, k);
        self.pods.push(host);
        k - 1
    }

    /// Leaves every namespace in place after the topology is gone (`cargo xtask demo
    /// --keep`); returns their names.
    pub fn persist(self) -> Vec<String> {
        let mut names: Vec<String> = self
            .clients
            .into_iter()
            .chain(self.pods)
            .map(|h| h.ns.persist())
            .collect();
        names.push(self.node.persist());
        names
    }

    /// A host namespace linked to the node by a veth pair created directly inside the two
    /// namespaces, on `10.<net>.<8 * block + k>.0/24` with the node at `.1`, the host at
    /// `.2` and the host's default route via the node.
    fn link(&self, ns_name: &str, node_dev_prefix: &str, net: u8, k: usize) -> Host {
        assert!(
            (1..=MAX_HOSTS).contains(&k),
            "a topology has at most {MAX_HOSTS} clients and {MAX_HOSTS} pods"
        );
        let ns = NetNs::new(ns_name);
        let third = self.block * 8 + k as u8;
        let peer_ip = Ipv4Addr::new(10, net, third, 2);
        let node_ip = Ipv4Addr::new(10, net, third, 1);
        let node_name = format!("{node_dev_prefix}{k}");
        self.node.ip(&[
            "link", "add", &node_name, "type", "veth", "peer", "name", "eth0", "netns", ns_name,
        ]);
        self.node
            .ip(&["addr", "add", &format!("{node_ip}/24"), "dev", &node_name]);
        self.node.ip(&["link", "set", &node_name, "up"]);
        ns.ip(&["addr", "add", &format!("{peer_ip}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["route", "add", "default", "via", &node_ip.to_string()]);
        let (node_ifindex, node_mac) = link_info(&self.node, &node_name);
        let (peer_ifindex, peer_mac) = link_info(&ns, "eth0");
        Host {
            ns,
            ip: peer_ip,
            veth: Veth {
                node_name,
                node_ifindex,
                node_mac,
                node_ip,
                peer_name: "eth0".into(),
                peer_ifindex,
                peer_mac,
                peer_ip,
            },
        }
    }
}

impl TopologyBuilder {
    /// Number of client namespaces (at most [`MAX_HOSTS`]).
    pub fn clients(mut self, n: usize) -> Self {
        self.clients = n;
        self
    }

    /// Number of pod namespaces (at most [`MAX_HOSTS`]); more can be added later.
    pub fn pods(mut self, n: usize) -> Self {
        self.pods = n;
        self
    }

    /// Fixed namespace names (`PREFIX-node`, `PREFIX-c1`, ...) and address block, instead
    /// of ones unique to this process: for the demo, whose namespaces `--down` finds by
    /// name and whose manifests name its pods' addresses (block 0: `10.201.1.2`, ...).
    pub fn named(mut self, prefix: &str, block: u8) -> Self {
        assert!(
            u32::from(block) < BLOCKS,
            "address block {block} out of range"
        );
        self.fixed = Some((prefix.to_owned(), block));
        self
    }

    /// Creates the namespaces and links. The node forwards, and its FORWARD chain drops
    /// `ctstate INVALID` (as kube-proxy's rules and hardened hosts do), so every test also
    /// checks that netfilter sees consistent flows.
    pub fn build(self) -> Topology {
        let (prefix, block) = self.fixed.unwrap_or_else(|| {
            let n = next_id();
            (unique_prefix(n), (n % BLOCKS) as u8)
        });
        let node = NetNs::new(&format!("{prefix}-node"));
        node.sysctl("net.ipv4.ip_forward=1");
        // Replies to rejected packets and redirects must not be filtered by rp_filter.
        node.sysctl("net.ipv4.conf.all.rp_filter=0");
        run_in(
            &node,
            &[
                iptables(),
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
        let mut t = Topology {
            clients: Vec::new(),
            pods: Vec::new(),
            prefix,
            block,
            node,
        };
        for k in 1..=self.clients {
            let host = t.link(&format!("{}-c{k}", t.prefix), "veth-c", 200, k);
            crate::wire_checksums(&host.ns, "eth0");
            t.clients.push(host);
        }
        for _ in 0..self.pods {
            t.add_pod();
        }
        t
    }
}

/// `iptables-nft` when installed (Debian's default backend), else `iptables`.
pub fn iptables() -> &'static str {
    let has_nft = Command::new("iptables-nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if has_nft { "iptables-nft" } else { "iptables" }
}

/// Ifindex and MAC of `dev` in `ns`, from `ip -o link show`
/// (`7: veth-c1@if2: <...> ... link/ether 5e:...:01 brd ...`).
fn link_info(ns: &NetNs, dev: &str) -> (u32, [u8; 6]) {
    let out = ns.ip(&["-o", "link", "show", "dev", dev]);
    let line = String::from_utf8_lossy(&out.stdout);
    let ifindex = line
        .split(':')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ifindex in {line:?}"));
    let mac = line
        .split_once("link/ether ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(parse_mac)
        .unwrap_or_else(|| panic!("no MAC in {line:?}"));
    (ifindex, mac)
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}
