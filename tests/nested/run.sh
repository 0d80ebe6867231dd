#!/usr/bin/env bash
# Runs the Linux-guest suite (SANDBOXD_E2E_KVM=1) on a nested host, for
# machines whose own /dev/kvm cannot boot Linux guests (PVM). QEMU from
# Debian's bookworm-backports (10.x) in software mode (TCG) with an emulated
# AMD-V CPU boots Debian's cloud kernel; its kvm-amd module gives a real
# (emulated) /dev/kvm without PVM's limits, and our VMM boots the real guest
# kernel inside it. Results come back on the serial console between
# NESTED-* markers. See tests/nested/README.md.
#
#   tests/nested/run.sh              # the suite; exits 0 when it passed inside
#   tests/nested/run.sh --stress N   # N restore stress cycles beside a CPU and memory hog
#   NESTED_TIMEOUT=1800 NESTED_SILENCE=120 tests/nested/run.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"

mode=suite cycles=0
case "${1:-}" in
  "") ;;
  --stress) mode=stress cycles=${2:-}
    [[ "$cycles" =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [--stress CYCLES]" >&2; exit 2; } ;;
  *) echo "usage: $0 [--stress CYCLES]" >&2; exit 2 ;;
esac
# The whole nested run (boot, every test, power-off; about 140 s on a quiet
# machine); a hang inside is caught sooner by the per-test deadline or the
# silent-console check.
default_timeout=900
[ "$mode" = stress ] && default_timeout=$((900 + cycles * 150))
timeout_s=${NESTED_TIMEOUT:-$default_timeout}
# The nested init prints a heartbeat every 30 s; a console silent this long
# means the nested host's kernel froze.
silence_s=${NESTED_SILENCE:-120}

# Under QEMU 7.2 (bookworm) TCG kept running a stale jump label after the
# nested kernel live-patched it, which froze the nested host in most tests;
# 10.x from bookworm-backports does not (see README.md).
install_backports_qemu() {
  local release=bookworm-backports version
  version=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
  [[ "$version" == *bpo12* ]] && return 0
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if ! grep -rqs "$release" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$release" | $sudo tee "/etc/apt/sources.list.d/$release.sources" >/dev/null
  fi
  $sudo apt-get update -qq >&2
  # Its exact-version dependencies come from the same release.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "qemu-system-x86/$release" "qemu-system-common/$release" "qemu-system-data/$release" "seabios/$release" >&2
}
install_backports_qemu
scripts/apt-install.sh linux-image-cloud-amd64 busybox-static cpio kmod xz-utils gcc libc6-dev python3
export PATH="$HOME/.cargo/bin:$PATH"

kernel_dir=$(kernel-config/build.sh)
image_dir=$(scripts/guest-image.sh)

# Static binaries, so the nested host needs no libraries.
target=x86_64-unknown-linux-gnu
export RUSTFLAGS="-C target-feature=+crt-static"
cargo build --release --target "$target" -p sandboxd -p sandbox-agent
test_binary=$(cargo test --release --target "$target" -p sandboxd-tests --test microvm_e2e --no-run --message-format=json \
  | sed -n 's/.*"executable":"\([^"]*microvm_e2e[^"]*\)".*/\1/p' | tail -1)

host_kernel=$(ls /boot/vmlinuz-*-cloud-amd64 | sort -V | tail -1)
host_release=${host_kernel#/boot/vmlinuz-}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,run,lib/modules,t/deps,guest,var/lib/sandboxd}
cp /bin/busybox "$root/bin/busybox"
for applet in sh mount mkdir insmod cat cp cut grep ls echo poweroff sleep ifconfig switch_root; do ln -s busybox "$root/bin/$applet"; done
# kvm-amd and what it depends on, decompressed for busybox insmod.
for module in irqbypass kvm kvm-amd; do
  path=$(modinfo -k "$host_release" -n "$module")
  case "$path" in
    *.xz) xz -dc "$path" > "$root/lib/modules/$module.ko" ;;
    *.zst) zstd -qdc "$path" > "$root/lib/modules/$module.ko" ;;
    *) cp "$path" "$root/lib/modules/$module.ko" ;;
  esac
