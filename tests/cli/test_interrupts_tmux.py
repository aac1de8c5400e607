"""Ctrl-C in a real terminal: every ipcctl command leaves quietly with 130
(no traceback, no "Aborted!"), after what a user expects to see, and leaves
the terminal as it found it.

Each command runs in tmux under ``sh``, which records the terminal's modes
before and after and prints the exit status (its ``trap : INT`` keeps the
shell itself alive through the Ctrl-C sent to the whole foreground group)."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

from tests.cli.tmux import Terminal
from tests.daemon import IPCCTL, Daemon, children, fd_targets, wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("tmux") is None, reason="needs tmux (scripts/install-system-deps installs it)"
)

NOISE = ("Traceback", "Aborted!", "Task exception", "KeyboardInterrupt")


def in_shell(daemon: Daemon, *args: str) -> list[str]:
    command = shlex.join([*IPCCTL, "--socket-dir", str(daemon.socket_dir), *args])
    script = (
        "trap : INT; before=$(stty -g); "
        f"{command}; status=$?; "
        '[ "$(stty -g)" = "$before" ] && echo TERMINAL-SANE; echo "EXIT=$status"'
    )
    return ["sh", "-c", script]


def wait_connected(term: Terminal) -> None:
    """Until the command under the pane's shell holds its connection."""

    def connected() -> bool:
        return any(
            target.startswith("socket:") for pid in children(term.pane_pid()) for target in fd_targets(pid)
        )

    wait_for(connected, 10.0, "ipcctl to connect")


def interrupt(term: Terminal) -> str:
    """Press Ctrl-C; the screen once the command has exited."""
    term.key("C-c")
    term.wait_text("EXIT=")
    screen = term.transcript()
    for noise in NOISE:
        assert noise not in screen, screen
    assert "TERMINAL-SANE" in screen, screen
    return screen


def test_ctrl_c_in_chat_exits_130_without_a_traceback(daemon: Daemon, short_tmp: Path) -> None:
    with Terminal(short_tmp, in_shell(daemon, "chat", "--room", "dev", "--nick", "ann")) as term:
        term.wait_prompt("[dev] ann> ")
        screen = interrupt(term)
    assert "EXIT=130" in screen, screen


def test_ctrl_c_in_ping_prints_the_statistics_and_exits_130(daemon: Daemon, short_tmp: Path) -> None:
    with Terminal(short_tmp, in_shell(daemon, "ping", "-i", "0.2", "-c", "1000")) as term:
        term.wait_text("seq=2 ")
        screen = interrupt(term)
    assert f"--- {daemon.stream_path} ping statistics ---" in screen, screen
    assert " received, 0% loss" in screen, screen  # an interrupted request is not a lost one
    assert "rtt min/avg/max/p99/mdev = " in screen, screen
    assert "EXIT=130" in screen, screen


def test_ctrl_c_in_ping_json_prints_the_summary_object(daemon: Daemon, short_tmp: Path) -> None:
    with Terminal(short_tmp, in_shell(daemon, "--json", "ping", "-i", "0.2", "-c", "1000")) as term:
        wait_connected(term)
        screen = interrupt(term)
    flat = screen.replace("\n", "")  # the object is one line, wrapped at the pane's width
    for key in ('"received": ', '"sent": ', '"loss_percent": 0.0'):
        assert key in flat, screen
    assert "EXIT=130" in screen, screen


@pytest.mark.parametrize("verb", ["get", "take"])
def test_ctrl_c_in_a_waiting_get_exits_130_not_1(daemon: Daemon, short_tmp: Path, verb: str) -> None:
    with Terminal(short_tmp, in_shell(daemon, verb, "never-put", "--wait", "60")) as term:
        wait_connected(term)
        screen = interrupt(term)
    assert "EXIT=130" in screen, screen
    assert "ipcctl:" not in screen, screen  # quiet: an interrupt is not an error


def test_ctrl_c_in_listen_exits_130(daemon: Daemon, short_tmp: Path) -> None:
    with Terminal(short_tmp, in_shell(daemon, "listen", "--room", "dev")) as term:
        term.wait_screen(lambda _s: any(r["room"] == "dev" for r in daemon_rooms(daemon)), "listen to join")
        screen = interrupt(term)
    assert "EXIT=130" in screen, screen
    assert "ipcctl:" not in screen, screen


def daemon_rooms(daemon: Daemon) -> list[dict[str, object]]:
    with daemon.client() as client:
        return [r for r in client.rooms() if r["members"]]
