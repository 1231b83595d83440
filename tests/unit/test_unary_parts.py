"""bench/load/unary_parts.py takes a part out of allocsvc's unary Allocate in the servers it
starts (through its sitecustomize), and takes its medians over the calm runs only (its rounds'
order is h2.py's `rotated`, tested with h2.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from bench_support import LOAD, load_bench

SITE = LOAD / "unary_parts_site"

pytestmark = pytest.mark.unit


def _row(setup: str, loop_us: float, contended: bool = False) -> dict[str, object]:
    return {"setup": setup, "loop_us": loop_us, "contended": contended}


def test_medians_leave_out_contended_runs_unless_a_setup_has_no_other() -> None:
    parts = load_bench("bench_load_unary_parts", "unary_parts.py")
    rows = [
        _row("echo", 100),
        _row("echo", 900, contended=True),
        _row("echo", 110),
        _row("bare", 300, contended=True),
        _row("bare", 500, contended=True),
    ]
    assert parts.medians(rows, "loop_us") == {"echo": 105, "bare": 400}


def _in_a_server_process(part: str, code: str) -> subprocess.CompletedProcess[str]:
    """`code` run by a Python started as the bench starts servers: the site on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(SITE), "ALLOCSVC_BENCH_PART": part}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


PROBE = """
import asyncio
import grpc
from allocsvc.api.allocator import AllocatorServicer
from allocsvc.api.telemetry import TelemetryInterceptor

handler = grpc.unary_unary_rpc_method_handler(AllocatorServicer.AllocateBytes)
wrapped = TelemetryInterceptor(None).wrap("/allocsvc.v1.Allocator/Allocate", handler)
replaced = AllocatorServicer.AllocateBytes.__module__ == "sitecustomize"
answer = asyncio.run(AllocatorServicer.AllocateBytes(None, b"", None)) if replaced else b""
print(wrapped is handler, replaced, answer.hex() or "-")
"""


def _probe(part: str) -> tuple[bool, bool, bytes]:
    """In a server-like process with `part` taken out: whether telemetry leaves handlers
    unwrapped, whether Allocate answers a constant, and that constant."""
    done = _in_a_server_process(part, PROBE)
    assert done.returncode == 0, done.stderr
    unwrapped, replaced, answer = done.stdout.split()
    return unwrapped == "True", replaced == "True", b"" if answer == "-" else bytes.fromhex(answer)


@pytest.mark.parametrize(
    ("part", "unwrapped", "constant"),
    [
        ("", False, False),
        ("constant", False, True),
        ("bare", True, True),
        ("untraced", True, False),
    ],
)
def test_the_site_takes_out_the_part_it_names(part: str, unwrapped: bool, constant: bool) -> None:
    echo = load_bench("bench_load_echo", "echo.py")
    got = _probe(part)
    assert got[:2] == (unwrapped, constant)
    if constant:
        assert got[2] == echo.ALLOCATION.SerializeToString()


def test_an_unknown_part_is_refused() -> None:
    refused = _in_a_server_process("fast", "pass")
    assert refused.returncode != 0
    assert "ALLOCSVC_BENCH_PART" in refused.stderr
