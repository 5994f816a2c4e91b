"""What an operator sees when things go wrong, as packaged, on a real systemd 252 (issue 12):
each failure is said where operators look - `systemctl status loaderd` (the resident's
STATUS=), `journalctl -p err`, and `loaderd status`'s exit code - not only in
`loaderd-apply.service`'s log. The tests run in file order and share one service:

  a spec whose C file was not copied, then `systemctl enable --now loaderd`;
  a broken spec, then `systemctl reload loaderd`;
  `loaderd disable` (no reload) and `loaderd enable`;
  a state_dir trust problem (a world-writable parent);
  an operator's quick restarts (the start limit);
  `status` and `compliance` as a reader and as an outsider.
"""

from __future__ import annotations

import re
import time

import pytest
from sysd import Systemd

pytestmark = pytest.mark.systemd

UNIT = "loaderd.service"
APPLY = "loaderd-apply.service"
PROGRAMS = "/etc/loaderd/programs.d"
N_EXAMPLES = 5  # configs/programs.d, exec_events (the ring buffer) included
APPLIED = f"^{N_EXAMPLES} specs applied"
REFUSED = r"last apply REFUSED at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d: "


def status_text(sysd: Systemd, pattern: str, timeout: float = 15.0) -> str:
    """The resident's STATUS= once it matches (it follows a SIGHUP or a state change)."""
    deadline = time.monotonic() + timeout
    while True:
        text = sysd.show(UNIT, "StatusText")["StatusText"]
        if re.search(pattern, text) or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def status_rc(sysd: Systemd, user: str | None = None) -> tuple[int, str]:
    argv = ["loaderd", "status"]
    if user:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *argv]
    out = sysd.run(*argv, check=False)
    return out.returncode, out.stdout + out.stderr


def now(sysd: Systemd) -> str:
    return sysd.run("date", "+@%s.%N").stdout.strip()


def errors_since(sysd: Systemd, since: str) -> str:
    return sysd.journalctl("-p", "err", f"--since={since}", "-o", "cat", check=False).stdout


def test_missing_c_file_shows_in_the_residents_status(installed: Systemd) -> None:
    """README: `cp my-prog.yaml /etc/loaderd/programs.d/` (its C file forgotten), then
    `systemctl enable --now loaderd`: green but saying why nothing new was applied."""
    sysd = installed
    sysd.sh(f"sed -e 's/^name: exec_counter/name: my_prog/' -e 's/exec_counter.bpf.c/"
            f"my_prog.bpf.c/' {PROGRAMS}/exec_counter.yaml > {PROGRAMS}/my_prog.yaml")
    since = now(sysd)
    sysd.systemctl("enable", "--now", UNIT, timeout=300)
    assert sysd.show(UNIT, "ActiveState")["ActiveState"] == "active"
    assert sysd.show(APPLY, "Result")["Result"] == "exit-code"
    where = f"{PROGRAMS}/my_prog.yaml:6:3: source.file: {PROGRAMS}/my_prog.bpf.c: cannot open"
    text = status_text(sysd, REFUSED)
    assert re.fullmatch(f"0 specs applied; {REFUSED}{re.escape(where)}.*; nothing was applied "
                        "before it", text), text
    assert where in errors_since(sysd, since)
    said = sysd.journalctl("-u", APPLY, f"--since={since}", "-o", "cat").stdout
    assert "apply refused: 1 error; nothing was applied before it" in said, said
    assert "stays applied unchanged" not in said, said  # there was no set before it
    rc, out = status_rc(sysd)
    assert rc == 3 and "last apply REFUSED" in out, out  # programs_dir is not what is applied
    sysd.run("rm", f"{PROGRAMS}/my_prog.yaml")
    sysd.systemctl("reload", UNIT, timeout=300)
    assert status_text(sysd, APPLIED) == f"{N_EXAMPLES} specs applied (reloaded)"
    assert status_rc(sysd)[0] == 0


def test_refused_reload_says_file_line_and_reason(installed: Systemd) -> None:
    sysd = installed
    spec = f"{PROGRAMS}/udp_filter.yaml"
    sysd.sh(f"sed -i 's/__sync_fetch_and_add(seen, 1);/__sync_fetch_and_add(seen, 1) oops;/' "
            f"{spec}")
    line = next(i for i, t in enumerate(sysd.run("cat", spec).stdout.splitlines(), 1)
                if "oops" in t)
    since = now(sysd)
    try:
        assert sysd.systemctl("reload", UNIT, check=False, timeout=300).returncode != 0
        where = f"{spec}:{line}:42: source: C source does not compile: expected ';' after"
        text = status_text(sysd, re.escape(where))
        assert text.startswith(f"{N_EXAMPLES} specs applied (reloaded); last apply REFUSED"), text
        assert text.endswith("; the set before it stays applied"), text
        assert where in errors_since(sysd, since)  # priority err, with clang's line:col
        # Once: the structured entry at err, not again as the CLI's stderr line at info.
        said = sysd.journalctl("-u", APPLY, f"--since={since}", "-o", "cat").stdout
        assert said.count(where) == 1, said
        assert sysd.show(UNIT, "ActiveState")["ActiveState"] == "active"
    finally:
        sysd.sh(f"sed -i 's/ oops;/;/' {spec}")
    sysd.systemctl("reload", UNIT, timeout=300)
    assert status_text(sysd, APPLIED) == f"{N_EXAMPLES} specs applied (reloaded)"


