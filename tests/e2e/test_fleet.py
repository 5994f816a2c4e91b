"""Fleet engines as packaged (issue 15), on a real systemd 252 with Debian's own daemons:
node_exporter on 127.0.0.1 serving loaderd's textfile metrics (values as `loaderctl status
--json` says, `promtool check metrics` clean, the kill switch and drift seen within a tick);
the Ansible role applied twice with `ansible-playbook -c local` (second run: no change), then a
broken spec stopping the play at `validate: loaderd check` with the old set still attached.
The tests run in file order and share one service."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from sysd import Systemd

pytestmark = pytest.mark.systemd

UNIT = "loaderd.service"
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
EXPORTER = "prometheus-node-exporter.service"
SCRAPE = "http://127.0.0.1:9100/metrics"
ROOT = "/sys/fs/bpf/loaderd"
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = len(list((REPO / "configs" / "programs.d").glob("*.yaml")))  # the shipped set


def scrape(sysd: Systemd) -> str:
    return sysd.run("/usr/bin/python3", "-c", "import sys, urllib.request; sys.stdout.write("
                    f"urllib.request.urlopen({SCRAPE!r}, timeout=10).read().decode())").stdout


def loaderd_samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value for loaderd's families (labels as node_exporter orders them)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("loaderd_"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def scraped_until(sysd: Systemd, key: str, value: float, timeout: float = 30.0
                  ) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        got = loaderd_samples(scrape(sysd))
        if got.get(key) == value or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def status_json(sysd: Systemd) -> dict[str, Any]:
    out = sysd.run("loaderctl", "status", "--json", check=False)
    report: dict[str, Any] = json.loads(out.stdout)
    return report


@pytest.fixture(scope="module")
def serving(installed: Systemd) -> Systemd:
    """loaderd with a 1 s drift check, node_exporter on 127.0.0.1 only (Debian's unit, its
    default textfile directory), both started as an operator would."""
    sysd = installed
    acl = sysd.run("getfacl", "-cp", TEXTFILE_DIR, check=False).stdout \
        if shutil.which("getfacl") else ""
    print(f"\n{TEXTFILE_DIR} ACL:\n{acl}")
    sysd.sh("mkdir -p /etc/systemd/system/loaderd.service.d && printf '[Service]\\n"
            "ExecStart=\\nExecStart=/usr/bin/loaderd run --no-apply --config "
            "/etc/loaderd/loaderd.yaml --drift-interval 1\\n' "
            "> /etc/systemd/system/loaderd.service.d/drift.conf")
    sysd.write("/etc/default/prometheus-node-exporter",
               'ARGS="--web.listen-address=127.0.0.1:9100 '
               f'--collector.textfile.directory={TEXTFILE_DIR}"\n')
    sysd.systemctl("daemon-reload")
    sysd.systemctl("enable", "--now", UNIT, timeout=300)
    sysd.systemctl("start", EXPORTER)
    deadline = time.monotonic() + 30
    while sysd.run("/usr/bin/python3", "-c", "import urllib.request; urllib.request.urlopen("
                   f"{SCRAPE!r}, timeout=2)", check=False).returncode != 0:
        assert time.monotonic() < deadline, sysd.journalctl("-u", EXPORTER).stdout
        time.sleep(0.3)
    return sysd


def test_metrics_match_status_json(serving: Systemd) -> None:
    sysd = serving
    report = status_json(sysd)
    text = scrape(sysd)
    got = loaderd_samples(text)
    assert got, text[-2000:]
    # node_exporter read the file without complaint (an unparsable file sets this to 1)
    assert 'node_textfile_scrape_error 0' in text
    assert got["loaderd_specs"] == len(report["specs"]) == EXAMPLES
    for spec in report["specs"]:
        name = spec["spec"]
        for kind in ("programs", "maps", "links"):
            by_type: dict[str, int] = {}
            for row in spec[kind]:
                by_type[row["type"]] = by_type.get(row["type"], 0) + 1
            for typ, n in by_type.items():
                assert got[f'loaderd_{kind}{{spec="{name}",type="{typ}"}}'] == n, (kind, name)
            assert sum(v for k, v in got.items() if k.startswith(f'loaderd_{kind}{{spec="{name}"'
                                                                 )) == len(spec[kind])
        assert got[f'loaderd_spec_drift{{spec="{name}"}}'] == 0 == len(spec["drift"])
    manifest = json.loads(sysd.run("cat", "/var/lib/loaderd/manifest.json").stdout)
    last = manifest["last_apply"]
    assert got["loaderd_last_apply_success"] == 1
    assert got["loaderd_last_apply_timestamp_seconds"] == pytest.approx(last["at"])
    assert got["loaderd_last_apply_compiles"] == last["compiles"]
    assert 0 < got["loaderd_last_apply_duration_seconds"] == pytest.approx(last["duration"])
    assert got["loaderd_kill_switch_pulled"] == 0
    for spec in report["specs"]:  # run counters exactly where the kernel counted runs
        for p in spec["programs"]:
            key = (f'loaderd_program_runs_total{{program="{p["name"]}",spec="{spec["spec"]}",'
                   f'type="{p["type"]}"}}')
            assert (key in got) == ("run_cnt" in p), key
    # The resident's file, then the scrape, are what promtool lints.
    body = sysd.run("cat", f"{TEXTFILE_DIR}/loaderd.prom").stdout
    lint = subprocess.run(["promtool", "check", "metrics"], input=body, text=True,
                          capture_output=True)
    assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), lint.stdout
    mode = sysd.run("stat", "-c", "%a %U", f"{TEXTFILE_DIR}/loaderd.prom").stdout.split()
    assert mode == ["644", "loaderd"]


def test_drift_reaches_the_metrics_within_a_tick(serving: Systemd) -> None:
    sysd = serving
    sysd.run("rm", f"{ROOT}/sched_switches/links/count_switch")
    got = scraped_until(sysd, 'loaderd_spec_drift{spec="sched_switches"}', 1)
    assert got['loaderd_spec_drift{spec="sched_switches"}'] == 1
    report = status_json(sysd)
    drifted = {s["spec"]: len(s["drift"]) for s in report["specs"]}
    assert got['loaderd_spec_drift_differences{spec="sched_switches"}'] == \
        drifted["sched_switches"] > 0
    sysd.systemctl("reload", UNIT, timeout=300)  # rebuilds the drifted spec
    got = scraped_until(sysd, 'loaderd_spec_drift{spec="sched_switches"}', 0)
    assert got['loaderd_spec_drift{spec="sched_switches"}'] == 0
    assert got["loaderd_last_apply_compiles"] == 1


def test_kill_switch_and_a_refused_apply_in_the_metrics(serving: Systemd) -> None:
    sysd = serving
    sysd.run("loaderd", "disable")
    got = scraped_until(sysd, "loaderd_kill_switch_pulled", 1)
    assert got["loaderd_kill_switch_pulled"] == 1 and got["loaderd_specs"] == 0
    sysd.run("loaderd", "enable")
    sysd.systemctl("reload", UNIT, timeout=300)
    got = scraped_until(sysd, "loaderd_kill_switch_pulled", 0)
    assert got["loaderd_specs"] == EXAMPLES and got["loaderd_last_apply_success"] == 1
    sysd.sh("printf 'loaderd: 1\\nname: broken\\nprograms: [\\n' "
            "> /etc/loaderd/programs.d/zz_broken.yaml")
    assert sysd.systemctl("reload", UNIT, check=False, timeout=300).returncode != 0
    got = scraped_until(sysd, "loaderd_last_apply_success", 0)
    assert got["loaderd_last_apply_success"] == 0 and got["loaderd_last_refusal_errors"] >= 1
    assert got["loaderd_specs"] == EXAMPLES  # the set before it stays applied
    sysd.run("rm", "/etc/loaderd/programs.d/zz_broken.yaml")
    sysd.systemctl("reload", UNIT, timeout=300)
    got = scraped_until(sysd, "loaderd_last_apply_success", 1)
    assert "loaderd_last_refusal_timestamp_seconds" not in got


EXECS = """loaderd: 1
source:
  inline: |
    struct ev { u32 pid; char comm[16]; };
    int on_exec(void *ctx) {
        struct ev *e = exec_events.ringbuf_reserve(sizeof(struct ev));
        if (!e)
            return 0;
        e->pid = bpf_get_current_pid_tgid() >> 32;
        bpf_get_current_comm(&e->comm, sizeof(e->comm));
        exec_events.ringbuf_submit(e, 0);
        return 0;
    }
