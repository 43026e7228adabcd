"""Run All on Chameleon's JupyterHub with the defaults: 00 -> 05 through papermill with no parameters, in the
environment the hub sets (JUPYTERHUB_*, OS_*, the keypair), pointed at the fake OpenStack and a loopback-sshd
node whose nvidia-smi reports driver 560 and whose python3 and uv are stand-ins (tests/sshd.py); and with
nodes=2, two such nodes, the second reachable only through the first, training one run under DDP.

Two things stand in for the A100: the node's torch (this machine's CPU build) is reported as seeing the GPU
by the stand-in python, and the GPU presets are shrunk, with device=cpu said explicitly, by a sitecustomize
in the notebook kernel (the presets are resolved there; the node trains what config.json says)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sshd as sshd_helper

from nanorepro import metrics
from nanorepro.cloud import remote, runner
from nanorepro.cloud.node import NODE_FILE

pytest.importorskip("chi", reason="python-chi is part of the test environment (pip install -e '.[chameleon]')")
from fake_openstack import FakeCloud  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

SITECUSTOMIZE = """
import nanorepro.config as c
# the A100 presets at toy size, on the node's CPU on purpose (an A100 trains the real ones in minutes)
small = dict(max_iters=4, eval_interval=2, eval_iters=1, log_interval=1, device="cpu", compile=False)
c.PRESETS["shakespeare-char"] = {**c.PRESETS["shakespeare-char"], **c.PRESETS["tiny"], **small,
                                 "out_dir": "runs/shakespeare-char"}
c.PRESETS["finetune-shakespeare"] = {**c.PRESETS["finetune-shakespeare"], **small, "init_from": INIT_FROM,
                                     "block_size": 32, "gradient_accumulation_steps": 2, "dtype": "float32"}
"""


def hub_env(cloud: FakeCloud, node: sshd_helper.Sshd, remote_dir: Path | str,
            ports: list[int] | None = None) -> dict[str, str]:
    """What Chameleon's JupyterHub sets in a user's server (auth here by application credential: the fake
    has no OIDC endpoint), plus the test's knobs for the loopback node(s): one SSH port per node, head first."""
    return {**cloud.env(), "JUPYTERHUB_API_URL": "http://127.0.0.1:9/hub/api", "JUPYTERHUB_USER": "tester",
            "JUPYTERHUB_SERVICE_PREFIX": "/user/tester/", "OS_KEYPAIR_NAME": "tester-jupyter",
            "OS_KEYPAIR_PRIVATE_KEY": str(node.key_path), "OS_KEYPAIR_PUBLIC_KEY": str(node.pub_path),
            "NANOREPRO_CHI_POLL_S": "0.02", "NANOREPRO_SSH_POLL_S": "0.1",
            "NANOREPRO_SSH_PORT": ",".join(str(p) for p in ports or [node.port]),
            "NANOREPRO_SSH_USER": node.user, "NANOREPRO_REMOTE_DIR": str(remote_dir), "USER": "tester"}


def artifact(tmp_path: Path, tiny_gpt2: Path, more_site: str = "") -> tuple[Path, Path]:
    """A checkout of the artifact as the hub clones it (its results/ go there), and the folder of the
    notebook kernel's sitecustomize (SITECUSTOMIZE, then `more_site`)."""
    checkout = tmp_path / "artifact"
    for path in remote.source_files(REPO):
        dest = checkout / path.relative_to(REPO)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    (checkout / "notebooks" / "nanorepro").unlink(missing_ok=True)
    (checkout / "notebooks" / "nanorepro").symlink_to("../nanorepro")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE.replace("INIT_FROM", repr(str(tiny_gpt2))) + more_site)
    return checkout, shim


