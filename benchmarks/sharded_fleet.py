"""A sharded fleet: controller processes sharing one real 3-member etcd cluster over
simulated nodes (``kvmflow.testing.fleet``), 30 instances a node by default.

Each controller is a child process of its own: an engine over every node of the fleet, a
guard on the etcd store, and a :class:`~kvmflow.engine.controller.ClusterController`
holding its shard (rendezvous hashing). Reported per controller:

- at rest: CPU share of one core over 10 s, RSS, and the memory each managed instance
  costs (RSS with the shard's instances registered, minus before, over their number);
- during an evacuation of a share of the nodes (5% by default: every instance of those
  nodes migrates to the controller's other nodes, 2 out per node): CPU share, peak RSS,
  wall time, and store writes (etcd transactions that wrote) per migration;
- takeover: one controller is killed (SIGKILL) while a slower wave of migrations is in
  flight; the time until the survivors hold its nodes (within the TTL plus a round), and
  until their recovery has resumed and finished every migration it had in flight.

Run: ``python benchmarks/sharded_fleet.py [--nodes 10000] [--per-node 30]
[--controllers 3] [--evacuate 0.05] [--ttl 5]``. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import faulthandler
import json
import logging
import os
import queue
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc
import anyio.to_thread
import structlog

from kvmflow.engine import Engine, Limits, NodeEntry
from kvmflow.engine.controller import ClusterController
from kvmflow.engine.shards import Takeover, owner_of
from kvmflow.instance import Instance
from kvmflow.instance.guard import OperationGuard
from kvmflow.kvm import HvParams, InstanceSpec, KvmHypervisor, RuntimePaths
from kvmflow.migration import MigrationPolicy
from kvmflow.store import Owner
from kvmflow.store.etcd import EtcdStore
from kvmflow.store.url import etcd_target
from kvmflow.testing.etcd import etcd_cluster
from kvmflow.testing.fleet import FakeNode, fleet_process

FAST = MigrationPolicy.fixed(bandwidth_mib=1024, downtime_ms=300, poll_interval=0.5)
SLOW = MigrationPolicy.fixed(bandwidth_mib=64, downtime_ms=300, poll_interval=0.5)
SHARED_HVPARAMS = HvParams(migration_port=0)  # one flavour: frozen, shared by every spec


def paths(root: Path, node: str) -> RuntimePaths:
    return RuntimePaths(str(root / node))


def node_names(count: int) -> list[str]:
    return [f"n{i:05d}" for i in range(count)]


def fleet_of(node: str, fleets: int) -> int:
    """Which fleet process simulates ``node``'s QEMUs (migrations stay within one: a fleet
    process holds at most its descriptor limit, ~20,000 here, of sockets)."""
    return (int(node[1:]) // 20) % fleets


def evacuated_nodes(nodes: list[str], share: float) -> list[str]:
    """Every ``1/share``-th node (spread over the fleets and the controllers)."""
    step = max(1, round(1 / share))
    return [node for i, node in enumerate(nodes) if i % step == 0]


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


# ----------------------------------------------------------------------- controller


class Controller:
    """One controller process of the benchmark (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, store: EtcdStore, engine: Engine) -> None:
        self.args, self.store, self.engine = args, store, engine
        self.cluster = ClusterController(engine, store, interval=1.0, on_takeover=self.took_over)

    def took_over(self, takeover: Takeover) -> None:
        emit(
            "takeover",
            nodes=len(takeover.nodes),
            reports=len(takeover.reports),
            verdicts=dict(collections.Counter(r.verdict.value for r in takeover.reports)),
            examples=sorted({f"{r.verdict.value}: {r.detail}" for r in takeover.reports})[:4],
            claimed_at=takeover.claimed_at,
            seconds=takeover.seconds,
            done_at=time.time(),
        )

    def register(self) -> None:
        """The shard's instances, as a controller that manages them knows them."""
        before = rss_mib()
        count = 0
        for node in sorted(self.cluster.keeper.held):
            hv = self.engine.nodes[node].hypervisor
            for k in range(self.args.per_node):
                spec = InstanceSpec(f"{node}-vm{k}", memory_mib=256, hvparams=SHARED_HVPARAMS)
                self.engine.add_instance(Instance(spec, hv))
                count += 1
        after = rss_mib()
        emit(
            "registered",
            instances=count,
            rss_mib=round(after, 1),
            kib_per_instance=round((after - before) * 1024 / max(count, 1), 2),
        )

    async def rest(self, seconds: float) -> None:
        cpu, began = cpu_seconds(), time.monotonic()
        await anyio.sleep(seconds)
        share = (cpu_seconds() - cpu) / (time.monotonic() - began)
        emit("rest", core_share=round(share, 4), rss_mib=round(rss_mib(), 1))

    async def evacuate(self, nodes: list[str], policy: MigrationPolicy, tag: str) -> None:
        """Every instance of ``nodes`` this controller holds, to its other nodes."""
        mine = [n for n in nodes if n in self.cluster.keeper.held]
        fleets = self.args.fleets
        targets: dict[int, list[str]] = {f: [] for f in range(fleets)}  # within one fleet
        for node in sorted(self.cluster.keeper.held - set(nodes)):
            targets[fleet_of(node, fleets)].append(node)
        moves = []
        for i, node in enumerate(mine):
            choices = targets[fleet_of(node, fleets)]
            moves += [
                (f"{node}-vm{k}", choices[(i * 31 + k) % len(choices)])
                for k in range(self.args.per_node)
            ]
        names = [name for name, _ in moves]
        for name in names:  # the guests run (started without a lease: set-up, not measured)
            instance = self.engine.instance(name)
            guard, instance.guard = instance.guard, None
            await instance.start()
            instance.guard = guard
        writes, cpu, began = self.store.writes, cpu_seconds(), time.monotonic()
        peak = rss_mib()
        tickets = [
            self.engine.submit_migration(name, target, policy=policy) for name, target in moves
        ]
        emit(f"{tag}-submitted", migrations=len(tickets))
        done, errors = 0, collections.Counter[str]()
        for ticket in tickets:
            try:
                await ticket.wait()
                done += 1
            except Exception as exc:  # counted; the others go on
                errors[f"{type(exc).__name__}: {exc}"[:200]] += 1
            peak = max(peak, rss_mib())
        wall = time.monotonic() - began
        emit(
            tag,
            migrations=len(tickets),
            completed=done,
            wall_seconds=round(wall, 2),
            core_share=round((cpu_seconds() - cpu) / max(wall, 1e-9), 3),
            peak_rss_mib=round(peak, 1),
            store_writes_per_migration=round((self.store.writes - writes) / max(done, 1), 2),
            errors=dict(errors.most_common(3)),
        )

    async def commands(self, tg: anyio.abc.TaskGroup) -> None:
        while line := await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True):
            command = json.loads(line)
            if command["do"] == "register":
                self.register()
            elif command["do"] == "rest":
                tg.start_soon(self.rest, command["seconds"])
            elif command["do"] == "evacuate":
                tg.start_soon(self.evacuate, command["nodes"], FAST, "evacuated")
            elif command["do"] == "stats":
                stats = self.engine.statistics()
                emit("stats", active=stats.active, queued=stats.queued)
            elif command["do"] == "slow-wave":
                tg.start_soon(self.evacuate, command["nodes"], SLOW, "slow-wave")


