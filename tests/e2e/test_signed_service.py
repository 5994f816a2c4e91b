"""Signed specs under the real units (systemd 252, the installed package): signatures.mode
enforce with a key made by ssh-keygen inside, the apply unit (its seccomp filter and sandbox)
verifies it; spec_accepted, settings_changed and privileged_read reach journald with their
fields; an unsigned spec makes the reload fail and keeps the signed set."""

from __future__ import annotations

import pytest
from sysd import Systemd

from loaderd.audit.log import Event

UNIT = "loaderd.service"
PROGRAMS = "/etc/loaderd/programs.d"
SPEC = """loaderd: 1
source:
  inline: |
    int count_exec(void *ctx) {
        u32 k = 0; u64 *v = exec_count.lookup(&k);
        if (v) __sync_fetch_and_add(v, 1);
        return 0;
    }
maps:
  - {name: exec_count, type: array, key: u32, value: u64, max_entries: 1}
programs:
  - {name: count_exec, type: tracepoint, attach: {tracepoint: "sched:sched_process_exec"}}
"""

pytestmark = pytest.mark.systemd


def _events(sysd: Systemd, event: Event) -> list[dict[str, object]]:
    return sysd.journal_json(f"MESSAGE_ID={event.message_id}")


def test_enforce_mode_under_the_real_units(installed: Systemd) -> None:
    sysd = installed
    sysd.sh(f"rm -f {PROGRAMS}/*")
    sysd.sh("mkdir -p /tmp/keys && ssh-keygen -q -t ed25519 -N '' -C author "
            "-f /tmp/keys/author </dev/null")
    sysd.write(f"{PROGRAMS}/counter.yaml", SPEC)
    sysd.run("ssh-keygen", "-q", "-Y", "sign", "-n", "loaderd-spec", "-f", "/tmp/keys/author",
             f"{PROGRAMS}/counter.yaml")
    pub = sysd.run("cat", "/tmp/keys/author.pub").stdout.strip()
    fp = sysd.run("ssh-keygen", "-lf", "/tmp/keys/author.pub").stdout.split()[1]
    sysd.write("/etc/loaderd/allowed_signers",
               f'author@example.com namespaces="loaderd-spec" {pub}\n')
    sysd.sh("printf 'signatures: {mode: enforce, allowed_signers: /etc/loaderd/allowed_signers}"
            "\\n' >> /etc/loaderd/loaderd.yaml")
    sysd.systemctl("enable", "--now", UNIT, timeout=300)
    assert sysd.show(UNIT, "ActiveState")["ActiveState"] == "active"
    accepted = [e for e in _events(sysd, Event.SPEC_ACCEPTED) if e.get("LOADERD_SPEC") ==
                "counter"]
    assert accepted, "no spec_accepted for counter"
    e = accepted[-1]
    assert e["LOADERD_SIGNATURE"] == "verified" and e["LOADERD_SIGNER"] == "author@example.com"
    assert e["LOADERD_KEY_FINGERPRINT"] == fp
    assert e["LOADERD_SIGNATURE_NAMESPACE"] == "loaderd-spec"
    assert e["_SYSTEMD_UNIT"] == "loaderd-apply.service"
    changed = _events(sysd, Event.SETTINGS_CHANGED)
    assert changed and len(str(changed[-1]["LOADERD_SETTINGS_SHA256"])) == 64
    status = sysd.run("loaderd", "status").stdout
    assert f"signed by author@example.com (ssh-ed25519 {fp})" in status, status

    sysd.run("loaderctl", "dump", "counter/exec_count", "--raw")
    (read,) = _events(sysd, Event.PRIVILEGED_READ)
    assert read["LOADERD_WHAT"] == "dump --raw counter/exec_count" and read["_UID"] == "0"

    # An unsigned spec: the reload fails visibly, the signed set stays.
    sysd.write(f"{PROGRAMS}/extra.yaml", SPEC.replace("exec_count", "other_count"))
    assert sysd.systemctl("reload", UNIT, check=False, timeout=300).returncode != 0
    refused = [r for r in _events(sysd, Event.SPEC_REFUSED)
               if r.get("LOADERD_KIND") == "signature"]
    assert refused and "extra.yaml" in str(refused[-1]["MESSAGE"])
    assert "not signed" in str(refused[-1]["MESSAGE"])
    assert sysd.show(UNIT, "ActiveState")["ActiveState"] == "active"
    sysd.run("rm", f"{PROGRAMS}/extra.yaml")
