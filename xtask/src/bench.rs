//! `cargo xtask bench`: what the datapath costs per packet and what the control plane
//! costs per sync, measured against the real kernel.
//!
//! - datapath-cost: the loaded programs run on crafted frames through `BPF_PROG_TEST_RUN`
//!   with N Services × 10 endpoints in the maps; the kernel reports the run time of each
//!   call. New flows need a fresh 5-tuple each (one call per frame), so every case is
//!   measured the same way: many single runs, median and 99th percentile.
//! - control-plane: N Services × 10 endpoints as Kubernetes objects -> desired state ->
//!   the real BPF maps; the time of the full initial sync, of one endpoint change (from
//!   the changed objects to the maps) through the incremental path and, for comparison,
//!   through a full recompute, and the agent-side memory; beside it, the time kube-proxy's
//!   iptables and nftables payloads take to load for the same Services (`bench_kp`).
//! - datapath: one Service over real TCP and UDP connections in network namespaces,
//!   direct vs kube-proxy's iptables and nftables rules vs lb's TC programs, with other
//!   Services loaded (`bench_net`).
//!
//! The machine is shared: the numbers are medians over many runs, and the report keeps
//! the spread. Results go to `results/bench.md` (with PNG plots beside it) and stdout.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::programs::{TestRun, TestRunOptions};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_agent::{
    apply::Applier,
    datapath::{self, Datapath, EGRESS_PROG, INGRESS_PROG, MapSizes},
    frames::frame,
    model::{self, NodeContext, Objects},
    services::CompactService,
    slices::CompactSlice,
    state::{DesiredCache, Tracker, Update},
};
use lb_common::proto;
use serde_json::json;

use crate::{
    bench_kp,
    bench_net::{self, NetPlan, Test, Variant},
    bench_plot,
    bench_profile::{CaseProfile, Part, Profiler, ProgramSize, Samples, program_size},
};

/// Which measurements, at which sizes.
pub struct Plan {
    /// Numbers of Services for the datapath cost.
    pub datapath_sizes: Vec<usize>,
    /// Numbers of Services for the control plane.
    pub control_sizes: Vec<usize>,
    /// Single runs per datapath case.
    pub runs: usize,
    /// The profile pass after each datapath case's timed runs.
    pub profile: Duration,
    /// Endpoint changes timed per size.
    pub changes: usize,
    /// The datapath comparison over real connections.
    pub net: NetPlan,
    /// Partial syncs timed per size for kube-proxy's payloads.
    pub kp_changes: usize,
    /// Longest a kube-proxy payload load may take before it is reported as too slow.
    pub kp_limit: Duration,
}

impl Plan {
    /// Seconds, for the test suite: small sizes, few runs.
    pub fn quick() -> Self {
        Self {
            datapath_sizes: vec![1, 1_000],
            control_sizes: vec![1_000],
            runs: 2_000,
            profile: Duration::from_millis(250),
            changes: 20,
            net: NetPlan::quick(),
            kp_changes: 3,
            kp_limit: Duration::from_secs(60),
        }
    }

    /// The full run with fewer sizes and rounds (about a quarter of an hour).
    pub fn medium() -> Self {
        Self {
            net: NetPlan::medium(),
            kp_limit: Duration::from_secs(30),
            ..Self::full()
        }
    }

    /// The documented full run.
    pub fn full() -> Self {
        Self {
            datapath_sizes: vec![1, 10_000, 100_000],
            control_sizes: vec![1_000, 10_000, 30_000, 100_000],
            runs: 20_000,
            profile: Duration::from_secs(2),
            changes: 50,
            net: NetPlan::full(),
            kp_changes: 5,
            kp_limit: Duration::from_secs(60),
        }
    }
}

pub(crate) const ENDPOINTS: usize = 10;
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);

/// ClusterIP of Service `i`: 10.96.0.0/12 has room for a million.
pub(crate) fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i as u32 + 1)
}

/// Pod IP of endpoint `e` of Service `i` (10.128.0.0/9), shifted by `generation` so a
/// change can move one endpoint to a new address.
pub(crate) fn pod_ip(i: usize, e: usize, generation: u32) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::from(Ipv4Addr::new(10, 128, 0, 0))
            + (i * ENDPOINTS + e) as u32
            + generation * 0x0040_0000,
    )
}

pub(crate) fn objects(n: usize) -> Result<Objects> {
    let mut o = Objects::default();
    for i in 0..n {
        let name = format!("svc-{i}");
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "bench"},
            "spec": {"clusterIP": cluster_ip(i).to_string(),
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
        }))?;
        o.services.insert(
            ("bench".into(), name.clone()),
            Arc::new(CompactService::from(&svc)),
        );
        o.endpoint_slices
            .insert(("bench".into(), format!("{name}-1")), compact(slice(i, 0)?));
    }
    Ok(o)
}

/// A slice in the form the agent keeps, as both sources hand it over.
pub(crate) fn compact(slice: EndpointSlice) -> Arc<CompactSlice> {
    Arc::new(CompactSlice::from(&slice))
}

fn slice(i: usize, generation: u32) -> Result<EndpointSlice> {
    let endpoints: Vec<_> = (0..ENDPOINTS)
        .map(|e| {
            // Endpoint 0 carries the change generation.
            let g = if e == 0 { generation } else { 0 };
            json!({"addresses": [pod_ip(i, e, g).to_string()], "conditions": {"ready": true}})
        })
        .collect();
    Ok(serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i}-1"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    }))?)
}

pub(crate) fn sizes_for(n: usize) -> MapSizes {
    // Head + slots per frontend, one address marker per Service, plus headroom.
    let entries = (n * (ENDPOINTS + 2) + 4096) as u32;
    MapSizes {
        services: entries,
        backends: entries,
        ct: 262_144,
        affinity: 4_096,
        ..MapSizes::default()
    }
}

