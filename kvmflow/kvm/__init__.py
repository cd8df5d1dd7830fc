"""The KVM instance layer: parameters, QEMU command lines, runtime files, processes."""

from kvmflow.errors import (
    InstanceNotRunningError,
    InstanceRunningError,
    QemuStartError,
    StopError,
    UidPoolExhaustedError,
)
from kvmflow.kvm.argv import build_argv, execution_args
from kvmflow.kvm.console import console_command
from kvmflow.kvm.hvparams import (
    BootOrder,
    DiskCache,
    DiskType,
    HvParams,
    KvmFlag,
    NicType,
    SecurityModel,
    UsbMouse,
)
from kvmflow.kvm.hypervisor import InstanceInfo, KvmHypervisor
from kvmflow.kvm.nicscript import render_up_script
from kvmflow.kvm.qemu_info import CpuModel, MachineType, QemuInfo, probe_qemu
from kvmflow.kvm.runtime import RuntimePaths, SavedRuntime
from kvmflow.kvm.scratch import (
    ScratchQemu,
    default_accelerator,
    kvm_usable,
    scratch_qemu,
    start_scratch_qemu,
)
from kvmflow.kvm.spec import Disk, DiskMode, InstanceSpec, Nic, NicMode, check_instance_name
from kvmflow.kvm.uidpool import UidPool, parse_uid_ranges
from kvmflow.kvm.validation import validate_spec, validate_spec_on

__all__ = [
    "BootOrder",
    "CpuModel",
    "Disk",
    "DiskCache",
    "DiskMode",
    "DiskType",
    "HvParams",
    "InstanceInfo",
    "InstanceNotRunningError",
    "InstanceRunningError",
    "InstanceSpec",
    "KvmFlag",
    "KvmHypervisor",
    "MachineType",
    "Nic",
    "NicMode",
    "NicType",
    "QemuInfo",
    "QemuStartError",
    "RuntimePaths",
    "SavedRuntime",
    "ScratchQemu",
    "SecurityModel",
    "StopError",
    "UidPool",
    "UidPoolExhaustedError",
    "UsbMouse",
    "build_argv",
    "check_instance_name",
    "console_command",
    "default_accelerator",
    "execution_args",
    "kvm_usable",
    "parse_uid_ranges",
    "probe_qemu",
    "render_up_script",
    "scratch_qemu",
    "start_scratch_qemu",
    "validate_spec",
    "validate_spec_on",
]
