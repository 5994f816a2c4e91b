#!/bin/bash
# The two commands of the README:
#   ./run.sh demo   set up the host, apply the shipped example specs, show what was loaded
#   ./run.sh test   set up the host (and test tools), run the whole test suite
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"
PY=/usr/bin/python3   # Debian's interpreter: python3-bpfcc and friends live there

case "${1:-}" in
demo)
  scripts/setup-host.sh
  conf=/run/loaderd-demo/loaderd.yaml
  mkdir -p /run/loaderd-demo && chmod 700 /run/loaderd-demo
  cat > "$conf" <<YAML
loaderd: 1
programs_dir: $PWD/configs/programs.d
bpffs_root: /sys/fs/bpf/loaderd
state_dir: /var/lib/loaderd
YAML
  export PYTHONPATH=$PWD
  $PY -m loaderd --config "$conf" check
  $PY -m loaderd --config "$conf" apply
  $PY -m loaderd --config "$conf" status
  echo "--- pinned objects (bpftool):"
  for p in /sys/fs/bpf/loaderd/*/progs/*; do bpftool prog show pinned "$p" | head -n 1; done
  sleep 1; /bin/true
  echo "--- exec counter after a few execs:"
  bpftool map dump pinned /sys/fs/bpf/loaderd/exec_counter/maps/exec_count
  echo "Programs stay attached. Undo with: PYTHONPATH=$PWD $PY -m loaderd --config $conf disable"
  ;;
test)
  LOADERD_SETUP_TEST=1 scripts/setup-host.sh
  if [ ! -x .venv/bin/ruff ] || [ ! -x .venv/bin/mypy ]; then
    $PY -m venv --system-site-packages .venv
    .venv/bin/pip install -q ruff mypy
  fi
  shift
  .venv/bin/ruff check loaderd tests bench
  .venv/bin/mypy loaderd
  exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
  ;;
*)
  echo "usage: $0 demo|test [pytest args]" >&2; exit 2 ;;
esac
