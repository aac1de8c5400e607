"""Real users for the fd hand-off tests, processes that act as them, and
the daemon's fd ledger.

/root is 0700 on the test machine, so another user cannot start the venv's
interpreter. A process *becomes* a user by forking from the test process
and dropping its privileges (``setgroups``, ``setgid``, ``setuid``) before
it connects: :func:`as_user` runs a function that way and brings back its
result, :func:`ipcctl_as` runs ``ipcctl`` itself (its click entry point,
already imported) with stdout and stderr captured, so a refusal can be read
exactly as the user would see it. Either child first closes every fd it
inherited but stdio and the ones it is told to keep: a copy of one of the
test's client sockets would otherwise keep that connection open.

:class:`FdLedger` is the hand-off's fd hygiene rule made checkable: the
master holds its baseline plus exactly one fd per stored fd, every worker
holds its baseline, whatever happened in between (refusals included).
:class:`tests.daemon.Pipes` proves single closes directly: a pipe's read end sees EOF
once the daemon closed the write end it was given.

The module is also this directory's pytest plugin (each test module names
it in ``pytest_plugins``, so the session's users are made once): fixtures
``fd_users`` and ``start_daemon``.
"""

from __future__ import annotations

import contextlib
import grp
import io
import os
import pwd
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from ipcd.cli.ipcctl import cli
from ipcd.client import ClientError, ServerError
from tests import sharedusers
from tests.daemon import Daemon, fd_count, fd_targets, wait_for

OWNER = "ipcd-fd-owner"
FRIEND = "ipcd-fd-friend"
OTHER = "ipcd-fd-other"
GROUP = "ipcd-fd-group"


# -- users -------------------------------------------------------------------------


class FdUsers(NamedTuple):
    owner: pwd.struct_passwd
    friend: pwd.struct_passwd  # also a supplementary member of ``group``
    other: pwd.struct_passwd
    group: grp.struct_group


_created: list[tuple[str, str]] = []  # ("user" | "group", name) made by this session


def ensure_users() -> FdUsers:
    """The three users and the group, created if missing (idempotent)."""
    if sharedusers.admin("groupadd", "--system", GROUP) == 0:
        _created.append(("group", GROUP))
    for name in (OWNER, FRIEND, OTHER):
        argv = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
        if name == FRIEND:
            argv[1:1] = ["--groups", GROUP]
        if sharedusers.admin(*argv) == 0:
            _created.append(("user", name))
    if FRIEND not in grp.getgrnam(GROUP).gr_mem:  # a friend left by someone else
        sharedusers.admin("usermod", "--append", "--groups", GROUP, FRIEND)
    users = FdUsers(pwd.getpwnam(OWNER), pwd.getpwnam(FRIEND), pwd.getpwnam(OTHER), grp.getgrnam(GROUP))
    assert users.group.gr_gid not in (users.friend.pw_gid, users.other.pw_gid, users.owner.pw_gid)
    return users


def remove_created() -> None:
    """userdel/groupdel what :func:`ensure_users` made, users first."""
    for kind, name in sorted(_created, key=lambda item: item[0] != "user"):
        subprocess.run([f"{kind}del", name], capture_output=True, check=False)
    _created.clear()


@pytest.fixture(scope="session")
def fd_users() -> Iterator[FdUsers]:
    """Session-wide users; removed at the end only if this session made them
    and no other session is using them (tests.sharedusers)."""
    with sharedusers.shared(lambda: (ensure_users(), remove_created)) as users:
        yield users


StartDaemon = Callable[..., Daemon]


@pytest.fixture
def start_daemon(short_tmp: Path) -> Iterator[StartDaemon]:
    """Start ``ipcd serve`` with extra flags on a socket dir every user can
    reach (mkdtemp makes its parent 0700); it must stop cleanly (exit 0)."""
    short_tmp.chmod(0o755)
    started: list[Daemon] = []

    def start(*args: str, workers: int = 2) -> Daemon:
        daemon = Daemon(short_tmp / "s", *args, workers=workers)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            code = daemon.stop()
            assert code == 0, f"ipcd exited {code} on SIGTERM:\n{daemon.log()}"


# -- acting as a user -----------------------------------------------------------------


