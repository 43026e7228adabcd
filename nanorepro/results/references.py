"""The published claims a reproduction is judged against: `references.json`, read and checked (torch-free)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nanorepro.errors import UserError
from nanorepro.files import load_json

REFERENCES_FILE = Path(__file__).with_name("references.json")
RUN_METRICS = {"best_val_loss", "wall_time_s"}
DATA_METRICS = {"input_chars", "vocab_size", "train_tokens", "val_tokens"}


def load_references(path: Path | None = None) -> dict[str, Any]:
    """references.json (or another file of the same shape), checked so a typo fails loudly."""
    path = Path(path) if path else REFERENCES_FILE
    refs = load_json(path, "references", "restore nanorepro/results/references.json from git")
    sources = refs.get("sources", {})
    for c in refs.get("claims", []):
        missing = [k for k in ("id", "description", "metric", "value", "tolerance", "source") if k not in c]
        if missing:
            raise UserError(f"claim {c.get('id', '?')} in {path} lacks {', '.join(missing)}", "add those keys")
        if c["metric"] not in RUN_METRICS | DATA_METRICS:
            raise UserError(f"claim {c['id']}: unknown metric {c['metric']!r}",
                            f"use one of {', '.join(sorted(RUN_METRICS | DATA_METRICS))}")
        if c["source"] not in sources:
            raise UserError(f"claim {c['id']}: source {c['source']!r} is not in 'sources'", "add it to 'sources'")
        if c["metric"] in RUN_METRICS and not c.get("presets"):
            raise UserError(f"claim {c['id']}: a run metric needs 'presets'", "list the presets it applies to")
        if c["metric"] in DATA_METRICS and not c.get("dataset"):
            raise UserError(f"claim {c['id']}: a data metric needs 'dataset'",
                            "name the data folder, e.g. shakespeare_char")
    return refs
