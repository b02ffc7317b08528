//! What becomes of a client's packet to a frontend, decided the same way by the TC and
//! XDP programs: it continues its flow, or it starts one (source ranges, the in-cluster
//! twin, an empty frontend, the backend choice, the conntrack entry), or it is refused.
//! Each program then carries the decision out with what its context allows.
use lb_common::{BACKEND_F_SNAT, Backend, CT_F_HAIRPIN, CtKey, CtValue, SVC_F_DROP_EMPTY, reason};

use crate::{
    conntrack::{self, backend_matches},
    parse::Packet,
    service,
};

/// The decision.
pub enum Flow {
    /// Translate the packet with `ct` to `backend`, counted under `why`.
    Translate {
        /// The flow's forward entry.
        ct: CtValue,
        /// Its backend.
        backend: Backend,
        /// `established`, or how a new flow's backend was chosen.
        why: u32,
        /// The flow existed: its entries are due for a refresh once translated.
        established: bool,
    },
    /// Drop the packet, counted under the reason.
    Drop(u32),
    /// Refuse the connection (an ICMP port unreachable), counted under the reason.
    Reject(u32),
}

/// The decision for `pkt`, whose forward conntrack key is `key`, addressed to the frontend
/// whose header is `svc`.
#[inline(always)]
pub fn decide(pkt: &Packet, svc: lb_common::ServiceValue, key: &CtKey, now: u64) -> Flow {
    let mut why = reason::NEW_FLOW;
    if let Some(ct) = conntrack::lookup(key, now) {
        let b = service::backend(ct.backend_id);
        if let Some(b) = b
            && backend_matches(&ct, Some(&b))
        {
            return Flow::Translate {
                ct,
                backend: b,
                why: reason::ESTABLISHED,
                established: true,
            };
        }
        // The flow's backend is gone: move the flow to a live one (for UDP this is what
        // keeps a long-running client working; for TCP the new backend resets it at once
        // instead of leaving it hanging).
        why = reason::RESELECTED;
    }
    // Checked for new flows only: like kube-proxy's firewall in the nat table, a change of
    // the ranges does not cut established flows.
    if !service::source_allowed(pkt, &svc) {
        return Flow::Drop(reason::SOURCE_RANGE_DENIED);
    }
    // A pod's traffic to a `Local` external frontend goes to any endpoint, as with
    // kube-proxy's short-circuit for the cluster CIDR.
    let fe = service::for_client(pkt, svc, || service::in_cluster(pkt.saddr));
    if fe.svc.count == 0 {
        if fe.svc.flags & SVC_F_DROP_EMPTY != 0 {
            return Flow::Drop(reason::NO_LOCAL_BACKEND);
        }
        return Flow::Reject(reason::NO_BACKEND);
    }
    let Some(sel) = service::select(pkt, &fe, now) else {
        return Flow::Reject(reason::NO_BACKEND);
    };
    if sel.sticky && why == reason::NEW_FLOW {
        why = reason::AFFINITY_HIT;
    }
    // The client is its own backend. A backend marked for source NAT is on another node:
    // its client came from there too, and the node's masquerade handles it.
    let hairpin = sel.backend.addr_be == pkt.saddr && sel.backend.flags & BACKEND_F_SNAT == 0;
    let ct = CtValue {
        nat_addr_be: sel.backend.addr_be,
        nat_port_be: sel.backend.port_be,
        flags: if hairpin { CT_F_HAIRPIN } else { 0 },
        backend_id: sel.id,
        service_id: fe.svc.service_id,
        last_seen_ns: now,
    };
    if conntrack::create(key, &ct, pkt).is_err() {
        // Fail closed: a flow we cannot track would lose its replies' translation.
        return Flow::Drop(reason::CT_FULL);
    }
    Flow::Translate {
        ct,
        backend: sel.backend,
        why,
        established: false,
    }
}