maps:
  - name: exec_events
    type: ringbuf
    max_entries: 16384
    events: {layout: "pid:u32,comm:bytes16"}
programs:
  - {name: on_exec, type: tracepoint, attach: {tracepoint: "sched:sched_process_exec"}}
"""


def test_event_counters_match_the_journal(serving: Systemd) -> None:
    """Records read = journaled BPF_EVENTs + dropped by the rate limit, and the dropped ones
    are the EVENTS_DROPPED events' sum (counted from the resident's start to its stop, when it
    writes the file one last time)."""
    sysd = serving
    conf = "/etc/loaderd/loaderd.yaml"
    sysd.run("cp", conf, "/run/loaderd.yaml.orig")
    sysd.sh(f"sed -i 's/^    max_map_memory: .*/&\\n    max_event_rate: 5/' {conf}")
    sysd.write("/etc/loaderd/programs.d/zz_execs.yaml", EXECS)
    try:
        sysd.systemctl("reload", UNIT, timeout=300)
        sysd.systemctl("restart", UNIT, timeout=300)  # the resident reads the rate at start
        invocation = sysd.show(UNIT, "InvocationID")["InvocationID"]
        sysd.sh("for i in $(seq 40); do /bin/true; done")
        time.sleep(2)
        sysd.systemctl("stop", UNIT)
        got = loaderd_samples(sysd.run("cat", f"{TEXTFILE_DIR}/loaderd.prom").stdout)
        key = '{map="exec_events",spec="zz_execs"}'
        read, dropped = got[f"loaderd_events_read_total{key}"], \
            got[f"loaderd_events_dropped_total{key}"]
        mine = f"_SYSTEMD_INVOCATION_ID={invocation}"
        journaled = len(sysd.journal_json(mine, "LOADERD_EVENT=bpf_event"))
        reported = sum(int(str(e["LOADERD_DROPPED"])) for e in sysd.journal_json(
            mine, "LOADERD_EVENT=events_dropped"))
        assert read >= 40 and dropped > 0, got
        assert read == journaled + dropped and dropped == reported, (read, journaled, dropped,
                                                                     reported)
    finally:
        sysd.run("rm", "-f", "/etc/loaderd/programs.d/zz_execs.yaml")
        sysd.run("cp", "/run/loaderd.yaml.orig", conf)
        sysd.systemctl("reload", UNIT, check=False, timeout=300)
        sysd.systemctl("start", UNIT, timeout=300)

def test_audit_unit_writes_its_own_file(serving: Systemd) -> None:
    """The foreign-program alert's input comes from loaderd-audit.service (CAP_SYS_ADMIN: it
    alone can enumerate programs)."""
    sysd = serving
    sysd.systemctl("start", "loaderd-audit.service", check=False, timeout=300)
    got = loaderd_samples(scrape(sysd))
    assert got["loaderd_audit_timestamp_seconds"] > time.time() - 300
    journal = sysd.journalctl("-u", "loaderd-audit.service", "-o", "cat").stdout
    summary = re.findall(r"foreign: (\d+) programs? \((\d+) new\)", journal)
    assert summary, journal[-2000:]
    assert got["loaderd_foreign_programs"] == int(summary[-1][0])
    assert got["loaderd_foreign_programs_new"] == int(summary[-1][1])


def _playbook(sysd: Systemd, deb: str) -> str:
    """The shipped role, a play as site.yml runs it (serial, max_fail_percentage: 0) on
    localhost, and the shipped examples as the controller's specs."""
    top = sysd.hostdir / "files" / "ansible"
    shutil.rmtree(top, ignore_errors=True)
    shutil.copytree(REPO / "deploy" / "ansible" / "roles", top / "roles")
    shutil.copytree(REPO / "configs" / "programs.d", top / "files" / "programs.d")
    shutil.copy(deb, top / "loaderd.deb")
    (top / "play.yml").write_text(
        "---\n- name: Roll out loaderd specs\n  hosts: localhost\n  serial: 1\n"
        "  max_fail_percentage: 0\n  roles:\n    - role: loaderd\n      vars:\n"
        "        loaderd_deb: /run/e2e/host/files/ansible/loaderd.deb\n")
    return "/run/e2e/host/files/ansible"


