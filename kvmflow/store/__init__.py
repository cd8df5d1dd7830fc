"""The store of record: placement, the operation journal and leases with fencing tokens."""

from kvmflow.store.base import JournalEntry, Lease, Owner, Placement, Store
from kvmflow.store.schema import DEFAULT_PATH, SCHEMA_VERSION
from kvmflow.store.sqlite import SQLiteStore

__all__ = [
    "DEFAULT_PATH",
    "SCHEMA_VERSION",
    "JournalEntry",
    "Lease",
    "Owner",
    "Placement",
    "SQLiteStore",
    "Store",
]
