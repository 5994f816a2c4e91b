"""cgroup programs through cgroup links on the real kernel, with real traffic and real syscalls
from a process the test moves into a child cgroup it made: cgroup_skb drops its packets and
nobody else's, connect4 refuses its connect, cgroup_sysctl its sysctl write, cgroup_device its
open of /dev/null; restarts keep the link; a removed cgroup is drift; the kill switch
detaches; a unit without systemd is one clear sentence."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from loaderd.bpf import cgroup, kernel
from loaderd.config.settings import load_settings
from loaderd.observe import drift
from loaderd.store.statedir import State
from tests.conftest import loaderd, make_conf, wait_until
from tests.kernel.test_pipeline import read_u64

pytestmark = pytest.mark.kernel

SPEC = """loaderd: 1
source:
  inline: |
    int {prog}({ctx} *ctx) {{
        u32 k = 0; u64 *v = {prog}_hits.lookup(&k);
        if (v) __sync_fetch_and_add(v, 1);
        {body}
    }}
maps:
  - {{name: {prog}_hits, type: array, key: u32, value: u64, max_entries: 1}}
programs:
  - {{name: {prog}, type: {ptype}, attach: {{cgroup: {{{where}, hook: {hook}}}}}}}
"""


def spec(ptype: str, hook: str, where: str, ctx: str, body: str = "return 0;") -> str:
    return SPEC.format(prog=f"{ptype}_{hook}", ptype=ptype, hook=hook, where=where, ctx=ctx,
                       body=body)


@pytest.fixture
def child_cgroup() -> Iterator[str]:
    """A cgroup below the cgroup2 mount made for the test (its path relative to the mount)."""
    name = f"ldtest_{uuid.uuid4().hex[:10]}"
    path = os.path.join(cgroup.cgroup2_mount(), name)
    os.mkdir(path)
    try:
        yield name
    finally:
        if os.path.isdir(path):
            os.rmdir(path)  # its processes have exited


def in_cgroup(rel: str | None, code: str) -> subprocess.CompletedProcess[str]:
    """Run Python `code` in a process that moved itself into cgroup `rel` (None: stays out)."""
    prefix = ""
    if rel is not None:
        procs = os.path.join(cgroup.cgroup2_mount(), rel, "cgroup.procs")
        prefix = f"open({procs!r}, 'w').write(str(__import__('os').getpid()))\n"
    return subprocess.run([sys.executable, "-c", prefix + code], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def errno_of(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout.strip()


TRY = """import errno
try:
{action}
    print("ok")
except OSError as e:
    print(errno.errorcode[e.errno])
