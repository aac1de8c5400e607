"""Workers killed under a running chat: no acknowledged message is lost or
seen twice by a subscriber that reconnects and replays.

kill -9 of a random worker every few hundred milliseconds, two rooms of ten
subscribers each (ipcd.subscription.Subscription: reconnect, rejoin, replay
the history, drop what was already seen), and a publisher that retries a
post whose answer it lost. Every acknowledged (room, seq) must reach every
subscriber of its room exactly once, with its text, and in order; no record
may be corrupted on the way (the worker logs "bad record" if one is), and
the master's fds come back to their baseline. The default suite runs it for
20 s; ``make soak`` for 5 minutes.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from ipcd.client import Client, ClientError, RequestTimeout
from ipcd.subscription import Subscription
from tests.daemon import Daemon, fd_count, wait_for

ROOMS = ("soak-a", "soak-b")
SUBSCRIBERS_PER_ROOM = 10
POSTS_PER_SECOND = 100


class Subscriber(threading.Thread):
    def __init__(self, socket_dir: Path, room: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.room = room
        self.stop = stop
        self.seen: list[tuple[int, str]] = []
        self.missed: list[str] = []
        self.error: BaseException | None = None
        self.sub = Subscription(socket_dir, rooms=[room], timeout=10, on_status=self._status, patience=30)

    def _status(self, line: str) -> None:
        if "missed" in line:
            self.missed.append(line)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    event = self.sub.next_event(timeout=0.2)
                except RequestTimeout:
                    continue
                if event.kind == "message":
                    self.seen.append((int(event.data["seq"]), str(event.data["text"])))
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.sub.close()


class Publisher(threading.Thread):
    """Posts in turn to each room; a post whose answer is lost is retried
    on a new connection (it may then exist twice: only acks count)."""

    def __init__(self, socket_dir: Path, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.socket_dir = socket_dir
        self.stop = stop
        self.acked: dict[str, dict[int, str]] = {room: {} for room in ROOMS}
        self.retries = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        client: Client | None = None
        number = 0
        try:
            while not self.stop.is_set():
                number += 1
                room = ROOMS[number % len(ROOMS)]
                text = f"message {number}"
                while True:
                    try:
                        if client is None:
                            client = Client(self.socket_dir, timeout=10)
                        self.acked[room][client.say(room, text)] = text
                        break
                    except ClientError:
                        self.retries += 1
                        if client is not None:
                            client.close()
                            client = None
                        time.sleep(0.01)
                time.sleep(1 / POSTS_PER_SECOND)
        except BaseException as exc:
            self.error = exc
        finally:
            if client is not None:
                client.close()


@pytest.mark.parametrize(
    "duration",
    [
        pytest.param(20.0, id="20s"),
        pytest.param(300.0, id="5min", marks=[pytest.mark.soak, pytest.mark.timeout(420)]),
    ],
)
def test_kill_9_of_workers_loses_no_acknowledged_message(short_tmp: Path, duration: float) -> None:
    daemon = Daemon(short_tmp / "s", workers=2).start()
    stop_subscribers = threading.Event()
    stop_publisher = threading.Event()
    subscribers = [
        Subscriber(daemon.socket_dir, room, stop_subscribers)
        for room in ROOMS
        for _ in range(SUBSCRIBERS_PER_ROOM)
    ]
    publisher = Publisher(daemon.socket_dir, stop_publisher)
    kills = 0
    try:
        baseline = fd_count(daemon.pid)
        for thread in (*subscribers, publisher):
            thread.start()
        chance = random.Random(9)  # noqa: S311 - which worker to kill, not a secret
        end = time.monotonic() + duration
        while time.monotonic() < end:
            time.sleep(chance.uniform(0.2, 0.5))
            workers = daemon.worker_pids()
            if workers:
                os.kill(chance.choice(workers), signal.SIGKILL)
                kills += 1
        stop_publisher.set()
        publisher.join(30)
        assert publisher.error is None, repr(publisher.error)
        last = {room: max(publisher.acked[room], default=0) for room in ROOMS}

        def caught_up() -> bool:
            return all(
                any(seq >= last[s.room] for seq, _ in s.seen[-5:]) or last[s.room] == 0 for s in subscribers
            )

        wait_for(caught_up, 60, "every subscriber to see the last acknowledged message")
        stop_subscribers.set()
        for thread in subscribers:
            thread.join(30)
        log = daemon.log()
        assert "bad record" not in log, log[-3000:]
        for s in subscribers:
            assert s.error is None, repr(s.error)
            assert s.missed == [], s.missed
            seqs = [seq for seq, _ in s.seen]
            assert seqs == sorted(set(seqs)), f"{s.room}: out of order or twice"
            texts = dict(s.seen)
            acked = publisher.acked[s.room]
            lost = [seq for seq in acked if seq not in texts]
            assert lost == [], (
                f"{s.room}: {len(lost)} of {len(acked)} acknowledged messages lost: {lost[:10]}"
            )
            assert all(texts[seq] == text for seq, text in acked.items())
        assert kills >= duration * 2, kills
        assert sum(len(a) for a in publisher.acked.values()) > duration * POSTS_PER_SECOND / 3
        wait_for(lambda: fd_count(daemon.pid) == baseline, 10, "the master's fds to come back to baseline")
    finally:
        stop_publisher.set()
        stop_subscribers.set()
        assert daemon.stop() == 0
