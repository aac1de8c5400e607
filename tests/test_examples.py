"""Every example runs against a real daemon and does what its docstring says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ipcd.client import Client
from tests.daemon import REPO, Daemon


def test_pipelined_echo_example(daemon: Daemon) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "pipelined_echo.py"),
            "--socket-dir",
            str(daemon.socket_dir),
            "-n",
            "5000",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("5000 pipelined echoes in ")


def test_echo_bot_answers_in_room_and_privately(daemon: Daemon) -> None:
    bot = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "examples" / "echo_bot.py"),
            "--socket-dir",
            str(daemon.socket_dir),
            "--room",
            "ops",
            "--nick",
            "bot",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert bot.stdout is not None
        assert bot.stdout.readline().startswith("bot listening in ops")
        with daemon.client() as alice:
            alice.nick("alice")
            alice.join("ops")
            alice.say("ops", "!echo hello bot")
            replies = _texts_from(alice, "bot", 1)
            assert replies == ["alice: hello bot"]
            alice.msg("bot", "!ping")
            event = alice.next_event(timeout=10)
            while event.kind != "private":
                event = alice.next_event(timeout=10)
            assert (event.data["from"], event.data["text"]) == ("bot", "pong")
    finally:
        bot.terminate()
        bot.communicate(timeout=10)


def _texts_from(client: Client, nick: str, count: int) -> list[str]:
    texts: list[str] = []
    while len(texts) < count:
        event = client.next_event(timeout=10)
        if event.kind == "message" and event.data["from"] == nick:
            texts.append(event.data["text"])
    return texts


def test_alert_script_posts_over_datagrams(daemon: Daemon, short_tmp: Path) -> None:
    # A threshold of 0% makes every mounted disk "full": the script must post one line per disk.
    wrapper = short_tmp / "ipcctl"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m ipcd.cli.ipcctl "$@"\n')
    wrapper.chmod(0o755)
    with daemon.client() as listener:
        listener.join("alerts")
        env = {**os.environ, "IPCCTL": str(wrapper), "IPCD_SOCKET_DIR": str(daemon.socket_dir)}
        result = subprocess.run(
            ["sh", str(REPO / "examples" / "alert.sh"), "0", "alerts"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        event = listener.next_event(timeout=10)
        while event.kind != "message":
            event = listener.next_event(timeout=10)
        assert "% full" in event.data["text"]
        assert event.data["uid"] == os.getuid()
        assert event.data["room"] == "alerts"
