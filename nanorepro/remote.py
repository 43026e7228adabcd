"""Run stages on a reserved Chameleon node over SSH, as jobs that outlive the connection.

Every stage runs on the node under `setsid nohup`, writing `.jobs/<stage>/log` and, when it ends,
`.jobs/<stage>/rc`. The runner polls both, prints new log lines as they come, and reconnects when
the connection drops, so a flaky network or a culled hub kernel never kills a training run; running
the same stage again while it is still going attaches to it instead of starting a second copy.

Layout on the node: the code in `remote_dir` (default `~/nanorepro`), its venv in `<remote_dir>/.venv`,
and a local work folder inside the checkout (e.g. `results/chameleon`) mirrored at the same relative
path under `remote_dir`. The SSH private key is read from its path; it is never copied anywhere.
`Connection` is the SSH side (connect, host-key pinning, reconnect and retry, exec, SFTP); `SSHRunner`
uses it for the stages (setup, jobs, files). No torch here; paramiko is imported only to connect.

A lease of several nodes (the record's "nodes", head first): only the head has a public address; the
others are reached through it (ProxyJump, done by paramiko) at their private addresses, their host
keys pinned in the same known_hosts. A parallel training stage runs torchrun on every node as
detached jobs (static rendezvous at the head's private address: rank 0, which writes the run's files,
is on the head; NCCL and gloo on the interface that holds each node's private address, which setup
found and admitted in the node's firewall: network.py); the head's log is streamed, and a node whose
job fails, is killed or stops answering stops the others' within a minute and fails the stage, named
as the cause over the nodes that failed because of it. A re-run resumes from the head's checkpoint,
which rank 0 sends to the ranks on the other nodes (distributed.World.main_bytes).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import posixpath
import re
import shlex
import stat
import subprocess
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable

from .config import ON_GPU_NODE
from .errors import UserError
from .files import project_root
from .fmt import duration

if TYPE_CHECKING:
    import paramiko

NODE_FILE = "chameleon_node.json"  # the node record 00_reserve_node writes into the state folder
KNOWN_HOSTS = ".chameleon_known_hosts"  # the node's host key, pinned on first use
JOBS = ".jobs"
TAIL_LINES = 20
RECONNECT_TIMEOUT_S = 600.0  # how long a dropped connection is retried before giving up
PEER_GRACE_S = 10.0  # how long the other nodes' jobs may take to end on their own once one node's has ended
UNREACHABLE_S = 30.0  # how long a node may not answer over SSH (while the head does) before it counts as dead
STATUS_TIMEOUT_S = 15.0  # one look at a job on a node that may have died: a dead one never answers
BLAME_LINES = 200  # how much of a failed node's log is searched for a lost peer (torchrun's traceback is ~30 lines)
RDZV_PORT = 29500  # torchrun's rendezvous port on the head (its default); the record's rdzv_port or
# $NANOREPRO_RDZV_PORT replace it (tests running side by side on one machine)
_KNOWN_HOSTS_LOCK = threading.Lock()  # nodes connect in parallel; each adds its key to the one known_hosts file
BOOT_ID = "/proc/sys/kernel/random/boot_id"  # new at every boot: a pid from before a reboot means nothing
# Written by a stage that records the node: the full nvidia-smi report and envinfo's record (no env vars).
NODE_INFO_SCRIPT = """
import json, subprocess, sys
from pathlib import Path
from nanorepro import envinfo
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
try:
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout
except (OSError, subprocess.SubprocessError) as e:
    smi = f"nvidia-smi not available on this node: {e}\\n"
(out / "nvidia-smi.txt").write_text(smi)
envinfo.write(out / "env.json", envinfo.capture())
print(envinfo.summary(envinfo.read(out / "env.json")))
print(smi)
"""


def read_node_record(state_dir: Path) -> dict[str, Any]:
    """The node record `chameleon.reserve` keeps in `state_dir` ({} when there is none): the one reader."""
    path = Path(state_dir) / NODE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _q(path: str | PurePosixPath) -> str:
    return shlex.quote(str(path))


def _same_boot(boot_file: str) -> str:
    """A shell test: the boot id a job recorded (a quoted path) is this boot's, or none was recorded."""
    return f'{{ [ ! -s {boot_file} ] || [ "$(cat {boot_file})" = "$(cat {BOOT_ID} 2>/dev/null)" ]; }}'


# How a stage starts on the node (sent over SSH, run by sh in the remote home). Placeholders are
# shell-quoted paths relative to the stage folder {cwd}; {cmd} is the quoted command line.
JOB_SCRIPT = """\
mkdir -p -- {cwd} && cd -- {cwd} || exit 97
# The same job still runs (pid alive, recorded in this boot, no exit code yet): attach to it instead.
if [ -f {pid} ] && [ ! -f {rc} ] && kill -0 "$(cat {pid})" 2>/dev/null && {same_boot}; then echo running; exit 0; fi
rm -rf -- {job}; mkdir -p -- {job}
# The job's own script, kept in its folder: it records its boot and pid, runs the command, then
# writes the exit code by rename, so a reader never sees half of it.
cat > {job}/run.sh <<'{end}'
cat {boot_id} > {boot} 2>/dev/null
echo $$ > {pid}
export PYTHONUNBUFFERED=1 {on_gpu_node}=1
{cmd}
echo $? > {rc}.tmp && mv {rc}.tmp {rc}
{end}
# setsid nohup: the job outlives this SSH session and the hub's kernel. Alone on its line (not in an
# &&-list, which would hold the SSH channel open until the job ends).
setsid nohup sh {job}/run.sh > {log} 2>&1 < /dev/null &
# Wait for the pid file, so that a job without one later is known to be gone (see SSHRunner._follow).
i=0; while [ ! -s {pid} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo started
"""


