"""The experiment as stages the notebooks call: prepare, train the baby GPT, fine-tune GPT-2, results.

Each stage is a `nanorepro` command run by the chosen runner in the results folder, so
`results/<id>/` ends up holding everything: `data/`, `runs/char/`, `runs/finetune/`, `stages.jsonl`,
plots, the report and the executed notebooks. Stages are idempotent: a re-run skips finished work
and resumes interrupted training. A training config is resolved and checked here, once, before any
job starts; the job reads it from the run's `config.json`. No torch here: the hub kernel imports this.
"""

from __future__ import annotations

import functools
import html
import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from nanorepro import config, metrics
from nanorepro.cloud.runner import get_runner, resolve_target, results_path
from nanorepro.errors import ModelUnavailable, UserError, WontFit
from nanorepro.fmt import markdown_table
from nanorepro.results import live, report
from nanorepro.results.references import load_references

# preset "auto": the A100 recipe on a Chameleon node, the laptop one here
AUTO_PRESETS = {"char": {"chameleon": "shakespeare-char", "local": "shakespeare-char-cpu"},
                "finetune": {"chameleon": "finetune-shakespeare", "local": "finetune-shakespeare-cpu"}}


class Table:
    """A small table as Markdown: Jupyter renders it, elsewhere it reads as text."""

    def __init__(self, header: list[str], rows: list[list[Any]]):
        self.header, self.rows = header, [[str(c) for c in r] for r in rows]

    def _repr_markdown_(self) -> str:
        return markdown_table(self.header, self.rows)

    __repr__ = _repr_markdown_


class Note(str):
    """A sentence for the reader: shown as text, not as a quoted string."""

    def _repr_markdown_(self) -> str:
        return str(self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))


class Summary(dict):
    """A training stage's summary: a dict to code, a few lines to a reader."""

    def _repr_markdown_(self) -> str:
        if self.get("status") != "finished":
            return f"**{self.get('run')}**: {self.get('status')}" + (f" ({self['reason']})" if self.get("reason") else "")
        wall = f", {self['elapsed_s']:.1f} s" if self.get("elapsed_s") is not None else ""
        target = self.get("target")
        verdict = "" if not target else (f" Reached its target, {target['val_loss']}." if target["reached"] else
                                         f" **Missed its target, {target['val_loss']}**: what its preset promises "
                                         "was not met by this run.")
        return (f"**{self['run']}**: finished at iteration {self['iters']}{wall}; validation loss "
                f"{_loss(self.get('first_val_loss'))} at the start, best {_loss(self.get('best_val_loss'))}.{verdict}")

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self._repr_markdown_().replace("**", ""))


