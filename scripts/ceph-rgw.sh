#!/usr/bin/env bash
# A throwaway one-node Ceph for the tests: one monitor, one OSD on memstore (no disk), and
# radosgw on 127.0.0.1 — no manager needed. Everything (data, logs, sockets, crash dumps) lives
# in DIR. Prints "ready" once a user with the given keys exists and S3 answers; then runs until
# it is sent SIGTERM (or its parent, PARENT_PID, is gone), and stops radosgw, the OSD and the
# monitor in that order (all at once takes seconds longer).
# Usage: ceph-rgw.sh DIR MON_PORT RGW_PORT ACCESS_KEY SECRET_KEY [PARENT_PID]
# The OSD keeps objects in memory, at most CEPH_MEMSTORE_GIB (default 4) GiB; past that, writes
# block rather than fail. DIR is removed when the cluster stops.
# Settings that matter (HOST-NOTES): paxos propose interval (every pool radosgw makes waits for
# a map change: 18 s to come up without it), ms mon client mode = crc (radosgw loops on
# auth otherwise), tcp_nodelay on beast (48 ms per GET/list without it).
set -euo pipefail
dir=$1 mon_port=$2 rgw_port=$3 ak=$4 sk=$5 parent=${6:-}
for t in ceph-mon ceph-osd radosgw radosgw-admin ceph curl; do
  command -v "$t" >/dev/null || { echo "ceph-rgw: $t missing (make test installs it)" >&2; exit 1; }
done
export CEPH_CONF=$dir/ceph.conf
mkdir -p "$dir"/{mon,osd,run,log,crash}
cat > "$CEPH_CONF" <<CONF
[global]
fsid = $(cat /proc/sys/kernel/random/uuid)
mon host = v2:127.0.0.1:$mon_port
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
osd crush chooseleaf type = 0
mon data avail crit = 0
mon allow pool delete = true
paxos propose interval = 0.01
ms mon client mode = crc
run dir = $dir/run
crash dir = $dir/crash
log file = $dir/log/\$name.log
admin socket = $dir/run/\$name.asok
[mon.a]
mon data = $dir/mon
[osd.0]
osd data = $dir/osd
osd objectstore = memstore
memstore device bytes = $(( ${CEPH_MEMSTORE_GIB:-4} << 30 ))
osd class load list = *
osd class default list = *
[client.rgw.t]
rgw frontends = beast endpoint=127.0.0.1:$rgw_port tcp_nodelay=1
# Deleted objects' data is freed by radosgw's garbage collector, 2 h later by default: in a
# memory-backed OSD that fills it. Collect at once.
rgw gc obj min wait = 0
rgw gc processor period = 1
CONF
pids=()
stop() {
  trap - TERM INT EXIT
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  rm -rf "$dir"
  exit 0
}
trap stop TERM INT EXIT
ceph-mon --id a --mkfs --keyring /dev/null
touch "$dir/mon/keyring"
ceph-mon --id a -f & pids+=($!)
osd=$(timeout 30 ceph osd create)
timeout 30 ceph osd crush add "osd.$osd" 1 root=default >/dev/null
ceph-osd --id "$osd" --mkfs >/dev/null 2>&1
ceph-osd --id "$osd" -f & pids+=($!)
radosgw -n client.rgw.t -f & pids+=($!)
for _ in $(seq 600); do
  curl -s -o /dev/null "http://127.0.0.1:$rgw_port/" && break
  sleep 0.1
done
curl -s -o /dev/null "http://127.0.0.1:$rgw_port/" || { echo "ceph-rgw: radosgw did not answer" >&2; exit 1; }
timeout 30 radosgw-admin user create --uid cbt --display-name cbt --access-key "$ak" --secret-key "$sk" >/dev/null
echo ready
while [ -z "$parent" ] || kill -0 "$parent" 2>/dev/null; do
  sleep 0.5
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || { echo "ceph-rgw: a daemon died" >&2; exit 1; }; done
done
