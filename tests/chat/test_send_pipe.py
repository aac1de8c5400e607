"""Pipes of lines into chat: every line arrives, in order; floods are slowed.

What a script sees: ``seq 20000 | ipcctl send`` delivers every line once, in
order, and exits 0 with the default settings; a line written to a pipe that
stays open is delivered at once (``tail -f | ipcctl send``). What the limiter
does: a stream client past its uid's share is *held* (the daemon stops
reading it until tokens refill), never refused; the share is one per uid, so
two connections of one user get one rate between them, and another user is
served meanwhile; a client that hangs up while held leaves no fd behind.
Durations are asserted only as lower bounds (what the limit implies);
speeds are printed, not asserted (see ``benchmarks --only send-pipe``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ipcd.client import Client, ServerError
from ipcd.protocol import Op, decode_json, encode_frame, encode_json
from tests.chat.conftest import Spawn, StartDaemon
from tests.chat.users import ChatUser, nicks_in
from tests.daemon import IPCCTL, Daemon, ipcctl, wait_for
from tests.server.test_bad_input import FdBaseline


def send_all(client: Client, room: str, texts: list[str]) -> list[int]:
    """Pipeline a SAY for each text (all sent before any reply is read)."""
    return [client.send(Op.SAY, encode_json({"room": room, "text": text})) for text in texts]


def seqs_of(client: Client, request_ids: list[int]) -> list[int]:
    """The seq acknowledged for each request, in order (ServerError if refused)."""
    return [int(decode_json(client.wait_reply(request_id).body)["seq"]) for request_id in request_ids]


def holds(daemon: Daemon, at_least: int = 1) -> int:
    """The workers' count of connections held back, once it reached ``at_least``."""
    status = daemon.settled_status(lambda s: sum(w["held"] for w in s["workers"]) >= at_least)
    return sum(w["held"] for w in status["workers"])


