"""Plan files: a list of starts, stops and migrations, checked whole before anything runs.

Format (TOML; the same structure in JSON is accepted too)::

    [[step]]
    action = "start"          # start | stop | migrate
    instance = "web1"

    [[step]]
    action = "migrate"
    instance = "web1"
    target = "beta"
    live = true               # optional, default true
    priority = 0              # optional

    [[step]]
    action = "stop"
    instance = "db1"
    force = false             # optional

    [[step]]
    action = "upgrade"        # a rolling upgrade of one node (kvmflow.engine.upgrade)
    node = "alpha"
    command = ["apt-get", "install", "-y", "qemu-system-x86"]
    targets = ["beta"]        # optional, default every other node
    bring_back = true         # optional: migrate its guests back afterwards

Every problem of every step is reported at once, naming the step (``step[2].target``).
Running a plan twice does not redo what is done: finished steps are recorded in a journal
next to the plan (``PLAN.done.json``, reset when the plan changes), and a step that is
already true (start of a running instance, stop of a stopped one, migration of an instance
already on its target) is skipped. Consecutive migrations run together under the engine's
limits.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmflow.engine import Engine
from kvmflow.errors import FieldProblem, KvmflowError, ValidationError

ACTIONS = {
    "start": {"instance"},
    "stop": {"instance", "force"},
    "migrate": {"instance", "target", "live", "priority"},
    "upgrade": {"node", "command", "targets", "bring_back"},
}


@dataclass(frozen=True)
class PlanStep:
    index: int
    action: str
    instance: str
    target: str | None = None
    live: bool = True
    priority: int = 0
    force: bool = False
    node: str | None = None  # upgrade: the node upgraded (instance is then empty)
    command: tuple[str, ...] = ()  # upgrade: run on the node, no shell
    targets: tuple[str, ...] | None = None  # upgrade: where its guests go meanwhile
    bring_back: bool = True

    def describe(self) -> str:
        where = f" -> {self.target}" if self.target else ""
        return f"step[{self.index}] {self.action} {self.node or self.instance}{where}"


@dataclass
class StepOutcome:
    step: PlanStep
    outcome: str  # "done", "skipped" or "failed"
    detail: str = ""


@dataclass
class PlanReport:
    outcomes: list[StepOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[StepOutcome]:
        return [o for o in self.outcomes if o.outcome == "failed"]


def load_plan(path: Path, *, instances: set[str], nodes: set[str]) -> list[PlanStep]:
    """Read and check a plan file (TOML, or JSON by extension)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValidationError([FieldProblem("plan", str(path), f"unreadable: {exc}")]) from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ValidationError([FieldProblem("plan", str(path), f"not valid: {exc}")]) from exc
    return parse_plan(data, instances=instances, nodes=nodes)


def parse_plan(data: Any, *, instances: set[str], nodes: set[str]) -> list[PlanStep]:
    problems: list[FieldProblem] = []
    raw_steps = data.get("step") if isinstance(data, dict) else None
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ValidationError(
            [FieldProblem("step", raw_steps, "a non-empty list of [[step]] tables")]
        )
    steps = []
    for index, raw in enumerate(raw_steps):
        name = f"step[{index}]"
        if not isinstance(raw, dict):
            problems.append(FieldProblem(name, raw, "a table"))
            continue
        action = raw.get("action")
        if action not in ACTIONS:
            problems.append(
                FieldProblem(f"{name}.action", action, "start, stop, migrate or upgrade")
            )
            continue
        allowed = ACTIONS[action] | {"action"}
        for key in raw:
            if key not in allowed:
                problems.append(
                    FieldProblem(
                        f"{name}.{key}",
                        raw[key],
                        f"not a field of {action} ({', '.join(sorted(allowed))})",
                    )
                )
        if action == "upgrade":
            step = _upgrade_step(index, raw, nodes, problems)
            if step is not None:
                steps.append(step)
            continue
        instance = raw.get("instance")
        if instance not in instances:
            problems.append(
                FieldProblem(
                    f"{name}.instance",
                    instance,
                    f"a configured instance ({', '.join(sorted(instances))})",
                )
            )
        target = raw.get("target")
        if action == "migrate" and target not in nodes:
            problems.append(
                FieldProblem(
                    f"{name}.target", target, f"a configured node ({', '.join(sorted(nodes))})"
                )
            )
        for key, kind in (("live", bool), ("force", bool), ("priority", int)):
            if key in raw and (
                not isinstance(raw[key], kind) or (kind is int and isinstance(raw[key], bool))
            ):
                problems.append(FieldProblem(f"{name}.{key}", raw[key], f"a {kind.__name__}"))
        steps.append(
            PlanStep(
                index,
                action,
                str(instance),
                target if action == "migrate" else None,
                raw.get("live", True) is True,
                raw.get("priority", 0) if isinstance(raw.get("priority", 0), int) else 0,
                raw.get("force", False) is True,
            )
        )
    if problems:
        raise ValidationError(problems)
    return steps


