"""``ipcd``: run the daemon.

Exit codes: 0 stopped cleanly; 1 could not start (socket dir unsafe,
already running, ...); 2 usage or configuration error; 3 workers kept
failing to boot.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ipcd import __version__
from ipcd.log import setup_logging
from ipcd.paths import DEFAULT_SOCKET_DIR, SOCKET_DIR_ENV, default_socket_dir
from ipcd.settings import OPTIONS, Settings, SettingsError, load_settings
from ipcd.units import install_units

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


_CONFIG = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="IPCD_CONFIG",
    show_envvar=True,
    help="TOML file of settings; re-read on SIGHUP.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ipcd")
def cli() -> None:
    """ipcd: a local IPC daemon (echo, chat, fd hand-off) on Unix sockets.

    Settings come from flags, else IPCD_* environment variables, else the
    --config TOML file (keys named like the flags), else defaults.
    """


@cli.command()
@_CONFIG
@settings_options
def serve(config_file: Path | None, **overrides: Any) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT.

    Ready when DIR/stream.sock and DIR/dgram.sock accept. SIGHUP re-reads
    the configuration and replaces the workers (old ones drain).
    """
    from ipcd.server.master import Master, StartupError  # noqa: PLC0415 - keep --help fast

    settings = _load(overrides, config_file)
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


def _load(overrides: dict[str, Any], config_file: Path | None) -> Settings:
    """Settings, or exit 2 with one line saying which one is wrong."""
    if overrides.get("state_dir") is None and os.environ.get("IPCD_STATE_DIR") == "":
        overrides["state_dir"] = ""  # click skips an empty variable; this one means "no state file"
    try:
        return load_settings(overrides, config_file)
    except SettingsError as exc:
        click.echo(f"ipcd: {exc}", err=True)
        sys.exit(2)


def _pidfile(given: Path | None, socket_dir: Path | None = None) -> Path:
    """--pidfile, else <socket dir>/ipcd.pid (the same rule for start, stop, status)."""
    return (given or (socket_dir or default_socket_dir()) / "ipcd.pid").absolute()


_PIDFILE = click.option(
    "--pidfile",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Pidfile (default: <socket dir>/ipcd.pid).",
)


@cli.command()
@_CONFIG
@_PIDFILE
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Log here once detached (default: the journal if there is one, else <socket dir>/ipcd.log).",
)
@settings_options
def start(config_file: Path | None, pidfile: Path | None, log_file: Path | None, **overrides: Any) -> None:
    """Start the daemon in the background (python-daemon).

    Everything that can fail is checked before detaching, so errors show
    here; then it detaches (unless already under a service manager) and
    keeps only its sockets, lock and log file open.
    """
    import daemon  # noqa: PLC0415 - python-daemon, only needed here

    from ipcd.daemonize import PidFile, PidFileError  # noqa: PLC0415
    from ipcd.log import JOURNAL_SOCKET  # noqa: PLC0415
    from ipcd.server.master import Master, StartupError  # noqa: PLC0415

    settings = _load(overrides, config_file)
    pid_path = _pidfile(pidfile, settings.socket_dir)
    pid_guard = PidFile(pid_path)
    master = Master(settings, overrides)
    try:
        pid_guard.check()
        master.bind()
    except (PidFileError, StartupError) as exc:
        click.echo(f"ipcd: {exc}", err=True)
        sys.exit(1)
    journal = log_file is None and os.path.exists(JOURNAL_SOCKET)
    log_path = None if journal else (log_file or settings.socket_dir / "ipcd.log")
    log_stream = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115 - lives as long as the daemon
    where = f"to {log_path}" if log_path else "to the journal (journalctl -t ipcd)"
    click.echo(f"ipcd: starting in the background; pidfile {pid_path}, logging {where}", err=True)
    context = daemon.DaemonContext(
        pidfile=pid_guard,
        files_preserve=[*master.preserved_fds(), *([log_stream.fileno()] if log_stream else [])],
        umask=0o022,
        working_directory="/",
        stdout=log_stream,
        stderr=log_stream,
    )
    with context:
        setup_logging(settings.log_level, log_stream, journal=journal)
        code = master.run()
    sys.exit(code)


_SOCKET_DIR = click.option(
    "--socket-dir",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    default=None,
    envvar=SOCKET_DIR_ENV,
    show_envvar=True,
    help=f"The daemon's socket dir, where the default pidfile is (default {DEFAULT_SOCKET_DIR}).",
)

# LSB init-script status codes: 0 running, 1 dead but the pidfile remains,
# 3 not running, 4 unknown (we may not ask).
STATUS_RUNNING, STATUS_DEAD_PIDFILE, STATUS_NOT_RUNNING, STATUS_UNKNOWN = 0, 1, 3, 4


@cli.command()
@_PIDFILE
@_SOCKET_DIR
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    metavar="SECS",
    default=30.0,
    show_default=True,
    help="Seconds to wait for it to exit.",
)
def stop(pidfile: Path | None, socket_dir: Path | None, timeout: float) -> None:
    """Stop the daemon started with 'ipcd start' (SIGTERM, then wait)."""
    from ipcd.daemonize import stop as stop_daemon  # noqa: PLC0415

    code, message = stop_daemon(_pidfile(pidfile, socket_dir), timeout)
    click.echo(f"ipcd: {message}", err=code != 0)
    sys.exit(code)


@cli.command()
@_PIDFILE
@_SOCKET_DIR
def status(pidfile: Path | None, socket_dir: Path | None) -> None:
    """Whether the daemon runs, as LSB init scripts say it: exit 0 running,
    1 not running but its pidfile remains, 3 not running, 4 cannot tell
    (for example permission denied on its socket)."""
    import errno  # noqa: PLC0415

    from ipcd.client import (  # noqa: PLC0415
        Client,
        ClientError,
        DaemonUnreachable,
        RequestTimeout,
        UntrustedDaemon,
    )
    from ipcd.daemonize import is_ipcd, read_pid  # noqa: PLC0415

    directory = socket_dir or default_socket_dir()
    path = _pidfile(pidfile, directory)
    try:
        pid = read_pid(path)
    except OSError:  # not ours to read: the socket below tells what we may know
        pid = None
    try:
        with Client(directory, timeout=5) as client:
            doc = client.status()
    except ClientError as exc:
        live = pid is not None and is_ipcd(pid)
        if isinstance(exc, UntrustedDaemon) or (
            isinstance(exc, DaemonUnreachable) and exc.errno == errno.EACCES
        ):
            owner = f" (pidfile {path} names a live ipcd, pid {pid})" if live else ""
            click.echo(f"ipcd status unknown{owner}: {exc}", err=True)
            sys.exit(STATUS_UNKNOWN)
        if live or isinstance(exc, RequestTimeout):
            click.echo(f"ipcd status unknown: pidfile {path} names pid {pid}, but {exc}", err=True)
            sys.exit(STATUS_UNKNOWN)
        if pid is not None:
            click.echo(f"ipcd is not running, but pidfile {path} names pid {pid} (stale): {exc}")
            sys.exit(STATUS_DEAD_PIDFILE)
        click.echo(f"ipcd is not running: {exc}")
        sys.exit(STATUS_NOT_RUNNING)
    click.echo(
        f"ipcd is running: master pid {doc['pid']}, {len(doc['workers'])} workers, "
        f"{doc['totals']['connections']} connections, up {doc['uptime']:.0f}s, on {directory}"
    )
    sys.exit(STATUS_RUNNING)


cli.add_command(install_units)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
