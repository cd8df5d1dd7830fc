"""Shared fixtures: real QEMU processes, short socket directories, both anyio backends."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmflow.kvm import ScratchQemu, start_scratch_qemu


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every ``@pytest.mark.anyio`` test on asyncio and on trio."""
    return str(request.param)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short temporary directory: unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="kvf-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def qemu(sockdir: Path) -> Iterator[ScratchQemu]:
    """A real, paused ``qemu-system-x86_64`` (KVM when /dev/kvm opens, else TCG), always
    stopped in teardown, also when the test fails."""
    instance = start_scratch_qemu(sockdir)
    try:
        yield instance
    finally:
        instance.stop()
