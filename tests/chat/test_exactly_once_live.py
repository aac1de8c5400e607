"""Exactly-once sends against a real daemon: a post whose acknowledgement
was lost is sent again and not posted twice.

What a script sees: ``ipcctl send`` fed 300 lines through a pipe while every
worker is killed (SIGKILL) and the daemon reloaded (SIGHUP), again and
again, exits 0, and the room then holds each line once, in input order,
numbered 1..300 (its HISTORY, and a ``listen -n 300 --json`` started before).
What the library does: posts the daemon made but whose acknowledgements
never arrived are resent over a new connection and answered ``duplicate``
with their original seq. When the daemon is gone for good, send gives up
after ``--retry-for`` and names the lines that were not acknowledged.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import struct
import subprocess
import termios
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

from ipcd.client import ClientError, ConnectionLost, DaemonUnreachable
from ipcd.publisher import Publisher
from tests.cli.test_listen_reconnect import ROOM, Listener, listen, listeners
from tests.daemon import IPCCTL, Daemon, children, fd_targets, holder_of, wait_for

__all__ = ["listeners"]  # the fixture, shared with test_listen_reconnect

LINES = 300
CHUNK = 20


def room_seq(daemon: Daemon) -> int | None:
    """The room's last seq, or None while the daemon does not answer (mid-reload)."""
    try:
        with daemon.client(timeout=5) as client:
            return next((r["seq"] for r in client.rooms() if r["room"] == ROOM), 0)
    except ClientError:
        return None


