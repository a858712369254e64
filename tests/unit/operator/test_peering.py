"""Which operator replica acts under kopf peering, decided from the peering object's keep-alives."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from medmo_operator.peering import is_acting, start_priority

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _alive(priority: int, seen_s_ago: float, lifetime: int = 20) -> dict:
    # As kopf writes it: lastseen in ISO format with the offset.
    return {"priority": priority, "lifetime": lifetime, "lastseen": (NOW - timedelta(seconds=seen_s_ago)).isoformat()}


def test_the_oldest_live_replica_acts_and_a_later_one_waits():
    older, newer = -1000, -2000  # start_priority() of replicas started at t=1000 ms and t=2000 ms
    peers = {"a": _alive(older, 5), "b": _alive(newer, 1)}
    assert is_acting(peers, "a", older, NOW)
    assert not is_acting(peers, "b", newer, NOW)


def test_a_replica_silent_past_its_lifetime_is_dead_and_the_next_one_acts():
    peers = {"a": _alive(-1000, 21), "b": _alive(-2000, 1)}
    assert is_acting(peers, "b", -2000, NOW)


def test_equal_priorities_pause_both_as_kopf_does():
    peers = {"a": _alive(-1000, 1), "b": _alive(-1000, 1)}
    assert not is_acting(peers, "a", -1000, NOW) and not is_acting(peers, "b", -1000, NOW)


def test_a_replica_restarted_under_the_same_name_is_judged_by_its_own_new_entry():
    # Its old entry (same identity) is its own: never a rival.
    assert is_acting({"a": _alive(-1000, 1)}, "a", -3000, NOW)


def test_a_later_start_gets_a_lower_priority():
    first = start_priority()
    time.sleep(0.002)
    assert start_priority() < first
