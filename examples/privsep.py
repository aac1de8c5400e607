"""Privilege separation: root opens a file, an unprivileged process reads it through ipcd.

    sudo .venv/bin/python examples/privsep.py demo /etc/shadow --user nobody
    sudo .venv/bin/python examples/privsep.py put /etc/shadow --name shadow --allow nobody
    sudo .venv/bin/python examples/privsep.py get shadow --as nobody

``demo`` does the whole story in one go: as root it opens SECRET (which only
root may read) and PUTs the open fd into ipcd under ``--name``, allowed to
USER only; then it forks a child that drops to USER (supplementary groups,
gid, uid: after that it has no capability left), shows that opening SECRET
itself fails with EACCES, and GETs the fd from ipcd and prints the content.
The kernel checks permissions when a file is opened, not when an open file
is read: the fd carries root's access, and ipcd decides who may have it
from each caller's peer credentials. Finally root removes the entry.

``put`` and ``get`` are the two halves on their own (``get --as USER``
forks and drops to USER first, as the child above does). A user who was not
allowed is refused with PERMISSION_DENIED (exit 1). The same can be done
with ``ipcctl put NAME PATH --allow-uid USER`` and ``ipcctl get NAME``.

Why fork instead of ``su USER -c ...``: dropping privileges in a forked
child keeps the interpreter and modules already loaded, which matters when
(as here) Python lives under a directory other users cannot enter.
Uses only the standard library and ipcd.client; ``IPCD_SOCKET_DIR`` or
``--socket-dir`` selects the daemon.
"""

from __future__ import annotations

import argparse
import errno
import os
import pwd
import sys
from collections.abc import Callable

from ipcd.client import Client, ClientError, ServerError

_CHUNK = 1 << 16


def drop_privileges(user: str) -> None:
    """Become ``user`` for good: no supplementary groups, its gid, its uid."""
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if os.getuid() != entry.pw_uid or os.geteuid() != entry.pw_uid:
        raise SystemExit(f"privsep: could not become {user}")


def run_as(user: str, func: Callable[[], int]) -> int:
    """Run ``func`` in a forked child that has dropped to ``user``; its exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            drop_privileges(user)
            code = func()
        except SystemExit as exc:
            print(exc, file=sys.stderr)
        except BaseException as exc:
            print(f"privsep: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def read_all(fd: int) -> bytes:
    """The whole file from offset 0, with pread: the fd's offset is shared with every copy."""
    chunks = []
    offset = 0
    while chunk := os.pread(fd, _CHUNK, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def put_secret(socket_dir: str | None, path: str, name: str, allow: list[str], ttl: float | None) -> None:
    """Open ``path`` (with our privileges) and store the open fd for ``allow`` users."""
    uids = [pwd.getpwnam(user).pw_uid for user in allow]
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with Client(socket_dir) as client:
            client.put(name, [fd], allow_uids=uids, ttl=ttl, replace=True)
    finally:
        os.close(fd)  # ipcd holds its own copy now
    print(f"root: opened {path} and stored it in ipcd as {name!r} for {', '.join(allow)}", flush=True)


def get_secret(socket_dir: str | None, name: str) -> int:
    """Get ``name`` from ipcd and print its content; 1 if refused."""
    me = pwd.getpwuid(os.getuid()).pw_name
    try:
        with Client(socket_dir) as client:
            handoff = client.get(name)
    except ServerError as exc:
        print(f"{me}: ipcd refused {name!r}: {exc.code_name}: {exc.message}", file=sys.stderr)
        return 1
    except ClientError as exc:
        print(f"{me}: {exc}", file=sys.stderr)
        return 69
    try:
        content = read_all(handoff.fds[0])
    finally:
        for fd in handoff.fds:
            os.close(fd)
    print(f"{me}: got {name!r} from ipcd (put by uid {handoff.owner}); it reads:", flush=True)
    sys.stdout.buffer.write(content)
    sys.stdout.flush()
    return 0


def try_open(path: str) -> bool:
    """Show whether we can open ``path`` ourselves; True if we can."""
    me = pwd.getpwuid(os.getuid()).pw_name
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as exc:
        print(f"{me}: open({path}) fails: {errno.errorcode.get(exc.errno or 0, '?')} ({exc.strerror})")
        return False
    print(f"{me}: open({path}) succeeds")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket-dir", default=None, help="where ipcd's sockets are (default /tmp/ipcd)")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the whole story: root puts, USER gets")
    demo.add_argument("secret", help="a file only root can read")
    demo.add_argument("--user", required=True, help="the unprivileged user to hand it to")
    demo.add_argument("--name", default="secret", help="name in ipcd (default secret)")
    put = commands.add_parser("put", help="open SECRET and store it for --allow users")
    put.add_argument("secret")
    put.add_argument("--name", default="secret")
    put.add_argument("--allow", action="append", default=[], metavar="USER", help="repeatable")
    put.add_argument("--ttl", type=float, default=None, help="forget it after SECS")
    get = commands.add_parser("get", help="get NAME from ipcd and print it")
    get.add_argument("name")
    get.add_argument("--as", dest="user", default=None, help="drop to USER first (when run as root)")
    args = parser.parse_args()
    socket_dir: str | None = args.socket_dir

    try:
        if args.command == "put":
            put_secret(socket_dir, args.secret, args.name, args.allow, args.ttl)
            return 0
        if args.command == "get":
            if args.user is None:
                return get_secret(socket_dir, args.name)
            return run_as(args.user, lambda: get_secret(socket_dir, args.name))
        # demo
        if os.getuid() != 0:
            print("privsep: run the demo as root (it opens the file and drops to --user)", file=sys.stderr)
            return 2
        secret: str = args.secret
        name: str = args.name
        put_secret(socket_dir, secret, name, [args.user], ttl=60.0)
        try:

            def child() -> int:
                if try_open(secret):
                    return 3  # the file was not private after all: nothing is shown
                return get_secret(socket_dir, name)

            return run_as(args.user, child)
        finally:
            with Client(socket_dir) as client:
                client.rm(name)
    except (ClientError, OSError, KeyError) as exc:
        print(f"privsep: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
