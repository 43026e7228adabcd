"""DDP and FSDP2 through torchrun on the CPU (2 processes, gloo, one thread each): the same losses as
one process with the same global batch, full single-file checkpoints that a single process resumes
and samples from, exact resume, refusals and clean shutdown (exit 0, nothing aborted, no hang).

Why the losses can match: every rank walks the same batch stream and takes its share of each
iteration's micro-batches, so 2 ranks x 1 micro-step see exactly the samples 1 process x 2 micro-steps
sees (were the ranks' batches not different, the losses would differ). What still differs is the
order of float32 sums (all-reduce, reduce-scatter): TOL bounds the effect over 20 AdamW steps;
the measured differences are ~1e-6.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanorepro import metrics
from nanorepro.cloud.remote import stage_argv
from nanorepro.config import resolve
from nanorepro.errors import UserError
from nanorepro.gpt.model import GPT
from nanorepro.gpt.sample import sample
from nanorepro.gpt.train import train

TOL = 1e-4  # absolute, on every logged train and eval loss
TIMEOUT_S = 180  # a hung process group fails the test instead of the suite
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(var, None)
# 20 iterations, evaluations at 0/5/10/15/20 over an odd number of batches (uneven over 2 ranks)
ARGS = ["--preset", "tiny", "--lr_decay_iters=20", "--eval_interval=5", "--eval_iters=3",
        "--gradient_accumulation_steps=2"]
BAD_OUTPUT = ("Traceback", "terminate called", "Abort", "abort", "Segmentation", "destroy_process_group() was not")


def nanorepro(out: Path, data_root: Path, *extra: str, nproc: int = 0, max_iters: int = 20,
              timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """`nanorepro train` in one process (nproc=0) or under torchrun with nproc processes."""
    launch = [sys.executable, "-m", "nanorepro"] if not nproc else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "nanorepro"]
    cmd = [*launch, "train", *ARGS, f"--data_root={data_root}", f"--max_iters={max_iters}", "--out-dir", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stderr[-3000:]
    assert not [b for b in BAD_OUTPUT if b in r.stderr], r.stderr[-3000:]
    return r


def losses(run: Path) -> list[tuple]:
    out = []
    for r in metrics.read(run / metrics.METRICS_FILE):
        if r["kind"] == "train":
            out.append(("train", r["iter"], r["loss"]))
        elif r["kind"] == "eval":
            out.append(("eval", r["iter"], r["train_loss"], r["val_loss"]))
    return out


def assert_close(a: list[tuple], b: list[tuple], tol: float = TOL) -> float:
    """Same records at the same iterations, losses within tol; returns the largest difference."""
    assert [r[:2] for r in a] == [r[:2] for r in b]
    worst = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra[2:], rb[2:]))
    assert worst <= tol, f"losses differ by {worst:.3g} > {tol}"
    return worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory, char_data_root):
    """One process (global batch 2 micro-steps), DDP and FSDP over 2 ranks, each 20 iterations; and
    DDP and FSDP runs stopped at 10 and resumed to 20 (the checkpoint at 10 kept aside)."""
    base = tmp_path_factory.mktemp("dist")
    started = time.time()
    ok(nanorepro(base / "single", char_data_root))
    for mode in ("ddp", "fsdp"):
        ok(nanorepro(base / mode, char_data_root, f"--parallel={mode}", nproc=2))
        ok(nanorepro(base / f"{mode}-resumed", char_data_root, f"--parallel={mode}", nproc=2, max_iters=10))
        shutil.copytree(base / f"{mode}-resumed", base / f"{mode}-at-10")
        r = ok(nanorepro(base / f"{mode}-resumed", char_data_root, f"--parallel={mode}", nproc=2))
        assert "resuming" in r.stdout and "from iter 10" in r.stdout
    print(f"distributed runs: {time.time() - started:.1f} s")
    return base


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_log_the_losses_of_one_process_with_the_same_global_batch(runs, mode):
    worst = assert_close(losses(runs / mode), losses(runs / "single"))
    print(f"{mode}: largest loss difference vs one process {worst:.2e}")
    records = metrics.read(runs / mode / metrics.METRICS_FILE)
    assert [r["iter"] for r in metrics.of_kind(records, "train")] == list(range(1, 21))  # rank 0 alone logs
    assert [r["iter"] for r in metrics.of_kind(records, "eval")] == [0, 5, 10, 15, 20]
    meta = metrics.meta(records)
    assert meta["world_size"] == 2 and meta["config"]["parallel"] == mode
    assert meta["tokens_per_iter"] == 2 * 4 * 32  # global: both ranks' micro-batches
    assert records[-1]["status"] == "finished" and len(metrics.of_kind(records, "end")) == 1
    assert sorted(p.name for p in (runs / mode).iterdir()) == ["ckpt.pt", "config.json", "env.json", "metrics.jsonl"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resume_under_torchrun_is_exact(runs, mode):
    assert losses(runs / f"{mode}-resumed") == losses(runs / mode)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_checkpoint_is_one_full_state_dict_a_single_process_loads(runs, mode, char_data_root):
    ckpt = torch.load(runs / mode / "ckpt.pt", weights_only=True)
    single = torch.load(runs / "single" / "ckpt.pt", weights_only=True)
    model = GPT(resolve("tiny").model_config(vocab_size=65))
    assert {k: v.shape for k, v in ckpt["model"].items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert all(type(v) is torch.Tensor for v in ckpt["model"].values())  # plain tensors, not shards
    model.load_state_dict(ckpt["model"])
    # the optimizer state has the single-process layout: same parameter numbering and shapes
    assert ckpt["optimizer"]["param_groups"] == single["optimizer"]["param_groups"]
    assert {i: {k: v.shape for k, v in s.items()} for i, s in ckpt["optimizer"]["state"].items()} == \
        {i: {k: v.shape for k, v in s.items()} for i, s in single["optimizer"]["state"].items()}
    for a, b in zip(ckpt["model"].values(), single["model"].values()):
        assert torch.allclose(a, b, atol=1e-4)
    text = sample(run_dir=runs / mode, prompt="ROMEO:", max_new_tokens=20, seed=1, data_root=str(char_data_root))
    assert text[0].startswith("ROMEO:") and len(text[0]) == len("ROMEO:") + 20


def test_a_single_process_resumes_an_fsdp_checkpoint(runs, char_data_root):
    """The FSDP run's checkpoint at 10 (model, AdamW moments, batch stream) continued by one process."""
    r = ok(nanorepro(runs / "fsdp-at-10", char_data_root))
    assert "from iter 10" in r.stdout
    assert_close(losses(runs / "fsdp-at-10"), losses(runs / "single"))


