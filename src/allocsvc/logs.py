"""Structured JSON logs on stderr."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import logging
import secrets
import sys
import time
import weakref
from contextvars import ContextVar
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}
# Id of the RPC being served (set by the server's telemetry); every log line carries it. The
# client's id as it sent it, or the number of a fresh one: formatted (`current_request_id`)
# only when a log line or a trailer needs it, which most successful calls never do.
request_id: ContextVar[str | int | None] = ContextVar("request_id", default=None)
# An RPC whose fresh number nothing has asked for yet. gRPC's serving tasks hold it
# (allocsvc.api.telemetry.start_serving), so each call's task starts with it at no cost; setting
# a number in every call's context cost a unary call about 3k instructions (bench/RESULTS.md,
# item 58), and most calls never need one.
UNNAMED = 0
# The metadata key of request ids, in both directions.
REQUEST_ID_KEY = "x-request-id"
# Fresh request ids: a random per-process prefix and a counter from 1 (unique, cheap per call).
_ID_PREFIX = secrets.token_hex(4)
REQUEST_NUMBERS = itertools.count(1)
# The numbers drawn for UNNAMED calls, by their task, not set in their context: were a line
# logged in gRPC's serving task (which holds UNNAMED for the calls it starts) given a number
# there, every call it started after would carry that number.
_DRAWN: weakref.WeakKeyDictionary[asyncio.Task[Any], int] = weakref.WeakKeyDictionary()


def drawn_number() -> int:
    """The fresh number of the UNNAMED RPC running here: drawn the first time it is asked
    for, the same one after (for its task; outside any task, in the current context)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop in this thread
        task = None
    if task is None:
        number = next(REQUEST_NUMBERS)
        request_id.set(number)
        return number
    drawn = _DRAWN.get(task)
    if drawn is None:
        drawn = _DRAWN[task] = next(REQUEST_NUMBERS)
    return drawn


def current_request_id() -> str | None:
    """The current RPC's request id (None outside an RPC)."""
    rid = request_id.get()
    if rid == UNNAMED:
        rid = drawn_number()
    return f"{_ID_PREFIX}-{rid:x}" if isinstance(rid, int) else rid


def request_id_trailer() -> tuple[tuple[str, str], ...]:
    """Trailing metadata naming the current RPC's request id (none outside an RPC): what a
    failing call answers with, so that its client can find the server's log lines."""
    rid = current_request_id()
    return () if rid is None else ((REQUEST_ID_KEY, rid),)


_pseudonym_key = secrets.token_bytes(32)


def set_pseudonym_key(key: bytes) -> None:
    """Key of the HMAC behind `pseudonym` (from settings; random per process otherwise)."""
    global _pseudonym_key
    _pseudonym_key = key


def pseudonym(user_id: str) -> str:
    """How a user id appears in logs: a keyed hash (HMAC-SHA256), so that without the key
    a dictionary of likely ids cannot be hashed to reverse it."""
    return hmac.new(_pseudonym_key, user_id.encode(), hashlib.sha256).hexdigest()[:24]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = current_request_id()
        if rid is not None:
            entry["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pgserver narrates every command it runs at INFO.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
