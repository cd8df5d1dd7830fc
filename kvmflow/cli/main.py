# PYTHON_ARGCOMPLETE_OK
"""Entry point of the ``kvmflow`` command: argument parsing, output and exit codes.

Exit codes: 0 success; 1 an operation failed (or was refused: the instance is busy, another
copy runs; or recovery found something an operator must decide); 2 bad usage, bad
configuration or an unknown instance or node; 3 a batch (evacuation, plan) partly failed;
130 interrupted (Ctrl-C), 143 terminated (SIGTERM): both cancel and clean up what was in flight.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
import argcomplete
from argcomplete.shell_integration import shellcode
from rich.console import Console

from kvmflow import __version__
from kvmflow.cli import cluster, commands, records
from kvmflow.cli.config import Config, NodeConfig, find_config, load_config, parse_node_flag
from kvmflow.cli.context import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    Context,
    Terminated,
    make_table,
)
from kvmflow.cli.logs import configure_logging
from kvmflow.cli.policies import PolicyFlags, add_policy_flags, build_policy
from kvmflow.cli.records import LIST_FIELDS
from kvmflow.engine import Limits
from kvmflow.errors import FieldProblem, KvmflowError, ValidationError
from kvmflow.tuning import tune_gc_for_fleet

EPILOG = """\
examples:
  kvmflow demo                              two local nodes, busy guests, live migrations
  kvmflow -c kvmflow.toml start web1        start an instance from the configuration
  kvmflow -c kvmflow.toml migrate web1 beta move it to node beta, with a progress bar
  kvmflow -c kvmflow.toml evacuate alpha --to beta,gamma --dry-run
  kvmflow -c kvmflow.toml monitor web1 --hmp "info status"
  kvmflow -c kvmflow.toml plan run examples/plan.toml
  kvmflow -c kvmflow.toml jobs              operations in flight, from any shell
  kvmflow -c kvmflow.toml abort web1        ask the owner of web1's operation to cancel
  kvmflow -c kvmflow.toml recover --dry-run after a controller died: what would be done

