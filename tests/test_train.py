"""The training loop: metrics, exact resume, checkpoints, fine-tuning from a local GPT-2, sampling."""

import hashlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nanorepro import metrics
from nanorepro.config import resolve
from nanorepro.errors import UserError
from nanorepro.gpt.checkpoint import load_model
from nanorepro.gpt.sample import sample
from nanorepro.gpt.train import lr_at, train


def tiny(root: Path, out: Path, **kw):
    return resolve("tiny", {"data_root": str(root), "out_dir": str(out), **kw})


def losses(path: Path) -> list[tuple]:
    """(kind, iter, losses...) of every train and eval record: what must match across a resume."""
    out = []
    for r in metrics.read(path):
        if r["kind"] == "train":
            out.append(("train", r["iter"], r["loss"], r["lr"]))
        elif r["kind"] == "eval":
            out.append(("eval", r["iter"], r["train_loss"], r["val_loss"]))
    return out


def test_lr_schedule_is_nanogpts():
    cfg = resolve("shakespeare-char")
    assert lr_at(0, cfg) == pytest.approx(1e-3 * 1 / 101)
    assert lr_at(100, cfg) == pytest.approx(1e-3)
    assert lr_at(2550, cfg) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert lr_at(5000, cfg) == pytest.approx(1e-4) and lr_at(6000, cfg) == 1e-4
    assert lr_at(3, resolve("finetune-shakespeare")) == 3e-5  # constant


def test_run_writes_config_env_metrics_and_a_loadable_checkpoint(char_data_root, tmp_path):
    summary = train(tiny(char_data_root, tmp_path / "run", max_iters=20, eval_interval=10), preset="tiny")
    run = tmp_path / "run"
    records = metrics.read(run / "metrics.jsonl")
    assert records[0]["kind"] == "meta" and records[0]["preset"] == "tiny"
    assert records[0]["config"]["vocab_size"] == 65  # taken from the data
    trains = metrics.of_kind(records, "train")
    assert [r["iter"] for r in trains] == list(range(1, 21))  # each iteration exactly once
    assert all(r["tokens_per_s"] > 0 and r["ms_per_iter"] > 0 for r in trains)
    evals = metrics.of_kind(records, "eval")
    assert [e["iter"] for e in evals] == [0, 10, 20]
    assert evals[0]["val_loss"] == pytest.approx(math.log(65), abs=0.15)  # untrained: uniform over 65 chars
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert summary["best_val_loss"] == min(e["val_loss"] for e in evals)
    assert records[-1] == {**records[-1], "kind": "end", "status": "finished", "iter": 20}
    assert (run / "config.json").exists() and (run / "env.json").exists()
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)  # no pickle needed to read it
    assert ckpt["iter_num"] == 20 and ckpt["model_args"]["vocab_size"] == 65
    assert not list(run.glob("*.tmp"))


def test_a_cpu_run_has_malloc_keep_its_freed_activations(char_data_root, tmp_path, monkeypatch):
    """Before the model is built (test_hardware shows what it saves: the page faults of every step)."""
    from nanorepro.gpt import hardware
    from nanorepro.gpt import train as train_mod
    calls = []
    monkeypatch.setattr(hardware, "keep_freed_memory", lambda: calls.append("kept") or True)
    monkeypatch.setattr(train_mod, "_build_model", lambda *a: calls.append("built") or pytest.fail("stop here"))
    with pytest.raises(pytest.fail.Exception):
        train(tiny(char_data_root, tmp_path / "run"), preset="tiny")
    assert calls == ["kept", "built"]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resumed_run_logs_the_same_losses_as_an_uninterrupted_one(char_data_root, tmp_path, optimizer):
    full = tiny(char_data_root, tmp_path / "full", max_iters=30, eval_interval=10, lr_decay_iters=30, optimizer=optimizer)
    train(full)
    part = tiny(char_data_root, tmp_path / "part", max_iters=30, eval_interval=10, lr_decay_iters=30, optimizer=optimizer)
    train(resolve("tiny", {**part.to_dict(), "max_iters": 10}))  # stops after the checkpoint at 10
    train(part)  # resumes from iter 10
    assert losses(tmp_path / "part" / "metrics.jsonl") == losses(tmp_path / "full" / "metrics.jsonl")


