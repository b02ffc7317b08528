//! The rules kube-proxy programs for a set of ClusterIP Service ports, in its iptables and
//! nftables modes, generated here for the benchmark's comparison variants.
//!
//! The shapes follow what kube-proxy writes (only what ClusterIP traffic needs):
//!
//! - iptables (`iptables-restore --noflush` input): nat `KUBE-SERVICES` with one rule per
//!   Service port jumping to `KUBE-SVC-<hash>`; that chain marks off-cluster clients for
//!   masquerade and picks an endpoint with `statistic --mode random --probability 1/n,
//!   1/(n-1), ...`, the last one unconditionally; each `KUBE-SEP-<hash>` marks hairpin
//!   traffic and DNATs; `KUBE-POSTROUTING` masquerades what carries the mark; filter
//!   `KUBE-FORWARD` drops INVALID and accepts marked and established traffic. A partial
//!   sync rewrites `KUBE-SERVICES` whole (kube-proxy always does) plus the chains of the
//!   changed Service, and deletes the endpoint chain that went away.
//! - nftables (`nft -f` input): table `ip kube-proxy` with the `service-ips` verdict map
//!   (`ip daddr . meta l4proto . th dport vmap`), one `service-<hash>-ns/name/proto/port`
//!   chain per Service port with `numgen random mod n vmap { i : goto endpoint-... }`, one
//!   `endpoint-...` chain per endpoint with `dnat to`, masquerading by mark, and the
//!   no-endpoints check in the filter hooks. A partial sync is one transaction that
//!   flushes and refills the changed Service's chains and removes the stale endpoint chain.
//!
//! Chain names carry a hash of the Service port (and endpoint) in kube-proxy's format;
//! the hash function itself is this module's own.
use std::{
    fmt::Write as _,
    hash::{DefaultHasher, Hash, Hasher},
    net::Ipv4Addr,
};

/// kube-proxy's masquerade mark bit.
const MASQ_MARK: &str = "0x4000";

/// One Service port as kube-proxy sees it: a ClusterIP frontend and its ready endpoints.
#[derive(Debug, Clone)]
pub struct ServicePort {
    /// `namespace/name`.
    pub service: String,
    /// The port's name.
    pub port_name: String,
    /// `tcp` or `udp`.
    pub proto: &'static str,
    /// The ClusterIP.
    pub cluster_ip: Ipv4Addr,
    /// The Service port.
    pub port: u16,
    /// The endpoints' port.
    pub target_port: u16,
    /// Ready endpoint addresses.
    pub endpoints: Vec<Ipv4Addr>,
}

impl ServicePort {
    /// `namespace/name:port`, kube-proxy's ServicePortName string.
    fn port_name_string(&self) -> String {
        format!("{}:{}", self.service, self.port_name)
    }

    fn svc_chain(&self) -> String {
        format!(
            "KUBE-SVC-{}",
            hash16(&[&self.port_name_string(), self.proto])
        )
    }

    fn sep_chain(&self, ep: Ipv4Addr) -> String {
        let endpoint = format!("{ep}:{}", self.target_port);
        format!(
            "KUBE-SEP-{}",
            hash16(&[&self.port_name_string(), self.proto, &endpoint])
        )
    }

    /// `namespace/name/proto/portname`, the readable half of an nftables chain name.
    fn nft_id(&self) -> String {
        format!("{}/{}/{}", self.service, self.proto, self.port_name)
    }

    fn nft_service_chain(&self) -> String {
        let id = self.nft_id();
        format!("service-{}-{id}", hash8(&id))
    }

    fn nft_endpoint_chain(&self, ep: Ipv4Addr) -> String {
        let id = format!("{}__{ep}/{}", self.nft_id(), self.target_port);
        format!("endpoint-{}-{id}", hash8(&id))
    }
}

/// 16 base32 characters of a hash of `parts`: the suffix of `KUBE-SVC-`/`KUBE-SEP-` names.
fn hash16(parts: &[&str]) -> String {
    base32(hash(parts, 0), hash(parts, 1), 16)
}

