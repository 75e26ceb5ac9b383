#!/usr/bin/env bash
# vm-kernel-client-mirror.sh: the kernel's nbd client (tools/vm-kernel-client.sh:
# nbd-client in a qemu guest, mkfs.ext4, mount, write files, umount, remount,
# verify md5sums, e2fsck -fn) against the primary of a real 2-node mirrored
# volume, with the secondary killed (SIGKILL) while the guest writes and
# restarted at once. The guest must see no error; afterwards the secondary
# must be resynced to in_sync, both nodes must stop cleanly on SIGTERM, their
# data files must be byte-identical and `nbdmirror check` clean on both.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${NBDMIRROR_BIN:-target/release/nbdmirror}"
work="$(mktemp -d /var/tmp/nbdmirror-vmm.XXXXXX)"
# Below the kernel's ephemeral range (32768 and up), as in
# vm-kernel-client-nbdmirror.sh.
port=$(( 20000 + RANDOM % 12000 ))
pport=$(( port + 1 ))
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
say() { echo "vmmirror: $*"; }
logs() {
    echo "--- primary log"; cat "$work/a.log"
    echo "--- secondary log"; cat "$work/b.log" "$work/b2.log" 2>/dev/null || true
}
die() { say "FAIL: $*"; logs; exit 1; }
status() { "$BIN" resync status --dir "$work/a" --json 2>/dev/null; }
field() { # field PYTHON-EXPR: evaluate on the primary's status JSON (as `s`)
    status | python3 -c "import json,sys; s=json.load(sys.stdin); print($1)" 2>/dev/null
}
wait_in_sync() {
    for _ in $(seq 1 "$1"); do
        [ "$(field 's["peers"][0]["state"]')" = in_sync ] && return 0
        sleep 0.1
    done
    return 1
}

head -c 32 /dev/urandom | base64 >"$work/secret"
uuid=$("$BIN" init --dir "$work/a" --size 256M --node-id 1 | grep -o 'volume [0-9a-f-]*' | cut -d' ' -f2)
"$BIN" init --dir "$work/b" --size 256M --node-id 2 --volume-uuid "$uuid" >/dev/null
secondary() {
    "$BIN" serve --dir "$work/b" --role secondary --peer-listen "127.0.0.1:$pport" \
        --secret-file "$work/secret" 2>>"$1" &
    spid=$!
    pids+=("$spid")
}
secondary "$work/b.log"
"$BIN" serve --dir "$work/a" --listen "127.0.0.1:$port" --peer "2=127.0.0.1:$pport" \
    --secret-file "$work/secret" 2>"$work/a.log" &
ppid_=$!
pids+=("$ppid_")
wait_in_sync 600 || die "the fresh secondary never came in sync"
say "2-node volume in sync: primary nbd://127.0.0.1:$port, secondary peer port $pport"

# The guest writes VMTEST_MIB of files; the secondary is killed once a few
# MiB have been applied on the primary, and restarted a second later.
VMTEST_MIB=${VMTEST_MIB:-64} VMTEST_LOG="$work/console.log" \
    bash tools/vm-kernel-client.sh "$port" disk >"$work/vm.out" 2>&1 &
vm=$!
pids+=("$vm")
base=$(field 's["store"]["applied_bytes"]')
killed=""
for _ in $(seq 1 3000); do
    kill -0 "$vm" 2>/dev/null || break
    now=$(field 's["store"]["applied_bytes"]' || echo "$base")
    if [ -n "$now" ] && [ "$now" -ge $(( base + 16 * 1024 * 1024 )) ]; then
        kill -9 "$spid"
        wait "$spid" 2>/dev/null || true
        killed=$(( (now - base) >> 20 ))
        say "killed the secondary (SIGKILL) after $killed MiB of guest writes"
        sleep 1
        secondary "$work/b2.log"
        say "restarted the secondary"
        break
    fi
    sleep 0.05
done
vrc=0
wait "$vm" || vrc=$?
cat "$work/vm.out"
[ "$vrc" -eq 0 ] || die "the guest failed (see above)"
[ -n "$killed" ] || die "the guest finished before the secondary could be killed mid-write"
after=$(( ($(field 's["store"]["applied_bytes"]') - base) >> 20 ))
say "the guest wrote $after MiB in all, $(( after - killed )) MiB of it after the kill"
wait_in_sync 1200 || die "the restarted secondary did not come back in sync: $(status)"
say "secondary in sync again: $(field '"resent %d bytes" % s["peers"][0]["resync_sent_bytes"]')"
kill -TERM "$ppid_"
prc=0; wait "$ppid_" || prc=$?
kill -TERM "$spid"
src=0; wait "$spid" || src=$?
[ "$prc" -eq 0 ] && [ "$src" -eq 0 ] || die "SIGTERM exit codes: primary $prc, secondary $src"
cmp "$work/a/data" "$work/b/data" || die "the replicas' data files differ"
"$BIN" check --dir "$work/a" >"$work/check-a" 2>&1 || { cat "$work/check-a"; die "check of the primary"; }
"$BIN" check --dir "$work/b" >"$work/check-b" 2>&1 || { cat "$work/check-b"; die "check of the secondary"; }
say "PASS: replicas identical, both check clean"
