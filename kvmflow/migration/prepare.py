"""What a migration does before its RAM streams: the pre-check, TLS, and local disks.

Functions of the :class:`~kvmflow.migration.migrate.Migration` they prepare, split off (as
:mod:`kvmflow.migration.aborts` is) so that each module holds one idea. Each step that
leaves something behind pushes its undo onto the migration's undo stack first.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from kvmflow.errors import IncompatibleTargetError
from kvmflow.kvm.argv import relocate_disks
from kvmflow.kvm.runtime import SavedRuntime
from kvmflow.migration import tls
from kvmflow.migration.compat import incompatibilities, pinned_argv, tls_problems
from kvmflow.migration.policy import MIB
from kvmflow.migration.source import SourceMonitor

if TYPE_CHECKING:
    from kvmflow.migration.migrate import Migration


async def checked_runtime(
    run: Migration, qmp: SourceMonitor, runtime: SavedRuntime
) -> SavedRuntime:
    """The runtime the target starts from: its machine type pinned (asked of the running
    source when a runtime saved before pinning has none) and its local disks at their paths
    on the target, once the target is known to take it; raises
    :class:`IncompatibleTargetError` listing every reason it cannot."""
    source_qemu, target_qemu = await run.source.qemu(), await run.target_hv.qemu()
    argv = await pinned_argv(runtime, source_qemu, qmp)
    problems = incompatibilities(
        source_qemu, target_qemu, argv, run.policy, target_node=run.target_hv.node.name
    )
    problems += await tls_problems(run.policy, run.source, run.target_hv)
    spec = run.instance.spec
    if any(disk.local for disk in spec.disks):
        await run.disks.plan(spec, qmp)
        problems += await run.disks.problems()
        argv = relocate_disks(argv, spec, run.source.node.name, run.target_hv.node.name)
    if problems:
        run.log.warning("target refused by the pre-check", problems=[str(p) for p in problems])
        raise IncompatibleTargetError(run.name, run.source.node.name, problems)
    run.source_qemu = source_qemu
    return dataclasses.replace(runtime, argv=tuple(argv))


async def create_images(run: Migration) -> None:
    """The target's empty images, journaled first (recovery removes what a crash left)."""
    run.undo.push_async_callback(run.disks.remove_images)
    if run.journal is not None:
        await run.journal({"local_disks": [d.as_record() for d in run.disks.disks]})
    await run.disks.create_images()


async def copy_disks(run: Migration, qmp: SourceMonitor) -> None:
    """Export the target's images and mirror the source's disks into them until every copy
    is ready, within a deadline of four times their size at the policy's bandwidth."""
    target_qmp = await run.target.monitor()
    creds = tls.CREDS_ID if run.policy.tls else None  # both ends hold it by now
    await run.disks.export(target_qmp, run.address, tls_creds=creds)
    run.undo.push_async_callback(run.disks.cancel, qmp)
    speed = run.policy.bandwidth_mib * MIB if run.policy.bandwidth_mib else None
    total = sum(d.size for d in run.disks.disks)
    timeout = max(60.0, 4 * total / speed) if speed else 3600.0
    await run.disks.mirror(
        qmp,
        speed,
        timeout,
        run.report_disks,
        tls_creds=creds,
        tls_hostname=tls_hostname(run) if creds else None,
    )
    if run.journal is not None:
        await run.journal({"disks_ready": [d.device for d in run.disks.disks]})


async def encrypt(run: Migration, qmp: SourceMonitor) -> None:
    """The source's client end of the TLS stream, dropped again if the source keeps the
    guest (the undo steps run on an abort; they are dropped at the switch-over)."""
    assert run.source.migration_tls is not None  # the pre-check made sure
    run.undo.push_async_callback(tls.disable, qmp)
    await tls.enable(qmp, run.source.migration_tls, "client", hostname=tls_hostname(run))


def tls_hostname(run: Migration) -> str:
    """The name the target's server certificate must carry."""
    target_tls = run.target_hv.migration_tls
    return (target_tls.hostname if target_tls else None) or run.target_hv.node.name
