"""Signed specs on the real kernel, signatures.mode enforce: a spec signed with a real
ssh-keygen key loads, its signature facts reach the journal, the manifest, status and list;
a changed C file or an unsigned spec refuses the apply and leaves the running set; rollback
restores the signature with the spec and verifies it again against today's keys."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from loaderd.store.statedir import State
from tests.conftest import loaderd, write_settings
from tests.kernel.test_ctl import loaderctl
from tests.kernel.test_lifecycle import execs, prog_tag
from tests.kernel.test_pipeline import read_u64

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="no ssh-keygen")]
C = """int count_exec(void *ctx) {
    u32 k = 0; u64 *v = exec_count.lookup(&k);
    if (v) __sync_fetch_and_add(v, STEP);
    return 0;
}
"""
SPEC = """loaderd: 1
source:
  file: counter.bpf.c
  sha256: {sha}
maps:
  - {{name: exec_count, type: array, key: u32, value: u64, max_entries: 1}}
programs:
  - {{name: count_exec, type: tracepoint, attach: {{tracepoint: "sched:sched_process_exec"}}}}
"""


def _sign(key: Path, file: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-n", "loaderd-spec", "-f", str(key),
                    str(file)], check=True, capture_output=True, stdin=subprocess.DEVNULL)


def _write(specs: Path, key: Path, step: int) -> None:
    c = C.replace("STEP", str(step)).encode()
    (specs / "counter.bpf.c").write_bytes(c)
    spec = specs / "counter.yaml"
    spec.write_text(SPEC.format(sha=hashlib.sha256(c).hexdigest()))
    sig = Path(str(spec) + ".sig")
    if sig.exists():
        sig.unlink()
    _sign(key, spec)


def _events(out: subprocess.CompletedProcess[str], kind: str) -> list[dict[str, Any]]:
    lines = [json.loads(ln) for ln in out.stderr.splitlines() if ln.startswith("{")]
    return [e for e in lines if e.get("event") == kind]


def test_enforce_mode_end_to_end(tmp_path: Path, bpffs_root: str) -> None:
    os.chmod(tmp_path, 0o755)
    keys = tmp_path / "keys"
    keys.mkdir()
    key = keys / "author"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True,
                   stdin=subprocess.DEVNULL)
    pub = Path(str(key) + ".pub").read_text()
    fp = subprocess.run(["ssh-keygen", "-lf", str(key) + ".pub"], capture_output=True,
                        text=True, check=True).stdout.split()[1]
    trust = tmp_path / "trust"
    trust.mkdir()
    allowed, revoked = trust / "allowed_signers", trust / "revoked_keys"
    allowed.write_text(f'author@example.com namespaces="loaderd-spec" {pub}')
    revoked.write_text("")
    specs = tmp_path / "specs"
    specs.mkdir()
    conf = write_settings(tmp_path, bpffs_root, specs, (
        f"signatures:\n  mode: enforce\n  allowed_signers: {allowed}\n"
        f"  revoked_keys: {revoked}\n"))
    _write(specs, key, 1)
    out = loaderd("--config", str(conf), "apply")
    (accepted,) = _events(out, "spec_accepted")
    assert accepted["signature"] == "verified" and accepted["signer"] == "author@example.com"
    assert accepted["key_fingerprint"] == fp
    assert accepted["signature_namespace"] == "loaderd-spec"
    assert accepted["signed_sha256"] == hashlib.sha256(
        (specs / "counter.yaml").read_bytes()).hexdigest()
    pin = f"{bpffs_root}/counter/maps/exec_count"
    prog = f"{bpffs_root}/counter/progs/count_exec"
    execs(2)
    assert read_u64(pin) >= 2  # the signed program runs
    status = json.loads(loaderd("--config", str(conf), "status", "--json").stdout)
    (entry,) = status["specs"]
    assert entry["signature"]["status"] == "verified"
    assert entry["signature"]["fingerprint"] == fp
    text = loaderd("--config", str(conf), "status").stdout
    assert f"signed by author@example.com (ssh-ed25519 {fp})" in text
    lst = loaderctl("--config", str(conf), "list").stdout
    assert f"signed by author@example.com (ssh-ed25519 {fp})" in lst
    report = json.loads(loaderctl("--config", str(conf), "compliance", "--json",
                                  check=False).stdout)
    (row,) = [r for r in report["results"] if r["check"].startswith("applied specs are signed")]
    assert row["status"] == "PASS" and fp in row["detail"], row
    bundle = tmp_path / "bundle"
    out = loaderctl("--config", str(conf), "forensics", str(bundle))
    assert (bundle / "specs" / "counter" / "counter.yaml.sig").read_bytes() == Path(
        str(specs / "counter.yaml") + ".sig").read_bytes()
    (read,) = _events(out, "privileged_read")  # the bundle is on the record: who, what
    assert read["what"].startswith(f"forensics {bundle}") and read["uid"] == os.getuid()

    # The C file changed after signing: the pin refuses it, the signed set keeps running.
    _old_id, old_tag = prog_tag(prog)
    (specs / "counter.bpf.c").write_text(C.replace("STEP", "7"))
    refused = loaderd("--config", str(conf), "apply", check=False)
    assert refused.returncode == 1 and "sha256 mismatch" in refused.stderr, refused.stderr
    assert prog_tag(prog)[1] == old_tag
    # An unsigned spec beside it: refused in enforce mode, nothing changes.
    _write(specs, key, 1)
    (specs / "extra.yaml").write_text((specs / "counter.yaml").read_text()
                                      .replace("exec_count", "other_count"))
    refused = loaderd("--config", str(conf), "apply", check=False)
    assert refused.returncode == 1 and "extra.yaml" in refused.stderr
    assert "not signed and signatures.mode is enforce" in refused.stderr
    (specs / "extra.yaml").unlink()

    # A signed change, then rollback: the generation holds the .sig, verified again.
    _write(specs, key, 100)
    loaderd("--config", str(conf), "apply")
    assert prog_tag(prog)[1] != old_tag
    state = State(str(tmp_path / "state"), -1, bpffs_root)
    gens = state.generations()
    assert all(os.path.exists(os.path.join(state.generation_dir(g), "counter.yaml.sig"))
               for g in gens)
    loaderd("--config", str(conf), "rollback")
    assert prog_tag(prog)[1] == old_tag
    # Revoking the key: the signed generations no longer verify; rollback refuses. (The
    # rollback holds until released: released, the apply applies /etc's signed set again.)
    loaderd("--config", str(conf), "rollback", "--release")
    loaderd("--config", str(conf), "apply")
    revoked.write_text(pub)
    back = loaderd("--config", str(conf), "rollback", check=False)
    assert back.returncode != 0 and "is revoked" in back.stderr, back.stderr



def test_settings_change_is_journaled_once_with_its_summary(tmp_path: Path,
                                                            bpffs_root: str) -> None:
    """SETTINGS_CHANGED when an apply first sees a changed settings file (its sha256 and what
    changed), not again; and an unsanitized read (`dump --raw`) is journaled with who/what."""
    from tests.conftest import make_conf
    from tests.kernel.test_lifecycle import COUNTER

    conf = make_conf(tmp_path, bpffs_root, {"counter": COUNTER.format(step=1)})
    first = _events(loaderd("--config", str(conf), "apply"), "settings_changed")
    assert len(first) == 1 and first[0]["changes"] == ["first apply that saw these settings"]
    assert first[0]["settings_sha256"] == hashlib.sha256(
        conf.read_bytes() + b"\0" + hashlib.sha256(
            hashlib.sha256(b"").digest() * 2).hexdigest().encode()).hexdigest()
    assert _events(loaderd("--config", str(conf), "apply"), "settings_changed") == []
    conf.write_text(conf.read_text() + "pins: {mode: \"0640\"}\npolicy:\n  limits: "
                    "{max_programs: 9}\n  program_types: [tracepoint, xdp]\n")
    (changed,) = _events(loaderd("--config", str(conf), "apply"), "settings_changed")
    assert changed["previous_sha256"] == first[0]["settings_sha256"]
    assert changed["settings_sha256"] != first[0]["settings_sha256"]
    changes = changed["changes"]
    assert "pins.mode: 0600 -> 0640" in changes and \
        "policy.limits.max_programs: 64 -> 9" in changes, changes
    assert any(c.startswith("policy.program_types: -") and "-socket_filter" in c
               for c in changes), changes
    assert "pins.mode: 0600 -> 0640" in changed["message"]
    assert _events(loaderd("--config", str(conf), "apply"), "settings_changed") == []
    # permissive: the unsigned spec still loads, journaled as such; the mode change is on
    # the record too.
    allowed = tmp_path / "allowed_signers"
    allowed.write_text("")
    conf.write_text(conf.read_text() + f"signatures: {{mode: permissive, allowed_signers: "
                    f"{allowed}}}\n")
    out = loaderd("--config", str(conf), "apply")
    (changed,) = _events(out, "settings_changed")
    assert "signatures.mode: off -> permissive" in changed["changes"], changed
    # unchanged, so adopted: the adoption says it was admitted unsigned
    (adopted,) = _events(out, "adopted")
    assert adopted["unsigned"] == ["counter"]
    assert "UNSIGNED (signatures.mode permissive): counter" in adopted["message"]
    # built: its acceptance says so
    (tmp_path / "specs" / "counter.yaml").write_text(COUNTER.format(step=2))
    out = loaderd("--config", str(conf), "apply")
    (accepted,) = _events(out, "spec_accepted")
    assert accepted["signature"] == "unsigned"
    assert "UNSIGNED (signatures.mode permissive)" in accepted["message"]

    out = loaderctl("--config", str(conf), "dump", "counter/exec_count", "--raw")
    (read,) = _events(out, "privileged_read")
    assert read["what"] == "dump --raw counter/exec_count" and read["uid"] == os.getuid()
    out = loaderctl("--config", str(conf), "dump", "counter/exec_count")
    assert _events(out, "privileged_read") == []
    loaderd("--config", str(conf), "disable")
