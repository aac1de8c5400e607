"""The fd hand-off examples run against a real daemon and do what their headers say.

- zero_downtime_http.py: 10 restarts under a steady stream of new
  connections, none refused or failed, each version answering;
- server_swap.sh: the real gunicorn, and lighttpd, on a listener stored
  with ``ipcctl put --listen``, swapped three times under the same stream,
  none refused, every old version drained and gone;
- privsep.py: root opens a file only it can read, an unprivileged user reads
  it through ipcd, a user who was not allowed is refused (real users);
- pipe_handoff.sh: a pipe and a memfd pass between unrelated processes.
"""

from __future__ import annotations

import fcntl
import http.client
import itertools
import os
import pwd
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.daemon import IPCCTL, REPO, Daemon, fd_count, wait_for

EXAMPLES = REPO / "examples"
# Generous, bounded waits: other test runs share this 2-core machine.
STEP = 30.0


def _settled_fds(daemon: Daemon, baseline: int) -> None:
    """The master's fd count is back to its baseline: nothing stored is leaked."""
    wait_for(lambda: fd_count(daemon.pid) == baseline, STEP, f"ipcd's fd count back to {baseline}")


def _stored(daemon: Daemon) -> dict[str, dict[str, Any]]:
    with daemon.client() as client:
        return {e["name"]: e for e in client.ls()["entries"]}


# -- zero-downtime restarts -------------------------------------------------------


class Instance:
    """One running version of the HTTP server; its stdout lines in a queue."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        with log.open("ab") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        self.pump = threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True)
        self.pump.start()

    def _pump(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self.lines.put(line.rstrip("\n"))

    def reap(self) -> None:
        """Kill it if it still runs; wait for it and for its output's end."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(STEP)
        self.pump.join(STEP)

    def line(self) -> str:
        try:
            return self.lines.get(timeout=STEP)
        except queue.Empty:
            raise AssertionError(f"pid {self.proc.pid} printed nothing in {STEP}s") from None

    @property
    def pid(self) -> int:
        return self.proc.pid


class Hammer:
    """GET requests in a loop, a new connection each, from one thread, until
    stopped or ``limit`` requests; every answer must be a 200."""

    def __init__(self, port: int, limit: int = 100_000) -> None:
        self.port = port
        self.limit = limit
        self.stop = threading.Event()
        self.pids: set[int] = set()
        self.by_label: dict[str, set[int]] = {}  # version label -> the pids that answered for it
        self.ok = 0
        self.slowest = 0.0  # seconds: a connection that waited in the backlog between two versions
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, name="hammer", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set() and self.ok + len(self.failures) < self.limit:
            start = time.monotonic()
            try:
                label, pid = get(self.port)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self.failures.append(repr(exc))
                continue
            self.slowest = max(self.slowest, time.monotonic() - start)
            self.pids.add(pid)
            self.by_label.setdefault(label, set()).add(pid)
            self.ok += 1

    def wait_answer_from(self, pid: int) -> None:
        wait_for(lambda: pid in self.pids, STEP, f"an answer from pid {pid}")

    def wait_answer_from_label(self, label: str) -> None:
        wait_for(lambda: label in self.by_label, STEP, f"an answer from {label}")

    def __enter__(self) -> Hammer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(STEP)


def get(port: int, path: str = "/") -> tuple[str, int]:
    """One request on a new connection: the answering version's (label, pid)."""
    # The timeout covers the gap between two versions, when the connection
    # waits, already established, in the listen backlog: no one is accepting.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=STEP)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read().decode()
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}: {body!r}")
    finally:
        conn.close()
    label, _, pid = body.strip().partition(" pid=")
    return label, int(pid or 0)  # a static file has no pid to tell: 0


