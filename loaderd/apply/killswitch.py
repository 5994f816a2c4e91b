"""The kill switch: detach and unpin everything loaderd owns, and keep it that way.

Only what loaderd made is removed (its specs' directories and staging; other entries under
the pin root are left and said). Once pulled, nothing loads until an operator releases it: a
unit restart, a reboot with the unit enabled or a reload must not load everything again
behind their back. The caller holds the state lock.
"""

from __future__ import annotations

import errno
import os
import time

from loaderd.audit import log as audit
from loaderd.audit.log import Event
from loaderd.bpf import kernel, pins
from loaderd.errors import Kind, LoaderdError, Location, plural
from loaderd.store.manifest import EMPTY, Manifest, Status
from loaderd.store.statedir import State

DISABLED = Manifest(status=Status.DISABLED)


def check_enabled(state: State, m: Manifest) -> None:
    """Refuse to load anything while the switch is pulled."""
    if m.status is Status.DISABLED:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.written_at or 0))
        raise LoaderdError(Kind.STATE, f"loaderd is disabled (kill switch pulled at {when}):"
                           " nothing is loaded until an operator runs `loaderd enable`",
                           Location(state.manifest_path))


def enable(state: State) -> bool:
    """Release the switch (True if it was pulled); the next apply loads the specs."""
    if state.manifest().status is not Status.DISABLED:
        return False
    state.save(EMPTY)
    # An apply refused while the switch was pulled (by the switch) is not "the last apply
    # REFUSED" any more: nothing is applied, and status says that (exit 4, not 3).
    state.clear_refusal()
    audit.emit(Event.KILL_SWITCH, "kill switch released: applies are allowed again",
               released=True)
    return True


def detach(layout: pins.PinLayout, link_pin: str) -> None:
    try:
        fd = layout.get(link_pin)
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


def _loaderds(layout: pins.PinLayout, recorded: set[str]) -> tuple[list[str], list[str]]:
    """(entries under the pin root loaderd made, the others). Loaderd's: the staging tree,
    the manifest's specs, and any spec-named directory holding only progs/maps/links (the
    layout a spec gets; found so a malformed manifest cannot keep the switch from working).
    Anything else is not loaderd's to remove (measured: a bpffs_root set to a directory other
    tools pin in lost every one of their pins to `disable`)."""
    ours: list[str] = []
    others: list[str] = []
    for name in layout.children(layout.root):
        path = os.path.join(layout.root, name)
        if name == pins.STAGING or name in recorded:
            ours.append(name)
            continue
        try:
            layout_like = pins.NAME_RE.fullmatch(name) is not None and set(
                layout.children(path)) <= set(pins.KINDS)
        except LoaderdError:  # not a directory
            layout_like = False
        (ours if layout_like else others).append(name)
    return ours, others


def disable(state: State, layout: pins.PinLayout) -> list[str]:
    """Pull the switch, then remove every pin and link loaderd made under the pin root; the
    spec names."""
    try:
        recorded = set(state.manifest().specs)
    except LoaderdError:  # a malformed manifest must not keep the switch from working
        recorded = set()
    ours, others = _loaderds(layout, recorded)
    removed = sorted(n for n in ours if n != pins.STAGING)
    # The switch is pulled before anything is removed: a disable killed half-way must not
    # look like drift that the next start "repairs" by loading everything again.
    state.save(DISABLED)
    # Detach first: unpinning alone leaves a link attached while anyone still holds an fd.
    for name in ours:
        for pin in layout.list_tree(os.path.join(layout.root, name)):
            if "/links/" in f"/{name}/{pin}":
                detach(layout, os.path.join(layout.root, name, pin))
    for name in ours:  # the root is tmpfiles.d's
        layout.remove_tree(os.path.join(layout.root, name))
    audit.emit(Event.KILL_SWITCH, f"kill switch: removed every pin and link loaderd made under "
               f"{layout.root} ({plural(len(removed), 'spec')})", specs=removed)
    if others:
        audit.emit(Event.DEGRADED, "kill switch: left "
                   f"{plural(len(others), 'entry', 'entries')} under "
                   f"{layout.root} that loaderd did not make: {', '.join(others[:20])}",
                   reason="foreign pins under the pin root", entries=others)
    return removed
