"""Signed specs with real `ssh-keygen`-made keys and signatures; `ssh-keygen -Y verify` is the
reference for every verdict loaderd reaches on its own (config.signature)."""

from __future__ import annotations

import base64
import hashlib
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from loaderd.config import settings as settings_mod
from loaderd.config import signature
from loaderd.config import spec as specmod
from loaderd.errors import Kind, LoaderdError
from loaderd.model import (
    Settings,
    SignatureMode,
    SignaturePolicy,
    SignatureStatus,
)

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None,
                                reason="ssh-keygen (openssh-client) not installed")
PRINCIPAL = "alice@example.com"
C_TEXT = b"int count(void *ctx) { return 0; }\n"


def _spec_yaml(sha: str | None, name: str = "demo") -> bytes:
    pin = f"\n  sha256: {sha}" if sha else ""
    return (f"loaderd: 1\nname: {name}\nsource:\n  file: {name}.bpf.c{pin}\n"
            "programs:\n  - {name: count, type: socket_filter}\n").encode()


def keygen(d: Path, name: str, kind: str = "ed25519") -> Path:
    key = d / name
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", name, "-f", str(key)],
                   check=True, stdin=subprocess.DEVNULL)
    return key


def sign(key: Path, file: Path, namespace: str = signature.NAMESPACE) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-n", namespace, "-f", str(key),
                    str(file)], check=True, stdin=subprocess.DEVNULL, capture_output=True)
    return Path(str(file) + ".sig")


def reference(allowed: Path, file: Path, sig: Path, revoked: Path | None = None) -> bool:
    """ssh-keygen's own verdict on the same files."""
    argv = ["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", PRINCIPAL,
            "-n", signature.NAMESPACE, "-s", str(sig)]
    if revoked is not None:
        argv += ["-r", str(revoked)]
    with open(file, "rb") as f:
        return subprocess.run(argv, stdin=f, capture_output=True).returncode == 0


def allowed_line(key: Path, options: str = f'namespaces="{signature.NAMESPACE}"') -> str:
    return f"{PRINCIPAL} {options} {Path(str(key) + '.pub').read_text().strip()}\n"


@dataclass
class Kit:
    d: Path
    key: Path
    other: Path  # a key nobody allowed
    allowed: Path
    revoked: Path
    programs: Path

    def policy(self, mode: SignatureMode, *, revoke: bool = False) -> SignaturePolicy:
        if revoke:
            self.revoked.write_text(Path(str(self.key) + ".pub").read_text())
        return SignaturePolicy(
            mode, str(self.allowed), str(self.revoked),
            signature.parse_allowed_signers(self.allowed.read_bytes(), str(self.allowed)),
            signature.parse_revoked(self.revoked.read_bytes(), str(self.revoked)))

    def load(self, policy: SignaturePolicy) -> tuple[list[object], list[LoaderdError]]:
        specs, errors = specmod.load_dir(str(self.programs), Settings(signatures=policy),
                                         check_owner=False)
        return list(specs), errors


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("keys")
    return keygen(d, "signer"), keygen(d, "stranger")


@pytest.fixture
def kit(tmp_path: Path, keys: tuple[Path, Path]) -> Kit:
    programs = tmp_path / "programs.d"
    programs.mkdir()
    (programs / "demo.bpf.c").write_bytes(C_TEXT)
    (programs / "demo.yaml").write_bytes(_spec_yaml(hashlib.sha256(C_TEXT).hexdigest()))
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(allowed_line(keys[0]))
    revoked = tmp_path / "revoked_keys"
    revoked.write_text("")
    return Kit(tmp_path, keys[0], keys[1], allowed, revoked, programs)


# --- each case in each mode ----------------------------------------------------------------

def _good(k: Kit) -> None:
    sign(k.key, k.programs / "demo.yaml")


def _unsigned(k: Kit) -> None:
    pass


def _tampered_yaml(k: Kit) -> None:
    sign(k.key, k.programs / "demo.yaml")
    spec = k.programs / "demo.yaml"
    spec.write_bytes(spec.read_bytes().replace(b"socket_filter", b"socket_filter  "))


def _tampered_c(k: Kit) -> None:
    sign(k.key, k.programs / "demo.yaml")
    (k.programs / "demo.bpf.c").write_bytes(C_TEXT.replace(b"return 0", b"return 1"))