async def run_controller(args: argparse.Namespace) -> None:
    owner = Owner.this_process(args.id)
    store = await EtcdStore.open(etcd_target(args.url), owner, ttl=args.ttl, role="controller")
    guard = OperationGuard(store, owner, ttl=args.ttl)
    root = Path(args.root)
    controls = args.control.split(",")
    entries = [
        NodeEntry(
            KvmHypervisor(
                FakeNode(n, controls[fleet_of(n, len(controls))], shared_files=True),
                paths(root, n),
            ),
            n,
        )
        for n in node_names(args.nodes)
    ]
    limits = Limits(max_outbound=2, max_inbound=4)
    async with store, Engine(entries, limits=limits, guard=guard, recover_on_enter=False) as eng:
        controller = Controller(args, store, eng)
        async with anyio.create_task_group() as tg:
            claimed = time.monotonic()
            await tg.start(controller.cluster.run)
            emit(
                "ready",
                held=len(controller.cluster.keeper.held),
                seconds=round(time.monotonic() - claimed, 2),
                rss_mib=round(rss_mib(), 1),
            )
            tg.start_soon(controller.commands, tg)
            await controller.cluster.stood_down.wait()
            tg.cancel_scope.cancel()


# --------------------------------------------------------------------------- parent


class Child:
    """A controller process; a thread reads its events as they come (a child must never
    block on a full pipe while the parent waits on another)."""

    def __init__(self, ident: str, process: subprocess.Popen[str]) -> None:
        self.ident, self.process = ident, process
        self.events: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        stdout: IO[str] | None = self.process.stdout
        assert stdout is not None
        for line in stdout:
            if line.startswith("{"):
                self._queue.put(json.loads(line))
        self._queue.put(None)

    def send(self, **command: Any) -> None:
        stdin: IO[str] | None = self.process.stdin
        assert stdin is not None
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()

    def wait_for(self, kind: str, timeout: float = 900) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise RuntimeError(f"{self.ident}: no {kind!r} in {timeout} s") from None
            if event is None:
                raise RuntimeError(f"{self.ident} ended before {kind!r}")
            self.events.append(event)
            if event["event"] == kind:
                return dict(event)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--per-node", type=int, default=30)
    parser.add_argument("--controllers", type=int, default=3)
    parser.add_argument("--evacuate", type=float, default=0.05)
    parser.add_argument("--ttl", type=int, default=5)
    parser.add_argument("--rest", type=float, default=10.0)
    parser.add_argument("--fleets", type=int, default=2, help="fleet processes")
    parser.add_argument("--role", default="parent")
    parser.add_argument("--id", default="")
    parser.add_argument("--url", default="")
    parser.add_argument("--control", default="")
    parser.add_argument("--root", default="")
    args = parser.parse_args()
    structlog.configure(  # errors only, on stderr: stdout carries the events
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.role == "controller":
        faulthandler.register(signal.SIGUSR1)  # a stuck controller says where it is
        anyio.run(run_controller, args)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up on the way out too
    print(json.dumps(measure(args)))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="kvsf-", dir="/var/tmp"))
    sockets = [str(root / f"fleet{i}.sock") for i in range(args.fleets)]
    control = ",".join(sockets)
    ids = [f"ctl-{i}" for i in range(args.controllers)]
    nodes = node_names(args.nodes)
    with contextlib.ExitStack() as stack:
        etcd = stack.enter_context(etcd_cluster(3))
        for socket_path in sockets:
            stack.enter_context(fleet_process(socket_path))
        url = etcd.url("/bench")
        common = ["--url", url, "--control", control, "--root", str(root)]
        common += ["--nodes", str(args.nodes), "--per-node", str(args.per_node)]
        common += ["--ttl", str(args.ttl), "--fleets", str(args.fleets)]
        children = [
            Child(
                ident,
                subprocess.Popen(
                    [sys.executable, __file__, "--role", "controller", "--id", ident, *common],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                ),
            )
            for ident in ids
        ]
        try:
            return run_phases(args, children, nodes, ids, url)
        finally:
            for child in children:
                child.process.kill()
                child.process.wait()
            shutil.rmtree(root, ignore_errors=True)


