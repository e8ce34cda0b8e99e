#!/bin/sh
# IronClaw guest init: PID 1 inside a microVM, after the initramfs has switched to the
# (overlay-writable) root. It sets up the minimum a command expects, then hands PID 1 to
# the guest agent so that a single long-lived process owns the channel and reaps orphans.
# Shell rather than Python: under TCG every interpreter start-up costs hundreds of ms.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
BB=/bin/busybox
PORT_NAME=org.ironclaw.agent

mountpoint -q /proc || mount -t proc -o nosuid,nodev,noexec proc /proc
mountpoint -q /sys || mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mountpoint -q /dev || mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mkdir -p /dev/pts /dev/shm /workspace
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 shm /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=1777 tmp /tmp
mount -t tmpfs -o nosuid,nodev,mode=0755 run /run
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd

# The workspace is the virtio disk whose serial is "ironclaw-ws", else a tmpfs.
ws=""
for s in /sys/block/vd*/serial; do
    [ -r "$s" ] && [ "$(cat "$s")" = ironclaw-ws ] && ws="/dev/$(basename "$(dirname "$s")")"
done
if [ -n "$ws" ]; then
    mount -t ext4 -o nosuid,nodev "$ws" /workspace
else
    mount -t tmpfs -o nosuid,nodev,mode=0755 workspace /workspace
fi

# No udev here: make the /dev/virtio-ports/<name> links ourselves.
mkdir -p /dev/virtio-ports
for n in /sys/class/virtio-ports/*/name; do
    [ -r "$n" ] && ln -sf "../$(basename "$(dirname "$n")")" "/dev/virtio-ports/$(cat "$n")"
done

hostname="sandbox"
ipconf=""
agent=on
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        ironclaw.hostname=*) hostname="${arg#ironclaw.hostname=}" ;;
        ironclaw.agent=*) agent="${arg#ironclaw.agent=}" ;;
        ip=*) ipconf="${arg#ip=}" ;;
    esac
done
$BB hostname "$hostname"
$BB ip link set lo up

# ip=<client>:<server>:<gateway>:<netmask-or-prefix>:<hostname>:<device>:off
if [ -n "$ipconf" ]; then
    IFS=: read -r client _server gw mask _host dev _auto <<EOF
$ipconf
EOF
    dev="${dev:-eth0}"
    $BB ip link set "$dev" up
    $BB ip addr add "$client/${mask:-24}" dev "$dev"
    [ -n "$gw" ] && $BB ip route add default via "$gw" dev "$dev"
fi

if [ "$agent" = on ] && [ -f /usr/lib/python3/dist-packages/ironclaw/guest/__main__.py ]; then
    cd /workspace || cd /
    exec python3 -m ironclaw.guest --virtio-port "$PORT_NAME"
fi

# No agent (or ironclaw.agent=off): announce readiness on the port so the host can still
# prove that the VM booted, then keep PID 1 alive.
echo "READY $(uname -r)" > "/dev/virtio-ports/$PORT_NAME"
while :; do $BB sleep 3600; done
