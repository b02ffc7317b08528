//! Packet-level tests of the datapath through `BPF_PROG_TEST_RUN`: the real programs,
//! loaded into the running kernel with their maps, run on crafted frames.
//!
//! Each test follows three steps: seed the maps through the agent's own map layer, run a
//! program on a frame, then check the verdict, the rewritten addresses and ports, and that
//! every checksum in the output is exactly right. Needs root (CAP_BPF).
use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{TestRun, TestRunOptions};
use lb_agent::{
    apply::Applier,
    datapath::{self, Datapath, EGRESS_PROG, INGRESS_PROG},
    frames::{CLIENT_MAC, NODE_MAC, fold, frame, l4_checksum, sum},
    maps::ServiceMaps,
    model::{
        BackendAddr, Cidr, Desired, DesiredService, Frontend, FrontendKind, ObjectRef, Protocol,
        Scope,
    },
};
use lb_common::{
    BACKEND_ACTIVE, BACKEND_TERMINATING, Backend, MAGLEV_TABLE_SIZE, SVC_F_ADDR_MARKER,
    SVC_F_AFFINITY, ServiceKey, ServiceValue, maglev_flow_hash, proto,
};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const OTHER_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);
const FRONTEND_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 11);
const BACKEND2_IP: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 12);
const UNRELATED_IP: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 99);
/// The node's address on the client's link: NodePorts answer there.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const NODE_PORT: u16 = 30_080;
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// Outside every source range of the tests.
const FAR_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 5, 9);
const FRONTEND_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const CLIENT_PORT: u16 = 40_000;

/// `TC_ACT_UNSPEC` (continue), as the u32 the test run reports.
const PASS: u32 = u32::MAX;
const OK: u32 = 0;
const DROP: u32 = 2;
const REDIRECT: u32 = 7;

/// Size of `struct __sk_buff` passed as the test run's context (the kernel accepts a prefix
/// of its own, larger or equal, layout).
const SK_BUFF_LEN: usize = 192;

fn be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// A loaded datapath pinned under a private bpffs directory, removed on drop.
struct Fixture {
    dp: Datapath,
    maps: datapath::BpfMaps,
    metrics: Option<datapath::Metrics>,
    _pins: PinDir,
}

/// One north-south frontend for [`Fixture::north_south`] (TCP).
struct NorthSouth {
    kind: FrontendKind,
    addr: Ipv4Addr,
    port: u16,
    backends: Vec<Ipv4Addr>,
    ranges: Option<Vec<Cidr>>,
    drop_when_empty: bool,
    snat: Vec<BackendAddr>,
    maglev: bool,
    /// The backends of an in-cluster twin (`externalTrafficPolicy: Local`), if any.
    twin: Option<Vec<Ipv4Addr>>,
}

impl NorthSouth {
    fn new(kind: FrontendKind, addr: Ipv4Addr, port: u16, backends: &[Ipv4Addr]) -> Self {
        Self {
            kind,
            addr,
            port,
            backends: backends.to_vec(),
            ranges: None,
            drop_when_empty: false,
            snat: Vec::new(),
            maglev: false,
            twin: None,
        }
    }
}

/// A private pin directory under bpffs, removed on drop — including when loading into it
/// failed half-way.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Fixture {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let root = PathBuf::from(format!(
            "/sys/fs/bpf/lb-packet-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let pins = PinDir(root.clone());
        datapath::prepare(&root).unwrap_or_else(|e| panic!("prepare {}: {e}", root.display()));
        let mut dp = Datapath::load(&root, None).unwrap_or_else(|e| panic!("load: {e}"));
        let maps = dp.service_maps().expect("service maps");
        Self {
            dp,
            maps,
            metrics: None,
            _pins: pins,
        }
    }

    /// One TCP+UDP-agnostic frontend with the given backends in slots 1..=n.
    fn frontend(&mut self, proto_nr: u8, backends: &[(u32, Ipv4Addr, u8)], flags: u16) {
        let active: Vec<u32> = backends
            .iter()
            .filter(|(_, _, state)| *state == BACKEND_ACTIVE)
            .map(|(id, _, _)| *id)
            .collect();
        for (id, ip, state) in backends {
            let b = Backend {
                addr_be: be(*ip),
                port_be: BACKEND_PORT.to_be(),
                proto: proto_nr,
                state: *state,
                service_id: 1,
                flags: 0,
                _pad: [0; 3],
            };
            self.maps.put_backend(*id, &b).expect("put backend");
        }
        for (i, id) in active.iter().enumerate() {
            let key = ServiceKey::new(
                be(FRONTEND_IP),
                FRONTEND_PORT.to_be(),
                proto_nr,
                i as u16 + 1,
            );
            let v = ServiceValue {
                backend_id: *id,
                ..Default::default()
            };
            self.maps.put_service(&key, &v).expect("put slot");
        }
        let head = ServiceValue {
            backend_id: 0,
            count: active.len() as u16,
            flags,
            service_id: 1,
            affinity_timeout_s: 10_800,
        };
        let key = ServiceKey::new(be(FRONTEND_IP), FRONTEND_PORT.to_be(), proto_nr, 0);
        self.maps.put_service(&key, &head).expect("put head");
        let marker = ServiceValue {
            flags: SVC_F_ADDR_MARKER,
            ..Default::default()
        };
        self.maps
            .put_service(&ServiceKey::addr_marker(be(FRONTEND_IP)), &marker)
            .expect("marker");
    }

    /// Programs `frontends` (kind, address, port, backends, source ranges, drop when empty)
    /// through the agent's own model types and applier, and returns the applier (which
    /// knows the ids it gave).
    fn north_south(&mut self, frontends: &[NorthSouth]) -> Applier {
        self.north_south_with(Applier::new(), frontends)
    }

    /// [`Fixture::north_south`] through `applier`, which knows what it programmed before.
    fn north_south_with(&mut self, mut applier: Applier, frontends: &[NorthSouth]) -> Applier {
        let mut desired = Desired::default();
        let backends = |addrs: &[Ipv4Addr]| {
            addrs
                .iter()
                .map(|addr| BackendAddr {
                    addr: *addr,
                    port: BACKEND_PORT,
                })
                .collect::<Vec<_>>()
        };
        for f in frontends {
            let fe = Frontend::new(f.addr, f.port, Protocol::Tcp);
            if let Some(twin) = &f.twin {
                desired.services.insert(
                    fe.with_scope(Scope::Internal),
                    DesiredService {
                        owner: ObjectRef::new("Service", "default", "web").into(),
                        port_name: String::new(),
                        active: backends(twin),
                        terminating: Vec::new(),
                        affinity_timeout_s: None,
                        kind: f.kind,
                        source_ranges: None,
                        drop_when_empty: false,
                        snat: Vec::new(),
                        maglev: false,
                        internal_twin: false,
                    },
                );
            }
            desired.services.insert(
                fe,
                DesiredService {
                    owner: ObjectRef::new("Service", "default", "web").into(),
                    port_name: String::new(),
                    active: backends(&f.backends),
                    terminating: Vec::new(),
                    affinity_timeout_s: None,
                    kind: f.kind,
                    source_ranges: f.ranges.clone(),
                    drop_when_empty: f.drop_when_empty,
                    snat: f.snat.clone(),
                    maglev: f.maglev,
                    internal_twin: f.twin.is_some(),
                },
            );
        }
        let stats = applier.sync(&desired, &mut self.maps).expect("sync");
        assert!(stats.failed.is_empty(), "{:?}", stats.failed);
        applier
    }

    /// The counter of `reason`, summed over all directions.
    fn counter(&mut self, reason: &str) -> u64 {
        lb_common::DIR_NAMES
            .iter()
            .map(|dir| self.counter_in(reason, dir))
            .sum()
    }

    /// The counter of `reason` in direction `dir` (one of `lb_common::DIR_NAMES`).
    fn counter_in(&mut self, reason: &str, dir: &str) -> u64 {
        let metrics = self
            .metrics
            .get_or_insert_with(|| self.dp.metrics().expect("metrics"));
        metrics
            .snapshot()
            .iter()
            .filter(|(r, d, _)| *r == reason && *d == dir)
            .map(|(_, _, n)| n)
            .sum()
    }

    /// Runs `prog` on `frame` and returns the verdict, the output frame and the packet
    /// mark it left.
    fn run_mark(&self, prog: &str, frame: &[u8]) -> (u32, Vec<u8>, u32) {
        let p = self.dp.program(prog).expect("program");
        let mut out = vec![0u8; 1600];
        // `struct __sk_buff`, zeroed; `mark` is its third u32.
        let ctx_in = [0u8; SK_BUFF_LEN];
        let mut ctx_out = [0u8; SK_BUFF_LEN];
        let res = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("test run of {prog}: {e}"));
        let mark = u32::from_ne_bytes(ctx_out[8..12].try_into().expect("4 bytes"));
        out.truncate(res.data_size_out as usize);
        (res.return_value, out, mark)
    }

    /// Runs the XDP program on `frame`: the action and the output frame.
    fn run_xdp(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let p = self.dp.xdp_program().expect("the XDP program loads");
        let mut out = vec![0u8; 1600];
        let res = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("test run of lb_xdp: {e}"));
        out.truncate(res.data_size_out as usize);
        (res.return_value, out)
    }

    fn run(&self, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        let p = self.dp.program(prog).expect("program");
        let mut out = vec![0u8; 1600];
        let res = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("test run of {prog}: {e}"));
        out.truncate(res.data_size_out as usize);
        (res.return_value, out)
    }
}

