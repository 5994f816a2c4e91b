"""sk_lookup on the real kernel: a connection to a port nobody listens on is steered to a socket
the test put into the spec's sockmap; the link survives a restart (same id, the count keeps
growing); the kill switch detaches (the connection is refused again); a named namespace that
does not exist is refused in check and apply; a deleted one is drift."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from loaderd.bpf import kernel
from loaderd.config.settings import load_settings
from loaderd.observe import drift
from loaderd.store.statedir import State
from tests.conftest import loaderd, make_conf, wait_until
from tests.kernel.test_pipeline import read_u64

pytestmark = pytest.mark.kernel

SPEC = """loaderd: 1
source:
  inline: |
    int steer(struct bpf_sk_lookup *ctx) {{
        if (ctx->local_port != {port})
            return SK_PASS;
        u32 k = 0;
        struct bpf_sock *sk = (struct bpf_sock *)socks.lookup(&k);
        if (!sk)
            return SK_PASS;
        long err = bpf_sk_assign(ctx, sk, 0);
        bpf_sk_release(sk);
        u64 *n = steered.lookup(&k);
        if (n && !err) __sync_fetch_and_add(n, 1);
        return err ? SK_DROP : SK_PASS;
    }}
maps:
  - {{name: socks, type: sockmap, max_entries: 1}}
  - {{name: steered, type: array, key: u32, value: u64, max_entries: 1}}
programs:
  - {{name: steer, type: sk_lookup, attach: {{sk_lookup: {where}}}}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def link_of(pin: str) -> kernel.LinkInfo:
    fd = kernel.obj_get(pin)
    try:
        return kernel.link_info(fd)
    finally:
        os.close(fd)


def put_socket(pin: str, sock: socket.socket) -> None:
    fd = kernel.obj_get(pin)
    try:
        kernel.map_update(fd, (0).to_bytes(4, "little"), sock.fileno().to_bytes(8, "little"))
    finally:
        os.close(fd)


def dial(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))


def test_sk_lookup_steers_a_connection_to_the_chosen_socket(tmp_path: Path,
                                                            bpffs_root: str) -> None:
    port = free_port()
    conf = make_conf(tmp_path, bpffs_root, {"steer": SPEC.format(port=port, where="{}")})
    loaderd("--config", str(conf), "apply")
    link_pin = f"{bpffs_root}/steer/links/steer"
    first = link_of(link_pin)
    assert first.type == kernel.LINK_TYPE_NETNS and first.attach_type == 36
    assert first.netns_ino == os.stat("/proc/self/ns/net").st_ino
    assert dial(port) == "ECONNREFUSED"  # nothing in the sockmap yet: the kernel's lookup
    with socket.socket() as target:
        target.bind(("127.0.0.1", 0))  # another port: only the program sends anything here
        target.listen(8)
        target.settimeout(5)
        put_socket(f"{bpffs_root}/steer/maps/socks", target)
        assert dial(port) == "ok"
        conn, _ = target.accept()
        assert conn.getsockname()[1] == port  # the client connected to `port`, landed here
        conn.close()
        steered = f"{bpffs_root}/steer/maps/steered"
        assert read_u64(steered) == 1

        out = loaderd("--config", str(conf), "apply")  # restart: adopted, same link
        assert "compiles 0" in out.stdout
        assert link_of(link_pin).id == first.id
        assert dial(port) == "ok"
        target.accept()[0].close()
        assert read_u64(steered) == 2

        loaderd("--config", str(conf), "disable")
        assert dial(port) == "ECONNREFUSED"


def test_named_netns_missing_is_refused_and_deleted_is_drift(tmp_path: Path,
                                                             bpffs_root: str) -> None:
    name = f"ldsk{uuid.uuid4().hex[:8]}"
    conf = make_conf(tmp_path, bpffs_root, {"steer": SPEC.format(
        port=free_port(), where=f"{{netns: {name}}}")})
    for cmd in ("check", "apply"):
        out = loaderd("--config", str(conf), cmd, check=False)
        assert out.returncode != 0
        assert f"no network namespace {name} (/run/netns/{name}: No such file or directory)" \
            in out.stdout + out.stderr
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        loaderd("--config", str(conf), "apply")
        record = State(load_settings(str(conf)).state_dir).manifest().specs["steer"]
        assert drift.differences(record, by_name=True) == []
        ino = os.stat(f"/run/netns/{name}").st_ino
        assert link_of(f"{bpffs_root}/steer/links/steer").netns_ino == ino
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)
    # A netns link does not keep its namespace: the kernel detaches it (netns_ino 0).
    assert wait_until(lambda: any(
        f"detached from network namespace {name} (the namespace went away)" in d
        for d in drift.differences(record)), timeout=20), drift.differences(record)
    loaderd("--config", str(conf), "disable")
    assert wait_until(lambda: not os.path.exists(f"{bpffs_root}/steer"), timeout=5)


