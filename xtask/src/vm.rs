//! `cargo xtask vm`: boots a stock distribution kernel in QEMU with a small initramfs
//! (busybox, iproute2's `ip`, the netfilter tools, the release `lb-agent`, `lbt-server`,
//! `lbt-client`, the kernel's networking modules) and runs in it, by default, the
//! end-to-end test binaries of the `tests` package; `--smoke` runs the smoke test
//! (`vm/smoke.sh`, a stage of `cargo xtask test`), `--bench` the benchmark's quick datapath
//! comparison, and `-- COMMAND` any command. The guest has no network device: everything
//! happens in namespaces inside it, and its serial console is its only output.
//!
//! The guest's init prints `LBVM-EXIT <status>` when the command ends and powers off; the
//! host reads the console, echoes it, and returns that status. The default kernel,
//! Debian 12's `linux-image-cloud-amd64` (6.1), is fetched with `apt-get download` and
//! unpacked with `dpkg-deb -x` into `target/vm/` (never installed), once. On that kernel
//! the smoke, suite and benchmark runs also run on the host (the benchmark excepted) and
//! update results/kernels.md (`vm/report.rs`).
mod initramfs;
mod kernel;
mod report;
mod suite;

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

pub use self::suite::guest_bench;
use self::{
    report::{Column, Record},
    suite::TestBinary,
};
use crate::{exec, interrupt, workspace};

/// The smoke test, run in the guest (and on the host for the kernel table).
const SMOKE: &str = include_str!("vm/smoke.sh");
/// The smoke test's one Service: ClusterIP 10.96.0.10:80 -> pod-1 (10.201.0.2:8080).
const SMOKE_MANIFEST: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-smoke
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- addresses: [\"10.201.0.2\"]
  conditions: {ready: true}
ports: [{name: http, port: 8080, protocol: TCP}]
";
/// Printed by the guest's init with the command's exit status.
const EXIT_MARKER: &str = "LBVM-EXIT ";
/// How long a KVM guest may take to reach its init before KVM is declared unusable.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// Guest memory, MiB: the initramfs (binaries, modules) lives in it.
const GUEST_MEMORY: &str = "2048";
/// Guest CPUs.
const GUEST_CPUS: &str = "2";

/// What runs in the guest.
pub enum Mode {
    /// The end-to-end test binaries (the default).
    Suite,
    /// The smoke test.
    Smoke,
    /// The benchmark's quick datapath comparison.
    Bench,
    /// A command of the caller's.
    Command(Vec<String>),
}

impl Mode {
    fn name(&self) -> &'static str {
        match self {
            Self::Suite => "end-to-end tests",
            Self::Smoke => "smoke test",
            Self::Bench => "benchmark (quick datapath)",
            Self::Command(_) => "command",
        }
    }

    /// Seconds before the guest is killed, unless `--timeout` says otherwise.
    fn default_timeout(&self) -> u64 {
        match self {
            Self::Suite => 3 * 3600,
            Self::Bench => 1800,
            Self::Smoke | Self::Command(_) => 300,
        }
    }
}

/// What `cargo xtask vm` was asked.
pub struct Options {
    /// `debian-6.1` or the path of a kernel image.
    pub kernel: String,
    /// What runs in the guest.
    pub mode: Mode,
    /// Seconds before the guest is killed (default: by mode).
    pub timeout: Option<u64>,
    /// Only the test binaries with these names (suite mode).
    pub tests: Vec<String>,
}

/// How QEMU runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's emulator.
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Kvm => "KVM",
            Self::Tcg => "TCG",
        })
    }
}

/// One boot's outcome.
pub struct Boot {
    /// The command's exit status, if the guest printed it.
    pub status: Option<i32>,
    /// The console output.
    pub console: String,
    /// From QEMU's start to the exit marker (or the kill).
    pub took: Duration,
}

/// `cargo xtask vm`.
pub fn run(opts: &Options) -> Result<()> {
    let outcome = run_guest(opts)?;
    match outcome {
        Some(0) => Ok(()),
        Some(code) => bail!(
            "the {} in the guest exited with status {code}",
            opts.mode.name()
        ),
        None => bail!("the guest did not report an exit status (see its console above)"),
    }
}

