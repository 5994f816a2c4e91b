"""tc programs through tcx links on the real kernel, with real packets: UDP from a private
network namespace over a veth pair made by the test, counted and dropped on the host end;
two specs on one hook run in the declared order; a change swaps the program in place; the
link survives a restart (same id, the counter keeps growing); drift of a vanished
interface; the kill switch detaches."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from loaderd.bpf import kernel
from loaderd.config.settings import load_settings
from loaderd.observe import drift
from loaderd.store.statedir import State
from tests.conftest import loaderd, make_conf
from tests.kernel.test_pipeline import bpftool, read_u64

pytestmark = pytest.mark.kernel

# TCX_NEXT (-1) hands the packet to the next program on the hook; TCX_DROP (2) drops it.
COUNT = """loaderd: 1
source:
  inline: |
    int {prog}(struct __sk_buff *skb) {{
        u32 k = 0; u64 *v = {map}.lookup(&k);
        if (v) __sync_fetch_and_add(v, {step});
        k = 1; v = {map}.lookup(&k);
        if (v && skb->mark) *v = skb->mark;  // the mark an earlier program set
        if ({mark}) skb->mark = {mark};  // b marks what a and c see after it
        return {verdict};
    }}
maps:
  - {{name: {map}, type: array, key: u32, value: u64, max_entries: 2}}
programs:
  - {{name: {prog}, type: tc, attach: {{tc: {{interface: {iface}, direction: ingress{order}}}}}}}
"""


def spec(prog: str, iface: str, *, step: int = 1, mark: int = 0, drop: bool = False,
         order: str = "") -> str:
    return COUNT.format(prog=prog, map=f"{prog}_stats", iface=iface, step=step, mark=mark,
                        verdict=2 if drop else -1, order=f", order: {order}" if order else "")


@dataclass(frozen=True)
class Pair:
    host: str  # the host end: where the programs attach
    netns: str  # the peer lives here
    host_ip: str
    peer_ip: str


@pytest.fixture
def pair() -> Iterator[Pair]:
    tag = uuid.uuid4().hex[:8]
    host, ns = f"ltc{tag}", f"ldtc{tag}"
    octet = int(tag[:2], 16) % 250 + 2
    host_ip, peer_ip = f"10.213.{octet}.1", f"10.213.{octet}.2"
    run = ["ip", "netns", "exec", ns, "ip"]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "link", "add", host, "type", "veth", "peer", "name", host + "p",
                        "netns", ns], check=True)
        subprocess.run(["ip", "addr", "add", f"{host_ip}/30", "dev", host], check=True)
        subprocess.run(["ip", "link", "set", host, "up"], check=True)
        subprocess.run([*run, "addr", "add", f"{peer_ip}/30", "dev", host + "p"], check=True)
        subprocess.run([*run, "link", "set", host + "p", "up"], check=True)
        subprocess.run([*run, "link", "set", "lo", "up"], check=True)
        yield Pair(host, ns, host_ip, peer_ip)
    finally:
        subprocess.run(["ip", "link", "del", host], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def send_udp(p: Pair, n: int = 5) -> int:
    """Send `n` datagrams from the netns to the host end; how many a host socket got."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind((p.host_ip, 0))
        rx.settimeout(0.5)
        port = rx.getsockname()[1]
        code = (f"import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                f"for _ in range({n}):\n s.sendto(b'x',('{p.host_ip}',{port})); "
                "time.sleep(0.01)")
        subprocess.run(["ip", "netns", "exec", p.netns, "python3", "-c", code], check=True,
                       timeout=30)
        got = 0
        try:
            while got < n:
                rx.recv(16)
                got += 1
        except TimeoutError:
            pass
        return got


def link_of(pin: str) -> kernel.LinkInfo:
    fd = kernel.obj_get(pin)
    try:
        return kernel.link_info(fd)
    finally:
        os.close(fd)


