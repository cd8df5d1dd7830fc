"""The SQLite store's file: its schema, versioned and migrated on open, and SQLite's failures
translated into errors that say what is wrong with the file.

A newer or foreign file is refused with :class:`~kvmflow.errors.StoreSchemaError` and left as
it is; a read-only or full disk is a :class:`~kvmflow.errors.StoreError` before anything is
written.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kvmflow.errors import StoreError, StoreSchemaError

SCHEMA_VERSION = 3
DEFAULT_PATH = "/var/lib/kvmflow/store.sqlite"

#: version -> the statements that bring a store from the version before to it.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE leases (instance TEXT PRIMARY KEY, controller TEXT NOT NULL,"
        " host TEXT NOT NULL, pid INTEGER NOT NULL, pid_started REAL NOT NULL,"
        " operation TEXT NOT NULL, token INTEGER NOT NULL, expires_at REAL NOT NULL)",
        "CREATE TABLE placement (instance TEXT PRIMARY KEY, node TEXT NOT NULL,"
        " token INTEGER NOT NULL, updated_at REAL NOT NULL)",
        "CREATE TABLE journal (id INTEGER PRIMARY KEY AUTOINCREMENT, instance TEXT NOT NULL,"
        " operation TEXT NOT NULL, controller TEXT NOT NULL, host TEXT NOT NULL,"
        " pid INTEGER NOT NULL, pid_started REAL NOT NULL, token INTEGER NOT NULL,"
        " started_at REAL NOT NULL, phase TEXT NOT NULL, details TEXT NOT NULL,"
        " updated_at REAL NOT NULL, finished_at REAL, outcome TEXT)",
        "CREATE INDEX journal_open ON journal (finished_at, id)",
        "INSERT INTO meta VALUES ('fencing_token', '0')",
    ),
    # 2: the owner's latest progress on each entry, and cancel requests from other shells.
    2: (
        "ALTER TABLE journal ADD COLUMN progress TEXT",
        "CREATE TABLE cancel_requests (instance TEXT NOT NULL, token INTEGER NOT NULL,"
        " requested_by TEXT NOT NULL, requested_at REAL NOT NULL,"
        " PRIMARY KEY (instance, token))",
    ),
    # 3: nodes fenced (power-cycled, or stated down by an operator), for failover.
    3: (
        "CREATE TABLE fences (node TEXT PRIMARY KEY, at REAL NOT NULL, by TEXT NOT NULL,"
        " how TEXT NOT NULL)",
    ),
}


def connect(path: str) -> sqlite3.Connection:
    directory = Path(path).parent
    if not directory.is_dir():
        raise StoreError(f"the store's directory {directory} does not exist", path=path)
    if os.statvfs(directory).f_flag & os.ST_RDONLY:
        raise StoreError(
            f"the store's file system ({directory}) is read-only: the store must be writable "
            "before kvmflow acts on anything",
            path=path,
        )
    existed = Path(path).exists()
    with translated(path):
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
    try:
        with translated(path):
            version = schema_version(db, path) if existed else 0
            if version > SCHEMA_VERSION:
                raise StoreSchemaError(
                    f"the store has schema version {version}, newer than this kvmflow "
                    f"understands ({SCHEMA_VERSION}): upgrade kvmflow; the file was left as it is",
                    path=path,
                )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE")
            try:
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in MIGRATIONS[step]:
                        db.execute(statement)
                db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
    except BaseException:
        db.close()
        raise
    return db


def schema_version(db: sqlite3.Connection, path: str) -> int:
    """The schema version of an existing file (0: empty); refuses anything foreign."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables:
        return 0
    if "meta" not in tables:
        raise StoreSchemaError(
            f"not a kvmflow store (tables: {', '.join(sorted(tables))}); it was left as it is",
            path=path,
        )
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None or not str(row[0]).isdigit():
        raise StoreSchemaError("the store has no valid schema version", path=path)
    return int(row[0])


@contextmanager
def translated(path: str) -> Iterator[None]:
    """SQLite's failures become StoreError saying what was wrong with the file."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        text = str(exc)
        if "not a database" in text or "malformed" in text:
            reason = f"the file is corrupt or not a store ({text}); it was left as it is"
        elif "readonly" in text or "read-only" in text:
            reason = f"the store cannot be written ({text}): is its file system read-only?"
        elif "full" in text:
            reason = f"the store's disk is full ({text}); nothing was changed"
        elif "unable to open" in text:
            reason = (
                f"the store cannot be opened ({text}): its directory must be writable, SQLite "
                "keeps its -wal and -shm files beside it"
            )
        elif "locked" in text:
            reason = f"another process holds the store too long ({text})"
        else:
            reason = text
        raise StoreError(reason, path=path) from exc
