"""OpenAI's Files and Batches APIs through the official ``openai`` client, on a real redis-server, real gateways
and sim workers: the whole lifecycle (every custom_id answered exactly once, the batch stream's backlog bounded by
the window), cancel, expiry, a file refused whole with per-line errors, the 4xx of bad input, and a feeder's
gateway and a worker killed mid-batch."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

from gpu_worker.engine.sim import expected_text
from ops.procs import wait_until
from tests.conftest import Stack

pytestmark = [pytest.mark.slow]
MODEL = "sim-model"
FINAL = ("completed", "failed", "expired", "cancelled")


def _line(i: int, max_tokens: int = 8, url: str = "/v1/chat/completions", **body: Any) -> str:
    return json.dumps({"custom_id": f"c{i}", "method": "POST", "url": url,
                       "body": {"model": MODEL, "max_tokens": max_tokens,
                                "messages": [{"role": "user", "content": f"line {i}"}], **body}})


def _upload(client: openai.OpenAI, lines: list[str]) -> str:
    f = client.files.create(file=("in.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    assert f.purpose == "batch" and f.bytes > 0
    return f.id


def _create(client: openai.OpenAI, file_id: str) -> str:
    b = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"job": "test"})
    assert b.status == "validating" and b.id.startswith("batch_") and b.metadata == {"job": "test"}
    return b.id


def _wait(client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...] = FINAL, timeout: float = 90) -> Any:
    got: list[Any] = []

    def done() -> bool:
        got[:] = [client.batches.retrieve(batch_id)]
        return got[0].status in statuses

    wait_until(done, timeout, f"batch {batch_id} in {statuses}", interval=0.1)
    return got[0]


def _jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines() if x.strip()]


def _answers(client: openai.OpenAI, b: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The output and error lines by custom_id; fails when a custom_id is in them twice."""
    out, err = _jsonl(client, b.output_file_id), _jsonl(client, b.error_file_id)
    ids = [x["custom_id"] for x in out + err]
    assert len(ids) == len(set(ids)), "a custom_id answered twice"
    return {x["custom_id"]: x for x in out}, {x["custom_id"]: x for x in err}


def test_a_batch_runs_to_completed_and_answers_every_custom_id_once(stack: Stack) -> None:
    stack.start_worker(model=MODEL, slots=4, sim_decode_ms=2)
    stack.start_gateway(batch_window=6, batch_poll_s=0.05)
    client = stack.openai()
    n = 40
    batch_id = _create(client, _upload(client, [_line(i) for i in range(n)]))
    stream, r = stack.keys.batch_stream(MODEL), stack.r
    peak = [0, 0]  # unanswered lines of the batch, entries on the stream (answered ones linger until read past)

    def finished() -> bool:
        peak[:] = [max(peak[0], r.hlen(stack.keys.batch_outstanding(batch_id))), max(peak[1], r.xlen(stream))]
        return client.batches.retrieve(batch_id).status in FINAL

    wait_until(finished, 90, "batch finished", interval=0.02)
    b = client.batches.retrieve(batch_id)
    assert b.status == "completed", b
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (n, n, 0)
    assert b.in_progress_at and b.finalizing_at and b.completed_at and b.error_file_id is None
    out, err = _answers(client, b)
    assert sorted(out) == sorted(f"c{i}" for i in range(n)) and not err
    for i in range(n):
        ln = out[f"c{i}"]
        assert ln["error"] is None and ln["response"]["status_code"] == 200
        assert ln["response"]["body"]["choices"][0]["message"]["content"] == expected_text(
            messages=[{"role": "user", "content": f"line {i}"}], max_tokens=8)
    assert r.xinfo_stream(stream)["entries-added"] == n  # each line submitted once
    assert 0 < peak[0] <= 6 and peak[1] <= 12  # the backlog stayed within the window
    # nothing of the batch's work is left in Redis but its record and files: no result, no working hash
    assert list(r.scan_iter(match=stack.keys.result(MODEL, f"{batch_id}-*"))) == []
    assert list(r.scan_iter(match=stack.keys.batch(batch_id) + ":*")) == []
    assert client.files.retrieve(b.output_file_id).purpose == "batch_output"
    with urllib.request.urlopen(stack.base_url + "/metrics", timeout=5) as resp:
        assert 'mgpu_gateway_batches_finished_total{status="completed"} 1.0' in resp.read().decode()
    assert batch_id in [x.id for x in client.batches.list(limit=5).data]
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch_id)


