//! Address and port rewrites with incremental checksum updates, and sending a rewritten
//! packet back out of the device it came in on.
use core::mem::offset_of;

use aya_ebpf::{helpers::bpf_redirect, programs::TcContext};
use lb_common::proto;
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::parse::{L3_OFF, Packet};

/// The L4 checksum covers the pseudo-header (addresses), not only the L4 bytes.
const BPF_F_PSEUDO_HDR: u64 = 0x10;
/// UDP: a zero checksum means "none" and must stay zero.
const BPF_F_MARK_MANGLED_0: u64 = 0x20;

/// The rewrite failed; the packet must be dropped (it may be half-rewritten).
pub struct RewriteError;

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Destination address and port (DNAT, client -> backend).
    Destination,
    /// Source address and port (reverse NAT, backend -> client).
    Source,
}

#[inline(always)]
fn l4_csum(pkt: &Packet) -> (usize, u64) {
    if pkt.proto == proto::TCP {
        (pkt.l4_off() + offset_of!(TcpHdr, check), 0)
    } else {
        (
            pkt.l4_off() + offset_of!(UdpHdr, check),
            BPF_F_MARK_MANGLED_0,
        )
    }
}

/// Replaces the address and port at `end` of `pkt` with `addr`/`port` (network order),
/// fixing the IPv4 and L4 checksums incrementally.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    end: End,
    addr: u32,
    port: u16,
) -> Result<(), RewriteError> {
    let (old_addr, old_port, addr_off, port_off) = match end {
        End::Destination => (pkt.daddr, pkt.dport, offset_of!(Ipv4Hdr, dst_addr), 2),
        End::Source => (pkt.saddr, pkt.sport, offset_of!(Ipv4Hdr, src_addr), 0),
    };
    let (csum_off, csum_flags) = l4_csum(pkt);
    if old_addr != addr {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_addr),
            u64::from(addr),
            csum_flags | BPF_F_PSEUDO_HDR | 4,
        )
        .map_err(|_| RewriteError)?;
        ctx.l3_csum_replace(
            L3_OFF + offset_of!(Ipv4Hdr, check),
            u64::from(old_addr),
            u64::from(addr),
            4,
        )
        .map_err(|_| RewriteError)?;
        ctx.store(L3_OFF + addr_off, &addr, 0)
            .map_err(|_| RewriteError)?;
    }
    if old_port != port {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_port),
            u64::from(port),
            csum_flags | 2,
        )
        .map_err(|_| RewriteError)?;
        ctx.store(pkt.l4_off() + port_off, &port, 0)
            .map_err(|_| RewriteError)?;
    }
    Ok(())
}

/// Swaps the Ethernet addresses of the packet and redirects it out of the device it came in
/// on, to the host it came from (TC ingress only). Returns the TC verdict.
#[inline(always)]
pub fn send_back(ctx: &TcContext) -> Result<i32, RewriteError> {
    let eth: EthHdr = ctx.load(0).map_err(|_| RewriteError)?;
    let swapped = EthHdr {
        dst_addr: eth.src_addr,
        src_addr: eth.dst_addr,
        ether_type: eth.ether_type,
    };
    ctx.store(0, &swapped, 0).map_err(|_| RewriteError)?;
    // SAFETY: reading the context's ifindex field (the ingress device).
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call; flags 0 = egress of `ifindex`.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}
