"""Sanitize event streams and map dumps before they leave the host.

One pipeline for any nested value (dicts, lists, strings, bytes, ints):
- fields: keep only an allow-list (top level), drop a deny-list, redact secret-named fields,
  pseudonymize identity fields with a keyed HMAC-SHA-256 (a bare hash of a uid or an address is
  reversed by enumerating the small input space; a keyed one is not without the key);
- strings (and bytes that are text; a C string ends at its first NUL): mask IPv4/IPv6
  addresses to a prefix, redact secrets (`password=`, `"token": "..."`, `api_key=`, bearer
  tokens, GitHub tokens, AWS keys, URL passwords, card numbers that pass the Luhn check);
- bytes that are not text become hex, so the result is always JSON-safe.

The key comes from a systemd credential (`$CREDENTIALS_DIRECTORY/sanitize.key`) or from
`<state_dir>/sanitize.key`, created 0600 from os.urandom on first use. Pseudonyms are stable for
as long as the key is, so the same user correlates across events and dumps.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import ipaddress
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from loaderd.errors import Kind, LoaderdError, Location

KEY_FILE = "sanitize.key"
KEY_BYTES = 32
MIN_KEY_BYTES = 16
REDACTED = "[REDACTED]"
REDACTED_CARD = "[REDACTED-CARD]"
PSEUDONYM_PREFIX = "anon:"


def _norm(name: str) -> str:
    return name.lower().replace("-", "_")


def _names(items: Iterable[str]) -> frozenset[str]:
    return frozenset(_norm(i) for i in items)


# Fields holding raw addresses. layout.decode reads 4-byte scalars of these names in network
# order (as the kernel stores iphdr/sockaddr addresses), not as little-endian ints.
IP_FIELDS = _names({"saddr", "daddr", "src_ip", "dst_ip", "ip", "addr"})


@dataclass(frozen=True)
class Opaque:
    """Bytes declared opaque (`bytesN`, `{bytes: N}`): shown as hex, never read as text. A
    first printable byte and a NUL are not a C string (a 16-byte count+total printed as `;`)."""

    data: bytes

    def __str__(self) -> str:
        return self.data.hex()


@dataclass(frozen=True)
class Name:
    """A path or task name (kind path/comm): secrets are redacted, but dotted parts are file
    name text, not addresses (`/tmp/x/10.1.2.3.log` stays)."""

    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Rules:
    """What to do with which field. Field names match case-insensitively, `-` == `_`."""

    ipv4_prefix: int = 24
    ipv6_prefix: int = 48
    keep: frozenset[str] | None = None  # allow-list of top-level fields; None keeps all
    drop: frozenset[str] = _names({"raw_payload", "payload"})
    redact: frozenset[str] = _names({
        "password", "passwd", "secret", "token", "access_token", "refresh_token", "api_key",
        "apikey", "authorization", "cookie", "credentials", "private_key",
        "aws_secret_access_key"})
    pseudonymize: frozenset[str] = _names({"user", "username", "uid", "login_uid", "email"})
    # Fields holding raw addresses: bytes (4 or 16, network order) or an int (the address's
    # numeric value, ipaddress's reading). Addresses inside strings are found without this.
    ip_fields: frozenset[str] = IP_FIELDS
    secrets_in_text: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.ipv4_prefix <= 32 or not 0 <= self.ipv6_prefix <= 128:
            raise LoaderdError(Kind.SEMANTIC, "IP prefix length out of range",
                               value=(self.ipv4_prefix, self.ipv6_prefix),
                               allowed="IPv4 0..32, IPv6 0..128")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> Rules:
        """Rules from a settings-style mapping; list keys *add* to the defaults except `keep`."""
        base = cls()
        known = {"ipv4_prefix", "ipv6_prefix", "keep", "drop", "redact", "pseudonymize",
                 "ip_fields", "secrets_in_text"}
        unknown = set(raw) - known
        if unknown:
            raise LoaderdError(Kind.SCHEMA, f"unknown sanitize option(s): {sorted(unknown)}",
                               allowed=", ".join(sorted(known)))
        keep = raw.get("keep")
        return cls(
            ipv4_prefix=int(raw.get("ipv4_prefix", base.ipv4_prefix)),
            ipv6_prefix=int(raw.get("ipv6_prefix", base.ipv6_prefix)),
            keep=None if keep is None else _names(keep),
            drop=base.drop | _names(raw.get("drop", ())),
            redact=base.redact | _names(raw.get("redact", ())),
            pseudonymize=base.pseudonymize | _names(raw.get("pseudonymize", ())),
            ip_fields=base.ip_fields | _names(raw.get("ip_fields", ())),
            secrets_in_text=bool(raw.get("secrets_in_text", True)))


# --- key --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Key:
    secret: bytes = field(repr=False)
    source: str  # where it came from: a path, or "ephemeral"


def _read_key(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LoaderdError(Kind.TRUST, "sanitize key is not a regular file", Location(path))
        if st.st_mode & 0o077:
            raise LoaderdError(Kind.TRUST, f"sanitize key is accessible by group or other "
                               f"(mode {stat.S_IMODE(st.st_mode):04o})", Location(path),
                               allowed="mode 0600 (chmod 600)")
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    if len(data) < MIN_KEY_BYTES:
        raise LoaderdError(Kind.TRUST, f"sanitize key is {len(data)} bytes", Location(path),
                           allowed=f">= {MIN_KEY_BYTES} random bytes")
    return data


def _create_key(path: str) -> bytes:
    secret = os.urandom(KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.fchmod(fd, 0o600)  # exact, whatever the umask
        if os.geteuid() == 0:  # root (loaderctl) creating it must not lock out the daemon user
            st = os.stat(os.path.dirname(path) or ".")
            os.fchown(fd, st.st_uid, st.st_gid)
        if os.write(fd, secret) != len(secret):  # disk full: a shorter key is no key
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    return secret


def load_key(state_dir: str | None, *, create: bool = True) -> Key:
    """The pseudonymization key: systemd credential first, then `<state_dir>/sanitize.key`
    (created if missing and `create`). Raises LoaderdError when neither is usable."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        path = os.path.join(creds, KEY_FILE)
        if os.path.exists(path):
            return Key(_read_key(path), path)
    if not state_dir:
        raise LoaderdError(Kind.STATE, "no sanitize key: no credential and no state dir")
    path = os.path.join(state_dir, KEY_FILE)
    try:
        try:
            return Key(_read_key(path), path)
        except FileNotFoundError:
            if not create:
                raise
        try:
            return Key(_create_key(path), path)
        except FileExistsError:  # lost a race with another process: use its key
            return Key(_read_key(path), path)
    except OSError as exc:
        raise LoaderdError(Kind.STATE, f"sanitize key unusable: "
                           f"{os.strerror(exc.errno or errno.EIO)}", Location(path)) from None


