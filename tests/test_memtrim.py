"""MemoryTrimmer: when memory is given back after a spike of connections."""

from __future__ import annotations

from proxy.memtrim import MemoryTrimmer, rss_bytes


def test_trims_once_after_a_large_fall_below_half_the_peak() -> None:
    calls: list[int] = []
    trimmer = MemoryTrimmer(min_drop=500, trim=lambda: calls.append(1))
    for count in (10, 400, 2000, 3000):
        assert trimmer.sample(count) is False
    assert trimmer.sample(1600) is False  # fell 1,400 but still above half the peak
    assert trimmer.sample(40) is False  # below half, but still falling
    assert trimmer.sample(40) is True  # the fall has ended
    assert (calls, trimmer.trims, trimmer.peak) == ([1], 1, 40)
    assert trimmer.sample(30) is False  # the peak starts again from there


def test_a_steady_load_never_trims() -> None:
    calls: list[int] = []
    trimmer = MemoryTrimmer(min_drop=500, trim=lambda: calls.append(1))
    for i in range(1000):
        trimmer.sample(300 + (i % 7) * 40)  # up and down by 240: never 500 below the peak
    assert calls == []


def test_small_proxies_are_left_alone() -> None:
    calls: list[int] = []
    trimmer = MemoryTrimmer(min_drop=500, trim=lambda: calls.append(1))
    trimmer.sample(400)
    trimmer.sample(0)  # everything closed, but only 400: not worth a heap walk
    assert calls == []


def test_the_real_trim_runs_and_rss_is_read() -> None:
    trimmer = MemoryTrimmer(min_drop=1)
    trimmer.sample(10)
    trimmer.sample(0)
    assert trimmer.sample(0) is True
    rss = rss_bytes()
    assert rss is not None and rss > 1 << 20
