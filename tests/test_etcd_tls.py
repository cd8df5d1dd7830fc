"""The etcd store over TLS with client certificates, against a real etcd member that
requires them: the right files connect; a client of another CA, or none, is refused with
an error that says the store does not answer, and nothing is written."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmflow.errors import ConfigError, StoreUnavailableError
from kvmflow.store import Owner
from kvmflow.store.etcd import EtcdStore
from kvmflow.store.url import etcd_target
from kvmflow.testing.etcd import MEMBER_ADDRESSES, EtcdCluster, EtcdTLS, etcd_cluster
from tests.tls import make_etcd_credentials

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Iterator[tuple[EtcdCluster, Path]]:
    make_etcd_credentials(tmp_path / "ours", MEMBER_ADDRESSES[:1], "etcd CA")
    make_etcd_credentials(tmp_path / "other", MEMBER_ADDRESSES[:1], "another CA")
    ours = tmp_path / "ours"
    server = EtcdTLS(
        str(ours / "ca-cert.pem"), str(ours / "server-cert.pem"), str(ours / "server-key.pem")
    )
    with etcd_cluster(1, tls=server) as cluster:
        yield cluster, tmp_path


def url(cluster: EtcdCluster, files: Path, *, ca: Path | None = None) -> str:
    ca = ca or files / "ca-cert.pem"
    return cluster.url("/tls") + (
        f"?ca={ca}&cert={files / 'client-cert.pem'}&key={files / 'client-key.pem'}&timeout=1"
    )


async def test_client_certificates_connect_and_strangers_are_refused(
    tls_etcd: tuple[EtcdCluster, Path],
) -> None:
    cluster, certs = tls_etcd
    owner = Owner.this_process("tls-test")
    async with await EtcdStore.open(etcd_target(url(cluster, certs / "ours")), owner) as store:
        lease = await store.acquire("vm", owner, "start", 10)
        await store.record_placement(lease, "node-a")
        await store.release(lease)
    # A client certificate of another CA (and a server it cannot verify): refused.
    stranger = etcd_target(url(cluster, certs / "other"))
    with pytest.raises(StoreUnavailableError, match="does not answer"):
        await EtcdStore.open(stranger, Owner.this_process("stranger"))
    # No client certificate at all: refused as well.
    plain = etcd_target(cluster.url("/tls") + f"?ca={certs / 'ours' / 'ca-cert.pem'}&timeout=1")
    with pytest.raises(StoreUnavailableError):
        await EtcdStore.open(plain, Owner.this_process("plain"))
    async with await EtcdStore.open(etcd_target(url(cluster, certs / "ours")), owner) as store:
        placed = await store.placement("vm")
        assert placed is not None
        assert placed.node == "node-a"
        assert [c.id for c in await store.controllers()] == ["tls-test"]


def test_tls_files_that_are_missing_or_unpaired_are_refused_whole(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        etcd_target(f"etcd://127.0.0.1:2379/p?ca={tmp_path}/none.pem&cert={tmp_path}/c.pem")
    text = str(refused.value)
    assert "an existing file" in text
    assert "cert= and key= together" in text
