"""Device choice: no silent CPU fallback for GPU presets or on a Chameleon node; --device=cpu still runs there."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from nanorepro import config
from nanorepro.errors import UserError
from nanorepro.gpt import hardware


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(config.ON_GPU_NODE, raising=False)


def test_gpu_presets_and_gpu_nodes_require_a_gpu(no_gpu, monkeypatch):
    for preset in ("shakespeare-char", "shakespeare-char-gpu-fast", "finetune-shakespeare", "train-gpt2",
                   "eval-gpt2", "eval-gpt2-xl"):
        assert f"preset {preset} is made for GPUs" in hardware.gpu_required_by(preset)
    for preset in ("shakespeare-char-cpu", "shakespeare-char-cpu-quick", "finetune-shakespeare-cpu", "tiny", None):
        assert hardware.gpu_required_by(preset) is None
    monkeypatch.setenv(config.ON_GPU_NODE, "1")
    assert "Chameleon GPU node" in hardware.gpu_required_by("tiny")


def test_auto_never_falls_back_to_the_cpu_when_a_gpu_is_required(no_gpu):
    assert hardware.pick_device("auto") == ("cpu", "float32")  # the local CPU flow, unchanged
    with pytest.raises(UserError) as e:
        hardware.pick_device("auto", gpu_required=hardware.gpu_required_by("shakespeare-char"))
    assert "no CUDA GPU is visible to torch" in e.value.problem and "preset shakespeare-char" in e.value.problem
    assert "--device=cpu" in e.value.fix
    assert hardware.pick_device("cpu", gpu_required="x")[0] == "cpu"  # asked for explicitly


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanorepro", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **env})


@pytest.mark.slow
def test_a_gpu_preset_on_a_cpu_refuses_in_one_line_unless_the_cpu_is_asked_for(char_data_root, tmp_path):
    small = [f"--data_root={char_data_root}", "--max_iters=1", "--eval_interval=1", "--eval_iters=1", "--n_layer=1",
             "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2", "--compile=false"]
    r = cli("train", "--preset", "shakespeare-char", "--out-dir", str(tmp_path / "gpu"), *small)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "preset shakespeare-char is made for GPUs" in r.stderr and "--device=cpu" in r.stderr
    assert not (tmp_path / "gpu" / "metrics.jsonl").exists()
    r = cli("train", "--preset", "shakespeare-char", "--out-dir", str(tmp_path / "cpu"), *small, "--device=cpu")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cpu" / "metrics.jsonl").is_file()
    r = cli("sample", "--model", "gpt2", **{config.ON_GPU_NODE: "1"})  # any stage on a node
    assert r.returncode == 2 and "runs on a Chameleon GPU node" in r.stderr


FAULTS_PER_STEP = """
import resource, sys, torch
from nanorepro.gpt import hardware
if sys.argv[1] == "returned":  # glibc's documented default threshold, held fixed: every freed block goes back
    import ctypes
    assert ctypes.CDLL(None).mallopt(-3, 128 << 10) == 1  # M_MMAP_THRESHOLD (1: done)
    kept = False
else:
    kept = hardware.keep_freed_memory()
def step():  # activation-sized blocks (4-8 MiB) allocated, written and freed in turn, as a step does
    xs = [torch.empty(n).fill_(1.0) for n in (2 << 20, 1 << 20, 2 << 20)]
    y = xs[0] * 2
    z = y.square()
    del xs
    w = z + 1
for _ in range(10):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_activations_are_reused_without_faulting_their_pages_in_again():
    """Where glibc hands freed blocks back to the kernel, the next step faults their pages in again (thousands
    of 4 KiB pages a step here); with keep_freed_memory the blocks are reused and their pages stay. glibc's
    own behaviour lies in between and varies from run to run (its mmap threshold moves with what was freed:
    0, 600 or 7,000 faults a step measured on one machine), so the comparison holds glibc's documented
    default threshold fixed."""
    def faults(mode: str) -> tuple[str, float]:
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True, text=True, check=True)
        kept, per_step = out.stdout.split()
        return kept, float(per_step)

    returned, kept = faults("returned"), faults("keep")
    assert kept[0] == "True" and returned[0] == "False"
    assert returned[1] > 1000  # the measurement sees the faults: 7,137 measured
    assert kept[1] < 30  # 0 measured


# torch.cpu.get_capabilities() of the three CPU kinds the team's machines have been, cut to what matters
ZEN4 = {"architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bw": True, "avx512_bf16": True,
        "amx_bf16": False, "avx10_1": False}
XEON_NO_BF16 = {"architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bw": True,
                "avx512_bf16": False, "amx_bf16": False, "avx10_1": False}
AVX2_ONLY = {"architecture": "x86_64", "avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}


@pytest.mark.parametrize("caps, onednn, native", [
    (ZEN4, True, True),
    (XEON_NO_BF16, True, False),  # oneDNN says "supported" and emulates: ~9x slower than float32
    (AVX2_ONLY, False, False),
    ({**XEON_NO_BF16, "amx_bf16": True}, True, True),
    ({"architecture": "arm64", "neon": True, "bf16": True}, True, True),
    ({"architecture": "arm64", "neon": True, "bf16": False}, True, False),
    (ZEN4, False, False),  # no oneDNN kernels, whatever the flags
])
def test_native_bf16_needs_the_cpus_own_bf16_flag_as_well_as_onednns_word(caps, onednn, native):
    assert hardware.native_bf16_from(caps, onednn) is native


def test_the_bf16_flags_are_names_torch_reports():
    caps = torch.cpu.get_capabilities()
    arm = {"bf16", "sve_bf16"}
    names = {"x86_64": {"avx512_bf16", "avx10_1", "amx_bf16"}, "arm64": arm, "aarch64": arm}
    expected = names.get(caps["architecture"], set())
    assert expected <= set(caps) and expected <= set(hardware.BF16_FLAGS)
    if not any(caps.get(flag) is True for flag in hardware.BF16_FLAGS):
        assert not hardware.cpu_has_native_bf16()
