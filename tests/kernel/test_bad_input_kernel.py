"""Bad input changes nothing (real kernel): with the examples applied and attached, every case of
the bad-input corpus, and late failures (compile, helper, verifier, attach), is refused and the
pins, programs, links and counters from before are untouched."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loaderd.apply.applier import Applier
from loaderd.audit import log as audit
from loaderd.bpf.pins import PinLayout
from loaderd.config.settings import load_settings
from loaderd.model import Settings
from loaderd.observe import drift as verify
from loaderd.store.statedir import State
from tests.conftest import loaderd, no_staging_leftovers
from tests.kernel.test_pipeline import read_u64
from tests.unit.test_corpus import BAD, bad_cases, read_header

pytestmark = pytest.mark.kernel

# Headers that make a case about something other than one spec file in the programs dir.
_NOT_A_SPEC_DROP = {"target", "settings", "calls", "setup", "limits"}

LATE_FAILURES = {
    "compile_error": "int f(void *ctx) { return undefined_symbol; }",
    "verifier_error": "int f(struct xdp_md *ctx) { unsigned char *d = (void *)(long)ctx->data;"
                      " return d[64]; }",
    "dangerous_helper": "int f(void *ctx) { bpf_send_signal(9); return 0; }",
}


def _spec(body: str, ptype: str = "tracepoint",
          attach: str = '{tracepoint: "sched:sched_process_exec"}') -> str:
    return (f"loaderd: 1\nsource:\n  inline: |\n    {body}\nprograms:\n"
            f"  - {{name: f, type: {ptype}, attach: {attach}}}\n")


def late_cases() -> dict[str, str]:
    cases = {k: _spec(v, "xdp" if "xdp_md" in v else "tracepoint",
                      "{xdp: {interface: lo, mode: skb}}" if "xdp_md" in v else
                      '{tracepoint: "sched:sched_process_exec"}')
             for k, v in LATE_FAILURES.items()}
    cases["missing_tracepoint"] = _spec("int f(void *ctx) { return 0; }",
                                        attach='{tracepoint: "sched:no_such_event"}')
    cases["missing_interface"] = _spec("int f(struct xdp_md *ctx) { return XDP_PASS; }", "xdp",
                                       "{xdp: {interface: nosuchif0, mode: skb}}")
    return cases


def spec_drop_cases() -> list[str]:
    out = []
    for case in bad_cases():
        path = BAD / f"{case}.yaml"
        if path.is_symlink() or not path.exists():
            continue
        if _NOT_A_SPEC_DROP & set(read_header(path)):
            continue
        out.append(case)
    return out


@pytest.fixture
def applied(config: Path, specs_dir: Path) -> Iterator[tuple[Settings, Path]]:
    loaderd("--config", str(config), "apply")
    settings = load_settings(str(config))
    audit.configure(journal=False, stream=io.StringIO())  # keep test output readable
    yield settings, specs_dir
    audit.configure()


def snapshot(settings: Settings) -> dict[str, object]:
    manifest = State(settings.state_dir).manifest()
    layout = PinLayout(settings.bpffs_root)
    return {"specs": {n: (e.programs, e.maps, e.links) for n, e in manifest.specs.items()},
            "pins": layout.list_tree(layout.root)}


def assert_untouched(settings: Settings, before: dict[str, object]) -> None:
    after = snapshot(settings)
    assert after == before
    for name, entry in State(settings.state_dir).manifest().specs.items():
        assert verify.differences(entry) == [], name
    assert no_staging_leftovers(settings.bpffs_root)


def test_corpus_cases_change_nothing_on_the_kernel(applied: tuple[Settings, Path]) -> None:
    settings, specs_dir = applied
    before = snapshot(settings)
    counter = f"{settings.bpffs_root}/exec_counter/maps/exec_count"
    cases = spec_drop_cases()
    assert len(cases) >= 60, len(cases)
    for case in cases:
        drop = specs_dir / f"zz_{case}.yaml"
        shutil.copyfile(BAD / f"{case}.yaml", drop)
        extras = [p for p in BAD.glob(f"{case}.*") if p.suffix not in (".yaml", ".expect")]
        for p in extras:
            shutil.copyfile(p, specs_dir / p.name)
        try:
            result = Applier(settings).apply()
            assert not result.ok, f"{case} was accepted"
            assert result.built == [], case
        finally:
            drop.unlink()
            for p in extras:
                (specs_dir / p.name).unlink()
        assert_untouched(settings, before)
    value = read_u64(counter)
    subprocess.run(["/bin/true"], check=True)
    assert read_u64(counter) > value  # still attached and counting


@pytest.mark.parametrize("case", sorted(late_cases()))
def test_late_failures_leave_the_applied_set_running(applied: tuple[Settings, Path],
                                                     case: str) -> None:
    settings, specs_dir = applied
    before = snapshot(settings)
    (specs_dir / "zz_bad.yaml").write_text(late_cases()[case])
    # Also change a good spec in the same apply: it must not go live either (all or nothing).
    good = specs_dir / "sched_switches.yaml"
    good.write_text(good.read_text().replace("(*value)++", "(*value) += 2"))
    result = Applier(settings).apply()
    assert not result.ok and result.built == []
    assert any("zz_bad.yaml" in str(e) for e in result.errors), result.errors
    assert_untouched(settings, before)
    os.unlink(specs_dir / "zz_bad.yaml")


def test_read_only_pin_root_is_one_clear_error_before_any_compile(
        applied: tuple[Settings, Path], config: Path) -> None:
    """The unit-file mistake (ProtectKernelTunables= without ReadWritePaths=): a read-only pin
    root is named once, with the fix, before any compile - not one internal error per spec."""
    settings, specs_dir = applied
    before = snapshot(settings)
    good = specs_dir / "sched_switches.yaml"
    good.write_text(good.read_text().replace("(*value)++", "(*value) += 2"))  # something to build
    root = settings.bpffs_root
    # A read-only bind of the pin root in a new mount namespace whose bpffs mount is made
    # private first (not "/": in a chroot it is no mount point): the host's stays writable.
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "unchanged", "sh", "-ec",
         f'mount --make-rprivate /sys/fs/bpf; mount --bind "{root}" "{root}"; '
         f'mount -o remount,bind,ro "{root}"; '
         f'exec "$0" -m loaderd --config "{config}" apply', sys.executable],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr
    assert f"{root}/_staging" in errors[0] and "Read-only file system" in errors[0]
    assert "ReadWritePaths=" in errors[0] and "internal error" not in proc.stderr
    # Refused: no "compiles 0" (it read as a count of the failed apply's work).
    assert proc.stdout.startswith("REFUSED: 1 error; nothing changed"), proc.stdout
    assert "compiles" not in proc.stdout, proc.stdout
    assert_untouched(settings, before)


def test_an_error_flood_is_one_refusal_event_with_its_count(
        applied: tuple[Settings, Path]) -> None:
    """20,000 bad list items in one 80 KB file: at most 21 errors (20 and "and N more") and
    one SPEC_REFUSED event for the file, carrying the count; nothing changes."""
    import json

    from tests.unit.test_spec import FLOOD

    settings, specs_dir = applied
    before = snapshot(settings)
    (specs_dir / "zz_flood.yaml").write_text(FLOOD)
    buf = io.StringIO()
    audit.configure(journal=False, stream=buf)
    try:
        result = Applier(settings).apply()
    finally:
        os.unlink(specs_dir / "zz_flood.yaml")
    assert not result.ok and len(result.errors) == 21
    events = [json.loads(line) for line in buf.getvalue().splitlines()]
    refused = [e for e in events if e["event"] == "spec_refused"]
    assert len(refused) == 1 and refused[0]["errors"] == 20001, refused
    assert refused[0]["file"] == str(specs_dir / "zz_flood.yaml")
    assert refused[0]["message"].endswith("(and 20000 more)")
    assert len(refused[0]["detail"].splitlines()) == 21
    failed = [e for e in events if e["event"] == "apply_failed"]
    assert len(failed) == 1 and failed[0]["errors"] == 20001
    assert len(events) < 10, [e["event"] for e in events]
    assert_untouched(settings, before)
