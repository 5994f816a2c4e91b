"""Precompiled CO-RE objects on the real kernel: the same exec tracer as BCC C and as an object
(built here with clang -target bpf); the object reads the right tgid, parent tgid and comm of a
process we spawn while the BCC build is refused (and, with the risk accepted, reads garbage);
a forbidden helper in a subprogram is refused before load; a restart adopts with 0 loads;
maps that do not match the spec are refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from loaderd.bpf import kernel, offsets
from tests.conftest import REPO, loaderd, make_conf

pytestmark = pytest.mark.kernel

OBJECTS = REPO / "configs" / "objects"
# BCC rewrites task->tgid into bpf_probe_read (the old helper): its twin needs that one too.
POLICY = ("policy: {helpers: {by_type: {tracepoint: [get_current_task, probe_read,"
          " probe_read_kernel, probe_read_kernel_str]}}}\n")
FORBIDDEN_C = """\
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

static __attribute__((noinline)) int punish(void)
{
	return bpf_send_signal(9);  /* in a subprogram (.text): still found */
}

SEC("tracepoint/sched/sched_process_exec")
int record_exec(void *ctx)
{
	return punish();
}

char LICENSE[] SEC("license") = "GPL";
"""
KFUNC_C = """\
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
extern void bpf_rcu_read_lock(void) __ksym;
extern void bpf_rcu_read_unlock(void) __ksym;
SEC("tracepoint/sched/sched_process_exec")
int record_exec(void *ctx) { bpf_rcu_read_lock(); bpf_rcu_read_unlock(); return 0; }
char LICENSE[] SEC("license") = "GPL";
"""
KSYM_C = """\
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} leak SEC(".maps");
extern const void commit_creds __ksym;
SEC("socket")
int f(struct __sk_buff *skb)
{
	__u32 k = 0;
	__u64 v = (__u64)&commit_creds;  /* a kernel text address, into a map */
	bpf_map_update_elem(&leak, &k, &v, 0);
	return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""
# Renamed after the build (evil_ -> good_, symbol table and BTF alike): two programs and two maps
# with one name each. Measured before the refusal: libbpf loaded both programs (the xdp one
# reached the verifier, never checked) and created both maps (the 117 MB hash the program uses).
TWINS_C = """\
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, char[4096]);
	__uint(max_entries, 30000);
} evil_map SEC(".maps");
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} good_map SEC(".maps");
SEC("xdp")
int evil_prog(struct xdp_md *c) { return *(int *)((char *)c + 1000); }
SEC("socket")
int good_prog(struct __sk_buff *skb)
{
	__u32 k = 0;
	char *v = bpf_map_lookup_elem(&evil_map, &k);
	if (v)
		v[0] = 1;
	return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""
UNCHECKED_C = """\
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} hits SEC(".maps");
SEC("tracepoint/sched/sched_process_exec")
int record_exec(void *ctx)
{
	__u32 k = 0;
	__u64 *v = bpf_map_lookup_elem(&hits, &k);
	*v += 1;  /* no NULL check: the verifier refuses it */
	return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""
BCC_TWIN = """loaderd: 1
description: the same exec tracer as configs/objects/execsnoop.bpf.c, in BCC C
source:
  inline: |
    #include <linux/sched.h>
    int record_exec(void *ctx)
    {
        struct task_struct *task = (struct task_struct *)bpf_get_current_task();
        struct { u32 tgid; u32 ppid; char comm[16]; } info = {};
        u32 key = bpf_get_current_pid_tgid() >> 32;
        info.tgid = task->tgid;
        info.ppid = task->real_parent->tgid;
        bpf_probe_read_kernel_str(&info.comm, sizeof(info.comm), task->comm);
        execs.update(&key, &info);
        return 0;
    }
maps:
  - {name: execs, type: hash, key: u32, value: {bytes: 24}, max_entries: 4096}
programs:
  - name: record_exec
    type: tracepoint
    attach: {tracepoint: "sched:sched_process_exec"}
"""


def _cannot_build() -> str | None:
    for tool in ("clang", "bpftool", "llvm-strip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: clang llvm bpftool libbpf-dev)"
    if not os.path.exists("/usr/include/bpf/bpf_helpers.h"):
        return "libbpf's headers are not installed (Debian: libbpf-dev)"
    targets = subprocess.run(["clang", "-print-targets"], capture_output=True, text=True)
    if " bpf " not in targets.stdout and "bpf" not in targets.stdout.split():
        return "this clang cannot target bpf"
    return None


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """configs/objects built by its own script, plus the forbidden-helper object."""
    why = _cannot_build()
    if why:
        pytest.skip(f"cannot build BPF objects here: {why}")
    out = tmp_path_factory.mktemp("objs")
    sources = {"forbidden": FORBIDDEN_C, "kfunc": KFUNC_C, "ksym": KSYM_C, "twins": TWINS_C,
               "unchecked": UNCHECKED_C}
    for name, text in sources.items():
        (out / f"{name}.bpf.c").write_text(text)
    subprocess.run([str(OBJECTS / "build.sh"), str(out), str(OBJECTS / "execsnoop.bpf.c"),
                    *(str(out / f"{n}.bpf.c") for n in sources)], check=True,
                   capture_output=True)
    yield out


def add_object(conf: Path, built: Path, name: str, obj: str = "execsnoop.bpf.o",
               yaml: str | None = None) -> Path:
    specs = conf.parent / "specs"
    shutil.copy(built / obj, specs / obj)
    os.chmod(specs / obj, 0o644)
    text = yaml or (OBJECTS / "execsnoop.yaml").read_text()
    (specs / f"{name}.yaml").write_text(text.replace("execsnoop.bpf.o", obj))
    return specs / obj


def exec_info(pin: str, pid: int) -> tuple[int, int, str] | None:
    fd = kernel.obj_get(pin, rdonly=True)
    try:
        raw = kernel.map_lookup(fd, pid.to_bytes(4, "little"), 24)
    finally:
        os.close(fd)
    if raw is None:
        return None
    tgid, ppid, comm = struct.unpack("<II16s", raw)
    return tgid, ppid, comm.split(b"\0")[0].decode("ascii", "replace")


def spawn_sleep() -> int:
    child = subprocess.Popen(["/bin/sleep", "0.01"])
    child.wait()
    return child.pid


def events(stderr: str) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(ln) for ln in stderr.splitlines() if ln.startswith("{")]


def test_object_reads_the_truth_where_bcc_is_refused(tmp_path: Path, bpffs_root: str,
                                                     built: Path) -> None:
    conf = make_conf(tmp_path, bpffs_root, {"bcc_twin": BCC_TWIN}, POLICY)
    add_object(conf, built, "execsnoop")
    check = loaderd("--config", str(conf), "check", check=False)
    assert "ok: execsnoop/record_exec: verifier accepted 'record_exec'" in check.stdout
    build, _ = offsets.headers_dirs()
    if offsets.headers_version(build) != offsets.release():  # this machine: 6.1 on 6.18
        assert check.returncode == 1
        assert "bcc_twin.yaml" in check.stderr and "task_struct.tgid at " in check.stderr
        # The same tracer side by side, the risk accepted: the object is right, BCC is not.
        conf.write_text(conf.read_text() + "accept_header_mismatch: true\n")
    loaderd("--config", str(conf), "apply")
    pid = spawn_sleep()
    obj = exec_info(f"{bpffs_root}/execsnoop/maps/execs", pid)
    assert obj == (pid, os.getpid(), "sleep")
    bcc = exec_info(f"{bpffs_root}/bcc_twin/maps/execs", pid)
    assert bcc is not None
    if offsets.headers_version(build) != offsets.release():
        assert bcc[0] != pid and bcc[2] != "sleep", bcc  # struct reads at the 6.1 offsets
    else:
        assert bcc == obj
    loaderd("--config", str(conf), "disable")


def test_restart_adopts_the_object_with_zero_loads(tmp_path: Path, bpffs_root: str,
                                                   built: Path) -> None:
    conf = make_conf(tmp_path, bpffs_root, {}, POLICY)
    obj = add_object(conf, built, "execsnoop")
    first = loaderd("--config", str(conf), "apply")
    assert "built execsnoop;" in first.stdout
    record = json.loads((tmp_path / "state" / "manifest.json").read_text())["specs"]["execsnoop"]
    assert record["object_sha256"] == hashlib.sha256(obj.read_bytes()).hexdigest()
    prog_id = record["programs"]["record_exec"]["id"]
    again = loaderd("--config", str(conf), "apply")
    assert "adopted execsnoop;" in again.stdout and "compiles 0" in again.stdout
    assert not [e for e in events(again.stderr) if e["event"] == "prog_loaded"]
    after = json.loads((tmp_path / "state" / "manifest.json").read_text())["specs"]["execsnoop"]
    assert after["programs"]["record_exec"]["id"] == prog_id
    assert after["object_sha256"] == record["object_sha256"]  # kept across the adopt
    pid = spawn_sleep()  # still attached and right after the "restart"
    assert exec_info(f"{bpffs_root}/execsnoop/maps/execs", pid) == (pid, os.getpid(), "sleep")
    # drift: an unpinned program is rebuilt from the object
    os.unlink(f"{bpffs_root}/execsnoop/progs/record_exec")
    status = loaderd("--config", str(conf), "status", check=False)
    assert "execsnoop: DRIFT" in status.stdout
    rebuilt = loaderd("--config", str(conf), "apply")
    assert "built execsnoop;" in rebuilt.stdout
    loaderd("--config", str(conf), "disable")
    assert not os.path.exists(f"{bpffs_root}/execsnoop")


def test_a_forbidden_helper_in_a_subprogram_is_refused_before_load(
        tmp_path: Path, bpffs_root: str, built: Path) -> None:
    conf = make_conf(tmp_path, bpffs_root, {}, POLICY)
    yaml = """loaderd: 1
source: {object: forbidden.bpf.o}
programs:
  - name: record_exec
    type: tracepoint
    attach: {tracepoint: "sched:sched_process_exec"}
"""
    add_object(conf, built, "forbidden", "forbidden.bpf.o", yaml)
    out = loaderd("--config", str(conf), "apply", check=False)
    assert out.returncode == 1
    assert "forbidden.yaml" in out.stderr and "send_signal" in out.stderr, out.stderr
    said = events(out.stderr)
    assert not [e for e in said if e["event"] == "prog_loaded"]  # the kernel never saw it
    assert not os.path.exists(f"{bpffs_root}/forbidden")


def test_maps_that_do_not_match_the_spec_are_refused(tmp_path: Path, bpffs_root: str,
                                                     built: Path) -> None:
    conf = make_conf(tmp_path, bpffs_root, {}, POLICY)
    text = (OBJECTS / "execsnoop.yaml").read_text().replace("{bytes: 24}", "{bytes: 16}")
    add_object(conf, built, "execsnoop", yaml=text)
    out = loaderd("--config", str(conf), "check", check=False)
    assert out.returncode == 1
    assert "map 'execs' in the object does not match its declaration" in out.stderr
    assert "execsnoop.yaml:" in out.stderr
    text = (OBJECTS / "execsnoop.yaml").read_text().replace("name: execs", "name: other")
    add_object(conf, built, "execsnoop", yaml=text)
    out = loaderd("--config", str(conf), "check", check=False)
    assert "the object defines map 'execs' that the spec does not declare" in out.stderr


def test_kfuncs_by_policy_and_the_verifiers_reason(tmp_path: Path, bpffs_root: str,
                                                  built: Path) -> None:
    conf = make_conf(tmp_path, bpffs_root, {}, POLICY)
    prog = ('programs:\n  - {name: record_exec, type: tracepoint, '
            'attach: {tracepoint: "sched:sched_process_exec"}}\n')
    add_object(conf, built, "kf", "kfunc.bpf.o",
               f"loaderd: 1\nsource: {{object: kfunc.bpf.o}}\n{prog}")
    add_object(conf, built, "unchecked", "unchecked.bpf.o",
               "loaderd: 1\nsource: {object: unchecked.bpf.o}\nmaps:\n  - {name: hits, type: "
               f"hash, key: u32, value: u64, max_entries: 1}}\n{prog}")
    out = loaderd("--config", str(conf), "check", check=False)
    assert out.returncode == 1
    assert "kf.yaml:4: programs[0]: program 'record_exec' (tracepoint) makes 2 kfunc call(s)" \
        in out.stderr
    assert "unchecked.yaml:2: source.object: kernel refused the object: R0 invalid mem " \
        "access 'map_value_or_null'" in out.stderr
    assert "0xffff" not in out.stderr  # kernel addresses redacted from the verifier log


LEAK_MAP = "maps:\n  - {name: leak, type: array, key: u32, value: u64, max_entries: 1}\n"
SOCKET_PROG = "programs:\n  - {name: f, type: socket_filter, attach: none}\n"


def _btf_id(kind: str, name: str) -> int:
    dump = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"],
                          capture_output=True, text=True, check=True).stdout
    for line in dump.splitlines():
        if line.startswith("[") and f"] {kind} '{name}' " in line:
            return int(line[1:line.index("]")])
    raise AssertionError(f"no {kind} {name} in the kernel BTF")


