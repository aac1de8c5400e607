"""What every ipcctl command shares: options, output, errors and exit codes."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
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
)
from ipcd.protocol import ErrorCode

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 69  # EX_UNAVAILABLE
EXIT_TIMEOUT = 75  # EX_TEMPFAIL

F = TypeVar("F", bound=Callable[..., Any])


class Options:
    def __init__(self, socket_dir: Path, json_output: bool, timeout: float) -> None:
        self.socket_dir = socket_dir
        self.json = json_output
        self.timeout = timeout

    def client(self) -> Client:
        return Client(self.socket_dir, self.timeout)

    def datagram_client(self) -> DatagramClient:
        return DatagramClient(self.socket_dir, self.timeout)

    def emit(self, obj: dict[str, Any]) -> None:
        click.echo(json.dumps(obj, sort_keys=True))


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"ipcctl: {message}", err=True)
    sys.exit(code)


def handles_errors(func: F) -> F:
    """Map client exceptions to the documented exit codes, one line each."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DaemonUnreachable as exc:
            fail(str(exc), EXIT_UNREACHABLE)
        except RequestTimeout as exc:
            fail(str(exc), EXIT_TIMEOUT)
        except ServerError as exc:
            if exc.code == ErrorCode.TIMED_OUT:
                fail(f"timed out: {exc.message}", EXIT_TIMEOUT)
            fail(f"the daemon refused: {exc.message} ({exc.code_name})", EXIT_REFUSED)
        except ConnectionLost as exc:
            fail(f"{exc}; retry, and check the daemon's log if it persists", EXIT_UNREACHABLE)
        except ClientError as exc:
            fail(str(exc), EXIT_REFUSED)

    return wrapper  # type: ignore[return-value]


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
        expose_value=False,
        callback=enable,
        help="JSON output, for scripts.",
    )(func)
