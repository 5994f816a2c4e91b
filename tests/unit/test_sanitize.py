"""Sanitizer: IP masking, keyed pseudonyms, field lists, secret redaction, key handling."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import stat
from pathlib import Path

import pytest

from loaderd.errors import LoaderdError
from loaderd.sanitize import (
    REDACTED,
    REDACTED_CARD,
    Key,
    Opaque,
    Rules,
    Sanitizer,
    ephemeral_key,
    load_key,
    luhn_ok,
)

KEY = Key(b"k" * 32, "test")


@pytest.fixture
def san() -> Sanitizer:
    return Sanitizer(KEY)


def test_ipv4_and_ipv6_masked_in_text_with_configurable_prefixes(san: Sanitizer) -> None:
    text = "conn 192.168.17.42:443 -> [2001:db8:abcd:12::1]:80 via fe80::1%eth0 at 10.0.0.9."
    out = san(text)
    assert "192.168.17.0/24:443" in out and "192.168.17.42" not in out
    assert "2001:db8:abcd::/48" in out and "::1]" not in out
    assert "fe80::/48" in out
    assert out.endswith("10.0.0.0/24.")
    wide = Sanitizer(KEY, Rules(ipv4_prefix=16, ipv6_prefix=32))
    assert wide("from 192.168.17.42") == "from 192.168.0.0/16"
    assert wide("2001:db8:abcd:12::1") == "2001:db8::/32"


def test_non_addresses_left_alone(san: Sanitizer) -> None:
    for text in ("at 12:30:45", "mac aa:bb:cc:dd:ee:ff", "version v1.2.3.4", "1.2.3.4.5",
                 "pi 3.14159265358979323", "tokens: 5", "Note::"):
        assert san(text) == text


def test_ip_fields_hold_raw_addresses(san: Sanitizer) -> None:
    event = {"saddr": bytes([10, 1, 2, 3]), "daddr": bytes(15) + b"\x01",
             "ip": "172.16.5.4", "addr": 0x0A000001, "count": 0x0A000001}
    assert san(event) == {"saddr": "10.1.2.0/24", "daddr": "::/48", "ip": "172.16.5.0/24",
                          "addr": "10.0.0.0/24", "count": 0x0A000001}


def test_address_fields_decode_from_network_order_bytes(san: Sanitizer) -> None:
    from loaderd.layout import decode, parse_layout

    # What the kernel writes: iphdr/sockaddr addresses in network byte order, then a port and
    # a counter in host (little-endian) order.
    layout = parse_layout("saddr:u32,dport:u16,count:u32,daddr:bytes16")
    record = (bytes([10, 1, 2, 3]) + (443).to_bytes(2, "little") + b"\0\0" + bytes([10, 1, 2, 3])
              + ipaddress.IPv6Address("2001:db8:abcd:12::1").packed)
    event = decode(record, layout)
    assert event["saddr"] == ipaddress.IPv4Address("10.1.2.3")
    assert event["count"] == 0x0302010A  # an ordinary u32: host order, unchanged
    assert san(event) == {"saddr": "10.1.2.0/24", "dport": 443, "count": 0x0302010A,
                          "daddr": "2001:db8:abcd::/48"}


def test_pseudonyms_are_keyed_stable_and_not_a_bare_hash(san: Sanitizer) -> None:
    a = san({"uid": 1000, "user": "alice", "nested": [{"email": "a@example.org"}]})
    b = san({"uid": 1000, "user": "alice"})
    assert a["uid"] == b["uid"] and a["user"] == b["user"]
    assert a["uid"].startswith("anon:") and a["uid"] != a["user"]
    assert a["nested"][0]["email"].startswith("anon:")
    assert hashlib.sha256(b"1000").hexdigest()[:24] not in a["uid"]  # keyed, not SHA-256(x)
    other = Sanitizer(Key(b"o" * 32, "other"))({"uid": 1000})
    assert other["uid"] != a["uid"]
    assert san({"uid": [1, 2]})["uid"] == [san.pseudonym(1), san.pseudonym(2)]


def test_field_allow_deny_and_redact_lists() -> None:
    event = {"Password": "hunter2", "api-key": "x", "raw_payload": b"\x00\x01",
             "comm": "curl", "pid": 42, "inner": {"token": "t", "payload": "p", "ok": 1}}
    out = Sanitizer(KEY)(event)
    assert out == {"Password": REDACTED, "api-key": REDACTED, "comm": "curl", "pid": 42,
                   "inner": {"token": REDACTED, "ok": 1}}
    kept = Sanitizer(KEY, Rules(keep=frozenset({"comm", "inner"})))(event)
    assert kept == {"comm": "curl", "inner": {"token": REDACTED, "ok": 1}}
    extra = Sanitizer(KEY, Rules.from_mapping({"drop": ["comm"], "pseudonymize": ["pid"]}))
    out = extra(event)
    assert "comm" not in out and out["pid"].startswith("anon:")


def test_secret_patterns_in_text(san: Sanitizer) -> None:
    text = ("GET /?user=bob&password=s3cr3t&x=1 token: abc.def api_key=AKIA123 "
            "API-KEY=\"quoted value\" Authorization: Bearer eyJhbGciOi.J9.x-y_z== done")
    out = san(text)
    for secret in ("s3cr3t", "abc.def", "AKIA123", "quoted value", "eyJhbGciOi"):
        assert secret not in out
    assert f"password={REDACTED}&x=1" in out and f"token: {REDACTED}" in out
    assert f"Bearer {REDACTED} done" in out
    pem = "k=-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----!"
    assert san(pem) == f"k={REDACTED}!"


def test_more_secret_formats_in_text(san: Sanitizer) -> None:
    gh = "ghp_" + "A1b2" * 9
    pat = "github_pat_11ABCDEFG0123456789_" + "x" * 59
    cases = {
        '{"password": "hun\\"ter2", "user": "bob"}': f'{{"password": "{REDACTED}", "user": "bob"}}',
        "{'token': 'y', 'n': 1}": f"{{'token': '{REDACTED}', 'n': 1}}",
        "aws_secret_access_key=wJalrXUtnFEMI/K7MDENG": f"aws_secret_access_key={REDACTED}",
        "AWS_SECRET_ACCESS_KEY: wJalrX ok": f"AWS_SECRET_ACCESS_KEY: {REDACTED} ok",
        f"push {gh} and gho_{'z' * 36}, ghs_{'9' * 36}": f"push {REDACTED} and {REDACTED}, "
                                                         f"{REDACTED}",
        f"GH={pat}.": f"GH={REDACTED}.",
        "id AKIAIOSFODNN7EXAMPLE used": f"id {REDACTED} used",
        "dsn postgres://app:s3:cr@t@db.internal:5432/x ok":
            f"dsn postgres://app:{REDACTED}@db.internal:5432/x ok",
        "see https://example.org/a:b@c and ghp_short": "see https://example.org/a:b@c and "
                                                        "ghp_short",
    }
    for text, want in cases.items():
        assert san(text) == want, text


def test_card_numbers_need_a_valid_luhn_checksum(san: Sanitizer) -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert san("card 4111 1111 1111 1111.") == f"card {REDACTED_CARD}."
    assert san("card 5500-0000-0000-0004 ok") == f"card {REDACTED_CARD} ok"
    assert san("id 4111111111111112") == "id 4111111111111112"  # fails Luhn: not a card
    assert san("ts 1795588231948") == "ts 1795588231948"  # starts with 1: not a card


def test_bytes_become_text_or_hex_and_everything_is_json_safe(san: Sanitizer) -> None:
    event = {"comm": b"curl\0\0\0\0", "blob": b"\x00\x01\xff", "msg": b"password=x\0",
             "t": (1, 2.5, None, True), "ip": None}
    out = san(event)
    assert out == {"comm": "curl", "blob": "0001ff", "msg": f"password={REDACTED}",
                   "t": [1, 2.5, None, True], "ip": None}
    json.dumps(out)


def test_c_string_with_garbage_after_nul_is_text_then_redacted(san: Sanitizer) -> None:
    out = san({"note": b"password=hunter2\0\x01\x02", "v": [b"token=abc\0\xff\xfe"]})
    assert out == {"note": f"password={REDACTED}", "v": [f"token={REDACTED}"]}
    assert "68756e74657232" not in json.dumps(out)  # nor the secret's hex
    assert san(b"\xff\xfe\0ab") == "fffe006162"  # binary before the NUL: still hex


def test_stream(san: Sanitizer) -> None:
    events = ({"n": i, "src": f"10.0.{i}.7"} for i in range(3))
    assert [e["src"] for e in san.stream(events)] == ["10.0.0.0/24", "10.0.1.0/24",
                                                      "10.0.2.0/24"]


def test_bad_rules_refused() -> None:
    with pytest.raises(LoaderdError):
        Rules(ipv4_prefix=33)
    with pytest.raises(LoaderdError):
        Rules.from_mapping({"ipv6": 48})
    with pytest.raises(LoaderdError):
        Sanitizer(b"short")


def test_key_created_0600_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    old = os.umask(0)
    try:
        key = load_key(str(tmp_path))
    finally:
        os.umask(old)
    path = tmp_path / "sanitize.key"
    assert key.source == str(path) and len(key.secret) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(str(tmp_path)).secret == key.secret
    with pytest.raises(LoaderdError):
        load_key(str(tmp_path / "missing"), create=False)


def test_key_from_systemd_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "sanitize.key").write_bytes(b"c" * 32)
    os.chmod(creds / "sanitize.key", 0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    key = load_key(str(tmp_path / "state-not-used"))
    assert key.secret == b"c" * 32 and key.source.endswith("creds/sanitize.key")


def test_key_readable_by_others_or_short_is_refused(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    path = tmp_path / "sanitize.key"
    path.write_bytes(b"x" * 32)
    os.chmod(path, 0o644)
    with pytest.raises(LoaderdError, match="group or other"):
        load_key(str(tmp_path))
    os.chmod(path, 0o600)
    path.write_bytes(b"x" * 8)
    with pytest.raises(LoaderdError, match="8 bytes"):
        load_key(str(tmp_path))
    assert ephemeral_key().source == "ephemeral"


# --- the event pipeline: decode -> rate limit -> sanitize --------------------------------------

def test_event_layout_decode_then_sanitize(san: Sanitizer) -> None:
    from loaderd.layout import decode, parse_layout

    layout = parse_layout("kind:u8, pid:u32,uid:u32,saddr:bytes4,delta:s16,comm:char8")
    assert [(f.name, f.offset, f.size) for f in layout] == [
        ("kind", 0, 1), ("pid", 4, 4), ("uid", 8, 4), ("saddr", 12, 4), ("delta", 16, 2),
        ("comm", 18, 8)]
    record = (bytes([3, 0, 0, 0]) + (42).to_bytes(4, "little") + (1000).to_bytes(4, "little")
              + bytes([10, 9, 8, 7]) + (-5).to_bytes(2, "little", signed=True) + b"curl\0\0\0\0"
              + b"\xff\xee")
    event = decode(record, layout)
    assert event == {"kind": 3, "pid": 42, "uid": 1000, "saddr": Opaque(bytes([10, 9, 8, 7])),
                     "delta": -5, "comm": "curl", "_rest": Opaque(b"\xff\xee")}
    assert san(event) == {"kind": 3, "pid": 42, "uid": san.pseudonym(1000),
                          "saddr": "10.9.8.0/24", "delta": -5, "comm": "curl", "_rest": "ffee"}
    assert decode(record[:6], layout) == {"kind": 3, "_short": True}
    assert decode(b"password=x", None) == {"data": Opaque(b"password=x")}
    for bad in ("pid:u33", "pid", "Pid:u32", "x:bytes0", ""):
        with pytest.raises(LoaderdError):
            parse_layout(bad)


def test_event_rate_limit_token_bucket() -> None:
    from loaderd.runtime.ringbuf import RateLimit

    now = [0.0]
    limit = RateLimit(3, clock=lambda: now[0])
    assert [limit.allow() for _ in range(5)] == [True, True, True, False, False]
    now[0] = 1.0  # a second refills `rate` tokens, never more
    assert [limit.allow() for _ in range(4)] == [True, True, True, False]
    assert limit.dropped == 3


def test_c_string_starting_with_nul_shows_nothing_of_what_follows() -> None:
    """An empty C string: the stale bytes after its NUL are neither text nor hex."""
    clean = Sanitizer(b"k" * 32)
    assert clean({"note": b"\0password=hunter2 ok"}) == {"note": ""}


def test_url_password_scheme_is_bounded() -> None:
    """The scheme part is bounded (a long 'a.a.a...' run made the unbounded pattern
    quadratic): schemes of normal length still match, a 40-character 'scheme' does not."""
    clean = Sanitizer(b"k" * 32)
    assert clean("postgres://app:pw@db") == "postgres://app:[REDACTED]@db"
    long = "a" * 40 + "://u:pw@h"
    assert clean(long) == long
