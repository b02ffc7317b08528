//! Frontend lookup, admission (source ranges) and backend selection.
use aya_ebpf::{helpers::bpf_get_prandom_u32, maps::lpm_trie::Key};
use lb_common::{
    AffinityKey, AffinityValue, BACKEND_ACTIVE, Backend, MAGLEV_TABLE_SIZE, SCOPE_ALL,
    SCOPE_INTERNAL, SVC_F_AFFINITY, SVC_F_INTERNAL_SCOPE, SVC_F_MAGLEV, SVC_F_SOURCE_RANGES,
    ServiceKey, ServiceValue, SourceRangeKey, maglev_flow_hash,
};

use crate::{
    maps::{AFFINITY, BACKENDS, CLUSTER_CIDRS, MAGLEV, SERVICES, SOURCE_RANGES},
    parse::Packet,
};

/// The frontend entry a new flow uses: its header and the scope its slots are keyed at.
pub struct Frontend {
    /// The header (slot 0).
    pub svc: ServiceValue,
    /// `SCOPE_ALL`, or `SCOPE_INTERNAL` for the twin that clients inside the cluster use.
    pub scope: u8,
}

/// The frontend header (slot 0) for the packet's destination, if it is a frontend.
#[inline(always)]
pub fn lookup_frontend(pkt: &Packet) -> Option<ServiceValue> {
    let key = ServiceKey::new(pkt.daddr, pkt.dport, pkt.proto, 0);
    // SAFETY: copied out at once.
    unsafe { SERVICES.get(key).copied() }
}

/// Whether the packet's destination address is a Service address (any port).
#[inline(always)]
pub fn is_service_addr(pkt: &Packet) -> bool {
    // SAFETY: only presence is checked.
    unsafe { SERVICES.get(ServiceKey::addr_marker(pkt.daddr)).is_some() }
}

/// Whether `addr_be` is within the cluster's pod ranges (`--cluster-cidr`).
#[inline(always)]
pub fn in_cluster(addr_be: u32) -> bool {
    CLUSTER_CIDRS.get(&Key::new(32, addr_be)).is_some()
}

/// The entry a new flow of `pkt` to frontend `svc` (its `SCOPE_ALL` header) chooses its
/// backend from: the frontend's in-cluster twin when it has one
/// ([`SVC_F_INTERNAL_SCOPE`]) and `internal` says the client is inside the cluster
/// (asked only then), otherwise the frontend itself. A twin that is not there (being
/// written or removed) counts as none.
#[inline(always)]
pub fn for_client(pkt: &Packet, svc: ServiceValue, internal: impl FnOnce() -> bool) -> Frontend {
    if svc.flags & SVC_F_INTERNAL_SCOPE != 0 && internal() {
        let key = ServiceKey::new(pkt.daddr, pkt.dport, pkt.proto, 0).with_scope(SCOPE_INTERNAL);
        // SAFETY: copied out at once.
        if let Some(twin) = unsafe { SERVICES.get(key).copied() } {
            return Frontend {
                svc: twin,
                scope: SCOPE_INTERNAL,
            };
        }
    }
    Frontend {
        svc,
        scope: SCOPE_ALL,
    }
}

