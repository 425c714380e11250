#!/bin/sh
# Builds the tiny Linux test guest used by the VM tests and scripts/create-vm:
#   <out>/vmlinuz        kernel of Debian's linux-image-cloud-amd64
#   <out>/initrd.img     busybox-static + virtio-net modules + scripts/guest/* (gzip'd cpio newc,
#                        zero-padded to a multiple of 4 so more archives can be appended)
#   <out>/iperf3.cpio.gz (with --with-iperf3) iperf3 and its shared libraries, to append to
#                        initrd.img when a VM needs it
# Everything comes from Debian packages fetched with `apt-get download` and unpacked with
# `dpkg-deb -x` into a temporary directory: nothing is installed on the host and nothing
# else is downloaded. See docs/guest.md.
#
# Usage: scripts/build-guest.sh [--with-iperf3] [--refresh] [--out DIR]
#   --refresh  resolve the Debian packages again even if the cache is up to date
#   --out      output directory (default: $VMNB_GUEST_DIR or <repo>/target/guest)
# Re-running is a no-op while the outputs exist and this script and scripts/guest/ are
# unchanged: the cache is keyed on their contents, so it never asks apt then.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${VMNB_GUEST_DIR:-$ROOT/target/guest}
WITH_IPERF3=0
REFRESH=0
while [ $# -gt 0 ]; do
    case "$1" in
        --with-iperf3) WITH_IPERF3=1 ;;
        --refresh) REFRESH=1 ;;
        --out) OUT=$2; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "build-guest: unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

# The modules virtio-net needs, in the order they must be loaded (dependencies are added and
# ordered from each module's own `depends=` field; builtin ones are skipped).
WANT_MODULES="virtio_pci virtio_net"
KERNEL_META=linux-image-cloud-amd64

