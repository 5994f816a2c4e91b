"""Author errors (issue 18 item 4) without the kernel: BCC map macros refused with the spec
equivalent, refused programs folded into one error, probe_read's cause named."""

from __future__ import annotations

import pytest

from loaderd.config import source as srccheck
from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import ProgType
from loaderd.policy import helper_hints
from loaderd.stage.worker import all_refused


@pytest.mark.parametrize("macro, equivalent", [
    ("BPF_HASH(start, u32, u64);", "{name: start, type: hash, key: u64, value: u64"),
    ("BPF_HISTOGRAM(dist);", "histogram: {kind: log2, unit: usecs}"),
    ("BPF_PERF_OUTPUT(events);", "{name: events, type: perf_event_array"),
    ("BPF_RINGBUF_OUTPUT(rb, 8);", "{name: rb, type: ringbuf"),
    ("BPF_PERCPU_ARRAY (counts, u64, 4);", "{name: counts, type: percpu_array"),
])
def test_bcc_map_macros_refused_with_the_spec_equivalent(macro: str, equivalent: str) -> None:
    (err,) = srccheck.check_source(f"int a;\n{macro}\n", file="f.c")
    assert err.location.line == 2 and err.kind is Kind.POLICY
    assert equivalent in err.message and "remove the macro" in err.message


def test_refused_programs_fold_into_one_error() -> None:
    a = LoaderdError(Kind.HELPER, "program 'a' calls helpers not allowed: x",
                     Location("s.yaml", 9, None, "programs[0]"), detail="log a")
    b = LoaderdError(Kind.VERIFIER, "kernel refused program 'b': R1 invalid",
                     Location("s.yaml", 11, None, "programs[1]"), detail="log b")
    assert all_refused([("a", a)]) is a
    both = all_refused([("a", a), ("b", b)])
    assert both.location == a.location and both.kind is Kind.HELPER
    assert both.message.endswith("; 1 more refused: program 'b' (programs[1]): kernel refused "
                                 "program 'b': R1 invalid")
    assert both.detail == "--- a\nlog a\n\n--- b\nlog b"


def test_probe_read_hint_names_bccs_rewrite_and_the_setting() -> None:
    hint = helper_hints({"probe_read"}, ProgType.RAW_TRACEPOINT)
    assert "policy.helpers.by_type.raw_tracepoint (raw_tracepoint: [probe_read])" in hint
    assert "`p->field`" in hint
    assert "`p->field`" not in helper_hints({"tail_call"}, ProgType.RAW_TRACEPOINT)
