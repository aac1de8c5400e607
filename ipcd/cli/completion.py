"""Shell completion from the running daemon: stored names, rooms and nicks.

Theory of operation: click completes commands and options itself; when the
shell asks (it runs ``ipcctl`` with ``_IPCCTL_COMPLETE`` set), click calls a
parameter's ``shell_complete`` callback with the word typed so far. The
callbacks here ask the daemon what exists, with a short timeout so that a
busy daemon never freezes the shell, and return the names that start with
that word. Whatever goes wrong (no daemon, permission denied, a timeout)
they return nothing and print nothing: a completion must never write into
the user's command line. ``ipcctl completion SHELL`` prints the script the
shell sources (the same as click's ``_IPCCTL_COMPLETE=bash_source``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ipcd.client import Client
from ipcd.paths import default_socket_dir

if TYPE_CHECKING:
    from click.shell_completion import CompletionItem

COMPLETE_VAR = "_IPCCTL_COMPLETE"
SHELLS = ("bash", "zsh", "fish")
TIMEOUT = 0.5  # seconds; a shell waiting on a TAB should not wait longer


def _ask(
    ctx: click.Context, incomplete: str, found: Callable[[Client], Iterable[tuple[str, str]]]
) -> list[CompletionItem]:
    """``(name, help)`` pairs from the daemon whose name starts with ``incomplete``."""
    from click.shell_completion import CompletionItem  # noqa: PLC0415 - only completion needs it

    params = ctx.find_root().params
    socket_dir = params.get("socket_dir") or default_socket_dir()
    try:
        with Client(Path(socket_dir), TIMEOUT, daemon_uid=params.get("daemon_uid")) as client:
            pairs = list(found(client))
    except Exception:  # whatever it is: see the module head, a completion fails silently
        return []
    names = sorted({name: text for name, text in pairs if name.startswith(incomplete)}.items())
    return [CompletionItem(name, help=text or None) for name, text in names]


def entry_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Names in the fd store this user may get, with how many fds each holds."""
    return _ask(ctx, incomplete, lambda client: ((e["name"], _fds(e)) for e in client.ls()["entries"]))


def _fds(entry: dict[str, Any]) -> str:
    count = len(entry["fds"])
    return f"{count} fd" if count == 1 else f"{count} fds"


def room_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Rooms that exist now, with their topic."""
    return _ask(ctx, incomplete, lambda client: ((r["room"], r["topic"]) for r in client.rooms()))


def nicks(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Nicks of the people and programs connected now, with their rooms."""
    return _ask(ctx, incomplete, lambda client: ((m["nick"], " ".join(m["rooms"])) for m in client.who()))


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the script that makes SHELL complete ipcctl: commands, options,
    stored names, rooms and nicks. Bash: eval "$(ipcctl completion bash)"
    in ~/.bashrc (zsh: ~/.zshrc; fish: ipcctl completion fish | source)."""
    from click.shell_completion import get_completion_class  # noqa: PLC0415 - only this command needs it

    comp_cls = get_completion_class(shell)
    assert comp_cls is not None  # every shell in SHELLS is one click knows
    click.echo(comp_cls(ctx.find_root().command, {}, "ipcctl", COMPLETE_VAR).source())
