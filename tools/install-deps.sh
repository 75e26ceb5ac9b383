#!/usr/bin/env bash
# install-deps.sh: install the system packages the nbdmirror test suite needs
# (reference NBD servers and clients, qemu for the VM tests, fio,
# e2fsprogs, ...), plus cargo-nextest if it is missing.
#
# Idempotent and non-interactive; meant to run as root on a fresh Debian
# (bookworm) machine, e.g. from .ci/run. Returns quickly when everything is
# already installed.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

PKGS=(
    fio
    libnbd-bin       # nbdinfo, nbdcopy, nbdsh
    nbdkit
    qemu-utils       # qemu-img, qemu-nbd, qemu-io
    e2fsprogs
    python3-libnbd
    fuse3
    nbd-client
    busybox-static   # guest initramfs of the VM tests (tools/vm-lib.sh)
    cpio
    binutils         # objcopy: tools/vm-power-cut.sh strips the binary for the guest
    qemu-system-x86
    iptables
    iproute2
)

is_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

missing=()
for p in "${PKGS[@]}"; do
    is_installed "$p" || missing+=("$p")
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-deps: all ${#PKGS[@]} packages already installed"
else
    echo "install-deps: missing: ${missing[*]}"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -q
    args=("${PKGS[@]}")
    # Some images ship a newer backported qemu-utils that Breaks Debian's
    # qemu-system-common, so apt refuses qemu-system-x86 ("held broken
    # packages"). Install both at the same (candidate) version, allowing the
    # downgrade of qemu-utils, in one apt-get command.
    if ! is_installed qemu-system-x86; then
        qver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
        if [ -n "$qver" ] && [ "$qver" != "(none)" ]; then
            for i in "${!args[@]}"; do
                if [ "${args[i]}" = qemu-utils ]; then args[i]="qemu-utils=$qver"; fi
            done
        fi
    fi
    $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends --allow-downgrades "${args[@]}"
    for p in "${PKGS[@]}"; do
        is_installed "$p" || { echo "install-deps: $p still not installed" >&2; exit 1; }
    done
fi

if ! command -v cargo-nextest >/dev/null 2>&1 && ! cargo nextest --version >/dev/null 2>&1; then
    echo "install-deps: installing cargo-nextest"
    cargo install --locked cargo-nextest
fi

echo "install-deps: done"