/// A loaded datapath in a private pin directory, removed on drop.
struct Loaded {
    dp: Datapath,
    maps: datapath::BpfMaps,
    _pins: PinDir,
}

/// A private pin directory under bpffs, removed on drop — including when loading into it
/// failed half-way.
pub(crate) struct PinDir(pub(crate) PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Loaded {
    fn new(n: usize) -> Result<Self> {
        let root = PathBuf::from(format!("/sys/fs/bpf/lb-bench-{}-{n}", std::process::id()));
        let pins = PinDir(root.clone());
        datapath::prepare(&root)?;
        let mut dp = Datapath::load_sized(&root, None, &sizes_for(n))?;
        let maps = dp.service_maps()?;
        Ok(Self {
            dp,
            maps,
            _pins: pins,
        })
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

fn summary(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (percentile(&v, 0.5), percentile(&v, 0.99))
}

/// Kernel-reported run time of one program call on `frame`, in ns.
fn run_once(dp: &Datapath, prog: &str, data: &[u8]) -> Result<f64> {
    let p = dp.program(prog).context("program")?;
    let mut out = vec![0u8; 256];
    let r = p.test_run(TestRunOptions {
        data_in: Some(data),
        data_out: Some(&mut out),
        ..Default::default()
    })?;
    Ok(r.duration.as_nanos() as f64)
}

struct DatapathRow {
    services: usize,
    case: &'static str,
    p50: f64,
    p99: f64,
    profile: CaseProfile,
}

/// The datapath-cost measurements: a row per size and case, the programs' sizes, and the
/// profiler with what it could not measure.
struct DatapathCost {
    rows: Vec<DatapathRow>,
    sizes: Vec<ProgramSize>,
    profiler: Profiler,
    /// The size at which `perf record` sampled each case.
    sampled_at: Option<usize>,
}

/// New flows profiled per pass at most, so that the CT map (262,144 entries, two per
/// flow, after the timed runs' flows) does not fill and start evicting mid-pass.
const PROFILE_NEW_FLOWS: usize = 100_000;

/// Source of new flow `k`: a fresh source port (and, past 60k, a fresh source address).
fn new_flow_source(k: usize) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::from(u32::from(CLIENT) + (k / 60_000) as u32),
        1024 + (k % 60_000) as u16,
    )
}

fn datapath_cost(plan: &Plan) -> Result<DatapathCost> {
    let mut rows = Vec::new();
    let mut sizes = Vec::new();
    let mut profiler = Profiler::new(plan.profile);
    // perf's samples are read per case at one size: the largest.
    let sampled_at = plan.datapath_sizes.last().copied();
    for &n in &plan.datapath_sizes {
        println!("datapath-cost: {n} Services x {ENDPOINTS} endpoints");
        let mut l = Loaded::new(n)?;
        if sizes.is_empty() {
            sizes = vec![
                program_size(&l.dp, INGRESS_PROG)?,
                program_size(&l.dp, EGRESS_PROG)?,
            ];
        }
        let desired = model::desired_state(&objects(n)?, &NodeContext::default());
        Applier::new().sync(&desired, &mut l.maps)?;
        let vip = cluster_ip(n / 2);
        let runs = plan.runs;
        let sample = sampled_at == Some(n);
        let new_flow_frame = |k: usize| frame(proto::TCP, new_flow_source(k), (vip, 80), 0x02);
        let mut new_flow = Vec::with_capacity(runs);
        for k in 0..runs {
            new_flow.push(run_once(&l.dp, INGRESS_PROG, &new_flow_frame(k))?);
        }
        let (p50, p99) = summary(new_flow);
        // The profile pass goes on with flows the timed runs have not used.
        let profile = profiler.pass(&l.dp, INGRESS_PROG, sample, |k| {
            if k >= PROFILE_NEW_FLOWS {
                return Ok(false);
            }
            run_once(&l.dp, INGRESS_PROG, &new_flow_frame(runs + k))?;
            Ok(true)
        })?;
        rows.push(DatapathRow {
            services: n,
            case: "new flow (SYN, DNAT)",
            p50,
            p99,
            profile,
        });
        // The same program on the same frame, `runs` times, then the profile pass.
        let mut same_frame = |case: &'static str, prog: &str, data: &[u8]| -> Result<DatapathRow> {
            let times: Vec<f64> = (0..runs)
                .map(|_| run_once(&l.dp, prog, data))
                .collect::<Result<_>>()?;
            let (p50, p99) = summary(times);
            let profile = profiler.pass(&l.dp, prog, sample, |_| {
                run_once(&l.dp, prog, data)?;
                Ok(true)
            })?;
            Ok(DatapathRow {
                services: n,
                case,
                p50,
                p99,
                profile,
            })
        };
        let client = new_flow_source(0);
        let established_frame = frame(proto::TCP, client, (vip, 80), 0x10);
        rows.push(same_frame(
            "established (DNAT)",
            INGRESS_PROG,
            &established_frame,
        )?);
        // The reply of flow 0 comes from whichever backend it got: find it by asking.
        let p = l.dp.program(INGRESS_PROG).context("program")?;
        let mut out = vec![0u8; 256];
        p.test_run(TestRunOptions {
            data_in: Some(&established_frame),
            data_out: Some(&mut out),
            ..Default::default()
        })?;
        let backend = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        let reply = frame(proto::TCP, (backend, 8080), client, 0x10);
        rows.push(same_frame("reply (reverse NAT)", EGRESS_PROG, &reply)?);
        let other = frame(proto::TCP, client, (Ipv4Addr::new(10, 250, 0, 1), 80), 0x10);
        rows.push(same_frame("not a Service (pass)", INGRESS_PROG, &other)?);
    }
    Ok(DatapathCost {
        rows,
        sizes,
        profiler,
        sampled_at,
    })
}

