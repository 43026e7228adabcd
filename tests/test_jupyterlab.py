"""Run All in a real JupyterLab, driven through headless Chromium, as a person would on Chameleon.

The server runs from the project's venv (kernel `python3` = the venv's Python), serves a temp
folder holding a copy of the notebook, and the page clicks nothing but Run All. Needs Debian's
chromium (scripts/system-deps.sh); everything stays on 127.0.0.1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jupyterlab_harness import (
    chromium,
    jupyter_lab,
    run_all_cells,
    save_notebook,
    show_first,
    start_run_all,
    wait_run_all,
)

pytestmark = pytest.mark.slow  # a browser, JupyterLab and its kernels (tests/tiers.py)

REPO = Path(__file__).resolve().parents[1]


def with_parameters(notebook: Path, dest: Path, **values: object) -> Path:
    """Copy `notebook` to `dest` with `values` assigned at the end of its parameters cell.

    Each name must already be a parameter, so a renamed parameter fails here, not silently.
    """
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{notebook.name} needs exactly one cell tagged 'parameters'"
    source = "".join(cells[0]["source"])
    for name in values:
        assert any(line.split("=")[0].strip() == name for line in source.splitlines() if "=" in line), \
            f"{notebook.name}: no parameter {name!r} in\n{source}"
    lines = [f"{name} = {value!r}" for name, value in values.items()]
    cells[0]["source"] = source.rstrip("\n") + "\n# set by the test\n" + "\n".join(lines) + "\n"
    dest.write_text(json.dumps(nb, indent=1), encoding="utf-8")
    return dest


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiktoken_offline):
    """A JupyterLab server on a temp root and a Chromium page; kernels inherit the offline tiktoken cache."""
    root = tmp_path_factory.mktemp("lab_root")
    with jupyter_lab(root) as server, chromium() as page:
        yield server, page


def test_run_all_prepare_data(lab, shakespeare_path, tmp_path):
    server, page = lab
    results = tmp_path / "results"
    with_parameters(REPO / "notebooks" / "01_prepare_data.ipynb", server.root_dir / "01_prepare_data.ipynb",
                    target="local", results_dir=str(results), input_path=str(shakespeare_path))

    run_all_cells(page, server, "01_prepare_data.ipynb", timeout_s=90)

    # the counts must come from the run, not from the notebook's own markdown
    outputs = "\n".join(page.locator(".jp-NotebookPanel .jp-OutputArea-output").all_inner_texts())
    for count in ("1,003,854", "111,540", "301,966", "36,059"):
        assert count in outputs, f"{count} not in the outputs:\n{outputs[-3000:]}"
    meta = json.loads((results / "data" / "shakespeare_char" / "meta.json").read_text())
    assert (meta["train_tokens"], meta["val_tokens"]) == (1_003_854, 111_540)


def test_run_all_reports_the_failing_cell(lab):
    server, page = lab
    nb = {"nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}},
          "cells": [{"cell_type": "code", "id": "a", "metadata": {}, "execution_count": None, "outputs": [],
                     "source": "import nanorepro\nprint(nanorepro.__version__)"},
                    {"cell_type": "code", "id": "b", "metadata": {}, "execution_count": None, "outputs": [],
                     "source": "from nanorepro.config import resolve\nresolve('no-such-preset')"},
                    {"cell_type": "code", "id": "c", "metadata": {}, "execution_count": None, "outputs": [],
                     "source": "print('never reached')"}]}
    (server.root_dir / "fails.ipynb").write_text(json.dumps(nb), encoding="utf-8")

    with pytest.raises(AssertionError, match=r"code cell 2: UserError: unknown preset 'no-such-preset'"):
        run_all_cells(page, server, "fails.ipynb", timeout_s=60)
    assert "never reached" not in page.locator(".jp-NotebookPanel .jp-OutputArea-output").all_inner_texts()


# The training cell's output, while the kernel is still busy with it: a figure is already there.
_FIGURE_WHILE_BUSY_JS = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const kernel = w && w.sessionContext.session && w.sessionContext.session.kernel;
  const img = document.querySelector('.jp-NotebookPanel .jp-OutputArea-output img');
  return Boolean(img && img.naturalWidth > 0 && kernel && kernel.status === 'busy');
}"""


def test_run_all_shows_the_training_live_and_the_answer_first(lab, shakespeare_path, tmp_path):
    """01, 02 and 04 with Run All, as a reader would: 02's loss curve appears while it trains and stays in the
    saved notebook; 04 opens with the verdicts. Screenshots of both land in this test's temp folder."""
    server, page = lab
    results = tmp_path / "results"
    common = dict(target="local", results_dir=str(results))
    nbs = {name: server.root_dir / f"{tmp_path.name}-{name}.ipynb" for name in ("01", "02", "04")}
    with_parameters(REPO / "notebooks" / "01_prepare_data.ipynb", nbs["01"], **common, input_path=str(shakespeare_path))
    with_parameters(REPO / "notebooks" / "02_train_char.ipynb", nbs["02"], **common, char_max_iters=150,
                    char_overrides={"eval_interval": 50, "eval_iters": 10})
    with_parameters(REPO / "notebooks" / "04_results.ipynb", nbs["04"], **common)

    run_all_cells(page, server, nbs["01"].name, timeout_s=120)

    start_run_all(page, server, nbs["02"].name)
    page.wait_for_function(_FIGURE_WHILE_BUSY_JS, timeout=300_000, polling=250)  # live: before training ends
    text = wait_run_all(page, nbs["02"].name, timeout_s=600)
    assert "step 150: train loss" in text
    shot_02 = show_first(page, ".jp-NotebookPanel .jp-OutputArea-output img", tmp_path / "02_train_char.png")
    saved = save_notebook(page, nbs["02"])
    figures = [o for c in saved["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(figures) == 1  # drawn in place at each evaluation, and left in the executed copy
    outputs = [json.dumps(o) for c in saved["cells"] for o in c.get("outputs", [])]

    run_all_cells(page, server, nbs["04"].name, timeout_s=120)
    first = page.locator(".jp-NotebookPanel .jp-OutputArea-output").first.inner_text()
    assert first.startswith("Verdicts: ") and "reproduced" in first.splitlines()[0], first[:500]
    assert "not run: no run of their preset" in first and "context-only baseline" in first
    shot_04 = show_first(page, ".jp-NotebookPanel .jp-OutputArea-output", tmp_path / "04_results.png")
    seen = page.locator(".jp-NotebookPanel .jp-OutputArea-output").all_inner_texts()
    assert not [t for t in outputs + seen if "PosixPath(" in t]
    assert len(page.locator(".jp-NotebookPanel .jp-OutputArea-output img").all()) == 2  # the two loss plots
    for shot in (shot_02, shot_04):
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        print(f"screenshot: {shot}")
