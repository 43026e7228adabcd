"""A private OpenSSH server on 127.0.0.1 for tests: the "node" the remote runner drives.

It runs Debian's /usr/sbin/sshd (package openssh-server, installed by scripts/system-deps.sh) on a
free port with a temp host key, a temp client key and its own authorized_keys, and lets in only the
user running the tests (creating a system user would need root and change the machine).

Several nodes (`start_nodes`): one sshd each, on its own port, each session starting in the node's own
home folder (the same user on one machine, but no shared files: a node's relative paths land in its
home). `reachable_only_through_head` makes every node but the first unreachable from this process, as
Chameleon's nodes without a floating IP are: only the head's sshd can connect to them;
`through_head_sitecustomize` does the same in other Python processes (a notebook's kernel).
"""

from __future__ import annotations

import contextlib
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
from typing import Callable, Iterator

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
    home: Path | None = None  # where sessions start (None: the user's own home)

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


def _session_shell(dir: Path, path_first: Path | None, home: Path | None) -> Path:
    """A ForceCommand that runs the client's command (or the SFTP server) in `home` (with HOME set to it)
    and with `path_first` leading PATH, after the user's shell start-up files (which may put e.g.
    pyenv's shims first) have run."""
    script = dir / "session.sh"
    lines = ["#!/bin/sh"]
    if home is not None:
        lines.append(f"cd {shlex.quote(str(home))} || exit 1; export HOME={shlex.quote(str(home))}")
    if path_first is not None:
        lines.append(f'export PATH={shlex.quote(str(path_first))}:"$PATH"')
    script.write_text("\n".join(lines) + """
case "$SSH_ORIGINAL_COMMAND" in
  internal-sftp|*sftp-server*) exec /usr/lib/openssh/sftp-server ;;
  "") exec sh ;;
  *) exec sh -c "$SSH_ORIGINAL_COMMAND" ;;
esac
""")
    script.chmod(0o755)
    return script


