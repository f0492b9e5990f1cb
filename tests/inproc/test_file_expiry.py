"""The file store against a real redis-server: a file stored from pieces a chunk at a time (and nothing left of
one that fails part way), the expiry index, a deletion that counts a file's bytes off the store's total once
however many callers race and refuses the input of a batch that has not finished, and the sweep that deletes
expired files but keeps such inputs."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from common.filestore import FileInUse, FileRecord, RedisFileStore, StoreFull
from common.keys import Keys
from common.redis_conn import make_client
from gateway import file_expiry
from ops.procs import RedisServer

K = Keys("fx")


def _rec(fid: str, expires_at: int | None, created_at: int = 1_000) -> FileRecord:
    return FileRecord(id=fid, bytes=0, filename=f"{fid}.jsonl", purpose="batch", scope="s", created_at=created_at,
                      expires_at=expires_at)


def _state(client: Any, store: RedisFileStore) -> Any:
    """What the sweep uses of a gateway's state."""
    counter = Counter("files_expired", "test", registry=CollectorRegistry())
    return SimpleNamespace(settings=SimpleNamespace(keys=K, file_sweep_interval_s=30), redis=client, files=store,
                           metrics=SimpleNamespace(files_expired=counter))


async def test_a_file_stored_from_pieces_reads_back_whole(redis_server: RedisServer) -> None:
    client = make_client(redis_server.url)
    store = RedisFileStore(client, K, chunk_bytes=1024, max_total_bytes=1 << 20)
    data = bytes(range(256)) * 17  # 4,352 bytes: 4 whole chunks and a short one

    async def pieces(sizes: list[int]) -> Any:
        at = 0
        for n in sizes:
            yield data[at:at + n]
            at += n

    for i, sizes in enumerate(([4352], [1, 1023, 1024, 2000, 304], [700] * 6 + [152], [1024] * 4 + [256])):
        rec = await store.put(_rec(f"file-{i}", None).model_copy(update={"bytes": len(data)}), pieces(sizes))
        assert (rec.chunks, rec.chunk_bytes) == (5, 1024) and await store.get(rec.id) == data
        assert await store.read(rec.id, 1000, 100) == data[1000:1100]
    assert int(await client.get(K.files_bytes)) == 4 * len(data)
    empty = await store.put(_rec("file-empty", None), b"")
    assert empty.chunks == 1 and await store.get(empty.id) == b""
    await client.aclose()


async def test_a_put_that_fails_part_way_leaves_nothing(redis_server: RedisServer) -> None:
    client = make_client(redis_server.url)
    store = RedisFileStore(client, K, chunk_bytes=1024, max_total_bytes=10_000)

    async def broken() -> Any:
        yield b"a" * 3000
        raise ConnectionResetError("the client went away")

    async def short() -> Any:
        yield b"b" * 100

    for data, error in ((broken(), ConnectionResetError), (short(), ValueError)):  # ValueError: 100 != 5000
        try:
            await store.put(_rec("file-x", 9_000).model_copy(update={"bytes": 5000}), data)
            raise AssertionError("stored")
        except error:
            pass
        assert int(await client.get(K.files_bytes)) == 0 and await client.keys(f"{K.file('file-x')}*") == []
        assert await store.expired(99_999, 10) == [] and await store.list(10) == ([], False)
    try:  # past the cap: refused before a byte is written
        await store.put(_rec("file-big", None).model_copy(update={"bytes": 10_001}), b"c" * 10_001)
        raise AssertionError("stored")
    except StoreFull:
        pass
    assert int(await client.get(K.files_bytes)) == 0 and await client.keys(f"{K.file('file-big')}*") == []
    await client.aclose()


async def test_racing_deletes_take_a_files_bytes_off_the_total_once(redis_server: RedisServer) -> None:
    client = make_client(redis_server.url)
    store = RedisFileStore(client, K, chunk_bytes=1024, max_total_bytes=1 << 20)
    await store.put(_rec("file-a", 2_000), b"x" * 5000)  # 5 chunks
    await store.put(_rec("file-b", None), b"y" * 10)
    assert int(await client.get(K.files_bytes)) == 5010
    got = await asyncio.gather(*(store.delete("file-a") for _ in range(8)))
    assert sorted(got) == [False] * 7 + [True]
    assert int(await client.get(K.files_bytes)) == 10
    assert await client.exists(*(K.file_chunk("file-a", i) for i in range(5))) == 0
    assert await client.zscore(K.files_expiry, "file-a") is None and await client.zscore(K.files, "file-a") is None
    assert await store.meta("file-b") is not None
    # an index entry left without a record (an older gateway's DELETE did not know the expiry index) is removed
    await client.zadd(K.files_expiry, {"file-orphan": 1_500})
    assert await store.expired(9_999, 10) == ["file-orphan"]
    assert not await store.delete("file-orphan") and await store.expired(9_999, 10) == []
    await client.aclose()


