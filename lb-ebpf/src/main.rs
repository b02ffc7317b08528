//! Program entry points. Each is a thin wrapper that turns the module functions'
//! results into a TC verdict and counts the reason.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    BACKEND_F_SNAT, Backend, CT_F_HAIRPIN, CtValue, DIR_EGRESS, DIR_INGRESS, DIR_XDP,
    HAIRPIN_ADDR_BE, SNAT_MARK, reason,
};
use lb_ebpf::{
    conntrack,
    flow::{self, Flow},
    metrics::count,
    nat::{self, End},
    parse::{self, Packet, ParseError},
    reject, service, verdict,
    xdp::{self as xdp_frame, action},
};

/// A decision: the reason it is counted under and the TC verdict.
struct Decision {
    reason: u32,
    verdict: i32,
}

impl Decision {
    const fn pass(reason: u32) -> Self {
        Self {
            reason,
            verdict: verdict::PASS,
        }
    }
    const fn drop(reason: u32) -> Self {
        Self {
            reason,
            verdict: verdict::DROP,
        }
    }
}

/// Traffic entering a device: translate packets addressed to a frontend, and the replies of
/// hairpin flows.
#[classifier]
pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
    let d = ingress(&ctx);
    count(d.reason, DIR_INGRESS);
    d.verdict
}

/// Traffic leaving a device: restore the frontend as the source of replies.
#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    let d = egress(&ctx);
    count(d.reason, DIR_EGRESS);
    d.verdict
}

#[inline(always)]
fn parse_or_pass(ctx: &TcContext) -> Result<Packet, Decision> {
    parse::parse(ctx).map_err(|e| match e {
        ParseError::Malformed => Decision::pass(reason::MALFORMED),
        ParseError::NotIpv4 | ParseError::OtherProtocol => Decision::pass(reason::NOT_SERVICE),
    })
}

#[inline(always)]
fn ingress(ctx: &TcContext) -> Decision {
    let pkt = match parse_or_pass(ctx) {
        Ok(p) => p,
        Err(d) => return d,
    };
    if pkt.daddr == HAIRPIN_ADDR_BE {
        return hairpin_reply(ctx, &pkt);
    }
    let Some(svc) = service::lookup_frontend(&pkt) else {
        if service::is_service_addr(&pkt) {
            if pkt.fragment {
                return Decision::drop(reason::UNSUPPORTED);
            }
            return reject_packet(ctx, &pkt, reason::NO_PORT);
        }
        return Decision::pass(reason::NOT_SERVICE);
    };
    if pkt.fragment {
        // Later fragments carry no ports, so they cannot be matched to a flow.
        return Decision::drop(reason::UNSUPPORTED);
    }
    let now = conntrack::now();
    let key = conntrack::forward_key(&pkt);
    match flow::decide(&pkt, svc, &key, now) {
        Flow::Translate {
            ct,
            backend,
            why,
            established,
        } => {
            if established {
                conntrack::refresh(&key, &ct, &pkt, now);
            }
            mark_for_snat(ctx, &backend);
            translate(ctx, &pkt, &ct, why)
        }
        Flow::Drop(why) => Decision::drop(why),
        Flow::Reject(why) => reject_packet(ctx, &pkt, why),
    }
}

/// Marks a packet to backend `b` for the node's source NAT if `b` is on another node.
/// The node's conntrack binds the source NAT on the first packet of a flow and the later
/// ones follow it; marking every packet keeps a flow whose netfilter entry expired before
/// ours (a quiet UDP flow) masqueraded when it resumes, and lets the XDP program leave a
/// flow's first packet to this path after creating the flow.
#[inline(always)]
fn mark_for_snat(ctx: &TcContext, b: &Backend) {
    if b.flags & BACKEND_F_SNAT != 0 {
        // SAFETY: reading a field of the program's context.
        let mark = unsafe { (*ctx.skb.skb).mark };
        ctx.set_mark(mark | SNAT_MARK);
    }
}