/// Parsed view of an output frame, with all checksums verified.
#[derive(Debug)]
struct Seen {
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
}

fn check(frame: &[u8], proto_nr: u8) -> Seen {
    let ip = &frame[14..34];
    assert_eq!(ip[9], proto_nr, "protocol");
    assert_eq!(
        fold(sum(0, ip)),
        0,
        "IPv4 header checksum is wrong: {ip:02x?}"
    );
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let l4 = &frame[34..14 + total];
    assert_eq!(
        l4_checksum(src, dst, proto_nr, l4),
        0,
        "L4 checksum is wrong"
    );
    Seen {
        src: (src, u16::from_be_bytes([l4[0], l4[1]])),
        dst: (dst, u16::from_be_bytes([l4[2], l4[3]])),
    }
}

#[test]
fn tcp_syn_to_frontend_is_translated_and_reply_restored() {
    let mut fx = Fixture::new();
    fx.frontend(proto::TCP, &[(7, BACKEND_IP, BACKEND_ACTIVE)], 0);

    let syn = frame(
        proto::TCP,
        (CLIENT_IP, CLIENT_PORT),
        (FRONTEND_IP, FRONTEND_PORT),
        0x02,
    );
    let (verdict, out) = fx.run(INGRESS_PROG, &syn);
    assert_eq!(verdict, OK);
    let seen = check(&out, proto::TCP);
    assert_eq!(seen.src, (CLIENT_IP, CLIENT_PORT));
    assert_eq!(seen.dst, (BACKEND_IP, BACKEND_PORT));
    assert_eq!(out.len(), syn.len(), "length unchanged");

    let synack = frame(
        proto::TCP,
        (BACKEND_IP, BACKEND_PORT),
        (CLIENT_IP, CLIENT_PORT),
        0x12,
    );
    let (verdict, out) = fx.run(EGRESS_PROG, &synack);
    assert_eq!(verdict, OK);
    let seen = check(&out, proto::TCP);
    assert_eq!(seen.src, (FRONTEND_IP, FRONTEND_PORT));
    assert_eq!(seen.dst, (CLIENT_IP, CLIENT_PORT));
}

#[test]
fn udp_to_frontend_is_translated_and_reply_restored() {
    let mut fx = Fixture::new();
    fx.frontend(proto::UDP, &[(3, BACKEND_IP, BACKEND_ACTIVE)], 0);
    let dgram = frame(
        proto::UDP,
        (CLIENT_IP, CLIENT_PORT),
        (FRONTEND_IP, FRONTEND_PORT),
        0,
    );
    let (verdict, out) = fx.run(INGRESS_PROG, &dgram);
    assert_eq!(verdict, OK);
    let seen = check(&out, proto::UDP);
    assert_eq!(seen.dst, (BACKEND_IP, BACKEND_PORT));

    let reply = frame(
        proto::UDP,
        (BACKEND_IP, BACKEND_PORT),
        (CLIENT_IP, CLIENT_PORT),
        0,
    );
    let (verdict, out) = fx.run(EGRESS_PROG, &reply);
    assert_eq!(verdict, OK);
    assert_eq!(check(&out, proto::UDP).src, (FRONTEND_IP, FRONTEND_PORT));
}

#[test]
fn udp_without_checksum_keeps_zero_checksum() {
    let mut fx = Fixture::new();
    fx.frontend(proto::UDP, &[(3, BACKEND_IP, BACKEND_ACTIVE)], 0);
    let mut dgram = frame(
        proto::UDP,
        (CLIENT_IP, CLIENT_PORT),
        (FRONTEND_IP, FRONTEND_PORT),
        0,
    );
    dgram[40] = 0;
    dgram[41] = 0;
    let (verdict, out) = fx.run(INGRESS_PROG, &dgram);
    assert_eq!(verdict, OK);
    assert_eq!(
        &out[40..42],
        &[0, 0],
        "a zero UDP checksum means none and must stay zero"
    );
    assert_eq!(fold(sum(0, &out[14..34])), 0, "IPv4 header checksum");
    assert_eq!(&out[30..34], &BACKEND_IP.octets());
}

