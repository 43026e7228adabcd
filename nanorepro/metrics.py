"""The one metrics format: JSON lines in `<run>/metrics.jsonl`, read by plots and reports.

Records, one per line, each with a `kind`:
- `meta`  (first line): run name, preset, started, nanorepro version, world_size, the resolved config.
- `train`: iter, loss, lr, tokens_per_s, ms_per_iter, elapsed_s.
- `eval` : iter, train_loss, val_loss, lr, elapsed_s, best_val_loss.
- `stage`: name, status (finished | not run | failed), reason, elapsed_s, plus stage-specific values;
  also the pipeline's record of its stages, `stages.jsonl` in the results folder.
- `end`  : iter, best_val_loss, elapsed_s, status (finished | evaluated | interrupted), peak_memory_bytes,
  and `target` ({val_loss, reached}, target_verdict) when the config sets target_val_loss.
No torch here: the hub kernel reads these.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable

from nanorepro import faults
from nanorepro.errors import UserError
from nanorepro.files import write_text_atomic

# The line train.py prints at each evaluation, as nanoGPT's train.py does: what the live curve follows in
# a stage's output and what the bench reads from either implementation.
EVAL_LINE = re.compile(r"step (\d+): train loss ([-\d.naif]+), val loss ([-\d.naif]+)")

METRICS_FILE = "metrics.jsonl"
STAGES_FILE = "stages.jsonl"  # the pipeline's stage records, in the results folder above runs/
NOT_RUN = "not run"  # the status of a stage that could not run here (and the verdict of a claim without a run)


def append(path: Path, record: dict[str, Any], durable: bool = True) -> None:
    """Add one record and flush it to the OS, so a killed run keeps every line it reported; `durable`
    also fsyncs it (survives a power cut). Training's per-step records pass durable=False: an fsync
    every log_interval costs milliseconds inside the timed steps, and the next evaluation's record
    (or the checkpoint) makes them durable. After a torn last line (a writer killed mid-line) it starts
    a new line; a failed write (disk full) is a UserError."""
    line = json.dumps(record, allow_nan=True) + "\n"
    try:
        with open(path, "a+b") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
            data = line.encode("utf-8")
            faults.hit("metrics", lambda: (f.write(data[: len(data) // 2]), f.flush()))
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot append to {path}: {e}",
                        "free disk space (or write to a bigger disk) and run the same command again") from e


def read(path: Path) -> list[dict[str, Any]]:
    """All records; a torn last line (a run killed mid-write) is skipped with a warning."""
    path = Path(path) / METRICS_FILE if Path(path).is_dir() else Path(path)
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}: line {n} is not valid JSON (a torn write?); skipped it", stacklevel=2)
    return records


def rewrite(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace the file atomically (write a temp file, fsync, rename)."""
    write_text_atomic(Path(path), "".join(json.dumps(r, allow_nan=True) + "\n" for r in records))


def truncate_after(path: Path, iter_num: int) -> None:
    """Keep what a checkpoint at `iter_num` already covers: a resumed run re-logs the rest exactly once.

    Train records carry the iteration count after their step (1..N), so the one at N stays; the
    evaluation at N happens again on resume, so it goes, with any end record."""
    def covered(r: dict[str, Any]) -> bool:
        kind, it = r.get("kind"), r.get("iter", -1)
        return kind == "meta" or (kind == "train" and it <= iter_num) or (kind == "eval" and it < iter_num)

    rewrite(path, [r for r in read(path) if covered(r)])


def of_kind(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == kind]


def meta(records: list[dict[str, Any]]) -> dict[str, Any]:
    return next((r for r in records if r.get("kind") == "meta"), {})


def best_val_loss(records: list[dict[str, Any]]) -> float | None:
    return min((r["val_loss"] for r in of_kind(records, "eval") if r.get("val_loss") is not None), default=None)


def finished(records: list[dict[str, Any]]) -> bool:
    return any(r.get("kind") == "end" and r.get("status") == "finished" for r in records)


def target_verdict(target: float | None, best_val: float) -> dict[str, Any] | None:
    """Whether a run's best val loss reached its config's target_val_loss (None: no target set)."""
    if target is None:
        return None
    return {"val_loss": target, "reached": bool(best_val <= target)}  # NaN (a diverged run): not reached


def missed_text(target: dict[str, Any], best_val: float | None, preset: str | None) -> str:
    """What a run that missed its target says at its end (the training output, the report's warnings)."""
    whose = f"its preset's ({preset})" if preset else "its"
    best = "none" if best_val is None else f"{best_val:.4f}"
    return f"missed {whose} target: best val loss {best}, above target_val_loss={target['val_loss']}"
