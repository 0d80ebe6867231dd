#!/usr/bin/env bash
# Builds the guest kernel (vmlinux and bzImage) from Debian's
# linux-source-6.12: `make tinyconfig`, then guest.config merged on top.
# Outputs go to a cache keyed by the hash of the config and the recipe
# version below, so a second run with the same inputs does nothing. Prints
# the output dir.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${SANDBOXD_CACHE:-$HOME/.cache/sandboxd}/kernel
# Bump when a change to this script changes what it builds.
recipe=1
key=$( (cat "$here/guest.config"; echo "recipe $recipe") | sha256sum | cut -c1-16)
out=$cache/$key
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
  echo "$out"
  exit 0
fi

"$here/../scripts/apt-install.sh" linux-source-6.12 bc bison flex libelf-dev libssl-dev xz-utils make gcc

src=$cache/linux-source-6.12
if [ ! -f "$src/Makefile" ]; then
  mkdir -p "$src"
  tar -xf /usr/src/linux-source-6.12.tar.xz -C "$src" --strip-components=1
fi

build=$out/build
mkdir -p "$build"
make -C "$src" O="$build" ARCH=x86_64 tinyconfig >&2
"$src/scripts/kconfig/merge_config.sh" -m -O "$build" "$build/.config" "$here/guest.config" >&2
make -C "$src" O="$build" ARCH=x86_64 olddefconfig >&2

# Every option guest.config sets must survive olddefconfig.
lost=0
while IFS= read -r line; do
  case "$line" in ''|'#'*) continue ;; esac
  option=${line%%=*} value=${line#*=}
  if [ "$value" = n ]; then
    grep -q "^$option=" "$build/.config" && { echo "kernel config: $option should be unset" >&2; lost=1; }
  else
    grep -qx "$line" "$build/.config" || { echo "kernel config: $line did not survive olddefconfig" >&2; lost=1; }
  fi
done < "$here/guest.config"
[ "$lost" -eq 0 ] || exit 1

make -C "$src" O="$build" ARCH=x86_64 -j"$(nproc)" vmlinux bzImage >&2
cp "$build/vmlinux" "$out/vmlinux.tmp" && mv "$out/vmlinux.tmp" "$out/vmlinux"
cp "$build/arch/x86/boot/bzImage" "$out/bzImage.tmp" && mv "$out/bzImage.tmp" "$out/bzImage"
echo "$out"
