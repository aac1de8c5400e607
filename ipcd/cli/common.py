"""What every ipcctl command shares: options, output, errors and exit codes.

Errors are reported in one place each: :func:`handles_errors` maps the
client's exceptions (and Ctrl-C) to exit codes, :func:`fail` prints the one
line, and :func:`run` (ipcctl's entry point) catches what click itself
raises -- usage errors and interrupts outside a command -- so that every
error has the same two forms: ``ipcctl: what happened; what to do`` on
stderr, or with ``--json`` one object on one line of stderr::

    {"error": {"code": "NOT_FOUND", "exit_status": 1, "message": "..."}}

``code`` is the daemon's error code name for a refusal (``NOT_FOUND``,
``PERMISSION_DENIED``, ...), or one of ``USAGE``, ``UNREACHABLE``,
``UNTRUSTED`` (what listens may be an impostor: exit 69, nothing was sent),
``TIMED_OUT``, ``CONNECTION_LOST``, ``FAILED`` (a local failure, such as a
file that cannot be opened) and ``EXEC_FAILED``. An interrupt (Ctrl-C) is
not an error: it exits 130 and prints nothing more.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from ipcd.client import (
    Client,
    ClientError,
    ConnectionLost,
    DaemonUnreachable,
    DatagramClient,
    RequestTimeout,
    ServerError,
    UntrustedDaemon,
)
from ipcd.protocol import ErrorCode

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 69  # EX_UNAVAILABLE
EXIT_TIMEOUT = 75  # EX_TEMPFAIL
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

# The JSON ``code`` of an error that has no daemon error code, by exit status.
_CODES = {
    EXIT_REFUSED: "FAILED",
    EXIT_USAGE: "USAGE",
    EXIT_UNREACHABLE: "UNREACHABLE",
    EXIT_TIMEOUT: "TIMED_OUT",
    126: "EXEC_FAILED",
    127: "EXEC_FAILED",
}

F = TypeVar("F", bound=Callable[..., Any])


class Options:
    def __init__(
        self, socket_dir: Path, json_output: bool, timeout: float, daemon_uid: int | None = None
    ) -> None:
        self.socket_dir = socket_dir
        self.json = json_output
        self.timeout = timeout
        self.daemon_uid = daemon_uid  # None: the socket dir's owner

    def client(self) -> Client:
        return Client(self.socket_dir, self.timeout, daemon_uid=self.daemon_uid)

    def datagram_client(self) -> DatagramClient:
        return DatagramClient(self.socket_dir, self.timeout, daemon_uid=self.daemon_uid)

    def emit(self, obj: dict[str, Any]) -> None:
        click.echo(json.dumps(obj, sort_keys=True))


def _json_wanted() -> bool:
    ctx = click.get_current_context(silent=True)
    options = ctx.find_object(Options) if ctx is not None else None
    return options is not None and options.json


def report(message: str, exit_status: int, code: str | None = None, as_json: bool = False) -> None:
    """Print one error, as text or as one JSON object, on stderr."""
    if as_json:
        error: dict[str, Any] = {
            "code": code or _CODES.get(exit_status, "FAILED"),
            "message": message,
            "exit_status": exit_status,
        }
        click.echo(json.dumps({"error": error}, sort_keys=True, ensure_ascii=False), err=True)
    else:
        click.echo(f"ipcctl: {message}", err=True)


def fail(message: str, code: int, name: str | None = None) -> NoReturn:
    """Report an error and exit with status ``code``; ``name`` is its JSON
    code (by default the one that goes with the exit status)."""
    report(message, code, name, _json_wanted())
    sys.exit(code)


def interrupted() -> NoReturn:
    """Ctrl-C: leave quietly with 130 (whatever was to be shown is shown)."""
    sys.exit(EXIT_INTERRUPTED)


def handles_errors(func: F) -> F:
    """Map client exceptions to the documented exit codes, one line each,
    and Ctrl-C to 130 without a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            interrupted()
        except DaemonUnreachable as exc:
            fail(str(exc), EXIT_UNREACHABLE)
        except UntrustedDaemon as exc:
            # Not the daemon refusing: no daemon we may trust is reachable there.
            fail(str(exc), EXIT_UNREACHABLE, "UNTRUSTED")
        except RequestTimeout as exc:
            fail(str(exc), EXIT_TIMEOUT)
        except ServerError as exc:
            if exc.code == ErrorCode.TIMED_OUT:
                fail(f"timed out: {exc.message}", EXIT_TIMEOUT)
            fail(f"the daemon refused: {exc.message} ({exc.code_name})", EXIT_REFUSED, exc.code_name)
        except ConnectionLost as exc:
            if exc.code == ErrorCode.OVER_BUDGET:  # a refusal that closes: its message says what to do
                fail(f"the daemon refused: {exc} ({exc.code_name})", EXIT_REFUSED, exc.code_name)
            # A reload's notice already says what to do (reconnect); others do not.
            advice = "" if "reconnect" in str(exc) else "; retry, and check the daemon's log if it persists"
            fail(f"{exc}{advice}", EXIT_UNREACHABLE, exc.code_name or "CONNECTION_LOST")
        except ClientError as exc:
            fail(str(exc), EXIT_REFUSED)

    return wrapper  # type: ignore[return-value]


def run(group: click.Group, args: Sequence[str] | None = None) -> NoReturn:
    """Run ``group`` as a program: what click would do in its standalone
    mode, except that an interrupt exits 130 without "Aborted!" and that,
    with ``--json``, click's own usage errors are JSON too."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        result = group.main(argv, prog_name="ipcctl", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click made Ctrl-C an Abort
        interrupted()
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        options = ctx.find_object(Options) if ctx is not None else None
        before_command_args = argv[: argv.index("--")] if "--" in argv else argv
        if (options is not None and options.json) or "--json" in before_command_args:
            message = exc.format_message()
            if ctx is not None:
                message += f"; see '{ctx.command_path} --help'"
            report(message, exc.exit_code, "USAGE" if exc.exit_code == EXIT_USAGE else None, as_json=True)
        else:
            exc.show()
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        # The reader of our stdout left (``ipcctl listen | head -1``): stop
        # quietly, and keep the interpreter's final flush from failing too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)


pass_options = click.make_pass_decorator(Options)


def json_option(func: F) -> F:
    """``--json`` after the command too (``ipcctl status --json``), the same
    as the global ``ipcctl --json status``."""

    def enable(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        options = ctx.find_object(Options)
        if value and options is not None:
            options.json = True

    return click.option(
        "--json",
        "json_flag",
        is_flag=True,
        is_eager=True,  # before the others: their usage errors are then JSON too
        expose_value=False,
        callback=enable,
        help="JSON output, for scripts.",
    )(func)
