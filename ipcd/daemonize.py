"""Background mode without systemd: ``ipcd start`` / ``stop`` / ``status``.

Theory of operation: everything that can fail for a reason the user must
see (bad settings, unsafe socket dir, already running) happens *before*
detaching, while stderr is still the terminal: the master binds its sockets
and takes its lock, then python-daemon detaches (only when not already
under a manager or superserver: it decides), keeping those sockets, the lock
and the log file open (it closes every other fd) with a 022 umask.

python-daemon's own pidfile (a lockfile) does no stale-pid check, so the
pidfile here is ours: a pidfile naming a dead process, or a process that is
not ipcd, is stale and replaced; a live ipcd means "already running".
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path
from types import TracebackType


class PidFileError(Exception):
    """The pidfile says another ipcd runs, or cannot be written."""


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def is_ipcd(pid: int) -> bool:
    """Whether ``pid`` is alive and an ipcd daemon (not a recycled pid). Its
    argv must run the ``ipcd`` program or the ``ipcd.cli.ipcd`` module with
    ``serve`` or ``start``: "ipcd" merely somewhere in a path (a checkout
    named ipcd, say) is not enough."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    program = any(os.path.basename(arg) == b"ipcd" or arg == b"ipcd.cli.ipcd" for arg in argv)
    return program and (b"serve" in argv or b"start" in argv)


class PidFile:
    """A context manager python-daemon enters in the detached process."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def check(self) -> None:
        """Before detaching: refuse if a live ipcd owns the pidfile, clear it if stale."""
        pid = read_pid(self.path)
        if pid is None:
            return
        if pid != os.getpid() and is_ipcd(pid):
            raise PidFileError(f"ipcd is already running (pid {pid}, pidfile {self.path}); 'ipcd stop' first")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # stale: its process is gone or is not ipcd

    def __enter__(self) -> PidFile:
        self.check()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            raise PidFileError(f"pidfile {self.path} appeared meanwhile; is another ipcd starting?") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if read_pid(self.path) == os.getpid():
            self.path.unlink(missing_ok=True)


def stop(path: Path, timeout: float) -> tuple[int, str]:
    """SIGTERM the ipcd of ``path`` and wait for it; (exit code, message)."""
    pid = read_pid(path)
    if pid is None:
        return 0, f"ipcd is not running (no pidfile at {path})"
    if not is_ipcd(pid):
        path.unlink(missing_ok=True)
        return 0, f"ipcd was not running (stale pidfile {path} for pid {pid} removed)"
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        return 0, f"ipcd was not running (stale pidfile {path} removed)"
    except PermissionError:
        return 1, f"not allowed to stop ipcd (pid {pid}); run as its user or root"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return 0, f"ipcd (pid {pid}) stopped"
        time.sleep(0.05)
    return 1, f"ipcd (pid {pid}) did not stop within {timeout:g}s; check its log, or kill -9 it"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    try:  # a zombie is not running; our child only if we started it in the foreground
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