exit codes: 0 ok, 1 operation failed or refused, 2 usage or configuration error,
3 batch partly failed, 130 interrupted, 143 terminated
"""


def _configured(parsed_args: argparse.Namespace) -> Config | None:
    try:
        return load_config(getattr(parsed_args, "config", None) or find_config())
    except KvmflowError:
        return None  # a broken config completes nothing; the command itself will say why


def complete_instances(prefix: str, parsed_args: argparse.Namespace, **_: object) -> list[str]:
    """Shell completion of instance names from the configuration (argcomplete)."""
    config = _configured(parsed_args)
    return sorted(n for n in (config.instances if config else ()) if n.startswith(prefix))


def complete_nodes(prefix: str, parsed_args: argparse.Namespace, **_: object) -> list[str]:
    """Shell completion of node names from the configuration (argcomplete)."""
    config = _configured(parsed_args)
    return sorted(n for n in (config.nodes if config else ()) if n.startswith(prefix))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmflow",
        description="Drive QEMU/KVM instances and live migrations from one async engine.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file with [store], [nodes.*] and [instances.*] (see "
        "examples/kvmflow.toml); default: $KVMFLOW_CONFIG, ./kvmflow.toml, "
        "/etc/kvmflow/kvmflow.toml; without any: one local node, no instances",
    )
    parser.add_argument(
        "--node",
        action="append",
        default=[],
        dest="extra_nodes",
        metavar="NAME:ROOT[:ADDRESS]",
        help="add (or replace) a node: its name, runtime root and migration "
        "address; repeatable, on top of the configuration file",
    )
    parser.add_argument(
        "--store",
        metavar="FILE|URL",
        help="the store of record: a SQLite file (sqlite:///PATH) or a cluster's etcd "
        "(etcd://HOST:PORT,.../PREFIX); default: $KVMFLOW_STORE, the config's [store], "
        "or /var/lib/kvmflow/store.sqlite",
    )
    parser.add_argument("--version", action="version", version=f"kvmflow {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less log output")
    parser.add_argument("--log-json", action="store_true", help="log as JSON lines on stderr")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, *, json_flag: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON instead of tables")
        return p

    p = command("list", "every instance: each copy's state on every node, and what disagrees")
    p.add_argument("--all", action="store_true", help="also instances stopped as they should be")
    p.add_argument(
        "-o", dest="fields", metavar="FIELD,...", help="columns: " + ", ".join(LIST_FIELDS)
    )
    p.add_argument("--no-headers", action="store_true", help="no header line")
    p.add_argument("--separator", metavar="SEP", help="plain lines, fields joined by SEP")
    p.add_argument("--on", dest="on_node", metavar="NODE", help="only instances with a copy there")
    p.add_argument("--tag", metavar="TAG", help="only instances with this tag")
    command("jobs", "operations in flight (from any shell), with phase and progress")
    p = command("controller", "run one controller of a cluster (etcd store): its shard, takeovers")
    p.add_argument(
        "--id", metavar="NAME", help="this controller's id (default: [store] controller)"
    )
    command("verify", "check the fleet: nodes reachable, each instance once where recorded")
    p = command("abort", "ask the owner of an operation in flight to cancel it")
    p.add_argument("name").completer = complete_instances  # type: ignore[attr-defined]
    p = command("recover", "after a controller died: finish, adopt or clean every operation")
    p.add_argument("--dry-run", action="store_true", help="say what would be done, change nothing")
    p.add_argument("--abort", action="store_true", help="cancel migrations still streaming")
    p.add_argument(
        "--clean-orphans",
        action="store_true",
        help="remove leftover copies that hold no guest, once the real copy is verified",
    )
    p.add_argument(
        "--resolve",
        action="append",
        default=[],
        metavar="NAME=NODE",
        help="an instance recovery left to you: keep its copy on NODE, remove the others",
    )
    command("info", "show one instance").add_argument("name").completer = complete_instances  # type: ignore[attr-defined]
    command("start", "start an instance from the configuration").add_argument(
        "name"
    ).completer = complete_instances  # type: ignore[attr-defined]
    p = command("stop", "stop an instance (ACPI power-down, then kill)")
    p.add_argument("name").completer = complete_instances  # type: ignore[attr-defined]
    p.add_argument("--force", action="store_true", help="kill at once")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for power-off")
    p = command("reboot", "stop and start again with the same hardware")
    p.add_argument("name").completer = complete_instances  # type: ignore[attr-defined]
    p.add_argument("--force", action="store_true", help="kill instead of powering down")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for power-off")
    p = command("pause", "stop the guest's vCPUs (QMP stop); memory and process stay")
    p.add_argument("name").completer = complete_instances  # type: ignore[attr-defined]
    command("resume", "start a paused guest's vCPUs again (QMP cont)").add_argument(
        "name"
    ).completer = complete_instances  # type: ignore[attr-defined]
    command("console", "attach to the serial console (Ctrl-] detaches)").add_argument(
        "name"
    ).completer = complete_instances  # type: ignore[attr-defined]
    p = command("monitor", "send one QMP command or HMP line and print the answer")
    p.add_argument("name").completer = complete_instances  # type: ignore[attr-defined]
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--qmp", metavar="COMMAND", help="a QMP command, e.g. query-status")
    what.add_argument("--hmp", metavar="LINE", help='an HMP line, e.g. "info status"')
    p.add_argument("--args", metavar="JSON", help="QMP arguments as a JSON object")
    p = command("migrate", "live-migrate one instance to another node")
    p.add_argument("name").completer = complete_instances  # type: ignore[attr-defined]
    p.add_argument("target", help="target node").completer = complete_nodes  # type: ignore[attr-defined]
    p.add_argument("--non-live", action="store_true", help="pause the guest during the copy")
    p.add_argument(
        "--check",
        action="store_true",
        help="only the pre-check: can the target's QEMU take it (machine, CPU, devices, "
        "capabilities)? Changes nothing",
    )
    add_policy_flags(p)
    p = command("evacuate", "move every instance off a node")
    p.add_argument("node").completer = complete_nodes  # type: ignore[attr-defined]
    p.add_argument(
        "--to", metavar="NODE[,NODE...]", help="target nodes (default: every other node)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--max-out", type=int, default=2, help="outbound migrations per node")
    p.add_argument("--max-in", type=int, default=2, help="inbound migrations per node")
    add_policy_flags(p)
    p = command("node", "act on a node: powercycle (sync, then an immediate reset: a fence)")
    p.add_argument("action", choices=["powercycle"])
    p.add_argument("node").completer = complete_nodes  # type: ignore[attr-defined]
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument(
        "--allow-this-machine", action="store_true", help="even if it is kvmflow's own machine"
    )
    p = command("failover", "start an instance elsewhere when its node is lost (never twice)")
    p.add_argument("name").completer = complete_instances  # type: ignore[attr-defined]
    p.add_argument("--to", required=True, metavar="NODE", help="where to start it")
    p.add_argument(
        "--node-is-down",
        action="store_true",
        help="you know the lost node is down (recorded as a fence); else it must be power-cycled",
    )
    command("node-info", "memory and CPUs of nodes").add_argument(
        "node", nargs="?"
    ).completer = complete_nodes  # type: ignore[attr-defined]
    p = command("plan", "validate or run a plan file of starts, stops and migrations")
    p.add_argument("mode", choices=["validate", "run"])
    p.add_argument("file", help="plan file (TOML, or JSON with a .json name)")
    p = command("demo", "two local nodes, busy guests, concurrent live migrations")
    p.add_argument("--guests", type=int, default=4, help="how many guests (default 4)")
    p.add_argument(
        "--bandwidth",
        type=int,
        default=32,
        metavar="MIB_S",
        help="bandwidth per migration (default 32 MiB/s)",
    )
    p = command("completion", "print the shell completion script", json_flag=False)
    p.add_argument(
        "shell",
        choices=["bash", "zsh", "fish", "tcsh"],
        help='e.g. eval "$(kvmflow completion bash)" in ~/.bashrc',
    )
    p = command("probe", "start a throwaway QEMU, ask it over QMP and HMP what it is, stop it")
    p.add_argument(
        "--backend",
        choices=["asyncio", "trio"],
        default="asyncio",
        help="async backend to run on (default: asyncio)",
    )
    return parser


def run(args: argparse.Namespace, console: Console) -> int:
    as_json = getattr(args, "json", False)
    progress = console.is_terminal and not as_json
    if args.command == "probe":
        return cmd_probe(args)
    if args.command == "demo":
        return cmd_demo(args, console, progress)
    if args.command == "completion":
        print(shellcode(["kvmflow"], shell=args.shell))
        return EXIT_OK
    ctx = Context(
        add_flag_nodes(load_config(args.config or find_config()), args.extra_nodes),
        console,
        as_json=as_json,
        store_path=args.store,
    )
    if args.command == "console":
        return commands.console_command(ctx, args.name)
    if args.command == "list":
        view = records.ListView.parse(
            args.fields,
            all=args.all,
            headers=not args.no_headers,
            separator=args.separator,
            node=args.on_node,
            tag=args.tag,
        )
        return ctx.run(records.cmd_list, ctx, view)
    if args.command == "controller":
        return ctx.run(cluster.cmd_controller, ctx, args.id)
    if args.command == "jobs":
        return ctx.run(records.cmd_jobs, ctx)
    if args.command == "node":
        return ctx.run(
            lambda: records.cmd_powercycle(
                ctx, args.node, confirmed=args.yes, allow_this_machine=args.allow_this_machine
            )
        )
    if args.command == "failover":
        return ctx.run(
            lambda: records.cmd_failover(ctx, args.name, args.to, node_is_down=args.node_is_down)
        )
    if args.command == "verify":
        return ctx.run(records.cmd_verify, ctx)
    if args.command == "abort":
        return ctx.run(records.cmd_abort, ctx, args.name)
    if args.command == "recover":
        return ctx.run(
            lambda: records.cmd_recover(
                ctx,
                dry_run=args.dry_run,
                abort=args.abort,
                clean_orphans=args.clean_orphans,
                resolve=resolutions(args.resolve),
            )
        )
    if args.command in ("pause", "resume"):
        return ctx.run(commands.cmd_pause_resume, ctx, args.name, args.command == "pause")
    if args.command == "info":
        return ctx.run(commands.cmd_info, ctx, args.name)
    if args.command == "start":
        return ctx.run(cluster.cmd_start_anywhere, ctx, args.name)
    if args.command == "stop":
        return ctx.run(
            lambda: cluster.cmd_stop_anywhere(
                ctx, args.name, force=args.force, timeout=args.timeout
            )
        )
    if args.command == "reboot":
        return ctx.run(
            lambda: commands.cmd_reboot(ctx, args.name, force=args.force, timeout=args.timeout)
        )
    if args.command == "monitor":
        return ctx.run(
            lambda: commands.cmd_monitor(
                ctx, args.name, qmp_command=args.qmp, arguments=args.args, hmp_line=args.hmp
            )
        )
    if args.command == "plan":
        return ctx.run(
            lambda: commands.cmd_plan(ctx, args.file, run=args.mode == "run", progress=progress)
        )
    if args.command == "node-info":
        return ctx.run(commands.cmd_node_info, ctx, args.node)
    if args.command == "migrate":
        spec = ctx.spec(args.name)
        policy = build_policy(PolicyFlags.from_args(args), spec)
        if args.check:
            return ctx.run(lambda: commands.cmd_migrate_check(ctx, args.name, args.target, policy))

        return ctx.run(
            lambda: cluster.cmd_migrate_anywhere(
                ctx,
                args.name,
                args.target,
                live=not args.non_live,
                policy=policy,
                progress=progress,
            )
        )
    if args.command == "evacuate":
        # Without policy flags every instance migrates under its own parameters.
        flags = PolicyFlags.from_args(args)
        shared = build_policy(flags, None) if flags.given else None
        if args.to is None:  # any other node with room, as gnt-node evacuate does
            targets = [name for name in ctx.config.nodes if name != args.node]
        else:
            targets = [t.strip() for t in args.to.split(",") if t.strip()]
        if not targets:
            raise ValidationError(
                [FieldProblem("--to", args.to, "one or more node names, comma-separated")]
            )
        limits = evacuation_limits(args.max_out, args.max_in)
        return ctx.run(
            lambda: commands.cmd_evacuate(
                ctx,
                args.node,
                targets,
                dry_run=args.dry_run,
                policy=shared,
                limits=limits,
                progress=progress,
            )
        )
    raise AssertionError(args.command)  # pragma: no cover


def resolutions(flags: list[str]) -> dict[str, str]:
    """``--resolve NAME=NODE`` flags as a mapping (each checked)."""
    resolved: dict[str, str] = {}
    for flag in flags:
        name, sep, node = flag.partition("=")
        if not sep or not name or not node or name in resolved:
            raise ValidationError([FieldProblem("--resolve", flag, "NAME=NODE, once per instance")])
        resolved[name] = node
    return resolved


def evacuation_limits(max_out: int, max_in: int) -> Limits:
    try:
        return Limits(max_out, max_in)
    except ValidationError as exc:
        names = {"max_outbound": "--max-out", "max_inbound": "--max-in"}
        raise ValidationError(
            [FieldProblem(names.get(p.field, p.field), p.value, p.allowed) for p in exc.problems]
        ) from exc


def add_flag_nodes(config: Config, flags: list[str]) -> Config:
    """Nodes given with ``--node`` join (or replace) those of the configuration file."""
    for flag in flags:
        node: NodeConfig = parse_node_flag(flag)
        config.nodes[node.name] = node
    return config


def cmd_probe(args: argparse.Namespace) -> int:
    from kvmflow.cli.probe import run_probe

    report = run_probe(args.backend)
    if args.json:
        print(json.dumps(report.as_dict()))
        return EXIT_OK
    accel = "KVM" if report.accelerator == "kvm" else "TCG (no usable /dev/kvm)"
    print(f"QEMU version      {report.qemu_version} ({report.package})")
    print(f"accelerator       {accel}")
    print(f"run state (QMP)   {report.run_state}")
    print(f"info status (HMP) {report.hmp_status}")
    print(f"QMP round trip    {report.qmp_round_trip_us:.0f} us")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, console: Console, progress: bool) -> int:
    from kvmflow.cli.demo import demo_table, run_demo

    if args.guests < 1:
        raise ValidationError([])
    report = anyio.run(
        lambda: run_demo(args.guests, console, show_progress=progress, bandwidth_mib=args.bandwidth)
    )
    rows = demo_table(report)
    if args.json:  # numbers, with their units in the key names (as migrate --json)
        print(
            json.dumps(
                {
                    "accelerator": report.accelerator,
                    "migrations": [
                        {
                            "instance": row.instance,
                            "load": row.profile,
                            "outcome": row.outcome,
                            "seconds": round(row.seconds, 3) if row.seconds is not None else None,
                            "downtime_ms": row.downtime_ms,
                            "transferred_bytes": row.moved_bytes,
                            "actions": row.actions,
                        }
                        for row in report.rows
                    ],
                }
            )
        )
    else:
        table = make_table(*rows[0], title="kvmflow demo summary", show_edge=True)
        for row in rows[1:]:
            table.add_row(*row)
        console.print(table)
    return EXIT_OK if report.ok else EXIT_PARTIAL


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    configure_logging(args.verbose - args.quiet, json_lines=args.log_json)
    tune_gc_for_fleet()  # the application's call, as logging is: see kvmflow.tuning
    # Off a terminal (logs, CI) rich would wrap tables at 80 columns; give them room.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    try:
        return run(args, console)
    except ValidationError as exc:
        if args.debug:
            raise
        return fail(args, exc, EXIT_USAGE)
    except KvmflowError as exc:
        if args.debug:
            raise
        return fail(args, exc, EXIT_FAILED)
    except Terminated:
        print(
            "kvmflow: terminated (SIGTERM); what was in flight was cancelled and cleaned up "
            "(kvmflow list shows what runs now)",
            file=sys.stderr,
        )
        return 143
    except KeyboardInterrupt:
        print(
            "kvmflow: interrupted; what was in flight was cancelled and cleaned up "
            "(kvmflow list shows what runs now)",
            file=sys.stderr,
        )
        return 130


#: What each exit code means, as ``--json`` errors say it.
EXIT_MEANINGS = {
    EXIT_FAILED: "the operation failed or was refused",
    EXIT_USAGE: "bad usage or configuration",
}


def fail(args: argparse.Namespace, exc: KvmflowError, code: int) -> int:
    """One line on stderr; with ``--json`` a JSON object (what, and the exit code's meaning)."""
    if getattr(args, "json", False):
        answer = {"error": str(exc), "kind": type(exc).__name__, "exit_code": code}
        print(json.dumps(answer | {"meaning": EXIT_MEANINGS[code]}), file=sys.stderr)
    else:
        print(f"kvmflow: error: {exc}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
