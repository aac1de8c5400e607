"""The shipped units, rendered as ``ipcd install-units`` renders them, checked
by systemd's own tools: ``systemd-analyze verify`` (unknown keys are errors
with ``--recursive-errors=yes``), ``systemd-analyze security`` and
``systemd-tmpfiles``. No manager is needed for any of this."""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipcd.units import UnitFile, home_paths, plan, python_path, write
from ipcd.units import render as render_text

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")

# Measured with systemd 252: 1.2 for ipcd.service. What is left, and why
# it stays:
#   0.5 PrivateNetwork=       clients get datagram replies at autobound abstract
#                             addresses, which exist per network namespace
#   0.4 runs as root          the interpreter may live under /root (mode 0700)
#   0.2 PrivateUsers=         would map every other user's uid to "nobody",
#                             and peer uids are what access is decided by
#   0.1 ProtectHome=tmpfs     empty homes but for the installation's own paths
#                             (=yes would hide an interpreter under /root)
#   0.1 AF_UNIX allowed       it is a Unix-socket daemon
#   0.1 RootDirectory=        an image buys little over ProtectSystem=strict
#   0.1 DeviceAllow=char-rtc  added by ProtectClock=yes itself
# (systemd weighs these; they do not simply add up.) The threshold is the
# measured score: any weakening that systemd scores fails this test.
SYSTEM_EXPOSURE_MAX = 1.2
# The user unit keeps to options that work without user namespaces: 6.3.
USER_EXPOSURE_MAX = 6.5


def render(dest: Path, user: bool, socket_dir: str | None = None) -> list[UnitFile]:
    files = plan(user, dest, socket_dir, python_path())
    for unit in files:
        write(unit)
    return files


