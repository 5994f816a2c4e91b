"""Capability facts and the per-type check (no kernel needed)."""

from __future__ import annotations

import pytest

from loaderd import privileges
from loaderd.errors import Kind, LoaderdError
from loaderd.model import ProgType
from loaderd.privileges import CAP_NUMBERS, CapState


def state(*caps: str) -> CapState:
    mask = sum(1 << CAP_NUMBERS[c] for c in caps)
    return CapState(mask, mask, 0, mask, 0, False)


def test_required_caps_per_type_and_kernel() -> None:
    assert privileges.required_caps(ProgType.XDP, (6, 1)) == {"CAP_BPF", "CAP_NET_ADMIN"}
    assert privileges.required_caps(ProgType.TRACEPOINT, (6, 1)) == {"CAP_BPF", "CAP_PERFMON"}
    assert privileges.required_caps(ProgType.SOCKET_FILTER, (6, 1)) == {"CAP_BPF"}
    assert privileges.required_caps(ProgType.TRACEPOINT, (5, 4)) == {"CAP_SYS_ADMIN"}
    assert privileges.required_caps(ProgType.XDP, (5, 7)) == {"CAP_SYS_ADMIN", "CAP_NET_ADMIN"}


def test_missing_capability_is_named_with_the_spec_and_program() -> None:
    with pytest.raises(LoaderdError) as err:
        privileges.check([("/etc/loaderd/programs.d/a.yaml", ProgType.XDP, "fw")],
                         state("CAP_BPF", "CAP_PERFMON"))
    e = err.value
    assert e.kind is Kind.CAPABILITY and e.location.file == "/etc/loaderd/programs.d/a.yaml"
    assert "CAP_NET_ADMIN is missing" in str(e) and "'fw'" in str(e)
    privileges.check([("a.yaml", ProgType.XDP, "fw")], state("CAP_BPF", "CAP_NET_ADMIN"))


def test_read_state_parses_proc_status() -> None:
    s = privileges.read_state()
    assert isinstance(s.effective, int) and isinstance(s.no_new_privs, bool)
    assert privileges.names(1 << 39 | 1 << 12) == ["CAP_NET_ADMIN", "CAP_BPF"]