def _unpinned(k: Kit) -> None:  # spec-local files are the source/object (no local headers)
    (k.programs / "demo.yaml").write_bytes(_spec_yaml(None))
    sign(k.key, k.programs / "demo.yaml")


def _wrong_namespace(k: Kit) -> None:
    sign(k.key, k.programs / "demo.yaml", namespace="git")


def _unknown_principal(k: Kit) -> None:
    sign(k.other, k.programs / "demo.yaml")


def _expired(k: Kit) -> None:
    k.allowed.write_text(allowed_line(k.key, f'namespaces="{signature.NAMESPACE}",'
                                             'valid-after="20200101",valid-before="20240101Z"'))
    sign(k.key, k.programs / "demo.yaml")


def _not_this_namespace(k: Kit) -> None:
    k.allowed.write_text(allowed_line(k.key, 'namespaces="git"'))
    sign(k.key, k.programs / "demo.yaml")


def _another_file(k: Kit) -> None:
    other = k.d / "other.yaml"
    other.write_bytes(_spec_yaml(hashlib.sha256(C_TEXT).hexdigest(), "other"))
    sig = sign(k.key, other)
    shutil.copy(sig, k.programs / "demo.yaml.sig")


CASES = {  # case -> (setup, revoke the signer's key, accepted in enforce/permissive/off)
    "good": (_good, False, (True, True, True)),
    "unsigned": (_unsigned, False, (False, True, True)),
    "tampered yaml": (_tampered_yaml, False, (False, False, False)),
    "tampered c": (_tampered_c, False, (False, False, False)),
    "unpinned source": (_unpinned, False, (False, False, False)),
    "wrong namespace": (_wrong_namespace, False, (False, False, False)),
    "unknown principal": (_unknown_principal, False, (False, False, False)),
    "expired key": (_expired, False, (False, False, False)),
    "key not for loaderd-spec": (_not_this_namespace, False, (False, False, False)),
    "revoked key": (_good, True, (False, False, False)),
    "signature over another file": (_another_file, False, (False, False, False)),
}
MODES = (SignatureMode.ENFORCE, SignatureMode.PERMISSIVE, SignatureMode.OFF)


@pytest.mark.parametrize("mode", MODES, ids=[m.value for m in MODES])
@pytest.mark.parametrize("case", list(CASES))
def test_case_in_mode(kit: Kit, case: str, mode: SignatureMode) -> None:
    setup, revoke, verdicts = CASES[case]
    setup(kit)
    policy = kit.policy(mode, revoke=revoke)
    specs, errors = kit.load(policy)
    accepted = verdicts[MODES.index(mode)]
    sig = kit.programs / "demo.yaml.sig"
    if sig.exists() and case != "tampered c" and case != "unpinned source":
        # ssh-keygen agrees on the signature itself (the pin is loaderd's own check)
        assert reference(kit.allowed, kit.programs / "demo.yaml", sig,
                         kit.revoked if revoke else None) == (case == "good" and not revoke)
    if accepted:
        assert not errors, errors
        (s,) = specs
        facts = s.signature  # type: ignore[attr-defined]
        if case == "good":
            assert facts.status is SignatureStatus.VERIFIED
            assert facts.principal == PRINCIPAL
            pub = subprocess.run(["ssh-keygen", "-lf", str(kit.key) + ".pub"],
                                 capture_output=True, text=True, check=True).stdout
            assert facts.fingerprint == pub.split()[1]
            assert facts.namespace == signature.NAMESPACE
            assert facts.signed_sha256 == hashlib.sha256(
                (kit.programs / "demo.yaml").read_bytes()).hexdigest()
        else:
            assert facts.status is SignatureStatus.UNSIGNED
        return
    assert not specs
    assert errors and errors[0].kind is Kind.SIGNATURE, errors
    text = str(errors[0])
    assert "demo.yaml" in text
    want = {
        "unsigned": "not signed", "tampered yaml": "does not match the signed bytes",
        "tampered c": "sha256 mismatch", "unpinned source": "not pinned",
        "wrong namespace": "namespace 'git'", "unknown principal": "unknown signer",
        "expired key": "expired", "key not for loaderd-spec": "not allowed for namespace",
        "revoked key": "revoked", "signature over another file":
        "does not match the signed bytes"}[case]
    assert want in text, text