def unread(pipe: IO[bytes]) -> int:
    """Bytes written to ``pipe`` that its reader has not read yet."""
    return int(struct.unpack("i", fcntl.ioctl(pipe.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])


def partly_posted(daemon: Daemon, before: int) -> Callable[[], bool]:
    return lambda: (room_seq(daemon) or 0) > before


def kill_every_worker(daemon: Daemon) -> None:
    old = set(children(daemon.pid))
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    daemon.settled_status(
        lambda s: (
            not old & {w["pid"] for w in s["workers"]}
            and sum(w["state"] == "running" for w in s["workers"]) == daemon.workers
        ),
        timeout=20.0,
    )


def reload(daemon: Daemon) -> None:
    """SIGHUP, and the old workers gone: they cut the sender off at the
    drain timeout (a poster is not an idle listener, sent away at once)."""
    old = set(daemon.worker_pids())
    daemon.signal(signal.SIGHUP)
    daemon.settled_status(
        lambda s: not old & {w["pid"] for w in s["workers"] if w["state"] == "running"}, timeout=20.0
    )
    wait_for(lambda: not old & set(children(daemon.pid)), 20.0, "the old workers to exit")


def socket_inodes(pid: int) -> set[int]:
    return {int(t[len("socket:[") : -1]) for t in fd_targets(pid) if t.startswith("socket:[")}


def daemon_side(sender_pid: int) -> tuple[int, int] | None:
    """The daemon's end of the sender's connection: its inode, and the bytes
    the sender wrote that it has not read (ss(8)'s Recv-Q)."""
    mine = socket_inodes(sender_pid)
    out = subprocess.run(["ss", "-x", "-a", "-n"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7].isdigit() and int(fields[7]) in mine and fields[4] != "*":
            return int(fields[5]), int(fields[2])
    return None


def served_by_a_worker(daemon: Daemon, sender_pid: int) -> bool:
    side = daemon_side(sender_pid)
    return side is not None and bool(holder_of(side[0], children(daemon.pid)))


def waiting_in_poll(pid: int) -> bool:
    """Asleep in poll(2)/epoll_wait(2): done with what it was given."""
    with open(f"/proc/{pid}/wchan") as fh:
        return fh.read() in ("do_epoll_wait", "poll_schedule_timeout.constprop.0", "do_sys_poll")


def forwarded(proc: subprocess.Popen[bytes], workers: list[int]) -> Callable[[], bool]:
    """Whether the sender has read all its input and sent it, and the
    workers have read it all and are back waiting (so they forwarded it)."""
    assert proc.stdin is not None
    stdin = proc.stdin

    def check() -> bool:
        return (
            unread(stdin) == 0
            and waiting_in_poll(proc.pid)
            and (side := daemon_side(proc.pid)) is not None
            and side[1] == 0
            and all(waiting_in_poll(pid) for pid in workers)
        )

    return check


def lose_answers(daemon: Daemon, proc: subprocess.Popen[bytes], lines: bytes) -> None:
    """Make posts whose answers cannot reach the sender: the master is
    stopped while the sender sends ``lines`` and its worker forwards them,
    then the workers are killed, then the master goes on and posts what it
    was forwarded; its answers go to workers that are gone."""
    assert proc.stdin is not None
    stdin = proc.stdin
    wait_for(lambda: served_by_a_worker(daemon, proc.pid), 20.0, "the sender to be connected to a worker")
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        stdin.write(lines)
        stdin.flush()
        workers = children(daemon.pid)
        wait_for(forwarded(proc, workers), 20.0, "the sender's posts to be forwarded to the stopped master")
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    daemon.settled_status(
        lambda s: (
            not set(workers) & {w["pid"] for w in s["workers"]}
            and sum(w["state"] == "running" for w in s["workers"]) == daemon.workers
        ),
        timeout=20.0,
    )


def sender(daemon: Daemon, *args: str, send_args: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*IPCCTL, "--socket-dir", str(daemon.socket_dir), *args, "send", "--room", ROOM, *send_args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_a_piped_send_across_worker_kills_and_reloads_posts_every_line_once_in_order(
    socket_dir: Path, listeners: list[Listener]
) -> None:
    daemon = Daemon(socket_dir, "--history-size", "1000", "--drain-timeout", "0.5", workers=2).start()
    proc = None
    try:
        listener = listen(daemon, listeners, "--json", "-n", str(LINES))
        proc = sender(daemon)
        assert proc.stdin is not None
        stdin = proc.stdin
        for start in range(0, LINES, CHUNK):
            chunk = "".join(f"line {n}\n" for n in range(start + 1, start + CHUNK + 1)).encode()
            if (start // CHUNK) % 3 == 2:
                lose_answers(daemon, proc, chunk)  # posted, and answered to no one
                continue
            stdin.write(chunk)
            stdin.flush()
            wait_for(lambda: unread(stdin) == 0, 20.0, "send to read its input")
            wait_for(partly_posted(daemon, start), 30.0, "some of the chunk to be posted")
            if (start // CHUNK) % 3 == 0:
                kill_every_worker(daemon)
            else:
                reload(daemon)  # its worker retires the sender's connection within the drain timeout
        _, err = proc.communicate(timeout=60)  # end of input
        assert proc.returncode == 0, err.decode()
        assert b"reconnecting" in err  # the connection was broken under it

        with daemon.client() as client:
            history = client.history(ROOM)
        assert [m["text"] for m in history] == [f"line {n}" for n in range(1, LINES + 1)]
        assert [m["seq"] for m in history] == list(range(1, LINES + 1))  # nothing posted twice
        assert listener.wait_exit() == 0, listener.err
        assert [(m["seq"], m["text"]) for m in listener.messages()] == [
            (n, f"line {n}") for n in range(1, LINES + 1)
        ]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert daemon.stop() == 0


def test_lines_after_a_loss_found_with_the_last_acknowledgements_are_posted(daemon: Daemon) -> None:
    """The sender reads its last acknowledgements and the end of the
    connection in one go, with a new line waiting on its input: that line
    must go out on a new connection, not be dropped. (The sender is stopped
    while its worker answers and then dies.)"""
    proc = sender(daemon)
    assert proc.stdin is not None
    stdin = proc.stdin
    try:
        stdin.write(b"one\n")
        stdin.flush()
        wait_for(lambda: room_seq(daemon) == 1, 15.0, "the first line")
        worker = daemon_worker_of(daemon, proc.pid)
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            stdin.write(b"two\n")
            stdin.flush()
            wait_for(forwarded(proc, [worker]), 20.0, "line two to be forwarded to the stopped master")
            os.kill(proc.pid, signal.SIGSTOP)
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        try:
            wait_for(lambda: room_seq(daemon) == 2, 15.0, "line two to be posted")
            wait_for(
                lambda: sender_side_unread(proc.pid) > 0 and waiting_in_poll(worker),
                15.0,
                "the answer to be waiting, unread, at the stopped sender",
            )
            os.kill(worker, signal.SIGKILL)
            daemon.settled_status(lambda s: worker not in {w["pid"] for w in s["workers"]})
            stdin.write(b"three\n")
            stdin.flush()
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err.decode()
    with daemon.client() as client:
        assert [m["text"] for m in client.history(ROOM)] == ["one", "two", "three"]


def sender_side_unread(sender_pid: int) -> int:
    """Bytes waiting in the sender's own end of its connection."""
    mine = socket_inodes(sender_pid)
    out = subprocess.run(["ss", "-x", "-a", "-n"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[5].isdigit() and int(fields[5]) in mine and fields[7] != "0":
            return int(fields[2])
    return 0


def daemon_worker_of(daemon: Daemon, sender_pid: int) -> int:
    side = wait_for(lambda: daemon_side(sender_pid), 10.0, "the sender's connection")
    (worker,) = holder_of(side[0], children(daemon.pid))
    return worker


def test_posts_made_but_not_acknowledged_are_answered_as_duplicates_on_a_new_connection(
    daemon: Daemon,
) -> None:
    """The lost acknowledgement made certain: the daemon posts a run, the
    publisher's connection is cut before it reads a reply, and the resend
    over a new connection is answered with the same seqs, posted once."""
    statuses: list[str] = []
    with Publisher[int](daemon.socket_dir, on_status=statuses.append) as publisher:
        for n in range(1, 6):
            publisher.say(ROOM, f"post {n}", n)
        publisher.flush()
        wait_for(lambda: room_seq(daemon) == 5, 15.0, "the daemon to post all five")
        publisher.recover(ConnectionLost("cut by the test before reading the acknowledgements"))
        acks = list(publisher.drain())
    assert [(ack.tag, ack.seq) for ack in acks] == [(n, n) for n in range(1, 6)]
    assert [ack.reply and ack.reply.get("duplicate") for ack in acks] == [True] * 5
    assert statuses[-1] == "reconnected"
    with daemon.client() as client:
        assert [m["text"] for m in client.history(ROOM)] == [f"post {n}" for n in range(1, 6)]
        assert client.say(ROOM, "a new one", message_id="other") == 6


def test_a_resent_single_say_with_the_same_id_is_posted_once(daemon: Daemon) -> None:
    with daemon.client() as first, daemon.client() as second:
        assert first.say(ROOM, "once", message_id="job-42") == 1
        assert second.say(ROOM, "once", message_id="job-42") == 1  # another connection, same uid
        assert second.say(ROOM, "twice") == 2
    rerun = subprocess.run(
        [*IPCCTL, "--socket-dir", str(daemon.socket_dir), "send", "-r", ROOM, "--id-prefix", "nightly"],
        input=b"a\nb\n",
        capture_output=True,
        timeout=30,
        check=True,
    )
    again = subprocess.run(rerun.args, input=b"a\nb\nc\n", capture_output=True, timeout=30, check=True)
    assert again.returncode == 0
    with daemon.client() as client:
        assert [m["text"] for m in client.history(ROOM)] == ["once", "twice", "a", "b", "c"]


@pytest.mark.parametrize("json_output", [False, True])
def test_a_send_that_gives_up_names_the_lines_not_acknowledged(short_tmp: Path, json_output: bool) -> None:
    """Lines 4-6 reach a worker that is stopped, then the whole daemon is
    killed and stays away: after --retry-for, send exits 69 and names them."""
    daemon = Daemon(short_tmp / "s", workers=1).start()
    proc = sender(daemon, *(["--json"] if json_output else []), send_args=("--retry-for", "1"))
    try:
        proc_args = proc.args
        assert proc.stdin is not None
        proc.stdin.write(b"1\n2\n3\n")
        proc.stdin.flush()
        wait_for(lambda: room_seq(daemon) == 3, 15.0, "the first three lines")
        workers = children(daemon.pid)
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)  # reads nothing, answers nothing
        proc.stdin.write(b"4\n\n6\n")  # line 5 is empty: skipped, still counted
        proc.stdin.flush()
        wait_for(lambda: unread(proc.stdin) == 0, 15.0, "send to read lines 4-6")  # type: ignore[arg-type]
        daemon.kill_all()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        daemon.kill_all()
    assert proc.returncode == 69, (proc_args, err)
    if json_output:
        results = [json.loads(line) for line in out.decode().splitlines()]
        gave_up = results[-1]
        assert gave_up["unacknowledged"] == {"count": 2, "first": 4, "last": 6}
        assert [r["seq"] for r in results[:-1]] == [1, 2, 3]
        error = json.loads(err.decode().splitlines()[-1])["error"]
        assert error["exit_status"] == 69
        assert "lines 4-6 (2 messages) not acknowledged" in error["message"]
    else:
        last = err.decode().splitlines()[-1]
        assert last.startswith("ipcctl: cannot connect to "), last
        assert "lines 4-6 (2 messages) not acknowledged: they may or may not have been posted" in last
        assert re.search(r"send them again with --id-prefix [0-9a-f]{16}$", last), last


def test_a_publisher_gives_up_after_retry_for_and_tells_what_was_not_acknowledged(short_tmp: Path) -> None:
    daemon = Daemon(short_tmp / "s", workers=1).start()
    try:
        statuses: list[str] = []
        with Publisher[str](daemon.socket_dir, retry_for=0.5, on_status=statuses.append) as publisher:
            assert publisher.say_one(ROOM, "acknowledged", "first") == 1
            for pid in children(daemon.pid):
                os.kill(pid, signal.SIGSTOP)  # takes the posts, answers nothing
            publisher.say(ROOM, "lost 1", "second")
            publisher.say(ROOM, "lost 2", "third")
            publisher.flush()
            daemon.kill_all()
            with pytest.raises(DaemonUnreachable):
                list(publisher.drain())
            assert publisher.unacknowledged() == ["second", "third"]
        assert statuses == [statuses[0]]
        assert statuses[0].startswith("connection lost (")
    finally:
        daemon.kill_all()
