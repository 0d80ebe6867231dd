#!/usr/bin/env bash
# The test command: installs dependencies, builds every binary, then runs
# the Rust test suites (unit, ring-3 KVM payloads, snapshots, the guest
# kernel's boot on our VMM, jail end-to-end) and the Python client suite
# against the real daemon. Needs root (jails
# use namespaces and cgroups; the VMM needs /dev/kvm).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

# The guest kernel for the Linux boot smoke test (cached after the first build).
SANDBOXD_KERNEL_DIR=$(kernel-config/build.sh)
export SANDBOXD_KERNEL_DIR SANDBOXD_REQUIRE_KERNEL=1

cargo build --workspace --bins
cargo test --workspace --no-fail-fast
SANDBOXD_BIN="$PWD/target/debug/sandboxd" target/pyenv/bin/python -m pytest -q tests/python
