//! lb-agent: the node agent. Reads Services and their endpoints, computes the service
//! and backend tables, writes only the difference into the BPF maps, and keeps the TC
//! programs attached to the node's devices.
use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use lb_agent::{
    apply::Applier,
    datapath::{self, Datapath, DevicePatterns, LinkMonitor},
    healthcheck, http, kube_source,
    manifests::{ManifestDir, Scan},
    model,
    state::{DesiredCache, Tracker, Update},
    telemetry::{self, LogFormat, SyncKind, Telemetry},
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

/// eBPF Service load balancer: a kube-proxy replacement.
///
/// Translates traffic to Service ClusterIPs into pod backends in the kernel (TC programs),
/// fed from the Kubernetes API (Services and EndpointSlices, watched) or, with
/// `--manifests`, from a directory of manifests (Service, EndpointSlice, Endpoints) that is
/// followed live.
#[derive(Debug, Parser)]
#[command(name = "lb-agent", version)]
struct Cli {
    /// Directory of Kubernetes manifests (*.yaml, *.yml, *.json: Service,
    /// discovery.k8s.io/v1 EndpointSlice, v1 Endpoints), as `kubectl apply -f DIR` takes
    /// them. Edits are applied live. Without this flag the agent watches the Kubernetes
    /// API.
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,

    /// Kubeconfig file for the Kubernetes API; without it, the in-cluster configuration
    /// or the default kubeconfig (`KUBECONFIG`, `~/.kube/config`) is used.
    #[arg(long, value_name = "FILE", conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,

    /// Name of this node, as the Kubernetes API knows it (defaults to the host name).
    #[arg(long, value_name = "NAME")]
    hostname_override: Option<String>,

    /// Which of the node's addresses answer NodePorts: comma-separated CIDRs, or
    /// `primary` (the address of the default route's device). Default: every address
    /// except loopback ones.
    #[arg(long, value_name = "CIDRS", value_parser = model::NodePortAddresses::parse)]
    nodeport_addresses: Option<model::NodePortAddresses>,

    /// Translate only the Services' externalIPs within these comma-separated CIDRs and
    /// report the others, naming the Service: the guard against CVE-2020-8554 (whoever may
    /// create a Service could otherwise capture traffic to any address by listing it as
    /// an externalIP). An empty list admits none. Default: every externalIP, as kube-proxy.
    #[arg(long, value_name = "CIDRS", value_parser = model::CidrList::parse)]
    external_ip_cidrs: Option<model::CidrList>,

    /// The cluster's pod address ranges (comma-separated CIDRs), as kube-proxy's flag:
    /// pods reaching a NodePort, externalIP or LoadBalancer IP whose Service has
    /// `externalTrafficPolicy: Local` are sent to any of its endpoints, not only to this
    /// node's (kube-proxy's short-circuit for traffic from inside the cluster). The
    /// node's own processes get that with `--cgroup-path` alone. Without it, pods are
    /// treated like external clients.
    #[arg(long, value_name = "CIDRS", value_parser = model::CidrList::parse)]
    cluster_cidr: Option<model::CidrList>,

    /// Devices to attach to: comma-separated names or globs (`veth*,eth0`). Matching
    /// devices that appear later (pod veths) are attached when they appear.
    #[arg(
        long,
        value_name = "LIST",
        required_unless_present_any = ["dry_run", "cleanup", "kernel_features", "xdp"]
    )]
    devices: Option<String>,

    /// Devices where external traffic arrives (comma-separated names or globs, like
    /// `--devices`; they get the TC programs too): the XDP program translates NodePort,
    /// externalIP and LoadBalancer traffic there before the kernel builds a socket buffer
    /// for it, and drops what a source range or a `Local` policy refuses; whatever needs
    /// more than a rewrite (a backend on another node, a reject) goes on to the TC path.
    #[arg(long, value_name = "LIST")]
    xdp: Option<String>,

    /// How `--xdp` attaches: `auto` (native where the driver supports it, generic
    /// otherwise), `native` or `generic`.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = datapath::XdpAttachMode::Auto, requires = "xdp")]
    xdp_mode: datapath::XdpAttachMode,

    /// cgroup v2 directory whose processes reach Services through socket hooks
    /// (connect, sendmsg, recvmsg, getpeername): the node's own processes, hostNetwork
    /// pods and kubelet, whose traffic crosses no device the TC programs translate. The
    /// root, `/sys/fs/cgroup`, covers every process of the node. Without it no hook is
    /// attached, and hooks a previous agent attached are removed.
    #[arg(long, value_name = "PATH")]
    cgroup_path: Option<PathBuf>,

    /// Also answer NodePorts on 127.0.0.1, for the node's own processes only (through
    /// the socket hooks of `--cgroup-path`), as kube-proxy's localhost NodePorts do.
    #[arg(long, requires = "cgroup_path")]
    nodeport_localhost: bool,

    /// Directory on bpffs where maps and links that outlive the agent are pinned
    /// (bpffs is mounted at /sys/fs/bpf if it is not mounted).
    #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf/lb")]
    bpffs_root: PathBuf,

    /// Load the datapath from this eBPF object instead of the one built into the binary.
    #[arg(long, value_name = "PATH")]
    ebpf_object: Option<PathBuf>,

    /// How often the manifests directory is checked for changes, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 200)]
    poll_interval_ms: u64,

    /// Print the service and backend tables computed from the manifests as JSON, and
    /// exit without touching the kernel (needs no privilege).
    #[arg(long, requires = "manifests")]
    dry_run: bool,

    /// Remove the agent's programs and maps from this node (everything pinned under
    /// `--bpffs-root`) and exit: after the agent is removed, e.g. when rolling back to
    /// kube-proxy. Established connections through Services are not kept.
    #[arg(long, conflicts_with_all = ["dry_run", "manifests", "kubeconfig"])]
    cleanup: bool,

    /// Probe what this kernel offers the datapath (map types, helpers, tcx, netlink TC),
    /// print one line per feature and how the programs would be attached, and exit
    /// (non-zero if the agent cannot run here). Loads the programs into a temporary pin
    /// directory beside `--bpffs-root` and removes it; attaches nothing.
    #[arg(long, conflicts_with_all = ["dry_run", "manifests", "kubeconfig", "cleanup"])]
    kernel_features: bool,

    /// Detach the programs when the agent stops. By default they stay attached with the
    /// last tables and keep translating until the next agent takes them over, as
    /// kube-proxy's rules stay in place when kube-proxy stops.
    #[arg(long)]
    detach_on_exit: bool,

    /// Attach through netlink TC (clsact + cls_bpf) even where tcx exists: the path of
    /// kernels before 6.6, exercised on newer hosts by the end-to-end tests.
    #[arg(long, hide = true)]
    force_netlink_tc: bool,

    /// Log filter (tracing EnvFilter syntax, e.g. `info`, `lb_agent=debug`); the
    /// `LB_LOG` environment variable is used when this is not given.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,

    /// Log line format: `text`, or `json` (one object per line).
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Address (IP:PORT) of the health server: `/healthz` and `/livez`, with kube-proxy's
    /// meaning and JSON bodies. Empty disables it.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:10256")]
    healthz_bind_address: String,

    /// Address (IP:PORT) of the metrics server: `/metrics` (Prometheus text format).
    /// Empty disables it.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10249")]
    metrics_bind_address: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging(cli.log_level.as_deref(), cli.log_format);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, naming what failed and why.
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Where objects come from.
enum Source {
    /// A manifests directory, rescanned every tick.
    Dir {
        dir: ManifestDir,
        poll: tokio::time::Interval,
    },
    /// The Kubernetes API, through [`kube_source::run_observed`] in a task.
    Kube {
        rx: tokio::sync::mpsc::UnboundedReceiver<Update>,
        task: tokio::task::JoinHandle<()>,
        node_task: tokio::task::JoinHandle<()>,
    },
}