#[test]
fn established_flow_keeps_its_backend_and_dead_backend_is_replaced() {
    let mut fx = Fixture::new();
    fx.frontend(proto::UDP, &[(3, BACKEND_IP, BACKEND_ACTIVE)], 0);
    let dgram = frame(
        proto::UDP,
        (CLIENT_IP, CLIENT_PORT),
        (FRONTEND_IP, FRONTEND_PORT),
        0,
    );
    let (_, out) = fx.run(INGRESS_PROG, &dgram);
    assert_eq!(check(&out, proto::UDP).dst.0, BACKEND_IP);

    // A second backend joins: the flow stays where it is.
    fx.frontend(
        proto::UDP,
        &[
            (3, BACKEND_IP, BACKEND_ACTIVE),
            (4, BACKEND2_IP, BACKEND_ACTIVE),
        ],
        0,
    );
    for _ in 0..20 {
        let (_, out) = fx.run(INGRESS_PROG, &dgram);
        assert_eq!(
            check(&out, proto::UDP).dst.0,
            BACKEND_IP,
            "established flow moved"
        );
    }

    // The first backend is removed: the UDP flow moves to the live one.
    let slot1 = ServiceKey::new(be(FRONTEND_IP), FRONTEND_PORT.to_be(), proto::UDP, 1);
    fx.maps
        .put_service(
            &slot1,
            &ServiceValue {
                backend_id: 4,
                ..Default::default()
            },
        )
        .unwrap();
    let head = ServiceKey::new(be(FRONTEND_IP), FRONTEND_PORT.to_be(), proto::UDP, 0);
    let v = ServiceValue {
        count: 1,
        service_id: 1,
        affinity_timeout_s: 10_800,
        ..Default::default()
    };
    fx.maps.put_service(&head, &v).unwrap();
    fx.maps
        .del_service(&ServiceKey { slot: 2, ..slot1 })
        .unwrap();
    fx.maps.del_backend(3).unwrap();
    let (verdict, out) = fx.run(INGRESS_PROG, &dgram);
    assert_eq!(verdict, OK);
    assert_eq!(
        check(&out, proto::UDP).dst.0,
        BACKEND2_IP,
        "flow not moved off a removed backend"
    );
    // And its replies are translated back.
    let reply = frame(
        proto::UDP,
        (BACKEND2_IP, BACKEND_PORT),
        (CLIENT_IP, CLIENT_PORT),
        0,
    );
    let (verdict, out) = fx.run(EGRESS_PROG, &reply);
    assert_eq!(verdict, OK);
    assert_eq!(check(&out, proto::UDP).src, (FRONTEND_IP, FRONTEND_PORT));
}

#[test]
fn terminating_backend_keeps_established_flow_but_gets_no_new_one() {
    let mut fx = Fixture::new();
    fx.frontend(proto::TCP, &[(3, BACKEND_IP, BACKEND_ACTIVE)], 0);
    let syn = frame(
        proto::TCP,
        (CLIENT_IP, CLIENT_PORT),
        (FRONTEND_IP, FRONTEND_PORT),
        0x02,
    );
    let (_, out) = fx.run(INGRESS_PROG, &syn);
    assert_eq!(check(&out, proto::TCP).dst.0, BACKEND_IP);
    // Backend 3 starts terminating, backend 4 is the only active one.
    fx.frontend(
        proto::TCP,
        &[
            (3, BACKEND_IP, BACKEND_TERMINATING),
            (4, BACKEND2_IP, BACKEND_ACTIVE),
        ],
        0,
    );
    let ack = frame(
        proto::TCP,
        (CLIENT_IP, CLIENT_PORT),
        (FRONTEND_IP, FRONTEND_PORT),
        0x10,
    );
    let (_, out) = fx.run(INGRESS_PROG, &ack);
    assert_eq!(
        check(&out, proto::TCP).dst.0,
        BACKEND_IP,
        "established flow must continue"
    );
    let other = frame(
        proto::TCP,
        (CLIENT_IP, CLIENT_PORT + 1),
        (FRONTEND_IP, FRONTEND_PORT),
        0x02,
    );
    for _ in 0..10 {
        let (_, out) = fx.run(INGRESS_PROG, &other);
        assert_eq!(
            check(&out, proto::TCP).dst.0,
            BACKEND2_IP,
            "new flow sent to a terminating backend"
        );
    }
}

#[test]
fn client_ip_affinity_sticks_across_connections() {
    let mut fx = Fixture::new();
    fx.frontend(
        proto::TCP,
        &[
            (3, BACKEND_IP, BACKEND_ACTIVE),
            (4, BACKEND2_IP, BACKEND_ACTIVE),
        ],
        SVC_F_AFFINITY,
    );
    let first = frame(
        proto::TCP,
        (CLIENT_IP, 30_000),
        (FRONTEND_IP, FRONTEND_PORT),
        0x02,
    );
    let (_, out) = fx.run(INGRESS_PROG, &first);
    let chosen = check(&out, proto::TCP).dst.0;
    for port in 30_001..30_040 {
        let syn = frame(
            proto::TCP,
            (CLIENT_IP, port),
            (FRONTEND_IP, FRONTEND_PORT),
            0x02,
        );
        let (_, out) = fx.run(INGRESS_PROG, &syn);
        assert_eq!(
            check(&out, proto::TCP).dst.0,
            chosen,
            "affinity broken at port {port}"
        );
    }
    // Without affinity the same 40 connections would almost surely use both backends;
    // with it, another client is balanced independently (no assertion on which).
    let other = frame(
        proto::TCP,
        (OTHER_CLIENT_IP, 30_000),
        (FRONTEND_IP, FRONTEND_PORT),
        0x02,
    );
    assert_eq!(fx.run(INGRESS_PROG, &other).0, OK);
}

#[test]
fn random_selection_uses_every_backend() {
    let mut fx = Fixture::new();
    fx.frontend(
        proto::TCP,
        &[
            (3, BACKEND_IP, BACKEND_ACTIVE),
            (4, BACKEND2_IP, BACKEND_ACTIVE),
        ],
        0,
    );
    let mut hits = [0u32; 2];
    for port in 20_000..20_200 {
        let syn = frame(
            proto::TCP,
            (CLIENT_IP, port),
            (FRONTEND_IP, FRONTEND_PORT),
            0x02,
        );
        let (_, out) = fx.run(INGRESS_PROG, &syn);
        match check(&out, proto::TCP).dst.0 {
            ip if ip == BACKEND_IP => hits[0] += 1,
            ip if ip == BACKEND2_IP => hits[1] += 1,
            ip => panic!("unexpected backend {ip}"),
        }
    }
    assert!(
        hits.iter().all(|h| *h > 40),
        "selection is skewed: {hits:?}"
    );
}

fn assert_port_unreachable(original: &[u8], verdict: u32, out: &[u8]) {
    assert_eq!(
        verdict, REDIRECT,
        "a reject is sent back out of the ingress device"
    );
    assert_eq!(&out[0..6], &CLIENT_MAC, "reply goes to the client's MAC");
    assert_eq!(&out[6..12], &NODE_MAC);
    let ip = &out[14..34];
    assert_eq!(
        fold(sum(0, ip)),
        0,
        "IPv4 header checksum of the ICMP reply"
    );
    assert_eq!(ip[9], proto::ICMP);
    assert_eq!(
        &ip[12..16],
        &FRONTEND_IP.octets(),
        "sent from the frontend address"
    );
    assert_eq!(&ip[16..20], &CLIENT_IP.octets());
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    assert_eq!(out.len(), 14 + total);
    let icmp = &out[34..14 + total];
    assert_eq!(
        (icmp[0], icmp[1]),
        (3, 3),
        "destination unreachable / port unreachable"
    );
    assert_eq!(fold(sum(0, icmp)), 0, "ICMP checksum");
    assert_eq!(
        &icmp[8..36],
        &original[14..42],
        "quotes the IP header and 8 bytes of L4"
    );
}

