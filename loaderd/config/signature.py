"""SSH signatures of specs, verified offline: the SSHSIG format of `ssh-keygen -Y sign`
(OpenSSH PROTOCOL.sshsig), allowed_signers and revoked keys in ssh-keygen's formats.

A spec `x.yaml` is signed by a detached `x.yaml.sig` over its exact bytes, in the namespace
`loaderd-spec` (fixed: a git commit or ssh login signature of the same bytes does not verify
as a spec signature). The YAML pins the sha256 of its source/object file, so one signature
covers everything compiled. Keys: ssh-ed25519, sk-ssh-ed25519@openssh.com (FIDO:
PROTOCOL.u2f, user presence required unless `no-touch-required`), ecdsa-sha2-nistp256,
ssh-rsa with rsa-sha2-256/512 signatures (SHA-1 `ssh-rsa` signatures are refused).
FIDO signatures must carry the user-presence flag (the authenticator was touched): the
allowed_signers format has no `no-touch-required`, and ssh-keygen 9.2's -Y verify does not
look at the flags at all (measured), so loaderd is stricter than its reference there.
Certificates (`cert-authority`) and KRLs are refused with a message saying so.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import hashlib
import re
import struct
import time
from dataclasses import dataclass

from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import (
    AllowedSigner,
    SignatureFacts,
    SignatureMode,
    SignaturePolicy,
    SignatureStatus,
)

NAMESPACE = "loaderd-spec"
SUFFIX = ".sig"
MAGIC = b"SSHSIG"
MAX_SIG_BYTES = 64 * 1024
MAX_LIST_BYTES = 1024 * 1024
_ARMOR_BEGIN = b"-----BEGIN SSH SIGNATURE-----"
_ARMOR_END = b"-----END SSH SIGNATURE-----"
_KRL_MAGIC = b"SSHKRL\n\0"
_HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}
ED25519, SK_ED25519 = "ssh-ed25519", "sk-ssh-ed25519@openssh.com"
ECDSA_P256, RSA = "ecdsa-sha2-nistp256", "ssh-rsa"
KEY_TYPES = (ED25519, SK_ED25519, ECDSA_P256, RSA)
_RSA_SIGS = {"rsa-sha2-256": "sha256", "rsa-sha2-512": "sha512"}
MIN_RSA_BITS = 2048
SK_USER_PRESENT = 0x01  # PROTOCOL.u2f flags


class Invalid(Exception):
    """Why a signature or key does not verify (the message names it for the operator)."""


class _Reader:
    """SSH wire format (RFC 4251 section 5): uint32, string, mpint."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.at + n > len(self.data):
            raise Invalid("truncated")
        out = self.data[self.at:self.at + n]
        self.at += n
        return out

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def byte(self) -> int:
        return self.take(1)[0]

    def string(self) -> bytes:
        return self.take(self.u32())

    def text(self) -> str:
        try:
            return self.string().decode("ascii")
        except UnicodeDecodeError:
            raise Invalid("a name is not ASCII") from None

    def mpint(self) -> int:
        raw = self.string()
        if raw and raw[0] & 0x80:
            raise Invalid("negative integer")
        return int.from_bytes(raw, "big")

    def done(self) -> None:
        if self.at != len(self.data):
            raise Invalid(f"{len(self.data) - self.at} trailing bytes")


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


@dataclass(frozen=True)
class SshSig:
    key: bytes  # the signer's public key blob
    namespace: str
    hash_alg: str
    signature: bytes


def parse_armored(data: bytes) -> SshSig:
    """The SSHSIG blob of an armored `ssh-keygen -Y sign` output."""
    text = data.strip()
    if not text.startswith(_ARMOR_BEGIN) or not text.endswith(_ARMOR_END):
        raise Invalid("not an SSH signature (no -----BEGIN SSH SIGNATURE----- armor)")
    body = b"".join(text[len(_ARMOR_BEGIN):-len(_ARMOR_END)].split())
    try:
        blob = base64.b64decode(body, validate=True)
    except binascii.Error:
        raise Invalid("the armored signature is not valid base64") from None
    r = _Reader(blob)
    if r.take(6) != MAGIC:
        raise Invalid("no SSHSIG magic")
    version = r.u32()
    if version != 1:
        raise Invalid(f"SSHSIG version {version} (loaderd reads version 1)")
    key, namespace = r.string(), r.text()
    r.string()  # reserved
    hash_alg, signature = r.text(), r.string()
    r.done()
    return SshSig(key, namespace, hash_alg, signature)


def key_type(blob: bytes) -> str:
    try:
        return _Reader(blob).text()
    except Invalid:
        return "?"


