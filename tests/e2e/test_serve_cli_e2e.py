"""`allocsvc serve --workers N` and `allocsvc migrate` as an operator runs them."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from e2e_support import wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _free_port_pair() -> int:
    """A port whose next one up is free too (two workers' metrics)."""
    for _ in range(50):
        port = _free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two free ports in a row")


def _log_lines(path: Path) -> list[dict[str, object]]:
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


@contextlib.contextmanager
def _killed_at_exit(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """`proc`, killed at the end of the block if it still runs (the test failed)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _stop_cleanly(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM: the server drains, stops and exits 0."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def _start_two_workers(
    log: Path, port: int, *extra: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], list[dict[str, object]]]:
    """`allocsvc serve --in-memory --workers 2` on `port`, once both workers log "serving"
    (their log lines returned)."""
    with log.open("w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "allocsvc",
                "serve",
                "--in-memory",
                "--workers",
                "2",
                "--port",
                str(port),
                *extra,
            ],
            stderr=err,
            env={**os.environ, **(env or {})},
        )
    deadline = time.monotonic() + 60
    serving: list[dict[str, object]] = []
    while time.monotonic() < deadline and len(serving) < 2:
        if proc.poll() is not None:
            break
        serving = [e for e in _log_lines(log) if e.get("msg") == "serving"]
        time.sleep(0.2)
    if len(serving) < 2:
        proc.kill()
        proc.wait()
        raise AssertionError(log.read_text())
    return proc, serving


def test_workers_share_the_port_and_stop_on_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    log = tmp_path / "serve.log"
    proc, serving = _start_two_workers(log, port)
    with _killed_at_exit(proc):
        assert {e["port"] for e in serving} == {port}
        assert len({e["pid"] for e in serving}) == 2
        for _ in range(4):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
        _stop_cleanly(proc)
        assert sum(e.get("msg") == "stopped" for e in _log_lines(log)) == 2


def _start_two_counting_workers(
    tmp_path: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], int, int]:
    """Two workers with metrics (on the port returned and the one after it)."""
    port, metrics_port = _free_port(), _free_port_pair()
    proc, _ = _start_two_workers(
        tmp_path / "serve.log", port, "--metrics-port", str(metrics_port), env=env
    )
    return proc, port, metrics_port


def _rpcs_by_worker(metrics_port: int, method: str) -> list[float]:
    """Each of two workers' `allocsvc_rpcs_total` of `method`."""
    return [
        sum(
            value
            for (name, labels), value in _scrape(
                f"http://127.0.0.1:{metrics_port + i}/metrics"
            ).items()
            if name == "allocsvc_rpcs_total" and ("method", method) in labels
        )
        for i in range(2)
    ]


def _rpcs_counted(metrics_port: int, method: str, calls: int) -> list[float]:
    """`_rpcs_by_worker`, once the workers' counts add up to `calls` (a bounded wait): a call's
    status reaches the client before the server's telemetry wrapper has counted it."""
    wait_for(
        f"{calls} {method} calls counted",
        lambda: sum(_rpcs_by_worker(metrics_port, method)) >= calls,
        timeout=30,
    )
    return _rpcs_by_worker(metrics_port, method)


@pytest.mark.parametrize("age", ["0.25", "0"])
def test_aged_connections_are_drawn_again_over_the_workers(tmp_path: Path, age: str) -> None:
    """The kernel gives a connection to one worker for its life; with `max_connection_age`
    the server asks the client to reconnect (GOAWAY), and the new connection is drawn again.
    One channel calling for 5 s: with 0.25 s it reconnects about 18 times and reaches both
    workers (each draw lands on either with even odds: all on one, 2 in 2^17); with 0 (never)
    its one connection stays on one worker. No call fails either way."""
    from allocsvc._proto import allocsvc_pb2 as pb
    from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc

    proc, port, metrics_port = _start_two_counting_workers(
        tmp_path, {"ALLOCSVC_MAX_CONNECTION_AGE": age}
    )
    with _killed_at_exit(proc):
        calls = 0
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            allocator = pb_grpc.AllocatorStub(channel)  # type: ignore[no-untyped-call]
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                # An experiment no worker has: NOT_FOUND, counted by the worker that answers.
                with pytest.raises(grpc.RpcError) as raised:
                    allocator.Allocate(
                        pb.AllocateRequest(experiment_id="none", user_id="u"), timeout=10
                    )
                assert raised.value.code() == grpc.StatusCode.NOT_FOUND
                calls += 1
                time.sleep(0.02)
        by_worker = _rpcs_counted(metrics_port, "Allocate", calls)
        assert sum(by_worker) == calls
        if age == "0":
            assert sorted(by_worker) == [0, calls]
        else:
            assert min(by_worker) > 0, by_worker
        _stop_cleanly(proc)


@pytest.mark.parametrize("steer", ["true", "false"])
def test_new_connections_are_steered_to_the_idle_worker(tmp_path: Path, steer: str) -> None:
    """One connection (never aged) keeps one worker busy with `Allocate`s for 3 s; then 40 new
    connections make one `GetExperiment` each. Steered, the first worker gives the idle worker
    about 95% of new connections (the busy one took 0.8-1.0 cores here, past `BUSY_CORES`, the
    other none: weights 948 / 52), so it answers 30 or more (11 or more on the busy one at 5.2%:
    about 4 in 10^6). The kernel's hash alone (steering off) splits them evenly: 30 or more on
    the idle one about 1 in 1,000, so that run checks only that the probes were answered. No
    call fails either way."""
    from allocsvc._proto import allocsvc_pb2 as pb
    from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc

    proc, port, metrics_port = _start_two_counting_workers(
        tmp_path, {"ALLOCSVC_MAX_CONNECTION_AGE": "0", "ALLOCSVC_STEER_CONNECTIONS": steer}
    )
    with _killed_at_exit(proc):
        stop = threading.Event()

        def hammer(allocator: Any) -> None:
            while not stop.is_set():
                with pytest.raises(grpc.RpcError) as raised:
                    allocator.Allocate(
                        pb.AllocateRequest(experiment_id="none", user_id="u"), timeout=10
                    )
                assert raised.value.code() == grpc.StatusCode.NOT_FOUND

        with (
            grpc.insecure_channel(f"127.0.0.1:{port}") as busy,
            concurrent.futures.ThreadPoolExecutor(4) as pool,
        ):
            allocator = pb_grpc.AllocatorStub(busy)  # type: ignore[no-untyped-call]
            hammering = [pool.submit(hammer, allocator) for _ in range(4)]
            # The first worker steers every quarter second, from the last quarter's CPU.
            time.sleep(3.0)
            for k in range(40):
                options = [("grpc.use_local_subchannel_pool", 1), ("probe", k)]
                with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                    admin = pb_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
                    with pytest.raises(grpc.RpcError) as raised:
                        admin.GetExperiment(
                            pb.GetExperimentRequest(experiment_id="none"), timeout=10
                        )
                    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
            stop.set()
            for f in hammering:
                f.result()
        allocations = _rpcs_by_worker(metrics_port, "Allocate")
        busy_worker = allocations.index(max(allocations))
        probes = _rpcs_counted(metrics_port, "GetExperiment", 40)
        assert sum(probes) == 40
        if steer == "true":
            assert probes[1 - busy_worker] >= 30, probes
        _stop_cleanly(proc)


def test_migrate_applies_once(tmp_path: Path) -> None:
    def migrate() -> str:
        done = subprocess.run(
            [sys.executable, "-m", "allocsvc", "migrate", "--data-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return done.stdout

    first = migrate()
    assert "001_core" in first and "002_segment_analytics" in first
    assert "nothing to apply" in migrate()


def test_bad_settings_exit_with_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "allocsvc", "serve", "--port", "70000", "--in-memory"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "port" in done.stderr


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of a /metrics page, by (name, sorted labels)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_report_cascade_usage_store_health_and_write_behind(
    tmp_path: Path, fresh_db: str, fresh_redis: str
) -> None:
    """/metrics against a server with PostgreSQL and Redis. The numbers come from a snapshot
    the event loop refreshes every second (the HTTP thread never reads the service), so the
    test polls, bounded, until the snapshot shows what was done."""
    from allocsvc._proto import allocsvc_pb2 as pb
    from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc

    port, metrics_port = _free_port(), _free_port()
    log = tmp_path / "serve.log"
    # No automatic tree rebuilds: no tree limits the cascade, so level 1 serves too.
    config = tmp_path / "no-tree-rebuilds.yaml"
    config.write_text("hierarchy:\n  enabled: false\n")
    with log.open("w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "allocsvc",
                "serve",
                "--config",
                str(config),
                "--postgres-dsn",
                fresh_db,
                "--redis-url",
                fresh_redis,
                "--port",
                str(port),
                "--metrics-port",
                str(metrics_port),
            ],
            stderr=err,
        )
    with _killed_at_exit(proc):
        deadline = time.monotonic() + 60
        while not any(e.get("msg") == "serving" for e in _log_lines(log)):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            admin = pb_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
            allocator = pb_grpc.AllocatorStub(channel)  # type: ignore[no-untyped-call]
            admin.CreateExperiment(
                pb.CreateExperimentRequest(
                    experiment=pb.Experiment(
                        id="m1",
                        status=pb.EXPERIMENT_STATUS_RUNNING,
                        variants=[pb.Variant(id="a"), pb.Variant(id="b")],
                    )
                ),
                timeout=10,
            )
            admin.CreateExperiment(
                pb.CreateExperimentRequest(
                    experiment=pb.Experiment(
                        id="m2",
                        status=pb.EXPERIMENT_STATUS_RUNNING,
                        variants=[pb.Variant(id="a"), pb.Variant(id="b")],
                        segmentation=pb.SegmentationConfig(
                            mode=pb.SEGMENTATION_MODE_MANUAL,
                            segment_by=["source"],
                            min_samples_per_segment=3,
                        ),
                    )
                ),
                timeout=10,
            )
            for i in range(7):
                answer = allocator.Allocate(
                    pb.AllocateRequest(experiment_id="m1", user_id=f"u{i}"), timeout=10
                )
            allocator.RecordConversion(
                pb.RecordConversionRequest(assignment_id=answer.assignment_id), timeout=10
            )
            for i in range(5):
                allocator.Allocate(
                    pb.AllocateRequest(
                        experiment_id="m2", user_id=f"u{i}", context={"utm_source": "google"}
                    ),
                    timeout=10,
                )
        expected = {
            ("allocsvc_allocations_total", (("experiment", "m1"), ("level", "0"))): 7.0,
            ("allocsvc_conversions_total", (("experiment", "m1"), ("level", "0"))): 1.0,
            # min_samples_per_segment 3: three allocations from global, then from the source.
            ("allocsvc_allocations_total", (("experiment", "m2"), ("level", "0"))): 3.0,
            ("allocsvc_allocations_total", (("experiment", "m2"), ("level", "1"))): 2.0,
            ("allocsvc_store_up", (("store", "postgres"),)): 1.0,
            ("allocsvc_store_up", (("store", "redis"),)): 1.0,
            ("allocsvc_writebehind_conversions_written", ()): 1.0,
            ("allocsvc_writebehind_pending_assignments", ()): 0.0,
            ("allocsvc_writebehind_flush_failures", ()): 0.0,
            # Every new assignment's record pushed to Redis, none dropped.
            ("allocsvc_redis_pending_records", ()): 0.0,
            ("allocsvc_redis_dropped_records_total", ()): 0.0,
        }
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        deadline = time.monotonic() + 30
        while True:
            samples = _scrape(url)
            shown = {name: samples.get(name) for name in expected}
            if shown == expected or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert shown == expected
        first = samples[("allocsvc_metrics_snapshot_timestamp_seconds", ())]
        assert first > 0
        # The snapshot is refreshed: a later scrape carries a later timestamp.
        deadline = time.monotonic() + 30
        while _scrape(url)[("allocsvc_metrics_snapshot_timestamp_seconds", ())] == first:
            assert time.monotonic() < deadline, "metrics snapshot not refreshed"
            time.sleep(0.2)
        _stop_cleanly(proc)
