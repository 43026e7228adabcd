"""A private OpenSSH server on 127.0.0.1 for tests: the "node" the remote runner drives.

It runs Debian's /usr/sbin/sshd (package openssh-server, installed by scripts/system-deps.sh) on a
free port with a temp host key, a temp client key and its own authorized_keys, and lets in only the
user running the tests (creating a system user would need root and change the machine).

Several nodes (`start_nodes`): one sshd each, on its own port, each session starting in the node's own
home folder (the same user on one machine, but no shared files: a node's relative paths land in its
home). `reachable_only_through_head` makes every node but the first unreachable from this process, as
Chameleon's nodes without a floating IP are: only the head's sshd can connect to them;
`through_head_sitecustomize` does the same in other Python processes (a notebook's kernel).
`start_firewalled_nodes` adds each node's firewalld as on Chameleon's images (a strict firewall-cmd
stand-in, and an LD_PRELOAD connect() gate that keeps the head shut to the other nodes, torch included,
until its firewall admits the network).
"""

from __future__ import annotations

import contextlib
import getpass
import json
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

from nanorepro import envlock

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
    bin_dir: Path | None = None  # the folder leading every session's PATH (`path_first`: the node's stand-in tools)

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


def _session_shell(dir: Path, path_first: Path | None, home: Path | None, env: dict[str, str] | None = None) -> Path:
    """A ForceCommand that runs the client's command (or the SFTP server) in `home` (with HOME set to it)
    and with `path_first` leading PATH, after the user's shell start-up files (which may put e.g.
    pyenv's shims first) have run, with `env` exported."""
    script = dir / "session.sh"
    lines = ["#!/bin/sh"] + [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
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


def start(dir: Path, timeout_s: float = 15.0, path_first: Path | None = None, home: Path | None = None,
          env: dict[str, str] | None = None) -> Sshd:
    """Start sshd listening on 127.0.0.1 only; raises RuntimeError saying what is missing. With `path_first`,
    every session's PATH starts with that folder (where a test puts stand-ins for the node's tools); with
    `home`, every session starts there (created if missing); `env`: exported in every session."""
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
        "Subsystem sftp internal-sftp", "LogLevel ERROR", "MaxSessions=50", "MaxStartups=50",  # keyword=value, as sshd_config allows
        *([f"ForceCommand {_session_shell(dir, path_first, home, env)}"] if path_first or home or env else []),
    ]) + "\n")
    if home is not None:
        home.mkdir(parents=True, exist_ok=True)
    log = open(dir / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    server = Sshd("127.0.0.1", port, user, client_key, Path(f"{client_key}.pub"), proc, dir, home, path_first)
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


def start_nodes(dir: Path, n: int, path_first: Path | None = None,
                env: list[dict[str, str]] | None = None) -> list[Sshd]:
    """n sshd "nodes", node i in `dir/node<i>` with its home `dir/node<i>/home` (and `env[i]` exported in its
    sessions), all accepting node 0's client key (one keypair for the lease, as on Chameleon). Stops those
    started if one fails."""
    nodes: list[Sshd] = []
    try:
        for i in range(n):
            nodes.append(start(dir / f"node{i}", path_first=path_first, home=dir / f"node{i}" / "home",
                               env=env[i] if env else None))
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


def jobs_left(server: Sshd, marker: str) -> list[int]:
    """Live processes started through `server`'s sessions (they have `marker`, a NAME=value the sessions export,
    in their environment) that no session holds any more: jobs left running on the node (setsid, nohup)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue

    def in_a_session(pid: int) -> bool:
        while pid > 1:
            if pid == server.proc.pid:
                return True
            pid = parents.get(pid, 0)
        return False

    left = []
    for pid in parents:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in environ and not in_a_session(pid) and alive(pid):
            left.append(pid)
    return left


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
# `python -m nanorepro.gpt.gpucheck` reports what `torch-sees` says: "gpus" (the torch build uv installed, on
# every GPU) or anything else (the real check, with this machine's CPU torch).
PYTHON3 = """#!/bin/sh
D=$(dirname "$0")
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  {real} -m venv --without-pip "$3" || exit 1
  echo {site} > "$3"/lib/python{ver}/site-packages/outer.pth
  rm -f "$3/bin/python"  # a link to the real interpreter: replaced, never written through
  cat > "$3/bin/python" <<'END'
#!/bin/sh
D={dir}
if [ "$1 $2" = "-m nanorepro.gpt.gpucheck" ] && [ "$(cat $D/torch-sees)" = gpus ]; then
  build=$(grep -o 'whl/cu[0-9]*' $D/uv.log | tail -n 1 | cut -d/ -f2)
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

# uv: the real uv (this machine's, the version uv.lock needs) for all it can do offline, from the cache that
# `make install` filled: `uv lock --check`, `uv sync --locked` of the lock's packages into the node's venv, its
# argument checks. Only the network step stands in: torch from PyTorch's index (`uv pip install torch==...
# --torch-backend=B`). For it the real uv is asked (offline, --dry-run, verbose) which of PyTorch's indexes it
# reads for B, with the node's driver as uv would read it from /sys/module/nvidia/version
# (UV_CUDA_DRIVER_VERSION: the stand-in nvidia-smi's driver); uv reads them all and takes the newest build
# of the version asked for among them, so of the builds PyTorch's index holds for torch 2.13.0 (cpu, cu126,
# cu130, cu132, less `no-wheel`) the newest that uv reads is "installed": logged in uv.log, said as uv says it,
# and seen by the node's python through outer.pth (this machine's torch). None: uv's error and exit code.
UV = """#!{python}
import os, re, subprocess, sys
from pathlib import Path
from packaging.version import Version

D = Path(sys.argv[0]).resolve().parent
REAL = {real!r}
args = sys.argv[1:]
with open(D / "uv.log", "a") as log:
    log.write("uv " + " ".join(args) + "\\n")
env = dict(os.environ, UV_OFFLINE="1", UV_CACHE_DIR={cache!r}, UV_CUDA_DRIVER_VERSION=(D / "driver").read_text())
backend = next((a.split("=", 1)[1] for a in args if a.startswith("--torch-backend=")), None)
if args[:2] != ["pip", "install"] or backend is None:
    os.execve(REAL, [REAL, *args], env)
want = next(a for a in args if a.startswith("torch=="))
version = want.split("==", 1)[1]
r = subprocess.run([REAL, *args, "--dry-run", "-v"], env=env, capture_output=True, text=True)
if r.returncode == 2:  # uv refused the arguments themselves
    sys.stderr.write(r.stderr); sys.exit(2)
read = set(re.findall(r"https://download\\.pytorch\\.org/whl/([^/]+)/torch/", r.stderr))
held = {{"cpu", "cu126", "cu130", "cu132"}} - set((D / "no-wheel").read_text().split())
found = sorted(read & held, key=lambda b: Version(version + "+" + b.replace(".", "")))
if not read or version != "2.13.0" or not found:
    print("error: No solution found when resolving dependencies", file=sys.stderr)  # uv's words, not on a terminal
    print(f"  cause: Because there is no version of {{want}} and you require {{want}}, we can conclude that your "
          "requirements are unsatisfiable.", file=sys.stderr)
    sys.exit(1)
build = found[-1]
with open(D / "uv.log", "a") as log:
    log.write(f"installed torch {{version}}+{{build}} from https://download.pytorch.org/whl/{{build}} "
              f"(uv read {{', '.join(sorted(read))}})\\n")
print(f"Installed 1 package in 1ms\\n + torch=={{version}}+{{build}}", file=sys.stderr)
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
    `driver`/`cuda`/`gpus` GPUs named `model`, python3 (the real one, or "3.10"), pip, uv (the real one but for
    PyTorch's index, which holds torch 2.13.0 for cpu, cu126, cu130 and cu132 less `no_wheel`), and without
    `headers` a cc that lacks Python.h until apt-get installs python3-dev. Logs: pip.log, uv.log, apt.log,
    python3.log."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("pip.log", "uv.log", "apt.log", "python3.log", "apt-installed", "cc", "apt-get"):
        (bin_dir / name).unlink(missing_ok=True)
    (bin_dir / "driver").write_text(driver)
    (bin_dir / "cuda").write_text(cuda)
    (bin_dir / "gpus").write_text(str(gpus))
    (bin_dir / "model").write_text(model)
    (bin_dir / "no-wheel").write_text(" ".join(no_wheel))  # builds PyTorch's index lacks torch 2.13.0 for
    (bin_dir / "torch-sees").write_text(torch_sees)
    (bin_dir / "pip.log").touch()
    (bin_dir / "uv.log").touch()
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    uv = envlock.find_uv()
    if uv is None:
        raise RuntimeError(f"uv {envlock.UV_VERSION} is neither on PATH nor in .uv/: run `make install`, which bootstraps it")
    cache = subprocess.run([uv, "cache", "dir"], capture_output=True, text=True, check=True).stdout.strip()
    scripts = {"nvidia-smi": NVIDIA_SMI, "pip": PIP, "uv": UV.format(python=sys.executable, real=uv, cache=cache),
               "python3": PYTHON3_10 if python == "3.10" else PYTHON3.format(
                   real=shlex.quote(sys.executable), site=shlex.quote(site.getsitepackages()[0]), ver=ver,
                   dir=shlex.quote(str(bin_dir)))}
    if not headers:
        scripts |= {"cc": CC, "apt-get": APT_GET}
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


# -- a node's firewall ------------------------------------------------------------------------------
# firewall-cmd of a node whose firewalld admits only SSH until told otherwise, as on Chameleon's CUDA images.
# It parses its arguments as the real one does (argparse, the same option names, mutually exclusive groups and
# checks, exit codes of firewall/errors.py) but models only the options below: any other is refused as an
# unrecognized argument (exit 2), so code that needs one fails its tests instead of passing against a stub.
# State: $NANOREPRO_TEST_FIREWALLD/state.json (firewalld running or not, runtime and permanent sources per
# zone) and `filter`, the sources the node's packet filter admits (what the connect() gate reads), and
# calls.log, one line per call.
FIREWALL_CMD = '''#!{python}
import argparse, ipaddress, json, os, sys
from pathlib import Path

STATE = Path(os.environ.get("NANOREPRO_TEST_FIREWALLD") or Path(sys.argv[0]).resolve().parent / "firewalld")
ZONES = ["block", "dmz", "drop", "external", "home", "internal", "nm-shared", "public", "trusted", "work"]
INVALID_ADDR, INVALID_ZONE, ZONE_CONFLICT, NOT_RUNNING, NOT_AUTHORIZED = 105, 112, 18, 252, 253
STATE.mkdir(parents=True, exist_ok=True)
with open(STATE / "calls.log", "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
path = STATE / "state.json"
state = json.loads(path.read_text()) if path.is_file() else {{
    "running": True, "runtime": {{z: [] for z in ZONES}}, "permanent": {{z: [] for z in ZONES}}}}


def done(message="success", code=0):
    print(message, file=sys.stderr if code > 1 else sys.stdout)
    sys.exit(code)


def save():
    path.write_text(json.dumps(state))
    admitted = state["runtime"]["trusted"] if state["running"] else ["0.0.0.0/0"]  # stopped: nothing filters
    (STATE / "filter").write_text("".join(s + "\\n" for s in admitted))


parser = argparse.ArgumentParser(usage="'firewall-cmd --help' for usage information or see firewall-cmd(1) man page",
                                 add_help=False, prog="firewall-cmd")
parser.add_argument("-q", "--quiet", action="store_true")
alone = parser.add_mutually_exclusive_group()
for option in ("-h", "--help"), ("-V", "--version"), ("--state",), ("--reload",), ("--runtime-to-permanent",), \\
        ("--get-default-zone",), ("--get-zones",):
    alone.add_argument(*option, action="store_true")
parser.add_argument("--permanent", action="store_true")
parser.add_argument("--zone", default="", metavar="<zone>")
zone_ops = parser.add_mutually_exclusive_group()
for option in "--add-source", "--remove-source", "--query-source":
    zone_ops.add_argument(option, metavar="<source>", action="append")
zone_ops.add_argument("--list-sources", action="store_true")
a = parser.parse_args()
standalone = a.help or a.version or a.state or a.reload or a.runtime_to_permanent or a.get_default_zone or a.get_zones
zone_op = a.add_source or a.remove_source or a.query_source or a.list_sources
if standalone and (a.zone or a.permanent or zone_op):
    done(parser.format_usage() + "Can't use stand-alone options with other options.", 2)
if not standalone and not zone_op:
    done(f"State: {{'running' if state['running'] else 'not running'}}\\n\\nNo options specified\\n"
         + parser.format_usage()[:-1], 2)
if a.help:
    done("Usage: firewall-cmd [OPTIONS...]")
if not state["running"]:
    done("not running" if a.state else "FirewallD is not running", NOT_RUNNING)
changes = a.reload or a.runtime_to_permanent or a.add_source or a.remove_source
if changes and os.geteuid() != 0:  # polkit lets only the superuser change the firewall
    done("Authorization failed.\\n    Make sure polkit agent is running or run the application as superuser.",
         NOT_AUTHORIZED)
if a.version:
    done("2.1.1")
if a.state:
    done("running")
if a.get_default_zone:
    done("public")
if a.get_zones:
    done(" ".join(ZONES))
if a.reload:
    state["runtime"] = json.loads(json.dumps(state["permanent"]))
    save(); done()
if a.runtime_to_permanent:
    state["permanent"] = json.loads(json.dumps(state["runtime"]))
    save(); done()
zone = a.zone or "public"
if zone not in ZONES:
    done(f"Error: INVALID_ZONE: {{zone}}", INVALID_ZONE)
config = state["permanent" if a.permanent else "runtime"]
if a.list_sources:
    done(" ".join(config[zone]))
for source in a.add_source or a.remove_source or a.query_source:
    try:
        ipaddress.ip_network(source, strict=False)
    except ValueError:
        done(f"Error: INVALID_ADDR: {{source}}", INVALID_ADDR)
    if a.query_source:
        done("yes" if source in config[zone] else "no", 0 if source in config[zone] else 1)
    if a.remove_source:
        if source not in config[zone]:
            print(f"Warning: NOT_ENABLED: '{{source}}' is not in zone '{{zone}}'", file=sys.stderr)
        else:
            config[zone].remove(source)
    elif source in config[zone]:
        print(f"Warning: ZONE_ALREADY_SET: '{{source}}' already bound to '{{zone}}'", file=sys.stderr)
    elif any(source in sources for sources in config.values()):
        done(f"Error: ZONE_CONFLICT: '{{source}}' already bound to a zone", ZONE_CONFLICT)
    else:
        config[zone].append(source)
save()
done()
'''

# connect() of every process of a node but the head: a TCP connection to 127.0.0.1 (or ::ffff:127.0.0.1, ::1:
# torch's store and gloo connect over IPv6) fails as a firewalld reject makes it fail (EHOSTUNREACH, "No route
# to host") unless the head's packet filter admits 127.0.0.1
# ($NANOREPRO_TEST_FILTER: the head firewall-cmd stand-in's `filter`, one CIDR a line). Loaded with
# LD_PRELOAD, it holds for C code as for Python: torchrun's store and gloo's pairs as well as the port check.
# (Only the head's filter is modelled: the head's ports and the other nodes' all count as the head's.)
GATE_C = r'''
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

static int admitted(void) {
    const char *path = getenv("NANOREPRO_TEST_FILTER");
    FILE *f = path ? fopen(path, "r") : NULL;
    char line[128];
    int ok = 0;
    if (!f) return 0;
    while (!ok && fgets(line, sizeof line, f)) {
        unsigned a, b, c, d, bits;
        if (sscanf(line, "%u.%u.%u.%u/%u", &a, &b, &c, &d, &bits) == 5 && bits <= 32) {
            uint32_t net = a << 24 | b << 16 | c << 8 | d, mask = bits ? 0xffffffffu << (32 - bits) : 0;
            ok = (0x7f000001u & mask) == (net & mask);
        }
    }
    fclose(f);
    return ok;
}

/* 127.0.0.1, also as torch's store and gloo reach it: over IPv6, as ::ffff:127.0.0.1 (or ::1) */
static int loopback(const struct sockaddr *addr, socklen_t len) {
    if (addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in))
        return ntohl(((const struct sockaddr_in *)addr)->sin_addr.s_addr) == 0x7f000001u;
    if (addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        const struct in6_addr *a6 = &((const struct sockaddr_in6 *)addr)->sin6_addr;
        static const unsigned char mapped[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1};
        return memcmp(a6->s6_addr, mapped, 16) == 0 || IN6_IS_ADDR_LOOPBACK(a6);
    }
    return 0;
}

int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real)(int, const struct sockaddr *, socklen_t);
    if (!real) real = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
    if (addr && loopback(addr, len) && !admitted()) {
        errno = EHOSTUNREACH;
        return -1;
    }
    return real(fd, addr, len);
}
'''


def firewall_standin(bin_dir: Path) -> Path:
    """Write the firewall-cmd stand-in into `bin_dir` (a sshd's `path_first`); its path."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "firewall-cmd"
    path.write_text(FIREWALL_CMD.format(python=sys.executable))
    path.chmod(0o755)
    return path


def firewall_state(state_dir: Path, *, running: bool = True, trusted: tuple[str, ...] = (),
                   permanent: tuple[str, ...] = (), other: dict[str, list[str]] | None = None) -> None:
    """(Re)set a node's firewalld as the stand-in keeps it: by default running and admitting only SSH;
    `trusted` sources in the runtime trusted zone, `permanent` in the permanent one, `other` zones' runtime sources."""
    zones = ["block", "dmz", "drop", "external", "home", "internal", "nm-shared", "public", "trusted", "work"]
    runtime = {z: list((other or {}).get(z, [])) for z in zones} | {"trusted": list(trusted)}
    state = {"running": running, "runtime": runtime, "permanent": {z: [] for z in zones} | {"trusted": list(permanent)}}
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "state.json").write_text(json.dumps(state))
    (state_dir / "filter").write_text("".join(f"{s}\n" for s in (trusted if running else ["0.0.0.0/0"])))
    (state_dir / "calls.log").write_text("")


def firewall_gate(dir: Path) -> Path:
    """The connect() gate (GATE_C) built into `dir` as a shared library for LD_PRELOAD (needs a C compiler)."""
    dir.mkdir(parents=True, exist_ok=True)
    (dir / "gate.c").write_text(GATE_C)
    lib = dir / "gate.so"
    r = subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(dir / "gate.c"), "-ldl"],
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"cannot build the firewall gate (cc, from gcc: bash scripts/system-deps.sh): {r.stderr}")
    return lib


def start_firewalled_nodes(dir: Path, n: int, bin_dir: Path) -> list[Sshd]:
    """start_nodes, each node's firewalld (the stand-in in `bin_dir`, its state in `dir/node<i>/firewalld`)
    admitting only SSH, and every node but the head behind the head's packet filter (the gate): nothing but
    SSH reaches the head from them until the head's firewall admits 127.0.0.1."""
    firewall_standin(bin_dir)
    gate = firewall_gate(dir / "gate")
    states = [dir / f"node{i}" / "firewalld" for i in range(n)]
    for state in states:
        firewall_state(state)
    env = [{"NANOREPRO_TEST_FIREWALLD": str(state)} for state in states]
    for e in env[1:]:
        e |= {"LD_PRELOAD": str(gate), "NANOREPRO_TEST_FILTER": str(states[0] / "filter")}
    return start_nodes(dir, n, path_first=bin_dir, env=env)
