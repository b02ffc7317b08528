//! The agent under test: `target/release/lb-agent` running in the node namespace.
//!
//! It is started with `nsenter --net=`, which enters only the network namespace: the agent
//! keeps the machine's bpffs, so its pins really outlive it, as they do on a node (`ip
//! netns exec` would give it a private /sys and a throw-away bpffs).
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{netns::NetNs, topology::NODE_DEVICES, wait_until};

/// Path of the agent binary: `LB_AGENT_BIN`, or the workspace's release build.
pub fn agent_binary() -> PathBuf {
    match std::env::var_os("LB_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/lb-agent"),
    }
}

/// A running agent with its manifests directory and its bpffs pin directory.
pub struct Agent {
    child: Option<Child>,
    netns_path: String,
    /// The manifests directory the agent follows.
    pub dir: PathBuf,
    /// The pin directory (`--bpffs-root`).
    pub root: PathBuf,
    log: PathBuf,
    starts: u32,
}

impl Agent {
    /// Writes `manifests` (file name, content) into a fresh directory and starts an agent
    /// on them in `node`, waiting until it reports ready.
    pub fn start(node: &NetNs, manifests: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-manifests", node.name()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("manifests dir");
        let mut agent = Self {
            child: None,
            netns_path: node.path(),
            root: PathBuf::from(format!("/sys/fs/bpf/{}", node.name())),
            log: std::env::temp_dir().join(format!("{}-agent.log", node.name())),
            dir,
            starts: 0,
        };
        for (name, content) in manifests {
            agent.write(name, content);
        }
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
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns_path))
            .arg(&bin)
            .arg("--manifests")
            .arg(&self.dir)
            .args(["--devices", NODE_DEVICES])
            .arg("--bpffs-root")
            .arg(&self.root)
            .args(["--poll-interval-ms", "100", "--log-level", "info"])
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn lb-agent");
        self.child = Some(child);
        self.starts += 1;
        let want = self.starts as usize;
        let log_path = self.log.clone();
        let mut exited = None;
        wait_until("the agent to report ready", Duration::from_secs(15), || {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
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
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the agent again on the same manifests and pin directory.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        for _ in 0..150 {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
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