def _loss(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


class SideBySide:
    """Two texts next to each other, each under its heading (an HTML table; plain text elsewhere)."""

    def __init__(self, left: tuple[str, str], right: tuple[str, str]):
        self.left, self.right = left, right

    def _repr_html_(self) -> str:
        cells = "".join(f'<td style="vertical-align:top;text-align:left;width:50%"><b>{html.escape(h)}</b>'
                        f'<pre style="white-space:pre-wrap">{html.escape(t)}</pre></td>' for h, t in (self.left, self.right))
        return f'<table style="width:100%;table-layout:fixed"><tr>{cells}</tr></table>'

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(f"{self.left[0]}\n{self.left[1]}\n\n========== after ==========\n{self.right[0]}\n{self.right[1]}")


def published_losses(preset: str) -> list[tuple[float, str]]:
    """The published validation losses of a preset's claims, for the live curve."""
    return [(c["value"], c.get("label") or c["id"]) for c in load_references()["claims"]
            if c.get("metric") == "best_val_loss" and c.get("value") is not None and preset in (c.get("presets") or [])]


def _names_the_lease(stage: Callable) -> Callable:
    """On a Chameleon node, a stage's failure, whatever it is (an interrupted kernel and a bug included), also
    says that the lease still runs, until when, and how to release it: the node costs SUs while the user
    reads the error."""
    @functools.wraps(stage)
    def run(self: "Pipeline", *args: Any, **kwargs: Any) -> Any:
        try:
            return stage(self, *args, **kwargs)
        except UserError as e:
            if self.target != "chameleon" or "STILL RUNNING" in e.problem:
                raise
            raise UserError(f"{e.problem}. The {_lease_note(self.results)}", e.fix) from e
        except BaseException as e:  # a traceback or ^C: said as it is, with the lease after it
            if self.target == "chameleon":
                note = f"The {_lease_note(self.results)}"
                print(f"\n{type(e).__name__} during {stage.__name__}. {note}", flush=True)
                e.add_note(note)
            raise
    return run


def _lease_note(results: Path) -> str:
    """still_running for the node recorded in `results`, or why it cannot be said."""
    from nanorepro.cloud import chameleon
    from nanorepro.cloud.node import NodeRecord

    try:
        return chameleon.still_running(NodeRecord.read(results) or NodeRecord(), results)
    except Exception as e:  # the record itself is unreadable: still point at the release
        return (f"lease recorded in {results} may still be running ({type(e).__name__} reading its record); "
                f"release it with notebooks/05_release_node.ipynb or `{chameleon.release_command(results)}`")


class Pipeline:
    """One reproduction, all its files under `results_dir`, its stages run on `target`."""

    def __init__(self, results_dir: str | Path | None = None, target: str = "auto"):
        self.target = resolve_target(target)  # auto: chameleon on Chameleon's JupyterHub, local elsewhere
        self.results = results_path(results_dir, self.target)  # None: results/<target>; an absolute path stays
        self.results.mkdir(parents=True, exist_ok=True)
        self.runner = get_runner(self.target, self.results)

    def preset(self, kind: str, preset: str) -> str:
        """`preset`, or for "auto" the recipe for this target (AUTO_PRESETS)."""
        return AUTO_PRESETS[kind][self.target] if preset == "auto" else preset

    # -- bookkeeping -------------------------------------------------------------------------
    def _record(self, name: str, status: str, started: float, **values: Any) -> None:
        metrics.append(self.results / metrics.STAGES_FILE, {"kind": "stage", "name": name, "status": status,
                                                            "elapsed_s": round(time.time() - started, 2), **values})

    # -- stages ------------------------------------------------------------------------------
    @_names_the_lease
    def prepare_data(self, input_path: str | None = None, encodings: str = "all") -> Table:
        """Tiny Shakespeare (or `input_path`) into char and GPT-2 token files; the counts as a table.

        If tiktoken cannot load the GPT-2 BPE files, the gpt2 encoding is recorded as not run and the
        char data (all the baby GPT needs) is still made."""
        rows = []
        for enc in (("char", "gpt2") if encodings == "all" else (encodings,)):
            started = time.time()
            args = ["prepare", "--data-root", "data", "--encoding", enc]
            if input_path:
                args += ["--input", self.runner.put(Path(input_path).expanduser(), "inputs/input.txt")]
            # on every node of a multi-node lease: each rank reads the data from its own disk
            code = self.runner.run(args, stage=f"prepare {enc}", check=enc != "gpt2", every_node=True)
            if code == ModelUnavailable.exit_code:
                reason = "the GPT-2 BPE files are not available offline"
                self._record(f"prepare {enc}", metrics.NOT_RUN, started, reason=reason)
                rows.append([enc, "-", "-", f"not run: {reason}"])
                continue
            if code:
                self._record(f"prepare {enc}", "failed", started, exit_code=code)
                raise UserError(f"stage prepare {enc} failed (exit {code})", "read the output above")
            meta = json.loads(self.runner.fetch(f"data/shakespeare_{enc}/meta.json", self.results).read_text())
            self._record(f"prepare {enc}", "finished", started,
                         **{k: meta[k] for k in ("vocab_size", "train_tokens", "val_tokens")})
            rows.append([enc, f"{meta['vocab_size']:,}", f"{meta['train_tokens']:,}", f"{meta['val_tokens']:,}"])
        return Table(["encoding", "vocab", "train tokens", "val tokens"], rows)

    @_names_the_lease
    def train(self, run: str, preset: str, seed: int = 1337, max_iters: int | None = None,
              overrides: dict[str, Any] | None = None, dataset: str = "shakespeare_char") -> dict[str, Any]:
        """Train (or resume) `runs/<run>` with `preset` and `overrides` (None values leave the preset's);
        the run's summary. The config is checked here, so a bad value fails in the notebook before any
        job starts; the job reads it from the run's config.json."""
        started = time.time()
        preset = self.preset("finetune" if dataset == "shakespeare_gpt2" else "char", preset)
        values = {"out_dir": f"runs/{run}", "data_root": "data", "dataset": dataset, "seed": seed,
                  "max_iters": max_iters, **(overrides or {})}
        cfg = config.resolve(preset, {k: v for k, v in values.items() if v is not None})
        cfg_path = self.results / cfg.out_dir / "config.json"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg.save(cfg_path)
        self.runner.put(cfg_path, f"{cfg.out_dir}/config.json")
        # the runner streams the stage's output (from here or a node) to stdout: its evaluation lines draw the curve
        curve = live.LossCurve(f"{run} ({preset}): loss while training", published_losses(preset))
        with live.following(curve):
            code = self.runner.run(["train", "--config", f"{cfg.out_dir}/config.json"], stage=f"train {run}",
                                   check=False, parallel=cfg.parallel)
        if code == ModelUnavailable.exit_code:
            return self._not_run(run, preset, started, f"pretrained weights for {cfg.init_from} are not available "
                                 "offline", hint=" (pass model=PATH to a local Hugging Face folder)")
        if code == WontFit.exit_code:
            return self._not_run(run, preset, started, self._refusal(run) or "it does not fit in the device's memory")
        if code:
            self._record(f"train {run}", "failed", started, exit_code=code, preset=preset)
            raise UserError(f"stage train {run} failed (exit {code})", "read the output above; re-running resumes")
        summary = self.summary(run)
        if curve.display:  # the whole run, earlier sessions of a resumed one included
            curve.load(metrics.read(self.results / "runs" / run / metrics.METRICS_FILE))
        self._record(f"train {run}", "finished", started, best_val_loss=summary["best_val_loss"], preset=preset)
        return summary

    def _not_run(self, run: str, preset: str, started: float, reason: str, hint: str = "") -> dict[str, Any]:
        """Record why training `run` could not run here; the summary that says so."""
        print(f"{run}: not run: {reason}{hint}")
        self._record(f"train {run}", metrics.NOT_RUN, started, reason=reason, preset=preset)
        return Summary(run=run, status=metrics.NOT_RUN, reason=reason)

    def _refusal(self, run: str) -> str | None:
        """The reason `train` wrote into the run's metrics when it refused to start."""
        try:
            records = metrics.read(self.runner.fetch(f"runs/{run}/{metrics.METRICS_FILE}", self.results))
        except (UserError, OSError):
            return None
        return next((r.get("reason") for r in reversed(metrics.of_kind(records, "stage"))), None)

    @_names_the_lease
    def summary(self, run: str) -> dict[str, Any]:
        """Best and final losses, iterations and wall time of `runs/<run>`, from its metrics file."""
        for name in (metrics.METRICS_FILE, "config.json", "env.json"):
            self.runner.fetch(f"runs/{run}/{name}", self.results)
        records = metrics.read(self.results / "runs" / run / metrics.METRICS_FILE)
        evals = metrics.of_kind(records, "eval")
        ends = metrics.of_kind(records, "end")
        return Summary(run=run, status="finished" if metrics.finished(records) else "incomplete",
                       best_val_loss=metrics.best_val_loss(records),
                       first_val_loss=evals[0]["val_loss"] if evals else None,
                       final_val_loss=evals[-1]["val_loss"] if evals else None,
                       iters=evals[-1]["iter"] if evals else 0,
                       elapsed_s=ends[-1]["elapsed_s"] if ends else None,
                       target=ends[-1].get("target") if ends else None)

    @_names_the_lease
    def sample(self, run: str | None = None, model: str | None = None, out: str | None = None,
               max_new_tokens: int = 300, seed: int = 1337, device: str | None = None) -> str:
        """Generated text from `runs/<run>` or a pretrained `model`, saved to `out` (relative to results);
        on `device`, by default the device the run's config names (a run trained on the CPU on purpose
        samples there too)."""
        args = ["sample", "--max-new-tokens", str(max_new_tokens), "--seed", str(seed)]
        cfg_path = self.results / "runs" / str(run) / "config.json"
        device = device or (json.loads(cfg_path.read_text()).get("device") if run and cfg_path.is_file() else None)
        args += ["--device", device] if device else []
        args += ["--run", f"runs/{run}"] if run else ["--model", str(model)]
        out = out or (f"runs/{run}/samples.txt" if run else f"samples-{Path(str(model)).name}.txt")
        args += ["--out", out]
        code = self.runner.run(args, stage="sample", check=False)
        if code == ModelUnavailable.exit_code:
            return f"(no sample: {model} is not available offline)"
        if code:
            raise UserError(f"sampling from {run or model} failed (exit {code})", "read the output above")
        return self.runner.fetch(out, self.results).read_text(encoding="utf-8")

    @_names_the_lease
    def finetune(self, preset: str, model: str | None = None, max_iters: int | None = None, seed: int = 1337,
                 run: str = "finetune", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """Fine-tune a pretrained GPT-2 (`model`, default the preset's) and sample before and after."""
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        preset = self.preset("finetune", preset)
        device = config.resolve(preset, overrides).device  # a bad preset or override fails here, before anything runs
        init = model or config.PRESETS[preset].get("init_from", "gpt2")
        if not (self.results / "data" / "shakespeare_gpt2" / "meta.json").exists():  # fetched back by prepare_data
            return Summary(self._not_run(run, preset, time.time(), "no GPT-2-encoded data (01_prepare_data could not "
                                         "get the GPT-2 BPE files)"), model=init)
        if Path(init).expanduser().is_dir():
            init = str(Path(init).expanduser().resolve())  # stages run in the results folder
        summary = self.train(run, preset, seed=seed, max_iters=max_iters, overrides={**overrides, "init_from": init},
                             dataset="shakespeare_gpt2")
        summary["model"] = init
        if summary["status"] != "finished":
            return summary
        summary["sample_before"] = self.sample(model=init, out=f"runs/{run}/samples_before.txt", seed=seed,
                                               max_new_tokens=200, device=device)
        summary["sample_after"] = self.sample(run=run, seed=seed, max_new_tokens=200)
        return summary

    @staticmethod
    def finetune_table(result: dict[str, Any]) -> Table | Note:
        """Validation loss before (iteration 0) and after fine-tuning, or why the stage did not run."""
        if result.get("status") != "finished":
            return Note(f"fine-tune not run: {result.get('reason', result.get('status'))}")
        rows = [["val loss before (pretrained)", f"{result['first_val_loss']:.4f}"],
                ["best val loss after", f"{result['best_val_loss']:.4f}"],
                ["iterations", result["iters"]], ["wall time (s)", f"{result['elapsed_s']:.1f}"]]
        return Table([result["model"], ""], rows)

    @staticmethod
    def finetune_samples(result: dict[str, Any]) -> SideBySide | Note:
        """The samples before and after fine-tuning side by side, each with its validation loss."""
        if "sample_after" not in result:
            return Note(f"no samples: fine-tune {result.get('status')}"
                        + (f" ({result['reason']})" if result.get("reason") else ""))
        before = (f"before: pretrained {Path(str(result.get('model'))).name}, val loss "
                  f"{_loss(result.get('first_val_loss'))}", result["sample_before"])
        after = (f"after {result.get('iters')} iterations: best val loss {_loss(result.get('best_val_loss'))}",
                 result["sample_after"])
        return SideBySide(before, after)

    def report(self) -> "ReportView":
        """Plots, REPORT.md and report.json for every run in this results folder (torch-free)."""
        runs_dir = self.results / "runs"
        runs = sorted({p.parent for p in runs_dir.glob("**/" + metrics.METRICS_FILE)})
        if not runs:
            raise UserError(f"no finished runs in {runs_dir}", "run 02_train_char (and 03_finetune_gpt2) first")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # report.json keeps them and the view lists them under its answer
            return ReportView(report.report(runs, self.results), self.results)


class ReportView:
    """What 04_results shows: the claims table (as its display), the plots and the samples."""

    def __init__(self, rep: dict[str, Any], results: Path):
        self.rep, self.results = rep, results

    def _repr_markdown_(self) -> str:
        return report.answer_first(self.rep)

    __repr__ = _repr_markdown_

    @property
    def plot_paths(self) -> list[Path]:
        return [self.results / p["file"] for p in self.rep["plots"]]

    def show_plots(self) -> None:
        """The loss-curve PNGs in a notebook; their paths elsewhere."""
        if not live.in_notebook():
            print("\n".join(str(p) for p in self.plot_paths))
            return
        from IPython.display import Image, display

        for p in self.plot_paths:
            display(Image(filename=str(p)))

    def show_samples(self) -> None:
        for path in sorted(self.results.glob("runs/*/samples*.txt")):
            print(f"==> {path.relative_to(self.results)}\n{path.read_text(encoding='utf-8')}")
