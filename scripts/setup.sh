#!/usr/bin/env bash
# Installs everything lb needs on a Debian 12 (bookworm) machine and builds the release
# binaries. Run as root. Safe to run again: every step checks before it acts.
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
# - llvm-22-dev: the LLVM that bpf-linker links against (same LLVM as rustc-web);
# - bpftool, iproute2: inspecting and wiring the datapath;
# - iptables, nftables, socat, ethtool, util-linux (nsenter), python3: the test topology.
PACKAGES=(rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev bpftool iproute2
          iptables nftables socat ethtool util-linux procps python3 ca-certificates gcc)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    step "installing Debian packages: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    step "Debian packages already installed"
fi

# Cargo for the host build: rustup's when present (~/.cargo/bin), otherwise Debian's
# cargo-web (/usr/bin/cargo), which then builds everything.
export PATH="$HOME/.cargo/bin:$PATH"
cargo --version

# The eBPF linker, built against Debian's LLVM 22 (the crates.io default wants LLVM 23).
if ! command -v bpf-linker >/dev/null 2>&1 || ! bpf-linker --version 2>/dev/null | grep -q "0.13.0"; then
    step "installing bpf-linker 0.13.0 (about a minute)"
    LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker --version 0.13.0 \
        --no-default-features --features llvm-22
else
    step "bpf-linker already installed"
fi

step "checking that Debian's rustc ships the BPF core library"
test -d "$(/usr/bin/rustc --print target-libdir --target bpfel-unknown-none)"

if ! mountpoint -q /sys/fs/bpf; then
    step "mounting bpffs at /sys/fs/bpf"
    mount -t bpf bpffs /sys/fs/bpf
fi

step "building the release binaries (target/release/lb-agent, with the eBPF object embedded)"
cargo build --release --workspace --exclude lb-ebpf --exclude tests
cargo build --release -p tests --bins

step "done: run the test suite with 'cargo xtask test'"
