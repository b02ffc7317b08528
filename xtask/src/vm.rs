//! `cargo xtask vm`: boots a stock distribution kernel in QEMU with a small initramfs
//! (busybox, iproute2's `ip`, the release `lb-agent`, `lbt-server`, `lbt-client` and the
//! modules the datapath needs) and runs a command in it, by default the smoke test
//! (`vm/smoke.sh`). The guest has no network device: everything happens in namespaces
//! inside it, and its serial console is its only output.
//!
//! The guest's init prints `LBVM-EXIT <status>` when the command ends and powers off; the
//! host reads the console, echoes it, and returns that status. The default kernel,
//! Debian 12's `linux-image-cloud-amd64` (6.1), is fetched with `apt-get download` and
//! unpacked with `dpkg-deb -x` into `target/vm/` (never installed), once.
mod initramfs;
mod kernel;

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{exec, workspace};

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

/// What `cargo xtask vm` was asked.
pub struct Options {
    /// `debian-6.1` or the path of a kernel image.
    pub kernel: String,
    /// Run the quick datapath-cost benchmark instead of the smoke test.
    pub bench: bool,
    /// Seconds before the guest is killed.
    pub timeout: u64,
    /// The command to run in the guest (default: the smoke test).
    pub command: Vec<String>,
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
    if opts.bench {
        bail!(
            "`cargo xtask vm --bench` is not wired yet: the benchmark writes its report into \
             the workspace, which the guest does not have; run `cargo xtask bench --quick` on \
             the host"
        );
    }
    let outcome = smoke_or_command(opts)?;
    match outcome {
        Some(0) => Ok(()),
        Some(code) => bail!("the command in the guest exited with status {code}"),
        None => bail!("the guest did not report an exit status (see its console above)"),
    }
}

