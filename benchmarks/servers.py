"""Servers under test as subprocesses: start, readiness, CPU accounting, stop.

Theory of operation
-------------------
A server is "ready" when both ``stream.sock`` and ``dgram.sock`` in its
socket dir accept a connection, the same rule as the ipcd contract; we poll
with short sleeps because a foreign binary offers no other readiness signal.
Servers run in their own session, so a Ctrl-C on the terminal reaches only
the harness, which then stops them in order (SIGTERM, wait, SIGKILL as a
last resort) from a ``with`` block. Their output goes to a log file that is
shown when something goes wrong and scanned for tracebacks afterwards.

CPU time is read from ``/proc/PID/stat`` for the server and its direct
children (pre-forked workers), plus the reaped children's time, so a server's
cost per message can be compared even though clients and servers share the
machine's cores.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from benchmarks import ROOT

READY_TIMEOUT: Final = 10.0
STOP_TIMEOUT: Final = 10.0
_TICK: Final = os.sysconf("SC_CLK_TCK")


class ServerError(Exception):
    """The server did not start, or did not stop cleanly."""


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()  # fields from 3 (state) on


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry))
    return members


def _accepts(path: Path, kind: socket.SocketKind) -> bool:
    with socket.socket(socket.AF_UNIX, kind) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


class Server:
    """One server subprocess, used as a context manager."""

    def __init__(
        self, name: str, argv: list[str], socket_dir: Path, log_path: Path, *, dgram: bool = True
    ) -> None:
        self.name = name
        self.dgram = dgram  # whether readiness waits for dgram.sock too
        self.argv = argv
        self.socket_dir = socket_dir
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.leftovers = 0  # processes of its group still alive after it exited

    @property
    def stream_path(self) -> str:
        return str(self.socket_dir / "stream.sock")

    @property
    def dgram_path(self) -> str:
        return str(self.socket_dir / "dgram.sock")

    def __enter__(self) -> Self:
        with self.log_path.open("wb") as log:
            # stdin is a pipe that closes when we die: the raw server watches it.
            # IPCD_* settings of the caller's shell would silently change the
            # server under test; options go on its command line instead.
            env = {k: v for k, v in os.environ.items() if not k.startswith("IPCD_")}
            # ipcd keeps its history journal (as by default) in the run's temp
            # dir, never in the machine's /var/lib/ipcd: one per server.
            env["IPCD_STATE_DIR"] = str(self.socket_dir.parent / f"{self.socket_dir.name}.state")
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=ROOT,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        stream, dgram = self.socket_dir / "stream.sock", self.socket_dir / "dgram.sock"
        while not (
            _accepts(stream, socket.SOCK_STREAM) and (not self.dgram or _accepts(dgram, socket.SOCK_DGRAM))
        ):
            if self.proc.poll() is not None:
                raise ServerError(
                    f"{self.name} exited with {self.proc.returncode} before it was ready{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                where = f"{self.name}: sockets in {self.socket_dir}"
                raise ServerError(f"{where} not ready after {READY_TIMEOUT} s{self._log_tail()}")
            time.sleep(0.02)

    def cpu_seconds(self) -> float:
        """User + system CPU of the server, its live children and its reaped ones."""
        assert self.proc is not None
        ticks = 0
        own = _stat_fields(self.proc.pid)
        if own is not None:
            ticks += sum(int(f) for f in own[11:15])  # utime stime cutime cstime
        for kid in _children(self.proc.pid):
            fields = _stat_fields(kid)
            if fields is not None:
                ticks += int(fields[11]) + int(fields[12])
        return ticks / _TICK

    def processes(self) -> int:
        assert self.proc is not None
        return 1 + len(_children(self.proc.pid))

    def threads(self) -> list[int]:
        """Every thread of the server and of its direct children."""
        assert self.proc is not None
        tids: list[int] = []
        for pid in (self.proc.pid, *_children(self.proc.pid)):
            with contextlib.suppress(OSError):
                tids += [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        return tids

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL if it will not go. Returns the exit code."""
        proc = self.proc
        if proc is None or self.exit_code is not None:
            return self.exit_code
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except BaseException:  # too slow, or a second Ctrl-C: leave nothing behind
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if not isinstance(sys.exc_info()[1], subprocess.TimeoutExpired):
                    raise
        if proc.stdin is not None:
            proc.stdin.close()
        self.exit_code = proc.returncode
        # Workers left behind in the session (the master died first) go too.
        self.leftovers = len(_group_members(proc.pid))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return self.exit_code

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _log_tail(self, lines: int = 12) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return "".join(f"\n    | {line}" for line in tail)

    def complaints(self) -> list[str]:
        """Lines of the log that suggest trouble: tracebacks, errors, warnings."""
        words = ("Traceback", "Error", "ERROR", "WARNING", "CRITICAL", "exception")
        return [line for line in self.log_text().splitlines() if any(w in line for w in words)]


@contextlib.contextmanager
def pinned(servers: Iterable[Server], server_cpu: int, client_cpu: int) -> Iterator[None]:
    """Pin the servers to one CPU and this (client) process to another, or the same.

    On a VM a wake-up across vCPUs can cost ten times the whole round trip, and
    where the scheduler puts a pair is a coin toss per run; pinning makes the
    placement a stated condition instead of noise. Affinities are restored.
    """
    saved: dict[int, set[int]] = {0: os.sched_getaffinity(0)}
    try:
        for server in servers:
            for tid in server.threads():
                with contextlib.suppress(OSError):
                    saved[tid] = os.sched_getaffinity(tid)
                    os.sched_setaffinity(tid, {server_cpu})
        os.sched_setaffinity(0, {client_cpu})
        yield
    finally:
        for tid, cpus in saved.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)
