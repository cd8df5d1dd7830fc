"""The quick benchmarks still run and end with one JSON line (figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(
    ("script", "args", "keys"),
    [
        (
            "monitor_roundtrip.py",
            ["--rounds", "1", "--count", "50"],
            {"ratio_vs_raw", "kvmflow_asyncio", "raw_same_bytes"},
        ),
        (
            "ssh_roundtrip.py",
            ["--rounds", "1", "--count", "50"],
            {"local_us", "ssh_us", "raw_ssh_us", "ratio_ssh_vs_raw_ssh"},
        ),
        (
            "local_disks.py",
            ["--rounds", "1", "--disk", "16", "--memory", "64", "--rate", "10000"],
            {"link_mbit", "runs", "median_over_ideal"},
        ),
        (
            "multifd.py",
            ["--rounds", "1", "--memory", "128", "--mib", "8"],
            {"link_mbit", "channels_1", "channels_8"},
        ),
        (
            "store_writes.py",
            ["--count", "50"],
            {
                "write_median_us",
                "write_p99_us",
                "hop_median_us",
                "write_over_hop_median",
                "step_no_store_median_us",
                "step_journaled_median_us",
                "journal_cost_per_phase_median_us",
            },
        ),
        (
            "sharded_fleet.py",
            ["--nodes", "40", "--per-node", "2", "--rest", "1", "--evacuate", "0.1", "--ttl", "3"],
            {"at_rest", "evacuation", "takeover"},
        ),
        (
            "fleet.py",
            ["--migrations", "20", "--gc", "tuned", "--store", "on"],
            {"failed", "engine_core_share_in_flight", "completion_notice_ms_p99"},
        ),
        (
            "migration_latency.py",
            ["--rounds", "1"],
            {"detect_ms_events", "detect_ms_poll_2s", "migrate_over_qemu_total_time"},
        ),
    ],
)
def test_benchmark_prints_its_json_line(script: str, args: list[str], keys: set[str]) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert keys <= set(figures)
    assert figures.get("failed", 0) == 0  # every migration of a fleet run completed