def _play(sysd: Systemd, where: str) -> subprocess.CompletedProcess[str]:
    return sysd.run("/bin/sh", "-c", f"cd {where} && ansible-playbook -c local -i localhost, "
                    "play.yml", check=False, timeout=600, env={"ANSIBLE_NOCOLOR": "1"})


def _recap(out: str) -> dict[str, int]:
    line = next(li for li in out.splitlines() if li.startswith("localhost") and "ok=" in li)
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


def test_ansible_role_twice_then_a_broken_spec(serving: Systemd, deb: Any) -> None:
    sysd = serving
    where = _playbook(sysd, str(deb))
    first = _play(sysd, where)
    assert first.returncode == 0, first.stdout[-3000:]
    second = _play(sysd, where)
    assert second.returncode == 0 and _recap(second.stdout)["changed"] == 0, second.stdout[-3000:]
    before = {s["spec"]: [lk["id"] for lk in s["links"]] for s in status_json(sysd)["specs"]}
    # A broken spec: loaderd check (validate:) refuses it before it replaces anything.
    spec = sysd.hostdir / "files" / "ansible" / "files" / "programs.d" / "exec_counter.yaml"
    spec.write_text(spec.read_text().replace("type: tracepoint", "type: tracepiont", 1))
    broken = _play(sysd, where)
    assert broken.returncode != 0
    assert _recap(broken.stdout)["failed"] == 1
    assert re.search(r"/etc/loaderd/programs.d/exec_counter.yaml|exec_counter", broken.stdout)
    assert re.search(r":\d+:\d+: programs\[0\]\.type: unknown value \(got 'tracepiont'\)",
                     broken.stdout), broken.stdout[-3000:]
    live = sysd.run("cat", "/etc/loaderd/programs.d/exec_counter.yaml").stdout
    assert "tracepiont" not in live  # the live file was never replaced
    after = {s["spec"]: [lk["id"] for lk in s["links"]] for s in status_json(sysd)["specs"]}
    assert after == before  # the old set is still attached, the same links
    assert sysd.run("loaderd", "status", check=False).returncode == 0


