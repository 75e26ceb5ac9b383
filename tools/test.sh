#!/usr/bin/env bash
# test.sh: the whole nbdmirror test suite, as README.md gives it and .ci/run calls it.
#
# 1. installs what the tests need (tools/install-deps.sh: fio, libnbd-bin, nbdkit,
#    qemu-utils, e2fsprogs, python3-libnbd, fuse3, qemu-system-x86, ...);
# 2. builds the release binary;
# 3. runs every Rust test with cargo-nextest (unit, property, simulation,
#    crash-image, and process tests that drive real clients against real
#    `nbdmirror serve` processes);
# 4. runs the kernel NBD client test in a qemu guest against a real server.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/install-deps.sh
cargo build --release --workspace --all-targets
export CI="${CI:-}"

status=0
cargo nextest run --release --workspace --no-fail-fast || status=$?

echo "== kernel NBD client in a qemu guest"
kstatus=0
bash tools/vm-kernel-client-nbdmirror.sh || kstatus=$?
if [ "$kstatus" -ne 0 ]; then
    echo "kernel client test: FAILED"
    status=1
else
    echo "kernel client test: passed"
fi
exit "$status"