@pytest.mark.slow  # by measurement: evaluates the whole val split: ~3 s
def test_eval_whole_val_is_the_mean_loss_over_every_window_of_the_val_split(char_data_root, tmp_path):
    train(tiny(char_data_root, tmp_path / "run", max_iters=10, eval_whole_val=True))
    model, cfg = load_model(tmp_path / "run")
    val = np.fromfile(char_data_root / "shakespeare_char" / "val.bin", dtype=np.uint16).astype(np.int64)
    T, total, n = cfg.block_size, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(val) - T, T):
            x = torch.from_numpy(val[start:start + T])[None]
            y = torch.from_numpy(val[start + 1:start + T + 1])[None]
            total, n = total + model(x, y)[1].item(), n + 1
    evals = {r["iter"]: r for r in metrics.of_kind(metrics.read(tmp_path / "run" / "metrics.jsonl"), "eval")}
    assert evals[10]["val_loss"] == pytest.approx(total / n, abs=1e-5)


@pytest.mark.slow  # by measurement: three runs per case: ~2.4 s each
@pytest.mark.parametrize("grow_by, stop_at", [("zero", 10), ("copy", 10), ("copy", 15)])
def test_a_growing_run_trains_its_later_blocks_from_grow_iter_on_and_resumes_across_it(char_data_root, tmp_path,
                                                                                       grow_by, stop_at):
    kw = dict(n_layer=3, grow_from_layers=1, grow_iter=15, max_iters=30, eval_interval=5, lr_decay_iters=30,
              optimizer="muon", grow_by=grow_by)
    train(tiny(char_data_root, tmp_path / "full", **kw))
    # a checkpoint before growing; at 15 it is of the network as it stood before the growth
    train(tiny(char_data_root, tmp_path / "part", **{**kw, "max_iters": stop_at}))
    before = torch.load(tmp_path / "part" / "ckpt.pt", weights_only=True)["model"]
    train(tiny(char_data_root, tmp_path / "part", **kw))  # resumes, grows at 15
    after = torch.load(tmp_path / "part" / "ckpt.pt", weights_only=True)["model"]
    assert losses(tmp_path / "part" / "metrics.jsonl") == losses(tmp_path / "full" / "metrics.jsonl")
    for i in (1, 2):  # idle until step 15: output projections still zero, then trained
        for proj in ("attn.c_proj.weight", "mlp.c_proj.weight"):
            assert before[f"transformer.h.{i}.{proj}"].abs().max() == 0
            assert after[f"transformer.h.{i}.{proj}"].abs().max() > 0
    assert before["transformer.h.0.mlp.c_proj.weight"].abs().max() > 0
    evals = {r["iter"]: r["val_loss"] for r in metrics.of_kind(metrics.read(tmp_path / "full" / "metrics.jsonl"), "eval")}
    other = "copy" if grow_by == "zero" else "zero"
    train(tiny(char_data_root, tmp_path / other, **{**kw, "grow_by": other}))
    train(tiny(char_data_root, tmp_path / "plain", **{**kw, "grow_from_layers": 0, "grow_iter": 0, "grow_by": "zero"}))
    runs = {name: metrics.read(tmp_path / name / "metrics.jsonl") for name in ("full", other, "plain")}
    train_losses = {name: [r["loss"] for r in metrics.of_kind(rs, "train")] for name, rs in runs.items()}
    # growing changes the run, and so does how the blocks join (each part of the run's identity)
    assert len({tuple(v) for v in train_losses.values()}) == 3
    other_evals = {r["iter"]: r["val_loss"] for r in metrics.of_kind(runs[other], "eval")}
    assert other_evals[15] == evals[15] and other_evals[20] != evals[20]  # the same network until it grows


