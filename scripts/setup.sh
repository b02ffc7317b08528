#!/usr/bin/env bash
# Installs everything lb needs on a Debian 12 (bookworm) machine and builds the release
# binaries. Run as root from anywhere. Safe to run again: every step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh must run as root (it installs packages and mounts bpffs)" >&2
    exit 1
fi

# Debian packages:
# - rustc-web, cargo-web, libstd-rust-web-dev-bpf: Debian's Rust 1.96 with a precompiled
#   `core` for bpfel-unknown-none, which compiles the eBPF crate (no nightly, no rust-src);
# - llvm-22-dev: the LLVM that bpf-linker links against (the same LLVM as rustc-web);
# - gcc: the linker of every host binary;
# - iproute2, iptables, procps (sysctl), util-linux (nsenter, setpriv): the end-to-end
#   tests' namespaces, veths, FORWARD rule and agent launches;
# - bpftool, nftables, socat, ethtool: for looking at the datapath and its traffic by hand;
# - python3, ca-certificates: general tooling the build and the registries expect;
# - fonts-dejavu-core: the font `cargo xtask bench` draws its PNG plots' text with
#   (nftables and iptables, with its legacy backend, serve the benchmark's kube-proxy
#   variants);
# - iperf3, sockperf: standard load tools; `cargo xtask bench datapath` cross-checks
#   its own figures with iperf3 and sockperf (netperf, the reference, when it is on PATH:
#   Debian 12 does not package it);
# - qemu-system-x86, busybox-static, cpio: `cargo xtask vm`, which boots Debian's 6.1
#   kernel (fetched by its first run with `apt-get download` into target/vm, never
#   installed) with a small initramfs and runs the smoke test in it.
PACKAGES=(rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev gcc
          iproute2 iptables procps util-linux
          bpftool nftables socat ethtool python3 ca-certificates fonts-dejavu-core
          iperf3 sockperf qemu-system-x86 busybox-static cpio)
missing() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}
apt_install() {
    step "installing Debian packages: $*"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}
mapfile -t todo < <(missing "${PACKAGES[@]}")
if [ "${#todo[@]}" -gt 0 ]; then
    apt_install "${todo[@]}"
else
    step "Debian packages already installed"
fi

# Cargo for the host build: rustup's when present (~/.cargo/bin), otherwise Debian's
# cargo-web (/usr/bin/cargo, just installed), which then builds everything. `cargo
# install` puts bpf-linker in ~/.cargo/bin with either.
export PATH="$HOME/.cargo/bin:$PATH:/usr/bin"
step "using $(command -v cargo): $(cargo --version)"

# `cargo xtask test` checks formatting and lints. rustup toolchains ship rustfmt and
# clippy; with Debian's cargo alone, take Debian's.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    apt_install rustfmt-web rust-web-clippy
fi

# The eBPF linker, built against Debian's LLVM 22 (the crates.io default wants LLVM 23).
if ! command -v bpf-linker >/dev/null 2>&1 || ! bpf-linker --version 2>/dev/null | grep -q "0\.13\.0"; then
    step "installing bpf-linker 0.13.0 (a minute or two)"
    LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker --version 0.13.0 \
        --no-default-features --features llvm-22
else
    step "bpf-linker 0.13.0 already installed"
fi

step "checking that Debian's rustc ships the BPF core library"
test -d "$(/usr/bin/rustc --print target-libdir --target bpfel-unknown-none)"

if mountpoint -q /sys/fs/bpf; then
    step "bpffs already mounted at /sys/fs/bpf"
else
    step "mounting bpffs at /sys/fs/bpf"
    mount -t bpf bpffs /sys/fs/bpf
fi

step "building the release binaries (target/release/lb-agent, with the eBPF object embedded)"
cargo build --release

step "done: run the test suite with 'cargo xtask test'"
