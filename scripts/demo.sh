#!/usr/bin/env bash
# make demo: the main job, through the daemon, on a real guest.
#
# A throwaway libvirt domain runs a real Linux guest (the Debian kernel with a busybox
# initramfs, scripts/guest-initramfs.sh; TCG) that writes random 64 KiB blocks to its disk all
# the time and runs qemu-ga. cbt-hostd starts on its embedded default configuration (Unix
# socket, a local sink, a state directory, all under a scratch directory), and cbtctl drives
# it like an orchestrator would:
#   1. a quiesced full backup (qemu-ga freezes the guest's filesystems for the point in time);
#   2. the guest writes on; an incremental;
#   3. an exactness check: the guest is suspended for a moment (by this script) to copy its
#      disk, an incremental's point in time is taken, the guest resumes and writes during the
#      copy; the restored backup is compared with the copy by `qemu-img compare`;
#   4. a restore into a staging copy of the instance (a new domain beside the original),
#      which boots and writes on its own disk;
#   5. a verify of the chain; then what happened, in numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-./target/release}
CBTCTL=$BIN/cbtctl
HOSTD=$BIN/cbt-hostd
work=$(mktemp -d /var/tmp/cbt-demo.XXXXXX)
chmod 755 "$work"
dom=cbt-demo-$$
staging=$dom-staging
hostd_pid=""
V="virsh -c qemu:///system"
cleanup() {
  [ -n "$hostd_pid" ] && kill -TERM "$hostd_pid" 2>/dev/null && wait "$hostd_pid" 2>/dev/null || true
  for d in "$staging" "$dom"; do
    $V destroy "$d" >/dev/null 2>&1 || true
    $V undefine --checkpoints-metadata "$d" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

if ! $V version >/dev/null 2>&1; then
  echo "== starting libvirtd"
  virtlogd -d || true
  libvirtd -d
  for _ in $(seq 100); do $V version >/dev/null 2>&1 && break; sleep 0.1; done
fi

echo "== guest: Debian kernel + busybox initramfs with qemu-ga, writing to its disk all the time"
bash scripts/guest-initramfs.sh "$work/guest"
qemu-img create -q -f qcow2 "$work/vda.qcow2" 256M
cat > "$work/domain.xml" <<XML
<domain type='qemu'>
  <name>$dom</name>
  <metadata><nova:instance xmlns:nova='http://openstack.org/xmlns/libvirt/nova/1.1'><nova:owner>
    <nova:project uuid='demo'>demo</nova:project></nova:owner></nova:instance></metadata>
  <memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>$work/guest/vmlinuz</kernel>
    <initrd>$work/guest/initrd.gz</initrd><cmdline>console=ttyS0 quiet panic=-1</cmdline></os>
  <features><acpi/></features><on_reboot>destroy</on_reboot>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$work/vda.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <serial type='file'><source path='$work/console.log'/><target port='0'/></serial>
    <controller type='usb' model='none'/><memballoon model='none'/>
  </devices>
</domain>
XML
$V define "$work/domain.xml" >/dev/null
$V start "$dom" >/dev/null
counter() { grep -ao 'CBT-COUNTER [0-9]*' "$1" 2>/dev/null | tail -1 | awk '{print $2+0}'; }
for _ in $(seq 600); do [ "$(counter "$work/console.log")" -gt 3 ] 2>/dev/null && break; sleep 0.2; done
echo "   booted; the guest has written $(counter "$work/console.log") blocks so far"

echo "== cbt-hostd on its embedded default configuration ($work)"
token=demo-admin-token
"$HOSTD" --print-default-config "$work" | sed "s/<sha256.*>/$(printf '%s\n' "$token" | "$HOSTD" --hash-token)/" > "$work/hostd.toml"
"$HOSTD" --config "$work/hostd.toml" --check-config
CBT_LOG=warn "$HOSTD" --config "$work/hostd.toml" 2>"$work/hostd.log" &
hostd_pid=$!
for _ in $(seq 100); do [ -S "$work/hostd.sock" ] && break; sleep 0.05; done
export CBT_HOSTD=$work/hostd.sock CBT_TOKEN=$token
$CBTCTL instances | grep "$dom"

newest() { $CBTCTL backups --sink local --instance "$dom" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["backups"][-1]["backup_id"])'; }

echo; echo "== 1. quiesced full backup"
$CBTCTL start-backup --instance "$dom" --sink local --quiesce --label purpose=demo --wait
echo "   freeze hook in the guest: $(grep -c 'FSFREEZE-HOOK freeze' "$work/console.log") freeze, $(grep -c 'FSFREEZE-HOOK thaw' "$work/console.log") thaw"
sleep 3
echo; echo "== 2. incremental while the guest writes (counter $(counter "$work/console.log"))"
$CBTCTL start-backup --instance "$dom" --sink local --wait

echo; echo "== 3. exactness: point in time taken with the guest suspended by this script only"
$V suspend "$dom" >/dev/null
qemu-img convert -U -f qcow2 -O raw "$work/vda.qcow2" "$work/reference.raw"
c0=$(counter "$work/console.log")
job=$($CBTCTL start-backup --instance "$dom" --sink local --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["job"]["id"])')
until $CBTCTL job "$job" --json | grep '"phase": "\(copying\|committing\|succeeded\|failed\)"' >/dev/null; do sleep 0.05; done
$V resume "$dom" >/dev/null
$CBTCTL watch "$job"
c1=$(counter "$work/console.log")
b=$(newest)
$CBTCTL start-restore --instance "$dom" --sink local --backup-id "$b" --to-file "$work/restores/$b.raw" --wait >/dev/null
if qemu-img compare -q -f raw -F raw "$work/restores/$b.raw" "$work/reference.raw"; then
  echo "   restore of $b is identical to the disk at its point in time (qemu-img compare); the guest wrote $((c1 - c0)) blocks meanwhile"
else
  echo "   MISMATCH: restore of $b differs from the reference" >&2; exit 1
fi

echo; echo "== 4. restore into a staging copy of the instance, started beside the original"
$CBTCTL start-restore --instance "$dom" --sink local --backup-id "$b" --to-domain "$staging" --start --wait
sleep 15
echo "   $($V domstate "$staging") — its console: $(grep -ac 'CBT-COUNTER' "$work/console.log-$staging" 2>/dev/null || echo 0) blocks written on its own disk"

echo; echo "== 5. verify the chain"
$CBTCTL start-verify --instance "$dom" --sink local --backup-id "$b" --wait

echo; echo "== what happened"
$CBTCTL backups --sink local --instance "$dom"
$CBTCTL jobs
curl -s --unix-socket "$work/hostd.sock" http://localhost/metrics | grep -E '^cbt_(jobs_total|backup_(read|stored)_bytes_total|freeze_duration_seconds_(sum|count)|compression_ratio)' || true
echo; echo "demo: OK"
