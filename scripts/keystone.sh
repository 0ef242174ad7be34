#!/usr/bin/env bash
# A throwaway Keystone for the tests: SQLite, fernet keys and logs in DIR, served by uwsgi on
# 127.0.0.1:PORT. Bootstraps an admin, then makes:
#   - project `service` with user `swift` (password SECRET, role admin): Swift's authtoken;
#   - project `cbt` with user `alice` (password SECRET, role member) and an application
#     credential of hers, and user `bob` (password SECRET, role reader);
#   - the object-store service with public and internal endpoints at SWIFT_URL/v1/KEY_<project>.
# Prints "app_credential ID SECRET" and then "ready"; runs until SIGTERM (or until PARENT_PID
# is gone) and removes DIR.
# Usage: keystone.sh DIR PORT SECRET SWIFT_URL [PARENT_PID]
# Tokens live an hour: with tokens shorter than keystoneauth's 120 s margin, Swift's authtoken
# logs its service user in again for every validation, and some requests got 401s here.
# Facts (HOST-NOTES): [fernet_receipts] key_repository too, or it writes to /etc/keystone;
# One uwsgi worker, no threads: SQLite connections may not cross threads, and two processes
# writing at once fail with "database is locked";
# OS_KEYSTONE_CONFIG_FILES points keystone-wsgi-public at our config; /usr/bin/python3.
set -euo pipefail
dir=$1 port=$2 secret=$3 swift_url=$4 parent=${5:-}
for t in keystone-manage uwsgi curl; do
  command -v "$t" >/dev/null || { echo "keystone: $t missing (make test installs it)" >&2; exit 1; }
done
mkdir -p "$dir"/{fernet,receipts,log}
conf=$dir/keystone.conf
cat > "$conf" <<CONF
[DEFAULT]
log_dir = $dir/log
[database]
connection = sqlite:///$dir/keystone.db
[fernet_tokens]
key_repository = $dir/fernet
[fernet_receipts]
key_repository = $dir/receipts
[token]
expiration = 3600
[identity]
# bcrypt's fewest rounds: every user made and every login hashes a password.
password_hash_rounds = 4
CONF
km() { keystone-manage --config-file "$conf" "$@" >>"$dir/log/manage.log" 2>&1; }
km fernet_setup --keystone-user root --keystone-group root
km db_sync
km bootstrap --bootstrap-password "$secret" --bootstrap-admin-url "http://127.0.0.1:$port/v3" \
  --bootstrap-public-url "http://127.0.0.1:$port/v3" --bootstrap-region-id RegionOne
pid=""
stop() {
  trap - TERM INT EXIT
  [ -n "$pid" ] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
  rm -rf "$dir"
  exit 0
}
trap stop TERM INT EXIT
OS_KEYSTONE_CONFIG_FILES=$conf uwsgi --plugin python3 --http-socket "127.0.0.1:$port" \
  --wsgi-file /usr/bin/keystone-wsgi-public --master --processes 1 \
  --die-on-term --need-app >"$dir/log/uwsgi.log" 2>&1 & pid=$!
for _ in $(seq 300); do
  curl -sf -o /dev/null "http://127.0.0.1:$port/v3" && break
  sleep 0.1
done
curl -sf -o /dev/null "http://127.0.0.1:$port/v3" || { echo "keystone: no answer" >&2; tail -n 30 "$dir/log/uwsgi.log" >&2; exit 1; }
/usr/bin/python3 - "http://127.0.0.1:$port/v3" "$secret" "$swift_url" <<'PY'
import json, sys, urllib.request
url, secret, swift = sys.argv[1:4]

def call(method, path, body=None, token=None, want=(200, 201, 204)):
    req = urllib.request.Request(url + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    if token:
        req.add_header("X-Auth-Token", token)
    with urllib.request.urlopen(req) as r:
        assert r.status in want, (path, r.status)
        text = r.read()
        return r.headers, (json.loads(text) if text else {})

def login(user, project):
    h, _ = call("POST", "/auth/tokens", {"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": user, "domain": {"id": "default"}, "password": secret}}},
        "scope": {"project": {"name": project, "domain": {"id": "default"}}}}})
    return h["X-Subject-Token"]

admin = login("admin", "admin")
roles = {r["name"]: r["id"] for r in call("GET", "/roles", token=admin)[1]["roles"]}
def make(kind, body):
    return call("POST", "/" + kind, {kind[:-1]: body}, admin)[1][kind[:-1]]["id"]
def grant(project, user, role):
    call("PUT", f"/projects/{project}/users/{user}/roles/{roles[role]}", token=admin)
service = make("projects", {"name": "service", "domain_id": "default"})
cbt = make("projects", {"name": "cbt", "domain_id": "default"})
users = {}
for name, project, role in [("swift", service, "admin"), ("alice", cbt, "member"),
                            ("bob", cbt, "reader")]:
    users[name] = make("users", {"name": name, "domain_id": "default", "password": secret})
    grant(project, users[name], role)
store = make("services", {"type": "object-store", "name": "swift"})
for iface in ["public", "internal"]:
    make("endpoints", {"service_id": store, "interface": iface, "region_id": "RegionOne",
                       "url": swift + "/v1/KEY_%(project_id)s"})
alice = login("alice", "cbt")
_, ac = call("POST", f"/users/{users['alice']}/application_credentials",
             {"application_credential": {"name": "cbt-backups"}}, alice)
ac = ac["application_credential"]
print("app_credential", ac["id"], ac["secret"], flush=True)
PY
echo ready
while [ -z "$parent" ] || kill -0 "$parent" 2>/dev/null; do
  sleep 0.5
  kill -0 "$pid" 2>/dev/null || { echo "keystone: uwsgi died" >&2; tail -n 30 "$dir/log/uwsgi.log" >&2; exit 1; }
done
