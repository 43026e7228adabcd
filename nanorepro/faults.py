"""Fault injection for the reliability tests: `NANOREPRO_FAULT=<site>:<n>` SIGKILLs this process the
n-th time it reaches `hit(site)`, so a test can stop a run at an exact point of a checkpoint write,
an evaluation or a metrics append (tests/test_faults.py). Sites: `ckpt-write` (a half-written temp
checkpoint), `ckpt-renamed` (just after the rename), `eval` (between the train and val halves of an
evaluation), `step` (after an optimizer step, before it is logged), `metrics` (half a line written).

Unset, as always outside those tests, a hit is one string comparison. No torch here.
"""

from __future__ import annotations

import os
import signal
from typing import Callable

_site, _, _n = (os.environ.get("NANOREPRO_FAULT") or "").partition(":")
_hits = 0


def hit(site: str, before_kill: Callable[[], object] | None = None) -> None:
    """Count a pass through `site`; at the chosen one, run `before_kill` (e.g. a torn write) and die."""
    global _hits
    if site != _site:
        return
    _hits += 1
    if _hits == int(_n or 1):
        if before_kill is not None:
            before_kill()
        os.kill(os.getpid(), signal.SIGKILL)