@pytest.mark.slow
def test_sigterm_stops_every_rank_at_one_iteration_with_a_checkpoint(tmp_path, char_data_root):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanorepro",
           "train", *ARGS, f"--data_root={char_data_root}", "--max_iters=150", "--lr_decay_iters=150",
           "--eval_interval=50", "--eval_iters=1", "--parallel=ddp", "--out-dir", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and not (
            (run / "metrics.jsonl").exists() and metrics.of_kind(metrics.read(run / "metrics.jsonl"), "train")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode != 0
    assert "checkpoint saved" in err and "terminate called" not in err
    records = metrics.read(run / "metrics.jsonl")
    stopped = [r for r in metrics.of_kind(records, "end") if r["status"] == "interrupted"]
    assert len(stopped) == 1 and 0 < stopped[0]["iter"] < 150  # rank 0 wrote it, once
    assert torch.load(run / "ckpt.pt", weights_only=True)["iter_num"] == stopped[0]["iter"]
    ok(subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=TIMEOUT_S))
    records = metrics.read(run / "metrics.jsonl")
    assert [r["iter"] for r in metrics.of_kind(records, "train")] == list(range(1, 151)) and metrics.finished(records)


@pytest.mark.slow
def test_uneven_gradient_accumulation_and_parallel_none_under_torchrun_are_refused(tmp_path, char_data_root):
    r = nanorepro(tmp_path / "a", char_data_root, "--parallel=ddp", "--gradient_accumulation_steps=3", nproc=2)
    assert r.returncode != 0 and "cannot be split evenly over 2 processes" in r.stderr
    assert "--gradient_accumulation_steps=4" in r.stderr
    assert r.stderr.count("nanorepro: error:") == 2  # one line from each rank (torchrun adds its own report)
    r = nanorepro(tmp_path / "b", char_data_root, nproc=2)
    assert r.returncode != 0 and "parallel=none" in r.stderr and "--parallel=ddp" in r.stderr
    assert not (tmp_path / "a" / "metrics.jsonl").exists() and not (tmp_path / "b" / "metrics.jsonl").exists()


