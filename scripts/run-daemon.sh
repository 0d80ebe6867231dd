#!/usr/bin/env bash
# Sets up a fresh Debian machine and runs sandboxd: installs dependencies,
# builds release binaries and the sandbox root image (scripts/guest-image.sh;
# jails and microVMs both use it), and on a host that can run Linux microVMs
# the guest kernel too (kernel-config/build.sh), both cached after the first
# run, then serves the gRPC API on 127.0.0.1:50051 (extra arguments go to
# `sandboxd serve`). Needs root for namespaces, cgroups and /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p sandboxd -p sandbox-agent

# True when the arguments after the first name the option $1 (as `$1 X` or `$1=X`).
given() {
  local option=$1 arg
  shift
  for arg in "$@"; do
    case "$arg" in "$option" | "$option"=*) return 0 ;; esac
  done
  return 1
}

images=()
given --rootfs-image "$@" || images+=(--rootfs-image "$(scripts/guest-image.sh)/rootfs.ext4")
# Linux microVMs need a /dev/kvm that is not PVM: PVM (the kvm_pvm module)
# emulates the guest's ring 0 and cannot boot a Linux kernel. Without such a
# /dev/kvm the daemon serves jails, which need no kernel.
if [ -c /dev/kvm ] && [ ! -e /sys/module/kvm_pvm ] && ! given --kernel "$@"; then
  echo "run-daemon: this host can run microVMs; building the guest kernel (minutes on the first run)" >&2
  images+=(--kernel "$(kernel-config/build.sh)/vmlinux")
fi
exec target/release/sandboxd serve --state-dir "${SANDBOXD_STATE_DIR:-/var/lib/sandboxd}" "${images[@]}" "$@"