@pytest.mark.slow
def test_killed_run_resumes_with_identical_losses(char_data_root, tmp_path):
    """SIGKILL mid-run (after at least one checkpoint), then resume: same curve as an uninterrupted run."""
    args = ["--preset", "tiny", f"--data_root={char_data_root}", "--max_iters=300", "--eval_interval=20",
            "--lr_decay_iters=300", "--eval_iters=1"]
    subprocess.run([sys.executable, "-m", "nanorepro", "train", *args, "--out-dir", str(tmp_path / "full")],
                   check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "nanorepro", "train", *args, "--out-dir", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not (killed / "ckpt.pt").exists():
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "ckpt.pt").exists()
    assert not metrics.finished(metrics.read(killed / "metrics.jsonl"))
    subprocess.run([sys.executable, "-m", "nanorepro", "train", *args, "--out-dir", str(killed)],
                   check=True, capture_output=True)
    assert losses(killed / "metrics.jsonl") == losses(tmp_path / "full" / "metrics.jsonl")


def test_finished_run_is_skipped_and_left_untouched(char_data_root, tmp_path):
    cfg = tiny(char_data_root, tmp_path / "run", max_iters=10)
    train(cfg)
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    assert train(cfg)["skipped"] is True
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before


def test_checkpoint_of_another_shape_is_refused_and_kept(char_data_root, tmp_path):
    train(tiny(char_data_root, tmp_path / "run", max_iters=10))
    digest = hashlib.sha256((tmp_path / "run" / "ckpt.pt").read_bytes()).hexdigest()
    with pytest.raises(UserError, match="another model shape: n_layer 2 .checkpoint. vs 3"):
        train(tiny(char_data_root, tmp_path / "run", max_iters=20, n_layer=3))
    assert hashlib.sha256((tmp_path / "run" / "ckpt.pt").read_bytes()).hexdigest() == digest


def test_corrupt_checkpoint_is_reported_not_trusted(char_data_root, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        train(tiny(char_data_root, run))
    assert (run / "ckpt.pt").read_bytes() == b"not a checkpoint"


def test_bf16_autocast_and_grad_accumulation_train(char_data_root, tmp_path):
    summary = train(tiny(char_data_root, tmp_path / "run", max_iters=10, dtype="bfloat16",
                         gradient_accumulation_steps=2))
    records = metrics.read(tmp_path / "run" / "metrics.jsonl")
    assert records[0]["dtype"] == "bfloat16" and records[0]["tokens_per_iter"] == 2 * 4 * 32
    assert math.isfinite(summary["best_val_loss"])


def test_muon_refuses_float16_before_building_anything(char_data_root, tmp_path):
    with pytest.raises(UserError, match="optimizer=muon cannot train in float16"):
        train(tiny(char_data_root, tmp_path / "run", optimizer="muon", dtype="float16"))
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_resuming_with_the_other_optimizer_is_refused_and_the_checkpoint_kept(char_data_root, tmp_path):
    train(tiny(char_data_root, tmp_path / "run", max_iters=10, eval_interval=5, optimizer="muon"))
    ckpt = tmp_path / "run" / "ckpt.pt"
    before = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    with pytest.raises(UserError, match="trained with optimizer=muon, the config says adamw") as e:
        train(tiny(char_data_root, tmp_path / "run", max_iters=20, eval_interval=5))
    assert "--optimizer=muon" in str(e.value)
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == before


def test_eval_only_evaluates_once(char_data_root, tmp_path):
    train(tiny(char_data_root, tmp_path / "run", eval_only=True))
    records = metrics.read(tmp_path / "run" / "metrics.jsonl")
    assert [r["iter"] for r in metrics.of_kind(records, "eval")] == [0]
    assert not metrics.of_kind(records, "train") and records[-1]["status"] == "evaluated"


def test_eval_only_on_a_checkpoint_evaluates_it_where_it_stands_and_trains_nothing(char_data_root, tmp_path):
    train(tiny(char_data_root, tmp_path / "run", max_iters=10, eval_interval=5))
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "ckpt.pt").write_bytes((tmp_path / "run" / "ckpt.pt").read_bytes())
    before = hashlib.sha256((tmp_path / "ev" / "ckpt.pt").read_bytes()).hexdigest()
    summary = train(tiny(char_data_root, tmp_path / "ev", max_iters=20, eval_interval=4, eval_only=True))
    records = metrics.read(tmp_path / "ev" / "metrics.jsonl")
    assert [(r["kind"], r["iter"]) for r in records if r["kind"] != "meta"] == [("eval", 10), ("end", 10)]
    assert records[-1]["status"] == "evaluated" and summary["iter"] == 10
    assert hashlib.sha256((tmp_path / "ev" / "ckpt.pt").read_bytes()).hexdigest() == before


