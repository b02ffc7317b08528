//! `cargo xtask demo`: the example topology with the real agent, in network namespaces.
//!
//! client `lbdemo-c1` (10.200.1.2) -> node `lbdemo-node` (lb-agent on examples/demo) ->
//! pods `lbdemo-p1..3` (10.201.{1,2,3}.2, `lbt-server` on TCP 8080). The names and
//! addresses are fixed, so that `--down` finds what `--keep` left and the example
//! manifests can name the pods. Everything is torn down by the fixtures' guards when the
//! demo ends, fails or is interrupted, unless `--keep` hands it over to `--down`.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tests::{
    agent::{self, Agent},
    clients::tcp_hello,
    servers,
    topology::{NODE_DEVICES, Topology},
};

use crate::{exec, workspace};

/// Prefix of the demo's namespace names.
const PREFIX: &str = "lbdemo";
/// The Service of examples/demo/web.yaml.
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const MANIFEST: &str = "examples/demo/web.yaml";
/// The line of the EndpointSlice that the live edit removes (pod-3).
const POD3_ENDPOINT: &str = "- addresses: [\"10.201.3.2\"]\n  conditions: {ready: true}\n";

/// The demo: up, requests, a live edit, more requests, then down (or left up with `keep`).
pub fn run(keep: bool) -> Result<()> {
    if !tests::is_root() {
        bail!("the demo creates network namespaces and loads BPF programs: run it as root");
    }
    if let Some(why) = tests::missing_kernel_feature() {
        bail!("this kernel cannot run the demo: {why}");
    }
    if !exec(
        "cargo",
        &[
            "build",
            "--release",
            "-p",
            "lb-agent",
            "-p",
            "tests",
            "--bins",
        ],
        &[],
    )? {
        bail!("building lb-agent and the demo's servers failed");
    }
    if !leftovers().is_empty() {
        println!("\nremoving the demo left running by an earlier `--keep`");
        down()?;
    }
    crate::interrupt::catch();
    // Ctrl-C reaches the agent and the servers too (they share the terminal's process
    // group), so the step that was waiting on them fails, often by panicking in a test
    // fixture. Either way the guards tear everything down while unwinding; after an
    // interrupt, say so instead of printing the failure.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !crate::interrupt::interrupted() {
            default_hook(info);
        }
    }));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| up(keep)));
    if crate::interrupt::interrupted() {
        bail!("interrupted: the demo was torn down");
    }
    match outcome {
        Ok(result) => result,
        Err(_) => bail!("the demo failed (see above); what it had built was torn down"),
    }
}

/// Builds the demo, shows it, and tears it down or hands it over to `--down`.
fn up(keep: bool) -> Result<()> {
    let manifest = std::fs::read_to_string(workspace().join(MANIFEST))
        .with_context(|| format!("read {MANIFEST}"))?;
    if !manifest.contains(POD3_ENDPOINT) {
        bail!("{MANIFEST} no longer lists pod-3 as the demo expects");
    }

    println!(
        "\nbuilding the topology: client 10.200.1.2 -> node (lb-agent) -> pods 10.201.{{1,2,3}}.2"
    );
    let topo = Topology::builder()
        .named(PREFIX, 0)
        .clients(1)
        .pods(3)
        .build();
    let server_bin = servers::server_binary();
    let pods: Vec<_> = topo
        .pods
        .iter()
        .enumerate()
        .map(|(i, p)| servers::spawn(&server_bin, &p.ns, &format!("pod-{}", i + 1), &[8080], &[]))
        .collect();
    crate::interrupt::check("tearing the demo down")?;
    let agent = Agent::start(&topo.node, &[("web.yaml", &manifest)]);
    println!(
        "lb-agent is running in namespace {} on {MANIFEST} (devices '{NODE_DEVICES}')",
        topo.node.name()
    );

    let client = &topo.clients[0];
    let requests = |n: usize| -> Result<()> {
        println!(
            "\n{n} connections from the client ({}) to {CLUSTER_IP}:80:",
            client.ip
        );
        for i in 1..=n {
            crate::interrupt::check("tearing the demo down")?;
            let addr = SocketAddr::from((CLUSTER_IP, 80));
            let g = client
                .ns
                .run(move || tcp_hello(addr, Duration::from_secs(3)))
                .with_context(|| format!("connect to {addr}"))?;
            println!(
                "  request {i}: answered by {} (which saw the client as {})",
                g.pod, g.peer
            );
        }
        Ok(())
    };
    requests(6)?;

    crate::interrupt::check("tearing the demo down")?;
    println!("\nediting the manifests live: pod-3 (10.201.3.2) leaves the EndpointSlice");
    let started = Instant::now();
    agent.change(|a| a.write("web.yaml", &manifest.replace(POD3_ENDPOINT, "")));
    println!(
        "the agent applied the edit after {} ms",
        started.elapsed().as_millis()
    );
    requests(6)?;

    if !keep {
        println!("\ntearing down (agent, pods, namespaces, pins)");
        return Ok(());
    }
    println!("\nputting pod-3 back, so that what stays up is examples/demo as written");
    agent.change(|a| a.write("web.yaml", &manifest));
    let log = agent.log_path().display().to_string();
    let agent_pid = agent.persist().context("the agent is not running")?;
    for p in pods {
        p.persist();
    }
    let names = topo.persist();
    print_keep_help(&names, agent_pid, &log);
    Ok(())
}

