"""Can anyone but the trusted users change where a directory path leads?

Theory of operation: a path is only as safe as every directory on the way
to it. Whoever can write a directory can rename its entries away and put
their own in their place, so from ``/`` down every directory must be owned
by a trusted uid and be writable by nobody else -- except a sticky
directory such as ``/tmp``, whose entries only their own owners may rename
or delete: there it is enough that the next entry is trusted, which the walk
checks anyway. A symlink on the way is followed here, by hand, not by the
kernel: it is an entry like any other (in a sticky dir its owner can replace
it), so it must be owned by a trusted uid, and the path it points to is
walked by the same rules. Nothing is resolved behind our back (no realpath)
and every number comes from ``lstat``; user names are looked up only to
write an error message.

Both sides use it: the daemon for the parents of its socket dir before it
creates anything there (:mod:`ipcd.socketdir`), a client for the whole way
to the socket dir before it connects (:mod:`ipcd.client`).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Container
from typing import Final

_MAX_SYMLINKS: Final = 40  # what the kernel follows in one lookup before ELOOP
WRITABLE_BY_OTHERS: Final = stat.S_IWGRP | stat.S_IWOTH


def describe_uid(uid: int) -> str:
    """``uid 1001 (mallory)``, or ``uid 1001`` for a uid with no name."""
    import pwd  # noqa: PLC0415 - only error messages need it (start-up time)

    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


class UnsafePath(Exception):
    """``where``, a directory or symlink on the way, can be changed by
    someone untrusted: ``culprit`` (its owner), or its group or everyone
    (``culprit`` None) when its mode lets them."""

    def __init__(self, where: str, st: os.stat_result, *, writable: bool = False) -> None:
        self.where = where
        self.mode = stat.S_IMODE(st.st_mode)
        self.is_symlink = stat.S_ISLNK(st.st_mode)
        self.owner = st.st_uid
        self.writable = writable  # the mode is the problem, not the (trusted) owner
        super().__init__(self.problem)

    @property
    def culprit(self) -> int | None:
        """The uid that could change ``where``; None for a group or everyone."""
        return None if self.writable else self.owner

    @property
    def problem(self) -> str:
        """What is wrong, as a clause: ``/tmp/x is writable by others (mode 0777)``."""
        if self.writable:
            who = "others" if self.mode & stat.S_IWOTH else "its group"
            return f"{self.where} is writable by {who} (mode {self.mode:04o})"
        kind = "a symlink" if self.is_symlink else "a directory"
        return f"{self.where} is {kind} owned by {describe_uid(self.owner)}"

    @property
    def who_could(self) -> str:
        """Who could replace what lies beyond ``where``."""
        if self.culprit is not None:
            return "that user"
        return "anyone" if self.mode & stat.S_IWOTH else "its group"


def _check_dir(path: str, st: os.stat_result, trusted: Container[int]) -> None:
    if st.st_uid not in trusted:
        raise UnsafePath(path, st)
    if st.st_mode & WRITABLE_BY_OTHERS and not st.st_mode & stat.S_ISVTX:
        raise UnsafePath(path, st, writable=True)


def check_path(path: str, trusted: Container[int]) -> os.stat_result:
    """The ``lstat`` of the directory ``path`` leads to, once every entry on
    the way (``/`` and ``path`` included, symlinks followed by hand) is
    owned by a uid in ``trusted`` and no directory is writable by others
    unless sticky. Whether ``path`` itself may be sticky and shared is the
    caller's to decide.

    Raises :class:`UnsafePath` at the first entry that fails, and the
    ``OSError`` a lookup of ``path`` would meet on the way (ENOENT, ENOTDIR,
    EACCES, ELOOP).
    """
    if not path.startswith("/"):
        path = f"{os.getcwd()}/{path}"  # getcwd has no symlinks in it
    pending = path.split("/")[::-1]  # components still to walk, the next one last
    walked = [("/", os.lstat("/"))]  # the real directories so far: never a symlink
    _check_dir("/", walked[0][1], trusted)
    links = 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            if len(walked) > 1:
                walked.pop()  # back to a directory already checked: what the kernel does
            continue
        here = walked[-1][0]
        entry = f"{here}{name}" if here == "/" else f"{here}/{name}"
        st = os.lstat(entry)
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in trusted:
                raise UnsafePath(entry, st)
            links += 1
            if links > _MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            target = os.readlink(entry)
            if target.startswith("/"):
                del walked[1:]
            pending.extend(target.split("/")[::-1])
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), entry)
        _check_dir(entry, st, trusted)
        walked.append((entry, st))
    return walked[-1][1]
