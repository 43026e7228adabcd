"""The GPT-2 size comparison: fine-tune each size with one recipe, then a table and overlaid curves.

Every model is a `train` stage of a `Pipeline` (here or on a Chameleon node), in its own process,
so one model's memory is gone before the next loads. A model whose estimated training memory
exceeds the device's is refused by `train` before it loads anything (memory.py, exit 4) and shows
as "not run" with the reason and the largest setting that would fit; the others still run.
The reading side (`summarize`) is torch-free: metrics.jsonl files, report.summarize_run, plots.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from nanorepro import metrics
from nanorepro.config import PRESETS, PRETRAINED, pretrained_config
from nanorepro.errors import UserError
from nanorepro.fmt import markdown_table
from nanorepro.pipeline import Pipeline
from nanorepro.results import plots
from nanorepro.results.report import summarize_run

DEFAULT_PRESET = "finetune-shakespeare"  # nanoGPT's recipe (batch 1 x 32 accumulation, 20 iters, lr 3e-5)
TABLE_FILE, JSON_FILE = "COMPARE.md", "compare.json"


def run_name(model: str) -> str:
    """runs/compare-<model>: the GPT-2 name, or a local folder's name."""
    return "compare-" + (model if model in PRETRAINED else Path(model).name)


def run(models: list[str] | tuple[str, ...] = PRETRAINED, preset: str = DEFAULT_PRESET,
        results_dir: str | Path = "results/compare", target: str = "local", max_iters: int | None = None,
        input_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune each model with `preset` (the same recipe for all) and summarize; returns summarize()'s dict."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}", f"use one of: {', '.join(PRESETS)}")
    if not models:
        raise UserError("no models to compare", f"give some of {', '.join(PRETRAINED)} or local folders")
    names = [run_name(m) for m in models]
    if len(set(names)) != len(names):
        raise UserError(f"two models share a run name: {names}", "give folders with different names")
    pipe = Pipeline(results_dir, target)
    if not (pipe.results / "data" / "shakespeare_gpt2" / "meta.json").exists():
        pipe.prepare_data(input_path, encodings="gpt2")
    for model, name in zip(models, names):
        init = str(Path(model).expanduser().resolve()) if Path(model).expanduser().is_dir() else model
        pipe.train(name, preset, max_iters=max_iters, overrides={**(overrides or {}), "init_from": init},
                   dataset="shakespeare_gpt2")
    return summarize(pipe.results, list(models))


def _row(model: str, run_dir: Path, base: Path) -> dict[str, Any]:
    recs = plots.read_records(run_dir)
    evals = metrics.of_kind(recs, "eval")
    ends = metrics.of_kind(recs, "end")
    row: dict[str, Any] = {"model": model, "run": run_dir.name, "n_params": metrics.meta(recs).get("n_params")}
    if not evals:
        stages = [r for r in plots.stage_records(run_dir) if r.get("reason")]
        row["status"] = "not run"
        row["reason"] = stages[-1]["reason"] if stages else "no metrics"
        try:  # its size from the one GPT-2 table, or the folder's config.json
            row["n_params"] = row["n_params"] or pretrained_config(model).n_params
        except UserError:
            pass
        return row
    s = summarize_run(run_dir, base)
    row.update(status=s["status"], reason=s["reason"], val_before=evals[0]["val_loss"] if evals[0]["iter"] == 0 else None,
               val_after=s["best_val_loss"], iters=s["last_iter"], wall_time_s=s["wall_time_s"],
               tokens_per_s=s["tokens_per_s"], peak_memory_bytes=ends[-1].get("peak_memory_bytes") if ends else None,
               device=s["device"], dtype=s["dtype"])
    return row


def _fmt(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table (losses in nats per token)."""
    head = ["model", "params", "val before", "val after", "time (s)", "peak memory (GiB)", "tokens/s", "status"]
    table = []
    for r in rows:
        reason = (r.get("reason") or "").split(" (the estimate is approximate")[0]
        status = r["status"] + (f": {reason}" if reason and r["status"] != "finished" else "")
        peak = r.get("peak_memory_bytes")
        table.append([f"`{Path(r['model']).name}`", _fmt(r.get("n_params") and r["n_params"] / 1e6, ".1f") +
                      ("M" if r.get("n_params") else ""), _fmt(r.get("val_before"), ".4f"),
                      _fmt(r.get("val_after"), ".4f"), _fmt(r.get("wall_time_s"), ".1f"),
                      _fmt(peak and peak / 2**30, ".2f"), _fmt(r.get("tokens_per_s"), ",.0f"), status])
    return markdown_table(head, table)


def summarize(results: str | Path, models: list[str]) -> dict[str, Any]:
    """Table rows, COMPARE.md, compare.json and the overlaid loss curves of `results/runs/compare-*`."""
    results = Path(results)
    rows = [_row(m, results / "runs" / run_name(m), results) for m in models]
    ran = [d for d in (results / "runs" / run_name(m) for m in models) if d.is_dir()]
    figures = []
    if any(r["status"] != "not run" for r in rows):
        with warnings.catch_warnings():  # runs that did not start are noted on the plots and in the table
            warnings.filterwarnings("ignore", message=r"compare_loss_vs_.*\.png: ", category=UserWarning)
            for x in ("iter", "elapsed"):
                png = plots.loss_curves(ran, results / f"compare_loss_vs_{x}.png", x=x, references=False,
                                        title=f"GPT-2 sizes, one fine-tuning recipe: loss vs {plots.X_AXES[x]}",
                                        base=results / "runs")
                figures.append(str(png.relative_to(results)))
    text = markdown(rows)
    (results / TABLE_FILE).write_text("# GPT-2 sizes fine-tuned with one recipe\n\n" + text + "\n", encoding="utf-8")
    out = {"rows": rows, "figures": figures, "table": text}
    (results / JSON_FILE).write_text(json.dumps(out, indent=2, default=str) + "\n", encoding="utf-8")
    return out