/// Changes from a source, synced together.
struct Batch {
    updates: Vec<Update>,
    /// The source's own problems (files, objects), replacing the ones it reported before;
    /// `None`: unchanged.
    problems: Option<Vec<model::Problem>>,
}

impl From<Scan> for Batch {
    /// A rescan of the manifests replaces everything.
    fn from(scan: Scan) -> Self {
        let o = scan.objects;
        Self {
            updates: vec![
                Update::Services(o.services),
                Update::EndpointSlices(o.endpoint_slices),
                Update::Endpoints(o.endpoints),
            ],
            problems: Some(scan.problems),
        }
    }
}

impl Source {
    /// The first complete state; for the API, once both initial lists are done.
    async fn first(&mut self) -> anyhow::Result<Batch> {
        match self {
            Self::Dir { dir, .. } => Ok(dir.rescan()?.unwrap_or_default().into()),
            Self::Kube { rx, .. } => {
                let mut updates = Vec::new();
                let (mut services, mut slices) = (false, false);
                while !(services && slices) {
                    let u = rx.recv().await.ok_or_else(|| {
                        anyhow::anyhow!("the Kubernetes watch stopped before listing")
                    })?;
                    services |= matches!(u, Update::Services(_));
                    slices |= matches!(u, Update::EndpointSlices(_));
                    updates.push(u);
                }
                Ok(Batch {
                    updates,
                    problems: None,
                })
            }
        }
    }

