"""Live migration as a cancellable coroutine, watched to its end with tolerance."""

from kvmflow.migration.errors import MigrationError, MigrationFailedError, TooManyBadAnswersError
from kvmflow.migration.migrate import MigrationProgress, MigrationResult, ProgressFeed, migrate
from kvmflow.migration.policy import MigrationPolicy
from kvmflow.migration.status import (
    BadAnswer,
    MigrationSnapshot,
    MigrationStatus,
    parse_query_migrate,
)
from kvmflow.migration.watch import watch_migration

__all__ = [
    "BadAnswer",
    "MigrationError",
    "MigrationFailedError",
    "MigrationPolicy",
    "MigrationProgress",
    "MigrationResult",
    "MigrationSnapshot",
    "MigrationStatus",
    "ProgressFeed",
    "TooManyBadAnswersError",
    "migrate",
    "parse_query_migrate",
    "watch_migration",
]