struct ControlRow {
    services: usize,
    model_ms: f64,
    cache_ms: f64,
    apply_ms: f64,
    writes: usize,
    /// One change from the source's update to the maps, as the agent does it: p50, p99.
    change_ms: (f64, f64),
    /// One change through `desired_state` and the full `sync`: p50, p99.
    full_change_ms: (f64, f64),
    change_writes: usize,
    /// Resident memory with the agent's state (objects, cache, applier) after the
    /// incremental changes, before any full recompute.
    rss_mib: f64,
    /// Peak resident memory of the whole run (the full recomputes included).
    peak_rss_mib: f64,
}

/// A `/proc/self/status` memory figure (`VmRSS`, `VmHWM`), in MiB.
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Full recomputes timed per size, for comparison with the incremental path.
const FULL_RECOMPUTE_RUNS: usize = 20;

fn control_plane(plan: &Plan) -> Result<Vec<ControlRow>> {
    let mut rows = Vec::new();
    for &n in &plan.control_sizes {
        println!("control-plane: {n} Services x {ENDPOINTS} endpoints");
        let mut l = Loaded::new(n)?;
        // The objects as the API source hands them over: two whole lists.
        let all = objects(n)?;
        let mut tracker = Tracker::default();
        tracker.apply(Update::Services(all.services));
        tracker.apply(Update::EndpointSlices(all.endpoint_slices));
        tracker.take_changes();
        let rss_objects = status_mib("VmRSS");
        let started = Instant::now();
        let (mut cache, _) = DesiredCache::build(tracker.objects(), NodeContext::default());
        let cache_time = started.elapsed();
        let rss_cache = status_mib("VmRSS");
        let mut applier = Applier::new();
        let started = Instant::now();
        let stats = applier.sync_services(cache.services(), &mut l.maps)?;
        let apply_time = started.elapsed();
        anyhow::ensure!(
            stats.failed.is_empty(),
            "initial sync failed: {:?}",
            stats.failed.first()
        );
        eprintln!(
            "control-plane: {n} Services: RSS {rss_objects:.0} MiB with the objects, \
             {rss_cache:.0} MiB with the cache, {:.0} MiB after the initial sync",
            status_mib("VmRSS")
        );
        // One endpoint of one Service moves to a new address: from the source's update
        // (one EndpointSlice, as a watch event brings it) to the maps, as the agent does
        // it — the tracker notes the changed key, the cache recomputes that Service, and
        // only its frontends are diffed and written.
        let mut incremental = Vec::with_capacity(plan.changes);
        let mut change_writes = 0;
        let change = |c: usize| -> Result<Update> {
            let i = (c * 7919) % n;
            let key = ("bench".to_owned(), format!("svc-{i}-1"));
            Ok(Update::EndpointSlice(
                key,
                Some(compact(slice(i, c as u32 % 3 + 1)?)),
            ))
        };
        for c in 0..plan.changes {
            let update = change(c)?;
            let started = Instant::now();
            tracker.apply(update);
            let (changed, _) = tracker.take_changes();
            let delta = cache.update(tracker.objects(), &changed);
            let stats = applier.sync_frontends(cache.services(), delta.frontends(), &mut l.maps)?;
            incremental.push(started.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(stats.failed.is_empty(), "change failed: {:?}", stats.failed);
            change_writes = stats.writes + stats.deletes;
        }
        let rss = status_mib("VmRSS");
        // For comparison, what every change would cost without the cache: the desired
        // state of every Service recomputed and every frontend diffed against the maps.
        let started = Instant::now();
        let desired = model::desired_state(tracker.objects(), &NodeContext::default());
        let model_time = started.elapsed();
        drop(desired);
        // Each full recompute costs seconds at 100k Services: a few are enough.
        let full_runs = plan.changes.min(FULL_RECOMPUTE_RUNS);
        let mut full = Vec::with_capacity(full_runs);
        for c in plan.changes..plan.changes + full_runs {
            tracker.apply(change(c)?);
            let (changed, _) = tracker.take_changes();
            let started = Instant::now();
            let desired = model::desired_state(tracker.objects(), &NodeContext::default());
            let stats = applier.sync(&desired, &mut l.maps)?;
            full.push(started.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(stats.failed.is_empty(), "change failed: {:?}", stats.failed);
            // Keep the cache current (untimed); the maps already are.
            cache.update(tracker.objects(), &changed);
        }
        rows.push(ControlRow {
            services: n,
            model_ms: ms(model_time),
            cache_ms: ms(cache_time),
            apply_ms: ms(apply_time),
            writes: stats.writes,
            change_ms: summary(incremental),
            full_change_ms: summary(full),
            change_writes,
            rss_mib: rss,
            peak_rss_mib: status_mib("VmHWM"),
        });
    }
    Ok(rows)
}

/// Hidden entry point: measures one control-plane size in this (child) process and prints
/// the row as JSON, so that the memory figure belongs to that size alone.
pub fn control_one(services: usize, changes: usize) -> Result<()> {
    let plan = Plan {
        datapath_sizes: Vec::new(),
        control_sizes: vec![services],
        runs: 0,
        profile: Duration::ZERO,
        changes,
        net: NetPlan::quick(),
        kp_changes: 0,
        kp_limit: Duration::ZERO,
    };
    let r = control_plane(&plan)?.pop().context("no row")?;
    println!(
        "{}",
        json!([
            r.services,
            r.model_ms,
            r.cache_ms,
            r.apply_ms,
            r.writes,
            r.change_ms.0,
            r.change_ms.1,
            r.full_change_ms.0,
            r.full_change_ms.1,
            r.change_writes,
            r.rss_mib,
            r.peak_rss_mib
        ])
    );
    Ok(())
}

/// Each size in a child process (`xtask bench-control-one`), for a clean memory figure.
fn control_plane_isolated(plan: &Plan) -> Result<Vec<ControlRow>> {
    // /proc/self/exe still runs this binary if a rebuild replaced the file meanwhile.
    let exe = PathBuf::from("/proc/self/exe");
    let mut rows = Vec::new();
    for &n in &plan.control_sizes {
        let out = std::process::Command::new(&exe)
            .args([
                "bench-control-one",
                "--services",
                &n.to_string(),
                "--changes",
                &plan.changes.to_string(),
            ])
            .stderr(std::process::Stdio::inherit())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "control-plane run for {n} Services failed"
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().context("no output")?;
        let v: Vec<serde_json::Value> = serde_json::from_str(line)?;
        let f = |i: usize| {
            v.get(i)
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(f64::NAN)
        };
        rows.push(ControlRow {
            services: f(0) as usize,
            model_ms: f(1),
            cache_ms: f(2),
            apply_ms: f(3),
            writes: f(4) as usize,
            change_ms: (f(5), f(6)),
            full_change_ms: (f(7), f(8)),
            change_writes: f(9) as usize,
            rss_mib: f(10),
            peak_rss_mib: f(11),
        });
    }
    Ok(rows)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Which kinds of measurement a run makes.
#[derive(Debug, Clone, Copy)]
pub struct Kinds {
    /// `BPF_PROG_TEST_RUN` cost per packet.
    pub cost: bool,
    /// Real connections: direct, kube-proxy iptables and nftables, lb.
    pub datapath: bool,
    /// Sync and change latency, lb's and kube-proxy's payload loads.
    pub control: bool,
}

/// Where a run writes: the report and the plots.
pub struct Outputs {
    /// The markdown report.
    pub report: PathBuf,
    /// The datapath plot (PNG).
    pub datapath_png: PathBuf,
    /// The control-plane plot (PNG).
    pub control_png: PathBuf,
    /// The command that reproduces the run, for the report.
    pub command: String,
}

/// A cell: the median of `v` with its spread (half the range, in % of the median).
fn cell(v: &[f64]) -> String {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let Some(&m) = s.get(s.len() / 2) else {
        return "–".into();
    };
    let digits = if m >= 100.0 { 0 } else { 1 };
    if s.len() > 1 && m > 0.0 {
        let half = (s[s.len() - 1] - s[0]) / 2.0 / m * 100.0;
        format!("{m:.digits$} ±{half:.0}%")
    } else {
        format!("{m:.digits$}")
    }
}

fn med(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied()
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "–".into(),
    }
}

fn opt_ms(v: Option<f64>, limit: Duration) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
        None => format!("> {:.0} s", limit.as_secs_f64()),
    }
}

