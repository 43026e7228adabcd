"""The GPU path on a CPU: the real entry points driven under a torch.cuda stand-in as strict as torch
2.13.0 (tests/cuda_standin.py), each as far as a CPU-only torch can go, i.e. to the first tensor sent
to CUDA (ReachedCuda); and every CUDA call in nanorepro/ and benchmarks/ covered by that stand-in."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from cuda_standin import COVERED, Gpu, ReachedCuda, strict_cuda  # noqa: F401 (strict_cuda: a fixture)

from nanorepro import envinfo
from nanorepro.config import GPTConfig, resolve
from nanorepro.errors import UserError, WontFit
from nanorepro.gpt import bench, checkpoint, gpucheck, hardware
from nanorepro.gpt.distributed import World
from nanorepro.gpt.train import cuda_free_bytes, train

REPO = Path(__file__).resolve().parent.parent
T4 = Gpu(name="Tesla T4", capability=(7, 5), total_memory=15 * 2**30, free_memory=14 * 2**30)


def tiny(root: Path, out: Path, **kw):
    return resolve("tiny", {"data_root": str(root), "out_dir": str(out), **kw})


# ---------------------------------------------------------------------------------------------
# The stand-in refuses what torch refuses


def test_the_stand_in_refuses_what_torch_refuses(strict_cuda):
    cuda = strict_cuda(n=2)
    with pytest.raises(ValueError, match="Expected a torch.device with a specified index"):
        torch.cuda.set_device(torch.device("cuda"))  # torch 2.13.0's own words
    with pytest.raises(ValueError, match="Expected a torch.device with a specified index"):
        torch.cuda.set_device("cuda")
    with pytest.raises(ValueError, match="Expected a cuda device, but got: cpu"):
        torch.cuda.set_device("cpu")
    with pytest.raises(RuntimeError, match="did you call init"):
        torch.cuda.reset_peak_memory_stats(0)  # the allocator has no device before CUDA is initialised
    assert torch.cuda.memory_allocated(0) == 0 and not torch.cuda.is_initialized()  # memory_stats: {} before init
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        torch.cuda.set_device(2)
    with pytest.raises(AssertionError, match="Invalid device id"):
        torch.cuda.get_device_capability("cuda:2")
    with pytest.raises(ReachedCuda):
        torch.zeros(1).to("cuda:0")
    torch.cuda.set_device(1)
    assert torch.cuda.current_device() == 1 and torch.cuda.get_device_capability("cuda") == (8, 0)
    assert cuda.calls[-1] == ("get_device_properties", "cuda:1")  # plain "cuda" is the current device


# ---------------------------------------------------------------------------------------------
# The entry points, up to the first tensor on a GPU


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_a_single_gpu_run_gets_as_far_as_moving_the_model_to_gpu_0(char_data_root, tmp_path, strict_cuda, device):
    """The crash every single-GPU run had: use_device("cuda") -> set_device(torch.device("cuda")), which
    torch refuses. Now the device is indexed first, and the run reaches model.to(cuda:0)."""
    cuda = strict_cuda(n=1)
    with pytest.raises(ReachedCuda):
        train(tiny(char_data_root, tmp_path / "r", device=device))
    assert cuda.calls[:3] == [("set_device", "cuda:0"), ("reset_peak_memory_stats", "cuda:0"),
                              ("get_device_properties", "cuda:0")]  # current, peak reset, then the dtype
    assert ("mem_get_info", "cuda:0") in cuda.calls  # the memory fit check ran against GPU 0
    assert {d for _, d in cuda.calls} == {"cuda:0"}


@pytest.mark.parametrize("gpu, dtype", [(T4, "float16"), (Gpu(), "bfloat16")])
def test_cuda_n_is_made_current_first_and_gives_the_dtype(char_data_root, tmp_path, strict_cuda, gpu, dtype, capsys):
    """--device=cuda:1: GPU 1 current before anything touches CUDA (else pinned memory and a context land
    on GPU 0), its peak count reset (each of --seeds' runs), the dtype from GPU 1's own capability."""
    cuda = strict_cuda(n=2, gpu=gpu)
    with pytest.raises(ReachedCuda):
        train(tiny(char_data_root, tmp_path / "r", device="cuda:1"))
    assert cuda.calls[:2] == [("set_device", "cuda:1"), ("reset_peak_memory_stats", "cuda:1")]
    assert {d for _, d in cuda.calls} == {"cuda:1"} and cuda.current == 1
    assert f"cuda:1 ({gpu.name})" in capsys.readouterr().out  # the memory line names the GPU it checked
    assert hardware.resolve_dtype("cuda:1", "auto") == dtype


def test_a_gpu_that_is_not_there_is_refused_before_cuda_is_touched(char_data_root, tmp_path, strict_cuda):
    cuda = strict_cuda(n=1)
    with pytest.raises(UserError, match=r"device=cuda:1 does not exist: 1 GPU\(s\) visible"):
        train(tiny(char_data_root, tmp_path / "r", device="cuda:1"))
    assert cuda.calls == [] and not cuda.initialized


def test_a_torchrun_rank_takes_its_local_gpu_before_joining(char_data_root, tmp_path, strict_cuda, monkeypatch):
    """Rank 1 of 2 sets GPU 1 before the NCCL group exists, and never names GPU 0."""
    import torch.distributed as dist

    cuda = strict_cuda(n=2)
    joined = []
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: joined.append((backend, kw.get("device_id"), list(cuda.calls))))
    monkeypatch.setattr(dist, "new_group", lambda **kw: None)
    for k, v in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    cfg = tiny(char_data_root, tmp_path / "r", device="auto", parallel="ddp", gradient_accumulation_steps=2)
    with pytest.raises(ReachedCuda):  # the first collective's tensor goes to cuda:1
        train(cfg)
    assert joined == [("nccl", torch.device("cuda:1"), [("set_device", "cuda:1")])]
    assert {d for _, d in cuda.calls} == {"cuda:1"}, cuda.calls
    with pytest.raises(UserError, match="pins every rank to one GPU"):
        train(tiny(char_data_root, tmp_path / "r", device="cuda:0", parallel="ddp", gradient_accumulation_steps=2))


def test_sampling_on_a_gpu_gets_as_far_as_moving_the_model(char_data_root, tmp_path, strict_cuda):
    from nanorepro.gpt.sample import sample

    train(tiny(char_data_root, tmp_path / "r", max_iters=2, eval_interval=2, device="cpu"))
    cuda = strict_cuda(n=1)
    for device in ("auto", "cuda"):
        with pytest.raises(ReachedCuda):
            sample(run_dir=tmp_path / "r", device=device, max_new_tokens=5, data_root=str(char_data_root))
    assert cuda.calls[:3] == [("set_device", "cuda:0"), ("reset_peak_memory_stats", "cuda:0"),
                              ("get_device_properties", "cuda:0")]


@pytest.mark.slow
def test_bench_resolves_the_gpu_and_launches_its_run_on_it(char_data_root, tmp_path, strict_cuda):
    """bench's own process picks cuda:0 and its dtype, then starts `nanorepro train --device=cuda` (a
    real child, which sees no GPU here: its refusal is the proof it was launched on the GPU path)."""
    cuda = strict_cuda(n=1)
    with pytest.raises(UserError, match="no CUDA GPU is visible"):
        bench.bench("tiny", {"data_root": str(char_data_root), "device": "cuda"}, iters=2, warmup=1,
                    out=tmp_path / "b.json")
    assert cuda.calls == [("get_device_properties", "cuda:0")] and not (tmp_path / "b.json").exists()
    peak, source = hardware.peak_flops("cuda:0", "bfloat16")
    assert peak == 312e12 and source.startswith("NVIDIA A100-SXM4-80GB")
    assert bench._host("cuda:0") == "NVIDIA A100-SXM4-80GB"


def test_the_fit_check_refuses_a_run_the_gpu_cannot_hold(strict_cuda, tmp_path):
    """gpt2-xl's fine-tune on a 15 GiB T4: WontFit before any weight is loaded, naming the GPU."""
    from nanorepro.gpt import train as train_mod

    strict_cuda(n=1, gpu=T4)
    hardware.use_device("cuda:0")
    cfg = resolve("finetune-shakespeare", {"out_dir": str(tmp_path / "ft"), "init_from": "scratch"})
    shape = GPTConfig(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50257, bias=True)
    (tmp_path / "ft").mkdir()  # train's setup makes the run folder first
    with pytest.raises(WontFit, match=r"cuda:0 \(Tesla T4\)"):
        train_mod._check_memory(cfg, shape, None, "cuda:0", "float16", World())
    assert "does not fit" in (tmp_path / "ft" / "metrics.jsonl").read_text()  # why the run has no losses


