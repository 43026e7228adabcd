"""uv.lock on record: the lock's hash in env.json, whether the environment matches it, and the report per run.

A package "changed by hand" is a real interpreter whose own site-packages holds that package at another version
in front of this test environment's (a venv seeing ours through a .pth file, as tests/sshd.py's node venvs do):
importlib.metadata, which env.json reads, sees what an install by hand leaves, a dist-info of the other version."""

from __future__ import annotations

import hashlib
import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from nanorepro import envinfo, envlock
from nanorepro.results import report

REPO = Path(__file__).resolve().parents[1]
VER = f"python{sys.version_info.major}.{sys.version_info.minor}"


def overlay(base: Path, dists: dict[str, tuple[str, list[str]]]) -> Path:
    """A venv that sees this environment's packages, with `dists` (name -> (version, Requires-Dist)) installed in
    its own site-packages in front of them; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(base)], check=True)
    sp = base / "lib" / VER / "site-packages"
    (sp / "outer.pth").write_text(site.getsitepackages()[0] + "\n")
    for name, (version, requires) in dists.items():
        info = sp / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                       + "".join(f"Requires-Dist: {r}\n" for r in requires))
        (info / "INSTALLER").write_text("pip\n")
        (info / "RECORD").write_text(f"{info.name}/METADATA,,\n")
    return base / "bin" / "python"


def lock_of(python: Path | str) -> dict:
    code = "import json; from nanorepro import envinfo; print(json.dumps(envinfo.capture()['lock']))"
    r = subprocess.run([str(python), "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_this_environment_matches_the_lock_it_was_installed_from():
    lock = envinfo.capture()["lock"]
    assert lock["file"] == "uv.lock" and lock["sha256"] == hashlib.sha256((REPO / "uv.lock").read_bytes()).hexdigest()
    assert lock["matches"] is True, lock["differences"]  # `make install` installed it from the lock
    assert envlock.describe(lock) == f"uv.lock {lock['sha256'][:12]}, matches the lock"
    assert envlock.describe(lock) in envinfo.summary(envinfo.capture())


def test_a_package_changed_by_hand_is_a_mismatch_named_in_env_json(tmp_path):
    python = overlay(tmp_path / "venv", {"tqdm": ("4.66.0", [])})
    lock = lock_of(python)
    assert lock["matches"] is False and lock["differences"] == ["tqdm 4.66.0 (uv.lock: 4.70.1)"]
    assert lock["sha256"] == envlock.lock_sha256(REPO / "uv.lock")
    assert envlock.describe(lock).endswith("differs from the lock: tqdm 4.66.0 (uv.lock: 4.70.1)")


def test_a_package_the_lock_lacks_is_a_mismatch_but_installers_and_torchs_own_runtime_are_not(tmp_path):
    # a node's CUDA torch brings its CUDA runtime, which PyPI's Linux torch in the lock does not have
    python = overlay(tmp_path / "venv", {
        "torch": ("2.13.0+cu126", ["nvidia-cublas-cu12==12.6.4.1; platform_system == 'Linux'", "filelock"]),
        "nvidia-cublas-cu12": ("12.6.4.1", []), "uv": ("0.13.10", [])})
    assert lock_of(python)["matches"] is True
    python = overlay(tmp_path / "venv2", {"torch": ("2.12.1+cu126", []), "left-behind": ("1.0", [])})
    assert lock_of(python)["differences"] == ["left-behind 1.0 (not in uv.lock)",
                                              "torch 2.12.1+cu126 (uv.lock: 2.13.0)"]


def test_torch_build_packages_are_pypis_cuda_runtime_only():
    lock = envlock.read_lock(REPO / "uv.lock")
    build = envlock.torch_build_packages(lock)
    assert "triton" in build and "nvidia-cublas" in build and "cuda-toolkit" in build
    assert all(n.startswith(("nvidia-", "cuda-", "triton")) for n in build), build
    # what the CPU wheel needs stays locked and installed: its Requires-Dist, as this machine's torch states it
    import importlib.metadata

    cpu_needs = {envlock.canonical(r.split(";")[0].split(">")[0].split("=")[0].strip())
                 for r in importlib.metadata.requires("torch") if "extra ==" not in r}
    assert cpu_needs and not cpu_needs & set(build) and cpu_needs <= set(envlock.locked_versions(lock))


def test_no_lock_beside_an_installed_copy_is_recorded_as_such(tmp_path):
    s = envlock.status(tmp_path)
    assert s["sha256"] is None and s["matches"] is None and "no uv.lock" in s["note"]
    assert envlock.describe(s) == "no uv.lock on record"


def _train(python: Path | str, out: Path, data_root: Path) -> Path:
    code = ("import sys, torch; torch.set_num_threads(1); from nanorepro.config import resolve; "
            "from nanorepro.gpt.train import train; "
            "train(resolve('tiny', {'data_root': sys.argv[1], 'out_dir': sys.argv[2], 'max_iters': 4, "
            "'eval_interval': 2, 'eval_iters': 1}), preset='tiny')")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(python), "-c", code, str(data_root), str(out)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out


@pytest.mark.slow  # by measurement: two training runs and a report: ~15 s
def test_the_report_says_per_run_whether_it_ran_as_locked(tmp_path, char_data_root):
    runs = tmp_path / "runs"
    locked = _train(sys.executable, runs / "locked", char_data_root)
    changed = _train(overlay(tmp_path / "venv", {"tqdm": ("4.66.0", [])}), runs / "by-hand", char_data_root)
    digest = envlock.lock_sha256(REPO / "uv.lock")
    assert json.loads((locked / "env.json").read_text())["lock"]["matches"] is True
    assert json.loads((changed / "env.json").read_text())["lock"]["differences"] == ["tqdm 4.66.0 (uv.lock: 4.70.1)"]
    rep = report.report([locked, changed], tmp_path / "out")
    by_name = {r["name"]: r for r in rep["runs"]}
    assert by_name["locked"]["lock"]["matches"] is True and by_name["by-hand"]["lock"]["matches"] is False
    md = (tmp_path / "out" / "REPORT.md").read_text()
    env_table = md.split("## Environment")[1]
    assert f"`locked` | " in env_table and f"uv.lock {digest[:12]}, matches the lock" in env_table
    assert f"uv.lock {digest[:12]}, **differs from the lock**: tqdm 4.66.0 (uv.lock: 4.70.1)" in env_table
    row = next(line for line in env_table.splitlines() if "`by-hand`" in line)
    assert "**differs from the lock**" in row and "matches the lock" not in row
    assert any("`by-hand` ran in an environment that differs from its uv.lock" in w for w in rep["warnings"])
    assert not any("`locked`" in w for w in rep["warnings"])


def test_the_installer_needs_nothing_but_the_standard_library():
    """`make install` runs it with the machine's python3 before anything is installed (and a node with its own)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import nanorepro.envlock; "
            "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)"
            " - {'nanorepro', '__main__'}))")
    r = subprocess.run([sys._base_executable, "-I", "-S", "-c", code, str(REPO)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.slow  # by measurement: a pip install attempt: ~4 s
def test_uv_missing_and_not_installable_is_one_message_naming_the_fix(tmp_path, monkeypatch):
    """No uv on PATH, and pip finds no uv wheel (no index, an empty wheel folder): the bootstrap stops saying what
    to install by hand, before anything else is tried."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / envlock.UV_REQUIREMENTS).write_text((REPO / envlock.UV_REQUIREMENTS).read_text())
    (tmp_path / "wheels").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "wheels"))
    assert envlock.find_uv(tmp_path) is None
    with pytest.raises(envlock.UserError) as e:
        envlock.ensure_uv(tmp_path, sys._base_executable)
    assert e.value.problem.startswith("uv is missing and could not be installed from PyPI (")
    assert "No matching distribution found for uv==0.13.10" in e.value.problem
    assert f"install uv {envlock.UV_VERSION} yourself" in e.value.fix and "make install" in e.value.fix


def test_make_install_compiles_bytecode_in_both_uv_commands(tmp_path, monkeypatch):
    """`make install` asks for .pyc files at install (else a launch where Python may not write them compiles
    torch's modules from source every time); a node's install does not ask, and gets none."""
    makefile = (REPO / "Makefile").read_text()
    assert "-m nanorepro.envlock install" in makefile and "--compile-bytecode" in makefile.split("envlock install")[1].split("\n")[0]
    version = envlock.torch_version(envlock.read_lock(REPO / envlock.LOCK))
    real_uv, real_run = envlock.find_uv(), subprocess.run
    assert real_uv, f"uv {envlock.UV_VERSION} is neither on PATH nor in .uv/: run `make install`, which bootstraps it"
    ran: list[list[str]] = []

    def uv(cmd, cwd, env):  # the real uv's parser judges every argument (exit 2 on one it rejects); nothing installs
        ran.append(cmd)
        parsed = real_run([real_uv, *cmd[1:], "--help"], capture_output=True, text=True)
        return parsed.returncode, f" + torch=={version}+cpu\n" if parsed.returncode == 0 else parsed.stderr

    monkeypatch.setattr(envlock, "check_pins", lambda root: None)
    monkeypatch.setattr(envlock, "ensure_uv", lambda root, python: "uv")
    monkeypatch.setattr(envlock, "check_lock", lambda uv, root: None)
    monkeypatch.setattr(envlock, "pip_offered_wheel", lambda python, version, label: None)
    monkeypatch.setattr(envlock, "_installed_torch", lambda venv: f"{version}+cpu")
    monkeypatch.setattr(envlock, "_run", uv)
    monkeypatch.setattr(envlock.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0))
    for asked in (True, False):
        ran.clear()
        envlock.install(tmp_path / "venv", ["all"], ["cpu"], sys.executable, root=REPO, compile_bytecode=asked)
        sync, torch_install = ran
        assert sync[1:3] == ["sync", "--locked"] and torch_install[1:3] == ["pip", "install"]
        assert [("--compile-bytecode" in cmd) for cmd in ran] == [asked, asked]
    asked_for = []  # the command line's flag reaches install()
    monkeypatch.setattr(envlock, "install", lambda *a, compile_bytecode: asked_for.append(compile_bytecode))
    assert envlock.main(["install", "--compile-bytecode"]) == 0 and envlock.main(["install"]) == 0
    assert asked_for == [True, False]
