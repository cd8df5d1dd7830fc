"""The command line's configuration file: nodes and instances, in TOML.

Example (``examples/kvmflow.toml``)::

    [store]
    path = "/var/lib/kvmflow/store.sqlite"  # the store of record every kvmflow shares

    [nodes.alpha]
    host = "192.0.2.10"                # reached over SSH (without host: this machine)
    user = "root"                      # port, identity_file, known_hosts: optional
    runtime_root = "/run/kvmflow"      # where pid files, sockets and runtimes live
    migration_address = "192.0.2.10"   # where this node's QEMUs listen for migrations
    link_budget_mib = 200              # optional: outbound bandwidth shared by migrations
    qemu_binary = "qemu-system-x86_64" # optional: this node's QEMU (a name on PATH or a path)
    migration_tls_dir = "/etc/kvmflow/tls" # optional: for --tls (QEMU's x509 layout)

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
from kvmflow.kvm.argv import QEMU_BINARY
from kvmflow.kvm.runtime import DEFAULT_ROOT, RuntimePaths
from kvmflow.kvm.spec import SPEC_KEYS, InstanceSpec
from kvmflow.kvm.tls import MigrationTLS
from kvmflow.node.ssh import SSHTarget
from kvmflow.store.url import ALLOWED, check_url

SSH_KEYS = {"host", "port", "user", "identity_file", "known_hosts"}
TLS_KEYS = {"migration_tls_dir", "migration_tls_verify", "migration_tls_hostname"}
NODE_KEYS = {
    "runtime_root",
    "migration_address",
    "link_budget_mib",
    "qemu_binary",
    *SSH_KEYS,
    *TLS_KEYS,
}
QEMU_BINARY_PATH = re.compile(r"/?[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*")
STORE_KEYS = ("path", "url", "controller", "ttl")
CONTROLLER_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:-]{0,252}")
USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
#: Where the command line looks for its configuration, in order (the first that exists).
CONFIG_SEARCH = ("$KVMFLOW_CONFIG", "./kvmflow.toml", "/etc/kvmflow/kvmflow.toml")
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


@dataclass(frozen=True)
class NodeConfig:
    name: str
    runtime_root: str = DEFAULT_ROOT
    migration_address: str = "127.0.0.1"
    link_budget_mib: int | None = None
    ssh: SSHTarget | None = None  # None: this machine
    qemu_binary: str = QEMU_BINARY
    migration_tls: MigrationTLS | None = None


@dataclass(frozen=True)
class InstanceConfig:
    spec: InstanceSpec
    node: str


@dataclass
class Config:
    path: Path | None
    searched: tuple[str, ...] = ()  # where a config file was looked for (none was found)
    nodes: dict[str, NodeConfig] = field(default_factory=dict)
    instances: dict[str, InstanceConfig] = field(default_factory=dict)
    store_path: str | None = None  # [store] path or url; None: $KVMFLOW_STORE or the default
    controller: str | None = None  # [store] controller: this host's controller id (etcd)
    store_ttl: int = 10  # [store] ttl: seconds a dead controller's nodes wait (etcd)


def find_config() -> Path | None:
    """The configuration file the command line uses when ``-c`` is not given: the first of
    :data:`CONFIG_SEARCH` that exists (``$KVMFLOW_CONFIG`` must exist if it is set)."""
    named = os.environ.get("KVMFLOW_CONFIG")
    if named:
        return Path(named)
    for candidate in CONFIG_SEARCH[1:]:
        if Path(candidate).is_file():
            return Path(candidate)
    return None


def load_config(path: Path | None) -> Config:
    """Read and check a configuration file; ``None`` gives one local node and no instances
    (and remembers where a file was looked for, so that errors can say it)."""
    if path is None:
        return Config(None, CONFIG_SEARCH, {"local": NodeConfig("local")})
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
    store = data.get("store", {})
    if isinstance(store, dict):
        controller, ttl = store.get("controller"), store.get("ttl", 10)
        if controller is not None and not (
            isinstance(controller, str) and CONTROLLER_ID.fullmatch(controller)
        ):
            problems.append(
                FieldProblem("store.controller", controller, "1 to 64 characters of [A-Za-z0-9._-]")
            )
        elif controller is not None:
            config.controller = controller
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 2 <= ttl <= 3600:
            problems.append(FieldProblem("store.ttl", ttl, "whole seconds, 2 to 3600"))
        else:
            config.store_ttl = ttl
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
        problems.append(FieldProblem("store", body, "a table with path = FILE or url = URL"))
        return None
    if "path" in body and "url" in body:
        problems.append(FieldProblem("store", body, "path = FILE or url = URL, not both"))
        return None
    if "url" in body:
        url = body["url"]
        try:
            if not isinstance(url, str):
                raise ConfigError([FieldProblem("store.url", url, ALLOWED)])
            check_url(url)
        except ConfigError as exc:
            problems.extend(exc.problems)
            return None
        return url
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
    binary = body.get("qemu_binary", QEMU_BINARY)
    if not isinstance(binary, str) or not QEMU_BINARY_PATH.fullmatch(binary):
        problems.append(
            FieldProblem(
                f"{entry}.qemu_binary",
                binary,
                "a program name on PATH or an absolute path: letters, digits, '.', '_', '+', "
                "'-' and '/'",
            )
        )
    ssh = _ssh_target(entry, body, problems)
    tls = _migration_tls(entry, body, problems)
    if len(problems) > before:
        return None
    return NodeConfig(name, root, address, budget, ssh, binary, tls)


def _migration_tls(
    entry: str, body: dict[str, Any], problems: list[FieldProblem]
) -> MigrationTLS | None:
    """A node's migration TLS credentials: a directory in QEMU's layout on that node."""
    given = TLS_KEYS & set(body)
    if not given:
        return None
    directory = body.get("migration_tls_dir")
    if not isinstance(directory, str) or not directory.startswith("/") or "," in directory:
        problems.append(
            FieldProblem(
                f"{entry}.migration_tls_dir",
                directory,
                "an absolute directory path without commas (QEMU options split at commas), "
                "holding ca-cert.pem, server-cert.pem/-key.pem and client-cert.pem/-key.pem",
            )
        )
        return None
    verify = body.get("migration_tls_verify", True)
    if not isinstance(verify, bool):
        problems.append(FieldProblem(f"{entry}.migration_tls_verify", verify, "true or false"))
    hostname = body.get("migration_tls_hostname")
    if hostname is not None and (
        not isinstance(hostname, str) or not HOST_NAME.fullmatch(hostname)
    ):
        problems.append(
            FieldProblem(f"{entry}.migration_tls_hostname", hostname, "a host name or address")
        )
    return MigrationTLS(directory, verify is True, hostname)


def _ssh_target(entry: str, body: dict[str, Any], problems: list[FieldProblem]) -> SSHTarget | None:
    """A node with ``host`` is reached over SSH (the key's file and the known hosts must be
    given as paths; host key checking cannot be turned off from the file)."""
    given = SSH_KEYS & set(body)
    if not given:
        return None
    host = body.get("host")
    if not isinstance(host, str) or not HOST_NAME.fullmatch(host):
        problems.append(FieldProblem(f"{entry}.host", host, "a host name or IP address"))
    port = body.get("port", 22)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        problems.append(FieldProblem(f"{entry}.port", port, "a TCP port, 1 to 65535"))
    user = body.get("user", "root")
    if not isinstance(user, str) or not USER_NAME.fullmatch(user):
        problems.append(FieldProblem(f"{entry}.user", user, "a user name"))
    paths = {}
    for key in ("identity_file", "known_hosts"):
        value = body.get(key)
        if value is not None and (not isinstance(value, str) or not value.startswith(("/", "~"))):
            problems.append(FieldProblem(f"{entry}.{key}", value, "an absolute path (or ~/...)"))
        paths[key] = value
    if problems or not isinstance(host, str):
        return None
    return SSHTarget(
        host,
        port,
        user,
        client_keys=(paths["identity_file"],) if paths["identity_file"] else (),
        known_hosts=paths["known_hosts"] or "~/.ssh/known_hosts",
    )


def _is_ip(value: object) -> bool:
    try:
        ipaddress.ip_address(value if isinstance(value, str) else "")
    except ValueError:
        return False
    return True


def _distinct_roots(config: Config, problems: list[FieldProblem]) -> None:
    """Two nodes on one machine with one runtime root would be one node under two names."""
    seen: dict[tuple[str, str], str] = {}
    for name, node in config.nodes.items():
        root = (node.ssh.host if node.ssh else "", os.path.normpath(node.runtime_root))
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
