"""Records on a worker's channel arrive whole and in order under load.

The scenario the issue measured: one worker, clients asking for a large
room HISTORY in a loop (its reply crosses the channel as many fragments)
while others open a new connection for every echo (each one a record that
carries an fd). A record that overtook the queue used to land between the
fragments of a large one: the worker dropped the message and the passed
connection with it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from ipcd.client import Client, ClientError
from tests.daemon import Daemon

ROOM = "big"
MESSAGES = 100
TEXT = "x" * (16 * 1024 - 64)  # close to the 16 KiB limit: a HISTORY of ~1.6 MB
DURATION = 8.0


def test_large_replies_and_new_connections_lose_nothing(short_tmp: Path) -> None:
    daemon = Daemon(short_tmp / "s", workers=1).start()
    try:
        with daemon.client() as poster:
            for _ in range(MESSAGES):
                poster.say(ROOM, TEXT)
        stop = time.monotonic() + DURATION
        failures: list[str] = []
        histories = [0]
        connections = [0]
        lock = threading.Lock()

        def history_loop() -> None:
            with Client(daemon.socket_dir, timeout=30) as client:
                while time.monotonic() < stop:
                    try:
                        got = client.history(ROOM, MESSAGES)
                    except ClientError as exc:
                        with lock:
                            failures.append(f"history: {exc!r}")
                        return
                    with lock:
                        if [m["text"] for m in got] != [TEXT] * MESSAGES:
                            failures.append(f"history: {len(got)} messages")
                        histories[0] += 1

        def connect_loop() -> None:
            while time.monotonic() < stop:
                try:
                    with Client(daemon.socket_dir, timeout=30) as client:
                        if client.echo(b"new connection") != b"new connection":
                            raise ClientError("wrong echo")
                except ClientError as exc:
                    with lock:
                        failures.append(f"connection: {exc!r}")
                    continue
                with lock:
                    connections[0] += 1

        threads = [threading.Thread(target=history_loop) for _ in range(3)]
        threads += [threading.Thread(target=connect_loop) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DURATION + 60)
        log = daemon.log()
        assert not [t for t in threads if t.is_alive()], "a client loop hung"
        assert failures == [], (
            f"{len(failures)} failures ({histories[0]} histories, {connections[0]} connections): "
            f"{failures[:3]}\n{log[-2000:]}"
        )
        assert "bad record" not in log, log[-3000:]
        assert histories[0] > 3, histories
        assert connections[0] > 20, connections
        assert daemon.status()["respawns"] == 0
    finally:
        assert daemon.stop() == 0
