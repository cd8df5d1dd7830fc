"""The uid pool of the ``pool`` security model: each instance runs as a uid of its own.

Ranges such as ``5000-5099`` are parsed once. A uid is claimed by creating its claim file
exclusively (``O_EXCL``), so two starts racing on one node never get the same uid; the claim
file holds the instance name. The uid is released (claim removed) when the start fails and
at cleanup.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kvmflow._logging import get_logger
from kvmflow.errors import FieldProblem, UidPoolExhaustedError, ValidationError
from kvmflow.kvm.runtime import RuntimePaths
from kvmflow.node.base import Node

_log = get_logger("kvmflow.kvm")


def parse_uid_ranges(text: str) -> tuple[range, ...]:
    """Parse ``"5000-5099, 6000"`` into ranges; raise ValidationError on nonsense."""
    ranges: list[range] = []
    for part in (p.strip() for p in text.split(",")):
        low, _, high = part.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ValidationError(
                [FieldProblem("uid_pool", text, "comma-separated uids or ranges like 5000-5099")]
            ) from None
        if not 1000 <= first <= last <= 2**31 - 2:
            raise ValidationError(
                [FieldProblem("uid_pool", part, "uids from 1000 to 2147483646, low end first")]
            )
        ranges.append(range(first, last + 1))
    return tuple(ranges)


@dataclass(frozen=True)
class UidPool:
    """A pool of uids on one node, with claim files under the runtime root."""

    ranges: tuple[range, ...]
    paths: RuntimePaths

    @classmethod
    def from_text(cls, text: str, paths: RuntimePaths) -> UidPool:
        return cls(parse_uid_ranges(text), paths)

    def _claim_path(self, uid: int) -> str:
        return os.path.join(self.paths.dir("uid-pool"), str(uid))

    async def allocate(self, node: Node, instance: str) -> int:
        """Claim a free uid for ``instance``."""
        for uid_range in self.ranges:
            for uid in uid_range:
                if await node.create_exclusive(self._claim_path(uid), instance.encode()):
                    _log.debug("uid allocated", instance=instance, uid=uid, node=node.name)
                    return uid
        raise UidPoolExhaustedError(
            f"no free uid left in the pool {self.describe()} for {instance}"
        )

    async def release(self, node: Node, uid: int) -> None:
        """Give a uid back (no error if it was not claimed)."""
        await node.remove(self._claim_path(uid))

    def describe(self) -> str:
        return ",".join(f"{r.start}-{r.stop - 1}" for r in self.ranges)
