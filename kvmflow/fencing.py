"""Fencing at the edge: every step that changes a QEMU first proves that whoever takes it
still owns the operation.

The code that sends such a step (a monitor command that is not a query, a signal to a
process, a file removed, a QEMU started) awaits :func:`before_change`. Inside an operation
held under a lease, the guard has installed a proof there (the store checks in a
transaction that the lease and its fencing token are still current, see
:mod:`kvmflow.instance.guard`); a proof that fails raises, and the step is not taken.
Outside any operation nothing is checked. The low layers (monitor, node) call it without
knowing about stores: the proof travels in a context variable, so every task an operation
starts inherits it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar

#: Proves that the caller may take the step it names, or raises why not.
Proof = Callable[[str], Awaitable[None]]

_PROOF: ContextVar[Proof | None] = ContextVar("kvmflow_fencing_proof", default=None)

#: QMP commands that change nothing (besides ``query-*``): they need no proof.
READ_ONLY_QMP = frozenset(
    {
        "qmp_capabilities",
        "qom-get",
        "qom-list",
        "qom-list-types",
        "device-list-properties",
        "qom-list-properties",
    }
)


def qmp_changes(command: str) -> bool:
    """Whether a QMP command may change the QEMU it is sent to."""
    return not (command.startswith(("query-", "x-query-")) or command in READ_ONLY_QMP)


def hmp_changes(command_line: str) -> bool:
    """Whether an HMP command line may change the QEMU (anything but ``info``)."""
    return command_line.split(maxsplit=1)[:1] not in (["info"], ["help"], [])


async def before_change(what: str) -> None:
    """Prove (inside an operation) that the step ``what`` may be taken; raises if not."""
    proof = _PROOF.get()
    if proof is not None:
        await proof(what)


@contextlib.contextmanager
def changes_proven_by(proof: Proof | None) -> Iterator[None]:
    """Within this block (and every task started in it), steps are proven by ``proof``."""
    token = _PROOF.set(proof)
    try:
        yield
    finally:
        _PROOF.reset(token)
