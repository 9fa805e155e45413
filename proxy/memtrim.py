"""Give memory back to the system after a spike of connections.

10,000 idle connections cost a proxy about 40 KiB each; when they close, CPython and
OpenSSL free their objects, but glibc's malloc keeps the freed pages (its heap and arenas
shrink only from the top, and only past a threshold), so RSS stayed at several times the
baseline for good. Measured on a 3,000-connection spike: 51 MiB before, 174 MiB with them
open, 187 MiB after they closed, 173 MiB after `gc.collect()`, 64 MiB after `malloc_trim(0)`.
What stays after a trim is CPython's small-object allocator: an arena (1 MiB) goes back only
when every object in it is gone, and a spike leaves long-lived objects scattered over many
of them (after 9,900 connections, 55 arenas still in use; with `PYTHONMALLOC=malloc` the same
spike ends at 1.15x the baseline instead of 1.84x: bench/memory_spike.py).

`MemoryTrimmer` watches the number of open connections and, after it has fallen a long way
from its peak, runs one full garbage collection and glibc's `malloc_trim(0)`.

`freeze_startup_objects()` takes what a started proxy holds for good (modules, classes, the
first config's objects: about 42,000 tracked objects) out of the garbage collector's view, so
that its full collections walk only what came after: the live connections.

Rule 1: pure standard library; on a libc without `malloc_trim` (musl, macOS) only the
garbage collection runs.
Rule 2: rare by construction: a trim needs a fall of at least `min_drop` connections, to
below half the peak since the last trim, and to have stopped (one sample no lower than the
one before), so a steady load never triggers one and a closing wave gets one, at its end.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import resource
from collections.abc import Callable

log = logging.getLogger("proxy")


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def rss_bytes() -> int | None:
    """This process's resident set size (Linux `/proc`; None elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * resource.getpagesize()


class MemoryTrimmer:
    """Decides when to trim, from the count of open connections sampled now and then.

    Args:
        min_drop: the fewest connections that must have closed since the peak.
        trim: the function that gives memory back (tests pass their own).
    """

    def __init__(self, min_drop: int = 500, trim: Callable[[], None] | None = None) -> None:
        self.min_drop = min_drop
        self.peak = 0
        self.last = 0
        self.trims = 0
        self._trim = trim or self._default_trim
        self._malloc_trim = _malloc_trim()

    def sample(self, open_connections: int) -> bool:
        """Record the current count; trims (and returns True) once a large fall has ended."""
        last, self.last = self.last, open_connections
        if open_connections > self.peak:
            self.peak = open_connections
            return False
        fallen = self.peak - open_connections
        if fallen < self.min_drop or open_connections * 2 > self.peak:
            return False
        if open_connections < last:
            return False  # still falling: what is closing now would be missed
        before = rss_bytes()
        self._trim()
        after = rss_bytes()
        self.trims += 1
        if before is not None and after is not None:
            log.info(
                "memory returned after %d connections closed: RSS %d MiB -> %d MiB",
                fallen,
                before >> 20,
                after >> 20,
            )
        self.peak = open_connections
        return True

    def _default_trim(self) -> None:
        gc.collect()
        if self._malloc_trim is not None:
            self._malloc_trim(0)


def freeze_startup_objects() -> None:
    """Collect once, then move every object left to the collector's permanent generation.

    Called by the proxy command once the proxy is ready. Full collections of a serving
    proxy walked about 42,000 start-up objects, 60-150 ms each with no connection making
    progress meanwhile (bench/README.md, "Connections freed without the collector"). The
    price: a start-up object that later becomes cyclic garbage (an upstream of the first
    config removed by a later one) is never collected; that is bounded by what existed at
    start-up, and happens at most once per object.
    """
    gc.collect()
    gc.freeze()
    log.debug(
        "start-up objects kept out of the garbage collector's passes: %d", gc.get_freeze_count()
    )
