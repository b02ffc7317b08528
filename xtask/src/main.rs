//! Developer tasks: `cargo xtask test` (the whole suite), `cargo xtask demo`,
//! `cargo xtask bench` and `cargo xtask vm` (a stock distribution kernel in QEMU).
mod bench;
mod bench_kp;
mod bench_net;
mod bench_plot;
mod bench_profile;
mod bench_rules;
mod bench_tools;
mod demo;
mod interrupt;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(about = "lb developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the whole test suite: formatting, lints, build, unit and BPF packet tests, the
    /// end-to-end tests in network namespaces and the benchmark in quick mode (needs root).
    /// Every stage runs even when an earlier one failed (except after a failed build);
    /// a summary follows, and the exit status is non-zero if anything failed.
    Test {
        /// Extra arguments for each end-to-end test binary, after `--` (e.g. a test name
        /// filter: `cargo xtask test -- udp_flow`).
        #[arg(last = true)]
        e2e_args: Vec<String>,
    },
    /// Bring up a client, a node running lb-agent on examples/demo and three pods, all in
    /// network namespaces; send requests through the ClusterIP, edit the manifests live,
    /// and tear everything down, also on Ctrl-C or failure (needs root).
    Demo {
        /// Leave the demo running and print how to poke at it and how to tear it down.
        #[arg(long, conflicts_with = "down")]
        keep: bool,
        /// Tear down a demo left running by `--keep`.
        #[arg(long)]
        down: bool,
    },
    /// Measure the datapath's cost per packet (BPF_PROG_TEST_RUN), the same Service over
    /// real connections direct, through kube-proxy's iptables and nftables rules and through
    /// lb, and the control plane's sync and change latency beside kube-proxy's; writes
    /// results/bench.md and PNG plots (needs root).
    Bench {
        /// Only this kind of measurement (default: all three).
        #[arg(value_enum)]
        kind: Option<BenchKind>,
        /// Small sizes and few runs (about a minute): what the test suite runs.
        #[arg(long)]
        quick: bool,
        /// The full run with fewer sizes and rounds (about a quarter of an hour).
        #[arg(long, conflicts_with = "quick")]
        medium: bool,
    },
    /// Boot a stock distribution kernel (default: Debian 12's 6.1 cloud kernel, fetched
    /// once into target/vm) in QEMU (KVM when it works, TCG otherwise) with an initramfs
    /// holding the release lb-agent, the test helpers and the netfilter tools, and run in it
    /// the end-to-end test binaries (default), the smoke test (`--smoke`: one ClusterIP
    /// connection through the real agent and an agent restart under a held connection),
    /// the benchmark's quick datapath comparison (`--bench`) or COMMAND; exit with its
    /// status. On debian-6.1 the first two also run on the host, and all three update
    /// results/kernels.md (needs root).
    Vm {
        /// `debian-6.1`, or the path of a kernel image (modules are looked for in
        /// `../lib/modules/RELEASE` beside its `boot/` directory).
        #[arg(long, default_value = "debian-6.1")]
        kernel: String,
        /// Run the smoke test (a few minutes; what `cargo xtask test` runs).
        #[arg(long, conflicts_with_all = ["bench", "command"])]
        smoke: bool,
        /// Run the benchmark's quick datapath comparison in the guest (TCG: the figures
        /// show that each variant runs and their ratios, not the hardware's speed).
        #[arg(long, conflicts_with = "command")]
        bench: bool,
        /// Only this end-to-end test binary (repeatable; e.g. `--test clusterip`).
        #[arg(long = "test", value_name = "BINARY", conflicts_with_all = ["smoke", "bench", "command"])]
        tests: Vec<String>,
        /// Seconds before the guest is killed (default: 300 for the smoke test and a
        /// command, 1800 for the benchmark, 10800 for the end-to-end tests).
        #[arg(long)]
        timeout: Option<u64>,
        /// The command to run in the guest, after `--`.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// The benchmark's quick datapath comparison, printed for the host to read (run by
    /// `vm --bench` inside the guest).
    #[command(hide = true)]
    VmGuestBench,
    /// One control-plane size of the benchmark, in a process of its own (run by `bench`).
    #[command(hide = true)]
    BenchControlOne {
        /// Number of Services.
        #[arg(long)]
        services: usize,
        /// Number of endpoint changes to time.
        #[arg(long)]
        changes: usize,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Test { e2e_args } => test(&e2e_args),
        Task::Demo { keep, down } => {
            if down {
                demo::down()
            } else {
                demo::run(keep)
            }
        }
        Task::Bench {
            kind,
            quick,
            medium,
        } => bench_task(kind, quick, medium),
        Task::Vm {
            kernel,
            smoke,
            bench,
            tests,
            timeout,
            command,
        } => vm::run(&vm::Options {
            kernel,
            mode: if smoke {
                vm::Mode::Smoke
            } else if bench {
                vm::Mode::Bench
            } else if !command.is_empty() {
                vm::Mode::Command(command)
            } else {
                vm::Mode::Suite
            },
            timeout,
            tests,
        }),
        Task::VmGuestBench => vm::guest_bench(),
        Task::BenchControlOne { services, changes } => bench::control_one(services, changes),
    }
}

/// What `cargo xtask bench KIND` measures.
#[derive(Clone, Copy, ValueEnum)]
enum BenchKind {
    /// BPF_PROG_TEST_RUN cost per packet at N Services.
    DatapathCost,
    /// Real connections: direct, kube-proxy iptables and nftables, lb.
    Datapath,
    /// Sync and change latency: lb's and kube-proxy's payloads.
    ControlPlane,
}

fn bench_task(kind: Option<BenchKind>, quick: bool, medium: bool) -> Result<()> {
    if !tests::is_root() {
        bail!("the benchmark loads BPF programs and creates network namespaces: run it as root");
    }
    let plan = if quick {
        bench::Plan::quick()
    } else if medium {
        bench::Plan::medium()
    } else {
        bench::Plan::full()
    };
    let (kinds, tag, arg) = match kind {
        None => (
            bench::Kinds {
                cost: true,
                datapath: true,
                control: true,
            },
            "",
            "",
        ),
        Some(BenchKind::DatapathCost) => (
            bench::Kinds {
                cost: true,
                datapath: false,
                control: false,
            },
            "-datapath-cost",
            " datapath-cost",
        ),
        Some(BenchKind::Datapath) => (
            bench::Kinds {
                cost: false,
                datapath: true,
                control: false,
            },
            "-datapath",
            " datapath",
        ),
        Some(BenchKind::ControlPlane) => (
            bench::Kinds {
                cost: false,
                datapath: false,
                control: true,
            },
            "-control-plane",
            " control-plane",
        ),
    };
    if kinds.datapath
        && !exec(
            "cargo",
            &["build", "--release", "-p", "tests", "--bins"],
            &[],
        )?
    {
        bail!("building lbt-server and lbt-client failed");
    }
    let q = if quick { "-quick" } else { "" };
    let results = workspace().join("results");
    let outputs = bench::Outputs {
        report: results.join(format!("bench{q}{tag}.md")),
        datapath_png: results.join(format!("datapath{q}.png")),
        control_png: results.join(format!("control-plane{q}.png")),
        command: format!(
            "cargo xtask bench{arg}{}",
            if quick {
                " --quick"
            } else if medium {
                " --medium"
            } else {
                ""
            }
        ),
    };
    let report = bench::run(&plan, kinds, &outputs)?;
    println!("\n{report}\nwritten to {}", outputs.report.display());
    Ok(())
}

/// The workspace root.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// `program args` in the workspace root with `env` added, echoed as `$ ENV program ARGS`
/// before it runs. Every command that does a task's work goes through here (read-only
/// queries such as `ip netns list` are not echoed).
fn command(program: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
    let shown: Vec<String> = env
        .iter()
        .map(|(k, v)| format!("{k}={v} "))
        .chain([program.to_owned()])
        .chain(args.iter().map(|a| format!(" {a}")))
        .collect();
    println!("\n$ {}", shown.concat());
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(env.iter().copied())
        .current_dir(workspace());
    cmd
}

/// Runs `program args` (see [`command`]) with the terminal as its stdio; returns whether
/// it succeeded.
fn exec(program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<bool> {
    let status = command(program, args, env)
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    Ok(status.success())
}

/// The stages of a run and how each went; failures are gathered, not fatal.
#[derive(Default)]
struct Stages(Vec<(String, Result<(), String>, Duration)>);

impl Stages {
    /// Runs one stage through [`exec`] and records it.
    fn run(&mut self, name: &str, program: &str, args: &[&str], env: &[(&str, &str)]) -> bool {
        let started = Instant::now();
        let result = match exec(program, args, env) {
            Ok(true) => Ok(()),
            Ok(false) => Err("FAILED".to_owned()),
            Err(e) => Err(format!("FAILED: {e:#}")),
        };
        let ok = result.is_ok();
        self.0.push((name.to_owned(), result, started.elapsed()));
        ok
    }

    /// Records a stage that could not run.
    fn fail(&mut self, name: &str, why: &str) {
        self.0.push((
            name.to_owned(),
            Err(format!("FAILED: {why}")),
            Duration::ZERO,
        ));
    }

    /// Prints the summary table; returns the number of failed stages.
    fn summary(&self) -> usize {
        println!("\n{:<34} {:>8}  result", "stage", "seconds");
        for (name, result, took) in &self.0 {
            let result = match result {
                Ok(()) => "passed",
                Err(e) => e.as_str(),
            };
            println!("{name:<34} {:>8.1}  {result}", took.as_secs_f64());
        }
        self.0.iter().filter(|(_, r, _)| r.is_err()).count()
    }
}

fn test(e2e_args: &[String]) -> Result<()> {
    let mut stages = Stages::default();
    stages.run("format", "cargo", &["fmt", "--all", "--check"], &[]);
    // AYA_BUILD_SKIP: lints need no BPF toolchain (the agent then embeds no object).
    stages.run(
        "clippy",
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--exclude",
            "lb-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[("AYA_BUILD_SKIP", "1")],
    );
    let built = stages.run(
        "build lb-agent (release)",
        "cargo",
        &["build", "--release", "-p", "lb-agent"],
        &[],
    );
    if built {
        // Unit tests, the watch-path tests against the fake apiserver, and the
        // BPF_PROG_TEST_RUN packet tests in lb-agent/tests (those need root too).
        stages.run(
            "unit + packet tests",
            "cargo",
            &[
                "test",
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--exclude",
                "tests",
            ],
            &[],
        );
        end_to_end(&mut stages, e2e_args);
        // The benchmark harness in quick mode, so that it cannot rot.
        if tests::is_root() {
            stages.run(
                "benchmark (quick)",
                "cargo",
                &["run", "--release", "-p", "xtask", "--", "bench", "--quick"],
                &[],
            );
        } else {
            stages.fail(
                "benchmark (quick)",
                "not root: run `cargo xtask test` as root",
            );
        }
        // The oldest kernel the agent supports, in QEMU: Debian 12's stock 6.1 (netlink TC,
        // no tcx). Fails, saying why, when QEMU or the kernel package is missing.
        if tests::is_root() {
            stages.run(
                "vm smoke (debian 6.1)",
                "cargo",
                &[
                    "run",
                    "--release",
                    "-p",
                    "xtask",
                    "--",
                    "vm",
                    "--kernel",
                    "debian-6.1",
                    "--smoke",
                    "--timeout",
                    "240",
                ],
                &[],
            );
        } else {
            stages.fail(
                "vm smoke (debian 6.1)",
                "not root: run `cargo xtask test` as root",
            );
        }
    }
    let failed = stages.summary();
    println!(
        "\nstages: {} passed, {failed} failed",
        stages.0.len() - failed
    );
    if failed > 0 {
        bail!("the test suite failed");
    }
    Ok(())
}

/// The privileged tests of the `tests` crate: built once with `--message-format=json`,
/// then each test binary run on its own (one stage each) with `--test-threads=1`, since
/// the tests share the machine's bpffs and CPU.
fn end_to_end(stages: &mut Stages, e2e_args: &[String]) {
    const STAGE: &str = "end-to-end tests";
    if !tests::is_root() {
        println!(
            "\nthe end-to-end tests create network namespaces and load BPF programs: run `cargo xtask test` as root"
        );
        stages.fail(STAGE, "not root: run `cargo xtask test` as root");
        return;
    }
    let started = Instant::now();
    let binaries = match build_test_binaries() {
        Ok(b) => b,
        Err(e) => {
            println!("{e:#}");
            stages.0.push((
                format!("{STAGE}: build"),
                Err(format!("FAILED: {e:#}")),
                started.elapsed(),
            ));
            return;
        }
    };
    if binaries.is_empty() {
        stages.fail(STAGE, "cargo built no test binary");
        return;
    }
    for (name, path) in binaries {
        let mut args = vec!["--test-threads=1"];
        args.extend(e2e_args.iter().map(String::as_str));
        stages.run(&format!("{STAGE}: {name}"), &path, &args, &[]);
        if name == XDP_TESTS {
            // The same north-south cases with the XDP program in front of TC, in both
            // attach modes.
            for (mode, label) in [("1", "XDP native"), ("generic", "XDP generic")] {
                stages.run(
                    &format!("{STAGE}: {name} ({label})"),
                    &path,
                    &args,
                    &[(tests::XDP_ENV, mode)],
                );
            }
        }
    }
}

/// The end-to-end test binary run once more with the agents' XDP program attached.
pub const XDP_TESTS: &str = "northsouth";

/// Builds the `tests` crate's test binaries (release, `--no-run`) and returns (target
/// name, executable) of each: what `cargo xtask test` runs on the host and `cargo xtask
/// vm` in the guest.
fn build_test_binaries() -> anyhow::Result<Vec<(String, String)>> {
    let out = command(
        "cargo",
        &[
            "test",
            "--release",
            "-p",
            "tests",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ],
        &[],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .output()
    .map_err(|e| anyhow::anyhow!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        anyhow::bail!("building the end-to-end tests failed");
    }
    Ok(test_binaries(&out.stdout))
}

/// (target name, executable) of every test binary in cargo's JSON messages; targets other
/// than integration tests are named with their kind (`tests (lib)`, `lbt-server (bin)`).
fn test_binaries(json: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(json)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == true)
        .filter_map(|m| {
            let name = m["target"]["name"].as_str()?;
            let kind = m["target"]["kind"][0].as_str().unwrap_or("test");
            let name = if kind == "test" {
                name.to_owned()
            } else {
                format!("{name} ({kind})")
            };
            Some((name, m["executable"].as_str()?.to_owned()))
        })
        .collect()
}
