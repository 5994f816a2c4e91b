"""The commit transaction: swap staged spec directories in, crash-safe and idempotent.

The new manifest is written with `status: pending` first (the caller's commit point); then each
changed spec's staged directory is swapped with its live one (RENAME_EXCHANGE), exclusive links
(XDP, tc) are moved over after BPF_LINK_UPDATE; the staging directory, now holding the old objects,
is removed (unpinning old links detaches them); the manifest becomes `committed`. A re-run after
a crash at any step (recovery rolls a pending manifest forward) finishes the same swap.
"""

from __future__ import annotations

import dataclasses
import errno
import os

from loaderd import faults
from loaderd.audit import log as audit
from loaderd.audit.log import Event
from loaderd.bpf import attach, kernel, pins, uprobe
from loaderd.errors import Kind, LoaderdError
from loaderd.model import LinkTarget, PinOwnership, UprobeAttach
from loaderd.store.manifest import LinkRecord, Manifest, SpecRecord, Status
from loaderd.store.statedir import State


def pin_link(staging: pins.PinLayout, owner: PinOwnership, spec: str, prog: str, link_fd: int,
             tgt: LinkTarget) -> LinkRecord:
    """Pin a new link in staging (closing the fd); its record. XDP and tcx links record their
    ifindex: what the resident, in its own network namespace, can compare with."""
    try:
        staging.pin(link_fd, staging.link_path(spec, prog), owner.mode, owner.gid)
        info = kernel.link_info(link_fd)
    finally:
        os.close(link_fd)
    if isinstance(tgt, UprobeAttach):  # what drift compares the path with later
        ident = uprobe.identity(tgt.binary)
        return LinkRecord(tgt, info.id, None, ident.ino, ident.sha256)
    return LinkRecord(tgt, info.id, info.ifindex or None)


def link_holds(layout: pins.PinLayout, link_pin: str, tgt: LinkTarget) -> bool:
    """The old link still holds `tgt`, so the commit can LINK_UPDATE it. Checked before the
    commit point: a link left behind by a deleted interface (ifindex 0) cannot be updated,
    and a roll-forward that fails there would be stuck; such a target gets a new link."""
    try:
        fd = layout.get(link_pin)
    except LoaderdError:  # missing, or not ours to open
        return False
    try:
        return attach.target_difference(kernel.link_info(fd), tgt, by_name=True) is None
    finally:
        os.close(fd)


def anchor_opener(staging: pins.PinLayout, live: pins.PinLayout) -> attach.AnchorOpener:
    """Open an order's anchor link: this apply's new link if it made one, else the live."""
    def opener(spec: str, prog: str) -> int:
        for layout in (staging, live):
            path = layout.link_path(spec, prog)
            if layout.exists(path):
                return layout.get(path)
        raise LoaderdError(Kind.ATTACH, f"{spec}/{prog} is not attached", value=f"{spec}/{prog}",
                           allowed="a loaderd program with a link (spec name/program name) "
                           "on the same hook")
    return opener


class Transaction:
    def __init__(self, layout: pins.PinLayout, state: State, owner: PinOwnership) -> None:
        self.layout, self.state, self.owner = layout, state, owner

    def commit(self, m: Manifest) -> Manifest:
        """Finish the pending manifest `m`; returns the committed manifest as written."""
        txid = m.txid
        assert txid is not None  # manifest.parse refuses a pending manifest without one
        specs = dict(m.specs)
        for name, record in m.specs.items():
            if record.txid == txid:
                specs[name] = self._commit_spec(txid, record)
                faults.point("mid_commit")
        for name in m.removed:
            self.layout.remove_tree(self.layout.spec_dir(name))
            audit.emit(Event.DETACHED, f"{name}: spec removed; its programs are detached and "
                       "unpinned", spec=name)
        self.layout.remove_tree(self.layout.staging_dir(txid))  # old objects: unpin -> detach
        return self.state.save(dataclasses.replace(m, status=Status.COMMITTED, specs=specs))

    def _commit_spec(self, txid: str, record: SpecRecord) -> SpecRecord:
        """Idempotent: a re-run after a crash at any step finishes the same swap. Returns the
        record with any link made anew (a severed XDP link)."""
        name = record.name
        staging = self.layout.staging(txid)
        live = self.layout.spec_dir(name)
        if not staging.exists(staging.spec_dir(name)) or not self._holds_new(staging, record):
            return record  # already swapped (staging now holds the old version, or nothing)
        links = dict(record.links)
        for prog in record.deferred_links:
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
                    links[prog] = self._relink(staging, record, prog, prog_fd)
                    continue
                finally:
                    os.close(prog_fd)
                self.layout.rename(old_link, staging.link_path(name, prog))
                audit.emit(Event.ATTACHED, f"{name}/{prog}: link updated in place to the new "
                           "program", spec=name, program=prog,
                           prog_id=record.programs[prog].id)
        self.layout.publish(txid, name)
        if self.state.uid >= 0:  # root acting for the service user: keep the pins theirs
            pins.chown_tree(live, self.state.uid)
        for p in record.programs.values():
            audit.emit(Event.PIN_WRITTEN, f"{name}/{p.name}: committed under {live}",
                       spec=name, program=p.name, prog_id=p.id, pin=live)
        return dataclasses.replace(record, links=links)

    def _relink(self, staging: pins.PinLayout, record: SpecRecord, prog: str, prog_fd: int
                ) -> LinkRecord:
        name, link = record.name, record.links[prog]
        if staging.exists(staging.link_path(name, prog)):
            return link  # a re-run after a crash right here: already attached anew
        tgt = link.target
        assert tgt.exclusive  # manifest.parse: only exclusive links are deferred
        try:
            link_fd = attach.link_for(tgt, prog_fd, anchor_opener(self.layout, self.layout))
        except LoaderdError as exc:  # the commit goes on; the missing link is drift, said
            audit.emit(Event.DEGRADED, f"{name}/{prog}: its link was severed and it cannot be "
                       f"attached again: {exc}", spec=name, program=prog)
            return link
        new = pin_link(staging, self.owner, name, prog, link_fd, tgt)
        audit.emit(Event.ATTACHED, f"{name}/{prog}: old link severed; attached anew to "
                   f"{tgt.text} (link {new.id})", spec=name, program=prog, link_id=new.id,
                   prog_id=record.programs[prog].id)
        return new

    @staticmethod
    def _holds_new(staging: pins.PinLayout, record: SpecRecord) -> bool:
        for pname, prog in record.programs.items():
            try:
                fd = staging.get(staging.prog_path(record.name, pname))
            except LoaderdError:
                return False
            try:
                return bool(kernel.prog_info(fd).id == prog.id)
            finally:
                os.close(fd)
        return True  # a spec with maps only: nothing distinguishes old from new; swap once
