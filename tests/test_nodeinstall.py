"""The node install (nodeinstall + SSHRunner.setup + chameleon.setup_node): the real install command runs on
a loopback-sshd "node" whose nvidia-smi, python3, cc and apt-get are stand-ins, and whose uv is the real one
(uv.lock synced offline from this machine's cache) except for PyTorch's index (tests/sshd.py)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import sshd as sshd_helper

from nanorepro.cloud import chameleon, nodeinstall, remote
from nanorepro.cloud.node import NODE_FILE
from nanorepro.errors import UserError

SMI_560 = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 560.35.03              Driver Version: 560.35.03      CUDA Version: 12.6     |
|-----------------------------------------+------------------------+----------------------+
rc=0
GPU 0: NVIDIA A100-PCIE-40GB (UUID: GPU-1)
GPU 1: NVIDIA A100-PCIE-40GB (UUID: GPU-2)
"""


def test_the_driver_decides_the_torch_build():
    assert nodeinstall.parse_nvidia_smi(SMI_560) == ("560.35.03", (12, 6), 2)
    assert nodeinstall.torch_build((12, 6), "560.35.03") == "cu126"
    assert nodeinstall.torch_build((12, 8), "570.86") == "cu126"
    assert nodeinstall.torch_build((12, 9), "575.51") == "cu126"  # torch 2.13.0 has no cu129 build
    assert nodeinstall.torch_builds((13, 0), "580.65.06") == ["cu130", "cu126"]  # the second if uv finds none
    assert nodeinstall.torch_build((13, 2), "595.1") == "cu130"  # cu132 is experimental: opt-in only
    with pytest.raises(UserError, match="driver 535.104 supports CUDA 12.2, older than") as e:
        nodeinstall.torch_build((12, 2), "535.104")
    assert "CC-Ubuntu24.04-CUDA" in e.value.fix
    assert nodeinstall.uv_backends(["cu126"]) == ["auto"]  # uv's own pick is ours for CUDA 12 drivers
    assert nodeinstall.uv_backends(["cu130", "cu126"]) == ["cu130", "cu126"]  # not for CUDA 13 ones
    assert nodeinstall.install_command(["cu126"]).endswith(
        "python3 -m nanorepro.envlock install --python python3 --venv .venv --extra train --torch-backend auto")


def test_the_experimental_cu132_build_is_opt_in(monkeypatch):
    monkeypatch.setenv(nodeinstall.EXPERIMENTAL_ENV, "1")
    assert nodeinstall.torch_builds((13, 2), "595.1") == ["cu132", "cu130", "cu126"]
    assert nodeinstall.torch_builds((13, 0), "580.65.06") == ["cu130", "cu126"]


def test_requires_python_is_read_from_pyproject():
    spec = nodeinstall.requires_python(Path(__file__).parents[1])
    assert spec == ">=3.11"
    assert not nodeinstall.python_satisfies("3.10.12", spec) and nodeinstall.python_satisfies("3.12.3", spec)
    assert not nodeinstall.python_satisfies("4.0.0", ">=3.11,<4") and nodeinstall.python_satisfies("3.11.0", ">=3.11,<4")


@pytest.fixture
def node(loopback_node):
    """The loopback sshd, whose sessions find the stand-ins (`bin_dir`) first on PATH."""
    return loopback_node, loopback_node.bin_dir


def reserved(node, tmp_path: Path) -> Path:
    """A results folder holding the record of a reserved node (the sshd), as 00_reserve_node leaves it."""
    srv, _ = node
    state = tmp_path / "results"
    state.mkdir()
    end = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=3, minutes=1)
    (state / NODE_FILE).write_text(json.dumps({
        "host": srv.host, "port": srv.port, "user": srv.user, "key_path": str(srv.key_path),
        "remote_dir": str(tmp_path / "node home"), "site": "CHI@UC", "lease_name": "nanorepro-tester",
        "lease_id": "lease-1", "lease_end": end.isoformat(), "image": "CC-Ubuntu24.04-CUDA", "status": "ready"}))
    return state


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("NANOREPRO_INSTALL_CMD", raising=False)  # the real install
    monkeypatch.setenv("NANOREPRO_SSH_POLL_S", "0.1")


def uv_log(bin_dir: Path) -> str:
    return (bin_dir / "uv.log").read_text()


