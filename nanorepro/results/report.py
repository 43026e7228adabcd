"""Judge run folders against the published numbers: REPORT.md, report.json and a .tar.gz bundle.

Everything here is computed from files: `metrics.jsonl`, `config.json`, `env.json` of each run,
the data folders' `meta.json`, and `references.json` (the published claims). No torch.

Verdicts: "reproduced" (within the claim's tolerance), "not reproduced", "not run" (no finished
run of that kind, with the reason), and "new result" for a claim with no published number.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
import tarfile
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Iterable

from nanorepro import __version__, envinfo, envlock, metrics
from nanorepro.config import GPT2_SIZES, PRESETS, resolve
from nanorepro.errors import UserError
from nanorepro.files import read_json, sha256_file, write_atomic, write_text_atomic
from nanorepro.fmt import duration, markdown_table, utc_timestamp
from nanorepro.results import plots
from nanorepro.results.references import DATA_METRICS, load_references

# Fields a run may change and still be "the published recipe": where files go, which seed,
# which device/precision/compiler runs it, how often it prints. Everything else must match the preset.
NEUTRAL_FIELDS = {"out_dir", "data_root", "seed", "device", "dtype", "compile", "log_interval",
                  "always_save_checkpoint", "save_checkpoint", "vocab_size", "parallel", "activation_checkpointing",
                  "preset"}
# For a GPT-2 init the model's shape comes from the checkpoint, whatever the config said.
PRETRAINED_SHAPE_FIELDS = {"n_layer", "n_head", "n_embd", "bias"}
EPS = 1e-9


# ----------------------------------------------------------------------------- one run

def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _encoding(cfg: dict[str, Any], data_meta: dict[str, Any] | None) -> str | None:
    if data_meta and data_meta.get("encoding"):
        return str(data_meta["encoding"])
    ds = str(cfg.get("dataset") or "")
    if ds.endswith("_char"):
        return "char"
    if ds.endswith("_gpt2") or cfg.get("init_from", "scratch") != "scratch":
        return "gpt2"
    return None


def loss_units(loss: float | None, encoding: str | None) -> dict[str, float | None]:
    """A loss in nats per token, and the unit readers compare: bits/char (char) or perplexity (BPE)."""
    out: dict[str, float | None] = {"loss_nats": loss}
    if loss is not None and encoding == "char":
        out["bits_per_char"] = loss / math.log(2)
    elif loss is not None and encoding is not None:
        out["perplexity"] = math.exp(loss)
    return out


def _find_data_dir(run_dir: Path, cfg: dict[str, Any]) -> Path | None:
    """The data folder a run trained on: data_root/dataset, tried from the working directory and
    from the run folder's ancestors (runs/<run> sits next to data/ in a checkout)."""
    if not cfg.get("dataset"):
        return None
    root = Path(cfg.get("data_root") or "data") / cfg["dataset"]  # an absolute root ignores the folder before it
    found = (base / root for base in [Path.cwd(), *Path(run_dir).resolve().parents[:4]])
    return next((d for d in found if (d / "meta.json").is_file()), None)


def _data_value(meta: dict[str, Any], metric: str) -> int | None:
    """A count from meta.json (as `nanorepro prepare` writes it). The text's length is not stored:
    a character encoding has one token per character, so it is the two splits together."""
    if metric == "input_chars":
        if meta.get("encoding") != "char":
            return None
        splits = [meta.get("train_tokens"), meta.get("val_tokens")]
        return sum(splits) if all(isinstance(v, int) for v in splits) else None
    value = meta.get(metric)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def deviations(cfg: dict[str, Any], preset: str | None) -> list[str] | None:
    """Settings where a run differs from its preset beyond NEUTRAL_FIELDS; None if the preset is unknown."""
    if not preset or preset not in PRESETS:
        return None
    ref = resolve(preset).to_dict()
    neutral = NEUTRAL_FIELDS | (PRETRAINED_SHAPE_FIELDS if ref["init_from"] != "scratch" else set())
    out = []
    for k, v in ref.items():
        if k in neutral or k not in cfg:
            continue
        mine = cfg[k]
        same = math.isclose(mine, v) if isinstance(v, float) and isinstance(mine, (int, float)) else mine == v
        if k == "init_from" and not same and v in GPT2_SIZES and mine not in GPT2_SIZES:
            # a local copy of gpt2-xl is still gpt2-xl: the same shape
            same = all(cfg.get(f) == getattr(GPT2_SIZES[v], f) for f in ("n_layer", "n_head", "n_embd"))
        if not same:
            out.append(f"{k}={mine!r} (preset {v!r})")
    return out