fn run_guest(opts: &Options) -> Result<Option<i32>> {
    if !::tests::is_root() {
        bail!(
            "`cargo xtask vm` runs the guest's lb-agent as its root and reads /dev/kvm: run it as root"
        );
    }
    for tool in ["qemu-system-x86_64", "cpio", "busybox"] {
        if !has_command(tool) {
            bail!(
                "{tool} is missing: run `bash scripts/setup.sh` (packages qemu-system-x86, cpio, busybox-static)"
            );
        }
    }
    interrupt::catch();
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
        bail!("building lb-agent, lbt-server and lbt-client failed");
    }
    let release = workspace().join("target/release");
    let mut binaries: Vec<PathBuf> = ["lb-agent", "lbt-server", "lbt-client"]
        .iter()
        .map(|b| release.join(b))
        .collect();
    let mut dirs = Vec::new();
    let mut tests = Vec::new();
    let mut xtask = PathBuf::new();
    match &opts.mode {
        Mode::Suite => {
            tests = build_tests(&opts.tests)?;
            binaries.extend(tests.iter().map(|t| t.path.clone()));
            // The CLI tests read the demo's manifests, by a path through `tests/`.
            dirs.push(workspace().join("examples/demo"));
            dirs.push(workspace().join("tests"));
        }
        Mode::Bench => {
            // This very program runs the benchmark in the guest (`vm-guest-bench`).
            xtask = std::env::current_exe().context("finding the xtask binary")?;
            binaries.push(xtask.clone());
        }
        Mode::Smoke | Mode::Command(_) => {}
    }
    interrupt::check("nothing was started")?;
    let kernel = kernel::obtain(&opts.kernel)?;
    println!(
        "\nkernel {} ({}), modules loaded at boot: {}; on demand: {}",
        kernel.release,
        kernel.image.display(),
        if kernel.modules.is_empty() {
            "none".to_owned()
        } else {
            kernel.modules.join(", ")
        },
        kernel
            .module_tree
            .as_ref()
            .map_or_else(|| "none".to_owned(), |t| t.display().to_string())
    );
    let guest_tests: Vec<&TestBinary> = tests
        .iter()
        .filter(|t| suite::guest_skip(&t.name).is_none())
        .collect();
    let skips: Vec<(&str, &str)> = tests
        .iter()
        .filter_map(|t| suite::guest_skip(&t.name).map(|why| (t.name.as_str(), why)))
        .collect();
    let suite_script = suite::script(&guest_tests, &skips, &[], suite::GUEST_LIMIT);
    let command = match &opts.mode {
        Mode::Suite => vec!["sh".to_owned(), "/lbvm/suite.sh".to_owned()],
        Mode::Smoke => vec!["sh".to_owned(), "/lbvm/smoke.sh".to_owned()],
        Mode::Bench => vec!["sh".to_owned(), "/lbvm/bench.sh".to_owned()],
        Mode::Command(c) => c.clone(),
    };
    let bench_script = format!(
        "#!/bin/sh\n\
         # The benchmark's quick datapath comparison, after the feature probes.\n\
         /lbvm/lb-agent --kernel-features --bpffs-root /sys/fs/bpf/lbvm-features \
         --log-level warn 2>&1 | sed 's/^/LBVM-FEATURE /'\n\
         exec {} vm-guest-bench\n",
        xtask.display()
    );
    let cache = workspace().join("target/vm");
    let initrd = initramfs::build(
        &cache,
        &kernel,
        &initramfs::Contents {
            scripts: &[
                ("smoke.sh", SMOKE),
                ("suite.sh", &suite_script),
                ("bench.sh", &bench_script),
            ],
            manifest: SMOKE_MANIFEST,
            binaries: &binaries,
            dirs: &dirs,
            command: &command,
        },
    )?;
    let initrd = Removed(initrd);
    let (accel, why) = choose_accel(&kernel, &initrd.0);
    println!("\naccelerator: {accel} ({why})");
    let timeout = opts.timeout.unwrap_or_else(|| opts.mode.default_timeout());
    let boot = boot(
        &kernel,
        &initrd.0,
        accel,
        false,
        Duration::from_secs(timeout),
    )?;
    drop(initrd);
    println!(
        "\nguest exit status: {}, {:.1} s from QEMU start to exit ({accel})",
        boot.status
            .map_or_else(|| "none".to_owned(), |s| s.to_string()),
        boot.took.as_secs_f64()
    );
    interrupt::check("the guest was stopped")?;
    if opts.kernel == kernel::DEBIAN_61 && !matches!(opts.mode, Mode::Command(_)) {
        record(opts, &kernel.release, &boot, accel, &tests)?;
    }
    Ok(boot.status)
}