def test_parallel_without_torchrun_says_how_to_launch(char_data_root, tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UserError, match="torchrun --standalone --nproc_per_node"):
        train(resolve("tiny", {"data_root": str(char_data_root), "out_dir": str(tmp_path / "x"), "parallel": "fsdp"}))
    with pytest.raises(UserError, match="unknown parallel='zero'"):
        resolve("tiny", {"parallel": "zero"})


def test_activation_checkpointing_gives_the_same_losses(char_data_root, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, ac in (("plain", False), ("ac", True)):
            train(resolve("tiny", {"data_root": str(char_data_root), "out_dir": str(tmp_path / name), "max_iters": 6,
                                   "eval_interval": 3, "activation_checkpointing": ac}))
    finally:
        torch.set_num_threads(threads)
    assert_close(losses(tmp_path / "ac"), losses(tmp_path / "plain"), tol=1e-5)
    assert json.loads((tmp_path / "ac" / "config.json").read_text())["activation_checkpointing"] is True


def test_the_node_runner_launches_parallel_train_stages_under_torchrun():
    args = ["train", "--config", "runs/owt/config.json"]
    assert stage_argv("../.venv/bin/python", args, "fsdp", gpus=4) == [
        "../.venv/bin/python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
        "-m", "nanorepro", *args]
    assert stage_argv("py", args, "ddp", gpus=0)[4] == "--nproc_per_node=1"  # no GPU: one CPU rank
    for plain in (["train", "--preset", "tiny"], ["prepare", "--encoding", "char"]):
        assert stage_argv("py", plain, gpus=4) == ["py", "-m", "nanorepro", *plain]


# ---------------------------------------------------------------------------------------------
# The GPU path's collectives, counted in this process (one gloo rank: torch.distributed is live)


@pytest.fixture
def one_rank(monkeypatch):
    """This pytest process as rank 0 of a torchrun world of one (train joins and leaves the group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ranks_agree_on_stopping_only_every_log_interval(char_data_root, tmp_path, monkeypatch, one_rank):
    """SIGTERM after step 5 with log_interval=4: a single process stops at once (iter 5); under DDP the
    ranks ask each other only at iterations 0, 4, 8 (nanoGPT's one host sync per log_interval), so the
    run stops at 8, and the loop's all-reduces are just those, the logged losses' and the evaluation's."""
    import torch.distributed as dist

    from nanorepro import faults
    from nanorepro.errors import Interrupted

    reduces = []
    real_reduce = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: (reduces.append(t.dtype), real_reduce(t, *a, **k))[1])
    steps = []
    monkeypatch.setattr(faults, "hit", lambda site, *a: site == "step" and (
        steps.append(1), len(steps) == 5 and signal.raise_signal(signal.SIGTERM)))
    kw = {"data_root": str(char_data_root), "max_iters": 20, "lr_decay_iters": 20, "eval_interval": 100,
          "eval_iters": 1, "log_interval": 4}
    with pytest.raises(Interrupted):
        train(resolve("tiny", {**kw, "out_dir": str(tmp_path / "ddp"), "parallel": "ddp"}))
    end = metrics.of_kind(metrics.read(tmp_path / "ddp" / metrics.METRICS_FILE), "end")[-1]
    assert end["status"] == "interrupted" and end["iter"] == 8
    # the memory check's stop vote, 2 evaluation splits at 0, stop votes at 0/4/8, the logged losses at 4 and 8
    assert reduces.count(torch.int32) == 1 + 3 and reduces.count(torch.float32) == 2 + 2
    steps.clear()
    with pytest.raises(Interrupted):
        train(resolve("tiny", {**kw, "out_dir": str(tmp_path / "single"), "parallel": "none"}))
    assert metrics.of_kind(metrics.read(tmp_path / "single" / metrics.METRICS_FILE), "end")[-1]["iter"] == 5


def test_fsdp_reduce_scatters_once_per_optimizer_step(char_data_root, tmp_path, monkeypatch, one_rank):
    """4 micro-steps a step: gradients accumulate unsharded and are reduce-scattered on the last one
    only (set_requires_gradient_sync), once per FSDP unit (2 blocks and the root) per step."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    reduced = []
    real = _fsdp_param_group.foreach_reduce
    monkeypatch.setattr(_fsdp_param_group, "foreach_reduce", lambda *a, **k: (reduced.append(1), real(*a, **k))[1])
    cfg = {"data_root": str(char_data_root), "max_iters": 3, "lr_decay_iters": 3, "eval_interval": 100,
           "eval_iters": 1, "gradient_accumulation_steps": 4}
    train(resolve("tiny", {**cfg, "out_dir": str(tmp_path / "fsdp"), "parallel": "fsdp"}))
    assert len(reduced) == 3 * (2 + 1)
    # and the gradients are those of one process accumulating 4 micro-steps
    train(resolve("tiny", {**cfg, "out_dir": str(tmp_path / "single")}))
    assert_close(losses(tmp_path / "fsdp"), losses(tmp_path / "single"), tol=1e-5)


def test_bf16_fsdp_gathers_in_bf16_and_reduces_in_fp32(monkeypatch):
    """fully_shard gets a MixedPrecisionPolicy for bf16 runs (param bf16, reduce fp32); none for float32."""
    import torch.distributed.device_mesh as device_mesh
    import torch.distributed.fsdp as fsdp

    from nanorepro.gpt import distributed

    shard_calls = []
    monkeypatch.setattr(device_mesh, "init_device_mesh", lambda *a, **k: "mesh")
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: shard_calls.append((type(module).__name__, kw)))
    world = distributed.World(0, 0, 2, "fsdp", "gloo")
    model = GPT(resolve("tiny").model_config(vocab_size=65))
    distributed.wrap(model, world, "cpu", "bfloat16")
    assert [name for name, _ in shard_calls] == ["Block", "Block", "GPT"]
    for _, kw in shard_calls:
        assert kw["mesh"] == "mesh"
        assert (kw["mp_policy"].param_dtype, kw["mp_policy"].reduce_dtype) == (torch.bfloat16, torch.float32)
    shard_calls.clear()
    distributed.wrap(model, world, "cpu", "float32")
    assert [kw for _, kw in shard_calls] == [{"mesh": "mesh"}] * 3


def test_resuming_on_another_number_of_ranks_gives_each_rank_its_own_rng(char_data_root, tmp_path):
    """A checkpoint from 2 ranks (or one process) resumed on 3: without care every rank would restore the
    same state and draw the same dropout masks. Each draws its own, the same way on every resume."""
    from nanorepro.gpt import checkpoint, distributed, optim

    cfg = resolve("tiny", {"data_root": str(char_data_root), "out_dir": str(tmp_path / "r"), "max_iters": 2,
                           "eval_interval": 2, "dropout": 0.1})
    train(cfg)
    ckpt = checkpoint.load(tmp_path / "r" / "ckpt.pt")
    model = GPT(cfg.model_config(65))

    def first_draws(saved: dict, rank: int, size: int) -> torch.Tensor:
        opt = optim.build(model, "adamw", cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), "cpu")
        world = distributed.World(rank, rank, size, "ddp", "gloo")
        checkpoint.restore_training(saved, model, opt, world, torch.Generator(), "cpu")
        return torch.rand(8)

    saved_by_two = {**ckpt, "rng": {**ckpt["rng"], "ranks": [{"torch": torch.manual_seed(s).get_state()}
                                                            for s in (11, 12)]}}
    for saved in (ckpt, saved_by_two):  # one process's checkpoint, two ranks'
        draws = [first_draws(saved, r, 3) for r in range(3)]
        assert not any(torch.equal(draws[i], draws[j]) for i in range(3) for j in range(i))
        assert all(torch.equal(d, first_draws(saved, r, 3)) for r, d in enumerate(draws))  # reproducible
    # the same number of ranks: each gets back exactly the state it saved
    for r, seed in enumerate((11, 12)):
        assert torch.equal(first_draws(saved_by_two, r, 2), torch.manual_seed(seed) and torch.rand(8))