def test_driver_560_gets_cu126_from_uvs_own_pick_and_missing_headers_are_installed(node, tmp_path, clean_env, capsys):
    _, bin_dir = node
    sshd_helper.standins(bin_dir, driver="560.35.03", cuda="12.6", headers=False)
    state = reserved(node, tmp_path)
    assert chameleon.setup_node("chameleon", state) == state / "node"
    out = capsys.readouterr().out
    assert "apt-get install -y -q python3-dev" in (bin_dir / "apt.log").read_text()  # torch.compile's headers
    uv = uv_log(bin_dir)
    assert "uv lock --check\n" in uv  # the lock in step with pyproject, on the node too
    assert "uv sync --locked --python python3 --extra train --no-install-package torch " in uv
    assert "uv pip install --python " in uv and "torch==2.13.0 --torch-backend=auto\n" in uv
    # uv read every CUDA 12 index the driver runs (and the CPU one) and took cu126, the newest holding 2.13.0
    picked = next(line for line in uv.splitlines() if line.startswith("installed torch"))
    assert picked.startswith("installed torch 2.13.0+cu126 from https://download.pytorch.org/whl/cu126 (uv read ")
    assert "cu129" in picked and "cu128" in picked and "cu130" not in picked
    assert (bin_dir / "pip.log").read_text() == ""  # no pip on the node any more
    assert "NVIDIA driver 560.35.03 (CUDA 12.6), 1 GPU(s): torch 2.13.0 cu126" in out
    assert "installing from uv.lock (sha256 " in out and "torch 2.13.0+cu126 installed (auto)" in out
    assert "this environment (" in out and ", matches the lock" in out
    assert "torch 2.13.0+cu126 sees 1 GPU(s) and runs bf16 on each" in out
    assert "Driver Version: 560.35.03" in (state / "node" / "nvidia-smi.txt").read_text()
    import nanorepro  # the node's venv runs the copied code
    assert (tmp_path / "node home" / "nanorepro" / "__init__.py").read_text() == Path(nanorepro.__file__).read_text()
    venv = tmp_path / "node home" / ".venv" / "lib"
    assert list(venv.glob("python3*/site-packages/tqdm-4.70.1.dist-info"))  # synced from the lock into the venv
    env = json.loads((state / "node" / "env.json").read_text())
    assert env["lock"]["matches"] is True and env["lock"]["sha256"] == hashlib.sha256(
        (Path(nanorepro.__file__).parents[1] / "uv.lock").read_bytes()).hexdigest()
    # a stage on the node never falls back to its CPU (here torch really sees no GPU): one line says why
    lines: list[str] = []
    runner = remote.SSHRunner.from_state(state, workdir=state, out=lines.append)
    try:
        assert runner.run(["sample", "--model", "gpt2"], stage="sample", check=False) == 2
    finally:
        runner.close()
    assert any("no CUDA GPU is visible to torch" in line and "Chameleon GPU node" in line for line in lines), lines


def test_driver_575_gets_a_build_that_exists(node, tmp_path, clean_env, capsys):
    _, bin_dir = node
    sshd_helper.standins(bin_dir, driver="575.51.03", cuda="12.9")
    chameleon.setup_node("chameleon", reserved(node, tmp_path))
    uv = uv_log(bin_dir)
    assert "torch==2.13.0 --torch-backend=auto\n" in uv
    picked = next(line for line in uv.splitlines() if line.startswith("installed torch"))
    assert picked.startswith("installed torch 2.13.0+cu126 ") and "cu129" in picked  # cu129 has no 2.13.0
    assert "torch 2.13.0+cu126 sees 1 GPU(s)" in capsys.readouterr().out


def test_driver_580_gets_cu130_our_choice_over_uvs(node, tmp_path, clean_env, capsys):
    _, bin_dir = node
    sshd_helper.standins(bin_dir, driver="580.65.06", cuda="13.0")
    chameleon.setup_node("chameleon", reserved(node, tmp_path))
    uv = uv_log(bin_dir)
    assert "torch==2.13.0 --torch-backend=cu130\n" in uv and "--torch-backend=auto" not in uv
    assert "installed torch 2.13.0+cu130 from https://download.pytorch.org/whl/cu130" in uv
    assert not (bin_dir / "apt.log").exists()  # compiler and headers were there
    assert "torch 2.13.0+cu130 sees 1 GPU(s)" in capsys.readouterr().out