    /// Waits for the next changes. Cancel-safe, for `select!`.
    async fn next(&mut self) -> Batch {
        match self {
            Self::Dir { dir, poll } => loop {
                poll.tick().await;
                match dir.rescan() {
                    Ok(Some(scan)) => return scan.into(),
                    Ok(None) => {}
                    Err(e) => warn!("{e}"),
                }
            },
            Self::Kube { rx, .. } => match kube_source::next_batch(rx).await {
                Some(updates) => Batch {
                    updates,
                    problems: None,
                },
                // The source task only ends when the receiver is gone; never here.
                None => std::future::pending().await,
            },
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Self::Kube {
            task, node_task, ..
        } = self
        {
            task.abort();
            node_task.abort();
        }
    }
}

/// This node's name: `--hostname-override`, else the kernel's host name.
fn node_name(cli: &Cli) -> String {
    cli.hostname_override.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default()
    })
}

/// Where the agent runs, read now: the node's name and its addresses that answer
/// NodePorts (they change as devices come and go).
fn node_context(node: &str, cli: &Cli) -> model::NodeContext {
    let (addrs, primary) = datapath::node_addresses();
    let selection = cli.nodeport_addresses.clone().unwrap_or_default();
    let mut nodeport_addrs = selection.select(&addrs, primary);
    if cli.nodeport_localhost {
        // Only the socket hooks ever see this address, and only in the node's own
        // network namespace.
        nodeport_addrs.insert(std::net::Ipv4Addr::LOCALHOST);
    }
    model::NodeContext {
        node_name: node.to_owned(),
        nodeport_addrs,
        external_ip_cidrs: cli.external_ip_cidrs.clone().map(|c| c.0),
        ..model::NodeContext::default()
    }
}