def _slow_get(port: int, results: queue.Queue[tuple[str, int]], delay: float = 1) -> None:
    """A slow request (both HTTP examples take ``?delay=SECS``): reports
    ("headers", status) when they arrive, then (body, status)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=STEP)
    try:
        conn.request("GET", f"/?delay={delay:g}")
        response = conn.getresponse()
        results.put(("headers", response.status))
        results.put((response.read().decode(), response.status))
    except (OSError, http.client.HTTPException) as exc:
        results.put((repr(exc), 0))
    finally:
        conn.close()


def test_zero_downtime_http_survives_ten_restarts(daemon: Daemon, short_tmp: Path) -> None:
    baseline = fd_count(daemon.pid)
    env = {**os.environ, "IPCD_SOCKET_DIR": str(daemon.socket_dir)}
    server = [sys.executable, str(EXAMPLES / "zero_downtime_http.py"), "--name", "web"]
    log = short_tmp / "http.log"
    instances: list[Instance] = []

    def start(label: str, activated: bool) -> Instance:
        # Half the versions take the socket themselves, half get it the
        # socket-activation way from `ipcctl take web -- CMD` (fd 3, LISTEN_FDS).
        argv = [*server, "--label", label, "--port", "0"]
        if activated:
            argv = [*IPCCTL, "take", "web", "--", *argv]
        instance = Instance(argv, env, log)
        instances.append(instance)
        return instance

    try:
        current = start("v1", activated=False)
        ready = current.line()
        assert ready.endswith("(newly bound)"), ready
        port = int(ready.split()[2].rpartition(":")[2])
        slow: queue.Queue[tuple[str, int]] = queue.Queue()
        with Hammer(port) as hammer:
            hammer.wait_answer_from(current.pid)
            for version in range(2, 12):
                old = current
                if version == 2:
                    # A request in flight when SIGTERM comes is finished by the old
                    # version: its headers have arrived, its body comes in 1 s.
                    threading.Thread(target=_slow_get, args=(port, slow), daemon=True).start()
                    assert slow.get(timeout=STEP) == ("headers", 200)
                old.proc.send_signal(signal.SIGTERM)
                handed = old.line()
                assert handed == f"handed over 127.0.0.1:{port} to ipcd as 'web'", handed
                current = start(f"v{version}", activated=version % 2 == 1)
                ready = current.line()
                assert f"127.0.0.1:{port} pid={current.pid} label=v{version}" in ready, ready
                source = "(socket activation)" if version % 2 == 1 else "(taken from ipcd as 'web')"
                assert ready.endswith(source), ready
                assert old.proc.wait(STEP) == 0
                hammer.wait_answer_from(current.pid)
            wait_for(lambda: hammer.ok >= 200, STEP, "200 answers")
        body, status = slow.get(timeout=STEP)
        assert (status, body) == (200, f"v1 pid={instances[0].pid}\n")
        print(
            f"\n10 restarts: {hammer.ok} requests answered, {len(hammer.failures)} failed, "
            f"{len(hammer.pids)} distinct pids, slowest answer {hammer.slowest * 1000:.0f} ms"
        )
        assert hammer.failures == []
        assert len(hammer.pids) >= 10
        assert hammer.pids <= {i.pid for i in instances}

        # The last version hands the socket over too; nobody takes it: remove it.
        current.proc.send_signal(signal.SIGTERM)
        assert current.line().startswith("handed over")
        assert current.proc.wait(STEP) == 0
        entry = _stored(daemon)["web"]
        assert entry["fds"] == [
            {
                "name": "web",
                "kind": "socket",
                "family": "inet",
                "type": "stream",
                "listening": True,
                "address": f"127.0.0.1:{port}",
                "access": "rw",
                "flags": ["nonblock"],
            }
        ]
        with daemon.client() as client:
            client.rm("web")
        with pytest.raises(ConnectionRefusedError):
            get(port)
        _settled_fds(daemon, baseline)
    finally:
        for instance in instances:
            instance.reap()


def test_zero_downtime_http_binds_when_nothing_is_stored(daemon: Daemon) -> None:
    env = {**os.environ, "IPCD_SOCKET_DIR": str(daemon.socket_dir)}
    argv = [sys.executable, str(EXAMPLES / "zero_downtime_http.py"), "--name", "web2", "--port", "0"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert ready.endswith("(newly bound)\n"), ready
        port = int(ready.split()[2].rpartition(":")[2])
        assert get(port) == ("http", proc.pid)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: stop without handing over
        out, err = proc.communicate(timeout=STEP)
        assert proc.returncode == 0, err
        assert out == ""
        assert "web2" not in _stored(daemon)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(STEP)


# -- real servers swapped on a listener stored with put --listen -----------------


def _gone(pid: int) -> bool:
    """No such process any more (a zombie still holds nothing, but counts as there)."""
    return not os.path.exists(f"/proc/{pid}")


def _listening_ports(pid: int) -> set[int]:
    """The TCP ports ``pid`` holds a listening socket for, from ss(8)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True, timeout=STEP).stdout
    return {int(line.split()[3].rpartition(":")[2]) for line in out.splitlines() if f"pid={pid}," in line}


