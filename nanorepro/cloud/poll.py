"""Waiting on a cloud: look, again and again, until what is seen is done or the time is up."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def poll_until(look: Callable[[], T], done: Callable[[T], bool], timeout_s: float, poll: float) -> tuple[T, bool]:
    """look() every `poll` seconds until done(what it saw), or until `timeout_s` has passed after a look; the last
    look and whether it was done. `done` may raise, for a state that can never become done (a lease in ERROR)."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = look()
        if done(seen):
            return seen, True
        if time.monotonic() > deadline:
            return seen, False
        time.sleep(poll)
