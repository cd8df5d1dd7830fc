"""The library is silent below warning unless the application configures logging, and never
writes to stdout on its own (an embedding program's stdout is its data)."""

from __future__ import annotations

import subprocess
import sys

import pytest

EMBEDDER = """
import logging, sys
import anyio
from kvmflow.migration.phases import PhaseEvent, PhaseTracker

if sys.argv[1] == "stdlib-info":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
elif sys.argv[1] == "structlog":
    import structlog
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

def refuse(change):
    raise RuntimeError("the journal is down")

async def main():
    tracker = PhaseTracker("vm1", "alpha", "beta", refuse)
    await tracker.step(PhaseEvent.ABORT)  # a fact: the listener's failure is logged (error)
    print("data the program writes", flush=True)

anyio.run(main)
"""


def embed(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", EMBEDDER, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_an_embedder_that_configures_nothing_gets_warnings_on_stderr_only() -> None:
    done = embed("nothing")
    assert done.stdout == "data the program writes\n"  # nothing of kvmflow's on stdout
    assert "phase listener failed; the step stands" in done.stderr
    assert "the journal is down" in done.stderr
    assert "migration phase" not in done.stderr  # an info line: below warning, dropped


@pytest.mark.parametrize("mode", ["stdlib-info", "structlog"])
def test_an_embedder_that_configures_logging_gets_what_it_asked_for(mode: str) -> None:
    done = embed(mode)
    assert done.stdout == "data the program writes\n"
    assert "migration phase" in done.stderr  # info lines now, where the application said
    assert "phase listener failed; the step stands" in done.stderr
    if mode == "stdlib-info":
        assert "kvmflow.migration event='migration phase'" in done.stderr