def test_ansible_refused_reload_fails_the_host_with_the_located_error(serving: Systemd) -> None:
    """A C file passes no `validate:` of its own (its spec is unchanged): the reload's apply
    refuses it, and the handler's `loaderd status` fails the host saying where and why."""
    sysd = serving
    specs = sysd.hostdir / "files" / "ansible" / "files" / "programs.d"
    yaml = specs / "exec_counter.yaml"
    yaml.write_text(yaml.read_text().replace("type: tracepiont", "type: tracepoint", 1))
    before = {s["spec"]: [lk["id"] for lk in s["links"]] for s in status_json(sysd)["specs"]}
    c = specs / "exec_counter.bpf.c"
    good = c.read_text()
    c.write_text(good + "\nint broken(void) { return undeclared_thing; }\n")
    try:
        out = _play(sysd, "/run/e2e/host/files/ansible")
        assert out.returncode != 0 and _recap(out.stdout)["failed"] == 1, out.stdout[-3000:]
        assert "last apply REFUSED at" in out.stdout, out.stdout[-3000:]
        assert re.search(r"exec_counter\.bpf\.c:\d+:\d+: .*undeclared_thing", out.stdout), \
            out.stdout[-3000:]
        after = {s["spec"]: [lk["id"] for lk in s["links"]] for s in status_json(sysd)["specs"]}
        assert after == before  # the old set is still attached
    finally:
        c.write_text(good)
    again = _play(sysd, "/run/e2e/host/files/ansible")
    assert again.returncode == 0, again.stdout[-3000:]
    assert sysd.run("loaderd", "status", check=False).returncode == 0

def test_ansible_refuses_an_empty_specs_dir(serving: Systemd) -> None:
    """A mistyped loaderd_specs_dir must not prune every spec on every host."""
    sysd = serving
    top = sysd.hostdir / "files" / "ansible"
    (top / "empty.yml").write_text((top / "play.yml").read_text().replace(
        "      vars:\n", "      vars:\n        loaderd_specs_dir: /nonexistent\n"))
    out = sysd.run("/bin/sh", "-c", "cd /run/e2e/host/files/ansible && ansible-playbook -c "
                   "local -i localhost, empty.yml", check=False, timeout=600,
                   env={"ANSIBLE_NOCOLOR": "1"})
    assert out.returncode != 0 and "no *.yaml specs in /nonexistent" in out.stdout, out.stdout
    assert len(status_json(sysd)["specs"]) == EXAMPLES
    assert sysd.run("ls", "/etc/loaderd/programs.d").stdout.count(".yaml") == EXAMPLES

# --- audit shipping: loaderd-journal-upload -> systemd-journal-remote on 127.0.0.1 ----------

