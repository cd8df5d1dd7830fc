"""Mixed QEMU releases, as a rolling upgrade has them: the system's QEMU (7.2 on Debian 12)
and QEMU 10.0 beside it, each probed, and live migrations between them in both directions.

Facts these tests stand on (checked here): QEMU 10.0 still has ``pc-i440fx-7.2``, 7.2 has no
10.0 machine; unpinned, a migration between them fails because ``pc`` means a different
machine on each side.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest

from kvmflow.engine import Engine, NodeEntry
from kvmflow.errors import IncompatibleTargetError, MigrationError
from kvmflow.guest import dirty_guest_spec
from kvmflow.guest import sweep_count as sweeps
from kvmflow.instance import Instance, InstanceState
from kvmflow.kvm import HvParams, InstanceSpec, KvmHypervisor, SavedRuntime
from kvmflow.kvm.argv import machine_of
from kvmflow.kvm.baseline import baseline_cpu_model, newest_common_machine
from kvmflow.migration import MigrationPolicy, migrate
from kvmflow.migration.compat import incompatibilities
from kvmflow.monitor import RunState, query_status
from kvmflow.testing import local_hypervisors
from kvmflow.testing.qemu_builds import QemuBuild
from tests.guests import assert_runs_on, started_dirty
from tests.test_cli_commands import kvmflow

pytestmark = pytest.mark.anyio
FAST = MigrationPolicy.fixed(bandwidth_mib=1024, downtime_ms=300)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def builds(qemu_builds: dict[str, QemuBuild]) -> tuple[QemuBuild, QemuBuild]:
    if "second" not in qemu_builds:
        pytest.skip(f"one QEMU build only on this host ({qemu_builds['system'].version})")
    return qemu_builds["system"], qemu_builds["second"]


@pytest.fixture
def old_new(
    runtime_root: Path, builds: tuple[QemuBuild, QemuBuild]
) -> tuple[KvmHypervisor, KvmHypervisor]:
    """node-old runs the system's QEMU, node-new the second build."""
    old, new = builds
    binaries = {"node-old": old.binary, "node-new": new.binary}
    a, b = local_hypervisors(runtime_root, "node-old", "node-new", qemu_binaries=binaries)
    return a, b


async def test_each_build_is_probed_for_what_differs(qemu_build: QemuBuild) -> None:
    [hv] = local_hypervisors(
        Path("/run/kvmflow-probe"), "probe", qemu_binaries={"probe": qemu_build.binary}
    )
    qemu = await hv.qemu()
    assert qemu.version_text == qemu_build.version
    major = qemu.version[0]
    assert qemu.resolve_machine(None) == f"pc-i440fx-{major}.{qemu.version[1]}"
    assert qemu.resolve_machine("pc-i440fx-7.2") == "pc-i440fx-7.2"  # both know 7.2's
    assert {"postcopy-ram", "events", "multifd"} <= qemu.migration_capabilities
    assert "uri" in qemu.migrate_arguments
    if major >= 10:
        assert qemu.uses_run_with
        assert "postcopy-recover-setup" in qemu.migration_statuses
        assert "channels" in qemu.migrate_arguments
    else:
        assert not qemu.uses_run_with
        assert {"runas", "chroot"} <= qemu.options
    assert await hv.qemu() is qemu  # probed once


async def pinned_machine(hv: KvmHypervisor, name: str) -> str:
    """The machine type ``name``'s saved runtime on ``hv`` pins (it must pin one)."""
    runtime = await hv.load_runtime(name)
    assert runtime is not None
    machine = machine_of(list(runtime.argv))
    assert machine is not None
    return machine


async def assert_moved(instance: Instance, source: KvmHypervisor, target: KvmHypervisor) -> None:
    assert not await source.is_running(instance.name)
    await assert_runs_on(instance, target)


async def test_unpinned_guest_goes_to_the_new_qemu_and_back(
    old_new: tuple[KvmHypervisor, KvmHypervisor], dirty_guest: Path
) -> None:
    """The rolling upgrade's round trip: started unpinned on 7.2 (so pinned to
    pc-i440fx-7.2 at that start), live to 10.0 while it dirties memory, and back."""
    old, new = old_new
    instance = await started_dirty(old, "xv-round", dirty_guest)
    assert await pinned_machine(old, "xv-round") == "pc-i440fx-7.2"
    for source, target in ((old, new), (new, old)):
        before = await sweeps(source, "xv-round")
        result = await migrate(instance, target, target_address="127.0.0.1", policy=FAST)
        assert result.bad_answers == []
        assert await sweeps(target, "xv-round") >= before  # the guest's memory came along
        await assert_moved(instance, source, target)
        moved = await target.load_runtime("xv-round")
        assert moved is not None
        assert moved.argv[0] == target.qemu_binary  # the target's own QEMU, not the source's
        assert machine_of(list(moved.argv)) == "pc-i440fx-7.2"
    await instance.stop(force=True)


