//! kube-proxy's control plane on the same workloads: the time `iptables-restore` and
//! `nft -f` take to load kube-proxy-shaped payloads ([`crate::bench_rules`]) for N
//! Services x 10 endpoints, for a full sync and for a partial sync after one endpoint
//! changed. Each tool gets a fresh throwaway network namespace per size, removed after.
//! Only the kernel load through the tool is timed (as kube-proxy execs it each sync);
//! kube-proxy's own work to compute the payload comes on top and is not counted.
use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use tests::netns::NetNs;

use crate::{
    bench::pod_ip,
    bench_net::{POD_CIDR, TimedOut, load_in, other_ports},
    bench_rules,
};

/// One tool at one size; `None`: the load did not finish within the limit.
pub struct KpRow {
    /// Number of Services.
    pub services: usize,
    /// iptables-nft-restore (nf_tables backend), full sync, ms.
    pub iptables_full_ms: Option<f64>,
    /// iptables-nft-restore, partial sync after one endpoint change: median ms.
    pub iptables_change_ms: Option<f64>,
    /// iptables-legacy-restore (x_tables backend), full sync, ms.
    pub legacy_full_ms: Option<f64>,
    /// iptables-legacy-restore, partial sync: median ms.
    pub legacy_change_ms: Option<f64>,
    /// nft -f, full sync, ms.
    pub nft_full_ms: Option<f64>,
    /// nft -f, partial transaction after one endpoint change: median ms.
    pub nft_change_ms: Option<f64>,
}

/// A payload file, removed on drop.
struct Payload(PathBuf);

impl Payload {
    fn new(tag: &str, text: &str) -> Result<Self> {
        let p = std::env::temp_dir().join(format!("lbbench-{}-{tag}", std::process::id()));
        std::fs::write(&p, text)?;
        Ok(Self(p))
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// A result, or `None` when the load overran its limit or failed.
fn limited(r: Result<Duration>) -> Result<Option<f64>> {
    match r {
        Ok(d) => Ok(Some(ms(d))),
        Err(e) if e.downcast_ref::<TimedOut>().is_some() => Ok(None),
        // The tool refused the load at this size (iptables-legacy's table size limit).
        Err(e) => {
            println!("control-plane: {e:#}");
            Ok(None)
        }
    }
}

/// Measures the three tools at each size. A tool that overran the limit at one size is
/// not run at the larger ones (reported as overrunning there too).
pub fn run(sizes: &[usize], changes: usize, limit: Duration) -> Result<Vec<KpRow>> {
    let mut rows = Vec::new();
    let mut gave_up = [false; 3];
    for &n in sizes {
        println!("control-plane (kube-proxy payloads): {n} Services x 10 endpoints");
        let mut measure = |k: usize, f: &dyn Fn() -> Result<(Option<f64>, Option<f64>)>| {
            if gave_up[k] {
                return Ok((None, None));
            }
            let r = f()?;
            gave_up[k] = r.0.is_none();
            Ok::<_, anyhow::Error>(r)
        };
        let (iptables_full_ms, iptables_change_ms) =
            measure(0, &|| iptables(n, changes, limit, "iptables-nft-restore"))?;
        let (legacy_full_ms, legacy_change_ms) = measure(1, &|| {
            iptables(n, changes, limit, "iptables-legacy-restore")
        })?;
        let (nft_full_ms, nft_change_ms) = measure(2, &|| nft(n, changes, limit))?;
        rows.push(KpRow {
            services: n,
            iptables_full_ms,
            iptables_change_ms,
            legacy_full_ms,
            legacy_change_ms,
            nft_full_ms,
            nft_change_ms,
        });
    }
    Ok(rows)
}

fn throwaway_ns(tool: &str) -> NetNs {
    NetNs::new(&format!("lbbench-{}-{tool}", std::process::id()))
}

/// Which Service the `c`-th change touches, and its new generation.
fn change(c: usize, n: usize) -> (usize, u32) {
    ((c * 7919) % n, c as u32 % 3 + 1)
}

fn iptables(
    n: usize,
    changes: usize,
    limit: Duration,
    restore: &str,
) -> Result<(Option<f64>, Option<f64>)> {
    let restore = [restore, "-w", "5", "--noflush"];
    let ns = throwaway_ns(restore[0]);
    let mut ports = other_ports(n);
    let jumps = Payload::new("jumps", &bench_rules::iptables_jumps())?;
    load_in(&ns, &restore, &jumps.0, Some(limit))?;
    let full = Payload::new("full", &bench_rules::iptables_full(&ports, POD_CIDR))?;
    let Some(full_ms) = limited(load_in(&ns, &restore, &full.0, Some(limit)))? else {
        return Ok((None, None));
    };
    drop(full);
    let mut times = Vec::new();
    for c in 0..changes {
        let (i, generation) = change(c, n);
        let before = bench_rules::iptables_sep_chains(&ports[i]);
        ports[i].endpoints[0] = pod_ip(i, 0, generation);
        let after = bench_rules::iptables_sep_chains(&ports[i]);
        let stale: Vec<String> = before.into_iter().filter(|c| !after.contains(c)).collect();
        let partial = Payload::new(
            "partial",
            &bench_rules::iptables_partial(&ports, POD_CIDR, i, &stale),
        )?;
        match limited(load_in(&ns, &restore, &partial.0, Some(limit)))? {
            Some(t) => times.push(t),
            None => break,
        }
    }
    Ok((Some(full_ms), median(times)))
}

fn nft(n: usize, changes: usize, limit: Duration) -> Result<(Option<f64>, Option<f64>)> {
    const NFT: [&str; 3] = ["nft", "-f", "-"];
    let ns = throwaway_ns("nft");
    let mut ports = other_ports(n);
    let full = Payload::new("full", &bench_rules::nft_full(&ports, POD_CIDR))?;
    let Some(full_ms) = limited(load_in(&ns, &NFT, &full.0, Some(limit)))? else {
        return Ok((None, None));
    };
    drop(full);
    let mut times = Vec::new();
    for c in 0..changes {
        let (i, generation) = change(c, n);
        let before = bench_rules::nft_endpoint_chains(&ports[i]);
        ports[i].endpoints[0] = pod_ip(i, 0, generation);
        let after = bench_rules::nft_endpoint_chains(&ports[i]);
        let stale: Vec<String> = before.into_iter().filter(|c| !after.contains(c)).collect();
        let partial = Payload::new(
            "partial",
            &bench_rules::nft_partial(&ports[i], POD_CIDR, &stale),
        )?;
        match limited(load_in(&ns, &NFT, &partial.0, Some(limit)))? {
            Some(t) => times.push(t),
            None => break,
        }
    }
    Ok((Some(full_ms), median(times)))
}
