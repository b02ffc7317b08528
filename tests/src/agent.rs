//! The agent under test: `target/release/lb-agent` running in the node namespace.
//!
//! It is started with `nsenter --net=`, which enters only the network namespace: the agent
//! keeps the machine's bpffs, so its pins really outlive it, as they do on a node (`ip
//! netns exec` would give it a private /sys and a throw-away bpffs).
use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::{netns::NetNs, process::Proc, topology::NODE_DEVICES, wait_until, workspace_binary};

/// Path of the agent binary: `LB_AGENT_BIN`, or the workspace's release build.
pub fn agent_binary() -> PathBuf {
    match std::env::var_os("LB_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => workspace_binary("lb-agent"),
    }
}

/// The agent's pin directory (`--bpffs-root`) for node namespace `node`: unique per test,
/// as the namespace's name is.
pub fn pin_root(node: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/{node}"))
}

/// The manifests directory of the agent in node namespace `node`.
pub fn manifests_dir(node: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{node}-manifests"))
}

/// The log (stderr) of the agent in node namespace `node`.
pub fn log_file(node: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{node}-agent.log"))
}

/// Default `--metrics-bind-address` port of the agent (on the node namespace's loopback).
pub const METRICS_PORT: u16 = 10249;

/// `lb_datapath_packets_total{reason, direction}` of the agent in node namespace `node`,
/// from its `/metrics` (0 when the series is absent: nothing counted yet).
pub fn datapath_packets(node: &NetNs, reason: &str, direction: &str) -> u64 {
    let (_, body) = http_get(node, METRICS_PORT, "/metrics")
        .unwrap_or_else(|e| panic!("scraping the agent's /metrics: {e}"));
    let series =
        format!("lb_datapath_packets_total{{reason=\"{reason}\",direction=\"{direction}\"}}");
    series_value(&body, &series).map_or(0, |v| v as u64)
}

/// `GET path` on `127.0.0.1:port` in `node` (the agent's HTTP servers): (status, body).
pub fn http_get(node: &NetNs, port: u16, path: &str) -> io::Result<(u16, String)> {
    const TIMEOUT: Duration = Duration::from_secs(3);
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let raw = node.run(move || -> io::Result<String> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.write_all(request.as_bytes())?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        Ok(raw)
    })?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no status line in {raw:?}")))?;
    Ok((status, body.to_owned()))
}

/// The value of `series` (a metric name with its labels, as printed) in the Prometheus
/// text `text`.
pub fn series_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A running agent with its manifests directory and its bpffs pin directory. Dropping it
/// stops the agent (SIGTERM, then SIGKILL), prints its log if the test is failing, and
/// removes the pin directory, the manifests directory and the log.
pub struct Agent {
    child: Option<Proc>,
    netns_path: String,
    /// The manifests directory the agent follows (with a kubeconfig: where that file is).
    pub dir: PathBuf,
    /// The source flags: `--manifests DIR` or `--kubeconfig FILE`.
    source_args: Vec<String>,
    /// More flags, after the ones every test agent gets.
    extra_args: Vec<String>,
    /// A command the agent runs under (inside the node namespace), e.g. `setpriv ...`.
    wrapper: Vec<String>,
    /// The pin directory (`--bpffs-root`).
    pub root: PathBuf,
    log: PathBuf,
    starts: u32,
}

impl Agent {
    /// Writes `manifests` (file name, content) into a fresh directory and starts an agent
    /// on them in `node`, waiting until it reports ready.
    pub fn start(node: &NetNs, manifests: &[(&str, &str)]) -> Self {
        Self::start_under(node, manifests, &[])
    }

    /// [`Agent::start`], with the agent run under `wrapper` (a command and its arguments
    /// that execs the rest, such as `setpriv --bounding-set=...`).
    pub fn start_under(node: &NetNs, manifests: &[(&str, &str)], wrapper: &[&str]) -> Self {
        Self::start_full(node, manifests, wrapper, &[])
    }

    /// [`Agent::start`] with more command-line flags (`args`), given after the ones every
    /// test agent gets (which therefore cannot be repeated).
    pub fn start_with_args(node: &NetNs, manifests: &[(&str, &str)], args: &[&str]) -> Self {
        Self::start_full(node, manifests, &[], args)
    }

    /// [`Agent::start_under`] with more command-line flags, as [`Agent::start_with_args`].
    pub fn start_full(
        node: &NetNs,
        manifests: &[(&str, &str)],
        wrapper: &[&str],
        args: &[&str],
    ) -> Self {
        let dir = manifests_dir(node.name());
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("manifests dir");
        let mut agent = Self {
            child: None,
            source_args: vec!["--manifests".into(), dir.display().to_string()],
            extra_args: args.iter().map(|a| (*a).to_owned()).collect(),
            wrapper: wrapper.iter().map(|a| (*a).to_owned()).collect(),
            netns_path: node.path(),
            root: pin_root(node.name()),
            log: log_file(node.name()),
            dir,
            starts: 0,
        };
        for (name, content) in manifests {
            agent.write(name, content);
        }
        agent.spawn();
        agent
    }