/// 8 base32 characters, for nftables chain names.
fn hash8(id: &str) -> String {
    base32(hash(&[id], 0), 0, 8)
}

fn hash(parts: &[&str], seed: u64) -> u64 {
    let mut h = DefaultHasher::new();
    seed.hash(&mut h);
    parts.hash(&mut h);
    h.finish()
}

fn base32(a: u64, b: u64, chars: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let bits = (u128::from(a) << 64) | u128::from(b);
    (0..chars)
        .map(|i| char::from(ALPHABET[((bits >> (123 - 5 * i)) & 31) as usize]))
        .collect()
}

/// The jumps from the built-in chains into kube-proxy's chains, which kube-proxy inserts
/// once (`iptables -I`) rather than restores.
pub fn iptables_jumps() -> String {
    "*filter\n\
     :KUBE-FORWARD - [0:0]\n\
     :KUBE-SERVICES - [0:0]\n\
     -I FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
     -I FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     COMMIT\n\
     *nat\n\
     :KUBE-SERVICES - [0:0]\n\
     :KUBE-POSTROUTING - [0:0]\n\
     -I PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -I OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -I POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
     COMMIT\n"
        .to_owned()
}

/// A full iptables sync: every chain and rule for `ports`. Clients outside `pod_cidr`
/// are masqueraded, as kube-proxy does with a cluster CIDR configured.
pub fn iptables_full(ports: &[ServicePort], pod_cidr: &str) -> String {
    iptables_sync(ports, pod_cidr, None)
}

/// A partial iptables sync after the endpoints of `ports[changed]` changed: the fixed
/// chains and `KUBE-SERVICES` in full, the changed Service's chains, and `-X` for
/// `stale` endpoint chains (the `KUBE-SEP-` names [`iptables_sep_chains`] gave before).
pub fn iptables_partial(
    ports: &[ServicePort],
    pod_cidr: &str,
    changed: usize,
    stale: &[String],
) -> String {
    iptables_sync(ports, pod_cidr, Some((changed, stale)))
}

/// The `KUBE-SEP-` chain names of one Service port.
pub fn iptables_sep_chains(port: &ServicePort) -> Vec<String> {
    port.endpoints
        .iter()
        .map(|&ep| port.sep_chain(ep))
        .collect()
}

fn iptables_sync(
    ports: &[ServicePort],
    pod_cidr: &str,
    partial: Option<(usize, &[String])>,
) -> String {
    let mut s = String::with_capacity(ports.len() * 3_000 + 4_096);
    s.push_str(
        "*filter\n\
         :KUBE-SERVICES - [0:0]\n\
         :KUBE-EXTERNAL-SERVICES - [0:0]\n\
         :KUBE-FORWARD - [0:0]\n\
         :KUBE-NODEPORTS - [0:0]\n\
         :KUBE-PROXY-FIREWALL - [0:0]\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
    );
    let _ = writeln!(
        s,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n\
         *nat\n\
         :KUBE-SERVICES - [0:0]\n\
         :KUBE-NODEPORTS - [0:0]\n\
         :KUBE-POSTROUTING - [0:0]\n\
         :KUBE-MARK-MASQ - [0:0]"
    );
    let written: Vec<usize> = match partial {
        None => (0..ports.len()).collect(),
        Some((changed, _)) => vec![changed],
    };
    for &i in &written {
        let p = &ports[i];
        let _ = writeln!(s, ":{} - [0:0]", p.svc_chain());
        for &ep in &p.endpoints {
            let _ = writeln!(s, ":{} - [0:0]", p.sep_chain(ep));
        }
    }
    // A stale chain is declared (which flushes it) before it is deleted.
    if let Some((_, stale)) = partial {
        for chain in stale {
            let _ = writeln!(s, ":{chain} - [0:0]");
        }
    }
    let _ = writeln!(
        s,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"
    );
    // KUBE-SERVICES is rewritten whole on every sync, partial or not.
    for p in ports {
        let _ = writeln!(
            s,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m {proto} -p {proto} -d {}/32 --dport {} -j {}",
            p.port_name_string(),
            p.cluster_ip,
            p.port,
            p.svc_chain(),
            proto = p.proto,
        );
    }
    s.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    for &i in &written {
        let p = &ports[i];
        let name = p.port_name_string();
        let svc = p.svc_chain();
        let _ = writeln!(
            s,
            "-A {svc} -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {}/32 --dport {} ! -s {pod_cidr} -j KUBE-MARK-MASQ",
            p.cluster_ip,
            p.port,
            proto = p.proto,
        );
        let n = p.endpoints.len();
        for (k, &ep) in p.endpoints.iter().enumerate() {
            let _ = write!(
                s,
                "-A {svc} -m comment --comment \"{name} -> {ep}:{}\"",
                p.target_port
            );
            if k + 1 < n {
                let _ = write!(
                    s,
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / (n - k) as f64
                );
            }
            let _ = writeln!(s, " -j {}", p.sep_chain(ep));
        }
        // Each chain's rules together, as kube-proxy writes them.
        for &ep in &p.endpoints {
            let sep = p.sep_chain(ep);
            let _ = writeln!(
                s,
                "-A {sep} -m comment --comment \"{name}\" -s {ep}/32 -j KUBE-MARK-MASQ\n\
                 -A {sep} -m comment --comment \"{name}\" -m {proto} -p {proto} -j DNAT --to-destination {ep}:{}",
                p.target_port,
                proto = p.proto,
            );
        }
    }
    if let Some((_, stale)) = partial {
        for chain in stale {
            let _ = writeln!(s, "-X {chain}");
        }
    }
    s.push_str("COMMIT\n");
    s
}

