//! Socket-level translation for the node's own processes (host processes, hostNetwork
//! pods, kubelet), through cgroup `sock_addr` hooks on the cgroup the agent is given
//! (`--cgroup-path`).
//!
//! A packet such a process sends to a Service is routed in the node's own stack and
//! leaves on whichever device leads to the backend, where the TC programs only see it on
//! egress: nothing would translate it. So the translation happens when the socket names
//! its peer, once per connection rather than per packet:
//!
//! - `connect4` (TCP, connected UDP) replaces a frontend with a backend, chosen with the
//!   same lookup and the same choice as `lb_tc_ingress` ([`service::lookup_frontend`],
//!   [`service::select`]: random slot, `ClientIP` affinity, terminating backends left
//!   out, `count == 0` refused; Maglev frontends get a random slot too, as the source
//!   port is not chosen yet; the node counts as inside the cluster, so a `Local` external
//!   frontend's in-cluster twin applies, [`service::for_client`]);
//! - `sendmsg4` does the same for each datagram of an unconnected UDP socket, keeping one
//!   socket's datagrams to one frontend on one backend (a forward entry), as a conntrack
//!   flow would;
//! - `recvmsg4` and `getpeername4` give the application the frontend back where the
//!   kernel would show the backend: as the source of UDP replies, and as the peer.
//!
//! Both directions live in [`SOCK_NAT`], keyed by the socket cookie. Since the frontend
//! never appears on the wire, no connection tracking entry and no packet rewrite is
//! needed, and replies need no reverse NAT.
//!
//! Only sockets of the node's network namespace are translated: a pod's traffic crosses
//! its veth, where the TC programs translate it. The client of a socket-level
//! translation is the node itself, which has no address yet when it connects (the route
//! picks it later): `ClientIP` affinity and `loadBalancerSourceRanges` see it as
//! [`NODE_CLIENT_ADDR`]. A frontend with source ranges is left untranslated unless the
//! ranges admit that address (0.0.0.0/0), so that the node reaches it the way a client
//! outside would.
use aya_ebpf::{
    EbpfContext as _, Global,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::map,
    maps::LruHashMap,
    programs::SockAddrContext,
};
use lb_common::{
    CT_REFRESH_NS, CT_TIMEOUT_UDP_NS, DIR_SOCKET, SOCK_DIR_FORWARD, SOCK_DIR_REVERSE, SVC_F_MAGLEV,
    SockNatKey, SockNatValue, proto, reason, sock,
};

use crate::{
    conntrack::{self, backend_matches},
    metrics::count,
    parse::Packet,
    service,
};

/// Verdicts of `sock_addr` programs.
pub mod verdict {
    /// Let the call go on (with the address as the program left it).
    pub const ALLOW: i32 = 1;
    /// Fail the call, with the error set by `bpf_set_retval` (`EPERM` otherwise).
    pub const REJECT: i32 = 0;
}

/// The client address under which the node's own sockets are admitted and remembered
/// (`ClientIP` affinity, source ranges): no real client has it.
pub const NODE_CLIENT_ADDR: u32 = 0;

/// `ECONNREFUSED`: what `connect` and `sendmsg` fail with for a frontend with no
/// backend, as they would after the TC path's ICMP port unreachable.
const ECONNREFUSED: i32 = 111;

/// 127.0.0.1, network byte order.
const LOOPBACK_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// Socket translations, both directions ([`SOCK_DIR_REVERSE`], [`SOCK_DIR_FORWARD`]).
/// LRU: a socket that is gone leaves entries nobody looks up again, and they are the
/// first to go.
#[map(name = "LB4_SOCK_NAT")]
pub static SOCK_NAT: LruHashMap<SockNatKey, SockNatValue> = LruHashMap::pinned(sock::CAPACITY, 0);

/// Cookie of the node's network namespace (`SO_NETNS_COOKIE` of the agent's own), set by
/// the loader. 0: unknown, every namespace counts as the node's except for loopback
/// frontends.
#[unsafe(no_mangle)]
static NODE_NETNS_COOKIE: Global<u64> = Global::new(0);

/// What a hook did with the address it was given, and the reason it is counted under.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Not a frontend (or not this namespace's business): left alone.
    Pass,
    /// Rewritten to a backend (`new_flow`, `affinity_hit`, or `established` for a
    /// datagram following its socket's earlier ones).
    Translated(u32),
    /// A frontend that takes no new connection: fail the call (`no_backend`, or
    /// `no_port` for a port the Service does not define).
    Refuse(u32),
}

