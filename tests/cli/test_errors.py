"""What ipcctl says when something goes wrong: one line on stderr, as text,
or with ``--json`` (before or after the command) one JSON object,
``{"error": {"code", "message", "exit_status"}}``, with the exit status of
the contract (1 refused, 2 usage, 69 unreachable, 75 timed out)."""

from __future__ import annotations

import json
import pwd
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ipcd.cli.ipcctl import main
from tests.daemon import Daemon, ipcctl, run_cli_as


def json_error(result: subprocess.CompletedProcess[str], exit_status: int, code: str) -> dict[str, Any]:
    """The one JSON error line of ``result``, checked against its exit status."""
    assert result.returncode == exit_status, result
    assert result.stdout == "", result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    doc = json.loads(lines[0])
    assert list(doc) == ["error"], doc
    error: dict[str, Any] = doc["error"]
    assert sorted(error) == ["code", "exit_status", "message"], error
    assert (error["code"], error["exit_status"]) == (code, exit_status), error
    assert error["message"], error
    assert not error["message"].startswith("ipcctl:"), error
    return error


@pytest.mark.parametrize("where", ["global", "command"])
def test_a_refusal_is_one_json_object_exit_1(daemon: Daemon, where: str) -> None:
    args = ["--json", "rm", "ghost"] if where == "global" else ["rm", "ghost", "--json"]
    error = json_error(ipcctl(daemon.socket_dir, *args), 1, "NOT_FOUND")
    assert "ghost" in error["message"]


def test_without_json_a_refusal_stays_one_line_of_text(daemon: Daemon) -> None:
    result = ipcctl(daemon.socket_dir, "rm", "ghost")
    assert result.returncode == 1
    assert result.stderr.startswith("ipcctl: the daemon refused: ")
    assert len(result.stderr.splitlines()) == 1


def test_unreachable_is_json_exit_69(short_tmp: Path) -> None:
    error = json_error(ipcctl(short_tmp / "nobody-here", "--json", "status"), 69, "UNREACHABLE")
    assert "is ipcd running?" in error["message"]


def test_a_wait_that_runs_out_is_json_exit_75(daemon: Daemon) -> None:
    error = json_error(ipcctl(daemon.socket_dir, "get", "never", "--wait", "0.2", "--json"), 75, "TIMED_OUT")
    assert "'never' was not put in time" in error["message"]


def test_a_daemon_that_does_not_answer_is_json_exit_75(short_tmp: Path) -> None:
    """A socket that accepts (the kernel's backlog) but never answers."""
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with mute:
        mute.bind(str(short_tmp / "stream.sock"))
        mute.listen()
        result = ipcctl(short_tmp, "--json", "--timeout", "0.2", "echo", "hello?")
    error = json_error(result, 75, "TIMED_OUT")
    assert "--timeout" in error["message"]


def test_our_own_usage_errors_are_json_exit_2(daemon: Daemon) -> None:
    error = json_error(ipcctl(daemon.socket_dir, "--json", "chat"), 2, "USAGE")  # no terminal here
    assert "ipcctl listen" in error["message"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--json", "ping", "-c", "0"], "'-c' / '--count'"),  # a bad option value
        (["rm", "--json"], "Missing argument 'NAME'"),  # --json after the command, argument missing
        (["get", "x", "--wait", "soon", "--json"], "'--wait'"),  # the bad value comes before --json
        (["--json", "no-such-command"], "No such command"),
        (["--timeout", "never", "--json", "status"], "'--timeout'"),  # a bad global option
    ],
)
def test_click_usage_errors_are_json_with_json(daemon: Daemon, args: list[str], says: str) -> None:
    error = json_error(ipcctl(daemon.socket_dir, *args), 2, "USAGE")
    assert says in error["message"]
    assert "--help" in error["message"]


def test_without_json_click_usage_errors_look_as_click_shows_them(daemon: Daemon) -> None:
    result = ipcctl(daemon.socket_dir, "ping", "-c", "0")
    assert result.returncode == 2
    assert result.stderr.startswith("Usage: ipcctl ping [OPTIONS]")
    assert result.stderr.splitlines()[-1].startswith("Error: Invalid value for '-c' / '--count'")


def test_help_documents_the_json_errors() -> None:
    result = ipcctl(Path("/nonexistent"), "--help")
    assert result.returncode == 0
    assert '{"error": {"code": "NOT_FOUND", "exit_status": 1, "message": "..."}}' in result.stdout
    assert "130 interrupted" in result.stdout


# -- permission denied, said once -------------------------------------------------


def run_as(uid: int, gid: int, argv: list[str]) -> tuple[int, str]:
    """ipcctl's main() as another user: its exit status and stderr."""

    def run(args: list[str]) -> None:
        sys.argv = ["ipcctl", *args]
        main()

    code, _, stderr = run_cli_as(uid, gid, run, argv)
    return code, stderr


@pytest.fixture
def nobody() -> pwd.struct_passwd:
    return pwd.getpwnam("nobody")


@pytest.mark.parametrize("json_output", [False, True])
def test_permission_denied_is_said_once(
    socket_dir: Path, short_tmp: Path, nobody: pwd.struct_passwd, json_output: bool
) -> None:
    short_tmp.chmod(0o755)  # the way in is open; only the socket's own mode keeps nobody out
    daemon = Daemon(socket_dir, "--socket-mode", "0600", workers=1).start()
    try:
        argv = ["--socket-dir", str(socket_dir), *(["--json"] if json_output else []), "status"]
        code, stderr = run_as(nobody.pw_uid, nobody.pw_gid, argv)
    finally:
        assert daemon.stop() == 0
    expected = (
        f"cannot connect to {daemon.stream_path}: Permission denied; "
        "ask the admin for access (the daemon's --socket-mode and --socket-group)"
    )
    assert expected.lower().count("permission denied") == 1  # once
    if json_output:
        assert code == 69
        assert json.loads(stderr) == {
            "error": {"code": "UNREACHABLE", "exit_status": 69, "message": expected}
        }
    else:
        assert (code, stderr) == (69, f"ipcctl: {expected}\n")


# -- help that reads as text --------------------------------------------------------


def test_no_help_shows_raw_markup() -> None:
    """Docstrings are reST for the docs' sake; ``--help`` is for people."""
    import click  # noqa: PLC0415

    from ipcd.cli.ipcctl import cli  # noqa: PLC0415

    for name in ["", *cli.list_commands(click.Context(cli))]:  # lazily loaded ones too
        result = ipcctl(Path("/nonexistent"), *([name] if name else []), "--help")
        assert result.returncode == 0, result
        for markup in ("``", ":class:", ":func:", ":meth:", "INTEGER RANGE", "FLOAT RANGE"):
            assert markup not in result.stdout, f"ipcctl {name} --help shows {markup!r}:\n{result.stdout}"
    listen = ipcctl(Path("/nonexistent"), "listen", "--help").stdout
    assert '("[room] nick: text")' in listen
