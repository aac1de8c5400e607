"""Room history, seqs and topics across a reload, a stop/start, a kill -9 of
the master and a torn journal: real daemons on a real state dir."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.daemon import IPCD, Daemon, children, ipcctl, wait_for

JOURNAL = "history.journal"


def _texts(daemon: Daemon, room: str) -> list[tuple[int, str]]:
    with daemon.client() as client:
        return [(m["seq"], m["text"]) for m in client.history(room)]


def _post(daemon: Daemon, room: str, texts: list[str]) -> list[int]:
    with daemon.client() as client:
        return [client.say(room, text) for text in texts]


def test_history_seqs_and_topics_survive_a_stop_and_start(socket_dir: Path) -> None:
    first = Daemon(socket_dir).start()
    try:
        assert _post(first, "ops", [f"m{i}" for i in range(1, 6)]) == [1, 2, 3, 4, 5]
        assert _post(first, "lobby", ["hello"]) == [1]
        with first.client() as client:
            client.join("ops")
            client.topic("ops", "deploys")
    finally:
        assert first.stop() == 0
    assert (first.state_dir / JOURNAL).stat().st_mode & 0o777 == 0o600
    assert first.state_dir.stat().st_mode & 0o777 == 0o700

    second = Daemon(socket_dir).start()
    try:
        assert _texts(second, "ops") == [(i, f"m{i}") for i in range(1, 6)]
        assert _texts(second, "lobby") == [(1, "hello")]
        with second.client() as client:
            assert client.topic("ops") == "deploys"
            assert client.say("ops", "after") == 6  # the numbering continues
        # A listener that saw up to seq 3 before the restart resumes after it.
        resumed = ipcctl(second.socket_dir, "--json", "listen", "--room", "ops", "--since", "3", "-n", "3")
        assert resumed.returncode == 0, resumed.stderr
        assert [(m["seq"], m["text"]) for m in map(json.loads, resumed.stdout.splitlines())] == [
            (4, "m4"),
            (5, "m5"),
            (6, "after"),
        ]
        assert "restored 6 messages in 2 rooms" in second.log()
        journal = second.status()["chat"]["journal"]
        assert journal["where"] == [str(second.state_dir / JOURNAL)]
        assert journal["bytes"] == (second.state_dir / JOURNAL).stat().st_size
        assert journal["generation"] == 2  # the first start's snapshot, then this one's
        assert journal["failing"] == []
    finally:
        assert second.stop() == 0


def test_a_reload_keeps_history_and_seqs(daemon: Daemon) -> None:
    assert _post(daemon, "ops", ["a", "b"]) == [1, 2]
    old_workers = set(daemon.worker_pids())
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: not (set(daemon.worker_pids()) & old_workers), 20, "the old workers to go")
    assert _texts(daemon, "ops") == [(1, "a"), (2, "b")]
    assert _post(daemon, "ops", ["c"]) == [3]


def test_an_acknowledged_post_survives_kill_9_of_the_master(socket_dir: Path) -> None:
    """The reply is routed only after the journal write of the same pass was
    made: every acknowledged post is in the kernel's hands when the client
    hears of it, so killing the master right after loses none of them."""
    first = Daemon(socket_dir).start()
    try:
        workers = first.worker_pids()
        with first.client() as client:
            acked = [client.say("ops", f"m{i}") for i in range(1, 201)]
            os.kill(first.pid, signal.SIGKILL)  # straight after the last acknowledgement
        assert first.proc is not None
        first.proc.wait(10)
        wait_for(
            lambda: not any(os.path.exists(f"/proc/{pid}") for pid in workers), 10, "the workers to exit"
        )
    finally:
        first.kill_all()
    assert acked == list(range(1, 201))
    second = Daemon(socket_dir, "--history-size", "500").start()
    try:
        assert _texts(second, "ops") == [(i, f"m{i}") for i in range(1, 201)]
        assert _post(second, "ops", ["next"]) == [201]
    finally:
        assert second.stop() == 0


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_torn_journal_tail_loses_only_the_torn_record_and_says_so(socket_dir: Path, damage: str) -> None:
    first = Daemon(socket_dir)
    journal = first.state_dir / JOURNAL
    first.start()
    try:
        sizes = []
        for i in range(1, 4):  # each post acknowledged: appended by then
            _post(first, "ops", [f"m{i}"])
            sizes.append(journal.stat().st_size)
    finally:
        assert first.stop() == 0
    data = journal.read_bytes()
    assert len(data) == sizes[-1]  # stopping appended nothing more
    garbage = b"\x00\x00\x01\x00 a crash mid-append"
    if damage == "truncated":
        journal.write_bytes(data[:-3])
        expected = [(1, "m1"), (2, "m2")]
        lost = sizes[2] - sizes[1] - 3  # what is left of the last record
    else:
        journal.write_bytes(data + garbage)
        expected = [(1, "m1"), (2, "m2"), (3, "m3")]
        lost = len(garbage)
    second = Daemon(socket_dir).start()
    try:
        assert _texts(second, "ops") == expected
        dropped = re.search(r"dropped (\d+) bytes of a torn or corrupt tail", second.log())
        assert dropped is not None, second.log()
        assert int(dropped.group(1)) == lost
        assert _post(second, "ops", ["next"]) == [expected[-1][0] + 1]
    finally:
        assert second.stop() == 0
    third = Daemon(socket_dir).start()  # the start rewrote the journal whole: nothing torn any more
    try:
        assert "torn" not in third.log().split("restored")[-1]
        assert _texts(third, "ops") == [*expected, (expected[-1][0] + 1, "next")]
    finally:
        assert third.stop() == 0


@pytest.mark.parametrize("where", ["itself", "its parent"])
def test_a_state_dir_others_can_change_is_refused(socket_dir: Path, own_state_dir: Path, where: str) -> None:
    """Like the socket dir: whoever can write it, or a directory on the way
    to it, could swap the journal for one of their own."""
    own_state_dir.mkdir(mode=0o700)
    unsafe = own_state_dir if where == "itself" else own_state_dir.parent
    os.chmod(unsafe, 0o777)  # noqa: S103 - the unsafe dir under test
    result = subprocess.run(
        [*IPCD, "serve", "--socket-dir", str(socket_dir), "--workers", "1"],
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    if where == "itself":
        expected = (
            f"ipcd: state dir {own_state_dir} is writable by others (mode 0777); "
            f"run 'chmod go-w {own_state_dir}' or choose another --state-dir"
        )
    else:
        expected = (
            f"ipcd: state dir {own_state_dir} is unsafe: {unsafe} is writable by others (mode 0777), "
            "so anyone could replace it; choose another --state-dir"
        )
    assert lines[-1] == expected
    assert not (own_state_dir / JOURNAL).exists()


def test_two_daemons_cannot_share_a_state_dir(socket_dir: Path, short_tmp: Path) -> None:
    first = Daemon(socket_dir).start()
    try:
        result = subprocess.run(
            [*IPCD, "serve", "--socket-dir", str(short_tmp / "other"), "--state-dir", str(first.state_dir)],
            capture_output=True,
            check=False,
            text=True,
            timeout=30,
        )
        assert result.returncode == 1
        assert "is in use by another ipcd; give each daemon its own --state-dir" in result.stderr
        assert children(first.pid)  # the first one serves on
    finally:
        assert first.stop() == 0


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_an_empty_state_dir_keeps_nothing(socket_dir: Path, short_tmp: Path, how: str) -> None:
    if how == "flag":
        first = Daemon(socket_dir, "--state-dir", "")
    else:  # IPCD_STATE_DIR= as a unit's Environment= would set it
        # (the default it would fall back to is made to be under short_tmp too)
        first = Daemon(socket_dir, env={"IPCD_STATE_DIR": "", "STATE_DIRECTORY": str(short_tmp / "default")})
        first.args = ["--socket-dir", str(socket_dir), "--workers", "2"]
    first.start()
    try:
        _post(first, "ops", ["gone"])
    finally:
        assert first.stop() == 0
    assert not first.state_dir.exists()
    assert not [p for p in short_tmp.rglob("*") if "journal" in p.name]
    second = Daemon(socket_dir, "--state-dir", "").start()
    try:
        with second.client() as client:
            assert client.say("ops", "fresh") == 1
    finally:
        assert second.stop() == 0
