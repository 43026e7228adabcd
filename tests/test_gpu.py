"""What only a CUDA GPU shows. Deselected by default (pyproject: -m "not gpu"); `benchmarks/gpu.sh`
runs them with `pytest -m gpu` on a GPU node, and its --dry-run checks on a CPU that they collect."""

import subprocess
import sys

import pytest
import torch

from nanorepro import memory, metrics
from nanorepro.config import GPTConfig, resolve
from nanorepro.gpt import optim
from nanorepro.gpt.model import GPT

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


# ---------------------------------------------------------------------------------------------
# The GPU path as only a GPU shows it; losses compared within tolerances
# (resume is exact on the CPU only: flash attention's backward and Inductor's dropout RNG are not
# deterministic).


def losses(records: list[dict]) -> list[tuple]:
    return [(r["kind"], r["iter"], r.get("loss", r.get("val_loss"))) for r in records if r["kind"] in ("train", "eval")]


def test_auto_dtype_is_bf16_only_where_this_gpu_computes_it_natively():
    from nanorepro.gpt import hardware

    native = torch.cuda.get_device_capability() >= (8, 0)
    assert native == torch.cuda.is_bf16_supported(including_emulation=False)
    assert hardware.resolve_dtype("cuda", "auto") == ("bfloat16" if native else "float16")


def test_a_named_gpu_becomes_current_and_its_peak_count_starts_afresh():
    from nanorepro.gpt import hardware

    last = torch.cuda.device_count() - 1
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device=f"cuda:{last}")
    del big
    assert torch.cuda.max_memory_allocated(last) >= 256 * 2**20
    hardware.use_device(f"cuda:{last}")
    assert torch.cuda.current_device() == last
    assert torch.cuda.max_memory_allocated(last) == torch.cuda.memory_allocated(last) < 256 * 2**20


def test_float16_resume_restores_the_grad_scaler_and_stays_close(tmp_path, char_data_root):
    full = train(tmp_path / "full", char_data_root, "--dtype=float16", "--lr_decay_iters=20")
    train(tmp_path / "part", char_data_root, "--dtype=float16", "--lr_decay_iters=20", "--max_iters=10")
    ckpt = torch.load(tmp_path / "part" / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["scaler"]["scale"] > 0 and ckpt["scaler"]["_growth_tracker"] >= 1
    part = train(tmp_path / "part", char_data_root, "--dtype=float16", "--lr_decay_iters=20")
    a, b = losses(part), losses(full)
    assert [r[:2] for r in a] == [r[:2] for r in b]
    assert max(abs(x[2] - y[2]) for x, y in zip(a, b)) < 0.05


def test_bf16_fsdp_with_accumulation_trains_on_nccl(tmp_path, char_data_root):
    launch = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "nanorepro")
    records = train(tmp_path, char_data_root, "--parallel=fsdp", "--dtype=bfloat16", "--gradient_accumulation_steps=4",
                    launch=launch)
    evals = [r["val_loss"] for r in records if r["kind"] == "eval"]
    assert metrics.meta(records)["dtype"] == "bfloat16" and evals[-1] < evals[0]


def test_sampling_on_a_gpu_runs_under_autocast_and_only_real_tokens(tmp_path, char_data_root, monkeypatch):
    from nanorepro.gpt import hardware
    from nanorepro.gpt.sample import sample

    train(tmp_path, char_data_root, "--vocab_size=128")  # padded past the 65 characters
    seen = []
    forward = GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, *a: (seen.append(torch.get_autocast_dtype("cuda")
                                                                      if torch.is_autocast_enabled("cuda") else None),
                                                          forward(self, *a))[1])
    text = sample(run_dir=tmp_path / "run", prompt="ROMEO:", max_new_tokens=50, top_k=None, device="cuda",
                  data_root=str(char_data_root))
    assert len(text[0]) == len("ROMEO:") + 50
    assert set(seen) == {hardware.DTYPES[hardware.resolve_dtype("cuda", "auto")]}
