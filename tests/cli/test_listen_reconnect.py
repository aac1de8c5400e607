"""``ipcctl listen`` outlives its connection: a reload, a killed worker, a
restarted daemon. A real daemon, a real ``ipcctl listen --json -n K``
subprocess, messages posted before and after the break: the listener prints
all of them, each once, in order, and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.daemon import IPCCTL, Daemon, children, fd_targets, wait_for

ROOM = "ops"


class Listener:
    """``ipcctl listen`` in a subprocess; what it prints is collected as it comes."""

    def __init__(self, daemon: Daemon, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*IPCCTL, "--socket-dir", str(daemon.socket_dir), "listen", "--room", ROOM, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [self._collect(self.proc.stdout, self.out), self._collect(self.proc.stderr, self.err)]

    @staticmethod
    def _collect(stream: IO[str], into: list[str]) -> threading.Thread:
        def read() -> None:
            for line in stream:
                into.append(line.rstrip("\n"))

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        return thread

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in list(self.out)]

    def wait_printed(self, n: int) -> None:
        wait_for(lambda: len(self.out) >= n, 15.0, f"{n} lines from listen; stderr: {self.err}")

    def wait_stderr(self, text: str) -> None:
        wait_for(lambda: any(text in line for line in self.err), 15.0, f"{text!r} on stderr: {self.err}")

    def wait_exit(self) -> int:
        code = self.proc.wait(20)
        for reader in self._readers:
            reader.join(10)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for reader in self._readers:
            reader.join(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def listeners() -> Iterator[list[Listener]]:
    started: list[Listener] = []
    yield started
    for listener in started:
        listener.close()


def listen(daemon: Daemon, listeners: list[Listener], *args: str) -> Listener:
    """Started, and a member of ROOM."""
    listener = Listener(daemon, *args)
    listeners.append(listener)

    def joined() -> bool:
        assert listener.proc.poll() is None, f"listen exited: {listener.err}"
        with daemon.client() as client:
            return any(r["room"] == ROOM and r["members"] for r in client.rooms())

    wait_for(joined, 15.0, "listen to join")
    return listener


def post(daemon: Daemon, *texts: str) -> None:
    with daemon.client() as client:
        for text in texts:
            client.say(ROOM, text)


def texts(listener: Listener) -> list[str]:
    return [m["text"] for m in listener.messages()]


def old_workers_gone(daemon: Daemon, old: set[int]) -> None:
    daemon.settled_status(lambda s: not old & {w["pid"] for w in s["workers"]}, timeout=15.0)
    wait_for(lambda: not old & set(children(daemon.pid)), 15.0, "the old workers to exit")


def test_listen_reconnects_after_a_reload_without_losing_or_repeating(
    socket_dir: Path, listeners: list[Listener]
) -> None:
    # A drain timeout the test never reaches: the old workers can only go
    # because the idle listener was sent away at the start of the drain.
    daemon = Daemon(socket_dir, "--drain-timeout", "3600", workers=2).start()
    try:
        listener = listen(daemon, listeners, "--json", "-n", "6")
        post(daemon, "one", "two", "three")
        listener.wait_printed(3)
        old = set(daemon.worker_pids())

        daemon.signal(signal.SIGHUP)
        old_workers_gone(daemon, old)
        post(daemon, "four", "five", "six")  # maybe before the listener is back: the history has them

        assert listener.wait_exit() == 0, listener.err
        assert texts(listener) == ["one", "two", "three", "four", "five", "six"]
        assert [m["seq"] for m in listener.messages()] == [1, 2, 3, 4, 5, 6]
        lost = [line for line in listener.err if "connection lost" in line]
        assert len(lost) == 1, listener.err
        assert "ipcd reloaded" in lost[0], lost
        assert lost[0].endswith("; reconnecting"), lost
        assert "is stopping" not in "\n".join(listener.err)  # the daemon was not stopping
        assert "ipcctl: reconnected" in listener.err
    finally:
        assert daemon.stop() == 0


def test_listen_reconnects_after_its_worker_is_killed(daemon: Daemon, listeners: list[Listener]) -> None:
    listener = listen(daemon, listeners, "--json", "-n", "4")
    post(daemon, "before 1", "before 2")
    listener.wait_printed(2)
    mine = listener_worker(daemon, listener.proc.pid)

    os.kill(mine, signal.SIGKILL)
    daemon.settled_status(lambda s: mine not in {w["pid"] for w in s["workers"]} and len(s["workers"]) == 2)
    listener.wait_stderr("reconnected")
    post(daemon, "after 1", "after 2")

    assert listener.wait_exit() == 0, listener.err
    assert texts(listener) == ["before 1", "before 2", "after 1", "after 2"]
    assert sum("connection lost" in line for line in listener.err) == 1, listener.err


def test_listen_waits_for_a_restarted_daemon(daemon: Daemon, listeners: list[Listener]) -> None:
    listener = listen(daemon, listeners, "--json", "-n", "3")
    post(daemon, "first life")
    listener.wait_printed(1)

    assert daemon.stop() == 0
    listener.wait_stderr("connection lost (ipcd is stopping")
    daemon.args += ["--state-dir", ""]  # a new master that kept no history: its rooms count from 1 again
    daemon.start()
    listener.wait_stderr("reconnected")
    post(daemon, "second life", "still here")

    assert listener.wait_exit() == 0, listener.err
    assert texts(listener) == ["first life", "second life", "still here"]
    assert [m["seq"] for m in listener.messages()] == [1, 1, 2]
    assert sum("connection lost" in line for line in listener.err) == 1, listener.err


def test_messages_beyond_the_history_are_said_to_be_missed(
    socket_dir: Path, listeners: list[Listener]
) -> None:
    """The listener is stopped while its worker dies and four messages go
    by; the daemon keeps two: those two are printed, the other two are
    reported, and nothing is printed twice."""
    daemon = Daemon(socket_dir, "--history-size", "2", workers=1).start()
    try:
        listener = listen(daemon, listeners, "--json", "-n", "3")
        post(daemon, "a")
        listener.wait_printed(1)
        mine = listener_worker(daemon, listener.proc.pid)
        os.kill(listener.proc.pid, signal.SIGSTOP)
        try:
            os.kill(mine, signal.SIGKILL)
            daemon.settled_status(
                lambda s: any(w["state"] == "running" and w["pid"] != mine for w in s["workers"])
            )
            post(daemon, "b", "c", "d", "e")
        finally:
            os.kill(listener.proc.pid, signal.SIGCONT)
        assert listener.wait_exit() == 0, listener.err
        assert {"type": "gone", "room": ROOM, "first": 2, "last": 3} in listener.messages()
        assert [m["text"] for m in listener.messages() if m["type"] == "message"] == ["a", "d", "e"]
        assert "ipcctl: messages 2-3 of ops are no longer kept by the daemon: missed" in listener.err
    finally:
        assert daemon.stop() == 0


RETIRING = "ipcd reloaded and this connection's worker is retiring; reconnect to reach the new workers"


@pytest.mark.parametrize("json_output", [False, True])
def test_no_reconnect_exits_69_with_the_true_reason(
    socket_dir: Path, listeners: list[Listener], json_output: bool
) -> None:
    daemon = Daemon(socket_dir, "--drain-timeout", "1", workers=1).start()
    try:
        listener = listen(daemon, listeners, "--no-reconnect", *(["--json"] if json_output else []))
        daemon.signal(signal.SIGHUP)
        assert listener.wait_exit() == 69
        assert listener.out == []
        if json_output:
            (line,) = listener.err
            assert json.loads(line) == {
                "error": {"code": "SHUTTING_DOWN", "exit_status": 69, "message": RETIRING}
            }
        else:
            assert listener.err == [f"ipcctl: {RETIRING}"]
    finally:
        assert daemon.stop() == 0


def socket_inodes(pid: int) -> set[int]:
    return {int(t[len("socket:[") : -1]) for t in fd_targets(pid) if t.startswith("socket:[")}


def listener_worker(daemon: Daemon, pid: int) -> int:
    """The worker that holds the daemon's end of process ``pid``'s connection."""
    mine = socket_inodes(pid)
    out = subprocess.run(["ss", "-x", "-a", "-n"], capture_output=True, text=True, check=True).stdout
    # Netid State Recv-Q Send-Q Local-Address Port Peer-Address Port
    peers = {
        int(fields[5])
        for fields in (line.split() for line in out.splitlines()[1:])
        if len(fields) >= 8 and fields[7].isdigit() and int(fields[7]) in mine
    }
    for worker in daemon.worker_pids():
        if socket_inodes(worker) & peers:
            return worker
    raise LookupError(f"no worker holds the other end of {pid}'s connection")
