"""``ipcctl chat``: chat interactively in a terminal.

Theory of operation
-------------------
One thread, one asyncio loop, one connection. prompt_toolkit owns the
terminal: ``PromptSession.prompt_async`` edits the input line, and inside
``patch_stdout`` every ``print`` becomes "hide the prompt, write the line,
redraw the prompt with what was being typed", so a message arriving in the
middle of a word never breaks it.

Chat deliveries arrive on the connection that joined the rooms, so that
connection is the one to watch: ``loop.add_reader`` on its socket, and when
it is readable, drain ``Client.next_event(timeout=0)`` until it would block
(the client's decoder keeps a partial frame for the next round). Requests go
out from the same thread and wait for their reply synchronously: a local
daemon answers in microseconds, and the line being edited was already
accepted. Deliveries read while waiting for a reply are queued by the client
in ``Client.events`` (or left in its decoder), which the reader would not
notice, so :meth:`ChatSession.drain` runs after every command too.

Between two prompts the terminal is in cbreak mode (:func:`quiet_terminal`),
so keys typed ahead are neither echoed nor lost. Leaving -- /quit, Ctrl-D,
Ctrl-C, SIGTERM, or the daemon going away -- always goes through the prompt's
own clean-up, which puts the terminal back as it was. Ctrl-C exits 130: at
the prompt it is a key (the prompt's ``interrupt_exception``), between
prompts a SIGINT that the loop turns into the same way out as SIGTERM.

The connection belongs to a :class:`~ipcd.subscription.Subscription`: when a
reload retires its worker or the worker dies, the session connects again
(for up to :data:`RECONNECT_PATIENCE` seconds, the prompt waiting), takes the
same nick in the same rooms and shows what was said meanwhile, nothing twice;
the loop then watches the new socket. A daemon that stays away ends the chat
with 69, as before.

The session logic (:class:`ChatSession`) only needs a ``write`` callable, so
it runs without a terminal as well; the terminal is :func:`run_terminal`.
"""

from __future__ import annotations

import signal
import sys
import termios
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

import click

from ipcd.cli.chatcmds import format_event
from ipcd.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Options,
    fail,
    handles_errors,
    pass_options,
)
from ipcd.cli.completion import room_names
from ipcd.client import ChatEvent, Client, ConnectionLost, RequestTimeout, ServerError
from ipcd.protocol.chat import DEFAULT_ROOM
from ipcd.subscription import Subscription

if TYPE_CHECKING:
    from prompt_toolkit.completion import Completer

DEFAULT_HISTORY = 10
# How long an outage is waited out, the prompt frozen, before the chat ends
# with 69: enough for a reload or a respawned worker, not for a stopped daemon.
RECONNECT_PATIENCE = 3.0

# name: (arguments, what it does) -- the source of /help and of --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "join": ("ROOM", "join ROOM (created if new); it becomes the current room"),
    "part": ("[ROOM]", "leave ROOM (default: the current room)"),
    "msg": ("NICK TEXT", "send TEXT to NICK only"),
    "nick": ("NICK", "change your nick"),
    "names": ("[ROOM]", "who is in ROOM (default: the current room)"),
    "rooms": ("", "list the rooms, their members and topics"),
    "topic": ("[TEXT]", "show the current room's topic, or set it to TEXT"),
    "history": ("[N]", f"show the current room's last N messages (default {DEFAULT_HISTORY})"),
    "help": ("", "list these commands"),
    "quit": ("", "leave (Ctrl-D too; Ctrl-C leaves with exit status 130)"),
}


def command_lines() -> list[str]:
    lines = [f"/{name} {args}".ljust(18) + what for name, (args, what) in COMMANDS.items()]
    return [*lines, "//TEXT".ljust(18) + "send TEXT starting with '/' to the room"]


class Disconnected(Exception):
    """The daemon went away; the message says how."""


class Interrupted(Exception):
    """Ctrl-C at the prompt. An ordinary exception, unlike KeyboardInterrupt,
    which asyncio re-raises out of the loop and leaves in the prompt's task
    ("Task exception was never retrieved")."""


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def stamp(ts: Any) -> str:
    """``HH:MM`` of a delivery's timestamp (now, if it has none)."""
    return time.strftime("%H:%M", time.localtime(ts if isinstance(ts, int | float) else None))


