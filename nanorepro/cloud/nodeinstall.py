"""What a Chameleon GPU node needs before it trains, checked in the order that costs least to fail.

1. The image's `python3` must satisfy pyproject's `requires-python` (CC-Ubuntu22.04 has 3.10): refused
   before anything is installed, naming the image to use instead.
2. A C compiler and the Python headers: `torch.compile`'s Triton builds its launcher in C, so a node
   without `python3-dev` fails at the first compiled step. Missing ones are installed with apt
   (`python3-dev python3-venv build-essential`), or the install fails naming them.
3. Everything from uv.lock, as on a laptop and in CI (`python3 -m nanorepro.envlock install --extra train`:
   `uv sync --locked`, hashes checked), and beside it torch 2.13.0 built for the newest CUDA the NVIDIA driver
   supports (nvidia-smi's "CUDA Version"): PyPI's torch is the CUDA 13.0 build, which a 560 driver (CUDA 12.6)
   cannot run; torch then sees no GPU and `device=auto` would train on the CPU. PyTorch's index has 2.13.0 for
   cu126 and cu130 (cu132 as experimental, opt-in). uv picks the build itself (`--torch-backend=auto`) where
   its pick is ours (see uv_backends); otherwise the newest build the driver runs is tried first, then the next
   lower one if uv finds no wheel, and a failed install names the driver, the builds tried and the fix.
4. After the install, torch must see every GPU nvidia-smi lists and run a bf16 matmul on each
   (`nanorepro.gpt.gpucheck` on the node), or the install fails naming the driver, the wheel and the fix.

The probes are short shell commands over the runner's SSH connection; the long steps (apt, uv) are
detached jobs like every stage. No torch here: the hub kernel imports this.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.specifiers import SpecifierSet

from nanorepro import envlock
from nanorepro.errors import UserError

SSHRunner = Any  # remote.SSHRunner, which imports this module: the probes use its ssh, run_command and say

TORCH_VERSION = "2.13.0"
TORCH_INDEX = "https://download.pytorch.org/whl/{build}"
# torch 2.13.0's CUDA builds on PyTorch's index (its release matrix: stable CUDA 12.6 and 13.0, experimental
# 13.2; no 12.9) and the CUDA version each needs from the driver
CUDA_BUILDS: dict[str, tuple[int, int]] = {"cu126": (12, 6), "cu130": (13, 0)}
EXPERIMENTAL_BUILDS: dict[str, tuple[int, int]] = {"cu132": (13, 2)}
EXPERIMENTAL_ENV = "NANOREPRO_TORCH_CU132"  # 1: a driver that runs CUDA 13.2 gets the experimental cu132 first
TORCH_INSTALL_FAILED = envlock.TORCH_INSTALL_FAILED  # the install's exit code when no build of torch installed
CUDA_IMAGE = "CC-Ubuntu24.04-CUDA"  # Python 3.12, a CUDA driver: what the node should boot
SYSTEM_PACKAGES = ("python3-dev", "python3-venv", "build-essential")  # headers, venv, a C compiler
VENV = ".venv"

# One shell round trip: the node's Python, whether it can make a venv, and whether a C file that
# includes Python.h compiles (what Triton does at the first compiled step).
PROBE = r"""
echo "python=$(python3 --version 2>&1 | head -n 1)"
inc=$(python3 -c 'import sysconfig; print(sysconfig.get_path("include"))' 2>/dev/null)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 && echo "venv=yes" || echo "venv=no"
cc=$(command -v cc || command -v gcc || command -v clang)
echo "cc=$cc"
if [ -n "$cc" ] && printf '#include <Python.h>\nint main(void) { return 0; }\n' \
     | "$cc" -fsyntax-only -x c -I"$inc" - >/dev/null 2>&1; then echo "headers=yes"; else echo "headers=no"; fi
"""
SMI = "nvidia-smi 2>&1; echo \"rc=$?\"; nvidia-smi -L 2>/dev/null"


@dataclass
class NodeFacts:
    """What the probes found on the node."""

    python: str  # e.g. "3.12.3", "" when there is no python3
    venv: bool
    compiler: str  # the C compiler's path, "" when there is none
    headers: bool  # a C file including Python.h compiles
    driver: str | None = None  # NVIDIA driver version
    cuda: tuple[int, int] | None = None  # the newest CUDA the driver supports
    gpus: int = 0  # GPUs nvidia-smi lists

    @property
    def missing_packages(self) -> list[str]:
        missing = [] if self.headers else ["python3-dev"]
        missing += [] if self.venv else ["python3-venv"]
        missing += [] if self.compiler else ["build-essential"]
        return missing


def requires_python(root: Path) -> str:
    """pyproject.toml's `requires-python` (e.g. ">=3.11")."""
    return tomllib.loads((Path(root) / "pyproject.toml").read_text(encoding="utf-8"))["project"]["requires-python"]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def python_satisfies(version: str, spec: str) -> bool:
    """Whether `version` ("3.10.12") meets a requires-python spec (">=3.11,<4"), as pip reads it."""
    return SpecifierSet(spec).contains(version)


