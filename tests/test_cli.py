"""The command line, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmflow.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_probe_prints_what_qemu_said() -> None:
    result = run_cli("probe")
    assert result.returncode == 0, result.stderr
    assert "QEMU version      7." in result.stdout or "QEMU version" in result.stdout
    assert "run state (QMP)   prelaunch" in result.stdout
    assert "info status (HMP) VM status: paused (prelaunch)" in result.stdout


def test_probe_json_on_trio() -> None:
    result = run_cli("probe", "--json", "--backend", "trio")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["run_state"] == "prelaunch"
    assert report["accelerator"] in ("kvm", "tcg")
    assert report["qmp_round_trip_us"] > 0


def test_bad_usage_exits_2_with_help() -> None:
    result = run_cli("no-such-command")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
    result = run_cli()
    assert result.returncode == 2