def test_batches_list_pages_with_after_and_has_more(stack: Stack) -> None:
    stack.start_worker(model=MODEL, slots=4, sim_decode_ms=1)
    stack.start_gateway()
    client = stack.openai()
    fid = _upload(client, [_line(0)])
    ids = [_create(client, fid) for _ in range(5)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    assert [b.id for b in page.iter_pages().__next__().data] == ids[::-1][:2]
    assert [b.id for b in client.batches.list(limit=2)] == ids[::-1]  # the client follows `after` to the end
    for bid in ids:
        assert _wait(client, bid).status == "completed"


def test_a_cancelled_batch_keeps_what_finished_and_lists_the_rest(stack: Stack) -> None:
    stack.start_worker(model=MODEL, slots=2, sim_decode_ms=20)
    stack.start_gateway(batch_window=4, batch_poll_s=0.05, batch_cancel_grace_s=5)
    client = stack.openai()
    n = 60
    batch_id = _create(client, _upload(client, [_line(i, max_tokens=16) for i in range(n)]))
    wait_until(lambda: client.batches.retrieve(batch_id).request_counts.completed >= 3, 60, "3 done", interval=0.1)
    assert client.batches.cancel(batch_id).status == "cancelling"
    b = _wait(client, batch_id)
    assert b.status == "cancelled" and b.cancelling_at and b.cancelled_at, b
    out, err = _answers(client, b)
    assert set(out) | set(err) == {f"c{i}" for i in range(n)}  # every custom_id once, answered or listed
    assert b.request_counts.total == n and b.request_counts.completed == len(out) >= 3 and len(out) < n
    assert b.request_counts.failed == 0
    assert all(x["error"]["code"] == "batch_cancelled" and x["response"] is None for x in err.values())
    assert stack.r.xinfo_stream(stack.keys.batch_stream(MODEL))["entries-added"] < n  # feeding stopped
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch_id)


def test_an_expired_batch_keeps_its_finished_results(stack: Stack) -> None:
    stack.start_worker(model=MODEL, slots=2, sim_decode_ms=20)
    stack.start_gateway(batch_window=4, batch_poll_s=0.05, batch_completion_window_s=4, batch_cancel_grace_s=1)
    client = stack.openai()
    n = 60
    batch_id = _create(client, _upload(client, [_line(i, max_tokens=16) for i in range(n)]))
    b = _wait(client, batch_id, timeout=60)
    assert b.status == "expired" and b.expired_at, b
    out, err = _answers(client, b)
    assert set(out) | set(err) == {f"c{i}" for i in range(n)}
    assert 0 < len(out) < n and b.request_counts.completed == len(out)
    assert all(x["response"]["status_code"] == 200 for x in out.values())
    assert all(x["error"]["code"] == "batch_expired" for x in err.values())