def fingerprint(blob: bytes) -> str:
    """As `ssh-keygen -l` prints it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def signed_data(namespace: str, hash_alg: str, message: bytes) -> bytes:
    """What the key signs (PROTOCOL.sshsig): magic, namespace, reserved, hash name, H(msg)."""
    digest = _HASHES[hash_alg](message).digest()
    return (MAGIC + _string(namespace.encode()) + _string(b"") + _string(hash_alg.encode())
            + _string(digest))


@dataclass(frozen=True)
class Checked:
    key_type: str
    counter: int | None = None  # FIDO signature counter
    flags: int | None = None  # FIDO flags


def verify_raw(key: bytes, signature: bytes, data: bytes) -> Checked:
    """Verify `signature` (SSH signature blob) of `data` with public key blob `key`."""
    # Imported here: only an apply that meets a signature pays for OpenSSL's bindings.
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    kr, sr = _Reader(key), _Reader(signature)
    ktype, stype = kr.text(), sr.text()
    try:
        if ktype == ED25519:
            pub = kr.string()
            kr.done()
            if stype != ED25519:
                raise Invalid(f"signature type {stype} for a {ktype} key")
            sig = sr.string()
            sr.done()
            ed25519.Ed25519PublicKey.from_public_bytes(pub).verify(sig, data)
            return Checked(ktype)
        if ktype == SK_ED25519:
            pub, application = kr.string(), kr.string()
            kr.done()
            if stype != SK_ED25519:
                raise Invalid(f"signature type {stype} for a {ktype} key")
            sig, flags, counter = sr.string(), sr.byte(), sr.u32()
            sr.done()
            # PROTOCOL.u2f: the authenticator signs H(application) || flags || counter || H(m)
            message = (hashlib.sha256(application).digest() + bytes([flags])
                       + struct.pack(">I", counter) + hashlib.sha256(data).digest())
            ed25519.Ed25519PublicKey.from_public_bytes(pub).verify(sig, message)
            return Checked(ktype, counter, flags)
        if ktype == ECDSA_P256:
            curve, point = kr.text(), kr.string()
            kr.done()
            if curve != "nistp256" or stype != ECDSA_P256:
                raise Invalid(f"signature type {stype} / curve {curve} for a {ktype} key")
            inner = _Reader(sr.string())
            sr.done()
            r_, s_ = inner.mpint(), inner.mpint()
            inner.done()
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point).verify(
                encode_dss_signature(r_, s_), data, ec.ECDSA(hashes.SHA256()))
            return Checked(ktype)
        if ktype == RSA:
            e, n = kr.mpint(), kr.mpint()
            kr.done()
            if stype not in _RSA_SIGS:
                raise Invalid(f"RSA signature type {stype} is not accepted (SHA-1); sign "
                              "with rsa-sha2-512 (ssh-keygen's default)")
            if n.bit_length() < MIN_RSA_BITS:
                raise Invalid(f"RSA key of {n.bit_length()} bits (at least {MIN_RSA_BITS})")
            sig = sr.string()
            sr.done()
            digest = hashes.SHA256() if _RSA_SIGS[stype] == "sha256" else hashes.SHA512()
            rsa.RSAPublicNumbers(e, n).public_key().verify(sig, data, padding.PKCS1v15(),
                                                            digest)
            return Checked(ktype)
    except InvalidSignature:
        raise Invalid("the signature does not match the signed bytes (the file was changed "
                      "after signing, or the signature is of another file)") from None
    except ValueError as exc:  # a malformed point or key
        raise Invalid(f"malformed {ktype} key or signature: {exc}") from None
    raise Invalid(f"key type {ktype[:60]!r} is not supported",)


# --- key lists -----------------------------------------------------------------------------

_TOKEN = re.compile(r'(?:"[^"]*"|[^\s"])+')


def _key_blob(ktype: str, b64: str) -> bytes:
    if ktype.endswith("-cert-v01@openssh.com"):
        raise Invalid("certificates are not supported: list the signer's plain public key")
    if ktype not in KEY_TYPES:
        raise Invalid(f"key type {ktype[:60]!r} is not supported", )
    try:
        blob = base64.b64decode(b64, validate=True)
    except binascii.Error:
        raise Invalid("the key is not valid base64") from None
    if key_type(blob) != ktype:
        raise Invalid(f"the key's blob is a {key_type(blob)[:60]}, not a {ktype}")
    return blob


def _options(text: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for m in re.finditer(r'([A-Za-z-]+)(?:="([^"]*)")?(?:,|$)', text):
        out[m.group(1).lower()] = m.group(2)
    rebuilt = ",".join(k if v is None else f'{k}="{v}"' for k, v in out.items())
    if len(rebuilt) != len(text):
        raise Invalid(f"cannot read the options {text[:80]!r}")
    return out


def parse_time(text: str) -> float:
    """ssh-keygen's YYYYMMDD[HHMM[SS]][Z] (Z: UTC; else local time)."""
    utc = text.endswith(("Z", "z"))
    digits = text[:-1] if utc else text
    if not re.fullmatch(r"\d{8}(?:\d{4}(?:\d{2})?)?", digits):
        raise Invalid(f"time {text!r} is not YYYYMMDD[HHMM[SS]][Z]")
    digits = digits.ljust(14, "0")
    parts = time.strptime(digits, "%Y%m%d%H%M%S")
    return float(calendar.timegm(parts) if utc else time.mktime(parts))


