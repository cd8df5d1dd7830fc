"""Plan files: validated whole before anything runs, idempotent when run again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvmflow.engine.plan import parse_plan
from kvmflow.errors import ValidationError

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
    assert json.loads(kvmflow("-c", str(config), "list", "--json").stdout) == []  # nothing ran

    first = kvmflow("-c", str(config), "plan", "run", str(plan), "--json")
    assert first.returncode == 0, first.stderr
    assert [s["outcome"] for s in json.loads(first.stdout)] == ["done"] * 5
    second = kvmflow("-c", str(config), "plan", "run", str(plan), "--json")
    assert second.returncode == 0, second.stderr
    outcomes = json.loads(second.stdout)
    assert [s["outcome"] for s in outcomes] == ["skipped"] * 5
    assert {s["detail"] for s in outcomes} == {"done in an earlier run"}
    listed = json.loads(kvmflow("-c", str(config), "list", "--json").stdout)
    assert [(r["instance"], r["node"]) for r in listed] == [("p1", "beta")]
    kvmflow("-c", str(config), "stop", "p1", "--force")
