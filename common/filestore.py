"""Files (OpenAI's Files API: batch inputs, batch outputs) where every gateway replica reaches them, behind one
small interface, :class:`FileStore`; :class:`RedisFileStore` keeps them in Redis.

Why Redis (docs/batch.md): the gateways already share it and nothing else, so no volume or object store is
needed to run the Batch API; the price is Redis memory (a file's bytes live in RAM, and in the AOF and the
replicas), so the store has a cap (``file_store_max_bytes``) and a file is split into values of at most
``file_chunk_bytes`` (no single huge value to block Redis, or a replica's sync, while it moves).  A deployment
with big batches would put an object store behind the same interface.

Layout: the record ``Keys.file(id)`` (JSON, :class:`FileRecord`), the chunks ``Keys.file_chunk(id, i)``, the
listing ``Keys.files`` (a sorted set by creation time) and the total ``Keys.files_bytes``.  A file is written
chunks first, record last: a record that exists names a whole file.  A file that expires (OpenAI's
``expires_after``: its record's ``expires_at``) is also in ``Keys.files_expiry`` by that time (later, once a sweep
found it still read by a batch); the API treats it as gone from its ``expires_at``, and a gateway's sweep
(:mod:`gateway.file_expiry`) deletes it.
"""

from __future__ import annotations

import builtins
import contextlib
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, Protocol

import redis
import redis.asyncio as aioredis
from pydantic import BaseModel, Field

from common.batch_api import FileObject
from common.keys import Keys

PURPOSES_UPLOAD = frozenset({"batch"})  # what a client may upload
PURPOSE_OUTPUT = "batch_output"  # what the gateway writes (a batch's output and error files)


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex


class FileRecord(BaseModel):
    """A stored file (OpenAI's ``FileObject`` less what mgpu does not keep), and who may read it."""

    id: str
    bytes: int
    filename: str
    purpose: str
    scope: str
    created_at: int = Field(default_factory=lambda: int(time.time()))
    chunks: int = 0
    chunk_bytes: int = 0  # the size of every chunk but the last (0: a file written before it was kept)
    lines: int = 0  # lines that are not blank
    expires_at: int | None = None  # unix seconds; None: kept until deleted

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def to_object(self) -> FileObject:
        """OpenAI's ``FileObject``."""
        return FileObject(id=self.id, bytes=self.bytes, created_at=self.created_at, filename=self.filename,
                          purpose=self.purpose, expires_at=self.expires_at)

    def to_openai(self) -> dict[str, Any]:
        return self.to_object().model_dump(mode="json")


# SET each key to its own value: the value is copied into an allocation of its exact size
_REWRITE = """
for _, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  if v then redis.call('SET', k, v) end
end
return 0
"""

# Take a file's record off the store, with its places in the listing and the expiry index and its bytes off the
# total, once however many callers race (a DELETE and a sweep, two sweeping replicas); its chunk count, or -1 when
# there is no such file (its index entries are removed all the same: one left without a record, by an older
# gateway's DELETE, would come back at the head of every sweep).  Its chunks are deleted after, by the caller that
# got the count.  -2, and nothing removed, while a batch that has not finished reads it (``Keys.file_batches``: the
# batch's creation adds itself in the transaction that checks the file is there, its end removes it).
_DELETE = """
if redis.call('SCARD', KEYS[5]) > 0 then return -2 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
local raw = redis.call('GET', KEYS[1])
if not raw then return -1 end
local rec = cjson.decode(raw)
redis.call('DEL', KEYS[1])
redis.call('DECRBY', KEYS[4], rec['bytes'])
return rec['chunks']
"""


