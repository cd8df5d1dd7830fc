"""The command line's configuration file: nodes and instances, in TOML.

Example (``examples/kvmflow.toml``)::

    [store]
    path = "/var/lib/kvmflow/store.sqlite"  # the store of record every kvmflow shares

    [nodes.alpha]
    runtime_root = "/run/kvmflow"      # where pid files, sockets and runtimes live
    migration_address = "192.0.2.10"   # where this node's QEMUs listen for migrations
    link_budget_mib = 200              # optional: outbound bandwidth shared by migrations

    [instances.web1]
    node = "alpha"
    memory_mib = 512
    vcpus = 2
    network_port = 5901
    disks = [{ path = "/srv/web1.img" }]
    nics = [{ mac = "52:54:00:00:00:01", mode = "bridged", link = "br0" }]
    tags = ["web"]
    hvparams = { acpi = true, disk_cache = "none" }

Every entry is checked before anything runs; errors name the entry.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmflow.errors import ConfigError, FieldProblem, ValidationError
from kvmflow.kvm.runtime import DEFAULT_ROOT, RuntimePaths
from kvmflow.kvm.spec import SPEC_KEYS, InstanceSpec

NODE_KEYS = {"runtime_root", "migration_address", "link_budget_mib"}
STORE_KEYS = {"path"}
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


@dataclass(frozen=True)
class NodeConfig:
    name: str
    runtime_root: str = DEFAULT_ROOT
    migration_address: str = "127.0.0.1"
    link_budget_mib: int | None = None


@dataclass(frozen=True)
class InstanceConfig:
    spec: InstanceSpec
    node: str


@dataclass
class Config:
    path: Path | None
    nodes: dict[str, NodeConfig] = field(default_factory=dict)
    instances: dict[str, InstanceConfig] = field(default_factory=dict)
    store_path: str | None = None  # [store] path; None: $KVMFLOW_STORE or the default


def load_config(path: Path | None) -> Config:
    """Read and check a configuration file; ``None`` gives one local node and no instances."""
    if path is None:
        return Config(None, {"local": NodeConfig("local")})
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            [
                FieldProblem(
                    "config",
                    str(path),
                    "no such file; pass -c FILE or create it (see examples/kvmflow.toml)",
                )
            ]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([FieldProblem("config", str(path), f"unreadable: {exc}")]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([FieldProblem("config", str(path), f"not valid TOML: {exc}")]) from exc
    return parse_config(data, path)


def parse_config(data: dict[str, Any], path: Path | None = None) -> Config:
    problems: list[FieldProblem] = []
    config = Config(path)
    for key in data:
        if key not in ("nodes", "instances", "store"):
            problems.append(
                FieldProblem(
                    key,
                    data[key],
                    "unknown section; use [store], [nodes.NAME] and [instances.NAME]",
                )
            )
    config.store_path = _store(data.get("store", {}), problems)
    for name, body in _table(data, "nodes", problems).items():
        node = _node(name, body, problems)
        if node is not None:
            config.nodes[name] = node
    _distinct_roots(config, problems)
    if not config.nodes and "nodes" not in data:
        config.nodes["local"] = NodeConfig("local")
    for name, body in _table(data, "instances", problems).items():
        entry = f"instances.{name}"
        if not isinstance(body, dict):
            problems.append(FieldProblem(entry, body, "a table"))
            continue
        node = body.get("node", "local" if "local" in config.nodes else None)
        if node not in config.nodes:
            problems.append(
                FieldProblem(
                    f"{entry}.node", node, f"one of the nodes: {', '.join(sorted(config.nodes))}"
                )
            )
        unknown = sorted(set(body) - SPEC_KEYS - {"node", "name"})
        for key in unknown:
            known = ", ".join(sorted((SPEC_KEYS - {"name"}) | {"node"}))
            problems.append(
                FieldProblem(f"{entry}.{key}", body[key], f"unknown key; known: {known}")
            )
        if unknown:
            continue
        values = {k: v for k, v in body.items() if k != "node"}
        values["name"] = name
        try:
            spec = InstanceSpec.from_dict(values)
        except ValidationError as exc:
            problems += [
                FieldProblem(f"{entry}.{p.field}", p.value, p.allowed) for p in exc.problems
            ]
            continue
        if isinstance(node, str):
            config.instances[name] = InstanceConfig(spec, node)
    if problems:
        raise ConfigError(problems)
    return config


def _store(body: Any, problems: list[FieldProblem]) -> str | None:
    if not isinstance(body, dict):
        problems.append(FieldProblem("store", body, "a table with path = FILE"))
        return None
    for key in body:
        if key not in STORE_KEYS:
            problems.append(
                FieldProblem(
                    f"store.{key}", body[key], f"unknown key; known: {', '.join(STORE_KEYS)}"
                )
            )
    path = body.get("path")
    if path is None:
        return None
    if not isinstance(path, str) or not path.startswith("/"):
        problems.append(FieldProblem("store.path", path, "an absolute path of a file"))
        return None
    return path


def _table(data: dict[str, Any], key: str, problems: list[FieldProblem]) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        problems.append(FieldProblem(key, value, "a table of named entries"))
        return {}
    return value


def _node(name: str, body: Any, problems: list[FieldProblem]) -> NodeConfig | None:
    entry = f"nodes.{name}"
    if not isinstance(body, dict):
        problems.append(FieldProblem(entry, body, "a table"))
        return None
    before = len(problems)
    if not NODE_NAME.fullmatch(name):
        problems.append(
            FieldProblem(
                entry,
                name,
                "a node name: letters, digits, '.', '_' and '-', starting with a letter or digit",
            )
        )
    for key in body:
        if key not in NODE_KEYS:
            problems.append(
                FieldProblem(
                    f"{entry}.{key}",
                    body[key],
                    f"unknown key; known: {', '.join(sorted(NODE_KEYS))}",
                )
            )
    root = body.get("runtime_root", DEFAULT_ROOT)
    try:
        RuntimePaths(root)
    except ValidationError as exc:
        problems += [
            FieldProblem(f"{entry}.runtime_root", p.value, p.allowed) for p in exc.problems
        ]
    address = body.get("migration_address", "127.0.0.1")
    if not _is_ip(address):
        problems.append(
            FieldProblem(f"{entry}.migration_address", address, "an IPv4 or IPv6 address")
        )
    budget = body.get("link_budget_mib")
    if budget is not None and (
        not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0
    ):
        problems.append(
            FieldProblem(f"{entry}.link_budget_mib", budget, "a positive integer (MiB/s)")
        )
    if len(problems) > before:
        return None
    return NodeConfig(name, root, address, budget)


def _is_ip(value: object) -> bool:
    try:
        ipaddress.ip_address(value if isinstance(value, str) else "")
    except ValueError:
        return False
    return True


def _distinct_roots(config: Config, problems: list[FieldProblem]) -> None:
    """Two local nodes with one runtime root would be one node under two names."""
    seen: dict[str, str] = {}
    for name, node in config.nodes.items():
        root = os.path.normpath(node.runtime_root)
        if root in seen:
            problems.append(
                FieldProblem(
                    f"nodes.{name}.runtime_root",
                    node.runtime_root,
                    f"a root of its own (nodes.{seen[root]} has it)",
                )
            )
        seen.setdefault(root, name)


def parse_node_flag(flag: str) -> NodeConfig:
    """``NAME:ROOT[:ADDRESS]`` from ``--node`` as a node entry (checked like the file's)."""
    name, _, rest = flag.partition(":")
    root, _, address = rest.partition(":")
    body: dict[str, Any] = {"runtime_root": root}
    if address:
        body["migration_address"] = address
    problems: list[FieldProblem] = []
    if not name or not root:
        raise ConfigError([FieldProblem("--node", flag, "NAME:RUNTIME_ROOT[:ADDRESS]")])
    node = _node(name, body, problems)
    if node is None:
        raise ConfigError([FieldProblem(f"--node {p.field}", p.value, p.allowed) for p in problems])
    return node