def ephemeral_key() -> Key:
    """A one-run key: pseudonyms stay consistent within this output only."""
    return Key(os.urandom(KEY_BYTES), "ephemeral")


# --- text patterns ----------------------------------------------------------------------------

_IPV6 = re.compile(r"(?<![\w:.])\[?((?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|"
                   r"\d{1,3}(?:\.\d{1,3}){3})?)(?:%[\w.]+)?\]?(?![\w:])")
_IPV4 = re.compile(r"(?<![\w.])(\d{1,3}(?:\.\d{1,3}){3})(?![\w.]*\d)")
# `key=value`, `key: value` and JSON/Python `"key": "value"` (the key's closing quote before the
# separator; escaped quotes inside a quoted value do not end it).
_KEY_VALUE = re.compile(
    r"(?i)\b((?:aws_)?secret_access_key|password|passwd|pwd|secret|token|access_token|"
    r"api[_-]?key|auth_token)"
    r"([\"']?\s*[=:]\s*)(\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|[^\s&;,\"']+)")
# Self-identifying tokens, wherever they appear: GitHub (classic ghp/gho/ghu/ghs/ghr, and
# fine-grained github_pat_) and AWS access key ids (AKIA long-term, ASIA temporary).
_TOKEN = re.compile(r"(?<![A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{20,}|"
                    r"github_pat_[A-Za-z0-9_]{20,}|(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9]))")
