"""Who may get, take, replace and remove a stored fd: real users, real
kernel credentials.

Three users made with useradd (an owner, a friend who is a supplementary
member of a group, an unrelated other) act through forked children that
dropped their privileges before connecting; root acts from the test
process. What is handed around is a memfd with a known content, so "got
it" means "read the owner's bytes", not just "an answer came". After every
step the daemon holds exactly the stored fds (:class:`FdLedger`).
"""

from __future__ import annotations

import os
import pwd
import select
import subprocess
from typing import Any

from ipcd import fdpass
from ipcd.client import Client
from ipcd.protocol import Op, encode_json
from tests.daemon import Pipes, ipcctl
from tests.handoff.users import (
    FdLedger,
    FdUsers,
    Outcome,
    StartDaemon,
    as_user,
    ipcctl_as,
    start_as,
)

pytest_plugins = ["tests.handoff.users"]

SECRET = b"the owner's secret\n"


# -- what the users' children do ---------------------------------------------------


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 65536, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def put_secret(socket_dir: str, name: str, content: bytes, **options: Any) -> dict[str, Any]:
    fd = os.memfd_create("secret")
    try:
        os.write(fd, content)
        with Client(socket_dir, timeout=10) as client:
            return client.put(name, [fd], **options)
    finally:
        os.close(fd)


def put_fd(socket_dir: str, name: str, fd: int, **options: Any) -> dict[str, Any]:
    with Client(socket_dir, timeout=10) as client:
        return client.put(name, [fd], **options)


def fetch(socket_dir: str, name: str, take: bool = False) -> bytes:
    """GET (or TAKE) ``name`` and read what the fd holds."""
    with Client(socket_dir, timeout=10) as client:
        handoff = client.take(name) if take else client.get(name)
    try:
        assert len(handoff.fds) == 1
        return _read_all(handoff.fds[0])
    finally:
        fdpass.close_fds(handoff.fds)


def listing(socket_dir: str) -> dict[str, Any]:
    with Client(socket_dir, timeout=10) as client:
        return client.ls()


def remove(socket_dir: str, name: str) -> None:
    with Client(socket_dir, timeout=10) as client:
        client.rm(name)


def wait_then_fetch(socket_dir: str, name: str, take: bool, ready_fd: int) -> bytes:
    """A waiting GET or TAKE; one byte on ``ready_fd`` once the store has
    queued it (an LS behind it on the same connection has been answered)."""
    op = Op.TAKE if take else Op.GET
    with Client(socket_dir, timeout=20) as client:
        request_id = client.send(op, encode_json({"name": name, "wait": 15}))
        client.request(Op.LS, b"{}")
        os.write(ready_fd, b"!")
        reply = client.wait_reply(request_id)
    try:
        assert len(reply.fds) == 1
        return _read_all(reply.fds[0])
    finally:
        fdpass.close_fds(reply.fds)


def _denied(outcome: Outcome, user: pwd.struct_passwd, *needles: str) -> None:
    assert outcome.code == "PERMISSION_DENIED", f"{user.pw_name}: expected a refusal, got {outcome}"
    for needle in needles:
        assert needle in outcome.message, f"{needle!r} not in {outcome.message!r}"


