"""The store of record: placement, the operation journal and leases with fencing tokens."""

from kvmflow.store.base import JournalEntry, Lease, Owner, Placement, Store
from kvmflow.store.sqlite import DEFAULT_PATH, SCHEMA_VERSION, SQLiteStore

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
