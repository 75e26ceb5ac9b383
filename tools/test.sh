#!/usr/bin/env bash
# test.sh: the whole nbdmirror test suite, as README.md gives it and .ci/run calls it.
#
# 1. installs what the tests need (tools/install-deps.sh: fio, libnbd-bin, nbdkit,
#    qemu-utils, e2fsprogs, python3-libnbd, fuse3, qemu-system-x86, ...);
# 2. builds the release binary;
# 3. runs every Rust test with cargo-nextest (unit, property, simulation,
#    crash-image, and process tests that drive real clients against real
#    `nbdmirror serve` processes);
# 4. runs the kernel NBD client test in a qemu guest against a real server,
#    then against the primary of a 2-node mirror whose secondary is killed
#    while the guest writes (tools/vm-kernel-client-mirror.sh);
# 5. cuts the power of a qemu guest running nbdmirror while a client writes,
#    and checks every flushed write (tools/vm-power-cut.sh), with nbdkit as
#    the controls.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/install-deps.sh
cargo build --release --workspace --all-targets
export CI="${CI:-}"

status=0
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo nextest run --release --workspace --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# The kernel's NBD client in a qemu guest: against a single node, then
# against the primary of a 2-node mirror whose secondary is killed mid-write.
kpassed=0
kfailed=0
vm_test() { # NAME SCRIPT
    echo "== $1"
    # shellcheck disable=SC2086 # $2 is a script and its arguments
    if bash $2; then
        echo "$1: passed"
        kpassed=$((kpassed + 1))
    else
        echo "$1: FAILED"
        kfailed=$((kfailed + 1))
        status=1
    fi
}
vm_test "kernel client test" tools/vm-kernel-client-nbdmirror.sh
vm_test "kernel client mirror test" tools/vm-kernel-client-mirror.sh
# Power cuts: the server in a qemu guest loses its page cache; every flushed
# write must survive (tools/vm-power-cut.sh). nbdkit file must pass the same
# check, and nbdkit with FLUSH and FUA dropped must fail it.
vm_test "power-cut test" tools/vm-power-cut.sh
VMPC_CYCLES=2 vm_test "power-cut mirror test" "tools/vm-power-cut.sh nbdmirror-mirror"
VMPC_CYCLES=1 vm_test "power-cut secondary test" "tools/vm-power-cut.sh nbdmirror-secondary-cut"
VMPC_CYCLES=2 vm_test "power-cut control: nbdkit file keeps flushed writes" "tools/vm-power-cut.sh nbdkit"
VMPC_CYCLES=1 vm_test "power-cut control: nbdkit without flushes loses them" "tools/vm-power-cut.sh nbdkit-unsafe lose"

# One closing line for the whole suite: nextest's counts plus the VM tests.
summary="$(grep -E 'tests run: ' "$log" | tail -1)"
passed="$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$summary")"
failed="$(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<<"$summary")"
passed=${passed:-0}
failed=${failed:-0}
passed=$((passed + kpassed))
failed=$((failed + kfailed))
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
echo "summary: $passed passed, $failed failed"
exit "$status"
