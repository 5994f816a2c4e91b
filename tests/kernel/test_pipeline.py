"""The whole pipeline on the real kernel, through the real CLI: the shipped examples load, pin,
attach and work; bad programs are refused with the reason; the daemon drops every capability."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from loaderd.bpf import kernel
from loaderd.observe import drift as verify
from loaderd.store.statedir import State
from tests.conftest import REPO, loaderd, no_staging_leftovers, wait_until, write_settings

pytestmark = pytest.mark.kernel


def bpftool(*args: str) -> object:
    out = subprocess.run(["bpftool", "-j", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def read_u64(pin: str, key: int = 0) -> int:
    fd = kernel.obj_get(pin, rdonly=True)
    try:
        info = kernel.map_info(fd)
        size = info.value_size
        if info.type == 6:  # percpu array: sum the per-CPU slots
            size = (size + 7) // 8 * 8 * kernel.possible_cpus()
        raw = kernel.map_lookup(fd, key.to_bytes(4, "little"), size)
    finally:
        os.close(fd)
    assert raw is not None
    return sum(int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8))


def test_examples_load_pin_and_bpftool_finds_them(config: Path, bpffs_root: str) -> None:
    out = loaderd("--config", str(config), "apply")
    assert "compiles 5" in out.stdout
    expected = {
        "exec_events": (["on_exec"], ["execs"], "tracepoint"),
        "exec_counter": (["count_exec"], ["exec_count"], "tracepoint"),
        "xdp_counter": (["xdp_count"], ["xdp_stats"], "xdp"),
        "udp_filter": (["drop_long"], ["filter_config", "filter_stats"], "socket_filter"),
        "sched_switches": (["count_switch"], ["switches"], "raw_tracepoint"),
    }
    for spec, (progs, maps, ptype) in expected.items():
        for p in progs:
            info = bpftool("prog", "show", "pinned", f"{bpffs_root}/{spec}/progs/{p}")
            assert info["name"] == p[:15] and info["type"] == ptype  # type: ignore[index]
        for m in maps:
            info = bpftool("map", "show", "pinned", f"{bpffs_root}/{spec}/maps/{m}")
            assert info["name"] == m[:15]  # type: ignore[index]
    links = {p for p in os.listdir(f"{bpffs_root}/exec_counter/links")}
    assert links == {"count_exec"}
    assert no_staging_leftovers(bpffs_root)


def test_tracepoint_counter_counts_and_survives_the_loader(config: Path, bpffs_root: str) -> None:
    loaderd("--config", str(config), "apply")  # the loader process has exited
    pin = f"{bpffs_root}/exec_counter/maps/exec_count"
    before = read_u64(pin)
    for _ in range(5):
        subprocess.run(["/bin/true"], check=True)
    assert read_u64(pin) >= before + 5
    assert read_u64(f"{bpffs_root}/sched_switches/maps/switches") > 0


@contextlib.contextmanager
def veth_pair() -> Iterator[tuple[str, str]]:
    """A private veth pair (host end, peer end), both up, no addresses: frames written to the
    peer with a raw socket arrive on the host end, where XDP sees them. No netns, no routing."""
    tag = uuid.uuid4().hex[:6]
    host, peer = f"ldx{tag}", f"ldy{tag}"
    subprocess.run(["ip", "link", "add", host, "type", "veth", "peer", "name", peer],
                   check=True)
    try:
        for dev in (host, peer):
            subprocess.run(["ip", "link", "set", dev, "up"], check=True)
        yield host, peer
    finally:
        subprocess.run(["ip", "link", "del", host], capture_output=True)


def send_frames(dev: str, count: int, payload: int) -> None:
    """Broadcast Ethernet frames of a local-experimental ethertype (0x88b5) out of `dev`."""
    frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + b"x" * payload
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((dev, 0))
        for _ in range(count):
            s.send(frame)


def test_xdp_program_sees_packets_on_a_test_interface(tmp_path: Path, bpffs_root: str,
                                                     specs_dir: Path) -> None:
    for other in ("exec_counter", "udp_filter", "sched_switches"):
        for f in specs_dir.glob(f"{other}*"):
            f.unlink()
    with veth_pair() as (host, peer):
        spec = specs_dir / "xdp_counter.yaml"
        spec.write_text(re.sub(r"interface: \w+", f"interface: {host}", spec.read_text()))
        conf = write_settings(tmp_path, bpffs_root, specs_dir)
        loaderd("--config", str(conf), "apply")
        link = bpftool("link", "show", "pinned", f"{bpffs_root}/xdp_counter/links/xdp_count")
        assert link["type"] == "xdp"  # type: ignore[index]
        pin = f"{bpffs_root}/xdp_counter/maps/xdp_stats"
        before, before_bytes = read_u64(pin, 0), read_u64(pin, 1)
        send_frames(peer, 5, 64)
        assert wait_until(lambda: read_u64(pin, 0) >= before + 5)
        assert read_u64(pin, 1) >= before_bytes + 5 * (14 + 64)  # bytes


SO_ATTACH_BPF = 50


def test_socket_filter_with_frozen_config_map(config: Path, bpffs_root: str) -> None:
    loaderd("--config", str(config), "apply")
    cfg = f"{bpffs_root}/udp_filter/maps/filter_config"
    # Frozen: the kernel refuses any userspace update, even from root.
    fd = kernel.obj_get(cfg)
    try:
        assert kernel.map_is_frozen(fd)
        with pytest.raises(kernel.KernelError) as err:
            kernel.map_update(fd, (0).to_bytes(4, "little"), (4096).to_bytes(4, "little"))
        assert err.value.errno == 1  # EPERM
    finally:
        os.close(fd)
    assert bpftool("map", "show", "pinned", cfg)["frozen"] == 1  # type: ignore[index]
    # The filter, attached by a consumer to its own socket, drops datagrams > 128 bytes.
    prog = kernel.obj_get(f"{bpffs_root}/udp_filter/progs/drop_long")
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, prog)
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(0.5)
        tx.sendto(b"x" * 400, rx.getsockname())
        tx.sendto(b"y" * 20, rx.getsockname())
        assert rx.recv(1000) == b"y" * 20  # the long one never arrived
        with pytest.raises(TimeoutError):
            rx.recv(1000)
    finally:
        rx.close()
        tx.close()
        os.close(prog)
    assert read_u64(f"{bpffs_root}/udp_filter/maps/filter_stats", 1) >= 1


def only_spec(specs_dir: Path, name: str, body: str) -> None:
    for f in specs_dir.iterdir():
        f.unlink()
    (specs_dir / f"{name}.yaml").write_text(body)


BAD_WRITE = """loaderd: 1
source:
  inline: |
    int writer(void *ctx) { u32 k = 0; u64 *v = cfg.lookup(&k); if (v) *v = 1; return 0; }
