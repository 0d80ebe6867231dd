#!/usr/bin/env bash
# Builds the sandbox root image both backends use: a Debian bookworm made
# from Debian's packages with mmdebstrap (nothing is copied from this host),
# the static sandbox-agent as /sbin/init, the users root and
# user (1000:1000, home /home/user) and the hostname sandbox. MicroVMs boot
# it as their disk (root=/dev/vda, the agent as PID 1 mounts /proc and the
# rest); jails mount it read-only as their `/`, so every mountpoint they use
# exists in it (/proc /sys /dev /tmp /run /run/sandbox /home/user /root
# /.sandbox).
#
#   scripts/guest-image.sh [full|small]   (default: $SANDBOXD_GUEST_FLAVOUR, else full)
#
# Flavours:
#   full   what an agent expects of a code sandbox: bash, coreutils, python3
#          with pip, numpy, pandas, matplotlib, ipykernel (and jupyter_client,
#          which the agent's kernel driver uses), node with npm, git, curl, and
#          bash_kernel (a pinned PyPI wheel, checked by its hash) for bash code
#          contexts. The default template.
#   small  python3, nodejs, ca-certificates, procps and the usual shell tools:
#          for the nested Linux-guest suite, which copies the image into a
#          nested host's initramfs (SANDBOXD_GUEST_FLAVOUR=small).
#
# Two caches under ${SANDBOXD_CACHE:-$HOME/.cache/sandboxd}/guest-image:
#   base-KEY.tar  the Debian tree, keyed by the suite, the package list and
#                 the base recipe below (slow: downloads packages; rare)
#   KEY/          rootfs.ext4 and packages.txt, keyed by the base key, the
#                 image recipe and the agent binary (fast: unpack, add the
#                 agent, mkfs.ext4 -d)
# Each is written under a temporary name and renamed when complete.
# Prints the output dir on stdout; progress goes to stderr. Building needs
# root (mmdebstrap makes root-owned files); using a cached image does not.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${SANDBOXD_CACHE:-$HOME/.cache/sandboxd}/guest-image

flavour=${1:-${SANDBOXD_GUEST_FLAVOUR:-full}}
suite=bookworm
packages=(python3 nodejs ca-certificates procps less curl xz-utils bzip2 unzip)
# PyPI wheels installed with pip --require-hashes (name==version --hash=sha256:...).
wheels=()
case "$flavour" in
  small) ;;
  full)
    packages+=(bash coreutils python3-pip python3-numpy python3-pandas python3-matplotlib python3-ipykernel
      python3-jupyter-client python3-pexpect python3-filetype npm git)
    wheels+=('bash_kernel==0.10.0 --hash=sha256:da28513230f5307c7a49e87352366304dc52b66faa207d6caed1b2bdec03c1fa')
    ;;
  *) echo "guest-image: unknown flavour '$flavour': use full or small" >&2; exit 2 ;;
esac
# Paths dpkg never unpacks: documentation (but the copyright notices), man
# and info pages, translations. The C.UTF-8 locale lives in /usr/lib/locale.
dpkg_options=(
  'path-exclude=/usr/share/doc/*' 'path-include=/usr/share/doc/*/copyright'
  'path-exclude=/usr/share/man/*' 'path-exclude=/usr/share/info/*'
  'path-exclude=/usr/share/locale/*' 'path-exclude=/usr/share/lintian/*'
)
# Bounded network waits, so a dead mirror fails the build instead of hanging it.
apt_options=('Acquire::Retries "2"' 'Acquire::http::Timeout "30"' 'Acquire::https::Timeout "30"')
bootstrap_deadline_s=1200
lock_deadline_s=1800
# Free space left in the image for what a microVM writes to its root disk.
headroom_mib=128

log() { echo "guest-image: $*" >&2; }

# Installs the Debian tree into the empty directory $1.
bootstrap_debian() {
  local include arg args=()
  include=$(IFS=,; echo "${packages[*]}")
  for arg in "${dpkg_options[@]}"; do args+=(--dpkgopt="$arg"); done
  for arg in "${apt_options[@]}"; do args+=(--aptopt="$arg"); done
  # unshare mode as root keeps mmdebstrap's mounts in a private mount
  # namespace: they vanish with it, even when the build is killed. The
  # merged-usr hook makes the /usr symlinks itself, so the usrmerge package
  # (and the whole of perl it needs) stays out.
  timeout --kill-after=30 "$bootstrap_deadline_s" \
    mmdebstrap --mode=unshare --variant=minbase --include="$include" "${args[@]}" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr "$suite" "$1" >&2
}

