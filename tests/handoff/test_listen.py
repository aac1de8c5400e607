"""``ipcctl put NAME --listen ADDRESS``: ipcctl makes the listening sockets
itself and stores them, as a shell user names them (``systemd-socket-activate
-l`` / ``ListenStream=``), and says what it bound, the real port for port 0.

Every socket is checked as a client would: a real connection to the address
reported, accepted by the process that got the entry from ipcd.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ipcd.cli import listeners
from ipcd.client import Client
from tests.daemon import IPCCTL, Daemon
from tests.handoff.test_cli import listed, ok, refusal, run, start
from tests.handoff.users import FdLedger, FdUsers, StartDaemon, ipcctl_as, start_as

pytest_plugins = ["tests.handoff.users"]

# Accepts one connection on each fd it was given (3, 4, ...) in turn, answers
# "FDNAME: what you sent" on it; prints LISTEN_FDS and LISTEN_FDNAMES first.
SERVE_EACH = (
    "import os, socket, sys\n"
    "names = os.environ['LISTEN_FDNAMES'].split(':')\n"
    "print(os.environ['LISTEN_FDS'], os.environ['LISTEN_FDNAMES'], flush=True)\n"
    "for index, name in enumerate(names):\n"
    "    listener = socket.socket(fileno=3 + index)\n"
    "    listener.setblocking(True)\n"
    "    conn, _ = listener.accept()\n"
    "    conn.sendall(name.encode() + b': ' + conn.recv(100))\n"
    "    conn.close()\n"
)


def lines_of(result: Any) -> list[str]:
    return str(ok(result)).splitlines()


def ask(family: socket.AddressFamily, address: Any, text: bytes) -> bytes:
    with socket.socket(family, socket.SOCK_STREAM) as peer:
        peer.settimeout(20)
        peer.connect(address)
        peer.sendall(text)
        return peer.recv(100)


def test_listen_stores_tcp_and_unix_listeners_in_order(start_daemon: StartDaemon, short_tmp: Path) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    path = short_tmp / "app.sock"
    abstract = f"ipcd-test-{secrets.token_hex(4)}"
    out = lines_of(
        run(
            daemon,
            *("put", "web", "--fdname", "v4:v6"),
            *("--listen", "127.0.0.1:0", "--listen", "[::1]:0", "--listen", str(path)),
            *("--listen", f"@{abstract}", "--fdname", "local:hidden"),
        )
    )
    assert out[0].startswith("web: listening on 127.0.0.1:"), out
    port4 = int(out[0].rpartition(":")[2])
    assert out[1].startswith("web: listening on [::1]:"), out
    port6 = int(out[1].rpartition(":")[2])
    assert out[2:] == [f"web: listening on {path}", f"web: listening on @{abstract}"]
    assert port4 > 0
    assert port6 > 0
    ledger.expect(4)

    fds = listed(daemon)["web"]["fds"]
    assert [(fd["name"], fd["family"], fd["type"], fd["listening"], fd["address"]) for fd in fds] == [
        ("v4", "inet", "stream", True, f"127.0.0.1:{port4}"),
        ("v6", "inet6", "stream", True, f"[::1]:{port6}"),
        ("local", "unix", "stream", True, str(path)),
        ("hidden", "unix", "stream", True, f"@{abstract}"),
    ]
    assert stat.S_ISSOCK(os.lstat(path).st_mode)

    server = start(daemon, "get", "web", "--", sys.executable, "-c", SERVE_EACH)
    try:
        assert ask(socket.AF_INET, ("127.0.0.1", port4), b"one") == b"v4: one"
        assert ask(socket.AF_INET6, ("::1", port6), b"two") == b"v6: two"
        assert ask(socket.AF_UNIX, str(path), b"three") == b"local: three"
        assert ask(socket.AF_UNIX, b"\0" + abstract.encode(), b"four") == b"hidden: four"
        out_text, err = server.communicate(timeout=20)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert (server.returncode, out_text, err) == (0, "4 v4:v6:local:hidden\n", "")
    ledger.expect(4)  # get: still stored, still listening
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as late:
        late.settimeout(20)
        late.connect(("127.0.0.1", port4))  # completes: queued in the backlog of ipcd's copy
    ok(run(daemon, "rm", "web"))
    ledger.expect(0)
    with pytest.raises(ConnectionRefusedError):  # ipcctl kept no copy: rm closed the last one
        ask(socket.AF_INET, ("127.0.0.1", port4), b"x")


def test_a_bare_port_listens_on_ipv4_and_ipv6(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    put = json.loads(ok(run(daemon, "--json", "put", "any", "--listen", "0", "--backlog", "16")))
    (sock,) = put["sockets"]
    assert (put["name"], put["count"], put["replaced"]) == ("any", 1, False)
    assert (sock["address"], sock["family"], sock["type"], sock["name"]) == (
        f"[::]:{sock['port']}",
        "inet6",
        "stream",
        "any",
    )
    ledger.expect(1)
    # Both loopback addresses reach it: one dual-stack socket, as ListenStream=PORT binds.
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family, socket.SOCK_STREAM) as peer:
            peer.settimeout(20)
            peer.connect((host, sock["port"]))
    ok(run(daemon, "rm", "any"))
    ledger.expect(0)


def test_listen_a_datagram_socket(start_daemon: StartDaemon, short_tmp: Path) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    path = short_tmp / "logs.sock"
    out = lines_of(
        run(daemon, "put", "logs", "--listen", "udp:127.0.0.1:0", "--listen", f"unix-dgram:{path}")
    )
    assert out[0].startswith("logs: bound to udp:127.0.0.1:"), out
    assert out[1] == f"logs: bound to unix-dgram:{path}"
    port = int(out[0].rpartition(":")[2])
    assert [(fd["family"], fd["type"], fd["listening"]) for fd in listed(daemon)["logs"]["fds"]] == [
        ("inet", "dgram", False),
        ("unix", "dgram", False),
    ]
    with daemon.client() as client:
        handoff = client.get("logs")
    udp, unix = (socket.socket(fileno=fd) for fd in handoff.fds)
    with udp, unix, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(b"over udp", ("127.0.0.1", port))
        udp.settimeout(20)
        assert udp.recv(100) == b"over udp"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as local:
            local.sendto(b"over a unix path", str(path))
        unix.settimeout(20)
        assert unix.recv(100) == b"over a unix path"
    ok(run(daemon, "rm", "logs"))
    ledger.expect(0)


def test_socket_mode_and_a_stale_socket_file(start_daemon: StartDaemon, short_tmp: Path) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    path = short_tmp / "app.sock"
    # A server that is gone left its socket file: nobody accepts on it, so it is replaced.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.bind(str(path))
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    ok(run(daemon, "put", "app", "--listen", str(path), "--socket-mode", "0660"))
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
    ledger.expect(1)
    # A live one (ipcd's copy listens on it) is refused, and left as it is.
    inode = os.lstat(path).st_ino
    refusal(
        run(daemon, "put", "again", "--listen", str(path)),
        f"cannot listen on {path}: ipcd already holds a socket there, stored as 'app'",
        "ipcctl rm app",
    )
    assert os.lstat(path).st_ino == inode
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
        peer.settimeout(20)
        peer.connect(str(path))  # still ipcd's: queued in its backlog
    ok(run(daemon, "rm", "app"))
    ledger.expect(0)


def test_a_live_server_with_a_full_backlog_is_refused_not_waited_on(
    start_daemon: StartDaemon, short_tmp: Path
) -> None:
    """A server that is alive but not accepting (its backlog is full) makes
    a blocking connect wait forever: the probe gives up after a second and
    counts it as live."""
    daemon = start_daemon()
    path = short_tmp / "busy.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as busy:
        busy.bind(str(path))
        busy.listen(0)
        queued = []
        while True:  # fill the backlog: the next connect would block
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            peer.setblocking(False)
            try:
                peer.connect(str(path))
            except BlockingIOError:
                peer.close()
                break
            queued.append(peer)
        refusal(
            run(daemon, "put", "busy", "--listen", str(path)),
            f"cannot listen on {path}: a server is listening",
        )
        for peer in queued:
            peer.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)  # left alone


def test_a_refused_put_leaves_nothing_bound(start_daemon: StartDaemon, short_tmp: Path) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    first = short_tmp / "first.sock"
    ok(run(daemon, "put", "web", "--listen", str(first)))
    ledger.expect(1)
    second = short_tmp / "second.sock"
    refused = run(daemon, "put", "web", "--listen", "127.0.0.1:0", "--listen", str(second))
    refusal(refused, "'web' is already stored; use --replace", "EXISTS")
    assert not second.exists(), "a refused put must not leave its socket file behind"
    ledger.expect(1)
    ok(run(daemon, "rm", "web"))
    ledger.expect(0)


def test_listen_errors_say_what_to_do(start_daemon: StartDaemon, short_tmp: Path) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    for bad, needle in (
        ("localhost:8080", "not a host name"),
        ("::1:8080", "[::1]:8080"),
        ("80000", "not a port"),
        ("127.0.0.1:http", "not a port"),
        ("[::1]8080", "[ADDRESS]:PORT"),
        ("app.sock", "./path"),
        ("unix:", "give a path"),
        ("@" + "x" * 120, "at most 107"),
    ):
        refusal(run(daemon, "put", "bad", "--listen", bad), f"bad --listen address {bad!r}", needle, code=2)
    refusal(run(daemon, "put", "bad"), "give one of PATH, --fd N or --listen ADDRESS", code=2)
    refusal(run(daemon, "put", "bad", "/etc/hostname", "--listen", "0"), "give one of PATH", code=2)
    refusal(
        run(daemon, "put", "bad", "--listen", "127.0.0.1:0", "--socket-mode", "0600"),
        "--socket-mode is for a --listen Unix socket path",
        code=2,
    )
    refusal(
        run(daemon, "put", "bad", "--listen", "127.0.0.1:0", "--fdname", "a:b"),
        "give one --fdname per fd: 1 fd(s), 2 name(s)",
        code=2,
    )

    # A port another program listens on: who holds it, and how to find out.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        refusal(
            run(daemon, "put", "web", "--listen", f"127.0.0.1:{port}"),
            f"cannot listen on 127.0.0.1:{port}: the address is in use",
            f"ss -ltnp 'sport = :{port}'",
        )
    # A port ipcd itself holds, stored under another name: that name.
    stored = lines_of(run(daemon, "put", "web", "--listen", "127.0.0.1:0"))
    port = int(stored[0].rpartition(":")[2])
    refusal(
        run(daemon, "put", "web2", "--listen", f"127.0.0.1:{port}"),
        "ipcd already holds a socket there, stored as 'web'",
        "ipcctl get web -- CMD",
    )
    refusal(
        run(daemon, "put", "x", "--listen", "192.0.2.1:8080"),
        "no interface of this host has address 192.0.2.1",
    )
    refusal(run(daemon, "put", "x", "--listen", str(short_tmp / "no" / "x.sock")), "no directory")
    (short_tmp / "plain").write_text("not a socket\n")
    refusal(run(daemon, "put", "x", "--listen", str(short_tmp / "plain")), "exists and is not a socket")
    assert (short_tmp / "plain").read_text() == "not a socket\n"
    ledger.expect(1)
    ok(run(daemon, "rm", "web"))
    ledger.expect(0)


def _free_privileged_port() -> int:
    for port in range(1023, 900, -1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024 on 127.0.0.1")


def _accept_one(socket_dir: str, name: str, port: int) -> dict[str, Any]:
    """As an unprivileged user: show it cannot bind ``port`` itself, get the
    stored listener, accept one connection on it and answer."""
    with socket.socket() as mine:
        try:
            mine.bind(("127.0.0.1", port))  # EACCES comes before EADDRINUSE
            could_bind = True
        except PermissionError:
            could_bind = False
    with Client(Path(socket_dir), 20) as client:
        handoff = client.get(name)
    listener = socket.socket(fileno=handoff.fds[0])
    with listener:
        listener.settimeout(20)
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"served by uid " + str(os.getuid()).encode())
    return {"could_bind": could_bind, "owner": handoff.owner}


def test_privileged_port_from_root_to_a_user(
    start_daemon: StartDaemon, fd_users: FdUsers, short_tmp: Path
) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    user = fd_users.owner
    port = _free_privileged_port()
    # The user cannot listen on it: the error says what to do instead.
    denied = ipcctl_as(user, daemon.socket_dir, "put", "low", "--listen", f"127.0.0.1:{port}")
    refusal(denied, "permission denied: ports below 1024 need root", "--allow-uid USER")
    ledger.expect(0)
    # Root can, and hands it to the user, who serves on it.
    ok(run(daemon, "put", "low", "--listen", f"127.0.0.1:{port}", "--allow-uid", user.pw_name))
    ledger.expect(1)
    serving = start_as(user, _accept_one, str(daemon.socket_dir), "low", port)
    assert ask(socket.AF_INET, ("127.0.0.1", port), b"") == f"served by uid {user.pw_uid}".encode()
    outcome = serving.result()
    assert outcome.value == {"could_bind": False, "owner": 0}
    ok(run(daemon, "rm", "low"))
    ledger.expect(0)


def test_fdname_names_a_path_and_inherited_fds_too(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    ok(run(daemon, "put", "cfg", "-", "--fdname", "config", input=b"x\n"))
    read_end, write_end = os.pipe()
    try:
        ok(
            run(
                daemon,
                "put",
                "two",
                "--fd",
                "0",
                "--fd",
                str(read_end),
                "--fdname",
                "in:jobs",
                pass_fds=[read_end],
            )
        )
    finally:
        os.close(read_end)
        os.close(write_end)
    ledger.expect(3)
    assert [fd["name"] for fd in listed(daemon)["two"]["fds"]] == ["in", "jobs"]
    assert ok(run(daemon, "get", "cfg", "--", "sh", "-c", "echo $LISTEN_FDNAMES")) == "config\n"
    refusal(
        run(daemon, "put", "x", "-", "--fdname", "a:b"),
        "give one --fdname per fd: 1 fd(s), 2 name(s)",
        code=2,
    )
    ok(run(daemon, "rm", "cfg"))
    ok(run(daemon, "rm", "two"))
    ledger.expect(0)


# -- inherited fds that are not there ---------------------------------------------------


# A user's Python script: opens a file (close-on-exec, as Python does by
# default) and runs ipcctl to store that fd; then again the way the hint says.
PARENT = """
import os, subprocess, sys
fd = os.open("/etc/hostname", os.O_RDONLY)
assert not os.get_inheritable(fd)
print(os.getpid(), fd, flush=True)
ipcctl = sys.argv[1:]
lost = subprocess.run([*ipcctl, "put", "host", "--fd", str(fd)]).returncode
kept = subprocess.run([*ipcctl, "put", "host", "--fd", str(fd)], pass_fds=(fd,)).returncode
print(lost, kept, flush=True)
"""


def test_a_close_on_exec_fd_gets_a_hint(daemon: Daemon) -> None:
    script = subprocess.run(
        [sys.executable, "-c", PARENT, *IPCCTL, "--socket-dir", str(daemon.socket_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert script.returncode == 0, script.stderr
    pid, fd = script.stdout.split()[:2]
    assert script.stdout.split()[2:] == ["2", "0"], "exit 2 (usage) lost, then 0 stored"
    (line,) = script.stderr.splitlines()  # one line, from the first ipcctl; the second said nothing
    for needle in (
        f"ipcctl: fd {fd} is not open in ipcctl",
        f"its parent (python, pid {pid}) opened it close-on-exec",
        f"pass_fds=({fd},)",
        f"os.set_inheritable({fd}, True)",
        f"--fd {fd} {fd}<FILE",
        "--listen ADDRESS",
    ):
        assert needle in line, f"{needle!r} not in {line!r}"
    assert ok(run(daemon, "get", "host")) == Path("/etc/hostname").read_text()
    ok(run(daemon, "rm", "host"))


def test_an_fd_nobody_has_gets_the_general_hint(daemon: Daemon) -> None:
    line = refusal(run(daemon, "put", "x", "--fd", "77"), "fd 77 is not open in ipcctl", code=2)
    assert "pass_fds=(77,)" in line
    assert "close-on-exec" in line


# -- the address forms, parsed alone ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "family", "dgram", "where"),
    [
        ("8080", socket.AF_INET6, False, ("::", 8080, "")),
        ("tcp:8080", socket.AF_INET6, False, ("::", 8080, "")),
        ("udp:5353", socket.AF_INET6, True, ("::", 5353, "")),
        ("127.0.0.1:0", socket.AF_INET, False, ("127.0.0.1", 0, "")),
        ("udp:127.0.0.1:53", socket.AF_INET, True, ("127.0.0.1", 53, "")),
        ("[::1]:8080", socket.AF_INET6, False, ("::1", 8080, "")),
        ("[fe80::1%lo]:80", socket.AF_INET6, False, ("fe80::1%lo", 80, "")),
        ("/run/app.sock", socket.AF_UNIX, False, ("", 0, "/run/app.sock")),
        ("./app.sock", socket.AF_UNIX, False, ("", 0, "./app.sock")),
        ("unix:app.sock", socket.AF_UNIX, False, ("", 0, "app.sock")),
        ("unix:@hidden", socket.AF_UNIX, False, ("", 0, "@hidden")),
        ("@hidden", socket.AF_UNIX, False, ("", 0, "@hidden")),
        ("unix-dgram:/run/log.sock", socket.AF_UNIX, True, ("", 0, "/run/log.sock")),
    ],
)
def test_address_forms(
    text: str, family: socket.AddressFamily, dgram: bool, where: tuple[str, int, str]
) -> None:
    address = listeners.parse(text)
    assert (address.family, address.dgram, (address.host, address.port, address.path)) == (
        family,
        dgram,
        where,
    )
    assert address.every_address == (text in {"8080", "tcp:8080", "udp:5353"}), "a bare port: every address"


@pytest.mark.parametrize(
    "text",
    ["", "web", "8080x", "65536", "-1", "1.2.3:80", "::1", "[::1]", "[nope]:80", "host:80", "unix:", "@"],
)
def test_malformed_addresses_are_usage_errors(text: str) -> None:
    with pytest.raises(listeners.ListenError) as caught:
        listeners.parse(text)
    assert caught.value.usage
    assert str(caught.value).startswith(f"bad --listen address {text!r}: ")