def device_name(env: dict[str, Any], device: str | None) -> str:
    """What a run ran on: the GPU model, or the CPU when the (resolved) device was the CPU."""
    hw = env.get("hardware", {})
    want = str(device or "")
    if hw.get("gpu_count") and not want.startswith(("cpu", "mps")):
        return (f"{hw['gpu_count']}x " if hw["gpu_count"] > 1 else "") + str(hw.get("gpu_model"))
    if hw.get("cpu_model"):
        return f"CPU: {hw['cpu_model']} ({hw.get('cpu_count')} cores)"
    return want or "unknown"


def summarize_run(run_dir: Path, base: Path | None = None) -> dict[str, Any]:
    """Everything the report says about one run folder, computed from its files."""
    run_dir = Path(run_dir)
    recs = plots.read_records(run_dir)
    cfg = plots.run_config(run_dir, recs)
    meta = metrics.meta(recs)
    env = envinfo.read(run_dir)
    preset = meta.get("preset") or cfg.get("preset")
    data_dir = _find_data_dir(run_dir, cfg)
    data_meta = read_json(data_dir / "meta.json") if data_dir else None
    encoding = _encoding(cfg, data_meta)

    evals = [r for r in metrics.of_kind(recs, "eval") if _finite(r.get("val_loss")) is not None]
    best = min(evals, key=lambda r: r["val_loss"]) if evals else None
    ends = metrics.of_kind(recs, "end")
    end_wall = _finite(ends[-1].get("elapsed_s")) if ends else None
    wall = end_wall if end_wall is not None else max(
        (e for r in recs if (e := _finite(r.get("elapsed_s"))) is not None), default=None)
    # the first logged iteration carries start-up (and torch.compile) time: leave it out of the rate
    rates = [r["tokens_per_s"] for r in metrics.of_kind(recs, "train")[1:] if _finite(r.get("tokens_per_s"))]
    last_iter = max((r["iter"] for r in recs if r.get("kind") in ("train", "eval", "end")
                     and isinstance(r.get("iter"), int)), default=None)
    batch = [cfg.get(k) for k in ("batch_size", "gradient_accumulation_steps", "block_size")]
    tpi = math.prod(batch) if all(isinstance(v, int) for v in batch) else None

    stage_recs = plots.stage_records(run_dir)
    reason = plots.not_run_reason(recs + stage_recs)
    if metrics.finished(recs):
        status = "finished"
    elif reason:
        status = "failed" if " failed" in reason else metrics.NOT_RUN
    elif ends:
        status = str(ends[-1].get("status") or "ended")
    else:
        status = "incomplete"
    stages = [{"name": r.get("name"), "status": r.get("status"), "elapsed_s": _finite(r.get("elapsed_s")),
               "reason": r.get("reason")} for r in stage_recs]
    return {
        "name": plots.run_label(run_dir, base),
        "path": str(run_dir),
        "preset": preset,
        "seed": cfg.get("seed"),
        "dataset": cfg.get("dataset"),
        "encoding": encoding,
        "init_from": cfg.get("init_from"),
        "status": status,
        "reason": reason if status != "finished" else None,
        "best_val_loss": best["val_loss"] if best else None,
        "best_val_iter": best.get("iter") if best else None,
        "best_val_units": loss_units(best["val_loss"] if best else None, encoding),
        "last_iter": last_iter,
        "max_iters": cfg.get("max_iters"),
        "tokens_per_iter": tpi,
        "tokens_seen": tpi * last_iter if tpi and last_iter is not None else None,
        "tokens_per_s": statistics.median(rates) if rates else None,
        "wall_time_s": wall,
        "stages": stages,
        "device": device_name(env, meta.get("device") or cfg.get("device")),
        "dtype": meta.get("dtype") or cfg.get("dtype"),  # the resolved one (auto -> float32/bfloat16)
        "deviations": deviations(cfg, preset),
        "data_dir": str(data_dir) if data_dir else None,
        "data_meta": data_meta,
        "config": cfg,
        "env": env,
        # uv.lock's sha256 and whether the run's environment matched it (envlock.status, in env.json)
        "lock": env.get("lock") if env else None,
        # the config's target_val_loss and whether the finished run reached it
        "target": (metrics.target_verdict(cfg["target_val_loss"], best["val_loss"] if best else math.nan)
                   if cfg.get("target_val_loss") is not None and status == "finished" else None),
    }