"""


def attempt(rel: str | None, action: str) -> str:
    """'ok', or the errno name the action failed with, in cgroup `rel`."""
    body = "\n".join("    " + line for line in action.strip().splitlines())
    return errno_of(in_cgroup(rel, TRY.format(action=body)))


def link_of(pin: str) -> kernel.LinkInfo:
    fd = kernel.obj_get(pin)
    try:
        return kernel.link_info(fd)
    finally:
        os.close(fd)


def test_cgroup_skb_drops_only_the_cgroups_packets_and_survives_a_restart(
        tmp_path: Path, bpffs_root: str, child_cgroup: str) -> None:
    conf = make_conf(tmp_path, bpffs_root, {"skb": spec(
        "cgroup_skb", "egress", f"path: {child_cgroup}", "struct __sk_buff")})
    loaderd("--config", str(conf), "apply")
    link_pin = f"{bpffs_root}/skb/links/cgroup_skb_egress"
    hits = f"{bpffs_root}/skb/maps/cgroup_skb_egress_hits"
    first = link_of(link_pin)
    assert first.type == kernel.LINK_TYPE_CGROUP and first.attach_type == 1
    assert first.cgroup_id == os.stat(os.path.join(cgroup.cgroup2_mount(),
                                                   child_cgroup)).st_ino
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(0.3)
        send = (f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                f"for _ in range(3): s.sendto(b'x', ('127.0.0.1', {rx.getsockname()[1]}))")
        assert attempt(child_cgroup, send) == "EPERM"  # dropped on egress
        with pytest.raises(TimeoutError):
            rx.recv(8)
        assert attempt(None, send) == "ok"  # outside the cgroup: delivered
        assert rx.recv(8) == b"x"
    counted = read_u64(hits)
    assert counted >= 1  # the cgroup's packets only (the outside ones never ran it)

    out = loaderd("--config", str(conf), "apply")  # a restart adopts: same link, same count
    assert "compiles 0" in out.stdout
    assert link_of(link_pin).id == first.id
    assert attempt(child_cgroup, "import socket\nsocket.socket(socket.AF_INET, "
                   "socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9))") == "EPERM"
    assert read_u64(hits) > counted

    loaderd("--config", str(conf), "disable")  # the kill switch detaches
    assert attempt(child_cgroup, "import socket\nsocket.socket(socket.AF_INET, "
                   "socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9))") == "ok"


def test_connect4_refuses_a_connect_from_the_cgroup(tmp_path: Path, bpffs_root: str,
                                                     child_cgroup: str) -> None:
    conf = make_conf(tmp_path, bpffs_root, {"conn": spec(
        "cgroup_sock_addr", "connect4", f"path: {child_cgroup}", "struct bpf_sock_addr",
        "return ctx->user_port == bpf_htons(PORT) ? 0 : 1;")})
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        port = srv.getsockname()[1]
        text = (tmp_path / "specs" / "conn.yaml").read_text().replace("PORT", str(port))
        (tmp_path / "specs" / "conn.yaml").write_text(text)
        loaderd("--config", str(conf), "apply")
        dial = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5)"
        assert attempt(child_cgroup, dial) == "EPERM"
        assert attempt(None, dial) == "ok"
        # Another port from inside the cgroup is let through (the program decides per call).
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            other.listen(1)
            assert attempt(child_cgroup, f"import socket\nsocket.create_connection(("
                           f"'127.0.0.1', {other.getsockname()[1]}), timeout=5)") == "ok"
    assert read_u64(f"{bpffs_root}/conn/maps/cgroup_sock_addr_connect4_hits") >= 2
    loaderd("--config", str(conf), "disable")


SYSCTL = "/proc/sys/kernel/printk_ratelimit"  # written with the value it has: no change


def test_cgroup_sysctl_denies_a_write_and_allows_reads(tmp_path: Path, bpffs_root: str,
                                                       child_cgroup: str) -> None:
    conf = make_conf(tmp_path, bpffs_root, {"sysctl": spec(
        "cgroup_sysctl", "sysctl", f"path: {child_cgroup}", "struct bpf_sysctl",
        "return ctx->write ? 0 : 1;")})
    loaderd("--config", str(conf), "apply")
    value = Path(SYSCTL).read_text()
    write = (f"import os\nfd = os.open({SYSCTL!r}, os.O_WRONLY)\n"
             f"os.write(fd, {value.encode()!r})")
    assert attempt(child_cgroup, write) == "EPERM"
    assert attempt(child_cgroup, f"open({SYSCTL!r}).read()") == "ok"
    assert attempt(None, write) == "ok"
    assert Path(SYSCTL).read_text() == value
    loaderd("--config", str(conf), "disable")


def test_cgroup_device_denies_opening_a_device_node(tmp_path: Path, bpffs_root: str,
                                                    child_cgroup: str) -> None:
    # /dev/null is char 1:3; everything else stays allowed.
    conf = make_conf(tmp_path, bpffs_root, {"dev": spec(
        "cgroup_device", "device", f"path: {child_cgroup}", "struct bpf_cgroup_dev_ctx",
        "return (ctx->major == 1 && ctx->minor == 3) ? 0 : 1;")})
    loaderd("--config", str(conf), "apply")
    assert attempt(child_cgroup, "open('/dev/null', 'rb').close()") == "EPERM"
    assert attempt(child_cgroup, "open('/dev/zero', 'rb').close()") == "ok"
    assert attempt(None, "open('/dev/null', 'rb').close()") == "ok"
    loaderd("--config", str(conf), "disable")


def test_removed_cgroup_is_drift_and_kill_switch_detaches(tmp_path: Path, bpffs_root: str,
                                                          child_cgroup: str) -> None:
    conf = make_conf(tmp_path, bpffs_root, {"sock": spec(
        "cgroup_sock", "create", f"path: {child_cgroup}", "struct bpf_sock", "return 1;")})
    loaderd("--config", str(conf), "apply")
    record = State(load_settings(str(conf)).state_dir).manifest().specs["sock"]
    assert drift.differences(record, by_name=True) == []
    os.rmdir(os.path.join(cgroup.cgroup2_mount(), child_cgroup))
    # At once by name (or already detached, if the kernel was quick to release it).
    assert any(f"cgroup {child_cgroup} is gone" in d or "(the cgroup went away)" in d
               for d in drift.differences(record, by_name=True))
    # The kernel detaches the link once the removed cgroup is released (asynchronously).
    assert wait_until(lambda: any(
        f"detached from cgroup {child_cgroup} (the cgroup went away)" in d
        for d in drift.differences(record)), timeout=20), drift.differences(record)
    out = loaderd("--config", str(conf), "check", check=False)
    assert out.returncode != 0 and "no such cgroup" in out.stdout + out.stderr
    loaderd("--config", str(conf), "disable")


def test_unit_target_without_a_running_unit_is_one_clear_sentence(
        tmp_path: Path, bpffs_root: str) -> None:
    unit = f"ldtest-{uuid.uuid4().hex[:8]}.service"
    conf = make_conf(tmp_path, bpffs_root, {"unit": spec(
        "cgroup_skb", "ingress", f"unit: {unit}", "struct __sk_buff", "return 1;")})
    want = (f"unit {unit} is not running" if os.path.isdir(cgroup.SYSTEMD_RUNNING) else
            f"systemd is not running (no /run/systemd/system): unit {unit} cannot be "
            "resolved to its cgroup")
    for cmd in ("check", "apply"):
        out = loaderd("--config", str(conf), cmd, check=False)
        assert out.returncode != 0
        assert want in out.stdout + out.stderr
        assert "Traceback" not in out.stderr
        assert "programs[0].attach" in out.stdout + out.stderr


def test_policy_refuses_each_cgroup_type_when_not_allowed(tmp_path: Path, bpffs_root: str,
                                                          child_cgroup: str) -> None:
    specs = {
        "a": spec("cgroup_skb", "ingress", f"path: {child_cgroup}", "struct __sk_buff"),
        "b": spec("cgroup_sock", "create", f"path: {child_cgroup}", "struct bpf_sock"),
        "c": spec("cgroup_sock_addr", "bind4", f"path: {child_cgroup}",
                  "struct bpf_sock_addr"),
        "d": spec("cgroup_sysctl", "sysctl", f"path: {child_cgroup}", "struct bpf_sysctl"),
        "e": spec("cgroup_device", "device", f"path: {child_cgroup}",
                  "struct bpf_cgroup_dev_ctx")}
    conf = make_conf(tmp_path, bpffs_root, specs, "policy:\n  program_types: [tracepoint]\n")
    out = loaderd("--config", str(conf), "check", check=False)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    for name in specs:
        assert f"{name}.yaml:" in text
    assert text.count("program type not allowed by policy") >= len(specs)


def test_apply_without_cap_net_admin_is_refused(tmp_path: Path, bpffs_root: str,
                                                 child_cgroup: str) -> None:
    from tests.conftest import REPO
    conf = make_conf(tmp_path, bpffs_root, {"dev": spec(
        "cgroup_device", "device", f"path: {child_cgroup}", "struct bpf_cgroup_dev_ctx")})
    out = subprocess.run(["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin",
                          sys.executable, "-m", "loaderd", "--config", str(conf), "apply"],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode != 0
    assert "CAP_NET_ADMIN is missing: cgroup_device program 'cgroup_device_device'" \
        in out.stdout + out.stderr


@pytest.mark.parametrize("fault", ["after_attach", "mid_commit"])
def test_kill_9_mid_apply_leaves_all_old_or_all_new(tmp_path: Path, bpffs_root: str,
                                                    child_cgroup: str, fault: str) -> None:
    from loaderd.apply.applier import Applier
    from tests.kernel.test_lifecycle import _apply_with_fault

    def two(body: str) -> dict[str, str]:
        return {"a": spec("cgroup_skb", "ingress", f"path: {child_cgroup}", "struct __sk_buff",
                          body),
                "b": spec("cgroup_sock", "create", f"path: {child_cgroup}", "struct bpf_sock",
                          body)}

    conf = make_conf(tmp_path, bpffs_root, two("return 1;"))
    loaderd("--config", str(conf), "apply")
    pins = {"a": f"{bpffs_root}/a/links/cgroup_skb_ingress",
            "b": f"{bpffs_root}/b/links/cgroup_sock_create"}
    old = {n: link_of(p) for n, p in pins.items()}
    for n, text in two("return 1 + 0 * k;").items():
        (tmp_path / "specs" / f"{n}.yaml").write_text(text)
    out = _apply_with_fault(conf, dict(os.environ, LOADERD_FAULT=fault))
    assert out.returncode == -9, out.stderr[-2000:]
    Applier(load_settings(str(conf))).recover()
    now = {n: link_of(p) for n, p in pins.items()}
    assert {n: now[n].id for n in now} == {n: old[n].id for n in old}  # updated in place
    changed = {n for n in now if now[n].prog_id != old[n].prog_id}
    assert changed == ({"a", "b"} if fault == "mid_commit" else set())
    for entry in State(load_settings(str(conf)).state_dir).manifest().specs.values():
        assert drift.differences(entry, by_name=True) == []
    loaderd("--config", str(conf), "disable")


# Each program counts, records the mark an earlier program on the hook set, and may set one:
# the order the kernel runs them in shows in what each saw.
ORDERED = """loaderd: 1
source:
  inline: |
    int {prog}(struct __sk_buff *skb) {{
        u32 k = 0; u64 *v = {prog}_stats.lookup(&k);
        if (v) __sync_fetch_and_add(v, {step});
        k = 1; v = {prog}_stats.lookup(&k);
        if (v && skb->mark) *v = skb->mark;
        if ({mark}) skb->mark = {mark};
        return 1;
    }}
