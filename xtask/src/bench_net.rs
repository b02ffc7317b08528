//! `cargo xtask bench datapath`: one Service over real connections, reached five ways,
//! with other Services loaded beside it.
//!
//! The network is the end-to-end tests' (tests/README.md): a client namespace -> a node
//! namespace -> two pod namespaces, one such network per variant and size, built by this
//! process and removed by its guards when the size is done, or the run fails or is
//! interrupted. Nothing
//! routes out of it. The pods' servers ([`PodServers`]) are threads of this process whose
//! sockets live in the pod namespaces; the client is `lbt-client` in its load modes. The
//! variants, one active at a time in the node namespace:
//!
//! - direct: the client addresses a pod IP (client k -> pod k mod 2), nothing translates;
//! - iptables: the rules kube-proxy's iptables mode programs, loaded with
//!   `iptables-restore --noflush` ([`crate::bench_rules`]);
//! - nftables: the rules of kube-proxy's nftables mode, loaded with `nft -f`;
//! - lb: the agent's loader and applier (`Datapath` + `Applier`) load the programs,
//!   fill the maps and attach to the node's veths, as `lb-agent` does (in-process, so that
//!   the maps can be sized for the load: the agent's default capacity holds about 21,000
//!   Services of 10 endpoints);
//! - lb XDP: the same, with the XDP program (`lb-agent --xdp`) on the node's client-side
//!   veth in front of the TC programs (native mode where the kernel's veth driver has it);
//!   after its rounds the XDP program's counters must show the flows it created, so that
//!   its figures cannot be the TC programs'.
//!
//! The measured Service (ClusterIP [`TARGET_VIP`]) has both pods as endpoints; with N
//! other Services (10 endpoints each) it sits in the middle of kube-proxy's rule order.
//! Each variant is programmed once per size (a load that overruns the plan's limit leaves
//! that variant out at that size); each round then runs every variant (in a rotated
//! order) and each test once; the report takes the median over rounds and keeps the
//! spread.
//!
//! With `NetPlan::tools`, each variant's turn in a round ends with the same Service
//! measured by standard tools (netperf, or iperf3 and sockperf: [`crate::bench_tools`]),
//! whose servers run in the first pod.
use std::{
    collections::BTreeMap,
    fmt,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_agent::{
    apply::Applier,
    datapath::{self, Datapath, DevicePatterns, Metrics, XdpAttachMode, XdpConfig},
    model::{self, NodeContext},
};
use serde_json::json;
// `::tests`: the crate, not this file's `mod tests`.
use ::tests::{
    netns::{NetNs, command_in},
    topology::{NODE_DEVICES, Topology},
};

use crate::{
    bench::{ENDPOINTS, PinDir, cluster_ip, compact, objects, pod_ip, sizes_for},
    bench_rules::{self, ServicePort},
    bench_tools::{self, Tools},
};

/// The measured Service's ClusterIP.
pub const TARGET_VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 10);
/// The echo servers' port (TCP and UDP) on the pods and on the Service.
const ECHO_PORT: u16 = 11111;
/// The TCP sink's port on the pods and on the Service.
const SINK_PORT: u16 = 5001;
/// The connect/request/close server's port on the pods and on the Service.
const CRR_PORT: u16 = 8080;
/// The datagram sink's port (UDP) on the pods and on the Service (forwarding rate).
const FLOOD_PORT: u16 = 9000;
/// Payload of the forwarding-rate test's datagrams, bytes.
const FLOOD_PAYLOAD: usize = 64;
/// Datagrams per sendmmsg(2)/recvmmsg(2) call.
const FLOOD_BATCH: usize = 32;
/// The node's devices on the clients' side: where lb XDP attaches its XDP program.
const CLIENT_DEVICES: &str = "veth-c*";
/// The pods' addresses, as kube-proxy's cluster CIDR: clients outside it are masqueraded.
pub const POD_CIDR: &str = "10.201.0.0/16";

/// Which sizes, how long, how often.
pub struct NetPlan {
    /// Numbers of other Services loaded beside the measured one.
    pub sizes: Vec<usize>,
    /// Seconds per test run.
    pub seconds: u32,
    /// Rounds over all variants.
    pub rounds: usize,
    /// Numbers of parallel clients.
    pub clients: Vec<usize>,
    /// Longest a variant may take to program; past it, it is not measured at that size.
    pub load_limit: Duration,
    /// Tests cross-checked with standard tools ([`crate::bench_tools`]) after each
    /// variant's own tests, those the tools found measure.
    pub tools: Vec<Test>,
}

impl NetPlan {
    /// What the test suite runs: small, one round, one client, a second per test.
    pub fn quick() -> Self {
        Self {
            sizes: vec![0, 1_000],
            seconds: 1,
            rounds: 1,
            clients: vec![1],
            load_limit: Duration::from_secs(60),
            tools: QUICK_TOOLS.to_vec(),
        }
    }

    /// The full run's shape at sizes and lengths that fit in a quarter of an hour.
    pub fn medium() -> Self {
        Self {
            sizes: vec![0, 10_000],
            rounds: 2,
            ..Self::full()
        }
    }

    /// The documented run.
    pub fn full() -> Self {
        Self {
            sizes: vec![0, 10_000, 30_000],
            seconds: 2,
            rounds: 3,
            clients: vec![1, 4],
            load_limit: Duration::from_secs(240),
            tools: vec![Test::TcpStream, Test::TcpRr, Test::UdpRr, Test::TcpCrr],
        }
    }
}

/// The standard tools' tests in the test suite's run: iperf3's second per variant.
const QUICK_TOOLS: [Test; 1] = [Test::TcpStream];

