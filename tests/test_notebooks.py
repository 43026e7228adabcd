"""Every notebook through papermill, as `nanorepro run-notebooks` runs them, checked by what they leave."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanorepro import metrics

pytestmark = pytest.mark.slow  # every test runs notebooks through papermill's kernels (tests/tiers.py)


def run_notebooks(*params: str, env: dict | None = None, only: list[str] | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "nanorepro", "run-notebooks"]
    for pair in params:
        name, value = pair.split("=", 1)
        args += ["-p", name, value]
    if only:
        args += ["--only", *only]
    return subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def outputs_text(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text())
    parts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.extend(str(v) for k, v in out.get("data", {}).items() if k.startswith("text/"))
            if out.get("output_type") == "error":
                parts.append("ERROR " + out.get("ename", ""))
    return "\n".join("".join(p) if isinstance(p, list) else p for p in parts)


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory, tiny_gpt2):
    # no input_path and no network, as `make reproduce` runs: the package's bundled copies
    results = tmp_path_factory.mktemp("results") / "tiny"
    r = run_notebooks(f"results_dir={results}", "char_preset=tiny", f"model={tiny_gpt2}", "finetune_max_iters=2",
                      env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return results, r


def test_main_job_runs_every_notebook_in_order(tiny_results):
    results, r = tiny_results
    names = [p.name for p in sorted((Path(__file__).parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))]
    assert len(names) >= 5
    for i, name in enumerate(names, 1):
        assert f"[{i}/{len(names)}] {name} done in" in r.stdout  # a progress line per notebook
        executed = results / "notebooks" / name
        nb = json.loads(executed.read_text())
        assert all(c.get("execution_count") for c in nb["cells"] if c["cell_type"] == "code")
        assert "ERROR" not in outputs_text(executed)
    assert "without encryption" not in r.stdout + r.stderr  # kernels talk over private Unix sockets


def test_prepare_notebook_shows_the_published_token_counts(tiny_results):
    results, _ = tiny_results
    text = outputs_text(results / "notebooks" / "01_prepare_data.ipynb")
    for count in ("1,003,854", "111,540", "301,966", "36,059"):
        assert count in text


def test_training_notebooks_leave_metrics_samples_and_before_after_losses(tiny_results):
    results, _ = tiny_results
    char = metrics.read(results / "runs" / "char" / "metrics.jsonl")
    assert metrics.finished(char) and metrics.meta(char)["preset"] == "tiny"
    assert (results / "runs" / "char" / "samples.txt").read_text().strip()
    ft = metrics.read(results / "runs" / "finetune" / "metrics.jsonl")
    assert metrics.finished(ft) and metrics.meta(ft)["config"]["n_layer"] == 2  # the tiny local GPT-2
    text = outputs_text(results / "notebooks" / "03_finetune_gpt2.ipynb")
    first = metrics.of_kind(ft, "eval")[0]["val_loss"]
    assert "val loss before (pretrained)" in text and f"{first:.4f}" in text
    assert (results / "runs" / "finetune" / "samples_before.txt").exists()
    assert "========== after ==========" in text


def test_results_notebook_writes_plots_and_the_claims_table(tiny_results):
    results, _ = tiny_results
    for png in ("loss_vs_iter.png", "loss_vs_time.png"):
        data = (results / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    report = json.loads((results / "report.json").read_text())
    verdicts = {c["id"]: c["verdict"] for c in report["claims"]}
    assert verdicts["char-train-tokens"] == "reproduced" and verdicts["gpt2-val-tokens"] == "reproduced"
    assert verdicts["char-a100-val-loss"] == "not run"  # a tiny run is not the A100 recipe
    text = outputs_text(results / "notebooks" / "04_results.ipynb")
    assert "| claim |" in text and "reproduced" in text
    stages = [s["name"] for s in metrics.read(results / "stages.jsonl")]
    assert stages[:4] == ["prepare char", "prepare gpt2", "train char", "train finetune"]


def display_outputs(nb_path: Path) -> list[list[dict]]:
    """Each code cell's outputs, in order."""
    return [c.get("outputs", []) for c in json.loads(nb_path.read_text())["cells"] if c["cell_type"] == "code"]


def test_what_a_reader_sees(tiny_results):
    results, _ = tiny_results
    nbs = results / "notebooks"
    for nb in sorted(nbs.glob("*.ipynb")):  # no stray reprs of paths or objects
        text = outputs_text(nb)
        assert "PosixPath(" not in text and " object at 0x" not in text, nb.name
    # 02 and 03: one loss figure in the training cell, drawn live and left in the executed copy
    for name in ("02_train_char.ipynb", "03_finetune_gpt2.ipynb"):
        figures = [o for cell in display_outputs(nbs / name) for o in cell if "image/png" in o.get("data", {})]
        assert len(figures) == 1, f"{name}: {len(figures)} figures"  # redrawn in place, not appended
        assert figures[0]["metadata"] is not None and figures[0]["data"]["image/png"]
    # 03: the samples side by side, each under its validation loss
    ft = metrics.read(results / "runs" / "finetune" / "metrics.jsonl")
    html = ["".join(o["data"]["text/html"]) for cell in display_outputs(nbs / "03_finetune_gpt2.ipynb") for o in cell
            if "text/html" in o.get("data", {})]
    assert len(html) == 1 and html[0].count("<td") == 2
    assert f"val loss {metrics.of_kind(ft, 'eval')[0]['val_loss']:.4f}" in html[0]
    assert f"best val loss {metrics.best_val_loss(ft):.4f}" in html[0]
    # 04: the first output is the verdict line, then the judged claims
    first = next(o for cell in display_outputs(nbs / "04_results.ipynb") for o in cell)
    assert "".join(first["data"]["text/markdown"]).startswith("**Verdicts:** ")


