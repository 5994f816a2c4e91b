"""sd_notify for loaderd's processes, apart from the resident daemon so that `loaderd apply`
says its progress without importing the resident's event pump, metrics and status report."""

from __future__ import annotations

import os

PROGRESS = "progress: "  # prefix of the apply child's progress lines on stdout


def notify(message: str) -> None:
    """sd_notify; a no-op outside systemd (no NOTIFY_SOCKET)."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    from systemd import daemon

    daemon.notify(message)


def status(message: str) -> None:
    notify(f"STATUS={message}")
