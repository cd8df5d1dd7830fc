"""Stores named by URL, as the config file and the API name them.

- ``sqlite:///var/lib/kvmflow/store.db`` (or a plain path): the embedded store, one host;
- ``etcd://host:port,host:port/prefix?ca=FILE&cert=FILE&key=FILE&user=NAME``: a cluster of
  controllers. The password is never in the URL: ``password_file=FILE`` or the environment
  variable ``KVMFLOW_ETCD_PASSWORD``.

:func:`open_store` opens either; an etcd store needs the controller's identity and its
session TTL (the time a dead controller's nodes wait before another takes them).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from kvmflow.errors import ConfigError, FieldProblem

if TYPE_CHECKING:
    from kvmflow.store.base import Owner, Store
    from kvmflow.store.etcd_session import EtcdTarget

_ENDPOINT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$")
_PREFIX = re.compile(r"^(/[A-Za-z0-9._-]+)+$")
_OPTIONS = ("ca", "cert", "key", "user", "password_file", "timeout")
ALLOWED = "sqlite:///PATH, a file path, or etcd://HOST:PORT[,HOST:PORT...]/PREFIX[?options]"


def _problem(url: str, allowed: str) -> ConfigError:
    return ConfigError([FieldProblem("store", url, allowed)])


def is_etcd(url: str) -> bool:
    return url.startswith("etcd://")


def sqlite_path(url: str) -> str:
    """The file a ``sqlite://`` URL (or a plain path) names."""
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
        if not path.startswith("/"):
            raise _problem(url, "sqlite:/// followed by an absolute path (three slashes)")
        return path
    if "://" in url:
        raise _problem(url, ALLOWED)
    return url


def etcd_target(url: str) -> EtcdTarget:
    """The cluster an ``etcd://`` URL names, checked whole (every problem at once)."""
    from kvmflow.store.etcd_session import EtcdTarget

    parts = urlsplit(url)
    problems: list[FieldProblem] = []
    user = None
    hosts = parts.netloc
    if "@" in hosts:
        user, hosts = hosts.rsplit("@", 1)
    endpoints = tuple(hosts.split(",")) if hosts else ()
    if not endpoints:
        problems.append(FieldProblem("store", url, "at least one member HOST:PORT"))
    for endpoint in endpoints:
        match = _ENDPOINT.match(endpoint)
        if not match or not 1 <= int(match.group(2)) <= 65535:
            problems.append(FieldProblem("store member", endpoint, "HOST:PORT, port 1 to 65535"))
    prefix = parts.path or "/kvmflow"
    if not _PREFIX.match(prefix):
        problems.append(FieldProblem("store prefix", prefix, "/NAME[/NAME...] of [A-Za-z0-9._-]"))
    query = parse_qs(parts.query, keep_blank_values=True)
    for name in sorted(set(query) - set(_OPTIONS)):
        problems.append(FieldProblem("store option", name, f"one of {', '.join(_OPTIONS)}"))
    options = {name: values[-1] for name, values in query.items()}
    for name in ("ca", "cert", "key", "password_file"):
        if name in options and not Path(options[name]).is_file():
            problems.append(FieldProblem(f"store {name}", options[name], "an existing file"))
    if ("cert" in options) != ("key" in options):
        problems.append(FieldProblem("store", url, "cert= and key= together, or neither"))
    user = options.get("user", user)
    password = os.environ.get("KVMFLOW_ETCD_PASSWORD")
    if "password_file" in options and Path(options["password_file"]).is_file():
        password = Path(options["password_file"]).read_text().strip()
    if user and not password:
        problems.append(
            FieldProblem("store user", user, "a password (password_file= or KVMFLOW_ETCD_PASSWORD)")
        )
    timeout = 2.0
    if "timeout" in options:
        try:
            timeout = float(options["timeout"])
            if not 0.1 <= timeout <= 60:
                raise ValueError
        except ValueError:
            problems.append(FieldProblem("store timeout", options["timeout"], "0.1 to 60 seconds"))
    if problems:
        raise ConfigError(problems)
    return EtcdTarget(
        endpoints,
        prefix,
        options.get("ca"),
        options.get("cert"),
        options.get("key"),
        user or None,
        password if user else None,
        timeout,
    )


def check_url(url: str) -> None:
    """Refuse a store URL that names nothing usable (without opening it)."""
    if is_etcd(url):
        etcd_target(url)
    else:
        sqlite_path(url)


async def open_store(url: str, owner: Owner | None = None, *, ttl: int = 10) -> Store:
    """Open the store ``url`` names; ``owner`` (the controller) is needed for etcd."""
    if is_etcd(url):
        from kvmflow.store.base import Owner
        from kvmflow.store.etcd import EtcdStore

        return await EtcdStore.open(etcd_target(url), owner or Owner.this_process(), ttl=ttl)
    from kvmflow.store.sqlite import SQLiteStore

    return await SQLiteStore.open(sqlite_path(url))
