"""Time to converge and downtime, per policy, for guests dirtying memory at several rates.

Each case migrates the dirtying guest (128 MiB RAM, dirtying ``mib`` MiB per sweep with a
pause between sweeps) between two local nodes at 20 MiB/s, under the ancestor's fixed policy
(50 ms downtime, as the non-converging case) and under each kvmflow policy. A migration that
has not finished after ``--limit`` seconds is cancelled and counted as not converged.

With ``--link 1g`` the two nodes are hosts of :func:`kvmflow.testing.netns.netns_lab`
(network namespaces reached over SSH, links shaped to 1 Gbit/s): on loopback QEMU's last
stop-and-copy is not held to ``max-bandwidth`` and runs at memory speed, so only a real
link gives real downtimes; each case then also reports the downtime limit the policy had
reached (``downtime_limit_ms``) next to QEMU's measured downtime.

Run: ``python benchmarks/policies.py [--limit 40] [--link loopback|1g]``. The last line is
one JSON object: ``{case: {policy: {"seconds": s or null, "downtime_ms": ms or null,
"downtime_limit_ms": ms, "actions": [...]}}}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import structlog

from kvmflow.guest import build_dirty_guest, dirty_guest_spec, wait_for_sweeps
from kvmflow.instance import Instance
from kvmflow.kvm import HvParams, KvmHypervisor
from kvmflow.migration import MigrationError, MigrationPolicy, MigrationProgress, migrate
from kvmflow.migration.policy import Action, Capabilities, StallRule
from kvmflow.testing import local_hypervisors
from kvmflow.testing.netns import ONE_GBIT, netns_lab

BASE: dict[str, Any] = {
    "bandwidth_mib": 20,
    "downtime_ms": 50,
    "poll_interval": 0.25,
    "downtime_schedule": (),
    "seconds_per_gib": None,
}
POLICIES = {
    "ancestor_fixed": MigrationPolicy.ancestor(
        HvParams(migration_bandwidth=20, migration_downtime=50)
    ),
    "escalation": MigrationPolicy(
        **BASE,
        downtime_ceiling_ms=8000,
        action_grace_seconds=0.5,
        stall=StallRule(2, 0.1),
        stall_actions=(Action.RAISE_DOWNTIME,) * 10,
    ),
    "auto_converge": MigrationPolicy(
        **BASE,
        action_grace_seconds=0.5,
        stall=StallRule(2, 0.1),
        stall_actions=(Action.AUTO_CONVERGE,),
        capabilities=Capabilities(throttle_initial=60, throttle_increment=20),
    ),
    "postcopy": MigrationPolicy(
        **BASE,
        stall=StallRule(2, 0.1),
        stall_actions=(Action.POSTCOPY,),
        capabilities=Capabilities(postcopy_ram=True),
    ),
    "kvmflow_default": MigrationPolicy(bandwidth_mib=20),
}
CASES = {"light_8mib_paused": (8, 2000), "medium_24mib": (24, 0), "heavy_48mib": (48, 0)}


async def one(
    source: KvmHypervisor,
    target: KvmHypervisor,
    guest: Path,
    name: str,
    mib: int,
    pause: int,
    policy: MigrationPolicy,
    limit: float,
    address: str,
) -> dict[str, Any]:
    spec = dirty_guest_spec(name, guest, migration_port=0, mib=mib, pause=pause)
    instance = Instance(spec, source)
    try:
        return await measure(instance, source, target, policy, limit, address)
    finally:
        with anyio.CancelScope(shield=True):
            for hv in (source, target):
                await hv.stop(name, force=True)


async def measure(
    instance: Instance,
    source: KvmHypervisor,
    target: KvmHypervisor,
    policy: MigrationPolicy,
    limit: float,
    address: str,
) -> dict[str, Any]:
    await instance.start()
    await wait_for_sweeps(source, instance.name)
    started = time.monotonic()
    outcome: dict[str, Any] = {"seconds": None, "downtime_ms": None, "actions": []}
    limits: list[int] = [policy.downtime_ms]

    def progress(report: MigrationProgress) -> None:
        limits.append(report.downtime_limit_ms)

    with anyio.move_on_after(limit):
        try:
            result = await migrate(
                instance, target, target_address=address, policy=policy, on_progress=progress
            )
        except MigrationError as exc:
            outcome["aborted"] = exc.reason
        else:
            outcome = {
                "seconds": round(time.monotonic() - started, 2),
                "downtime_ms": result.downtime_ms,
                "actions": [d.name for d in result.decisions],
            }
    outcome["downtime_limit_ms"] = limits[-1]
    return outcome


async def run(limit: float, link: str) -> dict[str, dict[str, Any]]:
    guest = build_dirty_guest()
    root = Path(tempfile.mkdtemp(prefix="kvfp-"))
    results: dict[str, dict[str, Any]] = {}
    try:
        with contextlib.ExitStack() as stack:
            if link == "1g":
                lab = stack.enter_context(netns_lab(2, ONE_GBIT))
                source, target = lab.hypervisors(root)
                address = lab.hosts[1].address
            else:
                source, target = local_hypervisors(root, "a", "b")
                address = "127.0.0.1"
            for case, (mib, pause) in CASES.items():
                for policy_name, policy in POLICIES.items():
                    name = f"b-{policy_name[:8]}"
                    outcome = await one(
                        source, target, guest, name, mib, pause, policy, limit, address
                    )
                    results.setdefault(case, {})[policy_name] = outcome
                    print(f"{case:>18} {policy_name:>16}: {outcome}", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=float, default=40.0)
    parser.add_argument("--link", choices=["loopback", "1g"], default="loopback")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    print(json.dumps(anyio.run(run, args.limit, args.link)))


if __name__ == "__main__":
    main()