def _signer(line: str, n: int) -> AllowedSigner:
    tokens = _TOKEN.findall(line)
    if len(tokens) < 3:
        raise Invalid("expected: principals [options] key-type base64-key")
    principals = tuple(p for p in tokens[0].strip('"').split(",") if p)
    opts: dict[str, str | None] = {}
    rest = tokens[1:]
    if rest[0] not in KEY_TYPES and not rest[0].endswith("-cert-v01@openssh.com") \
            and ("=" in rest[0] or rest[0].lower() == "cert-authority"
                 or rest[0].lower().split(",")[0] in ("cert-authority", "namespaces",
                                                      "valid-after", "valid-before")):
        opts = _options(rest[0])
        rest = rest[1:]
    if len(rest) < 2:
        raise Invalid("expected: principals [options] key-type base64-key")
    if "cert-authority" in opts:
        raise Invalid("cert-authority is not supported: list each signer's public key")
    unknown = set(opts) - {"namespaces", "valid-after", "valid-before"}
    if unknown:
        raise Invalid(f"unknown option {sorted(unknown)[0]!r}")
    ns = opts.get("namespaces")
    return AllowedSigner(
        principals=principals, key=_key_blob(rest[0], rest[1]),
        namespaces=tuple(x for x in ns.split(",") if x) if ns is not None else None,
        valid_after=parse_time(opts["valid-after"] or "") if "valid-after" in opts else None,
        valid_before=parse_time(opts["valid-before"] or "") if "valid-before" in opts
        else None, line=n)


def _lines(data: bytes, path: str) -> list[tuple[int, str]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise LoaderdError(Kind.SIGNATURE, "not UTF-8 text", Location(path)) from None
    return [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), 1)
            if ln.strip() and not ln.strip().startswith("#")]


def parse_allowed_signers(data: bytes, path: str) -> tuple[AllowedSigner, ...]:
    out = []
    for n, line in _lines(data, path):
        try:
            out.append(_signer(line, n))
        except Invalid as exc:
            raise LoaderdError(Kind.SIGNATURE, str(exc), Location(path, n),
                               allowed="ssh-keygen(1) ALLOWED SIGNERS lines") from None
    return tuple(out)


def parse_revoked(data: bytes, path: str) -> frozenset[bytes]:
    """Plain public keys, one per line (`ssh-keygen -Y verify -r`); a KRL is refused."""
    if data.startswith(_KRL_MAGIC):
        raise LoaderdError(Kind.SIGNATURE, "this is a binary KRL, which loaderd does not read",
                           Location(path), allowed="the revoked public keys, one per line "
                           "(cat the .pub files)")
    out = set()
    for n, line in _lines(data, path):
        tokens = line.split()
        try:
            if len(tokens) < 2:
                raise Invalid("expected: key-type base64-key [comment]")
            out.add(_key_blob(tokens[0], tokens[1]))
        except Invalid as exc:
            raise LoaderdError(Kind.SIGNATURE, str(exc), Location(path, n)) from None
    return frozenset(out)


# --- the verdict on one spec ---------------------------------------------------------------

def _match_pattern(text: str, pattern: str) -> bool:
    """OpenSSH's match_pattern: `*` and `?` are the only wildcards (no [] classes)."""
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, text, re.S) is not None


