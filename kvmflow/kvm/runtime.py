"""Runtime directories and the saved runtime of each instance.

Under one root (``/run/kvmflow`` by default) every instance has a pid file, a uid file, its
control sockets (QMP, HMP, serial), its saved runtime (JSON), its NIC up-scripts and, with
``use_chroot``, a chroot directory. Directories are created 0700 so other users stay out.
The saved runtime holds the argv the instance was started with and its description; a
restart (reboot, migration target) reuses it, so that the guest sees the same hardware.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from kvmflow.errors import FieldProblem, RuntimeFileError, ValidationError
from kvmflow.kvm.spec import InstanceSpec, check_instance_name
from kvmflow.node.base import Node

DEFAULT_ROOT = "/run/kvmflow"
RUNTIME_FORMAT = 1
SUBDIRS = ("pid", "uid", "ctrl", "conf", "nic", "log", "chroot", "chroot-quarantine", "uid-pool")


@dataclass(frozen=True)
class RuntimePaths:
    """Where each runtime file of each instance lives under ``root``."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        if not os.path.isabs(self.root) or "," in self.root or len(self.root) > 60:
            raise ValidationError(
                [
                    FieldProblem(
                        "runtime_root",
                        self.root,
                        "an absolute path of at most 60 characters without commas (socket paths "
                        "must fit in 108 bytes and QEMU options split at commas)",
                    )
                ]
            )

    def dir(self, kind: str) -> str:
        return os.path.join(self.root, kind)

    def pid_file(self, name: str) -> str:
        return os.path.join(self.root, "pid", check_instance_name(name))

    def uid_file(self, name: str) -> str:
        return os.path.join(self.root, "uid", check_instance_name(name))

    def qmp_socket(self, name: str) -> str:
        return os.path.join(self.root, "ctrl", f"{check_instance_name(name)}.qmp")

    def takeover_socket(self, name: str) -> str:
        """A second QMP monitor, used by recovery only: a controller frozen with the first
        one open must not keep the one taking over from reaching the QEMU."""
        return os.path.join(self.root, "ctrl", f"{check_instance_name(name)}.qmp-takeover")

    def hmp_socket(self, name: str) -> str:
        return os.path.join(self.root, "ctrl", f"{check_instance_name(name)}.monitor")

    def serial_socket(self, name: str) -> str:
        return os.path.join(self.root, "ctrl", f"{check_instance_name(name)}.serial")

    def runtime_file(self, name: str) -> str:
        return os.path.join(self.root, "conf", f"{check_instance_name(name)}.runtime")

    def nic_script(self, name: str, index: int) -> str:
        return os.path.join(self.root, "nic", f"{check_instance_name(name)}-{index}.up")

    def log_file(self, name: str) -> str:
        """QEMU's stderr after it daemonized (``-D``): one run's, removed with the instance's
        other files, read first when a migration target fails."""
        return os.path.join(self.root, "log", f"{check_instance_name(name)}.log")

    def chroot_dir(self, name: str) -> str:
        return os.path.join(self.root, "chroot", check_instance_name(name))

    def quarantine_dir(self) -> str:
        return os.path.join(self.root, "chroot-quarantine")

    def vnc_socket(self, directory: str, name: str) -> str:
        return os.path.join(directory, f"{check_instance_name(name)}.vnc")

    def instance_files(self, name: str) -> list[str]:
        """Every per-instance file that cleanup removes."""
        return [
            self.pid_file(name),
            self.uid_file(name),
            self.qmp_socket(name),
            self.takeover_socket(name),
            self.hmp_socket(name),
            self.serial_socket(name),
            self.serial_socket(name) + ".lock",  # a console's lock (kvmflow.kvm.console)
            self.runtime_file(name),
            self.log_file(name),
        ]

    async def ensure(self, node: Node) -> None:
        """Create the root and its subdirectories with mode 0700."""
        await node.make_dirs(self.root, 0o700)
        for kind in SUBDIRS:
            await node.make_dirs(self.dir(kind), 0o700)


@dataclass(frozen=True)
class SavedRuntime:
    """What an instance was started with: the argv without per-start parts, and its spec."""

    argv: tuple[str, ...]
    spec: InstanceSpec
    uid: int | None = None
    root: str = DEFAULT_ROOT

    def argv_for(self, paths: RuntimePaths) -> list[str]:
        """The saved argv with its runtime paths moved under ``paths.root`` (nodes may keep
        their runtime files in different places)."""
        if paths.root == self.root:
            return list(self.argv)
        old, new = self.root.rstrip("/") + "/", paths.root.rstrip("/") + "/"
        return [arg.replace(old, new) for arg in self.argv]

    def to_json(self) -> bytes:
        body: dict[str, Any] = {
            "format": RUNTIME_FORMAT,
            "argv": list(self.argv),
            "spec": self.spec.to_dict(),
            "uid": self.uid,
            "root": self.root,
        }
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, *, source: str) -> SavedRuntime:
        try:
            body = json.loads(data)
            if body.get("format") != RUNTIME_FORMAT:
                raise ValueError(f"unknown runtime format {body.get('format')!r}")
            argv = body["argv"]
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                raise ValueError("argv is not a list of strings")
            uid = body.get("uid")
            if uid is not None and not isinstance(uid, int):
                raise ValueError("uid is not an integer")
            root = body["root"]
            if not isinstance(root, str):
                raise ValueError("root is not a string")
            return cls(tuple(argv), InstanceSpec.from_dict(body["spec"]), uid, root)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RuntimeFileError([FieldProblem("runtime", source, f"unusable: {exc}")]) from exc


async def save_runtime(node: Node, paths: RuntimePaths, runtime: SavedRuntime) -> None:
    """Write the runtime file of an instance (atomically)."""
    await node.write_file(paths.runtime_file(runtime.spec.name), runtime.to_json(), 0o600)


async def load_runtime(node: Node, paths: RuntimePaths, name: str) -> SavedRuntime | None:
    """The saved runtime of ``name``, or ``None`` if it has none."""
    path = paths.runtime_file(name)
    data = await node.read_file(path)
    if data is None:
        return None
    return SavedRuntime.from_json(data, source=path)
