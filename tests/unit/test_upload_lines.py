"""The upload's line count, fed the file in pieces, agrees with the feeder's split of the whole file."""

from __future__ import annotations

import random

from gateway.files_api import NonBlankLines


def _whole(data: bytes) -> int:
    return sum(1 for ln in data.split(b"\n") if ln.strip())


def test_the_count_does_not_depend_on_where_the_pieces_are_cut() -> None:
    rng = random.Random(7)
    alphabet = [b"a", b" ", b"\t", b"\r", b"\n", b"\n", b"{}", b"\x0b"]
    for _ in range(300):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        counter, at = NonBlankLines(), 0
        while at < len(data):
            n = rng.randrange(1, 8)
            counter.feed(data[at:at + n])
            at += n
        assert counter.count == _whole(data), data
    one = NonBlankLines()
    one.feed(b"x\r\n\r\n  \ny")
    assert one.count == 2