def test_tcx_counts_and_drops_and_survives_a_restart(tmp_path: Path, bpffs_root: str,
                                                      pair: Pair) -> None:
    conf = make_conf(tmp_path, bpffs_root, {"counter": spec("tc_count", pair.host)})
    loaderd("--config", str(conf), "apply")
    stats = f"{bpffs_root}/counter/maps/tc_count_stats"
    link_pin = f"{bpffs_root}/counter/links/tc_count"
    before = link_of(link_pin)
    assert before.type_name == "tcx" and before.ifindex == kernel.ifindex(pair.host)
    assert before.attach_type == kernel.ATTACH_TCX_INGRESS
    assert send_udp(pair) == 5  # TCX_NEXT: counted, delivered
    counted = read_u64(stats)
    assert counted >= 5
    shown = bpftool("link", "show", "pinned", link_pin)  # Debian 12's bpftool: type 11 = tcx
    assert (shown["id"], shown["prog_id"]) == (before.id, before.prog_id)  # type: ignore[index]

    out = loaderd("--config", str(conf), "apply")  # a restart: adopted, nothing recompiled
    assert "compiles 0" in out.stdout
    assert link_of(link_pin).id == before.id
    assert send_udp(pair) == 5
    assert read_u64(stats) >= counted + 5

    # A change swaps the program behind the same link; dropping now loses every datagram.
    (tmp_path / "specs" / "counter.yaml").write_text(spec("tc_count", pair.host, drop=True))
    loaderd("--config", str(conf), "apply")
    after = link_of(link_pin)
    assert after.id == before.id and after.prog_id != before.prog_id
    assert send_udp(pair) == 0

    loaderd("--config", str(conf), "disable")  # the kill switch detaches: traffic flows
    assert kernel.prog_query(kernel.ifindex(pair.host), kernel.ATTACH_TCX_INGRESS).prog_ids == ()
    assert send_udp(pair) == 5


def test_two_specs_on_one_hook_run_in_the_declared_order(tmp_path: Path, bpffs_root: str,
                                                         pair: Pair) -> None:
    # b is written to run first and marks; a runs after it and sees b's mark; c goes before a.
    specs = {"a": spec("prog_a", pair.host, mark=0, order="last"),
             "b": spec("prog_b", pair.host, mark=7, order="first"),
             "c": spec("prog_c", pair.host, mark=0, order="{before: a/prog_a}")}
    conf = make_conf(tmp_path, bpffs_root, specs)
    loaderd("--config", str(conf), "apply")
    ids = {n: link_of(f"{bpffs_root}/{n}/links/prog_{n}").id for n in specs}
    hook = kernel.prog_query(kernel.ifindex(pair.host), kernel.ATTACH_TCX_INGRESS)
    assert hook.link_ids == (ids["b"], ids["c"], ids["a"])
    assert send_udp(pair) == 5
    assert read_u64(f"{bpffs_root}/a/maps/prog_a_stats", 1) == 7  # b ran before a
    assert read_u64(f"{bpffs_root}/c/maps/prog_c_stats", 1) == 7  # and before c
    assert read_u64(f"{bpffs_root}/b/maps/prog_b_stats", 1) == 0  # nothing ran before b

    # An in-place change keeps the place in the order.
    (tmp_path / "specs" / "c.yaml").write_text(
        spec("prog_c", pair.host, step=3, order="{before: a/prog_a}"))
    loaderd("--config", str(conf), "apply")
    again = kernel.prog_query(kernel.ifindex(pair.host), kernel.ATTACH_TCX_INGRESS)
    assert again.link_ids == hook.link_ids and again.prog_ids != hook.prog_ids
    loaderd("--config", str(conf), "disable")


def test_anchor_on_another_hook_is_refused_and_nothing_is_applied(
        tmp_path: Path, bpffs_root: str, pair: Pair) -> None:
    specs = {"a": spec("prog_a", pair.host), "c": spec("prog_c", "lo", order="{after: a/prog_a}")}
    conf = make_conf(tmp_path, bpffs_root, specs)
    out = loaderd("--config", str(conf), "apply", check=False)
    assert out.returncode != 0
    assert "order after: a/prog_a is not attached to lo ingress" in out.stderr + out.stdout
    assert kernel.prog_query(kernel.ifindex(pair.host), kernel.ATTACH_TCX_INGRESS).prog_ids == ()


