#!/usr/bin/env bash
# make demo-qmp: a real backup and restore of a live disk through QMP, without libvirt or
# the daemon.
#
# A VM (qemu-system-x86_64, KVM when /dev/kvm is usable, else TCG; firmware only, no guest
# OS needed) runs with a 1 GiB qcow2 disk. cbtctl (libcbt, through QMP) takes a full backup
# into a sink directory while the VM runs; guest-like writes land on the disk (QEMU's own
# qemu-io, through the monitor); two incrementals follow. Every backup is restored and
# compared by `qemu-img compare` with a copy of the disk taken at its point in time. Last,
# libcbt's NBD maps of the point-in-time view are shown next to nbdinfo's.
set -euo pipefail
cd "$(dirname "$0")/.."
CBTCTL=${CBTCTL:-./target/release/cbtctl}
work=$(mktemp -d /tmp/cbt-demo.XXXXXX)
vm_pid=""
cleanup() { [ -n "$vm_pid" ] && kill "$vm_pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

img=$work/vda.qcow2
qmp=$work/qmp.sock
sink=$work/sink
accel=tcg
if [ -w /dev/kvm ]; then accel=kvm; fi

hmp() { "$CBTCTL" qmp "$qmp" human-monitor-command "{\"command-line\": \"$1\"}"; }
guest_io() { hmp "qemu-io -d vd0/virtio-backend \\\"$1\\\"" >/dev/null; }
reference() { hmp "qemu-io -d vd0/virtio-backend flush" >/dev/null; qemu-img convert -U -f qcow2 -O raw "$img" "$1"; }
now() { date +%s.%N; }

echo "== disk: 1 GiB qcow2 with 64 MiB of data already on it"
qemu-img create -q -f qcow2 "$img" 1G
head -c 32M /dev/urandom > "$work/random.bin"
printf 'write -q -s %s 0 32M\nwrite -q -P 0x61 256M 32M\n' "$work/random.bin" | qemu-io -t unsafe -f qcow2 "$img" >/dev/null
head -c 1M /dev/urandom > "$work/guest-1m.bin"

echo "== VM: qemu-system-x86_64 -accel $accel, the disk as virtio-blk; it keeps running throughout"
qemu-system-x86_64 -accel "$accel" -machine q35 -nodefaults -display none -m 128 \
  -blockdev "driver=file,node-name=file0,filename=$img" -blockdev driver=qcow2,node-name=vda,file=file0 \
  -device virtio-blk-pci,drive=vda,id=vd0 -qmp "unix:$qmp,server=on,wait=off" >"$work/vm.log" 2>&1 &
vm_pid=$!
for _ in $(seq 100); do [ -S "$qmp" ] && break; sleep 0.05; done

declare -a ids levels btimes
backup() {
  local id=$1 t0 t1
  t0=$(now)
  "$CBTCTL" backup --qmp "$qmp" --disk vda=demo-vda --sink "$sink" --work-dir "$work/scratch" --id "$id"
  t1=$(now)
  reference "$work/ref-$id.raw"
  ids+=("$id"); btimes+=("$(echo "$t1 - $t0" | bc)")
}

echo; echo "== full backup b0"
backup b0
echo; echo "== guest writes: 8 MiB pattern, 4 MiB random, 1 MiB zeroes, a discard, 41 scattered 64 KiB writes"
guest_io "write -P 0xab 100M 8M"
for i in 0 1 2 3; do guest_io "write -s $work/guest-1m.bin $((120 + i))M 1M"; done
guest_io "write -z 300M 1M"
guest_io "discard 256M 4M"
for i in $(seq 0 40); do guest_io "write -P $((i + 1)) $((512 + i * 7))M 64k"; done
echo "== incremental b1"
backup b1
echo; echo "== more guest writes: 16 MiB pattern, 2 MiB random, 21 scattered 128 KiB writes"
guest_io "write -P 0xcd 900M 16M"
for i in 0 1; do guest_io "write -s $work/guest-1m.bin $((700 + i * 5))M 1M"; done
for i in $(seq 0 20); do guest_io "write -P $((i + 100)) $((600 + i * 3))M 128k"; done
echo "== incremental b2"
backup b2

echo; echo "== restores, each compared by qemu-img with the disk at its point in time"
status=0
printf '%-4s %-12s %10s %10s %10s  %s\n' id level "stored MiB" "backup s" "restore s" "qemu-img compare"
listing=$("$CBTCTL" list --sink "$sink" --json)
for i in "${!ids[@]}"; do
  id=${ids[$i]}
  t0=$(now)
  "$CBTCTL" restore --sink "$sink" --disk demo-vda --backup "$id" --to "raw:$work/restored-$id.raw" >/dev/null
  t1=$(now)
  if qemu-img compare -q -f raw -F raw "$work/restored-$id.raw" "$work/ref-$id.raw"; then verdict="identical"; else verdict="DIFFERENT"; status=1; fi
  level=$(printf '%s' "$listing" | python3 -c "import json,sys; print([m['level'] for m in json.load(sys.stdin) if m['backup_id']=='$id'][0])" 2>/dev/null || echo "?")
  stored=$(printf '%s' "$listing" | python3 -c "import json,sys; print('%.1f' % ([m['stats']['bytes_stored'] for m in json.load(sys.stdin) if m['backup_id']=='$id'][0] / 1048576))" 2>/dev/null || echo "?")
  printf '%-4s %-12s %10s %10.2f %10.2f  %s\n' "$id" "$level" "$stored" "${btimes[$i]}" "$(echo "$t1 - $t0" | bc)" "$verdict"
  rm -f "$work/restored-$id.raw"
done

echo; echo "== restore of b2 into a new qcow2, then qemu-img compare"
"$CBTCTL" restore --sink "$sink" --disk demo-vda --backup b2 --to "qcow2:$work/restored.qcow2"
if qemu-img compare -q -f qcow2 -F raw "$work/restored.qcow2" "$work/ref-b2.raw"; then echo "-- identical"; else echo "-- DIFFERENT"; status=1; fi

echo; echo "== verify the chain, and what the sink holds"
"$CBTCTL" verify --sink "$sink" --disk demo-vda --backup b2
"$CBTCTL" list --sink "$sink"
du -sh "$sink" | awk '{print "sink size on disk: " $1 " (for ~100 MiB of data, ~38 MiB of it random)"}'

echo; echo "== the VM never stopped: $("$CBTCTL" qmp "$qmp" query-status | tr -d '\n ' )"
echo "== leftovers in QEMU: bitmaps $("$CBTCTL" qmp "$qmp" query-named-block-nodes '{"flat": true}' | python3 -c "import json,sys; print([b['name'] for n in json.load(sys.stdin) if n['node-name']=='vda' for b in n.get('dirty-bitmaps',[])])" 2>/dev/null), scratch dir: $(ls "$work/scratch" | tr '\n' ' ')"

echo; echo "== libcbt's NBD maps of the disk, next to nbdinfo --map (after a few more writes)"
for i in 0 1 2; do guest_io "write -P 0x77 $((40 + i * 10))M 256k"; done
exp=$work/exp.sock
"$CBTCTL" qmp "$qmp" nbd-server-start "{\"addr\": {\"type\": \"unix\", \"data\": {\"path\": \"$exp\"}}}" >/dev/null
"$CBTCTL" qmp "$qmp" block-dirty-bitmap-disable '{"node": "vda", "name": "cbt-b2"}' >/dev/null
"$CBTCTL" qmp "$qmp" block-export-add '{"type": "nbd", "id": "peek", "node-name": "vda", "name": "vda", "writable": false, "bitmaps": ["cbt-b2"]}' >/dev/null
uri="nbd+unix:///vda?socket=$exp"
merge() { awk '{ if (n && o+l == $1 && t == $3) { l += $2 } else { if (n) print o, l, t; o=$1; l=$2; t=$3; n=1 } } END { if (n) print o, l, t }'; }
for ctx in base:allocation qemu:dirty-bitmap:cbt-b2; do
  ours=$("$CBTCTL" map --context "$ctx" "$uri")
  theirs=$(nbdinfo --map="$ctx" "$uri")
  echo "-- $ctx (libcbt | nbdinfo)"
  paste <(printf '%s\n' "$ours" | head -8 | awk '{printf "%12s %12s %3s %-10s\n", $1, $2, $3, $4}') \
        <(printf '%s\n' "$theirs" | head -8 | awk '{printf "| %12s %12s %3s %s\n", $1, $2, $3, $4}')
  if diff <(printf '%s\n' "$ours" | merge) <(printf '%s\n' "$theirs" | merge) >/dev/null; then
    echo "   agree ($(printf '%s\n' "$ours" | wc -l) extents)"
  else
    echo "   MISMATCH"; status=1
  fi
done
exit $status
