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
import time
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
    in `known_hosts` on first use, short commands run, files moved over SFTP."""

    def __init__(self, host: str, *, key_path: str | Path, user: str, port: int, known_hosts: Path | None,
                 connect_timeout_s: float, say: Callable[[str], None]):
        self.host, self.port, self.user = host, int(port), user
        self.key_path = Path(key_path).expanduser()
        self.known_hosts, self.connect_timeout_s, self.say = known_hosts, connect_timeout_s, say
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._ever_connected = False

    def _connect(self) -> "paramiko.SSHClient":
        import paramiko

        check_key_file(self.key_path)
        client = paramiko.SSHClient()
        known = self.known_hosts
        if known and known.is_file():
            client.load_host_keys(str(known))
        # A new bare-metal node has a new host key: trust it the first time, then pin it in the state folder.
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        try:
            client.connect(self.host, port=self.port, username=self.user, key_filename=str(self.key_path),
                           look_for_keys=False, allow_agent=False, timeout=self.connect_timeout_s,
                           banner_timeout=self.connect_timeout_s, auth_timeout=self.connect_timeout_s)
        except paramiko.BadHostKeyException as e:
            raise UserError(f"the host key of {self.host} changed since the first connection",
                            f"if the node was re-created, delete {known} and retry") from e
        except paramiko.AuthenticationException as e:
            raise UserError(f"{self.user}@{self.host} refused the key {self.key_path}",
                            "use the private key of the keypair the server was launched with") from e
        if known:
            known.parent.mkdir(parents=True, exist_ok=True)
            client.save_host_keys(str(known))
        self._ever_connected = True
        client.get_transport().set_keepalive(30)  # keeps NAT state alive between polls of a long stage
        return client

    def client(self) -> "paramiko.SSHClient":
        """The live connection, made (again) if there is none."""
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
                    raise UserError(f"cannot reach {self.user}@{self.host}:{self.port} over SSH "
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
    is the local results folder; stages run in its mirror on the node (see module doc)."""

    def __init__(self, host: str, *, key_path: str | Path, user: str = "cc", port: int = 22,
                 remote_dir: str = "nanorepro", workdir: str | Path = ".", local_root: Path | None = None,
                 state_dir: Path | None = None, poll_s: float = 2.0, connect_timeout_s: float = 15.0,
                 out: Callable[[str], None] | None = None):
        self._print = out or (lambda s: print(s, flush=True))
        self.ssh = Connection(host, key_path=key_path, user=user, port=port,
                              known_hosts=Path(state_dir) / KNOWN_HOSTS if state_dir else None,
                              connect_timeout_s=connect_timeout_s,
                              say=lambda s: self._print(s))  # through _print, which callers may replace
        self.host, self.user = self.ssh.host, user
        self.remote_dir = PurePosixPath(remote_dir)
        self.local_root = Path(local_root or project_root()).resolve()
        self.workdir_rel = self._mirror(Path(workdir))
        self.poll_s = poll_s

    @classmethod
    def from_state(cls, state_dir: Path, workdir: Path | None = None, **kwargs: Any) -> "SSHRunner":
        """The runner for the node recorded in `<state_dir>/chameleon_node.json` by `00_reserve_node`."""
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
        return cls(node["host"], key_path=node["key_path"], user=node.get("user", "cc"),
                   port=node.get("port", 22), remote_dir=node.get("remote_dir", "nanorepro"),
                   workdir=workdir if workdir is not None else Path(state_dir), state_dir=Path(state_dir),
                   poll_s=poll, **kwargs)

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
        self.ssh.close()

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
        facts = build = None
        if not install_cmd:
            facts = nodeinstall.probe(self, image)
            build = nodeinstall.torch_build(facts.cuda, facts.driver)
            self._print(f"node: Python {facts.python}, NVIDIA driver {facts.driver} (CUDA "
                        f"{facts.cuda[0]}.{facts.cuda[1]}), {facts.gpus} GPU(s): torch {nodeinstall.TORCH_VERSION} "
                        f"{build}")
            facts = nodeinstall.install_system_packages(self, facts, image)
            install_cmd = nodeinstall.install_command(build)
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
            self.run_command(["sh", "-c", install_cmd], stage="setup", cwd=self.remote_dir)
            self.ssh.check(f"printf '%s\\n' {_q(marker)} > {here}/.nanorepro-installed", "marking the install")
        report = None
        if facts is not None:
            report = nodeinstall.check_gpus(self, facts, build)
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
    def run(self, args: list[str], *, stage: str, check: bool = True, parallel: str = "none") -> int:
        """`python -m nanorepro <args>` on the node in the stage folder, its log streamed here; with
        parallel=ddp|fsdp (the stage's config says which) under torchrun, one process per GPU of the node."""
        gpus = self.gpus if parallel != "none" else 1
        return self.run_command(stage_argv(self._python(), args, parallel, gpus), stage=stage, check=check)

    @functools.cached_property
    def gpus(self) -> int:
        """GPUs on the node (`nvidia-smi -L`), asked once per runner; 0 without a working nvidia-smi."""
        code, out = self.ssh.exec("nvidia-smi -L 2>/dev/null")
        return sum(line.startswith("GPU ") for line in out.splitlines()) if code == 0 else 0

    def run_command(self, argv: list[str], *, stage: str, check: bool = True,
                    cwd: PurePosixPath | None = None) -> int:
        """Run argv as a detached job on the node (attaching if the same job still runs); its exit code."""
        cwd = cwd if cwd is not None else self.stage_dir
        cmd = " ".join(_q(a) for a in [*remote_env(), *argv])
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in stage)[:40]
        job = PurePosixPath(JOBS) / f"{slug}-{hashlib.sha1(cmd.encode()).hexdigest()[:8]}"
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
        offset, pending = 0, b""
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

        def emit(data: bytes) -> None:
            text = data.decode("utf-8", "replace")
            for line in (text[:-1] if text.endswith("\n") else text).split("\n") if text else []:
                self._print(line)  # progress bars' \r stay in: Jupyter and terminals overwrite, as for local runs
                tail.append(line.rstrip("\r").split("\r")[-1])  # a progress bar's last state

        while True:
            data, code, alive = self.ssh.retrying(stage, lambda: self._poll(job, offset))
            offset += len(data)
            pending += data
            if code is not None:
                emit(pending)
                return code, list(tail)
            complete, sep, pending = pending.rpartition(b"\n")
            if sep:
                emit(complete)
            if not alive:
                emit(pending)
                raise UserError(f"stage {stage} on {self.host} stopped without an exit code (killed, or the node "
                                "rebooted); the last lines of its log:\n" + "\n".join(tail),
                                "re-run the stage (training resumes from its last checkpoint); check `uptime` and "
                                "`dmesg` on the node if it happens again")
            time.sleep(self.poll_s)

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
        """Copy a local file (e.g. an input text) to `<workdir>/<rel_path>` on the node; returns the path
        a stage command should use: `rel_path`, since stages run in the stage folder."""
        dest = self.stage_dir / rel_path
        self.ssh.check(f"mkdir -p -- {_q(dest.parent)}", "creating a folder")
        self.ssh.retrying("put", lambda: self.ssh.sftp().put(str(local_path), str(dest)))
        return rel_path


def stage_argv(python: str, args: list[str], parallel: str = "none", gpus: int = 1) -> list[str]:
    """The command for a stage: `python -m nanorepro ...`, or with parallel=ddp|fsdp
    `python -m torch.distributed.run --standalone --nproc_per_node=<gpus> -m nanorepro ...` (torchrun
    from the same venv). No GPU: one CPU process (gloo), which still runs the same code."""
    if parallel == "none":
        return [python, "-m", "nanorepro", *args]
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