def _fork() -> int:
    with warnings.catch_warnings():
        # 3.12 warns about fork in a threaded process; the child only runs
        # plain Python and syscalls, then _exit()s or execs.
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def _become(user: pwd.struct_passwd | None, keep: Sequence[int]) -> None:  # pragma: no cover - child
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2 and int(name) not in keep:
            with contextlib.suppress(OSError):
                os.close(int(name))
    if user is not None:
        os.setgroups(os.getgrouplist(user.pw_name, user.pw_gid))
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)


def _reap(pid: int, timeout: float, what: str) -> int:
    """Exit status of child ``pid``; SIGKILL and fail if it outlives ``timeout``."""
    pidfd = os.pidfd_open(pid)
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"{what} (pid {pid}) still running after {timeout}s; killed")
    finally:
        os.close(pidfd)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


class Outcome(NamedTuple):
    """What a function run as a user returned, or the daemon's refusal."""

    value: Any = None
    code: str | None = None  # ErrorCode name if the daemon refused
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code is None


class Pending:
    """A function running as a user in a forked child; :meth:`result` waits."""

    def __init__(self, pid: int, channel: Connection, what: str) -> None:
        self.pid = pid
        self.channel = channel
        self.what = what

    def result(self, timeout: float = 20.0) -> Outcome:
        try:
            if not self.channel.poll(timeout):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                pytest.fail(f"{self.what} gave no answer within {timeout}s; killed")
            reply = self.channel.recv()
        except EOFError:
            reply = ("crash", f"{self.what} exited without an answer")
        finally:
            self.channel.close()
        _reap(self.pid, 10, self.what)
        if reply[0] == "crash":
            pytest.fail(f"{self.what} failed:\n{reply[1]}")
        return Outcome(*reply[1:])


def start_as(
    user: pwd.struct_passwd | None,
    func: Callable[..., Any],
    *args: Any,
    keep: Sequence[int] = (),
    **kwargs: Any,
) -> Pending:
    """Run ``func(*args, **kwargs)`` as ``user`` (None: root) in a forked
    child that keeps only stdio and ``keep`` of the test's fds."""
    parent, child = socket.socketpair()
    pid = _fork()
    if pid == 0:  # pragma: no cover - the child
        reply: tuple[Any, ...]
        try:
            parent.close()
            channel = Connection(child.detach())
            _become(user, [*keep, channel.fileno()])
            try:
                reply = ("ok", func(*args, **kwargs))
            except ServerError as exc:
                reply = ("refused", None, exc.code_name, exc.message)
            except ClientError as exc:
                reply = ("refused", None, type(exc).__name__, str(exc))
            except BaseException:
                reply = ("crash", traceback.format_exc())
            channel.send(reply)
        finally:
            os._exit(0)
    child.close()
    name = user.pw_name if user is not None else "root"
    return Pending(pid, Connection(parent.detach()), f"{getattr(func, '__name__', 'function')} as {name}")


def as_user(
    user: pwd.struct_passwd | None,
    func: Callable[..., Any],
    *args: Any,
    keep: Sequence[int] = (),
    timeout: float = 20.0,
    **kwargs: Any,
) -> Outcome:
    return start_as(user, func, *args, keep=keep, **kwargs).result(timeout)


def ipcctl_as(
    user: pwd.struct_passwd,
    socket_dir: Path,
    *args: str,
    stdin_fd: int | None = None,
    keep: Sequence[int] = (),
    timeout: float = 20.0,
) -> subprocess.CompletedProcess[str]:
    """``ipcctl --socket-dir DIR ARGS`` run as ``user``: the click command
    itself in a forked child, stdout and stderr captured (a ``-- CMD`` it
    execs writes to the same pipes)."""
    argv = ["--socket-dir", str(socket_dir), *args]
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = _fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            if stdin_fd is not None:
                os.dup2(stdin_fd, 0)
            else:
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
            sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
            _become(user, keep)
            try:
                cli.main(args=argv, prog_name="ipcctl")
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    try:
        out, err = _drain((out_r, err_r), timeout, pid)
    finally:
        os.close(out_r)
        os.close(err_r)
    code = _reap(pid, 10, f"ipcctl {' '.join(args)} as {user.pw_name}")
    return subprocess.CompletedProcess(["ipcctl", *argv], code, out.decode(), err.decode())


