"""GETs answered from a worker's copy of an entry, on a live daemon: once an
RM or TAKE is answered, no worker hands the entry out any more and no copy
is left open; one connection's requests keep their order; the access rule
is the master's, even for a copy; a worker that dies with copies holds
nothing up.

Each test first makes the workers it names hold copies: a GET through the
master leaves one in the requester's worker (ipcd.handoff.replica). Pipes
show the closes: a read end sees EOF only once every copy is closed, so
"no copy left" is checked the moment the answer arrives, not after a wait.
"""

from __future__ import annotations

import os
import signal

import pytest

from ipcd import fdpass
from ipcd.client import Client, ServerError
from ipcd.protocol import ErrorCode, Op, decode_error, encode_json, reply_op
from tests.daemon import Daemon, Pipes, wait_for
from tests.handoff.test_access import SECRET, fetch, put_secret
from tests.handoff.users import FdLedger, FdUsers, StartDaemon, as_user

pytest_plugins = ["tests.handoff.users"]


def _worker_of(client: Client) -> int:
    return int(client.status()["served_by"])


def _clients_on_each_worker(daemon: Daemon) -> dict[int, Client]:
    """One open client per worker (connections land where the master puts them)."""
    workers = set(daemon.worker_pids())
    found: dict[int, Client] = {}
    spare: list[Client] = []
    try:
        for _ in range(64):
            if set(found) == workers:
                break
            client = daemon.client()
            worker = _worker_of(client)
            if worker in found:
                spare.append(client)
            else:
                found[worker] = client
    finally:
        for client in spare:
            client.close()
    assert set(found) == workers, "the master never put a connection on some worker"
    return found


def _get(client: Client, name: str = "e") -> None:
    handoff = client.get(name)
    assert len(handoff.fds) == 1
    fdpass.close_fds(handoff.fds)


def _refused(code: str, client: Client, name: str = "e") -> None:
    with pytest.raises(ServerError) as info:
        client.get(name)
    assert info.value.code_name == code, info.value.message


@pytest.mark.parametrize("removal", ["rm", "take"])
def test_once_an_entry_is_removed_no_worker_hands_it_out(daemon: Daemon, removal: str) -> None:
    clients = _clients_on_each_worker(daemon)
    first, second = clients.values()
    try:
        with Pipes(1) as pipes:
            first.put("e", pipes.write_ends)
            pipes.drop_write_ends()
            for client in (first, second, first, second):  # a copy in each worker, then GETs from it
                _get(client)
            if removal == "rm":
                first.rm("e")
                # Answered: every copy is closed already, in both workers (and the store's).
                assert not pipes.held_elsewhere(), "a worker still holds a copy of a removed entry"
            else:
                fdpass.close_fds(first.take("e").fds)
            for client in (second, first):
                _refused("NOT_FOUND", client)
            # The taken fd itself is closed by each hop right after it passed
            # it on, so the last close may trail the answer by a moment.
            pipes.assert_closed_elsewhere()
    finally:
        for client in clients.values():
            client.close()


def test_a_pipelined_rm_then_get_on_one_connection_keeps_its_order(daemon: Daemon) -> None:
    with Pipes(1) as pipes, daemon.client() as client:
        client.put("e", pipes.write_ends)
        pipes.drop_write_ends()
        _get(client)
        _get(client)  # its worker holds a copy now
        rm_id = client.send(Op.RM, encode_json({"name": "e"}))
        get_id = client.send(Op.GET, encode_json({"name": "e"}))
        answers = [client.receive(), client.receive()]
        assert [(a.request_id, a.op) for a in answers] == [(rm_id, reply_op(Op.RM)), (get_id, Op.ERROR)]
        assert decode_error(answers[1].body)[0] == ErrorCode.NOT_FOUND
        assert not pipes.held_elsewhere()


def test_a_put_then_get_on_one_connection_sees_the_new_entry(daemon: Daemon) -> None:
    with Pipes(2) as pipes, daemon.client() as client:
        client.put("e", pipes.write_ends[:1])
        _get(client)
        _get(client)  # a copy of the first entry in this worker
        client.put("e", pipes.write_ends[1:], replace=True)
        handoff = client.get("e")
        try:
            assert os.fstat(handoff.fds[0]).st_ino == os.fstat(pipes.write_ends[1]).st_ino
        finally:
            fdpass.close_fds(handoff.fds)
        client.rm("e")


def test_a_worker_killed_with_a_copy_holds_no_rm_up(daemon: Daemon) -> None:
    clients = _clients_on_each_worker(daemon)
    (_, keeper_client), (victim, victim_client) = clients.items()
    try:
        with Pipes(1) as pipes:
            keeper_client.put("e", pipes.write_ends)
            pipes.drop_write_ends()
            _get(victim_client)  # the victim's worker holds a copy now
            victim_client.close()
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: victim not in daemon.worker_pids() or None, 10, "the master to see the kill")
            keeper_client.rm("e")  # answered, though the victim never said it closed its copy
            pipes.assert_closed_elsewhere()
    finally:
        for client in clients.values():
            client.close()


def test_a_copy_is_refused_to_whom_the_entry_is_refused(start_daemon: StartDaemon, fd_users: FdUsers) -> None:
    daemon = start_daemon(workers=1)  # every GET meets the one worker's copy
    ledger = FdLedger(daemon)
    sock_dir = str(daemon.socket_dir)
    owner, friend, other, group = fd_users.owner, fd_users.friend, fd_users.other, fd_users.group
    assert as_user(owner, put_secret, sock_dir, "g", SECRET, allow_gids=[group.gr_gid]).ok
    for _ in range(2):
        assert as_user(owner, fetch, sock_dir, "g").value == SECRET
    denied = as_user(other, fetch, sock_dir, "g")
    assert denied.code == "PERMISSION_DENIED", denied
    assert "may not use 'g'" in denied.message
    assert as_user(friend, fetch, sock_dir, "g").value == SECRET  # a supplementary member
    ledger.expect(1)
    assert as_user(owner, fetch, sock_dir, "g", True).value == SECRET
    ledger.expect(0)