def test_enforce_refuses_unpinned_even_unsigned(kit: Kit) -> None:
    (kit.programs / "demo.yaml").write_bytes(_spec_yaml(None))
    _, errors = kit.load(kit.policy(SignatureMode.PERMISSIVE))
    assert not errors  # permissive, unsigned: nothing is claimed, nothing to cover
    policy = kit.policy(SignatureMode.ENFORCE)
    spec_path = str(kit.programs / "demo.yaml")
    spec, errs = specmod.parse_spec(spec_path, limits=Settings().policy.limits,
                                    owner_uid=None, signatures=policy)
    assert spec is None and "not signed" in str(errs[0])


def test_pin_mismatch_refused_without_signatures(kit: Kit) -> None:
    (kit.programs / "demo.bpf.c").write_bytes(b"int count(void *c) { return 2; }\n")
    _, errors = kit.load(SignaturePolicy())
    assert errors and "sha256 mismatch" in str(errors[0])
    assert errors[0].location.field == "source.sha256"


# --- key types -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ed25519", "ecdsa", "rsa"])
def test_key_types_agree_with_ssh_keygen(tmp_path: Path, kind: str) -> None:
    key = keygen(tmp_path, f"k_{kind}", kind)
    allowed = tmp_path / "allowed"
    allowed.write_text(allowed_line(key))
    msg = tmp_path / "m.yaml"
    msg.write_bytes(b"loaderd: 1\n")
    sig = sign(key, msg)
    assert reference(allowed, msg, sig)
    policy = SignaturePolicy(SignatureMode.ENFORCE, str(allowed), None,
                             signature.parse_allowed_signers(allowed.read_bytes(), "allowed"))
    facts = signature.verify(msg.read_bytes(), sig.read_bytes(), policy)
    assert facts.status is SignatureStatus.VERIFIED and facts.principal == PRINCIPAL
    with pytest.raises(signature.Invalid, match="does not match"):
        signature.verify(b"loaderd: 2\n", sig.read_bytes(), policy)


