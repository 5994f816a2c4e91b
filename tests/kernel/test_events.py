"""Event outputs (real kernel): a ringbuf declared with `events:` is journaled by the resident
daemon, decoded by its layout, sanitized, and rate-limited with the drops reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loaderd.model import Settings
from loaderd.store.manifest import Manifest
from tests.conftest import REPO, make_conf, write_settings

pytestmark = pytest.mark.kernel

SPEC = """loaderd: 1
source:
  inline: |
    struct exec_event { u32 pid; u32 uid; char comm[16]; char note[32]; u32 saddr; u32 peer; };
    int on_exec(void *ctx) {
        struct exec_event *e = exec_events.ringbuf_reserve(sizeof(struct exec_event));
        if (!e)
            return 0;
        e->pid = bpf_get_current_pid_tgid() >> 32;
        e->uid = bpf_get_current_uid_gid();
        bpf_get_current_comm(&e->comm, sizeof(e->comm));
        // a C string, its NUL, then garbage, as uninitialized buffers hold
        __builtin_memcpy(e->note, "login password=hunter2 ok\\0\\x01\\x02\\x03\\x04\\x05\\x06", 32);
        e->saddr = __builtin_bswap32(0x0a010203);  // 10.1.2.3 as iphdr holds it: network order
        e->peer = __builtin_bswap32(0x0a090807);   // 10.9.8.7: an address only settings name
        exec_events.ringbuf_submit(e, 0);
        return 0;
    }
maps:
  - name: exec_events
    type: ringbuf
    max_entries: 16384
    events: {layout: "pid:u32,uid:u32,comm:char16:comm,note:char32,saddr:u32,peer:u32"}
programs:
  - {name: on_exec, type: tracepoint, attach: {tracepoint: "sched:sched_process_exec"}}
