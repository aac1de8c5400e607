"""``ipcd``: run the daemon.

Exit codes: 0 stopped cleanly; 1 could not start (socket dir unsafe,
already running, ...); 2 usage or configuration error; 3 workers kept
failing to boot.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ipcd import __version__
from ipcd.log import setup_logging
from ipcd.settings import OPTIONS, SettingsError, load_settings

F = TypeVar("F", bound=Callable[..., Any])


def settings_options(func: F) -> F:
    """One click option per setting in ipcd.settings.OPTIONS (flag, then
    IPCD_* variable; the config file and defaults fill in the rest)."""
    for spec in reversed(OPTIONS):
        func = click.option(
            spec.flag,
            spec.name,
            metavar=spec.metavar,
            envvar=spec.envvar,
            show_envvar=True,
            default=None,
            help=spec.help,
        )(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ipcd")
def cli() -> None:
    """ipcd: a local IPC daemon (echo, chat, fd hand-off) on Unix sockets.

    Settings come from flags, else IPCD_* environment variables, else the
    --config TOML file (keys named like the flags), else defaults.
    """


@cli.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="IPCD_CONFIG",
    show_envvar=True,
    help="TOML file of settings; re-read on SIGHUP.",
)
@settings_options
def serve(config_file: Path | None, **overrides: Any) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT.

    Ready when DIR/stream.sock and DIR/dgram.sock accept. SIGHUP re-reads
    the configuration and replaces the workers (old ones drain).
    """
    from ipcd.server.master import Master, StartupError  # noqa: PLC0415 - keep --help fast

    try:
        settings = load_settings(overrides, config_file)
    except SettingsError as exc:
        click.echo(f"ipcd: {exc}", err=True)
        sys.exit(2)
    setup_logging(settings.log_level)
    master = Master(settings, overrides)
    try:
        code = master.run()
    except StartupError as exc:
        click.echo(f"ipcd: {exc}", err=True)
        sys.exit(1)
    if master.error:
        click.echo(f"ipcd: {master.error}", err=True)
    sys.exit(code)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
