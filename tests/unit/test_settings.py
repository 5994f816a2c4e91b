"""Daemon settings: defaults, the documented example, and what is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loaderd.config.settings import load_settings
from loaderd.errors import Kind, LoaderdError
from loaderd.model import (
    Limits,
    MapFlag,
    MapType,
    PinOwnership,
    Policy,
    ProgType,
    Settings,
)

EXAMPLE = """\
loaderd: 1
programs_dir: /etc/loaderd/programs.d
bpffs_root: /sys/fs/bpf/loaderd
state_dir: /var/lib/loaderd
config_owner: root              # config and source files must be owned by this user
pins: {mode: "0640", group: loaderd-readers}
policy:
  program_types: [tracepoint, raw_tracepoint, xdp, socket_filter]
  map_types: [array, hash, percpu_array, percpu_hash, lru_hash, ringbuf]
  map_flags: [NO_PREALLOC, RDONLY, WRONLY, RDONLY_PROG, WRONLY_PROG]
  helpers:
    allow: [map_lookup_elem, map_update_elem, trace_printk]
    by_type: {xdp: [xdp_adjust_head]}
  calls: {bpf_to_bpf: true, kfunc: false}
  limits: {max_programs: 64, max_maps: 64, max_entries: 65536,
           max_map_memory: 67108864, max_event_rate: 1000}
