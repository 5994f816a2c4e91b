"""The fuzz targets, the input generators and the oracle.

Input `i` of seed `s` is made from `random.Random(f"{s}:{i}")` alone, so any finding replays
with `python3 -m tests.fuzz --seed s --replay i`. Each target returns normally or raises
`LoaderdError`; for the file parsers every error must also be located (its file set) and one
line. Anything else is a crash; an input that takes over `HANG_S` of CPU is a hang (a
per-input ITIMER_PROF alarm interrupts it; the time is checked too, for C code an alarm cannot
break). CPU time, not wall time: the host is shared, and a starved input is not a slow one;
an input blocked without spending CPU is caught by the runner's wall-clock watchdog.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import math
import os
import random
import signal
import string
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loaderd import policy, sanitize
from loaderd.config.settings import load_settings
from loaderd.config.spec import parse_spec
from loaderd.errors import LoaderdError
from loaderd.layout import decode, parse_layout
from loaderd.model import Limits, Settings
from loaderd.store import manifest

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "corpus"
SCHEMAS = REPO / "loaderd" / "config" / "schemas"
HANG_S = 1.0
LIMITS = Limits(max_spec_bytes=16 * 1024, max_source_bytes=16 * 1024)
PIN_ROOT = "/sys/fs/bpf/loaderd"

GOOD_MANIFEST: dict[str, Any] = {
    "version": 1, "status": "committed", "txid": "20261203t071100-123456789-abcdef",
    "written_at": 1.5, "removed": [],
    "last_apply": {"at": 2.0, "compiles": 1, "built": ["counter"], "adopted": []},
    "specs": {"counter": {
        "name": "counter", "file": "/etc/loaderd/programs.d/counter.yaml",
        "sha256": "a" * 64, "pin_dir": f"{PIN_ROOT}/counter",
        "programs": {"count": {"name": "count", "function": "count", "type": "tracepoint",
                               "id": 7, "tag": "0123456789abcdef", "helpers": ["ktime_get_ns"],
                               "degraded": None,
                               "calls": {"bpf_to_bpf": 0, "kfunc": 0, "callx": 0}},
                     "xdp": {"name": "xdp", "function": "xdp", "type": "xdp", "id": 8,
                             "tag": "0123456789abcdef", "helpers": [], "degraded": None}},
        "maps": {"counts": {"name": "counts", "id": 3, "frozen": False, "access": ""},
                 "events": {"name": "events", "id": 4, "frozen": False, "access": ""}},
        "links": {"count": {"target": "tracepoint:sched:sched_process_exec", "id": 9},
                  "xdp": {"target": "xdp:eth0:skb", "id": 10, "ifindex": 2}},
        "sources": ["/etc/loaderd/programs.d/counter.bpf.c"],
        "txid": "20261203t071100-123456789-abcdef", "deferred_links": ["xdp"],
        "events": {"events": "pid:u32,saddr:u32,comm:bytes16"}}},
}
LAYOUTS = ["pid:u32,uid:u32,comm:bytes16", "saddr:u32,daddr:u32,sport:u16,dport:u16",
           "ts:u64,cpu:u8,flags:s16,ip:u32,addr:bytes16,user:u32,token:bytes8",
           "a:u8,b:u64,c:s8,d:s32,email:bytes32", "x:bytes1"]
# Text the sanitizer hunts for: addresses, secrets, card numbers, near misses of each.
TEXT_BITS = ["10.1.2.3", "256.1.1.1", "::1", "fe80::1%eth0", "[2001:db8::1]:80", "1.2.3",
             "password=hunter2", "token: abc", '"api_key": "x"', "Bearer abcdef",
             "ghp_" + "a" * 36, "AKIA" + "A" * 16, "https://u:p@h/", "4111 1111 1111 1111",
             "4111111111111112", "::" * 30, "1." * 40, "a:" * 50, "%" * 20, "password" * 10,
             "0" * 64, "ffff:" * 9]


def _schema_words() -> list[str]:
    """Keys, enum values and patterns' literals of both schemas: the tokens a mutation needs
    to reach past the first schema error."""
    words: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "properties" and isinstance(v, dict):
                    words.update(v)
                if k in ("enum", "const"):
                    words.update(str(x) for x in (v if isinstance(v, list) else [v]))
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for p in SCHEMAS.glob("*.json"):
        walk(json.loads(p.read_text()))
    return sorted(words)


YAML_TOKENS = ["- ", ": ", "\n", "\n  ", "{", "}", "[", "]", ",", "&a ", "*a", "!!str ",
               "!!python/object ", "? ", "|\n", ">-\n", "'", '"', "#", "---\n", "...\n",
               "%YAML 1.1\n", "<<: ", "~", "null", "yes", "0o17", "0x1F", ".inf", ".nan",
               "1e400", "-0", "0640", "\t", "\r", "\r\n", "\ufeff", "\x00", "\x85", "\u2028",
               "\\x", "\\u", "\udcff", "é", "🙂"]


@dataclass(frozen=True)
class Finding:
    seed: int
    index: int
    target: str
    what: str  # crash | hang | unlocated
    detail: str
    data: bytes


class _Hang(BaseException):
    """Raised by the alarm: a BaseException, so no `except Exception` in the code under test
    swallows it."""


def _alarm(_sig: int, _frame: Any) -> None:
    raise _Hang


class Corpus:
    def __init__(self) -> None:
        self.specs: list[bytes] = []
        self.settings: list[bytes] = []
        self.trees: list[Any] = []
        self.settings_trees: list[Any] = []
        for p in sorted((CORPUS / "good").glob("*.yaml")) + sorted(
                (CORPUS / "bad").glob("*.yaml")) + sorted((REPO / "configs").rglob("*.yaml")):
            if p.is_symlink():
                continue
            data = p.read_bytes()
            is_settings = b'# target: "settings"' in data or p.name == "loaderd.yaml"
            (self.settings if is_settings else self.specs).append(data)
            for line in data.splitlines():  # policy cases carry a settings document
                if line.startswith(b"# settings: "):
                    doc = {"loaderd": 1, **json.loads(line[12:])}
                    self.settings.append(yaml.safe_dump(doc).encode())
                    self.settings_trees.append(doc)
            try:
                tree = yaml.safe_load(data)
            except (yaml.YAMLError, ValueError):  # bad cases: 5000-digit ints and worse
                continue
            # Not the alias bombs: their trees share nodes, and walking one is exponential (the
            # byte mutations keep those cases)
            if isinstance(tree, dict) and len(data) <= LIMITS.max_spec_bytes and _small(tree):
                (self.settings_trees if is_settings else self.trees).append(tree)
        self.sources = {p.name: p.read_bytes() for p in (CORPUS / "good").glob("*.c")}
        self.words = _schema_words()


class Gen:
    """Generated and mutated inputs from one Random."""

    def __init__(self, rng: random.Random, corpus: Corpus) -> None:
        self.r, self.c = rng, corpus

    def scalar(self) -> Any:
        r = self.r
        makers: list[Callable[[], Any]] = [
            lambda: None, lambda: r.random() < 0.5, lambda: r.randint(-3, 70000),
            lambda: r.choice([2**31, 2**32, 2**63, -(2**63) - 1, 2**64, 10**30, -1, 0]),
            lambda: r.choice([math.inf, -math.inf, math.nan, 0.5, -0.0, 1e308]),
            lambda: r.choice(self.c.words), lambda: self.text(12),
            lambda: r.choice(["u8", "s64", "bytes16", "sched:sched_switch", "lo", "0640",
                              "/etc/passwd", "../x", "a" * 300, "", " ", "0a0b", "zz"]),
        ]
        return r.choice(makers)()

    def text(self, n: int) -> str:
        r = self.r
        pool = r.choice([string.printable, string.ascii_lowercase + "_:,0123456789",
                         "".join(YAML_TOKENS)])
        return "".join(r.choice(pool) for _ in range(r.randint(0, n)))

    def tree(self, depth: int = 0) -> Any:
        r = self.r
        if depth > 3 or r.random() < 0.5:
            return self.scalar()
        if r.random() < 0.5:
            return [self.tree(depth + 1) for _ in range(r.randint(0, 4))]
        return {str(r.choice(self.c.words) if r.random() < 0.7 else self.scalar()):
                self.tree(depth + 1) for _ in range(r.randint(0, 4))}

    def mutate_tree(self, doc: Any, steps: int) -> Any:
        r = self.r
        doc = copy.deepcopy(doc)
        for _ in range(steps):
            spots = _containers(doc)
            if not spots:
                return self.tree()
            node = r.choice(spots)
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            how = r.randrange(4)
            if not keys or how == 0:
                if isinstance(node, dict):
                    node[r.choice(self.c.words)] = self.tree(2)
                else:
                    node.append(copy.deepcopy(r.choice(spots)) if r.random() < 0.2
                                else self.tree(2))
            elif how == 1:
                del node[r.choice(keys)]
            elif how == 2:
                node[r.choice(keys)] = self.tree(2)
            else:  # swap in another corpus document's subtree of the same key
                k = r.choice(keys)
                other = r.choice(self.c.trees)
                if isinstance(node, dict) and k in other:
                    node[k] = copy.deepcopy(other[k])
                else:
                    node[k] = self.scalar()
        return doc

    def mutate_bytes(self, data: bytes, steps: int) -> bytes:
        r = self.r
        b = bytearray(data)
        for _ in range(steps):
            how = r.randrange(9)
            at = r.randint(0, len(b))
            if how == 0 and b:
                b[at % len(b)] ^= 1 << r.randrange(8)
            elif how == 1 and b:
                b[at % len(b)] = r.randrange(256)
            elif how == 2:
                b[at:at] = bytes(r.randrange(256) for _ in range(r.randint(1, 8)))
            elif how == 3:
                del b[at:at + r.randint(1, 32)]
            elif how == 4 and b:
                start = r.randrange(len(b))
                b[at:at] = b[start:start + r.randint(1, 64)]
            elif how == 5:
                b[at:at] = r.choice(YAML_TOKENS).encode("utf-8", "surrogatepass")
            elif how == 6:
                b[at:at] = r.choice(self.c.words).encode()
            elif how == 7:
                other = r.choice(self.c.specs)
                start = r.randrange(len(other) or 1)
                b[at:at] = other[start:start + r.randint(1, 200)]
            else:
                del b[at:]
        return bytes(b)

    def dump(self, doc: Any) -> bytes:
        try:
            out: str = yaml.safe_dump(doc, default_flow_style=self.r.choice([None, True, False]),
                                      allow_unicode=self.r.random() < 0.5, sort_keys=False)
        except (yaml.YAMLError, RecursionError):
            return b""
        return out.encode("utf-8", "surrogatepass")

    def yaml_doc(self, corpus: list[bytes], trees: list[Any] | None) -> bytes:
        r = self.r
        kind = r.random()
        if kind < 0.45:  # byte mutations of a corpus file
            return self.mutate_bytes(r.choice(corpus), r.randint(1, 8))
        if kind < 0.8 and trees:  # tree mutations of a corpus document
            return self.dump(self.mutate_tree(r.choice(trees), r.randint(1, 5)))
        if kind < 0.9:
            return self.dump(self.tree())
        if kind < 0.95:
            return self.text(400).encode("utf-8", "surrogatepass")
        return r.randbytes(r.randint(0, 600))


def _small(node: Any, budget: int = 5000) -> bool:
    todo, seen = [node], 0
    while todo:
        n = todo.pop()
        seen += 1
        if seen > budget:
            return False
        if isinstance(n, dict):
            todo += n.values()
        elif isinstance(n, list):
            todo += n
    return True


def _containers(node: Any) -> list[Any]:
    if not isinstance(node, dict | list):
        return []
    children = node.values() if isinstance(node, dict) else node
    return [node] + [c for child in children for c in _containers(child)]


# --- targets --------------------------------------------------------------------------------

class Unlocated(Exception):
    """A LoaderdError that does not say where, or is not one line."""


def _located(err: LoaderdError, path: str) -> None:
    text = str(err)
    if not isinstance(err, LoaderdError):
        raise TypeError(f"not a LoaderdError: {type(err).__name__}: {text}")
    if err.location.file != path or "\n" in text or "Traceback" in text:
        raise Unlocated(f"{err.kind}: {text!r} (file {err.location.file!r})")


class Targets:
    """Each target: (rng) -> the input bytes it ran on (for the finding). Raises on a bug."""

    def __init__(self, workdir: Path, corpus: Corpus, plant: bool = False) -> None:
        self.dir, self.c = workdir, corpus
        for name, data in corpus.sources.items():
            (workdir / name).write_bytes(data)
        self.policy = Settings().policy
        self.sanitizers = [sanitize.Sanitizer(sanitize.ephemeral_key()),
                           sanitize.Sanitizer(sanitize.ephemeral_key(), sanitize.Rules(
                               ipv4_prefix=0, ipv6_prefix=128,
                               keep=frozenset({"pid", "saddr", "comm", "_rest"})))]
        self.table: list[tuple[str, int, Callable[[Gen], bytes]]] = [
            ("spec", 40, self.spec), ("settings", 12, self.settings),
            ("manifest", 16, self.manifest), ("events", 20, self.events),
            ("sanitize", 12, self.sanitize_values)]
        if plant:  # the oracle's own test: one crash and one hang it must report
            self.table.append(("planted", 2, self.planted))
        self.names = [n for n, w, _ in self.table for _ in range(w)]
        self.funcs = {n: f for n, _, f in self.table}
        self.last_target = ""
        self.t0 = math.inf
        self.last = b""  # the input under test, set before the code under test runs

    def spec(self, g: Gen) -> bytes:
        data = g.yaml_doc(self.c.specs, self.c.trees)
        path = str(self.dir / "case.yaml")
        with open(path, "wb") as f:
            f.write(data)
        self._go(data)
        spec, errors = parse_spec(path, limits=LIMITS, owner_uid=None)
        if (spec is None) == (not errors):
            raise AssertionError(f"spec {spec is not None} with {len(errors)} errors")
        for err in errors:
            _located(err, path)
        if spec is not None:  # the policy checks take what the parser accepted
            try:
                policy.check_spec(spec, self.policy)
            except LoaderdError as err:
                if err.location.file is None:
                    raise Unlocated(f"policy: {err}") from None
        return data

    def settings(self, g: Gen) -> bytes:
        data = g.yaml_doc(self.c.settings, self.c.settings_trees)
        path = str(self.dir / "loaderd.yaml")
        with open(path, "wb") as f:
            f.write(data)
        self._go(data)
        try:
            load_settings(path, owner_uid=None)
        except LoaderdError as err:
            _located(err, path)
        return data

    def manifest(self, g: Gen) -> bytes:
        r = g.r
        if r.random() < 0.5:
            data = json.dumps(g.mutate_tree(GOOD_MANIFEST, r.randint(1, 4)),
                              default=str).encode()
        else:
            data = g.mutate_bytes(json.dumps(GOOD_MANIFEST).encode(), r.randint(1, 6))
        path = "/var/lib/loaderd/manifest.json"
        self._go(data)
        try:
            m = manifest.parse(data, path, PIN_ROOT if r.random() < 0.7 else None)
        except LoaderdError as err:
            _located(err, path)
            return data
        again = manifest.parse(json.dumps(manifest.to_dict(m)).encode(), path, None)
        if again != m:  # what loaderd reads back it can write and read again, unchanged
            raise AssertionError("manifest does not round-trip")
        return data

    def events(self, g: Gen) -> bytes:
        r = g.r
        text = r.choice(LAYOUTS)
        if r.random() < 0.4:
            text = g.mutate_bytes(text.encode(), r.randint(1, 3)).decode("latin-1")
        self._go(text.encode("utf-8", "surrogateescape"))
        try:
            layout = parse_layout(text)
        except LoaderdError:
            layout = parse_layout(LAYOUTS[0])
        size = layout[-1].offset + layout[-1].size
        record = r.randbytes(max(0, size + r.randint(-size, 24)))
        if r.random() < 0.3:  # text a program copied in: addresses, secrets
            bit = r.choice(TEXT_BITS).encode()
            at = r.randrange(len(record) + 1)
            record = record[:at] + bit + record[at:]
        clean = r.choice(self.sanitizers)
        self.last = text.encode("utf-8", "surrogateescape") + b"\n" + record
        fields = clean(decode(record, r.choice([layout, None]), clean.rules.ip_fields))
        json.dumps(fields, default=str, sort_keys=True)  # what the event pump journals
        return self.last

    def sanitize_values(self, g: Gen) -> bytes:
        r = g.r
        value: Any = g.tree()
        if r.random() < 0.6:
            value = {r.choice(["saddr", "user", "token", "msg", "Password", "api-key", "ip",
                               "payload", "x"]): r.choice(TEXT_BITS) + g.text(30)
                     if r.random() < 0.5 else r.choice(
                         [r.randbytes(r.choice([4, 16, 5])), r.getrandbits(128),
                          ipaddress.IPv6Address(r.getrandbits(128)), g.scalar()])
                     for _ in range(r.randint(1, 5))}
        if r.random() < 0.3:
            value = " ".join(r.choice(TEXT_BITS) for _ in range(r.randint(1, 30)))
        clean = r.choice(self.sanitizers)
        self._go(repr(value).encode("utf-8", "surrogateescape"))
        out = clean(value)
        json.dumps(out, default=str)
        return self.last

    def planted(self, g: Gen) -> bytes:
        self._go(b"planted")
        if g.r.random() < 0.5:
            raise KeyError("planted crash")
        end = time.process_time() + HANG_S * 3
        while time.process_time() < end:  # spins: a hang spends CPU
            pass
        return b""

    def _go(self, data: bytes) -> None:
        """The input is made: time the code under test from here (generating an input is the
        runner's cost, not a hang of loaderd's)."""
        self.last = data
        self.t0 = time.process_time()
        signal.setitimer(signal.ITIMER_PROF, HANG_S)

    def _hangs_again(self, seed: int, index: int, name: str) -> bool:
        rng = random.Random(f"{seed}:{index}")
        rng.choice(self.names)
        self.t0 = math.inf
        try:
            self.funcs[name](Gen(rng, self.c))
        except _Hang:
            return True
        except Exception:
            pass
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        return time.process_time() - self.t0 > HANG_S

    def run(self, seed: int, index: int) -> Finding | None:
        rng = random.Random(f"{seed}:{index}")
        name = rng.choice(self.names)
        self.last_target = name
        g = Gen(rng, self.c)
        self.t0 = math.inf
        what, detail = "", ""
        try:
            self.funcs[name](g)
        except _Hang:
            what, detail = "hang", f"interrupted after {HANG_S} s of CPU"
        except Unlocated as exc:
            what, detail = "unlocated", str(exc)
        except Exception as exc:
            what, detail = "crash", f"{type(exc).__name__}: {str(exc)[:300]}"
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        took = time.process_time() - self.t0
        if not what and took > HANG_S:
            what, detail = "hang", f"took {took:.2f} s of CPU"
        if what == "hang" and not self._hangs_again(seed, index, name):
            what = "slow-once"  # not reproduced on a second run: the host, not the input
        if not what:
            return None
        return Finding(seed, index, name, what, detail, self.last)


def install_alarm() -> None:
    signal.signal(signal.SIGPROF, _alarm)


def indices(start: int, count: int, worker: int, workers: int) -> Iterator[int]:
    return iter(range(start + worker, start + count, workers))


def workdir_base() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else "/tmp"