def test_eval_at_start_false_skips_only_the_untrained_evaluation(char_data_root, tmp_path):
    train(tiny(char_data_root, tmp_path / "a", max_iters=20, eval_interval=10))
    train(tiny(char_data_root, tmp_path / "b", max_iters=20, eval_interval=10, eval_at_start=False))
    a, b = (losses(tmp_path / r / "metrics.jsonl") for r in "ab")
    assert [x[1] for x in a if x[0] == "eval"] == [0, 10, 20] and [x[1] for x in b if x[0] == "eval"] == [10, 20]
    assert [x for x in a if x[1] > 0] == b  # nothing else changes: evaluation draws from its own batches
    train(tiny(char_data_root, tmp_path / "c", eval_only=True, eval_at_start=False))
    assert [r["iter"] for r in metrics.of_kind(metrics.read(tmp_path / "c" / "metrics.jsonl"), "eval")] == [0]


def test_a_run_without_checkpoints_finishes_and_writes_none(char_data_root, tmp_path):
    train(tiny(char_data_root, tmp_path / "run", max_iters=6, eval_interval=3, save_checkpoint=False))
    assert metrics.finished(metrics.read(tmp_path / "run" / "metrics.jsonl"))
    assert not (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.slow
def test_missing_data_and_absent_gpu_are_one_line_errors(tmp_path, char_data_root):
    r = subprocess.run([sys.executable, "-m", "nanorepro", "train", "--preset", "tiny",
                        f"--data_root={tmp_path / 'nothing'}"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "nanorepro prepare" in r.stderr and "Traceback" not in r.stderr
    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, "-m", "nanorepro", "train", "--preset", "tiny", "--device=cuda",
                            f"--data_root={char_data_root}"], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 2 and "no CUDA GPU" in r.stderr and "--device=cpu" in r.stderr
        assert not (tmp_path / "runs").exists()  # nothing that looks like a run


def test_sampling_from_a_run_is_seeded_and_sized(char_data_root, tmp_path):
    train(tiny(char_data_root, tmp_path / "run", max_iters=10))
    a = sample(run_dir=tmp_path / "run", prompt="ROMEO:", max_new_tokens=40, seed=3, data_root=str(char_data_root))
    b = sample(run_dir=tmp_path / "run", prompt="ROMEO:", max_new_tokens=40, seed=3, data_root=str(char_data_root))
    c = sample(run_dir=tmp_path / "run", prompt="ROMEO:", max_new_tokens=40, seed=4, data_root=str(char_data_root))
    assert a == b != c
    assert a[0].startswith("ROMEO:") and len(a[0]) == len("ROMEO:") + 40


def test_finetune_from_a_local_gpt2_folder(gpt2_data_root, tiny_gpt2, tmp_path):
    cfg = resolve("finetune-shakespeare", {"data_root": str(gpt2_data_root), "out_dir": str(tmp_path / "ft"),
                                           "init_from": str(tiny_gpt2), "block_size": 64, "max_iters": 6,
                                           "eval_interval": 3, "eval_iters": 2, "gradient_accumulation_steps": 2,
                                           "learning_rate": 1e-3, "device": "cpu"})
    summary = train(cfg, preset="finetune-shakespeare")
    records = metrics.read(tmp_path / "ft" / "metrics.jsonl")
    shape = records[0]["config"]
    assert (shape["n_layer"], shape["n_embd"], shape["vocab_size"], shape["block_size"], shape["bias"]) == \
        (2, 32, 50257, 64, True)  # shape from the pretrained model, context cropped to the config's
    evals = metrics.of_kind(records, "eval")
    assert evals[0]["val_loss"] == pytest.approx(math.log(50257), abs=0.5)  # a random GPT-2 before tuning
    assert summary["best_val_loss"] < evals[0]["val_loss"]
    with pytest.raises(UserError, match="block_size=256 is above"):
        train(resolve("finetune-shakespeare", {**cfg.to_dict(), "out_dir": str(tmp_path / "x"), "block_size": 256}))


def test_pretrained_init_needs_gpt2_encoded_data(char_data_root, tiny_gpt2, tmp_path):
    with pytest.raises(UserError, match="needs GPT-2 BPE data"):
        train(tiny(char_data_root, tmp_path / "x", init_from=str(tiny_gpt2)))


@pytest.mark.slow
def test_unavailable_pretrained_model_exits_3_quickly(gpt2_data_root, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-m", "nanorepro", "train", "--preset", "finetune-shakespeare",
                        f"--data_root={gpt2_data_root}", "--out-dir", str(tmp_path / "ft"), "--device=cpu"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 3, r.stderr
    # quickly: the offline flag is honoured, so no download (nor its ~23 s of retries) is tried
    assert "not available offline" in r.stderr and "HF_HUB_OFFLINE is set" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_save_a_checkpoint_and_say_how_to_resume(char_data_root, tmp_path, sig, code):
    args = ["--preset", "tiny", f"--data_root={char_data_root}", "--max_iters=400", "--eval_interval=100",
            "--lr_decay_iters=400", "--eval_iters=1"]
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "nanorepro", "train", *args, "--out-dir", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not metrics.of_kind(
            metrics.read(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else [], "train"):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert "checkpoint saved" in err and "run the same command again to resume" in err and "Traceback" not in err
    records = metrics.read(run / "metrics.jsonl")
    stopped_at = records[-1]["iter"]
    assert records[-1]["status"] == "interrupted" and 0 < stopped_at < 400
    assert torch.load(run / "ckpt.pt", weights_only=True)["iter_num"] == stopped_at
    subprocess.run([sys.executable, "-m", "nanorepro", "train", *args, "--out-dir", str(run)], check=True,
                   capture_output=True)
    records = metrics.read(run / "metrics.jsonl")
    assert [r["iter"] for r in metrics.of_kind(records, "train")] == list(range(1, 401))  # each once
    assert metrics.finished(records)


# ---------------------------------------------------------------------------------------------
# The GPU path on a CPU: tests/test_cuda_path.py drives it under a strict torch.cuda stand-in


def test_gpus_only_emulating_bf16_get_float16_and_a_grad_scaler():
    from nanorepro import memory

    for cap, dtype in [((7, 0), "float16"), ((7, 5), "float16"), ((6, 1), "float16"),  # V100, T4 / RTX 6000, P100
                       ((8, 0), "bfloat16"), ((8, 6), "bfloat16"), ((9, 0), "bfloat16")]:  # A100, A10, H100
        assert memory.gpu_dtype(cap) == dtype, cap


def test_float16_runs_checkpoint_the_grad_scaler_and_resume_with_it(char_data_root, tmp_path):
    """fp16's loss scale and growth tracker are in ckpt.pt and restored: a resume does not restart at
    65536 and skip steps while the scale backs off (CPU autocast and GradScaler stand in for a GPU's)."""
    from nanorepro.gpt import checkpoint, distributed
    from nanorepro.gpt.model import GPT

    cfg = tiny(char_data_root, tmp_path / "run", max_iters=6, eval_interval=3, dtype="float16")
    train(cfg)
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["scaler"]["scale"] > 0 and ckpt["scaler"]["_growth_tracker"] == 6  # 6 unskipped steps
    # the round trip itself, with a scale and tracker no fresh scaler has
    model = GPT(cfg.model_config(65))
    opt = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=True, growth_interval=5)
    for _ in range(3):
        scaler.scale(model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1]).backward()
        scaler.step(opt)
        scaler.update()
    scaler.update(new_scale=1024.0)
    world = distributed.World()
    checkpoint.save_training(tmp_path / "c.pt", model, opt, world, iter_num=3, best_val_loss=1.0, elapsed_s=0.0,
                             batch_gen=torch.Generator(), device="cpu", meta={"encoding": "char", "vocab_size": 65},
                             scaler=scaler)
    fresh = torch.amp.GradScaler("cpu", enabled=True, growth_interval=5)
    checkpoint.restore_training(checkpoint.load(tmp_path / "c.pt"), model, opt, world, torch.Generator(), "cpu", fresh)
    assert fresh.state_dict() == scaler.state_dict() != torch.amp.GradScaler("cpu", enabled=True).state_dict()
    assert fresh.get_scale() == 1024.0
    # float32 runs carry no scaler state
    train(tiny(char_data_root, tmp_path / "fp32", max_iters=3, eval_interval=3))
    assert "scaler" not in torch.load(tmp_path / "fp32" / "ckpt.pt", weights_only=True)


def test_resumed_float16_run_logs_the_same_losses_as_an_uninterrupted_one(char_data_root, tmp_path):
    kw = dict(max_iters=12, eval_interval=6, lr_decay_iters=12, dtype="float16")
    train(tiny(char_data_root, tmp_path / "full", **kw))
    train(tiny(char_data_root, tmp_path / "part", **{**kw, "max_iters": 6}))
    train(tiny(char_data_root, tmp_path / "part", **kw))
    assert losses(tmp_path / "part" / "metrics.jsonl") == losses(tmp_path / "full" / "metrics.jsonl")


def test_train_gpt2_pads_the_vocabulary_as_nanogpt_and_pretrained_weights_keep_theirs(tiny_gpt2):
    cfg = resolve("train-gpt2")
    assert cfg.model_config(50257).vocab_size == 50304 and 50304 % 64 == 0  # "rounded up for efficiency"
    ft = resolve("train-gpt2", {"init_from": str(tiny_gpt2), "block_size": 128})  # OpenAI's weights: 50257 rows
    assert ft.model_config(50257).vocab_size == 50257
    assert resolve("finetune-shakespeare").model_config(50257).vocab_size == 50257


def test_per_step_records_are_not_fsynced_inside_the_timed_steps(char_data_root, tmp_path, monkeypatch):
    """Every record still reaches the OS at once (a killed run keeps it); only evaluations, the end and
    checkpoints are fsynced: an fsync per logged step would cost milliseconds inside the timed window."""
    import nanorepro.metrics as metrics_module

    synced = []
    real = os.fsync
    monkeypatch.setattr(metrics_module.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                                real(fd))[1])
    train(tiny(char_data_root, tmp_path / "run", max_iters=10, eval_interval=5))
    records = metrics.read(tmp_path / "run" / "metrics.jsonl")
    durable = [r for r in records if r["kind"] != "train"]  # meta, 3 evaluations, end
    assert len(durable) == 5 and len(metrics.of_kind(records, "train")) == 10
    assert sum(p.endswith("metrics.jsonl") for p in synced) == len(durable)


def test_a_finished_run_relaunched_with_other_settings_is_refused_not_passed_off(char_data_root, tmp_path):
    cfg = tiny(char_data_root, tmp_path / "run", max_iters=10)
    train(cfg)
    run = tmp_path / "run"
    before = {f: (run / f).read_bytes() for f in ("metrics.jsonl", "ckpt.pt", "config.json")}
    # as a notebook stage does: the new settings' config.json is written before the job starts
    changed = tiny(char_data_root, run, max_iters=10, learning_rate=2e-3)
    changed.save(run / "config.json")
    with pytest.raises(UserError, match=r"finished with other settings: learning_rate=0.001 \(finished\) vs 0.002"):
        train(changed)
    assert {f: (run / f).read_bytes() for f in before} == before  # records, checkpoint and config.json as they were
    # a setting that does not change what is trained still finds the run finished
    assert train(tiny(char_data_root, run, max_iters=10, log_interval=5))["skipped"] is True


def test_a_finished_fine_tune_relaunched_as_it_was_is_skipped(tmp_path, tiny_gpt2, gpt2_data_root):
    # the run records the pretrained model's shape, which the launch config leaves at its defaults
    cfg = resolve("finetune-shakespeare-cpu", {"init_from": str(tiny_gpt2), "data_root": str(gpt2_data_root),
                                               "out_dir": str(tmp_path / "ft"), "max_iters": 2, "eval_iters": 1,
                                               "block_size": 32})
    train(cfg)
    assert train(cfg)["skipped"] is True


def test_a_run_that_misses_its_target_says_so_at_its_end_and_in_the_report(char_data_root, tmp_path, capsys):
    """target_val_loss (our presets set it to what they promise): a finished run above it ends saying so, its
    end record holds the verdict, and the report warns and marks the run; a run that reached it says nothing."""
    from nanorepro.pipeline import Pipeline
    from nanorepro.results import report

    runs = tmp_path / "results" / "runs"
    missed = train(tiny(char_data_root, runs / "missed", max_iters=6, target_val_loss=0.5))
    said = capsys.readouterr()
    reached = train(tiny(char_data_root, runs / "reached", max_iters=6, target_val_loss=9.0))
    quiet = capsys.readouterr()
    best = missed["best_val_loss"]
    assert missed["target"] == {"val_loss": 0.5, "reached": False} and best > 0.5
    assert reached["target"] == {"val_loss": 9.0, "reached": True}
    line = f"missed its preset's (tiny) target: best val loss {best:.4f}, above target_val_loss=0.5"
    assert line in said.out + said.err
    assert "missed" not in quiet.out + quiet.err
    end = metrics.of_kind(metrics.read(runs / "missed" / metrics.METRICS_FILE), "end")[-1]
    assert end["target"] == {"val_loss": 0.5, "reached": False}
    # what notebook 02 shows under its training cell (Pipeline.train returns this summary)
    pipe = Pipeline(tmp_path / "results", "local")
    assert "**Missed its target, 0.5**" in pipe.summary("missed")._repr_markdown_()
    assert "Reached its target, 9.0." in pipe.summary("reached")._repr_markdown_()

    rep = report.report([runs / "missed", runs / "reached"], tmp_path / "report")
    assert [w for w in rep["warnings"] if "target" in w] == [f"`missed` {line}"]
    md = (tmp_path / "report" / "REPORT.md").read_text()
    assert "finished, **missed its target 0.5**" in md and "finished, target 9.0 reached" in md


def test_target_val_loss_must_be_a_positive_loss(char_data_root, tmp_path):
    with pytest.raises(UserError, match=r"target_val_loss must be > 0, got -1.0"):
        tiny(char_data_root, tmp_path / "run", target_val_loss=-1)
    assert tiny(char_data_root, tmp_path / "run", target_val_loss="none").target_val_loss is None