/// How the client reaches the Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variant {
    /// The pod IP, no translation.
    Direct,
    /// kube-proxy, iptables mode.
    Iptables,
    /// kube-proxy, nftables mode.
    Nftables,
    /// lb's TC programs.
    Lb,
    /// lb's XDP program on the clients' side, in front of the TC programs.
    LbXdp,
}

impl Variant {
    /// All, in report order.
    pub const ALL: [Variant; 5] = [
        Self::Direct,
        Self::Iptables,
        Self::Nftables,
        Self::Lb,
        Self::LbXdp,
    ];

    /// Column name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
            Self::Lb => "lb",
            Self::LbXdp => "lb XDP",
        }
    }

    /// Name in the network namespaces' names.
    fn slug(self) -> &'static str {
        match self {
            Self::LbXdp => "lbxdp",
            other => other.name(),
        }
    }
}

/// A workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Test {
    /// Request/response on one TCP connection.
    TcpRr,
    /// Connect, one response, close.
    TcpCrr,
    /// Bulk TCP.
    TcpStream,
    /// Request/response over UDP.
    UdpRr,
    /// Forwarding rate: small datagrams as fast as the clients send them.
    UdpFlood,
}

impl Test {
    /// All, in report order.
    pub const ALL: [Test; 5] = [
        Self::TcpRr,
        Self::TcpCrr,
        Self::TcpStream,
        Self::UdpRr,
        Self::UdpFlood,
    ];

    /// netperf's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Self::TcpRr => "TCP_RR",
            Self::TcpCrr => "TCP_CRR",
            Self::TcpStream => "TCP_STREAM",
            Self::UdpRr => "UDP_RR",
            Self::UdpFlood => "UDP_FLOOD",
        }
    }

    /// Unit of the figure.
    pub fn unit(self) -> &'static str {
        match self {
            Self::TcpRr | Self::UdpRr => "transactions/s",
            Self::TcpCrr => "connections/s",
            Self::TcpStream => "MB/s",
            Self::UdpFlood => "packets/s",
        }
    }

    /// The tool and its mode.
    pub fn tool(self) -> &'static str {
        match self {
            Self::TcpRr => {
                "lbt-client rr: 64-byte request, 64-byte answer, one connection per client"
            }
            Self::TcpCrr => "lbt-client crr (connect, read the server's one-line answer, close)",
            Self::TcpStream => {
                "lbt-client stream: 64 KiB writes for the test's time; bytes the server received"
            }
            Self::UdpRr => "lbt-client udp-rr: 64-byte datagram, 64-byte answer",
            Self::UdpFlood => {
                "the bench's own sender (xtask: sendmmsg(2) of 64-byte datagrams for the \
                 test's time, one connected socket per client) and a sink in each pod \
                 counting the datagrams it receives (recvmmsg(2)); datagrams received per \
                 second of sending, loss = 1 - received / sent"
            }
        }
    }
}

/// Measurements of one run.
#[derive(Default)]
pub struct NetReport {
    /// (size, test, clients, variant) -> one figure per round.
    pub samples: BTreeMap<(usize, Test, usize, Variant), Vec<f64>>,
    /// (size, variant) -> time to program the variant, ms.
    pub load_ms: BTreeMap<(usize, Variant), Vec<f64>>,
    /// (size, variant, why) of variants that could not be programmed at that size.
    pub overran: Vec<(usize, Variant, String)>,
    /// (size, clients, variant) -> the forwarding-rate test's loss (0..1), one per round.
    pub loss: BTreeMap<(usize, usize, Variant), Vec<f64>>,
    /// size -> the XDP program's counters after lb XDP's last round (reason, packets).
    pub xdp_counters: BTreeMap<usize, Vec<(&'static str, u64)>>,
    /// How the XDP program was attached (`native` or `generic`), once it was.
    pub xdp_mode: Option<String>,
    /// The standard tools that cross-checked, if the plan asked for them.
    pub tools: Option<Tools>,
    /// (size, test, variant) -> the standard tool's figure, one per round.
    pub tool_samples: BTreeMap<(usize, Test, Variant), Vec<f64>>,
}

/// Runs the plan. Fails only if a variant does not carry traffic at all.
pub fn run(plan: &NetPlan) -> Result<NetReport> {
    for tool in [iptables_restore(), "nft"] {
        ensure!(
            Command::new(tool)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success()),
            "{tool} is missing: run scripts/setup.sh"
        );
    }
    let lbt_client = ::tests::workspace_binary("lbt-client");
    ensure!(
        lbt_client.exists(),
        "{} is missing: build it with `cargo build --release -p tests --bins`",
        lbt_client.display()
    );
    let tools = if plan.tools.is_empty() {
        None
    } else {
        Some(Tools::find()?)
    };
    crate::interrupt::catch();
    // Fixture helpers panic on failure; turn that into an error after the guards ran.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_in_topology(plan, &lbt_client, tools)
    }))
    .unwrap_or_else(|e| {
        let what = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        Err(anyhow!("the datapath benchmark failed: {what}"))
    })
}

/// The network of one variant: client -> node -> 2 pods with their servers. Each variant
/// gets its own, so that nothing one variant puts in the kernel (netfilter tables and
/// hooks, conntrack entries, TIME_WAIT sockets) touches another.
struct Net {
    // Fields drop in order: servers before the namespaces they live in.
    tool_servers: Option<bench_tools::Servers>,
    servers: Vec<PodServers>,
    topo: Topology,
}

