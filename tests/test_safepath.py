"""The walk that decides whether a path can be changed by someone untrusted,
on real directories, symlinks and owners (a real second user from
useradd: root can chown to it)."""

from __future__ import annotations

import errno
import os
import pwd
from pathlib import Path

import pytest

from ipcd.safepath import UnsafePath, check_path

pytest_plugins = ["tests.handoff.users"]

ROOT_ONLY = {0}


@pytest.fixture
def other(fd_users: object) -> pwd.struct_passwd:
    return fd_users.other  # type: ignore[attr-defined, no-any-return]


def mkdir(path: Path, mode: int = 0o755, uid: int = 0) -> Path:
    path.mkdir()
    os.chmod(path, mode)  # mkdir's mode is filtered by the umask
    os.chown(path, uid, -1)
    return path


def refused(path: Path | str, trusted: set[int] = ROOT_ONLY) -> UnsafePath:
    with pytest.raises(UnsafePath) as caught:
        check_path(str(path), trusted)
    return caught.value


def test_a_root_owned_tree_is_safe_and_the_last_stat_is_returned(short_tmp: Path) -> None:
    inner = mkdir(mkdir(short_tmp / "a") / "b", 0o700)
    assert check_path(str(inner), ROOT_ONLY).st_ino == inner.stat().st_ino


def test_the_sticky_tmp_is_safe_but_an_entry_of_another_user_in_it_is_not(other: pwd.struct_passwd) -> None:
    assert check_path("/tmp", ROOT_ONLY).st_ino == os.stat("/tmp").st_ino
    theirs = Path(f"/tmp/ipcd-sp{os.getpid()}")
    mkdir(theirs, 0o755, other.pw_uid)
    try:
        exc = refused(mkdir(theirs / "s"))
        assert (exc.where, exc.culprit, exc.writable) == (str(theirs), other.pw_uid, False)
        assert exc.problem == f"{theirs} is a directory owned by uid {other.pw_uid} ({other.pw_name})"
        assert check_path(str(theirs / "s"), {0, other.pw_uid}).st_uid == 0  # once trusted
    finally:
        (theirs / "s").rmdir()
        theirs.rmdir()


@pytest.mark.parametrize(("mode", "who"), [(0o777, "others"), (0o775, "its group"), (0o757, "others")])
def test_a_directory_writable_by_others_is_refused(short_tmp: Path, mode: int, who: str) -> None:
    shared = mkdir(short_tmp / "shared", mode)
    exc = refused(mkdir(shared / "s"))
    assert (exc.where, exc.culprit, exc.writable) == (str(shared), None, True)
    assert exc.problem == f"{shared} is writable by {who} (mode {mode:04o})"


def test_a_sticky_directory_of_another_user_is_refused(short_tmp: Path, other: pwd.struct_passwd) -> None:
    """Its owner may rename anything in it, sticky bit or not."""
    sticky = mkdir(short_tmp / "sticky", 0o1777, other.pw_uid)
    assert refused(mkdir(sticky / "s")).culprit == other.pw_uid


def test_a_root_owned_symlink_is_followed_and_its_target_walked(short_tmp: Path) -> None:
    real = mkdir(mkdir(short_tmp / "real") / "s")
    (short_tmp / "link").symlink_to("real")  # relative: resolved from the link's directory
    assert check_path(str(short_tmp / "link" / "s"), ROOT_ONLY).st_ino == real.stat().st_ino
    (short_tmp / "real").chmod(0o777)  # the target's own way in is checked too
    assert refused(short_tmp / "link" / "s").where == str(short_tmp / "real")


def test_a_symlink_of_another_user_is_refused_even_to_a_safe_place(
    short_tmp: Path, other: pwd.struct_passwd
) -> None:
    mkdir(mkdir(short_tmp / "real") / "s")
    link = short_tmp / "link"
    link.symlink_to(short_tmp / "real")
    os.lchown(link, other.pw_uid, -1)
    exc = refused(link / "s")
    assert (exc.where, exc.culprit, exc.is_symlink) == (str(link), other.pw_uid, True)
    assert "is a symlink owned by" in exc.problem


def test_dotdot_after_a_symlink_is_the_target_s_parent_as_for_the_kernel(short_tmp: Path) -> None:
    deep = mkdir(mkdir(short_tmp / "a") / "b")
    (short_tmp / "link").symlink_to(deep)
    mkdir(short_tmp / "a" / "s")
    # Lexically link/../s would be short_tmp/s, which does not exist.
    assert (
        check_path(str(short_tmp / "link" / ".." / "s"), ROOT_ONLY).st_ino
        == (short_tmp / "a" / "s").stat().st_ino
    )


def test_a_relative_path_is_walked_from_the_working_directory(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mkdir(short_tmp / "s")
    monkeypatch.chdir(short_tmp)
    assert check_path("s", ROOT_ONLY).st_ino == (short_tmp / "s").stat().st_ino
    short_tmp.chmod(0o777)
    assert refused("s").where == str(short_tmp)


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda d: None, errno.ENOENT),
        (lambda d: (d / "s").write_text(""), errno.ENOTDIR),
        (lambda d: (d / "s").symlink_to("s"), errno.ELOOP),
    ],
    ids=["missing", "a file on the way", "a symlink loop"],
)
def test_what_a_lookup_would_meet_is_raised_as_the_kernel_would(
    short_tmp: Path, make: object, code: int
) -> None:
    make(short_tmp)  # type: ignore[operator]
    with pytest.raises(OSError, match=os.strerror(code)) as caught:
        check_path(str(short_tmp / "s" / "x"), ROOT_ONLY)
    assert caught.value.errno == code
