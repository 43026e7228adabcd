"""The one poll loop the cloud side waits with (leases, servers, SSH, deletions)."""

import pytest

from nanorepro.cloud.poll import poll_until
from nanorepro.errors import UserError


def test_it_looks_until_done_and_returns_the_last_look():
    looks = iter(["BUILD", "BUILD", "ACTIVE", "never asked"])
    seen = []
    assert poll_until(lambda: seen.append(1) or next(looks), lambda s: s == "ACTIVE", 60, 0) == ("ACTIVE", True)
    assert len(seen) == 3


def test_when_the_time_is_up_it_says_so_with_what_it_saw_last():
    assert poll_until(lambda: "PENDING", lambda s: s == "ACTIVE", timeout_s=0, poll=0) == ("PENDING", False)


def test_a_state_that_can_never_be_done_stops_it_at_once():
    looks = []

    def active(state: str) -> bool:
        if state == "ERROR":
            raise UserError("lease went to ERROR", "reserve again")
        return state == "ACTIVE"

    with pytest.raises(UserError, match="ERROR"):
        poll_until(lambda: looks.append(1) or "ERROR", active, 60, 0)
    assert len(looks) == 1