def test_policy_refuses_sk_lookup_and_sockmap_when_not_allowed(tmp_path: Path,
                                                               bpffs_root: str) -> None:
    conf = make_conf(tmp_path, bpffs_root, {"steer": SPEC.format(port=free_port(), where="{}")},
                     "policy:\n  program_types: [tracepoint]\n")
    out = loaderd("--config", str(conf), "check", check=False)
    assert out.returncode != 0
    assert "programs[0].type: program type not allowed by policy (got 'sk_lookup')" \
        in out.stdout + out.stderr
    (tmp_path / "loaderd.yaml").write_text((tmp_path / "loaderd.yaml").read_text().replace(
        "program_types: [tracepoint]", "map_types: [array]"))
    out = loaderd("--config", str(conf), "check", check=False)
    assert "maps[0].type: map type not allowed by policy (got 'sockmap')" \
        in out.stdout + out.stderr


@pytest.mark.parametrize("fault", ["after_attach", "mid_commit"])
def test_kill_9_mid_apply_leaves_all_old_or_all_new(tmp_path: Path, bpffs_root: str,
                                                    fault: str) -> None:
    """Two specs (one port each) changed together (a steered connection counts 2, not 1) and
    the apply killed: after the recovery both links are the ones made first (updated in place)
    and run both old or both new programs, and no other link of theirs is on the host's
    namespace; the next apply converges on the new."""
    from tests.kernel.test_lifecycle import killed_apply, links_of

    tag = os.urandom(3).hex()
    names = {s: f"sk{tag}_{s}" for s in ("a", "b")}  # unique in the kernel: links_of
    ports = {s: free_port() for s in names}

    def write(step: int) -> None:
        for s, prog in names.items():
            text = SPEC.format(port=ports[s], where="{}").replace("steer", prog)
            (tmp_path / "specs" / f"{s}.yaml").write_text(
                text.replace("(n, 1)", f"(n, {step})").replace(f"{prog}ed", "steered"))

    conf = make_conf(tmp_path, bpffs_root, {})
    write(1)
    loaderd("--config", str(conf), "apply")
    pins = {s: f"{bpffs_root}/{s}/links/{p}" for s, p in names.items()}
    old = {s: link_of(p) for s, p in pins.items()}
    write(2)
    killed_apply(conf, bpffs_root, fault)
    now = {s: link_of(p) for s, p in pins.items()}
    assert {s: i.id for s, i in now.items()} == {s: i.id for s, i in old.items()}
    changed = {s for s in names if now[s].prog_id != old[s].prog_id}
    assert changed == ({"a", "b"} if fault == "mid_commit" else set()), changed
    assert wait_until(lambda: links_of(set(names.values())) == {i.id for i in now.values()},
                      timeout=30)

    def steps() -> dict[str, int]:
        out = {}
        with socket.socket() as target:
            target.bind(("127.0.0.1", 0))
            target.listen(8)
            target.settimeout(5)
            for s in names:
                put_socket(f"{bpffs_root}/{s}/maps/socks", target)
                before = read_u64(f"{bpffs_root}/{s}/maps/steered")
                assert dial(ports[s]) == "ok"
                target.accept()[0].close()
                out[s] = read_u64(f"{bpffs_root}/{s}/maps/steered") - before
        return out
    assert steps() == ({"a": 2, "b": 2} if fault == "mid_commit" else {"a": 1, "b": 1})

    loaderd("--config", str(conf), "apply")  # the next apply converges on the specs on disk
    assert steps() == {"a": 2, "b": 2}
    loaderd("--config", str(conf), "disable")
    assert dial(ports["a"]) == "ECONNREFUSED"
