"""The command line sharing one store between shells, against real QEMU: the races of the
issue (one proceeds, the other is refused naming the owner, never two copies), ``jobs``
and ``abort`` from another shell, and a controller killed mid-migration then ``recover``.

Moments are chosen by what the store says (``jobs`` shows the migration streaming), never
by sleeping for a time.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from kvmflow.guest import wait_for_sweeps
from kvmflow.testing import local_hypervisors
from tests.conftest import qemus_under
from tests.test_cli_commands import kvmflow

HOLDER = """
import sys, anyio
from kvmflow.store import Owner, SQLiteStore

async def main() -> None:
    async with await SQLiteStore.open(sys.argv[1]) as store:
        await store.acquire(sys.argv[2], Owner.this_process("other-shell"), sys.argv[3], 60)
        print("held", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)

anyio.run(main)
"""


CLI = (sys.executable, "-m", "kvmflow.cli.main")
FAST = ("--policy", "fixed", "--bandwidth", "1000", "--downtime", "2000")  # converges at once


@pytest.fixture
def config(runtime_root: Path, dirty_guest: Path) -> Path:
    """Two nodes and a guest that keeps 48 MiB dirty: at 5 MiB/s it never converges."""
    path = runtime_root / "kvmflow.toml"
    path.write_text(f"""
[nodes.alpha]
runtime_root = "{runtime_root}/alpha"

[nodes.beta]
runtime_root = "{runtime_root}/beta"