/// The machine line of the report.
fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!(
        "Linux {}, {} CPUs ({cpu}), shared machine",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}

/// Runs the plan and writes the report (and plots).
pub fn run(plan: &Plan, kinds: Kinds, out: &Outputs) -> Result<String> {
    let mut md = String::new();
    writeln!(
        md,
        "# lb benchmark\n\n{}. Reproduce (as root): `{}`.\n",
        machine(),
        out.command
    )?;
    if kinds.cost {
        datapath_cost_section(plan, &mut md)?;
    }
    if kinds.datapath {
        datapath_section(plan, out, &mut md)?;
    }
    if kinds.control {
        control_section(plan, out, &mut md)?;
    }
    if let Some(dir) = out.report.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out.report, &md)?;
    Ok(md)
}

fn datapath_cost_section(plan: &Plan, md: &mut String) -> Result<()> {
    let cost = datapath_cost(plan)?;
    let dp_rows = &cost.rows;
    writeln!(
        md,
        "## Datapath cost per packet (BPF_PROG_TEST_RUN, {} runs per case)\n",
        plan.runs
    )?;
    writeln!(
        md,
        "p50 and p99: the run time `BPF_PROG_TEST_RUN` reports for single runs. Then, per case, a profile pass of {:.2} s or more over the same runs (new flows: fresh ones, at most {PROFILE_NEW_FLOWS}): \
         the kernel's own run statistics (`BPF_ENABLE_STATS`: run count and run time of the program alone), and instructions and cycles per run from \
         `bpftool prog profile id ID duration S cycles instructions` divided by the runs it counted.\n",
        plan.profile.as_secs_f64()
    )?;
    writeln!(
        md,
        "| Services | case | p50 ns | p99 ns | profiled runs | mean ns per run (kernel stats) | instructions per run | cycles per run |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|"
    )?;
    let opt = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), |v| format!("{v:.0}"));
    for r in dp_rows {
        writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {} | {} | {} | {} |",
            r.services,
            r.case,
            r.p50,
            r.p99,
            r.profile.runs,
            opt(r.profile.stats_ns),
            opt(r.profile.instructions),
            opt(r.profile.cycles)
        )?;
    }
    let p = &cost.profiler;
    if let Some(why) = &p.no_counters {
        writeln!(
            md,
            "\nInstructions and cycles: not measured on this machine. {why}."
        )?;
        if let Some(pmu) = &p.no_pmu {
            writeln!(md, "Besides, {pmu}.")?;
        }
    }
    // Flatness: the established-flow cost at the largest size over the smallest.
    let by_case: BTreeMap<(&str, usize), f64> = dp_rows
        .iter()
        .map(|r| ((r.case, r.services), r.p50))
        .collect();
    if let (Some(first), Some(last)) = (plan.datapath_sizes.first(), plan.datapath_sizes.last()) {
        for case in ["new flow (SYN, DNAT)", "established (DNAT)"] {
            if let (Some(a), Some(b)) = (by_case.get(&(case, *first)), by_case.get(&(case, *last)))
            {
                writeln!(
                    md,
                    "\n{case}: {last} Services cost {:.2}x what {first} Service(s) cost.",
                    b / a
                )?;
            }
        }
    }
    writeln!(
        md,
        "\nThe programs as the kernel holds them (the same at every size): instructions after the verifier's rewrites, \
         JITed machine code, and instructions the verifier processed over all paths.\n"
    )?;
    writeln!(
        md,
        "| program | cases | xlated instructions | JITed bytes | verifier-processed instructions |\n|---|---|---:|---:|---:|"
    )?;
    for s in &cost.sizes {
        let cases = if s.name == EGRESS_PROG {
            "reply"
        } else {
            "new flow, established, not a Service"
        };
        let o = |v: Option<u32>| v.map_or_else(|| "–".to_owned(), |v| v.to_string());
        writeln!(
            md,
            "| {} | {cases} | {} | {} | {} |",
            s.name,
            o(s.xlated_insns),
            s.jited_bytes,
            o(s.verified_insns)
        )?;
    }
    if let Some(n) = cost.sampled_at {
        let sampled: Vec<(&str, &Samples)> = dp_rows
            .iter()
            .filter(|r| r.services == n)
            .filter_map(|r| Some((r.case, r.profile.samples.as_ref()?)))
            .collect();
        if !sampled.is_empty() {
            writeln!(
                md,
                "\nWhere a whole test run's time goes at {n} Services: `perf record -e cpu-clock` on the benchmark during each profile pass, \
                 shares of the samples by what the symbol belongs to (JITed program: the program's own code; map code: `htab_*`, `*lru*` and the like; \
                 other helpers: checksum, store, time and random-number helpers; test run + syscall: the rest of the kernel, \
                 i.e. `BPF_PROG_TEST_RUN`'s skb and socket setup, copies and the syscall), and the hottest symbols.\n"
            )?;
            let parts: Vec<&str> = Part::ALL.iter().map(|p| p.name()).collect();
            writeln!(
                md,
                "| case | {} | hottest symbols |\n|---|{}---|",
                parts.join(" % | ") + " %",
                "---:|".repeat(parts.len())
            )?;
            for (case, s) in sampled {
                let shares: Vec<String> = s.parts.iter().map(|v| format!("{v:.0}")).collect();
                let hot: Vec<String> = s
                    .hot
                    .iter()
                    .map(|(sym, share)| format!("`{sym}` {share:.0}%"))
                    .collect();
                writeln!(
                    md,
                    "| {case} | {} | {} |",
                    shares.join(" | "),
                    hot.join(", ")
                )?;
            }
        }
    }
    if let Some(why) = &p.no_samples {
        writeln!(md, "\n`perf record` gave no samples: {why}.")?;
    }
    datapath_cost_reading(dp_rows, md)?;
    writeln!(md)?;
    Ok(())
}