# ----------------------------------------------------------------------------- claims

def _stats(values: list[float]) -> dict[str, Any]:
    n = len(values)
    return {"n": n, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if n > 1 else None,  # sample std (ddof=1): a few seeds
            "min": min(values), "max": max(values)}


def _agrees(measured: float, claim: dict[str, Any]) -> bool:
    value, tol = claim["value"], claim["tolerance"] or 0
    if claim.get("direction") == "at_most":
        return measured <= value + tol + EPS
    return abs(measured - value) <= tol + EPS


def _spread_vs(st: dict[str, Any], claim: dict[str, Any]) -> dict[str, bool]:
    """How several runs' values stand against a published one."""
    return {"published_in_range": st["min"] - EPS <= claim["value"] <= st["max"] + EPS,
            "within_tolerance_of_mean": _agrees(st["mean"], claim)}


def judge(claim: dict[str, Any], runs: list[dict[str, Any]], sources: dict[str, Any],
          stages: list[dict[str, Any]], datasets: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One row of the claims table: the measured value and the verdict, with why. The pipeline's `stages` explain
    a missing run; its prepared `datasets` (name -> (folder, meta)) count when no run used one."""
    src = sources.get(claim["source"], {})
    row = {k: claim.get(k) for k in ("id", "description", "metric", "unit", "value", "tolerance", "direction",
                                     "tolerance_reason", "presets", "dataset", "requires", "context_only")}
    row.update(source=src.get("title"), source_url=src.get("url"), measured=None, stats=None, runs=[], notes=[])

    def verdict_from(values: list[float]) -> None:
        st = _stats(values)
        row["stats"], row["measured"] = st, st["mean"]
        if claim["value"] is None:
            row["verdict"] = "new result"
            return
        row["verdict"] = "reproduced" if _agrees(st["mean"], claim) else "not reproduced"
        if st["n"] > 1:
            st.update(_spread_vs(st, claim))

    if claim["metric"] in DATA_METRICS:
        users = [r for r in runs if r["dataset"] == claim["dataset"] and r["data_meta"] is not None]
        found = {r["data_dir"]: _data_value(r["data_meta"], claim["metric"]) for r in users}
        prepared = datasets.get(claim["dataset"])
        if not found and prepared:  # prepared by the pipeline, used by no run (e.g. a fine-tune not run)
            found[prepared[0]] = _data_value(prepared[1], claim["metric"])
            row["notes"].append(f"from the prepared {claim['dataset']}/meta.json (no run used it)")
        values = [v for v in found.values() if v is not None]
        if not values:
            row["verdict"] = metrics.NOT_RUN
            where = f"{claim['dataset']}/meta.json"
            row["notes"].append(f"{where} has no {claim['metric']}" if found
                                else f"no {where} with {claim['metric']} found through the runs' configs")
            return row
        row["runs"], row["data_dirs"] = [r["name"] for r in users], sorted(found)
        verdict_from([float(v) for v in values])
        if len(set(values)) == 1:
            row["measured"] = values[0]  # the count itself, not a float mean
        else:
            row["notes"].append(f"data folders disagree: {sorted(set(values))}")
            if claim["value"] is not None:
                row["verdict"] = "not reproduced"
        return row

    mine = [r for r in runs if r["preset"] in claim["presets"]]
    if not mine:
        row["verdict"] = metrics.NOT_RUN
        row["notes"].append(f"no run of preset {' / '.join(claim['presets'])}")
        latest = {s.get("name"): s for s in stages}
        for s in latest.values():
            if s.get("preset") in claim["presets"] and s.get("status") != "finished":
                row["notes"].append(f"stage {s['name']} {s['status']}" + (f": {s['reason']}" if s.get("reason") else ""))
        return row
    gpu = (claim.get("requires") or {}).get("gpu")
    done = []  # the runs that count: the published recipe, finished, on the hardware the claim needs
    for r in mine:
        if r["deviations"]:
            row["notes"].append(f"{r['name']} changed the recipe ({', '.join(r['deviations'])}): not counted")
            continue
        if r["deviations"] is None:
            row["notes"].append(f"{r['name']}: preset {r['preset']!r} unknown to this version, settings not checked")
        if gpu and gpu.lower() not in r["device"].lower():
            t = f", {r['wall_time_s']:.0f} s" if r["wall_time_s"] is not None else ""
            row["notes"].append(f"{r['name']} ran on {r['device']}{t}, not an {gpu}: not comparable")
        elif r["status"] != "finished" or r[claim["metric"]] is None:
            why = r["reason"] or f"stopped at iter {r['last_iter']} of {r['max_iters']}"
            row["notes"].append(f"{r['name']}: {r['status']} ({why})")
        else:
            done.append(r)
    if not done:
        row["verdict"] = metrics.NOT_RUN
        return row
    row["runs"] = [r["name"] for r in done]
    verdict_from([float(r[claim["metric"]]) for r in done])
    return row


# ----------------------------------------------------------------------------- seed groups

def seed_groups(runs: list[dict[str, Any]], claims: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished runs that share a preset and differ only by seed (and folder): spread of the best val loss."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        if r["status"] != "finished" or r["best_val_loss"] is None:
            continue
        key_cfg = {k: v for k, v in r["config"].items() if k not in ("out_dir", "seed")}
        groups.setdefault((str(r["preset"]), json.dumps(key_cfg, sort_keys=True, default=str)), []).append(r)
    out = []
    for (preset, _), members in groups.items():
        if len(members) < 2:
            continue
        members.sort(key=lambda r: (r["seed"] is None, r["seed"]))
        st = _stats([r["best_val_loss"] for r in members])
        g = {"preset": preset, "runs": [r["name"] for r in members], "seeds": [r["seed"] for r in members],
             "values": [r["best_val_loss"] for r in members], **st,
             "claim": None, "published": None, "tolerance": None,
             "published_in_range": None, "within_tolerance_of_mean": None}
        c = next((c for c in claims if c["metric"] == "best_val_loss" and c["value"] is not None
                  and preset in (c.get("presets") or [])), None)
        if c and not members[0]["deviations"]:
            g.update(claim=c["id"], published=c["value"], tolerance=c["tolerance"], **_spread_vs(st, c))
        out.append(g)
    return out


# ----------------------------------------------------------------------------- formatting

def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 10000 else f"{x:.{digits}f}"
    return str(x)


def _units_text(units: dict[str, float | None]) -> str:
    """The reader's unit of a loss_units() dict: bits/char or perplexity."""
    if units.get("bits_per_char") is not None:
        return f"{units['bits_per_char']:.3f} bits/char"
    return f"ppl {units['perplexity']:.2f}" if units.get("perplexity") is not None else "–"


def _measured_text(row: dict[str, Any]) -> str:
    m = row["measured"]
    if m is None:
        return "–"
    if row["metric"] == "wall_time_s":
        text = duration(m)
    elif row["metric"] in DATA_METRICS:
        text = _fmt(int(m)) if float(m).is_integer() else _fmt(m)
    else:
        enc = "char" if str(row.get("dataset")).endswith("_char") else "gpt2"
        text = f"{m:.4f} ({_units_text(loss_units(m, enc))})"
    st = row["stats"]
    if st and st["n"] > 1:
        text += f", mean of {st['n']} (std {st['std']:.4f}, {st['min']:.4f}–{st['max']:.4f})"
    return text


def _published_text(row: dict[str, Any]) -> str:
    v = row["value"]
    if v is None:
        return "no published number"
    if row["metric"] == "wall_time_s":
        return f"about {duration(v)}" + (f" on {row['requires']['gpu']}" if row.get("requires") else "")
    return _fmt(v) if isinstance(v, int) else f"{v:g}"


def _tolerance_text(row: dict[str, Any]) -> str:
    t = row["tolerance"]
    if t is None:
        return "–"
    if t == 0:
        return "exact"
    t_txt = duration(t) if row["metric"] == "wall_time_s" else f"{t:g}"
    return f"≤ +{t_txt}" if row.get("direction") == "at_most" else f"±{t_txt}"


def claims_table(rows: list[dict[str, Any]], compact: bool = False) -> str:
    """The claims as a markdown table; `compact` (for the terminal) leaves out descriptions and sources."""
    body = []
    for r in rows:
        cells = [_published_text(r), _measured_text(r), _tolerance_text(r),
                 r["verdict"] if compact else f"**{r['verdict']}**", "; ".join(r["notes"]) or ", ".join(r["runs"])]
        src = f"[{r['source']}]({r['source_url']})" if r.get("source_url") else (r.get("source") or "")
        body.append([r["id"], *cells] if compact else [f"**{r['id']}**: {r['description']}", src, *cells])
    header = ["published", "measured", "tolerance", "verdict", "runs / notes"]
    return markdown_table(["claim", *header] if compact else ["claim", "source", *header], body)


def verdict_line(rows: list[dict[str, Any]]) -> str:
    """The headline: how many claims got each verdict."""
    counts = {v: sum(1 for c in rows if c["verdict"] == v)
              for v in ("reproduced", "not reproduced", metrics.NOT_RUN, "new result")}
    return "**Verdicts:** " + ", ".join(f"{n} {v}" for v, n in counts.items()) + "."


def how_to_run(row: dict[str, Any]) -> str:
    """One line saying what produces a judgement of this claim."""
    if row["metric"] in DATA_METRICS:
        enc = "char" if str(row.get("dataset")).endswith("_char") else "gpt2"
        return f"run `01_prepare_data` (`nanorepro prepare --encoding {enc}`)"
    preset = (row.get("presets") or ["?"])[0]
    if preset.startswith("finetune"):
        how = f'run `03_finetune_gpt2` with `finetune_preset = "{preset}"`'
    elif row.get("dataset") == "shakespeare_char":
        how = f'run `02_train_char` with `char_preset = "{preset}"`'
    else:
        how = f"`nanorepro prepare --dataset {row.get('dataset')}`, then `nanorepro train --preset {preset}`"
    gpu = (row.get("requires") or {}).get("gpu")
    if not gpu and PRESETS.get(preset, {}).get("device") != "cpu":
        gpu = "GPU"  # a GPU recipe: hours or days on a CPU
    node = (f"an {gpu}" if gpu[0] in "AEIOU" else f"a {gpu}") if gpu else ""
    where = f' on {node} node (`target = "chameleon"`, reserved by `00_reserve_node`)' if gpu else ""
    return how + where + ", without overrides"


def _judged_here(row: dict[str, Any]) -> bool:
    """A claim this folder says something about: judged, or a run of its preset exists but did not count."""
    if row["verdict"] != metrics.NOT_RUN:
        return True
    return row["metric"] not in DATA_METRICS and not any(n.startswith("no run of preset") for n in row["notes"])


def answer_first(rep: dict[str, Any]) -> str:
    """What 04_results shows first: the verdicts, a compact table of the claims this folder judged, then
    the claims it could not judge folded away, each with how to run it. REPORT.md keeps the full table."""
    rows = rep["claims"]
    judged = [r for r in rows if _judged_here(r)]
    missing = [r for r in rows if not _judged_here(r) and not r.get("context_only")]
    context = [r for r in rows if not _judged_here(r) and r.get("context_only")]
    L = [verdict_line(rows), ""]
    L.append(claims_table(judged, compact=True) if judged else "No claim could be judged from this folder.")
    for title, group in ((f"{len(missing)} claim(s) not run: no run of their preset in this folder", missing),
                         (f"{len(context)} context-only baseline(s), not part of this project's runs", context)):
        if not group:
            continue
        L += ["", f"<details><summary>{title}</summary>", ""]
        for r in group:
            why = "; ".join(n for n in r["notes"] if not n.startswith("no run of preset"))
            published = f"published {_published_text(r)}" if r["value"] is not None else "no published number"
            L.append(f"- **{r['id']}** ({published}): {how_to_run(r)}"
                     + (f". Here: {why}" if why else ""))
        L += ["", "</details>"]
    if rep.get("warnings"):
        L += ["", "**Warnings:**", "", *[f"- {w}" for w in rep["warnings"]]]
    L += ["", "The full table, with sources and why each tolerance: `REPORT.md` in the results folder."]
    return "\n".join(L)


def _markdown(rep: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    L: list[str] = []
    L.append("# nanorepro report\n")
    L.append(f"Generated {rep['generated_at']} by nanorepro {rep['nanorepro_version']} from "
             f"{len(runs)} run folder(s): " + ", ".join(f"`{r['name']}`" for r in runs) + ".\n")
    L.append(verdict_line(rep["claims"]) + "\n")
    L.append("Losses are cross-entropy in nats per token. Character models also show bits per character "
             "(loss / ln 2); GPT-2 BPE models show perplexity (exp(loss)).\n")

    L.append("## Claims\n")
    L.append("A claim is judged on finished runs of its preset whose settings match the published recipe "
             "(only output folder, seed, device, precision, compile and logging may differ); with several "
             "such runs the verdict uses their mean.\n")
    L.append(claims_table(rep["claims"]) + "\n")
    L.append("Why each tolerance:\n")
    for c in rep["claims"]:
        if c.get("tolerance_reason"):
            L.append(f"- **{c['id']}** ({_tolerance_text(c)}): {c['tolerance_reason']}")
    L.append("")

    if rep["new_results"]:
        L.append("## New results (no published number)\n")
        for n in rep["new_results"]:
            u = n["best_val_units"]
            extra = f", perplexity {u['perplexity']:.2f}" if u.get("perplexity") else ""
            L.append(f"- **{n['claim']}** — run `{n['run']}`: best validation loss **{n['best_val_loss']:.4f}** "
                     f"nats{extra} at iteration {n['best_val_iter']}. Conditions: model {n['model']}, "
                     f"{n['iters']} iterations, batch {n['batch']}, ≈{_fmt(n['tokens'])} training tokens, "
                     f"{n['device']}, dtype {n['dtype']}, wall time {duration(n['wall_time_s'])}.")
        L.append("")

    L.append("## Variance across seeds\n")
    if rep["seed_groups"]:
        rows = [[g["preset"], ", ".join(str(s) for s in g["seeds"]), g["n"], f"{g['mean']:.4f}", f"{g['std']:.4f}",
                 f"{g['min']:.4f}–{g['max']:.4f}", _fmt(g["published"]), _fmt(g["published_in_range"]),
                 _fmt(g["within_tolerance_of_mean"])] for g in rep["seed_groups"]]
        L.append(markdown_table(["preset", "seeds", "n", "mean best val", "std (n−1)", "min–max", "published",
                         "published in [min, max]", "within ±tol of mean"], rows) + "\n")
    else:
        L.append("No group of finished runs that differ only by seed.\n")

    L.append("## Runs compared\n")
    for p in rep["plots"]:
        L.append(f"![{p['title']}]({p['file']})\n")
    rows = []
    for r in runs:
        status = r["status"] + (f" ({r['reason']})" if r["reason"] else "")
        if r["target"]:
            status += (f", target {r['target']['val_loss']} reached" if r["target"]["reached"]
                       else f", **missed its target {r['target']['val_loss']}**")
        rows.append([f"`{r['name']}`", r["preset"] or "–", r["seed"], status, _fmt(r["best_val_loss"]),
                     _units_text(r["best_val_units"]), f"{_fmt(r['last_iter'])} / {_fmt(r['max_iters'])}",
                     duration(r["wall_time_s"]), _fmt(r["tokens_per_s"], 0), r["device"]])
    L.append(markdown_table(["run", "preset", "seed", "status", "best val (nats)", "best val", "iters",
                     "wall time", "tokens/s", "device"], rows) + "\n")

    L.append("## Wall time per stage\n")
    rows = [["pipeline", s["name"], s["status"], duration(s["elapsed_s"]), s.get("reason") or ""]
            for s in rep["pipeline_stages"]]
    rows += [[f"`{r['name']}`", "training run (metrics)", r["status"], duration(r["wall_time_s"]), r["reason"] or ""]
             for r in runs]
    L.append(markdown_table(["where", "stage", "status", "wall time", "reason"], rows) + "\n")
    what = "pipeline stages" if rep["pipeline_stages"] else "runs"
    L.append(f"Total wall time over all {what}: {duration(rep['total_wall_time_s'])}.\n")

    L.append("## Environment\n")
    rows: dict[tuple, list[str]] = {}  # runs on the same machine and software share a row
    for r in runs:
        e = r["env"]
        if not e:
            rows.setdefault(("no env.json",) + ("",) * 8, []).append(f"`{r['name']}`")
            continue
        hw, pk, git = e.get("hardware", {}), e.get("packages", {}), e.get("nanorepro", {})
        mem = hw.get("memory_total_bytes")
        commit = (git.get("commit") or "not a git checkout")[:12] + (" (dirty)" if git.get("dirty") else "")
        gpu = f"{hw.get('gpu_count')}x {hw.get('gpu_model')}" if hw.get("gpu_count") else "none"
        key = (e.get("hostname", ""), lock_text(e.get("lock")),
               f"{hw.get('cpu_model')} ({hw.get('cpu_count')} cores)",
               f"{mem / 2**30:.0f} GiB" if mem else "–", gpu,
               f"driver {hw.get('driver_version') or '–'}, CUDA {hw.get('cuda_version') or '–'}",
               e.get("os", {}).get("platform", ""),
               f"Python {e.get('python', {}).get('version')}, torch {pk.get('torch')}, transformers "
               f"{pk.get('transformers')}, tiktoken {pk.get('tiktoken')}, numpy {pk.get('numpy')}",
               f"{git.get('version')} @ {commit}")
        rows.setdefault(key, []).append(f"`{r['name']}`")
    L.append(markdown_table(["runs", "host", "packages", "CPU", "memory", "GPU", "driver / CUDA", "OS", "software",
                             "nanorepro"],
                    [[", ".join(names), *key] for key, names in rows.items()]) + "\n")
    if rep["warnings"]:
        L += ["## Warnings\n", *[f"- {w}" for w in rep["warnings"]], ""]
    return "\n".join(L)


def lock_text(lock: dict[str, Any] | None) -> str:
    """The packages column: uv.lock's hash and 'matches the lock', or what differed (marked)."""
    text = envlock.describe(lock)
    return text.replace("differs from the lock", "**differs from the lock**")


# ----------------------------------------------------------------------------- entry points

def default_out_dir(run_dirs: Iterable[Path]) -> Path:
    """The common parent of the runs: runs/x for runs/x/seed-*, runs for runs/a and runs/b."""
    return Path(os.path.commonpath([Path(d).resolve().parent for d in run_dirs]))


def _pipeline_stages(dirs: list[Path], out_dir: Path) -> list[dict[str, Any]]:
    """Every stage in the pipeline's stages.jsonl (in out_dir, or one or two folders above a run)."""
    files = dict.fromkeys(p.resolve() / metrics.STAGES_FILE
                          for p in [out_dir] + [q for d in dirs for q in list(d.resolve().parents)[:2]])
    return [{k: r.get(k) for k in ("name", "status", "elapsed_s", "reason", "preset")}
            for f in files if f.is_file() for r in metrics.of_kind(metrics.read(f), "stage")]


def _prepared_datasets(out_dir: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """The datasets whose meta.json the pipeline's prepare stages copied into <results>/data/."""
    found = {p.parent.name: (str(p.parent), read_json(p)) for p in sorted((out_dir / "data").glob("*/meta.json"))}
    return {name: entry for name, entry in found.items() if entry[1] is not None}


def report(run_dirs: list[Path], out_dir: Path | None = None, references: Path | None = None) -> dict[str, Any]:
    """Write REPORT.md, report.json and the loss-curve PNGs into out_dir; return report.json's content."""
    dirs = plots.check_run_dirs(run_dirs)
    base = default_out_dir(dirs)
    out_dir = Path(out_dir) if out_dir else base
    out_dir.mkdir(parents=True, exist_ok=True)
    refs = load_references(references)
    plot_files = [{"file": plots.PNG_FILES[x], "title": f"train and val loss vs {name}", "x": x}
                  for x, name in plots.X_AXES.items()]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        runs = [summarize_run(d, base) for d in dirs]
        for p in plot_files:
            plots.loss_curves(dirs, out_dir / p["file"], x=p["x"], references=refs["claims"], base=base)
    caught = [str(m.message) for m in w]
    for m in w:
        warnings.warn(m.message, stacklevel=2)  # pass on: a torn metrics line must stay visible
    caught += [f"`{r['name']}` ran in an environment that differs from its uv.lock: {lock_text(r['lock'])}"
               for r in runs if (r["lock"] or {}).get("matches") is False]
    caught += [f"`{r['name']}` {metrics.missed_text(r['target'], r['best_val_loss'], r['preset'])}"
               for r in runs if r["target"] and not r["target"]["reached"]]

    pipeline_stages = _pipeline_stages(dirs, out_dir)
    claims = [judge(c, runs, refs.get("sources", {}), pipeline_stages, _prepared_datasets(out_dir))
              for c in refs["claims"]]
    new_results = []
    for c in claims:
        if c["verdict"] != "new result":
            continue
        for r in (r for r in runs if r["name"] in c["runs"]):
            cfg = r["config"]
            new_results.append({
                "claim": c["id"], "run": r["name"], "best_val_loss": r["best_val_loss"],
                "best_val_iter": r["best_val_iter"], "best_val_units": r["best_val_units"],
                "model": cfg.get("init_from"), "iters": r["last_iter"],
                "batch": (f"{cfg.get('batch_size')} x {cfg.get('gradient_accumulation_steps')} accumulation x "
                          f"{cfg.get('block_size')} tokens = {_fmt(r['tokens_per_iter'])} tokens/iter"),
                "tokens": r["tokens_seen"], "device": r["device"], "dtype": r["dtype"],
                "wall_time_s": r["wall_time_s"],
            })
    walls = ([s["elapsed_s"] for s in pipeline_stages if _finite(s.get("elapsed_s")) is not None] if pipeline_stages
             else [r["wall_time_s"] for r in runs if r["wall_time_s"] is not None])
    rep = {
        "generated_at": utc_timestamp(),
        "nanorepro_version": __version__,
        "claims": claims,
        "new_results": new_results,
        "seed_groups": seed_groups(runs, refs["claims"]),
        "runs": [{k: v for k, v in r.items() if k not in ("env", "data_meta")}
                 | {"env_summary": envinfo.summary(r["env"]) if r["env"] else None} for r in runs],
        "plots": plot_files,
        "pipeline_stages": pipeline_stages,
        "total_wall_time_s": sum(walls) if walls else None,
        "warnings": caught,
    }
    rep = json.loads(json.dumps(rep), parse_constant=lambda _: None)  # NaN and infinities (a diverged run): null
    write_text_atomic(out_dir / "REPORT.md", _markdown(rep, runs))
    write_text_atomic(out_dir / "report.json", json.dumps(rep, indent=2, allow_nan=False) + "\n")
    rep["out_dir"] = str(out_dir)
    return rep


RUN_FILES = ("config.json", "env.json", "metrics.jsonl", "samples.txt")
RESULT_SUFFIXES = (".md", ".json", ".jsonl", ".png", ".ipynb", ".html", ".txt")


def _notebooks(folder: Path) -> list[Path]:
    """Executed notebooks in a folder or one folder down, but not in another run folder or Jupyter's checkpoints."""
    found = sorted([*folder.glob("*.ipynb"), *folder.glob("*/*.ipynb")])
    return [p for p in found if p.parent == folder
            or (p.parent.name != ".ipynb_checkpoints" and not (p.parent / metrics.METRICS_FILE).is_file())]


def bundle(run_dirs: list[Path], out_path: Path | None = None, include_checkpoints: bool = False,
           results_dir: Path | None = None) -> Path:
    """One .tar.gz with a fresh report, each run's config/env/metrics/samples/plots, executed notebooks,
    and MANIFEST.json (sha256 of every member). Checkpoints only when asked: they are large."""
    dirs = plots.check_run_dirs(run_dirs)
    base = default_out_dir(dirs)
    results_dir = Path(results_dir) if results_dir else base
    out_path = Path(out_path) if out_path else base / f"{base.name or 'nanorepro'}-bundle.tar.gz"
    if not out_path.name.endswith((".tar.gz", ".tgz")):
        raise UserError(f"bundle name {out_path.name!r} is not a .tar.gz", "end the name with .tar.gz")
    report(dirs, results_dir)
    root = out_path.name.removesuffix(".tar.gz").removesuffix(".tgz")
    results = [f for f in sorted(results_dir.iterdir()) if f.is_file() and f.suffix in RESULT_SUFFIXES]
    results += [nb for nb in _notebooks(results_dir) if nb.parent != results_dir]
    members = [(f, f"{root}/report/{f.relative_to(results_dir).as_posix()}") for f in results]
    wanted = RUN_FILES + (("ckpt.pt",) if include_checkpoints else ())
    for d in dirs:
        name = plots.run_label(d, base)
        files = [d / f for f in wanted if (d / f).is_file()]
        files += sorted(p for p in d.iterdir() if p.suffix in (".png", ".log", ".txt") and p.is_file())
        files += _notebooks(d)
        for f in dict.fromkeys(files):
            members.append((f, f"{root}/runs/{name}/{f.relative_to(d).as_posix()}"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    members = [(f, arc) for f, arc in members if f.resolve() != out_path.resolve()]

    def write(f: BinaryIO) -> None:
        with tarfile.open(fileobj=f, mode="w:gz") as tar:
            for member, arc in members:
                tar.add(member, arcname=arc, recursive=False)
            manifest = [{"path": arc, "bytes": m.stat().st_size, "sha256": sha256_file(m)} for m, arc in members]
            data = json.dumps({"created_at": utc_timestamp(), "nanorepro_version": __version__,
                               "checkpoints_included": include_checkpoints, "files": manifest}, indent=2).encode()
            info = tarfile.TarInfo(f"{root}/MANIFEST.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    write_atomic(out_path, write)
    return out_path
