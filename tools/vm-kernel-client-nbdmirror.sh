#!/usr/bin/env bash
# vm-kernel-client-nbdmirror.sh: start a real `nbdmirror serve` on a fresh
# replica and run tools/vm-kernel-client.sh (the kernel's nbd client in a qemu
# guest: nbd-client, mkfs.ext4, mount, write, umount, e2fsck -fn) against it.
# Afterwards the server must shut down cleanly on SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${NBDMIRROR_BIN:-target/release/nbdmirror}"
work="$(mktemp -d /var/tmp/nbdmirror-vm.XXXXXX)"
# Below the kernel's ephemeral range (32768 and up), so no client socket of
# the tests that ran before holds it.
port=$(( 20000 + RANDOM % 12000 ))
cleanup() {
    if [ -n "${pid:-}" ] && kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
"$BIN" init --dir "$work/replica" --size 256M >/dev/null
"$BIN" serve --dir "$work/replica" --listen "127.0.0.1:$port" 2>"$work/server.log" &
pid=$!
up=0
for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then up=1; break; fi
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.1
done
if [ "$up" -ne 1 ]; then
    echo "nbdmirror serve is not listening on 127.0.0.1:$port; server log:"
    cat "$work/server.log"
    exit 1
fi
rc=0
bash tools/vm-kernel-client.sh "$port" disk || rc=$?
kill -TERM "$pid" 2>/dev/null || echo "the server had exited during the test"
src=0
wait "$pid" || src=$?
echo "--- server log"; cat "$work/server.log"
if [ "$src" -ne 0 ]; then echo "server exited with $src after SIGTERM"; exit 1; fi
exit "$rc"
