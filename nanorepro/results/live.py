"""The loss curve of a training stage, drawn in the notebook while the stage runs.

A stage's output is streamed into the kernel line by line, from a local child process or from a
node's job log alike; each evaluation line (`step N: train loss X, val loss Y`, as train.py prints it)
adds a point and redraws the figure in place through an IPython display handle. When the stage ends,
the curve is redrawn once from the run's metrics file, so a resumed or already finished run shows
its whole history. Outside a notebook kernel nothing is drawn. No torch here: the hub kernel imports this.
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
from typing import TYPE_CHECKING, Any, Iterator

from nanorepro import metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def in_notebook() -> bool:
    """True inside a Jupyter kernel (JupyterLab, papermill), where display handles reach a notebook."""
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return bool(shell) and getattr(shell, "kernel", None) is not None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


class LossCurve:
    """Validation and train loss against iteration, with the published values as horizontal lines."""

    def __init__(self, title: str, published: list[tuple[float, str]] | None = None, display: bool | None = None):
        self.title, self.published = title, list(published or [])
        self.points: dict[int, tuple[float, float]] = {}  # iteration -> (train, val); a resumed eval replaces
        self.display = in_notebook() if display is None else display
        self.handle: Any = None  # the IPython DisplayHandle, once the figure is shown
        self._partial = ""

    # -- input ---------------------------------------------------------------------------------
    def add(self, iteration: int, train_loss: float, val_loss: float) -> None:
        self.points[iteration] = (train_loss, val_loss)
        self.show()

    def feed(self, text: str) -> None:
        """Streamed output, in any pieces: each complete evaluation line adds a point."""
        lines = (self._partial + text).replace("\r", "\n").split("\n")
        self._partial = lines.pop()
        for line in lines:
            m = metrics.EVAL_LINE.search(line)
            if m:
                self.add(int(m[1]), _number(m[2]), _number(m[3]))

    def load(self, records: list[dict[str, Any]]) -> None:
        """The evaluations of a metrics file (the whole run, earlier sessions included) replace the points."""
        self.points = {r["iter"]: (r.get("train_loss", math.nan), r.get("val_loss", math.nan))
                       for r in metrics.of_kind(records, "eval") if isinstance(r.get("iter"), int)}
        if self.points:
            self.show()

    # -- output --------------------------------------------------------------------------------
    def figure(self) -> Figure:
        from matplotlib.figure import Figure  # here, not at import: ~0.4 s that `nanorepro train` never needs
        from matplotlib.ticker import MaxNLocator

        fig = Figure(figsize=(7, 3.8), dpi=100)
        ax = fig.add_subplot()
        its = sorted(self.points)
        if its:
            ax.plot(its, [self.points[i][1] for i in its], "o-", color="C0", ms=3.5, lw=1.8,
                    label=f"val (latest {self.points[its[-1]][1]:.4f})")
            ax.plot(its, [self.points[i][0] for i in its], "--", color="C1", lw=1.4, label="train")
        for value, label in self.published:
            ax.axhline(value, color="0.3", ls=":", lw=1.3, label=f"published {value:g}: {label}")
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss (nats per token)")
        ax.set_title(self.title)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right")
        fig.tight_layout()
        return fig

    def png(self) -> bytes:
        buf = io.BytesIO()
        self.figure().savefig(buf, format="png")
        return buf.getvalue()

    def show(self) -> None:
        """Draw the figure into the notebook: the first time as a new output, then in its place."""
        if not self.display:
            return
        from IPython.display import Image, display

        image = Image(data=self.png(), format="png")
        if self.handle is None:
            self.handle = display(image, display_id=True)
        else:
            self.handle.update(image)


class _Tee(io.TextIOBase):
    """A stdout that passes everything on and shows it to a LossCurve as well."""

    def __init__(self, out: Any, curve: LossCurve):
        self.out, self.curve = out, curve

    def write(self, text: str) -> int:
        n = self.out.write(text)
        self.curve.feed(text)
        return len(text) if n is None else n

    def flush(self) -> None:
        self.out.flush()


@contextlib.contextmanager
def following(curve: LossCurve) -> Iterator[LossCurve]:
    """While the block runs, every line printed to stdout (a runner streams its stage's output there,
    from this machine or a node) is read for evaluation lines. Nothing changes outside a notebook."""
    if not curve.display:
        yield curve
        return
    with contextlib.redirect_stdout(_Tee(sys.stdout, curve)):
        yield curve