def test_the_fit_check_counts_what_the_caching_allocator_holds_free(strict_cuda):
    """Blocks an earlier run (--seeds) left in PyTorch's cache are this process's to reuse."""
    GiB = 2**30
    cuda = strict_cuda(n=1, gpu=Gpu(free_memory=2 * GiB))
    hardware.use_device("cuda:0")
    cuda.reserved[0], cuda.allocated[0] = 30 * GiB, 1 * GiB
    assert cuda_free_bytes("cuda:0") == 31 * GiB


def test_a_checkpoint_saves_and_restores_the_rng_of_the_run_s_own_gpu(strict_cuda, tmp_path):
    from nanorepro.gpt.model import GPT

    cuda = strict_cuda(n=2)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=8))
    opt = torch.optim.AdamW(model.parameters())
    meta = {"encoding": "char", "vocab_size": 8, "itos": {str(i): chr(97 + i) for i in range(8)}}
    checkpoint.save_training(tmp_path / "ckpt.pt", model, opt, World(), iter_num=1, best_val_loss=1.0, elapsed_s=0,
                             batch_gen=torch.Generator(), device="cuda:1", meta=meta)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    checkpoint.restore_training(ckpt, model, opt, World(), torch.Generator(), "cuda:1")
    assert cuda.calls == [("get_rng_state", "cuda:1"), ("set_rng_state", "cuda:1")]


