"""NIC up-scripts: values full of shell characters stay values."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from kvmflow.kvm import InstanceSpec, Nic, NicMode, render_up_script

EVIL = [
    "192.0.2.1'; touch {pwned}; '",
    "$(touch {pwned})",
    "`touch {pwned}`",
    '"; touch {pwned}; "',
    "a\\'b; touch {pwned}",
    "x\ntouch {pwned}",
]


def run_script(script: str, tmp_path: Path, *, path_dir: Path | None = None) -> str:
    file = tmp_path / "nic.up"
    file.write_text(script)
    file.chmod(0o700)
    env = {"PATH": f"{path_dir}:/usr/bin:/bin" if path_dir else "/usr/bin:/bin"}
    result = subprocess.run(
        [str(file), "tapX"], capture_output=True, text=True, env=env, timeout=10, check=False
    )
    return result.stdout + result.stderr


def test_site_script_gets_every_variable_verbatim(tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    dump = tmp_path / "env.dump"
    site = tmp_path / "site-script"
    site.write_text(f"#!/bin/sh\nenv -0 > {dump}\n")
    site.chmod(0o755)
    for template in EVIL:
        evil = template.format(pwned=pwned)
        spec = InstanceSpec("vm1", tags=(evil, "plain"))
        nic = Nic("52:54:00:00:00:01", evil, NicMode.ROUTED, evil)
        run_script(render_up_script(spec, nic, str(site)), tmp_path)
        assert not pwned.exists(), f"value {evil!r} ran a command"
        env = dict(item.split("=", 1) for item in dump.read_text().split("\0") if "=" in item)
        assert env["IP"] == evil
        assert env["LINK"] == evil
        assert env["TAGS"] == f"{evil} plain"
        assert env["INSTANCE"] == "vm1"
        assert env["MAC"] == "52:54:00:00:00:01"
        assert env["MODE"] == "routed"
        assert env["INTERFACE"] == "tapX"
        assert "BRIDGE" not in env


def test_bridged_without_site_script_brings_tap_up_and_adds_it(tmp_path: Path) -> None:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "ip.log"
    (stubs / "ip").write_text(f'#!/bin/sh\nprintf "%s|" "$@" >> {log}\necho >> {log}\n')
    (stubs / "ip").chmod(0o755)
    pwned = tmp_path / "pwned"
    link = f"br0; touch {pwned}"
    spec = InstanceSpec("vm1")
    script = render_up_script(
        spec,
        Nic("52:54:00:00:00:01", None, NicMode.BRIDGED, link),
        str(tmp_path / "no-site-script"),
    )
    output = run_script(script, tmp_path, path_dir=stubs)
    assert not pwned.exists()
    calls = log.read_text().splitlines()
    assert calls == ["link|set|dev|tapX|up|", f"link|set|dev|tapX|master|{link}|"], output


def test_routed_commands(tmp_path: Path) -> None:
    spec = InstanceSpec("vm1")
    v4 = render_up_script(spec, Nic("52:54:00:00:00:01", "192.0.2.7", NicMode.ROUTED, "100"))
    assert 'ip -4 route replace "$IP" table "$LINK" proto static dev "$INTERFACE"' in v4
    assert "proxy_arp" in v4
    assert "ipv4/conf/$INTERFACE/forwarding" in v4
    v6 = render_up_script(spec, Nic("52:54:00:00:00:01", "2001:db8::7", NicMode.ROUTED))
    assert 'ip -6 route replace "$IP" proto static dev "$INTERFACE"' in v6
    assert "proxy_ndp" in v6
    assert os.linesep in v6
