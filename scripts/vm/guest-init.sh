#!/bin/sh
# PID 1 inside the guest (named by init= on the kernel command line; see run-guest.sh).
# The root filesystem is the host's, read-only; everything writable is tmpfs, and the
# results share (vmout) is where the exit status goes back to the host.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
for d in /tmp /run /var/tmp /var/log /var/lib /root; do mount -t tmpfs tmpfs "$d"; done
mkdir -p /run/vm-out
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 vmout /run/vm-out
ip link set lo up
hostname farpage-vm

FARPAGE_VM_OUT=/run/vm-out
export FARPAGE_VM_OUT
. /run/vm-out/env
export FARPAGE_VM_REPO FARPAGE_VM_SCRIPT FARPAGE_VM_KVER
# The checkout may live under a directory just covered by tmpfs (a clone in /tmp, as CI
# makes): its own share puts it back at the same path, read-only.
case "$FARPAGE_VM_REPO" in
  /tmp/* | /run/* | /var/tmp/* | /var/log/* | /var/lib/* | /root/*)
    mkdir -p "$FARPAGE_VM_REPO"
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose hostrepo "$FARPAGE_VM_REPO" ;;
esac
cd "$FARPAGE_VM_REPO"
echo "guest: $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB; running $FARPAGE_VM_SCRIPT $*"
"$FARPAGE_VM_SCRIPT" "$@" < /dev/null
rc=$?
echo "guest: $FARPAGE_VM_SCRIPT exited with status $rc"
echo "$rc" > /run/vm-out/status
sync
umount -l /run/vm-out 2>/dev/null
busybox poweroff -f