/// `connect(2)` of a TCP or UDP socket.
#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) -> i32 {
    finish(forward(ctx, false))
}

/// `sendmsg(2)`/`sendto(2)` on an unconnected UDP socket.
#[inline(always)]
pub fn sendmsg4(ctx: &SockAddrContext) -> i32 {
    finish(forward(ctx, true))
}

/// `recvmsg(2)`/`recvfrom(2)` on a UDP socket: the source the application sees.
#[inline(always)]
pub fn recvmsg4(ctx: &SockAddrContext) -> i32 {
    if reverse(ctx, proto::UDP) {
        count(reason::REPLY, DIR_SOCKET);
    }
    verdict::ALLOW
}

/// `getpeername(2)`: the peer the application sees.
#[inline(always)]
pub fn getpeername4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: reading a field of the program's context.
    let protocol = unsafe { (*ctx.sock_addr).protocol };
    if let Some(p) = l4(protocol)
        && reverse(ctx, p)
    {
        count(reason::REPLY, DIR_SOCKET);
    }
    verdict::ALLOW
}

#[inline(always)]
fn finish(outcome: Outcome) -> i32 {
    match outcome {
        Outcome::Pass => {
            count(reason::NOT_SERVICE, DIR_SOCKET);
            verdict::ALLOW
        }
        Outcome::Translated(why) => {
            count(why, DIR_SOCKET);
            verdict::ALLOW
        }
        Outcome::Refuse(why) => {
            count(why, DIR_SOCKET);
            // SAFETY: helper without pointer arguments.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            verdict::REJECT
        }
    }
}

#[inline(always)]
fn l4(protocol: u32) -> Option<u8> {
    match protocol {
        p if p == u32::from(proto::TCP) => Some(proto::TCP),
        p if p == u32::from(proto::UDP) => Some(proto::UDP),
        _ => None,
    }
}

/// Whether the socket lives in the node's network namespace. A loopback destination
/// means the node only when this is known for sure: elsewhere it is the pod's own.
#[inline(always)]
fn in_node_netns(ctx: &SockAddrContext, daddr: u32) -> bool {
    let node = NODE_NETNS_COOKIE.load();
    if node == 0 {
        return daddr != LOOPBACK_BE;
    }
    // SAFETY: the helper takes the program's own context.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) == node }
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper takes the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

#[inline(always)]
fn rewrite(ctx: &SockAddrContext, addr_be: u32, port_be: u16) {
    // SAFETY: the hooks of this module may write the user address (the verifier checks
    // the access); `user_port` holds the port in network byte order in its low 16 bits.
    unsafe {
        (*ctx.sock_addr).user_ip4 = addr_be;
        (*ctx.sock_addr).user_port = u32::from(port_be);
    }
}

/// The request as the TC path's [`Packet`], so that the same lookup and selection code
/// runs: the destination the application named, the node as client.
#[inline(always)]
fn request(ctx: &SockAddrContext) -> Option<Packet> {
    // SAFETY: reading fields of the program's context.
    let (protocol, daddr, dport) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.protocol, sa.user_ip4, sa.user_port as u16)
    };
    Some(Packet {
        saddr: NODE_CLIENT_ADDR,
        daddr,
        sport: 0,
        dport,
        proto: l4(protocol)?,
        tcp_flags: 0,
        ip_len: 0,
        fragment: false,
    })
}

