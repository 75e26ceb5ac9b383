#!/usr/bin/env bash
# vm-power-cut.sh: flushed writes must survive a power failure.
#
# Usage: tools/vm-power-cut.sh [SERVER [EXPECT]]
#   SERVER  nbdmirror (default): one node in the guest;
#           nbdmirror-mirror: the secondary in the guest, its primary on the
#           host, both lose power, the secondary is promoted and checked;
#           nbdmirror-secondary-cut: only the secondary loses power, the
#           primary writes on without it, resyncs it, then both lose power
#           and the promoted secondary must hold exactly the primary's data;
#           nbdkit (`nbdkit file`), or nbdkit-unsafe
#           (`nbdkit file` with the fua filter's fuamode=discard: FLUSH and FUA
#           are dropped, so it loses data at a power cut; the control that
#           shows this test can see a loss)
#   EXPECT  pass (default) or lose: with `lose` the script succeeds only if
#           the check finds flushed data lost.
#
# Killing a server process (the other crash tests) leaves the kernel's page
# cache intact: a server that never called fdatasync passes them. Here the
# server runs in a qemu guest (TCG, Debian cloud kernel + busybox initramfs)
# with its files on an ext4 on the guest's own virtio disk, and the guest's
# writeback is turned off (nothing reaches that disk unless the server syncs
# it). The host, through libnbd (tools/powercut.py), writes with several
# requests in flight, WRITE_ZEROES, FUA and FLUSH, then cuts the power at a
# random moment (SIGKILL to qemu: the guest's page cache is gone, what it
# wrote to its disk stays). The guest boots again on the same disk, the
# server recovers, and the host reads the whole export back: every write
# made durable (acknowledged before a completed FLUSH, or FUA) must be there
# or overwritten by a later write, no sector may hold data never written,
# and no read may fail. VMPC_CYCLES cuts in a row; every second boot after
# the first is itself cut while the server starts (recovery interrupted),
# then booted again.
#
# Environment:
#   VMPC_CYCLES   power cuts while writing (default 4)
#   VMPC_SIZE     export size in MiB (default 64)
#   VMPC_SEED     seed of the writer's choices (default: random, printed)
#   VMPC_TIMEOUT  seconds to wait for the guest to serve (default 240)
#   NBDMIRROR_BIN the binary (default target/release/nbdmirror)
# Needs (tools/install-deps.sh): qemu-system-x86, busybox-static, cpio,
# e2fsprogs, python3-libnbd, nbdkit; apt access to fetch the kernel once.
set -euo pipefail

SERVER=${1:-nbdmirror}
EXPECT=${2:-pass}
case $SERVER in nbdmirror | nbdmirror-mirror | nbdmirror-secondary-cut | nbdkit | nbdkit-unsafe) ;; *) echo "usage: $0 [nbdmirror|nbdmirror-mirror|nbdmirror-secondary-cut|nbdkit|nbdkit-unsafe [pass|lose]]" >&2; exit 2 ;; esac
case $EXPECT in pass | lose) ;; *) echo "usage: $0 [SERVER [pass|lose]]" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=$ROOT/.cache/vm
CYCLES=${VMPC_CYCLES:-4}
SIZE=${VMPC_SIZE:-64}
SEED=${VMPC_SEED:-$RANDOM$RANDOM}
TIMEOUT=${VMPC_TIMEOUT:-240}
BIN=${NBDMIRROR_BIN:-$ROOT/target/release/nbdmirror}
PY=/usr/bin/python3 # Debian's libnbd bindings load only here
MODULES="virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net virtio_blk"
NBDKIT_LIB=/usr/lib/x86_64-linux-gnu/nbdkit

# shellcheck source=tools/vm-lib.sh
. "$ROOT/tools/vm-lib.sh"
vm_check_tools
"$PY" -c 'import nbd' 2>/dev/null || vm_die "python3-libnbd is not installed (run tools/install-deps.sh)"
[ "${SERVER#nbdmirror}" = "$SERVER" ] || [ -x "$BIN" ] || vm_die "$BIN not found (cargo build --release)"

