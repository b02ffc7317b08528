//! Checksum helpers for headers the datapath builds from scratch (ICMP rejects).
//! Rewrites of existing packets use the kernel's incremental `l3/l4_csum_replace`.

/// Adds the big-endian 16-bit words of `bytes` to a ones' complement running sum.
#[inline(always)]
pub fn sum_words(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// Folds a running sum into the final ones' complement checksum, big-endian bytes.
#[inline(always)]
pub fn fold(mut sum: u32) -> [u8; 2] {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}
