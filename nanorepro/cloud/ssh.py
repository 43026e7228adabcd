"""One SSH connection to a node: the key checked, the host key pinned on first use, dropped connections
made again (with backoff) while the node's jobs keep running, short commands run, files moved over SFTP.

A node of a lease of several is reached through the head (ProxyJump, done by paramiko): a `direct-tcpip`
channel from the head to the node's private address carries its connection, and its host key is pinned in
the same known_hosts. The private key is read from its path and never copied. paramiko is imported only to
connect, so the hub kernel can import this without it.
"""

from __future__ import annotations

import contextlib
import shlex
import stat
import threading
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable

from nanorepro.errors import UserError

if TYPE_CHECKING:
    import paramiko

KNOWN_HOSTS = ".chameleon_known_hosts"  # the node's host key, pinned on first use
RECONNECT_TIMEOUT_S = 600.0  # how long a dropped connection is retried before giving up
_KNOWN_HOSTS_LOCK = threading.Lock()  # nodes connect in parallel; each adds its key to the one known_hosts file


def quote(path: str | PurePosixPath) -> str:
    return shlex.quote(str(path))


def read_file(sftp: "paramiko.SFTPClient", path: PurePosixPath, offset: int = 0) -> bytes | None:
    """A file on the node from `offset` on; None when it does not exist (yet)."""
    try:
        with sftp.open(str(path)) as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        return None


