//! The guest kernel: Debian's package, fetched and unpacked once into `target/vm/`, or a
//! kernel image given by path; and the modules the datapath needs from it.
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::workspace;

/// `--kernel debian-6.1`: Debian 12's cloud kernel.
pub const DEBIAN_61: &str = "debian-6.1";
/// The metapackage that depends on the current versioned image package.
const DEBIAN_META: &str = "linux-image-cloud-amd64";
/// Modules the guest needs (veth pairs, the clsact qdisc and cls_bpf for netlink TC), by
/// module name and kernel config symbol. Built-in ones need nothing.
const MODULES: [(&str, &str); 3] = [
    ("veth", "CONFIG_VETH"),
    ("sch_ingress", "CONFIG_NET_SCH_INGRESS"),
    ("cls_bpf", "CONFIG_NET_CLS_BPF"),
];

/// A kernel ready to boot.
pub struct Kernel {
    /// `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// The bzImage.
    pub image: PathBuf,
    /// Modules to load at boot (`modprobe NAME`), in order.
    pub modules: Vec<String>,
    /// `lib/modules/RELEASE` for the guest: the modules, decompressed, with `modules.dep`
    /// and `modules.alias` (none for a bare image).
    pub module_tree: Option<PathBuf>,
}

/// Resolves `--kernel`: `debian-6.1` (downloaded and unpacked on first use) or a path to a
/// kernel image, whose modules are looked for in `../lib/modules/RELEASE` beside a
/// `boot/` directory.
pub fn obtain(spec: &str) -> Result<Kernel> {
    let (image, tree) = if spec == DEBIAN_61 {
        let tree = debian_tree()?;
        let image = fs::read_dir(tree.join("boot"))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .context("the unpacked kernel package has no boot/vmlinuz-*")?;
        (image, Some(tree))
    } else {
        let image = PathBuf::from(spec);
        if !image.is_file() {
            bail!("--kernel {spec}: neither `{DEBIAN_61}` nor a kernel image file");
        }
        let tree = image
            .parent()
            .filter(|b| b.file_name().is_some_and(|n| n == "boot"))
            .and_then(Path::parent)
            .map(Path::to_path_buf);
        (image, tree)
    };
    let release = image
        .file_name()
        .and_then(|n| {
            n.to_string_lossy()
                .strip_prefix("vmlinuz-")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let (modules, module_tree) = match &tree {
        Some(tree) if !release.is_empty() => modules(tree, &release)?,
        _ => (Vec::new(), None),
    };
    Ok(Kernel {
        release,
        image,
        modules,
        module_tree,
    })
}

/// `target/vm/debian-6.1/`: the unpacked image package. Fetched when missing; a marker file
/// written last makes an interrupted fetch start over.
fn debian_tree() -> Result<PathBuf> {
    let base = workspace().join("target/vm");
    let tree = base.join(DEBIAN_61);
    let done = base.join(format!("{DEBIAN_61}.unpacked"));
    if done.exists() && tree.is_dir() {
        return Ok(tree);
    }
    let _ = fs::remove_dir_all(&tree);
    let download = base.join(format!("{DEBIAN_61}.download"));
    let _ = fs::remove_dir_all(&download);
    fs::create_dir_all(&download)?;
    println!(
        "\nfetching Debian's {DEBIAN_META} (once; cached in {})",
        tree.display()
    );
    apt_download(&download, DEBIAN_META)?;
    let meta = find_deb(&download, DEBIAN_META)?;
    let depends = run_out(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&meta)
            .arg("Depends"),
    )?;
    let image_pkg = depends
        .split(',')
        .map(|d| d.split_whitespace().next().unwrap_or_default())
        .find(|d| d.starts_with("linux-image-") && *d != DEBIAN_META)
        .with_context(|| format!("{DEBIAN_META} depends on no linux-image-*: {depends}"))?
        .to_owned();
    apt_download(&download, &image_pkg)?;
    let deb = find_deb(&download, &image_pkg)?;
    fs::create_dir_all(&tree)?;
    run_out(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    fs::write(&done, format!("{image_pkg}\n"))?;
    let _ = fs::remove_dir_all(&download);
    Ok(tree)
}

fn apt_download(dir: &Path, package: &str) -> Result<()> {
    let status = Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(dir)
        .status()
        .context("cannot run apt-get")?;
    if !status.success() {
        bail!("`apt-get download {package}` failed (run `apt-get update` first?)");
    }
    Ok(())
}

fn find_deb(dir: &Path, package: &str) -> Result<PathBuf> {
    fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .with_context(|| format!("apt-get download {package} left no .deb"))
}

fn run_out(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Module families shipped beside [`MODULES`] so that the guest kernel can load them on
/// demand (`request_module` -> busybox `modprobe` -> `modules.dep` / `modules.alias`):
/// netfilter for the tests' iptables rules and conntrack and for kube-proxy's rules in the
/// benchmark, the bridge of the two-node tests, and the TC qdiscs and classifiers.
const FAMILIES: [&str; 7] = [
    "kernel/net/netfilter/",
    "kernel/net/ipv4/netfilter/",
    "kernel/net/ipv6/netfilter/",
    "kernel/net/bridge/",
    "kernel/net/sched/",
    "kernel/net/802/",
    "kernel/net/llc/",
];

/// The guest's module tree: the modules of [`MODULES`] that the kernel's config builds as
/// modules (the ones to load at boot, by name) and the [`FAMILIES`], each with its
/// dependencies (from each file's `.modinfo` `depends=`), decompressed into
/// `target/vm/modules/RELEASE/lib/modules/RELEASE/` with busybox's `depmod` index. Built
/// once per release (a marker written last makes an interrupted build start over).
fn modules(tree: &Path, release: &str) -> Result<(Vec<String>, Option<PathBuf>)> {
    let config =
        fs::read_to_string(tree.join(format!("boot/config-{release}"))).unwrap_or_default();
    let dir = tree.join("lib/modules").join(release);
    let mut files = Vec::new();
    index(&dir.join("kernel"), &mut files);
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    let mut load = Vec::new();
    for (name, symbol) in MODULES {
        let setting = config
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{symbol}=")))
            .unwrap_or("");
        match setting {
            "y" => continue,
            "m" => {}
            // No config in the tree (a bare image): load it if the file is there.
            "" if config.is_empty() => {}
            _ => bail!("kernel {release} lacks {symbol} (needed for {name})"),
        }
        add_module(name, &files, &mut seen, &mut order, release)?;
        load.push(name.to_owned());
    }
    if files.is_empty() {
        return Ok((load, None));
    }
    let staged = workspace().join("target/vm/modules").join(release);
    let root = staged.join("lib/modules").join(release);
    let done = staged.join(".complete");
    if done.exists() {
        return Ok((load, Some(root)));
    }
    for path in &files {
        let rel = path.strip_prefix(&dir).unwrap_or(path).to_string_lossy();
        if FAMILIES.iter().any(|f| rel.starts_with(f)) && rel.contains(".ko") {
            let name = module_name(path);
            add_module(&name, &files, &mut seen, &mut order, release)?;
        }
    }
    let _ = fs::remove_dir_all(&staged);
    for path in &order {
        let rel = path.strip_prefix(&dir).unwrap_or(path);
        let out = root.join(rel.parent().unwrap_or(Path::new("")));
        fs::create_dir_all(&out)?;
        decompressed(path, &out)?;
    }
    for file in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        if dir.join(file).is_file() {
            fs::copy(dir.join(file), root.join(file))?;
        }
    }
    let status = Command::new("busybox")
        .arg("depmod")
        .arg("-b")
        .arg(&staged)
        .arg(release)
        .status()
        .context("cannot run busybox depmod")?;
    if !status.success() {
        bail!("busybox depmod -b {} {release} failed", staged.display());
    }
    fs::write(&done, format!("{} modules\n", order.len()))?;
    Ok((load, Some(root)))
}

/// `.../nf_conntrack.ko.xz` -> `nf_conntrack`.
fn module_name(path: &Path) -> String {
    let n = path.file_name().unwrap_or_default().to_string_lossy();
    n.split(".ko").next().unwrap_or_default().to_owned()
}

fn index(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            index(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// `veth` -> `.../veth.ko` (or `.ko.xz`, `.ko.zst`, `.ko.gz`); `-` and `_` are the same.
fn module_file<'a>(name: &str, files: &'a [PathBuf]) -> Option<&'a PathBuf> {
    let want = name.replace('-', "_");
    files.iter().find(|p| {
        let n = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let stem = n.split(".ko").next().unwrap_or_default().replace('-', "_");
        n.contains(".ko") && stem == want
    })
}

fn add_module(
    name: &str,
    files: &[PathBuf],
    seen: &mut BTreeSet<String>,
    order: &mut Vec<PathBuf>,
    release: &str,
) -> Result<()> {
    if !seen.insert(name.to_owned()) {
        return Ok(());
    }
    let path = module_file(name, files)
        .with_context(|| format!("kernel {release}: module {name} not found"))?
        .clone();
    let bytes = read_module(&path)?;
    for dep in depends(&bytes) {
        add_module(&dep, files, seen, order, release)?;
    }
    order.push(path);
    Ok(())
}

/// The module's bytes, decompressed.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some(tool) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("cannot run {tool} to decompress {}", path.display()))?;
            if !out.status.success() {
                bail!("{tool} -dc {} failed", path.display());
            }
            Ok(out.stdout)
        }
    }
}

/// `depends=a,b` from the `.modinfo` section (NUL-separated `key=value` strings).
fn depends(module: &[u8]) -> Vec<String> {
    module
        .split(|b| *b == 0)
        .find_map(|s| s.strip_prefix(b"depends="))
        .map(|d| {
            String::from_utf8_lossy(d)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// A plain `.ko` of `path` in `out`, for `insmod` in the guest.
fn decompressed(path: &Path, out: &Path) -> Result<PathBuf> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let plain = out.join(format!(
        "{}.ko",
        name.split(".ko").next().unwrap_or_default()
    ));
    fs::write(&plain, read_module(path)?)?;
    Ok(plain)
}
