"""The chat session's commands without a terminal: ChatSession fed typed
lines, its output collected, against a real daemon."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipcd.cli.chatui import ChatSession, Disconnected
from ipcd.subscription import Subscription
from tests.daemon import Daemon, wait_for


class Chat:
    def __init__(self, daemon: Daemon, patience: float = 0.2) -> None:
        self.lines: list[str] = []
        self.subscription = Subscription(daemon.socket_dir, (), patience=patience)
        self.session = ChatSession(self.subscription, self.lines.append, history=5)

    def type(self, line: str) -> list[str]:
        """What one typed line printed (deliveries included)."""
        start = len(self.lines)
        assert self.session.handle(line)
        return self.lines[start:]

    def wait_line(self, text: str) -> str:
        def seen() -> str | None:
            self.session.drain()
            return next((line for line in self.lines if text in line), None)

        found: str = wait_for(seen, 10, f"a line with {text!r}")
        return found


@pytest.fixture
def chat(daemon: Daemon) -> Iterator[Chat]:
    chat = Chat(daemon)
    with chat.subscription:
        chat.session.start("dev", "carol")
        yield chat


def test_start_joins_and_says_who_is_there(daemon: Daemon, chat: Chat) -> None:
    assert chat.lines == ["joined dev as carol, members: carol"]
    assert chat.session.prompt() == "[dev] carol> "


def test_join_replays_recent_history_with_timestamps(daemon: Daemon) -> None:
    with daemon.client() as dave:
        for n in range(7):
            dave.say("old", f"m{n}")
        late = Chat(daemon)
        with late.subscription:
            late.session.start("old", None)
            late.wait_line("m6")
            shown = [line for line in late.lines if "[old]" in line]
    assert [line.rsplit(": ", 1)[1] for line in shown] == ["m2", "m3", "m4", "m5", "m6"]
    assert all(line[2] == ":" and line[5] == " " for line in shown)  # HH:MM prefix


def test_text_goes_to_the_current_room_and_a_double_slash_escapes(chat: Chat) -> None:
    chat.type("/join side")
    chat.type("//etc/passwd is a path")
    assert "[side] carol: /etc/passwd is a path" in chat.wait_line("/etc/passwd")
    assert chat.session.client.history("dev", 10) == []


def test_part_falls_back_to_the_previous_room(chat: Chat) -> None:
    chat.type("/join side")
    assert chat.session.prompt() == "[side] carol> "
    assert chat.type("/part") == ["* you left side; now in dev"]
    assert chat.type("/part") == ["* you left dev; /join a room to talk"]
    assert chat.session.prompt() == "carol> "
    assert chat.type("hello?") == ["! you are in no room: /join ROOM first"]
    assert chat.type("/nick caroline") == ["* you are now known as caroline"]


def test_topic_history_names_and_rooms(chat: Chat) -> None:
    assert chat.type("/topic") == ["* dev has no topic"]
    assert chat.type("/history") == ["* no messages in dev yet"]
    chat.type("/topic release day")
    chat.wait_line("set the topic to: release day")
    assert chat.type("/topic") == ["* topic of dev: release day"]
    chat.type("first")
    chat.type("second")
    shown = chat.type("/history 1")
    assert len(shown) == 1
    assert shown[0].endswith("[dev] carol: second")
    assert chat.type("/names") == ["* in dev: carol"]
    assert "* dev (1 member, 2 messages) -- release day" in chat.type("/rooms")


def test_mistakes_get_one_line_and_the_session_goes_on(chat: Chat) -> None:
    assert chat.type("/frobnicate") == ["! unknown command /frobnicate; /help lists the commands"]
    assert chat.type("/msg bob") == ["! usage: /msg NICK TEXT"]
    assert chat.type("/join") == ["! usage: /join ROOM"]
    assert chat.type("/history many") == ["! usage: /history [N]"]
    refused = chat.type("/join no/slashes")
    assert len(refused) == 1
    assert refused[0].startswith("! the daemon refused: bad room name")
    assert chat.type("") == []
    assert not chat.session.handle("/quit")


def test_help_lists_every_command(chat: Chat) -> None:
    shown = "\n".join(chat.type("/help"))
    for name in ("join", "part", "msg", "nick", "names", "rooms", "topic", "history", "help", "quit"):
        assert f"/{name}" in shown


def test_a_closed_connection_raises_disconnected(daemon: Daemon, chat: Chat) -> None:
    assert daemon.stop() == 0
    with pytest.raises(Disconnected):
        chat.session.handle("anyone?")


def test_a_reload_moves_the_session_on_and_nothing_shows_twice(socket_dir: Path) -> None:
    # The drain timeout is never reached: only the reload's notice can move the session.
    daemon = Daemon(socket_dir, "--drain-timeout", "3600", workers=1).start()
    try:
        chat = Chat(daemon, patience=10)
        with chat.subscription:
            chat.session.start("dev", "carol")
            chat.type("before")
            chat.wait_line("carol: before")
            daemon.signal(signal.SIGHUP)
            chat.wait_line("* reconnected")
            with daemon.client() as dave:
                dave.say("dev", "during")  # dave connected after the reload: a new worker's
            chat.type("after")
            chat.wait_line("carol: after")
            assert chat.session.prompt() == "[dev] carol> "
        shown = [line.split("] ", 1)[1] for line in chat.lines if "[dev] " in line and ": " in line]
        assert shown == ["carol: before", "root: during", "carol: after"], chat.lines  # in seq order
        lost = [line for line in chat.lines if line.startswith("! connection lost")]
        assert len(lost) == 1, chat.lines
        assert "ipcd reloaded" in lost[0]
    finally:
        assert daemon.stop() == 0
