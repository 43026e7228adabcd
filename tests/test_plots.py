"""Loss curves from real tiny runs: files written, runs without evaluations or not run shown with a message."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from nanorepro import metrics
from nanorepro.config import resolve
from nanorepro.errors import UserError
from nanorepro.gpt.train import train
from nanorepro.results import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_bytes: int = 8_000) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is only {len(data)} bytes: an empty figure?"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, char_data_root) -> Path:
    """Two real tiny runs (different seeds) under runs/."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("plots") / "runs"
    for seed in (1, 2):
        train(resolve("tiny", {"data_root": str(char_data_root), "out_dir": str(root / f"seed-{seed}"),
                               "seed": seed, "max_iters": 20, "eval_interval": 10}), preset="tiny")
    return root


def test_plot_run_writes_loss_vs_iter_and_vs_time(runs, tmp_path):
    paths = plots.plot_run(runs / "seed-1", tmp_path / "out")
    assert [p.name for p in paths] == ["loss_vs_iter.png", "loss_vs_time.png"]
    for p in paths:
        assert_png(p)


def test_overlay_of_several_runs_against_wall_time(runs, tmp_path):
    out = plots.loss_curves([runs / "seed-1", runs / "seed-2"], tmp_path / "overlay.png", x="elapsed", base=runs)
    assert_png(out)
    # the overlay carries more drawing than a single run's plot
    single = plots.loss_curves([runs / "seed-1"], tmp_path / "single.png", x="elapsed")
    assert out.stat().st_size > single.stat().st_size


def test_reference_lines_are_the_published_values_for_the_plotted_dataset():
    char = {c["value"] for c in plots.reference_lines(True, {"shakespeare_char"})}
    assert {1.4697, 1.88} <= char
    assert all(c < 2 for c in char)
    assert plots.reference_lines(True, {"shakespeare_gpt2"}) == []  # the fine-tune has no published number
    assert plots.reference_lines(False, {"shakespeare_char"}) == []


def test_a_run_without_evaluations_yet_is_drawn_with_a_message(runs, tmp_path):
    # a run killed before its first evaluation: its real meta and train records, no eval yet
    run = tmp_path / "early"
    run.mkdir()
    shutil.copy(runs / "seed-1" / "config.json", run / "config.json")
    records = [r for r in metrics.read(runs / "seed-1") if r["kind"] in ("meta", "train")]
    metrics.rewrite(run / "metrics.jsonl", records)
    with pytest.warns(UserWarning, match="early: no evaluation yet"):
        paths = plots.plot_run(run)
    for p in paths:
        assert_png(p)
        assert p.parent == run


def test_a_stage_that_did_not_run_is_shown_with_its_reason(tmp_path):
    results = tmp_path / "results"
    run = results / "runs" / "finetune"
    run.mkdir(parents=True)
    metrics.append(results / "stages.jsonl", {"kind": "stage", "name": "train finetune", "status": "not run",
                                              "elapsed_s": 1.5, "reason": "gpt2-xl weights are not available offline"})
    with pytest.warns(UserWarning, match="train finetune not run: gpt2-xl weights are not available offline"):
        out = plots.loss_curves([run], tmp_path / "nothing.png")
    assert_png(out, min_bytes=4_000)


def test_bad_arguments_are_user_errors(runs, tmp_path):
    with pytest.raises(UserError, match="unknown x axis"):
        plots.loss_curves([runs / "seed-1"], tmp_path / "x.png", x="tokens")
    with pytest.raises(UserError, match="does not exist"):
        plots.loss_curves([tmp_path / "missing"], tmp_path / "x.png")
    with pytest.raises(UserError, match="no run folders"):
        plots.loss_curves([], tmp_path / "x.png")


def test_config_falls_back_to_the_metrics_meta_record(runs, tmp_path):
    run = tmp_path / "noconfig"
    run.mkdir()
    shutil.copy(runs / "seed-2" / "metrics.jsonl", run / "metrics.jsonl")
    cfg = plots.run_config(run)
    assert cfg == json.loads((runs / "seed-2" / "config.json").read_text())
