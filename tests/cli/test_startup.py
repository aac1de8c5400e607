"""What ``ipcctl`` loads to start: each command imports only what it uses,
from bytecode compiled by the set-up, through the installed console script.

Start-up time is the cost of every ``ipcctl`` call a script makes in a loop;
its speed is measured by ``make bench`` (the ``startup`` scenario), not here.
These checks are what keeps it fast: the modules a command imports, read
from the interpreter itself (``sys.modules`` at exit; ``-v`` says whether
each module came from a .pyc or was compiled again).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon import Daemon

IPCCTL_SCRIPT = Path(sys.executable).parent / "ipcctl"  # the console script users run
COMMANDS = {
    "echo",
    "ping",
    "status",
    "send",
    "listen",
    "chat",
    "rooms",
    "who",
    "put",
    "get",
    "take",
    "ls",
    "rm",
    "completion",
}

# What no command but its own may pay for: the chat UI and its terminal
# toolkit, the hand-off and chat commands, the daemon's side of the package.
CHAT = {"ipcd.cli.chatcmds", "ipcd.protocol.chat"}
CHAT_UI = {"ipcd.cli.chatui", "prompt_toolkit", "asyncio"}
HANDOFF = {"ipcd.cli.handoffcmds"}
COMPLETION = {"ipcd.cli.completion", "click.shell_completion"}
DAEMON_SIDE = {
    "ipcd.chat",
    "ipcd.handoff",
    "ipcd.server",
    "ipcd.services",
    "ipcd.settings",
    "ipcd.systemd",
    "ipcd.units",
    "tomllib",
    "daemon",
    "systemd",
}


# Runs the console script as its own __main__ and, at exit, lists every
# module then in sys.modules (-X importtime would miss the ones LazyGroup
# imports with importlib).
_LIST_MODULES_AT_EXIT = """
import atexit, runpy, sys
atexit.register(lambda: print("MODULES", *sorted(sys.modules), file=sys.stderr))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def imported_by(daemon: Daemon, *args: str) -> set[str]:
    """Every module ``ipcctl ARGS`` imports, run as users run it."""
    argv = [str(IPCCTL_SCRIPT), "--socket-dir", str(daemon.socket_dir), *args]
    result = subprocess.run(
        [sys.executable, "-c", _LIST_MODULES_AT_EXIT, *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    listing = [line for line in result.stderr.splitlines() if line.startswith("MODULES ")]
    assert len(listing) == 1, result.stderr
    return set(listing[0].split()[1:])


def loaded(modules: set[str], heavy: set[str]) -> set[str]:
    """The modules of ``modules`` that are, or are inside, one in ``heavy``."""
    return {m for m in modules if any(m == h or m.startswith(h + ".") for h in heavy)}


def test_the_console_script_is_installed() -> None:
    assert IPCCTL_SCRIPT.is_file(), f"{IPCCTL_SCRIPT} missing: run make install"


def test_echo_imports_neither_chat_nor_handoff_nor_the_daemon(daemon: Daemon) -> None:
    modules = imported_by(daemon, "echo", "hi")
    assert "ipcd.client" in modules  # the check sees ipcd's imports at all
    assert loaded(modules, CHAT | CHAT_UI | HANDOFF | COMPLETION | DAEMON_SIDE) == set()
    assert "dataclasses" not in modules  # costs more to import than an echo takes


def test_status_imports_neither_chat_nor_handoff(daemon: Daemon) -> None:
    modules = imported_by(daemon, "status")
    assert loaded(modules, CHAT | CHAT_UI | HANDOFF | COMPLETION | DAEMON_SIDE) == set()


def test_send_imports_the_chat_commands_but_not_the_chat_ui(daemon: Daemon) -> None:
    modules = imported_by(daemon, "send", "--room", "dev", "hello")
    assert "ipcd.cli.chatcmds" in modules
    assert loaded(modules, CHAT_UI | HANDOFF | DAEMON_SIDE) == set()


def test_put_imports_the_handoff_commands_but_not_chat(daemon: Daemon, tmp_path: Path) -> None:
    stored = tmp_path / "app.conf"
    stored.write_text("x = 1\n")
    modules = imported_by(daemon, "put", "conf", str(stored))
    assert "ipcd.cli.handoffcmds" in modules
    assert loaded(modules, CHAT | CHAT_UI | DAEMON_SIDE) == set()


def test_help_lists_every_command_with_its_short_help() -> None:
    result = subprocess.run(
        [str(IPCCTL_SCRIPT), "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    listed = dict(re.findall(r"^  (\w+)\s+(\S.*)$", result.stdout.split("Commands:", 1)[1], re.M))
    assert set(listed) == COMMANDS
    assert listed["send"].startswith("Send TEXT to a room")
    assert listed["put"].startswith("Store open files under NAME")


@pytest.mark.parametrize("args", [("echo", "hi"), ("send", "hi"), ("ls",)])
def test_every_module_comes_from_bytecode(daemon: Daemon, args: tuple[str, ...]) -> None:
    """PYTHONDONTWRITEBYTECODE=1 is set on this machine: unless the set-up
    compiled them, ipcd's modules would be compiled again on every run."""
    result = subprocess.run(
        [sys.executable, "-v", str(IPCCTL_SCRIPT), "--socket-dir", str(daemon.socket_dir), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    sources = re.findall(r"^# code object from (?!')(\S+)$", result.stderr, re.M)
    froms = re.findall(r"^# code object from '(\S+)'$", result.stderr, re.M)
    assert any("/ipcd/" in path for path in froms)
    assert sources == [], f"compiled from source, not bytecode (run make install): {sources}"