def test_rerun_skips_finished_stages(tiny_results):
    results, _ = tiny_results
    before = (results / "runs" / "char" / "metrics.jsonl").read_bytes()
    r = run_notebooks(f"results_dir={results}", "char_preset=tiny", only=["01", "02"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "reusing" in r.stdout and "already finished" in r.stdout
    assert (results / "runs" / "char" / "metrics.jsonl").read_bytes() == before


def test_offline_finetune_is_recorded_not_run_and_the_rest_completes(tmp_path, shakespeare_path, tiktoken_offline):
    r = run_notebooks(f"results_dir={tmp_path}", "char_preset=tiny", f"input_path={shakespeare_path}",
                      "model=gpt2-xl", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "not run" in outputs_text(tmp_path / "notebooks" / "03_finetune_gpt2.ipynb")
    stage = [s for s in metrics.read(tmp_path / "stages.jsonl") if s["name"] == "train finetune"][0]
    assert stage["status"] == "not run" and "not available offline" in stage["reason"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert {c["id"]: c["verdict"] for c in report["claims"]}["char-vocab-size"] == "reproduced"
    # the GPT-2 counts come from the prepared data even though no run used it
    verdicts = {c["id"]: c["verdict"] for c in report["claims"]}
    assert verdicts["gpt2-train-tokens"] == verdicts["gpt2-val-tokens"] == "reproduced"


def test_a_failing_cell_names_the_notebook_and_keeps_it(tmp_path):
    # a Latin-1 input passes the up-front parameter checks (it exists) and fails inside 01's prepare cell
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\u00e9 cr\u00e8me, ".encode("latin-1") * 50)
    r = run_notebooks(f"results_dir={tmp_path}", "char_preset=tiny", f"input_path={latin1}")
    assert r.returncode == 2
    assert "01_prepare_data.ipynb failed in code cell" in r.stderr and "is not UTF-8 text" in r.stdout + r.stderr
    partial = tmp_path / "notebooks" / "01_prepare_data.ipynb"
    assert partial.exists() and "ERROR" in outputs_text(partial)
    assert not (tmp_path / "notebooks" / "02_train_char.ipynb").exists()  # the sequence stopped


def test_unknown_parameter_is_refused_before_anything_runs(tmp_path):
    r = run_notebooks(f"results_dir={tmp_path}", "char_presett=tiny")
    assert r.returncode == 2 and "unknown notebook parameter(s): char_presett" in r.stderr
    assert not (tmp_path / "notebooks").exists()


def execute(notebook: str, out: Path, **parameters):
    """One notebook through papermill, in the repo root as `run-notebooks` runs it."""
    import papermill as pm

    root = Path(__file__).parents[1]
    return pm.execute_notebook(str(root / "notebooks" / notebook), str(out), parameters=parameters, cwd=str(root),
                               progress_bar=False)


def test_block_size_set_in_the_parameters_cell_reaches_the_run(tmp_path, char_data_root):
    shutil.copytree(char_data_root, tmp_path / "data")
    execute("02_train_char.ipynb", tmp_path / "02.ipynb", results_dir=str(tmp_path), char_preset="tiny",
            char_max_iters=4, char_overrides={"block_size": 16, "eval_interval": 2})
    run = tmp_path / "runs" / "char"
    assert json.loads((run / "config.json").read_text())["block_size"] == 16
    meta = metrics.meta(metrics.read(run / "metrics.jsonl"))
    assert meta["preset"] == "tiny" and meta["config"]["block_size"] == 16  # what the job trained with


def test_a_bad_override_fails_in_the_notebook_before_a_job_starts(tmp_path):
    import papermill as pm

    with pytest.raises(pm.PapermillExecutionError) as e:
        execute("02_train_char.ipynb", tmp_path / "02.ipynb", results_dir=str(tmp_path), char_preset="tiny",
                char_overrides={"block_size": 0})
    assert e.value.ename == "UserError" and "\n" not in e.value.evalue
    assert "block_size must be > 0, got 0 (fix: set block_size to a positive value)" in e.value.evalue
    assert not (tmp_path / "runs").exists()  # no config written, no job started
    errors = [o for c in json.loads((tmp_path / "02.ipynb").read_text())["cells"] for o in c.get("outputs", [])
              if o["output_type"] == "error"]
    assert [o["traceback"] for o in errors] == [[f"UserError: {e.value.evalue}"]]  # one line, as on the CLI
