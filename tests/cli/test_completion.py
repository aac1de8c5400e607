"""Shell completion: names the running daemon knows, through click's
protocol and through a real bash sourcing ``ipcctl completion bash``.

The daemon holds a stored entry ``web`` (and ``db``), rooms ``dev`` and
``lobby``, and a listener connected as ``alice``; completing a word must
offer exactly the names that start with it, and with no daemon, nothing at
all, not even an error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon, wait_for

BIN = Path(sys.executable).parent
IPCCTL = str(BIN / "ipcctl")


@pytest.fixture
def known(daemon: Daemon, tmp_path: Path) -> Iterator[Daemon]:
    """The daemon, once it knows web, db, dev and alice."""
    stored = tmp_path / "app.conf"
    stored.write_text("port = 80\n")
    with daemon.client() as client:
        for name in ("web", "db"):
            fd = os.open(stored, os.O_RDONLY | os.O_CLOEXEC)
            try:
                client.put(name, [fd])
            finally:
                os.close(fd)
        client.say("dev", "hello")
    listener = subprocess.Popen(
        [IPCCTL, "--socket-dir", str(daemon.socket_dir), "listen", "--nick", "alice", "--room", "dev"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def alice_connected() -> bool:
            with daemon.client() as client:
                return any(m["nick"] == "alice" for m in client.who())

        wait_for(alice_connected, what="alice's listener to connect")
        yield daemon
    finally:
        listener.terminate()
        listener.wait(10)


def complete(socket_dir: Path | None, words: str, protocol: str = "bash") -> subprocess.CompletedProcess[str]:
    """What ``ipcctl`` answers a shell completing the last word of ``words``."""
    env = {k: v for k, v in os.environ.items() if k != "IPCD_SOCKET_DIR"}
    if socket_dir is not None:
        env["IPCD_SOCKET_DIR"] = str(socket_dir)
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    env.update(_IPCCTL_COMPLETE=f"{protocol}_complete", COMP_WORDS=words, COMP_CWORD=str(cword))
    return subprocess.run([IPCCTL], env=env, capture_output=True, text=True, timeout=30, check=False)


def candidates(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return [line.split(",", 1)[1] for line in result.stdout.splitlines() if line]


@pytest.mark.parametrize("command", ["get", "take", "rm"])
def test_entry_names_complete_from_the_store(known: Daemon, command: str) -> None:
    assert candidates(complete(known.socket_dir, f"ipcctl {command} w")) == ["web"]
    assert candidates(complete(known.socket_dir, f"ipcctl {command} ")) == ["db", "web"]


@pytest.mark.parametrize(
    "words",
    [
        "ipcctl send --room d",
        "ipcctl send -r d",
        "ipcctl listen --room d",
        "ipcctl chat --room d",
        "ipcctl who d",
    ],
)
def test_rooms_complete_from_the_daemon(known: Daemon, words: str) -> None:
    assert candidates(complete(known.socket_dir, words)) == ["dev"]


def test_every_room_is_offered_for_an_empty_word(known: Daemon) -> None:
    assert candidates(complete(known.socket_dir, "ipcctl listen --room ")) == ["dev", "lobby"]


def test_nicks_complete_for_a_private_message(known: Daemon) -> None:
    assert candidates(complete(known.socket_dir, "ipcctl send --to a")) == ["alice"]


def test_the_socket_dir_on_the_command_line_is_the_one_asked(known: Daemon) -> None:
    words = f"ipcctl --socket-dir {known.socket_dir} get w"
    assert candidates(complete(None, words)) == ["web"]


def test_zsh_gets_a_description_with_each_name(known: Daemon) -> None:
    result = complete(known.socket_dir, "ipcctl get w", protocol="zsh")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["plain", "web", "1 fd"]


def test_no_daemon_completes_nothing_and_says_nothing(short_tmp: Path) -> None:
    for words in ("ipcctl get w", "ipcctl send --room d", "ipcctl send --to a"):
        assert candidates(complete(short_tmp / "nobody-here", words)) == []


def test_commands_still_complete_without_a_daemon(short_tmp: Path) -> None:
    assert candidates(complete(short_tmp / "nobody-here", "ipcctl st")) == ["status"]


def test_bash_sourcing_the_script_completes_a_stored_name(known: Daemon) -> None:
    script = (
        "source <(ipcctl completion bash)\n"
        "COMP_WORDS=(ipcctl get w); COMP_CWORD=2\n"
        "_ipcctl_completion ipcctl\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "IPCD_SOCKET_DIR": str(known.socket_dir)}
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "web\n", "")


@pytest.mark.parametrize(
    ("shell", "registers"), [("zsh", "compdef _ipcctl_completion ipcctl"), ("fish", "complete")]
)
def test_completion_prints_the_script_for_each_shell(shell: str, registers: str) -> None:
    result = subprocess.run(
        [IPCCTL, "completion", shell], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "_IPCCTL_COMPLETE=" in result.stdout
    assert registers in result.stdout


def test_completion_refuses_an_unknown_shell() -> None:
    result = subprocess.run(
        [IPCCTL, "completion", "tcsh"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2
    assert "tcsh" in result.stderr