async def test_a_guest_on_the_new_machine_type_is_refused_before_the_source_is_touched(
    old_new: tuple[KvmHypervisor, KvmHypervisor], dirty_guest: Path
) -> None:
    old, new = old_new
    instance = await started_dirty(new, "xv-new", dirty_guest)
    pinned = await pinned_machine(new, "xv-new")
    assert pinned.startswith("pc-i440fx-10.")
    before = await sweeps(new, "xv-new")
    with pytest.raises(IncompatibleTargetError) as refused:
        await migrate(instance, old, target_address="127.0.0.1", policy=FAST)
    text = str(refused.value)
    assert f"no machine type {pinned}" in text
    assert "pin machine_version=pc-i440fx-7.2" in text  # the fix names the common machine
    assert refused.value.runs_on == "node-new"
    assert not await old.is_running("xv-new")  # no target was started
    assert instance.machine.state is InstanceState.RUNNING
    async with new.qmp("xv-new") as qmp:
        assert (await query_status(qmp)).state is RunState.RUNNING
        parameters = await qmp.execute("query-migrate-parameters")
    assert parameters["max-bandwidth"] != 1024 << 20  # the policy was never applied
    await anyio.sleep(0.2)
    assert await sweeps(new, "xv-new") > before
    await instance.stop(force=True)


async def test_every_incompatibility_is_listed_at_once(
    old_new: tuple[KvmHypervisor, KvmHypervisor], dirty_guest: Path
) -> None:
    """A guest of QEMU 10.0 with its machine type, a 10.0 CPU model and a 10.0 NIC cannot go
    to 7.2: all three are named at once, each with its fix."""
    old, new = old_new
    instance = Instance(dirty_guest_spec("xv-list", dirty_guest, migration_port=0, mib=16), new)
    await instance.start()
    runtime = await new.load_runtime("xv-list")
    assert runtime is not None
    argv = [*runtime.argv, "-device", "igb", "-cpu", "GraniteRapids"]
    problems = incompatibilities(
        await new.qemu(), await old.qemu(), argv, FAST, target_node="node-old"
    )
    whats = [p.what for p in problems]
    assert len(whats) == 3, whats
    assert "no machine type pc-i440fx-10.0" in whats[0]
    assert "no CPU model GraniteRapids" in whats[1]
    assert "no device igb" in whats[2]
    assert all(p.fix for p in problems)
    await instance.stop(force=True)


async def test_the_target_qemus_own_reason_reaches_the_error(
    old_new: tuple[KvmHypervisor, KvmHypervisor], dirty_guest: Path
) -> None:
    """A target that refuses the stream says why in its log (-D keeps a daemonized QEMU's
    stderr); the error carries its words next to the source's."""
    old, new = old_new

    class WrongMemory(KvmHypervisor):
        async def start(self, spec: Any, **kwargs: Any) -> Any:
            runtime = kwargs.get("runtime")
            if runtime is not None:  # the target: a RAM size the stream does not fit
                argv = list(runtime.argv)
                argv[argv.index("-m") + 1] = "32"
                kwargs["runtime"] = SavedRuntime(
                    tuple(argv), runtime.spec, runtime.uid, runtime.root
                )
            return await super().start(spec, **kwargs)

    target = WrongMemory(
        new.node,
        new.paths,
        default_accelerator=new.default_accelerator,
        qemu_binary=new.qemu_binary,
    )
    instance = Instance(dirty_guest_spec("xv-said", dirty_guest, migration_port=0, mib=16), old)
    await instance.start()
    with pytest.raises(MigrationError) as failed:
        await migrate(instance, target, target_address="127.0.0.1", policy=FAST)
    assert failed.value.runs_on == "node-old"
    assert "Length mismatch" in failed.value.target_said or "pc.ram" in failed.value.target_said, (
        failed.value.target_said
    )
    assert "the target QEMU said" in str(failed.value)
    assert not await target.is_running("xv-said")
    assert not Path(target.paths.log_file("xv-said")).exists()  # removed with the target
    await instance.stop(force=True)


