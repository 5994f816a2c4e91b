"""Apply the whole set of specs atomically: orchestration only.

parse -> policy -> capabilities -> plan (adopt unchanged specs, build the rest: apply.plan)
-> stage changed specs in parallel worker processes (compile, verify, load, pin under staging,
fill, freeze) -> attach in staging -> manifest `pending` (the commit point) -> commit
(apply.commit) -> generation saved. `recover()` at the start of every apply finishes a pending
commit (roll forward) and removes any other staging leftovers, so after a crash at any point
the result is the old set or the new set, never a mix.
"""

from __future__ import annotations

import calendar
import contextlib
import dataclasses
import errno
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loaderd import faults, policy, privileges
from loaderd.apply import killswitch, plan
from loaderd.apply.commit import Transaction, anchor_opener, link_holds, pin_link
from loaderd.apply.preview import hold_in_effect
from loaderd.audit import log as audit
from loaderd.audit.log import Event
from loaderd.bpf import attach, handover, kernel, pins
from loaderd.config import signature, spec
from loaderd.errors import Kind, LoaderdError, Location, count, names, plural
from loaderd.model import (
    PERF_LINK_SEP,
    OrderedAttach,
    PerfEventAttach,
    ProgType,
    Settings,
    SignatureMode,
    SignatureStatus,
    Spec,
    map_pin_mode,
    settings_changes,
)
from loaderd.observe import drift
from loaderd.store.manifest import (
    Calls,
    LastApply,
    LinkRecord,
    Manifest,
    MapRecord,
    ProgramRecord,
    SpecRecord,
    Status,
)
from loaderd.store.statedir import Hold, State, tree_digest

if TYPE_CHECKING:  # the compile pool (multiprocessing, concurrent.futures) loads only to build
    from loaderd.stage.pool import Progress
    from loaderd.stage.worker import StagedSpec

# (specs dir, manifest, kernel facts, decisions) -> why the apply must stop, or None
PlanCheck = Callable[[str, Manifest, plan.Facts, plan.Plan], LoaderdError | None]