# A job's state, as one word: "rc <code>", running, or gone (rc read again after the pid: it may have
# ended in between).
STATUS_SCRIPT = """\
if [ -f {rc} ]; then echo "rc $(cat {rc})"
elif [ -s {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null && {same_boot}; then echo running
elif [ -f {rc} ]; then echo "rc $(cat {rc})"
else echo gone; fi
"""

# The job's state and the end of its log (its last 4 KB: a progress bar redrawn with \r and no newline for days
# makes one line of many MB), for a watcher that must still have something to show once the node has died.
LOOK_SCRIPT = STATUS_SCRIPT + "echo '--- log'; tail -c 4096 -- {log} 2>/dev/null; true\n"

# Stop a job and its process tree: TERM, then KILL what is left after 5 s. The tree, not the job's
# process group: torchrun starts its workers in sessions of their own.
KILL_SCRIPT = """\
p=$(cat {pid} 2>/dev/null)
[ -n "$p" ] && [ ! -f {rc} ] && {same_boot} || exit 0
tree() {{ for c in $(ps -o pid= --ppid "$1"); do tree "$c"; done; echo "$1"; }}
pids=$(tree "$p")
kill -TERM $pids 2>/dev/null
i=0
while [ $i -lt 50 ]; do
  left=; for q in $pids; do kill -0 "$q" 2>/dev/null && left=1; done
  [ -z "$left" ] && exit 0
  sleep 0.1; i=$((i+1))
done
kill -KILL $pids 2>/dev/null
exit 0
"""


# What a rank's log says when it failed because a rank on another node went away (gloo's and NCCL's errors,
# torchrun's store): such a node failed after its partner, not because of itself.
PEER_LOST = re.compile(r"connection (reset|closed) by peer|broken pipe|remote (worker|process)|ncclRemoteError|"
                       r"NCCL communicator was aborted|failed to recv, got 0 bytes|DistNetworkError|DistStoreError|"
                       r"Watchdog caught collective operation timeout", re.IGNORECASE)
_DEAD = {"gone": "lost its job (killed, or the node rebooted)", "unreachable": "does not answer over SSH"}


def _state(out: str) -> str | int:
    """STATUS_SCRIPT's answer as a job state: its exit code, "running" or "gone"."""
    words = out.split()
    if words[:1] == ["rc"]:
        return int(words[1]) if len(words) > 1 and words[1].lstrip("-").isdigit() else 1
    return "running" if words == ["running"] else "gone"


def lost_peer(lines: list[str]) -> bool:
    """Whether these log lines say that a partner rank went away (PEER_LOST)."""
    return any(PEER_LOST.search(line) for line in lines)


@dataclasses.dataclass
class _Watch:
    """What the watcher of a stage on several nodes knows (SSHRunner._watch): when each node's job was first
    seen ended, since when each other node has not answered, which nodes it gave up on, which jobs it stopped."""

    ended: dict[int, float] = dataclasses.field(default_factory=dict)
    lost: dict[int, float] = dataclasses.field(default_factory=dict)
    unreachable: set[int] = dataclasses.field(default_factory=set)
    stopped: list[int] = dataclasses.field(default_factory=list)
    tails: dict[int, list[str]] = dataclasses.field(default_factory=dict)  # each other node's log, as last read

    def see(self, states: list[str | int]) -> list[int]:
        """Note when each job was first seen ended; the nodes whose job still runs."""
        now = time.monotonic()
        for i, state in enumerate(states):
            if state != "running":
                self.ended.setdefault(i, now)
        return [i for i, state in enumerate(states) if state == "running"]

    def dead(self, states: list[str | int]) -> list[int]:
        """The nodes whose job cannot end well, first seen first: gone without an exit code (and not stopped
        by the watcher), or not answering."""
        return sorted((i for i, s in enumerate(states) if s in _DEAD and i not in self.stopped),
                      key=self.ended.__getitem__)


class _LogStream:
    """A job's log as it grows: whole lines printed as they arrive (a progress bar's \\r kept, so the
    notebook redraws it in place), the last TAIL_LINES kept for error messages."""

    def __init__(self, say: Callable[[str], None]):
        self.say, self.pending = say, b""
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def feed(self, data: bytes, final: bool = False) -> None:
        """Print the complete lines of what arrived; with `final`, the rest too."""
        self.pending += data
        complete, sep, rest = (self.pending, b"\n", b"") if final else self.pending.rpartition(b"\n")
        self.pending = rest
        text = complete.decode("utf-8", "replace") if sep else ""
        for line in (text[:-1] if text.endswith("\n") else text).split("\n") if text else []:
            self.say(line)
            self.tail.append(line.rstrip("\r").split("\r")[-1])  # a progress bar's last state


def on_each(nodes: list[Any], fn: Callable[[int, Any], Any]) -> list[Any]:
    """fn(i, node) for every node at once, one thread each; the results in node order, a failure as
    its exception (so that one node's failure never hides how the others did)."""
    if len(nodes) == 1:
        try:
            return [fn(0, nodes[0])]
        except Exception as e:  # noqa: BLE001 - handed back as the node's result
            return [e]
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        futures = [pool.submit(fn, i, node) for i, node in enumerate(nodes)]
        return [f.exception() or f.result() for f in futures]


def _raise_first(results: list[Any]) -> list[Any]:
    """The results, or the first one that is an exception, raised."""
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def _read(sftp: "paramiko.SFTPClient", path: PurePosixPath, offset: int = 0) -> bytes | None:
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


