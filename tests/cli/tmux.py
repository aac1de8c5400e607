"""A program in a real terminal: tmux runs it, tests type keys and read the screen.

Each :class:`Terminal` has a tmux server of its own (``-L`` with a unique
name, no user config), so tests never see each other's sessions. Every wait
polls the screen against a deadline; a failed wait shows the screen.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from tests.daemon import REPO, wait_for


def last_line(screen: str) -> str:
    """The last non-blank line: where the prompt and what is typed are."""
    lines = [line for line in screen.splitlines() if line.strip()]
    return lines[-1] if lines else ""


class Terminal:
    """``command`` running in a detached ``width`` x ``height`` tmux pane."""

    def __init__(self, workdir: Path, command: Sequence[str], width: int = 120, height: int = 30) -> None:
        self.server = f"ipcd-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.target = "chat"
        config = workdir / f"{self.server}.conf"
        # Set before the program starts, so even an instant exit keeps its pane and status.
        config.write_text("set -g remain-on-exit on\n")
        self._base = ["tmux", "-L", self.server, "-f", str(config)]
        self._env = {k: v for k, v in os.environ.items() if k not in ("TMUX", "TMUX_PANE")}
        self.tmux(
            "new-session", "-d", "-s", self.target, "-x", str(width), "-y", str(height), "-c", str(REPO),
            shlex.join(command),
        )  # fmt: skip

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        kill = [*self._base, "kill-server"]
        subprocess.run(kill, capture_output=True, timeout=10, check=False, env=self._env)

    def tmux(self, *args: str) -> str:
        done = subprocess.run(
            [*self._base, *args], capture_output=True, text=True, timeout=10, check=False, env=self._env
        )
        if done.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    # -- reading -----------------------------------------------------------

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.target)

    def transcript(self) -> str:
        """Everything the pane showed, the lines scrolled off the top included."""
        return self.tmux("capture-pane", "-p", "-S", "-", "-t", self.target)

    def wait_screen(self, predicate: Callable[[str], bool], what: str, timeout: float = 10.0) -> str:
        """The screen once ``predicate`` holds for it."""
        seen = [""]

        def check() -> str | None:
            seen[0] = self.screen()
            return seen[0] if predicate(seen[0]) else None

        try:
            screen: str = wait_for(check, timeout, what)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; the screen shows:\n{seen[0]}") from None
        return screen

    def pane_pid(self) -> int:
        """The pid of the program the pane runs (its first process)."""
        return int(self.tmux("display-message", "-p", "-t", self.target, "#{pane_pid}").strip())

    def wait_text(self, text: str, timeout: float = 10.0) -> str:
        return self.wait_screen(lambda s: text in s, f"{text!r} on the screen", timeout)

    def wait_prompt(self, line: str, timeout: float = 10.0) -> str:
        """Until the last line reads ``line`` (tmux drops trailing blanks)."""
        return self.wait_screen(lambda s: last_line(s) == line.rstrip(), f"the line {line!r}", timeout)

    def exit_status(self, timeout: float = 10.0) -> int:
        """The program's exit code, once it has exited."""

        def status() -> str | None:
            shown = self.tmux("display-message", "-p", "-t", self.target, "#{pane_dead} #{pane_dead_status}")
            dead, _, code = shown.strip().partition(" ")
            if dead == "1" and not code:
                # tmux marks a pane dead when its pty closes, but records the
                # status only when it reaps the child on SIGCHLD; tmux 3.3a was
                # seen to leave it unreaped until another child of the server
                # exits. A trivial job gives it one.
                self.tmux("run-shell", "true")
            return code or None

        try:
            code: str = wait_for(status, timeout, "the program to exit")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; the screen shows:\n{self.screen()}") from None
        return int(code)

    # -- typing ------------------------------------------------------------

    def type(self, text: str) -> None:
        """Type ``text`` literally (no key names), without Enter."""
        self.tmux("send-keys", "-t", self.target, "-l", text)

    def enter(self, text: str = "") -> None:
        if text:
            self.type(text)
        self.key("Enter")

    def key(self, name: str) -> None:
        """Press a named key: ``Enter``, ``C-c``, ``C-d``, ..."""
        self.tmux("send-keys", "-t", self.target, name)
