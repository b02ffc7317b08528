//! Developer tasks: `cargo xtask test` (the whole suite), `cargo xtask demo` and
//! `cargo xtask bench`.
mod bench;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "lb developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the whole test suite: formatting, lints, build, unit tests, BPF packet tests
    /// and end-to-end tests in network namespaces (needs root).
    Test {
        /// Extra arguments for the end-to-end test binary (e.g. a test name filter).
        #[arg(last = true)]
        e2e_args: Vec<String>,
    },
    /// Bring up a client, a node running lb-agent on examples/demo, and three pods, all in
    /// network namespaces; send requests through the ClusterIP, edit the manifests live,
    /// and tear everything down (needs root).
    Demo,
    /// Measure the datapath's cost per packet (BPF_PROG_TEST_RUN) and the control plane's
    /// sync and change latency against the real maps; writes results/bench.md (needs root).
    Bench {
        /// Small sizes and few runs (seconds): what the test suite runs.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Test { e2e_args } => test(&e2e_args),
        Task::Demo => demo(),
        Task::Bench { quick } => {
            if !tests::is_root() {
                bail!("the benchmark loads BPF programs: run it as root");
            }
            let plan = if quick {
                bench::Plan::quick()
            } else {
                bench::Plan::full()
            };
            let file = if quick {
                "results/bench-quick.md"
            } else {
                "results/bench.md"
            };
            let report = bench::run(&plan, &workspace().join(file))?;
            println!("\n{report}\nwritten to {file}");
            Ok(())
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Runs `program args` in the workspace with `env`, echoing the command; returns whether
/// it succeeded.
fn exec(program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<bool> {
    let shown: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("\n$ {} {program} {}", shown.join(" "), args.join(" "));
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(workspace())
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    Ok(status.success())
}

fn has_cargo_tool(tool: &str) -> bool {
    Command::new("cargo")
        .args([tool, "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The stages of a run and how each went; every stage runs, failures are gathered.
#[derive(Default)]
struct Stages(Vec<(&'static str, &'static str, Duration)>);

impl Stages {
    fn run(&mut self, name: &'static str, args: &[&str]) -> Result<bool> {
        let started = Instant::now();
        let ok = exec("cargo", args, &[])?;
        self.0.push((
            name,
            if ok { "passed" } else { "FAILED" },
            started.elapsed(),
        ));
        Ok(ok)
    }
}

fn test(e2e_args: &[String]) -> Result<()> {
    let mut stages = Stages::default();
    if has_cargo_tool("fmt") {
        stages.run("format", &["fmt", "--all", "--", "--check"])?;
    } else {
        println!("\ncargo fmt is not installed: formatting not checked");
    }
    if has_cargo_tool("clippy") {
        stages.run(
            "clippy",
            &[
                "clippy",
                "--release",
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        )?;
    } else {
        println!("\ncargo clippy is not installed: lints not checked");
    }
    let built = stages.run(
        "build",
        &["build", "--release", "--workspace", "--exclude", "lb-ebpf"],
    )?;
    if built {
        if !tests::is_root() {
            println!(
                "\nthe BPF packet tests and the end-to-end tests need root: run `cargo xtask test` as root"
            );
            stages.0.push(("root", "FAILED (not root)", Duration::ZERO));
        }
        // Unit tests, and the BPF_PROG_TEST_RUN packet tests in lb-agent/tests.
        stages.run(
            "unit + packet tests",
            &[
                "test",
                "--release",
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--exclude",
                "tests",
            ],
        )?;
        let mut args: Vec<&str> =
            vec!["test", "--release", "-p", "tests", "--", "--test-threads=1"];
        args.extend(e2e_args.iter().map(String::as_str));
        stages.run("end-to-end tests", &args)?;
        // The benchmark harness in quick mode, so that it cannot rot.
        stages.run(
            "benchmark (quick)",
            &["run", "--release", "-p", "xtask", "--", "bench", "--quick"],
        )?;
    }
    println!("\n{:<22} {:<20} {:>8}", "stage", "result", "seconds");
    for (name, result, took) in &stages.0 {
        println!("{name:<22} {result:<20} {:>8.1}", took.as_secs_f64());
    }
    let failed = stages.0.iter().filter(|(_, r, _)| *r != "passed").count();
    if failed > 0 {
        bail!("{failed} stage(s) failed");
    }
    println!("\nall stages passed");
    Ok(())
}

fn demo() -> Result<()> {
    if !tests::is_root() {
        bail!("the demo creates network namespaces and loads BPF programs: run it as root");
    }
    if !exec("cargo", &["build", "--release", "-p", "lb-agent"], &[])? {
        bail!("building lb-agent failed");
    }
    let manifests = std::fs::read_to_string(workspace().join("examples/demo/web.yaml"))?;
    println!(
        "\nbuilding the topology: client 10.200.1.2 -> node (lb-agent) -> pods 10.201.{{1,2,3}}.2"
    );
    let topo = tests::topology::Topology::new(1, 3);
    let _servers: Vec<_> = topo
        .pods
        .iter()
        .enumerate()
        .map(|(i, pod)| tests::servers::tcp(&pod.ns, &format!("pod-{}", i + 1), 8080))
        .collect();
    let agent = tests::agent::Agent::start(&topo.node, &[("web.yaml", &manifests)]);
    println!(
        "lb-agent is running in namespace {} with examples/demo/web.yaml",
        topo.node.name()
    );

    let client = &topo.clients[0];
    let ask = |n: usize| -> Result<BTreeMap<String, usize>> {
        let mut hits = BTreeMap::new();
        for _ in 0..n {
            let pod = client.ns.run(|| -> std::io::Result<String> {
                let s = TcpStream::connect_timeout(
                    &SocketAddr::from((Ipv4Addr::new(10, 96, 0, 10), 80)),
                    Duration::from_secs(3),
                )?;
                let mut line = String::new();
                BufReader::new(s).read_line(&mut line)?;
                Ok(line.trim().to_owned())
            })?;
            *hits
                .entry(pod.split_whitespace().next().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
        Ok(hits)
    };
    let first = client.ns.run(|| -> std::io::Result<String> {
        let s = TcpStream::connect((Ipv4Addr::new(10, 96, 0, 10), 80))?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(line.trim().to_owned())
    })?;
    println!(
        "\n$ connect 10.96.0.10:80 from the client\n  answered: \"{first}\" (pod name, and the client address the pod saw)"
    );
    println!("\n30 connections to 10.96.0.10:80: {:?}", ask(30)?);
    println!("\nediting the manifests live: pod-3 (10.201.3.2) leaves the EndpointSlice");
    let edited = manifests.replace(
        "- addresses: [\"10.201.3.2\"]\n  conditions: {ready: true}\n",
        "",
    );
    agent.change(|a| a.write("web.yaml", &edited));
    println!("30 connections to 10.96.0.10:80: {:?}", ask(30)?);
    println!("\ntearing down (agent, pods, namespaces, pins)");
    Ok(())
}