WORK=$(mktemp -d /var/tmp/nbdmirror-powercut.XXXXXX)
QPID=
cleanup() {
    local p
    for p in "${QPID:-}" "${PRIM:-}"; do
        if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then kill -9 "$p" 2>/dev/null || true; fi
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

# ------------------------------------------------------------- initramfs ----
vm_lock
vm_prepare_kernel
R=$WORK/root
vm_initramfs_root "$R"
vm_copy_bins "$R" /usr/sbin/mke2fs:/sbin/mkfs.ext4
[ -e /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$R/etc/"
case $SERVER in
    nbdmirror*)
        # Without its debug info: the initramfs is unpacked into guest memory.
        objcopy --strip-debug "$BIN" "$WORK/nbdmirror"
        vm_copy_bins "$R" "$WORK/nbdmirror:/sbin/nbdmirror"
        ;;
    nbdkit*)
        vm_copy_bins "$R" "$(command -v nbdkit)":/sbin/nbdkit \
            "$NBDKIT_LIB/plugins/nbdkit-file-plugin.so:/lib/nbdkit/nbdkit-file-plugin.so" \
            "$NBDKIT_LIB/filters/nbdkit-fua-filter.so:/lib/nbdkit/nbdkit-fua-filter.so"
        ;;
esac
vm_add_modules "$R" $MODULES
vm_unlock

cat >"$R/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "VMTEST: FAIL $1"; dmesg | tail -n 20; poweroff -f; }
SERVER=; FIRST=0; SIZE=64; UUID=; SECRET=
for arg in $(cat /proc/cmdline); do
    case $arg in
        vmtest.server=*) SERVER=${arg#vmtest.server=} ;;
        vmtest.first=*) FIRST=${arg#vmtest.first=} ;;
        vmtest.size=*) SIZE=${arg#vmtest.size=} ;;
        vmtest.uuid=*) UUID=${arg#vmtest.uuid=} ;;
        vmtest.secret=*) SECRET=${arg#vmtest.secret=} ;;
    esac
done
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko || fail "insmod-$m"; done
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 || fail network
# Nothing reaches the disk unless someone syncs it: no periodic or
# background writeback, no dirty limit this test can reach.
echo 0 >/proc/sys/vm/dirty_writeback_centisecs
echo 8640000 >/proc/sys/vm/dirty_expire_centisecs
echo 90 >/proc/sys/vm/dirty_ratio
echo 80 >/proc/sys/vm/dirty_background_ratio
i=0
while [ ! -b /dev/vda ]; do i=$((i + 1)); [ $i -gt 50 ] && fail "no /dev/vda"; sleep 0.1; done
if [ "$FIRST" = 1 ]; then
    mkfs.ext4 -F -q /dev/vda || fail mkfs
    sync
fi
# After a power cut ext4 replays its own journal here.
mount -t ext4 /dev/vda /mnt || fail mount
cd /mnt
echo "VMTEST: starting $SERVER"
# The server's messages go to the console too.
: >/tmp/serve.log
tail -f /tmp/serve.log &
case $SERVER in
    nbdmirror)
        # init is not followed by a sync: what init writes must be durable
        # by itself (the first power cut comes after the first FLUSH).
        if [ "$FIRST" = 1 ]; then nbdmirror init --dir /mnt/r --size "${SIZE}M" || fail init; fi
        nbdmirror serve --dir /mnt/r --listen 0.0.0.0:10809 2>>/tmp/serve.log &
        ;;
    secondary)
        # Node 2 of a volume whose primary runs on the host.
        if [ "$FIRST" = 1 ]; then
            nbdmirror init --dir /mnt/r --size "${SIZE}M" --node-id 2 --volume-uuid "$UUID" || fail init
        fi
        echo "$SECRET" >/tmp/secret
        nbdmirror serve --dir /mnt/r --role secondary --peer-listen 0.0.0.0:10810 \
            --secret-file /tmp/secret 2>>/tmp/serve.log &
        ;;
    promote)
        # The primary died with this secondary: promote it, as an operator
        # would, and serve what it holds.
        nbdmirror serve --dir /mnt/r --role primary --listen 0.0.0.0:10809 2>>/tmp/serve.log &
        ;;
    nbdkit | nbdkit-unsafe)
        if [ "$FIRST" = 1 ]; then truncate -s "${SIZE}M" /mnt/disk.img && sync || fail create; fi
        extra=
        [ "$SERVER" = nbdkit-unsafe ] && extra="--filter=/lib/nbdkit/nbdkit-fua-filter.so"
        mode=
        [ "$SERVER" = nbdkit-unsafe ] && mode="fuamode=discard"
        nbdkit -f -i 0.0.0.0 -p 10809 $extra /lib/nbdkit/nbdkit-file-plugin.so file=/mnt/disk.img $mode \
            2>>/tmp/serve.log &
        ;;
    *) fail "server '$SERVER'" ;;
