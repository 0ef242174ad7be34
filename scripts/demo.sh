#!/usr/bin/env bash
# make demo: the main job as far as it exists today.
#
# A scratch qcow2 gets some "old" data, then a persistent dirty bitmap, then "new" guest-like
# writes. qemu-storage-daemon exports it over NBD with the bitmap; cbtctl (libcbt's own NBD
# client) reads the allocation map and the dirty map, and nbdinfo --map reads the same for
# comparison. The two must agree.
set -euo pipefail
cd "$(dirname "$0")/.."
CBTCTL=${CBTCTL:-./target/release/cbtctl}
work=$(mktemp -d /tmp/cbt-demo.XXXXXX)
qsd_pid=""
cleanup() { [ -n "$qsd_pid" ] && kill "$qsd_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

img=$work/disk.qcow2
sock=$work/nbd.sock
echo "== scratch disk: 1 GiB qcow2 in $work"
qemu-img create -q -f qcow2 "$img" 1G
echo "== data written before tracking starts (allocated, not dirty)"
printf 'write -q -P 0x11 0 4M\nwrite -q -P 0x22 100M 1M\n' | qemu-io -t unsafe -f qcow2 "$img" >/dev/null
echo "== dirty bitmap bm0 (persistent, 64 KiB granularity), then guest-like writes"
qemu-img bitmap --add -g 65536 "$img" bm0
printf 'write -q -P 0xab 1M 64k\nwrite -q -P 0xcd 10M 4k\nwrite -q -z 20M 1M\nwrite -q -P 0xef 512M 3M\ndiscard -q 100M 512k\n' \
  | qemu-io -t unsafe -f qcow2 "$img" >/dev/null
qemu-img bitmap --disable "$img" bm0

echo "== qemu-storage-daemon exports the disk read-only with bm0 and allocation depth"
qemu-storage-daemon \
  --blockdev "driver=file,node-name=file0,filename=$img,read-only=on" \
  --blockdev driver=qcow2,node-name=fmt0,file=file0,read-only=on \
  --nbd-server "addr.type=unix,addr.path=$sock" \
  --export '{"type":"nbd","id":"exp0","node-name":"fmt0","name":"vda","writable":false,"bitmaps":["bm0"],"allocation-depth":true}' &
qsd_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
uri="nbd+unix:///vda?socket=$sock"

echo; echo "== cbtctl info $uri"
"$CBTCTL" info "$uri"

status=0
# nbdinfo may split extents where ours are coalesced: merge touching rows of one type.
merge() { awk '{ if (n && o+l == $1 && t == $3) { l += $2 } else { if (n) print o, l, t; o=$1; l=$2; t=$3; n=1 } } END { if (n) print o, l, t }'; }
for ctx in base:allocation qemu:dirty-bitmap:bm0 qemu:allocation-depth; do
  echo; echo "== $ctx: cbtctl (libcbt) | nbdinfo --map"
  ours=$("$CBTCTL" map --context "$ctx" "$uri")
  theirs=$(nbdinfo --map="$ctx" "$uri")
  paste <(printf '%s\n' "$ours" | awk '{printf "%12s %12s %3s %-10s\n", $1, $2, $3, $4}') \
        <(printf '%s\n' "$theirs" | awk '{printf "| %12s %12s %3s %s\n", $1, $2, $3, $4}')
  if diff <(printf '%s\n' "$ours" | merge) <(printf '%s\n' "$theirs" | merge) >/dev/null; then
    echo "-- $ctx: libcbt and nbdinfo agree"
  else
    echo "-- $ctx: MISMATCH between libcbt and nbdinfo"; status=1
  fi
done
echo; echo "== dirty bytes per cbtctl: $("$CBTCTL" map --totals --context qemu:dirty-bitmap:bm0 "$uri" | awk '$4=="dirty"{print $1}')"
exit $status