/// The integration-test binaries of the `tests` package, built with
/// `--message-format=json` (their names carry a hash); only `names` when given.
fn build_tests(names: &[String]) -> Result<Vec<TestBinary>> {
    let built = crate::build_test_binaries()?;
    // Targets other than integration tests come back named with their kind
    // (`tests (lib)`): unit tests of pure code, not the kernel's business.
    let all: Vec<TestBinary> = built
        .into_iter()
        .filter(|(name, _)| !name.contains(' '))
        .map(|(name, path)| TestBinary {
            name,
            path: PathBuf::from(path),
        })
        .collect();
    if let Some(unknown) = names.iter().find(|n| !all.iter().any(|t| &t.name == *n)) {
        bail!(
            "--test {unknown}: no such test binary (there are: {})",
            all.iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(all
        .into_iter()
        .filter(|t| names.is_empty() || names.contains(&t.name))
        .collect())
}

/// A file removed when dropped (the initramfs image: tens of MiB, rebuilt every run).
struct Removed(PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the same thing on the host (not the benchmark: results/bench.md has the host's)
/// and writes results/kernels.md with this run's records in place of the last ones.
fn record(
    opts: &Options,
    guest_release: &str,
    guest: &Boot,
    accel: Accel,
    tests: &[TestBinary],
) -> Result<()> {
    let mode = match opts.mode {
        // A run of a few binaries keeps the whole run's record beside its own.
        Mode::Suite if !opts.tests.is_empty() => {
            format!("end-to-end tests: {}", opts.tests.join(", "))
        }
        Mode::Suite => "end-to-end tests".to_owned(),
        Mode::Smoke => "smoke test".to_owned(),
        Mode::Bench => "benchmark".to_owned(),
        Mode::Command(_) => return Ok(()),
    };
    let date = today();
    let mut records = report::parse(&guest.console, Column::Guest);
    records.push(run_record(
        Column::Guest,
        &mode,
        &format!("QEMU {accel}, {GUEST_CPUS} vCPUs, {GUEST_MEMORY} MiB"),
        guest_release,
        guest.took,
        &date,
    ));
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let host = match opts.mode {
        Mode::Smoke => Some(host_smoke()?),
        Mode::Suite => Some(host_suite(tests)?),
        Mode::Bench | Mode::Command(_) => None,
    };
    if let Some((output, took)) = host {
        records.extend(report::parse(&output, Column::Host));
        records.push(run_record(
            Column::Host,
            &mode,
            "host (namespaces)",
            &host_release,
            took,
            &date,
        ));
    }
    let path = workspace().join("results/kernels.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let merged = report::merge(report::load(&old), records);
    std::fs::write(&path, report::render(&merged))
        .with_context(|| format!("writing {}", path.display()))?;
    println!("written to {}", path.display());
    Ok(())
}

fn run_record(
    column: Column,
    mode: &str,
    place: &str,
    release: &str,
    took: Duration,
    date: &str,
) -> Record {
    Record {
        column,
        kind: "run".into(),
        fields: vec![
            mode.into(),
            place.into(),
            release.into(),
            format!("{:.0} s", took.as_secs_f64()),
            date.into(),
        ],
    }
}

/// `2026-11-23` (UTC).
fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn has_command(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// KVM when /dev/kvm opens and a guest actually boots under it (nested virtualization
/// can offer /dev/kvm and still hang the guest), TCG otherwise; with the reason.
fn choose_accel(kernel: &kernel::Kernel, initrd: &Path) -> (Accel, String) {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return (Accel::Tcg, format!("/dev/kvm unusable: {e}"));
    }
    match boot(kernel, initrd, Accel::Kvm, true, KVM_PROBE_TIMEOUT) {
        Ok(b) if b.status == Some(0) => (
            Accel::Kvm,
            format!("a probe guest booted in {:.1} s", b.took.as_secs_f64()),
        ),
        Ok(_) => (
            Accel::Tcg,
            format!(
                "/dev/kvm opens, but a guest did not reach its init within {} s under KVM \
                 (nested virtualization?)",
                KVM_PROBE_TIMEOUT.as_secs()
            ),
        ),
        Err(e) => (Accel::Tcg, format!("KVM boot failed: {e:#}")),
    }
}

/// Kills and reaps QEMU when dropped (timeouts, errors, panics).
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots the guest and reads its console until the exit marker, QEMU's end or `timeout`.
/// `probe` makes the guest's init exit right away (the KVM check).
fn boot(
    kernel: &kernel::Kernel,
    initrd: &Path,
    accel: Accel,
    probe: bool,
    timeout: Duration,
) -> Result<Boot> {
    let (accel_arg, cpu) = match accel {
        // The host model's IA32_ARCH_CAPABILITIES cannot always be set under nested KVM.
        Accel::Kvm => ("kvm", "host,-arch-capabilities"),
        Accel::Tcg => ("tcg", "max"),
    };
    let mut append = "console=ttyS0 panic=-1 quiet".to_owned();
    if probe {
        append.push_str(" lbvm.probe");
    }
    let args: Vec<String> = [
        "-accel",
        accel_arg,
        "-cpu",
        cpu,
        "-m",
        GUEST_MEMORY,
        "-smp",
        GUEST_CPUS,
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([kernel.image.display().to_string()])
    .chain(["-initrd".to_owned(), initrd.display().to_string()])
    .chain(["-append".to_owned(), append])
    .collect();
    if !probe {
        println!("\n$ qemu-system-x86_64 {}", args.join(" "));
    }
    let started = Instant::now();
    let child = Command::new("qemu-system-x86_64")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    let mut qemu = Qemu(child);
    let (tx, rx) = mpsc::channel::<String>();
    for stream in [
        qemu.0
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        qemu.0
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).trim_end().to_owned();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut console = String::new();
    let mut status = None;
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            let _ = writeln!(console, "(killed after {} s)", timeout.as_secs());
            if !probe {
                println!(
                    "lbvm: the guest did not finish within {} s; killed",
                    timeout.as_secs()
                );
            }
            break;
        }
        if interrupt::interrupted() {
            println!("lbvm: interrupted; stopping the guest");
            break;
        }
        match rx.recv_timeout(left.min(Duration::from_millis(250))) {
            Ok(line) => {
                let line = printable(&line);
                if !probe {
                    println!("{line}");
                }
                if let Some(rest) = line
                    .find(EXIT_MARKER)
                    .map(|i| &line[i + EXIT_MARKER.len()..])
                {
                    status = rest.trim().parse().ok();
                }
                console.push_str(&line);
                console.push('\n');
                if status.is_some() {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let took = started.elapsed();
    drop(qemu);
    Ok(Boot {
        status,
        console,
        took,
    })
}

/// `line` without terminal escape sequences (the firmware clears the screen) and other
/// control characters, tabs kept (the feature lines are tab-separated).
fn printable(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC [ parameters, ended by a letter; other escapes: one character.
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Runs the smoke test on the host (in namespaces of its own, pins under a bpffs
/// directory of its own), for the host column of the kernel table.
fn host_smoke() -> Result<(String, Duration)> {
    let scratch = tempdir("lbvm-host")?;
    let manifests = scratch.path().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(manifests.join("web.yaml"), SMOKE_MANIFEST)?;
    let script = scratch.path().join("smoke.sh");
    std::fs::write(&script, SMOKE)?;
    let prefix = format!("lbvm{}", std::process::id());
    println!("\nrunning the same smoke test on the host kernel for the table");
    let mut cmd = Command::new("timeout");
    cmd.args(["120", "sh"])
        .arg(&script)
        .env("LBVM_PREFIX", &prefix)
        .env("LBVM_BIN", workspace().join("target/release"))
        .env("LBVM_BPFFS", format!("/sys/fs/bpf/{prefix}"))
        .env("LBVM_MANIFESTS", &manifests);
    echoed(&mut cmd)
}

/// Runs the same test binaries on the host (the ones the guest skips included), for the
/// host column of the kernel table.
fn host_suite(tests: &[TestBinary]) -> Result<(String, Duration)> {
    let scratch = tempdir("lbvm-host")?;
    let script = scratch.path().join("suite.sh");
    let all: Vec<&TestBinary> = tests.iter().collect();
    std::fs::write(&script, suite::script(&all, &[], &[], suite::HOST_LIMIT))?;
    println!("\nrunning the same test binaries on the host kernel for the table");
    let mut cmd = Command::new("sh");
    cmd.arg(&script)
        .env("LBVM_BIN", workspace().join("target/release"))
        .current_dir(workspace().join("tests"));
    echoed(&mut cmd)
}

/// Runs `cmd` with its output echoed as it comes and collected; with the time it took.
fn echoed(cmd: &mut Command) -> Result<(String, Duration)> {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let mut output = String::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line).into_owned();
            println!("{line}");
            output.push_str(&line);
            output.push('\n');
        }
    }
    child.wait()?;
    Ok((output, started.elapsed()))
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(tag: &str) -> Result<TempDir> {
    let dir = workspace()
        .join("target/vm/tmp")
        .join(format!("{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(TempDir(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_lose_escapes_but_keep_tabs() {
        assert_eq!(
            printable("\u{1b}c\u{1b}[?7l\u{1b}[2Jlbvm: up\r"),
            "lbvm: up"
        );
        assert_eq!(printable("a\tb"), "a\tb");
    }
}