done
gcc -static -O2 -Wall -o "$root/bin/hog" tests/nested/hog.c
cp "target/$target/release/sandboxd" "target/$target/release/sandbox-agent" "$root/t/"
cp "$test_binary" "$root/t/deps/microvm_e2e"
cp "$kernel_dir/vmlinux" "$root/guest/vmlinux"
cp "$image_dir/rootfs.ext4" "$root/guest/rootfs.ext4"

# What the nested init runs once /dev/kvm is there.
if [ "$mode" = stress ]; then
  cat > "$root/t/run-tests" <<TESTS
#!/bin/sh
echo "NESTED-HOG: a CPU and 768 MiB memory hog runs beside the stress cycles"
/bin/hog 768 &
SANDBOXD_STRESS_CYCLES=$cycles exec ./deps/microvm_e2e --nocapture --test-threads=1 --ignored --exact restore_stress
TESTS
else
  printf '#!/bin/sh\nexec ./deps/microvm_e2e --nocapture --test-threads=1\n' > "$root/t/run-tests"
fi
chmod +x "$root/t/run-tests"
cat > "$root/init" <<INIT
#!/bin/sh
# The initramfs is the kernel's first root, which pivot_root(2) cannot leave
# (EINVAL), and the daemon's VMM jail pivots: move everything onto a tmpfs
# and start again from there.
if [ ! -e /.on-tmpfs ]; then
  mkdir /newroot && mount -t tmpfs -o mode=755 root /newroot
  cp -a /bin /sbin /lib /t /guest /var /init /newroot/ && mkdir /newroot/proc /newroot/sys /newroot/dev /newroot/tmp /newroot/run
  : > /newroot/.on-tmpfs
  exec switch_root /newroot /init
fi
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ifconfig lo 127.0.0.1 up
# Hung tasks are reported soon, with their stacks (loglevel=7 prints them).
echo 30 > /proc/sys/kernel/hung_task_timeout_secs
echo -1 > /proc/sys/kernel/hung_task_warnings
echo 1 > /proc/sys/kernel/sysrq
for module in irqbypass kvm kvm-amd; do insmod /lib/modules/\$module.ko; done
# The boot that only names the kernel's code for the register samples.
if grep -q nested_kallsyms /proc/cmdline; then grep ' [tT] ' /proc/kallsyms > /dev/ttyS1; poweroff -f; fi
# A heartbeat: the host side reads a silent console as a frozen nested kernel.
(while sleep 30; do echo "NESTED-ALIVE uptime \$(cut -d' ' -f1 /proc/uptime) s, load \$(cut -d' ' -f1-3 /proc/loadavg)"; done) &
echo NESTED-BEGIN
if [ -c /dev/kvm ]; then
  echo "NESTED-KVM: /dev/kvm is present"
  cd /t && SANDBOXD_E2E_KVM=1 SANDBOXD_KERNEL_DIR=/guest SANDBOXD_GUEST_IMAGE_DIR=/guest ./run-tests \
    && echo NESTED-RESULT: PASS || echo NESTED-RESULT: FAIL
else
  echo "NESTED-RESULT: FAIL (no /dev/kvm after loading kvm-amd)"
fi
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio --quiet -o -H newc | gzip -1) > "$work/nested.cpio.gz"

log=$work/console.log
monitor_socket=$work/monitor.sock

# Sends one command to QEMU's human monitor and prints its answer.
monitor() {
  python3 - "$monitor_socket" "$1" <<'PY'
import socket, sys, time
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(10)
sock.connect(sys.argv[1])
def read_until_prompt():
    data, deadline = b"", time.monotonic() + 10
    while not data.endswith(b"(qemu) ") and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data
read_until_prompt()
sock.sendall(sys.argv[2].encode() + b"\n")
print(read_until_prompt().decode(errors="replace").replace("\r", "").removesuffix("(qemu) "))
PY
}

# Prints where both nested CPUs are, three times, 2 s apart, then names the
# code at each sampled RIP.
sample_registers() {
  local samples=$work/registers
  for sample in 1 2 3; do
    echo "---- sample $sample"
    monitor "info registers -a" | grep -vE "^(XMM|YMM|ZMM|FPR|FCW|Opmask)" || echo "(the monitor did not answer)"
    sleep 2
  done > "$samples"
  cat "$samples"
  echo "---- the sampled RIPs, named"
  symbolize "$samples"
}