REMOTE_DIR = "/var/log/journal/remote"
REMOTE = f"--file={REMOTE_DIR}/*.journal"
CENTRAL = "central-journal.service"
ATTACHED = "930fbbaf8f824b9684b1763a0cc74ff8"
KILL_SWITCH = "25923749acc24a649159ff3f7c274fdb"
UPLOAD = "loaderd-journal-upload.service"


def _central(sysd: Systemd, up: bool) -> None:
    """The central store: Debian's systemd-journal-remote, plain HTTP on 127.0.0.1."""
    if up:
        sysd.run("mkdir", "-p", REMOTE_DIR)
        sysd.run("systemd-run", f"--unit={CENTRAL}", "/lib/systemd/systemd-journal-remote",
                 "--listen-http=127.0.0.1:19532", f"--output={REMOTE_DIR}/")
        deadline = time.monotonic() + 20
        while sysd.run("/usr/bin/python3", "-c", "import socket; socket.create_connection(("
                       "'127.0.0.1', 19532), 1)", check=False).returncode != 0:
            assert time.monotonic() < deadline, sysd.journalctl("-u", CENTRAL).stdout
            time.sleep(0.2)
    else:
        sysd.systemctl("stop", CENTRAL)


def _key(e: dict[str, Any]) -> tuple[object, ...]:
    return (e["_BOOT_ID"], e["__REALTIME_TIMESTAMP"], e["MESSAGE"])


def _shipped(e: dict[str, Any]) -> dict[str, object]:
    return {k: v for k, v in e.items()
            if k in ("MESSAGE_ID", "PRIORITY", "MESSAGE", "SYSLOG_IDENTIFIER", "_PID", "_UID",
                     "_SYSTEMD_UNIT") or k.startswith(("LOADERD_", "BPF_"))}


@pytest.fixture(scope="module")
def shipping(serving: Systemd) -> Systemd:
    sysd = serving
    sysd.write("/etc/systemd/journal-upload.conf.d/central.conf",
               "[Upload]\nURL=http://127.0.0.1:19532\n")
    _central(sysd, up=True)
    return sysd


def test_journal_upload_ships_an_applys_events_intact(shipping: Systemd) -> None:
    sysd = shipping
    sysd.run("loaderd", "disable")
    sysd.run("loaderd", "enable")
    sysd.systemctl("reload", UNIT, timeout=300)  # builds all four again: ATTACHED events
    local = sysd.journal_json("SYSLOG_IDENTIFIER=loaderd")
    sysd.systemctl("start", UPLOAD, timeout=300)
    remote = sysd.journal_json(REMOTE)
    attached = sysd.journal_json(f"MESSAGE_ID={ATTACHED}")
    found = {_key(e): e for e in sysd.journal_json(REMOTE, f"MESSAGE_ID={ATTACHED}")}
    assert len(attached) >= 4
    for e in attached:
        assert _key(e) in found, e["MESSAGE"]
        assert _shipped(found[_key(e)]) == _shipped(e)
        assert {"BPF_LINK_ID", "BPF_PROG_ID", "LOADERD_SPEC"} <= set(found[_key(e)])
    # only what the operator chose (the default MATCHES: loaderd's own entries), all of it
    assert {e["SYSLOG_IDENTIFIER"] for e in remote} == {"loaderd"}
    assert {_key(e) for e in local} <= {_key(e) for e in remote}
    assert len(remote) == len({_key(e) for e in remote})  # none twice


def test_journal_upload_store_down_then_up_loses_nothing(shipping: Systemd) -> None:
    sysd = shipping
    _central(sysd, up=False)
    sysd.run("loaderd", "disable")  # events made while the central store is down
    sysd.run("loaderd", "enable")
    failed = sysd.systemctl("start", UPLOAD, check=False, timeout=300)
    assert failed.returncode != 0
    made = sysd.journal_json(f"MESSAGE_ID={KILL_SWITCH}")
    # Taken before the upload: the resident journals the state change on its own tick, maybe
    # after it (that entry goes with the next batch).
    local = sysd.journal_json("SYSLOG_IDENTIFIER=loaderd")
    _central(sysd, up=True)
    sysd.systemctl("start", UPLOAD, timeout=300)  # what the timer does 10 s later
    remote = sysd.journal_json(REMOTE)
    keys = {_key(e) for e in remote}
    assert made and {_key(e) for e in made} <= keys
    assert {_key(e) for e in local} <= keys
    assert len(remote) == len(keys)
    sysd.systemctl("reload", UNIT, timeout=300)  # the set back for whatever runs next
