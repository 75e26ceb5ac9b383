#!/usr/bin/env bash
# vm-kernel-client.sh: test an NBD server with the Linux kernel NBD client.
#
# Usage: tools/vm-kernel-client.sh HOST_PORT [EXPORT_NAME]
#
# Expects an NBD server already listening on 127.0.0.1:HOST_PORT on the host.
# Boots a small qemu guest (TCG, Debian cloud kernel + busybox initramfs) that
# reaches the host's loopback as 10.0.2.2 and, through /dev/nbd0:
#   nbd-client connect with VMTEST_CONNS connections (the kernel spreads
#   requests over them, and a FLUSH sent on one must cover writes done on the
#   others: what the server's CAN_MULTI_CONN promises), mkfs.ext4, mount,
#   write files + md5sums, sync, umount, nbd-client disconnect + reconnect
#   with one connection (so every read goes to the server), mount, verify
#   md5sums, umount, e2fsck -fn (must be clean), disconnect.
# The guest prints "VMTEST: PASS" or "VMTEST: FAIL <step>"; this script exits 0
# only on PASS. The kernel and initramfs are cached under <repo>/.cache/vm/.
#
# Environment:
#   VMTEST_TIMEOUT  seconds before the guest is killed (default 300)
#   VMTEST_LOG      console log file (default <repo>/.cache/vm/console-PORT.log)
#   VMTEST_MIB      MiB of random data written by the guest (default 24)
#   VMTEST_CONNS    connections of the first nbd-client connect (default 4;
#                   the guest checks that many are established)
# Needs (see tools/install-deps.sh): qemu-system-x86, busybox-static, cpio,
# nbd-client, e2fsprogs, and apt access to fetch the kernel package once.
set -euo pipefail

usage() { echo "usage: $0 HOST_PORT [EXPORT_NAME]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
PORT=$1
NAME=${2-}
case $PORT in '' | *[!0-9]*) usage ;; esac
case $NAME in *[[:space:]]* | *\"*) echo "$0: export name must not contain spaces or quotes" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=$ROOT/.cache/vm
TIMEOUT=${VMTEST_TIMEOUT:-300}
LOG=${VMTEST_LOG:-$CACHE/console-$PORT.log}
MIB=${VMTEST_MIB:-24}
CONNS=${VMTEST_CONNS:-4}
case $CONNS in '' | *[!0-9]* | 0) echo "$0: VMTEST_CONNS must be a positive number" >&2; exit 2 ;; esac
MODULES="virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net nbd"

# shellcheck source=tools/vm-lib.sh
. "$ROOT/tools/vm-lib.sh"
vm_check_tools
for f in /usr/sbin/nbd-client /usr/sbin/mke2fs /usr/sbin/e2fsck; do
    [ -x "$f" ] || vm_die "$f not found (run tools/install-deps.sh)"
done

# Serialise preparation between concurrent runs (different ports).
vm_lock
vm_prepare_kernel

