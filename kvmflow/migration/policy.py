"""How a migration is run: limits, polling and tolerance, as one frozen, checked object."""

from __future__ import annotations

from dataclasses import dataclass, fields

from kvmflow.errors import FieldProblem, ValidationError
from kvmflow.kvm.params import HvParams

MIB = 1024 * 1024


@dataclass(frozen=True)
class MigrationPolicy:
    """Parameters of one migration.

    ``bandwidth_mib`` (MiB/s, ``None`` leaves QEMU's default) and ``downtime_ms`` are set
    with ``migrate-set-parameters``. ``poll_interval`` is how often ``query-migrate`` is
    asked (MIGRATION events wake the watcher sooner). After ``max_bad_answers`` unusable
    answers in a row, ``retry_delay`` seconds apart, the migration fails.
    ``cancel_timeout`` bounds the wait for QEMU to confirm a cancel.
    """

    bandwidth_mib: int | None = 32
    downtime_ms: int = 300
    poll_interval: float = 0.5
    max_bad_answers: int = 5
    retry_delay: float = 2.0
    query_timeout: float = 10.0
    cancel_timeout: float = 30.0
    target_ready_timeout: float = 30.0
    use_events: bool = True

    def __post_init__(self) -> None:
        problems: list[FieldProblem] = []
        if self.bandwidth_mib is not None and (
            isinstance(self.bandwidth_mib, bool)
            or not isinstance(self.bandwidth_mib, int)
            or self.bandwidth_mib <= 0
        ):
            problems.append(
                FieldProblem(
                    "bandwidth_mib", self.bandwidth_mib, "a positive integer (MiB/s) or None"
                )
            )
        if (
            isinstance(self.downtime_ms, bool)
            or not isinstance(self.downtime_ms, int)
            or (self.downtime_ms <= 0)
        ):
            problems.append(
                FieldProblem("downtime_ms", self.downtime_ms, "a positive integer (ms)")
            )
        if (
            isinstance(self.max_bad_answers, bool)
            or not isinstance(self.max_bad_answers, int)
            or (self.max_bad_answers < 1)
        ):
            problems.append(
                FieldProblem("max_bad_answers", self.max_bad_answers, "an integer, at least 1")
            )
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name.endswith(("_interval", "_delay", "_timeout")) and (
                not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0
            ):
                problems.append(FieldProblem(item.name, value, "a positive number of seconds"))
        if problems:
            raise ValidationError(problems)

    @classmethod
    def from_hvparams(cls, hv: HvParams, **overrides: object) -> MigrationPolicy:
        """The ancestor's way: bandwidth and downtime from the instance's parameters."""
        values: dict[str, object] = {
            "bandwidth_mib": hv.migration_bandwidth,
            "downtime_ms": hv.migration_downtime,
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    def qemu_parameters(self) -> dict[str, int]:
        """Arguments of ``migrate-set-parameters``."""
        parameters = {"downtime-limit": self.downtime_ms}
        if self.bandwidth_mib is not None:
            parameters["max-bandwidth"] = self.bandwidth_mib * MIB
        return parameters
