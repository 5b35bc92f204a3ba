#!/usr/bin/env bash
# The fresh-machine check of .ci/setup, by hand, as root on Debian 12 with libclang-dev installed:
#
#   unshare -m --propagation private tests/setup/hide-libclang.sh
#
# In the new mount namespace it hides libclang (whiteouts in overlays over the two directories
# that hold it) and keeps libclang-cpp, then runs .ci/setup, which must report libclang missing
# and install it again (apt-get --reinstall writes into the overlays), and the probe must then
# find it. Nothing outside the namespace changes but a reinstall of the same packages.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "hide-libclang: needs root (mount namespace, overlays)" >&2; exit 1; }
scratch=$(mktemp -d)
mount -t tmpfs tmpfs "$scratch"
for dir in /usr/lib/llvm-*/lib /usr/lib/x86_64-linux-gnu; do
    name=$(echo "$dir" | tr / _)
    mkdir -p "$scratch/$name.upper" "$scratch/$name.work"
    for file in "$dir"/libclang.so* "$dir"/libclang-[0-9]*.so*; do
        if [ -e "$file" ] || [ -L "$file" ]; then mknod "$scratch/$name.upper/${file##*/}" c 0 0; fi
    done
    mount -t overlay overlay -o "lowerdir=$dir,upperdir=$scratch/$name.upper,workdir=$scratch/$name.work" "$dir"
done
echo "--- left in view:"; ls /usr/lib/llvm-*/lib/ /usr/lib/x86_64-linux-gnu/ | grep '^libclang[.-][0-9c]' || true
if .ci/find-libclang; then echo "hide-libclang: the probe still finds libclang" >&2; exit 1; fi
.ci/setup
echo "--- the probe after the setup:"; .ci/find-libclang
