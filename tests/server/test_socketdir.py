"""The /tmp safety rules of the socket dir, checked on real starts.

Starts that must fail run ``ipcd serve`` to completion with a timeout, in
its own session, so a daemon that wrongly starts is killed with all its
workers instead of hanging the test.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import signal
import socket
import stat
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipcd.client import Client, DatagramClient
from tests import sharedusers
from tests.daemon import IPCD, Daemon, wait_for

OTHER_USER = "ipcd-test-other"
SOCKET_GROUP = "ipcd-test-sock"
ALREADY_EXISTS = 9  # useradd/groupadd exit code


# -- helpers -------------------------------------------------------------------


def serve(socket_dir: Path, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run ``ipcd serve`` expecting it to exit. If it is still running after
    ``timeout`` it started when it must not: kill it and its workers (its
    own session, so one process group) and fail."""
    argv = [*IPCD, "serve", "--socket-dir", str(socket_dir), "--workers", "1", *args]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"ipcd serve {socket_dir} did not exit within {timeout}s: it started when it must not")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def assert_refused(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 1 with exactly one line on stderr containing every needle."""
    assert result.returncode == 1, f"exit {result.returncode}; stderr:\n{result.stderr}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    line = lines[0]
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def serves(socket_dir: Path) -> None:
    with Client(socket_dir, timeout=10) as client:
        assert client.echo(b"stream") == b"stream"
    with DatagramClient(socket_dir, timeout=10) as dgram:
        assert dgram.echo(b"dgram") == b"dgram"


def gone(pid: int) -> bool:
    """Dead or a zombie: either way its fds are closed."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def connect_as(path: Path, uid: int, gid: int, groups: list[int]) -> int:
    """Connect to ``path`` from a child running as ``uid``; the child's exit
    status is 0 if it connected, 13 on EACCES, 1 on another error, 2 if it
    could not become the user.

    A fork rather than a subprocess: the venv's interpreter lives under
    /root (mode 0700), which another user cannot run.
    """
    with warnings.catch_warnings():
        # 3.12 warns about fork in a threaded process; this child makes only
        # syscalls and _exit()s, so the hazard it warns of does not apply.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 2  # could not become the user
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            code = 1
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.connect(str(path))
            code = 0
        except PermissionError:
            code = 13 if code == 1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture(scope="session")
def other_user() -> Iterator[pwd.struct_passwd]:
    """A real second user (removed at the end if this session made it and
    no other session uses it)."""
    with sharedusers.users([OTHER_USER]) as (user,):
        yield user


@pytest.fixture(scope="session")
def socket_group() -> Iterator[grp.struct_group]:
    made = subprocess.run(["groupadd", "--system", SOCKET_GROUP], capture_output=True, text=True, check=False)
    assert made.returncode in (0, ALREADY_EXISTS), made.stderr
    try:
        yield grp.getgrnam(SOCKET_GROUP)
    finally:
        if made.returncode == 0:
            subprocess.run(["groupdel", SOCKET_GROUP], capture_output=True, check=False)


@pytest.fixture
def made_dir(socket_dir: Path) -> Path:
    """The socket dir made beforehand, as a user (or an attacker) would."""
    socket_dir.mkdir()
    socket_dir.chmod(0o755)
    return socket_dir


@contextlib.contextmanager
def running(socket_dir: Path, *args: str, workers: int = 1) -> Iterator[Daemon]:
    daemon = Daemon(socket_dir, *args, workers=workers)
    try:
        yield daemon.start()
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            code = daemon.stop()
            assert code == 0, f"ipcd exited {code} on SIGTERM:\n{daemon.log()}"


# -- one daemon per dir --------------------------------------------------------


def test_second_daemon_on_the_same_dir_fails_fast(socket_dir: Path) -> None:
    with running(socket_dir) as first:
        inode = first.stream_path.stat().st_ino
        result = serve(socket_dir)
        line = assert_refused(result, "already running")
        assert str(first.pid) in line
        # The loser touched nothing of the winner's.
        assert first.stream_path.stat().st_ino == inode
        assert stat.S_ISSOCK(first.dgram_path.stat().st_mode)
        serves(socket_dir)


def test_live_socket_of_another_program_is_not_replaced(made_dir: Path) -> None:
    # No ipcd lock is held, but something answers on stream.sock.
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        squatter.bind(str(made_dir / "stream.sock"))
        squatter.listen()
        inode = (made_dir / "stream.sock").stat().st_ino
        assert_refused(serve(made_dir), "another process is serving", "stream.sock")
        assert (made_dir / "stream.sock").stat().st_ino == inode
        assert not (made_dir / "dgram.sock").exists()
    finally:
        squatter.close()


def test_stale_sockets_after_kill_9_are_replaced(socket_dir: Path) -> None:
    first = Daemon(socket_dir, workers=2).start()
    pids = [first.pid, *first.worker_pids()]
    first.kill_all()
    wait_for(lambda: all(gone(pid) for pid in pids), 10, "the killed daemon's processes to die")
    # Left behind, and dead: nobody unlinked them and nobody answers.
    for name, kind in (("stream.sock", socket.SOCK_STREAM), ("dgram.sock", socket.SOCK_DGRAM)):
        path = socket_dir / name
        assert stat.S_ISSOCK(path.lstat().st_mode), f"{name} was not left behind"
        probe = socket.socket(socket.AF_UNIX, kind)
        with probe, pytest.raises(ConnectionRefusedError):
            probe.connect(str(path))
    with running(socket_dir) as second:
        serves(socket_dir)  # through freshly bound sockets at the same paths
        assert (socket_dir / ".lock").read_text().strip() == str(second.pid)


# -- who owns the dir ----------------------------------------------------------


def test_symlinked_socket_dir_is_refused(short_tmp: Path) -> None:
    target = short_tmp / "real"
    target.mkdir()
    target.chmod(0o755)
    link = short_tmp / "s"
    link.symlink_to(target)
    assert_refused(serve(link), "symlink", str(link))
    assert list(target.iterdir()) == [], "ipcd created files through the symlink"
    assert link.is_symlink()


def test_socket_dir_owned_by_another_user_is_refused(made_dir: Path, other_user: pwd.struct_passwd) -> None:
    os.chown(made_dir, other_user.pw_uid, other_user.pw_gid)
    assert_refused(serve(made_dir), OTHER_USER)
    assert list(made_dir.iterdir()) == []


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o1777])
def test_socket_dir_writable_by_others_is_refused(made_dir: Path, mode: int) -> None:
    made_dir.chmod(mode)
    assert_refused(serve(made_dir), "writable by others", f"{stat.S_IMODE(mode):04o}")
    assert list(made_dir.iterdir()) == []
    assert stat.S_IMODE(made_dir.stat().st_mode) == mode, "ipcd changed the mode of a dir it refused"


