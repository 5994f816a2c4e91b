"""The sanitizer's fast paths (a pattern skipped when the text cannot match it; the masked
network computed from the address's integer) against the reference semantics they replace
(every pattern run in order; ip_network of the formatted address), byte for byte over a large
seeded corpus of event values and journaled JSON."""

from __future__ import annotations

import ipaddress
import json
import random
import re
from typing import Any

import pytest

from loaderd import sanitize
from loaderd.layout import decode, parse_layout
from loaderd.sanitize import REDACTED, Rules, Sanitizer

KEY = b"k" * 32
FRAGMENTS = [
    "10.1.2.3", "192.168.0.255:8080", "[2001:db8::1]:443", "fe80::1%eth0", "::ffff:1.2.3.4",
    "12:30:45", "aa:bb:cc:dd:ee:ff", "1.2.3", "v1.2.3.4.5", "300.1.2.3", "::", "1::2::3",
    "password=hunter2", "PASSWORD: 'x y'", '"token": "abc\\"def"', "api-key=K1;", "pwd=",
    "\u017fecret=longs", "\u212aey", "secret_access_key = AKIAIOSFODNN7EXAMPLE",
    "https://user:pa55@host/p", "ftp://a:b@c@d", "HTTP://u:@h", "://x:y@z",
    "Authorization: Bearer abc.def-ghi==", "bearer", "BEARER x",
    "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----",
    "-----BEGIN PRIVATE KEY-----unterminated", "-----BEGIN CERTIFICATE-----",
    "ghp_" + "a" * 36, "github_pat_" + "B" * 30, "xghp_" + "c" * 25, "ASIA" + "Z" * 16,
    "4111 1111 1111 1111", "4111-1111-1111-1112", "5555555555554444", "1234567890123",
    "2.5", "tab\there", "nul\0byte", "ünïcödé", "é.é:é", "=", ":", ".", "gh", "AKIA",
    "/usr/bin/ssh", "sshd", "", " ", "a.b.c.d", "1.1.1.1.1", "0.0.0.0", "255.255.255.255",
]


def corpus(n: int, seed: int = 1604) -> list[str]:
    rng = random.Random(seed)
    alphabet = "ab.:=/@ -_01239AKISghp'\"\\%[]\n"
    out = list(FRAGMENTS)
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 5)):
            if rng.random() < 0.6:
                parts.append(rng.choice(FRAGMENTS))
            else:
                parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))))
        out.append(rng.choice(["", " ", ", ", "&", ";"]).join(parts))
    return out


def reference_text(s: Sanitizer, text: str, *, addresses: bool = True) -> str:
    """Sanitizer.text before the fast paths: every pattern, in order, unconditionally."""
    if s.rules.secrets_in_text:
        text = sanitize._PRIVATE_KEY.sub(REDACTED, text)
        text = sanitize._BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
        text = sanitize._URL_PASSWORD.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
        text = sanitize._KEY_VALUE.sub(sanitize._key_value, text)
        text = sanitize._TOKEN.sub(REDACTED, text)
    if addresses:
        def ip_text(m: re.Match[str]) -> str:
            try:
                ip = ipaddress.ip_address(m.group(1))
            except ValueError:
                return m.group(0)
            return reference_mask(s, ip)
        text = sanitize._IPV6.sub(ip_text, text)
        text = sanitize._IPV4.sub(ip_text, text)
    if s.rules.secrets_in_text:
        text = sanitize._CARD.sub(sanitize._card, text)
    return text


def reference_mask(s: Sanitizer, ip: Any) -> str:
    prefix = s.rules.ipv4_prefix if ip.version == 4 else s.rules.ipv6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class Reference(Sanitizer):
    """The whole pipeline with the reference text and mask."""

    def text(self, text: str, *, addresses: bool = True) -> str:
        return reference_text(self, text, addresses=addresses)

    def _mask(self, ip: Any) -> str:
        return reference_mask(self, ip)


RULES = [Rules(), Rules(secrets_in_text=False), Rules(ipv4_prefix=0, ipv6_prefix=128),
         Rules(ipv4_prefix=32, ipv6_prefix=0), Rules(ipv4_prefix=13, ipv6_prefix=61)]


@pytest.mark.parametrize("rules", RULES, ids=range(len(RULES)))
def test_text_is_byte_identical_to_every_pattern_run(rules: Rules) -> None:
    s = Sanitizer(KEY, rules)
    texts = corpus(12000)
    changed = 0
    for t in texts:
        for addresses in (True, False):
            got = s.text(t, addresses=addresses)
            assert got == reference_text(s, t, addresses=addresses), t
            changed += got != t
    assert changed > len(texts) // 10  # the corpus does exercise the rules


@pytest.mark.parametrize("rules", RULES, ids=range(len(RULES)))
def test_mask_is_byte_identical_to_ip_network(rules: Rules) -> None:
    s = Sanitizer(KEY, rules)
    rng = random.Random(7)
    ips: list[Any] = [ipaddress.ip_address(x) for x in (
        "0.0.0.0", "255.255.255.255", "::", "::1", "::ffff:10.0.0.1", "fe80::1%eth0",
        "2001:db8::%3", "ff02::1")]
    ips += [ipaddress.IPv4Address(rng.getrandbits(32)) for _ in range(3000)]
    ips += [ipaddress.IPv6Address(rng.getrandbits(128)) for _ in range(3000)]
    ips += [ipaddress.IPv6Address(rng.getrandbits(rng.randint(0, 128))) for _ in range(1000)]
    for ip in ips:
        assert s._mask(ip) == reference_mask(s, ip), ip


def test_events_journal_the_same_json() -> None:
    """Whole records through decode + sanitize + json, as EventPump.journal writes them."""
    layout = parse_layout("pid:u32,uid:u32,comm:char16:comm,note:char64,saddr:u32,"
                          "daddr:u32:ipv4,d6:bytes16:ipv6,path:char32:path,blob:bytes8:hex")
    rng = random.Random(3)
    texts = corpus(3000, seed=5)
    s = Sanitizer(KEY, Rules(pseudonymize=frozenset({"uid"})))
    for i, t in enumerate(texts):
        note = t.encode()[:63].ljust(64, b"\0")
        record = (rng.getrandbits(32).to_bytes(4, "little") + (i % 70000).to_bytes(4, "little")
                  + texts[-i].encode()[:15].ljust(16, b"\0") + note
                  + rng.getrandbits(32).to_bytes(4, "big") + rng.getrandbits(32).to_bytes(4, "big")
                  + rng.getrandbits(128).to_bytes(16, "big") + t.encode()[:31].ljust(32, b"\0")
                  + rng.getrandbits(64).to_bytes(8, "little"))
        fields = decode(record, layout, s.rules.ip_fields)
        got = json.dumps(s(fields), default=str, sort_keys=True)
        ref = Reference(KEY, s.rules)
        assert got == json.dumps(ref(fields), default=str, sort_keys=True), t
