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
is on the head); the head's log is streamed, and a node whose job fails stops the others' and fails
the stage, naming it. A re-run resumes from the head's checkpoint, which rank 0 sends to the ranks
on the other nodes (distributed.World.main_bytes).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import io
import json
import os
import posixpath
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

    def exec(self, command: str, timeout: float = 120.0) -> tuple[int, str]:
        """Run a short shell command on the node; its exit code and combined output."""
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

        return self.retrying("ssh", go)

    def check(self, command: str, what: str) -> str:
        """exec, with a failure as a UserError naming `what`."""
        code, out = self.exec(command)
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
                 rdzv_port: int = RDZV_PORT):
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
                   private_ip=nodes[0].get("private_ip"), **common)
        for i, peer in enumerate(nodes[1:], start=1):
            if not peer.get("private_ip"):
                raise UserError(f"node {i} of the record in {state_dir} has no private_ip (the reservation did "
                                "not finish)", "re-run 00_reserve_node: it reuses the lease and servers it made")
            common["out"] = lambda s, i=i: head._print(f"[node {i}] {s}")  # the head's _print, replaced or not
            head.peers.append(cls(peer["private_ip"], port=peer.get("ssh_port", 22), name=peer.get("name"),
                                  private_ip=peer["private_ip"], via=head, **common))
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
            endpoint, gpus = f"{self.private_ip}:{self.rdzv_port}", self.gpus  # one node type per lease
            return self.run_everywhere([stage_argv(node._python(), args, parallel, gpus, nodes=len(self.nodes),
                                                   node_rank=i, rdzv_endpoint=endpoint)
                                        for i, node in enumerate(self.nodes)], stage=stage, check=check)
        if self.peers and every_node:
            return self.run_everywhere([stage_argv(node._python(), args) for node in self.nodes],
                                       stage=stage, check=check)
        gpus = self.gpus if parallel != "none" else 1
        return self.run_command(stage_argv(self._python(), args, parallel, gpus), stage=stage, check=check)

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
        The jobs stand or fall together: once one has ended, the others get PEER_GRACE_S to end too, then
        are stopped (a torchrun whose partner died would wait on it for torch's timeouts), and a node
        that failed (non-zero exit, or gone) fails the stage, named with its log's last lines and the
        lease. When every node ended with the same exit code, that is the stage's (as run_command's).
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
        """Stream the head's log and follow every node's job until all have ended (see run_everywhere)."""
        offset, log = 0, _LogStream(lambda line: self._print(line))
        first_end: float | None = None
        culprits: list[int] = []  # the nodes seen failing first: the cause, not the ones failing after them
        stopped: list[int] = []  # nodes whose jobs this runner stopped
        while True:
            data, code, alive = self.ssh.retrying(stage, lambda: self._poll(jobs[0], offset))
            offset += len(data)
            states: list[str | int] = [code if code is not None else "running" if alive else "gone"]
            states += [peer.ssh.retrying(stage, lambda: peer._status(job)) for peer, job in zip(self.peers, jobs[1:])]
            log.feed(data, final=states[0] != "running")
            failed = [i for i, s in enumerate(states) if s != "running" and s != 0 and i not in stopped]
            culprits = culprits or failed
            running = [i for i, s in enumerate(states) if s == "running"]
            if not running:
                break
            if first_end is None and len(running) < len(states):
                first_end = time.monotonic()
            if first_end is not None and time.monotonic() - first_end > PEER_GRACE_S and not stopped:
                for i in running:
                    self._print(f"[{stage}] stopping the job on {self.label(i)}: "
                                + ("its partners have ended" if not culprits else f"{self.label(culprits[0])} failed"))
                    self.nodes[i].ssh.retrying(stage, lambda: self.nodes[i]._kill(jobs[i]))
                stopped = running
            time.sleep(self.poll_s)
        if not stopped and len(set(states)) == 1 and isinstance(states[0], int):  # all ended alike
            if states[0] and check:
                raise UserError(f"stage {stage} failed on all {len(states)} nodes (exit {states[0]}); the last "
                                f"lines of {self.label(0)}'s log:\n" + "\n".join(log.tail),
                                f"fix the cause and re-run; the whole logs are {jobs[0] / 'log'} on each node")
            return int(states[0])
        raise self._failure(stage, jobs, states, culprits or stopped, stopped, list(log.tail))

    def _failure(self, stage: str, jobs: list[PurePosixPath], states: list[str | int], culprits: list[int],
                 stopped: list[int], head_tail: list[str]) -> UserError:
        """The error for a stage that failed on some nodes: which, how, their logs' last lines, the lease."""
        def how(i: int) -> str:
            return (f"exit {states[i]}" if isinstance(states[i], int) else
                    "it stopped without an exit code (killed, or the node rebooted)" if i not in stopped else
                    "it did not end with the other nodes' jobs")

        def tail(i: int) -> str:
            lines = head_tail if i == 0 else self.nodes[i].ssh.retrying(stage, lambda: self.nodes[i]._tail(jobs[i]))
            where = f"node {i}'s log ({jobs[i] / 'log'} on that node)"
            return f"\nthe last lines of {where}:\n" + "\n".join(lines) if lines else f"\n{where} is empty"

        tails = "".join(tail(i) for i in culprits)
        others = [i for i in stopped if i not in culprits]
        lease = f" of lease {self.lease}" if self.lease else ""
        return UserError(f"stage {stage} failed on " + "; ".join(f"{self.label(i)}{lease}: {how(i)}" for i in culprits)
                         + (f"; its job was stopped on {', '.join(f'node {i}' for i in others)} so that none waits "
                            "for it" if others else "") + tails,
                         "fix the cause (check `uptime` and `dmesg` on a node that stopped) and re-run the stage: it "
                         "starts again on every node, and training resumes from the last checkpoint, which rank 0 "
                         f"wrote on {self.label(0)}")

    def _status(self, job: PurePosixPath) -> str | int:
        """The job's exit code, "running", or "gone" (no exit code and no live process: killed, the node
        rebooted, or never started)."""
        out = self.ssh.check(STATUS_SCRIPT.format(rc=_q(job / "rc"), pid=_q(job / "pid"),
                                                  same_boot=_same_boot(_q(job / "boot"))), "checking a job").strip()
        words = out.split()
        if words[:1] == ["rc"]:
            return int(words[1]) if len(words) > 1 and words[1].lstrip("-").isdigit() else 1
        return "running" if words == ["running"] else "gone"

    def _kill(self, job: PurePosixPath) -> None:
        """Stop the job and everything it started (torchrun runs its workers in sessions of their own)."""
        self.ssh.check(KILL_SCRIPT.format(rc=_q(job / "rc"), pid=_q(job / "pid"),
                                          same_boot=_same_boot(_q(job / "boot"))), "stopping a job")

    def _tail(self, job: PurePosixPath) -> list[str]:
        """The last lines of the job's log (a progress bar's last state for its line)."""
        out = self.ssh.exec(f"tail -n {TAIL_LINES} -- {_q(job / 'log')} 2>/dev/null")[1]
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


def remote_env() -> list[str]:
    """`env K=V ...` for stages on the node, from $NANOREPRO_REMOTE_ENV ("K=V K2=V2"): settings a node
    needs that this machine's environment should not leak there wholesale (e.g. HF_HOME on a big disk)."""
    pairs = shlex.split(os.environ.get("NANOREPRO_REMOTE_ENV", ""))
    bad = [p for p in pairs if "=" not in p or not p.split("=", 1)[0].isidentifier()]
    if bad:
        raise UserError(f"NANOREPRO_REMOTE_ENV has entries that are not NAME=VALUE: {bad}",
                        "write it as NAME=VALUE pairs separated by spaces")
    return ["env", *pairs] if pairs else []