const NFT_TABLE: &str = "ip kube-proxy";

/// A full nftables sync: the table with its fixed chains, maps and sets, then every
/// Service port's chains and map elements.
pub fn nft_full(ports: &[ServicePort], pod_cidr: &str) -> String {
    let t = NFT_TABLE;
    let mut s = String::with_capacity(ports.len() * 3_000 + 4_096);
    let _ = writeln!(
        s,
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}\n\
         add chain {t} mark-for-masquerade\n\
         add rule {t} mark-for-masquerade mark set mark or {MASQ_MARK}\n\
         add chain {t} masquerading\n\
         add rule {t} masquerading mark and {MASQ_MARK} == 0 return\n\
         add rule {t} masquerading mark set mark xor {MASQ_MARK}\n\
         add rule {t} masquerading masquerade fully-random\n\
         add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}\n\
         add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}\n\
         add chain {t} services\n\
         add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add chain {t} service-endpoints-check\n\
         add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\
         add chain {t} filter-forward {{ type filter hook forward priority -110 ; }}\n\
         add rule {t} filter-forward ct state new jump service-endpoints-check\n\
         add chain {t} filter-output {{ type filter hook output priority -110 ; }}\n\
         add rule {t} filter-output ct state new jump service-endpoints-check\n\
         add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n\
         add rule {t} nat-prerouting jump services\n\
         add chain {t} nat-output {{ type nat hook output priority -100 ; }}\n\
         add rule {t} nat-output jump services\n\
         add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}\n\
         add rule {t} nat-postrouting jump masquerading"
    );
    for p in ports {
        nft_service(&mut s, p, pod_cidr, false);
        let _ = writeln!(
            s,
            "add element {t} cluster-ips {{ {} }}\n\
             add element {t} service-ips {{ {} . {} . {} : goto {} }}",
            p.cluster_ip,
            p.cluster_ip,
            p.proto,
            p.port,
            p.nft_service_chain()
        );
    }
    s
}

/// The `endpoint-` chain names of one Service port.
pub fn nft_endpoint_chains(port: &ServicePort) -> Vec<String> {
    port.endpoints
        .iter()
        .map(|&ep| port.nft_endpoint_chain(ep))
        .collect()
}

/// A partial nftables sync after the endpoints of `port` changed: one transaction that
/// refills its Service chain and endpoint chains and deletes the `stale` endpoint chains.
pub fn nft_partial(port: &ServicePort, pod_cidr: &str, stale: &[String]) -> String {
    let t = NFT_TABLE;
    let mut s = format!("add table {t} {{ comment \"rules for kube-proxy\" ; }}\n");
    nft_service(&mut s, port, pod_cidr, true);
    for chain in stale {
        let _ = writeln!(s, "flush chain {t} {chain}\ndelete chain {t} {chain}");
    }
    s
}