def analyze(*args: str, cwd: Path, user: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SYSTEMD_PAGER="", SYSTEMD_COLORS="0")
    if user:  # a user-mode analysis needs a runtime dir to resolve %t
        runtime = cwd / "runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)
    return subprocess.run(
        ["systemd-analyze", *(["--user"] if user else []), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_units_verify_without_errors_or_warnings(tmp_path: Path, user: bool) -> None:
    render(tmp_path, user)
    result = analyze(
        "verify", "--recursive-errors=yes", "ipcd.socket", "ipcd.service", cwd=tmp_path, user=user
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ours = [line for line in result.stderr.splitlines() if str(tmp_path) in line]
    assert not ours, "\n".join(ours)


def _exposure(output: str) -> float:
    match = re.search(r"Overall exposure level for ipcd\.service: (\d+\.\d+)", output)
    assert match, output
    return float(match.group(1))


@pytest.mark.parametrize(
    ("user", "limit"), [(False, SYSTEM_EXPOSURE_MAX), (True, USER_EXPOSURE_MAX)], ids=["system", "user"]
)
def test_security_exposure(tmp_path: Path, user: bool, limit: float) -> None:
    render(tmp_path, user)
    result = analyze("security", "--offline=yes", "--no-pager", "ipcd.service", cwd=tmp_path, user=user)
    exposure = _exposure(result.stdout)
    print(f"systemd-analyze security: {'user' if user else 'system'} ipcd.service exposure {exposure}")
    assert exposure <= limit, result.stdout


def test_rendered_interpreter_imports_ipcd(tmp_path: Path) -> None:
    """ExecStart= gets the venv's python, not the symlink's target: only the
    former has ipcd on its path."""
    (service,) = [u for u in render(tmp_path, user=False) if u.path.name == "ipcd.service"]
    exec_start = next(line for line in service.text.splitlines() if line.startswith("ExecStart="))
    python = exec_start.removeprefix("ExecStart=").split()[0]
    assert os.path.isabs(python)
    assert python == os.path.abspath(sys.executable)
    subprocess.run([python, "-c", "import ipcd.cli.ipcd, systemd.daemon"], check=True, timeout=60)


def test_home_is_hidden_but_for_the_installation(tmp_path: Path) -> None:
    (service,) = [u for u in render(tmp_path, user=False) if u.path.name == "ipcd.service"]
    assert "ProtectHome=tmpfs\n" in service.text
    bound = [
        line.split("=", 1)[1] for line in service.text.splitlines() if line.startswith("BindReadOnlyPaths=")
    ]
    assert bound == home_paths()
    interpreter = os.path.realpath(sys.executable)
    if interpreter.startswith(("/home/", "/root/", "/run/user/")):
        assert any(interpreter.startswith(path + "/") for path in bound), bound
    assert render_text("ProtectHome=tmpfs\n@HOME_PATHS@\n", "/p", "/s", []).startswith(
        "ProtectHome=tmpfs\n# "
    )


def test_socket_dir_goes_everywhere(tmp_path: Path) -> None:
    files = {u.path.name: u.text for u in render(tmp_path, user=False, socket_dir="/tmp/ipcd-x//")}
    assert "ListenStream=/tmp/ipcd-x/stream.sock\n" in files["ipcd.socket"]
    assert "ListenDatagram=/tmp/ipcd-x/dgram.sock\n" in files["ipcd.socket"]
    assert "serve --socket-dir /tmp/ipcd-x\n" in files["ipcd.service"]
    assert "d /tmp/ipcd-x 0755 root root -\n" in files["ipcd-tmpfiles.conf"]
    user = {u.path.name: u.text for u in render(tmp_path / "u", user=True)}
    assert "ListenStream=%t/ipcd/stream.sock\n" in user["ipcd.socket"]
    assert "serve --socket-dir %t/ipcd\n" in user["ipcd.service"]
    assert set(user) == {"ipcd.socket", "ipcd.service"}


def test_tmpfiles_creates_the_dir_and_never_ages_it(tmp_path: Path) -> None:
    """On a distribution that ages /tmp (here: everything older than a
    second), the socket dir and the sockets in it stay; other files go."""
    (conf,) = [u.path for u in render(tmp_path / "conf", user=False) if u.path.name.endswith(".conf")]
    root = tmp_path / "root"
    root.mkdir()
    create = ["systemd-tmpfiles", f"--root={root}", "--create", str(conf)]
    subprocess.run(create, check=True, capture_output=True, timeout=30)
    socket_dir = root / "tmp" / "ipcd"
    st = os.lstat(socket_dir)
    assert stat.S_ISDIR(st.st_mode)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0)

    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(socket_dir / "stream.sock"))
    (socket_dir / "other").write_text("kept too")
    (root / "tmp" / "stale").write_text("aged away")
    old = time.time() - 3 * 86400
    for path in (socket_dir / "stream.sock", socket_dir / "other", root / "tmp" / "stale", socket_dir):
        os.utime(path, (old, old), follow_symlinks=False)
    aging = tmp_path / "aging-tmp.conf"
    aging.write_text("d /tmp 1777 root root m:1s\n")
    clean = ["systemd-tmpfiles", f"--root={root}", "--clean", str(aging), str(conf)]
    subprocess.run(clean, check=True, capture_output=True, timeout=30)
    assert not (root / "tmp" / "stale").exists(), "the aging rule did not apply: the test proves nothing"
    assert sorted(p.name for p in socket_dir.iterdir()) == ["other", "stream.sock"]


def _install_units(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ipcd.cli.ipcd", "install-units", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_install_units_command(tmp_path: Path) -> None:
    result = _install_units("--dest", str(tmp_path / "sys"))
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in (tmp_path / "sys").iterdir())
    assert written == ["ipcd-tmpfiles.conf", "ipcd.service", "ipcd.socket"]
    for name in written:
        assert f"wrote {tmp_path / 'sys' / name}" in result.stdout
        assert stat.S_IMODE(os.stat(tmp_path / "sys" / name).st_mode) == 0o644
    assert "systemctl daemon-reload && systemctl enable --now ipcd.socket" in result.stdout
    service = (tmp_path / "sys" / "ipcd.service").read_text()
    assert (
        f"ExecStart={os.path.abspath(sys.executable)} -I -m ipcd.cli.ipcd serve --socket-dir /tmp/ipcd\n"
        in service
    )

    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "config"))
    env.pop("IPCD_SOCKET_DIR", None)
    result = _install_units("--user", env=env)
    assert result.returncode == 0, result.stderr
    user_dir = tmp_path / "config" / "systemd" / "user"
    assert sorted(p.name for p in user_dir.iterdir()) == ["ipcd.service", "ipcd.socket"]
    assert "systemctl --user daemon-reload && systemctl --user enable --now ipcd.socket" in result.stdout
    assert "IPCD_SOCKET_DIR" in result.stdout


def test_install_units_dry_run_writes_nothing(tmp_path: Path) -> None:
    result = _install_units("--dry-run", "--dest", str(tmp_path / "d"), "--socket-dir", "/tmp/ipcd-dry")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "d").exists()
    assert "ListenStream=/tmp/ipcd-dry/stream.sock" in result.stdout
    assert f"# {tmp_path / 'd' / 'ipcd.service'}" in result.stdout
    result = _install_units("--dry-run")
    assert result.returncode == 0, result.stderr
    for path in (
        "/etc/systemd/system/ipcd.socket",
        "/etc/systemd/system/ipcd.service",
        "/etc/tmpfiles.d/ipcd.conf",
    ):
        assert f"# {path}\n" in result.stdout


@pytest.mark.parametrize(
    ("socket_dir", "complaint"),
    [
        ("relative/dir", "absolute"),
        ("/tmp/with space", "whitespace"),
        ("/tmp/" + "x" * 100, "too long"),
    ],
)
def test_install_units_refuses_bad_socket_dirs(tmp_path: Path, socket_dir: str, complaint: str) -> None:
    result = _install_units("--dest", str(tmp_path), "--socket-dir", socket_dir)
    assert result.returncode == 1
    assert complaint in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert not list(tmp_path.iterdir())
