"""``ipcctl`` talks only to the daemon: impostors and unsafe socket dirs,
with real users.

The attacker is ``other`` and the victims are ``owner`` and ``friend`` (the
hand-off tests' users, made with useradd), each a forked process that
dropped root (the venv's interpreter is not theirs to run). The attacker
does what the issue describes: creates the socket dir first in /tmp, or
wins the rename of a socket dir whose parent it can write, and listens
there. Each impostor counts what reached it: nothing may be sent to it.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from ipcd.client import Client
from ipcd.protocol import Op, decode_record, encode_frame, reply_op
from tests.daemon import IPCCTL, Daemon, wait_for
from tests.handoff.users import FdUsers, Pending, as_user, ipcctl_as, start_as
from tests.server.test_socketdir import assert_refused, serve

pytest_plugins = ["tests.handoff.users"]


def described(user: pwd.struct_passwd) -> str:
    return f"uid {user.pw_uid} ({user.pw_name})"


def one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, f"exit {result.returncode}:\n{result.stdout}{result.stderr}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def ipcctl_root(socket_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IPCCTL, "--socket-dir", str(socket_dir), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


_names = itertools.count()


@pytest.fixture
def tmp_name() -> Iterator[Path]:
    """A fresh name right in /tmp (where anyone may create it first); removed after."""
    path = Path(f"/tmp/ipcd-i{os.getpid()}-{next(_names)}")
    yield path
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def open_tmp(short_tmp: Path) -> Path:
    short_tmp.chmod(0o755)  # mkdtemp made it 0700: let the users reach the socket dir
    return short_tmp


# -- an impostor: sockets another user listens on ------------------------------------


def _impostor(
    directory: str, make_dir: bool, ready_w: int, go_r: int
) -> dict[str, int]:  # pragma: no cover - child
    """Listen on both socket paths of ``directory`` (made first if
    ``make_dir``); once told to, count what reached them."""
    if make_dir:
        os.mkdir(directory)
        os.chmod(directory, 0o755)  # noqa: S103 - what an impostor makes, readable by its victims
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.bind(f"{directory}/stream.sock")
    stream.listen()
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(f"{directory}/dgram.sock")
    for name in ("stream.sock", "dgram.sock"):
        os.chmod(f"{directory}/{name}", 0o666)  # noqa: S103 - open to all, as the daemon's are
    os.write(ready_w, b"r")
    os.read(go_r, 1)  # the test's clients are done
    stream.setblocking(False)
    dgram.setblocking(False)
    seen = {"connections": 0, "bytes": 0, "datagrams": 0}
    while True:
        try:
            conn, _ = stream.accept()
        except BlockingIOError:
            break
        seen["connections"] += 1
        conn.settimeout(10)
        while chunk := conn.recv(65536):  # until the client's close
            seen["bytes"] += len(chunk)
        conn.close()
    while True:
        try:
            dgram.recv(65536)
        except BlockingIOError:
            break
        seen["datagrams"] += 1
    return seen


class Impostor(NamedTuple):
    pending: Pending
    go_w: int

    @classmethod
    def start(cls, user: pwd.struct_passwd, directory: Path, make_dir: bool) -> Impostor:
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        pending = start_as(user, _impostor, str(directory), make_dir, ready_w, go_r, keep=(ready_w, go_r))
        os.close(ready_w)
        os.close(go_r)
        try:
            assert os.read(ready_r, 1) == b"r", "the impostor died before listening"
        finally:
            os.close(ready_r)
        return cls(pending, go_w)

    def seen(self) -> dict[str, Any]:
        os.write(self.go_w, b"g")
        os.close(self.go_w)
        outcome = self.pending.result()
        assert outcome.ok, outcome
        result: dict[str, Any] = outcome.value
        return result


def test_an_impostor_who_made_the_socket_dir_is_refused_before_anything_is_sent(
    fd_users: FdUsers, tmp_name: Path
) -> None:
    impostor = Impostor.start(fd_users.other, tmp_name, make_dir=True)
    try:
        expected = (
            f"cannot trust {tmp_name}/stream.sock: {tmp_name} is a directory owned by "
            f"{described(fd_users.other)}, not by root or you: that user could put an impostor in the "
            f"daemon's place; pass --daemon-uid {fd_users.other.pw_uid} (or set IPCD_DAEMON_UID) "
            "if you trust them, "
            "or choose another --socket-dir"
        )
        victim = ipcctl_as(fd_users.owner, tmp_name, "echo", "hi")
        assert one_line(victim, 69) == f"ipcctl: {expected}"
        assert victim.stdout == ""
        as_root = ipcctl_root(tmp_name, "echo", "hi")
        assert one_line(as_root, 69) == f"ipcctl: {expected}"
        dgram = ipcctl_as(fd_users.owner, tmp_name, "--json", "echo", "--dgram", "hi")
        assert json.loads(one_line(dgram, 69)) == {
            "error": {
                "code": "UNTRUSTED",
                "exit_status": 69,
                "message": expected.replace("stream.sock", "dgram.sock"),
            }
        }
        for command in (("send", "--room", "dev", "secret"), ("status",), ("ls",)):
            assert ipcctl_as(fd_users.owner, tmp_name, *command).returncode == 69, command
    finally:
        seen = impostor.seen()
    assert seen == {"connections": 0, "bytes": 0, "datagrams": 0}


def test_an_impostor_in_a_trusted_dir_is_known_by_its_peer_credentials(
    fd_users: FdUsers, open_tmp: Path, tmp_name: Path
) -> None:
    """The attacker won a rename: its sockets are in a dir of root's (moved
    there by root here: rename(2) keeps the inode, so connect() reaches the
    attacker's socket). The way is safe; the listener is not the daemon."""
    socket_dir = open_tmp / "s"
    socket_dir.mkdir(mode=0o755)
    impostor = Impostor.start(fd_users.other, tmp_name, make_dir=True)
    try:
        for name in ("stream.sock", "dgram.sock"):
            os.rename(tmp_name / name, socket_dir / name)
        tail = (
            f"{described(fd_users.other)}, not by root; it may be an impostor, nothing was sent to it: "
            f"pass --daemon-uid {fd_users.other.pw_uid} (or set IPCD_DAEMON_UID) if you trust that user"
        )
        stream = ipcctl_as(fd_users.owner, socket_dir, "echo", "hi")
        assert one_line(stream, 69) == f"ipcctl: {socket_dir}/stream.sock is served by {tail}"
        dgram = ipcctl_as(fd_users.owner, socket_dir, "echo", "--dgram", "hi")
        assert one_line(dgram, 69) == f"ipcctl: {socket_dir}/dgram.sock is bound by {tail}"
        assert ipcctl_as(fd_users.owner, socket_dir, "send", "--room", "dev", "secret").returncode == 69
    finally:
        seen = impostor.seen()
    # The stream clients connected (that is how SO_PEERCRED is read) and sent nothing.
    assert seen == {"connections": 2, "bytes": 0, "datagrams": 0}


