//! Builds the eBPF object (`lb-ebpf`, bin `lb`) with Debian's rustc-web and embeds it.
//!
//! See ../shared/TOOLCHAIN.md: the BPF target is compiled by the toolchain at
//! `LB_EBPF_TOOLCHAIN` (default `/usr`, Debian's rustc-web, which ships a precompiled
//! `core` for bpfel-unknown-none) and linked by bpf-linker. `AYA_BUILD_SKIP=1` skips the
//! eBPF build so that check/clippy/unit tests work without a BPF toolchain; the agent then
//! needs `--ebpf-object PATH` at run time.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    println!("cargo::rustc-check-cfg=cfg(embedded_obj)");
    println!("cargo::rerun-if-env-changed=AYA_BUILD_SKIP");
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        return Ok(());
    }
    println!("cargo::rustc-cfg=embedded_obj");
    println!("cargo::rerun-if-env-changed=LB_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("LB_EBPF_TOOLCHAIN").unwrap_or_else(|_| "/usr".to_owned());
    println!("cargo::rerun-if-env-changed=RUSTC_BOOTSTRAP");
    if std::env::var_os("RUSTC_BOOTSTRAP").is_none() {
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf") };
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("package lb-ebpf not found in the workspace"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("lb-ebpf has no directory"))?;
    // Rebuild when the datapath or the shared types change.
    println!("cargo::rerun-if-changed={root}/src");
    println!("cargo::rerun-if-changed={root}/../lb-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}