def source_files(root: Path) -> list[Path]:
    """The files to ship to the node: git's tracked and untracked-but-not-ignored files, or the package."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=root, capture_output=True, check=True, timeout=60).stdout
        names = sorted({n for n in out.decode().split("\0") if n})
    except (OSError, subprocess.SubprocessError):
        names = ["pyproject.toml", "README.md", "LICENSE"]
        names += [str(p.relative_to(root)) for p in (root / "nanorepro").rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts]
    return [root / n for n in names if (root / n).is_file() and not n.startswith("results/")]  # outputs, not code


def source_tar(root: Path) -> tuple[bytes, str]:
    """The files as a .tar.gz, and a digest of their names and contents (not their times)."""
    buf, digest = io.BytesIO(), hashlib.sha256()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in source_files(root):
            name = str(path.relative_to(root))
            try:
                content = path.read_bytes()
                tar.add(path, arcname=name, recursive=False)
            except FileNotFoundError:  # deleted since git listed it
                continue
            digest.update(name.encode() + b"\0" + content + b"\0")
    return buf.getvalue(), digest.hexdigest()


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


class SSHRunner:
    """Runs `python -m nanorepro <args>` on a node as detached jobs and copies results back. `workdir`
    is the local results folder; stages run in its mirror on the node (see module doc).

    A lease of several nodes gives the head's runner `peers`, one runner per other node, reached
    through the head (`via`). Then a stage with parallel=ddp|fsdp runs torchrun on every node, a
    stage asked for `every_node` (data preparation) runs on each, `put` copies to each, and
    everything else (fetch, sample, evaluation) stays on the head, where rank 0 writes."""

    def __init__(self, host: str, *, key_path: str | Path, user: str = "cc", port: int = 22,
                 remote_dir: str = "nanorepro", workdir: str | Path = ".", local_root: Path | None = None,
                 state_dir: Path | None = None, poll_s: float = 2.0, connect_timeout_s: float = 15.0,
                 out: Callable[[str], None] | None = None, via: "SSHRunner | None" = None,
                 name: str | None = None, private_ip: str | None = None, lease: str | None = None,
                 rdzv_port: int = RDZV_PORT, iface: str | None = None):
        self._print = out or (lambda s: print(s, flush=True))
        self.ssh = Connection(host, key_path=key_path, user=user, port=port,
                              known_hosts=Path(state_dir) / KNOWN_HOSTS if state_dir else None,
                              connect_timeout_s=connect_timeout_s,
                              say=lambda s: self._print(s),  # through _print, which callers may replace
                              via=via.ssh if via is not None else None)
        self.host, self.user = self.ssh.host, user
        self.remote_dir = PurePosixPath(remote_dir)
        self.local_root = Path(local_root or project_root()).resolve()
        self.workdir_rel = self._mirror(Path(workdir))
        self.poll_s = poll_s
        self.name = name or host  # the node's name in messages (the server's name on Chameleon)
        self.private_ip = private_ip or host  # where the other nodes reach this one (torchrun's rendezvous)
        self.lease, self.rdzv_port = lease, int(rdzv_port)
        self.iface = iface  # the interface holding private_ip (network.prepare finds it): NCCL's and gloo's
        self.peers: list[SSHRunner] = []  # the lease's other nodes, reached through this one (from_state)

    @property
    def nodes(self) -> list["SSHRunner"]:
        """Every node's runner, the head (this one) first: node i is `nodes[i]`."""
        return [self, *self.peers]

    def label(self, i: int) -> str:
        """How messages name node i: its index, name and address."""
        node = self.nodes[i]
        return f"node {i} ({node.name}, {node.ssh.address})"

    @classmethod
    def from_state(cls, state_dir: Path, workdir: Path | None = None, **kwargs: Any) -> "SSHRunner":
        """The runner for the node(s) recorded in `<state_dir>/chameleon_node.json` by `00_reserve_node`:
        the head's, with a peer runner for each other node of the record's "nodes" (a record without
        "nodes", from before leases of several nodes, is one node)."""
        node = read_node_record(Path(state_dir))
        if not node:
            raise UserError(f"no reserved node recorded in {Path(state_dir) / NODE_FILE}",
                            "run 00_reserve_node with target='chameleon' and the same results_dir first")
        if node.get("status") == "released":
            raise UserError(f"the node recorded in {state_dir} was released ({node.get('updated')})",
                            "run 00_reserve_node with target='chameleon' to reserve a new one")
        for key in ("host", "key_path"):
            if not node.get(key):
                raise UserError(f"the node record in {state_dir} has no {key} (the reservation did not finish)",
                                "re-run 00_reserve_node: it reuses the lease and server it already made")
        poll = kwargs.pop("poll_s", None) or float(os.environ.get("NANOREPRO_SSH_POLL_S", 2.0))
        nodes = node.get("nodes") or [{}]
        common = dict(key_path=node["key_path"], user=node.get("user", "cc"),
                      remote_dir=node.get("remote_dir", "nanorepro"), workdir=workdir if workdir is not None else Path(state_dir), state_dir=Path(state_dir),
                      poll_s=poll, lease=node.get("lease_name"), **kwargs,
                      rdzv_port=node.get("rdzv_port") or int(os.environ.get("NANOREPRO_RDZV_PORT", RDZV_PORT)))
        head = cls(node["host"], port=node.get("port", 22), name=nodes[0].get("name"),
                   private_ip=nodes[0].get("private_ip"), iface=(nodes[0].get("network") or {}).get("iface"), **common)
        for i, peer in enumerate(nodes[1:], start=1):
            if not peer.get("private_ip"):
                raise UserError(f"node {i} of the record in {state_dir} has no private_ip (the reservation did "
                                "not finish)", "re-run 00_reserve_node: it reuses the lease and servers it made")
            common["out"] = lambda s, i=i: head._print(f"[node {i}] {s}")  # the head's _print, replaced or not
            head.peers.append(cls(peer["private_ip"], port=peer.get("ssh_port", 22), name=peer.get("name"),
                                  private_ip=peer["private_ip"], iface=(peer.get("network") or {}).get("iface"),
                                  via=head, **common))
        return head

    def _mirror(self, workdir: Path) -> PurePosixPath:
        """The stage folder on the node, relative to remote_dir."""
        if not workdir.is_absolute():
            return PurePosixPath(workdir.as_posix())
        try:
            return PurePosixPath(workdir.resolve().relative_to(self.local_root).as_posix())
        except ValueError:  # outside the checkout: keep only its name
            return PurePosixPath("work") / workdir.name

    @property
    def stage_dir(self) -> PurePosixPath:
        return self.remote_dir / self.workdir_rel

    def close(self) -> None:
        for node in reversed(self.nodes):  # the others first: their connections run through the head's
            node.ssh.close()

    # -- setup -------------------------------------------------------------------------------
    def setup(self, install_cmd: str | None = None, image: str | None = None) -> dict[str, Any] | None:
        """Copy this checkout to the node, create its venv and install nanorepro with the training extras.

        By default (nodeinstall): the node's Python is checked against requires-python before anything is
        copied, missing compiler/headers are installed, torch comes from PyTorch's index for the driver's
        CUDA, and torch must then see every GPU (its report is returned). `install_cmd` (or
        $NANOREPRO_INSTALL_CMD) replaces all of that with one command run in remote_dir (tests, odd nodes)."""
        from . import nodeinstall

        install_cmd = install_cmd or os.environ.get("NANOREPRO_INSTALL_CMD")
        started = time.time()
        facts = builds = None
        if not install_cmd:
            facts = nodeinstall.probe(self, image)
            builds = nodeinstall.torch_builds(facts.cuda, facts.driver)
            self._print(f"node: Python {facts.python}, NVIDIA driver {facts.driver} (CUDA "
                        f"{facts.cuda[0]}.{facts.cuda[1]}), {facts.gpus} GPU(s): torch {nodeinstall.TORCH_VERSION} "
                        f"{' or, if pip finds none, '.join(builds)}")
            facts = nodeinstall.install_system_packages(self, facts, image)
            install_cmd = nodeinstall.install_command(builds)
        data, digest = source_tar(self.local_root)
        marker = f"{digest} {install_cmd}"
        here = _q(self.remote_dir)
        done = self.ssh.exec(f"test -x {here}/.venv/bin/python && cat -- {here}/.nanorepro-installed 2>/dev/null")
        if done[1].strip() == marker:
            self._print(f"the node already has this code installed ({self.remote_dir})")
        else:
            self._print(f"copying the code ({len(data) / 1e3:.0f} kB) to {self.user}@{self.host}:{self.remote_dir}")
            self.ssh.check(f"mkdir -p -- {here}", "creating the code folder")
            archive = self.remote_dir / ".nanorepro-src.tar.gz"
            self.ssh.retrying("copy", lambda: self.ssh.sftp().putfo(io.BytesIO(data), str(archive)))
            self.ssh.check(f"cd -- {here} && tar -xzf .nanorepro-src.tar.gz && rm -f .nanorepro-src.tar.gz "
                           "&& rm -f .nanorepro-installed", "unpacking the code")
            self._print(f"installing on the node: {install_cmd}")
            argv = ["sh", "-c", install_cmd]
            code = self.run_command(argv, stage="setup", cwd=self.remote_dir, check=builds is None)
            if code:  # our own install: pip finding no torch for any build is said as one plain error
                log = self.remote_dir / self._job(argv, "setup")[1]
                tail = self._tail(log)
                if code == nodeinstall.TORCH_INSTALL_FAILED:
                    raise nodeinstall.install_failed(facts, builds, tail)
                raise UserError(f"stage setup failed on {self.host} (exit {code}); the last lines of its log:\n"
                                + "\n".join(tail), f"fix the cause and re-run; the whole log is {log / 'log'} on the node")
            self.ssh.check(f"printf '%s\\n' {_q(marker)} > {here}/.nanorepro-installed", "marking the install")
        report = None
        if facts is not None:
            report = nodeinstall.check_gpus(self, facts, builds[0])
            self._print(f"torch {report['torch']} sees {len(report['devices'])} GPU(s) and runs bf16 on each: "
                        + ", ".join(d["name"] for d in report["devices"]))
        self.ssh.check(f"mkdir -p -- {_q(self.stage_dir)}", "creating the work folder")
        self._print(f"node ready in {duration(time.time() - started)}")
        return report

    def record_node(self, rel_dir: str = "node") -> None:
        """Write the node's `nvidia-smi` report and environment record into `<workdir>/<rel_dir>/` on the node."""
        self.run_command([self._python(), "-c", NODE_INFO_SCRIPT, rel_dir], stage="record node")

    def _python(self) -> str:
        """The venv's python, addressed from the stage folder."""
        return posixpath.join(*[".."] * len(self.workdir_rel.parts), ".venv/bin/python")

    # -- jobs --------------------------------------------------------------------------------
    def run(self, args: list[str], *, stage: str, check: bool = True, parallel: str = "none",
            every_node: bool = False) -> int:
        """`python -m nanorepro <args>` on the node in the stage folder, its log streamed here; with
        parallel=ddp|fsdp (the stage's config says which) under torchrun, one process per GPU of the node,
        and on every node of a lease of several (`torchrun --nnodes`, see run_everywhere). `every_node`:
        the same command on each node (what every rank reads from its own disk, e.g. the prepared data)."""
        if self.peers and parallel != "none":
            self._check_network()
            endpoint, gpus = f"{self.private_ip}:{self.rdzv_port}", self.gpus  # one node type per lease
            return self.run_everywhere([interface_env(node.iface) + stage_argv(
                node._python(), args, parallel, gpus, nodes=len(self.nodes), node_rank=i, rdzv_endpoint=endpoint)
                for i, node in enumerate(self.nodes)], stage=stage, check=check)
        if self.peers and every_node:
            return self.run_everywhere([stage_argv(node._python(), args) for node in self.nodes],
                                       stage=stage, check=check)
        gpus = self.gpus if parallel != "none" else 1
        return self.run_command(stage_argv(self._python(), args, parallel, gpus), stage=stage, check=check)

    def _check_network(self) -> None:
        """A UserError unless setup prepared the private network of every node (firewall opened, port
        checked, interface found): without it torchrun would wait for partners that cannot reach it."""
        missing = [i for i, node in enumerate(self.nodes) if not node.iface]
        if missing:
            raise UserError(f"the private network of {', '.join(self.label(i) for i in missing)} was not prepared "
                            "for training on several nodes (its firewall opened, the head's rendezvous port "
                            "checked, its interface recorded)",
                            "re-run 00_reserve_node (or `nanorepro reserve`): it reuses the lease and servers and "
                            "prepares the network during setup")

    @functools.cached_property
    def gpus(self) -> int:
        """GPUs on the node (`nvidia-smi -L`), asked once per runner; 0 without a working nvidia-smi."""
        code, out = self.ssh.exec("nvidia-smi -L 2>/dev/null")
        return sum(line.startswith("GPU ") for line in out.splitlines()) if code == 0 else 0

    def _job(self, argv: list[str], stage: str) -> tuple[str, PurePosixPath]:
        """The shell command for argv and its job folder (relative to the stage folder): one per command."""
        cmd = " ".join(_q(a) for a in [*remote_env(), *argv])
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in stage)[:40]
        return cmd, PurePosixPath(JOBS) / f"{slug}-{hashlib.sha1(cmd.encode()).hexdigest()[:8]}"

    def run_command(self, argv: list[str], *, stage: str, check: bool = True,
                    cwd: PurePosixPath | None = None) -> int:
        """Run argv as a detached job on the node (attaching if the same job still runs); its exit code."""
        cwd = cwd if cwd is not None else self.stage_dir
        cmd, job = self._job(argv, stage)
        if self._launch(cmd, job, cwd) == "running":
            self._print(f"[{stage}] already running on {self.host}: attaching to it")
        else:
            self._print(f"[{stage}] started on {self.host} in {cwd} (log: {cwd / job / 'log'})")
        code, tail = self._follow(stage, cwd / job)
        if code and check:
            raise UserError(f"stage {stage} failed on {self.host} (exit {code}); the last lines of its log:\n"
                            + "\n".join(tail),
                            f"fix the cause and re-run; the whole log is {cwd / job / 'log'} on the node")
        return code

    def _launch(self, cmd: str, job: PurePosixPath, cwd: PurePosixPath) -> str:
        """Start the job unless the same one still runs ("running"); safe to repeat after a dropped connection."""
        end = "NANOREPRO_JOB_" + hashlib.sha1(cmd.encode()).hexdigest()[:12]  # never a line of the quoted cmd
        script = JOB_SCRIPT.format(cwd=_q(cwd), job=_q(job), pid=_q(job / "pid"), rc=_q(job / "rc"),
                                   boot=_q(job / "boot"), log=_q(job / "log"), boot_id=BOOT_ID, cmd=cmd, end=end, on_gpu_node=ON_GPU_NODE,
                                   same_boot=_same_boot(_q(job / "boot")))
        return self.ssh.check(script, "starting the job").strip()

    def _follow(self, stage: str, job: PurePosixPath) -> tuple[int, list[str]]:
        """Stream the job's log until its exit code appears; reconnect on drops."""
        offset, log = 0, _LogStream(lambda line: self._print(line))
        while True:
            data, code, alive = self.ssh.retrying(stage, lambda: self._poll(job, offset))
            offset += len(data)
            log.feed(data, final=code is not None or not alive)
            if code is not None:
                return code, list(log.tail)
            if not alive:
                raise UserError(f"stage {stage} on {self.host} stopped without an exit code (killed, or the node "
                                "rebooted); the last lines of its log:\n" + "\n".join(log.tail),
                                "re-run the stage (training resumes from its last checkpoint); check `uptime` and "
                                "`dmesg` on the node if it happens again")
            time.sleep(self.poll_s)

    # -- jobs on every node ------------------------------------------------------------------
    def run_everywhere(self, argvs: list[list[str]], *, stage: str, check: bool = True) -> int:
        """argvs[i] as a detached job on node i, started on all nodes at once; the head's log is streamed.
        The jobs stand or fall together: once one has ended, the others get PEER_GRACE_S to end too (none
        when it died: gone, or its node silent for UNREACHABLE_S), then are stopped (a torchrun whose
        partner died would wait on it for torch's timeouts), and the node that caused it fails the stage,
        named with its log's last lines and the lease (_blame). When every node ended with the same exit
        code, that is the stage's (as run_command's).
        A re-run attaches when every node's job still runs; when only some do, those are stopped (they
        cannot meet new partners) and all start again."""
        nodes, cwd = self.nodes, self.stage_dir
        jobs = [node._job(argv, stage) for node, argv in zip(nodes, argvs)]
        paths = [cwd / job for _, job in jobs]
        states = on_each(nodes, lambda i, node: node.ssh.retrying(stage, lambda: node._status(paths[i])))
        _raise_first(states)
        if "running" in states and set(states) != {"running"}:
            for i in (i for i, state in enumerate(states) if state == "running"):
                self._print(f"[{stage}] stopping what is left of an earlier run on {self.label(i)}")
                nodes[i].ssh.retrying(stage, lambda: nodes[i]._kill(paths[i]))
        launched = _raise_first(on_each(nodes, lambda i, node: node._launch(*jobs[i], cwd)))
        if set(launched) == {"running"}:
            self._print(f"[{stage}] already running on all {len(nodes)} nodes: attaching to it")
        else:
            self._print(f"[{stage}] started on {len(nodes)} nodes in {cwd}, the output of {self.label(0)} "
                        f"follows (logs: {', '.join(str(p / 'log') for p in paths)})")
        return self._watch(stage, paths, check)

    def _watch(self, stage: str, jobs: list[PurePosixPath], check: bool) -> int:
        """Stream the head's log and follow every node's job until all have ended (see run_everywhere).

        A node whose job is gone without an exit code (killed, the node rebooted), or which has not answered
        over SSH for UNREACHABLE_S while the head did, is dead: the other nodes' jobs are stopped at once, as
        their ranks would wait for it for torch's timeouts (NCCL's watchdog: 10 minutes). A job that ended
        with an exit code gives the others PEER_GRACE_S to end too. Which node is to blame is decided from
        every node's final state, not from which was seen first (_blame)."""
        offset, log, watch = 0, _LogStream(lambda line: self._print(line)), _Watch()
        reconnects = self.ssh.reconnects
        while True:
            data, code, alive = self.ssh.retrying(stage, lambda: self._poll(jobs[0], offset))
            offset += len(data)
            if self.ssh.reconnects != reconnects:  # the hub lost the head: the others' silence meant nothing
                watch.lost.clear()
                reconnects = self.ssh.reconnects
            states: list[str | int] = [code if code is not None else "running" if alive else "gone"]
            states += [self._peer_state(stage, i, jobs[i], watch) for i in range(1, len(jobs))]
            log.feed(data, final=states[0] != "running")
            running = watch.see(states)
            if not running:
                break
            to_stop = [i for i in running if i not in watch.stopped]
            dead = watch.dead(states)
            first = min(watch.ended, key=watch.ended.__getitem__) if watch.ended else None
            if to_stop and dead:
                self._stop(stage, jobs, to_stop, watch, f"{self.label(dead[0])} {_DEAD[states[dead[0]]]}")
            elif to_stop and first is not None and time.monotonic() - watch.ended[first] > PEER_GRACE_S:
                failed = [i for i in sorted(watch.ended, key=watch.ended.__getitem__) if states[i] != 0]
                self._stop(stage, jobs, to_stop, watch,
                           f"{self.label(failed[0])} failed" if failed else "its partners have ended")
            time.sleep(self.poll_s)
        if set(states) == {0} or (not watch.stopped and len(set(states)) == 1 and isinstance(states[0], int)):
            if states[0] and check:  # all ended alike: the stage's own failure, not one node's
                raise UserError(f"stage {stage} failed on all {len(states)} nodes (exit {states[0]}); the last "
                                f"lines of {self.label(0)}'s log:\n" + "\n".join(log.tail),
                                f"fix the cause and re-run; the whole logs are {jobs[0] / 'log'} on each node")
            return int(states[0])
        raise self._failure(stage, jobs, states, watch, list(log.tail))

    def _peer_state(self, stage: str, i: int, job: PurePosixPath, watch: "_Watch") -> str | int:
        """Node i's job state, asked once (a node that died must not hold the watcher for RECONNECT_TIMEOUT_S):
        "running" while it may still answer, "unreachable" once it has not for UNREACHABLE_S."""
        import paramiko

        if i in watch.unreachable:
            return "unreachable"
        asked = time.monotonic()  # silence counts from the question: a dead node takes STATUS_TIMEOUT_S to say nothing
        try:
            state, watch.tails[i] = self.nodes[i]._look(job)
        except (paramiko.SSHException, EOFError, OSError) as e:
            now = time.monotonic()
            if i not in watch.lost:
                watch.lost[i] = asked
                self._print(f"[{stage}] {self.label(i)} does not answer over SSH ({type(e).__name__}: {e}); its "
                            f"node counts as dead once silent for {UNREACHABLE_S:.0f} s")
            if now - watch.lost[i] < UNREACHABLE_S:
                return "running"  # not known yet
            watch.unreachable.add(i)
            return "unreachable"
        if watch.lost.pop(i, None) is not None:
            self._print(f"[{stage}] {self.label(i)} answers again")
        return state

    def _stop(self, stage: str, jobs: list[PurePosixPath], nodes: list[int], watch: "_Watch", why: str) -> None:
        """Stop the jobs on `nodes`; a node that cannot be reached to do so stays to be tried again (and
        counts as dead once it has not answered for UNREACHABLE_S)."""
        import paramiko

        for i in nodes:
            self._print(f"[{stage}] stopping the job on {self.label(i)}: {why}")
            try:
                if i == 0:  # the hub's link to the head: retried, as every call to the head is
                    self._kill(jobs[0])
                else:
                    self.nodes[i]._kill(jobs[i], retry=False)
            except (paramiko.SSHException, EOFError, OSError) as e:
                self._print(f"[{stage}] could not reach {self.label(i)} to stop its job ({type(e).__name__}: {e})")
                watch.lost.setdefault(i, time.monotonic())
                continue
            watch.stopped.append(i)

    def _blame(self, jobs: list[PurePosixPath], states: list[str | int], watch: "_Watch",
               head_tail: list[str]) -> tuple[list[int], dict[int, int], dict[int, list[str] | None]]:
        """The nodes that caused a failure (first seen first), every failed node's rank, and its log's last
        BLAME_LINES lines (None: unreadable). Ranks, the cause first: 0 its node does not answer, 1 its job
        is gone without an exit code, 2 a non-zero exit whose log does not say a peer was lost, 3 one whose
        log does (a rank whose partner died fails too, often before the partner is seen gone), 4 stopped
        by this watcher."""
        failed = [i for i, s in enumerate(states) if s != 0]
        tails = {i: watch.tails.get(i) if states[i] == "unreachable" else self._tail_of(i, jobs[i], head_tail)
                 for i in failed}

        def rank(i: int) -> int:
            if states[i] == "unreachable":
                return 0
            if i in watch.stopped:
                return 4
            return 1 if states[i] == "gone" else 3 if lost_peer(tails[i] or []) else 2

        ranks = {i: rank(i) for i in failed}
        best = min(ranks.values())
        culprits = sorted((i for i in failed if ranks[i] == best), key=lambda i: watch.ended.get(i, float("inf")))
        return culprits, ranks, tails

    def _tail_of(self, i: int, job: PurePosixPath, head_tail: list[str]) -> list[str] | None:
        """Node i's last BLAME_LINES log lines (the head's streamed tail if its file cannot be read); None
        when node i does not answer."""
        import paramiko

        try:
            if i == 0:
                return self.ssh.retrying("log", lambda: self._tail(job, BLAME_LINES, retry=False)) or head_tail
            return self.nodes[i]._tail(job, BLAME_LINES, retry=False)
        except (paramiko.SSHException, EOFError, OSError):
            return head_tail if i == 0 else None

    def _failure(self, stage: str, jobs: list[PurePosixPath], states: list[str | int], watch: "_Watch",
                 head_tail: list[str]) -> UserError:
        """The error for a stage that failed on some nodes: the cause (_blame) and how, what became of the
        others, the cause's last log lines, the lease."""
        culprits, ranks, tails = self._blame(jobs, states, watch, head_tail)

        def how(i: int) -> str:
            return ({0: f"its node stopped answering over SSH (nothing for {UNREACHABLE_S:.0f} s while the head "
                        "answered: it is down, rebooting, or off the network)",
                     1: "it stopped without an exit code (killed, or the node rebooted)",
                     2: f"exit {states[i]}", 3: f"exit {states[i]}, after losing a peer",
                     4: "it did not end with the other nodes' jobs"})[ranks[i]]

        def tail(i: int) -> str:
            where, lines = f"node {i}'s log ({jobs[i] / 'log'} on that node)", tails[i]
            if lines is None:
                return f"\n{where} cannot be read: the node does not answer"
            when = " as last read, before the node stopped answering" if ranks[i] == 0 else ""
            if not lines:
                return f"\n{where} is empty"
            return f"\nthe last lines of {where}{when}:\n" + "\n".join(lines[-TAIL_LINES:])

        others = [i for i in ranks if i not in culprits]
        stopped, after = [i for i in others if ranks[i] == 4], [i for i in others if ranks[i] != 4]
        lease = f" of lease {self.lease}" if self.lease else ""
        said = {i: next((line for line in reversed(tails[i] or []) if lost_peer([line])), None) for i in after}
        problem = (f"stage {stage} failed on " + "; ".join(f"{self.label(i)}{lease}: {how(i)}" for i in culprits)
                   + "".join(f"; node {i}'s job failed after it ({how(i)}"
                             + (f": {said[i].strip()[:300]}" if said[i] else "") + ")" for i in after)
                   + (f"; its job was stopped on {', '.join(f'node {i}' for i in stopped)} so that none waits "
                      "for it" if stopped else "") + "".join(tail(i) for i in culprits))
        down = [i for i in culprits if ranks[i] == 0]
        names = " ".join(self.nodes[i].name for i in down)
        return UserError(problem, (f"see whether {names} is up (the Chameleon dashboard, or `openstack server "
                                   f"show {names}`); reboot it with `openstack server reboot --hard {names}`, or "
                                   "release the lease and reserve again if it does not come back; " if down else "") +
                         "fix the cause (check `uptime` and `dmesg` on a node that stopped) and re-run the stage: it "
                         "starts again on every node, and training resumes from the last checkpoint, which rank 0 "
                         f"wrote on {self.label(0)}")

    def _status(self, job: PurePosixPath, retry: bool = True) -> str | int:
        """The job's exit code, "running", or "gone" (no exit code and no live process: killed, the node
        rebooted, or never started). Without `retry`, a dropped connection raises (Connection.once)."""
        out = self.ssh.check(STATUS_SCRIPT.format(rc=_q(job / "rc"), pid=_q(job / "pid"),
                                                  same_boot=_same_boot(_q(job / "boot"))), "checking a job",
                             retry=retry, timeout=120.0 if retry else STATUS_TIMEOUT_S)
        return _state(out)

    def _look(self, job: PurePosixPath) -> tuple[str | int, list[str]]:
        """The job's state (as _status) and its log's last lines, asked once (Connection.once)."""
        out = self.ssh.check(LOOK_SCRIPT.format(rc=_q(job / "rc"), pid=_q(job / "pid"), log=_q(job / "log"),
                                                same_boot=_same_boot(_q(job / "boot"))), "checking a job",
                             retry=False, timeout=STATUS_TIMEOUT_S)
        status, _, log = out.partition("\n--- log\n")
        lines = [line.rstrip("\r").split("\r")[-1] for line in log.splitlines()]
        return _state(status), lines[-TAIL_LINES:]

    def _kill(self, job: PurePosixPath, retry: bool = True) -> None:
        """Stop the job and everything it started (torchrun runs its workers in sessions of their own)."""
        self.ssh.check(KILL_SCRIPT.format(rc=_q(job / "rc"), pid=_q(job / "pid"),
                                          same_boot=_same_boot(_q(job / "boot"))), "stopping a job", retry=retry)

    def _tail(self, job: PurePosixPath, lines: int = TAIL_LINES, retry: bool = True) -> list[str]:
        """The last lines of the job's log (a progress bar's last state for its line)."""
        out = self.ssh.exec(f"tail -n {int(lines)} -- {_q(job / 'log')} 2>/dev/null", retry=retry,
                            timeout=120.0 if retry else STATUS_TIMEOUT_S)[1]
        return [line.rstrip("\r").split("\r")[-1] for line in out.splitlines()]

    def _poll(self, job: PurePosixPath, offset: int) -> tuple[bytes, int | None, bool]:
        """The job's new log bytes from `offset`, its exit code (None while it runs), and whether it is alive."""
        sftp = self.ssh.sftp()
        rc = _read(sftp, job / "rc")
        data = _read(sftp, job / "log", offset) or b""  # after rc: once rc exists, the log is complete
        if rc is not None:
            return data, int(rc.decode().strip() or "1"), True
        pid = (_read(sftp, job / "pid") or b"").decode().strip()  # none: _launch waited for it, the folder was wiped
        # a pid from before a reboot may belong to another process now: the boot id must match too
        alive = bool(pid) and self.ssh.exec(f"[ -f {_q(job / 'rc')} ] || {{ kill -0 {_q(pid)} 2>/dev/null && "
                                            f"{_same_boot(_q(job / 'boot'))}; }}")[0] == 0
        return data, None, alive

    # -- files -------------------------------------------------------------------------------
    def fetch(self, rel_path: str, local_dir: Path) -> Path:
        """Copy `<workdir>/<rel_path>` (file or folder) to `local_dir/<rel_path>`; return the local path.
        Checkpoints (`*.pt`) inside a folder stay on the node; one asked for by name is copied."""
        src, dest = self.stage_dir / rel_path, Path(local_dir) / rel_path

        def go() -> Path:
            sftp = self.ssh.sftp()
            try:
                st = sftp.stat(str(src))
            except FileNotFoundError:
                raise UserError(f"{rel_path} does not exist on the node (looked for {src} on {self.host})",
                                "run the stage that writes it first") from None
            if stat.S_ISDIR(st.st_mode or 0):
                self._get_dir(sftp, src, dest)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                sftp.get(str(src), str(dest))
            return dest

        return self.ssh.retrying("fetch", go)

    def _get_dir(self, sftp: "paramiko.SFTPClient", src: PurePosixPath, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        for entry in sftp.listdir_attr(str(src)):
            if stat.S_ISDIR(entry.st_mode or 0):
                self._get_dir(sftp, src / entry.filename, dest / entry.filename)
            elif not entry.filename.endswith(".pt"):
                sftp.get(str(src / entry.filename), str(dest / entry.filename))

    def put(self, local_path: Path, rel_path: str) -> str:
        """Copy a local file (e.g. an input text) to `<workdir>/<rel_path>` on the node, and on every
        other node of the lease (each rank reads its own copy); returns the path a stage command should
        use: `rel_path`, since stages run in the stage folder."""
        dest = self.stage_dir / rel_path
        for node in self.nodes:
            node.ssh.check(f"mkdir -p -- {_q(dest.parent)}", "creating a folder")
            node.ssh.retrying("put", lambda: node.ssh.sftp().put(str(local_path), str(dest)))
        return rel_path


def stage_argv(python: str, args: list[str], parallel: str = "none", gpus: int = 1, *, nodes: int = 1,
               node_rank: int = 0, rdzv_endpoint: str | None = None) -> list[str]:
    """The command for a stage: `python -m nanorepro ...`, or with parallel=ddp|fsdp
    `python -m torch.distributed.run --standalone --nproc_per_node=<gpus> -m nanorepro ...` (torchrun
    from the same venv). No GPU: one CPU process (gloo), which still runs the same code.

    On `nodes` > 1, node `node_rank`'s share: `--nnodes --nproc_per_node --node_rank` and the head's
    `rdzv_endpoint` (host:port). The rendezvous is torchrun's static one, not c10d: c10d ignores
    --node_rank and numbers the nodes by sorting their host names and pids, so rank 0, which writes
    the checkpoints and metrics and whose output the notebook shows, could land on any node; static
    puts it on node 0, the head."""
    if parallel == "none":
        return [python, "-m", "nanorepro", *args]
    if nodes > 1:
        if not rdzv_endpoint:
            raise ValueError("a stage on several nodes needs the head's rendezvous endpoint")
        return [python, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc_per_node={max(1, gpus)}",
                f"--node_rank={node_rank}", "--rdzv_backend=static", f"--rdzv_endpoint={rdzv_endpoint}",
                "-m", "nanorepro", *args]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={max(1, gpus)}",
            "-m", "nanorepro", *args]


