//! Header parsing: Ethernet + IPv4 + TCP/UDP into a [`Packet`], from a TC or an XDP
//! context alike ([`Frame`]).
use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};
use lb_common::proto;
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

/// Why a packet is not one the datapath translates. Every variant is "not ours": the
/// packet passes untouched (fail-open), except that a fragment addressed to a frontend is
/// dropped by the caller because it cannot be translated consistently.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Not IPv4 (ARP, IPv6, ...).
    NotIpv4,
    /// Headers are truncated or inconsistent.
    Malformed,
    /// Not TCP or UDP.
    OtherProtocol,
}

/// The fields of a TCP/UDP packet the datapath works with. Addresses and ports are in
/// network byte order, as in the packet.
#[derive(Clone, Copy)]
pub struct Packet {
    /// Source address.
    pub saddr: u32,
    /// Destination address.
    pub daddr: u32,
    /// Source port (0 for a non-first fragment).
    pub sport: u16,
    /// Destination port (0 for a non-first fragment).
    pub dport: u16,
    /// `lb_common::proto::TCP` or `UDP`.
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// IPv4 header length in bytes.
    pub ip_len: usize,
    /// The packet is an IP fragment (first or later).
    pub fragment: bool,
}

/// Offset of the IPv4 header.
pub const L3_OFF: usize = EthHdr::LEN;
/// `ether_type` of IPv4, as it reads from the packet on a little-endian host.
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// More-fragments flag and fragment offset mask in the IPv4 `frags` field (host order).
const IP_MF_OFFSET_MASK: u16 = 0x3fff;

/// TCP FIN flag.
pub const TCP_FIN: u8 = 0x01;
/// TCP SYN flag.
pub const TCP_SYN: u8 = 0x02;
/// TCP RST flag.
pub const TCP_RST: u8 = 0x04;
/// TCP ACK flag.
pub const TCP_ACK: u8 = 0x10;

impl Packet {
    /// Offset of the L4 header.
    #[inline(always)]
    pub fn l4_off(&self) -> usize {
        L3_OFF + self.ip_len
    }
}

/// Read access to the bytes of a packet, whichever hook sees it.
pub trait Frame {
    /// A copy of the `T` at byte `off` of the frame; `Err` if the frame is shorter.
    fn read<T: Copy>(&self, off: usize) -> Result<T, ()>;
}

impl Frame for TcContext {
    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Result<T, ()> {
        self.load(off).map_err(|_| ())
    }
}

impl Frame for XdpContext {
    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Result<T, ()> {
        let ptr = crate::xdp::bounded(self, off, size_of::<T>())?;
        // SAFETY: `bounded` checked that the bytes lie within the frame; the packet
        // buffer has no alignment guarantee, hence the unaligned read.
        Ok(unsafe { core::ptr::read_unaligned(ptr as *const T) })
    }
}

/// Parses the packet in `ctx`.
#[inline(always)]
pub fn parse<F: Frame>(ctx: &F) -> Result<Packet, ParseError> {
    let eth: EthHdr = ctx.read(0).map_err(|_| ParseError::Malformed)?;
    if eth.ether_type != ETH_P_IP_BE {
        return Err(ParseError::NotIpv4);
    }
    let ip: Ipv4Hdr = ctx.read(L3_OFF).map_err(|_| ParseError::Malformed)?;
    let ip_len = usize::from(ip.vihl & 0x0f) * 4;
    if ip.vihl >> 4 != 4 || ip_len < Ipv4Hdr::LEN {
        return Err(ParseError::Malformed);
    }
    let l4_proto = ip.proto;
    if l4_proto != proto::TCP && l4_proto != proto::UDP {
        return Err(ParseError::OtherProtocol);
    }
    let frags = u16::from_be_bytes(ip.frags);
    let fragment = frags & IP_MF_OFFSET_MASK != 0;
    let l4 = L3_OFF + ip_len;
    let mut pkt = Packet {
        saddr: u32::from_ne_bytes(ip.src_addr),
        daddr: u32::from_ne_bytes(ip.dst_addr),
        sport: 0,
        dport: 0,
        proto: l4_proto,
        tcp_flags: 0,
        ip_len,
        fragment,
    };
    // A later fragment carries no L4 header; report it with zero ports.
    if frags & 0x1fff != 0 {
        return Ok(pkt);
    }
    let ports: [u16; 2] = ctx.read(l4).map_err(|_| ParseError::Malformed)?;
    pkt.sport = ports[0];
    pkt.dport = ports[1];
    if l4_proto == proto::TCP {
        // Flags live in byte 13 of the TCP header.
        pkt.tcp_flags = ctx.read::<u8>(l4 + 13).map_err(|_| ParseError::Malformed)?;
    }
    Ok(pkt)
}