#[test]
fn frontend_without_backends_rejects_tcp_and_udp() {
    let mut fx = Fixture::new();
    fx.frontend(proto::TCP, &[], 0);
    fx.frontend(proto::UDP, &[], 0);
    let syn = frame(
        proto::TCP,
        (CLIENT_IP, CLIENT_PORT),
        (FRONTEND_IP, FRONTEND_PORT),
        0x02,
    );
    let (verdict, out) = fx.run(INGRESS_PROG, &syn);
    assert_port_unreachable(&syn, verdict, &out);
    let dgram = frame(
        proto::UDP,
        (CLIENT_IP, CLIENT_PORT),
        (FRONTEND_IP, FRONTEND_PORT),
        0,
    );
    let (verdict, out) = fx.run(INGRESS_PROG, &dgram);
    assert_port_unreachable(&dgram, verdict, &out);
}

#[test]
fn undefined_port_on_service_address_is_rejected() {
    let mut fx = Fixture::new();
    fx.frontend(proto::TCP, &[(3, BACKEND_IP, BACKEND_ACTIVE)], 0);
    let syn = frame(
        proto::TCP,
        (CLIENT_IP, CLIENT_PORT),
        (FRONTEND_IP, 81),
        0x02,
    );
    let (verdict, out) = fx.run(INGRESS_PROG, &syn);
    assert_port_unreachable(&syn, verdict, &out);
    // The same port over UDP is not defined either.
    let dgram = frame(
        proto::UDP,
        (CLIENT_IP, CLIENT_PORT),
        (FRONTEND_IP, FRONTEND_PORT),
        0,
    );
    let (verdict, out) = fx.run(INGRESS_PROG, &dgram);
    assert_port_unreachable(&dgram, verdict, &out);
}

#[test]
fn unrelated_traffic_is_untouched() {
    let mut fx = Fixture::new();
    fx.frontend(proto::TCP, &[(3, BACKEND_IP, BACKEND_ACTIVE)], 0);
    for (prog, f) in [
        (
            INGRESS_PROG,
            frame(
                proto::TCP,
                (CLIENT_IP, CLIENT_PORT),
                (UNRELATED_IP, 80),
                0x02,
            ),
        ),
        (
            INGRESS_PROG,
            frame(proto::UDP, (CLIENT_IP, CLIENT_PORT), (BACKEND_IP, 8080), 0),
        ),
        (
            EGRESS_PROG,
            frame(
                proto::TCP,
                (UNRELATED_IP, 80),
                (CLIENT_IP, CLIENT_PORT),
                0x12,
            ),
        ),
    ] {
        let (verdict, out) = fx.run(prog, &f);
        assert_eq!(verdict, PASS, "{prog} must pass unrelated traffic on");
        assert_eq!(out, f, "{prog} changed an unrelated packet");
    }
    // Not IPv4 at all (an ARP frame).
    let mut arp = vec![0u8; 42];
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(fx.run(INGRESS_PROG, &arp).0, PASS);
}

#[test]
fn fragments_to_a_frontend_are_dropped() {
    let mut fx = Fixture::new();
    fx.frontend(proto::UDP, &[(3, BACKEND_IP, BACKEND_ACTIVE)], 0);
    let mut dgram = frame(
        proto::UDP,
        (CLIENT_IP, CLIENT_PORT),
        (FRONTEND_IP, FRONTEND_PORT),
        0,
    );
    // More-fragments set: the later fragments could not be translated consistently.
    dgram[20] = 0x20;
    dgram[24] = 0;
    dgram[25] = 0;
    let c = fold(sum(0, &dgram[14..34]));
    dgram[24..26].copy_from_slice(&c.to_be_bytes());
    assert_eq!(fx.run(INGRESS_PROG, &dgram).0, DROP);
}

#[test]
fn nodeport_is_translated_on_the_node_address_and_its_reply_restored() {
    let mut fx = Fixture::new();
    fx.north_south(&[NorthSouth::new(
        FrontendKind::NodePort,
        NODE_IP,
        NODE_PORT,
        &[BACKEND_IP],
    )]);
    let syn = frame(
        proto::TCP,
        (CLIENT_IP, CLIENT_PORT),
        (NODE_IP, NODE_PORT),
        0x02,
    );
    let (verdict, out) = fx.run(INGRESS_PROG, &syn);
    assert_eq!(verdict, OK);
    let seen = check(&out, proto::TCP);
    assert_eq!(
        seen.src,
        (CLIENT_IP, CLIENT_PORT),
        "client address preserved"
    );
    assert_eq!(seen.dst, (BACKEND_IP, BACKEND_PORT));

    let synack = frame(
        proto::TCP,
        (BACKEND_IP, BACKEND_PORT),
        (CLIENT_IP, CLIENT_PORT),
        0x12,
    );
    let (verdict, out) = fx.run(EGRESS_PROG, &synack);
    assert_eq!(verdict, OK);
    let seen = check(&out, proto::TCP);
    assert_eq!(seen.src, (NODE_IP, NODE_PORT));
    assert_eq!(seen.dst, (CLIENT_IP, CLIENT_PORT));

    // Every other port of the node's address is the node's own: passed untouched, not
    // rejected as an undefined Service port would be.
    let ssh = frame(proto::TCP, (CLIENT_IP, CLIENT_PORT), (NODE_IP, 22), 0x02);
    let (verdict, out) = fx.run(INGRESS_PROG, &ssh);
    assert_eq!(verdict, PASS);
    assert_eq!(out, ssh);
}

#[test]
fn load_balancer_ip_drops_clients_outside_its_source_ranges() {
    let mut fx = Fixture::new();
    let mut lb = NorthSouth::new(
        FrontendKind::LoadBalancer,
        LB_IP,
        FRONTEND_PORT,
        &[BACKEND_IP],
    );
    lb.ranges = Some(vec![Cidr {
        addr: Ipv4Addr::new(10, 1, 0, 0),
        len: 24,
    }]);
    // The same Service's externalIP has no ranges: everyone may use it.
    let ext = NorthSouth::new(
        FrontendKind::ExternalIp,
        UNRELATED_IP,
        FRONTEND_PORT,
        &[BACKEND_IP],
    );
    fx.north_south(&[lb, ext]);

    let denied = frame(
        proto::TCP,
        (FAR_CLIENT_IP, CLIENT_PORT),
        (LB_IP, FRONTEND_PORT),
        0x02,
    );
    let (verdict, _) = fx.run(INGRESS_PROG, &denied);
    assert_eq!(verdict, DROP);
    assert_eq!(fx.counter("source_range_denied"), 1);

    let allowed = frame(
        proto::TCP,
        (CLIENT_IP, CLIENT_PORT),
        (LB_IP, FRONTEND_PORT),
        0x02,
    );
    let (verdict, out) = fx.run(INGRESS_PROG, &allowed);
    assert_eq!(verdict, OK);
    assert_eq!(check(&out, proto::TCP).dst, (BACKEND_IP, BACKEND_PORT));

    let other = frame(
        proto::TCP,
        (FAR_CLIENT_IP, CLIENT_PORT),
        (UNRELATED_IP, FRONTEND_PORT),
        0x02,
    );
    let (verdict, out) = fx.run(INGRESS_PROG, &other);
    assert_eq!(verdict, OK);
    assert_eq!(check(&out, proto::TCP).dst, (BACKEND_IP, BACKEND_PORT));
    assert_eq!(fx.counter("source_range_denied"), 1);
}

