"""A uprobe binary the apply unit cannot see is named with the unit setting that hides it
(systemd's inaccessible mount in mountinfo, the unit from /proc/self/cgroup), not a bare
EACCES; the real unit under systemd: tests/e2e/test_hardened_targets.py."""

from __future__ import annotations

from pathlib import Path

from loaderd.bpf import uprobe

MOUNTINFO = """22 1 0:21 / / rw,relatime - ext4 /dev/vda1 rw
172 134 0:42 /systemd/inaccessible/dir /home ro,nosuid,nodev,noexec - tmpfs tmpfs rw,mode=755
137 134 0:42 /systemd/inaccessible/dir /root ro,nosuid,nodev,noexec - tmpfs tmpfs rw,mode=755
180 134 0:42 /systemd/inaccessible/dir /srv/secret ro - tmpfs tmpfs rw,mode=755
"""


def hidden(tmp_path: Path, path: str, cgroup: str = "0::/system.slice/loaderd-apply.service"
           ) -> str | None:
    (tmp_path / "mountinfo").write_text(MOUNTINFO)
    (tmp_path / "cgroup").write_text(cgroup + "\n")
    return uprobe._hidden_by_unit(path, str(tmp_path / "mountinfo"), str(tmp_path / "cgroup"))


def test_protect_home_is_named_with_the_unit(tmp_path: Path) -> None:
    assert hidden(tmp_path, "/home/ops/bin/app") == \
        "loaderd-apply.service's ProtectHome=yes (/home is inaccessible to it)"
    assert hidden(tmp_path, "/root/app", "0::/user.slice/session-1.scope") == \
        "its unit's ProtectHome=yes (/root is inaccessible to it)"
    assert hidden(tmp_path, "/srv/secret/app") == \
        "loaderd-apply.service's InaccessiblePaths=/srv/secret (/srv/secret is inaccessible to it)"


def test_a_visible_path_is_not_said_to_be_hidden(tmp_path: Path) -> None:
    assert hidden(tmp_path, "/usr/local/bin/app") is None
    assert hidden(tmp_path, "/homework/app") is None  # a prefix of the name, not of the path
