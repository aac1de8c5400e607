"""Every --help reads as prose for people: no reStructuredText markup and no
click type names (FLOAT RANGE, DIRECTORY, ...) where a metavar should say
what the value is."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from ipcd.cli.ipcd import cli as ipcd_cli

RAW = re.compile(r"``|:class:|:func:|\b(?:FLOAT RANGE|INTEGER RANGE|FLOAT|INTEGER|DIRECTORY|BOOLEAN)\b")


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    context = click.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        if isinstance(command, click.Group):
            paths += _commands(command, (*prefix, name))
        elif command is not None:
            paths.append((*prefix, name))
    return paths


@pytest.mark.parametrize("path", _commands(ipcd_cli), ids=lambda p: " ".join(("ipcd", *p)))
def test_ipcd_help_has_no_raw_markup_or_type_names(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(ipcd_cli, [*path, "--help"], prog_name="ipcd")
    assert result.exit_code == 0, result.output
    found = sorted({m.group(0) for m in RAW.finditer(result.output)})
    assert not found, f"ipcd {' '.join(path)} --help shows {found}:\n{result.output}"


# An option followed by click's name for its type instead of a metavar.
RAW_OPTION = re.compile(
    r"--[\w-]+ (?:TEXT|FLOAT RANGE|INTEGER RANGE|FLOAT|INTEGER|DIRECTORY|PATH|FILENAME)\b"
)


def _ipcctl() -> click.Group:
    from ipcd.cli.ipcctl import cli  # noqa: PLC0415 - a LazyGroup: every command is loaded below

    return cli


@pytest.mark.parametrize("path", _commands(_ipcctl()), ids=lambda p: " ".join(("ipcctl", *p)))
def test_ipcctl_help_has_no_raw_markup_or_type_names(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(_ipcctl(), [*path, "--help"], prog_name="ipcctl")
    assert result.exit_code == 0, result.output
    found = sorted({m.group(0) for m in (*RAW.finditer(result.output), *RAW_OPTION.finditer(result.output))})
    assert not found, f"ipcctl {' '.join(path)} --help shows {found}:\n{result.output}"