#[test]
fn local_policy_without_local_endpoint_drops_and_no_endpoint_at_all_rejects() {
    let mut fx = Fixture::new();
    let mut local = NorthSouth::new(FrontendKind::NodePort, NODE_IP, NODE_PORT, &[]);
    local.drop_when_empty = true;
    let empty = NorthSouth::new(FrontendKind::NodePort, NODE_IP, NODE_PORT + 1, &[]);
    fx.north_south(&[local, empty]);

    let syn = frame(
        proto::TCP,
        (CLIENT_IP, CLIENT_PORT),
        (NODE_IP, NODE_PORT),
        0x02,
    );
    assert_eq!(fx.run(INGRESS_PROG, &syn).0, DROP);
    assert_eq!(fx.counter("no_local_backend"), 1);

    let syn = frame(
        proto::TCP,
        (CLIENT_IP, CLIENT_PORT),
        (NODE_IP, NODE_PORT + 1),
        0x02,
    );
    let (verdict, _) = fx.run(INGRESS_PROG, &syn);
    assert_eq!(verdict, REDIRECT, "rejected with ICMP port unreachable");
    assert_eq!(fx.counter("no_backend"), 1);
}

#[test]
fn flows_to_backends_on_other_nodes_are_marked_for_source_nat() {
    let mut fx = Fixture::new();
    let mut np = NorthSouth::new(
        FrontendKind::NodePort,
        NODE_IP,
        NODE_PORT,
        &[BACKEND_IP, BACKEND2_IP],
    );
    np.snat = vec![BackendAddr {
        addr: BACKEND2_IP,
        port: BACKEND_PORT,
    }];
    fx.north_south(&[np]);
    let mut chosen = [0u32; 2];
    for port in 20_000..20_100 {
        let syn = frame(proto::TCP, (CLIENT_IP, port), (NODE_IP, NODE_PORT), 0x02);
        let (verdict, out, mark) = fx.run_mark(INGRESS_PROG, &syn);
        assert_eq!(verdict, OK);
        let remote = check(&out, proto::TCP).dst.0 == BACKEND2_IP;
        let want = if remote { lb_common::SNAT_MARK } else { 0 };
        assert_eq!(mark, want, "port {port}: remote backend {remote}");
        chosen[usize::from(remote)] += 1;
        // Later packets of the flow carry the mark too: the node's conntrack binds its NAT
        // on the first one, and the mark masquerades a flow whose netfilter entry expired.
        let ack = frame(proto::TCP, (CLIENT_IP, port), (NODE_IP, NODE_PORT), 0x10);
        let (verdict, _, mark) = fx.run_mark(INGRESS_PROG, &ack);
        assert_eq!((verdict, mark), (OK, want));
    }
    assert!(chosen.iter().all(|n| *n > 20), "skewed: {chosen:?}");
}

/// A pod that is the only backend of the frontend it reaches: every flow it opens there is
/// a hairpin.
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 13);
const HAIRPIN_IP: Ipv4Addr = Ipv4Addr::new(
    lb_common::HAIRPIN_ADDR[0],
    lb_common::HAIRPIN_ADDR[1],
    lb_common::HAIRPIN_ADDR[2],
    lb_common::HAIRPIN_ADDR[3],
);

/// Asserts a hairpin packet is sent back out of the device it came in on, to the host it
/// came from (the crafted frames come from `CLIENT_MAC` to `NODE_MAC`).
fn assert_sent_back(verdict: u32, out: &[u8]) {
    assert_eq!(
        verdict, REDIRECT,
        "a hairpin packet goes back out of its ingress device"
    );
    assert_eq!(&out[0..6], &CLIENT_MAC, "to the pod's MAC");
    assert_eq!(&out[6..12], &NODE_MAC, "from the node's");
}

/// Runs a hairpin flow of `proto_nr` from the pod to `frontend` through the programs: the
/// pod's packet, a second one of the same flow, and the pod's reply to the hairpin address.
fn hairpin_round_trip(fx: &Fixture, proto_nr: u8, frontend: (Ipv4Addr, u16)) {
    let first_flags = if proto_nr == proto::TCP { 0x02 } else { 0 };
    let later_flags = if proto_nr == proto::TCP { 0x10 } else { 0 };
    for flags in [first_flags, later_flags] {
        let f = frame(proto_nr, (POD_IP, CLIENT_PORT), frontend, flags);
        let (verdict, out) = fx.run(INGRESS_PROG, &f);
        assert_sent_back(verdict, &out);
        let seen = check(&out, proto_nr);
        assert_eq!(
            seen.src,
            (HAIRPIN_IP, CLIENT_PORT),
            "source is the hairpin address"
        );
        assert_eq!(seen.dst, (POD_IP, BACKEND_PORT));
        assert_eq!(out.len(), f.len(), "length unchanged");
        // On its way out, the egress program leaves it alone.
        let (verdict, again) = fx.run(EGRESS_PROG, &out);
        assert_eq!((verdict, &again), (PASS, &out));
    }
    // The pod answers the hairpin address, through its default route, to the node.
    let reply_flags = if proto_nr == proto::TCP { 0x12 } else { 0 };
    let reply = frame(
        proto_nr,
        (POD_IP, BACKEND_PORT),
        (HAIRPIN_IP, CLIENT_PORT),
        reply_flags,
    );
    let (verdict, out) = fx.run(INGRESS_PROG, &reply);
    assert_sent_back(verdict, &out);
    let seen = check(&out, proto_nr);
    assert_eq!(
        seen.src, frontend,
        "the reply comes from the frontend asked"
    );
    assert_eq!(
        seen.dst,
        (POD_IP, CLIENT_PORT),
        "back to the pod's client socket"
    );
    assert_eq!(out.len(), reply.len(), "length unchanged");
    let (verdict, again) = fx.run(EGRESS_PROG, &out);
    assert_eq!((verdict, &again), (PASS, &out));
}

#[test]
fn pod_balanced_onto_itself_gets_the_hairpin_source_and_its_reply_restored() {
    for proto_nr in [proto::TCP, proto::UDP] {
        let mut fx = Fixture::new();
        fx.frontend(proto_nr, &[(7, POD_IP, BACKEND_ACTIVE)], 0);
        hairpin_round_trip(&fx, proto_nr, (FRONTEND_IP, FRONTEND_PORT));
        assert_eq!(fx.counter("new_flow"), 1);
        assert_eq!(fx.counter("established"), 1);
        assert_eq!(fx.counter("reply"), 1);

        // Another client of the same backend is no hairpin: only its destination changes,
        // and its packet is routed as usual.
        let f = frame(
            proto_nr,
            (CLIENT_IP, CLIENT_PORT),
            (FRONTEND_IP, FRONTEND_PORT),
            0x02 * u8::from(proto_nr == proto::TCP),
        );
        let (verdict, out) = fx.run(INGRESS_PROG, &f);
        assert_eq!(verdict, OK);
        let seen = check(&out, proto_nr);
        assert_eq!(seen.src, (CLIENT_IP, CLIENT_PORT));
        assert_eq!(seen.dst, (POD_IP, BACKEND_PORT));
        let reply = frame(
            proto_nr,
            (POD_IP, BACKEND_PORT),
            (CLIENT_IP, CLIENT_PORT),
            0x12 * u8::from(proto_nr == proto::TCP),
        );
        let (verdict, out) = fx.run(EGRESS_PROG, &reply);
        assert_eq!(verdict, OK);
        assert_eq!(check(&out, proto_nr).src, (FRONTEND_IP, FRONTEND_PORT));
    }
}