impl Net {
    /// With `tools`, their servers run in the first pod (the tools' ports' one endpoint).
    fn up(variant: Variant, lbt_client: &Path, tools: Option<&Tools>) -> Result<Self> {
        // Fixed addresses (block 0) in every network, so that the rules generated once per
        // size name the pods of each; the namespaces keep the networks apart.
        let prefix = format!("lbbench-{}-{}", std::process::id(), variant.slug());
        let topo = Topology::builder()
            .named(&prefix, 0)
            .clients(1)
            .pods(2)
            .build();
        let client = &topo.clients[0].ns;
        // CRR opens many short connections to one address: reuse TIME_WAIT ports.
        client.sysctl("net.ipv4.tcp_tw_reuse=1");
        client.sysctl("net.ipv4.ip_local_port_range=1024 65000");
        if variant == Variant::LbXdp {
            // A local socket's packet crosses a veth with a partial checksum (the
            // pseudo-header's sum only), which no NIC delivers and which an XDP program,
            // rewriting complete checksums, cannot update: the client sends what a wire
            // would carry, as the end-to-end tests in XDP mode do.
            client
                .run(|| ::tests::tx_checksum_off("eth0"))
                .context("turning transmit checksum offload off on the client's eth0")?;
        }
        let mut net = Self {
            tool_servers: None,
            servers: Vec::new(),
            topo,
        };
        for (k, pod) in net.topo.pods.iter().enumerate() {
            net.servers
                .push(PodServers::start(&pod.ns, &format!("pod-{}", k + 1))?);
        }
        wait_for_servers(net.client(), &net.topo.pod_ips(), lbt_client)?;
        if let Some(tools) = tools {
            net.tool_servers = Some(bench_tools::Servers::start(tools, &net.topo.pods[0].ns)?);
        }
        Ok(net)
    }

    fn client(&self) -> &NetNs {
        &self.topo.clients[0].ns
    }

    /// Datagrams the pods' sinks have received so far.
    fn flood_received(&self) -> u64 {
        self.servers
            .iter()
            .map(|s| s.flood_received.load(Ordering::Relaxed))
            .sum()
    }
}

fn run_in_topology(plan: &NetPlan, lbt_client: &Path, tools: Option<Tools>) -> Result<NetReport> {
    println!("datapath: client -> node -> 2 pods in network namespaces, one network per variant");
    let pods = Net::up(Variant::Direct, lbt_client, None)?.topo.pod_ips();
    let tool_tests: Vec<Test> = plan
        .tools
        .iter()
        .copied()
        .filter(|&t| tools.as_ref().is_some_and(|tools| tools.measures(t)))
        .collect();
    let mut report = NetReport::default();
    let began = Instant::now();
    for &n in &plan.sizes {
        crate::interrupt::check("the benchmark's namespaces were removed")?;
        let ports = all_ports(n, &pods);
        let iptables = bench_rules::iptables_full(&ports, POD_CIDR);
        let nft = bench_rules::nft_full(&ports, POD_CIDR);
        drop(ports);
        let payloads = Payloads::write(n, &iptables, &nft)?;
        drop((iptables, nft));
        // Each variant in a network of its own, programmed once per size; the rounds then
        // take turns between them, so that drift on the machine spreads over all variants.
        let mut nets = Vec::new();
        for variant in Variant::ALL {
            crate::interrupt::check("the benchmark's namespaces were removed")?;
            println!(
                "datapath: {n} other Services, programming {} ({:.0} s in)",
                variant.name(),
                began.elapsed().as_secs_f64()
            );
            let net = Net::up(variant, lbt_client, tools.as_ref())?;
            ensure!(net.topo.pod_ips() == pods, "the pods' addresses differ");
            let started = Instant::now();
            match activate(
                variant,
                &net.topo.node,
                n,
                &pods,
                &payloads,
                plan.load_limit,
            ) {
                Ok(active) => {
                    report
                        .load_ms
                        .insert((n, variant), vec![started.elapsed().as_secs_f64() * 1e3]);
                    if let Err(e) = check(variant, net.client(), &pods, lbt_client) {
                        return Err(match &active {
                            Active::Lb { guard } if variant == Variant::LbXdp => {
                                e.context(format!("XDP counters: {:?}", guard.xdp_counters()))
                            }
                            _ => e,
                        });
                    }
                    if let Active::Lb { guard } = &active
                        && let Some(mode) = &guard.xdp_mode
                    {
                        report.xdp_mode = Some(mode.clone());
                    }
                    nets.push((variant, net, active));
                }
                // A kernel without what the variant needs (the XDP program, or XDP on
                // veth) leaves it out, saying why.
                Err(e) if e.downcast_ref::<Unsupported>().is_some() => {
                    println!("datapath: {}: {e:#}; skipped", variant.name());
                    report
                        .overran
                        .push((n, variant, "not supported here".to_owned()));
                }
                // A load that overruns the limit, or that the tool refuses at this size
                // (iptables-legacy's table size limit), leaves the variant out here.
                Err(e) if e.downcast_ref::<TimedOut>().is_some() || n > 0 => {
                    println!("datapath: {}: {e:#}; not measured at {n}", variant.name());
                    let why = if e.downcast_ref::<TimedOut>().is_some() {
                        format!("> {:.0} s", plan.load_limit.as_secs_f64())
                    } else {
                        "load failed".to_owned()
                    };
                    report.overran.push((n, variant, why));
                }
                Err(e) => return Err(e),
            }
        }
        for round in 0..plan.rounds {
            let mut order: Vec<usize> = (0..nets.len()).collect();
            order.rotate_left(round % nets.len().max(1));
            for i in order {
                let (variant, net, active) = &nets[i];
                let variant = *variant;
                crate::interrupt::check("the benchmark's namespaces were removed")?;
                println!(
                    "datapath: {n} other Services, round {}/{}, {} ({:.0} s in)",
                    round + 1,
                    plan.rounds,
                    variant.name(),
                    began.elapsed().as_secs_f64()
                );
                for test in Test::ALL {
                    for &clients in &plan.clients {
                        crate::interrupt::check("the benchmark's namespaces were removed")?;
                        let what = || {
                            format!(
                                "{} through {} ({n} other Services)",
                                test.name(),
                                variant.name()
                            )
                        };
                        let v = if test == Test::UdpFlood {
                            let (rate, loss) =
                                run_flood(net, variant, clients, &pods, plan.seconds)
                                    .with_context(what)?;
                            report
                                .loss
                                .entry((n, clients, variant))
                                .or_default()
                                .push(loss);
                            rate
                        } else {
                            run_test(
                                net.client(),
                                variant,
                                test,
                                clients,
                                &pods,
                                plan.seconds,
                                lbt_client,
                            )
                            .with_context(what)?
                        };
                        report
                            .samples
                            .entry((n, test, clients, variant))
                            .or_default()
                            .push(v);
                    }
                }
                if let Some(tools) = &tools {
                    for &test in &tool_tests {
                        crate::interrupt::check("the benchmark's namespaces were removed")?;
                        let v = tools
                            .run(net.client(), target(variant, &pods, 0), test, plan.seconds)
                            .with_context(|| {
                                format!(
                                    "{} through {} ({n} other Services, {})",
                                    test.name(),
                                    variant.name(),
                                    tools.describe(test)
                                )
                            })?;
                        report
                            .tool_samples
                            .entry((n, test, variant))
                            .or_default()
                            .push(v);
                    }
                }
                if let Active::Lb { guard } = active
                    && variant == Variant::LbXdp
                {
                    let counters = guard.xdp_counters();
                    let new_flows = counters
                        .iter()
                        .find(|c| c.0 == XDP_NEW_FLOW)
                        .map_or(0, |c| c.1);
                    println!("datapath: XDP counters: {counters:?}");
                    ensure!(
                        new_flows > 0,
                        "lb XDP: the XDP program created no flow ({n} other Services): its \
                         figures would be the TC programs'"
                    );
                    report.xdp_counters.insert(n, counters);
                }
            }
        }
        // The programs detach, then the networks go.
        for (_, net, active) in nets {
            drop(active);
            drop(net);
        }
    }
    report.tools = tools;
    Ok(report)
}

