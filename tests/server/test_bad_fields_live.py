"""Request fields out of range against a real daemon: NaN, Infinity, 1e999,
negative and 400-digit numbers, bools for numbers, fields over their
length. Each gets a one-line BAD_REQUEST naming what is wrong, with its own
request id, on a connection that stays open; nothing is parked, stored or
created; a PUT's fd is closed by the daemon; and another client is served
between every two of them. At the end the daemon's fd counts are back to
their baseline (the helpers of test_bad_input)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from ipcd.client import DatagramClient, ServerError
from ipcd.protocol import ErrorCode, Op, encode_frame
from tests.daemon import Daemon, Pipes, ipcctl
from tests.server.test_bad_input import FdBaseline, Raw, assert_error

HUGE = str(10**400)
# (op, body, what the error message must name)
BAD_REQUESTS: list[tuple[Op, str, str]] = [
    (Op.GET, '{"name":"rdv","wait":NaN}', "NaN"),
    (Op.GET, '{"name":"rdv","wait":1e999}', "1e999"),
    (Op.TAKE, '{"name":"rdv","wait":-Infinity}', "Infinity"),
    (Op.GET, '{"name":"rdv","wait":-1}', "wait"),
    (Op.TAKE, '{"name":"rdv","wait":' + HUGE + "}", "wait"),
    (Op.GET, '{"name":"rdv","wait":true}', "wait"),
    (Op.JOIN, '{"room":"lobby","history":1e999}', "1e999"),
    (Op.JOIN, '{"room":"fresh","history":' + HUGE + "}", "history"),
    (Op.HISTORY, '{"room":"lobby","count":2.5}', "count"),
    (Op.HISTORY, '{"room":"nowhere","before":-1}', "before"),
    (Op.SAY, '{"room":"lobby","text":"hi","extra":NaN}', "NaN"),
    (Op.TOPIC, '{"room":"lobby","topic":"' + "t" * 257 + '"}', "topic"),
    (Op.NICK, '{"nick":"' + "n" * 33 + '"}', "nick"),
    (Op.RM, '{"name":"' + "x" * 129 + '"}', "name"),
]
BAD_PUTS: list[tuple[str, str]] = [
    ('{"name":"bad-ttl","ttl":NaN}', "NaN"),
    ('{"name":"bad-ttl","ttl":' + HUGE + "}", "ttl"),
    ('{"name":"bad-public","public":"no"}', "public"),
    ('{"name":"bad-uids","allow_uids":[true]}', "allow_uids"),
    ('{"name":"bad-names","names":["' + "f" * 256 + '"]}', "names"),
]


def _other_client_is_served(daemon: Daemon, round_: int) -> None:
    with daemon.client() as other:
        assert other.echo(b"ok %d" % round_) == b"ok %d" % round_
        assert other.say("lobby", f"still here {round_}") > 0


def test_fields_out_of_range_are_refused_and_others_served(daemon: Daemon) -> None:
    baseline = FdBaseline(daemon)
    with Raw(daemon) as attacker, Pipes(len(BAD_PUTS)) as pipes:
        for request_id, (op, body, named) in enumerate(BAD_REQUESTS, start=1):
            attacker.send(encode_frame(op, request_id, body.encode()))
            message = assert_error(attacker.frame(), ErrorCode.BAD_REQUEST, request_id)
            assert named in message, message
            assert "\n" not in message
            _other_client_is_served(daemon, request_id)
        for index, (body, named) in enumerate(BAD_PUTS):
            request_id = 100 + index
            fd = pipes.write_ends[index]
            attacker.send(encode_frame(Op.PUT, request_id, body.encode(), nfds=1), [fd])
            message = assert_error(attacker.frame(), ErrorCode.BAD_REQUEST, request_id)
            assert named in message, message
        pipes.drop_write_ends()
        pipes.assert_closed_elsewhere()  # the daemon kept no copy of a refused PUT's fd
        # Nothing was parked for "rdv": a PUT of it serves no waiter, so the
        # attacker gets nothing more and the entry stays for a GET.
        reader, writer = os.pipe()
        try:
            with daemon.client() as other:
                assert other.put("rdv", [writer])["count"] == 1
                for fd in other.get("rdv").fds:
                    os.close(fd)
                other.rm("rdv")
        finally:
            os.close(reader)
            os.close(writer)
        attacker.echo(999, b"after")  # the next frame on this connection is the echo's reply
        status = daemon.status()
        assert status["store"] == {"entries": 0, "stored_fds": 0, "waiters": 0}
        with daemon.client() as other:
            rooms = {r["room"] for r in other.rooms()}
        assert rooms.isdisjoint({"fresh", "nowhere"}), rooms
    baseline.assert_restored()


@pytest.mark.parametrize(
    "args",
    [
        ["--fd", "99999999999999999999"],
        ["--backlog", "99999999999999999999", "--listen", "0"],
        ["--allow-uid", "4294967295", "/dev/null"],
        ["--allow-gid", str(10**30), "/dev/null"],
    ],
)
def test_ipcctl_put_refuses_a_number_past_its_range_with_one_line(socket_dir: Path, args: list[str]) -> None:
    """A 20-digit fd or backlog was an OverflowError traceback."""
    done = ipcctl(socket_dir, "put", "x", *args)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr
    assert "up to" in done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("seconds", [math.nan, math.inf, -1.0, 10**400])
def test_the_client_library_refuses_a_wait_or_ttl_out_of_range_before_sending(
    daemon: Daemon, seconds: float
) -> None:
    with daemon.client() as client:
        with pytest.raises(ValueError, match="wait must be a number of seconds"):
            client.get("x", wait=seconds)
        with pytest.raises(ValueError, match="ttl must be a number of seconds"):
            client.put("x", [0], ttl=seconds)
        assert client.echo(b"same connection") == b"same connection"
        assert client.ls()["entries"] == []


def test_a_datagram_say_with_nan_is_refused_with_its_id(daemon: Daemon) -> None:
    with DatagramClient(daemon.socket_dir, timeout=10) as dgram:
        with pytest.raises(ServerError) as caught:
            dgram.request(Op.SAY, b'{"room":"lobby","text":"hi","n":NaN}')
        assert caught.value.code == ErrorCode.BAD_REQUEST
        assert "NaN" in str(caught.value)
        assert dgram.say("lobby", "fine") > 0


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999", "1e10"])
def test_ipcctl_refuses_a_wait_that_is_not_a_finite_number_in_range(socket_dir: Path, value: str) -> None:
    """Before it connects: no daemon is running here."""
    done = ipcctl(socket_dir, "get", "x", "--wait", value)
    assert done.returncode == 2, done
    error = done.stderr.strip().splitlines()[-1]
    assert "--wait" in error
    assert value in error
    done = ipcctl(socket_dir, "put", "x", "--ttl", value, "/dev/null")
    assert done.returncode == 2, done
    assert "--ttl" in done.stderr.strip().splitlines()[-1]
