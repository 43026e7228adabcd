"""Loss curves from run folders: train and validation loss against iteration or wall time.

Reads only `metrics.jsonl` and `config.json`, never torch. Figures are drawn on a bare
`matplotlib.figure.Figure` (the Agg canvas) rather than pyplot, so nothing depends on a display
and a notebook's own backend is left alone.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Iterable

from nanorepro import metrics
from nanorepro.errors import UserError
from nanorepro.files import read_json
from nanorepro.results.references import load_references

X_AXES = {"iter": "iteration", "elapsed": "wall time"}
PNG_FILES = {"iter": "loss_vs_iter.png", "elapsed": "loss_vs_time.png"}


def check_run_dirs(run_dirs: Iterable[Path]) -> list[Path]:
    """The run folders as paths; a UserError when there are none or one does not exist."""
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise UserError("no run folders given", "pass one or more runs/<run> folders")
    for d in dirs:
        if not d.is_dir():
            raise UserError(f"run folder {d} does not exist", "pass folders made by `nanorepro train`")
    return dirs


def run_config(run_dir: Path, records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The run's resolved config: config.json, else the one in the metrics meta record, else {}."""
    path = Path(run_dir) / "config.json"
    cfg = read_json(path)
    if cfg is not None:
        return cfg
    if path.is_file():
        warnings.warn(f"{path} is not valid JSON; using the config in metrics.jsonl", stacklevel=2)
    if records is None:
        records = read_records(run_dir)
    return dict(metrics.meta(records).get("config") or {})


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl of a run folder, or [] when the run has not written one yet."""
    path = Path(run_dir) / metrics.METRICS_FILE
    return metrics.read(path) if path.is_file() else []


def run_label(run_dir: Path, base: Path | None = None) -> str:
    """The run's folder relative to `base` (e.g. tiny/seed-1), else its name."""
    run_dir = Path(run_dir)
    if base is not None and run_dir.resolve().is_relative_to(Path(base).resolve()):
        return run_dir.resolve().relative_to(Path(base).resolve()).as_posix()
    return run_dir.name


def stage_records(run_dir: Path) -> list[dict[str, Any]]:
    """Stage records about this run: its own, and the pipeline's `train <run>` entries in a
    stages.jsonl one or two folders up (results/<id>/stages.jsonl for results/<id>/runs/<run>)."""
    run_dir = Path(run_dir)
    out = metrics.of_kind(read_records(run_dir), "stage")
    for folder in list(run_dir.resolve().parents)[:2]:
        path = folder / metrics.STAGES_FILE
        if path.is_file():
            rel = run_dir.resolve().relative_to(folder).as_posix()
            names = {f"train {run_dir.name}", f"train {rel}", f"train {rel.removeprefix('runs/')}"}
            out += [r for r in metrics.of_kind(metrics.read(path), "stage") if r.get("name") in names]
    return out


def not_run_reason(records: list[dict[str, Any]]) -> str | None:
    """Why a run has no losses: a stage recorded as not run or failed, or nothing written yet."""
    latest = {r.get("name"): r for r in metrics.of_kind(records, "stage")}  # a retried stage counts as its last try
    for r in latest.values():
        if r.get("status") in (metrics.NOT_RUN, "failed"):
            return f"{r.get('name', 'stage')} {r['status']}" + (f": {r['reason']}" if r.get("reason") else "")
    return None if records else "no metrics yet"


def reference_lines(references: bool | list[dict[str, Any]], datasets: set[str]) -> list[dict[str, Any]]:
    """Published validation losses worth drawing: those for the datasets being plotted."""
    if references is False:
        return []
    if references is True:
        references = load_references()["claims"]
    return [c for c in references if c.get("metric") == "best_val_loss" and c.get("value") is not None
            and c.get("dataset") in datasets]


