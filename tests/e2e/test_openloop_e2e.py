"""bench/load/openloop, the open-loop load generator of the fixed-rate runs (issue 10).

It must keep its schedule whatever the server does, and time every call from when it was due:
against a server whose event loop stops for 300 ms, the calls due in those 300 ms are all late
(coordinated omission would hide them), and it still sends every call on time.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
OPENLOOP = ROOT / "bench" / "load" / "openloop"
METHOD = "/allocsvc.v1.Allocator/Allocate"
REQUEST = b"\x0a\x04load\x12\x04user"  # any bytes: the server below does not parse them
ANSWER = b"\x0a\x07answer!"  # 9 bytes

# A gRPC server (grpc.aio) answering METHOD with ANSWER; the call numbered STALL_AT blocks the
# event loop for STALL_S first; with AGE_MS, each connection is aged out after that long
# (GOAWAY). It prints its port once serving.
SERVER = """
import asyncio, sys, time
import grpc

STALL_AT, STALL_S, AGE_MS = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
calls = 0

async def allocate(request: bytes, context: object) -> bytes:
    global calls
    calls += 1
    if calls == STALL_AT:
        time.sleep(STALL_S)  # the whole loop stops, as a long synchronous step would stop it
    return ANSWER

async def main() -> None:
    options = [("grpc.max_connection_age_ms", AGE_MS)] if AGE_MS else []
    server = grpc.aio.server(options=options)
    handler = grpc.unary_unary_rpc_method_handler(allocate)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("allocsvc.v1.Allocator", {"Allocate": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()

ANSWER = %r
asyncio.run(main())
"""


@pytest.fixture(scope="module")
def openloop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = shutil.which("go")
    if go is None:
        pytest.skip("go is not installed (bench/load/openloop is Go)")
    binary = tmp_path_factory.mktemp("openloop") / "openloop"
    subprocess.run([go, "build", "-o", str(binary), "."], cwd=OPENLOOP, check=True, timeout=600)
    return binary


def _server(stall_at: int, stall_s: float, age_ms: int = 0) -> Iterator[int]:
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER % ANSWER, str(stall_at), str(stall_s), str(age_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        yield int(process.stdout.readline())
    finally:
        process.terminate()
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture
def stalling_server() -> Iterator[int]:
    """Its 600th call stops the loop for 300 ms: 1 s into the measured window below."""
    yield from _server(600, 0.3)


@pytest.fixture
def aging_server() -> Iterator[int]:
    """No stall; every connection is sent GOAWAY after 300 ms (gRPC's max connection age)."""
    yield from _server(0, 0.0, age_ms=300)


def _drive(openloop: Path, port: int, tmp_path: Path, *extra: str) -> dict[str, object]:
    body = tmp_path / "request.bin"
    body.write_bytes(REQUEST)
    command = [str(openloop), "-target", f"127.0.0.1:{port}", "-method", METHOD]
    command += ["-body", str(body), "-rate", "400", "-conns", "2"]
    command += ["-warmup", "0.5s", "-duration", "3s", *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    result: dict[str, object] = json.loads(done.stdout)
    return result


def _every_call_answered(result: dict[str, object]) -> None:
    """`_drive`'s 1,200 calls were all sent and answered OK with ANSWER."""
    assert result["sent"] == 1200
    assert result["codes"] == {"OK": 1200}
    assert result["response_sizes"] == {str(len(ANSWER)): 1200}


def test_every_call_due_in_the_window_is_sent_and_answered(
    openloop: Path, stalling_server: int, tmp_path: Path
) -> None:
    # 400/s for 3 s, whatever the stall did to the answers.
    _every_call_answered(_drive(openloop, stalling_server, tmp_path))


def test_latency_runs_from_the_due_time(
    openloop: Path, stalling_server: int, tmp_path: Path
) -> None:
    series = tmp_path / "series.tsv"
    result = _drive(openloop, stalling_server, tmp_path, "-series", str(series))
    # 300 ms without answers at 400/s: ~120 calls were due meanwhile, and each waited for the
    # rest of the stall. Timed from their send by a closed-loop client, only the few calls in
    # flight would have been slow; from their due time, at least the calls due in the first
    # 200 ms of the stall waited 100 ms or more: over 6% of the 1,200.
    assert float(str(result["p95_ms"])) >= 100
    assert float(str(result["max_ms"])) >= 250
    # The generator itself kept its schedule: the calls the stall caught went out while the
    # server was not answering, so most of their latency was spent in flight, not waiting to
    # be sent. A generator held back by the server (a closed loop, or one waiting for flow
    # control credit) would send them only once the server answered again: their latency
    # would be nearly all send lag. Judged call by call rather than by the run's lag
    # percentiles, so that this machine pausing every process at once (its neighbours' steal)
    # does not pass for the generator waiting on the server.
    caught = []
    for line in series.read_text().splitlines():
        _due_ns, latency_ns, code, lag_ns = line.split("\t")
        if code == "OK" and int(latency_ns) >= 100_000_000:
            caught.append(int(lag_ns) / int(latency_ns))
    assert len(caught) >= 60
    assert statistics.median(caught) < 0.25


def test_a_connection_the_server_ages_out_is_replaced_and_no_call_is_lost(
    openloop: Path, aging_server: int, tmp_path: Path
) -> None:
    # 3.5 s on 2 connections aged every ~300 ms: about 20 GOAWAYs. The calls in flight on an
    # aged connection are answered on it, the next ones go to a new connection.
    result = _drive(openloop, aging_server, tmp_path)
    _every_call_answered(result)
    assert int(str(result["reconnects"])) >= 4