/// What each case does in lb-ebpf, and which costs most at the largest size.
fn datapath_cost_reading(rows: &[DatapathRow], md: &mut String) -> Result<()> {
    writeln!(
        md,
        "\nWhat each case runs (lb-ebpf/src/main.rs and flow.rs): all four parse Ethernet, IPv4 and TCP and count the decision in a per-CPU array. \
         *not a Service*: two `LB4_SERVICES` hash lookups that miss (the frontend, then the address marker that tells a Service IP on a closed port from other traffic). \
         *established*: the frontend lookup, `bpf_ktime_get_ns`, an `LB4_CT` LRU-hash lookup and an `LB4_BACKENDS` lookup to check the flow's backend, \
         then DNAT: three checksum helpers (`l4_csum_replace` for address and port, `l3_csum_replace`) and two `bpf_skb_store_bytes`; \
         the CT entries are rewritten at most once a second. \
         *reply* (egress program): an `LB4_CT` lookup under the reverse key and the same rewrite of the source, no Service or backend lookup. \
         *new flow*: the established path's lookups with a CT miss, then `bpf_get_prandom_u32`, a slot lookup in `LB4_SERVICES`, the backend lookup \
         and two `LB4_CT` inserts (forward and reverse entry: LRU-hash updates, which take an entry from the LRU free lists and lock a bucket), \
         then the same DNAT."
    )?;
    let Some(last) = rows.iter().map(|r| r.services).max() else {
        return Ok(());
    };
    let at: Vec<&DatapathRow> = rows.iter().filter(|r| r.services == last).collect();
    // Rank by instructions when the hardware counted them, else by the kernel's run time.
    let counted = at.iter().all(|r| r.profile.instructions.is_some());
    let (metric, unit) = if counted {
        ("instructions", "instructions")
    } else {
        ("the kernel's mean run time", "ns")
    };
    let value = |r: &DatapathRow| {
        if counted {
            r.profile.instructions
        } else {
            r.profile.stats_ns
        }
    };
    let mut ranked: Vec<(&str, f64)> = at
        .iter()
        .filter_map(|r| Some((r.case, value(r)?)))
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    if let (Some(top), Some(base)) = (ranked.first(), ranked.last())
        && base.1 > 0.0
    {
        let list: Vec<String> = ranked
            .iter()
            .map(|(case, v)| format!("{case} {v:.0} {unit} ({:.1}x)", v / base.1))
            .collect();
        writeln!(
            md,
            "\nAt {last} Services, by {metric} per run: {} — relative to {}. {} costs most.",
            list.join(", "),
            base.0,
            top.0
        )?;
    }
    // What the samples say, where perf took them.
    let sampled: Vec<(&str, &Samples)> = at
        .iter()
        .filter_map(|r| Some((r.case, r.profile.samples.as_ref()?)))
        .collect();
    let share = |s: &Samples, part: Part| {
        Part::ALL
            .iter()
            .position(|&p| p == part)
            .map_or(0.0, |i| s.parts[i])
    };
    let datapath =
        |s: &Samples| share(s, Part::Program) + share(s, Part::Maps) + share(s, Part::Helpers);
    let lo = sampled
        .iter()
        .map(|(_, s)| datapath(s))
        .fold(f64::INFINITY, f64::min);
    let hi = sampled.iter().map(|(_, s)| datapath(s)).fold(0.0, f64::max);
    if let Some((case, s)) = sampled
        .iter()
        .max_by(|a, b| share(a.1, Part::Maps).total_cmp(&share(b.1, Part::Maps)))
    {
        writeln!(
            md,
            "\nIn perf's samples of whole test runs, the program with its map code and helpers takes {lo:.0}–{hi:.0}%; \
             the rest is `BPF_PROG_TEST_RUN`'s own work and the benchmark, which the p50/p99 and the kernel statistics leave out. \
             Map code weighs most in {case} ({:.0}% of its samples, {:.1}x the JITed program's own share).",
            share(s, Part::Maps),
            share(s, Part::Maps) / share(s, Part::Program).max(f64::EPSILON)
        )?;
    }
    Ok(())
}

