"""Reports from real tiny runs: verdicts computed from metrics, seed groups, units, environment, bundle."""

import hashlib
import json
import math
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from nanorepro import metrics
from nanorepro.cli import main
from nanorepro.config import resolve
from nanorepro.data import dataset
from nanorepro.errors import UserError
from nanorepro.gpt.train import train, train_seeds
from nanorepro.results import report

SEEDS = (1337, 1338, 1339)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results(tmp_path_factory, char_data_root, shakespeare_path) -> Path:
    """results/runs/tiny/seed-{1337,1338,1339}: three real tiny runs differing only by seed;
    results/runs/cpu: the CPU preset cut to 20 iterations; results/runs/small: a tiny run on a
    dataset prepared from the first 200,000 characters only."""
    torch.set_num_threads(1)
    res = tmp_path_factory.mktemp("report") / "results"
    runs = res / "runs"
    common = {"data_root": str(char_data_root), "max_iters": 20, "eval_interval": 10}
    train_seeds(resolve("tiny", {**common, "out_dir": str(runs / "tiny")}), len(SEEDS), preset="tiny")
    train(resolve("shakespeare-char-cpu", {**common, "out_dir": str(runs / "cpu"), "eval_iters": 2}),
          preset="shakespeare-char-cpu")
    small_txt = res / "small.txt"
    small_txt.write_text(shakespeare_path.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    dataset.prepare(input_path=small_txt, encodings=("char",), data_root=res / "data_small")
    train(resolve("tiny", {**common, "data_root": str(res / "data_small"), "out_dir": str(runs / "small")}),
          preset="tiny")
    return res


def seed_runs(results: Path) -> list[Path]:
    return [results / "runs" / "tiny" / f"seed-{s}" for s in SEEDS]


def best_vals(run_dirs: list[Path]) -> np.ndarray:
    """Best validation loss of each run, straight from its metrics file."""
    return np.array([metrics.best_val_loss(metrics.read(d / "metrics.jsonl")) for d in run_dirs])


def write_refs(path: Path, claims: list[dict]) -> Path:
    base = {"metric": "best_val_loss", "unit": "nats", "direction": "both", "source": "test",
            "description": "test claim", "dataset": "shakespeare_char"}
    path.write_text(json.dumps({"sources": {"test": {"title": "a test source", "url": None}},
                                "claims": [{**base, **c} for c in claims]}))
    return path


def by_id(rep: dict) -> dict:
    return {c["id"]: c for c in rep["claims"]}


def test_verdicts_are_computed_from_the_metrics(results, tmp_path):
    runs = seed_runs(results)
    mean = best_vals(runs).mean()
    walls = [metrics.of_kind(metrics.read(d / "metrics.jsonl"), "end")[-1]["elapsed_s"] for d in runs]
    refs = write_refs(tmp_path / "refs.json", [
        {"id": "hit", "presets": ["tiny"], "value": mean + 0.02, "tolerance": 0.05},
        {"id": "miss", "presets": ["tiny"], "value": mean - 0.30, "tolerance": 0.05},
        {"id": "absent", "presets": ["shakespeare-char"], "value": 1.4697, "tolerance": 0.02},
        {"id": "fast-enough", "metric": "wall_time_s", "presets": ["tiny"], "value": 2 * max(walls),
         "tolerance": 0, "direction": "at_most"},
        {"id": "too-slow", "metric": "wall_time_s", "presets": ["tiny"], "value": min(walls) / 10,
         "tolerance": 0, "direction": "at_most"},
        {"id": "gpu-only", "metric": "wall_time_s", "presets": ["tiny"], "value": 1e6, "tolerance": 0,
         "direction": "at_most", "requires": {"gpu": "A100"}},
    ])
    rep = report.report(runs, tmp_path / "out", references=refs)
    c = by_id(rep)
    assert c["hit"]["verdict"] == "reproduced"
    assert c["hit"]["measured"] == pytest.approx(mean)
    assert c["hit"]["runs"] == ["seed-1337", "seed-1338", "seed-1339"]
    assert c["miss"]["verdict"] == "not reproduced"
    assert c["absent"]["verdict"] == "not run" and "no run of preset shakespeare-char" in c["absent"]["notes"][0]
    assert c["fast-enough"]["verdict"] == "reproduced"
    assert c["fast-enough"]["measured"] == pytest.approx(np.mean(walls))
    assert c["too-slow"]["verdict"] == "not reproduced"
    assert c["gpu-only"]["verdict"] == "not run" and "not an A100" in " ".join(c["gpu-only"]["notes"])
    md = (tmp_path / "out" / "REPORT.md").read_text()
    assert "**not reproduced**" in md and "**reproduced**" in md and "**not run**" in md


def test_a_seed_group_gets_mean_std_and_range(results, tmp_path):
    runs = seed_runs(results)
    vals = best_vals(runs)
    refs = write_refs(tmp_path / "refs.json", [
        {"id": "inside", "presets": ["tiny"], "value": float(np.median(vals)), "tolerance": 1e-9}])
    rep = report.report(runs, tmp_path / "out", references=refs)
    (g,) = rep["seed_groups"]
    assert g["preset"] == "tiny" and g["seeds"] == list(SEEDS) and g["n"] == 3
    assert g["mean"] == pytest.approx(vals.mean())
    assert g["std"] == pytest.approx(vals.std(ddof=1))
    assert (g["min"], g["max"]) == (pytest.approx(vals.min()), pytest.approx(vals.max()))
    assert g["published_in_range"] is True
    assert g["within_tolerance_of_mean"] is bool(abs(vals.mean() - np.median(vals)) <= 1e-9)
    stats = by_id(rep)["inside"]["stats"]
    assert stats["published_in_range"] is True and stats["std"] == pytest.approx(vals.std(ddof=1))


def test_published_claims_against_real_data_and_a_changed_recipe(results, tmp_path):
    rep = report.report(seed_runs(results) + [results / "runs" / "cpu"], tmp_path / "out")
    c = by_id(rep)
    assert {x["verdict"] for x in rep["claims"]} <= {"reproduced", "not reproduced", "not run", "new result"}
    meta = json.loads((Path(c["char-train-tokens"]["data_dirs"][0]) / "meta.json").read_text())
    for cid, value in [("char-train-tokens", meta["train_tokens"]), ("char-val-tokens", meta["val_tokens"]),
                       ("char-vocab-size", meta["vocab_size"]),
                       ("char-input-chars", len(Path(meta["source"]).read_text(encoding="utf-8"))
                        if Path(meta["source"]).is_file() else meta["train_tokens"] + meta["val_tokens"])]:
        assert c[cid]["measured"] == value
        assert c[cid]["verdict"] == ("reproduced" if value == c[cid]["value"] else "not reproduced")
    assert c["char-train-tokens"]["verdict"] == "reproduced"  # the real Tiny Shakespeare gives nanoGPT's counts
    # no GPT-2 BPE data behind these runs
    assert c["gpt2-train-tokens"]["verdict"] == "not run" and c["gpt2-val-tokens"]["verdict"] == "not run"
    # 20 iterations are not the published 2000: the run is shown but not judged
    cpu = c["char-cpu-val-loss"]
    assert cpu["verdict"] == "not run" and "max_iters=20" in " ".join(cpu["notes"])
    for cid in ("char-a100-val-loss", "char-a100-wall-time", "finetune-gpt2-xl-val-loss", "owt-gpt2-val-loss"):
        assert c[cid]["verdict"] == "not run"
    assert c["finetune-gpt2-xl-val-loss"]["value"] is None


def test_data_that_misses_the_published_counts_is_not_reproduced(results, tmp_path):
    rep = report.report([results / "runs" / "small"], tmp_path / "out")
    c = by_id(rep)
    meta = json.loads((results / "data_small" / "shakespeare_char" / "meta.json").read_text())
    assert c["char-train-tokens"]["measured"] == meta["train_tokens"] < 1_003_854
    assert c["char-train-tokens"]["verdict"] == "not reproduced"
    assert c["char-input-chars"]["measured"] == 200_000
    assert c["char-input-chars"]["verdict"] == "not reproduced"


def test_report_files_units_environment_and_comparison(results, tmp_path):
    runs = seed_runs(results) + [results / "runs" / "cpu"]
    out = tmp_path / "out"
    rep = report.report(runs, out)
    md = (out / "REPORT.md").read_text()
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["claims"] == rep["claims"]
    for p in rep["plots"]:
        assert f"![{p['title']}]({p['file']})" in md  # relative links next to REPORT.md
        png = (out / p["file"]).read_bytes()
        assert png[:8] == PNG_MAGIC and len(png) > 8_000
    vals = dict(zip([r["name"] for r in rep["runs"]], best_vals(runs)))
    for r in rep["runs"]:
        assert r["best_val_loss"] == pytest.approx(vals[r["name"]])
        assert r["best_val_units"]["bits_per_char"] == pytest.approx(vals[r["name"]] / math.log(2))
        assert r["status"] == "finished" and r["tokens_per_s"] > 0 and r["wall_time_s"] > 0
        assert r["last_iter"] == 20 and r["tokens_seen"] == 20 * r["tokens_per_iter"]
        assert r["device"].startswith("CPU: ")
    env = json.loads((runs[0] / "env.json").read_text())
    for field in (env["hostname"], env["hardware"]["cpu_model"], env["packages"]["torch"], env["python"]["version"]):
        assert str(field) in md
    for section in ("## Claims", "## Variance across seeds", "## Runs compared", "## Wall time per stage",
                    "## Environment"):
        assert section in md
    assert "bits/char" in md and f"{vals['cpu']:.4f}" in md


def test_a_claim_without_a_published_number_is_a_new_result_with_conditions(results, tmp_path):
    runs = seed_runs(results)
    refs = write_refs(tmp_path / "refs.json", [{"id": "new", "presets": ["tiny"], "value": None, "tolerance": None}])
    rep = report.report(runs, tmp_path / "out", references=refs)
    assert by_id(rep)["new"]["verdict"] == "new result"
    cfg = json.loads((runs[0] / "config.json").read_text())
    first = rep["new_results"][0]
    assert first["run"] == "seed-1337" and first["model"] == "scratch" and first["iters"] == 20
    assert first["dtype"] == "float32" and first["device"].startswith("CPU: ")
    assert first["tokens"] == 20 * cfg["batch_size"] * cfg["gradient_accumulation_steps"] * cfg["block_size"]
    assert first["best_val_loss"] == pytest.approx(best_vals(runs[:1])[0])
    assert "## New results" in (tmp_path / "out" / "REPORT.md").read_text()


def test_a_torn_last_metrics_line_warns_and_the_rest_is_read(results, tmp_path):
    run = tmp_path / "runs" / "torn"
    shutil.copytree(seed_runs(results)[0], run)
    intact = best_vals([run])[0]
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "eval", "iter": 30, "train_loss": 0.1, "val_lo')  # killed mid-write
    with pytest.warns(UserWarning, match="torn write"):
        rep = report.report([run], tmp_path / "out")
    (r,) = rep["runs"]
    assert r["best_val_loss"] == pytest.approx(intact) and r["status"] == "finished"
    assert any("torn write" in w for w in rep["warnings"])


def test_a_stage_that_did_not_run_is_reported_with_its_reason(results, tmp_path):
    res = tmp_path / "results"
    (res / "runs" / "finetune").mkdir(parents=True)
    shutil.copytree(seed_runs(results)[0], res / "runs" / "char")
    metrics.append(res / "stages.jsonl", {"kind": "stage", "name": "train char", "status": "finished",
                                          "elapsed_s": 4.0})
    metrics.append(res / "stages.jsonl", {"kind": "stage", "name": "train finetune", "status": "not run",
                                          "elapsed_s": 2.5, "reason": "gpt2-xl is not available offline",
                                          "preset": "finetune-shakespeare"})
    with pytest.warns(UserWarning, match="not available offline"):
        rep = report.report([res / "runs" / "char", res / "runs" / "finetune"], res)
    runs = {r["name"]: r for r in rep["runs"]}
    assert runs["char"]["status"] == "finished"
    assert runs["finetune"]["status"] == "not run"
    assert runs["finetune"]["reason"] == "train finetune not run: gpt2-xl is not available offline"
    assert rep["total_wall_time_s"] == pytest.approx(6.5)  # the pipeline's stages, summed
    ft = by_id(rep)["finetune-gpt2-xl-val-loss"]
    assert ft["verdict"] == "not run"
    assert "stage train finetune not run: gpt2-xl is not available offline" in ft["notes"]
    md = (res / "REPORT.md").read_text()
    assert "| pipeline | train finetune | not run | 2.5 s | gpt2-xl is not available offline |" in md


def test_bundle_packs_the_reproduction_without_checkpoints_by_default(results, tmp_path):
    res = tmp_path / "results"
    shutil.copytree(results / "runs" / "tiny", res / "runs")
    runs = sorted((res / "runs").glob("seed-*"))
    (res / "runs" / "seed-1337" / "samples.txt").write_text("ROMEO:\nhello\n")
    nb = {"cells": [], "metadata": {"kernelspec": {"name": "python3"}}, "nbformat": 4, "nbformat_minor": 5}
    (res / "notebooks").mkdir()
    (res / "notebooks" / "01-char.ipynb").write_text(json.dumps(nb))
    (res / "notebooks" / ".ipynb_checkpoints").mkdir()
    (res / "notebooks" / ".ipynb_checkpoints" / "01-char-checkpoint.ipynb").write_text(json.dumps(nb))

    path = report.bundle(runs, tmp_path / "repro.tar.gz", results_dir=res)
    with tarfile.open(path) as tar:
        names = set(tar.getnames())
        manifest = json.loads(tar.extractfile("repro/MANIFEST.json").read())
        for entry in manifest["files"]:
            assert hashlib.sha256(tar.extractfile(entry["path"]).read()).hexdigest() == entry["sha256"]
    expected = {"repro/report/REPORT.md", "repro/report/report.json", "repro/report/loss_vs_iter.png",
                "repro/report/loss_vs_time.png", "repro/report/notebooks/01-char.ipynb",
                "repro/runs/seed-1337/samples.txt", "repro/MANIFEST.json"}
    expected |= {f"repro/runs/seed-{s}/{f}" for s in SEEDS for f in ("config.json", "env.json", "metrics.jsonl")}
    assert expected <= names
    assert not any(n.endswith("ckpt.pt") for n in names)
    assert not any(".ipynb_checkpoints" in n for n in names)
    assert {e["path"] for e in manifest["files"]} == names - {"repro/MANIFEST.json"}
    assert manifest["checkpoints_included"] is False

    with_ckpt = report.bundle(runs, tmp_path / "full.tar.gz", include_checkpoints=True, results_dir=res)
    with tarfile.open(with_ckpt) as tar:
        ckpts = {n for n in tar.getnames() if n.endswith("ckpt.pt")}
    assert ckpts == {f"full/runs/seed-{s}/ckpt.pt" for s in SEEDS}


def test_cli_report_and_bundle(results, tmp_path, capsys):
    runs = [str(p) for p in seed_runs(results)]
    assert main(["report", *runs, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "char-train-tokens" in printed and "reproduced" in printed and "REPORT.md" in printed
    assert (tmp_path / "out" / "REPORT.md").is_file()
    assert main(["bundle", *runs, "--out", str(tmp_path / "b.tar.gz")]) == 0
    assert tarfile.is_tarfile(tmp_path / "b.tar.gz")
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err and "fix:" in err
    assert main(["bundle", *runs, "--out", str(tmp_path / "b.zip")]) == 2


def test_default_output_is_the_runs_common_parent(results):
    runs = seed_runs(results)
    assert report.default_out_dir(runs) == (results / "runs" / "tiny").resolve()
    assert report.default_out_dir([runs[0], results / "runs" / "cpu"]) == (results / "runs").resolve()
    assert report.default_out_dir([results / "runs" / "cpu"]) == (results / "runs").resolve()


def test_shipped_references_are_complete_and_sourced():
    refs = report.load_references()
    claims = {c["id"]: c for c in refs["claims"]}
    values = {c["value"] for c in refs["claims"]}
    assert {1.4697, 1.88, 1.54, 1_003_854, 111_540, 65, 301_966, 36_059, 1_115_394, 3.12, 2.84, 2.67, 2.54} <= values
    assert claims["finetune-gpt2-xl-val-loss"]["value"] is None
    for c in refs["claims"]:
        assert refs["sources"][c["source"]]["title"] and c["tolerance_reason"]
        if c["metric"] in ("train_tokens", "val_tokens", "vocab_size", "input_chars"):
            assert c["tolerance"] == 0  # counts are exact


def test_bad_references_and_arguments_are_user_errors(tmp_path):
    bad = write_refs(tmp_path / "bad.json", [{"id": "x", "presets": ["tiny"], "value": 1.0, "tolerance": 0.1,
                                              "metric": "accuracy"}])
    with pytest.raises(UserError, match="unknown metric"):
        report.load_references(bad)
    with pytest.raises(UserError, match="no run folders"):
        report.report([], tmp_path)


@pytest.mark.slow  # by measurement: a nanorepro process of its own: ~2.3 s
def test_reporting_never_imports_torch(results, repo_root, tmp_path):
    code = ("import sys; from pathlib import Path; "
            "import nanorepro.results.report, nanorepro.results.plots, nanorepro.envinfo; "
            "assert 'torch' not in sys.modules, 'import pulled in torch'; "
            f"nanorepro.results.report.report([Path({str(seed_runs(results)[0])!r})], Path({str(tmp_path / 'o')!r})); "
            "nanorepro.envinfo.capture(); "
            "assert 'torch' not in sys.modules, 'reporting pulled in torch'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_local_copy_of_the_pretrained_model_still_counts_as_the_recipe():
    cfg = resolve("finetune-shakespeare").to_dict()
    cfg.update(init_from="/models/gpt2-xl", n_layer=48, n_head=25, n_embd=1600, vocab_size=50257)
    assert report.deviations(cfg, "finetune-shakespeare") == []
    cfg.update(n_layer=12, n_head=12, n_embd=768)  # a gpt2 (124M) folder is not gpt2-xl
    assert report.deviations(cfg, "finetune-shakespeare") == ["init_from='/models/gpt2-xl' (preset 'gpt2-xl')"]
    assert report.deviations(cfg, "no-such-preset") is None


def test_every_claim_names_presets_that_exist():
    """A claim whose preset was renamed would never be judged: every run would show it as "not run"."""
    from nanorepro.config import PRESETS

    claims = report.load_references()["claims"]
    named = {p for c in claims for p in c.get("presets", [])}
    assert named and named <= set(PRESETS), named - set(PRESETS)
    assert "shakespeare-char-cpu-tuned" in named


def test_the_notebook_view_answers_first_and_folds_what_was_not_run(results, tmp_path):
    rep = report.report(seed_runs(results) + [results / "runs" / "cpu"], tmp_path / "out")
    view = report.answer_first(rep)
    head, _, folded = view.partition("<details>")
    verdict = view.splitlines()[0]
    counts = {v: sum(c["verdict"] == v for c in rep["claims"]) for v in ("reproduced", "not run")}
    assert verdict.startswith("**Verdicts:**") and f"{counts['reproduced']} reproduced" in verdict
    assert f"{counts['not run']} not run" in verdict
    assert verdict in (tmp_path / "out" / "REPORT.md").read_text()  # the same headline as REPORT.md
    # the compact table: what this folder judged, and the run that was here but did not count
    assert "| claim |" in head and "| char-train-tokens |" in head and "| char-cpu-val-loss |" in head
    for cid in ("char-a100-val-loss", "owt-gpt2-val-loss", "gpt2-train-tokens"):
        assert f"| {cid} |" not in head and f"**{cid}**" in folded
    missing, _, context = folded.partition("context-only")
    assert 'char-a100-val-loss** (published 1.4697): run `02_train_char` with `char_preset = "shakespeare-char"` ' \
           'on a GPU node' in missing
    assert 'char-a100-wall-time** (published about 3 min on A100): run `02_train_char` with ' \
           '`char_preset = "shakespeare-char"` on an A100 node' in missing
    assert "**gpt2-train-tokens** (published 301,966): run `01_prepare_data`" in missing
    owt = [c["id"] for c in rep["claims"] if c.get("context_only")]
    assert len(owt) == 4 and all(f"**{cid}**" in context and f"**{cid}**" not in missing for cid in owt)
    assert "`nanorepro train --preset eval-gpt2-xl`" in context
    full = (tmp_path / "out" / "REPORT.md").read_text()
    assert all(f"**{c['id']}**" in full for c in rep["claims"])  # REPORT.md keeps the full table