/// `--kernel-features`: loads the programs into a scratch pin directory (the probes of
/// the attach methods need a loaded program), prints the probe results, removes it.
fn kernel_features(cli: &Cli) -> anyhow::Result<()> {
    let scratch = cli
        .bpffs_root
        .with_file_name(format!("lb-features-{}", std::process::id()));
    datapath::prepare(&scratch)?;
    let loaded = Datapath::load(&scratch, cli.ebpf_object.as_deref());
    let verdict = match &loaded {
        Ok(dp) => {
            for f in dp.features().all() {
                println!("{}\t{}\t{}", f.name, f.since, f.probe);
            }
            println!("kernel\t{}", dp.features().kernel);
            match dp.features().attach_mode() {
                Ok(mode) => Ok(mode),
                Err((feature, detail)) => Err(anyhow::anyhow!("{feature}: {detail}")),
            }
        }
        Err(e) => Err(anyhow::anyhow!("{e}")),
    };
    drop(loaded);
    // Only the scratch maps: `datapath::cleanup` would also detach a running agent's
    // netlink filters from this namespace's devices.
    std::fs::remove_dir_all(&scratch)
        .map_err(|e| anyhow::anyhow!("removing {}: {e}", scratch.display()))?;
    match verdict {
        Ok(mode) => {
            println!("attach\t{mode:?}");
            Ok(())
        }
        Err(e) => {
            println!("attach\trefused: {e}");
            Err(e)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.cleanup {
        let done = datapath::cleanup(&cli.bpffs_root)?;
        if let Err(e) = datapath::remove_snat_rule() {
            warn!(error = %e, "cannot remove the masquerade rule");
        }
        info!(
            root = %cli.bpffs_root.display(),
            links = done.links,
            maps = done.maps,
            "removed the datapath: programs detached, maps unpinned"
        );
        return Ok(());
    }
    if cli.kernel_features {
        return kernel_features(&cli);
    }
    let poll_every = Duration::from_millis(cli.poll_interval_ms.max(10));
    let telemetry = Arc::new(Telemetry::default());
    // This node's Node object (manifests mode has none: the state stays `Unknown`).
    let (node_tx, node_rx) = tokio::sync::watch::channel(kube_source::NodeState::Unknown);
    let mut source = match &cli.manifests {
        Some(path) => Source::Dir {
            dir: ManifestDir::open(path)?,
            poll: tokio::time::interval(poll_every),
        },
        None => {
            let client = kube_source::client(cli.kubeconfig.as_deref()).await?;
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let node_task = tokio::spawn(kube_source::watch_node(
                client.clone(),
                node_name(&cli),
                node_tx,
                telemetry.clone(),
            ));
            let task = tokio::spawn(kube_source::run_observed(client, tx, telemetry.clone()));
            Source::Kube {
                rx,
                task,
                node_task,
            }
        }
    };
    // Stored for node-local policies (externalTrafficPolicy: Local, topology hints).
    let node = node_name(&cli);
    if let (true, Source::Dir { dir, .. }) = (cli.dry_run, &mut source) {
        let scan = dir.rescan()?.unwrap_or_default();
        report_problems(
            &mut BTreeSet::new(),
            scan.problems.iter().map(ToString::to_string),
        );
        let desired = model::desired_state(&scan.objects, &node_context(&node, &cli));
        report_problems(
            &mut BTreeSet::new(),
            desired.problems.iter().map(ToString::to_string),
        );
        println!("{}", serde_json::to_string_pretty(&desired.to_json())?);
        return Ok(());
    }
    // XDP devices get the TC programs too: the XDP program leaves work to them, and their
    // replies leave through them.
    let device_list = [cli.devices.as_deref(), cli.xdp.as_deref()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(",");
    let patterns = DevicePatterns::parse(&device_list);

    datapath::prepare(&cli.bpffs_root)?;
    let mut dp = Datapath::load(&cli.bpffs_root, cli.ebpf_object.as_deref())?;
    if cli.force_netlink_tc {
        dp.force_netlink_tc()?;
    }
    if let Some(cidrs) = &cli.cluster_cidr {
        dp.set_cluster_cidrs(&cidrs.0)?;
    }
    if let Some(xdp) = &cli.xdp {
        dp.enable_xdp(datapath::XdpConfig {
            devices: DevicePatterns::parse(xdp),
            mode: cli.xdp_mode,
        })?;
    }
    let mut maps = dp.service_maps()?;
    let metrics = Arc::new(dp.metrics()?);
    let applier = Applier::adopt(&maps)?;
    if let Err(e) = datapath::ensure_snat_rule() {
        warn!(error = %e, "cannot add the masquerade rule: north-south flows to backends on other nodes will not get their replies");
    }

    // Served from before the first sync: healthy while starting up, as kube-proxy is.
    let sources = http::Sources {
        telemetry: telemetry.clone(),
        node: node_rx,
        datapath: metrics.clone(),
        maps: Arc::new(
            http::MapStats::open(&cli.bpffs_root)
                .map_err(|e| anyhow::anyhow!("opening the pinned maps for metrics: {e}"))?,
        ),
    };
    let _health_server = http::bind("--healthz-bind-address", &cli.healthz_bind_address)
        .await?
        .map(|l| AbortOnDrop(http::serve_health(l, sources.clone())));
    let _metrics_server = http::bind("--metrics-bind-address", &cli.metrics_bind_address)
        .await?
        .map(|l| AbortOnDrop(http::serve_metrics(l, sources)));

    // First sync before attaching to new devices: packets that reach the programs always
    // see a complete table (after a restart, the adopted one until this sync lands). For
    // the API that is after both initial lists, however long they take.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let first = tokio::select! {
        scan = source.first() => scan?,
        _ = sigterm.recv() => return Ok(()),
        _ = sigint.recv() => return Ok(()),
    };
    let health_checks =
        healthcheck::Manager::start(&node, cli.nodeport_addresses.as_ref(), telemetry.clone());
    let mut syncer = Syncer::new(applier, telemetry, node_context(&node, &cli), health_checks);
    syncer.sync(first, &mut maps);

    dp.remove_stale_link_pins();
    dp.sync_cgroup(cli.cgroup_path.as_deref())?;
    let monitor = LinkMonitor::open().map_err(|e| anyhow::anyhow!("netlink link monitor: {e}"))?;
    dp.sync_devices(&patterns);
    let devices: Vec<&str> = dp.devices().collect();
    if devices.is_empty() {
        warn!(
            patterns = %device_list,
            "no matching device yet"
        );
    }
    let from = match &cli.manifests {
        Some(dir) => dir.display().to_string(),
        None => "kubernetes".to_owned(),
    };
    info!(devices = ?devices, source = %from, node = %node, "lb-agent ready");

    let mut device_rescan = tokio::time::interval(Duration::from_secs(2));
    let mut stats_tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            scan = source.next() => syncer.sync(scan, &mut maps),
            r = monitor.changed() => {
                if let Err(e) = r {
                    warn!(error = %e, "link monitor failed; relying on periodic rescans");
                    std::future::pending::<()>().await;
                }
                dp.sync_devices(&patterns);
                syncer.set_context(node_context(&node, &cli), &mut maps);
            }
            _ = device_rescan.tick() => {
                dp.sync_devices(&patterns);
                syncer.set_context(node_context(&node, &cli), &mut maps);
            }
            _ = stats_tick.tick() => {
                let counters = metrics.snapshot();
                info!(counters = ?counters, "datapath counters");
            }
        }
    }
    if cli.detach_on_exit {
        info!("shutting down: detaching programs (maps stay pinned for the next agent)");
        dp.detach_all();
    } else {
        info!(
            root = %cli.bpffs_root.display(),
            "shutting down: programs stay attached with the last tables until the next \
             agent takes over (`lb-agent --cleanup` removes them)"
        );
    }
    Ok(())
}