fn datapath_section(plan: &Plan, out: &Outputs, md: &mut String) -> Result<()> {
    let net = &plan.net;
    let report = bench_net::run(net)?;
    writeln!(
        md,
        "## Datapath over real connections: direct vs kube-proxy (iptables, nftables) vs lb (TC, XDP)\n\n\
         Client namespace -> node namespace -> 2 pod namespaces (veth); one Service (5 ports, both pods as endpoints), \
         with N other Services x {ENDPOINTS} endpoints loaded into each variant; one variant active at a time. \
         each variant in a network of its own, programmed once per size; {} round(s) of {} s per test, variants taking turns in rotated order; cells are the median over rounds ± half the range. \
         Ratios divide medians. Higher is better.\n",
        net.rounds, net.seconds
    )?;
    writeln!(md, "Tools:\n")?;
    for t in Test::ALL {
        writeln!(md, "- {} ({}): {}", t.name(), t.unit(), t.tool())?;
    }
    writeln!(
        md,
        "\nVariants: direct = the pod IP, no translation (client k -> pod k mod 2); iptables = kube-proxy's iptables-mode rules \
         (`{} --noflush`; the nf_tables backend's restore takes minutes at these sizes, see the control-plane table); \
         nftables = kube-proxy's nftables-mode table (nft -f); lb = the TC programs and maps (loader + applier, as lb-agent); \
         lb XDP = the same with the XDP program (as `lb-agent --xdp veth-c*`) on the node's client-side veth, {} mode, \
         in front of the TC programs.\n",
        bench_net::iptables_restore(),
        report.xdp_mode.as_deref().unwrap_or("not attached")
    )?;
    writeln!(
        md,
        "| other Services | test | clients | direct | iptables | nftables | lb | lb XDP | lb / direct | lb / iptables | lb / nftables | lb XDP / direct | lb XDP / iptables | lb XDP / nftables | lb XDP / lb | iptables / direct | nftables / direct |"
    )?;
    writeln!(
        md,
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for &n in &net.sizes {
        for test in Test::ALL {
            for &clients in &net.clients {
                let get = |v: Variant| report.samples.get(&(n, test, clients, v));
                let m = |v: Variant| get(v).and_then(|s| med(s));
                let c = |v: Variant| get(v).map_or("–".into(), |s| cell(s));
                writeln!(
                    md,
                    "| {n} | {} | {clients} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    test.name(),
                    c(Variant::Direct),
                    c(Variant::Iptables),
                    c(Variant::Nftables),
                    c(Variant::Lb),
                    c(Variant::LbXdp),
                    ratio(m(Variant::Lb), m(Variant::Direct)),
                    ratio(m(Variant::Lb), m(Variant::Iptables)),
                    ratio(m(Variant::Lb), m(Variant::Nftables)),
                    ratio(m(Variant::LbXdp), m(Variant::Direct)),
                    ratio(m(Variant::LbXdp), m(Variant::Iptables)),
                    ratio(m(Variant::LbXdp), m(Variant::Nftables)),
                    ratio(m(Variant::LbXdp), m(Variant::Lb)),
                    ratio(m(Variant::Iptables), m(Variant::Direct)),
                    ratio(m(Variant::Nftables), m(Variant::Direct)),
                )?;
            }
        }
    }
    writeln!(
        md,
        "\nForwarding rate ({}): share of the datagrams sent that did not reach the pods (median over rounds):\n",
        Test::UdpFlood.name()
    )?;
    writeln!(
        md,
        "| other Services | clients | {} |\n|---:|---:|{}",
        Variant::ALL.map(Variant::name).join(" | "),
        "---:|".repeat(Variant::ALL.len())
    )?;
    for &n in &net.sizes {
        for &clients in &net.clients {
            let cells: Vec<String> = Variant::ALL
                .iter()
                .map(|&v| {
                    report
                        .loss
                        .get(&(n, clients, v))
                        .and_then(|s| med(s))
                        .map_or("–".into(), |l| format!("{:.1}%", l * 100.0))
                })
                .collect();
            writeln!(md, "| {n} | {clients} | {} |", cells.join(" | "))?;
        }
    }
    if !report.xdp_counters.is_empty() {
        writeln!(
            md,
            "\nThe XDP program's decisions over lb XDP's rounds (its counters, direction `xdp`; \
             `new_flow` and `established` packets were translated by XDP, `not_service` are \
             frames to no Service such as ARP, `deferred` were left to the TC program). \
             With XDP on a veth the kernel takes segmentation offload (GSO/TSO) away from \
             the peer, and the client sends complete checksums (what a wire carries, which \
             XDP's rewrite needs): TCP_STREAM through lb XDP therefore moves MTU-sized \
             packets where the other variants move 64 KiB ones. That is the veth's \
             artefact; a NIC's driver rebuilds large packets (GRO) after XDP.\n"
        )?;
        for (n, counters) in &report.xdp_counters {
            let list: Vec<String> = counters.iter().map(|(r, c)| format!("{r} {c}")).collect();
            writeln!(md, "- {n} other Services: {}", list.join(", "))?;
        }
    }
    if let (Some(&first), Some(&last)) = (net.sizes.first(), net.sizes.last()) {
        writeln!(
            md,
            "\nThroughput kept from {first} to {last} other Services (median at {last} / median at {first}, 1 client):\n"
        )?;
        writeln!(
            md,
            "| test | iptables | nftables | lb | lb XDP |\n|---|---:|---:|---:|---:|"
        )?;
        for test in Test::ALL {
            let keep = |v: Variant| {
                let at = |n: usize| report.samples.get(&(n, test, 1, v)).and_then(|s| med(s));
                ratio(at(last), at(first))
            };
            writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                test.name(),
                keep(Variant::Iptables),
                keep(Variant::Nftables),
                keep(Variant::Lb),
                keep(Variant::LbXdp)
            )?;
        }
    }
    writeln!(
        md,
        "\nTime to program each variant once per size (ms; \"> N s\": stopped at the limit, the variant is not measured at that size):\n"
    )?;
    writeln!(
        md,
        "| other Services | {} | nft -f | lb (load, fill maps, attach) | lb XDP (same, XDP too) |\n|---:|---:|---:|---:|---:|",
        bench_net::iptables_restore()
    )?;
    for &n in &net.sizes {
        let l = |v: Variant| {
            if let Some((_, _, why)) = report.overran.iter().find(|o| o.0 == n && o.1 == v) {
                why.clone()
            } else {
                report.load_ms.get(&(n, v)).map_or("–".into(), |s| cell(s))
            }
        };
        writeln!(
            md,
            "| {n} | {} | {} | {} | {} |",
            l(Variant::Iptables),
            l(Variant::Nftables),
            l(Variant::Lb),
            l(Variant::LbXdp)
        )?;
    }
    tools_section(&report, &net.sizes, md)?;
    match bench_plot::datapath(&out.datapath_png, &report, &net.sizes, 1) {
        Ok(()) => writeln!(
            md,
            "\n![datapath, 1 client]({})\n",
            out.datapath_png
                .file_name()
                .map_or_else(String::new, |f| f.to_string_lossy().into_owned())
        )?,
        Err(e) => println!("datapath plot not drawn: {e:#}"),
    }
    Ok(())
}

