#!/usr/bin/env bash
# Sets up a fresh Debian machine and runs sandboxd: installs dependencies,
# builds release binaries, and serves the gRPC API on 127.0.0.1:50051
# (extra arguments go to `sandboxd serve`). Needs root for namespaces,
# cgroups and /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p sandboxd -p sandbox-agent
exec target/release/sandboxd serve --state-dir "${SANDBOXD_STATE_DIR:-/var/lib/sandboxd}" "$@"
