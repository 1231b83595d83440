"""Loaded at start by every Python process that has this directory on PYTHONPATH: with
`ALLOCSVC_BENCH_PART` set, it takes a part out of allocsvc's unary `Allocate` for
bench/load/unary_parts.py (a measurement, never a way to serve):

- `constant`: the Allocator's `Allocate` answers echo's pre-serialized response (no decision,
  no Rust call); the telemetry wrapper still goes around it.
- `bare`: `constant`, and no telemetry wrapper around any handler (as echo registers them).
- `untraced`: the real `Allocate`, with no telemetry wrapper.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

PART = os.environ.get("ALLOCSVC_BENCH_PART", "")
PARTS = ("constant", "bare", "untraced")

if PART:
    if PART not in PARTS:
        raise SystemExit(f"ALLOCSVC_BENCH_PART: one of {', '.join(PARTS)}, not {PART!r}")
    from allocsvc.api import allocator, telemetry

    if PART in ("constant", "bare"):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import echo  # bench/load/echo.py: the same answer as echo's

        ANSWER = echo.ALLOCATION.SerializeToString()

        async def allocate_constant(self: Any, request: bytes, context: Any) -> bytes:
            return ANSWER

        allocator.AllocatorServicer.AllocateBytes = allocate_constant  # type: ignore[method-assign]
    if PART in ("bare", "untraced"):

        def unwrapped(self: Any, method: str, handler: Any) -> Any:
            return handler

        telemetry.TelemetryInterceptor.wrap = unwrapped  # type: ignore[method-assign]
