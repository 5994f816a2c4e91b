"""Counts and articles in messages: "1 spec", "2 specs", "an array map", "a hash map"."""

from __future__ import annotations

import pytest

from loaderd import layout
from loaderd.errors import LoaderdError, article, plural


def test_article_by_sound() -> None:
    words = ("array", "hash", "xdp", "ringbuf", "lru_hash", "u32", "ipv4")
    assert [article(w) for w in words] == ["an array", "a hash", "an xdp", "a ringbuf",
                                           "a lru_hash", "a u32", "an ipv4"]


def test_plural() -> None:
    assert (plural(1, "entry", "entries"), plural(2, "entry", "entries")) == ("1 entry",
                                                                             "2 entries")


def test_a_layout_message_reads_as_english() -> None:
    with pytest.raises(LoaderdError) as err:
        layout.parse_layout("x:u32:path")
    assert err.value.message == "a scalar field cannot be path"
