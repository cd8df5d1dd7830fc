"""NIC up-scripts: QEMU runs one per tap device as it creates it.

The script exports what a site script needs (INSTANCE, MAC, IP, MODE, LINK, BRIDGE,
INTERFACE, TAGS) and runs the site script if one is installed; otherwise it brings the tap
up and adds it to the bridge (bridged), or routes the IP to it with proxy ARP/NDP and
forwarding (routed, in the link's routing table when a link is set). Every value is
shell-quoted: a value full of shell characters stays a value.
"""

from __future__ import annotations

import shlex

from kvmflow.kvm.spec import InstanceSpec, Nic, NicMode
from kvmflow.kvm.validation import is_ipv6

SITE_SCRIPT = "/etc/kvmflow/kvm-vif-bridge"


def render_up_script(spec: InstanceSpec, nic: Nic, site_script: str = SITE_SCRIPT) -> str:
    """The text of the up-script for one NIC of ``spec``."""
    q = shlex.quote
    lines = [
        "#!/bin/sh",
        "# Written by kvmflow for one start of this instance; removed once QEMU is up.",
        "set -e",
        'export PATH="$PATH:/sbin:/usr/sbin:/bin:/usr/bin"',
        f"export INSTANCE={q(spec.name)}",
        f"export MAC={q(nic.mac)}",
        f"export MODE={q(nic.mode.value)}",
        'export INTERFACE="$1"',
    ]
    if nic.ip is not None:
        lines.append(f"export IP={q(nic.ip)}")
    if nic.link is not None:
        lines.append(f"export LINK={q(nic.link)}")
    if nic.mode is NicMode.BRIDGED and nic.link is not None:
        lines.append(f"export BRIDGE={q(nic.link)}")
    if spec.tags:
        lines.append(f"export TAGS={q(' '.join(spec.tags))}")
    lines += [
        f"if [ -x {q(site_script)} ]; then",
        f"  exec {q(site_script)}",
        "fi",
        'ip link set dev "$INTERFACE" up',
    ]
    if nic.mode is NicMode.BRIDGED:
        if nic.link is not None:
            lines.append('ip link set dev "$INTERFACE" master "$BRIDGE"')
    else:
        family = "-6" if nic.ip is not None and is_ipv6(nic.ip) else "-4"
        table = ' table "$LINK"' if nic.link is not None else ""
        lines.append(f'ip {family} route replace "$IP"{table} proto static dev "$INTERFACE"')
        if family == "-4":
            lines += [
                'echo 1 > "/proc/sys/net/ipv4/conf/$INTERFACE/proxy_arp"',
                'echo 1 > "/proc/sys/net/ipv4/conf/$INTERFACE/forwarding"',
            ]
        else:
            lines += [
                'echo 1 > "/proc/sys/net/ipv6/conf/$INTERFACE/proxy_ndp"',
                'echo 1 > "/proc/sys/net/ipv6/conf/$INTERFACE/forwarding"',
            ]
    return "\n".join(lines) + "\n"
