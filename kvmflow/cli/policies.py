"""The migration policy the command line builds from its flags (``--policy``,
``--bandwidth``, ``--downtime``, ``--max-downtime``, ``--timeout``, ``--auto-converge``,
``--postcopy``, ``--multifd``), with errors that name the flag, not the policy's field."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from kvmflow.errors import FieldProblem, ValidationError
from kvmflow.kvm.spec import InstanceSpec
from kvmflow.migration import MigrationPolicy
from kvmflow.migration.policy import Action

#: policy field -> the flag that sets it (for error messages)
FLAGS = {
    "bandwidth_mib": "--bandwidth",
    "downtime_ms": "--downtime",
    "downtime_ceiling_ms": "--max-downtime",
    "deadline_floor_seconds": "--timeout",
    "multifd_channels": "--multifd",
}


@dataclass(frozen=True)
class PolicyFlags:
    """What the operator asked for on the command line (None: not given)."""

    name: str = "default"
    bandwidth: int | None = None
    downtime: int | None = None
    max_downtime: int | None = None
    timeout: float | None = None
    auto_converge: bool = False
    postcopy: bool = False
    multifd: int | None = None
    tls: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PolicyFlags:
        return cls(
            args.policy,
            args.bandwidth,
            args.downtime,
            args.max_downtime,
            args.timeout,
            args.auto_converge,
            args.postcopy,
            args.multifd,
            args.tls,
        )

    @property
    def given(self) -> bool:
        """Whether anything was asked beyond each instance's own parameters."""
        return self != PolicyFlags()


def add_policy_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy",
        choices=["default", "ancestor", "fixed"],
        default="default",
        help="default: kvmflow's converging policy; ancestor: Ganeti's fixed "
        "limits; fixed: fixed limits with kvmflow's tolerance",
    )
    parser.add_argument("--bandwidth", type=int, metavar="MIB_S", help="bandwidth limit, MiB/s")
    parser.add_argument("--downtime", type=int, metavar="MS", help="initial downtime limit, ms")
    parser.add_argument(
        "--max-downtime", type=int, metavar="MS", help="the most downtime the policy may allow"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="give up (abort, or switch to post-copy with --postcopy) after this long",
    )
    parser.add_argument(
        "--auto-converge", action="store_true", help="let QEMU throttle the guest's vCPUs"
    )
    parser.add_argument(
        "--postcopy",
        action="store_true",
        help="switch to post-copy instead of aborting when it does not converge",
    )
    parser.add_argument("--multifd", type=int, metavar="N", help="N parallel migration channels")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="encrypt the stream with the nodes' migration TLS credentials (migration_tls_dir)",
    )


def build_policy(flags: PolicyFlags, spec: InstanceSpec | None) -> MigrationPolicy:
    """The policy for ``flags`` (starting from ``spec``'s own migration parameters)."""
    overrides: dict[str, Any] = {}
    if flags.bandwidth is not None:
        overrides["bandwidth_mib"] = flags.bandwidth
    if flags.downtime is not None:
        overrides["downtime_ms"] = flags.downtime
    if flags.max_downtime is not None:
        overrides["downtime_ceiling_ms"] = flags.max_downtime
    try:
        policy = _base(flags.name, overrides, spec)
        return _knobs(policy, flags)
    except ValidationError as exc:
        raise ValidationError(
            [FieldProblem(FLAGS.get(p.field, p.field), p.value, p.allowed) for p in exc.problems]
        ) from exc


def _base(name: str, overrides: dict[str, Any], spec: InstanceSpec | None) -> MigrationPolicy:
    if name == "ancestor":
        return MigrationPolicy.ancestor(spec.hvparams if spec else None, **overrides)
    if name == "fixed":
        return MigrationPolicy.fixed(**overrides)
    if spec is not None:
        return MigrationPolicy.from_hvparams(spec.hvparams, **overrides)
    if "downtime_ms" in overrides:
        overrides.setdefault("downtime_ceiling_ms", max(2000, overrides["downtime_ms"]))
    return MigrationPolicy(**overrides)


def _knobs(policy: MigrationPolicy, flags: PolicyFlags) -> MigrationPolicy:
    changes: dict[str, Any] = {}
    capabilities = policy.capabilities
    if flags.timeout is not None:
        if flags.timeout <= 0:
            raise ValidationError([FieldProblem("--timeout", flags.timeout, "seconds, above 0")])
        # The deadline is the floor whatever the guest's size (a tiny per-GiB share).
        changes |= {"deadline_floor_seconds": flags.timeout, "seconds_per_gib": 1e-6}
        if not policy.deadline_actions:
            changes["deadline_actions"] = (Action.ABORT,)
    if flags.auto_converge:
        capabilities = dataclasses.replace(capabilities, auto_converge=True)
    if flags.multifd is not None:
        if flags.multifd < 1:
            raise ValidationError([FieldProblem("--multifd", flags.multifd, "1 or more channels")])
        capabilities = dataclasses.replace(
            capabilities, multifd=True, multifd_channels=flags.multifd
        )
    if flags.postcopy:
        capabilities = dataclasses.replace(capabilities, postcopy_ram=True)
        given_up = changes.get("deadline_actions", policy.deadline_actions) or (Action.ABORT,)
        changes["deadline_actions"] = tuple(
            Action.POSTCOPY if a is Action.ABORT else a for a in given_up
        )
        changes["stall_actions"] = (*policy.stall_actions, Action.POSTCOPY)
    if flags.tls:
        changes["tls"] = True
    if capabilities != policy.capabilities:
        changes["capabilities"] = capabilities
    return policy.with_changes(**changes) if changes else policy


__all__ = ["PolicyFlags", "add_policy_flags", "build_policy"]