"""


def write(tmp_path: Path, text: str, mode: int = 0o644) -> str:
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "loaderd.yaml"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def refused(path: str, **kw: int | None) -> LoaderdError:
    with pytest.raises(LoaderdError) as info:
        load_settings(path, **kw)
    assert info.value.location.file == path
    return info.value


def test_no_file_means_defaults() -> None:
    assert load_settings(None) == Settings()


def test_documented_example(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    s = load_settings(path, owner_uid=None)
    assert s.path == path and s.config_owner_uid == 0
    assert s.pins == PinOwnership(0o640, "loaderd-readers")
    assert s.policy == Policy(
        program_types=frozenset({ProgType.TRACEPOINT, ProgType.RAW_TRACEPOINT, ProgType.XDP,
                                 ProgType.SOCKET_FILTER}),
        map_types=frozenset(MapType) - {MapType.LRU_PERCPU_HASH, MapType.PERF_EVENT_ARRAY,
                                        MapType.SOCKMAP},
        map_flags=frozenset(MapFlag),
        helpers=frozenset({"map_lookup_elem", "map_update_elem", "trace_printk"}),
        helpers_by_type={ProgType.XDP: frozenset({"xdp_adjust_head"})},
        allow_calls=True, allow_kfuncs=False,
        limits=Limits(max_programs=64, max_maps=64, max_entries=65536,
                      max_map_memory=67108864, max_event_rate=1000))


def test_minimal_file_keeps_defaults(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "loaderd: 1\n"), owner_uid=None)
    assert s.policy.helpers is None  # each type's defaults (model.PROG_KINDS)
    assert (s.programs_dir, s.pins) == (Settings().programs_dir, PinOwnership())


def test_helpers_allow_replaces_the_default(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "loaderd: 1\npolicy: {helpers: {allow: []}}\n"),
                      owner_uid=None)
    assert s.policy.helpers == frozenset()


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    err = refused(str(tmp_path / "nope.yaml"), owner_uid=None)
    assert err.kind is Kind.TRUST


def test_file_must_be_root_owned(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    path = write(tmp_path, "loaderd: 1\n")
    os.chown(path, 4242, -1)
    assert refused(path).kind is Kind.TRUST
    assert load_settings(path, owner_uid=None).path == path


def test_hard_linked_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "loaderd: 1\n")
    os.link(path, tmp_path / "other-name.yaml")
    for owner in (0, None):
        err = refused(path, owner_uid=owner)
        assert err.kind is Kind.TRUST and "2 hard links" in err.message


def test_group_writable_file_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs a root-owned file")
    assert "writable" in refused(write(tmp_path, "loaderd: 1\n", mode=0o664)).message


@pytest.mark.parametrize("text, kind, field", [
    ("", Kind.SCHEMA, None),
    ("loaderd: 1\nprograms_dir: relative\n", Kind.SCHEMA, "programs_dir"),
    ("loaderd: 1\npins: {mode: 0640}\n", Kind.YAML, "pins.mode"),
    ("loaderd: 1\npins: {mode: 0o640}\n", Kind.SEMANTIC, "pins.mode"),
    ("loaderd: 1.0\n", Kind.SCHEMA, "loaderd"),
    ("loaderd: '1'\n", Kind.SCHEMA, "loaderd"),
    ("loaderd: 1\npins: {mode: '0602'}\n", Kind.SEMANTIC, "pins.mode"),
    ("loaderd: 1\nconfig_owner: no_such_user_xyz\n", Kind.SEMANTIC, "config_owner"),
    ("loaderd: 1\npolicy: {helpers: {by_type: {xdp: [sys_bpf]}}}\n", Kind.SEMANTIC,
     "policy.helpers.by_type.xdp[0]"),
    ("loaderd: 1\npolicy: {helpers: {allow: [bpf_map_lookup_elem]}}\n", Kind.SEMANTIC,
     "policy.helpers.allow[0]"),
    ("loaderd: 1\npolicy: {calls: {kfuncs: true}}\n", Kind.SCHEMA, "policy.calls.kfuncs"),
    ("loaderd: 1\nstate_dir: /var/lib/../tmp\n", Kind.SEMANTIC, "state_dir"),
    ("loaderd: 1\nloaderd: 1\n", Kind.YAML, "loaderd"),
])
def test_refused(tmp_path: Path, text: str, kind: Kind, field: str | None) -> None:
    err = refused(write(tmp_path, text), owner_uid=None)
    assert (err.kind, err.location.field) == (kind, field)


def test_dangerous_helper_allowed_in_allow_may_be_repeated_by_type(tmp_path: Path) -> None:
    text = "loaderd: 1\npolicy: {helpers: {allow: [sys_bpf], by_type: {xdp: [sys_bpf]}}}\n"
    s = load_settings(write(tmp_path, text), owner_uid=None)
    assert "sys_bpf" in s.policy.helpers_for(ProgType.XDP)


def test_unknown_pins_group_is_a_located_error_when_pins_are_made(tmp_path: Path) -> None:
    """Resolved late (check may run before sysusers.d made the group), but never a KeyError:
    the error names the settings file, line and field."""
    path = write(tmp_path, "loaderd: 1\npins:\n  mode: \"0640\"\n  group: no-such-group-x\n")
    s = load_settings(path, owner_uid=None)
    with pytest.raises(LoaderdError) as info:
        _ = s.pins.gid
    err = info.value
    assert (err.location.file, err.location.line, err.location.field) == (path, 4, "pins.group")
    assert err.message == "no such group" and err.value == "no-such-group-x"
    assert PinOwnership(0o640, None).gid == -1


def test_sanitize_section_configures_the_rules(tmp_path: Path) -> None:
    from loaderd.sanitize import Rules

    path = write(tmp_path, "loaderd: 1\nsanitize:\n  ipv4_prefix: 16\n  ipv6_prefix: 32\n"
                 "  redact: [session_id]\n  keep: [pid, comm]\n")
    rules = load_settings(path, owner_uid=None).sanitize
    assert (rules.ipv4_prefix, rules.ipv6_prefix) == (16, 32)
    assert "session_id" in rules.redact and "password" in rules.redact  # adds to defaults
    assert rules.keep == frozenset({"pid", "comm"})
    assert load_settings(None).sanitize == Rules()


@pytest.mark.parametrize("body,field,line", [
    ("sanitize:\n  ipv4_prefx: 16\n", "sanitize.ipv4_prefx", 3),
    ("sanitize:\n  ipv4_prefix: 40\n", "sanitize.ipv4_prefix", 3),
    ("sanitize:\n  redact: [\"no spaces\"]\n", "sanitize.redact[0]", 3),
])
def test_sanitize_section_errors_are_located(tmp_path: Path, body: str, field: str,
                                             line: int) -> None:
    err = refused(write(tmp_path, "loaderd: 1\n" + body), owner_uid=None)
    assert (err.location.field, err.location.line) == (field, line), str(err)


def test_by_type_turns_a_gated_helper_on_for_one_type(tmp_path: Path) -> None:
    text = "loaderd: 1\npolicy: {helpers: {by_type: {tracepoint: [probe_read_kernel]}}}\n"
    pol = load_settings(write(tmp_path, text), owner_uid=None).policy
    assert pol.helpers is None
    assert "probe_read_kernel" in pol.helpers_for(ProgType.TRACEPOINT)
    assert "redirect" not in pol.helpers_for(ProgType.TRACEPOINT)
    for other in set(ProgType) - {ProgType.TRACEPOINT}:
        assert "probe_read_kernel" not in pol.helpers_for(other)
    assert "redirect" in pol.helpers_for(ProgType.XDP)  # the type's defaults stay


def test_shipped_settings_allow_no_gated_helper() -> None:
    shipped = Path(__file__).resolve().parents[2] / "configs" / "loaderd.yaml"
    pol = load_settings(str(shipped), owner_uid=None).policy
    for ptype in ProgType:
        assert not pol.helpers_for(ptype) & {"probe_read_kernel", "probe_read_kernel_str",
                                              "tail_call"}


# --- the trust walk of state_dir and programs_dir ------------------------------------------

NOBODY = 65534


def dirs_conf(tmp_path: Path, state: Path | str, programs: Path | str | None = None,
              extra: str = "") -> str:
    programs = programs or tmp_path / "programs.d"
    return write(tmp_path, f"loaderd: 1\nprograms_dir: {programs}\nstate_dir: {state}\n{extra}")


@pytest.fixture
def base(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("chowns directories: needs root")
    os.chmod(tmp_path, 0o755)
    (tmp_path / "programs.d").mkdir(mode=0o755)
    return tmp_path


def walk_refused(path: str, msg: str, field: str = "state_dir") -> LoaderdError:
    err = refused(path)
    assert (err.kind, err.location.field) == (Kind.TRUST, field), err
    assert msg in str(err) and "\n" not in str(err), err
    assert err.location.line == (3 if field == "state_dir" else 2)
    return err


def test_state_dir_of_root_or_missing_under_a_trusted_parent_is_accepted(base: Path) -> None:
    (base / "state").mkdir(mode=0o751)
    assert load_settings(dirs_conf(base, base / "state")).state_dir == str(base / "state")
    load_settings(dirs_conf(base, base / "not-yet" / "state"))  # apply makes it


def test_state_dir_of_another_user_is_refused_unless_it_is_the_service_user(
        base: Path) -> None:
    state = base / "state"
    state.mkdir(mode=0o751)
    os.chown(state, NOBODY, -1)
    walk_refused(dirs_conf(base, state), f"{base}/state: directory is owned by uid {NOBODY}")
    load_settings(dirs_conf(base, state, extra="service_user: nobody\n"))
    err = refused(dirs_conf(base, state, extra="service_user: no_such_user_xyz\n"))
    assert (err.kind, err.location.field) == (Kind.SEMANTIC, "service_user")


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770])
def test_writable_state_dir_is_refused(base: Path, mode: int) -> None:
    state = base / "state"
    state.mkdir()
    os.chmod(state, mode)
    walk_refused(dirs_conf(base, state), "state: directory is writable by group or other")


def test_symlinked_state_dir_is_refused(base: Path) -> None:
    (base / "real").mkdir(mode=0o751)
    os.symlink(base / "real", base / "state")
    walk_refused(dirs_conf(base, base / "state"), "state: directory is a symlink")


def test_state_dir_under_a_writable_or_foreign_directory_is_refused(base: Path) -> None:
    ww = base / "ww"
    ww.mkdir()
    os.chmod(ww, 0o777)
    walk_refused(dirs_conf(base, ww / "state"), "parent directory is writable")
    theirs = base / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, -1)
    walk_refused(dirs_conf(base, theirs / "state", extra="service_user: nobody\n"),
                 f"parent directory is owned by uid {NOBODY}")


@pytest.mark.parametrize("state", ["/etc", "/etc/loaderd/state", "/usr/lib/loaderd", "/var/lib",
                                   "/run"])
def test_system_directories_are_not_a_state_dir(base: Path, state: str) -> None:
    walk_refused(dirs_conf(base, state), "state_dir is a system directory")


def test_programs_dir_through_a_symlink_in_a_world_writable_directory(base: Path) -> None:
    ww = base / "ww"
    ww.mkdir()
    os.chmod(ww, 0o777)
    os.symlink(base / "programs.d", ww / "programs.d")
    walk_refused(dirs_conf(base, base / "state", ww / "programs.d"),
                 "parent directory is writable by group or other", field="programs_dir")
    os.symlink(base / "programs.d", base / "link")  # root's link in root's directory: fine
    load_settings(dirs_conf(base, base / "state", base / "link"))


def test_programs_dir_and_state_dir_must_not_nest(base: Path) -> None:
    walk_refused(dirs_conf(base, base / "programs.d" / "state"), "must not contain each other")
    walk_refused(dirs_conf(base, base / "state", base / "state" / "specs"),
                 "must not contain each other")


def test_dirs_are_not_walked_for_a_non_root_check(base: Path) -> None:
    load_settings(dirs_conf(base, "/etc"), owner_uid=None)
