"""Instances as explicit state machines."""

from kvmflow.instance.instance import Instance
from kvmflow.instance.machine import (
    IllegalTransitionError,
    InstanceBusyError,
    InstanceMachine,
    Transition,
)
from kvmflow.instance.states import (
    TRANSITIONS,
    InstanceEvent,
    InstanceState,
    mermaid_diagram,
    next_state,
)

__all__ = [
    "TRANSITIONS",
    "IllegalTransitionError",
    "Instance",
    "InstanceBusyError",
    "InstanceEvent",
    "InstanceMachine",
    "InstanceState",
    "Transition",
    "mermaid_diagram",
    "next_state",
]
