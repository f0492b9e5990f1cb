"""The worker's memory of recent cancels: bounded in time and in size, oldest out first."""

from __future__ import annotations

from gpu_worker.recent import RecentIds


def test_recent_ids_expire_by_age_and_by_count() -> None:
    seen = RecentIds(ttl_s=10, cap=3)
    seen.add("a", 0)
    seen.add("b", 1)
    assert "a" in seen and "b" in seen and "c" not in seen
    seen.add("a", 2)  # seen again: now the newest
    seen.add("c", 3)
    seen.add("d", 4)  # over the cap: the oldest ("b") goes
    assert "b" not in seen and len(seen) == 3
    seen.add("e", 13.5)  # "a" (2) and "c" (3) are over 10 s old now
    assert [i for i in "abcde" if i in seen] == ["d", "e"]
