"""Run stages on reserved Chameleon nodes over SSH: the code copied and installed, `nanorepro` commands
run as detached jobs (jobs.py) whose logs stream here, results copied back.

Layout on the node: the code in `remote_dir` (default `~/nanorepro`), its venv in `<remote_dir>/.venv`,
and a local work folder inside the checkout (e.g. `results/chameleon`) mirrored at the same relative
path under `remote_dir`. A flaky network or a culled hub kernel never kills a training run (the SSH
connection is made again, ssh.py); running the same stage again while it still runs attaches to it.

A lease of several nodes (the record's "nodes", head first): only the head has a public address; the
others are reached through it at their private addresses. A parallel training stage runs torchrun on
every node (static rendezvous at the head's private address: rank 0, which writes the run's files, is on
the head; NCCL and gloo on the interface that setup found and admitted in each node's firewall:
network.py), watched as one (multinode.py). A re-run resumes from the head's checkpoint, which rank 0
sends to the ranks on the other nodes (distributed.World.main_bytes). No torch here.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import posixpath
import shlex
import stat
import subprocess
import tarfile
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable

from nanorepro.cloud.jobs import NodeJobs, job_for
from nanorepro.cloud.multinode import AllNodes
from nanorepro.cloud.node import NODE_FILE, NodeRecord
from nanorepro.cloud.ssh import KNOWN_HOSTS, Connection, quote
from nanorepro.errors import UserError
from nanorepro.files import project_root
from nanorepro.fmt import duration

if TYPE_CHECKING:
    import paramiko

RDZV_PORT = 29500  # torchrun's rendezvous port on the head (its default); the record's rdzv_port or
# $NANOREPRO_RDZV_PORT replace it (tests running side by side on one machine)
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


def source_files(root: Path) -> list[Path]:
    """The files to ship to the node: git's tracked and untracked-but-not-ignored files, or the package."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=root, capture_output=True, check=True, timeout=60).stdout
        names = sorted({n for n in out.decode().split("\0") if n})
    except (OSError, subprocess.SubprocessError):
        names = ["pyproject.toml", "README.md", "LICENSE", "uv.lock", "scripts/uv-requirements.txt"]  # the lock
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