#[test]
fn hairpin_through_a_nodeport() {
    let mut fx = Fixture::new();
    fx.north_south(&[NorthSouth::new(
        FrontendKind::NodePort,
        NODE_IP,
        NODE_PORT,
        &[POD_IP],
    )]);
    hairpin_round_trip(&fx, proto::TCP, (NODE_IP, NODE_PORT));
}

#[test]
fn hairpin_udp_without_checksum_keeps_zero_checksum() {
    let mut fx = Fixture::new();
    fx.frontend(proto::UDP, &[(7, POD_IP, BACKEND_ACTIVE)], 0);
    let mut dgram = frame(
        proto::UDP,
        (POD_IP, CLIENT_PORT),
        (FRONTEND_IP, FRONTEND_PORT),
        0,
    );
    dgram[40..42].copy_from_slice(&[0, 0]);
    let (verdict, out) = fx.run(INGRESS_PROG, &dgram);
    assert_sent_back(verdict, &out);
    assert_eq!(&out[40..42], &[0, 0], "a zero UDP checksum must stay zero");
    assert_eq!(fold(sum(0, &out[14..34])), 0, "IPv4 header checksum");
    assert_eq!(&out[26..30], &HAIRPIN_IP.octets());
    assert_eq!(&out[30..34], &POD_IP.octets());
}

#[test]
fn packets_to_the_hairpin_address_without_a_flow_pass_untouched() {
    let mut fx = Fixture::new();
    fx.frontend(proto::TCP, &[(7, POD_IP, BACKEND_ACTIVE)], 0);
    // No hairpin flow from this port: nothing to restore.
    let stray = frame(
        proto::TCP,
        (POD_IP, BACKEND_PORT),
        (HAIRPIN_IP, CLIENT_PORT),
        0x12,
    );
    let (verdict, out) = fx.run(INGRESS_PROG, &stray);
    assert_eq!(verdict, PASS);
    assert_eq!(out, stray);
    // A tracked flow that is no hairpin is not restored there either.
    let syn = frame(
        proto::TCP,
        (CLIENT_IP, CLIENT_PORT),
        (FRONTEND_IP, FRONTEND_PORT),
        0x02,
    );
    assert_eq!(fx.run(INGRESS_PROG, &syn).0, OK);
    let (verdict, out) = fx.run(INGRESS_PROG, &stray);
    assert_eq!(verdict, PASS);
    assert_eq!(out, stray);
}

#[test]
fn client_on_another_node_reaching_itself_is_left_to_source_nat() {
    // Through a NodePort, a pod of another node may be balanced onto itself: its packets
    // reach this node over the network, so they go back through the node's masquerade,
    // not through the hairpin path.
    let mut fx = Fixture::new();
    let mut np = NorthSouth::new(FrontendKind::NodePort, NODE_IP, NODE_PORT, &[BACKEND2_IP]);
    np.snat = vec![BackendAddr {
        addr: BACKEND2_IP,
        port: BACKEND_PORT,
    }];
    fx.north_south(&[np]);
    let syn = frame(
        proto::TCP,
        (BACKEND2_IP, CLIENT_PORT),
        (NODE_IP, NODE_PORT),
        0x02,
    );
    let (verdict, out, mark) = fx.run_mark(INGRESS_PROG, &syn);
    assert_eq!((verdict, mark), (OK, lb_common::SNAT_MARK));
    let seen = check(&out, proto::TCP);
    assert_eq!(seen.src, (BACKEND2_IP, CLIENT_PORT));
    assert_eq!(seen.dst, (BACKEND2_IP, BACKEND_PORT));
}

/// The backends of the Maglev tests: the same set on every node.
const MAGLEV_BACKENDS: [Ipv4Addr; 4] = [
    BACKEND_IP,
    BACKEND2_IP,
    Ipv4Addr::new(10, 2, 0, 13),
    Ipv4Addr::new(10, 2, 0, 14),
];

/// One node of the Maglev tests: its datapath, its NodePort address, and the user-space
/// table with each entry's backend resolved to its address.
struct MaglevNode {
    fx: Fixture,
    node_ip: Ipv4Addr,
    table: Vec<Ipv4Addr>,
}

/// A node with a Maglev NodePort on `node_ip` over `backends`, programmed in the order
/// given (so that two nodes may number the backends differently).
fn maglev_node(node_ip: Ipv4Addr, backends: &[Ipv4Addr]) -> MaglevNode {
    let mut fx = Fixture::new();
    let mut np = NorthSouth::new(FrontendKind::NodePort, node_ip, NODE_PORT, &[]);
    let mut applier = Applier::new();
    let fe = Frontend::new(node_ip, NODE_PORT, Protocol::Tcp);
    // One backend at a time: ids follow the order of arrival.
    np.maglev = true;
    for n in 1..=backends.len() {
        np.backends = backends[..n].to_vec();
        applier = fx.north_south_with(applier, std::slice::from_ref(&np));
    }
    let ids: Vec<(u32, Ipv4Addr)> = backends
        .iter()
        .map(|addr| {
            let b = BackendAddr {
                addr: *addr,
                port: BACKEND_PORT,
            };
            (applier.backend_id(&fe, &b).expect("backend id"), *addr)
        })
        .collect();
    let table = applier.maglev_table(&fe).expect("a Maglev table");
    assert_eq!(table.len(), MAGLEV_TABLE_SIZE);
    // What the kernel holds is what the agent computed.
    let sid = applier.service_id(&fe).expect("service id");
    let in_map = fx.maps.maglev_tables().expect("read the Maglev map");
    assert_eq!(in_map.len(), 1);
    assert_eq!(in_map[0].0, sid);
    assert_eq!(in_map[0].1, table);
    let table = table
        .iter()
        .map(|id| {
            ids.iter()
                .find(|(i, _)| i == id)
                .map(|(_, addr)| *addr)
                .unwrap_or_else(|| panic!("entry names unknown backend {id}"))
        })
        .collect();
    MaglevNode { fx, node_ip, table }
}

impl MaglevNode {
    /// Sends a SYN from `CLIENT_IP:port` to the NodePort and returns the backend the
    /// datapath chose, checking it is the one the user-space table gives.
    fn syn(&self, port: u16) -> Ipv4Addr {
        let syn = frame(
            proto::TCP,
            (CLIENT_IP, port),
            (self.node_ip, NODE_PORT),
            0x02,
        );
        let (verdict, out) = self.fx.run(INGRESS_PROG, &syn);
        assert_eq!(verdict, OK);
        let seen = check(&out, proto::TCP);
        assert_eq!(seen.src, (CLIENT_IP, port));
        let h = maglev_flow_hash(be(CLIENT_IP), port.to_be(), NODE_PORT.to_be(), proto::TCP);
        let want = self.table[h as usize % MAGLEV_TABLE_SIZE];
        assert_eq!(
            seen.dst,
            (want, BACKEND_PORT),
            "port {port} via {}",
            self.node_ip
        );
        want
    }
}

