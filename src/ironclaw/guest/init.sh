#!/bin/sh
# IronClaw guest init: PID 1 inside a microVM, after the initramfs has switched to the
# (overlay-writable) root. It sets up the minimum a command expects, starts the guest
# agent as its child, and stays PID 1 only to reap orphans (the agent reaps just its own
# children) and to power the VM off once the agent is gone.
# Shell rather than Python: under TCG every interpreter start-up costs hundreds of ms.
#
# Kernel command line: ironclaw.hostname=, ironclaw.agent=on|off, ip= (see below), and for
# VMMs whose disks carry no serial (Firecracker) ironclaw.workspace=/dev/vdX and
# ironclaw.channel=vsock:PORT (default: the virtio-serial port below).
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

hostname="sandbox"
ipconf=""
agent=on
ws=""
channel=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        ironclaw.hostname=*) hostname="${arg#ironclaw.hostname=}" ;;
        ironclaw.agent=*) agent="${arg#ironclaw.agent=}" ;;
        ironclaw.workspace=*) ws="${arg#ironclaw.workspace=}" ;;
        ironclaw.channel=*) channel="${arg#ironclaw.channel=}" ;;
        ip=*) ipconf="${arg#ip=}" ;;
    esac
done

# Disks are found by virtio serial (QEMU): "ironclaw-ws" is the workspace, "ironclaw-cfg"
# holds `export` lines for the agent's environment.
cfg=""
for s in /sys/block/vd*/serial; do
    [ -r "$s" ] || continue
    dev="/dev/$(basename "$(dirname "$s")")"
    case "$(cat "$s")" in
        ironclaw-ws) [ -n "$ws" ] || ws="$dev" ;;
        ironclaw-cfg) cfg="$dev" ;;
    esac
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
    case "$channel" in
        vsock:*) set -- --vsock-port "${channel#vsock:}" ;;
        *) set -- --virtio-port "$PORT_NAME" ;;
    esac
    [ -n "$cfg" ] && . "$cfg"
    cd /workspace || cd /
    python3 -m ironclaw.guest "$@" &
    # `wait` blocks in waitpid(-1): every orphan reparented to PID 1 is reaped on the way,
    # and it returns once the agent (our only job) has exited.
    wait
    sync
    $BB poweroff -f
    $BB reboot -f
fi

# No agent (or ironclaw.agent=off): announce readiness on the port so the host can still
# prove that the VM booted, then keep PID 1 alive.
echo "READY $(uname -r)" > "/dev/virtio-ports/$PORT_NAME"
while :; do $BB sleep 3600; done
