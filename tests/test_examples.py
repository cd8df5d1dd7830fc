"""Every example in examples/ runs and does what its docstring says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_watch_monitor(backend: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "watch_monitor.py"), backend],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "events: RESUME STOP RESUME STOP" in result.stdout
    assert result.stdout.count("run state: ") == 10