# ------------------------------------------------------------- initramfs ----
WORK=$(mktemp -d "$CACHE/initramfs.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
R=$WORK/root
vm_initramfs_root "$R"
# mke2fs picks ext4 from argv[0].
vm_copy_bins "$R" /usr/sbin/nbd-client:/sbin/nbd-client /usr/sbin/mke2fs:/sbin/mkfs.ext4 \
    /usr/sbin/e2fsck:/sbin/e2fsck
[ -e /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$R/etc/"
vm_add_modules "$R" $MODULES

cat >"$R/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

step() { echo "VMTEST: step $1 (uptime $(cut -d' ' -f1 /proc/uptime)s)"; }
fail() {
    echo "VMTEST: FAIL $1"
    echo "---- guest dmesg tail ----"
    dmesg | tail -n 40
    poweroff -f
}

PORT=; NAME=; MIB=24; CONNS=1
for arg in $(cat /proc/cmdline); do
    case $arg in
        vmtest.port=*) PORT=${arg#vmtest.port=} ;;
        vmtest.name=*) NAME=${arg#vmtest.name=} ;;
        vmtest.mib=*) MIB=${arg#vmtest.mib=} ;;
        vmtest.conns=*) CONNS=${arg#vmtest.conns=} ;;
    esac
done
echo "VMTEST: start port=$PORT name='$NAME' mib=$MIB conns=$CONNS kernel=$(uname -r)"

step modules
for m in $(cat /lib/modules/order); do
    insmod /lib/modules/$m.ko || fail "insmod-$m"
done

step network
ip link set lo up
ip link set eth0 up || fail network
ip addr add 10.0.2.15/24 dev eth0 || fail network
ip route add default via 10.0.2.2 || fail network

# connect N: attach /dev/nbd0 over N connections.
connect() {
    if [ -n "$NAME" ]; then
        nbd-client 10.0.2.2 "$PORT" /dev/nbd0 -N "$NAME" -C "$1"
    else
        nbd-client 10.0.2.2 "$PORT" /dev/nbd0 -C "$1"
    fi || return 1
    i=0
    while [ "$(cat /sys/block/nbd0/size 2>/dev/null || echo 0)" = 0 ]; do
        i=$((i + 1)); [ $i -gt 50 ] && return 1
        sleep 0.1
    done
    echo "VMTEST: /dev/nbd0 has $(cat /sys/block/nbd0/size) sectors"
}

step nbd-client
connect "$CONNS" || fail nbd-client
# Established TCP connections to the server (state 01 in /proc/net/tcp).
hexport=$(printf '%04X' "$PORT")
est=$(grep -c "0202000A:$hexport 01" /proc/net/tcp || true)
echo "VMTEST: $est connection(s) to the server"
[ "$est" = "$CONNS" ] || fail "connections ($est, wanted $CONNS)"

step mkfs
mkfs.ext4 -F -q /dev/nbd0 || fail mkfs

step mount
mount -t ext4 /dev/nbd0 /mnt || fail mount

step write
mkdir -p /mnt/dir/sub || fail write
n=0; left=$MIB
for sz in 1 2 4 8 16 32 64; do
    [ $left -le 0 ] && break
    [ $sz -gt $left ] && sz=$left
    dd if=/dev/urandom of=/mnt/f$n bs=1M count=$sz 2>/dev/null || fail write
    left=$((left - sz)); n=$((n + 1))
done
dd if=/dev/urandom of=/mnt/dir/small bs=1 count=4097 2>/dev/null || fail write
dd if=/dev/urandom of=/mnt/dir/sub/odd bs=512 count=37 2>/dev/null || fail write
seq 1 20000 >/mnt/dir/sub/seq || fail write
(cd /mnt && md5sum f* dir/small dir/sub/odd dir/sub/seq) >/tmp/md5 || fail write
cat /tmp/md5

step sync
sync || fail sync
umount /mnt || fail umount

# Drop the connection and every cache, so verification reads from the server.
step reconnect
nbd-client -d /dev/nbd0 || fail disconnect-1
sleep 0.5
echo 3 >/proc/sys/vm/drop_caches
connect 1 || fail reconnect

step verify
mount -t ext4 /dev/nbd0 /mnt || fail remount
(cd /mnt && md5sum -c /tmp/md5) || fail verify
umount /mnt || fail umount-2

step e2fsck
e2fsck -fn /dev/nbd0 || fail e2fsck

step disconnect
nbd-client -d /dev/nbd0 || fail disconnect

echo "VMTEST: PASS"
poweroff -f
INIT
chmod +x "$R/init"

INITRD=$CACHE/initramfs-$KVER.cpio.gz
vm_pack "$R" "$INITRD"
vm_unlock

# ------------------------------------------------------------------ boot ----
echo "vmtest: booting $KVER, server 127.0.0.1:$PORT export '${NAME}', log $LOG" >&2
start=$(date +%s)
set +e
timeout "$TIMEOUT" qemu-system-x86_64 \
    -accel tcg -m 512 -nographic -no-reboot \
    -kernel "$VMLINUZ" -initrd "$INITRD" \
    -append "console=ttyS0 quiet panic=-1 vmtest.port=$PORT vmtest.name=$NAME vmtest.mib=$MIB vmtest.conns=$CONNS" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile= \
    </dev/null 2>&1 | tr -d '\r' >"$LOG"
rc=${PIPESTATUS[0]}
set -e
elapsed=$(($(date +%s) - start))

if grep -q '^VMTEST: PASS' "$LOG"; then
    # Kernel complaints about the device are worth seeing even on PASS.
    if grep -E 'I/O error|block nbd|EXT4-fs (error|warning)' "$LOG" >"$LOG.warn"; then
        echo "vmtest: warning: guest kernel reported:" >&2
        head -n 20 "$LOG.warn" >&2
    fi
    rm -f "$LOG.warn"
    echo "vmtest: PASS (${elapsed}s)"
    exit 0
fi
if [ "$rc" = 124 ]; then
    why="timeout after ${TIMEOUT}s"
else
    why=$(grep -m1 '^VMTEST: FAIL' "$LOG" || echo "no verdict, qemu exit $rc")
fi
echo "vmtest: FAIL: $why (${elapsed}s); console log tail ($LOG):" >&2
tail -n 60 "$LOG" >&2
exit 1
