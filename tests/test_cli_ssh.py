"""The command line on SSH nodes: two real sshd on 127.0.0.2 and 127.0.0.3 stand for two
hosts, declared in the config file exactly as in production (host, user, port, identity
file, known hosts), and every command works on them as on local nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmflow.testing.sshd import SSHFleet
from tests.conftest import qemus_under
from tests.test_cli_commands import kvmflow
from tests.test_cli_console import attached_console

FAST = ("--policy", "fixed", "--bandwidth", "1000", "--downtime", "2000")


@pytest.fixture
def ssh_config(runtime_root: Path, ssh_hosts: SSHFleet) -> Path:
    nodes = []
    for name, host in zip(("alpha", "beta"), ssh_hosts.hosts, strict=True):
        nodes.append(f"""
[nodes.{name}]
host = "{host.host}"
port = {host.port}
user = "root"
identity_file = "{ssh_hosts.client_key}"
known_hosts = "{ssh_hosts.known_hosts}"
runtime_root = "{runtime_root}/{name}"
migration_address = "{host.host}"
""")
    path = runtime_root / "kvmflow.toml"
    path.write_text(
        "".join(nodes)
        + """
[instances.s1]
node = "alpha"
memory_mib = 64
hvparams = { migration_port = 0 }
"""
    )
    return path


def test_every_command_works_on_ssh_nodes(ssh_config: Path, runtime_root: Path) -> None:
    started = kvmflow("start", "s1", config=ssh_config)
    assert started.returncode == 0, started.stderr
    assert "started s1 on alpha" in started.stdout
    (row,) = json.loads(kvmflow("list", "--json", config=ssh_config).stdout)
    assert (row["instance"], row["state"], row["node"]) == ("s1", "running", "alpha")
    info = json.loads(kvmflow("info", "s1", "--json", config=ssh_config).stdout)
    assert (info["node"], info["run_state"]) == ("alpha", "running")
    status = kvmflow("monitor", "s1", "--qmp", "query-status", "--json", config=ssh_config)
    assert json.loads(status.stdout)["status"] == "running"
    assert kvmflow("pause", "s1", config=ssh_config).returncode == 0
    info = json.loads(kvmflow("info", "s1", "--json", config=ssh_config).stdout)
    assert info["run_state"] == "paused"
    assert kvmflow("resume", "s1", config=ssh_config).returncode == 0
    attach_console_over_ssh(ssh_config, runtime_root)

    moved = kvmflow("migrate", "s1", "beta", *FAST, "--json", config=ssh_config)
    assert moved.returncode == 0, moved.stderr
    assert (json.loads(moved.stdout)["source"], json.loads(moved.stdout)["target"]) == (
        "alpha",
        "beta",
    )
    (row,) = json.loads(kvmflow("list", "--json", config=ssh_config).stdout)
    assert (row["node"], row["recorded_node"], row["flags"]) == ("beta", "beta", [])
    assert qemus_under(runtime_root / "alpha") == []

    assert kvmflow("reboot", "s1", "--force", config=ssh_config).returncode == 0
    back = kvmflow("evacuate", "beta", "--json", config=ssh_config)  # to every other node
    assert back.returncode == 0, back.stderr
    assert [m["target"] for m in json.loads(back.stdout)["moved"]] == ["alpha"]
    verified = kvmflow("verify", config=ssh_config)
    assert verified.returncode == 0, verified.stdout
    stopped = kvmflow("stop", "s1", "--force", config=ssh_config)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped s1 on alpha" in stopped.stdout
    assert qemus_under(runtime_root) == []
    nothing = kvmflow("recover", config=ssh_config)
    assert nothing.returncode == 0
    assert "nothing to recover" in nothing.stdout


def attach_console_over_ssh(config: Path, runtime_root: Path) -> None:
    """A console through ``ssh`` holds the node's lock; a second one is refused."""
    console = attached_console(config, "s1", runtime_root / "alpha" / "ctrl" / "s1.serial.lock")
    try:
        second = kvmflow("console", "s1", config=config)
        assert second.returncode == 1
        assert "another console is attached to s1 on alpha" in second.stderr
    finally:
        console.kill()
        console.communicate()


def test_an_ssh_node_that_refuses_us_is_a_clear_error(
    runtime_root: Path, ssh_hosts: SSHFleet
) -> None:
    host = ssh_hosts.hosts[0]
    path = runtime_root / "kvmflow.toml"
    path.write_text(f"""
[nodes.alpha]
host = "{host.host}"
port = {host.port}
identity_file = "{ssh_hosts.other_key}"
known_hosts = "{ssh_hosts.known_hosts}"
runtime_root = "{runtime_root}/alpha"
migration_address = "{host.host}"

[instances.s1]
node = "alpha"
memory_mib = 64
""")
    refused = kvmflow("start", "s1", config=path)
    assert refused.returncode == 1
    assert "refused our key" in refused.stderr
    assert "Traceback" not in refused.stderr
    verify = kvmflow("verify", "--json", config=path)
    assert verify.returncode == 1
    (finding,) = json.loads(verify.stdout)
    assert finding["subject"] == "node alpha"
    assert "unreachable" in finding["finding"]
    assert "refused our key" in finding["finding"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('host = "a b"', "nodes.alpha.host='a b': a host name or IP address"),
        ('host = "h"\nport = 70000', "nodes.alpha.port=70000: a TCP port, 1 to 65535"),
        ('host = "h"\nidentity_file = "key"', "nodes.alpha.identity_file='key': an absolute"),
    ],
)
def test_bad_ssh_settings_are_refused(runtime_root: Path, body: str, message: str) -> None:
    path = runtime_root / "kvmflow.toml"
    path.write_text(f'[nodes.alpha]\nruntime_root = "{runtime_root}/a"\n{body}\n')
    done = kvmflow("list", config=path)
    assert done.returncode == 2
    assert message in done.stderr


def test_the_config_is_found_without_dash_c(runtime_root: Path, tmp_path: Path) -> None:
    path = runtime_root / "found.toml"
    path.write_text(f'[nodes.here]\nruntime_root = "{runtime_root}/here"\n')
    listed = kvmflow("node-info", "here", "--json", env={"KVMFLOW_CONFIG": str(path)})
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)[0]["node"] == "here"
    nowhere = kvmflow("start", "web1")  # no -c, no $KVMFLOW_CONFIG, no ./kvmflow.toml here
    assert nowhere.returncode == 2
    assert "no config file found at $KVMFLOW_CONFIG, ./kvmflow.toml" in nowhere.stderr
