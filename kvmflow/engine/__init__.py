"""The multi-node engine: registry, limits, bandwidth budgets, events, evacuation."""

from kvmflow.engine.engine import Engine, EventFeed, NodeEntry
from kvmflow.engine.evacuation import EvacuationPlan, EvacuationSummary
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
from kvmflow.engine.tickets import Limits, MigrationTicket, TicketState

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
    "TicketState",
]
