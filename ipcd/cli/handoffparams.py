"""How ``ipcctl put | get | take`` read their command lines, and the hints
they give when a user's line does not do what it looks like.

- ``AtLeast``: a number with a floor, shown in ``--help`` as SECS or N
  rather than click's raw ``FLOAT RANGE`` and ``[x>=0]``;
- ``RunsCommand``: in ``ipcctl get web sh -c CMD`` click reads ``-c`` as an
  option of get; the error says to put ``--`` before the command, and shows
  the line so;
- ``not_open_hint``: ``put --fd N`` of an fd that is not there is most
  often one the parent opened close-on-exec (Python's default), so exec
  closed it; the parent's ``/proc`` fdinfo says whether that is so.
"""

from __future__ import annotations

import functools
import os
import shlex
from typing import Any

import click

from ipcd.cli.common import fail
from ipcd.protocol.fields import SECONDS_MAX

# The largest whole number an option takes: a C int (an fd, a backlog), so
# that a number of 20 digits is a usage error, not an OverflowError.
INT_OPTION_MAX = 2**31 - 1


class AtLeast(click.ParamType):  # type: ignore[type-arg]
    """A number of at least ``minimum``, shown in --help by its metavar
    (SECS, N) rather than click's FLOAT RANGE and [x>=0]. Finite, and at
    most what the daemon takes (seconds) or a C int holds (whole numbers)."""

    def __init__(self, number: type[int] | type[float], minimum: float, metavar: str) -> None:
        self.number = number
        self.minimum = minimum
        self.maximum = SECONDS_MAX if number is float else INT_OPTION_MAX
        self.metavar = metavar
        self.name = metavar.lower()

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return self.metavar

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        what = "a number of seconds" if self.metavar == "SECS" else "a whole number"
        try:
            number = self.number(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not {what}", param, ctx)
        if not number >= self.minimum:  # also refuses nan
            self.fail(f"{value} is not {what} >= {self.minimum:g}", param, ctx)
        if not number <= self.maximum:  # inf too
            self.fail(f"{value} is not {what} up to {self.maximum:.0f}", param, ctx)
        return number


SECS = functools.partial(AtLeast, float, metavar="SECS")


def socket_mode(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        mode = int(value, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise click.BadParameter(f"{value!r} is not an octal file mode like 0660")
    return mode


def not_open_hint(fd: int) -> str:
    """Why inherited fd ``fd`` is missing, and what to do: most often the
    parent opened it close-on-exec (Python's default), so exec closed it."""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/fdinfo/{fd}") as fh:
            flags = int(next(line for line in fh if line.startswith("flags:")).split()[1], 8)
        with open(f"/proc/{parent}/comm") as fh:
            who = f"{fh.read().strip()}, pid {parent}"
    except (OSError, ValueError, IndexError, StopIteration):
        flags = None
    python = f"Python: subprocess pass_fds=({fd},), or os.set_inheritable({fd}, True) before exec"
    shell = f"shell: ipcctl put NAME --fd {fd} {fd}<FILE"
    instead = "or let ipcctl open it (put NAME PATH, put NAME --listen ADDRESS)"
    if flags is not None and flags & os.O_CLOEXEC:
        return (
            f"fd {fd} is not open in ipcctl: its parent ({who}) opened it close-on-exec (O_CLOEXEC, "
            f"Python's default), so exec closed it; pass it on ({python}; {shell}), {instead}"
        )
    if flags is not None:
        return f"fd {fd} is not open in ipcctl: its parent ({who}) did not pass it ({python}), {instead}"
    return (
        f"fd {fd} is not open in ipcctl: pass one it inherits ({python}; {shell}); an fd opened "
        f"close-on-exec, Python's default, is closed at exec; {instead}"
    )


class RunsCommand(click.Command):
    """get and take: ``ipcctl get web sh -c CMD`` makes click read ``-c`` as
    an option of get. Say to put ``--`` before the command, with the line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        given = list(args)  # click's parser consumes ``args``
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            start = self._command_start(given, exc.option_name)
            if start is None:
                raise
            line = shlex.join(["ipcctl", self.name or "get", *given[:start], "--", *given[start:]])
            fail(f"{exc.option_name} is not an option of {self.name}; put -- before the command: {line}", 2)

    def _command_start(self, args: list[str], unknown: str) -> int | None:
        """Where the command's first word is in ``args``, if one comes before
        the unknown option (the first word after NAME that is no option of ours)."""
        valued = {opt for p in self.params if isinstance(p, click.Option) and not p.is_flag for opt in p.opts}
        positionals, index = 0, 0
        while index < len(args):
            word = args[index]
            if word in ("--", unknown) or word.startswith(unknown + "="):
                return None
            if word.startswith("-") and word != "-":
                index += 2 if word in valued else 1
                continue
            positionals += 1
            if positionals == 2:
                return index
            index += 1
        return None
