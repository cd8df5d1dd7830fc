"""Watching a running migration to its end, tolerant of bad answers.

``query-migrate`` is polled every ``poll_interval`` seconds; a MIGRATION event wakes the
watcher at once, so completion is noticed when QEMU reports it rather than at the next poll.
An answer that cannot be parsed, an empty answer, an unknown status, an error reply or no
answer in time counts as bad; any good answer resets the count (the ancestor reset it only
on ``active``, which made a long ``setup`` phase count against the migration). After
``max_bad_answers`` bad answers in a row, ``retry_delay`` seconds apart, it gives up.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import anyio

from kvmflow._logging import get_logger
from kvmflow.errors import CommandError, DeadlineError, MalformedReplyError
from kvmflow.migration.errors import MigrationFailedError, TooManyBadAnswersError
from kvmflow.migration.policy import MigrationPolicy
from kvmflow.migration.status import (
    BadAnswer,
    MigrationSnapshot,
    MigrationStatus,
    parse_query_migrate,
)
from kvmflow.monitor.events import EventSubscription
from kvmflow.monitor.queries import CommandRunner

_log = get_logger("kvmflow.migration")


async def query_migration(qmp: CommandRunner, timeout: float) -> MigrationSnapshot | BadAnswer:
    """One ``query-migrate``, classified; connection loss is not an answer and propagates."""
    try:
        answer = await qmp.execute("query-migrate", timeout=timeout)
    except MalformedReplyError as exc:
        return BadAnswer(f"unparseable ({exc.reason})", exc.raw.decode(errors="replace"))
    except CommandError as exc:
        return BadAnswer(f"error reply {exc.error_class}", exc.description)
    except DeadlineError:
        return BadAnswer(f"no answer within {timeout:g} s", "")
    return parse_query_migrate(answer)


async def watch_migration(
    qmp: CommandRunner,
    events: EventSubscription | None,
    policy: MigrationPolicy,
    on_snapshot: Callable[[MigrationSnapshot], Awaitable[None] | None] | None = None,
    on_bad_answer: Callable[[BadAnswer, int], None] | None = None,
) -> MigrationSnapshot:
    """Wait for the migration on ``qmp``'s QEMU to end; return the ``completed`` snapshot.

    Raises :class:`MigrationFailedError` for ``failed``/``cancelled`` and
    :class:`TooManyBadAnswersError` after too many bad answers in a row. ``on_snapshot``
    (plain or async) sees every good answer first and may act on it.
    """
    bad: list[BadAnswer] = []
    unknown_statuses: set[str] = set()
    while True:
        result = await query_migration(qmp, policy.query_timeout)
        if isinstance(result, BadAnswer):
            bad.append(result)
            _log.warning(
                "bad migration answer",
                monitor=qmp.name,
                reason=result.reason,
                in_a_row=len(bad),
                allowed=policy.max_bad_answers,
            )
            if on_bad_answer is not None:
                on_bad_answer(result, len(bad))
            if len(bad) >= policy.max_bad_answers:
                raise TooManyBadAnswersError(bad)
            await anyio.sleep(policy.retry_delay)
            continue
        bad.clear()
        if result.status is MigrationStatus.UNKNOWN and result.raw_status not in unknown_statuses:
            unknown_statuses.add(result.raw_status)  # once per word: a newer QEMU, not a fault
            _log.warning(
                "migration status unknown to kvmflow; taken as in progress",
                monitor=qmp.name,
                status=result.raw_status,
            )
        if on_snapshot is not None:
            outcome = on_snapshot(result)
            if inspect.isawaitable(outcome):
                await outcome
        if result.status is MigrationStatus.COMPLETED:
            return result
        if result.status in (MigrationStatus.FAILED, MigrationStatus.CANCELLED):
            raise MigrationFailedError(result.status.value, result.error)
        await _wait_for_news(events, policy.poll_interval)


async def _wait_for_news(events: EventSubscription | None, interval: float) -> None:
    """Sleep ``interval`` seconds, or less if a MIGRATION event arrives."""
    if events is None:
        await anyio.sleep(interval)
        return
    if await events.wait_ready(interval):
        events.drain()