def event_line(event: ChatEvent) -> str:
    """A delivery as shown: timestamped, continuation lines indented under the text."""
    return f"{stamp(event.data.get('ts'))} {format_event(event)}".replace("\n", "\n      ")


class ChatSession:
    """The state of one chat: nick, joined rooms (the last is current) and
    what each typed line does. Output goes through ``write``, one line a call.

    The connection is a :class:`Subscription`'s: when it is lost (a reload
    retiring its worker, a worker crash), the session connects again within
    ``subscription.patience`` seconds, with the same nick in the same rooms,
    and shows what it missed without showing anything twice."""

    def __init__(
        self, subscription: Subscription, write: Callable[[str], None], history: int = DEFAULT_HISTORY
    ) -> None:
        self.subscription = subscription
        subscription.on_status = self._status
        self.write = write
        self.history = history
        self.rooms: list[str] = []  # in joining order; the last is the current room
        self._commands: dict[str, Callable[[str], None]] = {
            "join": self._join,
            "part": self._part,
            "msg": self._msg,
            "nick": self._nick,
            "names": self._names,
            "rooms": self._rooms,
            "topic": self._topic,
            "history": self._history,
            "help": self._help,
        }

    @property
    def client(self) -> Client:
        """The current connection (a new one after a reconnect)."""
        return self.subscription.client

    @property
    def nick(self) -> str:
        return self.subscription.nick or ""

    @property
    def room(self) -> str | None:
        return self.rooms[-1] if self.rooms else None

    def prompt(self) -> str:
        return f"[{self.room}] {self.nick}> " if self.room else f"{self.nick}> "

    # -- start and incoming ------------------------------------------------

    def start(self, room: str, nick: str | None = None) -> None:
        """Take ``nick`` and join ``room``; errors propagate (the caller exits)."""
        if nick and nick != self.nick:
            self.subscription.set_nick(nick)
        self._join(room)

    def _status(self, line: str) -> None:
        self.write("* reconnected" if line == "reconnected" else f"! {line}")

    def drain(self) -> None:
        """Show every delivery already received, without waiting for more.
        Raises :class:`Disconnected` when the daemon has gone."""
        while True:
            try:
                event = self.subscription.next_event(timeout=0)  # reconnects if need be
            except RequestTimeout:
                return
            except ServerError as exc:
                self.write(f"! the daemon says: {exc.message} ({exc.code_name})")
                continue
            except ConnectionLost as exc:
                raise Disconnected(str(exc)) from exc
            except OSError as exc:
                raise Disconnected(f"connection to the daemon failed: {exc}") from exc
            self.write(event_line(event))

    # -- typed lines -------------------------------------------------------

    def handle(self, line: str) -> bool:
        """Act on one typed line; False once the user asked to quit.
        Refusals are shown and the session goes on; a lost connection
        raises :class:`Disconnected`."""
        line = line.strip()
        try:
            if not line:
                return True
            if line.startswith("/") and not line.startswith("//"):
                name, _, rest = line[1:].partition(" ")
                name = name.lower()
                if name in ("quit", "exit"):
                    return False
                command = self._commands.get(name)
                if command is None:
                    self.write(f"! unknown command /{name}; /help lists the commands")
                else:
                    command(rest.strip())
            else:
                self._say(line[1:] if line.startswith("//") else line)
        except ServerError as exc:
            self.write(f"! the daemon refused: {exc.message} ({exc.code_name})")
        except RequestTimeout as exc:
            self.write(f"! {exc}")
        except ConnectionLost as exc:
            try:
                self.subscription.recover(exc)
            except ConnectionLost as gone:
                raise Disconnected(str(gone)) from gone
            self.write("! that may not have reached the daemon; if it is missing, type it again")
        self.drain()
        return True

    def _usage(self, name: str) -> None:
        self.write(f"! usage: /{name} {COMMANDS[name][0]}")

    def _current(self) -> str | None:
        if self.room is None:
            self.write("! you are in no room: /join ROOM first")
        return self.room

    def _say(self, text: str) -> None:
        room = self._current()
        if room is not None:
            self.client.say(room, text)  # shown when the daemon delivers it back, in sequence

    def _join(self, arg: str) -> None:
        if not arg or " " in arg:
            self._usage("join")
            return
        reply = self.subscription.join(arg, history=self.history)
        room = str(reply["room"])
        if room in self.rooms:
            self.rooms.remove(room)
        self.rooms.append(room)
        line = f"joined {room} as {self.nick}, members: {', '.join(reply['members'])}"
        self.write(line + (f"; topic: {reply['topic']}" if reply["topic"] else ""))

    def _part(self, arg: str) -> None:
        room = arg or self._current()
        if room is None:
            return
        self.subscription.part(room)
        if room in self.rooms:
            self.rooms.remove(room)
        now = f"; now in {self.room}" if self.room else "; /join a room to talk"
        self.write(f"* you left {room}{now}")

    def _msg(self, arg: str) -> None:
        to, _, text = arg.partition(" ")
        if not to or not text.strip():
            self._usage("msg")
            return
        self.client.msg(to, text)
        sent = {"from": self.nick, "to": to, "text": text, "ts": time.time()}
        self.write(event_line(ChatEvent("private", sent)))  # no copy comes back to the sender

    def _nick(self, arg: str) -> None:
        if not arg or " " in arg:
            self._usage("nick")
            return
        self.subscription.set_nick(arg)
        if not self.rooms:  # otherwise every room's notice says so
            self.write(f"* you are now known as {self.nick}")

    def _names(self, arg: str) -> None:
        room = arg or self._current()
        if room is None:
            return
        members = self.client.who(room)
        self.write(f"* in {room}: {', '.join(m['nick'] for m in members) or 'nobody'}")

    def _rooms(self, arg: str) -> None:
        for r in self.client.rooms():
            topic = f" -- {r['topic']}" if r["topic"] else ""
            mine = "*" if r["room"] in self.rooms else " "
            counts = f"{_count(r['members'], 'member')}, {_count(r['seq'], 'message')}"
            self.write(f"{mine} {r['room']} ({counts}){topic}")

    def _topic(self, arg: str) -> None:
        room = self._current()
        if room is None:
            return
        if arg:
            self.client.topic(room, arg)  # the room's notice, which we get too, shows it
            return
        topic = self.client.topic(room)
        self.write(f"* topic of {room}: {topic}" if topic else f"* {room} has no topic")

    def _history(self, arg: str) -> None:
        if arg and not arg.isdigit():
            self._usage("history")
            return
        room = self._current()
        if room is None:
            return
        messages = self.client.history(room, int(arg) if arg else DEFAULT_HISTORY)
        if not messages:
            self.write(f"* no messages in {room} yet")
        for message in messages:
            self.write(event_line(ChatEvent("message", message)))

    def _help(self, arg: str) -> None:
        self.write("* type text to send it to the current room (the last joined); commands:")
        for line in command_lines():
            self.write(f"  {line}")


