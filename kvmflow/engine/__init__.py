"""The multi-node engine: registry, limits, bandwidth budgets, events, evacuation, and
recovery after a controller crash."""

from kvmflow.engine.engine import Engine, NodeEntry
from kvmflow.engine.evacuation import EvacuationPlan, EvacuationSummary
from kvmflow.engine.events import (
    BandwidthRebalanced,
    EngineEvent,
    EventFeed,
    MigrationCancelled,
    MigrationCompleted,
    MigrationFailed,
    MigrationProgressed,
    MigrationQueued,
    MigrationStarted,
    PolicyActionTaken,
    Statistics,
)
from kvmflow.engine.reality import Copy, CopyState, survey
from kvmflow.engine.recovery import Recovery
from kvmflow.engine.tickets import Limits, MigrationTicket, TicketState
from kvmflow.engine.upgrade import UpgradeReport, upgrade_node
from kvmflow.engine.verdicts import RecoveryReport, Verdict

__all__ = [
    "BandwidthRebalanced",
    "Copy",
    "CopyState",
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
    "Recovery",
    "RecoveryReport",
    "Statistics",
    "TicketState",
    "UpgradeReport",
    "Verdict",
    "survey",
    "upgrade_node",
]
