"""Failover: start an instance on another node when the node it ran on is lost, as
``gnt-instance failover`` does, without ever making a second copy.

Allowed only when

- no reachable node runs a copy of the instance (reality first: every node is asked), and
- the node the store records it on either answers and holds no copy, or was fenced after
  the instance was placed there: power-cycled (:func:`kvmflow.node.power.powercycle`) or
  stated down by the operator (``node_is_down``, recorded as a fence). An unreachable node
  that was not fenced may still run the guest, writing to its disks: refused.

The whole decision and the start happen under the instance's lease, journaled like any
operation; the placement moves to the new node when the copy runs there.
"""

from __future__ import annotations

from collections.abc import Mapping

from kvmflow._logging import get_logger
from kvmflow.engine.reality import look
from kvmflow.errors import InstanceRunningError, KvmflowError, MisuseError
from kvmflow.instance.guard import OperationGuard
from kvmflow.kvm.hypervisor import InstanceInfo, KvmHypervisor
from kvmflow.kvm.spec import InstanceSpec

_log = get_logger("kvmflow.engine")


async def failover(
    spec: InstanceSpec,
    target: str,
    hypervisors: Mapping[str, KvmHypervisor],
    guard: OperationGuard,
    *,
    node_is_down: bool = False,
    by: str = "kvmflow",
) -> InstanceInfo:
    """Start ``spec`` on node ``target`` in place of the node the store records it on (see
    the module for when this is allowed). Raises :class:`MisuseError` or
    :class:`InstanceRunningError` saying why not, with nothing started."""
    name = spec.name
    store = guard.store
    async with guard.hold(name, "failover", {"node": target}) as held:
        placed = await store.placement(name)
        if placed is None:
            raise MisuseError(f"the store has no record of where {name} runs: start it instead")
        lost = placed.node
        if lost == target:
            raise MisuseError(f"{name} is recorded on {target} already: fail over to another node")
        lost_reachable = True
        for node, hv in hypervisors.items():
            try:
                copy = await look(hv, name)
            except KvmflowError as exc:
                if node != lost:
                    raise MisuseError(
                        f"node {node} cannot be asked whether it runs {name} ({exc}): "
                        "nothing is started while a copy may run anywhere"
                    ) from exc
                lost_reachable = False
                continue
            if copy is not None and copy.alive:
                raise InstanceRunningError(
                    f"{name} has a {copy.state} copy on {node}: it is not failed over"
                )
        if not lost_reachable:
            fence = await store.fence(lost)
            if node_is_down and (fence is None or fence.at < placed.updated_at):
                fence = await store.record_fence(lost, by, "stated-down")
            if fence is None or fence.at < placed.updated_at:
                raise MisuseError(
                    f"node {lost} does not answer and was not fenced since {name} was placed "
                    f"there: it may still run the guest. Power-cycle it (kvmflow node "
                    f"powercycle {lost}) or, if you know it is down, say so (--node-is-down)"
                )
            await held.phase("fenced", {"lost": lost, "fence": fence.how, "fenced_by": fence.by})
        _log.warning("failing over", instance=name, lost=lost, target=target)
        info = await hypervisors[target].start(spec)
        held.place(target)
        return info


__all__ = ["failover"]
