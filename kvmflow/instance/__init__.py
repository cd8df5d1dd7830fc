"""Instances as explicit state machines."""

from kvmflow.errors import IllegalTransitionError, InstanceBusyError
from kvmflow.instance.instance import Instance
from kvmflow.instance.machine import InstanceMachine, Transition
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