def _upgrade_step(
    index: int, raw: dict[str, Any], nodes: set[str], problems: list[FieldProblem]
) -> PlanStep | None:
    name, before = f"step[{index}]", len(problems)
    node = raw.get("node")
    known = f"a configured node ({', '.join(sorted(nodes))})"
    if node not in nodes:
        problems.append(FieldProblem(f"{name}.node", node, known))
    command = raw.get("command")
    if (
        not isinstance(command, list)
        or not command
        or not all(isinstance(a, str) and a for a in command)
    ):
        problems.append(
            FieldProblem(f"{name}.command", command, "a non-empty list of strings (no shell)")
        )
    targets = raw.get("targets")
    if targets is not None and (
        not isinstance(targets, list) or any(t not in nodes or t == node for t in targets)
    ):
        problems.append(FieldProblem(f"{name}.targets", targets, f"a list of other nodes: {known}"))
    if not isinstance(raw.get("bring_back", True), bool):
        problems.append(FieldProblem(f"{name}.bring_back", raw["bring_back"], "a bool"))
    if len(problems) > before:
        return None
    return PlanStep(
        index,
        "upgrade",
        "",
        node=str(node),
        command=tuple(command or ()),
        targets=tuple(targets) if targets is not None else None,
        bring_back=raw.get("bring_back", True),
    )


class Journal:
    """The steps of one plan version that finished, kept in a JSON file."""

    def __init__(self, path: Path | None, steps: list[PlanStep]) -> None:
        self.path = path
        self.digest = hashlib.sha256(repr(steps).encode()).hexdigest()
        self.done: set[int] = set()
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text())
                if data.get("plan") == self.digest:
                    self.done = {int(i) for i in data.get("done", [])}
            except (ValueError, OSError, AttributeError, TypeError):
                self.done = set()

    def record(self, index: int) -> None:
        self.done.add(index)
        if self.path is not None:
            temp = self.path.with_name(self.path.name + ".tmp")
            temp.write_text(json.dumps({"plan": self.digest, "done": sorted(self.done)}))
            temp.replace(self.path)


def journal_path(plan: Path) -> Path:
    return plan.with_name(plan.name + ".done.json")


async def run_plan(
    engine: Engine, steps: list[PlanStep], journal: Path | None = None
) -> PlanReport:
    """Run the steps in order (consecutive migrations together); skip what is done."""
    report = PlanReport()
    record = Journal(journal, steps)

    def note(outcome: StepOutcome) -> None:
        """Report a step's outcome; a finished step is journaled at once, so that an
        interrupted run redoes only what did not finish."""
        report.outcomes.append(outcome)
        if outcome.outcome in ("done", "skipped") and outcome.step.index not in record.done:
            record.record(outcome.step.index)

    pending = []
    for step in steps:
        if step.index in record.done:
            report.outcomes.append(StepOutcome(step, "skipped", "done in an earlier run"))
        else:
            pending.append(step)
    await _run_steps(engine, pending, note)
    report.outcomes.sort(key=lambda outcome: outcome.step.index)
    return report


Note = Callable[[StepOutcome], None]


async def _run_steps(engine: Engine, steps: list[PlanStep], note: Note) -> None:
    index = 0
    while index < len(steps):
        step = steps[index]
        if step.action == "migrate":
            batch = []
            while index < len(steps) and steps[index].action == "migrate":
                batch.append(steps[index])
                index += 1
            await _migrations(engine, batch, note)
            continue
        index += 1
        if step.action == "upgrade":
            await _upgrade(engine, step, note)
            continue
        instance = engine.instance(step.instance)
        running = await instance.hypervisor.is_running(step.instance)
        try:
            if step.action == "start":
                if running:
                    note(StepOutcome(step, "skipped", "already running"))
                    continue
                await engine.start(step.instance)
            else:
                if not running:
                    note(StepOutcome(step, "skipped", "not running"))
                    continue
                await instance.stop(force=step.force)
            note(StepOutcome(step, "done"))
        except KvmflowError as exc:
            note(StepOutcome(step, "failed", str(exc)))


async def _migrations(engine: Engine, batch: list[PlanStep], note: Note) -> None:
    tickets = []
    for step in batch:
        if engine.where(step.instance) == step.target:
            note(StepOutcome(step, "skipped", f"already on {step.target}"))
            continue
        try:
            assert step.target is not None
            tickets.append(
                (
                    step,
                    engine.submit_migration(
                        step.instance, step.target, priority=step.priority, live=step.live
                    ),
                )
            )
        except KvmflowError as exc:
            note(StepOutcome(step, "failed", str(exc)))
    for step, ticket in tickets:
        try:
            await ticket.wait()
            note(StepOutcome(step, "done"))
        except KvmflowError as exc:
            note(StepOutcome(step, "failed", str(exc)))


async def _upgrade(engine: Engine, step: PlanStep, note: Note) -> None:
    assert step.node is not None
    try:
        report = await engine.upgrade_node(
            step.node,
            list(step.command),
            targets=list(step.targets) if step.targets is not None else None,
            bring_back=step.bring_back,
        )
    except KvmflowError as exc:
        note(StepOutcome(step, "failed", str(exc)))
        return
    detail = f"QEMU {report.qemu_before} -> {report.qemu_after}"
    if report.not_returned:
        detail += "; not returned: " + ", ".join(sorted(report.not_returned))
        note(StepOutcome(step, "failed", detail))
        return
    note(StepOutcome(step, "done", detail))
