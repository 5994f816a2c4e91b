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
  audit=/run/loaderd-demo/audit.jsonl   # no journald in a foreground run: JSON audit lines
  : > "$audit"                          # this run's events only
  echo "== loaderd check (schema, policy, helpers from bytecode, verifier; loads nothing)"
  $PY -m loaderd --config "$conf" check
  echo "== loaderd apply (compile, load, pin, attach, fill, freeze, commit)"
  $PY -m loaderd --config "$conf" apply 2>>"$audit"
  echo "== loaderd status"
  $PY -m loaderd --config "$conf" status
  echo "== bpftool finds every program by its pin"
  for p in /sys/fs/bpf/loaderd/*/progs/*; do
    out=$(bpftool prog show pinned "$p"); echo "  $p: ${out%%$'\n'*}"
  done
  for _ in 1 2 3; do /bin/true; done
  echo "== exec counter (tracepoint, pinned link) after a few execs:"
  bpftool map dump pinned /sys/fs/bpf/loaderd/exec_counter/maps/exec_count
  echo "== $(wc -l < "$audit") audit events in $audit, e.g.:"
  grep '"event": "attached"' "$audit" | head -n 1 || true
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
