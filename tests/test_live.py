"""The live loss curve: evaluation lines streamed from a stage (here or from a node) redraw one figure."""

from __future__ import annotations

import json
import sys
from pathlib import Path, PurePosixPath

import pytest

from nanorepro import metrics
from nanorepro.cloud.remote import SSHRunner
from nanorepro.pipeline import Pipeline, published_losses
from nanorepro.results import live

PNG = b"\x89PNG\r\n\x1a\n"


class FakeHandle:
    def __init__(self, shown: list):
        self.shown = shown

    def update(self, obj) -> None:
        self.shown.append(("update", obj))


@pytest.fixture
def notebook(monkeypatch):
    """As if in a Jupyter kernel: what the curve displays is recorded instead."""
    import IPython.display

    shown: list = []

    def display(obj, display_id=False):
        assert display_id is True, "the curve must keep a handle to redraw in place"
        shown.append(("display", obj))
        return FakeHandle(shown)

    monkeypatch.setattr(IPython.display, "display", display)
    monkeypatch.setattr(live, "in_notebook", lambda: True)
    return shown


def test_evaluation_lines_in_any_pieces_add_points_and_nothing_else():
    curve = live.LossCurve("t", display=False)
    stream = ("tiny: 0.01M parameters\nstep 0: train loss 4.1742, val loss 4.1801\n"
              "tiny:  10%|#         | 2/20 [00:01<00:09]\r\x1b[Ktiny:  50%|#####     | 10/20\r"
              "step 10: train loss 3.2, val lo" "ss 3.3000\nstep 20: train loss nan, val loss nan\n")
    for i in range(0, len(stream), 7):  # arbitrary chunks, as a pipe or SFTP read delivers them
        curve.feed(stream[i:i + 7])
    assert sorted(curve.points) == [0, 10, 20]
    assert curve.points[0] == (4.1742, 4.1801) and curve.points[10] == (3.2, 3.3)
    assert all(v != v for v in curve.points[20])  # nan: a diverged evaluation is still a point
    assert curve.png()[:8] == PNG


def test_outside_a_notebook_nothing_is_drawn_and_stdout_is_untouched(capsys):
    assert not live.in_notebook()  # pytest is no kernel
    curve = live.LossCurve("t")
    assert curve.display is False
    with live.following(curve):
        assert not isinstance(sys.stdout, live._Tee)
        print("step 0: train loss 1.0, val loss 2.0")
    assert curve.handle is None and "val loss 2.0" in capsys.readouterr().out


def test_one_figure_is_shown_then_redrawn_in_place(notebook, capsys):
    curve = live.LossCurve("t", published=[(1.88, "nanoGPT CPU")])
    with live.following(curve):
        print("step 0: train loss 4.0, val loss 4.1")
        print("step 250: train loss 2.0, val loss 2.1")
    assert [kind for kind, _ in notebook] == ["display", "update"]
    assert all(obj.data[:8] == PNG for _, obj in notebook)
    assert "step 250" in capsys.readouterr().out  # the reader still sees the stage's output


def _char_run_records(iters: list[int]) -> list[dict]:
    return ([{"kind": "meta", "preset": "tiny", "config": {}}]
            + [{"kind": "eval", "iter": i, "train_loss": 4 - i / 10, "val_loss": 4.1 - i / 10} for i in iters]
            + [{"kind": "end", "iter": iters[-1], "status": "finished", "elapsed_s": 1.0, "best_val_loss": 2.1}])


def test_pipeline_train_draws_the_curve_while_the_stage_streams(notebook, tmp_path):
    """Whatever runner streams the stage (it prints to stdout), the curve is drawn during the run,
    then once more from the run's whole metrics file."""
    seen_during_run = []

    class PrintingRunner:
        def run(self, args, *, stage, check=True, parallel="none"):
            for i in (0, 10, 20):
                print(f"step {i}: train loss {4 - i / 10}, val loss {4.1 - i / 10}")
                seen_during_run.append(len(notebook))
            run_dir = tmp_path / "runs" / "char"
            for r in _char_run_records([0, 10, 20]):
                metrics.append(run_dir / metrics.METRICS_FILE, r)
            return 0

        def put(self, path, rel):
            return rel

        def fetch(self, rel, local_dir):
            return tmp_path / rel

    run = Pipeline(tmp_path)
    run.runner = PrintingRunner()
    summary = run.train("char", preset="tiny")
    assert summary["status"] == "finished"
    assert seen_during_run == [1, 2, 3]  # a figure after the first evaluation, redrawn at each next one
    assert [kind for kind, _ in notebook] == ["display", "update", "update", "update"]  # the last: from the file


def test_the_curve_follows_a_node_jobs_streamed_log(notebook, tmp_path):
    """SSHRunner's log streaming (its real follow loop; SFTP reads faked) feeds the same curve."""
    chunks = [b"char: 0.8M parameters\nstep 0: train loss 4.17", b"42, val loss 4.1801\r\nchar:  12%|#2 | 250/2000\r",
              b"step 250: train loss 2.0, val loss 2.1\n", b"char: finished at iter 500\n"]
    runner = SSHRunner("node.example", key_path=tmp_path / "key", workdir="results/x", poll_s=0)
    polls = iter([(c, None, True) for c in chunks] + [(b"", 0, True)])
    runner.jobs.poll = lambda job, offset: next(polls)
    runner.ssh.retrying = lambda what, fn: fn()
    curve = live.LossCurve("t")
    with live.following(curve):
        code, _ = runner.jobs.follow("train char", PurePosixPath("job"))
    assert code == 0 and sorted(curve.points) == [0, 250]
    assert curve.points[0] == (4.1742, 4.1801)
    assert [kind for kind, _ in notebook] == ["display", "update"]


def test_published_losses_are_the_presets_claims():
    assert [v for v, _ in published_losses("shakespeare-char-cpu")] == [1.88]
    assert [v for v, _ in published_losses("shakespeare-char")] == [1.4697]
    assert published_losses("tiny") == [] and published_losses("finetune-shakespeare") == []  # none published


def test_a_local_stage_passes_progress_bars_through_for_redrawing(tmp_path, monkeypatch, capsys):
    """A progress bar's \r reaches the notebook as \r (redrawn in place, not one line per update), and
    the error message's tail keeps only the bar's last state."""
    from nanorepro.cloud.runner import LocalRunner
    from nanorepro.errors import UserError

    child = tmp_path / "fake-python"
    child.write_text("#!/bin/sh\nprintf 'bar 1%%\\rbar 50%%\\rbar 100%%\\nstep 0: train loss 1.0, val loss 2.0\\n'\n"
                     "exit 3\n")
    child.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(child))
    assert LocalRunner(tmp_path).run(["x"], stage="s", check=False) == 3
    assert capsys.readouterr().out == "bar 1%\rbar 50%\rbar 100%\nstep 0: train loss 1.0, val loss 2.0\n"
    with pytest.raises(UserError) as e:
        LocalRunner(tmp_path).run(["x"], stage="s")
    assert e.value.problem.endswith("its last lines:\nbar 100%\nstep 0: train loss 1.0, val loss 2.0")