/// Frontend -> backend for a connect or a datagram.
#[inline(always)]
fn forward(ctx: &SockAddrContext, per_datagram: bool) -> Outcome {
    let Some(req) = request(ctx) else {
        return Outcome::Pass;
    };
    if !in_node_netns(ctx, req.daddr) {
        return Outcome::Pass;
    }
    let Some(svc) = service::lookup_frontend(&req) else {
        // A ClusterIP, but a port its Service does not define: refused, as the TC path
        // rejects it.
        if service::is_service_addr(&req) {
            return Outcome::Refuse(reason::NO_PORT);
        }
        return Outcome::Pass;
    };
    if !service::source_allowed(&req, &svc) {
        return Outcome::Pass;
    }
    let now = conntrack::now();
    let cookie = cookie(ctx);
    if per_datagram && let Some(to) = earlier_backend(cookie, &req, now) {
        rewrite(ctx, to.addr_be, to.port_be);
        return Outcome::Translated(reason::ESTABLISHED);
    }
    // The node is inside the cluster: a `Local` external frontend sends it to any
    // endpoint, as kube-proxy does for traffic from the node itself.
    let mut fe = service::for_client(&req, svc, || true);
    if fe.svc.count == 0 {
        // No ready backend: where the TC path rejects, a local caller is told at once
        // rather than left to time out.
        return Outcome::Refuse(reason::NO_BACKEND);
    }
    // The source port is not chosen yet and the client address is a placeholder, so a
    // Maglev choice would send every local socket to one backend: random slots instead.
    fe.svc.flags &= !SVC_F_MAGLEV;
    let Some(sel) = service::select(&req, &fe, now) else {
        return Outcome::Refuse(reason::NO_BACKEND);
    };
    let entry = SockNatValue {
        addr_be: req.daddr,
        port_be: req.dport,
        _pad: [0; 2],
        backend_id: sel.id,
        service_id: fe.svc.service_id,
        last_seen_ns: now,
    };
    let stored = SOCK_NAT
        .insert(
            &reverse_key(cookie, sel.backend.addr_be, sel.backend.port_be, req.proto),
            &entry,
            0,
        )
        .is_ok();
    if !stored && req.proto == proto::UDP {
        // Fail closed: replies could not be given the frontend back, and a UDP client
        // drops datagrams from an address it did not ask.
        return Outcome::Refuse(reason::CT_FULL);
    }
    if per_datagram {
        let fwd = SockNatValue {
            addr_be: sel.backend.addr_be,
            port_be: sel.backend.port_be,
            ..entry
        };
        // Best effort: without it the next datagram is balanced afresh.
        let _ = SOCK_NAT.insert(&forward_key(cookie, &req), &fwd, 0);
    }
    rewrite(ctx, sel.backend.addr_be, sel.backend.port_be);
    Outcome::Translated(if sel.sticky {
        reason::AFFINITY_HIT
    } else {
        reason::NEW_FLOW
    })
}

/// The backend this socket's earlier datagrams to the same frontend went to, while it
/// is fresh (the UDP flow timeout of the TC path) and the backend still exists as it was
/// (a terminating one keeps its flows, as in the TC path).
#[inline(always)]
fn earlier_backend(cookie: u64, req: &Packet, now: u64) -> Option<SockNatValue> {
    let key = forward_key(cookie, req);
    // SAFETY: copied out at once.
    let fwd = unsafe { *SOCK_NAT.get(&key)? };
    if now.wrapping_sub(fwd.last_seen_ns) > CT_TIMEOUT_UDP_NS {
        return None;
    }
    let ct = lb_common::CtValue {
        nat_addr_be: fwd.addr_be,
        nat_port_be: fwd.port_be,
        flags: 0,
        backend_id: fwd.backend_id,
        service_id: fwd.service_id,
        last_seen_ns: fwd.last_seen_ns,
    };
    if !backend_matches(&ct, service::backend(fwd.backend_id).as_ref()) {
        return None;
    }
    if now.wrapping_sub(fwd.last_seen_ns) > CT_REFRESH_NS {
        let fresh = SockNatValue {
            last_seen_ns: now,
            ..fwd
        };
        let rev = SockNatValue {
            addr_be: req.daddr,
            port_be: req.dport,
            ..fresh
        };
        // Best effort; writing the reverse entry also recreates it if the LRU evicted it.
        let _ = SOCK_NAT.insert(&key, &fresh, 0);
        let _ = SOCK_NAT.insert(
            &reverse_key(cookie, fwd.addr_be, fwd.port_be, req.proto),
            &rev,
            0,
        );
    }
    Some(fwd)
}

/// Backend -> frontend for what the application is shown; whether it was one.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, proto_nr: u8) -> bool {
    // SAFETY: reading fields of the program's context.
    let (addr_be, port_be) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.user_ip4, sa.user_port as u16)
    };
    let key = reverse_key(cookie(ctx), addr_be, port_be, proto_nr);
    // SAFETY: copied out at once.
    match unsafe { SOCK_NAT.get(&key).copied() } {
        Some(entry) => {
            rewrite(ctx, entry.addr_be, entry.port_be);
            true
        }
        None => false,
    }
}

#[inline(always)]
fn reverse_key(cookie: u64, addr_be: u32, port_be: u16, proto_nr: u8) -> SockNatKey {
    SockNatKey {
        cookie,
        addr_be,
        port_be,
        proto: proto_nr,
        dir: SOCK_DIR_REVERSE,
    }
}

#[inline(always)]
fn forward_key(cookie: u64, req: &Packet) -> SockNatKey {
    SockNatKey {
        cookie,
        addr_be: req.daddr,
        port_be: req.dport,
        proto: req.proto,
        dir: SOCK_DIR_FORWARD,
    }
}
