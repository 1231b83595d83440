"""`allocsvc serve --workers N` and `allocsvc migrate` as an operator runs them."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _log_lines(path: Path) -> list[dict[str, object]]:
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_workers_share_the_port_and_stop_on_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    log = tmp_path / "serve.log"
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
            ],
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 60
        serving: list[dict[str, object]] = []
        while time.monotonic() < deadline and len(serving) < 2:
            assert proc.poll() is None, log.read_text()
            serving = [e for e in _log_lines(log) if e.get("msg") == "serving"]
            time.sleep(0.2)
        assert len(serving) == 2, log.read_text()
        assert {e["port"] for e in serving} == {port}
        assert len({e["pid"] for e in serving}) == 2
        for _ in range(4):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert sum(e.get("msg") == "stopped" for e in _log_lines(log)) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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


def test_metrics_endpoint_reports_cascade_usage(tmp_path: Path) -> None:
    import urllib.request

    from allocsvc._proto import allocsvc_pb2 as pb
    from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc

    port, metrics_port = _free_port(), _free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "allocsvc",
                "serve",
                "--in-memory",
                "--port",
                str(port),
                "--metrics-port",
                str(metrics_port),
            ],
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 60
        while not any(e.get("msg") == "serving" for e in _log_lines(log)):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            admin = pb_grpc.AdminStub(channel)
            allocator = pb_grpc.AllocatorStub(channel)
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
            for i in range(7):
                answer = allocator.Allocate(
                    pb.AllocateRequest(experiment_id="m1", user_id=f"u{i}"), timeout=10
                )
            allocator.RecordConversion(
                pb.RecordConversionRequest(assignment_id=answer.assignment_id), timeout=10
            )
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert 'allocsvc_allocations_total{experiment="m1",level="0"} 7.0' in text
        assert 'allocsvc_conversions_total{experiment="m1",level="0"} 1.0' in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
