"""``ipcd install-units``: write systemd units for this installation.

Theory of operation: the files in the repository's ``systemd/`` directory are
templates with three placeholders. ``@PYTHON@`` becomes the absolute path of the
running interpreter, because ``ExecStart=`` needs one and only the interpreter
that runs this command is sure to import ipcd; the templates start it with
``-I`` (isolated mode), so no folder named ``ipcd`` in the service's working
directory (a user service runs in the home, where clones live) can shadow the
package. The path is made absolute but
symlinks are kept: a virtualenv's ``bin/python`` is a symlink, and what makes
it the virtualenv's is that path, not its target. ``@SOCKET_DIR@`` becomes the
socket dir (``/tmp/ipcd`` for the system manager, ``%t/ipcd``, i.e.
``$XDG_RUNTIME_DIR/ipcd``, for a user manager). ``@HOME_PATHS@`` becomes one
``BindReadOnlyPaths=`` line for each part of this installation (interpreter,
virtualenv, ipcd itself) under /home, /root or /run/user: the system unit hides
those with ``ProtectHome=tmpfs`` and lets the daemon see only what it runs.
Nothing is enabled or started here; the command says what to run next.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Final

import click

from ipcd.paths import DEFAULT_SOCKET_DIR, DGRAM_SOCKET, SOCKET_DIR_ENV, STREAM_SOCKET

TEMPLATE_DIR: Final = Path(__file__).resolve().parent.parent / "systemd"
SYSTEM_UNIT_DIR: Final = Path("/etc/systemd/system")
TMPFILES_PATH: Final = Path("/etc/tmpfiles.d/ipcd.conf")
USER_SOCKET_DIR: Final = "%t/ipcd"
UNITS: Final = ("ipcd.socket", "ipcd.service")
TMPFILES_TEMPLATE: Final = "ipcd-tmpfiles.conf"

# What ProtectHome= hides, and what PrivateTmp= replaces: an installation
# there (a virtualenv in a home, or a checkout under /tmp) is bound back in.
_HOME_ROOTS: Final = ("/home", "/root", "/run/user", "/tmp", "/var/tmp")
_SUN_PATH_MAX: Final = 107  # sockaddr_un.sun_path holds 108 bytes with the NUL
_PLACEHOLDER: Final = re.compile(r"@[A-Z_]+@")
_UNSAFE: Final = re.compile(r"[\s\"'\\;$]")


class UnitsError(click.ClickException):
    """The units cannot be written; the message says why and what to do."""


@dataclasses.dataclass(frozen=True, slots=True)
class UnitFile:
    path: Path
    text: str


def python_path() -> str:
    """The running interpreter, absolute but with symlinks kept (see above)."""
    if not sys.executable:
        raise UnitsError("cannot tell which interpreter runs ipcd (sys.executable is empty)")
    return os.path.abspath(sys.executable)


def home_paths() -> list[str]:
    """The parts of this installation that live where ProtectHome= hides
    them, symlinks resolved, none inside another."""
    package_root = Path(__file__).resolve().parent.parent  # a source checkout, or site-packages
    candidates = {
        sys.prefix,
        sys.exec_prefix,
        sys.base_prefix,
        sys.base_exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
        str(package_root),
    }
    real = {os.path.realpath(path) for path in candidates}
    hidden = {p for p in real if any(p == root or p.startswith(root + "/") for root in _HOME_ROOTS)}
    outermost = sorted(p for p in hidden if not any(p.startswith(q + "/") for q in hidden))
    for path in outermost:
        if _UNSAFE.search(path):
            raise UnitsError(f"{path} holds ipcd's interpreter but its name cannot go into a unit file")
    return outermost


def _home_lines(paths: list[str]) -> str:
    if not paths:
        return "# Nothing of this installation lives under /home, /root, /run/user or /tmp."
    return "\n".join(f"BindReadOnlyPaths={path}" for path in paths)


def check_socket_dir(socket_dir: str) -> str:
    """The socket dir as it goes into the units: an absolute path, or one
    starting with a systemd specifier such as ``%t``; no characters that
    unit-file or tmpfiles syntax would read differently."""
    if _UNSAFE.search(socket_dir):
        raise UnitsError(f"socket dir {socket_dir!r}: no whitespace, quotes, backslashes, ';' or '$' please")
    if socket_dir.startswith("%"):
        return socket_dir.rstrip("/")
    if not socket_dir.startswith("/"):
        raise UnitsError(f"socket dir {socket_dir!r} must be an absolute path (or start with %t)")
    normal = os.path.normpath(socket_dir)
    longest = max(len(os.fsencode(f"{normal}/{name}")) for name in (STREAM_SOCKET, DGRAM_SOCKET))
    if longest > _SUN_PATH_MAX:
        raise UnitsError(
            f"socket dir {normal} is too long: socket paths are limited to {_SUN_PATH_MAX} bytes"
        )
    return normal


def render(template: str, python: str, socket_dir: str, home: list[str] | None = None) -> str:
    text = template.replace("@PYTHON@", python).replace("@SOCKET_DIR@", socket_dir)
    if "@HOME_PATHS@" in text:
        text = text.replace("@HOME_PATHS@", _home_lines(home_paths() if home is None else home))
    left = _PLACEHOLDER.search(text)
    if left:
        raise UnitsError(f"template placeholder {left.group()} has no value")
    return text


def _template(relative: str) -> str:
    path = TEMPLATE_DIR / relative
    try:
        return path.read_text()
    except OSError as exc:
        raise UnitsError(
            f"cannot read unit template {path}: {exc.strerror}; "
            "install-units works from a source checkout (pip install -e)"
        ) from None


def user_unit_dir() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(config) / "systemd" / "user"


def plan(user: bool, dest: Path | None, socket_dir: str | None, python: str) -> list[UnitFile]:
    """Every file to write, rendered."""
    directory = check_socket_dir(socket_dir or (USER_SOCKET_DIR if user else str(DEFAULT_SOCKET_DIR)))
    unit_dir = dest or (user_unit_dir() if user else SYSTEM_UNIT_DIR)
    prefix = "user/" if user else ""
    files = [UnitFile(unit_dir / name, render(_template(prefix + name), python, directory)) for name in UNITS]
    if not user:  # %t/ipcd is made by the user manager, and is not aged
        tmpfiles = dest / TMPFILES_TEMPLATE if dest else TMPFILES_PATH
        files.append(UnitFile(tmpfiles, render(_template(TMPFILES_TEMPLATE), python, directory)))
    return files


def write(unit: UnitFile) -> None:
    """Write atomically (a unit half written is worse than none), mode 0644."""
    unit.path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{unit.path.name}.", dir=unit.path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(unit.text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, unit.path)
    except BaseException:
        os.unlink(tmp)
        raise


def next_steps(user: bool, dest: Path | None, socket_dir: str | None) -> list[str]:
    if user:
        steps = ["systemctl --user daemon-reload && systemctl --user enable --now ipcd.socket"]
        if socket_dir is None:
            steps.append(f'then point ipcctl at it: export {SOCKET_DIR_ENV}="$XDG_RUNTIME_DIR/ipcd"')
    else:
        tmpfiles = f"{dest / TMPFILES_TEMPLATE} as {TMPFILES_PATH}" if dest else str(TMPFILES_PATH)
        steps = [
            f"systemd-tmpfiles --create {TMPFILES_PATH}",
            "systemctl daemon-reload && systemctl enable --now ipcd.socket",
        ]
        if dest:
            steps.insert(0, f"install the units in {SYSTEM_UNIT_DIR} and {tmpfiles}")
    return steps


@click.command("install-units")
@click.option("--user", is_flag=True, help="Units for your user manager (systemctl --user).")
@click.option(
    "--dest",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Write here instead of /etc/systemd/system (or ~/.config/systemd/user).",
)
@click.option(
    "--socket-dir",
    metavar="DIR",
    envvar=SOCKET_DIR_ENV,
    show_envvar=True,
    help=f"Socket dir the units listen in (default {DEFAULT_SOCKET_DIR}, or {USER_SOCKET_DIR} with --user).",
)
@click.option("--dry-run", is_flag=True, help="Print the files instead of writing them.")
def install_units(user: bool, dest: Path | None, socket_dir: str | None, dry_run: bool) -> None:
    """Write systemd units that run this installation of ipcd.

    ExecStart= gets the interpreter running this command. Nothing is
    enabled or started: the last lines say what to run for that.
    """
    files = plan(user, dest.absolute() if dest else None, socket_dir, python_path())
    for unit in files:
        if dry_run:
            click.echo(f"# {unit.path}\n{unit.text}")
            continue
        try:
            write(unit)
        except OSError as exc:
            hint = "" if user or dest else " (run as root, or use --user or --dest)"
            raise UnitsError(f"cannot write {unit.path}: {exc.strerror}{hint}") from None
        click.echo(f"wrote {unit.path}")
    click.echo("next:" if not dry_run else "# then:")
    for step in next_steps(user, dest, socket_dir):
        click.echo(f"  {step}")
