//! Crafted Ethernet + IPv4 + TCP/UDP frames with exact checksums, for the packet tests
//! (`lb-agent/tests/packet.rs`) and the datapath benchmark (`cargo xtask bench`), which run
//! the programs on them through `BPF_PROG_TEST_RUN`.
use std::net::Ipv4Addr;

use lb_common::proto;

/// MAC address of the client side of a crafted frame.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// MAC address of the node side of a crafted frame.
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// Ones' complement sum of big-endian words.
pub fn sum(mut acc: u32, bytes: &[u8]) -> u32 {
    for chunk in bytes.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        acc += u32::from(word);
    }
    acc
}

/// Folds a sum into the final checksum.
pub fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// An IPv4 header without options, with its checksum.
pub fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto_nr: u8, payload_len: usize) -> [u8; 20] {
    let total = (20 + payload_len) as u16;
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    h[6] = 0x40;
    h[8] = 64;
    h[9] = proto_nr;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let c = fold(sum(0, &h));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// TCP/UDP checksum over the IPv4 pseudo-header and `l4`; 0 when `l4` carries a correct one.
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto_nr: u8, l4: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto_nr]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    fold(sum(sum(0, &pseudo), l4))
}

/// An Ethernet + IPv4 + TCP (SYN, with an MSS option) or UDP frame with exact checksums.
pub fn frame(proto_nr: u8, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), tcp_flags: u8) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&src.1.to_be_bytes());
    l4.extend_from_slice(&dst.1.to_be_bytes());
    if proto_nr == proto::TCP {
        l4.extend_from_slice(&1000u32.to_be_bytes()); // seq
        l4.extend_from_slice(&0u32.to_be_bytes()); // ack
        l4.push(6 << 4); // data offset: 24 bytes
        l4.push(tcp_flags);
        l4.extend_from_slice(&64240u16.to_be_bytes());
        l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
        l4.extend_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460
    } else {
        let payload = b"hello";
        l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
        l4.extend_from_slice(payload);
    }
    let c = l4_checksum(src.0, dst.0, proto_nr, &l4);
    let off = if proto_nr == proto::TCP { 16 } else { 6 };
    l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&NODE_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&ipv4_header(src.0, dst.0, proto_nr, l4.len()));
    f.extend_from_slice(&l4);
    f
}
