"""The SQLite store of record: schema, leases with fencing across processes, placement, the
journal, and files that cannot be used (newer, corrupt, read-only, full)."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from kvmflow.errors import InstanceBusyError, LeaseLostError, StoreError, StoreSchemaError
from kvmflow.store import SCHEMA_VERSION, Owner, SQLiteStore

pytestmark = pytest.mark.anyio

ME = Owner.this_process("test-controller")

HOLDER = """
import sys, anyio
from kvmflow.store import Owner, SQLiteStore

async def main() -> None:
    async with await SQLiteStore.open(sys.argv[1]) as store:
        lease = await store.acquire("vm1", Owner.this_process("other"), "migrate", 60)
        print(lease.token, flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)  # hold it until told to go

anyio.run(main)
"""


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store.sqlite"


async def test_a_new_store_is_created_and_reopened(store_path: Path) -> None:
    async with await SQLiteStore.open(store_path) as store:
        lease = await store.acquire("vm1", ME, "start", 30)
        await store.record_placement(lease, "node-a")
    async with await SQLiteStore.open(store_path) as store:
        placement = await store.placement("vm1")
        assert placement is not None
        assert (placement.node, placement.token) == ("node-a", lease.token)
        held = await store.holder("vm1")
        assert held == lease  # leases, like everything, survive the process


async def test_a_second_operation_is_refused_naming_the_owner(store_path: Path) -> None:
    async with await SQLiteStore.open(store_path) as store:
        first = await store.acquire("vm1", ME, "migrate", 30)
        with pytest.raises(InstanceBusyError) as info:
            await store.acquire("vm1", ME, "stop", 30)
        assert "busy with 'migrate' by test-controller (pid" in str(info.value)
        assert info.value.holder == first
        other = await store.acquire("vm2", ME, "stop", 30)  # other instances are free
        assert other.token > first.token
        await store.release(first)
        again = await store.acquire("vm1", ME, "stop", 30)
        assert again.token > other.token  # tokens only grow


async def test_across_processes_only_recovery_takes_over_a_dead_owners_lease(
    store_path: Path,
) -> None:
    async with await SQLiteStore.open(store_path):
        pass  # create it first, so that the other process does not race the creation
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        token = int(holder.stdout.readline())
        async with await SQLiteStore.open(store_path) as store:
            with pytest.raises(InstanceBusyError, match=rf"by other \(pid {holder.pid} on"):
                await store.acquire("vm1", ME, "start", 30)
            theirs = await store.holder("vm1")
            assert theirs is not None
            assert theirs.token == token
            assert theirs.owner.alive() is True
            with pytest.raises(InstanceBusyError, match="lease runs"):
                await store.acquire("vm1", ME, "recover", 30, take_over=True)  # alive: no
            holder.kill()  # the other controller dies (SIGKILL), its lease still runs
            holder.wait(10)
            assert theirs.owner.alive() is False
            with pytest.raises(InstanceBusyError, match="owner process is gone; only recovery"):
                await store.acquire("vm1", ME, "start", 30)
            mine = await store.acquire("vm1", ME, "recover", 30, take_over=True)
            assert mine.token > token
            # Fencing: the dead owner's lease can change nothing any more.
            with pytest.raises(LeaseLostError, match=re.escape(f"now held by {ME}")):
                await store.record_placement(theirs, "node-b")
            assert await store.placement("vm1") is None
    finally:
        holder.kill()
        holder.wait(10)


async def test_an_expired_lease_fences_its_owner_and_blocks_plain_operations(
    store_path: Path,
) -> None:
    async with await SQLiteStore.open(store_path) as store:
        lease = await store.acquire("vm1", ME, "migrate", 0.05)
        await store.begin(lease, "checking", {})
        await anyio.sleep(0.1)
        with pytest.raises(LeaseLostError, match="expired; nothing was written"):
            await store.renew(lease, 30)
        with pytest.raises(InstanceBusyError, match=r"expired .* only recovery"):
            await store.acquire("vm1", ME, "start", 30)
        taken = await store.acquire("vm1", ME, "recover", 30, take_over=True)
        entries = await store.unfinished()
        assert [(e.instance, e.operation, e.token) for e in entries] == [
            ("vm1", "migrate", lease.token)
        ]
        closed = await store.finish(taken, entries[0], "aborted by recovery")
        assert not closed.open
        assert await store.unfinished() == []


async def test_the_journal_records_intent_and_phases_in_order(store_path: Path) -> None:
    async with await SQLiteStore.open(store_path) as store:
        lease = await store.acquire("vm1", ME, "migrate", 30)
        entry = await store.begin(lease, "checking", {"source": "a", "target": "b"})
        entry = await store.record_phase(lease, entry, "streaming", {"uri": "tcp:[::1]:4444"})
        assert entry.details == {"source": "a", "target": "b", "uri": "tcp:[::1]:4444"}
        (stored,) = await store.unfinished()
        assert stored == entry
        done = await store.finish(lease, entry, "moved")
        with pytest.raises(StoreError, match=f"journal entry {entry.id} is not open"):
            await store.record_phase(lease, done, "streaming", {})
        assert await store.unfinished() == []


async def test_a_newer_or_foreign_store_is_refused_and_left_as_it_is(store_path: Path) -> None:
    import sqlite3

    async with await SQLiteStore.open(store_path):
        pass
    with sqlite3.connect(store_path) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,))
    before = store_path.read_bytes()
    with pytest.raises(StoreSchemaError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        await SQLiteStore.open(store_path)
    assert store_path.read_bytes() == before
    foreign = store_path.with_name("foreign.sqlite")
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE photos (id INTEGER)")
    with pytest.raises(StoreSchemaError, match=r"not a kvmflow store \(tables: photos\)"):
        await SQLiteStore.open(foreign)


async def test_a_corrupt_file_or_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"this is not a database at all" * 100)
    before = corrupt.read_bytes()
    with pytest.raises(StoreError, match="corrupt or not a store"):
        await SQLiteStore.open(corrupt)
    assert corrupt.read_bytes() == before  # never silently replaced
    with pytest.raises(StoreError, match=r"directory .*nope does not exist"):
        await SQLiteStore.open(tmp_path / "nope" / "store.sqlite")


@pytest.fixture
def small_mount(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs of the test's own: a disk that fills up, or is made read-only."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_read_only_store_fails_clearly_before_anything_changes(small_mount: Path) -> None:
    path = small_mount / "store.sqlite"
    async with await SQLiteStore.open(path) as store:
        lease = await store.acquire("vm1", ME, "start", 30)
        await store.record_placement(lease, "node-a")
    await anyio.run_process(["mount", "-o", "remount,ro", str(small_mount)])
    before = path.read_bytes()
    with pytest.raises(StoreError, match=r"file system \(.*\) is read-only: the store must be"):
        await SQLiteStore.open(path)
    assert path.read_bytes() == before


async def test_a_full_disk_fails_the_write_and_keeps_what_was_there(small_mount: Path) -> None:
    path = small_mount / "store.sqlite"
    async with await SQLiteStore.open(path) as store:
        lease = await store.acquire("vm1", ME, "migrate", 300)
        entry = await store.begin(lease, "checking", {})
        filler = small_mount / "filler"
        fill(filler)
        with pytest.raises(StoreError, match="disk is full"):
            await store.record_phase(lease, entry, "streaming", {"blob": "x" * 200_000})
        filler.unlink()
        (kept,) = await store.unfinished()
        assert kept.phase == "checking"  # the failed write changed nothing


def fill(path: Path) -> None:
    """Write zeros to ``path`` until its file system is full."""
    with path.open("wb") as handle, contextlib.suppress(OSError):
        while True:  # ENOSPC ends it
            handle.write(b"\0" * 65536)
            handle.flush()
    assert shutil.disk_usage(path.parent).free < 65536


def test_owner_identity_survives_pid_reuse() -> None:
    me = Owner.this_process()
    assert me.alive() is True
    assert Owner(me.controller, me.host, me.pid, me.pid_started - 100).alive() is False
    assert Owner("x", "another-host.example", 1, 0.0).alive() is None
    assert time.time() - me.pid_started >= 0


async def test_concurrent_writes_share_commits_and_a_failing_one_fails_alone(
    store_path: Path,
) -> None:
    async with await SQLiteStore.open(store_path) as store:
        leases = [await store.acquire(f"vm{n}", ME, "migrate", 300) for n in range(40)]
        entries = [await store.begin(lease, "checking", {}) for lease in leases]
        await store.release(leases[7])  # vm7's writer lost its lease: only it must fail
        failures: dict[str, BaseException] = {}
        commits = store.commits

        async def write(n: int) -> None:
            try:
                await store.record_phase(leases[n], entries[n], "streaming", {"n": n})
            except LeaseLostError as exc:
                failures[leases[n].instance] = exc

        async with anyio.create_task_group() as tg:
            for n in range(40):
                tg.start_soon(write, n)
        assert list(failures) == ["vm7"]
        assert store.commits - commits <= 3  # 40 writes, a few group commits (fsyncs)
        phases = {e.instance: (e.phase, e.details.get("n")) for e in await store.unfinished()}
    assert phases.pop("vm7") == ("checking", None)  # its write was rolled back alone
    assert phases == {f"vm{n}": ("streaming", n) for n in range(40) if n != 7}


async def test_an_older_store_is_migrated_on_open_keeping_its_records(store_path: Path) -> None:
    import sqlite3

    from kvmflow.store.schema import MIGRATIONS

    db = sqlite3.connect(store_path)
    for statement in MIGRATIONS[1]:  # a store as the first kvmflow with a store wrote it
        db.execute(statement)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO placement VALUES ('vm1', 'alpha', 1, 0.0)")
    db.commit()
    db.close()
    async with await SQLiteStore.open(store_path) as store:
        placement = await store.placement("vm1")
        assert placement is not None
        assert placement.node == "alpha"  # kept
        assert await store.cancel_requests() == {}  # version 2's table
        assert await store.fence("alpha") is None  # version 3's table
    db = sqlite3.connect(store_path)
    (version,) = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    db.close()
    assert int(version) == SCHEMA_VERSION