maps:
  - {name: cfg, type: array, key: u32, value: u64, max_entries: 1, flags: [RDONLY_PROG]}
programs:
  - {name: writer, type: tracepoint, attach: {tracepoint: "sched:sched_process_exec"}}
"""


def test_rdonly_prog_map_write_is_refused_by_the_verifier(tmp_path: Path, bpffs_root: str,
                                                         specs_dir: Path) -> None:
    only_spec(specs_dir, "writer", BAD_WRITE)
    conf = write_settings(tmp_path, bpffs_root, specs_dir)
    out = loaderd("--config", str(conf), "apply", check=False)
    assert out.returncode == 1
    assert "writer.yaml" in out.stderr and "programs[0]" in out.stderr
    assert "write into map forbidden" in out.stderr
    assert "0xffff" not in out.stderr  # no kernel addresses shown to users
    assert not os.path.exists(f"{bpffs_root}/writer")


ACCESS = """loaderd: 1
source:
  inline: |
    int reader(void *ctx) { u32 k = 0; u64 *a = shown.lookup(&k); u64 *b = fed.lookup(&k);
        if (a && b) __sync_fetch_and_add(a, *b); return 0; }
maps:
  - {name: shown, type: array, key: u32, value: u64, max_entries: 1, flags: [RDONLY]}
  - {name: fed, type: array, key: u32, value: u64, max_entries: 1, flags: [WRONLY, RDONLY_PROG],
     initial: [{key: 0, value: 1}]}
programs:
  - {name: reader, type: tracepoint, attach: {tracepoint: "sched:sched_process_exec"}}
"""

OPENER = """
import sys
from loaderd.bpf import kernel
for path, how in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        kernel.obj_get(path, rdonly=how == "r", wronly=how == "w")
        print(path.rsplit("/", 1)[1], how, "ok")
    except kernel.KernelError as exc:
        print(path.rsplit("/", 1)[1], how, exc.errno)
