"""A fake QEMU's answers to :func:`~kvmflow.kvm.qemu_info.probe_qemu`, for fake nodes.

A fake node that starts fake QEMUs must also answer the probe every hypervisor makes of its
QEMU binary. These answers describe a QEMU 7.2 with one machine type, one CPU model and the
devices and migration capabilities kvmflow uses, in the shape the real one sends.
"""

from __future__ import annotations

import json

from kvmflow.node.base import CommandResult

HELP_TEXT = b"""QEMU emulator version 7.2.0 (kvmflow fake)
-name string1[,process=string2][,debug-threads=on|off]
-machine [type=]name[,prop[=value][,...]]
-runas user
-chroot dir
-incoming tcp:[host]:port[,to=maxport][,ipv4=on|off][,ipv6=on|off]
-D logfile
"""

_REPLIES = {
    "version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "kvmflow-fake"},
    "machines": [
        {"name": "pc-i440fx-7.2", "alias": "pc", "is-default": True, "deprecated": False},
        {"name": "pc-q35-7.2", "alias": "q35", "deprecated": False},
    ],
    "cpus": [{"name": "qemu64", "unavailable-features": [], "migration-safe": True}],
    "commands": [{"name": n} for n in ("migrate", "migrate-incoming", "query-migrate", "cont")],
    "schema": [],
    "devices": [{"name": n} for n in ("virtio-net-pci", "virtio-blk-pci", "virtio-scsi-pci")],
    "capabilities": [
        {"capability": c, "state": False}
        for c in ("xbzrle", "auto-converge", "events", "postcopy-ram", "multifd")
    ],
}


def probe_answer(argv: list[str]) -> CommandResult | None:
    """What a QEMU answers to ``argv`` if it is one of the probe's two commands, else None."""
    if argv[1:] == ["-help"]:
        return CommandResult(tuple(argv), 0, HELP_TEXT, b"")
    if "-qmp" in argv and argv[argv.index("-qmp") + 1] == "stdio":
        lines = [{"return": reply, "id": key} for key, reply in _REPLIES.items()]
        out = "".join(json.dumps(line) + "\n" for line in lines).encode()
        return CommandResult(tuple(argv), 0, out, b"")
    return None