log() { echo "build-guest: $*" >&2; }
die() { echo "build-guest: error: $*" >&2; exit 1; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# Concurrent test binaries (or helpers) may build at once: one builder at a time.
exec 9>"$OUT/.lock"
flock 9

inputs_hash() {
    # The cache key: this script and everything that goes into the initramfs from the repo.
    (cat "$0"; find "$ROOT/scripts/guest" -type f | LC_ALL=C sort | xargs cat) | sha256sum | cut -d' ' -f1
}
KEY=$(inputs_hash)

up_to_date() {
    [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd.img" ] && [ -f "$OUT/stamp" ] || return 1
    [ "$(cat "$OUT/stamp")" = "$KEY" ] || return 1
    if [ "$WITH_IPERF3" = 1 ]; then [ -f "$OUT/iperf3.cpio.gz" ] || return 1; fi
    return 0
}
if [ "$REFRESH" = 0 ] && up_to_date; then
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb gzip sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found: this script needs a Debian-based host"
done

# apt-cache knows nothing until the package lists exist.
candidate() { apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p'; }
if [ -z "$(candidate "$KERNEL_META")" ] || [ "$(candidate "$KERNEL_META")" = "(none)" ]; then
    [ "$(id -u)" = 0 ] || die "apt-cache has no candidate for $KERNEL_META; run 'apt-get update' as root"
    log "no candidate for $KERNEL_META: running apt-get update"
    apt-get update -qq >&2 || die "apt-get update failed"
    c=$(candidate "$KERNEL_META")
    [ -n "$c" ] && [ "$c" != "(none)" ] || die "Debian has no $KERNEL_META for this host's release"
fi
# The metapackage only depends on the versioned image package, which has the files.
KPKG=$(apt-cache depends "$KERNEL_META" | sed -n 's/^ *Depends: \(linux-image-[^ ]*\)$/\1/p' | head -n1)
[ -n "$KPKG" ] || die "cannot tell which kernel package $KERNEL_META depends on"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vmnb-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT INT TERM
# apt-get download runs as the _apt user when root: it must be able to write here.
chmod 755 "$WORK"

fetch() { # fetch PKG... : download and unpack into $WORK/pkgs (one tree for all)
    mkdir -p "$WORK/debs" "$WORK/pkgs"
    (cd "$WORK/debs" && apt-get -q -o APT::Sandbox::User=root download "$@" >&2) ||
        die "apt-get download $* failed"
    for p in "$@"; do
        deb=$(ls "$WORK/debs/${p}_"*.deb 2>/dev/null | head -n1)
        [ -n "$deb" ] || die "apt-get download gave no .deb for $p"
        dpkg-deb -x "$deb" "$WORK/pkgs"
        echo "$p $(dpkg-deb -f "$deb" Version)" >>"$WORK/versions"
    done
}

log "fetching $KPKG and busybox-static"
fetch "$KPKG" busybox-static
PK=$WORK/pkgs
BB=$PK/bin/busybox
[ -x "$BB" ] || die "busybox-static has no /bin/busybox"
KVER=$(ls "$PK/lib/modules" | head -n1)
MODDIR=$PK/lib/modules/$KVER
VMLINUZ=$PK/boot/vmlinuz-$KVER
[ -f "$VMLINUZ" ] || die "no kernel image in $KPKG"

# --- initramfs tree ---
R=$WORK/root
mkdir -p "$R/bin" "$R/sbin" "$R/etc/vmnb" "$R/lib/modules" "$R/lib/vmnb" "$R/proc" "$R/sys" \
    "$R/dev" "$R/tmp" "$R/run" "$R/root" "$R/vmnb" "$R/usr/share/udhcpc"
cp "$BB" "$R/bin/busybox"
for applet in $("$BB" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$R/bin/$applet"
done
ln -sf ../bin/busybox "$R/sbin/init"
cp "$ROOT/scripts/guest/init" "$R/init"
cp "$ROOT/scripts/guest/functions.sh" "$ROOT/scripts/guest/udhcpc.script" "$R/lib/vmnb/"
ln -sf ../../../lib/vmnb/udhcpc.script "$R/usr/share/udhcpc/default.script"
chmod 755 "$R/init" "$R/lib/vmnb/udhcpc.script"
echo 'root:x:0:0:root:/root:/bin/sh' >"$R/etc/passwd"
echo 'root:x:0:' >"$R/etc/group"
# The kernel opens /dev/console for init before anything is mounted.
if [ "$(id -u)" = 0 ]; then
    mknod -m 600 "$R/dev/console" c 5 1
fi

# --- modules: resolve dependencies from each .ko's modinfo, skip builtins, keep load order ---
mod_path() { # name -> path relative to MODDIR ('' if unknown); '-' and '_' are the same
    awk -v n="$1" 'BEGIN { gsub("-", "_", n) }
        { b = $0; sub(".*/", "", b); sub("\\.ko(\\.(xz|zst|gz))?$", "", b); gsub("-", "_", b)
          if (b == n) { print; exit } }' "$MODDIR/modules.order"
}
is_builtin() {
    n=$(echo "$1" | tr - _)
    tr - _ <"$MODDIR/modules.builtin" | grep -q "/$n\.ko\$"
}
ko_uncompressed() { # path from modules.order -> uncompressed .ko on stdout
    # modules.order may name the .ko while the file on disk is compressed; busybox insmod
    # cannot load compressed modules, so they are decompressed here.
    local f=$MODDIR/${1%.ko*}.ko
    if [ -f "$f" ]; then cat "$f"
    elif [ -f "$f.xz" ]; then xz -dc "$f.xz"
    elif [ -f "$f.zst" ]; then zstd -dc "$f.zst"
    elif [ -f "$f.gz" ]; then gzip -dc "$f.gz"
    else die "module file $f is missing"
    fi
}
: >"$R/etc/vmnb/modules"
add_module() {
    local name p deps d
    name=$(echo "$1" | tr - _)
    grep -qx "$name" "$R/etc/vmnb/modules" && return 0
    if is_builtin "$name"; then
        log "module $name is builtin"
        return 0
    fi
    p=$(mod_path "$name")
    [ -n "$p" ] || die "module $name is neither builtin nor in $KPKG"
    ko_uncompressed "$p" >"$WORK/$name.ko"
    deps=$(tr '\0' '\n' <"$WORK/$name.ko" | sed -n 's/^depends=//p' | head -n1 | tr , ' ')
    for d in $deps; do
        add_module "$d"
    done
    mv "$WORK/$name.ko" "$R/lib/modules/$name.ko"
    echo "$name" >>"$R/etc/vmnb/modules"
}
for m in $WANT_MODULES; do add_module "$m"; done
log "modules: $(tr '\n' ' ' <"$R/etc/vmnb/modules")"

cp "$WORK/versions" "$R/etc/vmnb/versions"

# cpio newc of a directory, files owned by root, zero-padded to a multiple of 4 bytes (the
# kernel only looks for an appended archive at a 4-byte boundary).
make_cpio_gz() { # dir out
    (cd "$1" && find . | LC_ALL=C sort | "$BB" cpio -o -H newc 2>/dev/null) | gzip -9n >"$2.tmp"
    size=$(wc -c <"$2.tmp")
    pad=$(((4 - size % 4) % 4))
    [ "$pad" = 0 ] || head -c "$pad" /dev/zero >>"$2.tmp"
}
make_cpio_gz "$R" "$WORK/initrd.img"

# --- optional iperf3: its binary and every shared library it needs, from Debian ---
if [ "$WITH_IPERF3" = 1 ]; then
    log "fetching iperf3 and its libraries"
    # libc6 too: the guest then does not depend on the host's C library.
    fetch iperf3 libiperf0 libsctp1 libssl3 libc6
    I=$WORK/iperf3root
    mkdir -p "$I/bin" "$I/lib64" "$I/lib/x86_64-linux-gnu"
    cp "$PK/usr/bin/iperf3" "$I/bin/iperf3"
    cp -L "$PK/lib64/ld-linux-x86-64.so.2" "$I/lib64/"
    # Walk DT_NEEDED with the package's own loader (--list resolves without running iperf3).
    LIBPATH=$PK/lib/x86_64-linux-gnu:$PK/usr/lib/x86_64-linux-gnu
    "$PK/lib64/ld-linux-x86-64.so.2" --library-path "$LIBPATH" --list "$PK/usr/bin/iperf3" \
        >"$WORK/iperf3.ldd" || die "cannot list iperf3's libraries"
    for lib in $(sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p' "$WORK/iperf3.ldd"); do
        case "$lib" in "$PK"/*) ;; *) die "iperf3 needs $lib, which is not from Debian's packages" ;; esac
        cp -L "$lib" "$I/lib/x86_64-linux-gnu/"
    done
    make_cpio_gz "$I" "$WORK/iperf3.cpio.gz"
fi

# --- publish atomically-ish: outputs first, the stamp last ---
rm -f "$OUT/stamp"
cp "$VMLINUZ" "$OUT/vmlinuz.tmp" && mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv "$WORK/initrd.img.tmp" "$OUT/initrd.img"
if [ "$WITH_IPERF3" = 1 ]; then
    mv "$WORK/iperf3.cpio.gz.tmp" "$OUT/iperf3.cpio.gz"
else
    rm -f "$OUT/iperf3.cpio.gz"
fi
cp "$WORK/versions" "$OUT/versions"
echo "$KEY" >"$OUT/stamp"
log "built $OUT: kernel $KVER, initrd $(wc -c <"$OUT/initrd.img") bytes$([ "$WITH_IPERF3" = 1 ] && echo ", iperf3 $(wc -c <"$OUT/iperf3.cpio.gz") bytes")"
