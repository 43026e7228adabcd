"""How numbers and tables read in logs, notebooks and reports: the one home for each format (torch-free)."""

from __future__ import annotations

import datetime as _dt
from typing import Any

GiB = 1024**3


def utc_timestamp() -> str:
    """Now, as records carry it: e.g. '2026-12-01T08:55:29+00:00'."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def duration(seconds: float | None) -> str:
    """e.g. '42 s', '12 min', '3.5 h', '4.1 days'; '–' for None (not measured)."""
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 3 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def human_bytes(n: float) -> str:
    """e.g. '1.5 GiB', '300.0 MiB'."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table; pipes and newlines inside cells are escaped."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
