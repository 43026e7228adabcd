"""Run the ordered notebooks headlessly with papermill: `nanorepro run-notebooks`.

Each notebook gets the parameters it declares (its cell tagged `parameters`), runs with the repo
root as working folder, and its executed copy lands in `<results_dir>/notebooks/`. A failing cell
stops the sequence with the notebook and cell named; the partly executed copy is kept.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from .errors import UserError
from .pipeline import project_root

# Small CPU settings: the README's main job finishes on a laptop in minutes.
DEFAULTS: dict[str, Any] = {
    "target": "local",
    "results_dir": "results/local",
    "seed": 1337,
    "char_preset": "shakespeare-char-cpu",
    "char_max_iters": None,
    "finetune_preset": "finetune-shakespeare-cpu",
    "model": "gpt2",
    "finetune_max_iters": None,
}


def notebook_paths(folder: Path | None = None) -> list[Path]:
    folder = folder or project_root() / "notebooks"
    found = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise UserError(f"no notebooks in {folder}", "run from a nanorepro checkout (the folder with notebooks/)")
    return found


def parse_params(pairs: list[list[str]] | None, params_file: str | None) -> dict[str, Any]:
    """Defaults, then a YAML/JSON parameters file, then `-p name value` pairs (values read as YAML)."""
    import yaml

    params = dict(DEFAULTS)
    if params_file:
        path = Path(params_file)
        if not path.is_file():
            raise UserError(f"parameters file {path} does not exist", "give the path of a YAML or JSON file")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise UserError(f"{path} is not a mapping of parameter names to values", "write name: value lines")
        params.update(loaded)
    for name, value in pairs or []:
        params[name] = yaml.safe_load(value)
    return params


def run_notebooks(params: dict[str, Any], only: list[str] | None = None) -> list[Path]:
    """Execute the notebooks in order; return the executed copies."""
    import papermill as pm

    root = project_root()
    results = Path(params["results_dir"])
    results = results if results.is_absolute() else root / results
    out_dir = results / "notebooks"
    paths = [p for p in notebook_paths(root / "notebooks") if not only or any(p.name.startswith(o) for o in only)]
    known = set()
    declared_by = {p: pm.inspect_notebook(str(p)) for p in paths}
    for declared in declared_by.values():
        known |= set(declared)
    unknown = sorted(set(params) - known - set(DEFAULTS))
    if unknown:
        raise UserError(f"unknown notebook parameter(s): {', '.join(unknown)}",
                        f"use one of: {', '.join(sorted(known))}")
    out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    start_all = time.time()
    for i, nb in enumerate(paths, 1):
        mine = {k: v for k, v in params.items() if k in declared_by[nb]}
        out = out_dir / nb.name
        print(f"[{i}/{len(paths)}] {nb.name} ...", flush=True)
        start = time.time()
        try:
            pm.execute_notebook(str(nb), str(out), parameters=mine, cwd=str(root), progress_bar=False,
                                stdout_file=sys.stdout, stderr_file=sys.stderr)
        except pm.PapermillExecutionError as e:
            raise UserError(f"{nb.name} failed in code cell {e.exec_count} (cell index {e.cell_index}): "
                            f"{e.ename}: {e.evalue.splitlines()[0] if e.evalue else ''}; the partly executed "
                            f"notebook is {out}", "open it to see the full error, fix the cause, and re-run "
                            "(finished stages are skipped)") from e
        print(f"[{i}/{len(paths)}] {nb.name} done in {time.time() - start:.0f} s -> {out}", flush=True)
        done.append(out)
    print(f"all {len(done)} notebooks ran in {time.time() - start_all:.0f} s; results in {results}")
    return done