# With nokaslr the nested kernel's addresses are the same at every boot: a
# short extra boot prints its symbols (modules loaded) on a second serial port.
symbolize() {
  local symbols=$work/kallsyms
  timeout 300 qemu-system-x86_64 -accel tcg -cpu EPYC,+svm -m 4096 -smp 2 -display none -vga none -no-reboot \
    -serial null -serial "file:$symbols" -kernel "$host_kernel" -initrd "$work/nested.cpio.gz" \
    -append "console=ttyS0 rdinit=/init nokaslr panic=-1 nested_kallsyms" </dev/null >/dev/null 2>&1 || true
  python3 - "$symbols" "$1" <<'PY'
import bisect, re, sys
symbols = []
for line in open(sys.argv[1], errors="replace"):
    fields = line.split()
    if len(fields) >= 3 and re.fullmatch(r"[0-9a-f]{16}", fields[0]):
        symbols.append((int(fields[0], 16), " ".join(fields[2:4])))
symbols.sort()
addresses = [address for address, _ in symbols]
sample, cpu = "", "?"
for line in open(sys.argv[2]):
    if line.startswith("---- sample"):
        sample = line.split()[-1]
    cpu = re.match(r"CPU#(\d+)", line).group(1) if line.startswith("CPU#") else cpu
    for value in re.findall(r"\bRIP=([0-9a-f]{16})", line):
        address = int(value, 16)
        index = bisect.bisect_right(addresses, address) - 1
        near = index >= 0 and address - addresses[index] < 0x10000
        name = f"{symbols[index][1]}+{address - addresses[index]:#x}" if near else "(no symbol)"
        print(f"sample {sample} CPU#{cpu} RIP {value} = {name}")
PY
}

# One boot of the nested host; sets outcome to pass, fail, oops, wedge or timeout.
run_nested_host() {
  rm -f "$log" "$monitor_socket"
  qemu-system-x86_64 -accel tcg -cpu EPYC,+svm -m 4096 -smp 2 -display none -vga none -no-reboot \
    -serial "file:$log" -monitor "unix:$monitor_socket,server=on,wait=off" \
    -kernel "$host_kernel" -initrd "$work/nested.cpio.gz" \
    -append "console=ttyS0 rdinit=/init loglevel=7 nokaslr panic=-1" </dev/null &
  local qemu=$! started now last_size=-1 quiet_since size
  started=$(date +%s) quiet_since=$started
  tail -n +1 -F --pid="$qemu" "$log" 2>/dev/null &
  local printer=$!
  outcome=""
  while kill -0 "$qemu" 2>/dev/null; do
    sleep 5
    now=$(date +%s) size=$(stat -c %s "$log" 2>/dev/null || echo 0)
    [ "$size" != "$last_size" ] && last_size=$size quiet_since=$now
    if (( now - quiet_since >= silence_s )); then
      outcome=wedge
      sample_registers
      break
    elif (( now - started >= timeout_s )); then
      outcome=timeout
      break
    fi
  done
  kill "$qemu" 2>/dev/null || true
  wait "$qemu" 2>/dev/null || true
  wait "$printer" 2>/dev/null || true
  echo "nested run took $(( $(date +%s) - started )) s"
  [ -n "$outcome" ] && return
  if grep -q "NESTED-RESULT: PASS" "$log"; then
    outcome=pass
  elif grep -qE "Comm: .* $host_release " "$log"; then
    # Our guest kernel's oops names another release.
    outcome=oops
  else
    outcome=fail
  fi
}

# A fault of the nested host's own kernel under TCG (an oops, or a console
# gone silent) is not a test failure: such a run is repeated once, saying so.
for attempt in 1 2; do
  run_nested_host
  case "$outcome" in
    pass) exit 0 ;;
    oops) echo "NESTED-HOST-OOPS: the nested host's kernel crashed (not a test failure)" ;;
    wedge) echo "NESTED-HOST-WEDGE: the nested host's console was silent for ${silence_s} s (its kernel froze; registers above)" ;;
    timeout) echo "NESTED-TIMEOUT: the nested run took longer than ${timeout_s} s (NESTED_TIMEOUT)"; exit 1 ;;
    *) exit 1 ;;
  esac
  [ "$attempt" = 1 ] && echo "running the nested host once more"
done
exit 1
