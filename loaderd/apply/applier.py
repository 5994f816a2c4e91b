"""Apply the whole set of specs atomically.

parse -> policy -> capabilities -> adopt unchanged specs -> stage changed specs in parallel
worker processes (compile, verify, load, pin under staging, fill, freeze) -> attach in staging
-> commit -> generation saved.

Commit protocol (crash-safe): the new manifest is written with `status: pending` first; then each
changed spec's staged directory is swapped with its live one (RENAME_EXCHANGE), exclusive links
(XDP) are moved over after BPF_LINK_UPDATE; the staging directory, now holding the old objects,
is removed (unpinning old links detaches them); the manifest becomes `committed`. `recover()` at
the start of every apply finishes a pending commit (roll forward) and removes any other staging
leftovers, so after a crash at any point the result is the old set or the new set, never a mix.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from loaderd import faults, policy, privileges
from loaderd.apply import plan
from loaderd.audit import log as audit
from loaderd.audit.log import Event
from loaderd.bpf import attach, kernel, pins
from loaderd.config import spec
from loaderd.errors import Kind, LoaderdError, Location, count
from loaderd.model import Settings, Spec, map_pin_mode
from loaderd.observe import drift as verify
from loaderd.stage.pool import Progress, stage_all
from loaderd.stage.worker import StagedSpec
from loaderd.store.statedir import State


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


def new_txid() -> str:
    """Sortable by time (generations are ordered by it), unique across processes."""
    now = time.time_ns()
    return (time.strftime("%Y%m%dt%H%M%S", time.gmtime(now / 1e9))
            + f"-{now % 1_000_000_000:09d}-{secrets.token_hex(3)}")


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


def generation_files(specs: list[Spec]) -> dict[str, bytes]:
    """What a rollback re-applies: each spec file and its C file, as the bytes that were
    parsed, laid out as in the programs dir (source.file is relative to the spec)."""
    files: dict[str, bytes] = {}
    for s in specs:
        files[os.path.basename(s.path)] = s.yaml_bytes
        if s.source_ref:
            files[os.path.normpath(s.source_ref)] = s.source_bytes
    return files


class Applier:
    def __init__(self, settings: Settings, notify: Progress | None = None) -> None:
        self.settings = settings
        self.layout = pins.PinLayout(settings.bpffs_root)
        self.state = State(settings.state_dir, settings.pins.gid, settings.bpffs_root)
        self.notify = notify or (lambda _msg: None)

    # --- recovery -------------------------------------------------------------------------
    def recover(self) -> None:
        """Finish a pending commit, then drop every staging leftover (uncommitted builds)."""
        manifest = self.state.load()
        if manifest.get("status") == "pending":
            txid = manifest["txid"]
            audit.emit(Event.APPLIED, f"recovering interrupted commit {txid}: rolling forward",
                       txid=txid)
            self._commit(txid, manifest)
        self.layout.remove_tree(self.layout.staging_root)

    # --- apply ----------------------------------------------------------------------------
    def apply(self, specs_dir: str | None = None, *, jobs: int | None = None) -> ApplyResult:
        with self.state.exclusive(waiting=self.notify):
            return self._apply(specs_dir, jobs=jobs)

    def _apply(self, specs_dir: str | None = None, *, jobs: int | None = None,
               trusted_owner: int | None = None) -> ApplyResult:
        """trusted_owner: the uid spec files must belong to, when not settings.config_owner
        (a rollback reads the generation loaderd itself wrote, as its own user)."""
        result = ApplyResult()
        try:
            if not self.layout.exists(self.layout.root):  # tmpfiles.d owns its mode and group
                self.layout.ensure_dir(self.layout.root, 0o755)
            self.recover()
            self._check_enabled()
        except LoaderdError as exc:  # e.g. a read-only or unreachable pin root: audited too
            return self._refused(result, [exc])
        settings = self.settings if trusted_owner is None else dataclasses.replace(
            self.settings, config_owner_uid=trusted_owner)
        specs, errors = validate(settings, specs_dir)
        if not errors:
            try:
                privileges.check((s.path, p.type, p.name) for s in specs for p in s.programs)
            except LoaderdError as exc:
                errors.append(exc)
        if errors:
            return self._refused(result, errors)
        for s in specs:
            audit.emit(Event.SPEC_ACCEPTED, f"{s.name}: spec accepted ({len(s.programs)} "
                       f"programs, {len(s.maps)} maps)", spec=s.name, spec_sha256=s.sha256,
                       file=s.path)

        old = self.state.load()
        old_specs: dict[str, Any] = old.get("specs", {})
        current = self.state.manifest()
        facts = plan.Facts(
            differences={r.name: verify.differences(old_specs[r.name], by_name=True)
                         for r in plan.candidates(specs, current)},
            present=frozenset(s.name for s in specs
                              if self.layout.exists(self.layout.spec_dir(s.name))))
        decided = plan.plan(specs, current, facts, self.settings.policy,
                            {s.name: self.layout.spec_dir(s.name) for s in specs})
        for d in decided.decisions:
            if d.action is plan.Action.BUILD and d.reason.startswith("drift: "):
                audit.emit(Event.DRIFT, f"{d.spec}: pinned objects differ from the manifest, "
                           f"rebuilding: {d.reason[len('drift: '):]}", spec=d.spec,
                           diffs=list(facts.differences.get(d.spec, ())))
        result.adopted = decided.adopt
        to_build = [s for s in specs if s.name in set(decided.build)]
        if decided.errors:
            return self._refused(result, decided.errors)
        # Only now that the apply goes ahead: a refused apply changes nothing, modes included.
        spec_of = {s.name: s for s in specs}
        for name in result.adopted:
            try:
                self._conform(name, old_specs[name])
            except LoaderdError as exc:
                result.errors.append(exc.with_file(spec_of[name].path))
        if result.errors:
            return self._refused(result, result.errors)
        names = {s.name for s in specs}
        result.removed = sorted(set(old_specs) - names)
        if not to_build and not result.removed:
            if result.adopted:
                audit.emit(Event.ADOPTED, f"adopted {len(result.adopted)} unchanged specs; "
                           "nothing to compile", specs=result.adopted, compiles=0)
            self._record_last(old, result)
            return result

        txid = result.txid = new_txid()
        try:  # one clear error about the pin root, before any compile, not one per worker
            self.layout.ensure_dir(self.layout.staging_dir(txid))
        except LoaderdError as exc:
            return self._refused(result, [exc])
        self.notify(f"compiling {len(to_build)} specs")
        staged, errors = stage_all(to_build, self.settings, txid, jobs=jobs,
                                   progress=self.notify)
        if errors:
            self._discard(txid)
            return self._refused(result, errors)
        by_name = {s.name: s for s in to_build}
        manifest: dict[str, Any] = {"version": 1, "status": "pending", "txid": txid,
                                    "specs": {n: old_specs[n] for n in result.adopted},
                                    "removed": result.removed}
        try:
            for st in staged:
                manifest["specs"][st.name] = self._attach_staged(txid, by_name[st.name], st,
                                                                 old_specs.get(st.name))
        except LoaderdError as exc:
            self._discard(txid)
            return self._refused(result, [exc.with_file(by_name[st.name].path)])
        result.built = sorted(by_name)
        faults.point("after_attach")
        self.state.save(manifest)  # the commit point: from here recovery rolls forward
        try:
            self._commit(txid, manifest)
        except LoaderdError as exc:  # past the commit point there is no "unchanged" to report
            audit.emit(Event.APPLY_FAILED, f"commit {txid} interrupted: {exc}; the manifest "
                       "stays pending and the next apply rolls it forward", txid=txid,
                       file=exc.location.file)
            raise
        self.state.save_generation(txid, generation_files(specs))
        self._record_last(manifest, result)
        audit.emit(Event.APPLIED, f"applied {len(specs)} specs: built {result.built}, adopted "
                   f"{result.adopted}, removed {result.removed}", txid=txid,
                   compiles=result.compiles, built=result.built, adopted=result.adopted,
                   removed=result.removed)
        return result

    def _conform(self, spec: str, entry: dict[str, Any]) -> None:
        """Adopted pins get today's pin mode and group: they may come from a root run (an
        operator's `loaderd apply` by hand) made before the readers' group existed."""
        live = self.layout.spec_dir(spec)
        mode = self.settings.pins.mode
        modes = {f"maps/{n}": map_pin_mode(mode, m.get("access", ""))
                 for n, m in entry["maps"].items()}
        changed = self.layout.conform_pins(live, mode, self.settings.pins.gid, modes)
        if changed:
            audit.emit(Event.PIN_WRITTEN, f"{spec}: adopted pins given mode "
                       f"{self.settings.pins.mode:04o} and the readers' group: "
                       f"{', '.join(sorted(changed))}", spec=spec, pin=live, changed=changed)

    def _record_last(self, manifest: dict[str, Any], result: ApplyResult) -> None:
        manifest["last_apply"] = {"at": time.time(), "compiles": result.compiles,
                                  "built": result.built, "adopted": result.adopted}
        self.state.save(manifest)

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
        audit.emit(Event.APPLY_FAILED, f"apply refused: {count(errors)} error(s); the previous "
                   "set stays applied unchanged", errors=count(errors))
        return result

    def _discard(self, txid: str) -> None:
        self.layout.remove_tree(self.layout.staging_dir(txid))

    def _attach_staged(self, txid: str, s: Spec, st: StagedSpec,
                       old_entry: dict[str, Any] | None) -> dict[str, Any]:
        """Create links for the staged programs (in staging). Exclusive targets that the old
        version already holds are deferred to commit (LINK_UPDATE)."""
        staging = self.layout.staging(txid)
        links: dict[str, dict[str, Any]] = {}
        deferred: list[str] = []
        for prog in s.programs:
            tgt = attach.target(prog)
            if tgt is None:
                continue
            old_link = self.layout.link_path(s.name, prog.name)
            if attach.is_exclusive(prog) and old_entry and prog.name in old_entry.get(
                    "links", {}) and old_entry["links"][prog.name]["target"] == tgt \
                    and self._link_holds(old_link, tgt):
                deferred.append(prog.name)
                links[prog.name] = {k: v for k, v in old_entry["links"][prog.name].items()
                                    if k in ("target", "id", "ifindex")}
                continue
            prog_fd = staging.get(staging.prog_path(s.name, prog.name))
            try:
                link_fd = attach.create_link(prog, prog_fd)
            except LoaderdError as exc:
                busy = " (another program already holds this target)" if getattr(
                    exc, "errno", 0) == errno.EBUSY else ""
                raise LoaderdError(Kind.ATTACH, f"cannot attach '{prog.name}' to {tgt}: "
                                   f"{exc.message}{busy}", Location(
                                       s.path, prog.line, None,
                                       f"programs[{s.programs.index(prog)}].attach")) from None
            finally:
                os.close(prog_fd)
            assert link_fd is not None
            links[prog.name] = self._pin_link(staging, s.name, prog.name, link_fd, tgt)
            lid = links[prog.name]["id"]
            audit.emit(Event.ATTACHED, f"{s.name}/{prog.name}: attached to {tgt} (link {lid})",
                       spec=s.name, program=prog.name, link_id=lid, target=tgt,
                       prog_id=st.programs[prog.name].id)
        entry = dataclasses.asdict(st)
        entry.update(pin_dir=self.layout.spec_dir(s.name), links=links,
                     sources=[f for f in (s.source_path,) if f])
        entry["txid"] = txid
        entry["deferred_links"] = deferred
        entry["events"] = {m.name: m.events for m in s.maps if m.events}
        return entry

    def _detach(self, link_pin: str) -> None:
        try:
            fd = self.layout.get(link_pin)
        except LoaderdError:
            return  # not a link we can open: removing its pin is all we can do
        try:
            kernel.link_detach(fd)
        except LoaderdError as exc:
            if getattr(exc, "errno", 0) not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # perf_event and raw_tp links have no detach op (EOPNOTSUPP, measured on 6.18):
            # they go with the last reference; link pins are never readable by the readers'
            # group (OBJ_GET opens links read-write only), so that is loaderd's own pin.
        finally:
            os.close(fd)

    def _link_holds(self, link_pin: str, tgt: str) -> bool:
        """The old link still holds `tgt`, so the commit can LINK_UPDATE it. Checked before the
        commit point: a link left behind by a deleted interface (ifindex 0) cannot be updated,
        and a roll-forward that fails there would be stuck; such a target gets a new link."""
        try:
            fd = self.layout.get(link_pin)
        except LoaderdError:  # missing, or not ours to open
            return False
        try:
            return attach.target_difference(kernel.link_info(fd), tgt, by_name=True) is None
        finally:
            os.close(fd)

    def _commit(self, txid: str, manifest: dict[str, Any]) -> None:
        for name, entry in manifest["specs"].items():
            if entry.get("txid") == txid:
                self._commit_spec(txid, name, entry)
                faults.point("mid_commit")
        for name in manifest.get("removed", []):
            self.layout.remove_tree(self.layout.spec_dir(name))
            audit.emit(Event.DETACHED, f"{name}: spec removed; its programs are detached and "
                       "unpinned", spec=name)
        self.layout.remove_tree(self.layout.staging_dir(txid))  # old objects: unpin -> detach
        manifest["status"] = "committed"
        self.state.save(manifest)

    def _commit_spec(self, txid: str, name: str, entry: dict[str, Any]) -> None:
        """Idempotent: a re-run after a crash at any step finishes the same swap."""
        staging = self.layout.staging(txid)
        live = self.layout.spec_dir(name)
        if not staging.exists(staging.spec_dir(name)) or not self._holds_new(staging, name,
                                                                              entry):
            return  # already swapped (staging now holds the old version, or nothing)
        for prog in entry.get("deferred_links", []):
            old_link = self.layout.link_path(name, prog)
            if self.layout.exists(old_link):
                prog_fd = staging.get(staging.prog_path(name, prog))
                try:
                    attach.update_link(old_link, prog_fd)
                except LoaderdError as exc:
                    if getattr(exc, "errno", 0) != errno.ENOLINK:
                        raise
                    # Severed since the pre-commit check (its interface went away, e.g. during
                    # a crash before this roll-forward): attach anew instead of staying stuck.
                    self._relink(staging, name, prog, prog_fd, entry)
                    continue
                finally:
                    os.close(prog_fd)
                self.layout.rename(old_link, staging.link_path(name, prog))
                audit.emit(Event.ATTACHED, f"{name}/{prog}: link updated in place to the new "
                           "program", spec=name, program=prog,
                           prog_id=entry["programs"][prog]["id"])
        self.layout.publish(txid, name)
        if self.state.uid >= 0:  # root acting for the service user: keep the pins theirs
            pins.chown_tree(live, self.state.uid)
        for prog in entry["programs"].values():
            audit.emit(Event.PIN_WRITTEN, f"{name}/{prog['name']}: committed under {live}",
                       spec=name, program=prog["name"], prog_id=prog["id"], pin=live)

    def _relink(self, staging: pins.PinLayout, name: str, prog: str, prog_fd: int,
                entry: dict[str, Any]) -> None:
        link = entry["links"][prog]
        if staging.exists(staging.link_path(name, prog)):
            return  # a re-run after a crash right here: already attached anew
        try:
            link_fd = attach.relink_xdp(link["target"], prog_fd)
        except LoaderdError as exc:  # the commit goes on; the missing link is drift, said
            audit.emit(Event.DEGRADED, f"{name}/{prog}: its link was severed and it cannot be "
                       f"attached again: {exc}", spec=name, program=prog)
            return
        link.update(self._pin_link(staging, name, prog, link_fd, link["target"]))
        audit.emit(Event.ATTACHED, f"{name}/{prog}: old link severed; attached anew to "
                   f"{link['target']} (link {link['id']})", spec=name, program=prog,
                   link_id=link["id"], prog_id=entry["programs"][prog]["id"])

    def _pin_link(self, staging: pins.PinLayout, spec: str, prog: str, link_fd: int,
                  tgt: str) -> dict[str, Any]:
        """Pin a new link in staging (closing the fd); its manifest entry. XDP links record
        their ifindex: what the resident, in its own network namespace, can compare with."""
        try:
            staging.pin(link_fd, staging.link_path(spec, prog), self.settings.pins.mode,
                        self.settings.pins.gid)
            info = kernel.link_info(link_fd)
        finally:
            os.close(link_fd)
        return {"target": tgt, "id": info.id,
                **({"ifindex": info.ifindex} if info.ifindex else {})}

    @staticmethod
    def _holds_new(staging: pins.PinLayout, name: str, entry: dict[str, Any]) -> bool:
        for pname, prog in entry["programs"].items():
            try:
                fd = staging.get(staging.prog_path(name, pname))
            except LoaderdError:
                return False
            try:
                return bool(kernel.prog_info(fd).id == prog["id"])
            finally:
                os.close(fd)
        return True  # a spec with maps only: nothing distinguishes old from new; swap once

    # --- operator actions -----------------------------------------------------------------
    def _check_enabled(self) -> None:
        """The kill switch holds until an operator releases it: a unit restart, a reboot with
        the unit enabled or a reload must not load everything again behind their back."""
        manifest = self.state.load()
        if manifest.get("status") == "disabled":
            when = time.strftime("%Y-%m-%d %H:%M:%S",
                                 time.localtime(manifest.get("written_at", 0)))
            raise LoaderdError(Kind.STATE, f"loaderd is disabled (kill switch pulled at {when}):"
                               " nothing is loaded until an operator runs `loaderd enable`",
                               Location(self.state.manifest_path))

    def enable(self) -> bool:
        """Release the kill switch (True if it was pulled); the next apply loads the specs."""
        with self.state.exclusive(waiting=self.notify):
            if self.state.load().get("status") != "disabled":
                return False
            self.state.save({"version": 1, "status": "empty", "txid": None, "specs": {}})
            audit.emit(Event.KILL_SWITCH, "kill switch released: applies are allowed again",
                       released=True)
            return True

    def disable(self) -> list[str]:
        """Kill switch: detach and unpin everything loaderd owns."""
        with self.state.exclusive(waiting=self.notify):
            return self._disable()

    def _disable(self) -> list[str]:
        manifest = self.state.load()
        removed = sorted(manifest.get("specs", {}))
        # The switch is pulled before anything is removed: a disable killed half-way must not
        # look like drift that the next start "repairs" by loading everything again.
        self.state.save({"version": 1, "status": "disabled", "txid": None, "specs": {}})
        # Detach first: unpinning alone leaves a link attached while anyone still holds an fd.
        for pin in self.layout.list_tree(self.layout.root):
            if "/links/" in f"/{pin}":
                self._detach(os.path.join(self.layout.root, pin))
        for name in self.layout.children(self.layout.root):  # the root is tmpfiles.d's
            self.layout.remove_tree(os.path.join(self.layout.root, name))
        audit.emit(Event.KILL_SWITCH, f"kill switch: removed every pin and link under "
                   f"{self.layout.root} ({len(removed)} specs)", specs=removed)
        return removed

    def rollback(self) -> ApplyResult:
        """Re-apply the generation before the current one."""
        with self.state.exclusive(waiting=self.notify):
            return self._rollback()

    def _rollback(self) -> ApplyResult:
        self._check_enabled()
        current = self.state.load().get("txid")
        gens = [g for g in self.state.generations() if g != current]
        if current in self.state.generations():
            gens = [g for g in gens if g < current]
        if not gens:
            raise LoaderdError(Kind.STATE, "no earlier generation to roll back to",
                               Location(self.state.dir))
        target = gens[-1]
        audit.emit(Event.ROLLBACK, f"rolling back to generation {target}", generation=target)
        gen = self.state.generation_dir(target)
        return self._apply(gen, trusted_owner=os.stat(gen).st_uid)