fn print_keep_help(names: &[String], agent_pid: u32, log: &str) {
    let ws = workspace();
    let bin = |name: &str| ws.join("target/release").join(name).display().to_string();
    let node = format!("{PREFIX}-node");
    let client = format!("{PREFIX}-c1");
    let manifests = agent::manifests_dir(&node).join("web.yaml");
    println!(
        "
The demo stays up: namespaces {names}
  lb-agent: pid {agent_pid} in {node}, log {log}, manifests {manifests}

Poke at it:
  ip netns exec {client} {client_bin} tcp {CLUSTER_IP}:80 --count 5
  ip netns exec {client} {client_bin} hold {CLUSTER_IP}:80     # type lines: one connection, one pod
  tail -f {log}
  $EDITOR {manifests}                # the agent applies edits live

Run the agent by hand instead (stop the demo's first; the pods and namespaces stay):
  kill {agent_pid}
  ip netns exec {node} {agent_bin} --manifests {examples} --devices '{NODE_DEVICES}'

Tear it all down:
  cargo xtask demo --down",
        names = names.join(" "),
        manifests = manifests.display(),
        client_bin = bin("lbt-client"),
        agent_bin = bin("lb-agent"),
        examples = ws.join("examples/demo").display(),
    );
}

/// Namespaces of a demo left running.
fn leftovers() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{PREFIX}-")))
        .map(str::to_owned)
        .collect()
}

/// Tears down a demo left running: stops every process in its namespaces (the agent, the
/// pod servers, anything started there by hand), deletes the namespaces, and removes the
/// agent's pins, manifests and log.
pub fn down() -> Result<()> {
    if !tests::is_root() {
        bail!("removing the demo's namespaces needs root");
    }
    let names = leftovers();
    let mut pids = Vec::new();
    for ns in &names {
        let out = Command::new("ip").args(["netns", "pids", ns]).output()?;
        pids.extend(
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<libc::pid_t>().ok()),
        );
    }
    signal_and_wait(&pids);
    for ns in &names {
        if !exec("ip", &["netns", "del", ns], &[])? {
            bail!("could not delete namespace {ns}");
        }
    }
    let node = format!("{PREFIX}-node");
    for path in [
        agent::pin_root(&node),
        agent::manifests_dir(&node),
        agent::log_file(&node),
    ] {
        remove(&path)?;
    }
    if names.is_empty() {
        println!("no demo was running");
    } else {
        println!("removed the demo: {}", names.join(" "));
    }
    Ok(())
}

/// SIGTERM (the agent then detaches its programs), up to 3 s to exit, then SIGKILL.
fn signal_and_wait(pids: &[libc::pid_t]) {
    let alive = |pid: &&libc::pid_t| Path::new(&format!("/proc/{pid}")).exists();
    for pid in pids {
        // SAFETY: kill(2); these processes live in the demo's namespaces.
        unsafe { libc::kill(*pid, libc::SIGTERM) };
    }
    let started = Instant::now();
    while pids.iter().any(|p| alive(&p)) && started.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in pids.iter().filter(alive) {
        // SAFETY: as above.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
}

fn remove(path: &Path) -> Result<()> {
    let result = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("remove {}", path.display()))
        }
        _ => Ok(()),
    }
}