def _server_env(server: str, daemon: Daemon, short_tmp: Path) -> dict[str, str]:
    wrapper = short_tmp / "ipcctl"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m ipcd.cli.ipcctl "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "IPCCTL": str(wrapper), "SERVER": server}
    env |= {"IPCD_SOCKET_DIR": str(daemon.socket_dir), "WAIT": str(int(STEP))}
    gunicorn = Path(sys.executable).parent / "gunicorn"
    lighttpd = shutil.which("lighttpd") or shutil.which("lighttpd", path="/usr/sbin:/sbin")
    assert gunicorn.exists(), "gunicorn is in the [dev] extras: run make install"
    assert lighttpd, "lighttpd is a Debian package scripts/install-system-deps installs: run make install"
    return env | {"GUNICORN": str(gunicorn), "LIGHTTPD": lighttpd}


@pytest.mark.parametrize("server", ["gunicorn", "lighttpd"])
def test_a_real_server_swaps_with_no_refused_request(server: str, daemon: Daemon, short_tmp: Path) -> None:
    baseline = fd_count(daemon.pid)
    versions = ["v1", "v2", "v3", "v4"]  # three swaps
    log = short_tmp / "swap.log"
    with log.open("ab") as err:
        script = subprocess.Popen(
            ["sh", str(EXAMPLES / "server_swap.sh"), "127.0.0.1:0", *versions],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=_server_env(server, daemon, short_tmp),
            start_new_session=True,  # its own process group: the cleanup below reaches every server
        )
    assert script.stdin is not None
    out: queue.Queue[str] = queue.Queue()

    def pump_lines() -> None:
        for text in script.stdout or ():
            out.put(text.rstrip("\n"))

    pump = threading.Thread(target=pump_lines, daemon=True)
    pump.start()

    def line() -> str:
        try:
            return out.get(timeout=STEP)
        except queue.Empty:
            raise AssertionError(
                f"the script printed nothing in {STEP}s; its stderr: {log.read_text()}"
            ) from None

    try:
        bound = line()
        assert bound.startswith("web: listening on 127.0.0.1:"), bound
        port = int(bound.rpartition(":")[2])
        assert port > 0
        first = line()
        assert first.startswith(f"v1 serving on 127.0.0.1:{port} (pid "), first
        pids = {"v1": int(first.rpartition(" ")[2].rstrip(")"))}
        assert _listening_ports(pids["v1"]) == {port}, "it serves the stored socket and binds nothing itself"
        slow: queue.Queue[tuple[str, int]] = queue.Queue()
        with Hammer(port) as hammer:
            hammer.wait_answer_from_label("v1")
            if server == "gunicorn":
                # In flight when v1 is told to stop (2 s: longer than v2 takes to boot
                # here): v1 must finish it, as gunicorn drains.
                threading.Thread(target=_slow_get, args=(port, slow, 2), daemon=True).start()
                assert slow.get(timeout=STEP) == ("headers", 200)
            for old, new in itertools.pairwise(versions):
                script.stdin.write("\n")  # Enter: swap
                script.stdin.flush()
                swapped = line()
                assert swapped.startswith(f"{new} serving (pid "), swapped
                pids[new] = int(swapped.split("(pid ")[1].split(")")[0])
                assert swapped.endswith(f"stopping {old} (pid {pids[old]})"), swapped
                assert line() == f"{old} (pid {pids[old]}) drained and exited with status 0"
                assert _gone(pids[old]), f"{old}'s {server} is still there"
                hammer.wait_answer_from_label(new)
                workers = hammer.by_label.get(old, set()) - {0}  # gunicorn's workers answer with their pid
                assert all(_gone(pid) for pid in workers), f"{old}'s workers {workers} outlived it"
            wait_for(lambda: hammer.ok >= 300, STEP, "300 answers")
        script.stdin.close()  # end of input: stop the last version, forget the socket
        assert line() == f"stopping v4 (pid {pids['v4']})"
        assert line() == "removed web from ipcd"
        assert script.wait(STEP) == 0, log.read_text()
        if server == "gunicorn":
            body, status = slow.get(timeout=STEP)
            assert (status, body.split(" pid=")[0]) == (200, "v1")
        answers = ", ".join(f"{v}: {len(p)} pids" for v, p in sorted(hammer.by_label.items()))
        print(
            f"\n3 {server} swaps: {hammer.ok} requests answered, {len(hammer.failures)} failed "
            f"({answers}), slowest {hammer.slowest * 1000:.0f} ms"
        )
        assert hammer.failures == []
        assert sorted(hammer.by_label) == versions
        assert all(_gone(pid) for pid in pids.values())
        with pytest.raises(ConnectionRefusedError):
            get(port)
        _settled_fds(daemon, baseline)
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait(STEP)
        pump.join(STEP)
        if script.stdout is not None:
            script.stdout.close()


