"""Every change to policy on the record: the settings summary and its diff (SETTINGS_CHANGED),
and internal errors shown as an id the journal holds, never as the exception's text."""

from __future__ import annotations

import argparse
import io
import json
import re

import pytest

from loaderd.audit import log as audit
from loaderd.cli.common import run
from loaderd.model import (
    Limits,
    PinOwnership,
    Policy,
    ProgType,
    Settings,
    SignatureMode,
    SignaturePolicy,
    settings_changes,
)


def test_summary_diff_names_each_changed_setting() -> None:
    old = Settings().summary()
    new = Settings(
        policy=Policy(program_types=frozenset(ProgType) - {ProgType.XDP},
                      limits=Limits(max_programs=8), helpers_by_type={
                          ProgType.TRACEPOINT: frozenset({"probe_read_kernel"})}),
        pins=PinOwnership(mode=0o640, group="loaderd-readers"),
        signatures=SignaturePolicy(SignatureMode.ENFORCE, "/etc/loaderd/allowed_signers"),
    ).summary()
    json.dumps(new)  # stored in the state directory as JSON
    changes = settings_changes(json.loads(json.dumps(old)), new)
    assert "policy.program_types: -xdp" in changes
    assert "policy.limits.max_programs: 64 -> 8" in changes
    assert "policy.helpers.by_type.tracepoint: (unset) -> probe_read_kernel" in changes
    assert "pins.mode: 0600 -> 0640" in changes
    assert "pins.group: None -> loaderd-readers" in changes
    assert "signatures.mode: off -> enforce" in changes
    assert any(c.startswith("signatures.allowed_signers: None (0 keys) -> /etc/loaderd/")
               for c in changes)
    assert settings_changes(new, new) == []


@pytest.fixture
def events() -> io.StringIO:
    buf = io.StringIO()
    audit.configure(journal=False, stream=buf)
    return buf


def test_internal_error_shows_an_id_not_the_text(events: io.StringIO,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def boom(_args: argparse.Namespace) -> int:
        raise KeyError("secret-path /root/.ssh/id_ed25519")

    code = run(argparse.Namespace(func=boom, debug=False))
    err = capsys.readouterr().err
    assert code == 1
    m = re.fullmatch(r"internal error ([0-9a-f]{12}): see `journalctl LOADERD_ERROR_ID=\1` "
                     r"\(rerun with --debug for details\)\n", err)
    assert m, err
    assert "secret" not in err and "KeyError" not in err
    (event,) = [json.loads(ln) for ln in events.getvalue().splitlines()]
    assert event["event"] == "internal_error" and event["error_id"] == m.group(1)
    assert event["exception"] == "KeyError"
    assert "secret" not in events.getvalue()  # without a journal the JSON sink is stderr


def test_internal_error_text_goes_to_the_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[dict[str, object]] = []
    monkeypatch.setattr(audit, "_journal", True)
    monkeypatch.setattr(audit, "_logger", object())
    monkeypatch.setattr(audit, "emit", lambda ev, msg, **f: sent.append(
        {"event": ev, "message": msg, **f}))
    audit.internal_error("0123456789ab", "KeyError", "'k'", "Traceback ...")
    (e,) = sent
    assert e["event"] is audit.Event.INTERNAL_ERROR and e["error_id"] == "0123456789ab"
    assert e["detail"] == "'k'" and e["traceback"] == "Traceback ..."
