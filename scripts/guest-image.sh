#!/usr/bin/env bash
# Builds the microVM guest root: sandbox-agent (static) as /sbin/init,
# busybox for a shell and the usual tools, and python3 with its standard
# library (copied from Debian's python3 package on this host). Writes both an
# initramfs (cpio.gz) and an ext4 image into a cache keyed by the inputs,
# so a second run with the same inputs does nothing. Prints the output dir.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${SANDBOXD_CACHE:-$HOME/.cache/sandboxd}/guest-image

"$repo/scripts/apt-install.sh" busybox-static python3 cpio e2fsprogs

export PATH="$HOME/.cargo/bin:$PATH"
target_dir=${CARGO_TARGET_DIR:-$repo/target}
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release -p sandbox-agent \
  --target x86_64-unknown-linux-gnu --manifest-path "$repo/Cargo.toml" >&2
agent=$target_dir/x86_64-unknown-linux-gnu/release/sandbox-agent
python=$(readlink -f /usr/bin/python3)

key=$(cat "$0" "$agent" /bin/busybox "$python" | sha256sum | cut -c1-16)
out=$cache/$key
if [ -f "$out/rootfs.ext4" ] && [ -f "$out/initramfs.cpio.gz" ]; then
  echo "$out"
  exit 0
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/lib,etc,proc,sys,dev,tmp,run,home/user,root}
install -m 0755 "$agent" "$root/sbin/init"
install -m 0755 /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done

# python3 and every shared library it (and its extension modules) load.
install -m 0755 "$python" "$root/usr/bin/$(basename "$python")"
ln -s "$(basename "$python")" "$root/usr/bin/python3"
cp -a /usr/lib/python3.11 "$root/usr/lib/"
rm -rf "$root/usr/lib/python3.11/test" "$root/usr/lib/python3.11/idlelib" "$root/usr/lib/python3.11/tkinter"
find "$root/usr/lib/python3.11" -name __pycache__ -prune -exec rm -rf {} +
{
  ldd "$python"
  find /usr/lib/python3.11/lib-dynload -name '*.so' -exec ldd {} \; 2>/dev/null
} | grep -o '/[^ ]*\.so[^ ]*' | sort -u | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done

echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
echo "root:x:0:" > "$root/etc/group"
echo "sandbox" > "$root/etc/hostname"
chmod 1777 "$root/tmp"

mkdir -p "$out"
(cd "$root" && find . | cpio --quiet -o -H newc | gzip -1) > "$out/initramfs.cpio.gz.tmp"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
size_mib=$(( $(du -sm "$root" | cut -f1) + 64 ))
mkfs.ext4 -q -F -L sandbox-root -d "$root" "$out/rootfs.ext4.tmp" "${size_mib}M" >&2
mv "$out/rootfs.ext4.tmp" "$out/rootfs.ext4"
echo "$out"
