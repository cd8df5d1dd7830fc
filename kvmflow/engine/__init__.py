"""The multi-node engine: registry, limits, bandwidth budgets, events, evacuation."""

from kvmflow.engine.engine import (
    Engine,
    EvacuationPlan,
    EvacuationSummary,
    EventFeed,
    Limits,
    MigrationTicket,
    NodeEntry,
)
from kvmflow.engine.events import (
    BandwidthRebalanced,
    EngineEvent,
    MigrationCancelled,
    MigrationCompleted,
    MigrationFailed,
    MigrationProgressed,
    MigrationQueued,
    MigrationStarted,
    PolicyActionTaken,
    Statistics,
)

__all__ = [
    "BandwidthRebalanced",
    "Engine",
    "EngineEvent",
    "EvacuationPlan",
    "EvacuationSummary",
    "EventFeed",
    "Limits",
    "MigrationCancelled",
    "MigrationCompleted",
    "MigrationFailed",
    "MigrationProgressed",
    "MigrationQueued",
    "MigrationStarted",
    "MigrationTicket",
    "NodeEntry",
    "PolicyActionTaken",
    "Statistics",
]
