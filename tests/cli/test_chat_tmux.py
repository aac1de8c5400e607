"""``ipcctl chat`` as a person uses it: the real program in a real terminal
(tmux), keys typed into it, its screen read back; other chatters are
:class:`ipcd.client.Client` connections to the same daemon."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipcd.client import ChatEvent, Client
from tests.cli.tmux import Terminal, last_line
from tests.daemon import IPCCTL, Daemon, ipcctl

pytestmark = pytest.mark.skipif(
    shutil.which("tmux") is None, reason="needs tmux (scripts/install-system-deps installs it)"
)


@pytest.fixture
def alice(daemon: Daemon, short_tmp: Path) -> Iterator[Terminal]:
    """``ipcctl chat --room dev --nick alice``, joined and at its prompt."""
    command = [*IPCCTL, "--socket-dir", str(daemon.socket_dir), "chat", "--room", "dev", "--nick", "alice"]
    with Terminal(short_tmp, command) as term:
        term.wait_text("joined dev as alice, members: alice")
        term.wait_prompt("[dev] alice> ")
        yield term


@pytest.fixture
def bob(daemon: Daemon) -> Iterator[Client]:
    with daemon.client() as client:
        client.nick("bob")
        yield client


def next_private(client: Client) -> ChatEvent:
    """The next private message to ``client``, skipping room traffic."""
    while True:
        event = client.next_event(timeout=10)
        if event.kind == "private":
            return event


def test_typed_line_is_sent_and_incoming_lines_do_not_break_it(alice: Terminal, bob: Client) -> None:
    alice.enter("hello")
    alice.wait_text("[dev] alice: hello")
    alice.wait_prompt("[dev] alice> ")

    bob.join("dev")
    alice.wait_text("[dev] * bob joined")
    alice.type("half typ")
    alice.wait_prompt("[dev] alice> half typ")
    bob.say("dev", "did you see this?")
    screen = alice.wait_screen(
        lambda s: "[dev] bob: did you see this?" in s and last_line(s) == "[dev] alice> half typ",
        "bob's line above the half-typed prompt",
    )
    assert screen.count("half typ") == 1, screen  # printed once, on the prompt line only

    alice.enter("ed")
    screen = alice.wait_text("[dev] alice: half typed")
    lines = screen.splitlines()
    assert lines.index(next(x for x in lines if "bob: did you see this?" in x)) < lines.index(
        next(x for x in lines if "alice: half typed" in x)
    )

    alice.key("C-d")  # maybe before the next prompt is up: it waits for it
    assert alice.exit_status() == 0


def test_commands_and_refusals(alice: Terminal, bob: Client) -> None:
    alice.enter("/msg bob psst")
    alice.wait_text("[private] alice -> bob: psst")
    event = next_private(bob)
    assert (event.data["from"], event.data["to"], event.data["text"]) == ("alice", "bob", "psst")
    alice.wait_prompt("[dev] alice> ")

    alice.enter("/nick alicia")
    alice.wait_text("[dev] * alice is now known as alicia (was alice)")
    alice.wait_prompt("[dev] alicia> ")

    alice.enter("/join other")
    alice.wait_text("joined other as alicia, members: alicia")
    alice.wait_prompt("[other] alicia> ")

    alice.enter("/msg nobody x")
    alice.wait_text("! the daemon refused: no one is connected as 'nobody'")
    alice.wait_prompt("[other] alicia> ")
    alice.enter("still here")  # the refusal ended nothing
    alice.wait_text("[other] alicia: still here")
    assert [m["text"] for m in bob.history("other")] == ["still here"]
    alice.wait_prompt("[other] alicia> ")

    alice.enter("/topic plans for friday")
    alice.wait_text("[other] * alicia set the topic to: plans for friday")
    alice.wait_prompt("[other] alicia> ")
    alice.enter("/part")
    alice.wait_text("* you left other; now in dev")
    alice.wait_prompt("[dev] alicia> ")

    alice.enter("/quit")
    assert alice.exit_status() == 0


def test_lines_typed_ahead_are_sent_in_order_and_not_echoed(alice: Terminal, bob: Client) -> None:
    bob.join("dev")
    alice.wait_text("[dev] * bob joined")
    for word in ("one", "two", "three", "/names"):
        alice.enter(word)  # no waiting: a paste, or a fast typist
    screen = alice.wait_text("* in dev: alice, bob")
    texts = [line.split("alice: ", 1)[1] for line in screen.splitlines() if "[dev] alice: " in line]
    assert texts == ["one", "two", "three"], screen
    assert screen.count("two") == 1, screen  # the terminal did not echo it between prompts
    assert [m["text"] for m in bob.history("dev")] == ["one", "two", "three"]

    alice.enter("bye")
    alice.key("C-d")  # typed ahead too: ends the chat after "bye" is sent
    assert alice.exit_status() == 0
    assert bob.history("dev", 1)[0]["text"] == "bye"


def test_ctrl_c_leaves_cleanly_even_mid_line(alice: Terminal, bob: Client) -> None:
    alice.type("never sent")
    alice.wait_prompt("[dev] alice> never sent")
    alice.key("C-c")
    assert alice.exit_status() == 130  # interrupted, as a shell reports it
    screen = alice.screen()
    assert "Traceback" not in screen, screen
    assert "Task exception" not in screen, screen
    assert [r["seq"] for r in bob.rooms() if r["room"] == "dev"] in ([], [0])  # nothing was sent


def test_daemon_going_away_ends_the_chat_with_69(alice: Terminal, daemon: Daemon) -> None:
    alice.type("unsent")
    assert daemon.stop() == 0
    alice.wait_text("! lost the connection to the daemon")
    assert alice.exit_status() == 69


def test_a_reload_does_not_end_the_chat(alice: Terminal, daemon: Daemon) -> None:
    alice.type("half")
    alice.wait_prompt("[dev] alice> half")
    daemon.signal(signal.SIGHUP)  # alice's worker retires: she is sent to a new one
    alice.wait_text("* reconnected")
    alice.wait_prompt("[dev] alice> half")  # what she was typing is still there
    alice.enter(" and whole")
    alice.wait_text("[dev] alice: half and whole")
    with daemon.client() as reader:
        assert [m["text"] for m in reader.history("dev")] == ["half and whole"]
    alice.key("C-d")
    assert alice.exit_status() == 0


def test_sigterm_puts_the_terminal_back_and_exits_143(alice: Terminal, bob: Client) -> None:
    (me,) = [m for m in bob.who("dev") if m["nick"] == "alice"]
    alice.type("half")
    alice.wait_prompt("[dev] alice> half")
    os.kill(me["pid"], signal.SIGTERM)
    assert alice.exit_status() == 128 + signal.SIGTERM
    alice.wait_text("! terminated")


def test_without_a_terminal_it_points_to_send_and_listen(daemon: Daemon) -> None:
    result = ipcctl(daemon.socket_dir, "chat", input=b"hello\n")
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert "ipcctl send" in result.stderr
    assert "ipcctl listen" in result.stderr


def test_help_explains_the_slash_commands() -> None:
    result = ipcctl(Path("/nonexistent"), "chat", "--help")
    assert result.returncode == 0
    for command in ("/join ROOM", "/part", "/msg NICK TEXT", "/nick NICK", "/names", "/rooms", "/topic"):
        assert command in result.stdout
    for command in ("/history [N]", "/help", "/quit", "Ctrl-D"):
        assert command in result.stdout
