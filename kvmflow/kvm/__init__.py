"""The KVM instance layer: parameters, QEMU command lines, runtime files, processes."""

from kvmflow.kvm.scratch import (
    QemuStartError,
    ScratchQemu,
    default_accelerator,
    kvm_usable,
    scratch_qemu,
    start_scratch_qemu,
)

__all__ = [
    "QemuStartError",
    "ScratchQemu",
    "default_accelerator",
    "kvm_usable",
    "scratch_qemu",
    "start_scratch_qemu",
]
