"""A private OpenSSH server on 127.0.0.1 for tests: the "node" the remote runner drives.

It runs Debian's /usr/sbin/sshd (package openssh-server, installed by scripts/system-deps.sh) on a
free port with a temp host key, a temp client key and its own authorized_keys, and lets in only the
user running the tests (creating a system user would need root and change the machine).
"""

from __future__ import annotations

import getpass
import os
import shlex
import shutil
import site
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"


@dataclass
class Sshd:
    host: str
    port: int
    user: str
    key_path: Path  # the client's private key
    pub_path: Path
    proc: subprocess.Popen
    dir: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def session_pids(self) -> list[int]:
        """The sshd processes serving connections right now (children of the listener)."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "nanorepro-test", "-f", str(path)],
                   check=True)


def start(dir: Path, timeout_s: float = 15.0) -> Sshd:
    """Start sshd listening on 127.0.0.1 only; raises RuntimeError saying what is missing."""
    if not Path(SSHD).exists() or shutil.which("ssh-keygen") is None:
        raise RuntimeError(f"{SSHD} or ssh-keygen not found: install openssh-server (bash scripts/system-deps.sh)")
    dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # sshd's privilege-separation dir
    host_key, client_key = dir / "host_ed25519", dir / "client_ed25519"
    _keygen(host_key)
    _keygen(client_key)
    auth = dir / "authorized_keys"
    auth.write_text(Path(f"{client_key}.pub").read_text())
    auth.chmod(0o600)
    user, port = getpass.getuser(), _free_port()
    config = dir / "sshd_config"
    config.write_text("\n".join([
        "ListenAddress 127.0.0.1", f"Port {port}", f"HostKey {host_key}", f"PidFile {dir / 'sshd.pid'}",
        f"AuthorizedKeysFile {auth}", f"AllowUsers {user}", "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
        "StrictModes no",  # keys under /tmp fail the mode check otherwise
        "Subsystem sftp internal-sftp", "LogLevel ERROR", "MaxSessions 50", "MaxStartups 50",
    ]) + "\n")
    log = open(dir / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    server = Sshd("127.0.0.1", port, user, client_key, Path(f"{client_key}.pub"), proc, dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {(dir / 'sshd.log').read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(4).startswith(b"SSH-"):
                    return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"sshd did not answer on 127.0.0.1:{port} within {timeout_s} s")


def cheap_install() -> str:
    """An install command for the node that is a real venv and `pip install -e .` of the copied code, offline
    and in seconds: the venv sees this venv's packages (numpy, torch, ...) through a .pth file."""
    pth = f".venv/lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages/outer.pth"
    return (f"{shlex.quote(sys.executable)} -m venv --without-pip .venv && "
            f"echo {shlex.quote(site.getsitepackages()[0])} > {pth} && "
            ".venv/bin/python -m pip install -q --no-deps --no-build-isolation --no-index -e .")
