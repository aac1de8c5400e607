"""The README's shell sessions as data: what to run and what it must print.

Theory of operation: a fenced block whose lines start with ``$ `` is a
terminal session. Each ``$`` line is a command, and the lines up to the next
one are what it prints (stdout and stderr, as a terminal shows them). A
``...`` line stands for any number of lines. Output is compared after
:func:`normalize`: every number becomes ``N`` and runs of blanks one space,
so pids, times and sizes may differ but words, paths, columns and the shape
of JSON may not. An HTML comment ``<!-- readme-test: KIND -->`` right before
a block says how to run it:

- ``background``: the one command keeps running (a listener) while the next
  block runs; what it printed is checked after that block.
- ``start-log`` / ``stop-log``: the block shows the daemon's log at start
  and at stop; it is compared with the log the test daemon wrote.
- ``skip``: not run (needs sudo, or another host).

Pure text processing, tested on its own in test_readme.py.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

ELLIPSIS = "..."
_MARKER = re.compile(r"<!--\s*readme-test:\s*([a-z-]+)\s*-->")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_BLANKS = re.compile(r"\s+")


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    line: str  # what follows "$ "
    expected: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Block:
    kind: str  # "session", "background", "start-log", "stop-log" or "skip"
    commands: tuple[Command, ...]
    lines: tuple[str, ...]  # the block's text, for log blocks
    first_line: int  # 1-based, in the README, for messages


def parse(text: str) -> list[Block]:
    """Every fenced block that holds a ``$`` line or carries a marker."""
    blocks: list[Block] = []
    kind = "session"
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        marker = _MARKER.search(line)
        if marker:
            kind = marker.group(1)
        elif line.startswith("```"):
            start = index + 1
            end = start
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            body = lines[start:end]
            if kind != "session" or any(b.startswith("$ ") for b in body):
                blocks.append(Block(kind, _commands(body), tuple(body), start + 1))
            kind = "session"
            index = end
        elif line.strip():
            kind = "session"  # a marker applies to the block right after it only
        index += 1
    return blocks


def _commands(body: Sequence[str]) -> tuple[Command, ...]:
    commands: list[Command] = []
    current: str | None = None
    output: list[str] = []
    for line in body:
        if line.startswith("$ "):
            if current is not None:
                commands.append(Command(current, tuple(output)))
            current, output = line[2:], []
        elif current is not None:
            output.append(line)
    if current is not None:
        commands.append(Command(current, tuple(output)))
    return tuple(commands)


def normalize(line: str) -> str:
    return _BLANKS.sub(" ", _NUMBER.sub("N", line)).strip()


def matches(expected: Sequence[str], actual: Sequence[str]) -> bool:
    """Whether ``actual`` lines fit ``expected`` (``...`` = any lines)."""
    want = [normalize(line) for line in expected]
    got = [normalize(line) for line in actual]
    memo: dict[tuple[int, int], bool] = {}

    def fit(i: int, j: int) -> bool:
        if (i, j) not in memo:
            if i == len(want):
                memo[i, j] = j == len(got)
            elif want[i] == ELLIPSIS:
                memo[i, j] = fit(i + 1, j) or (j < len(got) and fit(i, j + 1))
            else:
                memo[i, j] = j < len(got) and want[i] == got[j] and fit(i + 1, j + 1)
        return memo[i, j]

    return fit(0, 0)