/// The servers of one pod, threads of this process whose sockets were created in the pod
/// namespace: TCP echo and UDP echo on [`ECHO_PORT`], a TCP sink on [`SINK_PORT`] that
/// answers the byte count it received when the client stops sending, and a
/// connect/request/close server on [`CRR_PORT`] that answers each connection with one line
/// (`NAME CLIENT`, as the tests' pod servers greet) and closes. They block in accept(2) and
/// recv(2) (the tests' servers poll, which would dominate a connection-rate test); two
/// threads serve each listener and the UDP socket. A UDP sink on [`FLOOD_PORT`] counts
/// the datagrams it receives (forwarding rate).
struct PodServers {
    listeners: Vec<TcpListener>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    flood_received: Arc<AtomicU64>,
}

impl PodServers {
    fn start(ns: &NetNs, name: &str) -> Result<Self> {
        let (listeners, udp, flood) = ns.run(|| -> std::io::Result<_> {
            let tcp = [CRR_PORT, ECHO_PORT, SINK_PORT]
                .into_iter()
                .map(|p| TcpListener::bind(("0.0.0.0", p)))
                .collect::<std::io::Result<Vec<_>>>()?;
            let udp = UdpSocket::bind(("0.0.0.0", ECHO_PORT))?;
            let flood = UdpSocket::bind(("0.0.0.0", FLOOD_PORT))?;
            Ok((tcp, udp, flood))
        })?;
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        flood.set_read_timeout(Some(Duration::from_millis(100)))?;
        // A receive buffer that absorbs a burst while the sink's thread waits for a CPU,
        // so that the loss is the node's rather than the socket's.
        let bytes: libc::c_int = 8 << 20;
        // SAFETY: setsockopt(2) on a socket this function owns, with an int option value.
        unsafe {
            libc::setsockopt(
                flood.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const bytes).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        let flood_received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        // (serve, on the accepting thread): a greeting is one write, so the acceptor does
        // it; echo and sink connections last and get a thread each.
        let serves: [(Serve, bool); 3] = [(greet, true), (echo, false), (sink, false)];
        for (l, (serve, inline)) in listeners.iter().zip(serves) {
            for _ in 0..2 {
                let l = l.try_clone()?;
                let (stop, name) = (stop.clone(), name.to_owned());
                threads.push(std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((conn, _)) = l.accept() {
                            if inline {
                                serve(conn, &name);
                            } else {
                                let name = name.clone();
                                std::thread::spawn(move || serve(conn, &name));
                            }
                        }
                    }
                }));
            }
        }
        for _ in 0..2 {
            let udp = udp.try_clone()?;
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(&buf[..n], peer);
                    }
                }
            }));
        }
        {
            let (stop, received) = (stop.clone(), flood_received.clone());
            threads.push(std::thread::spawn(move || {
                flood_sink(&flood, &stop, &received);
            }));
        }
        Ok(Self {
            listeners,
            stop,
            threads,
            flood_received,
        })
    }
}

/// Counts the datagrams `sock` receives into `received` until `stop`, [`FLOOD_BATCH`] per
/// recvmmsg(2) call (the socket's receive timeout bounds each wait).
fn flood_sink(sock: &UdpSocket, stop: &AtomicBool, received: &AtomicU64) {
    let mut bufs = [[0u8; 2 * FLOOD_PAYLOAD]; FLOOD_BATCH];
    // SAFETY: all-zero iovec and mmsghdr are valid (null pointers, zero lengths).
    let mut iovs: [libc::iovec; FLOOD_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; FLOOD_BATCH] = unsafe { std::mem::zeroed() };
    for ((iov, msg), buf) in iovs.iter_mut().zip(&mut msgs).zip(&mut bufs) {
        iov.iov_base = buf.as_mut_ptr().cast();
        iov.iov_len = buf.len();
        msg.msg_hdr.msg_iov = iov;
        msg.msg_hdr.msg_iovlen = 1;
    }
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `msgs` holds FLOOD_BATCH headers, each pointing at one live buffer.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                FLOOD_BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            received.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// How a pod server serves one connection.
type Serve = fn(TcpStream, &str);

/// One line naming the server and the client it saw, then close (TCP_CRR).
fn greet(mut conn: TcpStream, name: &str) {
    let peer = conn
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |p| p.to_string());
    let _ = conn.write_all(format!("{name} {peer}\n").as_bytes());
}