def test_refused_settings_file_shows_in_status_and_journal(installed: Systemd) -> None:
    """A typo in loaderd.yaml then `systemctl reload`: the reload fails, the resident's STATUS=
    and the journal's apply_failed event name the file, line and field (before: the resident
    kept saying "5 specs applied", only loaderd-apply's log had it, as plain text)."""
    sysd = installed
    conf = "/etc/loaderd/loaderd.yaml"
    sysd.run("cp", conf, "/run/loaderd.yaml.good")
    sysd.sh(f"printf 'metrcs_dir: null\\n' >> {conf}")
    line = len(sysd.run("cat", conf).stdout.splitlines())
    since = now(sysd)
    try:
        assert sysd.systemctl("reload", UNIT, check=False, timeout=300).returncode != 0
        where = f"{conf}:{line}:1: metrcs_dir: unknown key 'metrcs_dir'"
        text = status_text(sysd, "settings file REFUSED")
        assert text.startswith(f"{N_EXAMPLES} specs applied (reloaded); settings file REFUSED "
                               f"at reload: {where}"), text
        failed = sysd.journal_json(f"--since={since}", "LOADERD_EVENT=apply_failed")
        assert failed and failed[-1]["LOADERD_FIELD"] == "metrcs_dir", failed
        assert failed[-1]["LOADERD_LINE"] == str(line), failed
        assert where in errors_since(sysd, since)
    finally:
        sysd.run("cp", "/run/loaderd.yaml.good", conf)
    sysd.systemctl("reload", UNIT, timeout=300)
    assert status_text(sysd, APPLIED) == f"{N_EXAMPLES} specs applied (reloaded)"


def test_kill_switch_reaches_status_without_a_reload(installed: Systemd) -> None:
    sysd = installed
    since = now(sysd)
    sysd.run("loaderd", "disable")
    text = status_text(sysd, "^kill switch pulled at ")
    assert re.fullmatch(r"kill switch pulled at [-\d: ]+: nothing applied until `loaderd "
                        r"enable`, then reload", text), text
    assert status_rc(sysd)[0] == 4  # nothing applied
    said = sysd.journalctl("-u", UNIT, f"--since={since}", "-o", "cat").stdout
    assert "state changed on disk: kill switch pulled" in said, said
    assert "manifest re-read after reload" not in said, said  # none happened
    sysd.run("loaderd", "enable")
    sysd.systemctl("reload", UNIT, timeout=300)
    assert status_text(sysd, APPLIED) == f"{N_EXAMPLES} specs applied (reloaded)"


def test_state_dir_trust_refusal_is_journaled_at_err(installed: Systemd) -> None:
    sysd = installed
    since = now(sysd)
    sysd.run("chmod", "0777", "/var/lib")
    try:
        assert sysd.systemctl("restart", UNIT, check=False, timeout=300).returncode != 0
        said = errors_since(sysd, since)
        assert "state_dir: /var/lib: parent directory is writable by group or other" in said
    finally:
        sysd.run("chmod", "0755", "/var/lib")
        sysd.systemctl("stop", UNIT)
        sysd.systemctl("reset-failed", UNIT, APPLY, check=False)
    sysd.systemctl("start", UNIT, timeout=300)
    assert status_text(sysd, APPLIED) == f"{N_EXAMPLES} specs applied"


def test_an_operators_restarts_do_not_hit_the_start_limit(installed: Systemd) -> None:
    """6 restarts in a row (5 in 300 s left the 6th `failed (start-limit-hit)`); each also
    runs the apply unit (Wants=), whose default limit was 5 in 10 s."""
    sysd = installed
    sysd.systemctl("reset-failed", UNIT, APPLY, check=False)
    for _ in range(7):
        sysd.systemctl("restart", UNIT, timeout=300)
    assert sysd.show(UNIT, "ActiveState")["ActiveState"] == "active"
    assert sysd.show(APPLY, "Result")["Result"] == "success"


def test_status_codes_and_compliance_for_readers(installed: Systemd) -> None:
    sysd = installed
    sysd.sh("useradd -M -G loaderd-readers rdr; useradd -M outsider")
    rc, out = status_rc(sysd, "rdr")
    assert rc == 0 and "ok (partially checked)" in out, out
    rc, out = status_rc(sysd, "outsider")
    assert rc == 5 and "internal error" not in out, out  # no permission
    assert "/sys/fs/bpf/loaderd cannot be listed by uid" in out, out
    out = sysd.run("setpriv", "--reuid=rdr", "--regid=rdr", "--init-groups", "loaderctl",
                   "compliance", check=False).stdout
    assert "[SKIP] pinned objects match the manifest (no drift)" in out, out