def check_key_file(path: str | Path) -> Path:
    """The SSH private key's path, once it exists and only its owner can read it (ssh's own rule)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"SSH private key {path} does not exist",
                        "point OS_KEYPAIR_PRIVATE_KEY (or key_path) at the key of the keypair used for the server")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise UserError(f"SSH private key {path} is readable by other users (mode {mode:o})",
                        f"chmod 600 {shlex.quote(str(path))}")
    return path


class Connection:
    """One SSH connection to a node, made again when it drops: the key checked, the host key pinned
    in `known_hosts` on first use, short commands run, files moved over SFTP. With `via` (the head
    node's Connection) it is made through that node, as OpenSSH's ProxyJump: a `direct-tcpip` channel
    from the head to (host, port) on the private network carries this connection."""

    def __init__(self, host: str, *, key_path: str | Path, user: str, port: int, known_hosts: Path | None,
                 connect_timeout_s: float, say: Callable[[str], None], via: "Connection | None" = None):
        self.host, self.port, self.user = host, int(port), user
        self.key_path = Path(key_path).expanduser()
        self.known_hosts, self.connect_timeout_s, self.say = known_hosts, connect_timeout_s, say
        self.via = via
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._ever_connected = False
        self.reconnects = 0  # connections made again after a drop: a watcher learns that it could not look meanwhile
        self._lock = threading.RLock()  # runners on other nodes reconnect this one, from their threads

    @property
    def address(self) -> str:
        """user@host:port, and through which host when it is reached through the head."""
        return f"{self.user}@{self.host}:{self.port}" + (f" (through {self.via.host})" if self.via else "")

    def _connect(self) -> "paramiko.SSHClient":
        import paramiko

        check_key_file(self.key_path)
        client = paramiko.SSHClient()
        known = self.known_hosts
        if known and known.is_file():
            client.load_host_keys(str(known))
        # A new bare-metal node has a new host key: trust it the first time, then pin it in the state folder.
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        sock = None
        if self.via is not None:  # the head opens the TCP connection on its private network: ProxyJump
            sock = self.via.client().get_transport().open_channel(
                "direct-tcpip", (self.host, self.port), ("127.0.0.1", 0), timeout=self.connect_timeout_s)
        try:
            client.connect(self.host, port=self.port, username=self.user, key_filename=str(self.key_path),
                           look_for_keys=False, allow_agent=False, timeout=self.connect_timeout_s,
                           banner_timeout=self.connect_timeout_s, auth_timeout=self.connect_timeout_s, sock=sock)
        except paramiko.BadHostKeyException as e:
            raise UserError(f"the host key of {self.host} changed since the first connection",
                            f"if the node was re-created, delete {known} and retry") from e
        except paramiko.AuthenticationException as e:
            raise UserError(f"{self.user}@{self.host} refused the key {self.key_path}",
                            "use the private key of the keypair the server was launched with") from e
        if known:
            self._pin(client, known)
        self._ever_connected = True
        client.get_transport().set_keepalive(30)  # keeps NAT state alive between polls of a long stage
        return client

    def _pin(self, client: "paramiko.SSHClient", known: Path) -> None:
        """Add this node's host key to `known` beside the other nodes' (read again under a lock: nodes
        connect in parallel, and a plain save would drop a key another thread just added)."""
        import paramiko

        key = client.get_transport().get_remote_server_key()
        entry = self.host if self.port == 22 else f"[{self.host}]:{self.port}"  # paramiko's and OpenSSH's form
        with _KNOWN_HOSTS_LOCK:
            keys = paramiko.HostKeys()
            if known.is_file():
                keys.load(str(known))
            keys.add(entry, key.get_name(), key)
            known.parent.mkdir(parents=True, exist_ok=True)
            keys.save(str(known))

    def client(self) -> "paramiko.SSHClient":
        """The live connection, made (again) if there is none."""
        with self._lock:
            transport = self._client.get_transport() if self._client else None
            if transport is None or not transport.is_active():
                if self._client is not None:
                    self.say(f"connection to {self.host} lost; reconnecting - jobs on the node keep running")
                    self.reconnects += 1
                self.close()
                self._client = self._connect()
            return self._client

    def sftp(self) -> "paramiko.SFTPClient":
        if self._sftp is None or self._sftp.get_channel() is None or self._sftp.get_channel().closed:
            self._sftp = self.client().open_sftp()
        return self._sftp

    def close(self) -> None:
        for thing in (self._sftp, self._client):
            with contextlib.suppress(Exception):  # closing a dead connection can raise anything; nothing to save
                if thing is not None:
                    thing.close()
        self._sftp = self._client = None

    def retrying(self, what: str, fn: Callable[[], Any]) -> Any:
        """Call fn; on a dropped connection reconnect (with backoff) and call it again. fn must be safe
        to repeat: job launches check for a running copy first."""
        import paramiko

        deadline, delay = None, 1.0
        while True:
            try:
                return fn()
            except (paramiko.SSHException, EOFError, OSError) as e:
                if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
                    raise  # an answer from a live connection, not a dropped one
                if not self._ever_connected:
                    raise UserError(f"cannot reach {self.address} over SSH "
                                    f"({type(e).__name__}: {e})",
                                    "check the lease is still active and the server up (re-run 00_reserve_node: "
                                    "it reuses both), then retry") from e
                if deadline is None:
                    deadline = time.monotonic() + RECONNECT_TIMEOUT_S
                    self.say(f"[{what}] connection to {self.host} lost ({type(e).__name__}: {e}); "
                             "reconnecting - jobs on the node keep running")
                if time.monotonic() > deadline:
                    raise UserError(f"lost the connection to {self.host} and could not reconnect for "
                                    f"{RECONNECT_TIMEOUT_S:.0f} s ({e})",
                                    "jobs keep running on the node: re-run this cell later to attach to them, "
                                    "and check the node is up and its lease active") from e
                self.close()
                time.sleep(delay)
                delay = min(delay * 2, 15.0)

    def once(self, fn: Callable[[], Any]) -> Any:
        """Call fn once: a dropped connection raises (and is closed, so that the next call connects again)
        instead of being retried for RECONNECT_TIMEOUT_S. For a watcher that must notice a node that died."""
        import paramiko

        try:
            return fn()
        except (paramiko.SSHException, EOFError, OSError) as e:
            if not isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
                self.close()  # a half-dead transport would otherwise be reused by the next call
            raise

    def exec(self, command: str, timeout: float = 120.0, retry: bool = True) -> tuple[int, str]:
        """Run a short shell command on the node; its exit code and combined output. Without `retry`, a
        dropped connection raises at once (see once)."""
        def go() -> tuple[int, str]:
            chan = self.client().get_transport().open_session(timeout=self.connect_timeout_s)
            chan.settimeout(timeout)
            chan.set_combine_stderr(True)
            chan.exec_command(command)
            data = b""
            while chunk := chan.recv(65536):
                data += chunk
            code = chan.recv_exit_status()
            chan.close()
            return code, data.decode("utf-8", "replace")

        return self.retrying("ssh", go) if retry else self.once(go)

    def check(self, command: str, what: str, retry: bool = True, timeout: float = 120.0) -> str:
        """exec, with a failure as a UserError naming `what`."""
        code, out = self.exec(command, timeout=timeout, retry=retry)
        if code:
            raise UserError(f"{what} failed on {self.host} (exit {code}): {out.strip()[-2000:]}",
                            "read the message above; the node may be out of disk or still booting")
        return out
