"""``mgpu batch submit FILE.jsonl --model M``: an OpenAI batch file (lines of ``custom_id``, ``method``,
``url``, ``body``) run on the fleet through the model's batch stream (:mod:`common.producer`), so it fills the
slots interactive work leaves free.  A progress line on stderr; the output JSONL has one line per
``custom_id`` in OpenAI's batch output shape.  The file is checked whole first (a bad line refuses the file,
exit 2).  Exit 0 when every request succeeded, 1 when any failed, 130 when interrupted.

Resuming: the output file is written as results arrive, and ``OUTPUT.submitted`` records the requests
already sent; run the same command again after Ctrl+C (or a crash) and it sends only what was never sent and
waits for the rest.  Ctrl+C takes effect between two sends; a crash between a send and its record makes the
resumed run send those requests again (repeated work; the output still has one line per custom_id, the
first result stored wins).  Request ids derive from the file's content, so a resumed run finds the results of the
first one.  At most ``--window`` requests are sent and unanswered at once: the batch stream's backlog stays
bounded whatever the file's size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from common.producer import BatchLine, Producer, output_line, parse_batch_lines
from common.redis_conn import sync_client
from common.schemas import WorkItem
from common.settings import ControlSettings


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="batch_cmd", required=True)
    s = sub.add_parser("submit", help="run an OpenAI batch JSONL file on the batch stream; write the output JSONL")
    s.add_argument("file", type=Path)
    s.add_argument("--model", required=True, help="the model every line runs on (it replaces body.model)")
    s.add_argument("--output", type=Path, default=None, help="default: FILE with .output.jsonl")
    s.add_argument("--window", type=int, default=1000, help="the most requests sent and unanswered at once")
    s.add_argument("--poll", type=float, default=0.2, help="seconds between result reads")


def _ids(lines: list[BatchLine], digest: str) -> list[str]:
    return [f"batch-{digest}-{i}" for i in range(len(lines))]


def _read_done(out: Path) -> set[str]:
    """custom_ids already in the output file (a resumed run keeps them)."""
    if not out.exists():
        return set()
    done = set()
    for raw in out.read_text().splitlines():
        try:
            done.add(json.loads(raw)["custom_id"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash: its request is read again
    return done


class _Progress:
    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.stream, self.last = total, stream, 0.0
        self.tty = stream.isatty()

    def show(self, done: int, failed: int, sent: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        width = 30
        bar = "#" * (width * done // max(1, self.total))
        line = f"[{bar:<{width}}] {done}/{self.total} done, {failed} failed, {sent - done} running or waiting"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if final and self.tty:
            self.stream.write("\n")
        self.stream.flush()


def submit(s: ControlSettings, ns: argparse.Namespace) -> int:
    text = ns.file.read_text()
    lines, errors = parse_batch_lines(text.splitlines())
    if errors:
        for e in errors[:50]:
            print(f"{ns.file}: {e}", file=sys.stderr)
        print(f"{ns.file}: {len(errors)} invalid line(s); nothing was submitted", file=sys.stderr)
        return 2
    out = ns.output or ns.file.with_suffix(".output.jsonl")
    sent_file = out.with_name(out.name + ".submitted")
    digest = hashlib.sha256((ns.model + "\n" + text).encode()).hexdigest()[:16]
    ids = _ids(lines, digest)
    done = _read_done(out)
    sent = set(sent_file.read_text().split()) if sent_file.exists() else set()
    producer = Producer(sync_client(s.redis_dsn, socket_timeout=10, socket_connect_timeout=2), s.keys, ns.model)
    todo = [(rid, ln) for rid, ln in zip(ids, lines, strict=True) if ln.custom_id not in done]
    waiting: dict[str, BatchLine] = {rid: ln for rid, ln in todo if rid in sent}  # sent by an earlier run
    unsent = [(rid, ln) for rid, ln in todo if rid not in sent]
    failed = 0
    progress = _Progress(len(lines), sys.stderr)
    stop: list[int] = []  # Ctrl+C: leave at the next safe point, never between a send and its record
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: stop.append(signum))
    try:
        with out.open("a") as o, sent_file.open("a") as sf:
            while (unsent or waiting) and not stop:
                room = ns.window - len(waiting)
                if room > 0 and unsent:
                    batch, unsent = unsent[:room], unsent[room:]
                    producer.submit([_item(rid, ln, ns.model) for rid, ln in batch])
                    sf.write("".join(rid + "\n" for rid, _ in batch))
                    sf.flush()
                    waiting.update(batch)
                finished = {rid: r for rid, r in producer.results(list(waiting)).items() if r is not None}
                for rid, res in finished.items():
                    ln = waiting.pop(rid)
                    o.write(json.dumps(output_line(ln.custom_id, rid, res)) + "\n")
                    failed += res.error is not None or res.status != 200
                    done.add(ln.custom_id)
                o.flush()
                progress.show(len(done), failed, len(done) + len(waiting))
                if not finished and waiting:
                    time.sleep(ns.poll)
    finally:
        signal.signal(signal.SIGINT, previous)
    if stop:
        progress.show(len(done), failed, len(done) + len(waiting), final=True)
        print(f"interrupted: {len(done)} of {len(lines)} done; run the same command again to resume", file=sys.stderr)
        return 130
    progress.show(len(done), failed, len(done), final=True)
    failed_all = _failed_in(out)
    print(f"{len(lines)} requests, {failed_all} failed; output: {out}", file=sys.stderr)
    return 1 if failed_all else 0


def _failed_in(out: Path) -> int:
    n = 0
    for raw in out.read_text().splitlines():
        try:
            n += json.loads(raw)["response"]["status_code"] != 200
        except (ValueError, KeyError, TypeError):
            continue
    return n


def _item(rid: str, ln: BatchLine, model: str) -> WorkItem:
    body: dict[str, Any] = {**ln.body, "model": model}
    n = body.get("n")
    return WorkItem(id=rid, kind=ln.kind, model=model, body=body, n=n if isinstance(n, int) and n > 0 else 1)


def run(s: ControlSettings, ns: argparse.Namespace) -> int:
    if ns.batch_cmd == "submit":
        return submit(s, ns)
    return 2