def _drain(fds: tuple[int, int], timeout: float, pid: int) -> tuple[bytes, bytes]:
    """Everything written to both pipes until both are closed."""
    chunks: dict[int, list[bytes]] = {fd: [] for fd in fds}
    open_fds = set(fds)
    deadline = time.monotonic() + timeout
    while open_fds:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"forked ipcctl (pid {pid}) did not finish within {timeout}s: {chunks}")
        for fd in select.select(list(open_fds), [], [], remaining)[0]:
            data = os.read(fd, 65536)
            if data:
                chunks[fd].append(data)
            else:
                open_fds.discard(fd)
    return b"".join(chunks[fds[0]]), b"".join(chunks[fds[1]])


# -- the daemon's fds ------------------------------------------------------------


def daemon_connections(daemon: Daemon) -> int:
    """Stream connections the daemon has accepted (or queued), from ss(8)."""
    out = subprocess.run(["ss", "-x", "-a", "-n"], capture_output=True, text=True, check=True).stdout
    path = str(daemon.stream_path)
    return sum(
        1
        for f in (line.split() for line in out.splitlines()[1:])
        if len(f) >= 5 and f[4] == path and f[1] != "LISTEN"
    )


class FdLedger:
    """The daemon's fd counts against what it stores: the master at its
    baseline plus one per stored fd; every worker at the idle baseline plus
    at most one copy of each stored fd (a worker keeps copies of entries
    it was asked to GET, ipcd.handoff.replica), and exactly at the baseline
    once nothing is stored. Take it on a fresh daemon (nothing stored)
    before the scenario."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.workers = daemon.worker_pids()
        store = daemon.status()["store"]
        assert (store["entries"], store["stored_fds"], store["waiters"]) == (0, 0, 0), (
            "take the ledger on an empty store"
        )
        self._wait_idle()
        self.master = fd_count(daemon.pid)
        self.worker = wait_for(self._agreed_worker_count, 10, "idle workers to hold the same fds")

    def _wait_idle(self) -> None:
        wait_for(lambda: daemon_connections(self.daemon) == 0, 10, "the daemon to close every connection")

    def _agreed_worker_count(self) -> int | None:
        counts = {fd_count(pid) for pid in self.workers}
        return counts.pop() if len(counts) == 1 else None

    def counts(self) -> dict[str, Any]:
        result: dict[str, Any] = {"master": fd_count(self.daemon.pid)}
        for pid in self.workers:
            try:
                result[f"worker {pid}"] = fd_count(pid)
            except FileNotFoundError:
                result[f"worker {pid}"] = None  # gone: a crash
        return result

    def expect(self, stored: int, clients: int = 0, timeout: float = 10.0) -> None:
        """The store reports ``stored`` fds and the fd counts say exactly that
        (waits for closes in flight). ``clients``: connections of ours still
        open, one fd each in whichever worker serves it."""
        store = self.daemon.status()["store"]
        assert store["stored_fds"] == stored, f"the daemon reports {store}, expected {stored} stored fds"

        def balanced() -> bool:
            counts = self.counts()
            workers = [counts[f"worker {pid}"] for pid in self.workers]
            if counts["master"] != self.master + stored or None in workers:
                return False
            idle = self.worker * len(workers) + clients
            copies = sum(workers) - idle  # of stored fds, kept for GETs
            return all(count >= self.worker for count in workers) and 0 <= copies <= stored * len(workers)

        try:
            wait_for(balanced, timeout, f"daemon fds = baseline + {stored} stored")
        except TimeoutError:
            pytest.fail(
                f"daemon fd counts {self.counts()}, expected master {self.master} + {stored} stored and "
                f"workers at {self.worker} (+{clients} open connections, + at most {stored} copies each); "
                "master holds "
                f"{sorted(fd_targets(self.daemon.pid))}"
            )

    def workers_replaced(self, gone: int) -> list[int]:
        """After worker ``gone`` was killed: wait for its replacement to run
        and reach the idle baseline; returns the new worker pids."""
        status = self.daemon.settled_status(
            lambda s: (
                gone not in {w["pid"] for w in s["workers"]}
                and len([w for w in s["workers"] if w["state"] == "running"]) == len(self.workers)
            ),
            timeout=20,
        )
        self.workers = [w["pid"] for w in status["workers"] if w["state"] == "running"]
        return self.workers


# -- fds given away ---------------------------------------------------------------