def test_shared_sticky_dir_is_refused_without_advice_to_chmod_it() -> None:
    """``--socket-dir /tmp``: the advice must be a dedicated dir inside it;
    ``chmod 755 /tmp`` would break every other program on the host."""
    line = assert_refused(serve(Path("/tmp")), "/tmp", "--socket-dir /tmp/ipcd")
    assert "chmod" not in line, line
    assert stat.S_IMODE(os.stat("/tmp").st_mode) == 0o1777


def test_group_writable_dir_of_ours_gets_a_precise_chmod(made_dir: Path) -> None:
    made_dir.chmod(0o775)
    assert_refused(serve(made_dir), f"chmod go-w {made_dir}")


def test_socket_dir_that_is_a_file_is_refused(socket_dir: Path) -> None:
    socket_dir.write_text("not a dir")
    assert_refused(serve(socket_dir), "not a directory")
    assert socket_dir.read_text() == "not a dir"


@pytest.mark.parametrize("name", ["stream.sock", "dgram.sock"])
def test_regular_file_at_a_socket_path_is_kept(made_dir: Path, name: str) -> None:
    precious = made_dir / name
    precious.write_bytes(b"precious data")
    assert_refused(serve(made_dir), str(precious), "not a socket")
    assert precious.read_bytes() == b"precious data"
    other = made_dir / ({"stream.sock", "dgram.sock"} - {name}).pop()
    assert not other.exists(), f"{other.name} was left behind by the failed start"


def test_missing_parent_is_a_clear_error(short_tmp: Path) -> None:
    socket_dir = short_tmp / "missing" / "s"
    assert_refused(serve(socket_dir), str(socket_dir), "parent does not exist")
    assert not socket_dir.parent.exists()


# -- permissions ---------------------------------------------------------------


def test_created_dir_is_0755_and_sockets_0666(socket_dir: Path) -> None:
    old_umask = os.umask(0o077)  # inherited by the daemon: it must not matter
    try:
        with running(socket_dir):
            os.umask(old_umask)
            st = socket_dir.lstat()
            assert stat.S_ISDIR(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o755
            assert st.st_uid == os.geteuid()
            for name in ("stream.sock", "dgram.sock"):
                mode = (socket_dir / name).lstat().st_mode
                assert stat.S_ISSOCK(mode), name
                assert stat.S_IMODE(mode) == 0o666, f"{name} is {stat.S_IMODE(mode):04o}"
            serves(socket_dir)
    finally:
        os.umask(old_umask)


def test_socket_mode_and_group_narrow_access(
    socket_dir: Path, socket_group: grp.struct_group, other_user: pwd.struct_passwd
) -> None:
    socket_dir.parent.chmod(0o755)  # mkdtemp made it 0700: let the other user reach the dir
    with running(socket_dir, "--socket-mode", "0660", "--socket-group", SOCKET_GROUP):
        for name in ("stream.sock", "dgram.sock"):
            st = (socket_dir / name).lstat()
            assert stat.S_IMODE(st.st_mode) == 0o660, f"{name} is {stat.S_IMODE(st.st_mode):04o}"
            assert st.st_gid == socket_group.gr_gid, f"{name} has gid {st.st_gid}"
        stream = socket_dir / "stream.sock"
        uid, gid = other_user.pw_uid, other_user.pw_gid
        assert connect_as(stream, uid, gid, [socket_group.gr_gid]) == 0, "a group member could not connect"
        assert connect_as(stream, uid, gid, []) == 13, "a user outside the group could connect"
        serves(socket_dir)


def test_unknown_socket_group_is_a_usage_error(socket_dir: Path) -> None:
    result = serve(socket_dir, "--socket-group", "ipcd-no-such-group")
    assert result.returncode == 2, result.stderr
    assert "ipcd-no-such-group" in result.stderr
    assert not socket_dir.exists()
