"""``ipcctl put NAME --listen ADDRESS``: make the sockets to store, from a shell.

Theory of operation: ADDRESS is written the way a socket unit's
``ListenStream=`` (and ``systemd-socket-activate -l``) writes it, so what an
admin knows from systemd works here:

- ``8080``: every address of the host, IPv6 and IPv4 (``[::]:8080`` with
  ``IPV6_V6ONLY`` off, or ``0.0.0.0:8080`` where IPv6 is off), as
  ``ListenStream=8080`` binds;
- ``127.0.0.1:8080``, ``[::1]:8080``: that address only (port 0: any free
  port, which ``bound_address`` then reports);
- ``/run/app.sock``, ``./app.sock``, ``unix:PATH``: a Unix socket file;
  ``@name``: an abstract Unix socket (no file);
- prefixes ``tcp:`` and ``unix:`` (stream, the default), ``udp:`` and
  ``unix-dgram:`` (datagram), per address, so one entry can hold a TCP and a
  UDP socket in order, like a socket unit's ``ListenStream=`` and
  ``ListenDatagram=`` lines.

``parse`` is pure: it reads the text and raises ``ListenError(usage=True)``
for a malformed one (exit 2). ``bind`` is the only part that touches the
kernel: it creates, binds and (for a stream) listens, and turns each errno a
user meets into one line saying what to do. A Unix socket file left behind
by a server that is gone (nobody accepts on it) is replaced, a live one is
refused, as ipcd does with its own sockets.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any

_SUN_PATH_MAX = 107  # bytes of sun_path, less the terminating (or, abstract, leading) NUL
_FORMS = "PORT, IP:PORT, [IPv6]:PORT, /path, ./path or @abstract (prefix udp: or unix-dgram: for datagrams)"
_PREFIXES = {
    "tcp:": (False, False),
    "udp:": (False, True),
    "unix:": (True, False),
    "unix-dgram:": (True, True),
}


class ListenError(Exception):
    """One line for the user; ``usage``: the address itself is malformed (exit 2)."""

    def __init__(self, message: str, *, usage: bool = False, in_use: bool = False) -> None:
        super().__init__(message)
        self.usage = usage
        self.in_use = in_use


@dataclass(frozen=True, slots=True)
class ListenAddress:
    text: str  # as the user wrote it
    family: socket.AddressFamily
    dgram: bool
    host: str = ""  # an IP address, no brackets; "" for a Unix socket
    port: int = 0
    path: str = ""  # a Unix socket: a path, or "@name" for an abstract one
    every_address: bool = False  # a bare port: IPv6 and IPv4 both

    @property
    def kind(self) -> socket.SocketKind:
        return socket.SOCK_DGRAM if self.dgram else socket.SOCK_STREAM


def parse(text: str) -> ListenAddress:
    """The address ``text`` names (see the module head), or ``ListenError``."""
    rest, unix, dgram = text, None, False
    for prefix, (is_unix, is_dgram) in _PREFIXES.items():
        if text.startswith(prefix):
            rest, unix, dgram = text[len(prefix) :], is_unix, is_dgram
            break
    if unix or (unix is None and rest.startswith(("/", "./", "../", "@"))):
        return _unix(text, rest, dgram)
    return _inet(text, rest, dgram)


def _bad(text: str, why: str) -> ListenError:
    return ListenError(f"bad --listen address {text!r}: {why}", usage=True)


def _unix(text: str, path: str, dgram: bool) -> ListenAddress:
    if path in ("", "@"):
        raise _bad(text, "give a path after unix: (or @name for an abstract socket)")
    if "\0" in path:
        raise _bad(text, "a socket path cannot hold a NUL byte")
    size = len(os.fsencode(path)) - (1 if path.startswith("@") else 0)
    if size > _SUN_PATH_MAX:
        raise _bad(
            text, f"a Unix socket path has at most {_SUN_PATH_MAX} bytes, this one {size}; use a shorter one"
        )
    return ListenAddress(text, socket.AF_UNIX, dgram, path=path)


def _port(text: str, value: str) -> int:
    if not value.isdigit() or int(value) > 65535:
        raise _bad(text, f"{value!r} is not a port (0 to 65535; 0: any free one)")
    return int(value)


def _inet(text: str, rest: str, dgram: bool) -> ListenAddress:
    if rest.isdigit():
        return ListenAddress(
            text, socket.AF_INET6, dgram, host="::", port=_port(text, rest), every_address=True
        )
    if rest.startswith("["):
        host, bracket, port = rest[1:].partition("]:")
        if not bracket:
            raise _bad(text, "write an IPv6 address as [ADDRESS]:PORT, like [::1]:8080")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _bad(text, f"{host!r} is not an IPv6 address") from None
        return ListenAddress(text, socket.AF_INET6, dgram, host=host, port=_port(text, port))
    host, colon, port = rest.rpartition(":")
    if not colon:
        raise _bad(text, f"give {_FORMS}")
    if ":" in host:
        raise _bad(text, f"put an IPv6 address in brackets: [{host}]:{port}")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise _bad(
            text, f"{host!r} is not an IP address; give one (127.0.0.1:{port}, [::1]:{port}), not a host name"
        ) from None
    return ListenAddress(text, socket.AF_INET, dgram, host=host, port=_port(text, port))


# -- binding -----------------------------------------------------------------------


def bind(address: ListenAddress, backlog: int, socket_mode: int | None) -> socket.socket:
    """A new socket bound to ``address`` (listening, for a stream). The
    caller owns it, and the Unix socket file it made (``remove_file``)."""
    family = address.family
    if address.every_address and not socket.has_ipv6:
        family = socket.AF_INET
    try:
        sock = socket.socket(family, address.kind)
    except OSError as exc:
        if exc.errno == errno.EAFNOSUPPORT and address.every_address:
            family = socket.AF_INET  # IPv6 is off on this host: every IPv4 address, as systemd does
            sock = socket.socket(family, address.kind)
        elif exc.errno == errno.EAFNOSUPPORT:
            raise ListenError(
                f"cannot listen on {address.text}: IPv6 is not available on this host"
            ) from None
        else:
            raise ListenError(f"cannot listen on {address.text}: {exc.strerror}") from None
    try:
        if family == socket.AF_UNIX:
            _bind_unix(sock, address, socket_mode)
        else:
            _bind_inet(sock, address, family)
        if not address.dgram:
            sock.listen(backlog)
    except BaseException:
        remove_file(sock)
        sock.close()
        raise
    return sock


def _bind_inet(sock: socket.socket, address: ListenAddress, family: socket.AddressFamily) -> None:
    if not address.dgram:
        # As every server does: a port whose last connections linger in TIME_WAIT can be bound again.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if address.every_address and family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too, whatever the sysctl says
    host = "0.0.0.0" if family == socket.AF_INET and address.every_address else address.host  # noqa: S104
    try:
        # parse() checked it is a numeric address (an IPv6 one may carry its scope: fe80::1%eth0).
        sock.bind((host, address.port))
    except OSError as exc:
        raise _inet_error(address, exc) from None


def _unprivileged_port_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 1024


def _inet_error(address: ListenAddress, exc: OSError) -> ListenError:
    where = f"cannot listen on {address.text}"
    if exc.errno == errno.EADDRINUSE:
        ss = f"ss -l{'u' if address.dgram else 't'}np 'sport = :{address.port}'"
        return ListenError(
            f"{where}: the address is in use (see who holds it: {ss}); "
            "pick another port, or 0 for any free one",
            in_use=True,
        )
    if exc.errno == errno.EACCES and address.port < _unprivileged_port_start():
        return ListenError(
            f"{where}: permission denied: ports below {_unprivileged_port_start()} need root; "
            "run 'ipcctl put' as root with --allow-uid USER and let the server get it from ipcd "
            "(privilege separation), or use a higher port"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return ListenError(
            f"{where}: no interface of this host has address {address.host} ('ip addr' lists them)"
        )
    return ListenError(f"{where}: {exc.strerror}")


def _bind_unix(sock: socket.socket, address: ListenAddress, socket_mode: int | None) -> None:
    path = address.path
    target: str | bytes = path
    if path.startswith("@"):
        target = b"\0" + os.fsencode(path[1:])
    else:
        _remove_stale(address)
    try:
        sock.bind(target)
    except OSError as exc:
        raise _unix_error(address, exc) from None
    if socket_mode is not None and not path.startswith("@"):
        # Before listen(): until then a connect() is refused, so nobody gets in under the wider mode.
        try:
            os.chmod(path, socket_mode)
        except OSError as exc:
            raise ListenError(f"cannot set the mode of {path}: {exc.strerror}") from None


def _remove_stale(address: ListenAddress) -> None:
    """Unlink a socket file nobody accepts on (a server that is gone left
    it); refuse a live one and anything that is not a socket."""
    path = address.path
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ListenError(f"cannot listen on {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ListenError(
            f"cannot listen on {path}: it exists and is not a socket; remove it or pick another path"
        )
    with socket.socket(socket.AF_UNIX, address.kind) as probe:
        # A server that is alive but not accepting (a full backlog) would make
        # a blocking connect wait for ever: a second's wait means live.
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            return
        except TimeoutError:
            pass
        except OSError as exc:
            # EPROTOTYPE: a live socket of the other type; EAGAIN: a full backlog.
            if exc.errno not in (errno.EPROTOTYPE, errno.EAGAIN):
                raise ListenError(f"cannot listen on {path}: {exc.strerror}") from None
    raise ListenError(
        f"cannot listen on {path}: a server is listening there (see who: ss -lxp src {path}); "
        "stop it, or pick another path",
        in_use=True,
    )


def _unix_error(address: ListenAddress, exc: OSError) -> ListenError:
    where = f"cannot listen on {address.path}"
    if exc.errno == errno.EADDRINUSE:
        return ListenError(
            f"{where}: the address is in use (see who holds it: ss -lxp src {address.path})", in_use=True
        )
    if exc.errno == errno.ENOENT:
        return ListenError(f"{where}: no directory {os.path.dirname(address.path) or '.'}; create it first")
    if exc.errno == errno.EACCES:
        return ListenError(
            f"{where}: permission denied to create a file in {os.path.dirname(address.path) or '.'}"
        )
    return ListenError(f"{where}: {exc.strerror}")


def remove_file(sock: socket.socket) -> None:
    """Unlink the socket file ``sock`` is bound to, if it has one (an entry
    that was refused must not leave a dead socket file behind)."""
    try:
        name = sock.getsockname()
    except OSError:
        return
    if isinstance(name, str) and name:
        try:
            os.unlink(name)
        except OSError:
            pass


def bound_address(sock: socket.socket) -> dict[str, Any]:
    """What ``sock`` is bound to, in the ``--listen`` syntax (the real port, if 0 was asked)."""
    dgram = sock.type == socket.SOCK_DGRAM
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        path = "@" + name[1:].decode(errors="replace") if isinstance(name, bytes) else str(name)
        text = f"unix-dgram:{path}" if dgram else path
        return {"address": text, "family": "unix", "type": "dgram" if dgram else "stream", "path": path}
    host, port = name[0], name[1]
    text = f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"
    family = "inet6" if sock.family == socket.AF_INET6 else "inet"
    return {
        "address": f"udp:{text}" if dgram else text,
        "family": family,
        "type": "dgram" if dgram else "stream",
        "host": host,
        "port": port,
    }
