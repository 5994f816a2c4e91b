"""journald stopped under a running loaderd (issue 17), on a real systemd 252: a reload while it
is down neither hangs nor fails nor applies anything twice; the apply's and the resident's
events are spooled in the state dir (before: lost - the stderr fallback is a stream to that
same journald) and STATUS= and `loaderd status` say how many wait where; once journald is back
the resident replays them, marked LOADERD_REPLAYED=1, and events flow again.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from sysd import Systemd
from test_killed_apply import change, ids
from test_operator import APPLY, N_EXAMPLES, UNIT, status_rc, status_text

pytestmark = pytest.mark.systemd

SPOOL = "/var/lib/loaderd/journal-spool.jsonl"
JOURNALD = ("systemd-journald.socket", "systemd-journald-dev-log.socket",
            "systemd-journald.service")
DOWN = r"journald unreachable since [-\d: ]+: (\d+) events? in " + re.escape(SPOOL)


def spooled(sysd: Systemd) -> list[dict[str, object]]:
    out = sysd.run("cat", SPOOL, check=False).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_setup(installed: Systemd) -> None:
    installed.systemctl("enable", "--now", UNIT, timeout=300)
    assert status_text(installed, "^5 specs applied") == f"{N_EXAMPLES} specs applied"


def test_reload_while_journald_is_down_is_spooled_then_replayed(installed: Systemd) -> None:
    sysd = installed
    before = ids(sysd)
    change(sysd, 7)
    sysd.systemctl("stop", *JOURNALD)
    try:
        assert sysd.show("systemd-journald.service", "ActiveState")["ActiveState"] == "inactive"
        t0 = time.monotonic()
        sysd.systemctl("reload", UNIT, timeout=300)  # no hang, no failure
        took = time.monotonic() - t0
        text = status_text(sysd, DOWN)
        m = re.search(DOWN, text)
        assert m, text
        assert text.startswith(f"{N_EXAMPLES} specs applied (reloaded)"), text
        lines = spooled(sysd)
        kinds = [str(e["LOADERD_EVENT"]) for e in lines]
        assert kinds.count("applied") == 1 and "reload" in kinds, kinds
        assert all(e["LOADERD_SPOOL_ERROR"] and e["MESSAGE_ID"] for e in lines)
        st = sysd.run("stat", "-c", "%U %a", SPOOL).stdout.split()
        assert st == ["loaderd", "600"], st
        rc, out = status_rc(sysd)
        assert rc == 0 and "journald unreachable since " in out, out
        assert sysd.show(UNIT, "ActiveState")["ActiveState"] == "active"
        after = ids(sysd)
        assert after != before  # the change was applied, once
    finally:
        sysd.systemctl("start", *JOURNALD)
    want = f"{N_EXAMPLES} specs applied (reloaded)"
    assert status_text(sysd, f"^{re.escape(want)}$", timeout=30) == want
    assert not sysd.run("ls", "/var/lib/loaderd", check=False).stdout.count("journal-spool")
    replayed = sysd.journal_json("LOADERD_REPLAYED=1")
    kinds = [str(e["LOADERD_EVENT"]) for e in replayed]
    assert kinds.count("applied") == 1 and "reload" in kinds, kinds
    by = {str(e["LOADERD_EVENT"]): e["LOADERD_SPOOLED_UNIT"] for e in replayed}
    assert by["applied"] == APPLY and by["reload"] == UNIT, by
    assert len(replayed) == len(lines), (len(replayed), len(lines))
    assert all(int(str(e["LOADERD_SPOOLED_AT"])) > 0 for e in replayed)
    said = sysd.journalctl("-u", UNIT, "-o", "cat", "--grep", "journald reachable again").stdout
    assert f"replayed {len(lines)} events spooled while it was not" in said, said
    # Events flow again, straight to the journal; nothing is applied again by the replay.
    sysd.systemctl("reload", UNIT, timeout=300)
    assert ids(sysd) == after
    reloads = [e for e in sysd.journal_json("LOADERD_EVENT=reload")
               if "LOADERD_REPLAYED" not in e]
    assert reloads, "no RELOAD event journaled after journald came back"
    txids = [str(e["LOADERD_TXID"]) for e in sysd.journal_json("LOADERD_EVENT=applied")]
    assert len(set(txids)) == len(txids) == 2, txids  # setup's, this one's (replayed): once
    print(f"reload with journald down: {took:.1f}s, {len(lines)} events spooled and replayed")


def test_journald_stopped_in_the_middle_of_an_apply(installed: Systemd) -> None:
    """Stopped while the apply compiles: the apply finishes and commits; what it said after
    the stop is spooled and replayed, what it said before is journaled once."""
    from test_killed_apply import wait_compiling

    sysd = installed
    before = ids(sysd)
    change(sysd, 8)
    sysd.systemctl("start", "--no-block", APPLY)
    wait_compiling(sysd)
    sysd.systemctl("stop", *JOURNALD)
    try:
        sysd.wait_for(APPLY, "inactive", timeout=300)
        assert sysd.show(APPLY, "Result")["Result"] == "success"
        kinds = [str(e["LOADERD_EVENT"]) for e in spooled(sysd)]
        assert "applied" in kinds, kinds
        sysd.run("kill", "-HUP", sysd.show(UNIT, "MainPID")["MainPID"])
        assert re.search(DOWN, status_text(sysd, DOWN)), sysd.show(UNIT, "StatusText")
    finally:
        sysd.systemctl("start", *JOURNALD)
    assert ids(sysd) != before
    want = f"{N_EXAMPLES} specs applied (reloaded)"
    assert status_text(sysd, f"^{re.escape(want)}$", timeout=30) == want
    applied = [e for e in sysd.journal_json("-u", UNIT, "LOADERD_REPLAYED=1",
                                            "LOADERD_EVENT=applied")]
    assert len(applied) == 2, applied  # this apply's, the earlier test's: each once
    txids = [str(e["LOADERD_TXID"]) for e in sysd.journal_json("LOADERD_EVENT=applied")]
    assert len(set(txids)) == len(txids) == 3, txids  # setup, two changes: none twice