def _sk_sign(priv: ed25519.Ed25519PrivateKey, message: bytes, flags: int, counter: int,
             application: bytes = b"ssh:") -> tuple[str, bytes]:
    """A FIDO (sk-ssh-ed25519) key line and SSHSIG signature made as an authenticator would
    (PROTOCOL.u2f): no hardware here, so the test is the authenticator; ssh-keygen judges."""
    def s(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b
    pub = priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    blob = s(signature.SK_ED25519.encode()) + s(pub) + s(application)
    inner = signature.signed_data(signature.NAMESPACE, "sha512", message)
    signed = (hashlib.sha256(application).digest() + bytes([flags]) + struct.pack(">I", counter)
              + hashlib.sha256(inner).digest())
    sigblob = s(signature.SK_ED25519.encode()) + s(priv.sign(signed)) + bytes([flags]) \
        + struct.pack(">I", counter)
    sshsig = (b"SSHSIG" + struct.pack(">I", 1) + s(blob) + s(signature.NAMESPACE.encode())
              + s(b"") + s(b"sha512") + s(sigblob))
    b64 = base64.b64encode(sshsig).decode()
    armored = ("-----BEGIN SSH SIGNATURE-----\n"
               + "\n".join(b64[i:i + 70] for i in range(0, len(b64), 70))
               + "\n-----END SSH SIGNATURE-----\n").encode()
    return f"{signature.SK_ED25519} {base64.b64encode(blob).decode()} fido", armored


@pytest.mark.parametrize("flags,ok", [(0x01, True), (0x05, True), (0x00, False), (0x04, False)])
def test_fido_key_agrees_with_ssh_keygen(tmp_path: Path, flags: int, ok: bool) -> None:
    msg = tmp_path / "m.yaml"
    msg.write_bytes(b"loaderd: 1\n")
    line, armored = _sk_sign(ed25519.Ed25519PrivateKey.generate(), msg.read_bytes(), flags, 7)
    sig = tmp_path / "m.yaml.sig"
    sig.write_bytes(armored)
    allowed = tmp_path / "allowed"
    allowed.write_text(f'{PRINCIPAL} namespaces="{signature.NAMESPACE}" {line}\n')
    # The signature is genuine either way: ssh-keygen 9.2's -Y verify does not look at the
    # flags; loaderd refuses a signature nobody touched the authenticator for.
    assert reference(allowed, msg, sig)
    policy = SignaturePolicy(SignatureMode.ENFORCE, str(allowed), None,
                             signature.parse_allowed_signers(allowed.read_bytes(), "allowed"))
    if ok:
        facts = signature.verify(msg.read_bytes(), armored, policy)
        assert facts.key_type == signature.SK_ED25519 and facts.counter == 7
    else:
        with pytest.raises(signature.Invalid, match="lacks user presence"):
            signature.verify(msg.read_bytes(), armored, policy)


def test_fido_tampered_counter_refused(tmp_path: Path) -> None:
    _, armored = _sk_sign(ed25519.Ed25519PrivateKey.generate(), b"x", 1, 7)
    sig = signature.parse_armored(armored)
    bad = sig.signature[:-4] + struct.pack(">I", 8)
    with pytest.raises(signature.Invalid, match="does not match"):
        signature.verify_raw(sig.key, bad, signature.signed_data(
            signature.NAMESPACE, "sha512", b"x"))


# --- the files ----------------------------------------------------------------------------

def test_time_formats() -> None:
    assert signature.parse_time("20240101Z") == 1704067200
    assert signature.parse_time("202401010130Z") == 1704067200 + 5400
    assert signature.parse_time("20240101013005Z") == 1704067200 + 5405
    local = signature.parse_time("20240101")
    assert local == time.mktime(time.strptime("20240101", "%Y%m%d"))
    with pytest.raises(signature.Invalid):
        signature.parse_time("2024-01-01")


def test_refused_list_formats(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    pub = Path(str(keys[0]) + ".pub")
    with pytest.raises(LoaderdError, match="cert-authority is not supported") as e:
        signature.parse_allowed_signers(f"*@example.com cert-authority {pub.read_text()}"
                                        .encode(), "allowed")
    assert e.value.location.line == 1
    with pytest.raises(LoaderdError, match="unknown option"):
        signature.parse_allowed_signers(f"a namespaces=\"x\",restrict {pub.read_text()}"
                                        .encode(), "allowed")
    krl = tmp_path / "krl"
    subprocess.run(["ssh-keygen", "-q", "-k", "-f", str(krl), str(pub)], check=True,
                   stdin=subprocess.DEVNULL)
    with pytest.raises(LoaderdError, match="binary KRL"):
        signature.parse_revoked(krl.read_bytes(), str(krl))
    got = signature.parse_revoked(b"# gone\n" + pub.read_bytes(), "revoked")
    assert len(got) == 1


def test_settings_signatures(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(allowed_line(keys[0]))
    conf = tmp_path / "loaderd.yaml"
    conf.write_text(f"loaderd: 1\nsignatures:\n  mode: enforce\n  allowed_signers: {allowed}\n")
    s = settings_mod.load_settings(str(conf), owner_uid=None)
    assert s.signatures.mode is SignatureMode.ENFORCE and len(s.signatures.signers) == 1
    conf.write_text("loaderd: 1\nsignatures:\n  mode: permissive\n")
    with pytest.raises(LoaderdError, match=r"needs signatures\.allowed_signers") as e:
        settings_mod.load_settings(str(conf), owner_uid=None)
    assert e.value.location.line == 3
    allowed.chmod(0o666)
    conf.write_text(f"loaderd: 1\nsignatures:\n  mode: enforce\n  allowed_signers: {allowed}\n")
    with pytest.raises(LoaderdError, match="writable by group or other") as e:
        settings_mod.load_settings(str(conf), owner_uid=0)
    assert e.value.location.field == "signatures.allowed_signers"


@pytest.mark.parametrize("namespaces", ["!loaderd-spec,*", "loaderd-spe[c]", "loaderd-*",
                                        "loaderd-sp?c", "git,loaderd-spec", "*,!loaderd-*",
                                        "LOADERD-SPEC"])
def test_namespace_patterns_agree_with_ssh_keygen(kit: Kit, namespaces: str) -> None:
    """namespaces= is an OpenSSH pattern list (`!` denies, only * and ? are wildcards), read
    exactly as ssh-keygen -Y verify reads it; fnmatch would allow `!x,*` and `[c]`."""
    kit.allowed.write_text(allowed_line(kit.key, f'namespaces="{namespaces}"'))
    sig = sign(kit.key, kit.programs / "demo.yaml")
    want = reference(kit.allowed, kit.programs / "demo.yaml", sig)
    assert signature.match_pattern_list(signature.NAMESPACE, namespaces.split(",")) == want
    _, errors = kit.load(kit.policy(SignatureMode.ENFORCE, revoke=False))
    assert (not errors) == want, (namespaces, errors)
