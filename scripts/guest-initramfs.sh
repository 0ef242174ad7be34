#!/usr/bin/env bash
# Builds the test guest: a busybox initramfs for the Debian kernel in /boot, with the virtio
# modules, qemu-ga (the guest agent, with its libraries) and an init that
#   - starts qemu-ga on the virtio-serial channel org.qemu.guest_agent.0, with a freeze hook
#     that logs "FSFREEZE-HOOK freeze|thaw" on the console (and hangs on freeze when the
#     kernel command line has cbt.hang_freeze=1); like an application's hook, a freeze waits
#     until the writer below is idle, and the writer writes nothing until the thaw;
#   - writes 64 KiB blocks of random data at random offsets of /dev/vda past its first MiB
#     forever (with fsync), printing "CBT-COUNTER n" on the console after each one. The first
#     MiB is left to tests that write there through the agent.
# Usage: guest-initramfs.sh OUT_DIR  → OUT_DIR/initrd.gz, OUT_DIR/vmlinuz
set -euo pipefail
out=${1:?usage: guest-initramfs.sh OUT_DIR}
kver=$(ls /lib/modules | sort -V | tail -1)
[ -n "$kver" ] && [ -f "/boot/vmlinuz-$kver" ] || { echo "guest-initramfs: no kernel in /boot (apt-get install linux-image-amd64)" >&2; exit 1; }
for t in busybox qemu-ga cpio; do command -v "$t" >/dev/null || { echo "guest-initramfs: $t missing" >&2; exit 1; }; done
# Not `| grep -q`: under pipefail, grep quitting early makes busybox die of SIGPIPE (exit 141).
busybox --list | grep -x sh >/dev/null || { echo "guest-initramfs: busybox lacks sh" >&2; exit 1; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,etc,lib/modules,var/run}
cp "$(command -v busybox)" "$root/bin/busybox"
for a in $(busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"; done

# Modules in load order; each may be compressed (.ko.xz) on newer kernels.
mods=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console)
for m in "${mods[@]}"; do
  f=$(find "/lib/modules/$kver/kernel/drivers" -name "$m.ko*" -print -quit)
  [ -n "$f" ] || { echo "guest-initramfs: module $m not found (built in?)" >&2; continue; }
  case "$f" in
    *.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
    *.zst) zstd -qdc "$f" > "$root/lib/modules/$m.ko" ;;
    *) cp "$f" "$root/lib/modules/$m.ko" ;;
  esac
done

# qemu-ga and the shared libraries it needs, at their own paths.
ga=$(command -v qemu-ga)
mkdir -p "$root/usr/sbin"
cp "$ga" "$root/usr/sbin/qemu-ga"
for lib in $(ldd "$ga" | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do
  [ -f "$lib" ] || continue
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done

cat > "$root/etc/fsfreeze-hook" <<'HOOK'
#!/bin/sh
echo "FSFREEZE-HOOK $1" > /dev/console
if [ "$1" = freeze ] && grep -q cbt.hang_freeze=1 /proc/cmdline; then
  sleep 100000
fi
case "$1" in
  freeze)
    rm -f /run/cbt-idle
    touch /run/cbt-frozen
    i=0
    while [ ! -e /run/cbt-idle ] && [ $i -lt 200 ]; do usleep 50000; i=$((i + 1)); done
    echo "CBT-QUIESCED" > /dev/console
    ;;
  thaw) rm -f /run/cbt-frozen ;;
esac
exit 0
HOOK
chmod +x "$root/etc/fsfreeze-hook"

cat > "$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console; do
  [ -f /lib/modules/$m.ko ] && { insmod /lib/modules/$m.ko || echo "CBT-INSMOD failed: $m" > /dev/console; }
done
sleep 1
port=""
for p in /sys/class/virtio-ports/*; do
  [ -f "$p/name" ] && [ "$(cat $p/name)" = org.qemu.guest_agent.0 ] && port=/dev/$(basename $p)
done
if [ -n "$port" ]; then
  /usr/sbin/qemu-ga -m virtio-serial -p "$port" -F/etc/fsfreeze-hook -t /run -d
  echo "CBT-AGENT started on $port" > /dev/console
else
  echo "CBT-AGENT no channel" > /dev/console
fi
if [ ! -b /dev/vda ]; then
  echo "CBT-ERROR no /dev/vda" > /dev/console
  while true; do sleep 3600; done
fi
echo "CBT-READY" > /dev/console
blocks=$(( $(cat /sys/block/vda/size) / 128 ))
n=0
while true; do
  # Idle only after seeing the freeze; checked again after leaving it (a new freeze may have
  # started in between).
  while [ -e /run/cbt-frozen ]; do touch /run/cbt-idle; usleep 20000; done
  rm -f /run/cbt-idle
  [ -e /run/cbt-frozen ] && continue
  n=$((n + 1))
  dd if=/dev/urandom of=/dev/vda bs=65536 count=1 seek=$((16 + RANDOM % (blocks - 16))) conv=notrunc,fsync 2>/dev/null
  echo "CBT-COUNTER $n" > /dev/console
done
INIT
chmod +x "$root/init"

mkdir -p "$out"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initrd.gz"
cp "/boot/vmlinuz-$kver" "$out/vmlinuz"
chmod 644 "$out/initrd.gz" "$out/vmlinuz"
echo "guest-initramfs: $out/initrd.gz ($(du -h "$out/initrd.gz" | cut -f1)), kernel $kver" >&2
