"""uprobe/uretprobe on the real kernel: a gcc-built test binary's function counted by symbol
(the ELF offset computed by loaderd) and by offset, entry and return, every process or one
pid; the link survives a restart (same id, the count keeps growing); a replaced binary is
drift; an untrusted binary is refused in check and apply; the kill switch detaches."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from loaderd.bpf import kernel, uprobe
from loaderd.config.settings import load_settings
from loaderd.observe import drift
from loaderd.store.statedir import State
from tests.conftest import loaderd, make_conf, wait_until
from tests.kernel.test_pipeline import read_u64

pytestmark = pytest.mark.kernel

C_SOURCE = r"""
#include <stdlib.h>
__attribute__((noinline)) int ldtest_tick(int i) { __asm__ volatile(""); return i + 1; }
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1, s = 0;
    for (int i = 0; i < n; i++) s = ldtest_tick(s);
    return s == n ? 0 : 1;
}
"""

SPEC = """loaderd: 1
source:
  inline: |
    int on_tick(struct pt_regs *ctx) {{
        u32 k = 0; u64 *v = calls.lookup(&k);
        if (v) __sync_fetch_and_add(v, 1);
        return 0;
    }}
maps:
  - {{name: calls, type: array, key: u32, value: u64, max_entries: 1}}
programs:
  - {{name: on_tick, type: uprobe, attach: {{uprobe: {{binary: {binary}, {where}}}}}}}
"""


@pytest.fixture
def binary(tmp_path: Path) -> Path:
    """The test binary, root-owned 0755 in a root-owned 0755 directory."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the uprobe test binary (scripts/setup-host.sh)")
    d = tmp_path / "bin"
    d.mkdir(mode=0o755)
    src = d / "tick.c"
    src.write_text(C_SOURCE)
    out = d / "ldtick"
    subprocess.run(["gcc", "-O1", "-o", str(out), str(src)], check=True)
    os.chmod(out, 0o755)
    return out


def run(binary: Path, n: int) -> None:
    subprocess.run([str(binary), str(n)], check=True)


def nm_offset(binary: Path, symbol: str) -> int:
    """The symbol's file offset as binutils sees it (address - segment vaddr + offset)."""
    out = subprocess.run(["nm", str(binary)], check=True, capture_output=True, text=True)
    addr = next(int(line.split()[0], 16) for line in out.stdout.splitlines()
                if line.endswith(f" {symbol}"))
    hdrs = subprocess.run(["readelf", "-lW", str(binary)], check=True, capture_output=True,
                          text=True).stdout
    for line in hdrs.splitlines():
        f = line.split()
        if f and f[0] == "LOAD":
            off, vaddr, filesz = int(f[1], 16), int(f[2], 16), int(f[4], 16)
            if vaddr <= addr < vaddr + filesz:
                return addr - vaddr + off
    raise AssertionError("no segment")


def link_of(pin: str) -> kernel.LinkInfo:
    fd = kernel.obj_get(pin)
    try:
        return kernel.link_info(fd)
    finally:
        os.close(fd)


def test_symbol_offset_is_the_one_binutils_computes(binary: Path) -> None:
    assert uprobe.symbol_offset(str(binary), "ldtest_tick") == nm_offset(binary, "ldtest_tick")
    with pytest.raises(Exception, match="no function nosuch_fn"):
        uprobe.symbol_offset(str(binary), "nosuch_fn")


def test_uprobe_counts_calls_and_survives_a_restart(tmp_path: Path, bpffs_root: str,
                                                    binary: Path) -> None:
    conf = make_conf(tmp_path, bpffs_root, {"ticks": SPEC.format(
        binary=binary, where="symbol: ldtest_tick")})
    loaderd("--config", str(conf), "apply")
    calls = f"{bpffs_root}/ticks/maps/calls"
    link_pin = f"{bpffs_root}/ticks/links/on_tick"
    first = link_of(link_pin)
    assert first.perf_event_type == kernel.BPF_PERF_EVENT_UPROBE
    assert first.file == str(binary) and first.offset == nm_offset(binary, "ldtest_tick")
    run(binary, 25)
    assert read_u64(calls) == 25  # exactly its calls: nothing else runs this binary
    out = loaderd("--config", str(conf), "apply")
    assert "compiles 0" in out.stdout
    assert link_of(link_pin).id == first.id
    run(binary, 5)
    assert read_u64(calls) == 30
    status = loaderd("--config", str(conf), "status").stdout
    assert "on_tick" in status

    loaderd("--config", str(conf), "disable")
    run(binary, 5)  # detached: nothing counts (the map is gone with the pins, too)
    assert not os.path.exists(calls)