def interface_env(iface: str | None) -> list[str]:
    """`env NCCL_SOCKET_IFNAME=<iface> GLOO_SOCKET_IFNAME=<iface>` for a stage on several nodes: both libraries
    then talk over the private network, never the loopback (where the host name resolves to 127.0.1.1, gloo
    would bind it and wait forever for the other nodes). A name set in $NANOREPRO_REMOTE_ENV is left to it."""
    try:
        mine = {pair.split("=", 1)[0] for pair in shlex.split(os.environ.get("NANOREPRO_REMOTE_ENV", ""))}
    except ValueError:  # remote_env reports it
        mine = set()
    pairs = [f"{name}={iface}" for name in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME") if name not in mine]
    return ["env", *pairs] if iface and pairs else []


def remote_env() -> list[str]:
    """`env K=V ...` for stages on the node, from $NANOREPRO_REMOTE_ENV ("K=V K2=V2"): settings a node
    needs that this machine's environment should not leak there wholesale (e.g. HF_HOME on a big disk)."""
    pairs = shlex.split(os.environ.get("NANOREPRO_REMOTE_ENV", ""))
    bad = [p for p in pairs if "=" not in p or not p.split("=", 1)[0].isidentifier()]
    if bad:
        raise UserError(f"NANOREPRO_REMOTE_ENV has entries that are not NAME=VALUE: {bad}",
                        "write it as NAME=VALUE pairs separated by spaces")
    return ["env", *pairs] if pairs else []
