#!/usr/bin/env bash
# Checks that every target of the workspace compiles for aarch64 (`cargo check`, warnings as errors):
# the x86-64 kernels sit behind `cfg(target_arch = "x86_64")` and the portable paths must stand alone.
# rustup here has only x86-64's standard library, so this uses Debian's rustc-web (1.96), whose
# aarch64 standard library Debian ships, and clang as the C/C++ cross compiler of the -sys crates:
# Debian 12's aarch64 GCC 12 fails on numkong's NEON dot-product code (usearch's dependency).
# Installs what it needs from Debian's packages on first use (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! [ -d /usr/lib/rustlib/aarch64-unknown-linux-gnu ] || ! command -v clang-19 >/dev/null; then
    dpkg --add-architecture arm64
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        rustc-web cargo-web libstd-rust-web-dev:arm64 clang-19 g++-aarch64-linux-gnu libc6-dev-arm64-cross
fi
export PATH="/usr/bin:$PATH" RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTFLAGS="-D warnings" \
    CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/aarch64-check" \
    CC_aarch64_unknown_linux_gnu=clang-19 CXX_aarch64_unknown_linux_gnu=clang++-19 \
    AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
/usr/bin/cargo check --locked --workspace --all-targets --target aarch64-unknown-linux-gnu