"""


def test_rdonly_and_wronly_maps_are_enforced_on_their_pins(
        tmp_path: Path, bpffs_root: str, specs_dir: Path, shared_code: str) -> None:
    """RDONLY/WRONLY bind to the creating fd only (the kernel keeps neither in map_flags), so
    loaderd makes them hold for pins: the pin loses its write (RDONLY) or read (WRONLY) bits
    and the kernel checks BPF_OBJ_GET's open flags against them."""
    only_spec(specs_dir, "access", ACCESS)
    conf = write_settings(tmp_path, bpffs_root, specs_dir, 'pins: {mode: "0660"}\n')
    loaderd("--config", str(conf), "apply")
    maps = f"{bpffs_root}/access/maps"
    assert stat.S_IMODE(os.stat(f"{maps}/shown").st_mode) == 0o440
    assert stat.S_IMODE(os.stat(f"{maps}/fed").st_mode) == 0o220
    subprocess.run(["/bin/true"], check=True)
    assert read_u64(f"{maps}/shown") >= 1  # fed's initial value reached the program
    # As an unprivileged user of the pins' group (root's DAC override would hide it all).
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=0", "--clear-groups", "--inh-caps=-all",
         "--bounding-set=-all", sys.executable, "-c", OPENER,
         f"{maps}/shown", "r", f"{maps}/shown", "rw", f"{maps}/fed", "w", f"{maps}/fed", "r"],
        capture_output=True, text=True, env={"PYTHONPATH": shared_code}, cwd="/", check=True)
    assert out.stdout.split("\n")[:4] == ["shown r ok", f"shown rw {errno.EACCES}",
                                          "fed w ok", f"fed r {errno.EACCES}"], out
    manifest = State(str(tmp_path / "state")).manifest()
    assert verify.differences(manifest.specs["access"]) == []
    again = loaderd("--config", str(conf), "apply")  # adopted, modes kept as they are
    assert "compiles 0" in again.stdout
    assert stat.S_IMODE(os.stat(f"{maps}/fed").st_mode) == 0o220
    # Compliance knows these modes and flags are the intended ones.
    from tests.kernel.test_ctl import compliance
    _, results = compliance(conf)
    for check in ("pins have the configured mode and group",
                  "maps have limits and their declared flags"):
        assert results[check]["status"] == "PASS", results[check]


@pytest.mark.parametrize("helper,call", [
    ("probe_write_user", "bpf_probe_write_user((void *)0x1000, &k, sizeof(k));"),
    ("send_signal", "bpf_send_signal(9);"),
    ("trace_printk", 'bpf_trace_printk("x\\n");'),
])
def test_forbidden_helper_refused_before_any_load(tmp_path: Path, bpffs_root: str,
                                                 specs_dir: Path, helper: str, call: str) -> None:
    body = f"""loaderd: 1
source:
  inline: |
    int evil(void *ctx) {{ u32 k = 0; {call} return 0; }}
programs:
  - {{name: evil, type: tracepoint, attach: {{tracepoint: "sched:sched_process_exec"}}}}
"""
    only_spec(specs_dir, "evil", body)
    conf = write_settings(tmp_path, bpffs_root, specs_dir)
    before = set(kernel.prog_ids())
    out = loaderd("--config", str(conf), "apply", check=False)
    after = set(kernel.prog_ids())
    assert out.returncode == 1
    assert helper in out.stderr and "evil.yaml" in out.stderr
    # Decided from bytecode before the kernel saw it: no program named evil was ever loaded.
    new = after - before
    names = set()
    for pid in new:
        with contextlib.suppress(kernel.KernelError):
            fd = kernel.prog_fd_by_id(pid)
            names.add(kernel.prog_info(fd).name)
            os.close(fd)
    assert "evil" not in names
    assert not os.path.exists(f"{bpffs_root}/evil")


PEEK = """loaderd: 1
source:
  inline: |
    int peek(void *ctx)
    {
        u64 v = 0;
        bpf_probe_read_kernel(&v, sizeof(v), ctx);
        u32 k = 0;
        u64 *slot = seen.lookup(&k);
        if (slot)
            *slot = v;
        return 0;
    }
maps:
  - {name: seen, type: array, key: u32, value: u64, max_entries: 1}
programs:
  - {name: peek, type: tracepoint, attach: {tracepoint: "sched:sched_process_exec"}}
"""


def test_kernel_memory_read_is_off_by_default_and_allowed_per_type(
        tmp_path: Path, bpffs_root: str, specs_dir: Path) -> None:
    """bpf_probe_read_kernel (arbitrary kernel memory) is not a tracepoint default: refused from
    the bytecode, naming file, program, helper and the setting; allowed for its type by
    policy.helpers.by_type.tracepoint, and then loaded, attached and recorded."""
    only_spec(specs_dir, "peek", PEEK)
    conf = write_settings(tmp_path, bpffs_root, specs_dir)
    out = loaderd("--config", str(conf), "apply", check=False)
    assert out.returncode == 1
    assert "peek.yaml" in out.stderr and "program 'peek' (tracepoint)" in out.stderr
    assert "probe_read_kernel: reads arbitrary kernel memory" in out.stderr
    assert "policy.helpers.by_type.tracepoint" in out.stderr
    assert not os.path.exists(f"{bpffs_root}/peek")
    # Allowed for another type only: still refused for a tracepoint.
    conf = write_settings(tmp_path, bpffs_root, specs_dir, "policy:\n  helpers:\n    by_type:"
                          "\n      raw_tracepoint: [probe_read_kernel]\n")
    assert loaderd("--config", str(conf), "apply", check=False).returncode == 1
    conf = write_settings(tmp_path, bpffs_root, specs_dir, "policy:\n  helpers:\n    by_type:"
                          "\n      tracepoint: [probe_read_kernel]\n")
    loaderd("--config", str(conf), "apply")
    entry = State(str(tmp_path / "state")).manifest().specs["peek"]
    assert "probe_read_kernel" in entry.programs["peek"].helpers
    assert os.path.exists(f"{bpffs_root}/peek/links/peek")
    subprocess.run(["/bin/true"], check=True)  # an exec: the attached program runs
    assert verify.differences(entry) == []


