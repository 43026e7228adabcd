"""Training-memory estimates: exact parameter counts, the 16 bytes/param of fp32 AdamW training
(gpt2-xl: 24.9 GB), activations against what autograd really keeps for two tiny local GPT-2s,
refusals that name the largest setting that fits, and the time estimate."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import subprocess
import sys

import pytest
import torch

from nanorepro import memory, metrics
from nanorepro.config import GPTConfig, resolve
from nanorepro.data import dataset
from nanorepro.gpt.model import GPT
from nanorepro.gpt.pretrained import load_pretrained
from nanorepro.gpt.train import train

GIB = 2**30


@pytest.fixture(scope="module")
def wider_gpt2(tmp_path_factory):
    """A second local GPT-2, wider and deeper than conftest's tiny_gpt2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wider-gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=4, n_embd=96, n_positions=128, vocab_size=50257)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("shape", [(2, 2, 32, 64, 65, False), (3, 4, 96, 128, 50257, True), (12, 12, 768, 1024, 50257, True),
                                   (48, 25, 1600, 1024, 50257, True)])
def test_parameter_count_is_the_models(shape):
    with torch.device("meta"):  # gpt2-xl's shape without its memory
        model = GPT(GPTConfig(*shape))
    assert GPTConfig(*shape).n_params == sum(p.numel() for p in model.parameters())


def test_gpt2_xl_fp32_adamw_needs_16_bytes_per_parameter():
    shape = resolve("finetune-shakespeare").model_config()
    assert shape.n_params == 1_557_611_200
    est = memory.estimate(shape, batch_size=1, dtype="float32")
    states = est.parts["weights"] + est.parts["gradients"] + est.parts["adamw_state"]
    assert states == 16 * 1_557_611_200 and round(states / 1e9, 1) == 24.9
    # no biases (nanoGPT's bias=False), the vocabulary padded to 50304 as nanoGPT's (124,337,664 with 50257)
    assert resolve("train-gpt2").model_config(50257).n_params == 124_337_664 + 47 * 768