/// DNAT of a client's packet to the backend of its flow `ct`.
#[inline(always)]
fn translate(ctx: &TcContext, pkt: &Packet, ct: &CtValue, why: u32) -> Decision {
    if nat::rewrite(ctx, pkt, End::Destination, ct.nat_addr_be, ct.nat_port_be).is_err() {
        return Decision::drop(reason::REWRITE_FAILED);
    }
    if ct.flags & CT_F_HAIRPIN == 0 {
        return Decision {
            reason: why,
            verdict: verdict::OK,
        };
    }
    // A hairpin: the pod gets its own packet back, from the hairpin address so that its
    // kernel accepts it and its reply comes back here. The node's routing and netfilter
    // are bypassed both ways, so that netfilter never sees half a flow.
    match nat::rewrite(ctx, pkt, End::Source, HAIRPIN_ADDR_BE, pkt.sport)
        .and_then(|()| nat::send_back(ctx))
    {
        Ok(v) => Decision {
            reason: why,
            verdict: v,
        },
        Err(_) => Decision::drop(reason::REWRITE_FAILED),
    }
}

/// A packet from a pod to the hairpin address: the reply of a hairpin flow (backend ->
/// hairpin address) as it leaves the pod. It goes back to the pod it came from, from the
/// frontend the pod asked for.
#[inline(always)]
fn hairpin_reply(ctx: &TcContext, pkt: &Packet) -> Decision {
    if pkt.fragment {
        return Decision::pass(reason::UNSUPPORTED);
    }
    let now = conntrack::now();
    let key = conntrack::reverse_key(pkt);
    let Some(ct) = conntrack::lookup(&key, now) else {
        return Decision::pass(reason::NOT_SERVICE);
    };
    if ct.flags & CT_F_HAIRPIN == 0 {
        return Decision::pass(reason::NOT_SERVICE);
    }
    conntrack::refresh(&key, &ct, pkt, now);
    match nat::rewrite(ctx, pkt, End::Source, ct.nat_addr_be, ct.nat_port_be)
        .and_then(|()| nat::rewrite(ctx, pkt, End::Destination, pkt.saddr, pkt.dport))
        .and_then(|()| nat::send_back(ctx))
    {
        Ok(v) => Decision {
            reason: reason::REPLY,
            verdict: v,
        },
        Err(_) => Decision::drop(reason::REWRITE_FAILED),
    }
}

#[inline(always)]
fn reject_packet(ctx: &TcContext, pkt: &Packet, why: u32) -> Decision {
    match reject::port_unreachable(ctx, pkt) {
        Ok(v) => Decision {
            reason: why,
            verdict: v,
        },
        Err(_) => Decision::drop(reason::REJECT_FAILED),
    }
}

#[inline(always)]
fn egress(ctx: &TcContext) -> Decision {
    let pkt = match parse_or_pass(ctx) {
        Ok(p) => p,
        Err(d) => return d,
    };
    if pkt.fragment {
        return Decision::pass(reason::UNSUPPORTED);
    }
    let now = conntrack::now();
    let key = conntrack::reverse_key(&pkt);
    let Some(ct) = conntrack::lookup(&key, now) else {
        return Decision::pass(reason::NOT_SERVICE);
    };
    conntrack::refresh(&key, &ct, &pkt, now);
    match nat::rewrite(ctx, &pkt, End::Source, ct.nat_addr_be, ct.nat_port_be) {
        Ok(()) => Decision {
            reason: reason::REPLY,
            verdict: verdict::OK,
        },
        Err(_) => Decision::drop(reason::REWRITE_FAILED),
    }
}

/// An XDP decision: the reason it is counted under and the XDP action.
struct XdpDecision {
    reason: u32,
    action: u32,
}

impl XdpDecision {
    const fn pass(reason: u32) -> Self {
        Self {
            reason,
            action: action::PASS,
        }
    }
    const fn drop(reason: u32) -> Self {
        Self {
            reason,
            action: action::DROP,
        }
    }
}

/// Traffic arriving on an external device (`lb-agent --xdp`), before the kernel builds a
/// socket buffer for it. Packets to a frontend are translated here (new flows to a backend
/// on this node, and established flows), and new flows the frontend refuses by source
/// range or traffic policy are dropped here; whatever needs more than a rewrite is left
/// to `lb_tc_ingress` on the same device (see [`reason::DEFERRED`]), which therefore
/// behaves as if XDP were not there. Flows are created in the same conntrack map, so
/// either path continues what the other began.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let d = xdp_ingress(&ctx);
    count(d.reason, DIR_XDP);
    d.action
}

