"""The README's tour, run line by line against a real daemon, prints what the
README shows (see readme_tour.py for how blocks are read and compared)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon import REPO, Daemon, wait_for
from tests.readme_tour import Block, matches, normalize, parse

README = REPO / "README.md"
SHOWN_SOCKET_DIR = "/tmp/ipcd"  # what the README's outputs name


def test_parse_reads_commands_outputs_and_markers() -> None:
    text = "\n".join(
        [
            "<!-- readme-test: background -->",
            "```",
            "$ listen",
            "[dev] root: hi",
            "```",
            "prose",
            "```",
            "$ echo hi",
            "hi",
            "$ true",
            "```",
            "```toml",
            "no commands here",
            "```",
        ]
    )
    background, session = parse(text)
    assert background.kind == "background"
    assert [(c.line, c.expected) for c in background.commands] == [("listen", ("[dev] root: hi",))]
    assert session.kind == "session"
    assert [(c.line, c.expected) for c in session.commands] == [("echo hi", ("hi",)), ("true", ())]


def test_matching_ignores_numbers_and_spacing_but_not_words() -> None:
    assert normalize("up 2s,  rss: 16.4 MiB") == "up Ns, rss: N MiB"
    assert matches(["seq=1 time=1.189 ms", "...", "done"], ["seq=7 time=0.2 ms", "a", "b", "done"])
    assert matches(["...", "x"], ["x"])
    assert not matches(["all 2 workers ready"], ["all 2 workers of generation 1 ready"])
    assert not matches(["a"], ["a", "b"])


def _run(command: str, env: dict[str, str], socket_dir: Path) -> list[str]:
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout.replace(str(socket_dir), SHOWN_SOCKET_DIR).splitlines()


def _show(block: Block, expected: list[str] | tuple[str, ...], actual: list[str]) -> str:
    return (
        f"README.md line {block.first_line}:\n--- README shows ---\n"
        + "\n".join(expected)
        + "\n--- it printed ---\n"
        + "\n".join(actual)
    )


def _chatters(daemon: Daemon) -> int:
    return int(daemon.status()["chat"]["chatters"])


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "ipcctl").exists(), reason="needs make install")
def test_readme_tour_prints_what_the_readme_shows(short_tmp: Path) -> None:
    blocks = parse(README.read_text())
    socket_dir = short_tmp / "s"
    env = {**os.environ, "IPCD_SOCKET_DIR": str(socket_dir)}
    daemon = Daemon(socket_dir, workers=None)
    daemon.start(argv=[str(REPO / ".venv" / "bin" / "ipcd")])

    def log_lines() -> list[str]:
        return daemon.log().replace(str(socket_dir), SHOWN_SOCKET_DIR).splitlines()

    background: list[tuple[Block, subprocess.Popen[str]]] = []
    try:
        for block in blocks:
            if block.kind == "start-log":
                expected = [*block.commands[0].expected, "..."]
                try:
                    wait_for(lambda: matches(expected, log_lines()), 15, "the start-up log")  # noqa: B023
                except TimeoutError:
                    pytest.fail(_show(block, expected, log_lines()))
            elif block.kind == "background":
                (command,) = block.commands
                before = _chatters(daemon)
                proc = subprocess.Popen(
                    ["bash", "-c", f"exec {command.line}"],
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                background.append((block, proc))
                wait_for(lambda: _chatters(daemon) > before, 10, "the background command to join")  # noqa: B023
            elif block.kind == "session":
                for command in block.commands:
                    actual = _run(command.line, env, socket_dir)
                    assert matches(command.expected, actual), _show(block, command.expected, actual)
                while background:
                    _check_background(*background.pop())
            elif block.kind == "stop-log":
                assert daemon.stop() == 0
                lines = log_lines()
                start = next(i for i, line in enumerate(lines) if "received; stopping" in line)
                assert matches(block.lines, lines[start:]), _show(block, block.lines, lines[start:])
    finally:
        for _, proc in background:
            proc.kill()
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()
    kinds = {block.kind for block in blocks}
    assert {"start-log", "background", "session", "stop-log"} <= kinds, kinds


def _check_background(block: Block, proc: subprocess.Popen[str]) -> None:
    """Stop a background command once it has printed what the README shows
    (or after a deadline), as its user would with Ctrl-C, and compare."""
    (command,) = block.commands
    assert proc.stdout is not None
    want = len(command.expected)
    lines: list[str] = []
    deadline = time.monotonic() + 10
    os.set_blocking(proc.stdout.fileno(), False)
    buffered = ""
    while len(lines) < want and time.monotonic() < deadline:
        chunk = proc.stdout.read()
        if chunk:
            buffered += chunk
            *done, buffered = buffered.split("\n")
            lines += done
        else:
            time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    proc.wait(10)
    proc.stdout.close()
    assert matches(command.expected, lines), _show(block, command.expected, lines)
