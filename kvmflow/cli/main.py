"""Entry point of the ``kvmflow`` command: argument parsing, output and exit codes.

Exit codes: 0 success; 1 an operation failed; 2 bad usage (argparse's own code).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from kvmflow.cli.logs import configure_logging
from kvmflow.errors import KvmflowError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmflow",
        description="Drive QEMU/KVM instances and live migrations from one async engine.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less log output")
    parser.add_argument("--log-json", action="store_true", help="log as JSON lines on stderr")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    probe = commands.add_parser(
        "probe",
        help="start a throwaway QEMU, ask it over QMP and HMP what it is, and stop it",
        description="Start a paused QEMU without a guest, query its version, run state and "
        "accelerator over QMP and HMP, print them, and stop it again.",
    )
    probe.add_argument("--json", action="store_true", help="print one JSON object")
    probe.add_argument(
        "--backend",
        choices=["asyncio", "trio"],
        default="asyncio",
        help="async backend to run on (default: asyncio)",
    )
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose - args.quiet, json_lines=args.log_json)
    handlers = {"probe": cmd_probe}
    try:
        return handlers[args.command](args)
    except KvmflowError as exc:
        if args.debug:
            raise
        print(f"kvmflow: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("kvmflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
