"""StrictModes-style trust: owners, modes, symlinks, path escapes, and reading what was
checked. Needs root (files are chowned to other uids)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from loaderd.config import trust
from loaderd.errors import Kind, LoaderdError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chowns files: needs root")
OTHER = 4242


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root-owned 0755 tree: root/ (checked up to here) with sub/ and spec.yaml."""
    os.chmod(tmp_path, 0o755)
    base = tmp_path / "root"
    (base / "sub").mkdir(parents=True)
    for d in (base, base / "sub"):
        os.chmod(d, 0o755)
    for f in (base / "spec.yaml", base / "sub" / "x.c"):
        f.write_text("data\n")
        os.chmod(f, 0o644)
    return base


def refused(path: Path, root: Path, owner_uid: int | None = 0) -> LoaderdError:
    with pytest.raises(LoaderdError) as info:
        trust.check_file(str(path), owner_uid=owner_uid, root_dir=str(root))
    assert info.value.kind is Kind.TRUST
    return info.value


def test_trusted_file_resolves(root: Path) -> None:
    got = trust.check_file(str(root / "sub" / "x.c"), owner_uid=0, root_dir=str(root))
    assert got == os.path.realpath(root / "sub" / "x.c")


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666, 0o620])
def test_group_or_other_writable_file_is_refused(root: Path, mode: int) -> None:
    os.chmod(root / "spec.yaml", mode)
    err = refused(root / "spec.yaml", root)
    assert "writable by group or other" in err.message and f"{mode:04o}" in err.message
    assert err.location.file == str(root / "spec.yaml")


def test_file_of_another_user_is_refused_unless_it_is_the_owner(root: Path) -> None:
    os.chown(root / "spec.yaml", OTHER, -1)
    assert f"owned by uid {OTHER}" in refused(root / "spec.yaml", root).message
    trust.check_file(str(root / "spec.yaml"), owner_uid=OTHER, root_dir=str(root))


def test_root_owned_files_are_trusted_for_any_owner(root: Path) -> None:
    trust.check_file(str(root / "spec.yaml"), owner_uid=OTHER, root_dir=str(root))


@pytest.mark.parametrize("which", ["root", "sub"])
def test_writable_directory_up_to_root_dir_is_refused(root: Path, which: str) -> None:
    target = root if which == "root" else root / "sub"
    os.chmod(target, 0o777)
    err = refused(root / "sub" / "x.c", root)
    assert err.location.file == str(target) and "directory" in err.message


def test_directory_of_another_user_is_refused(root: Path) -> None:
    os.chown(root / "sub", OTHER, -1)
    assert f"owned by uid {OTHER}" in refused(root / "sub" / "x.c", root).message


def test_writable_directory_above_root_dir_is_refused(root: Path) -> None:
    """Like sshd's StrictModes: whoever may write an ancestor could swap the tree below it."""
    os.chmod(root.parent, 0o777)
    err = refused(root / "spec.yaml", root)
    assert err.location.file == str(root.parent) and "parent directory" in err.message


def test_ancestor_of_another_user_is_refused(root: Path) -> None:
    os.chown(root.parent, OTHER, 0)
    err = refused(root / "spec.yaml", root)
    assert err.location.file == str(root.parent) and f"uid {OTHER}" in err.message


def test_root_sticky_ancestor_is_trusted(root: Path) -> None:
    """/tmp-like (1777 root): others cannot rename or remove the root-owned entry below it
    (which is checked in turn); without the sticky bit, or not root's, it is refused."""
    os.chmod(root.parent, 0o1777)
    trust.check_file(str(root / "spec.yaml"), owner_uid=0, root_dir=str(root))
    os.chown(root.parent, OTHER, 0)
    assert refused(root / "spec.yaml", root).location.file == str(root.parent)


def test_owner_none_skips_ownership_but_not_escapes(root: Path) -> None:
    os.chmod(root / "spec.yaml", 0o666)
    os.chown(root / "spec.yaml", OTHER, -1)
    trust.check_file(str(root / "spec.yaml"), owner_uid=None, root_dir=str(root))
    os.symlink("/etc/hostname", root / "out.yaml")
    assert "outside" in refused(root / "out.yaml", root, owner_uid=None).message


def test_symlink_inside_root_is_followed(root: Path) -> None:
    os.symlink("sub/x.c", root / "link.c")
    got = trust.check_file(str(root / "link.c"), owner_uid=0, root_dir=str(root))
    assert got == os.path.realpath(root / "sub" / "x.c")


def test_symlink_leaving_root_is_refused(root: Path) -> None:
    os.symlink("../../../../../../etc/hostname", root / "link.c")
    assert "symlink points outside" in refused(root / "link.c", root).message


def test_symlinked_parent_leaving_root_is_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o755)
    (outside / "x.c").write_text("x")
    os.symlink(outside, root / "dir")
    assert "resolves outside" in refused(root / "dir" / "x.c", root).message