maps:
  - {{name: {prog}_stats, type: array, key: u32, value: u64, max_entries: 2}}
programs:
  - {{name: {prog}, type: cgroup_skb, attach: {{cgroup: {{path: {path}, hook: egress{order}}}}}}}
"""


def ordered(prog: str, path: str, *, mark: int = 0, step: int = 1, order: str = "") -> str:
    return ORDERED.format(prog=prog, path=path, mark=mark, step=step,
                          order=f", order: {order}" if order else "")


def egress_hook(rel: str) -> kernel.HookQuery:
    fd = cgroup.open_cgroup(os.path.join(cgroup.cgroup2_mount(), rel))
    try:
        return kernel.prog_query(fd, 1)  # BPF_CGROUP_INET_EGRESS, this cgroup's own programs
    finally:
        os.close(fd)


def test_programs_on_one_cgroup_hook_run_in_the_declared_order(
        tmp_path: Path, bpffs_root: str, child_cgroup: str) -> None:
    # b is written to run first and marks; a runs last and sees b's mark; c goes before a.
    specs = {"a": ordered("prog_a", child_cgroup, order="last"),
             "b": ordered("prog_b", child_cgroup, mark=7, order="first"),
             "c": ordered("prog_c", child_cgroup, order="{before: a/prog_a}")}
    conf = make_conf(tmp_path, bpffs_root, specs)
    loaderd("--config", str(conf), "apply")
    links = {n: link_of(f"{bpffs_root}/{n}/links/prog_{n}") for n in specs}
    hook = egress_hook(child_cgroup)
    assert hook.prog_ids == (links["b"].prog_id, links["c"].prog_id, links["a"].prog_id)
    record = State(load_settings(str(conf)).state_dir).manifest().specs["c"]
    assert record.links["prog_c"].target.text == \
        f"cgroup_skb:egress:path={child_cgroup},before=a/prog_a"
    send = "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', " \
        "('127.0.0.1', 9))"
    assert attempt(child_cgroup, send) == "ok"
    stats = {n: f"{bpffs_root}/{n}/maps/prog_{n}_stats" for n in specs}
    assert all(read_u64(stats[n]) >= 1 for n in specs)
    assert read_u64(stats["a"], 1) == 7  # b ran before a
    assert read_u64(stats["c"], 1) == 7  # and before c
    assert read_u64(stats["b"], 1) == 0  # nothing ran before b

    # An in-place change keeps the place in the order (the same link, a new program).
    (tmp_path / "specs" / "c.yaml").write_text(
        ordered("prog_c", child_cgroup, step=3, order="{before: a/prog_a}"))
    loaderd("--config", str(conf), "apply")
    again = egress_hook(child_cgroup)
    assert link_of(f"{bpffs_root}/c/links/prog_c").id == links["c"].id
    assert again.prog_ids[0] == hook.prog_ids[0] and again.prog_ids[2] == hook.prog_ids[2]
    assert again.prog_ids[1] != hook.prog_ids[1]

    # A changed order is a new link in the new place (made before the old one goes).
    (tmp_path / "specs" / "a.yaml").write_text(ordered("prog_a", child_cgroup, order="first"))
    loaderd("--config", str(conf), "apply")
    moved = link_of(f"{bpffs_root}/a/links/prog_a")
    assert moved.id != links["a"].id
    assert egress_hook(child_cgroup).prog_ids == (moved.prog_id, again.prog_ids[0],
                                                  again.prog_ids[1])
    loaderd("--config", str(conf), "disable")
    assert egress_hook(child_cgroup).prog_ids == ()


def test_cgroup_anchor_on_another_hook_is_refused_and_nothing_is_applied(
        tmp_path: Path, bpffs_root: str, child_cgroup: str) -> None:
    other = f"{child_cgroup}/inner"
    os.mkdir(os.path.join(cgroup.cgroup2_mount(), other))
    try:
        specs = {"a": ordered("prog_a", child_cgroup),
                 "c": ordered("prog_c", other, order="{after: a/prog_a}")}
        conf = make_conf(tmp_path, bpffs_root, specs)
        out = loaderd("--config", str(conf), "apply", check=False)
        assert out.returncode != 0
        assert f"order after: a/prog_a is not attached to cgroup {other} egress" \
            in out.stderr + out.stdout
        assert "Traceback" not in out.stderr
        assert egress_hook(child_cgroup).prog_ids == ()
        assert egress_hook(other).prog_ids == ()
    finally:
        os.rmdir(os.path.join(cgroup.cgroup2_mount(), other))