def saved_bytes(model: torch.nn.Module, x: torch.Tensor, dtype: str) -> int:
    """Bytes autograd keeps for backward after a forward (weights themselves excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    cast = contextlib.nullcontext() if dtype == "float32" else torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
        model(x, x)
    return sum(kept.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activation_estimate_matches_what_autograd_keeps(tiny_gpt2, wider_gpt2, dtype):
    measured_ratio = []
    for folder in (tiny_gpt2, wider_gpt2):
        cfg = resolve("finetune-shakespeare-cpu", {"init_from": str(folder), "block_size": 128})
        shape = cfg.model_config()
        model, _ = load_pretrained(str(folder))
        assert shape.n_params == sum(p.numel() for p in model.parameters())
        B = 2
        est = memory.estimate(shape, B, dtype)
        # kept for backward: activations, half-precision weight copies, and the head's log-softmax
        predicted = est.parts["activations"] + est.parts.get("half_weight_copies", 0) + \
            B * shape.block_size * ((4 + (4 if dtype == "float32" else 2)) * shape.n_embd + 4 * shape.vocab_size)
        measured = saved_bytes(model, torch.randint(50257, (B, shape.block_size)), dtype)
        measured_ratio.append(measured / predicted)
    assert all(0.9 < r <= 1.05 for r in measured_ratio), measured_ratio  # within 10%, erring high


def test_refusal_names_the_largest_setting_that_fits(wider_gpt2):
    cfg = resolve("finetune-shakespeare-cpu", {"init_from": str(wider_gpt2), "block_size": 128, "batch_size": 16,
                                               "gradient_accumulation_steps": 2})
    shape = cfg.model_config()
    full = memory.estimate_for(cfg, shape, "float32")
    cap = full.total + memory.OVERHEAD_BYTES - full.parts["logits"] // 2  # a bit too small for batch 16
    with pytest.raises(memory.WontFit) as e:
        memory.check(cfg, shape, "float32", cap, "the test device")
    assert e.value.exit_code == 4
    fix = e.value.fix
    b = int(fix.split("--batch_size=")[1].split()[0])
    gas = int(fix.split("--gradient_accumulation_steps=")[1].split()[0])
    assert b * gas == 16 * 2 and b < 16  # same tokens per step
    fits = lambda batch, **kw: memory.estimate(shape, batch, "float32", **kw).total + memory.OVERHEAD_BYTES <= cap
    assert fits(b) and not any(fits(bigger) for bigger in range(b + 1, 17) if 32 % bigger == 0)  # the largest
    # too small for batch 1: activation checkpointing, then FSDP over the node's GPUs, then how many it needs
    one = memory.estimate(shape, 1, "float32")
    cap = one.total + memory.OVERHEAD_BYTES - one.parts["activations"] // 2
    with pytest.raises(memory.WontFit, match="--activation_checkpointing=true --batch_size="):
        memory.check(cfg, shape, "float32", cap, "the test device")
    assert memory.check(cfg, shape, "float32", 100 * GIB, "the test device").total == full.total


def test_fsdp_is_suggested_when_the_states_alone_do_not_fit():
    # 8 wide blocks and a 65-character vocabulary: the blocks hold nearly all parameters, so sharding helps
    cfg = resolve("tiny", {"n_layer": 8, "n_head": 4, "n_embd": 256, "block_size": 64, "vocab_size": 65})
    shape = cfg.model_config()
    cap = memory.OVERHEAD_BYTES + 12 * shape.n_params  # less than the 16 bytes/param of one process
    with pytest.raises(memory.WontFit, match=r"torchrun --nproc_per_node=4 \.\.\. with --parallel=fsdp --batch_size=1 "
                                           r"--gradient_accumulation_steps=4 \(same tokens per step"):
        memory.check(cfg, shape, "float32", cap, "the test device", gpus_on_node=4)
    with pytest.raises(memory.WontFit, match="over at least 2 devices like this one"):
        memory.check(cfg, shape, "float32", cap, "the test device", gpus_on_node=1)
    sharded = memory.estimate(shape, 4, "float32", "fsdp", 4)
    assert sharded.parts["adamw_state"] == 8 * shape.n_params // 4 and sharded.total < cap - memory.OVERHEAD_BYTES


def test_train_refuses_before_loading_the_model(gpt2_data_root, wider_gpt2, tmp_path, monkeypatch):
    import nanorepro.gpt.train as train_module

    def never(*args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train_module, "_build_model", never)
    monkeypatch.setenv(memory.LIMIT_ENV, "0.1")
    cfg = resolve("finetune-shakespeare-cpu", {"init_from": str(wider_gpt2), "data_root": str(gpt2_data_root),
                                               "out_dir": str(tmp_path / "ft")})
    with pytest.raises(memory.WontFit, match="wider-gpt2.* needs ~.* RAM has 102.4 MiB"):
        train(cfg)
    stage = metrics.of_kind(metrics.read(tmp_path / "ft" / "metrics.jsonl"), "stage")
    assert stage[-1]["status"] == "not run" and "does not fit" in stage[-1]["reason"]


def test_time_estimate_for_nanogpts_gpt2_run_is_about_four_days():
    cfg = resolve("train-gpt2")
    secs = memory.estimate_seconds(cfg, cfg.model_config(50257), "NVIDIA A100-SXM4-40GB", 8, "bfloat16")
    assert 3.5 < secs / 86400 < 4.5  # nanoGPT: "about 4 days" on 8x A100 40GB
    assert memory.estimate_seconds(cfg, cfg.model_config(50257), "Some CPU", 1, "float32") is None
    assert memory.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12


@pytest.mark.slow  # by measurement: a nanorepro process of its own: ~3 s
def test_estimate_command_is_torch_free(tmp_path):
    code = ("import sys; from nanorepro.cli import main; "
            "rc = main(['estimate', '--preset', 'finetune-shakespeare', '--gpu', 'A100', '--gpu-memory-gib', '40']); "
            "assert 'torch' not in sys.modules; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1555.97M parameters" in r.stdout and "fits in 40 GiB" in r.stdout and "time: ~" in r.stdout
    r = subprocess.run([sys.executable, "-m", "nanorepro", "estimate", "--preset", "finetune-shakespeare",
                        "--batch_size=8", "--gradient_accumulation_steps=4", "--gpu-memory-gib", "40"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 4 and "--batch_size=2 --gradient_accumulation_steps=16" in r.stderr


@pytest.mark.slow  # by measurement: a nanorepro process per case: ~3 s each
@pytest.mark.parametrize("gpu, dtype", [(None, "bfloat16"), ("A100", "bfloat16"), ("H100", "bfloat16"),
                                        ("Tesla T4", "float16"), ("V100", "float16")])
def test_the_baby_gpt_is_estimated_with_its_own_vocabulary_before_anything_is_prepared(tmp_path, gpu, dtype):
    """On a fresh clone (no data/): the 65-character vocabulary its dataset implies, nanoGPT's 10.65M
    parameters, and the precision of the GPU it runs on (bf16 on an A100, fp16 where bf16 is emulated),
    not GPT-2's vocabulary in float32 (30.0M parameters and 9.25 GiB of logits)."""
    r = subprocess.run([sys.executable, "-m", "nanorepro", "estimate", "--preset", "shakespeare-char",
                        *(["--gpu", gpu] if gpu else [])], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "vocabulary 65 " in r.stdout and "10.65M parameters" in r.stdout, r.stdout
    assert f"64 x 256 tokens per micro-batch, {dtype})" in r.stdout
    logits = float(re.search(r"logits ([0-9.]+) GiB", r.stdout).group(1))
    assert logits < 0.1 and not (tmp_path / "data").exists()
    cpu = subprocess.run([sys.executable, "-m", "nanorepro", "estimate", "--preset", "shakespeare-char-cpu"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert "float32)" in cpu.stdout and "vocabulary 65 " in cpu.stdout


def test_a_prepared_dataset_s_vocabulary_is_what_it_was_prepared_with(char_data_root, gpt2_data_root):
    for root, name in ((char_data_root, "shakespeare_char"), (gpt2_data_root, "shakespeare_gpt2")):
        vocab, source = dataset.vocab_size_of(root, name)
        assert vocab == dataset.DATASET_VOCAB[name] and source.startswith("prepared in")
    assert dataset.vocab_size_of("/nonexistent", "mytext_char")[0] == dataset.GPT2_VOCAB_SIZE


def test_fsdp_ranks_with_several_micro_steps_hold_whole_gradients():
    """Reduce-scattered once a step (distributed.sync_gradients), a rank's micro-steps before the last
    accumulate unsharded fp32 gradients: 4 B/param, not 4/W."""
    cfg = resolve("tiny", {"n_layer": 8, "n_head": 4, "n_embd": 256, "block_size": 64, "vocab_size": 65,
                           "parallel": "fsdp", "gradient_accumulation_steps": 8})
    shape = cfg.model_config()
    once = memory.estimate_for(dataclasses.replace(cfg, gradient_accumulation_steps=4), shape, "bfloat16", 4)
    several = memory.estimate_for(cfg, shape, "bfloat16", 4)  # 2 micro-steps per rank
    assert several.parts["gradients"] == 4 * shape.n_params > once.parts["gradients"]
    assert {k: v for k, v in several.parts.items() if k != "gradients"} == \
        {k: v for k, v in once.parts.items() if k != "gradients"}
