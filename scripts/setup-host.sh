#!/bin/bash
# Idempotent host setup for loaderd on Debian 12 (as root): Debian packages (bcc from Debian
# only: the PyPI package named "bcc" is an unrelated project), kernel headers for BCC, bpffs and
# tracefs. Safe to run again; does nothing that is already done.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "setup-host: run as root" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive

# libbpf1: precompiled CO-RE objects (source: {object: ...}) load through libbpf.so.1.
# python3-cryptography: SSH signatures of specs (config.signature).
RUNTIME_PKGS="python3-bpfcc python3-systemd python3-prctl python3-yaml python3-structlog \
python3-jsonschema bpftool iproute2 libbpf1 python3-cryptography"
# clang/llvm/libbpf-dev: the tests build CO-RE objects (clang -target bpf, llvm-strip).
# openssh-client: ssh-keygen makes the tests' keys and signatures and is their reference.
# prometheus (promtool), prometheus-node-exporter, systemd-journal-remote, ansible, ansible-lint:
# the fleet tests (tests/e2e/test_fleet.py, tests/unit/test_metrics_render.py).
# faketime: the clock-step test.
# gcc/binutils: the uprobe tests build a binary to probe and check offsets with nm/readelf.
# debhelper, dh-python, pybuild-plugin-pyproject, python3-setuptools: packaging/build-deb.sh (the
# e2e tests install the .deb it builds); lintian: the package test; man-db: the man page test.
TEST_PKGS="python3-pytest python3-hypothesis python3-venv clang llvm libbpf-dev openssh-client \
prometheus prometheus-node-exporter systemd-journal-remote ansible ansible-lint \
debhelper dh-python pybuild-plugin-pyproject python3-setuptools python3-all lintian man-db \
faketime gcc binutils"
missing=""
for p in $RUNTIME_PKGS ${LOADERD_SETUP_TEST:+$TEST_PKGS}; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
apt_updated=""
apt_install() {
  [ -n "$apt_updated" ] || { apt-get update -qq >/dev/null; apt_updated=1; }
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
if [ -n "$missing" ]; then
  echo "setup-host: installing$missing"
  apt_install $missing
fi

# Kernel headers: BCC compiles against /lib/modules/<release>/build. Prefer the exact Debian
# package; otherwise (custom kernels) Debian's generic headers compile fine once the two halves
# Debian splits them into are linked as build (generated, -amd64) and source (-common).
rel=$(uname -r)
if [ ! -e "/lib/modules/$rel/build/include/generated" ]; then
  if ! apt_install "linux-headers-$rel" 2>/dev/null; then
    apt_install linux-headers-amd64
    gen=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n 1)
    common=${gen%-amd64}-common
    mkdir -p "/lib/modules/$rel"
    ln -sfn "$gen" "/lib/modules/$rel/build"
    ln -sfn "$common" "/lib/modules/$rel/source"
    echo "setup-host: linked $gen and $common as headers for $rel"
  fi
fi

# Linked headers of another release compile, but not at the running kernel's struct offsets:
# say so (measured against BTF when loaderd is next to this script) instead of pretending.
hdr_rel=$(sed -n 's/.*UTS_RELEASE "\(.*\)".*/\1/p' \
  "/lib/modules/$rel/build/include/generated/utsrelease.h" 2>/dev/null || true)
if [ "$hdr_rel" != "$rel" ]; then
  echo "setup-host: WARNING: the kernel headers are ${hdr_rel:-unknown}'s, not $rel's" >&2
  repo=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
  if [ -e /sys/kernel/btf/vmlinux ] && [ -d "$repo/loaderd" ]; then
    measured=$(cd / && PYTHONPATH=$repo /usr/bin/python3 -c \
      'from loaderd.stage import headers; print(headers.measure().summary())' 2>/dev/null) \
      && echo "setup-host: WARNING: $measured" >&2
  fi
  echo "setup-host: WARNING: BCC specs that read kernel structs (task->tgid, sk->...) are" \
       "refused by loaderd unless accept_header_mismatch: true; tracepoint args-> reads are" \
       "fine; for struct reads use precompiled CO-RE objects (source: {object: ...})" >&2
fi

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
echo "setup-host: ok (bcc $(dpkg-query -W -f='${Version}' python3-bpfcc), headers ${hdr_rel:-missing} for kernel $rel$([ "$hdr_rel" = "$rel" ] || echo ' (MISMATCH: see the warning above)'), bpffs and tracefs mounted)"