/// Echoes what it reads until the client closes (TCP_RR).
fn echo(mut conn: TcpStream, _: &str) {
    let _ = conn.set_nodelay(true);
    let mut buf = [0u8; 4096];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 || conn.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// Reads until the client stops sending, then answers the byte count (TCP_STREAM).
fn sink(mut conn: TcpStream, _: &str) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 {
            let _ = conn.write_all(&total.to_be_bytes());
            return;
        }
        total += n as u64;
    }
}

impl Drop for PodServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for l in &self.listeners {
            // Wakes the threads blocked in accept(2).
            // SAFETY: shutdown(2) on a socket this guard owns.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The rule files for one size, removed on drop.
struct Payloads {
    iptables: PathBuf,
    nft: PathBuf,
}

impl Payloads {
    fn write(n: usize, iptables: &str, nft: &str) -> Result<Self> {
        let dir = std::env::temp_dir();
        let pid = std::process::id();
        let p = Self {
            iptables: dir.join(format!("lbbench-{pid}-{n}.iptables")),
            nft: dir.join(format!("lbbench-{pid}-{n}.nft")),
        };
        std::fs::write(&p.iptables, iptables)?;
        std::fs::write(&p.nft, nft)?;
        Ok(p)
    }
}

impl Drop for Payloads {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.iptables);
        let _ = std::fs::remove_file(&self.nft);
    }
}

/// The measured Service's ports for kube-proxy's rules; the standard tools' ports have
/// the first pod alone as their endpoint (see [`crate::bench_tools`]).
fn target_ports(pods: &[Ipv4Addr]) -> Vec<ServicePort> {
    let both = [
        ("rr", "tcp", ECHO_PORT),
        ("rr-udp", "udp", ECHO_PORT),
        ("stream", "tcp", SINK_PORT),
        ("crr", "tcp", CRR_PORT),
        ("flood", "udp", FLOOD_PORT),
    ]
    .map(|p| (p, pods));
    let first = bench_tools::PORTS.map(|p| (p, &pods[..1]));
    both.into_iter()
        .chain(first)
        .map(|((name, proto, port), endpoints)| ServicePort {
            service: "bench/target".into(),
            port_name: name.into(),
            proto,
            cluster_ip: TARGET_VIP,
            port,
            target_port: port,
            endpoints: endpoints.to_vec(),
        })
        .collect()
}

/// The other Services of the control-plane benchmark as kube-proxy sees them.
pub fn other_ports(n: usize) -> Vec<ServicePort> {
    (0..n)
        .map(|i| ServicePort {
            service: format!("bench/svc-{i}"),
            port_name: "http".into(),
            proto: "tcp",
            cluster_ip: cluster_ip(i),
            port: 80,
            target_port: 8080,
            endpoints: (0..ENDPOINTS).map(|e| pod_ip(i, e, 0)).collect(),
        })
        .collect()
}

/// Every Service port, the measured ones in the middle of the others.
fn all_ports(n: usize, pods: &[Ipv4Addr]) -> Vec<ServicePort> {
    let mut ports = other_ports(n);
    let mid = ports.len() / 2;
    ports.splice(mid..mid, target_ports(pods));
    ports
}

/// One variant programmed in the node namespace. Rules go away with the namespace; lb's
/// programs are detached when the guard drops.
enum Active {
    Rules,
    /// Its `Drop` detaches the programs.
    Lb {
        guard: LbGuard,
    },
}

/// `iptables-legacy-restore` where installed, else `iptables-restore`. iptables-nft
/// (Debian's default backend) needs minutes to restore a few thousand Services of
/// kube-proxy's shape (see the control-plane table), too long to load 30,000 per run;
/// kube-proxy runs on either backend, and with the legacy one the rules are x_tables,
/// the classic iptables datapath.
pub fn iptables_restore() -> &'static str {
    let legacy = Command::new("iptables-legacy-restore")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if legacy {
        "iptables-legacy-restore"
    } else {
        "iptables-restore"
    }
}

fn activate(
    variant: Variant,
    node: &NetNs,
    n: usize,
    pods: &[Ipv4Addr],
    payloads: &Payloads,
    limit: Duration,
) -> Result<Active> {
    Ok(match variant {
        Variant::Direct => Active::Rules,
        Variant::Iptables => {
            let restore = [iptables_restore(), "-w", "5", "--noflush"];
            let jumps = std::env::temp_dir().join(format!("lbbench-{}-jumps", std::process::id()));
            std::fs::write(&jumps, bench_rules::iptables_jumps())?;
            let r = load_in(node, &restore, &jumps, Some(limit));
            let _ = std::fs::remove_file(&jumps);
            r?;
            load_in(node, &restore, &payloads.iptables, Some(limit))?;
            Active::Rules
        }
        Variant::Nftables => {
            load_in(node, &["nft", "-f", "-"], &payloads.nft, Some(limit))?;
            Active::Rules
        }
        Variant::Lb => Active::Lb {
            guard: LbGuard::start(node, n, pods, false)?,
        },
        Variant::LbXdp => Active::Lb {
            guard: LbGuard::start(node, n, pods, true)?,
        },
    })
}

