"""``ipcctl put | get | take | ls | rm``: hand open files and sockets over.

``get``/``take`` with a command exec it with the fds at 3, 4, ... and
``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES`` set, the socket-activation
convention, so any socket-activatable server can take a handed-off socket.
Without a command the content is copied to stdout: regular files and memfds
from offset 0 with pread (a stored fd shares its file offset with every copy
handed out, so reading must not depend on, or move, that offset), pipes and
sockets until end of file.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import pwd
import socket
import stat
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from ipcd import fdpass
from ipcd.cli import handoffparams, listeners
from ipcd.cli.common import Options, fail, handles_errors, json_option, pass_options
from ipcd.cli.completion import entry_names
from ipcd.client import ClientError
from ipcd.protocol.fields import ID_MAX

_CHUNK = 1 << 16


def _uid(value: str) -> int:
    return _numeric_id(value, lambda name: pwd.getpwnam(name).pw_uid, "user")


def _gid(value: str) -> int:
    return _numeric_id(value, lambda name: grp.getgrnam(name).gr_gid, "group")


def _numeric_id(value: str, lookup: Callable[[str], int], what: str) -> int:
    """A number as given, or the id of the user or group named."""
    if value.isdigit():
        if int(value) > ID_MAX:  # the daemon would refuse it; say so before connecting
            raise click.BadParameter(f"{value} is not a {what} id: ids go up to {ID_MAX}")
        return int(value)
    try:
        return lookup(value)
    except KeyError:
        raise click.BadParameter(f"no {what} named {value!r}") from None


def _open(path: str, write: bool) -> int:
    if path == "-":
        return os.dup(0)
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY
    try:
        return os.open(path, flags)
    except OSError as exc:
        fail(f"cannot open {path}: {exc.strerror}", 1)


@click.command()
@json_option
@click.argument("name")
@click.argument("path", required=False)
@click.option(
    "--fd",
    "fds",
    type=handoffparams.AtLeast(int, 0, "N"),
    multiple=True,
    help="Pass inherited fd N (repeatable).",
)
@click.option(
    "--listen",
    "listen",
    multiple=True,
    metavar="ADDRESS",
    help="Create a socket on ADDRESS and store it (repeatable): PORT (every address, IPv6 and IPv4), "
    "IP:PORT, [IPv6]:PORT (port 0: any free one), /path or ./path (a Unix socket), @name (abstract); "
    "prefix udp: or unix-dgram: for a datagram socket.",
)
@click.option(
    "--backlog",
    type=handoffparams.AtLeast(int, 1, "N"),
    default=socket.SOMAXCONN,
    help=f"Connections the kernel queues for --listen while nobody accepts (default {socket.SOMAXCONN}).",
)
@click.option(
    "--socket-mode",
    callback=handoffparams.socket_mode,
    metavar="MODE",
    help="File mode of a --listen Unix socket path, in octal (default: from the umask).",
)
@click.option(
    "--fdname",
    "fdnames",
    multiple=True,
    metavar="NAME[:NAME...]",
    help="Names of the fds, in order, for LISTEN_FDNAMES (default: NAME for each).",
)
@click.option("--write", is_flag=True, help="Open PATH read-write instead of read-only.")
@click.option(
    "--allow-uid", "allow_uids", multiple=True, metavar="USER", help="Also allow this user (name or uid)."
)
@click.option("--allow-gid", "allow_gids", multiple=True, metavar="GROUP", help="Also allow this group.")
@click.option("--public", is_flag=True, help="Allow every local user.")
@click.option("--ttl", type=handoffparams.SECS(0.001), default=None, help="Close and forget it after SECS.")
@click.option("--replace", is_flag=True, help="Replace an entry of yours with the same name.")
@pass_options
@handles_errors
def put(
    opts: Options,
    name: str,
    path: str | None,
    fds: tuple[int, ...],
    listen: tuple[str, ...],
    backlog: int,
    socket_mode: int | None,
    fdnames: tuple[str, ...],
    write: bool,
    allow_uids: tuple[str, ...],
    allow_gids: tuple[str, ...],
    public: bool,
    ttl: float | None,
    replace: bool,
) -> None:
    """Store open files under NAME: PATH (opened here, '-' for stdin),
    inherited fds (--fd), or new sockets (--listen). Only you and root may
    get them unless allowed."""
    if sum(map(bool, (path, fds, listen))) != 1:
        fail("give one of PATH, --fd N or --listen ADDRESS", 2)
    addresses = [_parsed(text) for text in listen]
    if socket_mode is not None and not any(a.path and not a.path.startswith("@") for a in addresses):
        fail("--socket-mode is for a --listen Unix socket path (/path or ./path)", 2)
    names = [fd_name for value in fdnames for fd_name in value.split(":")]
    count = len(addresses) or len(fds) or 1
    if names and len(names) != count:
        fail(f"give one --fdname per fd: {count} fd(s), {len(names)} name(s)", 2)
    for fd in fds:
        try:
            os.fstat(fd)
        except OSError:
            fail(handoffparams.not_open_hint(fd), 2)
    uids = [_uid(u) for u in allow_uids]
    gids = [_gid(g) for g in allow_gids]
    sockets = _bind_all(opts, addresses, backlog, socket_mode)
    bound = [
        {**listeners.bound_address(sock), "name": names[index] if names else name}
        for index, sock in enumerate(sockets)
    ]
    to_send = [_open(path, write)] if path else list(fds) or [sock.fileno() for sock in sockets]
    stored = False
    try:
        with opts.client() as client:
            result = client.put(
                name,
                to_send,
                names=names,
                allow_uids=uids,
                allow_gids=gids,
                public=public,
                ttl=ttl,
                replace=replace,
            )
        stored = True
    finally:
        if path:
            fdpass.close_fds(to_send)
        for sock in sockets:  # the daemon has its own copies now; a refused entry leaves no socket file
            if not stored:
                listeners.remove_file(sock)
            sock.close()
    if sockets:
        _report(opts, name, bound, result)
    elif opts.json:
        opts.emit(result)


def _parsed(text: str) -> listeners.ListenAddress:
    try:
        return listeners.parse(text)
    except listeners.ListenError as exc:
        fail(str(exc), 2)


def _bind_all(
    opts: Options, addresses: list[listeners.ListenAddress], backlog: int, socket_mode: int | None
) -> list[socket.socket]:
    bound: list[socket.socket] = []
    try:
        for address in addresses:
            try:
                bound.append(listeners.bind(address, backlog, socket_mode))
            except listeners.ListenError as exc:
                holder = _stored_holder(opts, address) if exc.in_use else None
                if holder is not None:
                    fail(
                        f"cannot listen on {address.text}: ipcd already holds a socket there, stored as "
                        f"{holder!r}; use it ('ipcctl get {holder} -- CMD') "
                        f"or free it ('ipcctl rm {holder}')",
                        1,
                    )
                fail(str(exc), 1)
    except BaseException:
        for sock in bound:
            listeners.remove_file(sock)
            sock.close()
        raise
    return bound


def _stored_holder(opts: Options, address: listeners.ListenAddress) -> str | None:
    """The name of a stored entry (one the user may see) bound where
    ``address`` is in use: the likeliest holder, and one ss(8) shows as ipcd."""
    try:
        with opts.client() as client:
            entries = client.ls()["entries"]
    except ClientError:
        return None
    kind = "dgram" if address.dgram else "stream"
    for entry in entries:
        for fd in entry["fds"]:
            where = str(fd.get("address", ""))
            if fd.get("kind") != "socket" or fd.get("type") != kind:
                continue
            if address.family == socket.AF_UNIX and where == address.path:
                return str(entry["name"])
            inet = address.family != socket.AF_UNIX and fd.get("family") in ("inet", "inet6")
            if inet and where.rpartition(":")[2] == str(address.port):
                return str(entry["name"])
    return None


def _report(opts: Options, name: str, bound: list[dict[str, Any]], result: dict[str, Any]) -> None:
    """What was bound, with the real port where 0 was asked, for people and scripts."""
    if opts.json:
        opts.emit({**result, "sockets": bound})
        return
    for sock in bound:
        how = "bound to" if sock["type"] == "dgram" else "listening on"
        click.echo(f"{name}: {how} {sock['address']}")


def _place_fds(fds: tuple[int, ...]) -> None:
    """Move ``fds`` to 3, 4, ... (inheritable), whatever numbers they have now."""
    first_free = 3 + len(fds)
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, first_free) for fd in fds]
    fdpass.close_fds(fds)
    for index, fd in enumerate(moved):
        os.dup2(fd, 3 + index, inheritable=True)
        os.close(fd)


def _exec(command: tuple[str, ...], fds: tuple[int, ...], names: tuple[str, ...]) -> None:
    _place_fds(fds)
    env = dict(os.environ)
    env.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=":".join(names))
    try:
        os.execvpe(command[0], list(command), env)  # noqa: S606 - running the user's command is the point
    except OSError as exc:
        code = 127 if exc.errno == errno.ENOENT else 126
        fail(f"cannot run {command[0]}: {exc.strerror}", code)


def _copy_out(name: str, fd: int) -> None:
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode):
        fail(f"{name} holds a directory; give a command to run with it", 1)
    if stat.S_ISSOCK(mode):
        with socket.socket(fileno=os.dup(fd)) as sock:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                fail(f"{name} holds a listening socket; give a command to run with it (-- CMD ...)", 1)
    out = sys.stdout.buffer
    out.flush()
    offset = 0
    while True:
        try:
            chunk = os.pread(fd, _CHUNK, offset)
        except OSError as exc:
            if exc.errno != errno.ESPIPE:
                raise
            chunk = os.read(fd, _CHUNK)  # a pipe or socket: read it to the end
        if not chunk:
            break
        offset += len(chunk)
        out.write(chunk)
    out.flush()


def _not_printable(entry: dict[str, Any]) -> str | None:
    """What in a listed entry has no content to print, if anything."""
    for fd in entry["fds"]:
        if fd.get("kind") == "directory":
            return "a directory"
        if fd.get("kind") == "socket" and fd.get("listening"):
            return "a listening socket"
        if fd.get("access") == "w":
            return "a write-only fd"
    return None


def _receive(opts: Options, take: bool, name: str, wait: float, command: tuple[str, ...]) -> None:
    with opts.client() as client:
        if take and not command and not opts.json:
            # Refuse before taking: once taken, a listening socket printed
            # nowhere would be closed and lost for good.
            entry = next((e for e in client.ls()["entries"] if e["name"] == name), None)
            what = _not_printable(entry) if entry is not None else None
            if what is not None:
                fail(f"{name} holds {what}; give a command to run with it (-- CMD ...); it stays stored", 1)
        handoff = client.take(name, wait) if take else client.get(name, wait)
    if command:
        _exec(command, handoff.fds, handoff.names)
        return
    try:
        if opts.json:
            opts.emit({"name": handoff.name, "count": len(handoff.fds), "names": list(handoff.names)})
            return
        for fd in handoff.fds:
            try:
                _copy_out(name, fd)
            except OSError as exc:
                fail(f"cannot read {name}: {exc.strerror}; give a command to run with it (-- CMD ...)", 1)
    finally:
        fdpass.close_fds(handoff.fds)


_COMMAND = click.argument("command", nargs=-1, metavar="[-- CMD [ARGS]...]", type=click.UNPROCESSED)
_WAIT = click.option(
    "--wait", type=handoffparams.SECS(0), default=0.0, help="Wait up to SECS for NAME to be put."
)


@click.command(cls=handoffparams.RunsCommand)
@json_option
@click.argument("name", shell_complete=entry_names)
@_WAIT
@_COMMAND
@pass_options
@handles_errors
def get(opts: Options, name: str, wait: float, command: tuple[str, ...]) -> None:
    """Get copies of NAME's fds (the entry stays). With -- CMD ARGS, run CMD
    with them at fd 3, 4, ... and LISTEN_FDS set; else print the content."""
    _receive(opts, False, name, wait, command)


@click.command(cls=handoffparams.RunsCommand)
@json_option
@click.argument("name", shell_complete=entry_names)
@_WAIT
@_COMMAND
@pass_options
@handles_errors
def take(opts: Options, name: str, wait: float, command: tuple[str, ...]) -> None:
    """Like get, but the entry is removed: the fds are yours alone."""
    _receive(opts, True, name, wait, command)


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _kind(fd: dict[str, object]) -> str:
    kind = str(fd.get("kind", "?"))
    if kind == "socket":
        kind = f"{fd.get('family', '?')}/{fd.get('type', '?')}" + (
            " listening" if fd.get("listening") else ""
        )
    where = fd.get("path") or fd.get("address")
    return f"{kind} {where}" if where else kind


@click.command(name="ls")
@json_option
@pass_options
@handles_errors
def ls(opts: Options) -> None:
    """List the stored entries you may get, with what each fd is."""
    with opts.client() as client:
        listing = client.ls()
    if opts.json:
        opts.emit(listing)
        return
    click.echo(f"{'NAME':<24} {'OWNER':<10} {'AGE':>5} {'TTL':>6}  FDS")
    for entry in listing["entries"]:
        owner = entry["owner"]
        try:
            owner = pwd.getpwuid(owner).pw_name
        except KeyError:
            pass
        ttl = "-" if entry["ttl"] is None else _age(entry["ttl"])
        kinds = ", ".join(_kind(fd) for fd in entry["fds"])
        click.echo(f"{entry['name']:<24} {owner!s:<10} {_age(entry['age']):>5} {ttl:>6}  {kinds}")
    quota = listing["quota"]
    click.echo(f"your stored fds: {quota['used']} of {quota['quota']}")


@click.command()
@json_option
@click.argument("name", shell_complete=entry_names)
@pass_options
@handles_errors
def rm(opts: Options, name: str) -> None:
    """Remove NAME from the store (its owner or root only); its fds are closed."""
    with opts.client() as client:
        client.rm(name)
    if opts.json:
        opts.emit({"name": name, "removed": True, "at": time.time()})