/// The cross-check of the datapath table with standard tools, a table per size.
fn tools_section(report: &bench_net::NetReport, sizes: &[usize], md: &mut String) -> Result<()> {
    let Some(tools) = &report.tools else {
        return Ok(());
    };
    let versions: Vec<String> = tools
        .versions
        .iter()
        .map(|(tool, v)| format!("{tool} (`{v}`)"))
        .collect();
    writeln!(md, "\n### Cross-check with standard tools\n")?;
    writeln!(
        md,
        "The same variants measured by {}, one client, after each variant's own tests in every round \
         (cells: median over rounds ± half the range). Their ports are on the measured Service with the \
         first pod as their only endpoint (iperf3's and netperf's control and data connections must reach \
         the same server); direct addresses that pod. Units as above: MB/s (10^6 bytes) for TCP_STREAM, \
         transactions/s for TCP_RR and UDP_RR, connections/s for TCP_CRR.\n",
        versions.join(" and ")
    )?;
    if tools.is_netperf() {
        writeln!(
            md,
            "netperf and netserver were on PATH: netperf, the reference tool, ran every test \
             (`netperf -t TEST -l SECONDS -H ADDR -- -P ,PORT -o THROUGHPUT`).\n"
        )?;
    } else {
        writeln!(
            md,
            "netperf, the reference tool, was not on PATH (Debian 12 does not package it): iperf3 \
             ran TCP_STREAM (`iperf3 -c ADDR -t SECONDS -J`, `end.sum_received.bits_per_second`) and \
             sockperf TCP_RR and UDP_RR (`sockperf ping-pong [--tcp] -t SECONDS`: round trips per second \
             are the messages received over its measured window; sockperf spends the first 400 ms of \
             the SECONDS warming up and leaves the last ~50 ms out, so a 2 s run measures about 1.55 s). \
             Nothing here runs TCP_CRR.\n"
        )?;
    }
    for &n in sizes {
        let measured: Vec<Test> = Test::ALL
            .into_iter()
            .filter(|&t| report.tool_samples.keys().any(|k| k.0 == n && k.1 == t))
            .collect();
        if measured.is_empty() {
            continue;
        }
        writeln!(md, "{n} other Services:\n")?;
        writeln!(
            md,
            "| test | tool | {} | lb / direct | lb / iptables |\n|---|---|{}---:|---:|",
            Variant::ALL.map(Variant::name).join(" | "),
            "---:|".repeat(Variant::ALL.len())
        )?;
        for test in measured {
            let get = |v: Variant| report.tool_samples.get(&(n, test, v));
            let m = |v: Variant| get(v).and_then(|s| med(s));
            let cells: Vec<String> = Variant::ALL
                .iter()
                .map(|&v| get(v).map_or("–".into(), |s| cell(s)))
                .collect();
            writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                test.name(),
                tools.describe(test),
                cells.join(" | "),
                ratio(m(Variant::Lb), m(Variant::Direct)),
                ratio(m(Variant::Lb), m(Variant::Iptables)),
            )?;
        }
        writeln!(md)?;
    }
    Ok(())
}

