#!/usr/bin/env bash
# A throwaway one-node OpenStack Swift for the tests: account, container and object servers on
# one-replica rings over a plain directory, a proxy with tempauth (or Keystone), s3api, bulk
# and SLO, and a memcached for tempauth's tokens. Everything lives in DIR. Prints "ready" once
# the proxy answers an authenticated request; then runs until it is sent SIGTERM (or its
# parent, PARENT_PID, is gone), and removes DIR.
# Usage: swift.sh DIR PROXY_PORT KEY [PARENT_PID]
#   tempauth users (account AUTH_cbt): cbt:tester (admin of the account, key KEY) and
#   cbt:guest (no rights on the account's containers, key KEY).
#   With KEYSTONE_URL=http://127.0.0.1:P/v3 and KEYSTONE_PROXY_PORT set, a second proxy on
#   that port checks Keystone tokens (authtoken + keystoneauth, accounts KEY_<project>,
#   service user swift / KEY in project service).
# Facts (HOST-NOTES): mount_check = false and disable_fallocate = true on a plain directory;
# servers need `user = root`; s3api goes before the auth filters.
set -euo pipefail
dir=$1 proxy_port=$2 key=$3 parent=${4:-}
py=/usr/bin/python3
for t in swift-proxy-server swift-account-server swift-container-server swift-object-server \
  swift-ring-builder memcached curl; do
  command -v "$t" >/dev/null || { echo "swift: $t missing (make test installs it)" >&2; exit 1; }
done
read -r p_acc p_con p_obj p_mc < <($py - <<'PY'
import socket
ss = [socket.socket() for _ in range(4)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])
PY
)
mkdir -p "$dir"/{srv/d1,run,log}
echo "$p_mc" > "$dir/memcached.port"
cat > "$dir/swift.conf" <<CONF
[swift-hash]
swift_hash_path_suffix = cbt-test-$RANDOM
swift_hash_path_prefix = cbt-test
[storage-policy:0]
name = Policy-0
default = yes
[swift-constraints]
CONF
for r in account:$p_acc container:$p_con object:$p_obj; do
  name=${r%%:*} port=${r##*:}
  swift-ring-builder "$dir/$name.builder" create 6 1 1 >/dev/null
  swift-ring-builder "$dir/$name.builder" add "r1z1-127.0.0.1:$port/d1" 1 >/dev/null
  swift-ring-builder "$dir/$name.builder" rebalance >/dev/null 2>&1 || true
  test -f "$dir/$name.ring.gz" || { echo "swift: no $name ring" >&2; exit 1; }
  cat > "$dir/$name-server.conf" <<CONF
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = $port
swift_dir = $dir
devices = $dir/srv
mount_check = false
disable_fallocate = true
user = root
workers = 1
log_level = WARNING
[pipeline:main]
pipeline = $name-server
[app:$name-server]
use = egg:swift#$name
[$name-replicator]
[$name-auditor]
[$name-updater]
[container-sync]
[container-sharder]
CONF
done
keystone_filters=""
if [ -n "${KEYSTONE_URL:-}" ]; then
  keystone_filters="
[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory
www_authenticate_uri = $KEYSTONE_URL
auth_url = $KEYSTONE_URL
auth_type = password
project_domain_id = default
user_domain_id = default
project_name = service
username = swift
password = $key
interface = public
delay_auth_decision = True
memcached_servers = 127.0.0.1:$p_mc
[filter:keystoneauth]
use = egg:swift#keystoneauth
operator_roles = admin, member
reseller_prefix = KEY_
"
fi
# proxy_conf FILE PORT AUTH_FILTERS: a proxy of the cluster with these auth filters (s3api
# only with tempauth: with Keystone it wants s3token too).
proxy_conf() {
  cat > "$1" <<CONF
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = $2
swift_dir = $dir
user = root
workers = 1
log_level = WARNING
[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk $3 container-quotas slo copy proxy-logging proxy-server
[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
allow_account_management = true
[filter:catch_errors]
use = egg:swift#catch_errors
[filter:gatekeeper]
use = egg:swift#gatekeeper
[filter:healthcheck]
use = egg:swift#healthcheck
[filter:proxy-logging]
use = egg:swift#proxy_logging
[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:$p_mc
[filter:listing_formats]
use = egg:swift#listing_formats
[filter:bulk]
use = egg:swift#bulk
[filter:slo]
use = egg:swift#slo
[filter:container-quotas]
use = egg:swift#container_quotas
[filter:copy]
use = egg:swift#copy
[filter:s3api]
use = egg:swift#s3api
location = us-east-1
[filter:tempauth]
use = egg:swift#tempauth
user_cbt_tester = $key .admin
user_cbt_guest = $key
$keystone_filters
CONF
}
proxy_conf "$dir/proxy-server.conf" "$proxy_port" "s3api tempauth"
pids=()
stop() {
  trap - TERM INT EXIT
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2>/dev/null || true
  done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
  exit 0
}
trap stop TERM INT EXIT
memcached -u root -l 127.0.0.1 -p "$p_mc" -U 0 -m 64 & pids+=($!)
for s in account container object; do
  $py "$(command -v swift-$s-server)" "$dir/$s-server.conf" -v >"$dir/log/$s.log" 2>&1 & pids+=($!)
done
$py "$(command -v swift-proxy-server)" "$dir/proxy-server.conf" -v >"$dir/log/proxy.log" 2>&1 & pids+=($!)
if [ -n "${KEYSTONE_URL:-}" ]; then
  # A second proxy for Keystone tokens: with authtoken in front of tempauth, every tempauth
  # request would cost a (failing) validation at Keystone.
  proxy_conf "$dir/proxy-keystone.conf" "$KEYSTONE_PROXY_PORT" "authtoken keystoneauth"
  $py "$(command -v swift-proxy-server)" "$dir/proxy-keystone.conf" -v >"$dir/log/proxy-keystone.log" 2>&1 & pids+=($!)
fi
url=http://127.0.0.1:$proxy_port
ok=""
for _ in $(seq 300); do
  tok=$(curl -s -o /dev/null -D - -H "X-Auth-User: cbt:tester" -H "X-Auth-Key: $key" "$url/auth/v1.0" \
    | tr -d '\r' | awk -F': ' 'tolower($1)=="x-auth-token"{print $2}') || true
  if [ -n "$tok" ] && [ "$(curl -s -o /dev/null -w '%{http_code}' -H "X-Auth-Token: $tok" "$url/v1/AUTH_cbt")" = 204 ]; then
    ok=1
    break
  fi
  sleep 0.1
done
[ -n "$ok" ] || { echo "swift: the proxy did not answer" >&2; tail -n 30 "$dir"/log/*.log >&2; exit 1; }
echo ready
while [ -z "$parent" ] || kill -0 "$parent" 2>/dev/null; do
  sleep 0.5
  for p in "${pids[@]}"; do
    kill -0 "$p" 2>/dev/null || { echo "swift: a daemon died" >&2; tail -n 30 "$dir"/log/*.log >&2; exit 1; }
  done
done
