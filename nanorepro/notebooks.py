"""Run the ordered notebooks headlessly with papermill: `nanorepro run-notebooks`.

Each notebook gets the parameters it declares (its cell tagged `parameters`), runs with the repo
root as working folder, and its executed copy lands in `<results_dir>/notebooks/`. A failing cell
stops the sequence with the notebook and cell named; the partly executed copy is kept.
"""

from __future__ import annotations

import ast
import atexit
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from nanorepro import config
from nanorepro.cloud.runner import TARGETS, results_path
from nanorepro.errors import UserError
from nanorepro.files import project_root

# The notebooks' own defaults: target "auto" (a Chameleon node on Chameleon's JupyterHub, this machine
# elsewhere), results/<target>, and presets for it (small CPU ones here: the README's main job finishes
# on a laptop in minutes).
DEFAULTS: dict[str, Any] = {
    "target": "auto",
    "results_dir": None,
    "seed": 1337,
    "char_preset": "auto",
    "char_max_iters": None,
    "finetune_preset": "auto",
    "model": None,
    "finetune_max_iters": None,
}


def parse_params(pairs: list[list[str]] | None, params_file: str | None) -> dict[str, Any]:
    """Defaults, then a YAML/JSON parameters file, then `-p name value` pairs (values read as YAML)."""
    import yaml

    params = dict(DEFAULTS)
    if params_file:
        path = Path(params_file)
        if not path.is_file():
            raise UserError(f"parameters file {path} does not exist", "give the path of a YAML or JSON file")
        try:
            loaded = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            raise UserError(f"cannot read parameters file {path}: {' '.join(str(e).split())[:200]}",
                            "write it as UTF-8 YAML or JSON, one `name: value` per line") from e
        if not isinstance(loaded, dict):
            raise UserError(f"{path} is not a mapping of parameter names to values", "write name: value lines")
        params.update(loaded)
    for name, value in pairs or []:
        try:
            params[name] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"cannot read the value of -p {name}: {' '.join(str(e).split())[:200]}",
                            "give a plain number, word or quoted UTF-8 string") from e
    return params


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _like(default: str | None) -> tuple[Callable[[Any], bool], str]:
    """(accepts, what it must be) from a parameter's default in its notebook: a value of the same type."""
    try:
        value = ast.literal_eval(default) if default else None
    except (ValueError, SyntaxError):
        value = None
    if value is None:
        return (lambda v: True), "anything"
    if type(value) is int:
        return _whole, "a whole number"
    if type(value) is float:
        return _number, "a number"
    return (lambda v: isinstance(v, type(value))), f"a {type(value).__name__}"


