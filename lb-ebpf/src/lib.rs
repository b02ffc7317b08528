//! The lb datapath: Service translation at TC, factored like a small load balancer
//! library. `main.rs` holds the thin program entry points; everything they do lives in
//! these modules.
//!
//! Flow of a packet through `lb_tc_ingress` (traffic entering a device):
//! [`parse`] the headers -> [`service`] frontend lookup -> [`flow::decide`]: [`conntrack`]
//! lookup, or admission and backend selection for a new flow -> [`nat`] DNAT to the
//! backend. `lb_xdp` takes the same decision and carries out what it can without a socket
//! buffer. A frontend is a ClusterIP, a node address with a
//! nodePort, an externalIP or a LoadBalancer IP, all found with the same one lookup.
//! Frontends with no ready backend, or a ClusterIP port the Service does not define, get
//! an ICMP port unreachable from [`reject`]; new flows from outside a LoadBalancer IP's
//! source ranges, and to a `Local` traffic policy frontend with no endpoint on this node,
//! are dropped.
//!
//! A client balanced onto itself (a hairpin) also gets the source `lb_common::HAIRPIN_ADDR`;
//! its packets, and its replies to that address (recognised at ingress), are translated
//! both ways and sent straight back to the pod ([`nat::send_back`]).
//!
//! `lb_tc_egress` (traffic leaving a device) looks replies up in [`conntrack`] and restores
//! the frontend as their source. Doing the reverse translation at egress, after the node's
//! netfilter has seen the packet, means netfilter sees one consistent client <-> backend
//! flow in both directions, so hosts that drop `ctstate INVALID` in FORWARD keep working.
//!
//! `lb_xdp`, on the devices external traffic arrives on (`lb-agent --xdp`), runs before
//! `lb_tc_ingress`: it translates packets to frontends that need only a rewrite (with
//! [`xdp::rewrite`]), drops the new flows a frontend refuses, and leaves the rest to the TC
//! program, with any new flow already created in [`conntrack`].
#![no_std]

pub mod conntrack;
pub mod csum;
pub mod flow;
pub mod maps;
pub mod metrics;
pub mod nat;
pub mod parse;
pub mod reject;
pub mod service;
pub mod sock;
pub mod xdp;

/// TC verdicts (`linux/pkt_cls.h`).
pub mod verdict {
    /// Continue with the next program / normal processing. With tcx this is `TCX_NEXT`.
    pub const PASS: i32 = -1;
    /// Accept the packet and stop processing programs.
    pub const OK: i32 = 0;
    /// Drop the packet.
    pub const DROP: i32 = 2;
    /// The packet was redirected by a helper.
    pub const REDIRECT: i32 = 7;
}
