"""``ipcctl send | listen | rooms | who``: chat from scripts and terminals."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click

from ipcd.cli.common import Options, fail, handles_errors, json_option, pass_options
from ipcd.cli.completion import nicks, room_names
from ipcd.cli.sendlines import (
    Line,
    NotAcknowledged,
    datagram_posts,
    input_lines,
    stdin_source,
    stream_posts,
)
from ipcd.client import (
    ChatEvent,
    ClientError,
    ConnectionLost,
    DaemonUnreachable,
    RequestTimeout,
    ServerError,
    UntrustedDaemon,
)
from ipcd.posting import Poster
from ipcd.protocol import RemoteProtocolError
from ipcd.protocol.chat import DEFAULT_ROOM, check_message_id
from ipcd.publisher import DEFAULT_RETRY_FOR, PREFIX_MAX, Publisher, new_prefix
from ipcd.subscription import Subscription


def format_event(event: ChatEvent) -> str:
    """One line a person reads: ``[room] nick: text``."""
    d = event.data
    if event.kind == "message":
        return f"[{d['room']}] {d['from']}: {d['text']}"
    if event.kind == "private":
        return f"[private] {d['from']} -> {d['to']}: {d['text']}"
    what = {
        "join": "joined",
        "part": "left",
        "quit": "disconnected",
        "topic": f"set the topic to: {d.get('topic', '')}",
        "nick": f"is now known as {d['nick']} (was {d.get('old', '?')})",
    }.get(d.get("event", ""), d.get("event", "?"))
    who = d.get("old", d["nick"]) if d.get("event") == "nick" else d["nick"]
    return f"[{d['room']}] * {who} {what}"


def event_json(event: ChatEvent) -> dict[str, Any]:
    return {"type": event.kind, **event.data}


def _id_prefix(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        check_message_id(f"{value}:1")
    except RemoteProtocolError:
        raise click.BadParameter(
            f"use up to {PREFIX_MAX} visible ASCII characters, without '\"' or '\\'"
        ) from None
    if len(value) > PREFIX_MAX:
        raise click.BadParameter(f"use up to {PREFIX_MAX} characters")
    return value


@click.command()
@json_option
@click.option(
    "--room",
    "-r",
    metavar="ROOM",
    default=None,
    help=f"Room to post to (default {DEFAULT_ROOM}).",
    shell_complete=room_names,
)
@click.option(
    "--to", "to", default=None, metavar="NICK", help="Send a private message instead.", shell_complete=nicks
)
@click.option("--dgram", is_flag=True, help="Post over the datagram socket (rooms only), like logger(1).")
@click.option(
    "--retry/--no-retry",
    default=True,
    show_default=True,
    help="After a lost connection (a killed worker, a reload, a restart), connect again and resend "
    "what was not acknowledged; message ids keep the daemon from posting anything twice.",
)
@click.option(
    "--retry-for",
    type=click.FloatRange(min=0),
    default=DEFAULT_RETRY_FOR,
    show_default=True,
    metavar="SECS",
    help="How long one outage is waited out before giving up.",
)
@click.option(
    "--id-prefix",
    metavar="PREFIX",
    default=None,
    callback=_id_prefix,
    help="Message ids are PREFIX:LINE (default: a random PREFIX). Running the same input again "
    "with the same PREFIX within the daemon's --message-id-window posts only lines not posted yet.",
)
@click.argument("text", nargs=-1)
@pass_options
@handles_errors
def send(
    opts: Options,
    room: str | None,
    to: str | None,
    dgram: bool,
    retry: bool,
    retry_for: float,
    id_prefix: str | None,
    text: tuple[str, ...],
) -> None:
    """Send TEXT to a room (or --to a nick). Without TEXT, each line of
    standard input is one message, sent as soon as it is read (so
    `tail -f log | ipcctl send` works); empty lines are skipped. Exits 0
    once every message is acknowledged, 1 if the daemon refused any (each
    refusal is reported with its line number).

    Posts to a room carry message ids and survive a lost connection: send
    connects again and resends every line not acknowledged, and the daemon
    answers a line it already posted instead of posting it twice, so each
    line is posted once, in order. If the daemon stays away for --retry-for
    seconds, send gives up, says which lines were not acknowledged (first,
    last, how many) and exits 69 (75 if the daemon stopped answering).
    Private messages (--to) and --dgram are not retried."""
    if room and to:
        fail("give --room or --to, not both", 2)
    if to and dgram:
        fail("--dgram posts to rooms only; drop --to or --dgram", 2)
    room = room or DEFAULT_ROOM
    shown_room = None if to else room  # what --json says
    retrying = retry and not to and not dgram
    prefix = id_prefix or new_prefix()

    def status(line: str) -> None:
        click.echo(f"ipcctl: {line}", err=True)

    def publisher() -> Publisher[Line]:
        return Publisher(
            opts.socket_dir,
            opts.timeout,
            retry_for=retry_for,
            id_prefix=prefix,
            on_status=status,
            daemon_uid=opts.daemon_uid,
        )

    if text:
        line = " ".join(text)
        if dgram:
            with opts.datagram_client() as posting:
                seq = posting.say(room, line)
        elif retrying:
            with publisher() as one:
                try:
                    seq = one.say_one(room, line, Line(1, line))
                except ServerError:
                    raise
                except ClientError as exc:
                    gave_up(opts, NotAcknowledged(exc, [Line(1, line)]), shown_room, to, prefix)
        else:
            with opts.client() as client:
                seq = client.msg(to, line) if to else client.say(room, line)
        if opts.json:
            opts.emit({"room": shown_room, "to": to, "seq": seq, "text": line})
        return

    refused = 0

    def refuse(line: Line, error: ClientError | None) -> None:
        nonlocal refused
        if not isinstance(error, ServerError):
            raise error or AssertionError("no error to report")
        refused += 1
        detail = f"the daemon refused: {error.message} ({error.code_name})"
        click.echo(f"ipcctl: line {line.number}: {detail}", err=True)

    def report(line: Line, seq: int | None, error: ClientError | None) -> None:
        if error is not None:
            refuse(line, error)
        elif opts.json:
            opts.emit({"room": shown_room, "to": to, "seq": seq, "text": line.text})

    source = stdin_source()
    if source is None:
        fail("standard input is closed: give TEXT, or pipe lines in", 2)
    fd, encoding = source
    if dgram:
        with opts.datagram_client() as posting:
            datagram_posts(posting, input_lines(fd, encoding), room, report)
    elif retrying:
        with publisher() as lines_poster:
            try:
                stream_posts(lines_poster, fd, encoding, room, None, report, lambda n: f"{prefix}:{n}")
            except NotAcknowledged as exc:
                gave_up(opts, exc, shown_room, to, prefix)
    else:
        with opts.client() as client, Poster[Line](client) as poster:
            try:
                stream_posts(poster, fd, encoding, room, to, report)
            except NotAcknowledged as exc:
                for ack in poster.stranded():  # such as why the daemon closed the connection
                    if ack.error is not None:
                        refuse(ack.tag, ack.error)
                gave_up(opts, exc, shown_room, to, None)
    if refused:
        sys.exit(1)


def gave_up(
    opts: Options, exc: NotAcknowledged, room: str | None, to: str | None, prefix: str | None
) -> NoReturn:
    """Say which lines were not acknowledged (in JSON too), then fail as
    the cause does (69 unreachable or lost, 75 timed out)."""
    lines = exc.lines
    said = f"{exc.cause}; {exc.summary()}"
    if prefix is not None and lines:
        said += f"; to post only those not posted, send them again with --id-prefix {prefix}"
    if opts.json:
        unacknowledged = (
            {"count": len(lines), "first": lines[0].number, "last": lines[-1].number}
            if lines
            else {"count": 0}
        )
        opts.emit({"room": room, "to": to, "unacknowledged": unacknowledged, "id_prefix": prefix})
    raise with_message(exc.cause, said) from None


def with_message(exc: ClientError, message: str) -> ClientError:
    """``exc`` told as ``message``: the same kind (the exit status follows it), the same code."""
    if isinstance(exc, ConnectionLost):
        return ConnectionLost(message, exc.code)
    if isinstance(exc, DaemonUnreachable):
        return DaemonUnreachable(message, exc.errno)
    if isinstance(exc, UntrustedDaemon):
        return UntrustedDaemon(message, exc.uid)
    if isinstance(exc, RequestTimeout):
        return RequestTimeout(message)
    return ClientError(message)


@click.command()
@json_option
@click.option(
    "--room",
    "-r",
    "rooms",
    multiple=True,
    metavar="ROOM",
    help=f"Room to listen to; repeatable (default {DEFAULT_ROOM}).",
    shell_complete=room_names,
)
@click.option(
    "--count", "-n", type=click.IntRange(min=1), metavar="N", default=None, help="Exit after N messages."
)
@click.option(
    "--history",
    type=click.IntRange(min=0),
    metavar="N",
    default=0,
    help="First replay the last N messages of each room.",
)
@click.option(
    "--since",
    "since_args",
    multiple=True,
    metavar="[ROOM=]SEQ",
    help="Resume after SEQ: first print every message the daemon still keeps with a higher seq "
    "(the last seq a previous listen printed), then the new ones. ROOM=SEQ for one room; repeatable.",
)
@click.option(
    "--nick", metavar="NICK", default=None, help="Listen under this nick (default: your user name)."
)
@click.option("--notices/--no-notices", default=False, help="Also print joins, parts and topic changes.")
@click.option(
    "--reconnect/--no-reconnect",
    default=True,
    show_default=True,
    help="After a lost connection (a reload, a restart), connect again and go on; "
    "--no-reconnect exits 69 instead.",
)
@pass_options
@handles_errors
def listen(
    opts: Options,
    rooms: tuple[str, ...],
    count: int | None,
    history: int,
    since_args: tuple[str, ...],
    nick: str | None,
    notices: bool,
    reconnect: bool,
) -> None:
    """Print room messages (and private messages to you) as they come, one
    line each ("[room] nick: text"), or one JSON object per line with --json.

    When the connection is lost, listen says so on stderr, connects again
    (retrying while the daemon is away), rejoins the same rooms with the same
    nick and resumes after the last message it printed: nothing is printed
    twice or skipped. Messages the daemon no longer keeps are named on
    stderr (and with --json as a {"type": "gone", "room", "first", "last"}
    line). --count counts messages across reconnects."""
    rooms = rooms or (DEFAULT_ROOM,)
    if history and since_args:
        raise click.UsageError("give --history or --since, not both")
    since = parse_since(since_args, rooms)

    def status(line: str) -> None:
        click.echo(f"ipcctl: {line}", err=True)

    def gone(room: str, first: int, last: int) -> None:
        span = f"message {first}" if first == last else f"messages {first}-{last}"
        status(f"{span} of {room} are no longer kept by the daemon: missed")
        if opts.json:
            click.echo(
                json.dumps({"type": "gone", "room": room, "first": first, "last": last}, sort_keys=True)
            )

    seen = 0
    subscription = Subscription(
        opts.socket_dir,
        rooms,
        nick=nick,
        history=history,
        since=since,
        on_gone=gone,
        timeout=opts.timeout,
        reconnect=reconnect,
        on_status=status,
        daemon_uid=opts.daemon_uid,
    )
    with subscription:
        while count is None or seen < count:
            try:
                event = subscription.next_event(timeout=3600.0)
            except RequestTimeout:
                continue  # quiet room; a listener waits for ever
            if event.kind == "notice" and not notices:
                continue
            click.echo(json_line(event) if opts.json else format_event(event))
            if event.kind != "notice":
                seen += 1


def parse_since(args: tuple[str, ...], rooms: tuple[str, ...]) -> dict[str, int]:
    """``--since`` values: ``SEQ`` for every room, ``ROOM=SEQ`` for one."""
    since: dict[str, int] = {}
    every: int | None = None
    for arg in args:
        room, _, seq = arg.rpartition("=")
        if not seq.isdigit():
            raise click.BadParameter(
                f"{arg!r} is not SEQ or ROOM=SEQ (a seq is 0 or more)", param_hint="--since"
            )
        if not room:
            every = int(seq)
        elif room not in rooms:
            raise click.BadParameter(f"{room!r} is not one of the rooms listened to", param_hint="--since")
        else:
            since[room] = int(seq)
    if every is not None:
        for room in rooms:
            since.setdefault(room, every)
    return since


def json_line(event: ChatEvent) -> str:
    return json.dumps(event_json(event), sort_keys=True, ensure_ascii=False)


@click.command()
@json_option
@pass_options
@handles_errors
def rooms(opts: Options) -> None:
    """List the rooms with their members, topic and last sequence number."""
    with opts.client() as client:
        found = client.rooms()
    if opts.json:
        opts.emit({"rooms": found})
        return
    click.echo(f"{'ROOM':<24} {'MEMBERS':>7} {'SEQ':>8}  TOPIC")
    for room in found:
        click.echo(f"{room['room']:<24} {room['members']:>7} {room['seq']:>8}  {room['topic']}")


@click.command()
@json_option
@click.argument("room", required=False, shell_complete=room_names)
@pass_options
@handles_errors
def who(opts: Options, room: str | None) -> None:
    """List who is connected (in ROOM, if given), with their uid."""
    with opts.client() as client:
        members = client.who(room)
    if opts.json:
        opts.emit({"room": room, "members": members})
        return
    click.echo(f"{'NICK':<20} {'UID':>6} {'PID':>8}  ROOMS")
    for m in members:
        click.echo(f"{m['nick']:<20} {m['uid']:>6} {m['pid']:>8}  {' '.join(m['rooms'])}")
