"""The operator's word on an instance recovery must not judge (both copies may have run, a
post-copy broke, a target that may have run is gone): ``kvmflow recover --resolve
NAME=NODE`` keeps the copy on NODE, removes every other copy, and records NAME there.

The kept copy must be there and hold the guest (running or paused); anything else is
refused before a copy is touched.
"""

from __future__ import annotations

from collections.abc import Mapping

from kvmflow._logging import get_logger
from kvmflow.engine.reality import Copy, look
from kvmflow.errors import RecoveryError
from kvmflow.kvm.hypervisor import KvmHypervisor

_log = get_logger("kvmflow.engine")


async def keep_only(name: str, node: str, hypervisors: Mapping[str, KvmHypervisor]) -> str:
    """Keep ``name``'s copy on ``node`` and remove the others; returns what was done."""
    if node not in hypervisors:
        raise RecoveryError(f"--resolve {name}={node}: no node {node!r} is known here")
    copies: dict[str, Copy | None] = {n: await look(hv, name) for n, hv in hypervisors.items()}
    kept = copies[node]
    if kept is None or not kept.holds_guest:
        state = kept.state.value if kept is not None else "no copy"
        raise RecoveryError(
            f"--resolve {name}={node}: the copy there must hold the guest (it is {state}); "
            "nothing was touched"
        )
    removed = []
    for other, copy in copies.items():
        if other == node or copy is None:
            continue
        _log.warning("removing a copy on the operator's word", instance=name, node=other)
        hv = hypervisors[other]
        if copy.alive:
            await hv.stop(name, force=True)
        else:
            await hv.cleanup(name)
        removed.append(f"{copy.state} copy on {other}")
    gone = f"; removed the {', '.join(removed)}" if removed else ""
    return f"resolved by the operator: kept the {kept.state} copy on {node}{gone}"


__all__ = ["keep_only"]