def test_an_invalid_file_fails_the_batch_with_one_error_per_line(stack: Stack) -> None:
    stack.start_worker(model=MODEL, slots=4, sim_decode_ms=1, max_model_len=256)
    stack.start_gateway(max_body_bytes=4096)
    client = stack.openai()
    lines = [_line(0), "{not json", _line(0), _line(3, url="/v1/completions"), _line(4, max_tokens=-1),
             _line(5, model="no-such-model"), _line(6, max_tokens=10_000), _line(7), _line(8, user="x" * 5000)]
    b = _wait(client, _create(client, _upload(client, lines)))
    assert b.status == "failed" and b.failed_at and b.output_file_id is None, b
    got = {e.line: e.code for e in b.errors.data}
    assert set(got) == {2, 3, 4, 5, 6, 7, 9}, b.errors
    assert "larger than 4096 bytes" in next(e.message for e in b.errors.data if e.line == 9)  # a body too large
    assert got[2] == "invalid_json_line" and got[3] == "duplicate_custom_id" and got[4] == "invalid_url"
    assert got[6] == "model_not_found"
    assert "max_tokens" in next(e.message for e in b.errors.data if e.line == 5)
    stream = stack.keys.batch_stream(MODEL)
    assert not stack.r.exists(stream) or stack.r.xinfo_stream(stream)["entries-added"] == 0  # nothing submitted


def test_validation_reads_the_file_in_blocks_and_names_lines_across_them(stack: Stack) -> None:
    stack.start_worker(model=MODEL, slots=64, sim_decode_ms=1, sim_decode_ms_per_seq=0)
    stack.start_gateway(batch_window=512, batch_poll_s=0.05)
    client = stack.openai()
    pad = "p" * 200
    lines = [_line(i, user=pad).encode() for i in range(6000)]  # ~1.6 MB: the check reads 1 MiB blocks
    lines[2999] = b"   "  # line 3000: blank, skipped but counted
    lines[4499] = b"\xff\xfe not text"  # line 4500
    lines[5999] = _line(0).encode()  # line 6000: custom_id c0 again, 1.6 MB after the first
    data = b"\n".join(lines) + b"\n"
    assert len(data) > 1 << 20
    f = client.files.create(file=("big.jsonl", data), purpose="batch")
    b = _wait(client, _create(client, f.id))
    assert b.status == "failed", b
    assert {(e.line, e.code) for e in b.errors.data} == {(4500, "invalid_file"), (6000, "duplicate_custom_id")}
    good = b"\r\n".join(_line(i, user=pad).encode() for i in range(6000))  # CRLF, no final newline
    b = _wait(client, _create(client, client.files.create(file=("ok.jsonl", good), purpose="batch").id))
    assert b.status == "completed" and b.request_counts.total == 6000, b


def test_bad_input_gets_openai_errors(stack: Stack) -> None:
    stack.start_worker(model=MODEL, slots=4, sim_decode_ms=1)
    stack.start_gateway(file_max_lines=5, file_max_bytes=4096)
    client = stack.openai()
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-nope")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", _line(0).encode()), purpose="fine-tune")
    for policy, param in (({"anchor": "last_active_at", "seconds": 3600}, "expires_after.anchor"),
                          ({"anchor": "created_at", "seconds": 3599}, "expires_after.seconds"),
                          ({"anchor": "created_at", "seconds": 2592001}, "expires_after.seconds")):
        with pytest.raises(openai.BadRequestError) as bad_expiry:
            client.files.create(file=("x.jsonl", _line(0).encode()), purpose="batch", expires_after=policy)  # type: ignore[arg-type]
        assert bad_expiry.value.body["param"] == param  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="at most 5"):
        client.files.create(file=("x.jsonl", "\n".join(_line(i) for i in range(6)).encode()), purpose="batch")
    with pytest.raises(openai.APIStatusError) as big:
        client.files.create(file=("x.jsonl", b"x" * 5000), purpose="batch")
    assert big.value.status_code == 413
    fid = _upload(client, [_line(0)])
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="1h")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=fid, endpoint="/v1/images", completion_window="24h")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="output_format") as unknown:  # not dropped silently
        client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h",
                              extra_body={"output_format": "jsonl"})
    assert unknown.value.body["param"] == "output_format"  # type: ignore[index]
    for policy, param in (({"anchor": "created_at", "seconds": 60}, "output_expires_after.seconds"),
                          ({"anchor": "created_at", "seconds": "3600"}, "output_expires_after.seconds"),
                          ({"seconds": 3600}, "output_expires_after.anchor"),
                          ({"anchor": "created_at", "seconds": 3600, "x": 1}, "output_expires_after")):
        with pytest.raises(openai.BadRequestError) as bad_expiry:
            client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h",
                                  output_expires_after=policy)  # type: ignore[arg-type]
        assert bad_expiry.value.body["param"] == param  # type: ignore[index]
    assert client.files.content(fid).text.strip() == _line(0)
    assert fid in [f.id for f in client.files.list()]
    for path in ("/v1/files?limit=x", "/v1/batches?limit=0"):
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(stack.base_url + path, timeout=5)
        assert bad.value.code == 400 and json.loads(bad.value.read())["error"]["param"] == "limit"
    assert client.files.delete(fid).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.content(fid)


def test_files_expire_and_a_running_batch_keeps_its_input_until_it_ends(stack: Stack) -> None:
    stack.start_worker(model=MODEL, slots=2, sim_decode_ms=20)
    stack.start_gateway(batch_window=4, batch_poll_s=0.05, file_expiry_min_s=1, file_sweep_interval_s=0.2)
    client, r, k = stack.openai(), stack.r, stack.keys
    plain = client.files.create(file=("p.jsonl", _line(0).encode()), purpose="batch")
    assert plain.expires_at == plain.created_at + 30 * 24 * 3600  # OpenAI's default for a batch file
    short = client.files.create(file=("s.jsonl", _line(0).encode()), purpose="batch",
                                expires_after={"anchor": "created_at", "seconds": 1})
    assert short.expires_at == short.created_at + 1
    n = 30  # 15 rounds of 2 slots x 16 steps x 20 ms: the batch runs ~5 s, past its input's expiry
    f = client.files.create(file=("in.jsonl", ("\n".join(_line(i, max_tokens=16) for i in range(n)) + "\n").encode()),
                            purpose="batch", expires_after={"anchor": "created_at", "seconds": 2})
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              output_expires_after={"anchor": "created_at", "seconds": 3})
    with pytest.raises(openai.ConflictError, match="has not finished"):  # its feeder still reads it
        client.files.delete(f.id)

    def gone(fid: str) -> bool:
        try:
            client.files.retrieve(fid)
        except openai.NotFoundError:
            return True
        return False

    wait_until(lambda: gone(short.id), 10, "the 1 s file hidden")
    wait_until(lambda: not r.exists(k.file(short.id)), 10, "the 1 s file swept")
    assert short.id not in [x.id for x in client.files.list()] and plain.id in [x.id for x in client.files.list()]
    with pytest.raises(openai.NotFoundError):
        client.files.content(short.id)
    wait_until(lambda: gone(f.id), 10, "the input hidden at its expiry")
    with pytest.raises(openai.NotFoundError):  # a new batch cannot use an expired file
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert client.batches.retrieve(b.id).status not in FINAL and r.exists(k.file(f.id))  # kept: the batch runs
    b = _wait(client, b.id)
    assert b.status == "completed" and b.completed_at > f.expires_at, b  # the feeder read its input past expiry
    out, err = _answers(client, b)
    assert sorted(out) == sorted(f"c{i}" for i in range(n)) and not err
    output = client.files.retrieve(b.output_file_id)
    assert output.expires_at == output.created_at + 3 and output.created_at >= b.finalizing_at
    wait_until(lambda: not r.exists(k.file(f.id)), 10, "the input swept once its batch ended")
    wait_until(lambda: not r.exists(k.file(b.output_file_id)), 10, "the output swept at its expiry")
    assert gone(b.output_file_id) and not gone(plain.id)
    assert int(r.get(k.files_bytes)) == plain.bytes  # every expired file's bytes are off the store's total
    with urllib.request.urlopen(stack.base_url + "/metrics", timeout=5) as resp:
        assert "mgpu_gateway_files_expired_total 3.0" in resp.read().decode()