#[test]
fn maglev_sends_a_client_port_to_its_table_entry_on_every_node() {
    // Two nodes, each with its own NodePort address, whose agents learnt the backends in
    // opposite orders (and so gave them other ids).
    let mut reversed = MAGLEV_BACKENDS;
    reversed.reverse();
    let a = maglev_node(NODE_IP, &MAGLEV_BACKENDS);
    let b = maglev_node(Ipv4Addr::new(10, 1, 0, 254), &reversed);
    assert_eq!(a.table, b.table, "both nodes compute the same table");
    let mut reached = std::collections::BTreeSet::new();
    for port in CLIENT_PORT..CLIENT_PORT + 64 {
        let chosen = a.syn(port);
        assert_eq!(b.syn(port), chosen, "port {port}: the nodes disagree");
        reached.insert(chosen);
    }
    assert_eq!(
        reached.len(),
        MAGLEV_BACKENDS.len(),
        "64 client ports reach every backend: {reached:?}"
    );
    // Later packets of the flows, and the same flows again on a node whose conntrack
    // has forgotten them, stay where they are.
    let fresh = maglev_node(NODE_IP, &reversed);
    for port in CLIENT_PORT..CLIENT_PORT + 8 {
        assert_eq!(fresh.syn(port), a.syn(port), "port {port}");
    }
}

// The XDP program, on the same frontends: it translates what needs only a rewrite, drops
// what a frontend refuses, and leaves the rest to the TC program unchanged.

/// `XDP_DROP` and `XDP_PASS`, as the test run reports them.
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

fn nodeport_to(backends: &[Ipv4Addr], remote: &[Ipv4Addr]) -> NorthSouth {
    let mut np = NorthSouth::new(FrontendKind::NodePort, NODE_IP, NODE_PORT, backends);
    np.snat = remote
        .iter()
        .map(|addr| BackendAddr {
            addr: *addr,
            port: BACKEND_PORT,
        })
        .collect();
    np
}

/// The frontend the XDP tests send `proto_nr` to: a NodePort for TCP, a ClusterIP-style
/// frontend for UDP (the XDP program handles every kind alike).
fn xdp_frontend(proto_nr: u8) -> (Ipv4Addr, u16) {
    if proto_nr == proto::TCP {
        (NODE_IP, NODE_PORT)
    } else {
        (FRONTEND_IP, FRONTEND_PORT)
    }
}

#[test]
fn xdp_translates_flows_to_local_backends_with_exact_checksums() {
    let mut fx = Fixture::new();
    fx.north_south(&[nodeport_to(&[BACKEND_IP], &[])]);
    fx.frontend(proto::UDP, &[(900, BACKEND_IP, BACKEND_ACTIVE)], 0);
    for proto_nr in [proto::TCP, proto::UDP] {
        let first = frame(
            proto_nr,
            (CLIENT_IP, CLIENT_PORT),
            xdp_frontend(proto_nr),
            0x02,
        );
        let (action, out) = fx.run_xdp(&first);
        assert_eq!(action, XDP_PASS);
        let seen = check(&out, proto_nr);
        assert_eq!(
            seen.src,
            (CLIENT_IP, CLIENT_PORT),
            "client address preserved"
        );
        assert_eq!(seen.dst, (BACKEND_IP, BACKEND_PORT));
        // The TC program behind it sees a packet to a pod: not its business.
        let (verdict, after_tc) = fx.run(INGRESS_PROG, &out);
        assert_eq!((verdict, &after_tc), (PASS, &out));
        // The flow's next packet takes the established path, and the reply leaves
        // through the TC egress program, restored.
        let next = frame(
            proto_nr,
            (CLIENT_IP, CLIENT_PORT),
            xdp_frontend(proto_nr),
            0x10,
        );
        let (action, out) = fx.run_xdp(&next);
        assert_eq!(action, XDP_PASS);
        assert_eq!(check(&out, proto_nr).dst, (BACKEND_IP, BACKEND_PORT));
        let reply = frame(
            proto_nr,
            (BACKEND_IP, BACKEND_PORT),
            (CLIENT_IP, CLIENT_PORT),
            0x12,
        );
        let (verdict, out) = fx.run(EGRESS_PROG, &reply);
        assert_eq!(verdict, OK);
        assert_eq!(check(&out, proto_nr).src, xdp_frontend(proto_nr));
    }
    assert_eq!(fx.counter_in("new_flow", "xdp"), 2);
    assert_eq!(fx.counter_in("established", "xdp"), 2);

    // A UDP datagram without a checksum keeps none.
    let mut dgram = frame(
        proto::UDP,
        (CLIENT_IP, CLIENT_PORT + 1),
        xdp_frontend(proto::UDP),
        0,
    );
    dgram[40] = 0;
    dgram[41] = 0;
    let (action, out) = fx.run_xdp(&dgram);
    assert_eq!(action, XDP_PASS);
    assert_eq!(&out[40..42], &[0, 0], "a zero UDP checksum must stay zero");
    assert_eq!(fold(sum(0, &out[14..34])), 0, "IPv4 header checksum");
    assert_eq!(&out[30..34], &BACKEND_IP.octets());
}

#[test]
fn xdp_checksums_stay_exact_over_many_addresses_and_ports() {
    // Incremental checksum updates by hand: check them against full recomputation over
    // clients whose words carry and wrap in every way.
    let mut fx = Fixture::new();
    let backend = Ipv4Addr::new(10, 255, 255, 254);
    let mut np = NorthSouth::new(FrontendKind::NodePort, NODE_IP, NODE_PORT, &[backend]);
    np.snat = Vec::new();
    fx.north_south(&[np]);
    fx.frontend(proto::UDP, &[(900, backend, BACKEND_ACTIVE)], 0);
    for i in 0u32..300 {
        let client = Ipv4Addr::from(0x0a00_0000 | i.wrapping_mul(0x0101_0f1f) & 0x00ff_ffff);
        let port = (i as u16).wrapping_mul(0x0f1d) | 1;
        for proto_nr in [proto::TCP, proto::UDP] {
            let f = frame(proto_nr, (client, port), xdp_frontend(proto_nr), 0x02);
            let (action, out) = fx.run_xdp(&f);
            assert_eq!(action, XDP_PASS);
            let seen = check(&out, proto_nr);
            assert_eq!(seen.dst, (backend, BACKEND_PORT), "client {client}:{port}");
        }
    }
}