def match_pattern_list(text: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """OpenSSH's match_pattern_list (how ssh-keygen -Y verify reads namespaces=): a matching
    `!pattern` denies whatever else matches; otherwise any matching pattern allows."""
    allowed = False
    for p in patterns:
        if p.startswith("!"):
            if _match_pattern(text, p[1:]):
                return False
        elif _match_pattern(text, p):
            allowed = True
    return allowed


def _principal_ok(s: AllowedSigner, now: float) -> str | None:
    """Why signer line `s` does not vouch for a loaderd-spec signature now (None: it does)."""
    if s.namespaces is not None and not match_pattern_list(NAMESPACE, s.namespaces):
        return f"the key is not allowed for namespace {NAMESPACE} (namespaces=" \
               f"\"{','.join(s.namespaces)}\")"
    if s.valid_before is not None and now > s.valid_before:
        return "the key expired (valid-before " + time.strftime(
            "%Y-%m-%d %H:%M:%S UTC", time.gmtime(s.valid_before)) + ")"
    if s.valid_after is not None and now < s.valid_after:
        return "the key is not valid yet (valid-after " + time.strftime(
            "%Y-%m-%d %H:%M:%S UTC", time.gmtime(s.valid_after)) + ")"
    return None


def verify(message: bytes, armored: bytes, policy: SignaturePolicy, *,
           now: float | None = None) -> SignatureFacts:
    """The facts of a good signature of `message`, or Invalid saying why it is not one."""
    now = time.time() if now is None else now
    sig = parse_armored(armored)
    fp = fingerprint(sig.key)
    if sig.namespace != NAMESPACE:
        raise Invalid(f"signature namespace {sig.namespace[:60]!r} is not {NAMESPACE!r} (sign "
                      f"with ssh-keygen -Y sign -n {NAMESPACE})")
    if sig.hash_alg not in _HASHES:
        raise Invalid(f"hash algorithm {sig.hash_alg[:40]!r} (sha256 or sha512)")
    if sig.key in policy.revoked:
        raise Invalid(f"key {fp} is revoked ({policy.revoked_keys})")
    checked = verify_raw(sig.key, sig.signature, signed_data(sig.namespace, sig.hash_alg,
                                                             message))
    facts = SignatureFacts(SignatureStatus.UNCHECKED_SIGNER, None, fp, checked.key_type,
                           sig.namespace, hashlib.sha256(message).hexdigest(), checked.counter)
    if policy.allowed_signers is None:
        if policy.mode is not SignatureMode.OFF:
            raise Invalid("no allowed_signers file is configured")
        return facts
    lines = [s for s in policy.signers if s.key == sig.key]
    if not lines:
        raise Invalid(f"key {fp} is not in {policy.allowed_signers} (unknown signer)")
    why = [w for w in (_principal_ok(s, now) for s in lines) if w]
    good = [s for s in lines if _principal_ok(s, now) is None]
    if not good:
        raise Invalid(f"key {fp}: {why[0]}")
    if checked.flags is not None and not checked.flags & SK_USER_PRESENT:
        raise Invalid(f"key {fp}: the FIDO signature lacks user presence (nobody touched the "
                      "authenticator)")
    principal = ",".join(dict.fromkeys(p for s in good for p in s.principals))
    return SignatureFacts(SignatureStatus.VERIFIED, principal, fp, checked.key_type,
                          sig.namespace, facts.signed_sha256, checked.counter)


def check(spec_path: str, yaml_bytes: bytes, sig_bytes: bytes | None,
          policy: SignaturePolicy) -> SignatureFacts:
    """The verdict on one spec: facts, or a located refusal naming the .sig file."""
    where = Location(spec_path + SUFFIX)
    if sig_bytes is None:
        if policy.mode is SignatureMode.ENFORCE:
            raise LoaderdError(Kind.SIGNATURE, "the spec is not signed and signatures.mode is "
                               "enforce", Location(spec_path), allowed=f"a detached "
                               f"{spec_path.rsplit('/', 1)[-1]}{SUFFIX} (ssh-keygen -Y sign "
                               f"-n {NAMESPACE})")
        return SignatureFacts(SignatureStatus.UNSIGNED,
                              signed_sha256=hashlib.sha256(yaml_bytes).hexdigest())
    if len(sig_bytes) > MAX_SIG_BYTES:
        raise LoaderdError(Kind.SIGNATURE, "signature file too large", where,
                           allowed=f"<= {MAX_SIG_BYTES} bytes")
    try:
        return verify(yaml_bytes, sig_bytes, policy)
    except Invalid as exc:
        raise LoaderdError(Kind.SIGNATURE, f"bad signature: {exc}; the spec is refused "
                           "(a present signature must verify in every mode)", where) from None


def check_pin(want: str | None, data: bytes, *, required: bool) -> str | None:
    """Why `source.sha256` does not vouch for `data` (None: it does, or is not required)."""
    got = hashlib.sha256(data).hexdigest()
    if want is None:
        return (f"the file is not pinned: add sha256: {got} (signatures cover the source "
                "only through its pin)") if required else None
    if want != got:
        return f"sha256 mismatch: the spec pins {want}, the file has {got}"
    return None