esac
pid=$!
# Ready: nbdmirror says so once its recovery is done (it may bind its port
# before and then refuse); nbdkit listens on port 10809 (0x2A39, state 0A).
ready() {
    case $SERVER in
        nbdkit*) grep -q ":2A39 00000000:0000 0A" /proc/net/tcp ;;
        *) grep -q "nbdmirror: serving " /tmp/serve.log ;;
    esac
}
i=0
until ready; do
    i=$((i + 1)); [ $i -gt 1200 ] && fail "the server does not listen"
    if ! kill -0 $pid 2>/dev/null; then
        # A secondary that crashed with writes in flight may not vouch for
        # some blocks and is then only promoted on request: the operator's
        # way when it is the last copy (docs/mirroring.md).
        [ "$SERVER" = promote ] && [ -z "$FORCED" ] || fail "the server exited"
        FORCED=1
        echo "VMTEST: promotion refused; promoting with --force-inconsistent"
        nbdmirror serve --dir /mnt/r --role primary --force-inconsistent --listen 0.0.0.0:10809 \
            2>>/tmp/serve.log &
        pid=$!
    fi
    sleep 0.1
done
echo "VMTEST: serving"
while :; do sleep 3600; done
INIT
chmod +x "$R/init"
INITRD=$WORK/initrd.cpio.gz
vm_pack "$R" "$INITRD"
rm -rf "$R"

# ------------------------------------------------------------------ runs ----
DISK=$WORK/disk.img
MODEL=$WORK/model
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
HPORT=$(free_port) # the guest's NBD port on the host
PPORT=$(free_port) # the guest's peer port on the host (a secondary)
URI="nbd://127.0.0.1:$HPORT"
boots=0
QPID=
QJOB=
PRIM=
UUID=
SECRET=

