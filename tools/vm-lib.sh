# vm-lib.sh: what the qemu guest tests share (sourced, not run).
#
# vm_prepare_kernel        sets VMLINUZ, KVER and MODDIR: the Debian cloud
#                          kernel, fetched once with apt-get download into
#                          $CACHE/kernel/ (CACHE must be set; the caller holds
#                          the preparation lock, see vm_lock).
# vm_lock                  serialises preparation between concurrent runs.
# vm_initramfs_root R      a busybox root in directory R (bin, sbin, etc, proc,
#                          sys, dev, mnt, tmp, lib/modules).
# vm_copy_bins R SRC:DST.. copy programs into R and the shared libraries
#                          that ldd lists for them, at the loader's paths.
# vm_add_modules R MOD..   kernel modules plus their dependencies, in load
#                          order, listed in R/lib/modules/order.
# vm_pack R OUT            the cpio.gz initramfs of R.
#
# Needs (tools/install-deps.sh): qemu-system-x86, busybox-static, cpio, and apt
# access to fetch the kernel package once.

vm_die() { echo "${0##*/}: $*" >&2; exit 1; }

vm_check_tools() {
    local tool
    for tool in qemu-system-x86_64 cpio dpkg apt-get; do
        command -v "$tool" >/dev/null || vm_die "$tool not found (run tools/install-deps.sh)"
    done
    [ -x /bin/busybox ] || vm_die "/bin/busybox not found (run tools/install-deps.sh)"
    # (Not `| grep -q`: with pipefail, grep quitting at the first match can
    # kill busybox with SIGPIPE and fail the pipeline; CI saw it once.)
    /bin/busybox --list | grep -x insmod >/dev/null || vm_die "/bin/busybox is not busybox-static"
}

vm_lock() {
    mkdir -p "$CACHE/kernel"
    exec 9>"$CACHE/.lock"
    flock 9
}

vm_unlock() { flock -u 9; }

vm_kernel_pkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}

vm_prepare_kernel() {
    local pkg kdir=""
    pkg=$(vm_kernel_pkg || true)
    if [ -n "$pkg" ] && [ -e "$CACHE/kernel/$pkg/.complete" ]; then
        kdir=$CACHE/kernel/$pkg
    elif [ -z "$pkg" ]; then
        # No apt lists (or no network): fall back to any kernel already cached.
        kdir=$(ls -d "$CACHE"/kernel/*/.complete 2>/dev/null | sort -V | tail -n1 | xargs -r dirname)
        if [ -z "$kdir" ]; then
            echo "vmtest: apt-cache knows no linux-image-cloud-amd64; running apt-get update" >&2
            apt-get update -q >&2
            pkg=$(vm_kernel_pkg || true)
            [ -n "$pkg" ] || vm_die "cannot find the Debian cloud kernel package"
        fi
    fi
    if [ -z "$kdir" ]; then
        kdir=$CACHE/kernel/$pkg
        echo "vmtest: fetching kernel package for $pkg into $kdir" >&2
        rm -rf "$kdir" "$CACHE/dl"
        mkdir -p "$CACHE/dl" "$kdir"
        # Prefer the -unsigned package (same kernel, no signature wrapper).
        (cd "$CACHE/dl" && { apt-get download -q "$pkg-unsigned" || apt-get download -q "$pkg"; }) >&2
        dpkg -x "$CACHE"/dl/*.deb "$kdir"
        rm -rf "$CACHE/dl"
        touch "$kdir/.complete"
    fi
    VMLINUZ=$(ls "$kdir"/boot/vmlinuz-* | head -n1)
    KVER=${VMLINUZ##*/vmlinuz-}
    MODDIR=$kdir/lib/modules/$KVER
}

vm_initramfs_root() {
    local r=$1
    mkdir -p "$r"/{bin,sbin,etc,proc,sys,dev,mnt,tmp,lib/modules,lib64}
    cp /bin/busybox "$r/bin/busybox"
    echo "127.0.0.1 localhost" >"$r/etc/hosts"
    echo "hosts: files" >"$r/etc/nsswitch.conf"
}

vm_copy_bins() {
    local r=$1 spec src dst lib
    shift
    for spec in "$@"; do
        src=${spec%%:*}
        dst=${spec#*:}
        [ -e "$src" ] || vm_die "$src not found (run tools/install-deps.sh)"
        mkdir -p "$r$(dirname "$dst")"
        cp -L "$src" "$r$dst"
        for lib in $(ldd "$src" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
            [ -e "$r$lib" ] && continue
            mkdir -p "$r$(dirname "$lib")"
            cp -L "$lib" "$r$lib"
        done
    done
}

vm_add_module() {
    local r=$1 m=$2 f d
    grep -qx "$m" "$r/lib/modules/order" && return 0
    f=$(find "$MODDIR/kernel" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "${m//_/-}.ko" \) | head -n1)
    if [ -z "$f" ]; then
        grep -q "/$m.ko\$" "$MODDIR/modules.builtin" 2>/dev/null ||
            vm_die "module $m neither in $MODDIR nor built in"
        return 0
    fi
    case $f in
        *.ko.xz) xz -dc "$f" >"$r/lib/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$f" >"$r/lib/modules/$m.ko" ;;
        *) cp "$f" "$r/lib/modules/$m.ko" ;;
    esac
    for d in $(tr '\0' '\n' <"$r/lib/modules/$m.ko" | sed -n 's/^depends=//p' | tr ',' ' '); do
        vm_add_module "$r" "$d"
    done
    echo "$m" >>"$r/lib/modules/order"
}

vm_add_modules() {
    local r=$1 m
    shift
    touch "$r/lib/modules/order"
    for m in "$@"; do vm_add_module "$r" "$m"; done
}

vm_pack() {
    local r=$1 out=$2
    (cd "$r" && find . | sort | cpio -o -H newc --quiet | gzip -1) >"$out.tmp"
    mv -f "$out.tmp" "$out"
}
