"""Leaving a task group that an async context manager entered on its caller's behalf."""

from __future__ import annotations

from types import TracebackType

import anyio
import anyio.abc


async def exit_task_group(
    task_group: anyio.abc.TaskGroup,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
) -> bool | None:
    """Exit ``task_group`` from a context manager's ``__aexit__``.

    A cancellation is handed to the task group, which needs it to keep anyio's cancel
    bookkeeping right. Any other exception of the caller's body is not: the group would
    wrap it in an ExceptionGroup, and the body's own exception should reach the caller as
    it is (the background tasks of kvmflow's context managers never raise).
    """
    if exc is not None and isinstance(exc, anyio.get_cancelled_exc_class()):
        return bool(await task_group.__aexit__(exc_type, exc, tb))
    await task_group.__aexit__(None, None, None)
    # Never report "handled": the body's own exception, if any, must go on propagating
    # (a group cancelled by its owner may answer True, which would swallow it).
    return False