/// Turns the source's changes into map writes. The first sync examines every frontend
/// (the adopted maps may hold frontends no Service asks for any more); after that, only
/// the Services whose objects changed are recomputed and only their frontends are diffed
/// against the maps, so one endpoint change costs a few map writes, not a pass over every
/// Service.
struct Syncer {
    applier: Applier,
    cache: DesiredCache,
    objects: Tracker,
    /// The source's own problems, as last reported.
    source_problems: Vec<model::Problem>,
    first_done: bool,
    reported: BTreeSet<String>,
    telemetry: Arc<Telemetry>,
    /// The health checks on healthCheckNodePorts.
    health_checks: healthcheck::Manager,
}

impl Syncer {
    fn new(
        applier: Applier,
        telemetry: Arc<Telemetry>,
        ctx: model::NodeContext,
        health_checks: healthcheck::Manager,
    ) -> Self {
        Self {
            applier,
            cache: DesiredCache::new(ctx),
            objects: Tracker::default(),
            source_problems: Vec::new(),
            first_done: false,
            reported: BTreeSet::new(),
            telemetry,
            health_checks,
        }
    }

    fn sync(&mut self, batch: Batch, maps: &mut datapath::BpfMaps) {
        let started = Instant::now();
        // The API source queues as it hands each update over; a rescan of the manifests
        // directory is queued here, as it is synced at once.
        self.telemetry.queued();
        for u in batch.updates {
            self.objects.apply(u);
        }
        if let Some(problems) = batch.problems {
            self.source_problems = problems;
        }
        let (changed, triggers) = self.objects.take_changes();
        self.health_checks
            .update_changed(self.objects.objects(), &changed);
        let kind = if self.first_done {
            SyncKind::Partial
        } else {
            SyncKind::Full
        };
        let result = if self.first_done {
            let delta = self.cache.update(self.objects.objects(), &changed);
            self.applier
                .sync_frontends(self.cache.services(), delta.frontends(), maps)
        } else {
            self.cache =
                DesiredCache::build(self.objects.objects(), self.cache.context().clone()).0;
            self.first_done = true;
            self.applier.sync_services(self.cache.services(), maps)
        };
        let mut problems: Vec<String> = self
            .source_problems
            .iter()
            .map(ToString::to_string)
            .collect();
        problems.extend(self.cache.problems().map(ToString::to_string));
        problems.extend(self.health_checks.problems().map(|p| p.to_string()));
        match result {
            Ok(stats) => {
                self.telemetry
                    .synced(kind, started.elapsed(), Ok(&triggers));
                self.telemetry
                    .sync_errors("program_service", stats.failed.len());
                problems.extend(stats.failed.iter().map(ToString::to_string));
                info!(
                    services = self.cache.services().len(),
                    writes = stats.writes,
                    deletes = stats.deletes,
                    micros = started.elapsed().as_micros() as u64,
                    "synced"
                );
            }
            Err(e) => {
                self.telemetry
                    .synced(kind, started.elapsed(), Err(e.metric_label()));
                error!("sync failed: {e}");
            }
        }
        report_problems(&mut self.reported, problems);
        self.telemetry.set_problems(self.reported.len());
    }
}

