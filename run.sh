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
  repo=$PWD
  run=/run/loaderd-demo
  # Its own pin root and state, no metrics file: the demo never touches a packaged loaderd's
  # programs, state, kill switch or loaderd.prom (/sys/fs/bpf/loaderd, /var/lib/loaderd).
  pins=/sys/fs/bpf/loaderd-demo
  conf=$run/loaderd.yaml
  mkdir -p "$run" && chmod 700 "$run"
  # Root-owned copies of the example specs: the trust checks refuse spec files a user owns or
  # may write (a clone may be a user's, or made under umask 002), and settings paths must be
  # plain names (a clone path may hold spaces).
  rm -rf "$run/programs.d"
  install -d -m 0755 -o root -g root "$run/programs.d"
  install -m 0644 -o root -g root configs/programs.d/* "$run/programs.d/"
  cat > "$conf" <<YAML
loaderd: 1
programs_dir: $run/programs.d
bpffs_root: $pins
state_dir: /var/lib/loaderd-demo
metrics_dir: null
YAML
  export PYTHONPATH=$repo
  cd /   # BCC puts the working directory on the compiler's include path: not the clone
  start=$(date '+%Y-%m-%d %H:%M:%S')
  audit=$run/audit.jsonl   # without a journald socket, audit events are JSON lines on stderr
  : > "$audit"
  loaderd() {   # audit JSON lines to the file, everything else (errors) to the terminal
    local log rc=0
    log=$(mktemp)
    $PY -m loaderd --config "$conf" "$@" 2>"$log" || rc=$?
    grep '^{' "$log" >> "$audit" || true
    grep -v '^{' "$log" >&2 || true
    rm -f "$log"
    [ "$rc" = 0 ] || { echo "loaderd $1 refused: the errors above name file, line and field" >&2
                       exit "$rc"; }
  }
  released=$(loaderd enable)   # the demo's own kill switch: running it asks for the examples
  case $released in "kill switch released"*) echo "== $released";; esac
  echo "== loaderd check (schema, policy, helpers from bytecode, verifier; nothing stays loaded)"
  loaderd check
  echo "== loaderd apply (compile, load, pin, attach, fill, freeze, commit)"
  loaderd apply
  echo "== loaderd status"
  loaderd status
  echo "== bpftool finds every program by its pin"
  for p in "$pins"/*/progs/*; do
    out=$(bpftool prog show pinned "$p"); echo "  $p: ${out%%$'\n'*}"
  done
  for _ in 1 2 3; do /bin/true; done
  echo "== exec counter (tracepoint, pinned link) after a few execs:"
  bpftool map dump pinned "$pins/exec_counter/maps/exec_count"
  if [ -s "$audit" ]; then
    echo "== $(wc -l < "$audit") audit events in $audit, e.g.:"
    { grep '"event": "attached"' "$audit" || cat "$audit"; } | head -n 1
  else
    echo "== audit events went to the journal: journalctl -t loaderd --since '$start', e.g.:"
    journalctl --no-pager -t loaderd --since "$start" LOADERD_EVENT=attached -n 1 || true
  fi
  printf 'Programs stay attached. Undo with: PYTHONPATH=%q %q -m loaderd --config %q disable\n' \
    "$repo" "$PY" "$conf"
  ;;
test)
  LOADERD_SETUP_TEST=1 scripts/setup-host.sh
  [ -x .venv/bin/pip ] || $PY -m venv --system-site-packages .venv
  .venv/bin/pip install -q -r requirements-dev.txt   # no-op (no network) once satisfied
  shift
  .venv/bin/ruff check loaderd tests bench
  .venv/bin/mypy loaderd tests bench   # strict, warn_unused_ignores (pyproject.toml)
  exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
  ;;
*)
  echo "usage: $0 demo|test [pytest args]" >&2; exit 2 ;;
esac
