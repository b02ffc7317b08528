//! The guest's initramfs: busybox (static), iproute2's `ip` (veths and namespaces, which
//! busybox's `ip` lacks), the release binaries, the shared libraries `ldd` names for them,
//! the kernel modules, the smoke test, and an init that runs the command and reports its
//! status on the console.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::{kernel::Kernel, tempdir};
use crate::workspace;

/// What goes into `/lbvm`.
pub struct Contents<'a> {
    /// `/lbvm/smoke.sh`.
    pub smoke: &'a str,
    /// `/lbvm/manifests/web.yaml`.
    pub manifest: &'a str,
    /// The command the init runs.
    pub command: &'a [String],
}

/// The binaries of this workspace copied to `/lbvm` (from `target/release`).
const BINARIES: [&str; 3] = ["lb-agent", "lbt-server", "lbt-client"];

/// PID 1. Mounts what the agent and `ip netns` need, loads the modules, runs the command,
/// prints its status and powers off. `lbvm.probe` on the kernel command line stops right
/// after boot (the KVM check).
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LBVM_IP=/usr/sbin/ip
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /sys/fs/bpf /run/netns
mount -t bpf bpffs /sys/fs/bpf
if grep -q lbvm.probe /proc/cmdline; then echo "LBVM-EXIT 0"; poweroff -f; fi
for m in $(cat /lib/modules/load); do
    insmod "/lib/modules/$m" || echo "lbvm: insmod $m failed"
done
echo "lbvm: kernel $(uname -r), $(nproc) CPUs, booted in $(cut -d' ' -f1 /proc/uptime) s"
sh /lbvm/cmd.sh
echo "LBVM-EXIT $?"
poweroff -f
"#;

/// Builds `target/vm/initramfs-RELEASE.cpio` (uncompressed newc: the kernel takes it as
/// is, and it is rebuilt on every run, so compressing would only cost time).
pub fn build(cache: &Path, kernel: &Kernel, contents: &Contents<'_>) -> Result<PathBuf> {
    let root = tempdir("initramfs")?;
    let r = root.path();
    for dir in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "lbvm/manifests",
        "lib/modules",
    ] {
        fs::create_dir_all(r.join(dir))?;
    }
    let busybox = which("busybox")?;
    copy_exec(&busybox, &r.join("bin/busybox"))?;
    let ip = which("ip")?;
    copy_exec(&ip, &r.join("usr/sbin/ip"))?;
    let mut dynamic = vec![ip];
    for name in BINARIES {
        let path = workspace().join("target/release").join(name);
        if !path.is_file() {
            bail!(
                "{} is missing: build with `cargo build --release`",
                path.display()
            );
        }
        copy_exec(&path, &r.join("lbvm").join(name))?;
        dynamic.push(path);
    }
    for binary in &dynamic {
        for lib in shared_libraries(binary)? {
            let dest = r.join(lib.strip_prefix("/").unwrap_or(&lib));
            if !dest.exists() {
                fs::create_dir_all(dest.parent().expect("absolute path"))?;
                fs::copy(&lib, &dest).with_context(|| format!("copying {}", lib.display()))?;
            }
        }
    }
    let mut load = String::new();
    for (i, module) in kernel.modules.iter().enumerate() {
        let name = format!(
            "{i:02}-{}",
            module.file_name().unwrap_or_default().to_string_lossy()
        );
        fs::copy(module, r.join("lib/modules").join(&name))?;
        load.push_str(&name);
        load.push('\n');
    }
    fs::write(r.join("lib/modules/load"), load)?;
    fs::write(r.join("lbvm/smoke.sh"), contents.smoke)?;
    fs::write(r.join("lbvm/manifests/web.yaml"), contents.manifest)?;
    let quoted: Vec<String> = contents
        .command
        .iter()
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect();
    fs::write(r.join("lbvm/cmd.sh"), format!("{}\n", quoted.join(" ")))?;
    fs::write(r.join("init"), INIT)?;
    set_mode(&r.join("init"), 0o755)?;
    let out = cache.join(format!("initramfs-{}.cpio", kernel.release));
    let status = Command::new("sh")
        .args([
            "-c",
            "find . -print0 | cpio --null -o -H newc --quiet > \"$0\"",
        ])
        .arg(&out)
        .current_dir(r)
        .status()
        .context("cannot run find | cpio")?;
    if !status.success() {
        bail!("cpio failed building {}", out.display());
    }
    Ok(out)
}

fn which(name: &str) -> Result<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .with_context(|| format!("looking for {name}"))?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || path.is_empty() {
        bail!("{name} not found on PATH");
    }
    Ok(PathBuf::from(path))
}

fn copy_exec(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    set_mode(to, 0o755)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The shared libraries `ldd` lists for `binary` (with the dynamic loader); none for a
/// static binary.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("cannot run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|line| {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or
            // `/lib64/ld-linux-x86-64.so.2 (0x...)`; vdso has no file.
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}
