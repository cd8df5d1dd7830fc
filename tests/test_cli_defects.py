"""Defects an operator found in the command line (issue "the command line for a real
fleet"), each with a test that failed before its fix: configuration keys and values that
were silently accepted, text from outside read as rich markup, HMP errors that exited 0,
and errors under ``--json`` that were not JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from kvmflow.cli.context import make_table
from kvmflow.errors import ValidationError
from tests.test_cli_commands import kvmflow


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "[instances.x]\nmemroy_mib = 64\n",
            "instances.x.memroy_mib=64: unknown key; known: disks, hvparams, memory_mib",
        ),
        ("[instances.x]\nmemory_mib = 64.9\n", "instances.x.memory_mib=64.9: a whole number"),
        ("[instances.x]\nvcpus = true\n", "instances.x.vcpus=True: a whole number"),
        ('[nodes."a b"]\nruntime_root = "/tmp/kvx"\n', "nodes.a b='a b': a node name"),
        (
            '[nodes.a]\nruntime_root = "/tmp/kvx"\nmigration_address = "not-an-ip"\n',
            "nodes.a.migration_address='not-an-ip': an IPv4 or IPv6 address",
        ),
        (
            '[nodes.a]\nruntime_root = "/tmp/kvx"\n[nodes.b]\nruntime_root = "/tmp/kvx/"\n',
            "nodes.b.runtime_root='/tmp/kvx/': a root of its own (nodes.a has it)",
        ),
    ],
    ids=["unknown-key", "fraction", "boolean", "node-name", "address", "shared-root"],
)
def test_a_config_that_was_silently_accepted_is_refused(
    tmp_path: Path, body: str, message: str
) -> None:
    config = write_config(tmp_path / "k.toml", body)
    done = kvmflow("list", config=config)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_evacuate_to_nothing_is_a_usage_error(runtime_root: Path) -> None:
    config = write_config(
        runtime_root / "k.toml", f'[nodes.a]\nruntime_root = "{runtime_root}/a"\n'
    )
    done = kvmflow("evacuate", "a", "--to", " , ", config=config)
    assert done.returncode == 2
    assert "--to=' , ': one or more node names, comma-separated" in done.stderr


def test_errors_under_json_are_json_saying_what_the_exit_code_means(runtime_root: Path) -> None:
    config = write_config(
        runtime_root / "k.toml", f'[nodes.a]\nruntime_root = "{runtime_root}/a"\n'
    )
    done = kvmflow("start", "nope", "--json", config=config)
    assert done.returncode == 2
    error = json.loads(done.stderr)
    assert error["exit_code"] == 2
    assert error["meaning"] == "bad usage or configuration"
    assert "instance='nope'" in error["error"]
    assert error["kind"] == "ConfigError"


def test_table_cells_from_outside_are_never_markup() -> None:
    console = Console(record=True, width=120)
    table = make_table("what", "detail")
    table.add_row("[bold]web1[/]", "failed: no monitor [store /var/lib/kvmflow/store.sqlite]")
    table.add_row("device_add [/x]", "[interfaces] [id]")
    console.print(table)  # before: rich.errors.MarkupError, or brackets silently gone
    text = console.export_text()
    for literal in ("[bold]web1[/]", "[store /var/lib/kvmflow/store.sqlite]", "[/x]", "[id]"):
        assert literal in text


@pytest.fixture
def running(runtime_root: Path) -> Iterator[Path]:
    config = write_config(
        runtime_root / "k.toml",
        f'[nodes.a]\nruntime_root = "{runtime_root}/a"\n[instances.m1]\nnode = "a"\n'
        "memory_mib = 64\n",
    )
    started = kvmflow("start", "m1", config=config)
    assert started.returncode == 0, started.stderr
    yield config
    kvmflow("stop", "m1", "--force", config=config)


def test_hmp_output_is_printed_as_qemu_wrote_it_and_errors_exit_1(running: Path) -> None:
    human = kvmflow("monitor", "m1", "--hmp", "help", config=running)
    as_json = kvmflow("monitor", "m1", "--hmp", "help", "--json", config=running)
    assert human.returncode == as_json.returncode == 0
    assert "[" in human.stdout  # usage lines such as "[interfaces]" survive
    wanted = json.loads(as_json.stdout)["output"]
    assert human.stdout.split() == wanted.split()  # only the line wrapping may differ
    bogus = kvmflow("monitor", "m1", "--hmp", "bogus cmd [/x]", config=running)
    assert bogus.returncode == 1
    assert "unknown command" in bogus.stderr
    assert "Traceback" not in bogus.stderr


def test_version_and_pause_resume(running: Path) -> None:
    version = kvmflow("--version")
    assert version.returncode == 0
    assert version.stdout.startswith("kvmflow 0.")
    paused = kvmflow("pause", "m1", "--json", config=running)
    assert paused.returncode == 0, paused.stderr
    assert json.loads(paused.stdout)["state"] == "paused"
    info = json.loads(kvmflow("info", "m1", "--json", config=running).stdout)
    assert info["run_state"] == "paused"
    again = kvmflow("pause", "m1", config=running)
    assert again.returncode == 1
    assert "pause needs it running" in again.stderr
    resumed = kvmflow("resume", "m1", "--json", config=running)
    assert json.loads(resumed.stdout)["state"] == "running"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--bandwidth", "0"), "--bandwidth=0: a positive integer"),
        (("--timeout", "0"), "--timeout=0.0: seconds, above 0"),
        (("--multifd", "0"), "--multifd=0: 1 or more channels"),
    ],
)
def test_policy_flag_errors_name_the_flag(
    running: Path, flags: tuple[str, ...], message: str
) -> None:
    done = kvmflow("migrate", "m1", "a", *flags, config=running)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Limits(" not in done.stderr


def test_migrate_knobs_make_the_policy_they_say() -> None:
    from kvmflow.cli.policies import PolicyFlags, build_policy
    from kvmflow.migration.policy import Action

    policy = build_policy(
        PolicyFlags(timeout=20, postcopy=True, auto_converge=True, max_downtime=800), None
    )
    assert policy.deadline_seconds(64) == policy.deadline_seconds(65536) == 20
    assert policy.deadline_actions == (Action.POSTCOPY,)
    assert policy.stall_actions[-1] is Action.POSTCOPY
    assert policy.downtime_ceiling_ms == 800
    assert {"postcopy-ram", "auto-converge"} <= policy.enabled_capabilities("source")
    parallel = build_policy(PolicyFlags(multifd=4), None)
    assert parallel.capabilities.multifd_channels == 4
    assert "multifd" in parallel.enabled_capabilities("target")
    with pytest.raises(ValidationError, match="cannot combine multifd with postcopy"):
        build_policy(PolicyFlags(multifd=4, postcopy=True), None)


def test_evacuate_without_to_uses_every_other_node_and_each_instances_parameters(
    runtime_root: Path, own_store: Path
) -> None:
    import anyio

    from kvmflow.store import SQLiteStore

    config = write_config(
        runtime_root / "k.toml",
        f'[nodes.a]\nruntime_root = "{runtime_root}/a"\n'
        f'[nodes.b]\nruntime_root = "{runtime_root}/b"\n'
        '[instances.e1]\nnode = "a"\nmemory_mib = 64\n'
        "hvparams = { migration_port = 0, migration_downtime = 30, "
        "migration_bandwidth = 900 }\n",
    )
    assert kvmflow("start", "e1", config=config).returncode == 0
    dry = json.loads(kvmflow("evacuate", "a", "--dry-run", "--json", config=config).stdout)
    assert dry["plan"] == [{"instance": "e1", "target": "b", "memory_mib": 64}]
    done = kvmflow("evacuate", "a", "--json", config=config)
    assert done.returncode == 0, done.stderr
    (moved,) = json.loads(done.stdout)["moved"]
    assert (moved["instance"], moved["target"]) == ("e1", "b")
    # The summary has the figures the demo's table has, as numbers.
    assert moved["seconds"] > 0
    assert isinstance(moved["downtime_ms"], int)
    assert moved["transferred_bytes"] > 0

    async def recorded_policy() -> dict[str, object]:
        async with await SQLiteStore.open(own_store) as store:
            (entry,) = [e for e in await store.history("e1") if e.operation == "migrate"]
            policy: dict[str, object] = entry.details["policy"]
            return policy

    policy = anyio.run(recorded_policy)
    assert (policy["downtime_ms"], policy["bandwidth_mib"]) == (30, 900)  # its own hvparams
    kvmflow("stop", "e1", "--force", config=config)


def test_list_options_as_gnt_instance_list_has_them(running: Path) -> None:
    plain = kvmflow(
        "list",
        "-o",
        "instance,state,node,memory_mib",
        "--separator",
        "|",
        "--no-headers",
        config=running,
    )
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == "m1|running|a|64\n"
    headed = kvmflow("list", "-o", "instance,state", "--separator", ",", config=running)
    assert headed.stdout.splitlines() == ["instance,state", "m1,running"]
    picked = json.loads(kvmflow("list", "-o", "instance,pid", "--json", config=running).stdout)
    assert list(picked[0]) == ["instance", "pid"]
    assert json.loads(kvmflow("list", "--on", "elsewhere", "--json", config=running).stdout) == []
    assert json.loads(kvmflow("list", "--tag", "web", "--json", config=running).stdout) == []
    bad = kvmflow("list", "-o", "instance,colour", config=running)
    assert bad.returncode == 2
    assert "-o='instance,colour': fields among instance, state" in bad.stderr


def test_reboot_says_what_it_waits_for_and_keeps_to_its_timeout(running: Path) -> None:
    rebooted = kvmflow("reboot", "m1", "--timeout", "0.5", config=running)
    assert rebooted.returncode == 0, rebooted.stderr
    assert "asked m1 on a to power off (ACPI); it is killed if it has not in 0.5 s" in (
        rebooted.stderr
    )
    assert "rebooted m1 on a" in rebooted.stdout
    assert json.loads(kvmflow("info", "m1", "--json", config=running).stdout)["running"]
    bad = kvmflow("reboot", "m1", "--timeout", "-1", config=running)
    assert bad.returncode == 2
    assert "--timeout=-1.0: 0 or more seconds" in bad.stderr


@pytest.mark.parametrize(
    ("words", "completions"),
    [
        ("start w", "web1 web2"),
        ("migrate web1 b", "beta"),
        ("evacuate a", "alpha"),
        ("node-info b", "beta"),
    ],
)
def test_shell_completion_offers_names_from_the_config(
    runtime_root: Path, tmp_path: Path, words: str, completions: str
) -> None:
    config = write_config(
        runtime_root / "k.toml",
        f'[nodes.alpha]\nruntime_root = "{runtime_root}/a"\n'
        f'[nodes.beta]\nruntime_root = "{runtime_root}/b"\n'
        '[instances.web1]\nnode = "alpha"\n[instances.web2]\nnode = "beta"\n'
        '[instances.db1]\nnode = "alpha"\n',
    )
    line = f"kvmflow -c {config} {words}"
    out = tmp_path / "completions"
    done = kvmflow(
        env={
            "_ARGCOMPLETE": "1",
            "COMP_LINE": line,
            "COMP_POINT": str(len(line)),
            "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
        }
    )
    assert done.returncode == 0, done.stderr
    assert sorted(out.read_text().split()) == completions.split()


def test_the_readme_cli_reference_lists_every_command_and_flag_of_help() -> None:
    import argparse
    import re

    from kvmflow.cli.main import build_parser

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("## Command line", 1)[1].split("```", 2)[1]
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in commands.choices.items():
        assert re.search(rf"\bkvmflow\b[^\n]* {re.escape(name)}\b", block), f"{name} missing"
        for action in sub._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag not in ("--help", "--json"):
                    assert flag in block, f"{name} {flag} is not in the README's reference"


def test_recover_resolve_wants_name_equals_node(runtime_root: Path) -> None:
    config = write_config(
        runtime_root / "k.toml", f'[nodes.a]\nruntime_root = "{runtime_root}/a"\n'
    )
    done = kvmflow("recover", "--resolve", "web1", config=config)
    assert done.returncode == 2
    assert "--resolve='web1': NAME=NODE, once per instance" in done.stderr
    nothing = kvmflow("recover", "--resolve", "web1=a", config=config)
    assert nothing.returncode == 0  # nothing to resolve: nothing was touched


def test_tls_flag_and_node_credentials_in_the_config() -> None:
    from kvmflow.cli.config import parse_config
    from kvmflow.cli.policies import PolicyFlags, build_policy

    assert build_policy(PolicyFlags(tls=True), None).tls is True
    config = parse_config(
        {"nodes": {"a": {"migration_tls_dir": "/etc/kvmflow/tls", "migration_tls_verify": False}}}
    )
    tls = config.nodes["a"].migration_tls
    assert tls is not None
    assert (tls.directory, tls.verify_peer, tls.hostname) == ("/etc/kvmflow/tls", False, None)
    with pytest.raises(ValidationError) as bad:
        parse_config(
            {
                "nodes": {
                    "a": {
                        "migration_tls_dir": "etc/tls,x",
                        "migration_tls_verify": "yes",
                        "migration_tls_hostname": "a b",
                    }
                }
            }
        )
    assert {p.field for p in bad.value.problems} == {"nodes.a.migration_tls_dir"}
    with pytest.raises(ValidationError) as bad:
        parse_config({"nodes": {"a": {"migration_tls_dir": "/t", "migration_tls_verify": "yes"}}})
    assert {p.field for p in bad.value.problems} == {"nodes.a.migration_tls_verify"}
