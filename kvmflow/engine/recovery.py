"""Recovery after a controller died: every unfinished journal entry and every node's QEMUs
reconciled, per phase, after asking both QEMUs (reality first) and before acting.

A migration entry left open is judged by its recorded phase and by what the two copies say
(:func:`judge`):

==========================================  ==================================================
recorded phase (and what the QEMUs say)     recovery
==========================================  ==================================================
checking, target-starting/-listening        kill and clean the target; resume the source if
                                            we paused it
streaming, aborting, post-copy,             **adopt**: watch on under the recorded policy and
completed-on-source (source alive)          deadline; QEMU's answer decides (an active stream
                                            goes on, a completed one is finished, a failed
                                            one cleaned); ``abort=True`` or a recorded abort
                                            cancels instead; post-copy never resumes the source
completed-on-source, source dead            resume the target (it holds the whole guest)
streaming, source dead                      kill the target (it never had the whole guest)
target-may-run / switched-over / done,      finish: ``cont`` the target if needed, save its
target alive                                runtime, end the source, record the target
completed-on-source, ``cont`` may have      touch nothing (the target may have run the guest:
been sent, target gone                      the source's state may be stale)
aborted                                     clean the target, record the source
two copies holding the guest, an            touch nothing, keep the entry open, say so
unreachable copy, stranded, a target that
may have run and is gone
==========================================  ==================================================

Start, stop and reboot entries settle on what runs: the placement is recorded where a copy
holds the guest, forgotten (files cleaned) where none does. After the entries, every node is
surveyed for copies no entry explains (:mod:`kvmflow.engine.orphans`).

Every step is taken under the entry's lease, taken over from the dead owner (fenced), so a
recovery killed half-way leaves the entry open and the next recovery finishes it.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping

import anyio

from kvmflow._logging import get_logger
from kvmflow.engine.orphans import find_orphans
from kvmflow.engine.reality import Copy, CopyState, look
from kvmflow.engine.resolve import keep_only
from kvmflow.engine.upgrade import NODE_LEASE_PREFIX
from kvmflow.engine.upgrade import OPERATION as UPGRADE_OPERATION
from kvmflow.engine.verdicts import NEEDS_OPERATOR, RecoveryReport, Verdict
from kvmflow.errors import InstanceBusyError, KvmflowError, RecoveryError
from kvmflow.instance.guard import HeldOperation, OperationGuard
from kvmflow.instance.instance import Instance
from kvmflow.instance.states import InstanceState
from kvmflow.kvm.hypervisor import KvmHypervisor, taking_over
from kvmflow.migration.adopt import ADOPTABLE, RecordedMigration, adopt
from kvmflow.migration.disks import clean_after_crash, stop_serving
from kvmflow.migration.errors import MigrationError
from kvmflow.migration.outcome import INFO, Side
from kvmflow.migration.phases import MigrationPhase, PhaseListener
from kvmflow.store.base import JournalEntry, Lease

_log = get_logger("kvmflow.engine")
Phase = MigrationPhase


class Plan(enum.StrEnum):
    CLEAN_TARGET = "clean the target, keep the source"
    ADOPT = "adopt the migration"
    RESUME_TARGET = "resume the target (the source died after sending everything)"
    FINISH = "finish on the target, end the source"
    CLOSE_ABORTED = "clean the target, record the source"
    LEAVE = "touch nothing"


def judge(record: RecordedMigration, source: Copy | None, target: Copy | None) -> tuple[Plan, str]:
    """What to do about a recorded migration, given both copies (see the module's table)."""
    phase = record.phase
    for copy in (source, target):
        if copy is not None and copy.state is CopyState.UNREACHABLE:
            return Plan.LEAVE, f"the copy on {copy.node} does not answer: nothing can be judged"
    src_holds = source is not None and source.holds_guest
    tgt_holds = target is not None and target.holds_guest
    tgt_alive = target is not None and target.alive
    src_alive = source is not None and source.alive
    if src_holds and tgt_holds:
        return Plan.LEAVE, "both copies hold the guest: both may have run"
    if phase in (Phase.CHECKING, Phase.TARGET_STARTING, Phase.TARGET_LISTENING):
        if tgt_holds or (source is not None and source.migration in ("active", "completed")):
            return Plan.LEAVE, f"{phase}: the QEMUs say more happened than the journal"
        return Plan.CLEAN_TARGET, f"the stream never started ({phase})"
    if phase is Phase.COMPLETED_ON_SOURCE and record.cont_may_be_sent and not tgt_alive:
        return Plan.LEAVE, "the target may have run the guest (cont may have been sent) and is gone"
    if phase in ADOPTABLE:
        if src_alive and source is not None and source.state is not CopyState.FAILED:
            if phase is Phase.POSTCOPY and not tgt_alive:
                return Plan.LEAVE, "post-copy, and the target (holding the newest state) died"
            return Plan.ADOPT, f"{phase} recorded; the source says {source.migration}"
        if phase is Phase.COMPLETED_ON_SOURCE and target is not None and target.alive:
            if target.state is CopyState.INMIGRATE:
                return Plan.LEAVE, "the source died; the target is still loading: try again"
            return Plan.RESUME_TARGET, "the source died after sending everything"
        if phase is Phase.POSTCOPY:
            return Plan.LEAVE, "post-copy, and the source (holding pages) died"
        return Plan.CLEAN_TARGET, "the source died before the stream completed"
    if phase in (Phase.TARGET_MAY_RUN, Phase.SWITCHED_OVER, Phase.DONE):
        if src_holds:
            return Plan.LEAVE, f"{phase} recorded, yet the source holds the guest"
        if tgt_alive and target is not None and target.state is not CopyState.INMIGRATE:
            return Plan.FINISH, f"{phase}: the target has the guest"
        if phase is Phase.DONE and not tgt_alive:
            return Plan.LEAVE, "done recorded, and the target is gone"
        return Plan.LEAVE, f"{phase}: the target may have run the guest and is gone"
    if phase is Phase.ABORTED:
        if tgt_holds:
            return Plan.LEAVE, "aborted recorded, yet the target holds the guest"
        return Plan.CLOSE_ABORTED, "the abort was over"
    return Plan.LEAVE, f"{phase}: kvmflow could not vouch for either copy"


class Recovery:
    """One recovery pass over a store and the nodes (``hypervisors`` by node name)."""

    def __init__(
        self,
        hypervisors: Mapping[str, KvmHypervisor],
        guard: OperationGuard,
        *,
        abort: bool = False,
        dry_run: bool = False,
        clean_orphans: bool = False,
        on_phase: PhaseListener | None = None,
        resolve: Mapping[str, str] | None = None,
        only_nodes: set[str] | None = None,
        survey: bool = True,
    ) -> None:
        self.hypervisors = hypervisors
        self.only_nodes = only_nodes  # a controller's shard: entries and copies of these only
        self.survey = survey  # False: the open entries only, no search for orphans
        self.resolve = dict(resolve or {})  # instance -> the node whose copy an operator keeps
        self.guard = guard
        self.store = guard.store
        self.abort = abort
        self.dry_run = dry_run
        self.clean_orphans = clean_orphans
        self.on_phase = on_phase  # sees every step of an adopted migration (tests, hooks)

    async def run(self) -> list[RecoveryReport]:
        """Every unfinished entry (one task per instance, its entries in order), then the
        copies no entry explains; monitors through their spare socket (the dead or frozen
        owner may still hold the first)."""
        with taking_over():
            return await self._run()

    async def _run(self) -> list[RecoveryReport]:
        by_instance: dict[str, list[JournalEntry]] = {}
        placed = {p.instance: p.node for p in await self.store.placements()}
        for entry in await self.store.unfinished():
            if self.only_nodes is None or _node_of(entry, placed) in self.only_nodes:
                by_instance.setdefault(entry.instance, []).append(entry)
        reports: list[RecoveryReport] = []

        async def settle_all(entries: list[JournalEntry]) -> None:
            for entry in entries:
                reports.append(await self.settle(entry))

        async with anyio.create_task_group() as tg:
            for entries in by_instance.values():
                tg.start_soon(settle_all, entries)
        open_ids = {entry.instance for entry in await self.store.unfinished()}
        for lease in await self.store.leases():
            if self.only_nodes is not None and placed.get(lease.instance) not in self.only_nodes:
                continue
            if lease.instance not in by_instance and lease.instance not in open_ids:
                reports.append(await self._stale_lease(lease))
        open_now = {
            r.instance for r in reports if r.verdict in NEEDS_OPERATOR | {Verdict.IN_FLIGHT}
        }
        if self.survey:
            reports += await find_orphans(self, skip=open_now)
        for report in reports:
            log = _log.warning if not report.ok else _log.info
            log(
                "recovery",
                instance=report.instance,
                verdict=report.verdict.value,
                detail=report.detail,
            )
        return reports

    async def _stale_lease(self, lease: Lease) -> RecoveryReport:
        """A lease with no open entry (its owner died between taking it and writing the
        intent, before acting): released once its owner is gone."""
        name = lease.instance
        if lease.owner.alive() is not False and not _expired(lease):
            return RecoveryReport(name, Verdict.IN_FLIGHT, f"{lease.operation} by {lease.owner}")
        if self.dry_run:
            return RecoveryReport(name, Verdict.WOULD, f"release the stale lease of {lease.owner}")
        try:
            taken = await self.store.acquire(
                name, self.guard.owner, "recover", self.guard.ttl, take_over=True
            )
        except InstanceBusyError as exc:
            return RecoveryReport(name, Verdict.IN_FLIGHT, str(exc))
        await self.store.release(taken)
        return RecoveryReport(
            name,
            Verdict.SETTLED,
            f"released the lease {lease.operation} by {lease.owner} left (nothing was done)",
        )

    async def _settle_upgrade(
        self, entry: JournalEntry, report: Callable[..., RecoveryReport]
    ) -> RecoveryReport:
        """A node upgrade whose controller died: each of its guests' migrations has an entry
        of its own (recovered as any other), so only the node's record is closed."""
        node = entry.instance.removeprefix(NODE_LEASE_PREFIX)
        detail = (
            f"the upgrade of node {node} stopped at {entry.phase}; check its QEMU "
            "(kvmflow migrate --check) before moving guests back"
        )
        if self.dry_run:
            return report(Verdict.WOULD, f"close the record: {detail}")
        async with self.guard.resume(entry) as held:
            held.outcome = f"recovered: {detail}"
        return report(Verdict.SETTLED, detail)

    def hypervisor(self, node: str) -> KvmHypervisor:
        try:
            return self.hypervisors[node]
        except KeyError:
            known = ", ".join(sorted(self.hypervisors))
            raise RecoveryError(f"node {node!r} is not known here (known: {known})") from None

    async def settle(self, entry: JournalEntry) -> RecoveryReport:
        """Reconcile one unfinished entry (under its taken-over lease)."""

        def report(verdict: Verdict, detail: str, runs_on: str | None = None) -> RecoveryReport:
            return RecoveryReport(
                entry.instance, verdict, detail, entry.operation, entry.phase, runs_on, entry.id
            )

        holder = await self.store.holder(entry.instance)
        if holder is not None and holder.owner.alive() is not False and not _expired(holder):
            return report(Verdict.IN_FLIGHT, f"{holder.operation} by {holder.owner} is alive")
        if entry.operation == UPGRADE_OPERATION:  # a node's: its guests have their own
            return await self._settle_upgrade(entry, report)
        try:
            if self.dry_run:
                verdict, detail, node = await self._plan_only(entry)
                return report(verdict, detail, node)
            async with self.guard.resume(entry) as held:
                # Open until a verdict settles it: a step that fails leaves the entry (and
                # the lease, soon stale) for the next recovery, never closed as "failed".
                held.keep_open = True
                if entry.instance in self.resolve:
                    node = self.resolve[entry.instance]
                    detail = await keep_only(entry.instance, node, self.hypervisors)
                    held.place(node)
                    held.outcome, held.keep_open = f"recovered: {detail}", False
                    return report(Verdict.RESOLVED, detail, node)
                verdict, detail, node = await self._act(entry, held)
                if verdict is Verdict.AMBIGUOUS:
                    detail += f" (--resolve {entry.instance}=NODE keeps that node's copy)"
                if verdict not in NEEDS_OPERATOR:
                    held.outcome = f"recovered: {verdict.value}: {detail}"
                    held.keep_open = False
                return report(verdict, detail, node)
        except InstanceBusyError as exc:
            return report(Verdict.IN_FLIGHT, str(exc))
        except KvmflowError as exc:
            return report(Verdict.FAILED, f"recovery failed: {exc}")

    async def _plan_only(self, entry: JournalEntry) -> tuple[Verdict, str, str | None]:
        if entry.operation != "migrate":
            return Verdict.WOULD, f"settle the record of {entry.operation} on what runs", None
        record, source, target = await self._look_both(entry)
        plan, why = judge(record, source, target)
        verdict = Verdict.AMBIGUOUS if plan is Plan.LEAVE else Verdict.WOULD
        return verdict, f"{plan.value}: {why}", None

    async def _look_both(
        self, entry: JournalEntry
    ) -> tuple[RecordedMigration, Copy | None, Copy | None]:
        record = RecordedMigration.from_journal(
            entry.instance, entry.phase, entry.details, entry.started_at
        )
        source = await look(self.hypervisor(record.source), entry.instance)
        target = await look(self.hypervisor(record.target), entry.instance)
        return record, source, target

    async def _act(
        self, entry: JournalEntry, held: HeldOperation
    ) -> tuple[Verdict, str, str | None]:
        if entry.operation != "migrate":
            return await self._settle_simple(entry, held)
        record, source, target = await self._look_both(entry)
        plan, why = judge(record, source, target)
        await held.phase(entry.phase, {"recovery": plan.value, "recovery_why": why})
        src_hv, tgt_hv = self.hypervisor(record.source), self.hypervisor(record.target)
        name = entry.instance
        if plan is Plan.LEAVE:
            return Verdict.AMBIGUOUS, why, None
        if plan is Plan.CLEAN_TARGET or plan is Plan.CLOSE_ABORTED:
            await _remove(tgt_hv, name, target)
            if record.local_disks:  # its copy: the jobs on the source, the target's images
                await clean_after_crash(name, src_hv, tgt_hv, list(record.local_disks))
            if source is not None and source.alive:
                if record.paused_by_us and source.state is CopyState.PAUSED:
                    await _cont(src_hv, name)
                held.place(record.source)
                return Verdict.ABORTED, why, record.source
            await _remove(src_hv, name, source)
            held.place(None)
            return Verdict.RUNS_NOWHERE, why, None
        if plan is Plan.ADOPT:
            return await self._adopt(entry, record, held)
        # RESUME_TARGET or FINISH: the target has the guest; the source is stale.
        assert target is not None
        if record.was_running and target.state is not CopyState.RUNNING:
            await _cont(tgt_hv, name)
        if await tgt_hv.load_runtime(name) is None:
            runtime = await src_hv.load_runtime(name)
            if runtime is None:
                raise RecoveryError(f"no runtime of {name} is left to save on {record.target}")
            await tgt_hv.save_runtime(runtime.spec, runtime)
        await _remove(src_hv, name, source)
        if record.local_disks:  # the target's copies hold the guest; the source's go
            await stop_serving(name, tgt_hv, list(record.local_disks))
            for disk in record.local_disks:
                if not disk.keep_source:
                    await src_hv.node.remove(disk.source_path)
        held.place(record.target)
        return Verdict.FINISHED, why, record.target

    async def _adopt(
        self, entry: JournalEntry, record: RecordedMigration, held: HeldOperation
    ) -> tuple[Verdict, str, str | None]:
        src_hv, tgt_hv = self.hypervisor(record.source), self.hypervisor(record.target)
        runtime = await src_hv.load_runtime(entry.instance)
        if runtime is None:
            raise RecoveryError(f"the runtime of {entry.instance} on {record.source} is gone")
        state = InstanceState.RUNNING if record.was_running else InstanceState.PAUSED
        instance = Instance(runtime.spec, src_hv, state)
        try:
            await adopt(
                instance,
                tgt_hv,
                record,
                abort=self.abort,
                on_phase=self.on_phase,
                journal=held.phase,
                report_to=held.report,
            )
        except MigrationError as error:
            side = INFO[error.outcome].side if error.outcome is not None else Side.UNKNOWN
            if side is Side.SOURCE:
                held.place(record.source)
                return Verdict.ABORTED, f"adopted and aborted: {error.outcome}", record.source
            if side is Side.TARGET:
                held.place(record.target)
                return Verdict.FINISHED, f"adopted: {error.outcome}", record.target
            return Verdict.AMBIGUOUS, f"adopted, then: {error}", None
        held.place(record.target)
        return Verdict.ADOPTED, f"adopted from {record.phase}; it completed", record.target

    async def _settle_simple(
        self, entry: JournalEntry, held: HeldOperation
    ) -> tuple[Verdict, str, str | None]:
        """A start, stop or reboot (or pause, resume) that did not close: the record
        follows what runs on its node."""
        node = str(entry.details.get("node", ""))
        hv = self.hypervisor(node)
        copy = await look(hv, entry.instance)
        if copy is not None and copy.holds_guest:
            held.place(node)
            return Verdict.SETTLED, f"{entry.operation} left it running on {node}", node
        await _remove(hv, entry.instance, copy)
        held.place(None)
        return Verdict.SETTLED, f"{entry.operation} left nothing running on {node}", None


def _expired(lease: Lease) -> bool:
    return lease.expires_at <= time.time()


async def _remove(hv: KvmHypervisor, name: str, copy: Copy | None) -> None:
    """Kill a copy that holds no guest state of its own (or clean the files one left)."""
    if copy is None:
        return
    if copy.alive:
        await hv.stop(name, force=True)
    else:
        await hv.cleanup(name)


async def _cont(hv: KvmHypervisor, name: str) -> None:
    async with hv.qmp(name, command_timeout=10) as qmp:
        await qmp.execute("cont")


__all__ = ["NEEDS_OPERATOR", "Plan", "Recovery", "RecoveryReport", "Verdict", "judge"]


def _node_of(entry: JournalEntry, placed: Mapping[str, str]) -> str | None:
    """The node whose controller recovers ``entry``: a migration's source, an instance
    operation's node, an upgrade's node, else where the instance is placed."""
    if entry.operation == UPGRADE_OPERATION:
        return entry.instance.removeprefix(NODE_LEASE_PREFIX)
    node = entry.details.get("source") or entry.details.get("node")
    return str(node) if node else placed.get(entry.instance)
