#!/usr/bin/env bash
# Boots Debian's 6.1 kernel under qemu (software emulation) and runs one script inside it,
# "the virtme way": the host's root filesystem is the guest's root, read-only over virtio-9p;
# a tiny busybox initramfs mounts it and switches to guest-init.sh, which runs the script and
# writes its exit status to a writable 9p share before powering off. See docs/vm-testing.md.
#
#   scripts/vm/run-guest.sh [options] SCRIPT [ARG...]
#     --out DIR        results folder, shared read-write with the guest as $FARPAGE_VM_OUT
#                      (default .build/vm/out/<script name>); the guest's console is DIR/console.log
#     --timeout SEC    hard limit for the whole boot (default 300); qemu is killed after it
#     --memory MIB     guest memory (default 1536)
#     --cpus N         guest CPUs (default 2)
#     --kernel PATH    kernel image (default: the newest /boot/vmlinuz-6.1.*; or $FARPAGE_VM_KERNEL)
#     --verbose        also copy the guest's console to stdout as it runs
#
# Exit status: the script's own status inside the guest; 124 when the boot timed out;
# 125 when the guest ended without reporting one (kernel panic, init failure); 3 when the host
# lacks something (the message says what).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
timeout_s=300 memory=1536 cpus=2 out="" verbose=0 kernel="${FARPAGE_VM_KERNEL:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --timeout) timeout_s="$2"; shift 2 ;;
    --memory) memory="$2"; shift 2 ;;
    --cpus) cpus="$2"; shift 2 ;;
    --kernel) kernel="$2"; shift 2 ;;
    --verbose) verbose=1; shift ;;
    --) shift; break ;;
    -*) echo "run-guest: unknown option $1" >&2; exit 3 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "usage: run-guest.sh [--out DIR] [--timeout SEC] [--memory MIB] [--cpus N] [--kernel PATH] [--verbose] SCRIPT [ARG...]" >&2; exit 3; }
script="$(realpath "$1")"; shift
[ -x "$script" ] || { echo "run-guest: $script is not an executable file" >&2; exit 3; }

missing() { echo "run-guest: $1 — run make test-vm as root so it installs it" >&2; exit 3; }
command -v qemu-system-x86_64 >/dev/null || missing "qemu-system-x86_64 not installed (Debian package qemu-system-x86)"
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx switch_root || missing "/bin/busybox (static) not installed (Debian package busybox-static)"
command -v cpio >/dev/null || missing "cpio not installed (Debian package cpio)"
command -v modprobe >/dev/null || missing "modprobe not installed (Debian package kmod)"
if [ -z "$kernel" ]; then
  kernel="$(ls /boot/vmlinuz-6.1.* 2>/dev/null | sort -V | tail -1 || true)"
  [ -n "$kernel" ] || missing "no Debian 6.1 kernel in /boot (Debian package linux-image-amd64)"
fi
[ -r "$kernel" ] || { echo "run-guest: cannot read the kernel image $kernel (run as root)" >&2; exit 3; }
kver="${kernel##*/vmlinuz-}"
[ -d "/lib/modules/$kver" ] || missing "no modules for $kver in /lib/modules (Debian package linux-image-$kver)"

# The initramfs: static busybox and the modules that reach the 9p root, in dependency order.
# Built once per kernel and cached (rebuilt when this script or guest-init changes).
cache="$repo/.build/vm"
initrd="$cache/initramfs-$kver.cpio.gz"
mkdir -p "$cache"
if [ ! -s "$initrd" ] || [ "$initrd" -ot "$here/run-guest.sh" ]; then
  staging="$(mktemp -d "$cache/initramfs.XXXXXX")"
  trap 'rm -rf "$staging"' EXIT
  mkdir -p "$staging"/{bin,dev,proc,sys,newroot,modules}
  cp /bin/busybox "$staging/bin/busybox"
  loads=""
  while read -r verb path _; do
    [ "$verb" = insmod ] || continue
    name="$(basename "$path")"
    case "$name" in
      *.ko) cp "$path" "$staging/modules/$name" ;;
      *.ko.xz) xz -dc "$path" > "$staging/modules/${name%.xz}"; name="${name%.xz}" ;;
      *.ko.zst) zstd -qdc "$path" > "$staging/modules/${name%.zst}"; name="${name%.zst}" ;;
      *) echo "run-guest: unexpected module file $path" >&2; exit 3 ;;
    esac
    case " $loads " in *" $name "*) ;; *) loads="$loads $name" ;; esac
  done < <(for m in virtio_pci 9pnet_virtio 9p; do modprobe -S "$kver" --show-depends "$m"; done)
  [ -n "$loads" ] || { echo "run-guest: modprobe found no virtio/9p modules for $kver" >&2; exit 3; }
  cat > "$staging/init" <<INIT
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
for m in$loads; do /bin/busybox insmod /modules/\$m || echo "initramfs: insmod \$m failed"; done
if ! /bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /newroot; then
  echo "initramfs: mounting the host root over 9p failed"; /bin/busybox poweroff -f