def start(dir: Path, timeout_s: float = 15.0, path_first: Path | None = None, home: Path | None = None) -> Sshd:
    """Start sshd listening on 127.0.0.1 only; raises RuntimeError saying what is missing. With `path_first`,
    every session's PATH starts with that folder (where a test puts stand-ins for the node's tools); with
    `home`, every session starts there (created if missing)."""
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
        *([f"ForceCommand {_session_shell(dir, path_first, home)}"] if path_first or home else []),
    ]) + "\n")
    if home is not None:
        home.mkdir(parents=True, exist_ok=True)
    log = open(dir / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    server = Sshd("127.0.0.1", port, user, client_key, Path(f"{client_key}.pub"), proc, dir, home)
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


def start_nodes(dir: Path, n: int, path_first: Path | None = None) -> list[Sshd]:
    """n sshd "nodes", node i in `dir/node<i>` with its home `dir/node<i>/home`, all accepting node 0's
    client key (one keypair for the lease, as on Chameleon). Stops those started if one fails."""
    nodes: list[Sshd] = []
    try:
        for i in range(n):
            nodes.append(start(dir / f"node{i}", path_first=path_first, home=dir / f"node{i}" / "home"))
            if i:
                (nodes[i].dir / "authorized_keys").write_text(nodes[0].pub_path.read_text())
                nodes[i].key_path, nodes[i].pub_path = nodes[0].key_path, nodes[0].pub_path
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


def refuse_connections(ports: set[int]) -> Callable[[], None]:
    """From now on this process cannot open a TCP connection to 127.0.0.1 at any of `ports` (connect() is
    refused, as a private address is unroutable from outside Chameleon); returns what undoes it."""
    private = {("127.0.0.1", port) for port in ports}
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def blocked(address: object) -> bool:
        return isinstance(address, tuple) and tuple(address[:2]) in private

    def guarded_connect(self: socket.socket, address: object) -> None:
        if blocked(address):
            raise ConnectionRefusedError(111, f"{address} is only reachable through the head node")
        return connect(self, address)

    socket.socket.connect = guarded_connect
    socket.socket.connect_ex = lambda self, address: 111 if blocked(address) else connect_ex(self, address)

    def undo() -> None:
        socket.socket.connect, socket.socket.connect_ex = connect, connect_ex

    return undo


@contextlib.contextmanager
def reachable_only_through_head(nodes: list[Sshd]) -> Iterator[None]:
    """While open, this process cannot open a TCP connection to nodes[1:]; the sshd processes, other
    processes, are unaffected, so node 0's sshd can still forward a connection to them (ProxyJump)."""
    undo = refuse_connections({node.port for node in nodes[1:]})
    try:
        yield
    finally:
        undo()


def through_head_sitecustomize(nodes: list[Sshd], log: Path) -> str:
    """Source for a sitecustomize.py that does what reachable_only_through_head does in every Python
    process that loads it (a notebook's kernel, which papermill starts in a process of its own, where a
    patch in the test's process does not reach), each such process appending its command line to `log`."""
    here, ports = str(Path(__file__).resolve().parent), {node.port for node in nodes[1:]}
    return f"""
import sys
sys.path.insert(0, {here!r})
import sshd as _sshd
sys.path.remove({here!r})
_sshd.refuse_connections({ports!r})
with open({str(log)!r}, "a") as _f:
    _f.write(open("/proc/self/cmdline", "rb").read().replace(b"\\0", b" ").decode() + "\\n")
"""


# -- what is left on the nodes ----------------------------------------------------------------------
def alive(pid: int) -> bool:
    """Whether the process runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0  # a zombie is gone


def processes_in(dirs: list[Path]) -> list[int]:
    """Live processes whose working folder is inside one of `dirs` (a node's jobs run in its stage folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cwd = (proc / "cwd").resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if any(cwd.is_relative_to(d.resolve()) for d in dirs) and alive(int(proc.name)):
            found.append(int(proc.name))
    return found


def cheap_install() -> str:
    """An install command for the node that is a real venv and `pip install -e .` of the copied code, offline
    and in seconds: the venv sees this venv's packages (numpy, torch, ...) through a .pth file."""
    pth = f".venv/lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages/outer.pth"
    return (f"{shlex.quote(sys.executable)} -m venv --without-pip .venv && "
            f"echo {shlex.quote(site.getsitepackages()[0])} > {pth} && "
            ".venv/bin/python -m pip install -q --no-deps --no-build-isolation --no-index -e .")


# -- stand-ins for a GPU node's tools -----------------------------------------------------------
NVIDIA_SMI = """#!/bin/sh
# nvidia-smi of a node with driver $(cat driver) (CUDA $(cat cuda)) and $(cat gpus) GPUs named $(cat model);
# with none, what the real one says and its exit code
D=$(dirname "$0"); driver=$(cat "$D/driver"); cuda=$(cat "$D/cuda"); n=$(cat "$D/gpus"); model=$(cat "$D/model")
if [ "$n" = 0 ]; then echo "No devices were found"; exit 6; fi
case "$1" in
  -L) i=0; while [ $i -lt $n ]; do echo "GPU $i: $model (UUID: GPU-$i)"; i=$((i+1)); done ;;
  --query-gpu=*) i=0; while [ $i -lt $n ]; do echo "$i, $model, 81920, $driver"; i=$((i+1)); done ;;
  *) echo "| NVIDIA-SMI $driver      Driver Version: $driver      CUDA Version: $cuda     |" ;;
esac
"""

# python3 whose `-m venv` makes a venv without pip that sees this test's packages (torch, numpy) and whose
# `python -m nanorepro.gpucheck` reports what `torch-sees` says: "gpus" (the torch that pip was asked
# for, on every GPU) or anything else (the real check, with this machine's CPU torch).
PYTHON3 = """#!/bin/sh
D=$(dirname "$0")
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  {real} -m venv --without-pip "$3" || exit 1
  echo {site} > "$3"/lib/python{ver}/site-packages/outer.pth
  rm -f "$3/bin/python"  # a link to the real interpreter: replaced, never written through
  cat > "$3/bin/python" <<'END'
#!/bin/sh
D={dir}
if [ "$1 $2" = "-m nanorepro.gpucheck" ] && [ "$(cat $D/torch-sees)" = gpus ]; then
  build=$(grep -o 'whl/cu[0-9]*' $D/pip.log | tail -n 1 | cut -d/ -f2)
  echo '{{"torch": "2.13.0+'$build'", "cuda": "stand-in", "devices": [{{"index": 0, "name": "NVIDIA A100-SXM4-80GB", "bf16_matmul": true}}]}}'
  exit 0
fi
exec "$(dirname "$0")/python{ver}" "$@"
END
  chmod +x "$3/bin/python"
  exit 0
fi
exec {real} "$@"
"""

PYTHON3_10 = """#!/bin/sh
# the python3 of CC-Ubuntu22.04: it only tells its version; anything else is logged as a failure
if [ "$1" = "--version" ]; then echo "Python 3.10.12"; exit 0; fi
echo "python3 3.10 asked to: $*" >> "$(dirname "$0")/python3.log"; exit 1
"""

# pip logs what it is asked; torch is "installed" by being seen through outer.pth, and `-e .` is a real,
# offline editable install of the copied code
PIP = """#!/bin/sh
D=$(dirname "$0")
echo "pip $*" >> "$D/pip.log"
for build in $(cat "$D/no-wheel"); do  # an index without torch 2.13.0 for that build: real pip's words and code
  case "$*" in *"--index-url "*"/whl/$build") echo "ERROR: Could not find a version that satisfies the requirement \
torch==2.13.0 (from versions: none)" >&2; echo "ERROR: No matching distribution found for torch==2.13.0" >&2; exit 1 ;;
  esac
done
case "$*" in
  *"-e .[train]"*) exec python -m pip install -q --no-deps --no-index --no-build-isolation -e . ;;
esac
exit 0
"""

# a C compiler that cannot find Python.h until apt-get installed python3-dev
CC = """#!/bin/sh
D=$(dirname "$0")
if [ -f "$D/apt-installed" ]; then exec /usr/bin/cc "$@"; fi
echo "<stdin>:1:10: fatal error: Python.h: No such file or directory" >&2; exit 1
"""
APT_GET = """#!/bin/sh
echo "apt-get $*" >> "$(dirname "$0")/apt.log"
case "$*" in *python3-dev*) touch "$(dirname "$0")/apt-installed" ;; esac
exit 0
"""


def standins(bin_dir: Path, *, driver: str = "560.35.03", cuda: str = "12.6", gpus: int = 1, python: str = "real",
             torch_sees: str = "gpus", headers: bool = True, model: str = "NVIDIA A100-SXM4-80GB",
             no_wheel: tuple[str, ...] = ()) -> Path:
    """(Re)write the node's stand-in tools into `bin_dir` (the sshd's `path_first`): nvidia-smi for
    `driver`/`cuda`/`gpus` GPUs named `model`, python3 (the real one, or "3.10"), pip, and without `headers` a cc that lacks
    Python.h until apt-get installs python3-dev. Logs: pip.log, apt.log, python3.log."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("pip.log", "apt.log", "python3.log", "apt-installed", "cc", "apt-get"):
        (bin_dir / name).unlink(missing_ok=True)
    (bin_dir / "driver").write_text(driver)
    (bin_dir / "cuda").write_text(cuda)
    (bin_dir / "gpus").write_text(str(gpus))
    (bin_dir / "model").write_text(model)
    (bin_dir / "no-wheel").write_text(" ".join(no_wheel))  # builds PyTorch's index has no torch 2.13.0 for
    (bin_dir / "torch-sees").write_text(torch_sees)
    (bin_dir / "pip.log").touch()
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    scripts = {"nvidia-smi": NVIDIA_SMI, "pip": PIP,
               "python3": PYTHON3_10 if python == "3.10" else PYTHON3.format(
                   real=shlex.quote(sys.executable), site=shlex.quote(site.getsitepackages()[0]), ver=ver,
                   dir=shlex.quote(str(bin_dir)))}
    if not headers:
        scripts |= {"cc": CC, "apt-get": APT_GET}
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir
