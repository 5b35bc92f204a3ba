#!/usr/bin/env bash
# Runs a command of this repository inside a qemu guest that has a Soft-RoCE device (rdma_rxe,
# "rxe0"), so that ferry's verbs code runs against real ibverbs on a machine without an RDMA NIC.
#
#   tests/softroce/run.sh COMMAND [ARGS...]
#
# COMMAND is a path relative to the repository root (a test binary under target/, a script);
# the guest sees the repository read-only at /mnt/host over virtio-9p and runs COMMAND from
# there with FERRY_SOFTROCE=1 and FERRY_NIC=rxe0 set. The exit status is COMMAND's own.
#
# Everything is fetched from Debian's archive with `apt-get download` and only unpacked
# (`dpkg -x`) under the work folder; nothing is installed on the host: the kernel
# (linux-image-amd64, whose flavour ships rdma_rxe.ko; -cloud- does not), busybox-static,
# libibverbs1 + ibverbs-providers (the rxe provider) + ibverbs-utils, libnl, and, when the host
# has no qemu-system-x86_64, qemu-system-x86 with the libraries the host lacks. (Installing
# qemu-system-x86 with apt could remove a newer qemu-utils the host has.) Needs root.
#
# The guest boots under TCG (no KVM: nested KVM here is kvm_pvm, which cannot boot a stock
# kernel), 2 vCPUs, in about 2 s; a whole run with a warm cache takes seconds plus COMMAND.
#
# Environment: FERRY_SOFTROCE_WORK (cache and staging; default target/softroce),
# FERRY_SOFTROCE_TIMEOUT (seconds for the guest; default 1200), FERRY_SOFTROCE_SMP (2),
# FERRY_SOFTROCE_MEM (MiB; 2048).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${FERRY_SOFTROCE_WORK:-$REPO/target/softroce}
TIMEOUT=${FERRY_SOFTROCE_TIMEOUT:-1200}
SMP=${FERRY_SOFTROCE_SMP:-2}
MEM=${FERRY_SOFTROCE_MEM:-2048}
MA=x86_64-linux-gnu
GUEST_PKGS="busybox-static libibverbs1 ibverbs-providers ibverbs-utils libnl-3-200 libnl-route-3-200"
APT=(apt-get -o APT::Sandbox::User=root -o Dpkg::Use-Pty=0 -qq)

start=$SECONDS
log() { echo "[softroce +$((SECONDS - start))s] $*" >&2; }
die() { log "error: $*"; exit 2; }

[ $# -ge 1 ] || die "usage: $0 COMMAND [ARGS...] (COMMAND relative to the repository root)"
[ -x "$REPO/$1" ] || die "not an executable in the repository: $1"
[ "$(id -u)" = 0 ] || die "needs root (apt-get download into the work folder)"
for tool in ip rdma; do
    command -v $tool >/dev/null || "${APT[@]}" install -y --no-install-recommends iproute2 >&2
done
mkdir -p "$WORK/debs" "$WORK/qemu-debs/partial"

# ---- packages: download once per version, unpack once
updated=0
apt_update() { [ $updated = 1 ] || { log "apt-get update"; "${APT[@]}" update >&2 || true; updated=1; }; }
fetch() { # package -> path of its .deb in $WORK/debs (the apt lists are refreshed once if stale)
    local p=$1 v f
    v=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/{print $2}')
    f=$(ls "$WORK/debs/${p}_"*"${v#*:}_"*.deb 2>/dev/null | head -1 || true)
    if [ -z "$f" ] && [ -n "$v" ] && [ "$v" != "(none)" ]; then
        (cd "$WORK/debs" && "${APT[@]}" download "$p=$v" >&2) || true
        f=$(ls "$WORK/debs/${p}_"*"${v#*:}_"*.deb 2>/dev/null | head -1 || true)
    fi
    if [ -z "$f" ] && [ $updated = 0 ]; then
        apt_update
        fetch "$p"
        return
    fi
    [ -n "$f" ] || die "cannot download $p (candidate ${v:-none})"
    echo "$f"
}
unpack() { # dir deb...
    local dir=$1 deb; shift
    mkdir -p "$dir"
    for deb in "$@"; do
        [ -e "$dir/.unpacked.$(basename "$deb")" ] || { dpkg -x "$deb" "$dir"; touch "$dir/.unpacked.$(basename "$deb")"; }
    done
}
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$KPKG" ] || { apt_update; KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}'); }
[ -n "$KPKG" ] || die "cannot resolve linux-image-amd64 to a kernel package"
KVER=${KPKG#linux-image-}
unpack "$WORK/kernel" "$(fetch "$KPKG")"
debs=()
for p in $GUEST_PKGS; do debs+=("$(fetch "$p")"); done
unpack "$WORK/guest" "${debs[@]}"
MODDIR=$WORK/kernel/lib/modules/$KVER
[ -f "$MODDIR/kernel/drivers/infiniband/sw/rxe/rdma_rxe.ko" ] || die "$KPKG has no rdma_rxe.ko"
[ -s "$MODDIR/modules.dep" ] || "$WORK/guest/bin/busybox" depmod -b "$WORK/kernel" "$KVER"
# An uncompressed vmlinux boots through PVH, seconds faster under TCG than the xz bzImage.
KERNEL=$WORK/kernel/vmlinux
if [ ! -s "$KERNEL" ]; then
    python3 - "$WORK/kernel/boot/vmlinuz-$KVER" "$KERNEL" <<'PY'
import lzma, sys
data = open(sys.argv[1], 'rb').read()
start = data.find(b'\xfd7zXZ\x00')
assert start > 0, 'no xz stream in the bzImage'
elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
assert elf[:4] == b'\x7fELF'
open(sys.argv[2] + '.tmp', 'wb').write(elf)
PY
    mv "$KERNEL.tmp" "$KERNEL"
fi

if command -v qemu-system-x86_64 >/dev/null; then
    QEMU=(qemu-system-x86_64)
else
    Q=$WORK/qemu
    QENV=(env "LD_LIBRARY_PATH=$Q/usr/lib/$MA:$Q/lib/$MA" "QEMU_MODULE_DIR=$Q/usr/lib/$MA/qemu")
    missing() { "${QENV[@]}" ldd "$Q/usr/bin/qemu-system-x86_64" 2>&1 | grep 'not found' || true; }
    if [ ! -x "$Q/usr/bin/qemu-system-x86_64" ] || [ -n "$(missing)" ]; then
        log "downloading qemu-system-x86 and the libraries this host lacks"
        get() { "${APT[@]}" install -y --download-only --no-install-recommends -o Dir::Cache::archives="$WORK/qemu-debs" qemu-system-x86 >&2; }
        get || { apt_update; get; } || die "downloading qemu-system-x86 failed"
        unpack "$Q" "$WORK"/qemu-debs/*.deb
        [ -z "$(missing)" ] || die "qemu still lacks: $(missing)"
    fi
    QEMU=("${QENV[@]}" "$Q/usr/bin/qemu-system-x86_64" -L "$Q/usr/share/qemu" -L "$Q/usr/share/seabios")
fi
log "packages ready ($KPKG)"

# ---- initramfs: busybox, iproute2's ip and rdma, ibverbs and the rxe provider, the modules
STAGE=$WORK/stage
rm -rf "$STAGE"
mkdir -p "$STAGE"/usr/{bin,sbin,lib/$MA/libibverbs,lib64} "$STAGE"/{etc/libibverbs.d,proc,sys,dev,tmp,mnt/host}
ln -s usr/bin "$STAGE/bin"; ln -s usr/sbin "$STAGE/sbin"; ln -s usr/lib "$STAGE/lib"; ln -s usr/lib64 "$STAGE/lib64"
LIBPATH=$WORK/guest/usr/lib/$MA:$WORK/guest/lib/$MA
with_libs() { # ELF: copy it in, with every shared library it needs
    local elf=$1 dest=$2 line lib
    install -D -m 0755 "$elf" "$STAGE/$dest"
    while read -r line; do
        case "$line" in
            *"not found"*) die "ldd $elf: $line" ;;
            *"=> /"*) lib=${line#*=> }; lib=${lib%% (*}; [ -e "$STAGE/usr/lib/$MA/${lib##*/}" ] || cp -L "$lib" "$STAGE/usr/lib/$MA/" ;;
            /*ld-linux*) lib=${line%% (*}; cp -Ln "$lib" "$STAGE/usr/lib64/" ;;
        esac
    done < <(LD_LIBRARY_PATH=$LIBPATH ldd "$elf" 2>&1 || true)
}
cp "$WORK/guest/bin/busybox" "$STAGE/usr/bin/busybox"
with_libs "$(command -v ip)" usr/sbin/ip
with_libs "$(command -v rdma)" usr/sbin/rdma
for tool in ibv_devices ibv_devinfo; do with_libs "$WORK/guest/usr/bin/$tool" usr/bin/$tool; done
cp "$WORK/guest/etc/libibverbs.d/rxe.driver" "$STAGE/etc/libibverbs.d/"
with_libs "$WORK/guest/usr/lib/$MA/libibverbs/librxe-rdmav34.so" usr/lib/$MA/libibverbs/librxe-rdmav34.so
cp -L "$WORK/guest/usr/lib/$MA/libibverbs.so.1" "$STAGE/usr/lib/$MA/"
for lib in libgcc_s.so.1 libm.so.6 libdl.so.2 libpthread.so.0 librt.so.1 libstdc++.so.6; do
    for dir in /lib/$MA /usr/lib/$MA; do [ -e "$dir/$lib" ] && { cp -L "$dir/$lib" "$STAGE/usr/lib/$MA/"; break; }; done
done
for applet in $("$WORK/guest/bin/busybox" --list); do
    [ -e "$STAGE/usr/bin/$applet" ] || [ -e "$STAGE/usr/sbin/$applet" ] || ln -s busybox "$STAGE/usr/bin/$applet"
done
install -m 0755 "$REPO/tests/softroce/init.sh" "$STAGE/init"
echo "root:x:0:0:root:/root:/bin/sh" > "$STAGE/etc/passwd"
: > "$STAGE/etc/modules.load"
declare -A seen=()
for module in crc32_generic rdma_rxe dummy virtio_pci 9pnet_virtio 9p; do
    line=$(grep -E "(^|/)${module}\.ko(\.[a-z]+)?:" "$MODDIR/modules.dep" | head -1 || true)
    if [ -z "$line" ]; then grep -qE "/${module}\.ko" "$MODDIR/modules.builtin" && continue; die "no module $module in $KVER"; fi
    for f in $(tr ' ' '\n' <<<"${line#*:}" | grep . | tac) "${line%%:*}"; do
        [ -n "${seen[$f]:-}" ] && continue
        seen[$f]=1
        install -D -m 0644 "$MODDIR/$f" "$STAGE/lib/modules/$KVER/$f"
        echo "/lib/modules/$KVER/$f" >> "$STAGE/etc/modules.load"
    done
done
printf '%s\n' "$@" > "$STAGE/etc/command"
(cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort | "$WORK/guest/bin/busybox" cpio -o -H newc 2>/dev/null) > "$WORK/initrd.cpio"

# ---- boot; the console is the guest's stdout
log "booting $KVER under TCG ($SMP vCPUs, $MEM MiB): $*"
LOG=$WORK/guest.log
set +e
timeout -k 10 "$TIMEOUT" "${QEMU[@]}" -accel tcg -cpu max -nodefaults -no-user-config -machine pc -m "$MEM" -smp "$SMP" \
    -kernel "$KERNEL" -initrd "$WORK/initrd.cpio" -display none -serial stdio -monitor none -no-reboot \
    -append "console=ttyS0 panic=-1 loglevel=4 mitigations=off tsc=reliable no_timer_check" \
    -virtfs "local,path=$REPO,mount_tag=ferry_repo,security_model=none,readonly=on" </dev/null 2>&1 | tr -d '\r' | tee "$LOG"
qemu_rc=${PIPESTATUS[0]}
set -e
[ "$qemu_rc" = 124 ] && die "the guest ran past ${TIMEOUT}s"
rc=$(sed -n 's/^FERRY_GUEST_EXIT=\([0-9]*\)$/\1/p' "$LOG" | tail -1)
[ -n "$rc" ] || die "the guest did not report an exit status (qemu exit $qemu_rc); see $LOG"
log "guest command exited with $rc"
exit "$rc"