async def test_fleet_baseline_of_both_builds(old_new: tuple[KvmHypervisor, KvmHypervisor]) -> None:
    old, new = old_new
    qemus = [await old.qemu(), await new.qemu()]
    assert newest_common_machine("pc", qemus) == "pc-i440fx-7.2"
    assert newest_common_machine("q35", qemus) == "pc-q35-7.2"
    model = await baseline_cpu_model([old, new])
    assert model is not None
    for qemu in qemus:
        assert qemu.cpu_models[model].runnable
        assert qemu.cpu_models[model].migration_safe


def cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return kvmflow(*args, config=config)


def test_cli_nodes_with_their_own_qemu_and_migrate_check(
    runtime_root: Path, builds: tuple[QemuBuild, QemuBuild]
) -> None:
    """Each node names its QEMU in the config; ``migrate --check`` says, before anything is
    touched, whether the target's QEMU takes the guest, and what would fix it if not."""
    old, new = builds
    config = runtime_root / "kvmflow.toml"
    config.write_text(f"""
[nodes.old]
runtime_root = "{runtime_root}/old"
qemu_binary = "{old.binary}"

[nodes.new]
runtime_root = "{runtime_root}/new"
qemu_binary = "{new.binary}"

[instances.chk1]
node = "new"
memory_mib = 64
hvparams = {{ migration_port = 0 }}

[instances.chk2]
node = "new"
memory_mib = 64
hvparams = {{ migration_port = 0, machine_version = "pc-i440fx-7.2" }}
""")
    for name in ("chk1", "chk2"):
        started = cli("start", name, config=config)
        assert started.returncode == 0, started.stderr
    refused = cli("migrate", "chk1", "old", "--check", config=config)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"QEMU {old.version}" in refused.stdout
    assert "has no machine type pc-i440fx-10.0" in refused.stdout
    assert "fix: pin machine_version=pc-i440fx-7.2" in refused.stdout
    accepted = json.loads(cli("migrate", "chk2", "old", "--check", "--json", config=config).stdout)
    assert accepted["compatible"] is True
    assert (accepted["source_qemu"], accepted["target_qemu"]) == (new.version, old.version)
    assert cli("info", "chk1", "--json", config=config).returncode == 0  # still runs on new
    planned = cli("evacuate", "new", "--to", "old", "--dry-run", "--json", config=config)
    plan = json.loads(planned.stdout)
    assert [m["instance"] for m in plan["plan"]] == ["chk2"]
    [(name, why)] = [(u["instance"], u["reason"]) for u in plan["unplaceable"]]
    assert name == "chk1"
    assert "no machine type pc-i440fx-10.0" in why
    moved = cli("migrate", "chk2", "old", config=config)
    assert moved.returncode == 0, moved.stderr
    for name in ("chk1", "chk2"):
        assert cli("stop", name, "--force", config=config).returncode == 0


def test_cli_refuses_a_qemu_binary_with_shell_metacharacters(runtime_root: Path) -> None:
    config = runtime_root / "bad.toml"
    config.write_text('[nodes.x]\nqemu_binary = "qemu; rm -rf /"\n')
    result = cli("list", config=config)
    assert result.returncode == 2
    assert "nodes.x.qemu_binary" in result.stderr
    assert "a program name on PATH or an absolute path" in result.stderr


async def test_an_evacuation_plans_no_move_the_pre_check_refuses(
    old_new: tuple[KvmHypervisor, KvmHypervisor],
) -> None:
    old, new = old_new
    entries = [NodeEntry(new, "127.0.0.1"), NodeEntry(old, "127.0.0.1")]
    async with Engine(entries, default_policy=FAST) as engine:
        fresh = engine.add_instance(Instance(InstanceSpec("xv-evac", memory_mib=64), new))
        pinned = InstanceSpec(
            "xv-evac2", memory_mib=64, hvparams=HvParams(machine_version="pc-i440fx-7.2")
        )
        portable = engine.add_instance(Instance(pinned, new))
        await fresh.start()
        await portable.start()
        plan = await engine.plan_evacuation("node-new", ["node-old"])
        assert plan.moves == [("xv-evac2", "node-old", 64)]
        [(name, why)] = plan.unplaceable
        assert name == "xv-evac"
        assert "no target's QEMU can take it" in why
        assert "no machine type pc-i440fx-10.0" in why
        for instance in (fresh, portable):
            await instance.stop(force=True)