# boot ROLE FIRST: start the guest; LOG is its console, QPID qemu's pid.
boot() {
    boots=$((boots + 1))
    LOG=$WORK/console-$boots.log
    rm -f "$WORK/qemu.pid"
    # (In a subshell whose stderr is dropped: it reports qemu's SIGKILL.)
    (qemu-system-x86_64 -accel tcg -m 512 -nographic -no-reboot -pidfile "$WORK/qemu.pid" \
        -kernel "$VMLINUZ" -initrd "$INITRD" \
        -append "console=ttyS0 quiet panic=-1 vmtest.server=$1 vmtest.first=$2 vmtest.size=$SIZE vmtest.uuid=$UUID vmtest.secret=$SECRET" \
        -drive "file=$DISK,format=raw,if=virtio,cache=writeback" \
        -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$HPORT-:10809,hostfwd=tcp:127.0.0.1:$PPORT-:10810" \
        -device virtio-net-pci,netdev=n0,romfile= </dev/null >"$LOG" 2>&1 || true) 2>/dev/null &
    QJOB=$!
    local i
    for i in $(seq 1 100); do
        [ -s "$WORK/qemu.pid" ] && break
        kill -0 "$QJOB" 2>/dev/null || break
        sleep 0.1
    done
    QPID=$(cat "$WORK/qemu.pid" 2>/dev/null) || vm_die "qemu did not start: $(cat "$LOG")"
}

# wait_for LINE: until the console shows it; fails on FAIL or qemu's exit.
wait_for() {
    local deadline=$((SECONDS + TIMEOUT))
    # (Not anchored: the firmware's escape sequences may start the line.)
    until tr -d '\r' <"$LOG" | grep -q "VMTEST: $1"; do
        if tr -d '\r' <"$LOG" | grep -q 'VMTEST: FAIL' || ! kill -0 "$QPID" 2>/dev/null ||
            [ $SECONDS -ge $deadline ]; then
            echo "vm-power-cut: the guest did not reach '$1' (boot $boots); console:" >&2
            tr -d '\r' <"$LOG" | tail -n 40 >&2
            return 1
        fi
        sleep 0.2
    done
}

# cut: the power goes (if the writer did not cut it already).
cut() {
    kill -9 "$QPID" 2>/dev/null || true
    wait "$QJOB" 2>/dev/null || true
    QPID=
}

stop_primary() {
    if [ -n "$PRIM" ]; then
        kill -9 "$PRIM" 2>/dev/null || true
        while kill -0 "$PRIM" 2>/dev/null; do sleep 0.05; done
    fi
    PRIM=
}

check() { # URI
    if "$PY" "$ROOT/tools/powercut.py" check --model "$MODEL" --uri "$1"; then return 0; fi
    echo "vm-power-cut: console of the boot that recovered:" >&2
    tr -d '\r' <"$LOG" | grep -v 'VMTEST' | tail -n 20 >&2
    return 1
}

write_and_cut() { # URI SEED PIDS...
    local uri=$1 seed=$2 kills=() p
    shift 2
    for p in "$@"; do kills+=(--kill-pid "$p"); done
    "$PY" "$ROOT/tools/powercut.py" write --model "$MODEL" --uri "$uri" "${kills[@]}" --seed "$seed"
}

# One node in the guest: power cuts in a row on the same disk.
single() {
    truncate -s $((SIZE * 2 + 64))M "$DISK"
    "$PY" "$ROOT/tools/powercut.py" init --model "$MODEL" --size-mib "$SIZE"
    local cycle first
    for cycle in $(seq 1 "$CYCLES"); do
        first=0
        [ "$cycle" = 1 ] && first=1
        if [ "$cycle" -gt 1 ] && [ $((cycle % 2)) = 1 ]; then
            # Cut the power again while the server starts (recovers).
            boot "$SERVER" 0
            wait_for "starting" || return 2
            sleep "$("$PY" -c "import random; random.seed($SEED + $cycle); print(round(random.uniform(0, 1.5), 2))")"
            cut
            echo "vm-power-cut: cut the power while $SERVER was starting (boot $boots)"
        fi
        boot "$SERVER" "$first"
        wait_for serving || return 2
        if [ "$cycle" -gt 1 ]; then check "$URI" || { cut; return 1; }; fi
        write_and_cut "$URI" $((SEED + cycle)) "$QPID" || return 2
        cut
    done
    boot "$SERVER" 0
    wait_for serving || return 2
    check "$URI" || { cut; return 1; }
    cut
}

PRIM_DIR=$WORK/node1
SECRET_FILE=$WORK/secret

# wait_in_sync: until the primary reports its peer in sync.
wait_in_sync() {
    local i state=
    for i in $(seq 1 1200); do
        state=$("$BIN" resync status --dir "$PRIM_DIR" --json 2>/dev/null |
            "$PY" -c 'import json,sys; print(json.load(sys.stdin)["peers"][0]["state"])' 2>/dev/null || true)
        [ "$state" = in_sync ] && return 0
        kill -0 "$PRIM" 2>/dev/null || break
        sleep 0.1
    done
    echo "vm-power-cut: the secondary did not come in sync (state '$state'); primary log:" >&2
    tail -n 30 "$WORK/primary.log" >&2
    echo "vm-power-cut: secondary console:" >&2
    tr -d '\r' <"$LOG" | tail -n 20 >&2
    return 1
}

# mirror_setup: a fresh 2-node volume, the secondary booted in the guest, the
# primary on the host (PRIM, its NBD at PURI), the peer in sync.
mirror_setup() {
    rm -rf "$PRIM_DIR" "$DISK"
    truncate -s $((SIZE * 2 + 64))M "$DISK"
    "$PY" "$ROOT/tools/powercut.py" init --model "$MODEL" --size-mib "$SIZE"
    SECRET=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
    echo "$SECRET" >"$SECRET_FILE"
    UUID=$("$BIN" init --dir "$PRIM_DIR" --size "${SIZE}M" --node-id 1 | sed -n 's/.*volume \([0-9a-f-]*\),.*/\1/p')
    [ -n "$UUID" ] || vm_die "no volume uuid from nbdmirror init"
    boot secondary 1
    wait_for serving || return 2
    local pport
    pport=$(free_port)
    "$BIN" serve --dir "$PRIM_DIR" --listen "127.0.0.1:$pport" --peer "2=127.0.0.1:$PPORT" \
        --secret-file "$SECRET_FILE" 2>>"$WORK/primary.log" &
    PRIM=$!
    disown "$PRIM" # (bash would report its SIGKILL)
    PURI="nbd://127.0.0.1:$pport"
    wait_in_sync || return 2
}

# promote_and_check [strict]: the guest (cut already) boots, its secondary
# is promoted and served, and must hold every durable write. A secondary
# that crashed with writes in flight may not vouch for their blocks and is
# promoted only with --force-inconsistent (docs/mirroring.md, "Uncertain
# blocks"); with `strict` (nothing was in flight) that is a failure.
promote_and_check() {
    boot promote 0
    wait_for serving || return 2
    if grep -q "VMTEST: promotion refused" <(tr -d '\r' <"$LOG"); then
        if [ "${1-}" = strict ]; then
            echo "vm-power-cut: FAIL: a secondary that was in sync and idle at the cut was refused promotion:" >&2
            tr -d '\r' <"$LOG" | grep "nbdmirror: " | tail -n 5 >&2
            cut
            return 1
        fi
        echo "vm-power-cut: the promotion needed --force-inconsistent (the secondary could not vouch for blocks of writes in flight)"
    fi
    check "$URI" || { cut; return 1; }
    cut
}

# The secondary in the guest, the primary on the host: the power of both
# goes at once (the primary is killed; its page cache would survive, so it
# is not what is checked). The secondary is then promoted and served: every
# write the primary made durable must be on it. A fresh volume each cycle.
mirror() {
    local cycle
    for cycle in $(seq 1 "$CYCLES"); do
        mirror_setup || return $?
        write_and_cut "$PURI" $((SEED + cycle)) "$QPID" "$PRIM" || return 2
        cut
        stop_primary
        promote_and_check || return $?
    done
}

# Only the secondary loses power; the primary goes on writing without it
# (after the peer timeout), then resyncs it when it is back. Whatever the
# secondary acknowledged but had not synced is gone: the primary must not
# count on it. Once in sync, both lose power and the secondary, promoted,
# must hold exactly what the primary held.
secondary_cut() {
    local cycle
    for cycle in $(seq 1 "$CYCLES"); do
        mirror_setup || return $?
        write_and_cut "$PURI" $((SEED + cycle)) "$QPID" || return 2
        cut
        "$PY" "$ROOT/tools/powercut.py" write --model "$MODEL" --uri "$PURI" --seed $((SEED + cycle + 1000)) \
            --min-seconds 5 --max-seconds 5 || return 2
        boot secondary 0
        wait_for serving || return 2
        "$BIN" resync start --dir "$PRIM_DIR" --peer 2 >/dev/null 2>&1 || true
        wait_in_sync || return 2
        echo "vm-power-cut: the secondary is back in sync; the primary's copy:"
        check "$PURI" || { cut; return 1; }
        cut
        stop_primary
        echo "vm-power-cut: both lost power; the promoted secondary's copy:"
        promote_and_check strict || return $?
    done
}

echo "vm-power-cut: $SERVER, ${SIZE} MiB export, $CYCLES power cuts, seed $SEED, kernel $KVER"
start=$SECONDS
rc=0
case $SERVER in
    nbdmirror-mirror) mirror || rc=$? ;;
    nbdmirror-secondary-cut) secondary_cut || rc=$? ;;
    *) single || rc=$? ;;
esac
elapsed=$((SECONDS - start))
[ "$rc" = 2 ] && { echo "vm-power-cut: FAIL: the test could not run (${elapsed}s)" >&2; exit 1; }
verdict=pass
[ "$rc" = 1 ] && verdict=lose
if [ "$verdict" = "$EXPECT" ]; then
    if [ "$EXPECT" = lose ]; then
        echo "vm-power-cut: PASS: $SERVER lost flushed writes at a power cut, as expected of it (${elapsed}s)"
    else
        echo "vm-power-cut: PASS: $SERVER kept every flushed write through $CYCLES power cuts (${elapsed}s)"
    fi
    exit 0
fi
if [ "$EXPECT" = lose ]; then
    echo "vm-power-cut: FAIL: $SERVER was expected to lose flushed writes and did not: the test cannot see a loss (${elapsed}s)" >&2
else
    echo "vm-power-cut: FAIL: $SERVER lost data at a power cut (seed $SEED, ${elapsed}s)" >&2
fi
exit 1