# -- privilege separation ----------------------------------------------------------

APP_USER = "ipcd-ex-app"
OTHER_USER = "ipcd-ex-other"


@pytest.fixture
def users() -> Iterator[tuple[str, str]]:
    """Two unprivileged system users, created if missing and removed only if
    created here. A lock keeps concurrent runs from deleting each other's."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates users and drops privileges")
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("needs useradd and userdel")
    created: list[str] = []
    with open("/tmp/ipcd-ex-users.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for user in (APP_USER, OTHER_USER):
                try:
                    pwd.getpwnam(user)
                except KeyError:
                    subprocess.run(
                        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user],
                        check=True,
                        capture_output=True,
                        timeout=STEP,
                    )
                    created.append(user)
            yield APP_USER, OTHER_USER
        finally:
            for user in created:
                subprocess.run(["userdel", user], check=False, capture_output=True, timeout=STEP)


def _privsep(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / "privsep.py"), "--socket-dir", str(daemon.socket_dir), *args],
        capture_output=True,
        text=True,
        timeout=STEP * 2,
        check=False,
    )


def test_privsep_hands_a_root_only_file_to_one_user(
    daemon: Daemon, short_tmp: Path, users: tuple[str, str]
) -> None:
    app, other = users
    baseline = fd_count(daemon.pid)
    short_tmp.chmod(0o755)  # the daemon's socket dir is in it: let the users reach it
    private = short_tmp / "private"
    private.mkdir(mode=0o755)
    secret = private / "secret"
    content = f"the secret is {secrets.token_hex(8)}\n"
    secret.write_text(content)
    secret.chmod(0o600)

    # Independent of the example: the user cannot read the file itself.
    denied = subprocess.run(
        ["cat", str(secret)], user=app, group=pwd.getpwnam(app).pw_gid, extra_groups=[],
        capture_output=True, text=True, timeout=STEP, check=False,
    )  # fmt: skip
    assert denied.returncode != 0
    assert "Permission denied" in denied.stderr

    # The whole story in one run.
    demo = _privsep(daemon, "demo", str(secret), "--user", app, "--name", "secret-demo")
    assert demo.returncode == 0, demo.stderr
    assert demo.stdout == (
        f"root: opened {secret} and stored it in ipcd as 'secret-demo' for {app}\n"
        f"{app}: open({secret}) fails: EACCES (Permission denied)\n"
        f"{app}: got 'secret-demo' from ipcd (put by uid 0); it reads:\n"
        f"{content}"
    )
    assert "secret-demo" not in _stored(daemon)

    # The two halves on their own: the allowed user gets it, another is refused.
    put = _privsep(daemon, "put", str(secret), "--name", "secret", "--allow", app)
    assert put.returncode == 0, put.stderr
    got = _privsep(daemon, "get", "secret", "--as", app)
    assert got.returncode == 0, got.stderr
    assert got.stdout.endswith(f"it reads:\n{content}")
    refused = _privsep(daemon, "get", "secret", "--as", other)
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert refused.stderr.startswith(f"{other}: ipcd refused 'secret': PERMISSION_DENIED: ")
    assert content.strip() not in refused.stderr
    # The allowed user saw the entry described as root's file; the file is intact.
    assert _stored(daemon)["secret"]["allow_uids"] == [pwd.getpwnam(app).pw_uid]
    with daemon.client() as client:
        client.rm("secret")
    assert secret.read_text() == content
    _settled_fds(daemon, baseline)


# -- pipe and memfd between unrelated processes -----------------------------------


@pytest.fixture
def script_env(daemon: Daemon, short_tmp: Path) -> dict[str, str]:
    wrapper = short_tmp / "ipcctl"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m ipcd.cli.ipcctl "$@"\n')
    wrapper.chmod(0o755)
    return {
        **os.environ,
        "IPCCTL": str(wrapper),
        "PYTHON": sys.executable,
        "IPCD_SOCKET_DIR": str(daemon.socket_dir),
        "WAIT": str(int(STEP)),
    }


def _script(
    env: dict[str, str], *args: str, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    # start_new_session: its own session and process group, nothing shared with its peer
    return subprocess.run(
        ["sh", str(EXAMPLES / "pipe_handoff.sh"), *args],
        env=env,
        input=input,
        capture_output=True,
        timeout=STEP * 2,
        check=False,
        start_new_session=True,
    )


def test_pipe_passes_between_unrelated_processes(daemon: Daemon, script_env: dict[str, str]) -> None:
    baseline = fd_count(daemon.pid)
    count = 20_000  # ~330 KB: far more than a pipe buffer holds, so the producer must wait for a reader
    producer = subprocess.Popen(
        ["sh", str(EXAMPLES / "pipe_handoff.sh"), "produce", str(count)],
        env=script_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        entry = wait_for(lambda: _stored(daemon).get("jobs"), STEP, "the producer to store its pipe")
        assert [fd["kind"] for fd in entry["fds"]] == ["pipe"]
        assert producer.poll() is None  # blocked on a full pipe nobody reads yet
        consumer = _script(script_env, "consume")
        assert consumer.returncode == 0, consumer.stderr
        expected = "".join(f"job {i} of {count}\n" for i in range(1, count + 1)).encode()
        assert consumer.stdout == expected
        out, err = producer.communicate(timeout=STEP)
        assert producer.returncode == 0, err
        assert out == b""
        assert err.decode().splitlines()[-1].endswith(f"all {count} jobs written")
        assert "jobs" not in _stored(daemon)  # taken: gone from the store
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait(STEP)
    _settled_fds(daemon, baseline)


def test_memfd_passes_between_unrelated_processes(daemon: Daemon, script_env: dict[str, str]) -> None:
    baseline = fd_count(daemon.pid)
    content = "notes\n\u00e9t\u00e9 \u2603\n".encode() + bytes(range(256)) * 400  # binary, > 64 KiB
    put = _script(script_env, "memfd-put", input=content)
    assert put.returncode == 0, put.stderr
    entry = _stored(daemon)["notes"]
    assert entry["fds"] == [
        {
            "name": "notes",
            "kind": "memfd",
            "path": "/memfd:notes (deleted)",
            "size": len(content),
            "access": "rw",
        }
    ]
    for _ in range(2):  # get leaves it stored, and every reader sees all of it
        got = _script(script_env, "memfd-get")
        assert got.returncode == 0, got.stderr
        assert got.stdout == content
    with daemon.client() as client:
        client.rm("notes")
    _settled_fds(daemon, baseline)


def test_pipe_handoff_demo_runs_end_to_end(daemon: Daemon, script_env: dict[str, str]) -> None:
    baseline = fd_count(daemon.pid)
    demo = _script(script_env)
    assert demo.returncode == 0, demo.stderr
    jobs = "".join(f"job {i} of 5\n" for i in range(1, 6))
    assert demo.stdout.decode() == jobs + "ipcd keeps notes in memory, with no file behind them\n"
    assert _stored(daemon) == {}
    _settled_fds(daemon, baseline)