[instances.web1]
node = "alpha"
memory_mib = 128
hvparams = {{ migration_port = 0, kernel_path = "{dirty_guest}", root_path = "/dev/null", \
kernel_args = "mib=48 pause=0", serial_console = false }}
""")
    return path


def listed(config: Path) -> dict[str, Any]:
    done = kvmflow("list", "--all", "--json", config=config)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return {row["instance"]: row for row in rows}


def copies(config: Path, name: str = "web1") -> list[tuple[str, str]]:
    return [(c["node"], c["state"]) for c in listed(config)[name]["copies"]]


@pytest.fixture
def slow_migration(config: Path, runtime_root: Path) -> Iterator[subprocess.Popen[str]]:
    """``kvmflow migrate web1 beta`` at 5 MiB/s of a booted guest, returned once ``jobs``
    shows it streaming with progress; killed in teardown if still running."""
    started = kvmflow("start", "web1", config=config)
    assert started.returncode == 0, started.stderr
    (alpha,) = local_hypervisors(runtime_root, "alpha")
    anyio.run(wait_for_sweeps, alpha, "web1")  # booted: its memory is no longer zero
    migration = subprocess.Popen(
        [
            *CLI,
            "-c",
            str(config),
            "migrate",
            "web1",
            "beta",
            "--policy",
            "fixed",
            "--bandwidth",
            "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            jobs = json.loads(kvmflow("jobs", "--json", config=config).stdout)
            if jobs and jobs[0]["phase"] == "streaming" and jobs[0]["progress"]:
                break
            assert migration.poll() is None, migration.communicate()
            assert time.monotonic() < deadline, jobs
        yield migration
    finally:
        if migration.poll() is None:
            migration.kill()
        migration.communicate()


def test_migrate_then_start_is_refused_where_the_guest_is_not(config: Path) -> None:
    assert kvmflow("start", "web1", config=config).returncode == 0
    moved = kvmflow("migrate", "web1", "beta", *FAST, config=config)
    assert moved.returncode == 0, moved.stderr
    again = kvmflow("start", "web1", config=config)  # the config still says alpha
    assert again.returncode == 1
    assert "already running on beta" in again.stderr
    assert "Traceback" not in again.stderr
    assert copies(config) == [("beta", "running")]
    assert listed(config)["web1"]["recorded_node"] == "beta"
    assert kvmflow("stop", "web1", "--force", config=config).returncode == 0
    assert listed(config)["web1"]["recorded_node"] is None  # stopped: it runs nowhere
    restarted = kvmflow("start", "web1", config=config)  # a first start again: the config's
    assert "started web1 on alpha" in restarted.stdout, restarted.stderr


@pytest.mark.parametrize("command", ["reboot", "stop", "migrate", "start"])
def test_a_second_operation_during_a_migration_is_refused_naming_the_owner(
    config: Path, slow_migration: subprocess.Popen[str], command: str
) -> None:
    args = {
        "reboot": ["reboot", "web1"],
        "stop": ["stop", "web1", "--force"],
        "migrate": ["migrate", "web1", "beta"],
        "start": ["start", "web1"],
    }[command]
    refused = kvmflow(*args, config=config)
    assert refused.returncode == 1
    assert "Traceback" not in refused.stderr
    assert f"busy with 'migrate' by kvmflow-cli (pid {slow_migration.pid}" in refused.stderr
    assert copies(config) == [("alpha", "running"), ("beta", "inmigrate")]
    assert slow_migration.poll() is None  # the migration goes on


def test_info_during_a_migration_answers_at_once_with_the_operation(
    config: Path, slow_migration: subprocess.Popen[str]
) -> None:
    info = kvmflow("info", "web1", "--json", config=config)
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert (data["node"], data["run_state"], data["migration"]) == ("alpha", "running", "active")
    assert data["operation"].startswith(f"migrate by kvmflow-cli (pid {slow_migration.pid}")


def test_a_store_that_cannot_be_used_stops_the_command_before_anything_runs(
    config: Path, runtime_root: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-dir" / "store.sqlite"
    refused = kvmflow("start", "web1", config=config, env={"KVMFLOW_STORE": str(missing)})
    assert refused.returncode == 1
    assert f"the store's directory {missing.parent} does not exist" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert qemus_under(runtime_root) == []
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"this is not a database, and it is kept as it is" * 100)
    refused = kvmflow("start", "web1", config=config, env={"KVMFLOW_STORE": str(corrupt)})
    assert refused.returncode == 1
    assert "corrupt or not a store" in refused.stderr
    assert corrupt.read_bytes().startswith(b"this is not a database")
    assert qemus_under(runtime_root) == []


def test_abort_from_another_shell_cancels_and_cleans_up(
    config: Path, runtime_root: Path, slow_migration: subprocess.Popen[str]
) -> None:
    row = listed(config)["web1"]
    assert row["operation"].startswith("migrate by kvmflow-cli")
    aborted = kvmflow("abort", "web1", "--json", config=config)
    assert aborted.returncode == 0, aborted.stderr
    answer = json.loads(aborted.stdout)
    assert answer["ended"]
    assert answer["outcome"].startswith("aborted: requested by kvmflow abort")
    _, stderr = slow_migration.communicate(timeout=60)
    assert slow_migration.returncode == 1
    assert "aborted on request by kvmflow abort" in stderr
    assert "Traceback" not in stderr
    assert copies(config) == [("alpha", "running")]
    assert qemus_under(runtime_root / "beta") == []
    assert json.loads(kvmflow("jobs", "--json", config=config).stdout) == []
    nothing = kvmflow("abort", "web1", config=config)
    assert nothing.returncode == 1
    assert "nothing to abort" in nothing.stderr


@pytest.mark.parametrize(
    ("held", "command", "running"),
    [
        ("start", ("start", "web1"), False),  # start vs start
        ("reboot", ("migrate", "web1", "beta", *FAST), True),  # reboot vs migrate
        ("migrate", ("stop", "web1", "--force"), True),  # migrate vs stop
    ],
    ids=["start-vs-start", "reboot-vs-migrate", "migrate-vs-stop"],
)
def test_an_operation_held_by_another_shell_refuses_ours(
    config: Path, own_store: Path, held: str, command: tuple[str, ...], running: bool
) -> None:
    if running:
        assert kvmflow("start", "web1", config=config).returncode == 0
    before = copies(config)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(own_store), "web1", held],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        refused = kvmflow(*command, config=config)
        assert refused.returncode == 1
        assert f"busy with '{held}' by other-shell (pid {holder.pid}" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert copies(config) == before  # nothing was touched
    finally:
        holder.communicate("")
    # The holder died without releasing: a plain operation may not take its lease over...
    refused = kvmflow(*command, config=config)
    assert refused.returncode == 1
    assert "its owner process is gone; only recovery may take it over" in refused.stderr
    recovered = json.loads(kvmflow("recover", "--json", config=config).stdout)
    assert [(r["instance"], r["verdict"]) for r in recovered] == [("web1", "settled")]
    again = kvmflow(*command, config=config)  # ...recovery released it
    assert again.returncode == 0, again.stderr


def test_a_killed_migrate_command_is_recovered_by_kvmflow_recover(
    config: Path, runtime_root: Path, slow_migration: subprocess.Popen[str]
) -> None:
    slow_migration.send_signal(signal.SIGKILL)
    slow_migration.communicate()
    row = listed(config)["web1"]
    assert row["operation"].endswith("(owner gone: recover)")
    assert any("inmigrate copy on beta" in flag for flag in row["flags"])
    (job,) = json.loads(kvmflow("jobs", "--json", config=config).stdout)
    assert not job["owner_alive"]
    refused = kvmflow("start", "web1", config=config)
    assert refused.returncode == 1
    assert "only recovery may take it over" in refused.stderr

    verify = kvmflow("verify", "--json", config=config)
    assert verify.returncode == 1
    findings = [f["finding"] for f in json.loads(verify.stdout)]
    assert any("inmigrate copy on beta" in f for f in findings), findings
    assert any("left open at streaming" in f and "run kvmflow recover" in f for f in findings)

    dry = kvmflow("recover", "--dry-run", "--json", config=config)
    assert dry.returncode == 0, dry.stderr
    assert [(r["instance"], r["verdict"]) for r in json.loads(dry.stdout)] == [("web1", "would")]
    assert copies(config) == [("alpha", "running"), ("beta", "inmigrate")]  # dry: untouched

    done = kvmflow("recover", "--abort", "--json", config=config)
    assert done.returncode == 0, done.stderr
    assert [(r["instance"], r["verdict"]) for r in json.loads(done.stdout)] == [("web1", "aborted")]
    assert copies(config) == [("alpha", "running")]
    assert listed(config)["web1"]["flags"] == []
    assert qemus_under(runtime_root / "beta") == []
    again = kvmflow("recover", config=config)
    assert again.returncode == 0
    assert "nothing to recover" in again.stdout
    verified = kvmflow("verify", config=config)
    assert verified.returncode == 0, verified.stdout
    assert "no findings" in verified.stdout


@pytest.mark.parametrize(
    ("sig", "code", "said"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
    ids=["ctrl-c", "sigterm"],
)
def test_a_migrate_command_stopped_by_a_signal_cleans_up_as_for_a_cancel(
    config: Path,
    runtime_root: Path,
    slow_migration: subprocess.Popen[str],
    sig: signal.Signals,
    code: int,
    said: str,
) -> None:
    slow_migration.send_signal(sig)
    _, stderr = slow_migration.communicate(timeout=60)
    assert slow_migration.returncode == code, stderr
    assert f"kvmflow: {said}; what was in flight was cancelled and cleaned up" in stderr
    assert "Traceback" not in stderr
    assert "CancelledError" not in stderr
    assert copies(config) == [("alpha", "running")]
    assert qemus_under(runtime_root / "beta") == []
    assert json.loads(kvmflow("jobs", "--json", config=config).stdout) == []
    verified = kvmflow("verify", config=config)  # nothing was left for recovery
    assert verified.returncode == 0, verified.stdout
