"""The ledger's in-process member caches stay bounded by evicting the oldest entries, so a
member population larger than the bound misses now and then instead of on every call."""

from __future__ import annotations

from ledger_svc.service import _remember


def test_a_full_cache_drops_its_oldest_tenth_and_keeps_the_rest() -> None:
    cache: dict[str, int] = {}
    for i in range(100):
        _remember(cache, f"m{i}", i, limit=100)
    assert len(cache) == 100
    _remember(cache, "new", -1, limit=100)
    assert len(cache) == 91
    assert "m0" not in cache and "m9" not in cache
    assert cache["m10"] == 10 and cache["m99"] == 99 and cache["new"] == -1
    for i in range(1_000):
        _remember(cache, f"x{i}", i, limit=100)
    assert len(cache) <= 100 and cache["x999"] == 999