def test_uretprobe_by_offset_for_one_pid(tmp_path: Path, bpffs_root: str,
                                         binary: Path) -> None:
    # A process that waits on stdin before calling, so its pid is known before the calls.
    waiter = binary.parent / "ldwait.c"
    waiter.write_text(C_SOURCE.replace("int main(int argc, char **argv) {",
                                       "#include <unistd.h>\nint main(int argc, char **argv) {"
                                       " char c; if (read(0, &c, 1) != 1) return 2;"))
    wbin = binary.parent / "ldwait"
    subprocess.run(["gcc", "-O1", "-o", str(wbin), str(waiter)], check=True)
    os.chmod(wbin, 0o755)
    proc = subprocess.Popen([str(wbin), "7"], stdin=subprocess.PIPE)
    try:
        off = nm_offset(wbin, "ldtest_tick")
        conf = make_conf(tmp_path, bpffs_root, {"ret": SPEC.format(
            binary=wbin, where=f"offset: {off}, retprobe: true, pid: {proc.pid}")})
        loaderd("--config", str(conf), "apply")
        assert link_of(f"{bpffs_root}/ret/links/on_tick").perf_event_type == \
            kernel.BPF_PERF_EVENT_URETPROBE
        subprocess.run([str(wbin), "3"], input=b"x", check=True)  # another pid: not counted
        assert proc.stdin is not None
        proc.stdin.write(b"x")
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
        assert read_u64(f"{bpffs_root}/ret/maps/calls") == 7
    finally:
        proc.kill()
        proc.wait()
    loaderd("--config", str(conf), "disable")


def test_replaced_binary_is_drift(tmp_path: Path, bpffs_root: str, binary: Path) -> None:
    conf = make_conf(tmp_path, bpffs_root, {"ticks": SPEC.format(
        binary=binary, where="symbol: ldtest_tick")})
    loaderd("--config", str(conf), "apply")
    record = State(load_settings(str(conf)).state_dir).manifest().specs["ticks"]
    link = record.links["on_tick"]
    assert link.binary_ino == os.stat(binary).st_ino
    assert link.binary_sha256 == uprobe.identity(str(binary)).sha256
    assert drift.differences(record, by_name=True) == []
    new = binary.with_name("ldtick.new")
    shutil.copy2(binary, new)
    os.replace(new, binary)  # an upgrade: same path, new inode
    diffs = drift.differences(record)
    assert any(f"binary {binary} was replaced" in d for d in diffs), diffs
    out = loaderd("--config", str(conf), "apply")  # drift: rebuilt on the new file
    assert "built ticks;" in out.stdout
    run(binary, 4)
    assert read_u64(f"{bpffs_root}/ticks/maps/calls") == 4
    loaderd("--config", str(conf), "disable")


@pytest.mark.parametrize("problem", ["group_writable", "symlink", "not_root", "writable_dir",
                                     "truncated", "offset_past_end", "symlinked_dir",
                                     "foreign_symlink"])
