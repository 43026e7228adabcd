"""What only a CUDA GPU shows. Deselected by default (pyproject: -m "not gpu"); `benchmarks/gpu.sh`
runs them with `pytest -m gpu` on a GPU node, and its --dry-run checks on a CPU that they collect."""

import subprocess
import sys

import pytest
import torch

from nanorepro import memory, metrics, optim
from nanorepro.config import GPTConfig, resolve
from nanorepro.model import GPT

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def cuda():
    if not torch.cuda.is_available():
        pytest.fail("these tests need a CUDA GPU: run them with `pytest -m gpu` on a GPU node (benchmarks/gpu.sh)")


def train(tmp_path, char_data_root, *extra: str, launch: tuple[str, ...] = ()) -> list[dict]:
    out = tmp_path / "run"
    cmd = [*(launch or (sys.executable, "-m", "nanorepro")), "train", "--preset", "tiny", "--device=cuda",
           f"--data_root={char_data_root}", "--out-dir", str(out), "--max_iters=20", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return list(metrics.read(out / metrics.METRICS_FILE))


def test_bf16_autocast_trains_and_the_loss_falls(tmp_path, char_data_root):
    records = train(tmp_path, char_data_root, "--dtype=bfloat16")
    meta = metrics.meta(records)
    assert meta["device"].startswith("cuda") and meta["dtype"] == "bfloat16"
    evals = [r["val_loss"] for r in records if r["kind"] == "eval"]
    assert evals[-1] < evals[0]


def test_flash_attention_runs_forward_and_backward_in_bf16():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=256, vocab_size=65)).cuda()
    x = torch.randint(0, 65, (4, 256), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(x, x)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_compiled_training_matches_eager_closely(tmp_path, char_data_root):
    eager = train(tmp_path / "eager", char_data_root, "--compile=false", "--dtype=float32")
    compiled = train(tmp_path / "compiled", char_data_root, "--compile=true", "--dtype=float32")
    last = [[r["loss"] for r in recs if r["kind"] == "train"][-1] for recs in (eager, compiled)]
    assert abs(last[0] - last[1]) < 0.05  # Inductor reorders float sums: close, not bit-identical


def test_adamw_is_fused_on_cuda():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=65)).cuda()
    opt = optim.build(model, "adamw", 0.1, 1e-3, (0.9, 0.95), "cuda")
    assert opt.defaults["fused"] is True


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_one_process_nccl_trains(tmp_path, char_data_root, parallel):
    launch = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "nanorepro")
    records = train(tmp_path, char_data_root, f"--parallel={parallel}", launch=launch)
    assert metrics.meta(records)["world_size"] == 1
    assert [r for r in records if r["kind"] == "eval"]


def test_memory_estimate_bounds_the_measured_peak(tmp_path, char_data_root):
    extra = ("--n_layer=4", "--n_head=4", "--n_embd=256", "--block_size=256", "--batch_size=16", "--dtype=bfloat16")
    records = train(tmp_path, char_data_root, *extra)
    measured = [r["peak_memory_bytes"] for r in records if r.get("peak_memory_bytes")][-1]
    cfg = resolve("tiny", {k.strip("-").split("=")[0]: k.split("=")[1] for k in extra})
    estimate = memory.estimate_for(cfg, cfg.model_config(65), "bfloat16").total - memory.OVERHEAD_BYTES
    assert 0.5 * estimate <= measured <= 1.25 * estimate, (measured, estimate)