async def _pieces(data: bytes | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(data, bytes):
        yield data
    else:
        async for piece in data:
            yield piece


class StoreFull(Exception):
    """The store is at its cap (``file_store_max_bytes``)."""


class FileInUse(Exception):
    """The file is the input of a batch that has not finished (its feeder still reads it)."""


class FileStore(Protocol):
    """Where files are kept: every gateway replica reads what any of them wrote."""

    async def put(self, rec: FileRecord, data: bytes | AsyncIterable[bytes]) -> FileRecord:
        """Store a new file, given whole or in pieces of any size (an upload read from its spool: ``rec.bytes``
        long), holding no more than a chunk of it at a time; StoreFull past the cap, before a byte is written."""
        ...

    async def meta(self, file_id: str) -> FileRecord | None: ...

    async def get(self, file_id: str) -> bytes | None: ...

    async def read(self, file_id: str, start: int, size: int) -> bytes | None:
        """Bytes ``start`` to ``start + size`` of the file (fewer at its end); None: no such file."""
        ...

    def append(self, p: Any, file_id: str, at: int, data: bytes) -> None:
        """Queue on pipeline ``p`` (a caller's transaction) the write of ``data`` at byte ``at`` of a file being
        built, whose length the caller tracks (a batch's output, appended as its lines are collected)."""
        ...

    async def seal(self, rec: FileRecord) -> FileRecord:
        """Make a file built with :meth:`append` (``rec.bytes`` long) a stored file; idempotent."""
        ...

    async def delete(self, file_id: str) -> bool:
        """Remove the file; False when there was none (or another caller removed it first); FileInUse while a batch
        that has not finished reads it."""
        ...

    async def list(self, limit: int, after: str | None = None) -> tuple[list[FileRecord], bool]: ...

    async def expired(self, now: float, limit: int) -> builtins.list[str]:
        """Up to ``limit`` ids of files due for deletion by ``now`` (their ``expires_at``, or a later time
        :meth:`postpone` set), the earliest first."""
        ...

    async def postpone(self, file_id: str, at: float) -> None:
        """Make a file that could not be deleted yet (:class:`FileInUse`) due again at ``at``."""
        ...


class RedisFileStore:
    """:class:`FileStore` in Redis (see the module doc)."""

    def __init__(self, r: aioredis.Redis, keys: Keys, *, chunk_bytes: int, max_total_bytes: int) -> None:
        self.r, self.keys, self.chunk_bytes, self.max_total = r, keys, chunk_bytes, max_total_bytes
        self._delete = r.register_script(_DELETE)

    def _index(self, p: Any, rec: FileRecord) -> None:
        """Queue on ``p`` the record and its places in the listing and the expiry index."""
        p.set(self.keys.file(rec.id), rec.model_dump_json())
        p.zadd(self.keys.files, {rec.id: rec.created_at})
        if rec.expires_at is not None:
            p.zadd(self.keys.files_expiry, {rec.id: rec.expires_at})
        else:
            p.zrem(self.keys.files_expiry, rec.id)

    async def put(self, rec: FileRecord, data: bytes | AsyncIterable[bytes]) -> FileRecord:
        """See :meth:`FileStore.put`.  The chunks are written first and the record last (a record names a whole
        file); a failure part way (Redis, the client gone, a short read) removes what was written."""
        if isinstance(data, bytes):
            rec = rec.model_copy(update={"bytes": len(data)})
        total = await self.r.incrby(self.keys.files_bytes, rec.bytes)
        if total > self.max_total:
            await self.r.decrby(self.keys.files_bytes, rec.bytes)
            raise StoreFull(f"the file store is at its limit of {self.max_total} bytes")
        cb, n, got = self.chunk_bytes, 0, 0
        try:
            buf = bytearray()
            async for piece in _pieces(data):
                got += len(piece)
                buf += piece
                while len(buf) >= cb:
                    await self.r.set(self.keys.file_chunk(rec.id, n), bytes(buf[:cb]))
                    del buf[:cb]
                    n += 1
            if buf or n == 0:  # the last, short chunk (an empty file is one empty chunk)
                await self.r.set(self.keys.file_chunk(rec.id, n), bytes(buf))
                n += 1
            if got != rec.bytes:
                raise ValueError(f"file {rec.id}: {got} bytes read, {rec.bytes} announced")
            rec = rec.model_copy(update={"chunks": n, "chunk_bytes": cb})
            async with self.r.pipeline(transaction=True) as p:
                self._index(p, rec)
                await p.execute()
        except BaseException:
            with contextlib.suppress(redis.RedisError, OSError):
                await self._discard(rec, n + 1)
            raise
        return rec

    async def _discard(self, rec: FileRecord, chunks: int) -> None:
        """Undo a :meth:`put` that failed part way: its bytes off the total, its chunks, and its record in case the
        last transaction went through unseen (a new id: nobody else's)."""
        k = self.keys
        async with self.r.pipeline(transaction=True) as p:
            p.decrby(k.files_bytes, rec.bytes)
            p.delete(k.file(rec.id))
            p.zrem(k.files, rec.id)
            p.zrem(k.files_expiry, rec.id)
            await p.execute()
        for start in range(0, chunks, 256):
            await self.r.delete(*(k.file_chunk(rec.id, i) for i in range(start, min(chunks, start + 256))))

    async def meta(self, file_id: str) -> FileRecord | None:
        raw = await self.r.get(self.keys.file(file_id))
        return None if raw is None else FileRecord.model_validate_json(raw)

    async def get(self, file_id: str) -> bytes | None:
        rec = await self.meta(file_id)
        if rec is None:
            return None
        parts: list[bytes] = []
        for start in range(0, rec.chunks, 16):
            got = await self.r.mget([self.keys.file_chunk(file_id, i)
                                     for i in range(start, min(rec.chunks, start + 16))])
            if any(g is None for g in got):
                return None  # deleted meanwhile
            parts += got
        return b"".join(parts)

    def append(self, p: Any, file_id: str, at: int, data: bytes) -> None:
        """APPENDs to the chunks that bytes ``at`` .. ``at + len(data)`` fall in, each chunk rewritten whole once
        full; the total counts them now (a batch's output is not refused at the cap half written)."""
        cb, pos, i = self.chunk_bytes, at, 0
        while i < len(data):
            n = min(cb - pos % cb, len(data) - i)
            key = self.keys.file_chunk(file_id, pos // cb)
            p.append(key, data[i:i + n])
            pos, i = pos + n, i + n
            if pos % cb == 0:  # a chunk filled up: give back the room Redis kept for it to grow (see seal)
                p.eval(_REWRITE, 1, key)
        if data:
            p.incrby(self.keys.files_bytes, len(data))

    async def seal(self, rec: FileRecord) -> FileRecord:
        """The record, after each chunk is rewritten whole in Redis: a value grown by APPEND keeps the spare room
        Redis gave it to grow into (up to as much again as its length), which a plain SET does not."""
        rec = rec.model_copy(update={"chunks": -(-rec.bytes // self.chunk_bytes), "chunk_bytes": self.chunk_bytes})
        for start in range(0, rec.chunks, 16):
            await self.r.eval(_REWRITE, min(rec.chunks, start + 16) - start,
                              *(self.keys.file_chunk(rec.id, i) for i in range(start, min(rec.chunks, start + 16))))
        async with self.r.pipeline(transaction=True) as p:
            self._index(p, rec)
            await p.execute()
        return rec

    async def read(self, file_id: str, start: int, size: int) -> bytes | None:
        rec = await self.meta(file_id)
        if rec is None:
            return None
        cb = rec.chunk_bytes or self.chunk_bytes
        end = min(rec.bytes, start + size)
        if start >= end:
            return b""
        first, last = start // cb, (end - 1) // cb
        got = await self.r.mget([self.keys.file_chunk(file_id, i) for i in range(first, last + 1)])
        if any(g is None for g in got):
            return None  # deleted meanwhile
        data = b"".join(got)
        return data[start - first * cb:end - first * cb]

    async def delete(self, file_id: str) -> bool:
        k = self.keys
        chunks = int(await self._delete(keys=[k.file(file_id), k.files, k.files_expiry, k.files_bytes,
                                              k.file_batches(file_id)], args=[file_id]))
        if chunks == -2:
            raise FileInUse(file_id)
        if chunks < 0:
            return False
        for start in range(0, chunks, 256):
            await self.r.delete(*(k.file_chunk(file_id, i) for i in range(start, min(chunks, start + 256))))
        return True

    async def postpone(self, file_id: str, at: float) -> None:
        await self.r.zadd(self.keys.files_expiry, {file_id: at}, xx=True)

    async def expired(self, now: float, limit: int) -> builtins.list[str]:
        ids = await self.r.zrangebyscore(self.keys.files_expiry, "-inf", now, start=0, num=limit)
        return [i.decode() for i in ids]

    async def list(self, limit: int, after: str | None = None) -> tuple[list[FileRecord], bool]:
        """Files, newest first, from the one after ``after``; and whether there are more."""
        start = 0
        if after is not None:
            rank = await self.r.zrevrank(self.keys.files, after)
            start = 0 if rank is None else rank + 1
        ids = await self.r.zrevrange(self.keys.files, start, start + limit)
        recs = []
        raws = await self.r.mget([self.keys.file(i.decode()) for i in ids[:limit]]) if ids else []
        for raw in raws:
            if raw is not None:
                recs.append(FileRecord.model_validate_json(raw))
        return recs, len(ids) > limit