async def node_owners(url: str) -> dict[str, str]:
    async with await EtcdStore.open(etcd_target(url), Owner.this_process("bench")) as store:
        return await store.node_owners()


def run_phases(
    args: argparse.Namespace, children: list[Child], nodes: list[str], ids: list[str], url: str
) -> dict[str, Any]:
    result: dict[str, Any] = {"nodes": args.nodes, "instances_per_node": args.per_node}
    for child in children:
        child.wait_for("ready")
    # The shards settle as the later controllers join: until every node is where the rule
    # puts it.
    wanted = {n: owner_of(n, ids) for n in nodes}
    settling = time.monotonic()
    while anyio.run(node_owners, url) != wanted:
        if time.monotonic() - settling > 120:
            raise RuntimeError("the shards did not settle in 120 s")
        time.sleep(0.5)
    result["shards_settled_seconds"] = round(time.monotonic() - settling, 2)
    expected = {ident: sum(owner == ident for owner in wanted.values()) for ident in ids}
    for child in children:
        child.send(do="register")
    registered = [child.wait_for("registered") for child in children]
    for child in children:
        child.send(do="rest", seconds=args.rest)
    rest = [child.wait_for("rest", timeout=args.rest + 60) for child in children]
    result["at_rest"] = [
        {"controller": c.ident, **r, **{k: g[k] for k in ("instances", "kib_per_instance")}}
        for c, r, g in zip(children, rest, registered, strict=True)
    ]
    print(json.dumps(result), file=sys.stderr, flush=True)  # what is measured so far
    evacuated = evacuated_nodes(nodes, args.evacuate)
    for child in children:
        child.send(do="evacuate", nodes=evacuated)
    result["evacuation"] = [
        {"controller": child.ident, **child.wait_for("evacuated")} for child in children
    ]
    print(json.dumps(result), file=sys.stderr, flush=True)
    # Takeover: a slower wave in flight, then one controller killed.
    wave = [n for i, n in enumerate(nodes) if n not in set(evacuated) and i % 97 == 1]
    for child in children:
        child.send(do="slow-wave", nodes=wave)
    victim, survivors = children[-1], children[:-1]
    victim.wait_for("slow-wave-submitted")
    time.sleep(2.0)  # its migrations are set up and streaming (each takes ~4 s at 64 MiB/s)
    victim.send(do="stats")
    in_flight = victim.wait_for("stats")
    killed_at = time.time()
    os.kill(victim.process.pid, signal.SIGKILL)
    victim_nodes = expected[victim.ident]
    taken, claimed_at, done_at = 0, [], []
    verdicts: collections.Counter[str] = collections.Counter()
    examples: list[str] = []
    while taken < victim_nodes:
        for survivor in survivors:
            event = survivor.wait_for("takeover", timeout=args.ttl + 120)
            taken += event["nodes"]
            claimed_at.append(event["claimed_at"])
            verdicts.update(event["verdicts"])
            examples.extend(event["examples"])
            done_at.append(event["done_at"])
            if taken >= victim_nodes:
                break
    result["takeover"] = {
        "victim_nodes": victim_nodes,
        "in_flight_when_killed": in_flight["active"],
        "queued_when_killed": in_flight["queued"],
        "ttl_seconds": args.ttl,
        "claimed_after_seconds": round(max(claimed_at) - killed_at, 2),
        "recovered_after_seconds": round(max(done_at) - killed_at, 2),
        "recovery_verdicts": dict(verdicts),
        "recovery_examples": sorted(set(examples))[:6],
    }
    return result


if __name__ == "__main__":
    main()