/// Runs `argv` inside `ns` with `input` as its stdin, forked from a thread inside the
/// namespace (no `ip netns exec` in the time); returns how long it took. Killed past
/// `limit`, which is then an error.
pub fn load_in(
    ns: &NetNs,
    argv: &[&str],
    input: &Path,
    limit: Option<Duration>,
) -> Result<Duration> {
    let argv: Vec<String> = argv.iter().map(|s| (*s).to_owned()).collect();
    let input = input.to_path_buf();
    let limit = limit.unwrap_or(Duration::from_secs(600));
    ns.run(move || -> Result<Duration> {
        let file = std::fs::File::open(&input)?;
        let started = Instant::now();
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", argv[0]))?;
        loop {
            if let Some(status) = child.try_wait()? {
                let took = started.elapsed();
                if !status.success() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    let err: String = err.lines().take(5).collect::<Vec<_>>().join("\n");
                    bail!("{} failed ({status}): {err}", argv.join(" "));
                }
                return Ok(took);
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                return Err(TimedOut(limit).into());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    })
}

/// A load that did not finish within its limit.
#[derive(Debug)]
pub struct TimedOut(pub Duration);

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "did not finish within {:?}", self.0)
    }
}

impl std::error::Error for TimedOut {}

/// A kernel that lacks what a variant needs; the variant is left out, saying why.
#[derive(Debug)]
pub struct Unsupported(pub String);

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unsupported {}

/// The XDP program's counter of the flows it created.
const XDP_NEW_FLOW: &str = "new_flow";

/// lb's datapath loaded and attached in the node namespace by a thread living there;
/// dropping the guard detaches it and removes its pins.
struct LbGuard {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    metrics: Metrics,
    /// With the XDP program: how it was attached to the clients' side (`native`,
    /// `generic`).
    xdp_mode: Option<String>,
}

impl LbGuard {
    /// Loads and attaches the programs; with `xdp`, the XDP program too, on the node's
    /// devices on the clients' side ([`CLIENT_DEVICES`], in the agent's `auto` mode).
    fn start(node: &NetNs, n: usize, pods: &[Ipv4Addr], xdp: bool) -> Result<Self> {
        let path = node.path();
        let pods = pods.to_vec();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<Metrics>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            ::tests::netns::enter(&path);
            // One pin directory per variant: both lb variants are attached at once, in
            // networks whose devices have the same names and ifindexes, and a link pin
            // found at the same path would be taken over in place (as an agent restart
            // does) instead of attaching in this network.
            let root = PathBuf::from(format!(
                "/sys/fs/bpf/lbbench-{}-{}",
                std::process::id(),
                if xdp { "datapath-xdp" } else { "datapath" }
            ));
            let _pins = PinDir(root.clone());
            let loaded = (|| -> Result<(Datapath, Metrics)> {
                let mut objs = objects(n)?;
                let (svc, slice, tools_slice) = target_objects(&pods)?;
                objs.services
                    .insert(("bench".into(), "target".into()), Arc::new(svc.into()));
                objs.endpoint_slices
                    .insert(("bench".into(), "target-1".into()), compact(slice));
                objs.endpoint_slices
                    .insert(("bench".into(), "target-2".into()), compact(tools_slice));
                datapath::prepare(&root)?;
                let mut dp = Datapath::load_sized(&root, None, &sizes_for(n + 1))?;
                if xdp {
                    dp.enable_xdp(XdpConfig {
                        devices: DevicePatterns::parse(CLIENT_DEVICES),
                        mode: XdpAttachMode::Auto,
                    })
                    .map_err(|e| Unsupported(format!("{e}")))?;
                }
                let mut maps = dp.service_maps()?;
                let desired = model::desired_state(&objs, &NodeContext::default());
                let stats = Applier::new().sync(&desired, &mut maps)?;
                ensure!(
                    stats.failed.is_empty(),
                    "sync failed: {:?}",
                    stats.failed.first()
                );
                let attached = dp.sync_devices(&DevicePatterns::parse(NODE_DEVICES));
                ensure!(!attached.is_empty(), "attached to no device");
                let metrics = dp.metrics()?;
                Ok((dp, metrics))
            })();
            match loaded {
                Ok((mut dp, metrics)) => {
                    let _ = ready_tx.send(Ok(metrics));
                    // Until the guard is dropped (or its sender goes away).
                    let _ = stop_rx.recv();
                    dp.detach_all();
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        });
        let ready = ready_rx
            .recv()
            .map_err(|_| anyhow!("the datapath thread died"));
        let mut guard = Self {
            stop: Some(stop_tx),
            thread: Some(thread),
            metrics: match ready {
                Ok(Ok(m)) => m,
                // The thread has ended: nothing to detach.
                Ok(Err(e)) | Err(e) => return Err(e),
            },
            xdp_mode: None,
        };
        if xdp {
            // One client: its node-side device.
            let out = command_in(node, &["ip", "-o", "link", "show", "dev", "veth-c1"]).output()?;
            let line = String::from_utf8_lossy(&out.stdout);
            let words: Vec<&str> = line.split_whitespace().collect();
            // `ip link` shows the attach mode as a word of its own.
            guard.xdp_mode = if words.contains(&"xdpgeneric") {
                Some("generic".to_owned())
            } else if words.contains(&"xdp") || words.contains(&"xdpdrv") {
                Some("native".to_owned())
            } else {
                // Dropping the guard detaches the TC programs.
                return Err(Unsupported("the XDP program did not attach to veth-c1".into()).into());
            };
            println!(
                "datapath: lb XDP: XDP attached to veth-c1 ({})",
                guard.xdp_mode.as_deref().unwrap_or_default()
            );
        }
        Ok(guard)
    }