fi
init=\$(/bin/busybox sed -n 's/.*init=\([^ ]*\).*/\1/p' /proc/cmdline)
/bin/busybox umount /proc
/bin/busybox umount /dev
exec /bin/busybox switch_root /newroot "\$init"
INIT
  chmod 755 "$staging/init"
  (cd "$staging" && find . | cpio -o -H newc --quiet | gzip -1) > "$initrd.tmp"
  mv "$initrd.tmp" "$initrd"
  rm -rf "$staging"; trap - EXIT
fi

# The results share: what the guest writes there comes back. env tells guest-init what to run.
[ -n "$out" ] || out="$cache/out/$(basename "$script" .sh)"
rm -rf "$out"; mkdir -p "$out"; out="$(realpath "$out")"
{
  printf 'FARPAGE_VM_REPO=%q\n' "$repo"
  printf 'FARPAGE_VM_SCRIPT=%q\n' "$script"
  printf 'FARPAGE_VM_KVER=%q\n' "$kver"
  printf 'set --'; for a in "$@"; do printf ' %q' "$a"; done; printf '\n'
  # Settings the scenarios read (FARPAGE_VM_*, FARPAGE_BIN_DIR, FARPAGE_LIB) pass through.
  env | grep -E '^(FARPAGE_VM_[A-Z_]*|FARPAGE_BIN_DIR|FARPAGE_LIB)=' | grep -vE '^FARPAGE_VM_(REPO|SCRIPT|KVER|OUT)=' \
    | while IFS='=' read -r k v; do printf '%s=%q; export %s\n' "$k" "$v" "$k"; done || true
} > "$out/env"
# The env file is read by the guest's /bin/sh (dash): %q's bash-only $'...' quoting is refused.
if grep -q "\$'" "$out/env"; then echo "run-guest: arguments with control characters are not supported" >&2; exit 3; fi

console="$out/console.log"
start=$(date +%s.%N)
set +e
qemu=(qemu-system-x86_64 -accel tcg,thread=multi -cpu max -M pc -m "$memory" -smp "$cpus"
  -nodefaults -no-user-config -display none -serial stdio -no-reboot
  -kernel "$kernel" -initrd "$initrd"
  -append "console=ttyS0 quiet panic=-1 init=$here/guest-init.sh"
  -fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap
  -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot
  -fsdev local,id=vmout,path="$out",security_model=none
  -device virtio-9p-pci,fsdev=vmout,mount_tag=vmout
  -fsdev local,id=hostrepo,path="$repo",security_model=none,readonly=on,multidevs=remap
  -device virtio-9p-pci,fsdev=hostrepo,mount_tag=hostrepo)
if [ "$verbose" = 1 ]; then
  timeout -k 5 "$timeout_s" "${qemu[@]}" < /dev/null 2>&1 | tee "$console"; qrc=${PIPESTATUS[0]}
else
  timeout -k 5 "$timeout_s" "${qemu[@]}" < /dev/null > "$console" 2>&1; qrc=$?
fi
set -e
wall=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
echo "$wall" > "$out/wall_seconds"
if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
  echo "run-guest: $(basename "$script") timed out after ${timeout_s}s (console: $console)" >&2
  exit 124
fi
if [ ! -s "$out/status" ]; then
  echo "run-guest: the guest ended without reporting a status (qemu exit $qrc; console: $console)" >&2
  tail -20 "$console" >&2
  exit 125
fi
exit "$(cat "$out/status")"
