"""What recovery says about each instance: a verdict and the reason, for the CLI's table
and exit code as much as for an embedding controller."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Verdict(enum.StrEnum):
    """What recovery did (or, dry, would do) about one instance."""

    IN_FLIGHT = "in-flight"  # its owner is alive: left to it
    ADOPTED = "adopted"  # the stream went on under recovery and completed
    FINISHED = "finished"  # the guest runs on the target; the source was ended
    ABORTED = "aborted"  # the guest runs on the source; the target was removed
    SETTLED = "settled"  # the record follows what runs (start, stop, reboot)
    RUNS_NOWHERE = "runs-nowhere"  # no copy holds the guest any more (it died)
    AMBIGUOUS = "ambiguous"  # touched nothing: an operator must decide
    FAILED = "failed"  # a recovery step failed; the entry stays open
    ORPHAN = "orphan"  # a QEMU no entry explains (reported)
    ORPHAN_REMOVED = "orphan-removed"
    RECORDED = "recorded"  # one copy runs and the store did not say where: now it does
    CRASHED = "crashed"  # the store says it runs, no process does (files named)
    WOULD = "would"  # dry run: what would be done
    RESOLVED = "resolved"  # an operator said which copy is the guest (recover --resolve)


#: Verdicts after which ``kvmflow recover`` exits non-zero.
NEEDS_OPERATOR = frozenset({Verdict.AMBIGUOUS, Verdict.FAILED})


@dataclass(frozen=True)
class RecoveryReport:
    instance: str
    verdict: Verdict
    detail: str
    operation: str | None = None
    phase: str | None = None
    runs_on: str | None = None
    entry: int | None = None

    @property
    def ok(self) -> bool:
        return self.verdict not in NEEDS_OPERATOR