def test_seq_20000_piped_into_ipcctl_send_arrives_whole_and_in_order(daemon: Daemon, tmp_path: Path) -> None:
    total = 20_000
    base = [*IPCCTL, "--socket-dir", str(daemon.socket_dir)]
    printed = tmp_path / "listen.jsonl"
    with printed.open("w") as out:  # a file, not a pipe: the listener never waits for the test
        listener = subprocess.Popen(
            [*base, "listen", "--json", "-n", str(total), "--room", "logs"],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        wait_for(lambda: nicks_in(daemon, "logs") == ["root"], 10, "ipcctl listen to join logs")
        started = time.monotonic()
        seq = subprocess.Popen(["seq", str(total)], stdout=subprocess.PIPE)
        try:
            sender = subprocess.run(
                [*base, "send", "--room", "logs"],
                stdin=seq.stdout,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        finally:
            assert seq.stdout is not None
            seq.stdout.close()
            seq.wait(10)
        assert sender.returncode == 0, sender.stderr
        _, err = listener.communicate(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate()
    assert (sender.stdout, sender.stderr) == ("", "")
    assert listener.returncode == 0, err
    lines = [json.loads(line) for line in printed.read_text().splitlines()]
    assert [line["text"] for line in lines] == [str(n) for n in range(1, total + 1)]
    assert [line["seq"] for line in lines] == list(range(1, total + 1))
    print(f"\nseq {total} | ipcctl send: {total / elapsed:,.0f} lines/s to a listener ({elapsed:.2f}s)")


def test_a_stream_past_its_share_is_held_not_refused(start_daemon: StartDaemon) -> None:
    daemon = start_daemon("--rate-limit", "200", workers=1)
    with daemon.client() as client:
        started = time.monotonic()
        ids = send_all(client, "burst", [f"line {n}" for n in range(1000)])
        assert seqs_of(client, ids) == list(range(1, 1001))  # none RATE_LIMITED, none reordered
        elapsed = time.monotonic() - started
        # A full bucket holds 400 (2 x rate); the other 600 come at 200/s.
        assert elapsed >= 2.9, f"1000 posts at 200/s took only {elapsed:.2f}s"
        assert client.echo(b"still here") == b"still here"
        assert [m["text"] for m in client.history("burst", 3)] == ["line 997", "line 998", "line 999"]
    assert holds(daemon) >= 1  # the daemon says so too (STATUS, workers[].held)


def test_connections_of_one_uid_share_its_rate_and_another_uid_is_served_meanwhile(
    start_daemon: StartDaemon, actors: Spawn, chat_users: list[ChatUser]
) -> None:
    daemon = start_daemon("--rate-limit", "200", workers=1)  # one worker: one share per uid
    other = actors(chat_users[0])
    other("connect")

    def flood(client: Client, name: str) -> list[int]:
        # Its writes block while the daemon holds it: that is the backpressure.
        return seqs_of(client, send_all(client, "flood", [f"{name} {n}" for n in range(500)]))

    with daemon.client() as first, daemon.client() as second, ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        floods = [pool.submit(flood, first, "first"), pool.submit(flood, second, "second")]
        theirs = other("post", [("flood", f"other {n}") for n in range(20)], timeout=10)
        seqs = [seq for future in floods for seq in future.result(timeout=30)]
        elapsed = time.monotonic() - started
    # 1000 posts of one uid at 200/s after a burst of 400: at least 3 s. Had
    # each connection its own rate, both would be done in 0.5 s.
    assert elapsed >= 2.9, f"two connections of one uid posted 1000 in {elapsed:.2f}s"
    assert sorted(seqs + theirs) == list(range(1, 1021))
    assert theirs == sorted(theirs)
    # The other user was answered while the flood was still being served.
    assert sum(seq > theirs[-1] for seq in seqs) >= 100, (theirs, max(seqs))


def test_a_line_is_delivered_while_the_pipe_stays_open(daemon: Daemon) -> None:
    with daemon.client() as listener:
        listener.join("live")
        sender = subprocess.Popen(
            # --timeout bounds the wait for an answer, not for input: tail -f may be quiet for hours.
            [*IPCCTL, "--socket-dir", str(daemon.socket_dir), "--timeout", "0.5", "send", "--room", "live"],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert sender.stdin is not None
            sender.stdin.write(b"first\n")
            sender.stdin.flush()
            assert listener.next_event(timeout=15).data["text"] == "first"
            assert sender.poll() is None  # still reading its open stdin
            time.sleep(1.0)  # quiet input, twice the --timeout: the scenario itself, not a wait for a signal
            sender.stdin.write(b"second\n")
            sender.stdin.close()
            assert sender.wait(15) == 0, sender.stderr.read() if sender.stderr else ""
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.wait()
            if sender.stderr is not None:
                sender.stderr.close()
        assert listener.next_event(timeout=15).data["text"] == "second"


def test_a_client_that_hangs_up_while_held_leaves_nothing_behind(start_daemon: StartDaemon) -> None:
    daemon = start_daemon("--rate-limit", "5", workers=1)
    fds = FdBaseline(daemon)
    client = daemon.client()
    ids = send_all(client, "held", [f"held {n}" for n in range(100)])
    # The burst of 10, then what 5/s refills: acknowledged, not refused. The
    # other 88 are held in the worker (or unread in the socket) as we leave.
    assert seqs_of(client, ids[:12]) == list(range(1, 13))
    holds(daemon)  # it is being held as it hangs up
    client.close()
    fds.assert_restored()  # within 10 s: posting the other 88 at 5/s would take 18
    log = daemon.log()
    assert "Traceback" not in log, log


def test_a_refused_line_is_reported_by_number_and_the_rest_still_go(daemon: Daemon) -> None:
    too_long = "x" * 20_000  # over the default --max-message of 16K
    sent = ipcctl(daemon.socket_dir, "send", "--json", "-r", "r", input=f"one\n\n{too_long}\nfour\n".encode())
    assert sent.returncode == 1
    assert sent.stderr.splitlines() == [
        "ipcctl: line 3: the daemon refused: message of 20000 bytes is over the limit of 16384 "
        "(LIMIT_EXCEEDED)"
    ]
    acked = [json.loads(line) for line in sent.stdout.splitlines()]
    assert acked == [
        {"room": "r", "to": None, "seq": 1, "text": "one"},
        {"room": "r", "to": None, "seq": 2, "text": "four"},
    ]


def test_send_dgram_posts_one_datagram_per_line(daemon: Daemon) -> None:
    sent = ipcctl(daemon.socket_dir, "send", "--dgram", "--json", "-r", "d", input=b"a\nb\n\nc")
    assert sent.returncode == 0, sent.stderr
    assert [(m["seq"], m["text"]) for m in map(json.loads, sent.stdout.splitlines())] == [
        (1, "a"),
        (2, "b"),
        (3, "c"),
    ]


def test_say_many_pipelines_and_yields_seqs_in_order(daemon: Daemon) -> None:
    with daemon.client() as client:
        seqs = client.say_many("many", [f"m{n}" for n in range(3000)], window=64)
        assert list(seqs) == list(range(1, 3001))
        assert client.echo(b"blocking again") == b"blocking again"  # the poster gave the socket back
        with pytest.raises(ServerError, match="over the limit"):
            list(client.say_many("many", ["fine", "x" * 20_000, "never acknowledged"]))


def test_a_connection_with_256_requests_unanswered_is_held_until_replies_come(daemon: Daemon) -> None:
    """Past 256 requests in the master, a connection is not read until 128
    remain; every request is still answered, in order, none refused."""
    before = holds(daemon, 0)
    with daemon.client() as client:
        ids: list[int] = []
        frames = bytearray()
        for n in range(3000):
            request_id = client.next_request_id()
            ids.append(request_id)
            op, body = (Op.SAY, {"room": "mix", "text": f"m{n}"}) if n % 2 else (Op.ROOMS, {})
            frames += encode_frame(op, request_id, encode_json(body))
        client.sock.sendall(frames)  # one write: the worker decodes far more than 256 at once
        replies = [client.wait_reply(request_id) for request_id in ids]
        assert [r.op for r in replies] == [Op.SAY_REPLY if n % 2 else Op.ROOMS_REPLY for n in range(3000)]
        assert [decode_json(r.body)["seq"] for r in replies[1::2]] == list(range(1, 1501))
        assert client.echo(b"still here") == b"still here"
    # 1500 SAYs are well inside the default share: the holds were for the unanswered requests.
    assert holds(daemon, before + 1) > before


def test_lines_to_a_nick_go_as_private_messages_in_order(daemon: Daemon) -> None:
    with daemon.client() as bob:
        bob.nick("bob")
        sent = ipcctl(daemon.socket_dir, "send", "--to", "bob", "--json", input=b"first\nsecond\n")
        assert sent.returncode == 0, sent.stderr
        acked = [json.loads(line) for line in sent.stdout.splitlines()]
        assert [(a["room"], a["to"], a["text"]) for a in acked] == [
            (None, "bob", "first"),
            (None, "bob", "second"),
        ]
        got = [bob.next_event(timeout=10) for _ in range(2)]
        assert [(e.kind, e.data["text"]) for e in got] == [("private", "first"), ("private", "second")]
        assert [e.data["seq"] for e in got] == [a["seq"] for a in acked]


def test_ctrl_c_while_waiting_for_input_exits_130_quietly(daemon: Daemon) -> None:
    with daemon.client() as listener:
        listener.join("quiet")
        sender = subprocess.Popen(
            [*IPCCTL, "--socket-dir", str(daemon.socket_dir), "send", "--room", "quiet"],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert sender.stdin is not None
        sender.stdin.write(b"before the interrupt\n")
        sender.stdin.flush()
        assert listener.next_event(timeout=15).data["text"] == "before the interrupt"  # it is in its loop
        sender.send_signal(signal.SIGINT)
        _, err = sender.communicate(timeout=15)
    assert sender.returncode == 130
    assert b"Traceback" not in err, err


def test_a_line_over_the_frame_limit_is_named_when_the_daemon_closes(start_daemon: StartDaemon) -> None:
    daemon = start_daemon("--max-frame-size", "1K")
    piped = b"short\n" + b"x" * 2000 + b"\nnever read\n"
    sent = ipcctl(daemon.socket_dir, "send", "--no-retry", "-r", "r", input=piped)
    assert sent.returncode == 69  # the connection is gone: as for an unreachable daemon
    refused, lost = sent.stderr.splitlines()
    assert refused.startswith("ipcctl: line 2: the daemon refused: frame of ")
    assert refused.endswith("exceeds the limit of 1024 (TOO_LARGE)")
    assert "closed the connection" in lost
    assert "may or may not have been posted" in lost


def test_a_retrying_send_reports_the_line_over_the_frame_limit_and_posts_the_rest_once(
    start_daemon: StartDaemon,
) -> None:
    """The daemon answers the oversized frame and closes the connection:
    that answer is kept (the line is not sent again, which would close the
    next connection too), the lines without an answer are resent."""
    daemon = start_daemon("--max-frame-size", "1K")
    piped = b"short\n" + b"x" * 2000 + b"\nafter it\n"
    sent = ipcctl(daemon.socket_dir, "send", "-r", "r", input=piped)
    assert sent.returncode == 1, sent.stderr  # a line was refused
    refusals = [line for line in sent.stderr.splitlines() if "refused" in line]
    assert len(refusals) == 1
    assert refusals[0].startswith("ipcctl: line 2: the daemon refused: frame of ")
    with daemon.client() as client:
        assert [m["text"] for m in client.history("r")] == ["short", "after it"]


def test_a_send_cut_off_by_a_stopping_daemon_says_why_in_json(short_tmp: Path) -> None:
    """The daemon's reason (SHUTTING_DOWN) reaches the JSON error of a send
    whose connection it closed, not a generic CONNECTION_LOST."""
    daemon = Daemon(short_tmp / "s", workers=1).start()
    with daemon.client() as listener:
        listener.join("stopping")
        sender = subprocess.Popen(
            [
                *IPCCTL,
                "--socket-dir",
                str(daemon.socket_dir),
                "--json",
                "send",
                "--no-retry",
                "--room",
                "stopping",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert sender.stdin is not None
            sender.stdin.write("before the stop\n")
            sender.stdin.flush()
            assert listener.next_event(timeout=15).data["text"] == "before the stop"
            assert daemon.stop() == 0
            _, err = sender.communicate(timeout=15)
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.communicate()
    assert sender.returncode == 69, err
    error = json.loads(err.splitlines()[-1])["error"]
    assert error["code"] == "SHUTTING_DOWN", error
