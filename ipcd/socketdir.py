"""The socket directory: safe to use in /tmp, one daemon at a time.

Theory of operation: /tmp is writable by everyone, so anyone may have made
``/tmp/ipcd`` first: as a symlink to somewhere we would then create files in,
or as a directory they own and can swap our sockets out of. We refuse to use
a directory that is a symlink, is owned by someone other than us or root, or
is writable by group or others; and, before creating anything, one whose
parents someone else could change (:func:`ipcd.safepath.check_path`: from
``/`` down, every directory is ours or root's and writable by nobody else
unless it is sticky, like /tmp): whoever can write a parent can rename our
directory away after we start and put their own in its place. Inside it, an exclusive ``flock`` on
``.lock`` (holding our pid) makes "already running" exact and race-free; a
socket file left by a killed daemon is "stale" when nobody answers a connect,
and is then replaced. We unlink on exit only the socket files we bound,
and only if the inode at the path is still ours.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import pwd
import socket
import stat
from pathlib import Path
from typing import Final

from ipcd.safepath import UnsafePath, check_path, describe_uid

_DIR_MODE: Final = 0o755


class SocketDirError(Exception):
    """The socket dir cannot be used; the message says why and what to do."""


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def prepare_socket_dir(path: Path, uid: int | None = None) -> None:
    """Check the parents of ``path``, create it (mode 0755) if missing, then
    check it is safe to use."""
    uid = os.geteuid() if uid is None else uid
    check_parents(path, uid)
    try:
        os.mkdir(path, _DIR_MODE)
        os.chmod(path, _DIR_MODE)  # mkdir's mode is filtered by the umask
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise SocketDirError(f"cannot create socket dir {path}: its parent does not exist") from None
    except PermissionError:
        raise SocketDirError(
            f"cannot create socket dir {path}: permission denied; choose another --socket-dir"
        ) from None
    check_socket_dir(path, uid)


def check_parents(path: Path, uid: int) -> None:
    """Refuse a socket dir whose parents someone but root or ``uid`` could change."""
    try:
        check_path(str(path.parent), {0, uid})
    except UnsafePath as exc:
        if exc.writable:
            advice = f"run 'chmod go-w {exc.where}' or choose another --socket-dir"
        else:
            whom = "root" if uid == 0 else f"root or {describe_uid(uid)}"
            advice = f"choose a --socket-dir whose parents only {whom} can change"
        raise SocketDirError(
            f"socket dir {path} is unsafe: {exc.problem}, so {exc.who_could} could replace it; {advice}"
        ) from None
    except FileNotFoundError:
        raise SocketDirError(f"cannot create socket dir {path}: its parent does not exist") from None
    except OSError as exc:
        raise SocketDirError(
            f"cannot check the parents of socket dir {path}: {exc.strerror} ({exc.filename}); "
            "choose another --socket-dir"
        ) from None


def check_socket_dir(path: Path, uid: int) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise SocketDirError(
            f"socket dir {path} is a symlink; refusing to follow it "
            "(remove it or choose another --socket-dir)"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise SocketDirError(f"socket dir {path} exists and is not a directory; remove it or choose another")
    if st.st_uid not in (uid, 0):
        raise SocketDirError(
            f"socket dir {path} is owned by {_owner_name(st.st_uid)}, not by "
            f"{_owner_name(uid) + ' or root' if uid else 'root'}; "
            "someone else may control it: remove it or choose another --socket-dir"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = f"{stat.S_IMODE(st.st_mode):04o}"
        if st.st_mode & stat.S_ISVTX:
            # A shared dir such as /tmp: its mode is the system's, never ours to change.
            raise SocketDirError(
                f"socket dir {path} is a shared directory writable by others (mode {mode}); "
                f"use a dedicated dir inside it, e.g. --socket-dir {path / 'ipcd'}"
            )
        raise SocketDirError(
            f"socket dir {path} is writable by others (mode {mode}); "
            f"run 'chmod go-w {path}' or choose another --socket-dir"
        )


class DaemonLock:
    """An flock on ``<socket dir>/.lock``, held for the daemon's lifetime."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SocketDirError(
                f"ipcd is already running on {self.path.parent} (pid {holder}); "
                "stop it first or choose another --socket-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    @property
    def fd(self) -> int:
        return self._fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _is_live(path: Path, kind: socket.SocketKind) -> bool:
    """Whether something listens on the socket file ``path``."""
    probe = socket.socket(socket.AF_UNIX, kind)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        # EAGAIN (backlog full) or a timeout: somebody is there, just busy.
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK)
    finally:
        probe.close()
    return True


def _clear_stale(path: Path, kind: socket.SocketKind) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketDirError(f"{path} exists and is not a socket; remove it or choose another --socket-dir")
    if _is_live(path, kind):
        raise SocketDirError(
            f"another process is serving {path}; stop it first or choose another --socket-dir"
        )
    os.unlink(path)


class BoundSocket:
    """A socket we bound to a path; remembers the inode to unlink it safely."""

    def __init__(self, sock: socket.socket, path: Path, owned: bool) -> None:
        self.sock = sock
        self.path = path
        self.owned = owned  # False when systemd (or someone) bound it for us
        self._ino = os.stat(path).st_ino if owned else -1

    def unlink(self) -> None:
        if not self.owned:
            return
        try:
            if os.lstat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def bind_socket(path: Path, kind: socket.SocketKind, mode: int, group: str = "") -> BoundSocket:
    """Bind (and for streams, listen on) a Unix socket at ``path``."""
    _clear_stale(path, kind)
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        # bind() creates the file with 0777 & ~umask, and python-daemon sets
        # the umask to 0: until the chmod below anyone could connect, even
        # with a narrow --socket-mode. Create it owner-only instead.
        umask = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(umask)
        os.chmod(path, mode)
        if group:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
            os.chown(path, -1, gid)
        if kind == socket.SOCK_STREAM:
            sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise SocketDirError(f"cannot bind {path}: {exc.strerror}") from None
    return BoundSocket(sock, path, owned=True)
