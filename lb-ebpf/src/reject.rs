//! Rejecting a packet the way kube-proxy's `REJECT` rule does: an ICMP destination
//! unreachable / port unreachable back to the client, sent from the frontend address, so
//! that a TCP connect or a connected UDP socket fails at once instead of timing out.
//!
//! The packet itself is turned into the reply: it is cut to its IP header plus the first
//! 8 bytes of its L4 header (what ICMP quotes), a new IPv4 and ICMP header are written in
//! front of that, the Ethernet addresses are swapped, and the result is sent back out of
//! the device it came in on.
use aya_ebpf::{bindings::__sk_buff, helpers::bpf_skb_change_tail, programs::TcContext};
use lb_common::proto;
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    csum, nat,
    parse::{L3_OFF, Packet},
};

/// The reject could not be built; the caller drops the packet instead.
pub struct RejectError;

/// Bytes of the offending packet's L4 header quoted in the ICMP message.
const QUOTE_L4: usize = 8;
const ICMP_HDR: usize = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// Length of the IPv4 + ICMP reply: new IP header, ICMP header, quoted IP header + 8 bytes.
const REPLY_IP_LEN: usize = Ipv4Hdr::LEN + ICMP_HDR + Ipv4Hdr::LEN + QUOTE_L4;

/// Everything after the Ethernet header of the reply, written with one store.
#[repr(C)]
struct Reply {
    ip: [u8; Ipv4Hdr::LEN],
    icmp: [u8; ICMP_HDR],
    quoted_ip: [u8; Ipv4Hdr::LEN],
    quoted_l4: [u8; QUOTE_L4],
}

/// Turns `pkt` into an ICMP port unreachable from its destination to its source and
/// redirects it out of the ingress device. Returns the TC verdict on success.
#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, pkt: &Packet) -> Result<i32, RejectError> {
    // Quoting needs a plain 20-byte header; packets with IP options are simply dropped.
    if pkt.ip_len != Ipv4Hdr::LEN {
        return Err(RejectError);
    }
    let quoted_ip: [u8; Ipv4Hdr::LEN] = ctx.load(L3_OFF).map_err(|_| RejectError)?;
    let quoted_l4: [u8; QUOTE_L4] = ctx.load(pkt.l4_off()).map_err(|_| RejectError)?;
    let skb: *mut __sk_buff = ctx.skb.skb;
    let new_len = (EthHdr::LEN + REPLY_IP_LEN) as u32;
    // SAFETY: `skb` is the program's context.
    if unsafe { bpf_skb_change_tail(skb, new_len, 0) } != 0 {
        return Err(RejectError);
    }

    let mut reply = Reply {
        ip: [0; Ipv4Hdr::LEN],
        icmp: [0; ICMP_HDR],
        quoted_ip,
        quoted_l4,
    };
    let tot_len = (REPLY_IP_LEN as u16).to_be_bytes();
    let src = pkt.daddr.to_ne_bytes();
    let dst = pkt.saddr.to_ne_bytes();
    reply.ip = [
        0x45,
        0,
        tot_len[0],
        tot_len[1], // version/IHL, TOS, total length
        0,
        0,
        0x40,
        0, // id, DF
        64,
        proto::ICMP,
        0,
        0, // TTL, protocol, checksum (below)
        src[0],
        src[1],
        src[2],
        src[3], //
        dst[0],
        dst[1],
        dst[2],
        dst[3],
    ];
    let ip_csum = csum::fold(csum::sum_words(0, &reply.ip));
    reply.ip[10] = ip_csum[0];
    reply.ip[11] = ip_csum[1];
    reply.icmp[0] = ICMP_DEST_UNREACH;
    reply.icmp[1] = ICMP_PORT_UNREACH;
    let mut sum = csum::sum_words(0, &reply.icmp);
    sum = csum::sum_words(sum, &reply.quoted_ip);
    sum = csum::sum_words(sum, &reply.quoted_l4);
    let icmp_csum = csum::fold(sum);
    reply.icmp[2] = icmp_csum[0];
    reply.icmp[3] = icmp_csum[1];

    ctx.store(L3_OFF, &reply, 0).map_err(|_| RejectError)?;
    nat::send_back(ctx).map_err(|_| RejectError)
}
