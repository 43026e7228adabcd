"""The GPT-2 size comparison, offline: tiny local GPT-2 folders of three sizes stand in for the four
published ones; the largest is refused by the memory estimate (a low NANOREPRO_MEMORY_LIMIT_GIB), the
others are fine-tuned with one recipe, each in its own process; then the table and overlaid plots."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from nanorepro import compare, memory, metrics


@pytest.fixture(scope="module")
def sizes(tmp_path_factory, tiny_gpt2):
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path_factory.mktemp("sizes")
    torch.manual_seed(0)
    for name, (n_layer, n_embd) in {"gpt2-b": (3, 64), "gpt2-huge": (2, 384)}.items():
        GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=4, n_embd=n_embd, n_positions=128,
                                   vocab_size=50257)).save_pretrained(base / name)
    return [str(tiny_gpt2), str(base / "gpt2-b"), str(base / "gpt2-huge")]


@pytest.mark.slow
def test_sizes_are_fine_tuned_with_one_recipe_and_compared(sizes, tmp_path, shakespeare_path, tiktoken_offline,
                                                          monkeypatch):
    monkeypatch.setenv(memory.LIMIT_ENV, "0.8")  # the two small ones fit (~0.6 GiB with runtime), the huge one not
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = compare.run(sizes, preset="finetune-shakespeare-cpu", results_dir=tmp_path / "cmp", max_iters=4,
                      input_path=str(shakespeare_path), overrides={"learning_rate": 1e-3, "eval_iters": 2})
    small, medium, huge = out["rows"]
    for row in (small, medium):
        assert row["status"] == "finished", row
        assert row["val_before"] == pytest.approx(math.log(50257), abs=0.5)  # random weights: ~uniform
        assert row["val_after"] < row["val_before"]
        assert row["iters"] == 4 and row["wall_time_s"] > 0 and row["tokens_per_s"] > 0
        assert row["peak_memory_bytes"] > 100 * 2**20  # this process's peak resident set
    assert small["n_params"] < medium["n_params"]
    assert huge["status"] == "not run" and "does not fit" in huge["reason"] and "has 819.2 MiB" in huge["reason"]
    results = tmp_path / "cmp"
    stages = {r["name"]: r for r in metrics.read(results / "stages.jsonl")}
    assert stages["train compare-gpt2-huge"]["status"] == "not run"
    table = (results / compare.TABLE_FILE).read_text()
    assert "| `tiny-gpt20` |" in table and "| `gpt2-huge` |" in table and "not run: does not fit" in table
    assert json.loads((results / compare.JSON_FILE).read_text())["rows"][1]["model"] == sizes[1]
    for fig in out["figures"]:
        assert (results / fig).stat().st_size > 10_000
    assert sorted(out["figures"]) == ["compare_loss_vs_elapsed.png", "compare_loss_vs_iter.png"]
    # re-running skips the finished fine-tunes (train resumes nothing) and rebuilds the same table
    again = compare.run(sizes[:2], preset="finetune-shakespeare-cpu", results_dir=results, max_iters=4,
                        overrides={"learning_rate": 1e-3, "eval_iters": 2})
    assert [r["val_after"] for r in again["rows"]] == [small["val_after"], medium["val_after"]]


def test_cli_refuses_an_unknown_preset_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nanorepro", "compare-gpt2", "--preset", "nope",
                        "--results-dir", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown preset 'nope'" in r.stderr and "Traceback" not in r.stderr