    /// Starts an agent in `node` that watches the Kubernetes API described by `kubeconfig`
    /// (YAML, written to a file in a fresh directory), waiting until it reports ready.
    pub fn start_with_kubeconfig(node: &NetNs, kubeconfig: &str) -> Self {
        Self::start_with_kubeconfig_and_args(node, kubeconfig, &[])
    }

    /// [`Agent::start_with_kubeconfig`] with more command-line flags (`args`), given after
    /// the ones every test agent gets (which therefore cannot be repeated).
    pub fn start_with_kubeconfig_and_args(node: &NetNs, kubeconfig: &str, args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-kube", node.name()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("kubeconfig dir");
        let file = dir.join("kubeconfig");
        fs::write(&file, kubeconfig).expect("write kubeconfig");
        let mut agent = Self {
            child: None,
            source_args: vec!["--kubeconfig".into(), file.display().to_string()],
            extra_args: args.iter().map(|a| (*a).to_owned()).collect(),
            wrapper: Vec::new(),
            netns_path: node.path(),
            root: pin_root(node.name()),
            log: log_file(node.name()),
            dir,
            starts: 0,
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let bin = agent_binary();
        assert!(
            bin.exists(),
            "{} is missing: build it with `cargo build --release -p lb-agent`",
            bin.display()
        );
        let child = Proc::spawn(
            Command::new("nsenter")
                .arg(format!("--net={}", self.netns_path))
                .args(&self.wrapper)
                .arg(&bin)
                .args(&self.source_args)
                .args(["--devices", NODE_DEVICES])
                .arg("--bpffs-root")
                .arg(&self.root)
                .args(["--poll-interval-ms", "100", "--log-level", "info"])
                .args(
                    crate::xdp_mode()
                        .map(|mode| ["--xdp", crate::XDP_DEVICES, "--xdp-mode", mode])
                        .into_iter()
                        .flatten(),
                )
                .args(&self.extra_args)
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
            "lb-agent",
        );
        self.child = Some(child);
        self.starts += 1;
        let want = self.starts as usize;
        let log_path = self.log.clone();
        let mut exited = None;
        wait_until("the agent to report ready", Duration::from_secs(15), || {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.exited()
            {
                exited = Some(status);
                return true;
            }
            count(&log_path, "lb-agent ready") >= want
        });
        if let Some(status) = exited {
            panic!(
                "lb-agent exited ({status}) before it was ready:\n{}",
                self.log()
            );
        }
    }

    /// Writes (or replaces) one manifest file.
    pub fn write(&self, name: &str, content: &str) {
        // Write then rename, as editors and `kubectl` tooling do, so the agent never reads a
        // half-written file.
        let tmp = self.dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, content).expect("write manifest");
        fs::rename(&tmp, self.dir.join(name)).expect("rename manifest");
    }

    /// Removes one manifest file.
    pub fn remove(&self, name: &str) {
        fs::remove_file(self.dir.join(name)).expect("remove manifest");
    }

    /// Number of syncs the agent has logged so far (over all its runs).
    pub fn syncs(&self) -> usize {
        count(&self.log, " synced ")
    }

    /// Applies `f` (which changes manifests) and waits until the agent has synced it.
    pub fn change(&self, f: impl FnOnce(&Self)) {
        let before = self.syncs();
        f(self);
        wait_until(
            "the agent to sync the change",
            Duration::from_secs(5),
            || self.syncs() > before,
        );
    }

    /// Kills the agent with SIGKILL, as a crash or an OOM kill would; pins stay.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Proc::id)
    }

    /// Path of the agent's log (its stderr, over all its runs).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Leaves the agent running, with its manifests, log and pins, after this guard is gone
    /// (`cargo xtask demo --keep`); returns its pid.
    pub fn persist(mut self) -> Option<u32> {
        let pid = self.child.take().map(Proc::persist);
        std::mem::forget(self);
        pid
    }

    /// Starts the agent again on the same manifests and pin directory.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Starts the agent again with `args` instead of the extra flags it had (see
    /// [`Agent::start_with_args`]), on the same manifests and pin directory.
    pub fn restart_with_args(&mut self, args: &[&str]) {
        self.extra_args = args.iter().map(|a| (*a).to_owned()).collect();
        self.restart();
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the agent with SIGTERM (then SIGKILL after 3 s), as a DaemonSet update does;
    /// pins stay.
    pub fn terminate(&mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.terminate(Duration::from_secs(3));
        }
    }
}

fn count(path: &Path, needle: &str) -> usize {
    fs::read_to_string(path)
        .map(|s| s.matches(needle).count())
        .unwrap_or(0)
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "----- lb-agent log ({}) -----\n{}-----",
                self.log.display(),
                self.log()
            );
        }
        let _ = fs::remove_dir_all(&self.root);
        let _ = fs::remove_dir_all(&self.dir);
        let _ = fs::remove_file(&self.log);
    }
}
