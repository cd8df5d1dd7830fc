"""Live migration as a cancellable coroutine, watched to its end with tolerance."""

from kvmflow.errors import IncompatibleTargetError
from kvmflow.migration.compat import Incompatibility, check_migration, incompatibilities
from kvmflow.migration.errors import MigrationError, MigrationFailedError, TooManyBadAnswersError
from kvmflow.migration.migrate import SourceMonitor, migrate
from kvmflow.migration.outcome import Outcome
from kvmflow.migration.phases import MigrationPhase, PhaseChange, PhaseEvent, PhaseListener
from kvmflow.migration.policy import MigrationPolicy
from kvmflow.migration.results import MigrationProgress, MigrationResult, ProgressFeed
from kvmflow.migration.status import (
    BadAnswer,
    MigrationSnapshot,
    MigrationStatus,
    parse_query_migrate,
)
from kvmflow.migration.watch import watch_migration

__all__ = [
    "BadAnswer",
    "Incompatibility",
    "IncompatibleTargetError",
    "MigrationError",
    "MigrationFailedError",
    "MigrationPhase",
    "MigrationPolicy",
    "MigrationProgress",
    "MigrationResult",
    "MigrationSnapshot",
    "MigrationStatus",
    "Outcome",
    "PhaseChange",
    "PhaseEvent",
    "PhaseListener",
    "ProgressFeed",
    "SourceMonitor",
    "TooManyBadAnswersError",
    "check_migration",
    "incompatibilities",
    "migrate",
    "parse_query_migrate",
    "watch_migration",
]