#[inline(always)]
fn xdp_ingress(ctx: &XdpContext) -> XdpDecision {
    let pkt = match parse::parse(ctx) {
        Ok(p) => p,
        Err(ParseError::Malformed) => return XdpDecision::pass(reason::MALFORMED),
        Err(ParseError::NotIpv4 | ParseError::OtherProtocol) => {
            return XdpDecision::pass(reason::NOT_SERVICE);
        }
    };
    let Some(svc) = service::lookup_frontend(&pkt) else {
        // A Service address's undefined port is rejected by the TC path.
        if service::is_service_addr(&pkt) {
            return XdpDecision::pass(reason::DEFERRED);
        }
        return XdpDecision::pass(reason::NOT_SERVICE);
    };
    if pkt.fragment {
        return XdpDecision::pass(reason::DEFERRED);
    }
    let now = conntrack::now();
    let key = conntrack::forward_key(&pkt);
    match flow::decide(&pkt, svc, &key, now) {
        // A new flow left to the TC path is created all the same, so that its packet
        // finds its backend chosen there: choosing again would favour this node's
        // backends. An established one is refreshed by the path that translates it.
        Flow::Translate {
            ct,
            backend,
            why,
            established,
        } => {
            if !xdp_translates(&ct, &backend) {
                return XdpDecision::pass(reason::DEFERRED);
            }
            if established {
                conntrack::refresh(&key, &ct, &pkt, now);
            }
            xdp_translate(ctx, &pkt, &ct, why)
        }
        Flow::Drop(why) => XdpDecision::drop(why),
        // Rejects need a socket buffer to answer from.
        Flow::Reject(_) => XdpDecision::pass(reason::DEFERRED),
    }
}

/// Whether XDP translates the packets of flow `ct` to backend `b` itself: not when the
/// backend is on another node (its packets need the source NAT mark, which only a socket
/// buffer carries) nor for a hairpin (sent back out of its device by the TC path).
#[inline(always)]
fn xdp_translates(ct: &CtValue, b: &Backend) -> bool {
    b.flags & BACKEND_F_SNAT == 0 && ct.flags & CT_F_HAIRPIN == 0
}

/// DNAT of a client's packet to the backend of its flow `ct`, then on to the stack.
#[inline(always)]
fn xdp_translate(ctx: &XdpContext, pkt: &Packet, ct: &CtValue, why: u32) -> XdpDecision {
    match xdp_frame::rewrite(ctx, pkt, End::Destination, ct.nat_addr_be, ct.nat_port_be) {
        Ok(()) => XdpDecision::pass(why),
        Err(_) => XdpDecision::drop(reason::REWRITE_FAILED),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// Socket-level translation for the node's own processes: cgroup sock_addr hooks, attached
// to the cgroup given with `lb-agent --cgroup-path` (see `lb_ebpf::sock`).

/// `connect(2)` to a frontend: connect to a backend instead.
#[aya_ebpf::macros::cgroup_sock_addr(connect4)]
pub fn lb_sock_connect4(ctx: aya_ebpf::programs::SockAddrContext) -> i32 {
    lb_ebpf::sock::connect4(&ctx)
}

/// A datagram of an unconnected UDP socket to a frontend: send it to a backend.
#[aya_ebpf::macros::cgroup_sock_addr(sendmsg4)]
pub fn lb_sock_sendmsg4(ctx: aya_ebpf::programs::SockAddrContext) -> i32 {
    lb_ebpf::sock::sendmsg4(&ctx)
}

/// A UDP reply from a backend: show the frontend as its source.
#[aya_ebpf::macros::cgroup_sock_addr(recvmsg4)]
pub fn lb_sock_recvmsg4(ctx: aya_ebpf::programs::SockAddrContext) -> i32 {
    lb_ebpf::sock::recvmsg4(&ctx)
}

/// `getpeername(2)` of a translated socket: show the frontend.
#[aya_ebpf::macros::cgroup_sock_addr(getpeername4)]
pub fn lb_sock_getpeername4(ctx: aya_ebpf::programs::SockAddrContext) -> i32 {
    lb_ebpf::sock::getpeername4(&ctx)
}