fn smoke_or_command(opts: &Options) -> Result<Option<i32>> {
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
    let kernel = kernel::obtain(&opts.kernel)?;
    println!(
        "\nkernel {} ({}), modules: {}",
        kernel.release,
        kernel.image.display(),
        if kernel.modules.is_empty() {
            "none needed".to_owned()
        } else {
            kernel
                .modules
                .iter()
                .map(|m| m.file_name().unwrap_or_default().to_string_lossy())
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let smoke = opts.command.is_empty();
    let command = if smoke {
        vec!["sh".to_owned(), "/lbvm/smoke.sh".to_owned()]
    } else {
        opts.command.clone()
    };
    let cache = workspace().join("target/vm");
    let initrd = initramfs::build(
        &cache,
        &kernel,
        &initramfs::Contents {
            smoke: SMOKE,
            manifest: SMOKE_MANIFEST,
            command: &command,
        },
    )?;
    let (accel, why) = choose_accel(&kernel, &initrd);
    println!("\naccelerator: {accel} ({why})");
    let boot = boot(
        &kernel,
        &initrd,
        accel,
        false,
        Duration::from_secs(opts.timeout),
    )?;
    println!(
        "\nguest exit status: {}, {:.1} s from QEMU start to exit ({accel})",
        boot.status
            .map_or_else(|| "none".to_owned(), |s| s.to_string()),
        boot.took.as_secs_f64()
    );
    if smoke && opts.kernel == kernel::DEBIAN_61 {
        let report = kernel_table(&kernel.release, &boot, accel)?;
        let path = workspace().join("results/kernels.md");
        std::fs::write(&path, report).with_context(|| format!("writing {}", path.display()))?;
        println!("written to {}", path.display());
    }
    Ok(boot.status)
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
        "1024",
        "-smp",
        "2",
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
        match rx.recv_timeout(left) {
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
fn host_smoke() -> Result<String> {
    let scratch = tempdir("lbvm-host")?;
    let manifests = scratch.path().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(manifests.join("web.yaml"), SMOKE_MANIFEST)?;
    let script = scratch.path().join("smoke.sh");
    std::fs::write(&script, SMOKE)?;
    let prefix = format!("lbvm{}", std::process::id());
    let out = Command::new("timeout")
        .args(["120", "sh"])
        .arg(&script)
        .env("LBVM_PREFIX", &prefix)
        .env("LBVM_BIN", workspace().join("target/release"))
        .env("LBVM_BPFFS", format!("/sys/fs/bpf/{prefix}"))
        .env("LBVM_MANIFESTS", &manifests)
        .output()
        .context("running the smoke test on the host")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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

/// `LBVM-FEATURE name<TAB>since<TAB>result` and `LBVM-STEP name ok|FAILED` lines.
struct Parsed {
    features: Vec<(String, String, String)>,
    steps: Vec<(String, bool)>,
}

fn parse(output: &str) -> Parsed {
    let mut parsed = Parsed {
        features: Vec::new(),
        steps: Vec::new(),
    };
    for line in output.lines() {
        if let Some(rest) = line.split_once("LBVM-FEATURE ").map(|(_, r)| r) {
            let mut f = rest.splitn(3, '\t');
            let name = f.next().unwrap_or_default().to_owned();
            let a = f.next().unwrap_or_default().to_owned();
            let b = f.next().unwrap_or_default().to_owned();
            parsed.features.push((name, a, b));
        } else if let Some(rest) = line.split_once("LBVM-STEP ").map(|(_, r)| r)
            && let Some((name, result)) = rest.rsplit_once(' ')
        {
            parsed.steps.push((name.to_owned(), result == "ok"));
        }
    }
    parsed
}

/// results/kernels.md: the guest's and the host's feature probes and smoke steps.
fn kernel_table(guest_release: &str, guest: &Boot, accel: Accel) -> Result<String> {
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    println!("\nrunning the same smoke test on the host kernel ({host_release}) for the table");
    let host_out = host_smoke()?;
    print!("{host_out}");
    let g = parse(&guest.console);
    let h = parse(&host_out);
    let mut md = String::new();
    let _ = writeln!(md, "# Kernels\n");
    let _ = writeln!(
        md,
        "Written by `cargo xtask vm` (the smoke test of `xtask/src/vm/smoke.sh`). The guest\n\
         is Debian 12's stock `linux-image-cloud-amd64` booted in QEMU ({accel}, {:.1} s\n\
         from QEMU's start to power-off); the host column is the machine's own kernel,\n\
         where the same script runs in namespaces. Each feature is probed by\n\
         `lb-agent --kernel-features` (`lb-agent/src/features.rs`); \"since\" is the first\n\
         mainline kernel with it.\n",
        guest.took.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "| feature | since | Debian 6.1 guest ({guest_release}) | host ({host_release}) |"
    );
    let _ = writeln!(md, "|---|---|---|---|");
    let mut names: Vec<&str> = g.features.iter().map(|f| f.0.as_str()).collect();
    for f in &h.features {
        if !names.contains(&f.0.as_str()) {
            names.push(&f.0);
        }
    }
    let cell = |p: &Parsed, name: &str, since: bool| -> String {
        p.features
            .iter()
            .find(|f| f.0 == name)
            .map(|f| if since { f.1.clone() } else { f.2.clone() })
            .unwrap_or_else(|| "-".into())
            .replace('|', "/")
    };
    for name in names {
        let since = if cell(&g, name, true) != "-" {
            cell(&g, name, true)
        } else {
            cell(&h, name, true)
        };
        if matches!(name, "kernel" | "attach") {
            continue;
        }
        let _ = writeln!(
            md,
            "| {name} | {since} | {} | {} |",
            cell(&g, name, false),
            cell(&h, name, false)
        );
    }
    let _ = writeln!(
        md,
        "| **attach method** | | {} | {} |",
        cell(&g, "attach", true),
        cell(&h, "attach", true)
    );
    let _ = writeln!(md, "\n| smoke step | Debian 6.1 guest | host |");
    let _ = writeln!(md, "|---|---|---|");
    let mut steps: Vec<&str> = g.steps.iter().map(|s| s.0.as_str()).collect();
    for s in &h.steps {
        if !steps.contains(&s.0.as_str()) {
            steps.push(&s.0);
        }
    }
    let result = |p: &Parsed, name: &str| match p.steps.iter().find(|s| s.0 == name) {
        Some((_, true)) => "passed",
        Some((_, false)) => "FAILED",
        None => "not run",
    };
    for s in steps {
        let _ = writeln!(md, "| {s} | {} | {} |", result(&g, s), result(&h, s));
    }
    let _ = writeln!(
        md,
        "\nThe host also runs the whole suite (`cargo xtask test`); the guest runs only the\n\
         smoke test. Not yet run in the guest: the end-to-end test binaries and the\n\
         benchmark (`cargo xtask vm --bench`)."
    );
    Ok(md)
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

    #[test]
    fn markers_are_parsed() {
        let p = parse(
            "noise\nLBVM-FEATURE tcx\t6.6\tno (refused)\nLBVM-FEATURE attach\tNetlink\n\
             LBVM-STEP agent-ready ok\nLBVM-STEP clusterip-tcp FAILED\n",
        );
        assert_eq!(
            p.features,
            [
                ("tcx".into(), "6.6".into(), "no (refused)".into()),
                ("attach".into(), "Netlink".into(), String::new()),
            ]
        );
        assert_eq!(
            p.steps,
            [
                ("agent-ready".into(), true),
                ("clusterip-tcp".into(), false)
            ]
        );
    }
}
