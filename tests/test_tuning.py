"""The opt-in garbage-collector tuning for fleet-sized processes."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from kvmflow.errors import MisuseError
from kvmflow.tuning import tune_gc_for_fleet


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_tuning_freezes_what_lives_and_raises_thresholds(restore_gc: None) -> None:
    assert gc.get_freeze_count() == 0
    survivor = [object() for _ in range(10)]
    tune_gc_for_fleet()
    assert gc.get_freeze_count() > len(survivor)
    assert gc.get_threshold() == (10_000, 10, 100)
    tune_gc_for_fleet(young_threshold=2_000, full_every=50)
    assert gc.get_threshold() == (2_000, 10, 50)


@pytest.mark.parametrize(("young", "full"), [(0, 100), (10_000, 0), (-1, -1)])
def test_bad_thresholds_are_refused_and_change_nothing(
    restore_gc: None, young: int, full: int
) -> None:
    before = gc.get_threshold()
    with pytest.raises(MisuseError, match="must be at least 1"):
        tune_gc_for_fleet(young_threshold=young, full_every=full)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
