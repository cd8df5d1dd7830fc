"""A rolling upgrade of one node's QEMU while its guests keep running.

Starts two small guests on node-a (unpinned: each is pinned to node-a's machine type at its
start), then upgrades node-a: the guests move live to node-b, the "upgrade command" replaces
node-a's QEMU (here it re-points the link node-a's ``qemu_binary`` names, as a package
upgrade replaces ``/usr/bin/qemu-system-x86_64``), node-a's new QEMU is probed, and the
guests come back onto it, live. Prints both versions and where each guest went. Run as root:
``python examples/rolling_upgrade.py [NEW_QEMU]`` (by default, Debian 12 bookworm-backports'
QEMU 10.0, fetched beside the system's by :mod:`kvmflow.testing.qemu_builds`).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import anyio

from kvmflow.engine import Engine, NodeEntry
from kvmflow.instance import Instance
from kvmflow.kvm import HvParams, InstanceSpec
from kvmflow.migration import MigrationPolicy
from kvmflow.testing import local_hypervisors
from kvmflow.testing.qemu_builds import debian_qemu

POLICY = MigrationPolicy.fixed(bandwidth_mib=1024, downtime_ms=300, poll_interval=0.1)


async def upgrade(root: Path, new_qemu: str) -> bool:
    link = root / "node-a-qemu"
    link.symlink_to(shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64")
    a, b = local_hypervisors(root, "node-a", "node-b", qemu_binaries={"node-a": str(link)})
    async with Engine(
        [NodeEntry(a, "127.0.0.1"), NodeEntry(b, "127.0.0.1")], default_policy=POLICY
    ) as engine:
        try:
            for n in range(2):
                spec = InstanceSpec(f"up-{n}", memory_mib=64, hvparams=HvParams(migration_port=0))
                await engine.add_instance(Instance(spec, a)).start()
            report = await engine.upgrade_node("node-a", ["ln", "-sfn", new_qemu, str(link)])
            print(f"node-a: QEMU {report.qemu_before} -> {report.qemu_after}")
            for name, target in sorted(report.evacuation.moved):
                print(f"moved away: {name} -> {target}")
            for name, result in sorted(report.returned.items()):
                print(f"back: {name} -> node-a in {result.elapsed:.1f} s")
            for name, why in sorted(report.not_returned.items()):
                print(f"not back: {name}: {why}")
            print(f"on node-a now: {', '.join(sorted(await a.list_instances()))}")
            return not report.not_returned
        finally:
            for hv in (a, b):
                for name in await hv.list_instances():
                    await hv.stop(name, force=True)


def main() -> None:
    new_qemu = sys.argv[1] if len(sys.argv) > 1 else debian_qemu().binary
    root = Path(tempfile.mkdtemp(prefix="kvf-up-"))
    try:
        ok = anyio.run(upgrade, root, new_qemu)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    raise SystemExit(0 if ok else 3)


if __name__ == "__main__":
    main()
