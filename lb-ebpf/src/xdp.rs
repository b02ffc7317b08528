//! Packet access for the XDP program: bounds-checked pointers into the frame, and the
//! address and port rewrite with checksums updated by hand (XDP has no checksum helpers,
//! and no socket buffer whose checksum state would need them).
//!
//! XDP sees a frame as the device received it, so its checksums are complete: the
//! incremental update of RFC 1624 (`HC' = ~(~HC + ~m + m')`) keeps them exact. (A veth
//! carrying a local socket's packet with a partial checksum is the exception; the
//! end-to-end tests turn transmit checksumming off on the clients' side for that reason,
//! which is what a real NIC's frames look like.)
use core::{
    mem::offset_of,
    ptr::{read_unaligned, write_unaligned},
};

use aya_ebpf::programs::XdpContext;
use lb_common::proto;
use network_types::{ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{
    nat::{End, RewriteError},
    parse::{L3_OFF, Packet},
};

/// XDP verdicts (`enum xdp_action`).
pub mod action {
    /// Drop the frame before the kernel builds a socket buffer for it.
    pub const DROP: u32 = 1;
    /// Hand the frame to the kernel's stack (and so to the TC programs).
    pub const PASS: u32 = 2;
}

/// The address of the `len` bytes at `off` in the frame, if they all lie within it.
#[inline(always)]
pub fn bounded(ctx: &XdpContext, off: usize, len: usize) -> Result<usize, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + len > end {
        return Err(());
    }
    Ok(start + off)
}

/// Folds a 32-bit ones' complement sum into 16 bits.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Checksum `check` after the 32-bit word `old` became `new`. All three are as read from
/// the packet: the ones' complement sum does not depend on byte order as long as every
/// word is taken in the same one.
#[inline(always)]
fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!check)
        + u32::from(!(old as u16))
        + u32::from(!((old >> 16) as u16))
        + u32::from(new as u16)
        + u32::from((new >> 16) as u16);
    !fold(sum)
}

/// Checksum `check` after the 16-bit word `old` became `new` (see [`replace4`]).
#[inline(always)]
fn replace2(check: u16, old: u16, new: u16) -> u16 {
    !fold(u32::from(!check) + u32::from(!old) + u32::from(new))
}

/// Replaces the address and port at `end` of `pkt` with `addr`/`port` (network order),
/// updating the IPv4 and L4 checksums. A UDP checksum of zero ("none") stays zero.
#[inline(always)]
pub fn rewrite(
    ctx: &XdpContext,
    pkt: &Packet,
    end: End,
    addr: u32,
    port: u16,
) -> Result<(), RewriteError> {
    let ip = bounded(ctx, L3_OFF, Ipv4Hdr::LEN).map_err(|_| RewriteError)?;
    // Masked again so that the verifier sees the offset bounded (at most 60).
    let l4_off = L3_OFF + (pkt.ip_len & 0x3c);
    let tcp = pkt.proto == proto::TCP;
    let check_at = if tcp {
        offset_of!(TcpHdr, check)
    } else {
        offset_of!(UdpHdr, check)
    };
    let (addr_at, port_at) = match end {
        End::Destination => (offset_of!(Ipv4Hdr, dst_addr), 2),
        End::Source => (offset_of!(Ipv4Hdr, src_addr), 0),
    };
    // Each field is bounds-checked on its own: a check of the whole L4 header would
    // leave older verifiers unable to tie its length to the protocol branch taken.
    let l4_check = bounded(ctx, l4_off + check_at, 2).map_err(|_| RewriteError)? as *mut u16;
    let port_ptr = bounded(ctx, l4_off + port_at, 2).map_err(|_| RewriteError)? as *mut u16;
    let ip_check = (ip + offset_of!(Ipv4Hdr, check)) as *mut u16;
    let addr_ptr = (ip + addr_at) as *mut u32;
    // SAFETY: every pointer lies within the bounds checked above; unaligned access
    // because the frame buffer promises no alignment.
    unsafe {
        let old_addr = read_unaligned(addr_ptr);
        let old_port = read_unaligned(port_ptr);
        let mut check = read_unaligned(l4_check);
        // UDP over IPv4 may carry no checksum at all (zero): leave it so.
        let l4_summed = tcp || check != 0;
        if old_addr != addr {
            write_unaligned(ip_check, replace4(read_unaligned(ip_check), old_addr, addr));
            write_unaligned(addr_ptr, addr);
            // The L4 checksum covers the addresses through the pseudo-header.
            check = replace4(check, old_addr, addr);
        }
        if old_port != port {
            write_unaligned(port_ptr, port);
            check = replace2(check, old_port, port);
        }
        if l4_summed {
            // A UDP checksum that computes to zero is sent as all ones.
            if !tcp && check == 0 {
                check = 0xffff;
            }
            write_unaligned(l4_check, check);
        }
    }
    Ok(())
}
