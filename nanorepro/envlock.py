"""uv.lock: every package nanorepro runs with, pinned with hashes, and the install from it.

`python3 -m nanorepro.envlock install` is what `make install` and a Chameleon node run:

1. uv of the pinned version: the one on PATH if it is that version, else bootstrapped from PyPI with pip,
   its wheel's hash checked (scripts/uv-requirements.txt), into `.uv/` beside the checkout.
2. `uv lock --check`: uv.lock must be in step with pyproject.toml; a stale lock stops here naming `make lock`.
3. `uv sync --locked` installs every locked package of the chosen extras, with the lock's hashes (and with
   `--compile-bytecode`, as `make install` asks, their .pyc files), except
   torch and the CUDA runtime that PyPI's Linux torch pulls in (nvidia-*, cuda-*, triton): torch's build
   is the machine's choice and comes next.
4. torch of the lock's version, by build: `cpu` (here, in CI and on laptops) takes the CPU wheel that pip's
   own configuration offers on this machine (a wheel folder pip's find-links names), else PyTorch's CPU
   index through uv (`--torch-backend=cpu`); a node gives `auto` (uv picks the build from the NVIDIA driver)
   or a CUDA build (`cu130`), tried in the order given. A torch whose version is not the lock's fails.
5. The environment is compared with the lock (`check`): a package at another version fails the install.

`status()` is what env.json records about each run: the lock's sha256 and whether the running environment
matches it. Standard library only: it runs before anything is installed, on the node and in the hub kernel.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

from nanorepro.errors import UserError

ROOT = Path(__file__).resolve().parent.parent  # the checkout (an editable install runs from it)
LOCK = "uv.lock"
PROJECT = "nanorepro"
UV_VERSION = "0.13.10"  # as pyproject's [tool.uv] required-version
UV_REQUIREMENTS = "scripts/uv-requirements.txt"  # uv==UV_VERSION with the sha256 of each of its wheels
UV_HOME = ".uv"  # where uv is bootstrapped when PATH has none of that version
TORCH_INSTALL_FAILED = 86  # the install's exit code when torch installed for none of the builds asked for
INSTALLERS = {"pip", "uv"}  # tools that may sit in an environment without being in the lock
ENVIRONMENT_YML = "environment.yml"
ENVIRONMENT_EXTRAS = ("train", "notebooks", "chameleon")  # a full local environment, as environment.yml makes
MAX_DIFFERENCES = 20  # kept in env.json (the count says how many there were)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _say(text: str) -> None:
    print(f"nanorepro: {text}", flush=True)


# ----------------------------------------------------------------------------- the lock

def lock_path(root: Path | None = None) -> Path | None:
    """uv.lock of the checkout nanorepro runs from (None when it runs from an installed copy)."""
    path = Path(root or ROOT) / LOCK
    return path if path.is_file() else None


def lock_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_lock(path: Path) -> dict[str, Any]:
    return tomllib.loads(Path(path).read_text(encoding="utf-8"))


def _project(lock: dict[str, Any]) -> dict[str, Any]:
    return next(p for p in lock["package"] if p["name"] == PROJECT)


def locked_versions(lock: dict[str, Any]) -> dict[str, set[str]]:
    """name -> the versions the lock holds for it (a package can have one per Python version), the project left out."""
    out: dict[str, set[str]] = {}
    for p in lock["package"]:
        if p["name"] != PROJECT:
            out.setdefault(canonical(p["name"]), set()).add(p["version"])
    return out


def torch_version(lock: dict[str, Any]) -> str:
    versions = locked_versions(lock).get("torch")
    if not versions or len(versions) != 1:
        raise UserError(f"uv.lock holds torch {sorted(versions or [])}, not one version", "run `make lock`")
    return next(iter(versions))


def _edges(package: dict[str, Any]) -> list[dict[str, Any]]:
    deps = list(package.get("dependencies", []))
    for extra in package.get("optional-dependencies", {}).values():
        deps += extra
    return deps


def torch_build_packages(lock: dict[str, Any]) -> list[str]:
    """The packages that only PyPI's Linux torch pulls in: its `sys_platform == 'linux'` dependencies (the CUDA
    runtime: nvidia-*, cuda-*, triton) and what only they need. A torch of another build brings its own."""
    graph: dict[str, list[dict[str, Any]]] = {}
    for p in lock["package"]:
        graph.setdefault(p["name"], []).extend(_edges(p))
    linux = {e["name"] for e in graph.get("torch", []) if "sys_platform == 'linux'" in e.get("marker", "")}

    def reach(starts: set[str], skip_torch_linux: bool) -> set[str]:
        seen, todo = set(), list(starts)
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for e in graph.get(name, []):
                if not (skip_torch_linux and name == "torch" and e["name"] in linux):
                    todo.append(e["name"])
        return seen

    return sorted(reach(linux, False) - reach({PROJECT}, True))


# ----------------------------------------------------------------------------- uv itself

def _uv_version(uv: str) -> str | None:
    try:
        out = subprocess.run([uv, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.match(r"uv (\S+)", out)
    return m[1] if m else None


def find_uv(root: Path | None = None) -> str | None:
    """uv of the pinned version: on PATH, or bootstrapped earlier into .uv/."""
    for uv in (shutil.which("uv"), str(Path(root or ROOT) / UV_HOME / "bin" / "uv")):
        if uv and Path(uv).is_file() and _uv_version(uv) == UV_VERSION:
            return uv
    return None


def ensure_uv(root: Path | None = None, python: str = sys.executable) -> str:
    """find_uv(), or uv bootstrapped from PyPI into .uv/ (a venv of `python`, pip checking the wheel's hash)."""
    root = Path(root or ROOT)
    uv = find_uv(root)
    if uv:
        return uv
    home = root / UV_HOME
    _say(f"uv {UV_VERSION} is not on PATH: installing it from PyPI into {home} (hashes from {UV_REQUIREMENTS})")
    steps = [[python, "-m", "venv", "--clear", str(home)],
             [str(home / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
              "--only-binary=:all:", "--require-hashes", "-r", str(root / UV_REQUIREMENTS)]]
    for cmd in steps:
        print("+ " + shlex.join(cmd), flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            said = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise UserError(f"uv is missing and could not be installed from PyPI ({shlex.join(cmd[:3])}... exit "
                            f"{r.returncode}: {said[0]})",
                            f"install uv {UV_VERSION} yourself (`pipx install uv=={UV_VERSION}`, or `python3 -m pip "
                            f"install uv=={UV_VERSION}`; the standalone installer at https://docs.astral.sh/uv/), put "
                            "it on PATH and run `make install` again; without python3-venv: "
                            "`apt-get install python3-venv`")
    uv = find_uv(root)
    if not uv:
        raise UserError(f"{home / 'bin' / 'uv'} is not uv {UV_VERSION} after its install",
                        f"remove {home} and run `make install` again")
    return uv


def _env(venv: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["UV_PYTHON_DOWNLOADS"] = "never"  # the Python given, never one uv downloads
    if venv is not None:
        env["UV_PROJECT_ENVIRONMENT"] = str(venv)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run and show a command (its output passed through as it comes); its exit code and output."""
    print("+ " + shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    return proc.wait(), "".join(lines)


def _requirements(pyproject: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(name, extra or "") -> version specifier of each requirement in pyproject.toml (markers other than the extra
    are not compared here: uv's own check sees them)."""
    project = pyproject["project"]
    out = {}
    for extra, reqs in [("", project.get("dependencies", []))] + list(project.get("optional-dependencies", {}).items()):
        for req in reqs:
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)", req)
            out[(canonical(m[1]), extra)] = m[2].replace(" ", "")
    return out


def _locked_requirements(lock: dict[str, Any]) -> dict[tuple[str, str], str]:
    out = {}
    for r in _project(lock).get("metadata", {}).get("requires-dist", []):
        extra = re.search(r"extra == '([^']+)'", r.get("marker", ""))
        out[(canonical(r["name"]), extra[1] if extra else "")] = r.get("specifier", "").replace(" ", "")
    return out


def stale_pins(root: Path | None = None) -> list[str]:
    """The requirements pyproject.toml states otherwise than uv.lock recorded them (offline, from the lock's copy of
    them): "tqdm: pyproject.toml ==4.70.0, uv.lock ==4.70.1"."""
    root = Path(root or ROOT)
    want = _requirements(tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8")))
    have = _locked_requirements(read_lock(root / LOCK))
    out = []
    for key in sorted(set(want) | set(have)):
        name = key[0] + (f" [{key[1]}]" if key[1] else "")
        if want.get(key) != have.get(key):
            out.append(f"{name}: pyproject.toml {want.get(key, 'absent') or 'any'}, "
                       f"uv.lock {have.get(key, 'absent') or 'any'}")
    return out


STALE_FIX = ("refresh it with `make lock` (runs `uv lock` and regenerates environment.yml), then commit uv.lock and "
             "environment.yml")


def check_pins(root: Path) -> None:
    if lock_path(root) is None:
        raise UserError(f"{root / LOCK} is missing", "run `make lock` (uv lock) and commit uv.lock")
    changed = stale_pins(root)
    if changed:
        raise UserError("uv.lock is out of step with pyproject.toml (" + "; ".join(changed) + ")", STALE_FIX)


def check_lock(uv: str, root: Path | None = None) -> None:
    """uv.lock in step with pyproject.toml, or a UserError naming the command that refreshes it: the pins compared
    first (offline), then `uv lock --check` (everything else uv locks on)."""
    root = Path(root or ROOT)
    check_pins(root)
    code, out = _run([uv, "lock", "--check"], root, _env())
    if code == 0:
        return
    if re.search(r"To update the lockfile|needs to be updated|changed from", out):
        raise UserError("uv.lock is out of step with pyproject.toml (" + _first_cause(out) + ")", STALE_FIX)
    raise UserError(f"uv could not check uv.lock against pyproject.toml (exit {code}): {_first_cause(out)}",
                    "check that PyPI is reachable (uv asks it when pyproject.toml names a version the lock lacks) "
                    "and run `make install` again")


def _first_cause(out: str) -> str:
    lines = [ln.strip() for ln in out.splitlines() if ln.strip() and not ln.startswith("+ ")]
    picked = next((ln for ln in lines if re.search(r"changed from|error|cause", ln, re.I)), lines[-1] if lines else "")
    return picked.removeprefix("error: ")


# ----------------------------------------------------------------------------- torch beside the lock

def pip_offered_wheel(python: str, version: str, label: str) -> str | None:
    """The torch==version+label wheel that pip's own configuration on this machine offers without an index (a
    wheel folder its find-links names): pip is asked offline (--no-index) and nothing is installed."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        try:
            r = subprocess.run([python, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps",
                                "--ignore-installed", "--only-binary=:all:", "-q", "--report", str(report),
                                f"torch=={version}"],
                               capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError):
            return None
        if r.returncode or not report.is_file():
            return None
        items = json.loads(report.read_text()).get("install", [])
    if len(items) != 1 or items[0]["metadata"]["version"] != f"{version}+{label}":
        return None
    url = items[0]["download_info"]["url"]
    return urllib.request.url2pathname(url.removeprefix("file://")) if url.startswith("file://") else None


def _installed_torch(venv: Path) -> str | None:
    r = subprocess.run([str(venv / "bin" / "python"), "-c",
                        "import importlib.metadata as m; print(m.version('torch'))"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def install_torch(uv: str, venv: Path, version: str, backends: list[str], python: str, root: Path,
                  compile_bytecode: bool = False) -> str:
    """torch==version of the first build in `backends` that installs; the build installed ("cpu", "cu126").
    Exits TORCH_INSTALL_FAILED when none does."""
    env, target = _env(venv), ["--python", str(venv / "bin" / "python"), *_bytecode(compile_bytecode)]
    tried = []
    for backend in backends:
        if backend == "cpu" and (wheel := pip_offered_wheel(python, version, "cpu")):
            _say(f"torch {version}: pip's configuration on this machine offers {wheel}: installing that wheel")
            cmd = [uv, "pip", "install", *target, "--no-deps", wheel]
        elif backend == "cpu":  # its dependencies are all in the lock, installed above
            cmd = [uv, "pip", "install", *target, "--no-deps", f"torch=={version}", "--torch-backend=cpu"]
        else:  # a CUDA build brings its own CUDA runtime (nvidia-*), which the lock's Linux torch would not match
            cmd = [uv, "pip", "install", *target, f"torch=={version}", f"--torch-backend={backend}"]
        code, out = _run(cmd, root, env)
        installed = _installed_torch(venv)
        built = re.findall(r"^ [+~] torch==([^\s]+)", out, re.M)
        build = (built[-1] if built else installed or "").partition("+")[2] or "pypi"
        tried.append(backend)
        if code:
            continue
        if installed is None or installed.partition("+")[0] != version:
            raise UserError(f"torch {installed} is installed in {venv}; uv.lock has torch {version}",
                            "run `make install` again (or `uv pip uninstall torch` first)")
        if backend != "cpu" and not build.startswith("cu"):
            _say(f"the {backend} install gave torch {version}+{build}, not a CUDA build")
            continue
        _say(f"torch {version}+{build} installed ({backend}), as uv.lock's torch {version}")
        return build
    print(f"nanorepro: torch {version} installed for none of {', '.join(tried)}", flush=True)
    raise SystemExit(TORCH_INSTALL_FAILED)


# ----------------------------------------------------------------------------- the whole install

def _bytecode(compile_bytecode: bool) -> list[str]:
    # uv installs no .pyc files unless asked, so until Python writes them itself (never where it may not:
    # PYTHONDONTWRITEBYTECODE, a read-only venv) each launch compiles ~1,700 modules of torch and the rest
    # from source: 5 s of the quick preset's 8 s start-up on a 2-core machine, against ~16 s once at install
    return ["--compile-bytecode"] if compile_bytecode else []


def install(venv: Path, extras: list[str], backends: list[str], python: str, root: Path | None = None,
            compile_bytecode: bool = False) -> None:
    root = Path(root or ROOT)
    venv = venv if venv.is_absolute() else root / venv
    check_pins(root)  # before anything is fetched
    uv = ensure_uv(root, python)
    check_lock(uv, root)
    lock = read_lock(root / LOCK)
    version = torch_version(lock)
    skip = [a for name in ["torch", *torch_build_packages(lock)] for a in ("--no-install-package", name)]
    every = ["--all-extras"] if extras == ["all"] else [a for e in extras for a in ("--extra", e)]
    _say(f"installing from uv.lock (sha256 {lock_sha256(root / LOCK)[:12]}) into {venv}; torch {version} beside it")
    code, _ = _run([uv, "sync", "--locked", "--python", python, *_bytecode(compile_bytecode), *every, *skip], root,
                   _env(venv))
    if code:
        raise UserError(f"`uv sync --locked` failed (exit {code}): see its lines above",
                        "fix what uv names and run it again; a stale lock: `make lock`")
    install_torch(uv, venv, version, backends, python, root, compile_bytecode)
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "nanorepro.envlock", "check"], cwd=root)
    if r.returncode:
        raise UserError(f"the environment in {venv} does not match uv.lock after the install",
                        f"remove {venv} and run `make install` again")


# ----------------------------------------------------------------------------- what ran, against the lock

def _requirement_names(dist: str) -> list[str]:
    try:
        reqs = importlib.metadata.requires(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [canonical(m[0]) for r in reqs if "extra ==" not in r and (m := re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r))]


def installed_versions() -> dict[str, str]:
    """name -> version of every distribution this interpreter imports from (the first on sys.path wins)."""
    out: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(canonical(name), dist.version)
    return out


def differences(lock: dict[str, Any], installed: dict[str, str]) -> list[str]:
    """How the installed packages differ from the lock: another version, or not in the lock at all. torch may carry
    its build's label (2.13.0+cu126), and what that build requires beyond the lock (its CUDA runtime) is its own."""
    locked = locked_versions(lock)
    own, todo = set(), ["torch"] if "torch" in installed else []
    while todo:
        for name in _requirement_names(todo.pop()):
            if name not in locked and name not in own and name in installed:
                own.add(name)
                todo.append(name)
    out = []
    for name, version in sorted(installed.items()):
        if name == PROJECT:
            continue
        if name in locked:
            public = version.partition("+")[0] if name == "torch" else version
            if public not in locked[name]:
                out.append(f"{name} {version} (uv.lock: {', '.join(sorted(locked[name]))})")
        elif name not in own and name not in INSTALLERS:
            out.append(f"{name} {version} (not in uv.lock)")
    return out


def status(root: Path | None = None) -> dict[str, Any]:
    """The lock this code came with (its sha256) and whether the running environment matches it."""
    path = lock_path(root)
    if path is None:
        return {"file": None, "sha256": None, "matches": None, "differences": [], "different": 0,
                "note": "no uv.lock beside the package (an installed copy, not a checkout)"}
    diffs = differences(read_lock(path), installed_versions())
    return {"file": LOCK, "sha256": lock_sha256(path), "matches": not diffs, "differences": diffs[:MAX_DIFFERENCES],
            "different": len(diffs)}


def describe(lock: dict[str, Any] | None) -> str:
    """One phrase: 'uv.lock 1a2b3c4d5e6f, matches the lock', '..., differs from the lock: tqdm 4.66.0 (uv.lock:
    4.70.1)', or 'no uv.lock on record'."""
    if not lock or not lock.get("sha256"):
        return "no uv.lock on record"
    head = f"uv.lock {lock['sha256'][:12]}"
    if lock.get("matches"):
        return f"{head}, matches the lock"
    shown = lock.get("differences") or []
    more = lock.get("different", len(shown)) - len(shown)
    return f"{head}, differs from the lock: " + "; ".join(shown) + (f" and {more} more" if more > 0 else "")


# ----------------------------------------------------------------------------- environment.yml from the lock

def environment_yml(uv: str, root: Path | None = None) -> str:
    """environment.yml as generated from uv.lock (`uv export`): Python, and every locked package of the full
    local environment at its locked version; conda's pip takes no hashes beside an editable install."""
    root = Path(root or ROOT)
    extras = [a for e in ENVIRONMENT_EXTRAS for a in ("--extra", e)]
    r = subprocess.run([uv, "export", "--frozen", "--no-hashes", "--no-header", "--no-annotate", "--no-emit-project",
                        "--format", "requirements.txt", *extras], cwd=root, env=_env(), capture_output=True, text=True)
    if r.returncode:
        raise UserError(f"`uv export` failed: {r.stderr.strip()[-500:]}", "run `make lock`")
    pins = [ln.strip() for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith(("#", "-"))]
    head = f"""# A full local environment: prepare, train, notebooks and the Chameleon client.
#   conda env create -f environment.yml && conda activate nanorepro
# Generated from uv.lock by `make lock` (do not edit; tests/test_packaging.py checks it is in step): every
# package at its locked version. torch is PyPI's build (on Linux, CUDA 13.0's); `make install` installs from
# the lock with hashes and torch's build per machine. The Chameleon hub kernel does not use this file: it
# installs only the light core (`pip install -e .`).
name: nanorepro
channels:
  - conda-forge
dependencies:
  - python=3.11
  - pip
  - pip:
      - "-e .[{','.join(ENVIRONMENT_EXTRAS)}]"
"""
    return head + "".join(f"      - {json.dumps(p)}\n" for p in pins)


def relock(root: Path | None = None, python: str = sys.executable) -> None:
    root = Path(root or ROOT)
    uv = ensure_uv(root, python)
    code, _ = _run([uv, "lock"], root, _env())
    if code:
        raise UserError(f"`uv lock` failed (exit {code}): see its lines above", "fix pyproject.toml's pins")
    (root / ENVIRONMENT_YML).write_text(environment_yml(uv, root), encoding="utf-8")
    _say(f"uv.lock (sha256 {lock_sha256(root / LOCK)[:12]}) and {ENVIRONMENT_YML} written: commit both")


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m nanorepro.envlock", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="install from uv.lock, torch's build beside it")
    inst.add_argument("--venv", type=Path, default=Path(".venv"))
    inst.add_argument("--python", default=sys.executable, help="the interpreter the venv is made from")
    inst.add_argument("--extra", action="append", default=[], help="an extra to install; 'all' for every one")
    inst.add_argument("--torch-backend", action="append", default=[], dest="backends",
                      help="torch's build: cpu, auto (uv picks it from the NVIDIA driver) or cuXXX; several are "
                           "tried in order (default: cpu)")
    inst.add_argument("--compile-bytecode", action="store_true",
                      help="compile every module to .pyc at install, so no launch compiles them from source")
    sub.add_parser("check", help="this interpreter's packages against uv.lock (exit 1 when they differ)")
    sub.add_parser("lock", help="uv lock, and environment.yml from it")
    sub.add_parser("environment-yml", help="print environment.yml as generated from uv.lock")
    a = parser.parse_args(argv)
    try:
        if a.command == "install":
            install(a.venv, a.extra or ["all"], a.backends or ["cpu"], a.python, compile_bytecode=a.compile_bytecode)
        elif a.command == "check":
            s = status()
            print(f"nanorepro: this environment ({sys.prefix}): {describe(s)}")
            return 0 if s["matches"] else 1
        elif a.command == "lock":
            relock(python=sys.executable)
        else:
            sys.stdout.write(environment_yml(ensure_uv()))
    except UserError as e:
        print(f"nanorepro: {e.problem}" + (f" (fix: {e.fix})" if e.fix else ""), file=sys.stderr, flush=True)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