def mirror(workdir: Path, local_root: Path) -> PurePosixPath:
    """A local work folder's stage folder on the node, relative to remote_dir: the same path inside the checkout."""
    if not workdir.is_absolute():
        return PurePosixPath(workdir.as_posix())
    try:
        return PurePosixPath(workdir.resolve().relative_to(local_root).as_posix())
    except ValueError:  # outside the checkout: keep only its name
        return PurePosixPath("work") / workdir.name


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
        self.say: Callable[[str], None] = out or (lambda s: print(s, flush=True))  # callers may replace it
        self.ssh = Connection(host, key_path=key_path, user=user, port=port,
                              known_hosts=Path(state_dir) / KNOWN_HOSTS if state_dir else None,
                              connect_timeout_s=connect_timeout_s,
                              say=lambda s: self.say(s),
                              via=via.ssh if via is not None else None)
        self.host, self.user = self.ssh.host, user
        self.remote_dir = PurePosixPath(remote_dir)
        self.local_root = Path(local_root or project_root()).resolve()
        self.workdir_rel = mirror(Path(workdir), self.local_root)
        self.poll_s = poll_s
        self.jobs = NodeJobs(self.ssh, lambda s: self.say(s), poll_s)
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
        record = NodeRecord.read(state_dir)
        if record is None:
            raise UserError(f"no reserved node recorded in {Path(state_dir) / NODE_FILE}",
                            "run 00_reserve_node with target='chameleon' and the same results_dir first")
        if record.status == "released":
            raise UserError(f"the node recorded in {state_dir} was released ({record.updated})",
                            "run 00_reserve_node with target='chameleon' to reserve a new one")
        for key in ("host", "key_path"):
            if not getattr(record, key):
                raise UserError(f"the node record in {state_dir} has no {key} (the reservation did not finish)",
                                "re-run 00_reserve_node: it reuses the lease and server it already made")
        poll = kwargs.pop("poll_s", None) or float(os.environ.get("NANOREPRO_SSH_POLL_S", 2.0))
        entries = record.entries
        common = dict(key_path=record.key_path, user=record.user, remote_dir=record.remote_dir,
                      workdir=workdir if workdir is not None else Path(state_dir), state_dir=Path(state_dir),
                      poll_s=poll, lease=record.lease_name, **kwargs,
                      rdzv_port=record.rdzv_port or int(os.environ.get("NANOREPRO_RDZV_PORT", RDZV_PORT)))
        head = cls(record.host, port=record.port, name=entries[0].name if record.nodes else None,
                   private_ip=entries[0].private_ip, iface=entries[0].iface, **common)
        for i, peer in enumerate(entries[1:], start=1):
            if not peer.private_ip:
                raise UserError(f"node {i} of the record in {state_dir} has no private_ip (the reservation did "
                                "not finish)", "re-run 00_reserve_node: it reuses the lease and servers it made")
            common["out"] = lambda s, i=i: head.say(f"[node {i}] {s}")  # the head's say, replaced or not
            head.peers.append(cls(peer.private_ip, port=peer.ssh_port, name=peer.name, private_ip=peer.private_ip,
                                  iface=peer.iface, via=head, **common))
        return head

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
        from nanorepro.cloud import nodeinstall

        install_cmd = install_cmd or os.environ.get("NANOREPRO_INSTALL_CMD")
        started = time.time()
        facts = builds = None
        if not install_cmd:
            facts = nodeinstall.probe(self, image)
            builds = nodeinstall.torch_builds(facts.cuda, facts.driver)
            self.say(f"node: Python {facts.python}, NVIDIA driver {facts.driver} (CUDA "
                        f"{facts.cuda[0]}.{facts.cuda[1]}), {facts.gpus} GPU(s): torch {nodeinstall.TORCH_VERSION} "
                        f"{' or, if uv finds none, '.join(builds)}")
            facts = nodeinstall.install_system_packages(self, facts, image)
            install_cmd = nodeinstall.install_command(builds)
        data, digest = source_tar(self.local_root)
        marker = f"{digest} {install_cmd}"
        here = quote(self.remote_dir)
        done = self.ssh.exec(f"test -x {here}/.venv/bin/python && cat -- {here}/.nanorepro-installed 2>/dev/null")
        if done[1].strip() == marker:
            self.say(f"the node already has this code installed ({self.remote_dir})")
        else:
            self.say(f"copying the code ({len(data) / 1e3:.0f} kB) to {self.user}@{self.host}:{self.remote_dir}")
            self.ssh.check(f"mkdir -p -- {here}", "creating the code folder")
            archive = self.remote_dir / ".nanorepro-src.tar.gz"
            self.ssh.retrying("copy", lambda: self.ssh.sftp().putfo(io.BytesIO(data), str(archive)))
            self.ssh.check(f"cd -- {here} && tar -xzf .nanorepro-src.tar.gz && rm -f .nanorepro-src.tar.gz "
                           "&& rm -f .nanorepro-installed", "unpacking the code")
            self.say(f"installing on the node: {install_cmd}")
            argv = ["sh", "-c", install_cmd]
            code = self.run_command(argv, stage="setup", cwd=self.remote_dir, check=builds is None)
            if code:  # our own install: pip finding no torch for any build is said as one plain error
                log = self.remote_dir / job_for(argv, "setup")[1]
                tail = self.jobs.tail(log)
                if code == nodeinstall.TORCH_INSTALL_FAILED:
                    raise nodeinstall.install_failed(facts, builds, tail)
                raise UserError(f"stage setup failed on {self.host} (exit {code}); the last lines of its log:\n"
                                + "\n".join(tail), f"fix the cause and re-run; the whole log is {log / 'log'} on the node")
            self.ssh.check(f"printf '%s\\n' {quote(marker)} > {here}/.nanorepro-installed", "marking the install")
        report = None
        if facts is not None:
            report = nodeinstall.check_gpus(self, facts, builds[0])
            self.say(f"torch {report['torch']} sees {len(report['devices'])} GPU(s) and runs bf16 on each: "
                        + ", ".join(d["name"] for d in report["devices"]))
        self.ssh.check(f"mkdir -p -- {quote(self.stage_dir)}", "creating the work folder")
        self.say(f"node ready in {duration(time.time() - started)}")
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

    def run_command(self, argv: list[str], *, stage: str, check: bool = True,
                    cwd: PurePosixPath | None = None) -> int:
        """Run argv as a detached job on the node (attaching if the same job still runs); its exit code."""
        cwd = cwd if cwd is not None else self.stage_dir
        cmd, job = job_for(argv, stage)
        if self.jobs.launch(cmd, job, cwd) == "running":
            self.say(f"[{stage}] already running on {self.host}: attaching to it")
        else:
            self.say(f"[{stage}] started on {self.host} in {cwd} (log: {cwd / job / 'log'})")
        code, tail = self.jobs.follow(stage, cwd / job)
        if code and check:
            raise UserError(f"stage {stage} failed on {self.host} (exit {code}); the last lines of its log:\n"
                            + "\n".join(tail),
                            f"fix the cause and re-run; the whole log is {cwd / job / 'log'} on the node")
        return code

    # -- jobs on every node ------------------------------------------------------------------
    def run_everywhere(self, argvs: list[list[str]], *, stage: str, check: bool = True) -> int:
        """argvs[i] as a detached job on node i, started on all at once; they stand or fall together
        (multinode.AllNodes.run)."""
        return AllNodes(self).run(argvs, stage=stage, check=check)

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
            node.ssh.check(f"mkdir -p -- {quote(dest.parent)}", "creating a folder")
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