def test_kernel_symbol_addresses_are_refused_before_load(tmp_path: Path, bpffs_root: str,
                                                        built: Path) -> None:
    """A program that only calls map_update_elem may still not take a kernel symbol's address
    (ld_imm64 BPF_PSEUDO_BTF_ID, which the verifier accepts for root): neither from an object's
    `__ksym` extern nor from BCC C (bpf_pseudo_fd, or raw `.byte`s: measured, both loaded)."""
    conf = make_conf(tmp_path, bpffs_root, {}, "")
    add_object(conf, built, "ksym", "ksym.bpf.o",
               f"loaderd: 1\nsource: {{object: ksym.bpf.o}}\n{LEAK_MAP}{SOCKET_PROG}")
    # BCC's own intrinsic emits any ld_imm64 kind: no asm needed (the text check refuses asm)
    leak = f"bpf_pseudo_fd(3, {_btf_id('FUNC', 'commit_creds')})"
    body = f"int f(struct __sk_buff *skb) {{ u32 k = 0; u64 v = {leak}; leak.update(&k, &v); " \
        "return 0; }"
    (conf.parent / "specs" / "bytes.yaml").write_text(
        f"loaderd: 1\nsource:\n  inline: |\n    {body}\n{LEAK_MAP}{SOCKET_PROG}")
    out = loaderd("--config", str(conf), "check", check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "ksym.yaml:6: programs[0]: cannot decode the instructions of 'f': section socket: " \
        "insn 2 loads the address of extern symbol 'commit_creds'" in out.stderr, out.stderr
    assert "bytes.yaml:8: programs[0]: cannot decode bytecode of 'f': insn 2 loads the address" \
        " of a kernel symbol (ld_imm64 BPF_PSEUDO_BTF_ID)" in out.stderr, out.stderr
    assert "verifier accepted" not in out.stdout


def test_two_programs_or_maps_of_one_name_are_refused(tmp_path: Path, bpffs_root: str,
                                                      built: Path) -> None:
    conf = make_conf(tmp_path, bpffs_root, {}, "")
    data = (built / "twins.bpf.o").read_bytes()
    spec = ("loaderd: 1\nsource: {object: NAME.bpf.o}\nmaps:\n  - {name: good_map, type: array,"
            " key: u32, value: u64, max_entries: 1}\nprograms:\n  - {name: good_prog, type: "
            "socket_filter, attach: none}\n")
    for name, old in (("progs", b"evil_prog\0"), ("maps", b"evil_map\0")):
        (built / f"{name}.bpf.o").write_bytes(data.replace(old, old.replace(b"evil", b"good")))
        add_object(conf, built, name, f"{name}.bpf.o", spec.replace("NAME", name))
    out = loaderd("--config", str(conf), "check", check=False)
    assert out.returncode == 1
    assert "progs.yaml:2: source.object: the object has more than one program named " \
        "'good_prog' (sections xdp, socket): program names must be unique" in out.stderr, \
        out.stderr
    assert "maps.yaml:2: source.object: the object defines more than one map named " \
        "'good_map': map names must be unique" in out.stderr, out.stderr
    assert "verifier" not in out.stderr and "handed back" not in out.stderr