async def test_a_running_batchs_input_is_not_deleted(redis_server: RedisServer) -> None:
    client = make_client(redis_server.url)
    store = RedisFileStore(client, K, chunk_bytes=1024, max_total_bytes=1 << 20)
    await store.put(_rec("file-in", 2_000), b"x" * 100)
    await client.sadd(K.file_batches("file-in"), "batch_1", "batch_2")  # two batches read one input
    for ended in ("batch_1", "batch_2"):
        try:
            await store.delete("file-in")
            raise AssertionError("deleted while batches read it")
        except FileInUse:
            pass
        assert await store.meta("file-in") is not None and int(await client.get(K.files_bytes)) == 100
        assert await store.expired(9_999, 10) == ["file-in"]  # still due: a later sweep deletes it
        await client.srem(K.file_batches("file-in"), ended)
    assert await store.delete("file-in") and int(await client.get(K.files_bytes)) == 0
    await client.aclose()


async def test_the_expiry_index_follows_the_record(redis_server: RedisServer) -> None:
    client = make_client(redis_server.url)
    store = RedisFileStore(client, K, chunk_bytes=1024, max_total_bytes=1 << 20)
    await store.put(_rec("file-late", 3_000), b"1")
    await store.put(_rec("file-early", 2_000), b"2")
    await store.put(_rec("file-never", None), b"3")
    assert await store.expired(1_999, 10) == []
    assert await store.expired(2_500, 10) == ["file-early"]
    assert await store.expired(3_000, 10) == ["file-early", "file-late"]
    assert await store.expired(3_000, 1) == ["file-early"]
    await store.seal(_rec("file-early", None).model_copy(update={"bytes": 1}))  # written again, no expiry: out
    assert await store.expired(9_999, 10) == ["file-late"]
    sealed = await store.seal(_rec("file-out", 2_500).model_copy(update={"bytes": 0}))
    assert sealed.expires_at == 2_500 and await store.expired(9_999, 10) == ["file-out", "file-late"]
    await client.aclose()


async def test_the_sweep_deletes_expired_files_but_a_running_batchs_input(redis_server: RedisServer) -> None:
    client = make_client(redis_server.url)
    store = RedisFileStore(client, K, chunk_bytes=1024, max_total_bytes=1 << 20)
    state = _state(client, store)
    for fid, exp in (("file-in", 2_000), ("file-old", 2_000), ("file-new", 5_000), ("file-kept", None)):
        await store.put(_rec(fid, exp), b"z" * 100)
    await client.sadd(K.file_batches("file-in"), "batch_1")  # as POST /v1/batches marks its input

    assert await file_expiry.sweep(state, now=1_999) == (0, False)
    assert await file_expiry.sweep(state, now=3_000) == (1, False)  # file-old; file-in is the running batch's
    assert await store.meta("file-old") is None and await store.meta("file-in") is not None
    assert int(await client.get(K.files_bytes)) == 300
    assert await client.zscore(K.files_expiry, "file-in") == 3_030  # looked at again an interval later
    assert await file_expiry.sweep(state, now=3_000) == (0, False)
    assert await file_expiry.sweep(state, now=3_030) == (0, False) and await store.meta("file-in") is not None

    await client.srem(K.file_batches("file-in"), "batch_1")  # the batch ended: its input goes at the next sweep
    assert await file_expiry.sweep(state, now=6_000) == (2, False)  # file-in, file-new
    assert [r.id for r in (await store.list(10))[0]] == ["file-kept"]
    assert int(await client.get(K.files_bytes)) == 100
    assert state.metrics.files_expired._value.get() == 3
    await client.aclose()


async def test_a_full_page_asks_for_another_sweep_at_once(redis_server: RedisServer, monkeypatch: Any) -> None:
    client = make_client(redis_server.url)
    store = RedisFileStore(client, K, chunk_bytes=1024, max_total_bytes=1 << 20)
    state = _state(client, store)
    monkeypatch.setattr(file_expiry, "_PAGE", 3)
    for i in range(5):
        await store.put(_rec(f"file-{i}", 2_000 + i), b"q")
    assert await file_expiry.sweep(state, now=9_000) == (3, True)
    assert await file_expiry.sweep(state, now=9_000) == (2, False)
    for i in range(5):  # files that batches still mark: moved out of the way, so the sweeps do not spin on them
        await store.put(_rec(f"file-m{i}", 3_000 + i), b"q")
        await client.sadd(K.file_batches(f"file-m{i}"), "batch_running")
    assert await file_expiry.sweep(state, now=9_000) == (0, True)
    assert await file_expiry.sweep(state, now=9_000) == (0, False)
    assert await file_expiry.sweep(state, now=9_000) == (0, False)
    assert await store.expired(9_029, 10) == [] and len(await store.expired(9_030, 10)) == 5
    await client.aclose()