@dataclass
class ApplyResult:
    txid: str | None = None
    built: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    errors: list[LoaderdError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def compiles(self) -> int:
        return len(self.built)


def txid_ns(txid: str) -> int:
    """The time a txid names, in ns since the epoch (UTC)."""
    stamp, ns, _rand = txid.split("-")
    return calendar.timegm(time.strptime(stamp, "%Y%m%dt%H%M%S")) * 1_000_000_000 + int(ns)


def new_txid(after: str | None = None) -> str:
    """Sortable in apply order (generations, rollback and pruning go by it), unique across
    processes. `after`: the newest txid already used; the new one sorts after it even when the
    wall clock stepped back (NTP, an RTC reset): then it names that txid's time + 1 ns, and
    txids stay ordered by apply, not by clock. A step forward is just a later name."""
    now = time.time_ns()
    if after is not None and now <= txid_ns(after):
        now = txid_ns(after) + 1
    sec, ns = divmod(now, 1_000_000_000)
    return time.strftime("%Y%m%dt%H%M%S", time.gmtime(sec)) + f"-{ns:09d}-{secrets.token_hex(3)}"


def validate(settings: Settings, specs_dir: str | None = None, *, check_owner: bool = True
             ) -> tuple[list[Spec], list[LoaderdError]]:
    """Everything that can be decided without the kernel: parse, schema, policy, limits."""
    specs, errors = spec.load_dir(specs_dir or settings.programs_dir, settings,
                                  check_owner=check_owner)
    for s in specs:
        try:
            policy.check_spec(s, settings.policy)
        except LoaderdError as exc:
            errors.append(exc.with_file(s.path))
    if not errors:
        try:
            policy.check_set(specs, settings.policy)
        except LoaderdError as exc:
            errors.append(exc)
    return specs, errors


def validate_files(settings: Settings, files: list[str], *, as_path: str | None = None,
                   check_owner: bool = True) -> tuple[list[Spec], list[LoaderdError]]:
    """`validate` for spec files on their own (`loaderd check FILE`), not programs_dir: each
    file parsed (as `as_path`, where it will be installed), policy per spec and for these
    specs as a set."""
    owner = settings.config_owner_uid if check_owner else None
    specs: list[Spec] = []
    errors: list[LoaderdError] = []
    for path in files:
        parsed, errs = spec.parse_spec(path, limits=settings.policy.limits, owner_uid=owner,
                                       signatures=settings.signatures, as_path=as_path)
        errors += errs
        if parsed is None:
            continue
        try:
            policy.check_spec(parsed, settings.policy)
        except LoaderdError as exc:
            errors.append(exc.with_file(parsed.path))
        specs.append(parsed)
    if not errors:
        try:
            policy.check_set(specs, settings.policy)
        except LoaderdError as exc:
            errors.append(exc)
    return specs, errors


def generation_files(specs: list[Spec]) -> dict[str, bytes]:
    """What a rollback re-applies: each spec file and its C file, as the bytes that were
    parsed, laid out as in the programs dir (source.file is relative to the spec)."""
    files: dict[str, bytes] = {}
    for s in specs:
        files[os.path.basename(s.path)] = s.yaml_bytes
        if s.signature_bytes is not None:  # rollback verifies it again, against today's keys
            files[os.path.basename(s.path) + signature.SUFFIX] = s.signature_bytes
        if s.source_ref:
            files[os.path.normpath(s.source_ref)] = s.source_bytes
    return files


def signed_text(s: Spec, mode: SignatureMode) -> str:
    f = s.signature
    if f is None or f.status is SignatureStatus.UNSIGNED:
        return "" if mode is SignatureMode.OFF else f"; UNSIGNED (signatures.mode {mode.value})"
    if f.status is SignatureStatus.VERIFIED:
        return f"; signed by {f.principal} ({f.key_type} {f.fingerprint})"
    return f"; signature intact, signer not checked ({f.fingerprint}: no allowed_signers)"


def unsigned_names(specs: list[Spec], mode: SignatureMode) -> list[str]:
    """The specs a signature mode other than off admitted without a signature."""
    if mode is SignatureMode.OFF:
        return []
    return sorted(s.name for s in specs
                  if s.signature is None or s.signature.status is SignatureStatus.UNSIGNED)


def signature_fields(s: Spec) -> dict[str, str | int]:
    """Journal fields of a spec's signature check (LOADERD_SIGNATURE, LOADERD_SIGNER, ...)."""
    f = s.signature
    if f is None:
        return {"signature": SignatureStatus.UNSIGNED.value}
    got = {"signature": f.status.value, "signer": f.principal, "key_fingerprint": f.fingerprint,
           "key_type": f.key_type, "signature_namespace": f.namespace,
           "signed_sha256": f.signed_sha256, "sk_counter": f.counter}
    return {k: v for k, v in got.items() if v is not None}


def attach_order(staged: list[StagedSpec], spec_of: dict[str, Spec]) -> list[StagedSpec]:
    """Staged specs in an order that attaches an order's anchor (`before:`/`after:` another
    spec's program) before the program placed against it; otherwise as staged. A cycle is
    left to the attach, which says the anchor is not attached."""
    by_name = {st.name: st for st in staged}
    out: list[StagedSpec] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name not in by_name:
            return
        seen.add(name)
        for p in spec_of[name].programs:
            parts = p.attach.anchor_parts if isinstance(p.attach, OrderedAttach) else None
            if parts is not None and parts[0] != name:
                visit(parts[0])
        out.append(by_name[name])

    for st in staged:
        visit(st.name)
    return out


class _Refused(Exception):
    """The apply stops here, unchanged; the errors are audited and returned."""

    def __init__(self, errors: list[LoaderdError]) -> None:
        super().__init__(f"{len(errors)} error(s)")
        self.errors = errors


class Applier:
    def __init__(self, settings: Settings, notify: Progress | None = None) -> None:
        self.settings = settings
        self.layout = pins.PinLayout(settings.bpffs_root)
        self.state = State(settings.state_dir, settings.pins.gid, settings.bpffs_root)
        self.notify = notify or (lambda _msg: None)
        self.tx = Transaction(self.layout, self.state, settings.pins)
        # `apply --plan FILE`: why the apply's own plan is not the saved one (apply.preview)
        self.expect: PlanCheck | None = None
        self._release: tuple[Hold, str] | None = None  # a hold this apply releases
        self._specs_dir = settings.programs_dir
        self._started = time.monotonic()  # of the apply under way (its recorded duration)

    # --- recovery -------------------------------------------------------------------------
    def recover(self) -> Manifest:
        """Finish a pending commit, then drop every staging leftover (uncommitted builds)."""
        current = self.state.manifest()
        if current.status is Status.PENDING:
            audit.emit(Event.APPLIED, f"recovering interrupted commit {current.txid}: rolling "
                       "forward", txid=current.txid)
            current = self.tx.commit(current)
        self.layout.remove_tree(self.layout.staging_root)
        return current

    # --- apply ----------------------------------------------------------------------------
    def apply(self, specs_dir: str | None = None, *, jobs: int | None = None) -> ApplyResult:
        """Apply programs_dir (or `specs_dir`), or the generation a rollback holds while
        programs_dir has not changed since."""
        with self.state.exclusive(waiting=self.notify), self._marked():
            self._started = time.monotonic()
            hold = self._held(specs_dir)
            if hold is None:
                result = self._apply(specs_dir, jobs=jobs)
            else:
                gen = self.state.generation_dir(hold.generation)
                result = self._apply(gen, jobs=jobs, trusted_owner=os.stat(gen).st_uid)
            self.hand_over()  # refused or not: the set applied now is what the resident reads
            return result

    def hand_over(self) -> int:
        """Open the perf events of every perf buffer the applied set journals and hand them to
        the resident (bpf.handover: it cannot open them without CAP_PERFMON). Only when a socket
        waits for them; never fails the apply: what goes wrong is journaled. Returns the maps
        handed over."""
        path = handover.socket_path(self.settings.state_dir)
        if not handover.listening(path):
            return 0
        try:
            current = self.state.manifest()
        except LoaderdError:
            return 0  # refused already, and said
        if current.status is not Status.COMMITTED:
            return 0
        items: list[handover.PerfEvents] = []
        try:
            for name, record in sorted(current.specs.items()):
                for mname in sorted(record.events):
                    where = os.path.join(record.pin_dir, "maps", mname)
                    fd = kernel.obj_get(where, rdonly=True)
                    try:
                        if kernel.map_info(fd).type == kernel.MAP_TYPES["perf_event_array"]:
                            items.append(handover.open_events(name, mname, fd, where))
                    finally:
                        os.close(fd)
            if not items:
                return 0
            handover.send(path, items)
        except LoaderdError as exc:
            audit.emit(Event.DEGRADED, f"perf buffers not handed to the resident: {exc}; it "
                       "does not read them until an apply hands them over", reason="perf "
                       "handover", file=exc.location.file)
            return 0
        finally:
            for item in items:
                item.close()  # the datagram in the socket holds its own references
        events = sum(len(i.events) for i in items)
        audit.emit(Event.DAEMON, f"handed {plural(len(items), 'perf buffer')} "
                   f"({plural(events, 'perf event')}) to the resident: "
                   + ", ".join(f"{i.spec}/{i.map}" for i in items),
                   maps=[f"{i.spec}/{i.map}" for i in items], perf_events=events)
        return len(items)

    def _held(self, specs_dir: str | None) -> Hold | None:
        """The rollback hold, if it still holds; released (and said) when programs_dir changed
        since the rollback, another directory was asked for, or its generation is gone. Under
        `apply --plan` the release waits for the plan check: a stale plan changes nothing."""
        hold, why = hold_in_effect(self.state, self.settings, specs_dir)
        if hold is None:
            return None
        programs = self.settings.programs_dir
        if why is None:
            audit.emit(Event.ROLLBACK, f"rollback held: applying generation {hold.generation} "
                       f"(rolled back at {hold.when()}), not {programs} (unchanged since); "
                       "release with `loaderd rollback --release`", generation=hold.generation,
                       held=True)
            return hold
        self._release = (hold, f"{why}; applying {specs_dir or programs}")
        if self.expect is None:
            self._release_hold()
        return None

    def _release_hold(self) -> None:
        if self._release is None:
            return
        (hold, why), self._release = self._release, None
        self.state.clear_hold()
        audit.emit(Event.ROLLBACK, f"rollback to generation {hold.generation} (since "
                   f"{hold.when()}) released: {why}", generation=hold.generation, released=True)

    @contextlib.contextmanager
    def _marked(self) -> Iterator[None]:
        """The applying marker for the length of an apply: left behind only by one killed
        before it ended (State.interrupted)."""
        self.state.mark_applying()
        try:
            yield
        finally:
            self.state.clear_applying()

    def _apply(self, specs_dir: str | None = None, *, jobs: int | None = None,
               trusted_owner: int | None = None) -> ApplyResult:
        """trusted_owner: the uid spec files must belong to, when not settings.config_owner
        (a rollback reads the generation loaderd itself wrote, as its own user)."""
        result = ApplyResult()
        self._specs_dir = specs_dir or self.settings.programs_dir
        self._note_settings()
        try:
            current = self._current()
            specs = self._accepted(specs_dir, trusted_owner)
            current = plan.with_signatures(current, specs)
            decided = self._plan(specs, current)
            result.adopted = decided.adopt
            if decided.errors:
                raise _Refused(decided.errors)
            spec_of = {s.name: s for s in specs}
            self._conform_adopted(current, [spec_of[n] for n in result.adopted])
            result.removed = decided.remove
            to_build = [spec_of[n] for n in decided.build]
            if not to_build and not result.removed:
                # Nothing changed: the manifest is not rewritten (its last_apply is the last
                # apply that changed the set) unless its owner/mode are not the service's.
                misfit = self.state.manifest_misfit()
                if result.adopted:
                    # Admitted unsigned by a permissive mode: said on every apply that admits
                    # them, built or adopted (the mode may have changed since they were built)
                    unsigned = unsigned_names([spec_of[n] for n in result.adopted],
                                              self.settings.signatures.mode)
                    audit.emit(Event.ADOPTED, f"{plural(len(result.adopted), 'spec')} "
                               "unchanged, adopted as applied; nothing to compile" + (
                                   f"; manifest rewritten: {misfit}" if misfit else "") + (
                                   f"; UNSIGNED (signatures.mode "
                                   f"{self.settings.signatures.mode.value}): "
                                   f"{names(unsigned)}" if unsigned else ""),
                               specs=result.adopted, compiles=0,
                               **({"unsigned": unsigned} if unsigned else {}))
                if misfit:
                    self._record_last(current, result)
                else:
                    self.state.clear_refusal()
                return result
            mode = self.settings.signatures.mode
            for s in to_build:  # the specs this apply acts on; unchanged ones are adopted
                audit.emit(Event.SPEC_ACCEPTED, f"{s.name}: spec accepted "
                           f"({plural(len(s.programs), 'program')}, "
                           f"{plural(len(s.maps), 'map')}){signed_text(s, mode)}", spec=s.name,
                           spec_sha256=s.sha256, file=s.path, **signature_fields(s))
            # After every txid in use (under the lock): a clock stepped back must not make
            # this apply sort before the one it replaces
            txid = result.txid = new_txid(max([current.txid or "", *self.state.generations()])
                                          or None)
            records = self._build(txid, to_build, current, result.adopted, jobs)
        except _Refused as refusal:
            return self._refused(result, refusal.errors)
        result.built = sorted(s.name for s in to_build)
        faults.point("after_attach")
        try:
            pending = self.state.save(Manifest(status=Status.PENDING, txid=txid,
                                               specs=records, removed=tuple(result.removed)))
        except LoaderdError as exc:  # e.g. ENOSPC: not committed, so nothing changed
            self._discard(txid)
            result.txid = None
            return self._refused(result, [exc])
        self._commit(txid, pending, specs, result)
        return result

    def _note_settings(self) -> None:
        """SETTINGS_CHANGED once, by the first apply that reads changed settings."""
        sha = self.settings.sha256 or "built-in"
        seen = self.state.settings_seen()
        if seen is not None and seen[0] == sha:
            return
        summary = self.settings.summary()
        changes = (settings_changes(seen[1], summary) if seen
                   else ["first apply that saw these settings"])
        where = self.settings.path or "built-in defaults"
        text = "; ".join(changes) or "no setting differs"
        audit.emit(Event.SETTINGS_CHANGED, f"settings {sha[:12]} ({where}): {text}",
                   settings_sha256=sha, previous_sha256=seen[0] if seen else None,
                   file=self.settings.path, changes=changes)
        self.state.save_settings_seen(sha, summary)

    def _current(self) -> Manifest:
        """The applied set, after finishing any interrupted commit; refused while the kill
        switch is pulled or the pin root is unusable (audited like any refusal)."""
        try:
            # bpffs unmounted (or never mounted): one sentence naming the mount point, before
            # the walk below meets "not below a bpffs mount" or recovery finds every pin gone.
            pins.check_bpffs_mounted(self.layout.root)
            if not self.layout.exists(self.layout.root):  # tmpfiles.d owns its mode and group
                self.layout.ensure_dir(self.layout.root, 0o755)
            current = self.recover()
            killswitch.check_enabled(self.state, current)
            self.state.generations()  # a symlinked generations dir: refused before any change
        except LoaderdError as exc:
            raise _Refused([exc]) from None
        return current

    def _accepted(self, specs_dir: str | None, trusted_owner: int | None) -> list[Spec]:
        """Every spec, validated and within the capabilities we hold, or the refusal."""
        settings = self.settings if trusted_owner is None else dataclasses.replace(
            self.settings, config_owner_uid=trusted_owner)
        specs, errors = validate(settings, specs_dir)
        if not errors:
            try:
                privileges.check((s.path, p.type, p.name) for s in specs for p in s.programs)
            except LoaderdError as exc:
                errors.append(exc)
        if not errors:  # a type this kernel cannot run: one sentence, before any compile
            errors += [e for s in specs for e in attach.support_errors(s)]
        if errors:
            raise _Refused(errors)
        return specs

    def _conform_adopted(self, current: Manifest, adopted: list[Spec]) -> None:
        """Only now that the apply goes ahead: a refused apply changes nothing, modes
        included."""
        errors = []
        for s in adopted:
            try:
                self._conform(current.specs[s.name])
            except LoaderdError as exc:
                errors.append(exc.with_file(s.path))
        if errors:
            raise _Refused(errors)

    def _build(self, txid: str, to_build: list[Spec], current: Manifest, adopted: list[str],
               jobs: int | None) -> dict[str, SpecRecord]:
        """Stage and attach `to_build` under the txid's staging directory; the records of the
        new set (adopted ones as they are). On a refusal the staging directory is gone."""
        try:  # one clear error about the pin root, before any compile, not one per worker
            self.layout.ensure_dir(self.layout.staging_dir(txid))
        except LoaderdError as exc:
            raise _Refused([exc]) from None
        from loaderd.stage.pool import stage_all  # off an unchanged restart's path

        self.notify(f"compiling {plural(len(to_build), 'spec')}")
        staged, errors = stage_all(to_build, self.settings, txid, jobs=jobs,
                                   progress=self.notify)
        if errors:
            self._discard(txid)
            raise _Refused(errors)
        spec_of = {s.name: s for s in to_build}
        records = {n: current.specs[n] for n in adopted}
        for st in attach_order(staged, spec_of):
            try:
                records[st.name] = self._attach_staged(txid, spec_of[st.name], st,
                                                       current.specs.get(st.name))
            except LoaderdError as exc:
                self._discard(txid)
                raise _Refused([exc.with_file(spec_of[st.name].path)]) from None
            except BaseException:  # a bug (internal error): still no staging left behind
                self._discard(txid)
                raise
        return records

    def _commit(self, txid: str, pending: Manifest, specs: list[Spec],
                result: ApplyResult) -> None:
        """`pending` is on disk: the commit point; from here recovery rolls forward."""
        try:
            committed = self.tx.commit(pending)
        except LoaderdError as exc:  # past the commit point there is no "unchanged" to report
            audit.emit(Event.APPLY_FAILED, f"commit {txid} interrupted: {exc}; the manifest "
                       "stays pending and the next apply rolls it forward", txid=txid,
                       file=exc.location.file)
            raise
        try:
            self.state.save_generation(txid, generation_files(specs))
        except LoaderdError as exc:  # swapped since the check above: committed, not kept
            audit.emit(Event.DEGRADED, f"generation {txid} not saved (no rollback to it): {exc}",
                       txid=txid, reason="generation not saved")
        self._record_last(committed, result)
        audit.emit(Event.APPLIED, f"applied {plural(len(specs), 'spec')} (txid {txid}): "
                   f"built {names(result.built)}; adopted {names(result.adopted)}; removed "
                   f"{names(result.removed)}", txid=txid,
                   compiles=result.compiles, built=result.built, adopted=result.adopted,
                   removed=result.removed)

    def facts(self, specs: list[Spec], current: Manifest) -> plan.Facts:
        """The kernel facts plan() needs (read-only: `loaderd plan` gathers the same)."""
        return plan.Facts(
            differences={r.name: drift.differences(r, by_name=True)
                         for r in plan.candidates(specs, current)},
            present=frozenset(s.name for s in specs
                              if self.layout.exists(self.layout.spec_dir(s.name))))

    def _plan(self, specs: list[Spec], current: Manifest) -> plan.Plan:
        """Gather the kernel facts plan() needs, plan, and journal the drift it found."""
        facts = self.facts(specs, current)
        decided = plan.plan(specs, current, facts, self.settings.policy,
                            {s.name: self.layout.spec_dir(s.name) for s in specs})
        if self.expect is not None:  # `apply --plan FILE`: exactly that plan, or nothing
            why = self.expect(self._specs_dir, current, facts, decided)
            if why is not None:
                raise _Refused([why])
            self._release_hold()
        for d in decided.decisions:
            if d.action is plan.Action.BUILD and d.reason.startswith("drift: "):
                audit.emit(Event.DRIFT, f"{d.spec}: pinned objects differ from the manifest, "
                           f"rebuilding: {d.reason[len('drift: '):]}", spec=d.spec,
                           diffs=list(facts.differences.get(d.spec, ())))
        return decided

    def _conform(self, record: SpecRecord) -> None:
        """Adopted pins get today's pin mode and group: they may come from a root run (an
        operator's `loaderd apply` by hand) made before the readers' group existed."""
        live = self.layout.spec_dir(record.name)
        mode = self.settings.pins.mode
        modes = {f"maps/{n}": map_pin_mode(mode, m.access) for n, m in record.maps.items()}
        changed = self.layout.conform_pins(live, mode, self.settings.pins.gid, modes)
        if changed:
            audit.emit(Event.PIN_WRITTEN, f"{record.name}: adopted pins given mode "
                       f"{self.settings.pins.mode:04o} and the readers' group: "
                       f"{', '.join(sorted(changed))}", spec=record.name, pin=live,
                       changed=changed)

    def _record_last(self, m: Manifest, result: ApplyResult) -> None:
        self.state.clear_refusal()  # /etc and what is applied agree again
        try:
            self.state.save(dataclasses.replace(m, last_apply=LastApply(
                time.time(), result.compiles, tuple(result.built), tuple(result.adopted),
                round(time.monotonic() - self._started, 6))))
        except LoaderdError as exc:  # the set is committed; only the record of it is stale
            audit.emit(Event.DEGRADED, f"last-apply record not saved: {exc}",
                       reason="last apply not recorded")

    def _refused(self, result: ApplyResult, errors: list[LoaderdError]) -> ApplyResult:
        """One SPEC_REFUSED per file (its first error, the count, the shown ones as detail):
        a file with 20,000 bad items is one journal entry, not 20,000."""
        result.errors = errors
        by_file: dict[str | None, list[LoaderdError]] = {}
        for e in errors:
            by_file.setdefault(e.location.file, []).append(e)
        for file, group in by_file.items():
            first, n = group[0], count(group)
            detail = first.detail if n == 1 else "\n".join(str(e) for e in group)
            audit.emit(Event.SPEC_REFUSED, str(first) + (f" (and {n - 1} more)" if n > 1 else ""),
                       file=file, kind=first.kind.value, field=first.location.field,
                       line=first.location.line, detail=detail, errors=n)
        try:
            before = bool(self.state.manifest().specs)
        except LoaderdError:
            before = True  # unknown: do not claim nothing was applied
        audit.emit(Event.APPLY_FAILED, f"apply refused: {plural(count(errors), 'error')}; " + (
            "the set applied before stays applied unchanged" if before
            else "nothing was applied before it, nothing is applied"), errors=count(errors))
        self.state.save_refusal(count(errors), str(errors[0]))
        return result

    def _discard(self, txid: str) -> None:
        self.layout.remove_tree(self.layout.staging_dir(txid))

    def _attach_staged(self, txid: str, s: Spec, st: StagedSpec, old: SpecRecord | None
                       ) -> SpecRecord:
        """Create links for the staged programs (in staging); the spec's new record. Exclusive
        targets that the old version still holds are deferred to commit (LINK_UPDATE)."""
        staging = self.layout.staging(txid)
        links: dict[str, LinkRecord] = {}
        deferred: list[str] = []
        for prog in s.programs:
            tgt = attach.target(prog)
            if tgt is None:
                continue
            old_link = old.links.get(prog.name) if old else None
            if tgt.exclusive and old_link is not None and old_link.target == tgt \
                    and link_holds(self.layout, self.layout.link_path(s.name, prog.name), tgt):
                deferred.append(prog.name)
                links[prog.name] = old_link
                continue
            prog_fd = staging.get(staging.prog_path(s.name, prog.name))
            try:
                if isinstance(tgt, PerfEventAttach):  # a link per CPU, pinned as one
                    made = attach.per_cpu_links(tgt, prog_fd)
                    link_fd = None
                else:
                    link_fd = attach.create_link(prog, prog_fd,
                                                 anchor_opener(staging, self.layout))
            except LoaderdError as exc:
                busy = " (another program already holds this target)" if getattr(
                    exc, "errno", 0) == errno.EBUSY else ""
                i = s.programs.index(prog)  # located as `check` locates it: the attach line
                raise LoaderdError(Kind.ATTACH, f"cannot attach '{prog.name}' to {tgt.text}: "
                                   f"{exc.message}{busy}", Location(
                                       s.path, s.line_of("programs", i, "attach"), None,
                                       f"programs[{i}].attach")) from None
            finally:
                os.close(prog_fd)
            pinned = [(prog.name, link_fd)] if link_fd is not None else [
                (f"{prog.name}{PERF_LINK_SEP}{cpu}", fd) for cpu, fd in made]
            for i, (key, fd) in enumerate(pinned):
                try:
                    link = links[key] = pin_link(staging, self.settings.pins, s.name, key, fd,
                                                 tgt)
                except BaseException:
                    for _key, rest in pinned[i + 1:]:
                        os.close(rest)
                    raise
                audit.emit(Event.ATTACHED, f"{s.name}/{prog.name}: attached to {tgt.text} "
                           f"(link {link.id}{'' if key == prog.name else ', ' + key})",
                           spec=s.name, program=prog.name, link_id=link.id, target=tgt.text,
                           prog_id=st.programs[prog.name].id)
        return SpecRecord(
            name=st.name, file=st.file, sha256=st.sha256, pin_dir=self.layout.spec_dir(s.name),
            programs={n: ProgramRecord(
                name=p.name, function=p.function, type=ProgType(p.type), id=p.id, tag=p.tag,
                helpers=tuple(p.helpers), calls=Calls(**p.calls), degraded=p.degraded)
                for n, p in st.programs.items()},
            maps={n: MapRecord(m.name, m.id, m.frozen, m.access) for n, m in st.maps.items()},
            links=links, sources=tuple(f for f in (s.source_path,) if f), txid=txid,
            deferred_links=tuple(deferred),
            events={m.name: m.events for m in s.maps if m.events},
            object_sha256=st.object_sha256, signature=s.signature)

    # --- operator actions -----------------------------------------------------------------
    def enable(self) -> bool:
        """Release the kill switch (True if it was pulled); the next apply loads the specs."""
        with self.state.exclusive(waiting=self.notify):
            return killswitch.enable(self.state)

    def disable(self) -> list[str]:
        """Kill switch: detach and unpin everything loaderd owns."""
        with self.state.exclusive(waiting=self.notify):
            return killswitch.disable(self.state, self.layout)

    def rollback(self) -> ApplyResult:
        """Roll back here, in this process: request_rollback() then apply() (which applies
        the held generation). Under systemd the CLI asks loaderd-apply.service instead."""
        self.request_rollback()
        result = self.apply()
        if not result.ok:
            self.drop_hold("its apply was refused")
        return result

    def request_rollback(self) -> str:
        """Hold the generation before the current one: every later apply (reload, restart)
        applies it instead of programs_dir, until programs_dir changes or release(). Applies
        nothing itself; the target txid."""
        with self.state.exclusive(waiting=self.notify):
            m = self.state.manifest()
            killswitch.check_enabled(self.state, m)
            current = m.txid
            held = self.state.hold()
            if held is not None:  # a rollback of a rollback: before the held generation
                current = held.generation
            gens = [g for g in self.state.generations() if g != current]
            if current is not None and current in self.state.generations():
                gens = [g for g in gens if g < current]
            if not gens:
                raise LoaderdError(Kind.STATE, "no earlier generation to roll back to",
                                   Location(self.state.dir))
            target = gens[-1]
            programs = self.settings.programs_dir
            self.state.save_hold(Hold(target, time.time(), tree_digest(programs)))
            audit.emit(Event.ROLLBACK, f"rollback to generation {target} requested: it stays "
                       f"applied across reloads and restarts until {programs} changes or "
                       "`loaderd rollback --release`", generation=target, operator=True)
            return target

    def release(self) -> Hold | None:
        """Release the rollback hold (the next apply applies programs_dir); the hold, if any."""
        with self.state.exclusive(waiting=self.notify):
            hold = self.state.hold()
            if hold is not None:
                self.state.clear_hold()
                audit.emit(Event.ROLLBACK, f"rollback to generation {hold.generation} (since "
                           f"{hold.when()}) released by the operator: the next apply applies "
                           f"{self.settings.programs_dir}", generation=hold.generation,
                           released=True, operator=True)
            return hold

    def drop_hold(self, why: str) -> None:
        with self.state.exclusive(waiting=self.notify):
            hold = self.state.hold()
            if hold is not None and self.state.clear_hold():
                audit.emit(Event.ROLLBACK, f"rollback to generation {hold.generation} not "
                           f"held: {why}; the set before it stays applied",
                           generation=hold.generation, released=True)