def loss_curves(run_dirs: Iterable[Path], out_png: Path, x: str = "iter",
                references: bool | list[dict[str, Any]] = True, title: str | None = None,
                base: Path | None = None) -> Path:
    """Train and val loss of runs against x ("iter" or "elapsed"), and the published losses for their datasets."""
    if x not in X_AXES:
        raise UserError(f"unknown x axis {x!r}", "use x='iter' or x='elapsed'")
    loaded = []
    for d in check_run_dirs(run_dirs):
        recs = read_records(d)
        loaded.append((d, recs, run_config(d, recs)))

    scale, unit = 1.0, "s"
    if x == "elapsed":
        longest = max((r.get("elapsed_s") or 0 for _, recs, _ in loaded for r in recs), default=0)
        if longest > 3 * 3600:
            scale, unit = 3600.0, "h"
        elif longest > 600:
            scale, unit = 60.0, "min"

    from matplotlib.figure import Figure  # here, not at import: ~0.4 s that `nanorepro train` never needs
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 5), dpi=110)
    ax = fig.add_subplot()
    key = "iter" if x == "iter" else "elapsed_s"

    def points(records: list[dict[str, Any]], loss: str) -> list[tuple[float, float]]:
        return [(r[key] / scale, r[loss]) for r in records if r.get(key) is not None and r.get(loss) is not None]

    notes, datasets = [], set()
    for i, (d, recs, cfg) in enumerate(loaded):
        name, color = run_label(d, base), f"C{i % 10}"
        if cfg.get("dataset"):
            datasets.add(cfg["dataset"])
        train = points(metrics.of_kind(recs, "train"), "loss")
        val = points(metrics.of_kind(recs, "eval"), "val_loss")
        etrain = points(metrics.of_kind(recs, "eval"), "train_loss")
        finite = [v for _, v in val if math.isfinite(v)]
        if train:
            # per-iteration loss is one noisy batch: faint, labelled only when no evaluation exists
            ax.plot(*zip(*train), color=color, alpha=0.25 if val else 0.8, lw=0.8,
                    label=None if val else f"{name}: train (per iter, no evaluation yet)")
        if etrain:
            ax.plot(*zip(*etrain), color=color, ls="--", lw=1.4, label=f"{name}: train (eval)")
        if val:
            best = f"best {min(finite):.4f}" if finite else "diverged"
            ax.plot(*zip(*val), color=color, marker="o", ms=3.5, lw=1.8, label=f"{name}: val ({best})")
        if not val:
            reason = (not_run_reason(recs + stage_records(d))
                      or ("no evaluation yet" if train else "no losses recorded yet"))
            notes.append(f"{name}: {reason}")
    plotted = bool(ax.lines)  # before the reference lines join them

    styles = [":", "-.", (0, (6, 2, 1, 2, 1, 2)), (0, (1, 3))]
    for j, c in enumerate(reference_lines(references, datasets)):
        ax.axhline(c["value"], color="0.3", ls=styles[j % len(styles)], lw=1.3,
                   label=f"published {c['value']:g}: {c.get('label') or c['id']}")

    ax.set_xlabel("iteration" if x == "iter" else f"wall time ({unit})")
    if x == "iter":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("cross-entropy loss (nats per token)")
    on = f" ({', '.join(sorted(datasets))})" if datasets else ""
    ax.set_title(title or f"Train and validation loss vs {X_AXES[x]}{on}")
    ax.grid(True, alpha=0.3)
    if notes:
        # under the x axis, where it hides neither curves nor reference lines
        ax.text(0.0, -0.14, "\n".join(notes), transform=ax.transAxes, fontsize=8, va="top", ha="left",
                bbox=dict(boxstyle="round", facecolor="lightyellow", alpha=0.9))
    if not plotted:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, 0.55, "No losses recorded", transform=ax.transAxes, ha="center", fontsize=13)
    if ax.get_legend_handles_labels()[0]:
        # outside the axes: curves of several runs fill the whole plot area
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, bbox_inches="tight")
    if notes:
        warnings.warn(f"{out_png.name}: " + "; ".join(notes), stacklevel=2)
    return out_png


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """loss_vs_iter.png and loss_vs_time.png for one run (into the run folder by default)."""
    return [loss_curves([run_dir], Path(out_dir or run_dir) / png, x=x) for x, png in PNG_FILES.items()]
