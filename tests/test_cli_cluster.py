"""The command line with two ``kvmflow controller`` processes sharing a real etcd cluster:
a shell's start, migrate and stop go to the controller holding the instance's node (through
the store) and print its answer; a bad store is refused with its rule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from kvmflow.engine.shards import owner_of
from kvmflow.store import Owner
from kvmflow.store.etcd import EtcdStore
from kvmflow.store.url import etcd_target
from kvmflow.testing.etcd import EtcdCluster
from tests.test_cli_commands import kvmflow

CLI = (sys.executable, "-m", "kvmflow.cli.main")
FAST = ("--policy", "fixed", "--bandwidth", "1000", "--downtime", "2000")


@pytest.fixture
def config(runtime_root: Path, dirty_guest: Path) -> Path:
    path = runtime_root / "kvmflow.toml"
    path.write_text(f"""
[store]
ttl = 3

[nodes.alpha]
runtime_root = "{runtime_root}/alpha"

[nodes.beta]
runtime_root = "{runtime_root}/beta"

[instances.web1]
node = "alpha"
memory_mib = 128
hvparams = {{ migration_port = 0, kernel_path = "{dirty_guest}", root_path = "/dev/null", \
kernel_args = "mib=8 pause=20", serial_console = false }}
""")
    return path


def shards(url: str) -> dict[str, str]:
    """node -> controller, as the store says."""

    async def read() -> dict[str, str]:
        async with await EtcdStore.open(etcd_target(url), Owner.this_process("peek")) as store:
            return await store.node_owners()

    return anyio.run(read)


def split_ids() -> tuple[str, str]:
    """Two controller ids that share alpha and beta one each (rendezvous hashing)."""
    for i in range(100):
        one, two = f"ctl-one{i}", f"ctl-two{i}"
        if owner_of("alpha", [one, two]) == one and owner_of("beta", [one, two]) == two:
            return one, two
    raise AssertionError("no pair of ids found")


@pytest.fixture
def controllers(
    etcd: EtcdCluster, config: Path, tmp_path: Path
) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """Two controllers running, their shards settled over alpha and beta."""
    url = etcd.url("/cli")
    env = {**os.environ, "KVMFLOW_STORE": url}
    started = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvmflow.cli.main",
                "-c",
                str(config),
                "controller",
                "--id",
                name,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / f"{name}.log").open("wb"),
        )
        for name in split_ids()
    ]
    try:
        deadline = time.monotonic() + 30
        while set(shards(url).values()) != set(split_ids()):
            assert time.monotonic() < deadline, shards(url)
            assert all(p.poll() is None for p in started)
            time.sleep(0.2)
        yield url, started
    finally:
        for process in started:
            process.send_signal(signal.SIGTERM)
        for process in started:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_a_shells_commands_go_to_the_nodes_controllers(
    controllers: tuple[str, list[subprocess.Popen[bytes]]], config: Path
) -> None:
    url, _ = controllers
    env = {"KVMFLOW_STORE": url}
    owners = shards(url)
    started = kvmflow("start", "web1", config=config, env=env)
    assert started.returncode == 0, started.stderr
    assert f"controller {owners['alpha']}: started web1 on alpha" in started.stdout
    moved = kvmflow("migrate", "web1", "beta", *FAST, "--json", config=config, env=env)
    assert moved.returncode == 0, moved.stderr
    answer = json.loads(moved.stdout)
    assert (answer["ok"], answer["by"], answer["operation"]) == (True, owners["alpha"], "migrate")
    listed = kvmflow("list", "--all", "--json", config=config, env=env)
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert [(c["node"], c["state"]) for c in row["copies"]] == [("beta", "running")]
    stopped = kvmflow("stop", "web1", "--force", config=config, env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert f"controller {owners['beta']}: stopped web1 on beta" in stopped.stdout
    jobs = kvmflow("jobs", "--json", config=config, env=env)
    assert jobs.returncode == 0, jobs.stderr
    assert json.loads(jobs.stdout) == []


def test_a_controller_needs_an_etcd_store_and_a_bad_url_is_refused(config: Path) -> None:
    done = kvmflow("controller", "--id", "x", config=config)
    assert done.returncode == 2
    assert "an etcd:// URL: kvmflow controller needs a cluster" in done.stderr
    bad = kvmflow(
        "list", config=config, env={"KVMFLOW_STORE": "etcd://no-port,127.0.0.1:99999/a b?pw=1"}
    )
    assert bad.returncode == 2
    for rule in ("HOST:PORT, port 1 to 65535", "/NAME[/NAME...]", "one of ca, cert, key"):
        assert rule in bad.stderr
