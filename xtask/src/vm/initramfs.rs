//! The guest's initramfs: busybox (static), iproute2's `ip` (veths and namespaces, which
//! busybox's `ip` lacks), the netfilter tools the tests and the benchmark call
//! (`iptables-nft`, `iptables-legacy`, `nft` and the xtables plugins they load), util-linux's
//! `nsenter` and `setpriv`, this workspace's release binaries, the shared libraries `ldd`
//! names for all of them, the kernel's module tree with busybox `modprobe` for the kernel's
//! on-demand loading, the guest scripts, and an init that runs the command and reports its
//! status on the console.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::{kernel::Kernel, tempdir};

/// What goes into the guest besides the fixed tools.
pub struct Contents<'a> {
    /// Files of `/lbvm`: (name, content), e.g. the smoke test.
    pub scripts: &'a [(&'a str, &'a str)],
    /// `/lbvm/manifests/web.yaml`.
    pub manifest: &'a str,
    /// Executables of this workspace's build, each placed at its own absolute path (the
    /// test binaries and the benchmark find `target/release/lb-agent` and the helpers by
    /// it), with a `/lbvm/NAME` link.
    pub binaries: &'a [PathBuf],
    /// Directories of the workspace copied to the same path (the CLI tests read
    /// `examples/demo`).
    pub dirs: &'a [PathBuf],
    /// The command the init runs.
    pub command: &'a [String],
}

/// Tools copied from this machine (same Debian release as the guest's userland needs):
/// name on PATH, and whether the guest cannot do without it.
const TOOLS: [(&str, bool); 10] = [
    ("ip", true),
    // The netlink TC test lists the agent's filters.
    ("tc", false),
    // The node's `ctstate INVALID` rule, the agent's masquerade rule.
    ("iptables-nft", false),
    ("iptables-nft-save", false),
    ("iptables-nft-restore", false),
    // kube-proxy's iptables rules in the benchmark.
    ("iptables-legacy-restore", false),
    ("iptables-legacy-save", false),
    ("nft", false),
    // Busybox's applets lack `--net=` on some builds and the capability names (`bpf`,
    // `perfmon`) the tests use.
    ("nsenter", false),
    ("setpriv", false),
];

/// Plugins `iptables` loads with dlopen (not in `ldd`'s list).
const XTABLES_PLUGINS: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// PID 1. Mounts what the agent and `ip netns` need, loads the modules, runs the command,
/// prints its status and powers off. `lbvm.probe` on the kernel command line stops right
/// after boot (the KVM check).
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LBVM_IP=/usr/sbin/ip
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# /tmp stays on the initramfs (in memory already): a tmpfs there would hide the
# workspace's binaries of a checkout under /tmp, which sit at their own paths.
mkdir -p /tmp && chmod 1777 /tmp
mount -t tmpfs tmpfs /run
mkdir -p /sys/fs/bpf /run/netns /sys/fs/cgroup
mount -t bpf bpffs /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
if grep -q lbvm.probe /proc/cmdline; then echo "LBVM-EXIT 0"; poweroff -f; fi
hostname lbvm
/usr/sbin/ip link set lo up
# The kernel loads what the tools ask for (netfilter matches and tables, qdiscs) through
# this helper, from modules.dep and modules.alias.
echo /sbin/modprobe >/proc/sys/kernel/modprobe
for m in $(cat /lib/modules/load); do
    modprobe "$m" || echo "lbvm: modprobe $m failed"
