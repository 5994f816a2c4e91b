"""perf_event programs on the real kernel: a software event (cpu-clock) sampled on every online
CPU at a frequency, one perf event and pinned link per CPU; every CPU's count grows; a restart
adopts every link (same ids, counts keep growing); a period works as well as a frequency; the
kill switch detaches all of them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from loaderd.bpf import kernel
from loaderd.config.settings import load_settings
from loaderd.observe import drift
from loaderd.store.statedir import State
from tests.conftest import loaderd, make_conf, wait_until

pytestmark = pytest.mark.kernel

SPEC = """loaderd: 1
source:
  inline: |
    int on_sample(struct bpf_perf_event_data *ctx) {{
        u32 cpu = bpf_get_smp_processor_id();
        u64 *v = samples.lookup(&cpu);
        if (v) __sync_fetch_and_add(v, 1);
        return 0;
    }}
maps:
  - {{name: samples, type: array, key: u32, value: u64, max_entries: 64}}
programs:
  - {{name: on_sample, type: perf_event, attach: {{perf_event: {{event: cpu-clock, {rate}}}}}}}
"""


def per_cpu(pin: str, cpus: list[int]) -> dict[int, int]:
    fd = kernel.obj_get(pin, rdonly=True)
    try:
        out = {}
        for c in cpus:
            raw = kernel.map_lookup(fd, c.to_bytes(4, "little"), 8)
            assert raw is not None
            out[c] = int.from_bytes(raw, "little")
        return out
    finally:
        os.close(fd)


def link_ids(links_dir: str) -> dict[str, int]:
    out = {}
    for name in sorted(os.listdir(links_dir)):
        fd = kernel.obj_get(os.path.join(links_dir, name))
        try:
            out[name] = kernel.link_info(fd).id
        finally:
            os.close(fd)
    return out


@pytest.mark.parametrize("rate", ["frequency: 200", "period: 2000000"])
def test_samples_on_every_cpu_and_survive_a_restart(tmp_path: Path, bpffs_root: str,
                                                    rate: str) -> None:
    cpus = kernel.online_cpus()
    conf = make_conf(tmp_path, bpffs_root, {"prof": SPEC.format(rate=rate)})
    loaderd("--config", str(conf), "apply")
    links_dir = f"{bpffs_root}/prof/links"
    ids = link_ids(links_dir)
    assert set(ids) == {f"on_sample__cpu{c}" for c in cpus}  # one link per online CPU
    pin = f"{bpffs_root}/prof/maps/samples"
    time.sleep(1.0)
    first = per_cpu(pin, cpus)
    assert all(first[c] > 0 for c in cpus), first  # sampled on every CPU

    record = State(load_settings(str(conf)).state_dir).manifest().specs["prof"]
    assert set(record.links) == set(ids)
    assert drift.differences(record, by_name=True) == []

    out = loaderd("--config", str(conf), "apply")
    assert "compiles 0" in out.stdout
    assert link_ids(links_dir) == ids  # adopted: the same links
    time.sleep(0.5)
    later = per_cpu(pin, cpus)
    assert all(later[c] > first[c] for c in cpus), (first, later)

    loaderd("--config", str(conf), "disable")
    assert not os.path.exists(links_dir)


def test_a_missing_cpu_link_is_drift(tmp_path: Path, bpffs_root: str) -> None:
    conf = make_conf(tmp_path, bpffs_root, {"prof": SPEC.format(rate="frequency: 50")})
    loaderd("--config", str(conf), "apply")
    cpu = kernel.online_cpus()[-1]
    os.unlink(f"{bpffs_root}/prof/links/on_sample__cpu{cpu}")
    record = State(load_settings(str(conf)).state_dir).manifest().specs["prof"]
    diffs = drift.differences(record)
    assert any(f"on_sample__cpu{cpu}" in d and "(program on_sample is detached)" in d
               for d in diffs), diffs
    out = loaderd("--config", str(conf), "apply")  # drift: rebuilt, every CPU linked again
    assert "built prof;" in out.stdout
    assert os.path.exists(f"{bpffs_root}/prof/links/on_sample__cpu{cpu}")
    loaderd("--config", str(conf), "disable")


def test_a_frequency_above_the_kernels_max_is_refused_by_check(tmp_path: Path,
                                                               bpffs_root: str) -> None:
    """check says what perf_event_open would refuse (EINVAL) and names the sysctl."""
    top = kernel.max_sample_rate()
    assert top is not None
    conf = make_conf(tmp_path, bpffs_root, {"samples": SPEC.format(rate=f"frequency: {top + 1}")})
    for cmd in ("check", "apply"):
        out = loaderd("--config", str(conf), cmd, check=False)
        text = out.stdout + out.stderr
        assert out.returncode != 0 and "perf_event_max_sample_rate" in text, text
        assert "programs[0]." in text and "loaded" not in text, text  # before a compile
    assert not os.path.exists(f"{bpffs_root}/samples")


VERSIONED = """loaderd: 1
source:
  inline: |
    int {prog}(struct bpf_perf_event_data *ctx) {{
        u32 cpu = bpf_get_smp_processor_id();
        u64 *v = seen.lookup(&cpu);
        if (v) *v = {version};
        return 0;
    }}