    /// The XDP program's non-zero counters: (reason, packets).
    fn xdp_counters(&self) -> Vec<(&'static str, u64)> {
        self.metrics
            .snapshot()
            .into_iter()
            .filter(|c| c.1 == "xdp")
            .map(|(reason, _, packets)| (reason, packets))
            .collect()
    }
}

impl Drop for LbGuard {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The measured Service and its EndpointSlice, as the agent reads them.
fn target_objects(pods: &[Ipv4Addr]) -> Result<(Service, EndpointSlice, EndpointSlice)> {
    // The standard tools' ports, as the Service's and as its second slice's.
    let (tool_ports, tool_slice_ports): (Vec<_>, Vec<_>) = bench_tools::PORTS
        .iter()
        .map(|&(name, proto, port)| {
            let proto = proto.to_uppercase();
            (
                json!({"name": name, "port": port, "protocol": proto, "targetPort": port}),
                json!({"name": name, "port": port, "protocol": proto}),
            )
        })
        .unzip();
    let mut ports = vec![
        json!({"name": "rr", "port": ECHO_PORT, "protocol": "TCP", "targetPort": ECHO_PORT}),
        json!({"name": "rr-udp", "port": ECHO_PORT, "protocol": "UDP", "targetPort": ECHO_PORT}),
        json!({"name": "stream", "port": SINK_PORT, "protocol": "TCP", "targetPort": SINK_PORT}),
        json!({"name": "crr", "port": CRR_PORT, "protocol": "TCP", "targetPort": CRR_PORT}),
        json!({"name": "flood", "port": FLOOD_PORT, "protocol": "UDP", "targetPort": FLOOD_PORT}),
    ];
    ports.extend(tool_ports);
    let svc = serde_json::from_value(json!({
        "metadata": {"name": "target", "namespace": "bench"},
        "spec": {"clusterIP": TARGET_VIP.to_string(), "ports": ports}
    }))?;
    let endpoints: Vec<_> = pods
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    let slice = serde_json::from_value(json!({
        "metadata": {"name": "target-1", "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": "target"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "rr", "port": ECHO_PORT, "protocol": "TCP"},
                  {"name": "rr-udp", "port": ECHO_PORT, "protocol": "UDP"},
                  {"name": "stream", "port": SINK_PORT, "protocol": "TCP"},
                  {"name": "crr", "port": CRR_PORT, "protocol": "TCP"},
                  {"name": "flood", "port": FLOOD_PORT, "protocol": "UDP"}]
    }))?;
    // The tools' ports reach the first pod alone (see crate::bench_tools).
    let tools_slice = serde_json::from_value(json!({
        "metadata": {"name": "target-2", "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": "target"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [pods[0].to_string()], "conditions": {"ready": true}}],
        "ports": tool_slice_ports
    }))?;
    Ok((svc, slice, tools_slice))
}

/// Where client `k` sends its traffic under `variant`.
fn target(variant: Variant, pods: &[Ipv4Addr], k: usize) -> Ipv4Addr {
    match variant {
        Variant::Direct => pods[k % pods.len()],
        _ => TARGET_VIP,
    }
}