def test_an_impostor_in_a_user_s_own_dir_is_refused_naming_whom_the_client_expected(
    fd_users: FdUsers, open_tmp: Path, tmp_name: Path
) -> None:
    owner, other = fd_users.owner, fd_users.other
    socket_dir = open_tmp / "s"
    socket_dir.mkdir(mode=0o755)
    os.chown(socket_dir, owner.pw_uid, -1)
    impostor = Impostor.start(other, tmp_name, make_dir=True)
    try:
        os.rename(tmp_name / "stream.sock", socket_dir / "stream.sock")
        by_default = ipcctl_as(owner, socket_dir, "echo", "hi")
        assert one_line(by_default, 69).startswith(
            f"ipcctl: {socket_dir}/stream.sock is served by {described(other)}, "
            f"not by root or {described(owner)}, the socket dir's owner; it may be an impostor"
        )
        named = ipcctl_as(fd_users.friend, socket_dir, "--daemon-uid", str(owner.pw_uid), "echo", "hi")
        assert f"not by root or {described(owner)}, the --daemon-uid;" in one_line(named, 69)
    finally:
        seen = impostor.seen()
    assert seen == {"connections": 2, "bytes": 0, "datagrams": 0}


def _forge_reply(address: bytes, request_id: int) -> int:  # pragma: no cover - child
    """0 if the forged answer went out, else its errno."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(encode_frame(reply_op(Op.ECHO), request_id, b"forged"), address)
        except OSError as exc:
            return exc.errno or -1
    return 0


def test_a_forged_datagram_answer_cannot_reach_the_client(fd_users: FdUsers, open_tmp: Path) -> None:
    """Anyone can find a client's autobound address (in /proc/net/unix) and
    request ids count from 1. The client's socket is connected to
    dgram.sock, so the kernel refuses datagrams from any other socket: only
    the one whose owner was checked can answer."""
    socket_dir = open_tmp / "s"
    socket_dir.mkdir(mode=0o755)
    daemon = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # root's: a daemon that answers late
    daemon.bind(str(socket_dir / "dgram.sock"))
    daemon.settimeout(20)
    with daemon:
        client = subprocess.Popen(
            [*IPCCTL, "--socket-dir", str(socket_dir), "echo", "--dgram", "hi"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            request, address = daemon.recvfrom(65536)
            frame = decode_record(request, ())
            assert (frame.op, frame.body) == (Op.ECHO, b"hi")
            forged = as_user(fd_users.other, _forge_reply, address, frame.request_id)
            assert forged.value == errno.EPERM, forged
            daemon.sendto(encode_frame(reply_op(Op.ECHO), frame.request_id, b"genuine"), address)
        finally:
            out, err = client.communicate(timeout=20)
    assert (client.returncode, out, err) == (0, "genuine\n", "")


# -- a socket dir under a directory others can write ----------------------------------


def _make_unsafe(parent: Path, how: str, other: pwd.struct_passwd) -> str:
    """Open ``parent`` to the attacker; the problem clause the errors give."""
    if how == "world-writable":
        parent.chmod(0o777)
        return f"{parent} is writable by others (mode 0777)"
    os.chown(parent, other.pw_uid, -1)
    parent.chmod(0o1777)
    return f"{parent} is a directory owned by {described(other)}"


@pytest.mark.parametrize("how", ["world-writable", "sticky but another user's"])
def test_a_socket_dir_under_a_dir_others_can_write_is_refused_by_ipcd_and_ipcctl(
    fd_users: FdUsers, open_tmp: Path, how: str
) -> None:
    parent = open_tmp / "p"
    parent.mkdir(mode=0o755)
    socket_dir = parent / "s"
    daemon = Daemon(socket_dir, workers=1).start()  # started while the parent was safe
    try:
        problem = _make_unsafe(parent, how, fd_users.other)
        who = "anyone" if how == "world-writable" else "that user"
        advice = (
            f"run 'chmod go-w {parent}' or choose another --socket-dir"
            if how == "world-writable"
            else "choose a --socket-dir whose parents only root can change"
        )
        other_dir = parent / "s2"
        refusal = assert_refused(serve(other_dir))
        assert (
            refusal
            == f"ipcd: socket dir {other_dir} is unsafe: {problem}, so {who} could replace it; {advice}"
        )
        assert not other_dir.exists(), "the refused daemon created its socket dir"
        for result in (
            ipcctl_as(fd_users.owner, socket_dir, "echo", "hi"),
            ipcctl_root(socket_dir, "echo", "hi"),
        ):
            line = one_line(result, 69)
            assert line.startswith(f"ipcctl: cannot trust {socket_dir}/stream.sock: {problem}"), line
        dgram = ipcctl_as(fd_users.owner, socket_dir, "echo", "--dgram", "hi")
        assert f"cannot trust {socket_dir}/dgram.sock: {problem}" in one_line(dgram, 69)
    finally:
        os.chown(parent, 0, -1)
        parent.chmod(0o755)
        assert daemon.stop() == 0


def test_a_socket_dir_reached_through_another_user_s_symlink_is_refused(
    fd_users: FdUsers, daemon: Daemon, tmp_name: Path
) -> None:
    """A symlink in sticky /tmp can be replaced by its owner: where it
    points today is no promise."""
    daemon.socket_dir.parent.chmod(0o755)
    assert as_user(fd_users.other, os.symlink, str(daemon.socket_dir.parent), str(tmp_name)).ok
    problem = f"{tmp_name} is a symlink owned by {described(fd_users.other)}"
    through = tmp_name / daemon.socket_dir.name
    assert problem in one_line(ipcctl_as(fd_users.owner, through, "echo", "hi"), 69)
    refusal = assert_refused(serve(tmp_name / "s2"))
    assert f"ipcd: socket dir {tmp_name}/s2 is unsafe: {problem}, so that user could replace it" in refusal
    assert not (daemon.socket_dir.parent / "s2").exists()
    assert ipcctl_as(fd_users.owner, daemon.socket_dir, "echo", "hi").stdout == "hi\n"  # the real path


# -- the normal cases keep working -------------------------------------------------------


def test_a_root_daemon_serves_an_unprivileged_user(fd_users: FdUsers, daemon: Daemon) -> None:
    daemon.socket_dir.parent.chmod(0o755)
    for args in (("echo", "hi"), ("echo", "--dgram", "hi")):
        result = ipcctl_as(fd_users.owner, daemon.socket_dir, *args)
        assert (result.returncode, result.stdout, result.stderr) == (0, "hi\n", ""), args


def _serve_as_user(socket_dir: str, log_fd: int) -> object:  # pragma: no cover - child
    """``ipcd serve`` in this (forked, already unprivileged) process; its exit status."""
    from ipcd.cli.ipcd import cli  # noqa: PLC0415 - imported by the test before the fork

    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    sys.stdout = sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - pytest replaced the streams
    try:
        # its history journal next to its socket dir, in the user's own dir
        args = ["serve", "--socket-dir", socket_dir, "--state-dir", f"{socket_dir}.state", "--workers", "1"]
        cli.main(args=args, prog_name="ipcd")
    except SystemExit as exc:
        return exc.code
    return None


def test_a_user_s_own_daemon_serves_them_and_others_who_name_it(
    fd_users: FdUsers, tmp_name: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real ``ipcd serve`` run as ``owner`` in a dir ``owner`` made in
    /tmp: ``owner`` is served by default; ``friend`` and root are refused
    until they name ``owner`` as the daemon's user (--daemon-uid, or
    IPCD_DAEMON_UID)."""
    import ipcd.cli.ipcd  # noqa: PLC0415 - the user cannot import from root's 0700 home
    import ipcd.server.master  # noqa: F401, PLC0415

    owner = fd_users.owner
    assert as_user(owner, os.mkdir, str(tmp_name), 0o755).ok
    socket_dir = tmp_name / "s"
    log = short_tmp / "ipcd.log"
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    served = start_as(owner, _serve_as_user, str(socket_dir), log_fd, keep=(log_fd,))
    os.close(log_fd)
    try:
        wait_for(
            lambda: (socket_dir / "dgram.sock").exists() and (socket_dir / "stream.sock").exists(), 15, "ipcd"
        )
        assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o755
        assert socket_dir.stat().st_uid == owner.pw_uid
        for args in (("echo", "hi"), ("echo", "--dgram", "hi")):
            result = ipcctl_as(owner, socket_dir, *args)
            assert (result.returncode, result.stdout, result.stderr) == (0, "hi\n", ""), (
                args,
                log.read_text(),
            )
        refused = ipcctl_as(fd_users.friend, socket_dir, "echo", "hi")
        assert f"{tmp_name} is a directory owned by {described(owner)}, not by root or you" in one_line(
            refused, 69
        )
        assert ipcctl_root(socket_dir, "echo", "hi").returncode == 69
        with Client(socket_dir, daemon_uid=owner.pw_uid) as client:  # the library's way to say it
            assert client.echo(b"root") == b"root"
        named = ipcctl_as(fd_users.friend, socket_dir, "--daemon-uid", owner.pw_name, "echo", "--dgram", "hi")
        assert (named.returncode, named.stdout) == (0, "hi\n"), named.stderr
        monkeypatch.setenv("IPCD_DAEMON_UID", str(owner.pw_uid))
        assert ipcctl_root(socket_dir, "echo", "hi").stdout == "hi\n"
        assert ipcctl_as(fd_users.friend, socket_dir, "echo", "hi").stdout == "hi\n"
        # Naming the daemon's user does not make a third user trusted.
        monkeypatch.setenv("IPCD_DAEMON_UID", fd_users.other.pw_name)
        assert ipcctl_root(socket_dir, "echo", "hi").returncode == 69
    finally:
        pid_text = (socket_dir / ".lock").read_text().strip() if (socket_dir / ".lock").exists() else ""
        if pid_text:
            os.kill(int(pid_text), 15)
        outcome = served.result(timeout=20)
    assert outcome.value == 0, (outcome, log.read_text())
    assert "ipcd stopped" in log.read_text()


def test_an_unknown_daemon_user_is_a_usage_error(daemon: Daemon) -> None:
    result = ipcctl_root(daemon.socket_dir, "--daemon-uid", "ipcd-no-such-user", "echo", "hi")
    assert result.returncode == 2, result.stderr
    assert "no such user: 'ipcd-no-such-user'" in result.stderr
