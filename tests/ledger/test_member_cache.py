"""The ledger's in-process member caches stay bounded by evicting the oldest entries, so a
member population larger than the bound misses now and then instead of on every call; and an
entry is trusted only for a while, so what another replica changed is read again."""

from __future__ import annotations

import time

from ledger_svc.service import _MemberCache


def test_a_full_cache_drops_its_oldest_tenth_and_keeps_the_rest() -> None:
    cache: _MemberCache[int] = _MemberCache(limit=100)
    for i in range(100):
        cache.put(f"m{i}", i)
    cache.put("new", -1)
    assert cache.get("m0") is None and cache.get("m9") is None
    assert (cache.get("m10"), cache.get("m99"), cache.get("new")) == (10, 99, -1)
    for i in range(1_000):
        cache.put(f"x{i}", i)
    assert len(cache._entries) <= 100 and cache.get("x999") == 999


def test_an_entry_older_than_its_bound_is_not_trusted() -> None:
    cache: _MemberCache[str] = _MemberCache(seconds=0.05)
    cache.put("m1", "ACTIVE")
    assert cache.get("m1") == "ACTIVE"
    time.sleep(0.1)
    assert cache.get("m1") is None