# `scheme://user:password@host`: the password ends at the authority's last `@`.
# The scheme is bounded (RFC schemes are short): unbounded, "a.a.a..." backtracked from every
# word boundary (quadratic: 64 KB of it took 12 s, past the daemon's watchdog).
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]{0,31}://[^\s/?#@:]*:)[^\s/?#]*@")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9\-._~+/]+=*")
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE "
                          r"KEY-----|$)", re.S)
# 13-19 digits, optionally grouped by spaces or dashes, starting like a payment card (2-6).
_CARD = re.compile(r"(?<![\d.])[2-6](?:[ -]?\d){12,18}(?!\d|\.\d)")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _key_value(match: re.Match[str]) -> str:
    quote = match.group(3)[0] if match.group(3)[0] in "\"'" else ""  # keep JSON valid
    return f"{match.group(1)}{match.group(2)}{quote}{REDACTED}{quote}"


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"[ -]", "", match.group(0))
    return REDACTED_CARD if 13 <= len(digits) <= 19 and luhn_ok(digits) else match.group(0)


# --- the pipeline -----------------------------------------------------------------------------

class Sanitizer:
    """Callable: `sanitizer(value)` returns a sanitized, JSON-safe copy of `value`."""

    def __init__(self, key: Key | bytes, rules: Rules | None = None) -> None:
        self.key = key if isinstance(key, Key) else Key(key, "given")
        if len(self.key.secret) < MIN_KEY_BYTES:
            raise LoaderdError(Kind.STATE, "sanitize key too short",
                               allowed=f">= {MIN_KEY_BYTES} bytes")
        self.rules = rules or Rules()

    def __call__(self, value: Any) -> Any:
        if isinstance(value, Mapping):
            keep = self.rules.keep
            value = {k: v for k, v in value.items() if keep is None or _norm(str(k)) in keep}
        return self._value(value)

    def stream(self, events: Iterable[Any]) -> Iterator[Any]:
        for event in events:
            yield self(event)

    # values
    def _value(self, value: Any, name: str | None = None) -> Any:
        if isinstance(value, list | tuple | set | frozenset):  # field rules apply per item
            return [self._value(v, name) for v in value]
        if name is not None:
            if name in self.rules.redact:
                return REDACTED
            if name in self.rules.pseudonymize and value is not None:
                return self.pseudonym(value)
            if name in self.rules.ip_fields:
                masked = self._ip_value(value)
                if masked is not None:
                    return masked
        if isinstance(value, Mapping):
            return {str(k): self._value(v, _norm(str(k))) for k, v in value.items()
                    if _norm(str(k)) not in self.rules.drop}
        if isinstance(value, Opaque):
            return value.data.hex()
        if isinstance(value, Name):
            return self.text(value.text, addresses=False)
        if isinstance(value, bytes | bytearray | memoryview):
            raw = bytes(value)
            text = _as_text(raw)
            return self.text(text) if text is not None else raw.hex()
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return self._mask(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        return self.text(str(value))

    def pseudonym(self, value: Any) -> str:
        """Keyed, stable, not reversible without the key (HMAC-SHA-256, 96 bits shown)."""
        if isinstance(value, Opaque):
            value = value.data
        elif isinstance(value, Name):
            value = value.text
        if isinstance(value, bytes | bytearray):
            msg = bytes(value)
        elif isinstance(value, str | int):
            # surrogatepass: a str from JSON ("\udcff") or a surrogateescape'd name has lone
            # surrogates, which strict UTF-8 refuses (found by tests/fuzz)
            msg = str(value).encode("utf-8", "surrogatepass")
        else:
            msg = json.dumps(value, sort_keys=True, default=str).encode()
        # hmac.digest: the one-shot (OpenSSL) form of hmac.new(...).digest(), same bytes
        return PSEUDONYM_PREFIX + hmac.digest(self.key.secret, msg, "sha256").hex()[:24]

    def text(self, text: str, *, addresses: bool = True) -> str:
        # Each pattern runs only when the text holds what every match of it must contain
        # (a literal, case-sensitive in the pattern): skipping it then changes nothing, and
        # most event strings hold none of them (tests/unit/test_sanitize_fast.py compares
        # this with every pattern run unconditionally, over a large varied corpus).
        if self.rules.secrets_in_text:
            if "-----BEGIN " in text:
                text = _PRIVATE_KEY.sub(REDACTED, text)
            text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
            if "://" in text:
                text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
            if "=" in text or ":" in text:
                text = _KEY_VALUE.sub(_key_value, text)
            if "gh" in text or "github_pat_" in text or "AKIA" in text or "ASIA" in text:
                text = _TOKEN.sub(REDACTED, text)
        if addresses:
            if ":" in text:
                text = _IPV6.sub(self._ip_text, text)
            if "." in text:
                text = _IPV4.sub(self._ip_text, text)
        if self.rules.secrets_in_text:
            text = _CARD.sub(_card, text)
        return text

    # addresses
    def _mask(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
        prefix = self.rules.ipv4_prefix if ip.version == 4 else self.rules.ipv6_prefix
        if ip.version == 6 and ip.scope_id is not None:  # "fe80::1%eth0": the parser's way
            return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
        # The network of the address's integer, as ip_network("a.b.c.d/p", strict=False)
        # gives it, without formatting and parsing the address again (a third of sanitize).
        if ip.version == 4:
            return self.mask4(int(ip))
        net = int(ip) & (((1 << 128) - 1) ^ ((1 << (128 - prefix)) - 1))
        return str(ipaddress.IPv6Network((net, prefix)))

    def mask4(self, address: int) -> str:
        """The IPv4 address `address` (its integer) masked: "a.b.c.d/p", formatted as
        IPv4Network does it."""
        prefix = self.rules.ipv4_prefix
        net = address & ((0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF)
        return f"{net >> 24}.{(net >> 16) & 255}.{(net >> 8) & 255}.{net & 255}/{prefix}"

    def _ip_text(self, match: re.Match[str]) -> str:
        try:
            ip = ipaddress.ip_address(match.group(1))
        except ValueError:
            return match.group(0)  # "12:30:45", a MAC, a version string: not an address
        return self._mask(ip)

    def _ip_value(self, value: Any) -> str | None:
        if isinstance(value, Opaque):
            value = value.data
        try:
            if isinstance(value, bytes | bytearray) and len(value) in (4, 16):
                return self._mask(ipaddress.ip_address(bytes(value)))
            if isinstance(value, int) and not isinstance(value, bool):
                return self._mask(ipaddress.ip_address(value))
            if isinstance(value, str):
                return self._mask(ipaddress.ip_address(value.strip("[]")))
        except ValueError:
            return None
        return None


def _as_text(raw: bytes) -> str | None:
    """Bytes that are printable UTF-8 up to the first NUL, else None. A C string ends there:
    what follows (stale buffer bytes) would make a secret look binary and leave it as hex."""
    body = raw.split(b"\0", 1)[0]
    if not body:
        # An empty C string whose buffer still holds old text: show neither (hex of a secret
        # is the secret). Binary that merely starts with a zero byte stays hex.
        stale = raw.lstrip(b"\0").split(b"\0", 1)[0]
        return "" if not stale or _printable(stale) is not None else None
    return _printable(body)


def _printable(body: bytes) -> str | None:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if all(c.isprintable() or c in "\t\n\r" for c in text) else None
