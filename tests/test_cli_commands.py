"""The command line against real QEMU: outputs, JSON and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from kvmflow.cli.progress import MigrationBars
from kvmflow.engine.events import (
    MigrationCompleted,
    MigrationProgressed,
    MigrationQueued,
    MigrationStarted,
    PolicyActionTaken,
)
from kvmflow.migration.decide import Decision, Estimate
from kvmflow.migration.policy import Action
from kvmflow.migration.results import MigrationProgress
from kvmflow.migration.status import MigrationSnapshot, MigrationStatus
from tests.conftest import qemus_under

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def kvmflow(
    *args: str, config: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    prefix = ["-c", str(config)] if config else []
    return subprocess.run(
        [sys.executable, "-m", "kvmflow.cli.main", *prefix, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def config(runtime_root: Path) -> Path:
    path = runtime_root / "kvmflow.toml"
    path.write_text(f"""
[nodes.alpha]
runtime_root = "{runtime_root}/alpha"
migration_address = "127.0.0.2"

[nodes.beta]
runtime_root = "{runtime_root}/beta"
migration_address = "127.0.0.3"

[instances.cli1]
node = "alpha"
memory_mib = 64
hvparams = {{ migration_port = 0, migration_bandwidth = 500 }}
""")
    return path


def test_instance_lifecycle_through_the_cli(config: Path) -> None:
    started = kvmflow("start", "cli1", config=config)
    assert started.returncode == 0, started.stderr
    assert "started cli1 on alpha" in started.stdout
    again = kvmflow("start", "cli1", config=config)
    assert again.returncode == 1
    assert "already running" in again.stderr
    assert "Traceback" not in again.stderr

    listed = json.loads(kvmflow("list", "--json", config=config).stdout)
    assert [(r["instance"], r["node"], r["memory_mib"]) for r in listed] == [("cli1", "alpha", 64)]
    info = json.loads(kvmflow("info", "cli1", "--json", config=config).stdout)
    assert (info["node"], info["run_state"], info["vcpus"]) == ("alpha", "running", 1)
    human = kvmflow("info", "cli1", config=config)
    assert "run_state" in human.stdout
    assert "running" in human.stdout

    hmp = kvmflow("monitor", "cli1", "--hmp", "info status", config=config)
    assert hmp.stdout.strip() == "VM status: running"
    qmp = json.loads(
        kvmflow("monitor", "cli1", "--qmp", "query-name", "--json", config=config).stdout
    )
    assert qmp == {"name": "cli1"}
    bad_args = kvmflow("monitor", "cli1", "--qmp", "query-name", "--args", "{nope", config=config)
    assert bad_args.returncode == 2
    assert "--args='{nope': a JSON object" in bad_args.stderr

    moved = kvmflow("migrate", "cli1", "beta", "--json", "--policy", "fixed", config=config)
    assert moved.returncode == 0, moved.stderr
    result = json.loads(moved.stdout)
    assert (result["source"], result["target"]) == ("alpha", "beta")
    assert json.loads(kvmflow("info", "cli1", "--json", config=config).stdout)["node"] == "beta"

    dry = json.loads(
        kvmflow("evacuate", "beta", "--to", "alpha", "--dry-run", "--json", config=config).stdout
    )
    assert dry["plan"] == [{"instance": "cli1", "target": "alpha", "memory_mib": 64}]
    assert dry["moved"] == []

    stopped = kvmflow("stop", "cli1", "--force", config=config)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped cli1 on beta" in stopped.stdout
    assert json.loads(kvmflow("list", "--json", config=config).stdout) == []  # stopped: hidden
    listed = json.loads(kvmflow("list", "--all", "--json", config=config).stdout)
    assert [(r["instance"], r["state"], r["copies"], r["flags"]) for r in listed] == [
        ("cli1", "stopped", [], [])
    ]
    gone = kvmflow("info", "cli1", config=config)
    assert gone.returncode == 0, gone.stderr
    assert "stopped" in gone.stdout
    stopped_info = json.loads(kvmflow("info", "cli1", "--json", config=config).stdout)
    assert (stopped_info["running"], stopped_info["run_state"]) == (False, "stopped")
    assert (stopped_info["configured_node"], stopped_info["memory_mib"]) == ("alpha", 64)
    assert stopped_info["hvparams"]["migration_bandwidth"] == 500


def test_errors_and_exit_codes(config: Path, tmp_path: Path) -> None:
    unknown = kvmflow("info", "nobody", config=config)
    assert unknown.returncode == 2
    assert "instance='nobody'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    missing = kvmflow("list", config=tmp_path / "nope.toml")
    assert missing.returncode == 2
    assert "no such file" in missing.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text(
        '[nodes.x]\nruntime_root = "relative"\nbogus = 1\n'
        '[instances.bad]\nnode = "y"\nmemory_mib = "lots"\n'
    )
    result = kvmflow("list", config=broken)
    assert result.returncode == 2
    for fragment in ("nodes.x.runtime_root", "nodes.x.bogus", "instances.bad"):
        assert fragment in result.stderr
    usage = kvmflow("migrate", "cli1", config=config)
    assert usage.returncode == 2
    assert "required" in usage.stderr
    node = kvmflow("node-info", "gamma", config=config)
    assert node.returncode == 2
    debug = kvmflow("--debug", "info", "nobody", config=config)
    assert "Traceback" in debug.stderr


def test_help_and_example_config() -> None:
    helped = kvmflow("--help")
    assert helped.returncode == 0
    for name in (
        "start",
        "stop",
        "reboot",
        "list",
        "info",
        "console",
        "monitor",
        "migrate",
        "evacuate",
        "node-info",
        "demo",
        "exit codes",
    ):
        assert name in helped.stdout
    example = kvmflow("node-info", "--json", config=EXAMPLES / "kvmflow.toml")
    assert example.returncode == 0, example.stderr
    assert {row["node"] for row in json.loads(example.stdout)} == {"alpha", "beta"}


def test_demo_with_two_guests(sockdir: Path) -> None:
    # The demo's temporary root goes under this test's own TMPDIR, so that only QEMUs of
    # this demo are looked for (a parallel job's are none of its business).
    demo = kvmflow("demo", "--guests", "2", "--json", env={"TMPDIR": str(sockdir)})
    assert demo.returncode == 0, demo.stderr
    report = json.loads(demo.stdout)
    assert report["accelerator"] in ("kvm", "tcg")
    assert [m["outcome"] for m in report["migrations"]] == ["completed", "completed"]
    assert [m["load"] for m in report["migrations"]] == ["idle", "light"]
    for migration in report["migrations"]:  # numbers with units in the keys, no display text
        assert isinstance(migration["seconds"], float)
        assert isinstance(migration["downtime_ms"], int)
        assert isinstance(migration["transferred_bytes"], int)
        assert migration["transferred_bytes"] > 0
        assert isinstance(migration["actions"], list)
    assert qemus_under(sockdir) == []
    assert list(sockdir.iterdir()) == []  # the demo removed its root


def test_progress_bars_render_on_a_terminal() -> None:
    console = Console(record=True, force_terminal=True, width=160)
    snapshot = MigrationSnapshot(
        MigrationStatus.ACTIVE,
        transferred=64 << 20,
        remaining=32 << 20,
        total=128 << 20,
        throughput_mbps=167.8,
        dirty_sync_count=2,
        dirty_pages_rate=2560,  # 10 MiB/s of 4 KiB pages
    )
    estimate = Estimate(False, None, 20 << 20, 50 << 20, 32 << 20)
    report = MigrationProgress("web1", "a", "b", 3.0, snapshot, 200, estimate)
    decision = Decision(Action.RAISE_DOWNTIME, "prediction", "dirty rate high", 200)
    with MigrationBars(console, enabled=True, total=2) as bars:
        for event in (
            MigrationQueued(1, "web1", "a", "b"),
            MigrationStarted(1, "web1", "a", "b"),
            MigrationProgressed(1, "web1", "a", "b", report),
            PolicyActionTaken(1, "web1", "a", "b", decision),
        ):
            bars.handle(event)
        bars.progress.refresh()
        text = console.export_text()
        assert "web1 a->b" in text
        assert "32.0 MiB left of 128.0 MiB" in text  # QEMU's remaining, not bytes sent
        assert "sent 20.0 MiB/s" in text  # 167.8 Mbit/s, in the unit of the sizes
        assert "dirtied 10.0 MiB/s" in text
        assert "pass 2" in text
        assert "not converging" in text
        assert "downtime limit 200 ms" in text
        assert "raise-downtime" in text
        (bar,) = [task for task in bars.progress.tasks if task.description == "web1 a->b"]
        assert (bar.completed, bar.total) == (96 << 20, 128 << 20)  # fills as remaining falls
        bars.handle(MigrationCompleted(1, "web1", "a", "b", None))
        bars.progress.refresh()
    assert "done" in console.export_text()
    quiet = Console(record=True, force_terminal=False)
    with MigrationBars(quiet, enabled=False) as bars:
        bars.handle(MigrationQueued(2, "x", "a", "b"))
    assert quiet.export_text() == ""


def test_node_flag_and_completion(sockdir: Path) -> None:
    root = sockdir / "flagnode"
    listed = kvmflow("--node", f"extra:{root}:127.0.0.5", "node-info", "extra", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert row["node"] == "extra"
    assert row["qemu_binary"] == "qemu-system-x86_64"  # the node's QEMU, probed
    assert row["default_machine"] == f"pc-i440fx-{'.'.join(row['qemu_version'].split('.')[:2])}"
    bad = kvmflow("--node", "nonsense", "list")
    assert bad.returncode == 2
    assert "NAME:RUNTIME_ROOT[:ADDRESS]" in bad.stderr
    script = kvmflow("completion", "bash")
    assert script.returncode == 0
    assert "complete" in script.stdout
    assert "kvmflow" in script.stdout


def test_demo_interrupted_leaves_nothing_behind(sockdir: Path) -> None:
    import signal
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "kvmflow.cli.main", "demo", "--guests", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(sockdir)},
    )
    try:
        # The moment: a migration target is up (a QEMU of this demo waiting with -incoming).
        deadline = time.monotonic() + 60
        while not any("-incoming" in cmdline for cmdline in qemus_under(sockdir)):
            assert time.monotonic() < deadline, "the demo never started a migration"
            assert process.poll() is None, process.communicate()
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    assert qemus_under(sockdir) == []
