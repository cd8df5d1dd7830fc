"""The serial console from the command line: refused on a stopped instance, one console at
a time, and a word when the console ends because the guest migrated away."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_cli_commands import kvmflow

FAST = ("--policy", "fixed", "--bandwidth", "1000", "--downtime", "2000")


@pytest.fixture
def config(runtime_root: Path) -> Iterator[Path]:
    path = runtime_root / "k.toml"
    path.write_text(f"""
[nodes.alpha]
runtime_root = "{runtime_root}/alpha"
[nodes.beta]
runtime_root = "{runtime_root}/beta"
[instances.c1]
node = "alpha"
memory_mib = 64
hvparams = {{ migration_port = 0 }}
""")
    yield path
    kvmflow("stop", "c1", "--force", config=path)


def locked(lock: Path) -> bool:
    """Whether a console holds ``lock`` now (asked with flock itself)."""
    probe = subprocess.run(["flock", "-n", "-E", "75", str(lock), "true"], check=False)
    return probe.returncode == 75


def attached_console(config: Path, name: str, lock: Path) -> subprocess.Popen[str]:
    """``kvmflow console NAME`` in a child, returned once it holds ``lock`` (attached)."""
    console = subprocess.Popen(
        [sys.executable, "-m", "kvmflow.cli.main", "-c", str(config), "console", name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (lock.exists() and locked(lock)):  # the lock can only be polled
        if console.poll() is not None or time.monotonic() > deadline:
            console.kill()
            raise AssertionError(f"the console never attached: {console.communicate()}")
    return console


def test_console_on_a_stopped_instance_is_refused(config: Path) -> None:
    done = kvmflow("console", "c1", config=config)
    assert done.returncode == 1
    assert "c1 is not running; start it first" in done.stderr
    assert "connected" not in done.stdout + done.stderr


def test_one_console_at_a_time_and_a_word_when_the_guest_migrates(
    config: Path, runtime_root: Path
) -> None:
    assert kvmflow("start", "c1", config=config).returncode == 0
    lock = runtime_root / "alpha" / "ctrl" / "c1.serial.lock"
    first = attached_console(config, "c1", lock)
    try:
        second = kvmflow("console", "c1", config=config)
        assert second.returncode == 1
        assert "another console is attached to c1 on alpha (one at a time)" in second.stderr

        moved = kvmflow("migrate", "c1", "beta", *FAST, config=config)
        assert moved.returncode == 0, moved.stderr
        _, stderr = first.communicate(timeout=30)  # the source QEMU quit: the console ends
        assert first.returncode == 0
        assert "c1 migrated to beta; the console ended there" in stderr
        assert not lock.exists()  # the source's files, the lock included, were removed
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
