"""A small chat bot: listens in a room and answers commands.

    .venv/bin/python examples/echo_bot.py [--socket-dir DIR] [--room R] [--nick NICK]

In the room, ``!ping`` gets ``pong``, ``!time`` the time, ``!who`` the
room's members, and ``!echo TEXT`` the text back. A private message to the
bot is answered privately. Ctrl-C stops it. Built on ipcd.client only.
"""

from __future__ import annotations

import argparse
import sys
import time

from ipcd.client import Client, ClientError, RequestTimeout


def answer(client: Client, room: str, text: str) -> str | None:
    command, _, rest = text.partition(" ")
    if command == "!ping":
        return "pong"
    if command == "!time":
        return time.strftime("%Y-%m-%d %H:%M:%S %Z")
    if command == "!who":
        return ", ".join(m["nick"] for m in client.who(room))
    if command == "!echo":
        return rest
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket-dir", default=None)
    parser.add_argument("--room", default="lobby")
    parser.add_argument("--nick", default="bot")
    args = parser.parse_args()
    try:
        with Client(args.socket_dir) as client:
            client.nick(args.nick)
            client.join(args.room)
            print(f"{args.nick} listening in {args.room}", flush=True)
            while True:
                try:
                    event = client.next_event(timeout=60)
                except RequestTimeout:
                    continue
                data = event.data
                if event.kind == "notice" or data.get("from") == args.nick:
                    continue
                reply = answer(client, data.get("room", args.room), data["text"])
                if reply is None:
                    continue
                if event.kind == "private":
                    client.msg(data["from"], reply)
                else:
                    client.say(data["room"], f"{data['from']}: {reply}")
    except KeyboardInterrupt:
        return 0
    except ClientError as exc:
        print(f"echo_bot: {exc}", file=sys.stderr)
        return 69


if __name__ == "__main__":
    sys.exit(main())