impl Syncer {
    /// Follows a change of the node (its addresses, for NodePorts): recomputes every
    /// Service for the new context and writes the frontends that changed.
    fn set_context(&mut self, ctx: model::NodeContext, maps: &mut datapath::BpfMaps) {
        if *self.cache.context() == ctx {
            return;
        }
        info!(nodeport_addresses = ?ctx.nodeport_addrs, "node addresses changed");
        let delta = self.cache.set_context(self.objects.objects(), ctx);
        match self
            .applier
            .sync_frontends(self.cache.services(), delta.frontends(), maps)
        {
            Ok(stats) => {
                for p in stats.failed.iter().map(ToString::to_string) {
                    warn!("{p}");
                }
            }
            Err(e) => error!("sync failed: {e}"),
        }
        for p in self.cache.problems().map(ToString::to_string) {
            if self.reported.insert(p.clone()) {
                warn!("{p}");
            }
        }
    }
}

/// Logs problems that are new since the last report, and notes the ones that went away,
/// so that a persistent problem is reported once rather than at every sync.
fn report_problems(reported: &mut BTreeSet<String>, current: impl IntoIterator<Item = String>) {
    let current: BTreeSet<String> = current.into_iter().collect();
    for p in current.difference(reported) {
        warn!("{p}");
    }
    for p in reported.difference(&current) {
        info!("resolved: {p}");
    }
    *reported = current;
}

/// Aborts a spawned task when dropped (the HTTP servers end with `run`).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