def check_params(params: dict[str, Any], defaults: dict[str, str | None]) -> None:
    """Refuse values no notebook can use before any notebook runs (a bad value found in notebook 02
    would come after 01 prepared the data), naming the parameter and the fix. Parameters without a
    rule here must have the type of their default in the notebook (`defaults`: name -> source text)."""
    preset = (lambda v: v == "auto" or v in config.PRESETS, f"auto or one of the presets {', '.join(config.PRESETS)}")
    iters = (lambda v: v is None or _whole(v) and v >= 0, "None or a whole number >= 0")
    overrides = (lambda v: isinstance(v, dict), "a mapping of config fields to values")
    rules = {  # name: (accepts, what it must be)
        "target": (lambda v: v in TARGETS, f"one of {', '.join(TARGETS)}"),
        "results_dir": (lambda v: v is None or isinstance(v, str) and v.strip() != "", "None or a folder path"),
        "project": (lambda v: v is None or isinstance(v, str) and v.strip() != "", "None or a project name"),
        "site": (lambda v: v is None or isinstance(v, str) and v.strip() != "", "None or a site name"),
        "char_preset": preset, "finetune_preset": preset, "char_max_iters": iters, "finetune_max_iters": iters,
        "char_overrides": overrides, "finetune_overrides": overrides,
        "seed": (lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
        "lease_hours": (lambda v: _number(v) and 0 < v <= 168, "a number of hours in (0, 168]"),
        "nodes": (lambda v: _whole(v) and v >= 1, "a whole number of nodes, 1 or more"),
        "input_path": (lambda v: v is None or (isinstance(v, str) and Path(v).expanduser().is_file()),
                       "None or an existing text file"),
    }
    for name, value in params.items():
        ok, what = rules.get(name) or _like(defaults.get(name))
        if not ok(value):
            raise UserError(f"notebook parameter {name}={value!r} is not valid: it must be {what}",
                            f"pass e.g. -p {name} VALUE with VALUE {what}")
    for stage in ("char", "finetune"):  # overrides are checked with their preset, as the notebook will
        overrides = params.get(f"{stage}_overrides")
        if overrides:
            try:
                preset = params.get(f"{stage}_preset") or DEFAULTS[f"{stage}_preset"]
                config.resolve(None if preset == "auto" else preset, overrides)
            except UserError as e:
                raise UserError(f"notebook parameter {stage}_overrides: {e.problem}",
                                f"{e.fix}, e.g. -p {stage}_overrides '{{block_size: 128}}'") from e


def kernel_transport() -> dict[str, Any]:
    """papermill's options for kernels that talk over Unix sockets in a private temp folder instead of
    TCP on localhost: nothing else on the machine can connect to them, and ipykernel has no reason
    to warn about unencrypted TCP (once per notebook). TCP where there are no Unix sockets."""
    if os.name != "posix":
        return {}
    from traitlets.config import Config

    folder = tempfile.mkdtemp(prefix="nanorepro-kernel-")  # 0700; each kernel removes its sockets
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return {"config": Config({"KernelManager": {"transport": "ipc", "ip": str(Path(folder) / "kernel")}})}


def run_notebooks(params: dict[str, Any], only: list[str] | None = None) -> list[Path]:
    """Execute the notebooks in order; return the executed copies."""
    import papermill as pm

    root = project_root()
    paths = sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise UserError(f"no notebooks in {root / 'notebooks'}",
                        "run from a nanorepro checkout (the folder with notebooks/)")
    paths = [p for p in paths if not only or any(p.name.startswith(o) for o in only)]
    declared_by = {p: pm.inspect_notebook(str(p)) for p in paths}
    defaults = {name: d.get("default") for declared in declared_by.values() for name, d in declared.items()}
    unknown = sorted(set(params) - set(defaults) - set(DEFAULTS))
    if unknown:
        raise UserError(f"unknown notebook parameter(s): {', '.join(unknown)}",
                        f"use one of: {', '.join(sorted(defaults))}")
    check_params(params, defaults)
    results = results_path(params["results_dir"], params["target"])  # an absolute path stays itself
    out_dir = results / "notebooks"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the results folder {results}: {e.strerror}",
                        "pass -p results_dir with a writable folder") from e
    done = []
    kernel = kernel_transport()
    start_all = time.time()
    for i, nb in enumerate(paths, 1):
        mine = {k: v for k, v in params.items() if k in declared_by[nb]}
        out = out_dir / nb.name
        print(f"[{i}/{len(paths)}] {nb.name} ...", flush=True)
        start = time.time()
        try:
            pm.execute_notebook(str(nb), str(out), parameters=mine, cwd=str(root), progress_bar=False,
                                stdout_file=sys.stdout, stderr_file=sys.stderr, **kernel)
        except pm.PapermillExecutionError as e:
            raise UserError(f"{nb.name} failed in code cell {e.exec_count} (cell index {e.cell_index}): "
                            f"{e.ename}: {e.evalue.splitlines()[0] if e.evalue else ''}; the partly executed "
                            f"notebook is {out}", "open it to see the full error, fix the cause, and re-run "
                            "(finished stages are skipped)") from e
        print(f"[{i}/{len(paths)}] {nb.name} done in {time.time() - start:.0f} s -> {out}", flush=True)
        done.append(out)
    print(f"all {len(done)} notebooks ran in {time.time() - start_all:.0f} s; results in {results}")
    return done
