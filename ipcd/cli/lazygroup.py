"""A click group that imports a command's module only when it is needed.

Theory of operation: scripts call ``ipcctl`` in loops, so start-up time is
the cost of every call, and most of it is imports. ``ipcctl echo`` should
not pay for the chat UI or the hand-off commands. The group is given a table
``name -> "module:attribute"``; :meth:`LazyGroup.get_command` imports the
module the first time the command is resolved, which click does only for
the command being run -- or for every command when it lists them (``--help``
and completing a command name), where the cost does not matter.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import click


class LazyGroup(click.Group):
    def __init__(self, *args: Any, lazy_commands: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_commands and cmd_name not in self.commands:
            self.add_command(self._load(cmd_name), cmd_name)
        return super().get_command(ctx, cmd_name)

    def _load(self, cmd_name: str) -> click.Command:
        module_name, _, attribute = self.lazy_commands[cmd_name].partition(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{self.lazy_commands[cmd_name]} is not a click command")
        return command