fn nft_service(s: &mut String, p: &ServicePort, pod_cidr: &str, flush: bool) {
    let t = NFT_TABLE;
    let svc = p.nft_service_chain();
    let endpoints = nft_endpoint_chains(p);
    for (chain, &ep) in endpoints.iter().zip(&p.endpoints) {
        let _ = writeln!(s, "add chain {t} {chain}");
        if flush {
            let _ = writeln!(s, "flush chain {t} {chain}");
        }
        let _ = writeln!(
            s,
            "add rule {t} {chain} ip saddr {ep} jump mark-for-masquerade\n\
             add rule {t} {chain} meta l4proto {} dnat to {ep}:{}",
            p.proto, p.target_port
        );
    }
    let _ = writeln!(s, "add chain {t} {svc}");
    if flush {
        let _ = writeln!(s, "flush chain {t} {svc}");
    }
    let _ = writeln!(
        s,
        "add rule {t} {svc} ip daddr {} {} dport {} ip saddr != {pod_cidr} jump mark-for-masquerade",
        p.cluster_ip, p.proto, p.port
    );
    let arms: Vec<String> = endpoints
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{i} : goto {c}"))
        .collect();
    let _ = writeln!(
        s,
        "add rule {t} {svc} numgen random mod {} vmap {{ {} }}",
        arms.len(),
        arms.join(", ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(endpoints: usize) -> ServicePort {
        ServicePort {
            service: "bench/web".into(),
            port_name: "http".into(),
            proto: "tcp",
            cluster_ip: Ipv4Addr::new(10, 96, 0, 1),
            port: 80,
            target_port: 8080,
            endpoints: (0..endpoints)
                .map(|i| Ipv4Addr::new(10, 128, 0, i as u8 + 1))
                .collect(),
        }
    }

    #[test]
    fn iptables_picks_endpoints_with_falling_probabilities() {
        let rules = iptables_full(&[port(3)], "10.201.0.0/16");
        let probabilities: Vec<&str> = rules
            .lines()
            .filter_map(|l| l.split("--probability ").nth(1))
            .map(|rest| rest.split_whitespace().next().unwrap_or(""))
            .collect();
        assert_eq!(probabilities, ["0.3333333333", "0.5000000000"]);
        assert_eq!(rules.matches("-j DNAT --to-destination").count(), 3);
        assert!(rules.contains("! -s 10.201.0.0/16 -j KUBE-MARK-MASQ"));
    }

    #[test]
    fn chain_names_have_kube_proxy_form() {
        let p = port(1);
        let svc = p.svc_chain();
        assert_eq!(svc.len(), "KUBE-SVC-".len() + 16);
        assert!(
            svc["KUBE-SVC-".len()..]
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        );
        assert_ne!(
            p.sep_chain(p.endpoints[0]),
            p.sep_chain(Ipv4Addr::new(10, 0, 0, 9))
        );
        assert!(p.nft_service_chain().ends_with("-bench/web/tcp/http"));
    }

    #[test]
    fn partial_syncs_rewrite_only_the_changed_service() {
        let ports = [port(2), {
            let mut p = port(2);
            p.service = "bench/other".into();
            p
        }];
        let partial = iptables_partial(&ports, "10.201.0.0/16", 1, &["KUBE-SEP-OLD".into()]);
        assert_eq!(partial.matches("-A KUBE-SERVICES ").count(), 3);
        assert_eq!(partial.matches("-j DNAT").count(), 2);
        assert!(partial.contains("-X KUBE-SEP-OLD"));
        let nft = nft_partial(&ports[1], "10.201.0.0/16", &["endpoint-OLD".into()]);
        assert_eq!(nft.matches("dnat to").count(), 2);
        assert!(nft.contains("delete chain ip kube-proxy endpoint-OLD"));
    }
}