maps:
  - {{name: seen, type: array, key: u32, value: u64, max_entries: 64}}
programs:
  - {{name: {prog}, type: perf_event, attach: {{perf_event: {{event: cpu-clock, frequency: 200}}}}}}
"""


def versions_running(pin: str, cpus: list[int]) -> dict[int, int]:
    """Clear the map, let the programs sample (every CPU at least once: a loaded machine may
    take a while), and read which version wrote each CPU's slot."""
    fd = kernel.obj_get(pin)
    try:
        for c in cpus:
            kernel.map_update(fd, c.to_bytes(4, "little"), bytes(8))
    finally:
        os.close(fd)
    wait_until(lambda: all(per_cpu(pin, cpus).values()), timeout=20)
    return per_cpu(pin, cpus)


@pytest.mark.parametrize("fault", ["after_attach", "mid_commit"])
def test_kill_9_mid_apply_leaves_all_old_or_all_new(tmp_path: Path, bpffs_root: str,
                                                    fault: str) -> None:
    """Two specs changed together (version 1 -> 2) and the apply killed: after the recovery
    every CPU's link of both specs is old or every one new (never both running), and the
    next apply converges on the new."""
    from tests.kernel.test_lifecycle import killed_apply, links_of

    cpus = kernel.online_cpus()
    tag = os.urandom(3).hex()
    names = {s: f"pe{tag}_{s}" for s in ("a", "b")}  # unique in the kernel: links_of

    def write(version: int) -> None:
        for s, prog in names.items():
            (tmp_path / "specs" / f"{s}.yaml").write_text(
                VERSIONED.format(prog=prog, version=version))

    conf = make_conf(tmp_path, bpffs_root, {})
    write(1)
    loaderd("--config", str(conf), "apply")
    old = {s: link_ids(f"{bpffs_root}/{s}/links") for s in names}
    write(2)
    killed_apply(conf, bpffs_root, fault)
    now = {s: link_ids(f"{bpffs_root}/{s}/links") for s in names}
    for s in names:
        assert set(now[s]) == {f"{names[s]}__cpu{c}" for c in cpus}
    changed = {s for s in names if set(now[s].values()) != set(old[s].values())}
    assert changed == ({"a", "b"} if fault == "mid_commit" else set()), changed
    assert all(not set(now[s].values()) & set(old[s].values()) for s in changed)
    live = {i for s in names for i in now[s].values()}
    assert wait_until(lambda: links_of(set(names.values())) == live, timeout=30), \
        (links_of(set(names.values())), live)
    want = 2 if fault == "mid_commit" else 1
    for s in names:
        assert versions_running(f"{bpffs_root}/{s}/maps/seen", cpus) == {c: want for c in cpus}

    loaderd("--config", str(conf), "apply")  # the next apply converges on the specs on disk
    for s in names:
        assert versions_running(f"{bpffs_root}/{s}/maps/seen", cpus) == {c: 2 for c in cpus}
    assert len(links_of(set(names.values()))) == 2 * len(cpus)
    loaderd("--config", str(conf), "disable")
