"""env.json: hardware, software and git state on record, no torch import, no environment values."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanorepro import __version__, envinfo

FAKE_SMI = """#!/bin/sh
if [ "$1" = "--query-gpu=index,name,memory.total,driver_version" ]; then
  echo "0, NVIDIA A100-SXM4-40GB, 40960, 535.104.05"
  echo "1, NVIDIA A100-SXM4-40GB, 40960, 535.104.05"
else
  echo "| NVIDIA-SMI 535.104.05   Driver Version: 535.104.05   CUDA Version: 12.2     |"
fi
"""


def _fake_tool(folder: Path, name: str, script: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(script)
    path.chmod(0o755)


def _git(cwd: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.org", "PATH": os.environ["PATH"], "HOME": str(cwd)}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def test_capture_records_hardware_software_config_and_seeds():
    cfg = {"n_layer": 2, "seed": 7}
    info = envinfo.capture(cfg, seeds=[7, 8])
    hw = info["hardware"]
    assert hw["cpu_model"] and hw["cpu_count"] == os.cpu_count()
    assert hw["memory_total_bytes"] > 2**28
    assert hw["gpu_count"] == len(hw["gpus"])
    assert info["python"]["version"] == platform.python_version()
    assert info["os"]["system"] == platform.system() and info["hostname"]
    assert info["packages"]["numpy"] == np.__version__
    assert set(envinfo.PACKAGES) <= set(info["packages"])
    assert info["nanorepro"]["version"] == __version__
    assert info["config"] == cfg and info["seeds"] == [7, 8]
    json.dumps(info)  # all of it serialises


def test_write_and_read_round_trip(tmp_path):
    info = envinfo.capture()
    envinfo.write(tmp_path / "run" / "env.json", info)
    assert envinfo.read(tmp_path / "run") == json.loads(json.dumps(info))
    assert envinfo.read(tmp_path / "nothing-here") == {}
    assert "Python" in envinfo.summary(info)


def test_gpus_and_cuda_version_read_from_nvidia_smi(tmp_path, monkeypatch):
    _fake_tool(tmp_path / "bin", "nvidia-smi", FAKE_SMI)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    hw = envinfo.capture()["hardware"]
    assert hw["gpu_count"] == 2
    assert hw["gpu_model"] == "NVIDIA A100-SXM4-40GB"
    assert hw["gpus"][1] == {"index": "1", "name": "NVIDIA A100-SXM4-40GB", "memory_total_mib": 40960,
                             "driver_version": "535.104.05"}
    assert hw["driver_version"] == "535.104.05" and hw["cuda_version"] == "12.2"


def test_a_hanging_nvidia_smi_is_cut_off(tmp_path, monkeypatch):
    # answers like a real nvidia-smi, but only after 30 s: any result means it was waited for
    _fake_tool(tmp_path / "bin", "nvidia-smi", FAKE_SMI.replace("#!/bin/sh\n", "#!/bin/sh\nsleep 30\n", 1))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(envinfo, "_TIMEOUT_S", 0.5)
    gpus, cuda = envinfo.gpus_from_nvidia_smi()
    assert (gpus, cuda) == ([], None)


def test_git_commit_and_dirty_flag_of_a_checkout(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "commit", "-q", "-m", "one")
    info = envinfo.git_info(repo)
    assert info["commit"] == _git(repo, "rev-parse", "HEAD") and len(info["commit"]) == 40
    assert info["dirty"] is False
    (repo / "a.py").write_text("x = 2\n")
    assert envinfo.git_info(repo)["dirty"] is True
    # a package folder inside someone else's checkout (e.g. site-packages under a repo) is not ours
    (repo / "sub").mkdir()
    assert envinfo.git_info(repo / "sub") == {"commit": None, "dirty": None, "branch": None}
    assert envinfo.git_info(tmp_path)["commit"] is None  # not a checkout at all


def test_git_absent_is_tolerated(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git, no nvidia-smi
    info = envinfo.capture()
    assert info["nanorepro"]["commit"] is None and info["hardware"]["gpu_count"] == 0


def test_no_torch_import_and_no_environment_values(repo_root):
    secret = "sk-do-not-record-3141592653"
    code = ("import json, sys; from nanorepro import envinfo; info = envinfo.capture(); "
            "assert 'torch' not in sys.modules, 'envinfo imported torch'; "
            "assert info['torch'] is None; print(json.dumps(info))")
    env = {**os.environ, "NANOREPRO_TEST_SECRET": secret, "OS_PASSWORD": secret}
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert secret not in out.stdout and "NANOREPRO_TEST_SECRET" not in out.stdout
    assert json.loads(out.stdout)["hardware"]["cpu_count"] == os.cpu_count()


@pytest.mark.slow  # by measurement: imports torch in a process of its own: ~3 s
def test_torch_details_when_the_caller_already_imported_it(repo_root):
    code = ("import json, torch; from nanorepro import envinfo; t = envinfo.capture()['torch']; "
            "assert t['version'] == torch.__version__, t; assert t['cuda_available'] == torch.cuda.is_available(); "
            "assert t['num_threads'] == torch.get_num_threads(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