def test_a_feeders_gateway_and_a_worker_killed_mid_batch_answer_every_custom_id_once(stack: Stack) -> None:
    w1 = stack.start_worker(model=MODEL, slots=3, sim_decode_ms=10, lease_ms=1500)
    stack.start_worker(model=MODEL, slots=3, sim_decode_ms=10, lease_ms=1500)
    common = {"batch_window": 8, "batch_poll_s": 0.05, "batch_lease_ms": 1000}
    gws = {"gw-a": stack.start_gateway(gateway_id="gw-a", **common),
           "gw-b": stack.start_gateway(gateway_id="gw-b", **common)}
    n = 80
    client = stack.openai()
    batch_id = _create(client, _upload(client, [_line(i, max_tokens=12) for i in range(n)]))
    wait_until(lambda: client.batches.retrieve(batch_id).request_counts.completed >= 10, 60, "10 done", interval=0.05)
    holder = stack.r.get(stack.keys.batch_lease(batch_id))
    assert holder is not None
    first = holder.decode().split(":")[0]
    gws[first].proc.send_signal(signal.SIGKILL)
    w1.proc.send_signal(signal.SIGKILL)
    other = next(p for g, p in gws.items() if g != first)
    survivor = openai.OpenAI(base_url=f"http://127.0.0.1:{other.port}/v1", api_key="unused", max_retries=0)
    killed = time.monotonic()

    def taken_over() -> bool:
        v = stack.r.get(stack.keys.batch_lease(batch_id))
        return (v is not None and not v.decode().startswith(first + ":")) or \
            survivor.batches.retrieve(batch_id).status in FINAL

    wait_until(taken_over, 20, "the lease taken over")
    assert time.monotonic() - killed < 20
    b = _wait(survivor, batch_id, timeout=120)
    assert b.status == "completed", b
    out, err = _answers(survivor, b)
    assert sorted(out) == sorted(f"c{i}" for i in range(n)) and not err
    assert b.request_counts.completed == n and b.request_counts.failed == 0
    assert stack.r.xinfo_stream(stack.keys.batch_stream(MODEL))["entries-added"] == n  # no line submitted twice


def test_the_feeder_reads_lines_again_by_offset_across_blocks_blank_lines_and_crlf(stack: Stack) -> None:
    """The feeder keeps no copy of the lines: it reads each window again from the input file, from the byte
    offset where the last one ended (1 KiB chunks here, so lines straddle chunks), skipping blank lines as the
    validation did; CRLF line ends and a U+2028 inside a string (a line separator to str.splitlines, not to
    JSONL) are one line each."""
    stack.start_worker(model=MODEL, slots=4, sim_decode_ms=1)
    stack.start_gateway(batch_window=3, file_chunk_bytes=1024)
    client = stack.openai()
    lines = [_line(i) for i in range(25)]
    lines[7] = json.dumps({"custom_id": "c7", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "line\u2028seven"}]}},
        ensure_ascii=False)
    text = "\r\n".join(lines[:10]) + "\r\n\r\n   \n" + "\n".join(lines[10:]) + "\n\n"
    f = client.files.create(file=("in.jsonl", text.encode()), purpose="batch")
    b = _wait(client, _create(client, f.id))
    assert b.status == "completed" and (b.request_counts.completed, b.request_counts.total) == (25, 25)
    out = {ln["custom_id"]: ln for ln in _jsonl(client, b.output_file_id)}
    assert sorted(out) == sorted(f"c{i}" for i in range(25))
    assert out["c7"]["response"]["body"]["choices"][0]["message"]["content"] == expected_text(
        messages=[{"role": "user", "content": "line\u2028seven"}], max_tokens=8)
    assert list(stack.r.scan_iter(match=stack.keys.batch(b.id) + ":*")) == []