# Installs the pinned wheels into the tree $1 (their dependencies come
# from Debian): the host's pip downloads them, checking their hashes, with
# the host's own index and CA settings, and the tree's pip installs the files.
install_wheels() {
  [ ${#wheels[@]} -gt 0 ] || return 0
  mkdir "$1/tmp/wheels"
  printf '%s\n' "${wheels[@]}" > "$1/tmp/wheels.txt"
  timeout --kill-after=30 600 python3 -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
    --disable-pip-version-check --dest "$1/tmp/wheels" -r "$1/tmp/wheels.txt" >&2
  chroot "$1" sh -c 'python3 -m pip install --quiet --no-index --no-deps --no-cache-dir --break-system-packages \
    --disable-pip-version-check /tmp/wheels/*.whl' >&2
  rm -r "$1/tmp/wheels" "$1/tmp/wheels.txt"
}

# Makes the tree in $1 a sandbox root: users, names, mountpoints, no host
# files, nothing that only takes space.
shape_root() {
  local root=$1
  chroot "$root" groupadd --gid 1000 user
  chroot "$root" useradd --uid 1000 --gid 1000 --home-dir /home/user --create-home --shell /bin/bash user
  chroot "$root" pwck --read-only --quiet
  chroot "$root" grpck --read-only
  echo sandbox > "$root/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\tsandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
  # mmdebstrap copies the host's resolver configuration; nothing of the host stays.
  rm -f "$root/etc/resolv.conf"
  # The backends mount /dev; the image holds no device nodes of its own.
  find "$root/dev" -mindepth 1 -delete
  mkdir -p "$root"/{proc,sys,dev,tmp,run/sandbox,root,.sandbox}
  chmod 1777 "$root/tmp"
  chmod 0700 "$root/root"
  # Root inside comes from the API (Exec as root), never from a setuid file.
  find "$root" -xdev -type f -perm /6000 -exec chmod ug-s {} +
  # The small flavour keeps byte code only for the few modules every python3
  # start imports (32 KiB): without them each start compiles them again,
  # ~6 ms of its ~18 ms. The full one keeps what Debian compiled, since the
  # root is read-only in a jail and a kernel importing numpy, pandas and
  # matplotlib from source would take seconds each time.
  if [ "$flavour" = small ]; then
    find "$root" -xdev -name __pycache__ -type d -prune -exec rm -rf {} +
    env -u PYTHONDONTWRITEBYTECODE chroot "$root" python3 -c pass
  else
    chroot "$root" python3 -m compileall -q /usr/local/lib >&2
  fi
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old
  find "$root/var/log" -type f -delete
}

# Writes the Debian base tarball $2 (and its package list $3) from the work dir $1.
build_base() {
  local work=$1 root=$1/root
  mkdir "$root"
  bootstrap_debian "$root"
  install_wheels "$root"
  shape_root "$root"
  chroot "$root" dpkg-query -W -f '${Package} ${Version}\n' > "$work/packages.txt"
  tar --numeric-owner --xattrs --xattrs-include='*' -C "$root" -cf "$work/base.tar" .
  mv "$work/packages.txt" "$3"
  mv "$work/base.tar" "$2"
  rm -rf --one-file-system "$root"
}

# Writes rootfs.ext4 and packages.txt into the empty directory $1 from the
# base tarball $2 (package list $3) and the agent $4.
build_image() {
  local out=$1 root=$1/root size_mib
  mkdir "$root"
  tar --numeric-owner --xattrs --xattrs-include='*' -C "$root" -xpf "$2"
  # The image's copy goes without its line tables (most of its 30 MiB); its
  # symbols stay, so backtraces still name functions.
  strip --strip-debug -o "$root/usr/sbin/init" "$4"
  chmod 0755 "$root/usr/sbin/init"
  size_mib=$(( $(du -sm "$root" | cut -f1) * 11 / 10 + headroom_mib ))
  mkfs.ext4 -q -F -L sandbox-root -b 4096 -i 8192 -d "$root" "$out/rootfs.ext4" "${size_mib}M" >&2
  cp "$3" "$out/packages.txt"
  rm -rf --one-file-system "$root"
}

export PATH="$HOME/.cargo/bin:$PATH"
target_dir=${CARGO_TARGET_DIR:-$repo/target}
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release -p sandbox-agent \
  --target x86_64-unknown-linux-gnu --manifest-path "$repo/Cargo.toml" >&2
agent=$target_dir/x86_64-unknown-linux-gnu/release/sandbox-agent

base_key=$( (echo "$suite"; printf '%s\n' "${packages[@]}" "${wheels[@]}" "${dpkg_options[@]}"
  declare -f bootstrap_debian install_wheels shape_root build_base) \
  | sha256sum | cut -c1-16)
key=$( (echo "$base_key"; echo "$headroom_mib"; declare -f build_image; sha256sum < "$agent") | sha256sum | cut -c1-16)
base=$cache/base-$base_key.tar
out=$cache/$key
if [ -f "$out/rootfs.ext4" ]; then
  echo "$out"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  log "building the image needs root (mmdebstrap creates root-owned files): run this script as root or with sudo"
  exit 1
fi
"$repo/scripts/apt-install.sh" mmdebstrap e2fsprogs binutils python3-pip

mkdir -p "$cache"
# One build at a time; whoever waited finds the other's result.
exec 9> "$cache/.lock"
flock -w "$lock_deadline_s" 9 || { log "another build held $cache/.lock for ${lock_deadline_s}s; is one stuck?"; exit 1; }
if [ -f "$out/rootfs.ext4" ]; then
  echo "$out"
  exit 0
fi
# Whatever a killed build left behind is stale now that we hold the lock.
find "$cache" -maxdepth 1 -name '.work-*' -exec rm -rf --one-file-system {} +
work=$(mktemp -d "$cache/.work-XXXXXX")
trap 'rm -rf --one-file-system "$work"' EXIT

started=$(date +%s)
if [ ! -f "$base" ]; then
  log "bootstrapping Debian $suite, flavour $flavour (${packages[*]}) into $base"
  mkdir "$work/base"
  build_base "$work/base" "$base" "${base%.tar}.packages"
  log "Debian base ready in $(( $(date +%s) - started )) s"
fi
mkdir "$work/image"
build_image "$work/image" "$base" "${base%.tar}.packages" "$agent"
mv -T "$work/image" "$out"
log "$out/rootfs.ext4: $(du -m --apparent-size "$out/rootfs.ext4" | cut -f1) MiB image, $(du -m "$out/rootfs.ext4" | cut -f1) MiB on disk, in $(( $(date +%s) - started )) s"
echo "$out"
