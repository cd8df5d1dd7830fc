"""Every example in examples/ runs and does what its docstring says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvmflow.testing.qemu_builds import QemuBuild

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_watch_monitor(backend: str) -> None:
    result = run_example("watch_monitor.py", backend)
    assert result.returncode == 0, result.stderr
    assert "events: RESUME STOP RESUME STOP" in result.stdout
    assert result.stdout.count("run state: ") == 10


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_controller_on_both_backends(backend: str) -> None:
    result = run_example("controller.py", backend)
    assert result.returncode == 0, result.stderr
    assert "ctl-0: node-a -> node-b" in result.stdout
    assert "ctl-1: node-a -> node-b" in result.stdout
    assert "ctl-0 now runs on node-b" in result.stdout


def test_batch_evacuation_with_custom_policy() -> None:
    result = run_example("evacuate_node.py")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("plan: evac-") == 4
    assert result.stdout.count("moved: evac-") == 4
    assert "left on node-a: 0" in result.stdout
    targets = {
        line.split("-> ")[1] for line in result.stdout.splitlines() if line.startswith("moved:")
    }
    assert targets == {"node-b", "node-c"}


def test_metrics_exporter() -> None:
    result = run_example("metrics_exporter.py")
    assert result.returncode == 0, result.stderr
    assert "kvmflow_migrations_started_total 1" in result.stdout
    assert "kvmflow_migrations_completed_total 1" in result.stdout
    assert 'kvmflow_migration_downtime_ms{instance="metrics-1"' in result.stdout
    assert "kvmflow_migrated_bytes_total " in result.stdout


def test_rolling_upgrade(qemu_builds: dict[str, QemuBuild]) -> None:
    if "second" not in qemu_builds:
        pytest.skip("one QEMU build only on this host: nothing to upgrade to")
    result = run_example("rolling_upgrade.py", qemu_builds["second"].binary)
    assert result.returncode == 0, result.stderr
    old, new = qemu_builds["system"].version, qemu_builds["second"].version
    assert f"node-a: QEMU {old} -> {new}" in result.stdout
    assert result.stdout.count("moved away: up-") == 2
    assert result.stdout.count("back: up-") == 2
    assert "on node-a now: up-0, up-1" in result.stdout