def test_uvs_own_pick_for_a_580_driver_would_be_the_experimental_cu132(tmp_path):
    """Why the CUDA 13 line is not left to uv: asked for `auto` with a 580 driver, the real uv reads cu132's index,
    and takes 2.13.0+cu132 there (the stand-in index holds it), which our table gives only on request."""
    bin_dir = sshd_helper.standins(tmp_path / "bin", driver="580.65.06", cuda="13.0")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    r = subprocess.run([str(bin_dir / "uv"), "pip", "install", "--python", str(tmp_path / "venv" / "bin" / "python"),
                        "torch==2.13.0", "--torch-backend=auto"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "installed torch 2.13.0+cu132 " in uv_log(bin_dir)
    assert nodeinstall.torch_build((13, 0), "580.65.06") == "cu130"


def test_a_build_uv_finds_no_wheel_for_falls_back_to_the_next_lower(node, tmp_path, clean_env, capsys):
    _, bin_dir = node
    sshd_helper.standins(bin_dir, driver="580.65.06", cuda="13.0", no_wheel=("cu130",))
    chameleon.setup_node("chameleon", reserved(node, tmp_path))
    uv = uv_log(bin_dir)
    assert uv.index("--torch-backend=cu130") < uv.index("--torch-backend=cu126")  # tried in this order
    out = capsys.readouterr().out
    assert "torch 2.13.0 cu130 or, if uv finds none, cu126" in out
    assert "torch 2.13.0+cu126 sees 1 GPU(s) and runs bf16 on each" in out


def test_no_torch_for_any_build_is_one_message_naming_driver_builds_and_fix(node, tmp_path, clean_env):
    _, bin_dir = node
    sshd_helper.standins(bin_dir, driver="580.65.06", cuda="13.0", no_wheel=("cu130", "cu126"))
    state = reserved(node, tmp_path)
    with pytest.raises(UserError) as e:
        chameleon.setup_node("chameleon", state)
    problem = e.value.problem
    assert "uv could not install torch 2.13.0 on the node for NVIDIA driver 580.65.06 (CUDA 13.0): tried cu130 " \
           "(https://download.pytorch.org/whl/cu130), cu126 (https://download.pytorch.org/whl/cu126)" in problem
    assert "uv said: cause: Because there is no version of torch==2.13.0 and you require torch==2.13.0" in problem
    assert "STILL RUNNING until" in problem and "download.pytorch.org" in e.value.fix
    assert "installed torch" not in uv_log(bin_dir)  # nothing installed


def test_uvs_pick_that_is_no_cuda_build_fails_the_install(node, tmp_path, clean_env):
    """uv's `auto` ends on PyTorch's CPU index when no CUDA index it reads has the version: that is a failure."""
    _, bin_dir = node
    sshd_helper.standins(bin_dir, driver="560.35.03", cuda="12.6", no_wheel=("cu126",))
    with pytest.raises(UserError) as e:
        chameleon.setup_node("chameleon", reserved(node, tmp_path))
    assert "tried auto (uv's pick for the driver, cu126 by our table)" in e.value.problem
    assert "installed torch 2.13.0+cpu " in uv_log(bin_dir)


def test_python_3_10_is_refused_before_anything_is_installed(node, tmp_path, clean_env):
    _, bin_dir = node
    sshd_helper.standins(bin_dir, python="3.10")
    state = reserved(node, tmp_path)
    with pytest.raises(UserError) as e:
        chameleon.setup_node("chameleon", state)
    assert "the node's python3 is 3.10.12 (image CC-Ubuntu24.04-CUDA); nanorepro needs Python >=3.11" in e.value.problem
    assert "image='CC-Ubuntu24.04-CUDA'" in e.value.fix
    assert "lease nanorepro-tester (lease-1) at CHI@UC is STILL RUNNING until" in e.value.problem
    assert uv_log(bin_dir) == "" and (bin_dir / "pip.log").read_text() == ""
    assert "-m venv" not in (bin_dir / "python3.log").read_text()  # only the probe asked it anything
    assert not (tmp_path / "node home").exists()  # not even the code was copied


def test_torch_that_sees_no_gpu_fails_setup_naming_driver_wheel_and_fix(node, tmp_path, clean_env):
    _, bin_dir = node
    sshd_helper.standins(bin_dir, driver="560.35.03", cuda="12.6", torch_sees="none")  # this machine's CPU torch
    state = reserved(node, tmp_path)
    with pytest.raises(UserError) as e:
        chameleon.setup_node("chameleon", state)
    problem = e.value.problem
    assert "sees 0 of the node's 1 GPU(s) with NVIDIA driver 560.35.03 (CUDA 12.6)" in problem
    assert "wheel: torch 2.13.0 from https://download.pytorch.org/whl/cu126" in problem
    assert "STILL RUNNING until" in problem and "nanorepro release --results-dir" in problem
    assert "reserve again with image='CC-Ubuntu24.04-CUDA'" in e.value.fix
    assert not (state / "node").exists()  # no record of a node that cannot train