def _one_line_refusal(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """ipcctl exit 1 with exactly one line on stderr holding every needle."""
    assert result.returncode == 1, f"exit {result.returncode}; stderr: {result.stderr!r}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {result.stderr!r}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert result.stdout == ""
    return lines[0]


# -- get and take ------------------------------------------------------------------


def test_only_the_owner_and_root_may_get_by_default(start_daemon: StartDaemon, fd_users: FdUsers) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    sock_dir = str(daemon.socket_dir)
    owner, friend, other = fd_users.owner, fd_users.friend, fd_users.other

    stored = as_user(owner, put_secret, sock_dir, "secret", SECRET)
    assert stored.value == {"name": "secret", "count": 1, "replaced": False}
    ledger.expect(1)

    for user in (friend, other):
        for take in (False, True):
            _denied(
                as_user(user, fetch, sock_dir, "secret", take),
                user,
                f"uid {user.pw_uid} may not use 'secret' (owner uid {owner.pw_uid})",
                "--allow-uid",
            )
            ledger.expect(1)
        assert as_user(user, listing, sock_dir).value["entries"] == [], "ls shows what one may not get"

    mine = as_user(owner, listing, sock_dir).value
    assert [e["name"] for e in mine["entries"]] == ["secret"]
    assert mine["entries"][0]["owner"] == owner.pw_uid
    assert mine["quota"]["used"] == 1
    assert as_user(owner, fetch, sock_dir, "secret").value == SECRET
    ledger.expect(1)
    assert fetch(sock_dir, "secret") == SECRET  # root, from the test process
    ledger.expect(1)
    assert fetch(sock_dir, "secret", take=True) == SECRET
    ledger.expect(0)


def test_allow_uid_admits_that_user_only(start_daemon: StartDaemon, fd_users: FdUsers) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    sock_dir = str(daemon.socket_dir)
    friend, other = fd_users.friend, fd_users.other

    assert as_user(fd_users.owner, put_secret, sock_dir, "s", SECRET, allow_uids=[friend.pw_uid]).ok
    ledger.expect(1)
    _denied(as_user(other, fetch, sock_dir, "s"), other, "may not use 's'")
    assert as_user(friend, fetch, sock_dir, "s").value == SECRET
    ledger.expect(1)
    _denied(as_user(other, fetch, sock_dir, "s", True), other, "may not use 's'")
    ledger.expect(1)
    assert as_user(friend, fetch, sock_dir, "s", True).value == SECRET
    ledger.expect(0)
    assert as_user(fd_users.owner, listing, sock_dir).value["quota"]["used"] == 0


def test_allow_gid_admits_supplementary_members(start_daemon: StartDaemon, fd_users: FdUsers) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    sock_dir = str(daemon.socket_dir)
    friend, other, group = fd_users.friend, fd_users.other, fd_users.group
    assert friend.pw_gid != group.gr_gid, "the friend must be a member only through supplementary groups"

    assert as_user(fd_users.owner, put_secret, sock_dir, "g", SECRET, allow_gids=[group.gr_gid]).ok
    ledger.expect(1)
    assert [e["name"] for e in as_user(friend, listing, sock_dir).value["entries"]] == ["g"]
    assert as_user(friend, fetch, sock_dir, "g").value == SECRET
    ledger.expect(1)
    _denied(as_user(other, fetch, sock_dir, "g"), other, "may not use 'g'")
    assert as_user(friend, fetch, sock_dir, "g", True).value == SECRET
    ledger.expect(0)


def test_public_admits_every_user(start_daemon: StartDaemon, fd_users: FdUsers) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    sock_dir = str(daemon.socket_dir)
    other = fd_users.other

    assert as_user(fd_users.owner, put_secret, sock_dir, "pub", SECRET, public=True).ok
    ledger.expect(1)
    seen = as_user(other, listing, sock_dir).value
    assert [(e["name"], e["public"]) for e in seen["entries"]] == [("pub", True)]
    assert seen["quota"]["used"] == 0, "the entry is charged to its owner, not to who sees it"
    assert as_user(other, fetch, sock_dir, "pub").value == SECRET
    ledger.expect(1)
    assert as_user(other, fetch, sock_dir, "pub", True).value == SECRET
    ledger.expect(0)
    assert as_user(fd_users.owner, listing, sock_dir).value == {
        "entries": [],
        "quota": {"used": 0, "quota": 64},
    }


def test_a_waiter_gets_only_what_it_may(start_daemon: StartDaemon, fd_users: FdUsers) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    sock_dir = str(daemon.socket_dir)
    friend, other = fd_users.friend, fd_users.other
    ready_r, ready_w = os.pipe()
    try:
        waiters = []
        for user, take in ((friend, False), (other, True)):
            waiters.append(start_as(user, wait_then_fetch, sock_dir, "later", take, ready_w, keep=[ready_w]))
            assert select.select([ready_r], [], [], 15)[0], f"{user.pw_name}'s waiter never got queued"
            assert os.read(ready_r, 1) == b"!"
    finally:
        os.close(ready_r)
        os.close(ready_w)
    assert as_user(fd_users.owner, put_secret, sock_dir, "later", SECRET, allow_uids=[friend.pw_uid]).ok
    assert waiters[0].result().value == SECRET
    _denied(waiters[1].result(), other, f"uid {other.pw_uid} may not use 'later'")
    ledger.expect(1)  # the refused TAKE took nothing


# -- replace and remove ------------------------------------------------------------


def test_a_name_of_another_user_cannot_be_replaced(start_daemon: StartDaemon, fd_users: FdUsers) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    sock_dir = str(daemon.socket_dir)
    owner, friend = fd_users.owner, fd_users.friend

    with Pipes(1) as first:
        put = as_user(
            owner,
            put_fd,
            sock_dir,
            "svc",
            first.write_ends[0],
            allow_uids=[friend.pw_uid],
            keep=first.write_ends,
        )
        assert put.ok, put
        first.drop_write_ends()
        ledger.expect(1)
        # Even a user allowed to get it may not replace it, with or without --replace.
        for replace in (True, False):
            with Pipes(1) as intruder:
                tried = as_user(
                    friend,
                    put_fd,
                    sock_dir,
                    "svc",
                    intruder.write_ends[0],
                    replace=replace,
                    keep=intruder.write_ends,
                )
                _denied(tried, friend, f"'svc' belongs to uid {owner.pw_uid}")
                intruder.drop_write_ends()
                intruder.assert_closed_elsewhere()  # the refused fd was closed, not kept
            ledger.expect(1)
            assert first.held_elsewhere(), "a refused replace must leave the entry alone"
        # The owner may replace it; the old fd is closed.
        with Pipes(1) as second:
            again = as_user(
                owner, put_fd, sock_dir, "svc", second.write_ends[0], replace=True, keep=second.write_ends
            )
            assert again.value == {"name": "svc", "count": 1, "replaced": True}
            second.drop_write_ends()
            first.assert_closed_elsewhere()
            ledger.expect(1)
            # Without --replace, even the owner is told it exists.
            with Pipes(1) as dup:
                tried = as_user(owner, put_fd, sock_dir, "svc", dup.write_ends[0], keep=dup.write_ends)
                assert tried.code == "EXISTS", tried
                assert "--replace" in tried.message
                dup.drop_write_ends()
                dup.assert_closed_elsewhere()
            ledger.expect(1)
            # Root may replace anyone's; the entry (and its charge) become root's.
            with Pipes(1) as third:
                with Client(sock_dir, timeout=10) as client:
                    assert client.put("svc", third.write_ends, replace=True)["replaced"] is True
                third.drop_write_ends()
                second.assert_closed_elsewhere()
                ledger.expect(1)
                (entry,) = listing(sock_dir)["entries"]
                assert entry["owner"] == 0
                assert as_user(owner, listing, sock_dir).value["quota"]["used"] == 0
                remove(sock_dir, "svc")
                third.assert_closed_elsewhere()
    ledger.expect(0)


def test_only_the_owner_or_root_may_remove(start_daemon: StartDaemon, fd_users: FdUsers) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    sock_dir = str(daemon.socket_dir)
    owner, friend, other = fd_users.owner, fd_users.friend, fd_users.other

    with Pipes(2) as pipes:
        for name, fd in zip(("a", "b"), pipes.write_ends, strict=True):
            assert as_user(owner, put_fd, sock_dir, name, fd, allow_uids=[friend.pw_uid], keep=[fd]).ok
        pipes.drop_write_ends()
        ledger.expect(2)
        for user in (friend, other):  # allowed to get it or not, no one else removes it
            _denied(as_user(user, remove, sock_dir, "a"), user, "only it or root may remove it")
            ledger.expect(2)
        assert pipes.held_elsewhere()
        assert as_user(owner, remove, sock_dir, "a").ok
        pipes.some(0).assert_closed_elsewhere()
        ledger.expect(1)
        remove(sock_dir, "b")  # root
        pipes.some(1).assert_closed_elsewhere()
        ledger.expect(0)
        gone = as_user(owner, remove, sock_dir, "b")
        assert gone.code == "NOT_FOUND", gone


# -- the same refusals through ipcctl --------------------------------------------------


def test_ipcctl_refusals_as_other_users(start_daemon: StartDaemon, fd_users: FdUsers) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    sock_dir = daemon.socket_dir
    owner, friend, other = fd_users.owner, fd_users.friend, fd_users.other

    memfd = os.memfd_create("secret")
    try:
        os.write(memfd, SECRET)
        put = ipcctl_as(owner, sock_dir, "put", "secret", "--fd", str(memfd), keep=[memfd])
        assert (put.returncode, put.stdout, put.stderr) == (0, "", "")
        ledger.expect(1)
        for user, verb in ((friend, "get"), (other, "take"), (friend, "take"), (other, "get")):
            line = _one_line_refusal(
                ipcctl_as(user, sock_dir, verb, "secret"),
                "refused",
                f"uid {user.pw_uid} may not use 'secret'",
                "PERMISSION_DENIED",
            )
            assert line.startswith("ipcctl: ")
            ledger.expect(1)
        _one_line_refusal(ipcctl_as(other, sock_dir, "rm", "secret"), "only it or root", "PERMISSION_DENIED")
        _one_line_refusal(
            ipcctl_as(friend, sock_dir, "put", "secret", "--fd", str(memfd), "--replace", keep=[memfd]),
            f"belongs to uid {owner.pw_uid}",
            "PERMISSION_DENIED",
        )
        ledger.expect(1)
        _one_line_refusal(ipcctl_as(other, sock_dir, "get", "nothing-here"), "NOT_FOUND", "ipcctl ls")
    finally:
        os.close(memfd)

    seen = ipcctl_as(other, sock_dir, "ls")
    assert seen.returncode == 0, seen
    assert "secret" not in seen.stdout
    mine = ipcctl_as(owner, sock_dir, "ls")
    assert mine.returncode == 0, mine
    (row,) = [line for line in mine.stdout.splitlines() if line.startswith("secret ")]
    assert owner.pw_name in row
    assert "memfd /memfd:secret" in row
    assert "your stored fds: 1 of 64" in mine.stdout

    got = ipcctl(sock_dir, "get", "secret")  # root: the real ipcctl, in a subprocess
    assert (got.returncode, got.stdout, got.stderr) == (0, SECRET.decode(), "")
    ledger.expect(1)
    removed = ipcctl_as(owner, sock_dir, "rm", "secret")
    assert (removed.returncode, removed.stdout, removed.stderr) == (0, "", "")
    ledger.expect(0)


def test_ipcctl_allow_by_user_and_group_name(start_daemon: StartDaemon, fd_users: FdUsers) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    sock_dir = daemon.socket_dir
    owner, friend, other = fd_users.owner, fd_users.friend, fd_users.other

    memfd = os.memfd_create("shared")
    try:
        os.write(memfd, SECRET)
        for name, flag, value in (
            ("by-user", "--allow-uid", friend.pw_name),
            ("by-group", "--allow-gid", fd_users.group.gr_name),
        ):
            put = ipcctl_as(owner, sock_dir, "put", name, "-", flag, value, stdin_fd=memfd)  # PATH '-': stdin
            assert (put.returncode, put.stderr) == (0, ""), put
    finally:
        os.close(memfd)
    ledger.expect(2)
    for name in ("by-user", "by-group"):
        got = ipcctl_as(friend, sock_dir, "get", name)
        assert (got.returncode, got.stdout, got.stderr) == (0, SECRET.decode(), ""), got
        _one_line_refusal(ipcctl_as(other, sock_dir, "get", name), "PERMISSION_DENIED")
        ledger.expect(2)
    taken = ipcctl_as(friend, sock_dir, "take", "by-group")
    assert (taken.returncode, taken.stdout) == (0, SECRET.decode()), taken
    ledger.expect(1)
    assert ipcctl(sock_dir, "rm", "by-user").returncode == 0
    ledger.expect(0)
