"""Hardware and software on record: what `env.json` holds next to every run.

Torch-free on purpose (the hub kernel imports this): torch is asked only when the caller has
already imported it, and the GPU is otherwise read from `nvidia-smi`. Environment variables are
never recorded: their values can hold secrets (tokens, passwords, OpenStack credentials).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from nanorepro import __version__, envlock
from nanorepro.files import read_json, write_text_atomic
from nanorepro.fmt import utc_timestamp

PACKAGES = ("nanorepro", "torch", "transformers", "tiktoken", "numpy", "datasets", "matplotlib")
_TIMEOUT_S = 10


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    """stdout of a command, or None when it is missing, fails or hangs."""
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT_S, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    with contextlib.suppress(OSError):  # no /proc (macOS, Windows)
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def memory_total_bytes() -> int | None:
    try:  # on Linux the same total as /proc/meminfo's MemTotal
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows)
        return None


def gpus_from_nvidia_smi() -> tuple[list[dict[str, Any]], str | None]:
    """GPUs (name, memory, driver) and the driver's CUDA version, from nvidia-smi if it is on PATH."""
    out = _run(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                "--format=csv,noheader,nounits"])
    rows = [[p.strip() for p in line.split(",")] for line in (out or "").splitlines()]
    gpus = [{"index": i, "name": name, "memory_total_mib": int(mib) if mib.isdigit() else None, "driver_version": d}
            for i, name, mib, d in (r for r in rows if len(r) == 4)]  # memory is "[N/A]" on some boards
    if not gpus:
        return [], None
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", _run(["nvidia-smi"]) or "")
    return gpus, cuda[1] if cuda else None


def torch_info() -> dict[str, Any] | None:
    """What torch itself reports, only if the caller already imported it (never imported here)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    info: dict[str, Any] = {"version": torch.__version__, "cuda_build": torch.version.cuda}
    try:
        info["cuda_available"] = bool(torch.cuda.is_available())
        if info["cuda_available"]:
            info["cudnn"] = torch.backends.cudnn.version()
            props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
            info["devices"] = [{"name": p.name, "memory_total_mib": p.total_memory // 2**20,
                                "capability": f"{p.major}.{p.minor}"} for p in props]
        info["mps_available"] = bool(torch.backends.mps.is_available())
        info["num_threads"] = torch.get_num_threads()
    except Exception as e:  # a half-initialised CUDA must not stop a run from being recorded
        info["error"] = f"{type(e).__name__}: {e}"
    return info


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = dict.fromkeys(PACKAGES)
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def lock_status() -> dict[str, Any]:
    """uv.lock's sha256 and whether this environment matches it (envlock.status); a lock that cannot be read is
    recorded as such rather than stopping the run."""
    try:
        return envlock.status()
    except Exception as e:  # a damaged uv.lock must not stop a run from being recorded
        return {"file": envlock.LOCK, "sha256": None, "matches": None, "differences": [], "different": 0,
                "note": f"uv.lock could not be read: {type(e).__name__}: {e}"}


def git_info(root: Path | None = None) -> dict[str, Any]:
    """Commit, dirty flag and branch of the checkout the package runs from; nulls when it is not one."""
    root = Path(root) if root else Path(__file__).resolve().parent.parent
    lines = (_run(["git", "rev-parse", "--show-toplevel", "HEAD", "--abbrev-ref", "HEAD"], cwd=root) or "").splitlines()
    # an installed copy under some unrelated checkout (a venv inside a repo) is not our history
    if len(lines) != 3 or Path(lines[0]).resolve() != root.resolve():
        return {"commit": None, "dirty": None, "branch": None}
    status = _run(["git", "status", "--porcelain"], cwd=root)
    return {"commit": lines[1], "dirty": bool(status.strip()) if status is not None else None, "branch": lines[2]}


def capture(cfg_dict: dict[str, Any] | None = None, seeds: list[int] | None = None) -> dict[str, Any]:
    """Everything needed to say where and with what a run ran. Safe to call without torch."""
    gpus, driver_cuda = gpus_from_nvidia_smi()
    tinfo = torch_info()
    if not gpus and tinfo and tinfo.get("devices"):
        gpus = [{"index": str(i), **d} for i, d in enumerate(tinfo["devices"])]
    return {
        "captured_at": utc_timestamp(),
        "hostname": socket.gethostname(),
        "os": {"system": platform.system(), "release": platform.release(), "version": platform.version(),
               "platform": platform.platform()},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation()},
        "hardware": {
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "memory_total_bytes": memory_total_bytes(),
            "gpu_count": len(gpus),
            "gpus": gpus,
            "gpu_model": gpus[0]["name"] if gpus else None,
            "driver_version": gpus[0].get("driver_version") if gpus else None,
            "cuda_version": driver_cuda or (tinfo or {}).get("cuda_build"),
        },
        "torch": tinfo,
        "packages": package_versions(),
        "lock": lock_status(),
        "nanorepro": {"version": __version__, **git_info()},
        "config": cfg_dict,
        "seeds": seeds,
    }


def write(path: Path, info: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(info, indent=2, default=str) + "\n")
    return path


def read(path: Path) -> dict[str, Any]:
    """env.json of a run folder (or the file itself); {} when absent, so old runs still report."""
    path = Path(path)
    return read_json(path / "env.json" if path.is_dir() else path) or {}


def summary(info: dict[str, Any]) -> str:
    """One line: device, OS, Python, torch, commit, and the lock."""
    hw = info.get("hardware", {})
    dev = f"{hw.get('gpu_count')}x {hw.get('gpu_model')}" if hw.get("gpu_count") else f"CPU {hw.get('cpu_model')}"
    pk, git = info.get("packages", {}), info.get("nanorepro", {})
    commit = (git.get("commit") or "no git")[:10] + ("+dirty" if git.get("dirty") else "")
    return (f"{dev}, {hw.get('cpu_count')} cores, {info.get('os', {}).get('system')} "
            f"{info.get('os', {}).get('release')}, Python {info.get('python', {}).get('version')}, "
            f"torch {pk.get('torch')}, nanorepro {git.get('version')} ({commit}); {envlock.describe(info.get('lock'))}")