done
echo "lbvm: kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) MiB, booted in $(cut -d' ' -f1 /proc/uptime) s"
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
        "etc",
        "lbvm/manifests",
        "lib/modules",
    ] {
        fs::create_dir_all(r.join(dir))?;
    }
    let busybox = which("busybox")?;
    copy_exec(&busybox, &r.join("bin/busybox"))?;
    symlink("/bin/busybox", &r.join("sbin/modprobe"))?;
    let mut dynamic = Vec::new();
    let mut missing = Vec::new();
    for (tool, required) in TOOLS {
        match which(tool) {
            Ok(path) => dynamic.push(place_tool(&path, r)?),
            Err(_) if !required => missing.push(tool),
            Err(e) => return Err(e),
        }
    }
    if !missing.is_empty() {
        println!(
            "lbvm: not on this machine, so not in the guest: {} (scripts/setup.sh installs them)",
            missing.join(", ")
        );
    }
    let plugins = Path::new(XTABLES_PLUGINS);
    if plugins.is_dir() {
        copy_dir(plugins, &under(r, plugins))?;
    }
    // The agent's Kubernetes client loads the system's CA certificates even for a
    // kubeconfig that names its own.
    for file in [
        "/etc/protocols",
        "/etc/services",
        "/etc/ssl/certs/ca-certificates.crt",
    ] {
        let file = Path::new(file);
        if file.is_file() {
            let dest = under(r, file);
            fs::create_dir_all(dest.parent().expect("absolute path"))?;
            fs::copy(file, dest)?;
        }
    }
    fs::write(r.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(r.join("etc/group"), "root:x:0:\n")?;
    for binary in contents.binaries {
        if !binary.is_file() {
            bail!(
                "{} is missing: build with `cargo build --release`",
                binary.display()
            );
        }
        let dest = under(r, binary);
        fs::create_dir_all(dest.parent().expect("absolute path"))?;
        copy_exec(binary, &dest)?;
        let name = binary.file_name().expect("a file name");
        symlink(binary, &r.join("lbvm").join(name))?;
        dynamic.push(binary.clone());
    }
    for dir in contents.dirs {
        copy_dir(dir, &under(r, dir))?;
    }
    for binary in &dynamic {
        for lib in shared_libraries(binary)? {
            let dest = under(r, &lib);
            if !dest.exists() {
                fs::create_dir_all(dest.parent().expect("absolute path"))?;
                fs::copy(&lib, &dest).with_context(|| format!("copying {}", lib.display()))?;
            }
        }
    }
    if let Some(tree) = &kernel.module_tree {
        copy_dir(tree, &r.join("lib/modules").join(&kernel.release))?;
    }
    fs::write(r.join("lib/modules/load"), kernel.modules.join("\n") + "\n")?;
    for (name, content) in contents.scripts {
        fs::write(r.join("lbvm").join(name), content)?;
    }
    fs::write(r.join("lbvm/manifests/web.yaml"), contents.manifest)?;
    fs::write(
        r.join("lbvm/cmd.sh"),
        format!("{}\n", shell_words(contents.command)),
    )?;
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

/// `args` quoted for `sh`.
pub fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `path` (absolute) inside the tree at `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Copies a tool found at `path` to the same place in the guest; a link (`iptables-nft`
/// -> `xtables-nft-multi`, which looks at its name) stays a link beside its target.
/// Returns the file to give to `ldd`.
fn place_tool(path: &Path, root: &Path) -> Result<PathBuf> {
    let real = fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
    let dir = real.parent().expect("absolute path");
    let dest = under(root, &real);
    fs::create_dir_all(under(root, dir))?;
    if !dest.exists() {
        copy_exec(&real, &dest)?;
    }
    let name = path.file_name().expect("a file name");
    if real.file_name() != Some(name) {
        let link = under(root, &dir.join(name));
        if !link.exists() {
            symlink(real.file_name().expect("a file name"), &link)?;
        }
    }
    // Also in /usr/sbin, first on the guest's PATH and where the guest scripts name `ip`
    // (busybox's shell would take its own applet for a bare name).
    let link = root.join("usr/sbin").join(name);
    if fs::symlink_metadata(&link).is_err() {
        symlink(dir.join(name), &link)?;
    }
    Ok(real)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let (src, dest) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_dir(&src, &dest)?;
        } else if kind.is_symlink() {
            symlink(fs::read_link(&src)?, &dest)?;
        } else {
            fs::copy(&src, &dest).with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}

fn symlink(target: impl AsRef<Path>, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target.as_ref(), link)
        .with_context(|| format!("linking {}", link.display()))
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