def parse_probe(text: str) -> NodeFacts:
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    python = values.get("python", "")
    return NodeFacts(python=".".join(map(str, _version(python))) if python.startswith("Python") else "",
                     venv=values.get("venv") == "yes", compiler=values.get("cc", ""),
                     headers=values.get("headers") == "yes")


def gpu_models(text: str) -> list[str]:
    """The model of each GPU `nvidia-smi -L` lists ("GPU 0: NVIDIA A100-SXM4-80GB (UUID: ...)")."""
    return re.findall(r"^GPU \d+: (.+?) \(UUID", text, re.M)


def parse_nvidia_smi(text: str) -> tuple[str | None, tuple[int, int] | None, int]:
    """(driver version, the CUDA version it supports, GPUs listed) from `nvidia-smi; nvidia-smi -L`."""
    driver = re.search(r"Driver Version:\s*([\d.]+)", text)
    cuda = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", text)
    gpus = len(gpu_models(text))
    return (driver[1] if driver else None, (int(cuda[1]), int(cuda[2])) if cuda else None, gpus)


def torch_builds(cuda: tuple[int, int], driver: str | None) -> list[str]:
    """The CUDA builds of torch the driver can run (its CUDA version is at least the build's), newest first:
    the install tries them in this order. cu132 only with $NANOREPRO_TORCH_CU132=1 (experimental)."""
    builds = {**CUDA_BUILDS, **(EXPERIMENTAL_BUILDS if os.environ.get(EXPERIMENTAL_ENV) == "1" else {})}
    fits = sorted((b for b, need in builds.items() if need <= cuda), key=builds.get, reverse=True)
    if not fits:
        oldest = min(CUDA_BUILDS, key=CUDA_BUILDS.get)
        raise UserError(f"the node's NVIDIA driver {driver} supports CUDA {cuda[0]}.{cuda[1]}, older than torch "
                        f"{TORCH_VERSION}'s oldest CUDA build ({oldest}, CUDA {'.'.join(map(str, CUDA_BUILDS[oldest]))})",
                        f"reserve again with image='{CUDA_IMAGE}' (a newer driver)")
    return fits


def torch_build(cuda: tuple[int, int], driver: str | None) -> str:
    """The newest CUDA build of torch the driver can run."""
    return torch_builds(cuda, driver)[0]


def uv_backends(builds: list[str]) -> list[str]:
    """What the node asks uv for (`--torch-backend`), in order, for our table's `builds` (torch_builds).

    uv's own choice (`auto`) reads the driver (/sys/module/nvidia/version), reads every PyTorch index whose CUDA
    the driver can run and takes the newest build of torch 2.13.0 among them. For a CUDA 12 driver (560 to 579)
    those are cu129 ... cu120 (CUDA 12's minor-version compatibility), of which only cu126 has 2.13.0: uv picks
    cu126, as our table does, for a 575 driver (CUDA 12.9) too, since cu129 and cu128 have no 2.13.0. So the
    CUDA 12 line is left to uv. For a CUDA 13 driver (580 and later) uv counts cu132 as runnable and takes
    2.13.0+cu132, the experimental build that needs CUDA 13.2 and that we give only on request
    ($NANOREPRO_TORCH_CU132=1): there our builds are passed explicitly (cu130, then cu126). Drivers older than
    560 never get here: torch_builds refuses them before anything is installed, where uv would take cu126 on
    minor-version compatibility alone."""
    return ["auto"] if builds[0] == "cu126" else list(builds)


def install_command(builds: list[str] | str) -> str:
    """The venv, then nanorepro with its training extras from uv.lock and torch beside it for the first of
    uv_backends(builds) that installs (envlock), run in the copied checkout. Exits TORCH_INSTALL_FAILED when no
    build installs."""
    builds = [builds] if isinstance(builds, str) else list(builds)
    backends = " ".join(f"--torch-backend {b}" for b in uv_backends(builds))
    return (f"python3 -m venv {VENV} && "
            f"python3 -m nanorepro.envlock install --python python3 --venv {VENV} --extra train {backends}")


def _tried(builds: list[str]) -> str:
    return ", ".join(f"auto (uv's pick for the driver, {builds[0]} by our table)" if b == "auto"
                     else f"{b} ({TORCH_INDEX.format(build=b)})" for b in uv_backends(builds))


def install_failed(facts: "NodeFacts", builds: list[str], tail: list[str]) -> UserError:
    """The one message for a torch install that failed for every build: driver, builds tried, uv's words, fix."""
    said = next((line for line in reversed(tail) if re.search(r"error|No solution|Because|not a CUDA build", line)),
                tail[-1] if tail else "no output")
    driver = f"NVIDIA driver {facts.driver} (CUDA {facts.cuda[0]}.{facts.cuda[1]})" if facts.cuda else "the driver"
    return UserError(f"uv could not install torch {TORCH_VERSION} on the node for {driver}: tried {_tried(builds)}; "
                     f"uv said: {said.strip()}",
                     f"check that the node reaches download.pytorch.org (`curl -sI {TORCH_INDEX.format(build=builds[0])}/torch/`) "
                     "and run setup again; if PyTorch's index has no build for this driver, reserve again with "
                     f"image='{CUDA_IMAGE}'")