def test_vanished_interface_is_drift(tmp_path: Path, bpffs_root: str, pair: Pair) -> None:
    conf = make_conf(tmp_path, bpffs_root, {"counter": spec("tc_count", pair.host)})
    loaderd("--config", str(conf), "apply")
    subprocess.run(["ip", "link", "del", pair.host], check=True)
    record = State(load_settings(str(conf)).state_dir).manifest().specs["counter"]
    diffs = drift.differences(record)
    assert any(f"detached from {pair.host} (the interface went away)" in d for d in diffs), diffs
    loaderd("--config", str(conf), "disable")


@pytest.mark.parametrize("fault", ["after_attach", "mid_commit"])
def test_kill_9_mid_apply_leaves_the_old_or_the_new_program_on_the_hook(
        tmp_path: Path, bpffs_root: str, pair: Pair, fault: str) -> None:
    from loaderd.apply.applier import Applier
    from tests.kernel.test_lifecycle import _apply_with_fault

    specs = {"a": spec("prog_a", pair.host), "b": spec("prog_b", pair.host, order="first")}
    conf = make_conf(tmp_path, bpffs_root, specs)
    loaderd("--config", str(conf), "apply")
    ifx = kernel.ifindex(pair.host)
    old = kernel.prog_query(ifx, kernel.ATTACH_TCX_INGRESS)
    for n, s in (("a", spec("prog_a", pair.host, step=2)),
                 ("b", spec("prog_b", pair.host, step=2, order="first"))):
        (tmp_path / "specs" / f"{n}.yaml").write_text(s)
    out = _apply_with_fault(conf, dict(os.environ, LOADERD_FAULT=fault))
    assert out.returncode == -9, out.stderr[-2000:]
    Applier(load_settings(str(conf))).recover()
    now = kernel.prog_query(ifx, kernel.ATTACH_TCX_INGRESS)
    assert now.link_ids == old.link_ids  # the same two links, in the same order
    changed = {i for i, (p, q) in enumerate(zip(now.prog_ids, old.prog_ids, strict=True))
               if p != q}
    assert changed == ({0, 1} if fault == "mid_commit" else set())  # all new or all old
    manifest = State(load_settings(str(conf)).state_dir).manifest()
    for entry in manifest.specs.values():
        assert drift.differences(entry) == []
    loaderd("--config", str(conf), "disable")


def test_policy_refuses_tc_when_not_allowed(tmp_path: Path, bpffs_root: str,
                                            pair: Pair) -> None:
    conf = make_conf(tmp_path, bpffs_root, {"counter": spec("tc_count", pair.host)},
                     "policy:\n  program_types: [xdp, tracepoint]\n")
    for cmd in ("check", "apply"):
        out = loaderd("--config", str(conf), cmd, check=False)
        assert out.returncode != 0
        assert "program type not allowed by policy" in out.stdout + out.stderr
        assert "programs[0].type" in out.stdout + out.stderr
    assert kernel.prog_query(kernel.ifindex(pair.host), kernel.ATTACH_TCX_INGRESS).prog_ids == ()


def test_apply_without_cap_net_admin_is_refused_before_anything_loads(
        tmp_path: Path, bpffs_root: str, pair: Pair) -> None:
    import sys

    from tests.conftest import REPO
    conf = make_conf(tmp_path, bpffs_root, {"counter": spec("tc_count", pair.host)})
    out = subprocess.run(["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin",
                          sys.executable, "-m", "loaderd", "--config", str(conf), "apply"],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode != 0
    assert "CAP_NET_ADMIN is missing: tc program 'tc_count' needs CAP_BPF, CAP_NET_ADMIN" \
        in out.stdout + out.stderr
    assert kernel.prog_query(kernel.ifindex(pair.host), kernel.ATTACH_TCX_INGRESS).prog_ids == ()