#[test]
fn xdp_drops_what_the_frontend_refuses_and_defers_rejects() {
    let mut fx = Fixture::new();
    let mut lb = NorthSouth::new(
        FrontendKind::LoadBalancer,
        LB_IP,
        FRONTEND_PORT,
        &[BACKEND_IP],
    );
    lb.ranges = Some(vec![Cidr {
        addr: Ipv4Addr::new(10, 1, 0, 0),
        len: 24,
    }]);
    let mut local = NorthSouth::new(FrontendKind::NodePort, NODE_IP, NODE_PORT, &[]);
    local.drop_when_empty = true;
    let empty = NorthSouth::new(FrontendKind::NodePort, NODE_IP, NODE_PORT + 1, &[]);
    fx.north_south(&[lb, local, empty]);

    let denied = frame(
        proto::TCP,
        (FAR_CLIENT_IP, CLIENT_PORT),
        (LB_IP, FRONTEND_PORT),
        0x02,
    );
    assert_eq!(fx.run_xdp(&denied).0, XDP_DROP);
    assert_eq!(fx.counter_in("source_range_denied", "xdp"), 1);
    let allowed = frame(
        proto::TCP,
        (CLIENT_IP, CLIENT_PORT),
        (LB_IP, FRONTEND_PORT),
        0x02,
    );
    let (action, out) = fx.run_xdp(&allowed);
    assert_eq!(action, XDP_PASS);
    assert_eq!(check(&out, proto::TCP).dst, (BACKEND_IP, BACKEND_PORT));

    let no_local = frame(
        proto::TCP,
        (CLIENT_IP, CLIENT_PORT),
        (NODE_IP, NODE_PORT),
        0x02,
    );
    assert_eq!(fx.run_xdp(&no_local).0, XDP_DROP);
    assert_eq!(fx.counter_in("no_local_backend", "xdp"), 1);

    // No endpoint at all: rejected with an ICMP error, which the TC program builds.
    let none = frame(
        proto::TCP,
        (CLIENT_IP, CLIENT_PORT),
        (NODE_IP, NODE_PORT + 1),
        0x02,
    );
    let (action, out) = fx.run_xdp(&none);
    assert_eq!((action, &out), (XDP_PASS, &none), "left unchanged");
    assert_eq!(fx.counter_in("deferred", "xdp"), 1);
    assert_eq!(fx.run(INGRESS_PROG, &out).0, REDIRECT);

    // Not a frontend: untouched.
    let other = frame(proto::TCP, (CLIENT_IP, CLIENT_PORT), (NODE_IP, 22), 0x02);
    let (action, out) = fx.run_xdp(&other);
    assert_eq!((action, &out), (XDP_PASS, &other));
    let mut arp = vec![0u8; 42];
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(fx.run_xdp(&arp).0, XDP_PASS);
}

#[test]
fn xdp_leaves_flows_to_other_nodes_to_tc_with_the_backend_already_chosen() {
    let mut fx = Fixture::new();
    fx.north_south(&[nodeport_to(&[BACKEND_IP, BACKEND2_IP], &[BACKEND2_IP])]);
    let mut chosen = [0u32; 2];
    for port in 20_000..20_200 {
        let syn = frame(proto::TCP, (CLIENT_IP, port), (NODE_IP, NODE_PORT), 0x02);
        let (action, out) = fx.run_xdp(&syn);
        assert_eq!(action, XDP_PASS);
        let remote = out == syn;
        if remote {
            // The TC program finds the flow XDP created, translates and marks it.
            let (verdict, out, mark) = fx.run_mark(INGRESS_PROG, &syn);
            assert_eq!((verdict, mark), (OK, lb_common::SNAT_MARK), "port {port}");
            assert_eq!(check(&out, proto::TCP).dst, (BACKEND2_IP, BACKEND_PORT));
            // And so for every later packet of the flow.
            let ack = frame(proto::TCP, (CLIENT_IP, port), (NODE_IP, NODE_PORT), 0x10);
            let (action, out) = fx.run_xdp(&ack);
            assert_eq!((action, &out), (XDP_PASS, &ack));
            let (verdict, _, mark) = fx.run_mark(INGRESS_PROG, &ack);
            assert_eq!((verdict, mark), (OK, lb_common::SNAT_MARK));
        } else {
            assert_eq!(check(&out, proto::TCP).dst, (BACKEND_IP, BACKEND_PORT));
        }
        chosen[usize::from(remote)] += 1;
    }
    // One choice per flow, whichever program carries it out: no lean to this node.
    assert!(chosen.iter().all(|n| *n > 60), "skewed: {chosen:?}");
}

/// Pods' addresses in [`local_policy_with_twin`]'s cluster: `CLIENT_IP` is a pod,
/// `FAR_CLIENT_IP` is not.
const POD_CIDR: Cidr = Cidr {
    addr: Ipv4Addr::new(10, 1, 0, 0),
    len: 16,
};

/// A LoadBalancer IP with `externalTrafficPolicy: Local` and no endpoint on this node,
/// whose in-cluster twin holds two backends elsewhere; `--cluster-cidr` given when
/// `cluster_cidr`.
fn local_policy_with_twin(cluster_cidr: bool) -> Fixture {
    let mut fx = Fixture::new();
    if cluster_cidr {
        fx.dp.set_cluster_cidrs(&[POD_CIDR]).expect("cluster CIDRs");
    }
    let mut lb = NorthSouth::new(FrontendKind::LoadBalancer, LB_IP, FRONTEND_PORT, &[]);
    lb.drop_when_empty = true;
    lb.twin = Some(vec![BACKEND_IP, BACKEND2_IP]);
    fx.north_south(&[lb]);
    fx
}

#[test]
fn pods_use_a_local_frontends_in_cluster_twin_at_tc_and_xdp_and_outside_clients_do_not() {
    let syn = |client: Ipv4Addr, port: u16| {
        frame(proto::TCP, (client, port), (LB_IP, FRONTEND_PORT), 0x02)
    };
    let mut fx = local_policy_with_twin(true);
    // A client outside the cluster: the frontend's own (empty) entry, dropped on both paths.
    assert_eq!(
        fx.run(INGRESS_PROG, &syn(FAR_CLIENT_IP, CLIENT_PORT)).0,
        DROP
    );
    assert_eq!(fx.run_xdp(&syn(FAR_CLIENT_IP, CLIENT_PORT + 1)).0, XDP_DROP);
    assert_eq!(fx.counter_in("no_local_backend", "ingress"), 1);
    assert_eq!(fx.counter_in("no_local_backend", "xdp"), 1);
    // A pod: the twin's backends, with its own address kept, on both paths.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..24 {
        let (verdict, out) = fx.run(INGRESS_PROG, &syn(CLIENT_IP, CLIENT_PORT + 100 + i));
        assert_eq!(verdict, OK);
        let s = check(&out, proto::TCP);
        assert_eq!(s.src, (CLIENT_IP, CLIENT_PORT + 100 + i));
        seen.insert(s.dst);
        let (action, out) = fx.run_xdp(&syn(CLIENT_IP, CLIENT_PORT + 200 + i));
        assert_eq!(action, XDP_PASS);
        let s = check(&out, proto::TCP);
        assert_eq!(s.src, (CLIENT_IP, CLIENT_PORT + 200 + i));
        seen.insert(s.dst);
    }
    assert_eq!(
        seen,
        std::collections::BTreeSet::from([(BACKEND_IP, BACKEND_PORT), (BACKEND2_IP, BACKEND_PORT)])
    );
    assert_eq!(fx.counter_in("new_flow", "xdp"), 24);
    // The flow stays on its backend once established.
    let (_, first) = fx.run(INGRESS_PROG, &syn(CLIENT_IP, CLIENT_PORT + 100));
    let ack = frame(
        proto::TCP,
        (CLIENT_IP, CLIENT_PORT + 100),
        (LB_IP, FRONTEND_PORT),
        0x10,
    );
    let (verdict, out) = fx.run(INGRESS_PROG, &ack);
    assert_eq!(verdict, OK);
    assert_eq!(check(&out, proto::TCP).dst, check(&first, proto::TCP).dst);
    assert!(fx.counter_in("established", "ingress") >= 1);

    // Without --cluster-cidr a pod is one more outside client.
    let mut fx = local_policy_with_twin(false);
    assert_eq!(fx.run(INGRESS_PROG, &syn(CLIENT_IP, CLIENT_PORT)).0, DROP);
    assert_eq!(fx.run_xdp(&syn(CLIENT_IP, CLIENT_PORT + 1)).0, XDP_DROP);
    assert_eq!(fx.counter("no_local_backend"), 2);
}