/// Child processes killed and reaped on drop.
pub(crate) struct Kids(pub(crate) Vec<Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs one command per client in the client namespace, all at once; returns each one's
/// stdout, or an error naming the first that failed or overran `limit`.
pub(crate) fn run_clients(
    client: &NetNs,
    argvs: &[Vec<String>],
    limit: Duration,
) -> Result<Vec<String>> {
    let mut kids = Kids(Vec::new());
    for argv in argvs {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        kids.0.push(
            command_in(client, &argv)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("cannot run {}", argv.join(" ")))?,
        );
    }
    let started = Instant::now();
    let mut outputs = Vec::new();
    for (c, argv) in kids.0.iter_mut().zip(argvs) {
        let status = loop {
            if let Some(s) = c.try_wait()? {
                break s;
            }
            ensure!(
                started.elapsed() < limit,
                "{} did not finish within {limit:?}",
                argv.join(" ")
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let (mut out, mut err) = (String::new(), String::new());
        if let Some(mut o) = c.stdout.take() {
            o.read_to_string(&mut out)?;
        }
        if let Some(mut e) = c.stderr.take() {
            e.read_to_string(&mut err)?;
        }
        ensure!(
            status.success(),
            "{} failed ({status}): {}{}",
            argv.join(" "),
            err.trim(),
            out.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
        );
        outputs.push(out);
    }
    Ok(outputs)
}

/// One test with `clients` parallel clients: the sum of their rates.
fn run_test(
    client: &NetNs,
    variant: Variant,
    test: Test,
    clients: usize,
    pods: &[Ipv4Addr],
    seconds: u32,
    lbt_client: &Path,
) -> Result<f64> {
    let (mode, port) = match test {
        Test::TcpRr => ("rr", ECHO_PORT),
        Test::UdpRr => ("udp-rr", ECHO_PORT),
        Test::TcpStream => ("stream", SINK_PORT),
        Test::TcpCrr => ("crr", CRR_PORT),
        Test::UdpFlood => bail!("the forwarding rate is measured by run_flood"),
    };
    let argvs: Vec<Vec<String>> = (0..clients)
        .map(|k| {
            vec![
                lbt_client.display().to_string(),
                mode.into(),
                format!("{}:{port}", target(variant, pods, k)),
                "--seconds".into(),
                seconds.to_string(),
                // A bound far above what a few seconds allow.
                "--count".into(),
                "100000000".into(),
                // A dropped SYN is retransmitted after 1 s: wait for it as netperf would.
                "--timeout-ms".into(),
                "5000".into(),
            ]
        })
        .collect();
    let outputs = run_clients(client, &argvs, Duration::from_secs(u64::from(seconds) + 20))?;
    let mut total = 0.0;
    for out in &outputs {
        let v =
            parse_rate(out, mode).with_context(|| format!("unexpected output: {}", out.trim()))?;
        ensure!(v > 0.0, "no traffic got through");
        total += v;
    }
    Ok(if test == Test::TcpStream {
        total / 1e6
    } else {
        total
    })
}

/// The forwarding-rate test with `clients` senders (threads of this process whose
/// sockets were created in the client namespace, each one flow to the Service): returns
/// the datagrams the pods received per second of sending, and the share that was lost.
fn run_flood(
    net: &Net,
    variant: Variant,
    clients: usize,
    pods: &[Ipv4Addr],
    seconds: u32,
) -> Result<(f64, f64)> {
    let targets: Vec<Ipv4Addr> = (0..clients).map(|k| target(variant, pods, k)).collect();
    let socks = net
        .client()
        .run(move || -> std::io::Result<Vec<UdpSocket>> {
            targets
                .into_iter()
                .map(|ip| {
                    let s = UdpSocket::bind(("0.0.0.0", 0))?;
                    s.connect((ip, FLOOD_PORT))?;
                    Ok(s)
                })
                .collect()
        })?;
    let before = net.flood_received();
    let length = Duration::from_secs(u64::from(seconds));
    let started = Instant::now();
    let sent: u64 = std::thread::scope(|scope| {
        let senders: Vec<_> = socks
            .iter()
            .map(|s| scope.spawn(move || flood(s, length)))
            .collect();
        senders.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    let took = started.elapsed().as_secs_f64();
    // Datagrams still queued reach the sinks within milliseconds: wait until the count
    // stops moving (at most a second).
    let mut received = net.flood_received();
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(50));
        let now = net.flood_received();
        if now == received {
            break;
        }
        received = now;
    }
    let received = received - before;
    ensure!(sent > 0, "the clients sent nothing");
    ensure!(received > 0, "no datagram got through");
    Ok((
        received as f64 / took,
        1.0 - (received as f64 / sent as f64).min(1.0),
    ))
}

/// Sends [`FLOOD_PAYLOAD`]-byte datagrams on the connected `sock` for `length`,
/// [`FLOOD_BATCH`] per sendmmsg(2) call; returns how many the kernel accepted.
fn flood(sock: &UdpSocket, length: Duration) -> u64 {
    let payload = [0x5au8; FLOOD_PAYLOAD];
    // SAFETY: all-zero iovec and mmsghdr are valid (null pointers, zero lengths).
    let mut iov: libc::iovec = unsafe { std::mem::zeroed() };
    iov.iov_base = payload.as_ptr().cast_mut().cast();
    iov.iov_len = payload.len();
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; FLOOD_BATCH] = unsafe { std::mem::zeroed() };
    for m in &mut msgs {
        // Every message is the same payload; the kernel only reads it.
        m.msg_hdr.msg_iov = &raw mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let started = Instant::now();
    let mut sent = 0u64;
    // Bounded by time; the count bound only guards against a clock that stands still.
    while started.elapsed() < length && sent < 1 << 40 {
        // SAFETY: `msgs` holds FLOOD_BATCH headers pointing at `iov`, which points at
        // `payload`; all outlive the call.
        let n = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                FLOOD_BATCH as libc::c_uint,
                0,
            )
        };
        if n > 0 {
            sent += n as u64;
        }
    }
    sent
}

/// `MODE COUNT SECONDS` from `lbt-client`: COUNT per second.
fn parse_rate(out: &str, mode: &str) -> Option<f64> {
    let line = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(mode))?;
    let mut words = line.split_whitespace().skip(1);
    let count: f64 = words.next()?.parse().ok()?;
    let secs: f64 = words.next()?.parse().ok()?;
    (secs > 0.0).then(|| count / secs)
}

/// Waits until the pods' servers answer directly.
fn wait_for_servers(client: &NetNs, pods: &[Ipv4Addr], lbt_client: &Path) -> Result<()> {
    let started = Instant::now();
    loop {
        let ok = pods.iter().all(|ip| {
            command_in(
                client,
                &[
                    &lbt_client.display().to_string(),
                    "tcp",
                    &format!("{ip}:{CRR_PORT}"),
                    "--timeout-ms",
                    "500",
                ],
            )
            .output()
            .is_ok_and(|o| o.status.success())
        });
        if ok {
            return Ok(());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "the pods' servers did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A few connections through the variant before it is measured: it must work at all.
fn check(variant: Variant, client: &NetNs, pods: &[Ipv4Addr], lbt_client: &Path) -> Result<()> {
    let ip = target(variant, pods, 0);
    let out = command_in(
        client,
        &[
            &lbt_client.display().to_string(),
            "tcp",
            &format!("{ip}:{CRR_PORT}"),
            "--count",
            "4",
            "--timeout-ms",
            "2000",
        ],
    )
    .output()?;
    ensure!(
        out.status.success(),
        "connections through {} fail: {}",
        variant.name(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_clients_output() {
        assert_eq!(parse_rate("rr 3000 1.5\n", "rr"), Some(2_000.0));
        assert_eq!(parse_rate("crr 10 0\n", "crr"), None);
        assert_eq!(parse_rate("udp-rr 10 1\n", "rr"), None);
        assert_eq!(parse_rate("nothing", "rr"), None);
    }

    #[test]
    fn measured_service_sits_in_the_middle() {
        let pods = [Ipv4Addr::new(10, 201, 1, 2), Ipv4Addr::new(10, 201, 2, 2)];
        let ports = all_ports(4, &pods);
        assert_eq!(ports.len(), 13);
        assert_eq!(ports[2].cluster_ip, TARGET_VIP);
        assert_eq!(ports[2].endpoints, pods);
        assert_eq!(ports[2 + 5].endpoints, pods[..1]);
    }
}
