"""A soak of exactly-once delivery: workers killed over and over while a
retrying publisher posts to two rooms and ten resuming subscribers listen
to each.

Every few hundred milliseconds (the time a batch of posts takes to be
acknowledged and a new worker to come up) a random worker is killed with
SIGKILL, while a batch is in flight. The publisher (``ipcd.publisher``)
resends what was not acknowledged; the subscribers (``ipcd.subscription``)
reconnect and rejoin with history. At the end every subscriber has had every
message of its room exactly once, in order, and each room's history holds
each text once: nothing was posted twice. The kills go on for 5 s in the
default suite, and for 130 s under ``make soak`` (the issue asks for two
minutes at least).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ipcd.client import ClientError, RequestTimeout
from ipcd.publisher import Publisher
from ipcd.subscription import Subscription
from tests.daemon import Daemon, wait_for

ROOMS = ("soak-a", "soak-b")
SUBSCRIBERS = 10  # per room
BATCH = 40  # posts in flight when a worker is killed


class Subscriber(threading.Thread):
    """One resuming subscription to one room, collecting (seq, text)."""

    def __init__(self, daemon: Daemon, room: str) -> None:
        super().__init__(daemon=True)
        self.room = room
        self.got: list[tuple[int, str]] = []
        self.expected: int | None = None  # set once the publisher is done
        self.error: BaseException | None = None
        self.subscription = Subscription(daemon.socket_dir, [room], timeout=10.0)

    def run(self) -> None:
        try:
            with self.subscription:
                while self.expected is None or len(self.got) < self.expected:
                    try:
                        event = self.subscription.next_event(timeout=0.5)
                    except RequestTimeout:
                        continue
                    if event.kind == "message":
                        self.got.append((event.data["seq"], event.data["text"]))
        except BaseException as exc:  # reported by the test
            self.error = exc


def running_workers(daemon: Daemon) -> list[int] | None:
    try:
        return daemon.worker_pids()
    except ClientError:
        return None  # the status request met a dying worker: ask again


def replaced(victim: int, workers: int) -> Callable[[dict[str, Any]], bool]:
    """Whether a status shows ``victim`` gone and a full pool running again."""

    def check(status: dict[str, Any]) -> bool:
        pids = {w["pid"] for w in status["workers"]}
        return victim not in pids and sum(w["state"] == "running" for w in status["workers"]) == workers

    return check


@pytest.mark.parametrize(
    "seconds",
    [
        pytest.param(5.0, id="5s"),
        pytest.param(130.0, id="130s", marks=[pytest.mark.soak, pytest.mark.timeout(400)]),
    ],
)
def test_every_acknowledged_message_reaches_every_subscriber_once_in_order_across_worker_kills(
    socket_dir: Path, seconds: float
) -> None:
    daemon = Daemon(socket_dir, "--history-size", "100000", workers=2).start()
    subscribers = [Subscriber(daemon, room) for room in ROOMS for _ in range(SUBSCRIBERS)]
    posted = dict.fromkeys(ROOMS, 0)
    kills = 0
    try:
        for subscriber in subscribers:
            subscriber.start()
        rng = random.Random(11)  # noqa: S311 - picks victims, not secrets
        with Publisher[tuple[str, int]](daemon.socket_dir, retry_for=60) as publisher:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                for _ in range(BATCH):
                    room = ROOMS[sum(posted.values()) % 2]
                    posted[room] += 1
                    publisher.say_when_connected(room, f"{room} {posted[room]}", (room, posted[room]))
                publisher.flush()
                victims = wait_for(lambda: running_workers(daemon), 20.0, "running workers")
                victim = rng.choice(victims)
                os.kill(victim, signal.SIGKILL)  # while the batch is in flight
                kills += 1
                for ack in publisher.drain():
                    room, n = ack.tag
                    assert ack.error is None, ack.error
                    assert ack.seq == n, (room, n, ack.seq)  # in order, once: seq n is post n
                daemon.settled_status(replaced(victim, daemon.workers), 20.0)
        for subscriber in subscribers:
            subscriber.expected = posted[subscriber.room]
        for subscriber in subscribers:
            subscriber.join(60)
            assert not subscriber.is_alive(), f"{subscriber.room}: {len(subscriber.got)} of {posted}"
            assert subscriber.error is None, subscriber.error
            room = subscriber.room
            assert subscriber.got == [(n, f"{room} {n}") for n in range(1, posted[room] + 1)]
        with daemon.client() as client:
            for room in ROOMS:
                texts = [m["text"] for m in client.history(room)]
                assert texts == [f"{room} {n}" for n in range(1, posted[room] + 1)]  # none twice
        assert kills >= 3
        print(f"soak: {kills} worker kills in {seconds:g}s, {sum(posted.values())} messages, 20 subscribers")
    finally:
        for subscriber in subscribers:
            subscriber.expected = 0
        assert daemon.stop() == 0
