"""Plan files: validated whole before anything runs, idempotent when run again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from kvmflow.engine import Engine, NodeEntry
from kvmflow.errors import ValidationError
from kvmflow.instance import Instance
from kvmflow.kvm import InstanceInfo, InstanceSpec, KvmHypervisor, RuntimePaths
from kvmflow.node import LocalNode
from kvmflow.plans import parse_plan, run_plan

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def kvmflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmflow.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_bad_entry_is_reported_by_name() -> None:
    data = {
        "step": [
            {"action": "start", "instance": "web1"},
            {"action": "explode", "instance": "web1"},
            {"action": "migrate", "instance": "ghost", "target": "mars", "live": "yes"},
            {"action": "stop", "instance": "web1", "force": 1, "colour": "red"},
            "not a table",
        ]
    }
    with pytest.raises(ValidationError) as info:
        parse_plan(data, instances={"web1"}, nodes={"alpha", "beta"})
    fields = {p.field for p in info.value.problems}
    assert fields == {
        "step[1].action",
        "step[2].instance",
        "step[2].target",
        "step[2].live",
        "step[3].force",
        "step[3].colour",
        "step[4]",
    }
    with pytest.raises(ValidationError, match="non-empty list"):
        parse_plan({}, instances=set(), nodes=set())


def test_upgrade_steps_are_checked_whole() -> None:
    good = {"action": "upgrade", "node": "alpha", "command": ["apt-get", "install", "-y", "q"]}
    [step] = parse_plan({"step": [good]}, instances=set(), nodes={"alpha", "beta"})
    assert (step.node, step.command, step.targets, step.bring_back) == (
        "alpha",
        ("apt-get", "install", "-y", "q"),
        None,
        True,
    )
    assert step.describe() == "step[0] upgrade alpha"
    bad = {
        "action": "upgrade",
        "node": "mars",
        "command": "apt-get install qemu; reboot",  # a shell line, not a list
        "targets": ["alpha", "venus"],
        "bring_back": "yes",
        "instance": "web1",
    }
    with pytest.raises(ValidationError) as info:
        parse_plan({"step": [bad]}, instances={"web1"}, nodes={"alpha", "beta"})
    assert {p.field for p in info.value.problems} == {
        "step[0].node",
        "step[0].command",
        "step[0].targets",
        "step[0].bring_back",
        "step[0].instance",
    }


def test_example_plan_is_valid() -> None:
    result = kvmflow(
        "-c", str(EXAMPLES / "kvmflow.toml"), "plan", "validate", str(EXAMPLES / "plan.toml")
    )
    assert result.returncode == 0, result.stderr
    assert "plan is valid: 3 steps" in result.stdout


@pytest.fixture
def config(runtime_root: Path) -> Path:
    path = runtime_root / "kvmflow.toml"
    path.write_text(f"""
[nodes.alpha]
runtime_root = "{runtime_root}/alpha"
[nodes.beta]
runtime_root = "{runtime_root}/beta"
[instances.p1]
node = "alpha"
memory_mib = 64
hvparams = {{ migration_port = 0, migration_bandwidth = 500 }}
[instances.p2]
node = "alpha"
memory_mib = 64
hvparams = {{ migration_port = 0, migration_bandwidth = 500 }}
""")
    return path


def test_plan_runs_and_a_second_run_redoes_nothing(config: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "step": [
                    {"action": "start", "instance": "p1"},
                    {"action": "start", "instance": "p2"},
                    {"action": "migrate", "instance": "p1", "target": "beta"},
                    {"action": "migrate", "instance": "p2", "target": "beta", "priority": 5},
                    {"action": "stop", "instance": "p2", "force": True},
                ]
            }
        )
    )
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "step": [
                    {"action": "start", "instance": "p1"},
                    {"action": "migrate", "instance": "p1"},
                ]
            }
        )
    )
    refused = kvmflow("-c", str(config), "plan", "run", str(bad))
    assert refused.returncode == 2
    assert "step[1].target" in refused.stderr
    listed = json.loads(kvmflow("-c", str(config), "list", "--all", "--json").stdout)
    assert {row["state"] for row in listed} == {"stopped"}  # nothing ran

    first = kvmflow("-c", str(config), "plan", "run", str(plan), "--json")
    assert first.returncode == 0, first.stderr
    assert [s["outcome"] for s in json.loads(first.stdout)] == ["done"] * 5
    second = kvmflow("-c", str(config), "plan", "run", str(plan), "--json")
    assert second.returncode == 0, second.stderr
    outcomes = json.loads(second.stdout)
    assert [s["outcome"] for s in outcomes] == ["skipped"] * 5
    assert {s["detail"] for s in outcomes} == {"done in an earlier run"}
    listed = json.loads(kvmflow("-c", str(config), "list", "--all", "--json").stdout)
    assert [(r["instance"], r["state"], r["node"]) for r in listed] == [
        ("p1", "running", "beta"),
        ("p2", "stopped", None),
    ]
    kvmflow("-c", str(config), "stop", "p1", "--force")


class StartCancels(KvmHypervisor):
    """A node whose start of ``victim`` is where the controller gets interrupted."""

    victim = ""
    scope: anyio.CancelScope | None = None

    async def start(self, spec: InstanceSpec, **kwargs: Any) -> InstanceInfo:
        if spec.name == self.victim and self.scope is not None:
            self.scope.cancel()
            await anyio.lowlevel.checkpoint()  # the cancel lands here, before QEMU is started
        return await super().start(spec, **kwargs)


@pytest.mark.anyio
async def test_an_interrupted_plan_run_has_journaled_every_finished_step(
    runtime_root: Path, tmp_path: Path
) -> None:
    node = StartCancels(LocalNode("alpha"), RuntimePaths(str(runtime_root / "alpha")))
    spec = {name: InstanceSpec(name, memory_mib=64) for name in ("j1", "j2")}
    steps = parse_plan(
        {"step": [{"action": "start", "instance": "j1"}, {"action": "start", "instance": "j2"}]},
        instances=set(spec),
        nodes={"alpha"},
    )
    journal = tmp_path / "plan.done.json"
    async with Engine([NodeEntry(node, "127.0.0.1")]) as engine:
        for name in spec:
            engine.add_instance(Instance(spec[name], node))
        node.victim = "j2"
        with anyio.CancelScope() as scope:
            node.scope = scope
            await run_plan(engine, steps, journal)
        assert scope.cancelled_caught
        assert json.loads(journal.read_text())["done"] == [0]  # j1's start, written at once
        assert not await node.is_running("j2")
        node.scope = None
        report = await run_plan(engine, steps, journal)  # the next run does only j2
        assert [(o.step.instance, o.outcome) for o in report.outcomes] == [
            ("j1", "skipped"),
            ("j2", "done"),
        ]
        for name in spec:
            await engine.instance(name).stop(force=True)