def slash_completer() -> Completer:
    """Completes command names while the line is only ``/word``."""
    from prompt_toolkit.completion import CompleteEvent, Completer, Completion  # noqa: PLC0415
    from prompt_toolkit.document import Document  # noqa: PLC0415

    class SlashCompleter(Completer):
        def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
            text = document.text_before_cursor
            if not text.startswith("/") or " " in text:
                return
            for name in COMMANDS:
                if name.startswith(text[1:]):
                    yield Completion(f"/{name}", start_position=-len(text))

    return SlashCompleter()


def _print_line(line: str) -> None:
    print(line, flush=True)


async def run_terminal(chat: ChatSession) -> int:
    """The interactive loop; returns the exit code."""
    # asyncio and prompt_toolkit are imported here, not at the top: they
    # would double the start-up time of every other ipcctl command.
    import asyncio  # noqa: PLC0415

    from prompt_toolkit import PromptSession  # noqa: PLC0415
    from prompt_toolkit.patch_stdout import patch_stdout  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    ended: asyncio.Future[tuple[int, str]] = loop.create_future()  # exit code, last words
    watched = chat.client
    fd = watched.fileno()

    def end(code: int, why: str) -> None:
        if not ended.done():
            ended.set_result((code, why))

    def lost(exc: Disconnected) -> None:
        end(
            EXIT_UNREACHABLE, f"! lost the connection to the daemon: {exc}; run 'ipcctl chat' once it is back"
        )

    def readable() -> None:
        try:
            chat.drain()
        except Disconnected as exc:
            loop.remove_reader(fd)
            lost(exc)
            return
        rewatch()

    def rewatch() -> None:
        """After a reconnect, watch the new connection instead."""
        nonlocal watched, fd
        if chat.client is not watched:
            loop.remove_reader(fd)
            watched = chat.client
            fd = watched.fileno()
            loop.add_reader(fd, readable)

    session: PromptSession[str] = PromptSession(
        erase_when_done=True,
        completer=slash_completer(),
        complete_while_typing=False,
        interrupt_exception=Interrupted,
    )
    with patch_stdout():
        loop.add_reader(fd, readable)
        # Leave through the same door as a lost connection: the terminal is put back.
        loop.add_signal_handler(signal.SIGTERM, end, 128 + signal.SIGTERM, "! terminated")
        loop.add_signal_handler(signal.SIGINT, end, EXIT_INTERRUPTED, "")  # Ctrl-C between prompts
        try:
            readable()  # what came with the join (history) before the loop watched
            while not ended.done():
                prompt = asyncio.ensure_future(session.prompt_async(chat.prompt()))
                either: set[asyncio.Future[Any]] = {prompt, ended}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if not prompt.done():  # ended while editing: let the prompt restore the terminal
                    prompt.cancel()
                    with suppress(asyncio.CancelledError, EOFError, Interrupted):
                        await prompt
                    break
                try:
                    line = prompt.result()
                except EOFError:
                    return 0
                except Interrupted:
                    return EXIT_INTERRUPTED
                try:
                    if not chat.handle(line):
                        return 0
                except Disconnected as exc:
                    lost(exc)
                else:
                    rewatch()
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_reader(fd)
    code, why = ended.result()
    if why:
        click.echo(why, err=True)
    return code


