#!/bin/sh
# /init of the Soft-RoCE guest (busybox sh, PID 1): loads the modules, creates rxe0 on a dummy
# netdev (no traffic leaves the guest), mounts the repository over virtio-9p at /mnt/host, runs
# the command listed in /etc/command from there, prints FERRY_GUEST_EXIT=<status> and powers off.
export PATH=/usr/sbin:/usr/bin HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1
export LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu FERRY_SOFTROCE=1 FERRY_NIC=rxe0
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mount -t tmpfs tmpfs /tmp
mkdir -p /dev/shm /root && mount -t tmpfs tmpfs /dev/shm

finish() {
    echo "FERRY_GUEST_EXIT=$1"
    sync
    poweroff -f
}
# busybox sh runs its own applets before $PATH: the real ip is called by path
IP=/usr/sbin/ip

while read -r module; do
    insmod "$module" || { echo "softroce: insmod $module failed"; finish 3; }
done < /etc/modules.load
$IP link set lo up
# (the dummy module makes dummy0 itself)
[ -e /sys/class/net/dummy0 ] || $IP link add dummy0 type dummy
$IP link set dummy0 up || finish 3
# GID 0 comes from dummy0's IPv6 link-local address: wait for it to leave 'tentative'
i=0
while [ $i -lt 50 ] && ! $IP -6 addr show dev dummy0 | grep 'scope link' | grep -qv tentative; do
    sleep 0.1; i=$((i + 1))
done
rdma link add rxe0 type rxe netdev dummy0 || { echo "softroce: rdma link add failed"; finish 3; }
ibv_devinfo -d rxe0 | grep -E 'hca_id|state|active_mtu|link_layer'
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288 ferry_repo /mnt/host || { echo "softroce: 9p mount failed"; finish 3; }
echo "softroce: rxe0 up at $(cut -d' ' -f1 /proc/uptime) s guest uptime"

set --
while IFS= read -r arg; do set -- "$@" "$arg"; done < /etc/command
cd /mnt/host
command=$1
shift
"./$command" "$@"
finish $?