def test_gpucheck_and_envinfo_describe_every_gpu(strict_cuda):
    strict_cuda(n=2, gpu=T4)
    out = gpucheck.report()
    assert [d["name"] for d in out["devices"]] == ["Tesla T4", "Tesla T4"]
    assert all(not d["bf16_matmul"] and d["error"].startswith("ReachedCuda") for d in out["devices"])
    info = envinfo.torch_info()
    assert info["devices"] == [{"name": "Tesla T4", "memory_total_mib": 15 * 1024, "capability": "7.5"}] * 2


# ---------------------------------------------------------------------------------------------
# No CUDA call left unchecked


def _cuda_calls(path: Path) -> list[tuple[str, int]]:
    """(dotted name, line) of every call of torch.cuda.* or torch.backends.cuda* in a Python file; an
    import that names torch.cuda another way (from torch import cuda, import torch.cuda as c) fails."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("torch.cuda", "torch.backends")):
            pytest.fail(f"{path}:{node.lineno}: call torch.cuda through `torch.` so this test sees it")
        if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(
                a.name in ("cuda", "backends") for a in node.names):
            pytest.fail(f"{path}:{node.lineno}: call torch.cuda through `torch.` so this test sees it")
        if isinstance(node, ast.Import) and any(a.name.startswith("torch.cuda") and a.asname for a in node.names):
            pytest.fail(f"{path}:{node.lineno}: call torch.cuda through `torch.` so this test sees it")
        if isinstance(node, ast.Call):
            parts, f = [], node.func
            while isinstance(f, ast.Attribute):
                parts.append(f.attr)
                f = f.value
            if isinstance(f, ast.Name) and f.id == "torch":
                name = ".".join(["torch", *reversed(parts)])
                if name.startswith("torch.cuda.") or name.startswith("torch.backends.cud"):
                    found.append((name, node.lineno))
    return sorted(found, key=lambda f: f[1])


def test_every_cuda_call_in_the_package_and_benchmarks_is_covered_by_the_strict_stand_in():
    files = sorted((REPO / "nanorepro").rglob("*.py")) + sorted((REPO / "benchmarks").rglob("*.py"))
    sites = [(str(p.relative_to(REPO)), line, name) for p in files for name, line in _cuda_calls(p)]
    print("\n".join(f"{f}:{line}: {name}" for f, line, name in sites))
    uncovered = [s for s in sites if s[2] not in COVERED]
    assert not uncovered, f"CUDA calls the strict stand-in does not fake (add them to tests/cuda_standin.py): {uncovered}"
    # the walk finds what it must: the calls the GPU path is made of
    names = {name for _, _, name in sites}
    assert {"torch.cuda.set_device", "torch.cuda.reset_peak_memory_stats", "torch.cuda.mem_get_info",
            "torch.cuda.get_rng_state", "torch.cuda.get_device_name"} <= names


def test_the_walk_sees_calls_however_they_are_nested(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import torch\nx = f(torch.cuda.mem_get_info(0))\ntorch.backends.cuda.enable_flash_sdp(True)\n"
                   "torch.backends.cuda.matmul.allow_tf32 = True\n")
    assert _cuda_calls(src) == [("torch.cuda.mem_get_info", 2), ("torch.backends.cuda.enable_flash_sdp", 3)]
    src.write_text("from torch import cuda\ncuda.set_device(0)\n")
    with pytest.raises(pytest.fail.Exception, match="through `torch.`"):
        _cuda_calls(src)