@contextmanager
def quiet_terminal(fd: int) -> Iterator[None]:
    """Between two prompts, keep keys unechoed and unedited (cbreak mode).

    prompt_toolkit puts the terminal in raw mode only while a line is being
    edited, and restores what it found when the line is accepted. In the
    usual cooked mode, lines typed ahead (or pasted) while a command runs,
    and the answers to prompt_toolkit's cursor-position queries, would be
    echoed by the tty in the middle of the chat, and a Ctrl-D would become
    an end-of-file that the kernel, not the next prompt, interprets. Here
    they wait unseen, byte for byte, for the next prompt to read them.
    Signals stay on: Ctrl-C during a slow request still interrupts it."""
    before = termios.tcgetattr(fd)
    quiet = list(before)
    quiet[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON)  # lflag
    quiet[6] = list(before[6])  # cc: a read returns as soon as one byte is there
    quiet[6][termios.VMIN] = 1
    quiet[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, before)


HELP = "\n".join(
    [
        "Chat interactively: what you type goes to the current room (the last one",
        "joined); what others say appears above the line you are typing.",
        "",
        "\b",
        "Commands:",
        *(f"  {line}" for line in command_lines()),
        "",
        "Needs a terminal; scripts use 'ipcctl send' and 'ipcctl listen'.",
    ]
)


@click.command(help=HELP)
@click.option(
    "--room",
    "-r",
    metavar="ROOM",
    default=DEFAULT_ROOM,
    show_default=True,
    help="Room to join first.",
    shell_complete=room_names,
)
@click.option("--nick", metavar="NICK", default=None, help="Your nick (default: your user name).")
@click.option(
    "--history",
    type=click.IntRange(min=0),
    metavar="N",
    default=DEFAULT_HISTORY,
    show_default=True,
    help="Messages to replay on joining a room.",
)
@pass_options
@handles_errors
def chat(opts: Options, room: str, nick: str | None, history: int) -> None:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        fail(
            "chat needs a terminal; from a script post with 'ipcctl send' and read with 'ipcctl listen'",
            EXIT_USAGE,
        )
    import asyncio  # noqa: PLC0415  (see run_terminal)

    subscription = Subscription(
        opts.socket_dir,
        (),
        nick=nick,
        timeout=opts.timeout,
        patience=RECONNECT_PATIENCE,
        daemon_uid=opts.daemon_uid,
    )
    with subscription:
        session = ChatSession(subscription, _print_line, history)
        session.start(room)
        with quiet_terminal(sys.stdin.fileno()):  # Ctrl-C on a request's way: handles_errors, 130
            code = asyncio.run(run_terminal(session))
    sys.exit(code)
