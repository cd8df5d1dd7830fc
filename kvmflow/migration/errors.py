"""Errors of the migration layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmflow.errors import KvmflowError
from kvmflow.migration.status import BadAnswer

if TYPE_CHECKING:
    from kvmflow.migration.outcome import Outcome


class MigrationError(KvmflowError):
    """A migration did not happen, or did not finish. ``runs_on`` names the node the instance
    runs on now (``None`` if it runs nowhere kvmflow can vouch for, for example because the
    source QEMU died); ``outcome`` says how it ended (``None`` when nothing was started)."""

    def __init__(
        self,
        instance: str,
        reason: str,
        *,
        runs_on: str | None,
        bad_answers: list[BadAnswer] | None = None,
        outcome: Outcome | None = None,
    ) -> None:
        self.instance = instance
        self.reason = reason
        self.runs_on = runs_on
        self.bad_answers = bad_answers or []
        self.outcome = outcome
        where = f"it runs on {runs_on}" if runs_on else "it runs nowhere now"
        super().__init__(f"migration of {instance} failed: {reason}; {where}")


class TooManyBadAnswersError(KvmflowError):
    """``query-migrate`` gave unusable answers too many times in a row."""

    def __init__(self, answers: list[BadAnswer]) -> None:
        self.answers = answers
        details = "; ".join(f"{a.reason}: {a.raw[:120]}" for a in answers)
        super().__init__(f"too many bad answers ({len(answers)} in a row): {details}")


class MigrationFailedError(KvmflowError):
    """QEMU reported the migration failed or cancelled."""

    def __init__(self, status: str, error: str | None) -> None:
        self.status = status
        self.error = error
        super().__init__(f"QEMU reports migration {status}" + (f": {error}" if error else ""))


class PolicyAbortError(KvmflowError):
    """The policy chose to abort the migration (stall, deadline or prediction)."""

    def __init__(self, trigger: str, evidence: str) -> None:
        self.trigger = trigger
        self.evidence = evidence
        super().__init__(f"aborted by the policy ({trigger}): {evidence}")


class PostcopyRecoveryError(KvmflowError):
    """A broken post-copy migration could not be resumed in time."""

    def __init__(self, seconds: float, last_error: str) -> None:
        self.seconds = seconds
        self.last_error = last_error
        super().__init__(
            f"post-copy recovery did not succeed within {seconds:g} s (last error: {last_error})"
        )
