"""The migration layer's errors (defined with every other one in :mod:`kvmflow.errors`)."""

from kvmflow.errors import (
    MigrationError,
    MigrationFailedError,
    PolicyAbortError,
    PostcopyRecoveryError,
    TooManyBadAnswersError,
)

__all__ = [
    "MigrationError",
    "MigrationFailedError",
    "PolicyAbortError",
    "PostcopyRecoveryError",
    "TooManyBadAnswersError",
]
