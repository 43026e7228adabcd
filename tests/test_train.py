"""The training loop: metrics, exact resume, checkpoints, fine-tuning from a local GPT-2, sampling."""

import hashlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanorepro import metrics
from nanorepro.config import resolve
from nanorepro.errors import UserError
from nanorepro.sample import sample
from nanorepro.train import lr_at, train


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


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resumed_run_logs_the_same_losses_as_an_uninterrupted_one(char_data_root, tmp_path, optimizer):
    full = tiny(char_data_root, tmp_path / "full", max_iters=30, eval_interval=10, lr_decay_iters=30, optimizer=optimizer)
    train(full)
    part = tiny(char_data_root, tmp_path / "part", max_iters=30, eval_interval=10, lr_decay_iters=30, optimizer=optimizer)
    train(resolve("tiny", {**part.to_dict(), "max_iters": 10}))  # stops after the checkpoint at 10
    train(part)  # resumes from iter 10
    assert losses(tmp_path / "part" / "metrics.jsonl") == losses(tmp_path / "full" / "metrics.jsonl")


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


def test_unavailable_pretrained_model_exits_3_quickly(gpt2_data_root, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-m", "nanorepro", "train", "--preset", "finetune-shakespeare",
                        f"--data_root={gpt2_data_root}", "--out-dir", str(tmp_path / "ft"), "--device=cpu"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 3, r.stderr
    # quickly: the offline flag is honoured, so no download (nor its ~23 s of retries) is tried
    assert "not available offline" in r.stderr and "HF_HUB_OFFLINE is set" in r.stderr


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