/// Whether a new flow of `pkt` may use frontend `svc`: always, unless the frontend lists
/// `loadBalancerSourceRanges` and the client is in none of them. One LPM lookup, only for
/// frontends that have ranges.
#[inline(always)]
pub fn source_allowed(pkt: &Packet, svc: &ServiceValue) -> bool {
    if svc.flags & SVC_F_SOURCE_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        64,
        SourceRangeKey {
            service_id: svc.service_id,
            addr_be: pkt.saddr,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

/// A copy of backend `id`, if it exists.
#[inline(always)]
pub fn backend(id: u32) -> Option<Backend> {
    // SAFETY: copied out at once.
    unsafe { BACKENDS.get(id).copied() }
}

/// A chosen backend and how it was chosen.
pub struct Selection {
    /// Backend id.
    pub id: u32,
    /// The backend.
    pub backend: Backend,
    /// Chosen from the client's session affinity entry.
    pub sticky: bool,
}

/// Picks a backend for a new flow of `pkt` to frontend `fe` (which has `count > 0`):
/// the client's remembered backend under `sessionAffinity: ClientIP` while it is fresh
/// and still active, otherwise the frontend's Maglev choice ([`SVC_F_MAGLEV`]), otherwise
/// a uniformly random slot.
#[inline(always)]
pub fn select(pkt: &Packet, fe: &Frontend, now: u64) -> Option<Selection> {
    let svc = &fe.svc;
    let affinity = svc.flags & SVC_F_AFFINITY != 0;
    let akey = AffinityKey {
        client_addr_be: pkt.saddr,
        service_id: svc.service_id,
    };
    if affinity && let Some(sel) = sticky(&akey, svc, now) {
        return Some(sel);
    }
    let maglev = if svc.flags & SVC_F_MAGLEV != 0 {
        maglev_slot(pkt, svc)
    } else {
        None
    };
    let sel = match maglev {
        Some(sel) => sel,
        None => random_slot(pkt, fe)?,
    };
    if affinity {
        let value = AffinityValue {
            backend_id: sel.id,
            _pad: 0,
            last_used_ns: now,
        };
        // Best effort: without the entry the next connection is balanced randomly.
        let _ = AFFINITY.insert(akey, value, 0);
    }
    Some(sel)
}

#[inline(always)]
fn sticky(akey: &AffinityKey, svc: &ServiceValue, now: u64) -> Option<Selection> {
    let entry = AFFINITY.get_ptr_mut(akey)?;
    // SAFETY: valid map value pointer; concurrent writers only store whole values.
    let (id, last) = unsafe { ((*entry).backend_id, (*entry).last_used_ns) };
    let timeout_ns = u64::from(svc.affinity_timeout_s) * 1_000_000_000;
    if now.wrapping_sub(last) > timeout_ns {
        return None;
    }
    let b = backend(id)?;
    if b.state != BACKEND_ACTIVE || b.service_id != svc.service_id {
        return None;
    }
    // The timeout counts from the client's last new connection, as with kube-proxy.
    // SAFETY: as above.
    unsafe { (*entry).last_used_ns = now };
    Some(Selection {
        id,
        backend: b,
        sticky: true,
    })
}

/// The backend the frontend's Maglev table gives the flow, if the table is there and the
/// entry names an active backend of this frontend. The agent writes a table before the
/// header that asks for it and before any backend it names stops being active, so a miss
/// only happens while a table is being replaced; the caller then picks a random slot.
#[inline(always)]
fn maglev_slot(pkt: &Packet, svc: &ServiceValue) -> Option<Selection> {
    // SAFETY: the value is read (one entry) at once.
    let table = unsafe { MAGLEV.get(svc.service_id) }?;
    let entry =
        maglev_flow_hash(pkt.saddr, pkt.sport, pkt.dport, pkt.proto) % MAGLEV_TABLE_SIZE as u32;
    // The verifier cannot bound a remainder (and the compiler turns it into a multiply),
    // and the compiler, which can, would drop the bounds check `get` makes: reading the
    // index back through a volatile load keeps that check for the verifier to see.
    // SAFETY: a read of a local variable.
    let entry = unsafe { core::ptr::read_volatile(&entry) } as usize;
    let id = *table.get(entry)?;
    let b = backend(id)?;
    if b.state != BACKEND_ACTIVE || b.service_id != svc.service_id {
        return None;
    }
    Some(Selection {
        id,
        backend: b,
        sticky: false,
    })
}

#[inline(always)]
fn random_slot(pkt: &Packet, fe: &Frontend) -> Option<Selection> {
    // SAFETY: helper without arguments.
    let r = unsafe { bpf_get_prandom_u32() };
    let count = u32::from(fe.svc.count);
    let slot = (1 + r % count) as u16;
    let mut key = ServiceKey::new(pkt.daddr, pkt.dport, pkt.proto, slot).with_scope(fe.scope);
    // SAFETY: copied out at once.
    let id = match unsafe { SERVICES.get(key) } {
        Some(v) => v.backend_id,
        None => {
            // The agent is shrinking this Service right now and removed the slot after
            // we read the count: slot 1 always exists while count > 0.
            key.slot = 1;
            // SAFETY: as above.
            unsafe { SERVICES.get(key) }?.backend_id
        }
    };
    let b = backend(id)?;
    Some(Selection {
        id,
        backend: b,
        sticky: false,
    })
}