def test_file_outside_root_is_refused(root: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    other.write_text("x")
    assert "outside the directory" in refused(other, root).message


def test_non_regular_files_are_refused(root: Path) -> None:
    os.mkfifo(root / "fifo.yaml", 0o644)
    assert "not a regular file" in refused(root / "fifo.yaml", root).message
    assert "not a regular file" in refused(root / "sub", root).message


def test_missing_file(root: Path) -> None:
    assert "cannot open" in refused(root / "nope.yaml", root).message


def test_read_file_returns_the_bytes_capped(root: Path) -> None:
    (root / "spec.yaml").write_bytes(b"x" * 100)
    read = trust.read_file(str(root / "spec.yaml"), owner_uid=0, root_dir=str(root),
                           max_bytes=10)
    assert read == b"x" * 11  # one more than the limit, so the caller can say "too big"
    assert trust.read_file(str(root / "spec.yaml"), owner_uid=0, root_dir=str(root),
                           max_bytes=1000) == b"x" * 100


def test_read_file_notices_a_swap_after_the_check(root: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    evil = root / "evil.yaml"
    evil.write_text("evil")
    os.chmod(evil, 0o644)
    real_open = os.open

    def swapping_open(path: str, flags: int, *args: int) -> int:
        os.replace(evil, path)  # a racing writer replaces the checked file
        return real_open(path, flags, *args)

    monkeypatch.setattr("loaderd.config.trust.os.open", swapping_open)
    with pytest.raises(LoaderdError) as info:
        trust.read_file(str(root / "spec.yaml"), owner_uid=0, root_dir=str(root),
                        max_bytes=100)
    assert "changed while it was being checked" in info.value.message


def test_read_file_does_not_follow_a_late_symlink(root: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def swapping_open(path: str, flags: int, *args: int) -> int:
        os.unlink(path)
        os.symlink("/etc/hostname", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr("loaderd.config.trust.os.open", swapping_open)
    with pytest.raises(LoaderdError) as info:
        trust.read_file(str(root / "spec.yaml"), owner_uid=0, root_dir=str(root),
                        max_bytes=100)
    assert "cannot open" in info.value.message  # O_NOFOLLOW: ELOOP


def test_read_file_never_blocks_on_a_fifo(root: Path) -> None:
    os.mkfifo(root / "fifo.yaml", 0o644)
    done = threading.Event()

    def attempt() -> None:
        with pytest.raises(LoaderdError):
            trust.read_file(str(root / "fifo.yaml"), owner_uid=0, root_dir=str(root),
                            max_bytes=10)
        done.set()

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(5)
    assert done.is_set()


@pytest.mark.parametrize("ref, problem", [
    ("/etc/passwd", "absolute paths"),
    ("../x.c", "leaves the spec's directory"),
    ("sub/../../x.c", "leaves the spec's directory"),
    ("sub/../../root/../x.c", "leaves the spec's directory"),
    (".", "leaves the spec's directory"),
    ("a\0b", "NUL"),
])
def test_check_relative_refuses_escapes(root: Path, ref: str, problem: str) -> None:
    with pytest.raises(LoaderdError) as info:
        trust.check_relative(ref, str(root))
    assert info.value.kind is Kind.TRUST and problem in info.value.message
    assert info.value.location.field == "source.file"


def test_check_relative_allows_paths_that_stay_inside(root: Path) -> None:
    assert trust.check_relative("sub/../sub/x.c", str(root)) == str(root / "sub" / "x.c")
    assert trust.check_relative("./spec.yaml", str(root)) == str(root / "spec.yaml")


def test_check_relative_refuses_symlink_escapes(root: Path) -> None:
    os.symlink("/etc", root / "sub" / "etc")
    with pytest.raises(LoaderdError) as info:
        trust.check_relative("sub/etc/hostname", str(root))
    assert "symlink points outside" in info.value.message


@pytest.mark.parametrize("owner_uid", [0, None])
def test_hard_linked_file_is_refused_without_its_content(root: Path, tmp_path: Path,
                                                         owner_uid: int | None) -> None:
    secret = tmp_path / "secret"
    secret.write_text("TOPSECRET\n")
    os.chmod(secret, 0o600)
    os.link(secret, root / "linked.yaml")
    for check in (trust.check_file, trust.read_file):
        with pytest.raises(LoaderdError) as info:
            kw = {"max_bytes": 100} if check is trust.read_file else {}
            check(str(root / "linked.yaml"), owner_uid=owner_uid, root_dir=str(root), **kw)
        err = info.value
        assert err.kind is Kind.TRUST and "2 hard links" in str(err)
        assert "TOPSECRET" not in str(err) and err.location.file == str(root / "linked.yaml")


def test_second_name_inside_the_directory_is_refused_too(root: Path) -> None:
    os.link(root / "spec.yaml", root / "sub" / "copy.yaml")
    assert "2 hard links" in refused(root / "spec.yaml", root).message
    os.unlink(root / "sub" / "copy.yaml")
    trust.check_file(str(root / "spec.yaml"), owner_uid=0, root_dir=str(root))


# --- walk_dir: the directories on the way to a trusted directory, through symlinks ---------

ROOTS = frozenset({0})


def walk_refused(path: Path, **kw: object) -> LoaderdError:
    with pytest.raises(LoaderdError) as info:
        trust.walk_dir(str(path), uids=ROOTS, **kw)  # type: ignore[arg-type]
    assert info.value.kind is Kind.TRUST and "\n" not in str(info.value)
    return info.value


def test_walk_resolves_a_trusted_path(root: Path) -> None:
    os.symlink(root / "sub", root / "via")
    assert trust.walk_dir(str(root / "via"), uids=ROOTS) == os.path.realpath(root / "sub")
    assert trust.walk_dir(str(root / "new" / "deeper"), uids=ROOTS, allow_missing=True) \
        == str(root / "new" / "deeper")


def test_walk_refuses_a_symlink_inside_a_world_writable_directory(root: Path) -> None:
    """programs_dir = /ww/link -> a perfectly trusted directory: whoever writes /ww can point
    the link elsewhere at any time, so the trusted target does not make the path trusted."""
    ww = root / "ww"
    ww.mkdir()
    os.chmod(ww, 0o777)
    os.symlink(root / "sub", ww / "link")
    err = walk_refused(ww / "link")
    assert err.location.file == str(ww) and "writable by group or other" in err.message
    with pytest.raises(LoaderdError):  # a spec file reached that way (`check --dir`)
        trust.check_file(str(ww / "link" / "x.c"), owner_uid=0, root_dir=str(ww / "link"))


def test_walk_refuses_another_users_symlink_in_a_sticky_directory(root: Path) -> None:
    sticky = root / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    os.symlink(root / "sub", sticky / "theirs")
    os.lchown(sticky / "theirs", OTHER, OTHER)
    err = walk_refused(sticky / "theirs")
    assert f"symlink on the way to {sticky / 'theirs'} is owned by uid {OTHER}" in err.message
    os.symlink(root / "sub", sticky / "roots")  # root's own link there: others cannot replace it
    assert trust.walk_dir(str(sticky / "roots"), uids=ROOTS) == str(root / "sub")
    (sticky / "dir").mkdir(mode=0o755)
    os.chown(sticky / "dir", OTHER, -1)
    assert "owned by uid 4242" in walk_refused(sticky / "dir").message
    assert "writable by group or other" in walk_refused(sticky).message  # never the last one


def test_walk_refuses_a_symlink_target_through_an_untrusted_directory(root: Path,
                                                                      tmp_path: Path) -> None:
    other = tmp_path / "other"
    (other / "in").mkdir(parents=True)
    os.chmod(other, 0o755)
    os.chown(other, OTHER, -1)
    os.symlink(other / "in", root / "link")
    err = walk_refused(root / "link")
    assert err.location.file == str(other) and "parent directory is owned by uid" in err.message


def test_walk_last_directory_owners_and_symlink(root: Path) -> None:
    os.chown(root / "sub", OTHER, -1)
    assert "directory is owned by uid 4242" in walk_refused(root / "sub").message
    trust.walk_dir(str(root / "sub"), uids=ROOTS, last_uids=frozenset({0, OTHER}))
    os.symlink("sub", root / "link")
    err = walk_refused(root / "link", last_uids=frozenset({0, OTHER}), kind="state_dir",
                       last_symlink_ok=False)
    assert "state_dir is a symlink" in err.message
    os.chmod(root / "sub", 0o1777)
    assert "writable" in walk_refused(root / "sub", last_uids=frozenset({0, OTHER})).message


def test_walk_missing_path_under_an_untrusted_parent(root: Path) -> None:
    os.chmod(root / "sub", 0o777)
    assert "writable" in walk_refused(root / "sub" / "state", allow_missing=True).message
    assert "No such file" in walk_refused(root / "nope").message


def test_walk_symlink_loop_ends(root: Path) -> None:
    os.symlink("b", root / "a")
    os.symlink("a", root / "b")
    assert "too many levels of symlinks" in walk_refused(root / "a").message


def test_walk_missing_path_under_a_sticky_directory_is_refused(root: Path) -> None:
    """Someone else could make it first (apply then uses their directory)."""
    sticky = root / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    err = walk_refused(sticky / "state", allow_missing=True)
    assert "parent directory is writable" in err.message and err.location.file == str(sticky)
    (sticky / "state").mkdir(mode=0o755)  # made by root: fine
    trust.walk_dir(str(sticky / "state"), uids=ROOTS, allow_missing=True)