/// `vX.Y.Z` from `TOOL --version`.
fn tool_version(tool: &str) -> String {
    std::process::Command::new(tool)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .find(|w| w.starts_with('v'))
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

fn control_section(plan: &Plan, out: &Outputs, md: &mut String) -> Result<()> {
    let cp_rows = control_plane_isolated(plan)?;
    writeln!(
        md,
        "## Control plane (Services x {ENDPOINTS} endpoints, real BPF maps)\n"
    )?;
    writeln!(
        md,
        "| Services | cache build ms | initial sync to maps ms | map writes | one change p50 ms | one change p99 ms | writes per change | agent RSS MiB | desired state (all) ms | full recompute p50 ms | full recompute p99 ms | peak RSS MiB |"
    )?;
    writeln!(
        md,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for r in &cp_rows {
        writeln!(
            md,
            "| {} | {:.1} | {:.1} | {} | {:.3} | {:.3} | {} | {:.0} | {:.1} | {:.2} | {:.2} | {:.0} |",
            r.services,
            r.cache_ms,
            r.apply_ms,
            r.writes,
            r.change_ms.0,
            r.change_ms.1,
            r.change_writes,
            r.rss_mib,
            r.model_ms,
            r.full_change_ms.0,
            r.full_change_ms.1,
            r.peak_rss_mib
        )?;
    }
    writeln!(
        md,
        "\nThe agent's path, as with the API source: the two initial lists are handed over whole, the cache computes every Service (`state::DesiredCache::build`) and every frontend is written (`Applier::sync_services`). \"One change\" is timed from the watch event's object (one EndpointSlice in which one endpoint moved) to the maps: the tracker replaces the object and notes its key (`state::Tracker`), the cache recomputes that one Service, and only its frontends are diffed and written (`Applier::sync_frontends`); nothing in it walks the other Services. \"Agent RSS\" is the resident memory at that point, with every object, the cache, the applier's view of the maps and the BPF map handles. For comparison, \"full recompute\" is what each change would cost without the cache: the desired state of every Service recomputed (`desired_state`) and every frontend diffed against the maps (`Applier::sync`); the peak RSS includes those.\n"
    )?;
    let kp = bench_kp::run(&plan.control_sizes, plan.kp_changes, plan.kp_limit)?;
    writeln!(
        md,
        "### Side by side with kube-proxy's payloads\n\n\
         The same Services loaded the way kube-proxy loads them, each tool in a throwaway network namespace: \
         iptables mode = `iptables-restore --noflush` (nf_tables and legacy backends) of the whole ruleset (full sync) and of KUBE-SERVICES plus the changed \
         Service's chains (partial sync, as kube-proxy does since 1.26); nftables mode = `nft -f` of the whole table and of \
         one transaction refilling the changed Service's chains. Only the tool's run is timed (kube-proxy's own computation \
         is extra); lb's figures are from the objects to the maps (full: cache build + initial sync; change: \
         one change p50, from the watch event's object). Partial syncs: median of {} changes.\n",
        plan.kp_changes
    )?;
    writeln!(
        md,
        "| Services | full: lb ms | full: iptables-nft ms | full: iptables-legacy ms | full: nft ms | iptables-nft / lb | iptables-legacy / lb | nft / lb | change: lb ms | change: iptables-nft ms | change: iptables-legacy ms | change: nft ms | iptables-nft / lb | iptables-legacy / lb | nft / lb |"
    )?;
    writeln!(
        md,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    let mut full_series = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    let mut change_series = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for (r, k) in cp_rows.iter().zip(&kp) {
        anyhow::ensure!(r.services == k.services, "control-plane rows out of step");
        let lb_full = Some(r.cache_ms + r.apply_ms);
        let lb_change = Some(r.change_ms.0);
        let x = r.services as f64;
        for (series, values) in [
            (
                &mut full_series,
                [lb_full, k.iptables_full_ms, k.legacy_full_ms, k.nft_full_ms],
            ),
            (
                &mut change_series,
                [
                    lb_change,
                    k.iptables_change_ms,
                    k.legacy_change_ms,
                    k.nft_change_ms,
                ],
            ),
        ] {
            for (s, v) in series.iter_mut().zip(values) {
                if let Some(v) = v {
                    s.push((x, v));
                }
            }
        }
        let lim = plan.kp_limit;
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {} | {} | {} | {} | {} | {} |",
            r.services,
            opt_ms(lb_full, lim),
            opt_ms(k.iptables_full_ms, lim),
            opt_ms(k.legacy_full_ms, lim),
            opt_ms(k.nft_full_ms, lim),
            ratio(k.iptables_full_ms, lb_full),
            ratio(k.legacy_full_ms, lb_full),
            ratio(k.nft_full_ms, lb_full),
            r.change_ms.0,
            opt_ms(k.iptables_change_ms, lim),
            opt_ms(k.legacy_change_ms, lim),
            opt_ms(k.nft_change_ms, lim),
            ratio(k.iptables_change_ms, lb_change),
            ratio(k.legacy_change_ms, lb_change),
            ratio(k.nft_change_ms, lb_change),
        )?;
    }
    writeln!(
        md,
        "\n\"> N s\": the load did not finish within the limit and was stopped (no partial syncs are timed then). \
         iptables-nft-restore {} slows down faster than linearly with the number of chains (kube-proxy's hashed chain names arrive in random order).",
        tool_version("iptables-nft-restore")
    )?;
    let names = [
        "lb",
        "kube-proxy iptables (nft backend)",
        "kube-proxy iptables (legacy)",
        "kube-proxy nftables",
    ];
    let to_series = |s: [Vec<(f64, f64)>; 4]| -> Vec<bench_plot::Series> {
        names
            .iter()
            .zip(s)
            .map(|(&name, points)| bench_plot::Series { name, points })
            .collect()
    };
    match bench_plot::control_plane(
        &out.control_png,
        &to_series(full_series),
        &to_series(change_series),
    ) {
        Ok(()) => writeln!(
            md,
            "\n![control plane]({})\n",
            out.control_png
                .file_name()
                .map_or_else(String::new, |f| f.to_string_lossy().into_owned())
        )?,
        Err(e) => println!("control-plane plot not drawn: {e:#}"),
    }
    Ok(())
}