def run_all(checkout: Path, shim: Path, hub: dict[str, str], params: list[str] = (), remote_env: list[str] = (),
            timeout: float = 900) -> subprocess.CompletedProcess:
    """`nanorepro run-notebooks [-p NAME VALUE ...]` in the checkout, in the hub's environment `hub`;
    `remote_env`: more NAME=VALUE settings for the node's stages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OS_", "NANOREPRO_"))}
    # the node has no network either: it gets the BPE files the way a user passes settings
    node_env = [f"TIKTOKEN_CACHE_DIR={os.environ['TIKTOKEN_CACHE_DIR']}", "HF_HUB_OFFLINE=1", *remote_env]
    env.update(hub, PYTHONPATH=f"{checkout}{os.pathsep}{shim}", HF_HUB_OFFLINE="1",
               NANOREPRO_REMOTE_ENV=" ".join(node_env))
    return subprocess.run([sys.executable, "-m", "nanorepro", "run-notebooks", *params], env=env, cwd=checkout,
                          capture_output=True, text=True, timeout=timeout)


def test_the_hub_environment_means_chameleon_and_elsewhere_local(monkeypatch):
    for var in ("JUPYTERHUB_API_URL", "JUPYTERHUB_USER", "OS_AUTH_URL", "OS_KEYPAIR_PRIVATE_KEY"):
        monkeypatch.delenv(var, raising=False)
    assert runner.resolve_target("auto") == "local" and runner.resolve_target("chameleon") == "chameleon"
    monkeypatch.setenv("JUPYTERHUB_API_URL", "http://hub:8081/hub/api")  # some JupyterHub, not Chameleon's
    assert runner.resolve_target("auto") == "local"
    monkeypatch.setenv("OS_AUTH_URL", "https://chi.uc.chameleoncloud.org:5000/v3")
    monkeypatch.setenv("OS_KEYPAIR_PRIVATE_KEY", "/home/tester/work/.ssh/id_rsa")
    assert runner.resolve_target("auto") == "chameleon" and runner.resolve_target("local") == "local"
    assert runner.results_path(None, "auto").name == "chameleon"


@pytest.mark.slow
def test_run_all_with_no_parameters_on_the_hub_leases_installs_trains_fetches_and_releases(
        tmp_path, shakespeare_path, tiktoken_offline, tiny_gpt2, loopback_node):
    checkout, shim = artifact(tmp_path, tiny_gpt2)
    node, bin_dir = loopback_node, sshd_helper.standins(loopback_node.bin_dir, driver="560.35.03", cuda="12.6")
    with FakeCloud() as cloud:
        r = run_all(checkout, shim, hub_env(cloud, node, tmp_path / "node home"))
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
        live = cloud.live()
        assert live == {"leases": [], "servers": [], "fips": []}  # released: nothing left
        assert sum(1 for m, p in cloud.requests if m == "POST" and p.endswith("/leases")) == 1
    results = checkout / "results" / "chameleon"  # the results folder follows the target
    assert not (checkout / "results" / "local").exists()
    record = json.loads((results / NODE_FILE).read_text())
    assert record["status"] == "released" and record["site"] == "CHI@UC" and record["image"] == "CC-Ubuntu24.04-CUDA"
    assert record["project"] == "CHI-000000"  # the hub's project
    uv = (bin_dir / "uv.log").read_text()  # the lock synced on the node, and the driver-matched torch beside it
    assert "uv sync --locked --python python3 --extra train " in uv
    assert "installed torch 2.13.0+cu126 from https://download.pytorch.org/whl/cu126" in uv
    out = r.stdout
    assert "torch 2.13.0+cu126 sees 1 GPU(s)" in out and "This lease will cost 16 SU: 1 node x 4 h x 4 SU per node-hour" in out
    for rel in ["node/nvidia-smi.txt", "data/shakespeare_char/meta.json", "runs/char/metrics.jsonl",
                "runs/char/samples.txt", "runs/finetune/metrics.jsonl", "runs/finetune/samples_before.txt",
                "REPORT.md", "report.json", "notebooks/05_release_node.ipynb"]:
        assert (results / rel).is_file(), rel
    for nb in sorted((results / "notebooks").glob("*.ipynb")):  # what a reader sees: no stray reprs
        values = [o["data"].get("text/plain", "") for c in json.loads(nb.read_text())["cells"]
                  for o in c.get("outputs", []) if o.get("output_type") == "execute_result"]
        text = "".join("".join(v) if isinstance(v, list) else v for v in values)
        assert not any(bad in text for bad in ("PosixPath(", " object at 0x", "{'")), (nb.name, text[:300])
    char = json.loads((results / "runs" / "char" / "config.json").read_text())
    assert char["preset"] == "shakespeare-char" and char["device"] == "cpu"  # the GPU preset, trained on the node
    assert (tmp_path / "node home" / "results" / "chameleon" / "runs" / "char" / "ckpt.pt").is_file()


@pytest.mark.slow
def test_run_all_with_two_nodes_trains_one_run_on_both_and_releases_everything(
        tmp_path, shakespeare_path, tiktoken_offline, tiny_gpt2):
    """00 -> 05 with nodes=2 and 02 training under DDP: one lease of two hosts, node 1 reached only through
    the head (from the notebook kernel too), installed on both and recorded per node, each node's firewall
    (admitting only SSH, as the image's) opened to the private network, torchrun on both nodes (world size 2)
    through it, and nothing left afterwards: no lease, server or floating IP, no job on a node."""
    bin_dir = sshd_helper.standins(tmp_path / "node-bin", driver="560.35.03", cuda="12.6")
    nodes = sshd_helper.start_firewalled_nodes(tmp_path / "nodes", 2, bin_dir)
    kernels = tmp_path / "guarded.log"
    checkout, shim = artifact(tmp_path, tiny_gpt2, sshd_helper.through_head_sitecustomize(nodes, kernels))
    # the README's command: one run over both nodes, its 8 micro-steps per iteration split over the ranks
    params = ["-p", "nodes", "2", "-p", "node_type", "gpu_a100_pcie",
              "-p", "char_overrides", "{parallel: ddp, gradient_accumulation_steps: 8, batch_size: 8}"]
    try:
        with FakeCloud() as cloud:
            hub = hub_env(cloud, nodes[0], "nanorepro", ports=[n.port for n in nodes])  # in each node's home
            hub["NANOREPRO_RDZV_PORT"] = str(sshd_helper._free_port())
            r = run_all(checkout, shim, hub, params, remote_env=["OMP_NUM_THREADS=1"], timeout=1500)
            assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
            assert cloud.live() == {"leases": [], "servers": [], "fips": []}  # released: nothing left
            assert sum(1 for m, p in cloud.requests if m == "POST" and p.endswith("/leases")) == 1
        stages = [n.home / "nanorepro" / "results" / "chameleon" for n in nodes]
        assert not sshd_helper.processes_in(stages)  # no job left running on either node
    finally:
        for node in nodes:
            node.stop()
    # the kernels that drove the nodes could not reach node 1 but through the head
    assert any("ipykernel" in line for line in kernels.read_text().splitlines())
    out = r.stdout
    assert "This lease will cost 128 SU: 2 nodes x 4 h x 16 SU per node-hour" in out
    results = checkout / "results" / "chameleon"
    record = json.loads((results / NODE_FILE).read_text())
    assert record["status"] == "released" and len(record["nodes"]) == 2
    setup = [n["setup"] for n in record["nodes"]]  # installed on both, recorded per node
    assert [(s["status"], s["folder"]) for s in setup] == [("ready", "node"), ("ready", "node-1")]
    assert [(n["network"]["status"], n["network"]["iface"]) for n in record["nodes"]] == [("ready", "lo")] * 2
    for node in nodes:  # each node's firewalld admits the private network, now and after a reboot
        firewall = json.loads((node.dir / "firewalld" / "state.json").read_text())
        assert firewall["runtime"]["trusted"] == firewall["permanent"]["trusted"] == ["127.0.0.0/8"]
    assert "the head's rendezvous port 127.0.0.1:" in out and "answers every node" in out
    for folder in ("node", "node-1"):
        assert (results / folder / "nvidia-smi.txt").is_file() and (results / folder / "env.json").is_file()
    assert out.count("torch 2.13.0+cu126 sees 1 GPU(s)") == 2
    # one run trained by torchrun on both nodes: world size 2, rank 0 on the head, node 1's share ran to the end
    (meta,) = [m for m in metrics.read(results / "runs" / "char" / metrics.METRICS_FILE) if m["kind"] == "meta"]
    assert meta["world_size"] == 2 and meta["config"]["parallel"] == "ddp"
    assert (meta["config"]["gradient_accumulation_steps"], meta["config"]["batch_size"]) == (8, 8)
    assert "[train char] started on 2 nodes" in out and "step 4: train loss" in out
    (job,) = (stages[1] / ".jobs").glob("train_char-*")
    script = (job / "run.sh").read_text()
    assert "--nnodes=2" in script and "--node_rank=1" in script and "--rdzv_backend=static" in script
    assert "NCCL_SOCKET_IFNAME=lo GLOO_SOCKET_IFNAME=lo " in script
    assert (job / "rc").read_text().strip() == "0"
    assert (stages[0] / "runs" / "char" / "ckpt.pt").is_file() and not (stages[1] / "runs" / "char" / "ckpt.pt").exists()
    for rel in ["runs/char/samples.txt", "runs/finetune/metrics.jsonl", "REPORT.md", "notebooks/05_release_node.ipynb"]:
        assert (results / rel).is_file(), rel
