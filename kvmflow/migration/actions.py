"""Carrying out the policy's decisions on a running migration, and post-copy recovery.

The policy engine (:mod:`kvmflow.migration.decide`) only decides; this module sends what
each decision means to the source QEMU. Steps that change where the migration stands
(pausing the source, switching to post-copy) go through hooks of the migration driver, so
that the phase and the undo steps stay in one place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from kvmflow._logging import get_logger
from kvmflow.errors import KvmflowError
from kvmflow.migration.decide import Decision
from kvmflow.migration.errors import PolicyAbortError, PostcopyRecoveryError
from kvmflow.migration.policy import Action, MigrationPolicy
from kvmflow.migration.target import MigrationTarget
from kvmflow.monitor.queries import CommandRunner

_log = get_logger("kvmflow.migration")

Hook = Callable[[], Awaitable[None]]


class PolicyActions:
    """Applies decisions to the source of one migration."""

    def __init__(
        self,
        source: CommandRunner,
        target: MigrationTarget,
        policy: MigrationPolicy,
        *,
        pause_source: Hook,
        switched_to_postcopy: Hook,
    ) -> None:
        self.source = source
        self.target = target
        self.policy = policy
        self.recoveries = 0
        self._pause_source = pause_source
        self._switched_to_postcopy = switched_to_postcopy
        self._log = _log.bind(instance=target.name, target=target.node_name)

    async def apply(self, decision: Decision) -> None:
        self._log.info(
            "policy decision",
            action=decision.name,
            trigger=decision.trigger,
            evidence=decision.evidence,
        )
        action = decision.action
        if action in (Action.DOWNTIME_STEP, Action.RAISE_DOWNTIME):
            await self.source.execute(
                "migrate-set-parameters", {"downtime-limit": decision.downtime_ms}
            )
        elif action is Action.AUTO_CONVERGE:
            await self.source.execute("migrate-set-parameters", self.policy.throttle_parameters())
        elif action is Action.POSTCOPY:
            await self.source.execute("migrate-start-postcopy")
            await self._switched_to_postcopy()
        elif action is Action.PAUSE:
            await self._pause_source()
        elif action is Action.ABORT:
            raise PolicyAbortError(decision.trigger, decision.evidence)

    async def recover_postcopy(self, source_uri: str) -> None:
        """The post-copy link broke: ask the target to listen again and the source to
        resume into it, until it works or the recovery deadline passes."""
        seconds = self.policy.postcopy_recovery_seconds
        self._log.warning("post-copy paused; recovering", uri=self.target.uri, deadline=seconds)
        last_error = "no attempt finished"
        with anyio.move_on_after(seconds):
            while True:
                try:
                    await self.target.recover()
                    await self.source.execute("migrate", {"uri": source_uri, "resume": True})
                    self.recoveries += 1
                except KvmflowError as exc:
                    last_error = str(exc)
                    self._log.warning("post-copy recovery attempt failed", error=last_error)
                else:
                    self._log.info("post-copy recovery started", uri=self.target.uri)
                    return
                await anyio.sleep(1.0)
        raise PostcopyRecoveryError(seconds, last_error)
