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

from kvmflow.cli.commands import make_table
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
