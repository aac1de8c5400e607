"""A real ipcd for tests: started as a subprocess on a temporary socket dir.

Readiness is what the brief defines (both sockets accept) plus every worker
READY, read from the daemon's own status: no sleeps where a signal exists.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ipcd.client import Client, ClientError

T = TypeVar("T")

IPCD = [sys.executable, "-m", "ipcd.cli.ipcd"]
IPCCTL = [sys.executable, "-m", "ipcd.cli.ipcctl"]
REPO = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], T | None], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> list[str]:
    """What each fd of ``pid`` points at (``socket:[inode]``, paths, ...)."""
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
    return out


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _accepts(path: Path, kind: socket.SocketKind) -> bool:
    probe = socket.socket(socket.AF_UNIX, kind)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class Daemon:
    """``ipcd serve`` in a subprocess; stderr is captured to a log file."""

    def __init__(
        self, socket_dir: Path, *args: str, workers: int | None = 2, env: dict[str, str] | None = None
    ) -> None:
        self.socket_dir = socket_dir
        # Each socket dir its own state dir (the history journal), so daemons
        # run side by side in a test, and one started again on the same
        # socket dir finds what the last one kept. A --state-dir in args wins.
        self.state_dir = socket_dir.parent / f"{socket_dir.name}.state"
        self.args = ["--socket-dir", str(socket_dir), "--state-dir", str(self.state_dir), *args]
        if workers is not None:
            self.args += ["--workers", str(workers)]
        self.workers = workers or 1
        self.log_path = socket_dir.parent / f"{socket_dir.name}.log"
        self.env = {**os.environ, **(env or {})}
        self.cwd: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, wait: bool = True, argv: Sequence[str] | None = None) -> Daemon:
        with self.log_path.open("ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [*(argv or IPCD), "serve", *self.args], stdout=log, stderr=log, env=self.env, cwd=self.cwd
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"ipcd exited with {self.proc.returncode}: {self.log()}")
            if not (
                _accepts(self.stream_path, socket.SOCK_STREAM)
                and _accepts(self.dgram_path, socket.SOCK_DGRAM)
            ):
                return False
            status = self.status()
            running = [w for w in status["workers"] if w["state"] == "running"]
            return len(running) >= self.workers

        wait_for(ready, timeout, "ipcd to be ready")

    @property
    def stream_path(self) -> Path:
        return self.socket_dir / "stream.sock"

    @property
    def dgram_path(self) -> Path:
        return self.socket_dir / "dgram.sock"

    def client(self, timeout: float = 10.0) -> Client:
        return Client(self.socket_dir, timeout)

    def status(self) -> dict[str, Any]:
        with self.client() as client:
            return client.status()

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.status()["workers"] if w["state"] == "running"]

    def settled_status(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """The status once ``predicate`` holds (load reports are asynchronous)."""

        def check() -> dict[str, Any] | None:
            try:
                status = self.status()
            except ClientError:
                return None
            return status if predicate(status) else None

        result: dict[str, Any] = wait_for(check, timeout, "daemon status to settle")
        return result

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, signum: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise
        return code

    def kill_all(self) -> None:
        """SIGKILL the master and its workers (test cleanup after a failure)."""
        if self.proc is None:
            return
        pids = [self.proc.pid, *children(self.proc.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)


@contextlib.contextmanager
def running_daemon(socket_dir: Path, *args: str, workers: int = 2) -> Iterator[Daemon]:
    daemon = Daemon(socket_dir, *args, workers=workers).start()
    try:
        yield daemon
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            try:
                daemon.stop()
            except subprocess.TimeoutExpired:
                pass


def ipcctl(
    socket_dir: Path, *args: str, input: bytes | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run ipcctl as a user would; returns the completed process (text)."""
    return subprocess.run(
        [*IPCCTL, "--socket-dir", str(socket_dir), *args],
        input=input.decode() if input is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def raw_connect(daemon: Daemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(daemon.stream_path))
    return sock


def listening_inode(path: Path) -> int:
    """Inode of the socket listening at ``path``, from ss(8)."""
    out = subprocess.run(["ss", "-x", "-l", "-n"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 6 and fields[4] == str(path):
            return int(fields[5])
    raise LookupError(f"nothing listens at {path} according to ss")


def holder_of(inode: int, pids: Sequence[int]) -> list[int]:
    """Which of ``pids`` hold an fd for socket ``inode``."""
    return [pid for pid in pids if f"socket:[{inode}]" in fd_targets(pid)]


def server_side_inode(client: socket.socket) -> int:
    """Inode of the daemon's end of ``client``'s connection, from ss(8)."""
    mine = os.fstat(client.fileno()).st_ino
    out = subprocess.run(["ss", "-x", "-a", "-n"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines()[1:]:
        fields = line.split()
        # Netid State Recv-Q Send-Q Local-Address Port Peer-Address Port
        if len(fields) >= 8 and fields[7] == str(mine):
            return int(fields[5])
    raise LookupError(f"no socket peer of inode {mine} in ss output")


class Pipes:
    """``n`` pipes whose write ends are handed to the daemon: once the
    daemon has closed its copies the read ends see EOF, which proves the
    close directly instead of inferring it from a count."""

    def __init__(self, n: int) -> None:
        pairs = [os.pipe() for _ in range(n)]
        self.read_ends = [r for r, _ in pairs]
        self.write_ends = [w for _, w in pairs]

    def __enter__(self) -> Pipes:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.read_ends + self.write_ends:
            os.close(fd)

    def drop_write_ends(self) -> None:
        """Close our copies once sent: the daemon's are then the last."""
        for fd in self.write_ends:
            os.close(fd)
        self.write_ends = []

    def some(self, *indexes: int) -> Pipes:
        """A view of some of these pipes (same fds; closing stays here)."""
        view = Pipes(0)
        view.read_ends = [self.read_ends[i] for i in indexes]
        return view

    def held_elsewhere(self) -> bool:
        """No read end sees EOF right now: a copy of every write end lives."""
        assert not self.write_ends, "drop our own write ends first"
        return not select.select(self.read_ends, [], [], 0)[0]

    def assert_closed_elsewhere(self, timeout: float = 10.0) -> None:
        """Every read end sees EOF within ``timeout``: no copy is left."""
        assert not self.write_ends, "drop our own write ends first"
        waiting = set(self.read_ends)
        deadline = time.monotonic() + timeout
        while waiting:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{len(waiting)} of {len(self.read_ends)} pipes still held open"
            for fd in select.select(list(waiting), [], [], remaining)[0]:
                assert os.read(fd, 1) == b"", "nobody writes to these pipes"
                waiting.discard(fd)


def run_cli_as(
    uid: int, gid: int, main: Callable[[list[str]], object], argv: list[str]
) -> tuple[int, str, str]:
    """Run a CLI's ``main(argv)`` in a forked child that became ``uid``/``gid``:
    its exit status, stdout and stderr. The venv's interpreter lies under
    root's 0700 home, so another user can neither exec it nor import what
    the parent has not imported yet: import the CLI before calling this."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 70
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - pytest replaced the streams
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:
            os.write(2, f"child failed: {exc!r}\n".encode())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    with os.fdopen(out_r) as out, os.fdopen(err_r) as err:
        stdout, stderr = out.read(), err.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), stdout, stderr
