//! Connection tracking: which backend a flow was given, and how to translate its replies.
//!
//! Every translated flow has a forward entry (keyed by the client's packet) and a reverse
//! entry (keyed by the backend's reply). Entries carry `last_seen_ns`, refreshed at most
//! once per [`CT_REFRESH_NS`] so that the fast path rarely writes; an entry idle for longer
//! than its protocol's timeout counts as gone. Refreshing one direction refreshes the other
//! too, so a flow whose traffic goes one way only (a UDP stream, a download) keeps both.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    Backend, CT_DIR_FORWARD, CT_DIR_REVERSE, CT_F_CLOSING, CT_F_HAIRPIN, CT_REFRESH_NS,
    CT_TIMEOUT_CLOSING_NS, CT_TIMEOUT_TCP_NS, CT_TIMEOUT_UDP_NS, CtKey, CtValue, HAIRPIN_ADDR_BE,
    proto,
};

use crate::{
    maps::CT,
    parse::{Packet, TCP_FIN, TCP_RST},
};

/// Current time for CT and affinity bookkeeping.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Forward key of `pkt` (client -> frontend).
#[inline(always)]
pub fn forward_key(pkt: &Packet) -> CtKey {
    CtKey {
        src_addr_be: pkt.saddr,
        dst_addr_be: pkt.daddr,
        src_port_be: pkt.sport,
        dst_port_be: pkt.dport,
        proto: pkt.proto,
        dir: CT_DIR_FORWARD,
        _pad: [0; 2],
    }
}

/// Reverse key of `pkt` (backend -> client reply, as seen at egress).
#[inline(always)]
pub fn reverse_key(pkt: &Packet) -> CtKey {
    CtKey {
        dir: CT_DIR_REVERSE,
        ..forward_key(pkt)
    }
}

/// Reverse key of the flow whose forward entry is (`fwd`, `ct`): the reply comes from the
/// backend and goes to the client, or to the hairpin address when the backend is the client.
#[inline(always)]
fn reverse_of(fwd: &CtKey, ct: &CtValue) -> CtKey {
    let dst_addr_be = if ct.flags & CT_F_HAIRPIN != 0 {
        HAIRPIN_ADDR_BE
    } else {
        fwd.src_addr_be
    };
    CtKey {
        src_addr_be: ct.nat_addr_be,
        dst_addr_be,
        src_port_be: ct.nat_port_be,
        dst_port_be: fwd.src_port_be,
        proto: fwd.proto,
        dir: CT_DIR_REVERSE,
        _pad: [0; 2],
    }
}

/// Forward key of the flow whose reverse entry is (`rev`, `ct`). A hairpin's client is its
/// backend, the reply's source.
#[inline(always)]
fn forward_of(rev: &CtKey, ct: &CtValue) -> CtKey {
    let src_addr_be = if ct.flags & CT_F_HAIRPIN != 0 {
        rev.src_addr_be
    } else {
        rev.dst_addr_be
    };
    CtKey {
        src_addr_be,
        dst_addr_be: ct.nat_addr_be,
        src_port_be: rev.dst_port_be,
        dst_port_be: ct.nat_port_be,
        proto: rev.proto,
        dir: CT_DIR_FORWARD,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn expired(ct: &CtValue, proto_nr: u8, now: u64) -> bool {
    let timeout = if ct.flags & CT_F_CLOSING != 0 {
        CT_TIMEOUT_CLOSING_NS
    } else if proto_nr == proto::TCP {
        CT_TIMEOUT_TCP_NS
    } else {
        CT_TIMEOUT_UDP_NS
    };
    now.wrapping_sub(ct.last_seen_ns) > timeout
}

/// Looks up a live entry. Returns a copy; `None` if absent or expired.
#[inline(always)]
pub fn lookup(key: &CtKey, now: u64) -> Option<CtValue> {
    // SAFETY: the value is copied out before any other map operation.
    let ct = unsafe { *CT.get_ptr(key)? };
    if expired(&ct, key.proto, now) {
        None
    } else {
        Some(ct)
    }
}

/// Whether the flow's backend still exists as the flow knows it (same address, same
/// Service). Ids are reused after a backend is removed, so the id alone is not enough.
#[inline(always)]
pub fn backend_matches(ct: &CtValue, backend: Option<&Backend>) -> bool {
    match backend {
        Some(b) => {
            b.addr_be == ct.nat_addr_be
                && b.port_be == ct.nat_port_be
                && b.service_id == ct.service_id
        }
        None => false,
    }
}

/// Refreshes the entry `key` (a packet `pkt` was just translated with it) and its twin in
/// the other direction: `last_seen_ns` at most once per [`CT_REFRESH_NS`], and the closing
/// flag on FIN/RST. Writing the twin also recreates it if the LRU evicted it.
#[inline(always)]
pub fn refresh(key: &CtKey, ct: &CtValue, pkt: &Packet, now: u64) {
    let closing = pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    let stale = now.wrapping_sub(ct.last_seen_ns) > CT_REFRESH_NS;
    if !(stale || (closing && ct.flags & CT_F_CLOSING == 0)) {
        return;
    }
    let flags = if closing {
        ct.flags | CT_F_CLOSING
    } else {
        ct.flags
    };
    let updated = CtValue {
        last_seen_ns: now,
        flags,
        ..*ct
    };
    // Best effort: a failed refresh only shortens the entry's life.
    let _ = CT.insert(key, updated, 0);
    let (twin_key, twin) = if key.dir == CT_DIR_FORWARD {
        // The reply restores the frontend this packet was addressed to.
        (
            reverse_of(key, ct),
            CtValue {
                nat_addr_be: pkt.daddr,
                nat_port_be: pkt.dport,
                ..updated
            },
        )
    } else {
        // The client's packets go to the backend this reply came from.
        (
            forward_of(key, ct),
            CtValue {
                nat_addr_be: pkt.saddr,
                nat_port_be: pkt.sport,
                ..updated
            },
        )
    };
    let _ = CT.insert(twin_key, twin, 0);
}

/// Builds the reverse value of a forward entry: replies get the frontend back as source.
#[inline(always)]
pub fn reverse_value(pkt: &Packet, fwd: &CtValue) -> CtValue {
    CtValue {
        nat_addr_be: pkt.daddr,
        nat_port_be: pkt.dport,
        ..*fwd
    }
}

/// Creates both entries of a new flow. Fails if either insert fails.
#[inline(always)]
pub fn create(fwd_key: &CtKey, fwd: &CtValue, pkt: &Packet) -> Result<(), i32> {
    let rev_key = reverse_of(fwd_key, fwd);
    CT.insert(rev_key, reverse_value(pkt, fwd), 0)?;
    CT.insert(fwd_key, fwd, 0)
}
