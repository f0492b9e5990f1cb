"""Logging set-up: plain or JSON lines; ``extra={...}`` fields (request_id, worker, ...) are kept.

The request being served is carried in a context variable: :func:`set_request_id` in the task
that handles a request (gateway handler, worker job) and every line logged from that task, or
from tasks it starts, carries ``request_id`` without passing it around.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time

_STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("mgpu_request_id", default=None)


def set_request_id(request_id: str | None) -> None:
    """The request the current task serves; log lines from this task carry it as ``request_id``."""
    _request_id.set(request_id)


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` from the context to records that do not name one already."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            rid = _request_id.get()
            if rid is not None:
                record.request_id = rid
        return True


MAX_VALUE_CHARS = 256  # an untrusted value (a model name, a header) is cut to this in a log line
_SAFE = re.compile(r"^[\w.:/@+\-]*$")  # logfmt values that need no quotes
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _cap(v: str) -> str:
    return v if len(v) <= MAX_VALUE_CHARS else v[:MAX_VALUE_CHARS] + f"...(+{len(v) - MAX_VALUE_CHARS})"


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_text(text: str) -> str:
    """A message on one line: control characters (newlines, NUL, ANSI escapes) escaped."""
    return _CONTROL.sub(lambda m: _ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def logfmt_value(v: object) -> str:
    """A ``key=value`` value that cannot forge another pair or another line: quoted (JSON string
    escapes) unless it is plain, and capped."""
    text = _cap(v if isinstance(v, str) else str(v))
    return text if text and _SAFE.match(text) else json.dumps(text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line (escaping is JSON's); untrusted values are capped."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(time.time(), 3), "level": record.levelname, "logger": record.name,
               "msg": _cap(record.getMessage()) if record.args else record.getMessage()}
        out.update({k: _cap(v) if isinstance(v, str) else v for k, v in record.__dict__.items() if k not in _STD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class PlainFormatter(logging.Formatter):
    """``time level name: message  key=value ...`` on one line whatever the values hold."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape_text(record.getMessage())  # what Formatter.format sets, escaped
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)  # a traceback is ours, not the client's
        extra = {k: v for k, v in record.__dict__.items() if k not in _STD}
        return line + ("  " + " ".join(f"{k}={logfmt_value(v)}" for k, v in extra.items()) if extra else "")


def setup_logging(level: str = "INFO", json_lines: bool = False, name: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(PlainFormatter(f"%(asctime)s %(levelname)s {name}%(name)s: %(message)s"))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