"""


# Only execs by uid 65534 (the test's, run through setpriv): on a busy host other processes'
# execs would otherwise use up the 3 a second the test allows and leave none of ours.
NOBODY_SPEC = SPEC.replace("    int on_exec(void *ctx) {\n", "    int on_exec(void *ctx) {\n"
                           "        if ((u32)bpf_get_current_uid_gid() != 65534)\n"
                           "            return 0;\n")


def test_daemon_journals_sanitized_rate_limited_events(tmp_path: Path, bpffs_root: str) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    os.chmod(tmp_path, 0o755)
    assert NOBODY_SPEC != SPEC
    (specs / "execs.yaml").write_text(NOBODY_SPEC)
    conf = write_settings(tmp_path, bpffs_root, specs,
                          "policy:\n  limits: {max_event_rate: 3}\n"
                          "sanitize: {ipv4_prefix: 16, redact: [uid], ip_fields: [peer]}\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "loaderd", "--config", str(conf), "run",
                             "--drift-interval", "0.5"], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (
                tmp_path / "state" / "manifest.json").exists():
            time.sleep(0.2)
        time.sleep(1.5)  # the daemon opened the ring after READY
        for _ in range(20):
            subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            "/bin/true"], check=True)
        time.sleep(1.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    lines = [json.loads(ln) for ln in err.splitlines() if ln.startswith("{")]
    evs = [ln for ln in lines if ln["event"] == "bpf_event"]
    drops = [ln for ln in lines if ln["event"] == "events_dropped"]
    assert evs, err[-3000:]
    trues = [e for e in evs if e.get("event_comm") == "true"]
    assert trues, evs[:3]
    assert all("hunter2" not in json.dumps(e) for e in evs)  # secret redacted
    assert all(e["event_note"] == "login password=[REDACTED] ok" for e in trues)  # not hex
    # Network order, masked to loaderd.yaml's sanitize.ipv4_prefix (16, not the default 24);
    # sanitize.redact adds uid to the fields redacted.
    assert all(e["event_saddr"] == "10.1.0.0/16" for e in trues)
    assert all(e["event_uid"] == "[REDACTED]" for e in trues)
    # A field only loaderd.yaml names as an address: read in network order and masked too.
    assert all(e["event_peer"] == "10.9.0.0/16" for e in trues), trues[0]
    assert len(evs) < 20 and sum(d["dropped"] for d in drops) > 0  # limited, never silently
    assert len(evs) + sum(d["dropped"] for d in drops) == 20  # each of ours: journaled or counted


def test_consume_is_bounded_and_loses_nothing(tmp_path: Path, bpffs_root: str) -> None:
    """Under a flood `cons < prod` never ends by itself: consume(limit) returns after `limit`
    records (the daemon gets back to its watchdog and signals) and the rest waits in order."""
    from loaderd import layout
    from loaderd.bpf import kernel
    from loaderd.runtime import ringbuf as events
    from tests.conftest import loaderd

    loaderd("--config", str(make_conf(tmp_path, bpffs_root, {"execs": SPEC})), "apply")
    path = f"{bpffs_root}/execs/maps/exec_events"
    fd = kernel.obj_get(path)
    ring = events.RingBuffer(fd, path)
    try:
        list(ring.consume())  # whatever other execs on the host left
        for _ in range(30):
            subprocess.run(["/bin/true"], check=True)
        first = list(ring.consume(limit=10))
        rest = list(ring.consume())
        assert len(first) == 10 and len(rest) >= 20
        mine = [r for r in first + rest if layout.decode(r, layout.parse_layout(
            "pid:u32,uid:u32,comm:char16,note:char32,saddr:u32"))["comm"] == "true"]
        assert len(mine) == 30  # every exec of ours, none skipped, none twice
    finally:
        ring.close()
        os.close(fd)


def _applied(tmp_path: Path, bpffs_root: str) -> tuple[Settings, Manifest]:
    """SPEC applied: the settings and the manifest the pump syncs from."""
    from loaderd.config.settings import load_settings
    from loaderd.store.statedir import State
    from tests.conftest import loaderd

    conf = make_conf(tmp_path, bpffs_root, {"execs": SPEC})
    loaderd("--config", str(conf), "apply")
    settings = load_settings(str(conf))
    return settings, State(settings.state_dir).manifest()


def test_rate_limit_survives_a_reload(tmp_path: Path, bpffs_root: str) -> None:
    """sync() after SIGHUP keeps each ring's token bucket and drop count:
    a reload must not hand a flood a fresh burst or forget drops not yet reported."""
    from loaderd.runtime.eventpump import EventPump

    settings, manifest = _applied(tmp_path, bpffs_root)
    pump = EventPump(settings)
    try:
        pump.sync(manifest)
        (ring,) = pump.rings
        ring.limit.tokens, ring.limit.dropped, ring.reported = 0.0, 7, 5
        pump.sync(manifest)
        (again,) = pump.rings
        # the same map (its id): the reader is kept (a perf buffer could not be reopened
        # without CAP_PERFMON), with its bucket and count
        assert again.reader is ring.reader
        assert again.limit is ring.limit and again.reported == 5
    finally:
        pump.close()


def test_a_kept_ring_reads_its_new_layouts_btf_enums(tmp_path: Path, bpffs_root: str) -> None:
    """A reload that changes only a ring's layout keeps the reader (same map id) and decodes
    by the new layout, the BTF enums it names loaded from the running kernel's BTF."""
    import dataclasses
    import struct

    from loaderd.runtime.eventpump import EventPump

    settings, manifest = _applied(tmp_path, bpffs_root)
    pump = EventPump(settings)
    try:
        pump.sync(manifest)
        (ring,) = pump.rings
        record = struct.pack("<II16s32sII", 1, 0, b"true", b"ok", 0, 0)
        assert ring.records(record)["pid"] == 1
        rec = manifest.specs["execs"]
        layout = rec.events["exec_events"].replace("pid:u32", "pid:u32:enum=bpf_map_type")
        changed = dataclasses.replace(manifest, specs={"execs": dataclasses.replace(
            rec, events={"exec_events": layout})})
        pump.sync(changed)
        (again,) = pump.rings
        assert again.reader is ring.reader  # kept: the same map
        assert "bpf_map_type" in pump.enums
        assert again.records(record)["pid"] == "BPF_MAP_TYPE_HASH"  # 1, by the kernel's BTF
    finally:
        pump.close()


def test_a_swapped_ring_pin_is_not_read(tmp_path: Path, bpffs_root: str) -> None:
    """The pump reads the map the manifest says was applied: a ring buffer pinned in its place
    (by whoever can write the pin dir) is refused by id, said once, not read as the spec's."""
    from loaderd.bpf import kernel
    from loaderd.runtime.eventpump import EventPump

    settings, manifest = _applied(tmp_path, bpffs_root)
    pin = f"{bpffs_root}/execs/maps/exec_events"
    os.unlink(pin)
    forged = kernel.map_create(kernel.MAP_TYPES["ringbuf"], 0, 0, 4096)
    try:
        kernel.obj_pin(forged, pin)
    finally:
        os.close(forged)
    pump = EventPump(settings)
    try:
        pump.sync(manifest)
        assert pump.rings == []
        (why,) = pump.unread.values()
        assert "not the applied map id" in why, why
    finally:
        pump.close()