def test_verifier_rejection_carries_the_reason(tmp_path: Path, bpffs_root: str,
                                              specs_dir: Path) -> None:
    body = """loaderd: 1
source:
  inline: |
    int oob(struct xdp_md *ctx) {
        unsigned char *data = (void *)(long)ctx->data;
        return data[100] == 1 ? XDP_DROP : XDP_PASS;   /* no bounds check */
    }
programs:
  - {name: oob, type: xdp, attach: {xdp: {interface: lo, mode: skb}}}  # never attached
"""
    only_spec(specs_dir, "oob", body)
    conf = write_settings(tmp_path, bpffs_root, specs_dir)
    out = loaderd("--config", str(conf), "apply", check=False)
    assert out.returncode == 1
    assert "invalid access to packet" in out.stderr
    # the headline is located at the program's entry (line 9), as every other refusal is
    assert "oob.yaml:9: programs[0]: kernel refused program 'oob'" in out.stderr, out.stderr


def test_daemon_drops_every_capability_and_programs_stay_attached(
        config: Path, bpffs_root: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([os.sys.executable, "-m", "loaderd", "--config", str(config),  # type: ignore[attr-defined]
                             "run", "--drift-interval", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        status = ""
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            status = Path(f"/proc/{proc.pid}/status").read_text()
            if "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status:
                break
            time.sleep(0.2)
        for field in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"):
            assert f"{field}:\t0000000000000000" in status, status
        assert "NoNewPrivs:\t1" in status
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libbcc" not in maps and "libLLVM" not in maps and "libclang" not in maps
        pin = f"{bpffs_root}/exec_counter/maps/exec_count"
        before = read_u64(pin)
        subprocess.run(["/bin/true"], check=True)
        assert read_u64(pin) > before
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    # Stopping never detaches: still pinned, still counting.
    before = read_u64(pin)
    subprocess.run(["/bin/true"], check=True)
    assert read_u64(pin) > before


def test_missing_capability_is_refused_before_anything_is_compiled(config: Path,
                                                                   bpffs_root: str) -> None:
    # Root without CAP_PERFMON in its bounding set: execve leaves it out of every set.
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run(["setpriv", "--bounding-set=-perfmon", "--inh-caps=-perfmon",
                          os.sys.executable, "-m", "loaderd", "--config", str(config),  # type: ignore[attr-defined]
                          "apply"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1
    assert "CAP_PERFMON is missing" in out.stderr and "exec_counter.yaml" in out.stderr
    assert not os.path.exists(f"{bpffs_root}/exec_counter")


def test_check_by_a_non_root_author_validates_their_own_files(shared_code: str) -> None:
    """A spec author (no root, files their own, group-writable) gets schema/policy verdicts
    from `loaderd check --no-kernel`; ownership is the daemon's verdict, and it says so."""
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="ldauthor-"))
    try:
        (work / "specs").mkdir()
        for f in (REPO / "configs" / "programs.d").iterdir():
            (work / "specs" / f.name).write_bytes(f.read_bytes())
        (work / "specs" / "broken.yaml").write_text("loaderd: 1\nprograms: []\nmaps: {}\n")
        (work / "loaderd.yaml").write_text(f"loaderd: 1\nprograms_dir: {work}/specs\n")
        for p in [work, *work.rglob("*")]:
            os.chown(p, 65534, 65534)
            os.chmod(p, 0o775 if p.is_dir() else 0o664)
        out = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
             "-m", "loaderd", "--config", str(work / "loaderd.yaml"), "check", "--no-kernel"],
            capture_output=True, text=True, env={"PYTHONPATH": shared_code}, cwd="/")
        assert out.returncode == 1, out
        assert "not root: file ownership and modes are not checked" in out.stdout
        assert re.search(r"^5 specs, [1-9]\d* errors$", out.stdout, re.M), out.stdout
        # Verdicts, located; the examples themselves pass.
        assert f"{work}/specs/broken.yaml:3:1: maps: expected a list" in out.stderr, out.stderr
        assert all("broken.yaml" in ln for ln in out.stderr.splitlines()), out.stderr
        assert "owned by uid" not in out.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)