def test_untrusted_binary_is_refused(tmp_path: Path, bpffs_root: str, binary: Path,
                                     problem: str) -> None:
    target, where = binary, "symbol: ldtest_tick"
    if problem == "group_writable":
        os.chmod(binary, 0o775)
        want = "is writable by group or others (mode 0775)"
    elif problem == "symlink":
        target = binary.with_name("link")
        target.symlink_to(binary)
        want = "is a symlink"
    elif problem == "symlinked_dir":  # another user's directory could re-point its symlink
        mine = tmp_path / "nobodys"
        mine.mkdir(mode=0o755)
        (mine / "d").symlink_to(binary.parent)  # root's symlink, in a directory of nobody's
        os.chown(mine, 65534, 65534)
        target = mine / "d" / binary.name
        want = f"directory {mine} is owned by uid 65534"
    elif problem == "foreign_symlink":  # a symlinked directory another user owns
        link = tmp_path / "d"
        link.symlink_to(binary.parent)
        os.lchown(link, 65534, 65534)
        target = link / binary.name
        want = f"symlink {link} is owned by uid 65534"
    elif problem == "writable_dir":  # another user could swap the binary in its directory
        os.chmod(binary.parent, 0o777)
        want = f"directory {binary.parent} is writable by group or others"
    elif problem == "truncated":  # headers that point past the end: no internal error
        data = binary.read_bytes()
        binary.write_bytes(data[:len(data) // 3])
        want = "is not a well-formed ELF file"
    elif problem == "offset_past_end":
        where = f"offset: {binary.stat().st_size + 4096}"
        want = f"is outside {binary}"
    else:
        os.chown(binary, 65534, 65534)
        want = "is owned by uid 65534"
    conf = make_conf(tmp_path, bpffs_root, {"ticks": SPEC.format(binary=target, where=where)})
    for cmd in ("check", "apply"):
        out = loaderd("--config", str(conf), cmd, check=False)
        assert out.returncode != 0
        assert want in out.stdout + out.stderr and "programs[0].attach" in out.stdout + out.stderr
        assert "internal error" not in out.stdout + out.stderr
    assert not os.path.exists(f"{bpffs_root}/ticks")
    assert not [p for p in os.listdir(bpffs_root) if p.startswith(".")], "staging left behind"


@pytest.mark.parametrize("fault", ["after_attach", "mid_commit"])
def test_kill_9_mid_apply_leaves_all_old_or_all_new(tmp_path: Path, bpffs_root: str,
                                                    binary: Path, fault: str) -> None:
    """Two specs on the binary, changed together (each call adds 2, not 1) and the apply
    killed: after the recovery exactly one link per spec is on the binary, both old or both
    new, and each adds its version's step; the next apply converges on the new."""
    from tests.kernel.test_lifecycle import killed_apply, links_of

    tag = os.urandom(3).hex()
    names = {s: f"up{tag}_{s}" for s in ("a", "b")}  # unique in the kernel: links_of

    def write(step: int) -> None:
        for s, prog in names.items():
            text = SPEC.format(binary=binary, where="symbol: ldtest_tick")
            (tmp_path / "specs" / f"{s}.yaml").write_text(
                text.replace("on_tick", prog).replace("(v, 1)", f"(v, {step})"))

    conf = make_conf(tmp_path, bpffs_root, {})
    write(1)
    loaderd("--config", str(conf), "apply")
    pins = {s: f"{bpffs_root}/{s}/links/{p}" for s, p in names.items()}
    old = {s: link_of(p).id for s, p in pins.items()}
    write(2)
    killed_apply(conf, bpffs_root, fault)
    now = {s: link_of(p).id for s, p in pins.items()}
    changed = {s for s in now if now[s] != old[s]}  # uprobe links are made anew, not updated
    assert changed == ({"a", "b"} if fault == "mid_commit" else set()), changed
    # The staged links of the killed apply went with their pins: one link per spec is left.
    assert wait_until(lambda: links_of(set(names.values())) == set(now.values()), timeout=30), \
        (links_of(set(names.values())), now)

    def steps() -> dict[str, int]:
        before = {s: read_u64(f"{bpffs_root}/{s}/maps/calls") for s in names}
        run(binary, 10)
        return {s: (read_u64(f"{bpffs_root}/{s}/maps/calls") - before[s]) // 10 for s in names}
    assert steps() == ({"a": 2, "b": 2} if fault == "mid_commit" else {"a": 1, "b": 1})

    loaderd("--config", str(conf), "apply")  # the next apply converges on the specs on disk
    assert steps() == {"a": 2, "b": 2}
    assert len(links_of(set(names.values()))) == 2
    loaderd("--config", str(conf), "disable")
