"""The kill switch: detach and unpin everything loaderd owns, and keep it that way.

Once pulled, nothing loads until an operator releases it: a unit restart, a reboot with the
unit enabled or a reload must not load everything again behind their back. The caller holds
the state lock.
"""

from __future__ import annotations

import errno
import os
import time

from loaderd.audit import log as audit
from loaderd.audit.log import Event
from loaderd.bpf import kernel, pins
from loaderd.errors import Kind, LoaderdError, Location
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


def disable(state: State, layout: pins.PinLayout) -> list[str]:
    """Pull the switch, then remove every pin and link under the pin root; the spec names."""
    try:
        removed = sorted(state.manifest().specs)
    except LoaderdError:  # a malformed manifest must not keep the switch from working
        removed = sorted(n for n in layout.children(layout.root) if pins.NAME_RE.fullmatch(n))
    # The switch is pulled before anything is removed: a disable killed half-way must not
    # look like drift that the next start "repairs" by loading everything again.
    state.save(DISABLED)
    # Detach first: unpinning alone leaves a link attached while anyone still holds an fd.
    for pin in layout.list_tree(layout.root):
        if "/links/" in f"/{pin}":
            detach(layout, os.path.join(layout.root, pin))
    for name in layout.children(layout.root):  # the root is tmpfiles.d's
        layout.remove_tree(os.path.join(layout.root, name))
    audit.emit(Event.KILL_SWITCH, f"kill switch: removed every pin and link under "
               f"{layout.root} ({len(removed)} specs)", specs=removed)
    return removed
