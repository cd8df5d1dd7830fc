"""Process-wide settings for applications that drive large fleets.

The library never applies these itself: like logging, the garbage collector belongs to the
application. The kvmflow command line applies :func:`tune_gc_for_fleet` at start.
"""

from __future__ import annotations

import gc

from kvmflow.errors import MisuseError

DEFAULT_YOUNG_THRESHOLD = 10_000
DEFAULT_FULL_EVERY = 100


def tune_gc_for_fleet(
    *, young_threshold: int = DEFAULT_YOUNG_THRESHOLD, full_every: int = DEFAULT_FULL_EVERY
) -> None:
    """Make CPython's cyclic garbage collector stop the event loop less often.

    Every in-flight migration holds about 400 tracked objects (tasks, coroutines, cancel
    scopes, streams). A full collection scans them all: with 1,000 migrations in flight it
    stopped the loop long enough to set the p99 of noticing a completion (figures in the
    README, from ``benchmarks/fleet.py``). kvmflow makes little cyclic garbage, so this
    collects what is garbage now, freezes what
    lives now (imports, the registry) out of all later scans, collects the youngest
    generation after ``young_threshold`` allocations instead of 700, and runs a full
    collection only after ``full_every`` middle ones instead of 10. Call it once set-up is
    done; ``gc.unfreeze()`` and ``gc.set_threshold(700, 10, 10)`` undo it.
    """
    if young_threshold < 1 or full_every < 1:
        raise MisuseError(
            f"young_threshold and full_every must be at least 1, got {young_threshold} "
            f"and {full_every}"
        )
    gc.collect()
    gc.freeze()
    _, middle, _ = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, full_every)


__all__ = ["tune_gc_for_fleet"]
