"""Replies larger than one channel record must arrive whole, and never cost
the master (regression: EMSGSIZE in the master killed the daemon)."""

from __future__ import annotations

from pathlib import Path

from tests.daemon import Daemon


def test_large_history_and_room_list_arrive_whole(socket_dir: Path) -> None:
    daemon = Daemon(socket_dir, "--rate-limit", "1000000", workers=2).start()
    try:
        with daemon.client(timeout=30) as client:
            texts = [f"{i:02d}" + "x" * 15_998 for i in range(14)]  # ~224 KB of history
            for text in texts:
                client.say("big", text)
            assert [m["text"] for m in client.history("big")] == texts
            for i in range(3000):
                client.say(f"room{i}", "x")
            assert len(client.rooms()) == 3002  # + lobby + big
            late = daemon.client(timeout=30)
            late.join("big", history=14)
            replayed = [late.next_event(timeout=10).data["text"] for _ in range(14)]
            assert replayed == texts
            late.close()
        assert daemon.proc is not None
        assert daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0
