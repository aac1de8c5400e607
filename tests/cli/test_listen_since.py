"""``ipcctl listen --since SEQ``: a listener that was away (its own process
restarted) resumes where it stopped: every message the daemon still keeps
after SEQ, then the live ones, each once, in order; what is no longer kept
is named, on stderr and as a ``gone`` line with --json."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.test_listen_reconnect import ROOM, Listener, listen, listeners, post
from tests.daemon import Daemon, ipcctl

__all__ = ["listeners"]  # the fixture, shared


def lines(listener: Listener) -> list[dict[str, object]]:
    return [json.loads(line) for line in list(listener.out)]


def test_since_prints_what_came_after_then_the_live_ones(daemon: Daemon, listeners: list[Listener]) -> None:
    post(daemon, "one", "two", "three", "four", "five")
    listener = listen(daemon, listeners, "--json", "-n", "4", "--since", "2")
    post(daemon, "six")
    assert listener.wait_exit() == 0, listener.err
    assert [(m["seq"], m["text"]) for m in lines(listener)] == [
        (3, "three"),
        (4, "four"),
        (5, "five"),
        (6, "six"),
    ]
    assert listener.err == []


def test_what_is_no_longer_kept_is_named_not_skipped(socket_dir: Path, listeners: list[Listener]) -> None:
    daemon = Daemon(socket_dir, "--history-size", "3", workers=1).start()
    try:
        post(daemon, *(f"line {i}" for i in range(1, 9)))  # 6..8 kept
        listener = Listener(daemon, "--json", "-n", "3", "--since", f"{ROOM}=2")  # all of it kept already
        listeners.append(listener)
        assert listener.wait_exit() == 0, listener.err
        printed = lines(listener)
        assert printed[0] == {"type": "gone", "room": ROOM, "first": 3, "last": 5}
        assert [(m["type"], m["seq"]) for m in printed[1:]] == [
            ("message", 6),
            ("message", 7),
            ("message", 8),
        ]
        assert listener.err == [f"ipcctl: messages 3-5 of {ROOM} are no longer kept by the daemon: missed"]
    finally:
        assert daemon.stop() == 0


def test_since_follows_the_pages_of_a_long_history(socket_dir: Path, listeners: list[Listener]) -> None:
    """More than one reply holds (--max-outbuf 64K: 16 KiB pages of 4 KiB
    messages): the pages and the live ones join without a gap."""
    daemon = Daemon(socket_dir, "--max-outbuf", "64K", workers=2).start()
    try:
        post(daemon, *(f"{i:03d} " + "x" * 4000 for i in range(1, 41)))
        listener = listen(daemon, listeners, "--json", "-n", "41", "--since", "0")
        post(daemon, "041 live")
        assert listener.wait_exit() == 0, listener.err
        assert [m["seq"] for m in lines(listener)] == list(range(1, 42))
        assert [str(m["text"])[:3] for m in lines(listener)] == [f"{i:03d}" for i in range(1, 42)]
    finally:
        assert daemon.stop() == 0


def test_bad_since_is_a_usage_error(daemon: Daemon) -> None:
    for args, words in (
        (["--since", "x"], "'x' is not SEQ or ROOM=SEQ"),
        (["--since", "elsewhere=3"], "'elsewhere' is not one of the rooms listened to"),
        (["--since", "3", "--history", "2"], "give --history or --since, not both"),
    ):
        done = ipcctl(daemon.socket_dir, "listen", "--room", ROOM, *args)
        assert done.returncode == 2, done
        assert words in done.stderr, done.stderr