def apt_command(packages: list[str]) -> str:
    names = " ".join(packages)
    return ('if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; '
            f"$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q {names}")


def probe(runner: SSHRunner, image: str | None) -> NodeFacts:
    """The node's Python, compiler and headers, and its driver and GPUs; refuses a Python that
    pyproject does not accept and a node without a working NVIDIA driver, before anything is installed."""
    facts = parse_probe(runner.ssh.check(PROBE, "probing the node's Python"))
    spec = requires_python(runner.local_root)
    on = f" (image {image})" if image else ""
    if not facts.python:
        raise UserError(f"the node{on} has no python3", f"reserve again with image='{CUDA_IMAGE}'")
    if not python_satisfies(facts.python, spec):
        raise UserError(f"the node's python3 is {facts.python}{on}; nanorepro needs Python {spec}",
                        f"release this node and reserve again with image='{CUDA_IMAGE}' (Python 3.12)")
    _, smi = runner.ssh.exec(SMI)
    facts.driver, facts.cuda, facts.gpus = parse_nvidia_smi(smi)
    if "rc=0" not in smi or facts.cuda is None or not facts.gpus:
        raise UserError(f"nvidia-smi finds no working NVIDIA GPU on the node{on}: "
                        f"{smi.split('rc=')[0].strip()[-300:] or 'no output'}",
                        f"reserve a GPU node type with a CUDA image (image='{CUDA_IMAGE}'); if the node just "
                        "booted, wait a minute and run setup again")
    return facts


def install_system_packages(runner: SSHRunner, facts: NodeFacts, image: str | None) -> NodeFacts:
    """apt-get the missing headers, venv module or compiler; the node's facts after it, or a refusal
    naming the packages when they are still missing."""
    missing = facts.missing_packages
    if not missing:
        return facts
    runner.say(f"the node lacks {', '.join(missing)} (torch.compile builds C code against Python.h): installing")
    code = runner.run_command(["sh", "-c", apt_command(missing)], stage="system packages", check=False)
    after = parse_probe(runner.ssh.check(PROBE, "probing the node's Python"))
    still = after.missing_packages
    if code or still:
        raise UserError(f"the node{f' (image {image})' if image else ''} still lacks {', '.join(still or missing)} "
                        f"after `apt-get install` (exit {code})",
                        f"install it on the node (`sudo apt-get install -y {' '.join(still or missing)}`) and run "
                        "setup again, or reserve with image='" + CUDA_IMAGE + "'")
    after.driver, after.cuda, after.gpus = facts.driver, facts.cuda, facts.gpus
    return after


def check_gpus(runner: SSHRunner, facts: NodeFacts, build: str) -> dict:
    """torch on the node must see every GPU nvidia-smi lists and run a bf16 matmul on each; its report."""
    code, out = runner.ssh.exec(f"cd -- {shlex.quote(str(runner.remote_dir))} && "
                                f"{VENV}/bin/python -m nanorepro.gpt.gpucheck", timeout=600)
    report = None
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            try:
                report = json.loads(line)
                break
            except json.JSONDecodeError:
                pass
    wheel = f"torch {TORCH_VERSION} from {TORCH_INDEX.format(build=build)}"
    driver = f"NVIDIA driver {facts.driver} (CUDA {facts.cuda[0]}.{facts.cuda[1]})" if facts.cuda else "the driver"
    fix = (f"the driver and the wheel disagree: reserve again with image='{CUDA_IMAGE}', or install the torch build "
           "for the driver's CUDA by hand (in the node's code folder: `uv pip install --python .venv/bin/python "
           "torch==2.13.0 --torch-backend=cuXXX`, uv being .uv/bin/uv there unless the node has it on PATH) and run "
           "setup again")
    if report is None:
        raise UserError(f"the GPU check failed on the node (exit {code}) with {wheel}, {driver}: "
                        f"{out.strip()[-500:]}", fix)
    seen, failed = report.get("devices", []), [d for d in report.get("devices", []) if not d.get("bf16_matmul")]
    if len(seen) < facts.gpus:
        raise UserError(f"torch {report.get('torch')} (built for CUDA {report.get('cuda')}) sees {len(seen)} of the "
                        f"node's {facts.gpus} GPU(s) with {driver}; wheel: {wheel}"
                        + (f"; {report['error']}" if report.get("error") else ""), fix)
    if failed:
        raise UserError(f"a bf16 matmul failed on {', '.join(d['name'] for d in failed)} with {driver}, {wheel}: "
                        f"{failed[0].get('error')}", fix)
    return report
