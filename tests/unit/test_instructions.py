"""bench/load/instructions.py reads callgrind's dumps by thread, refuses a run whose calls
were not all answered, and gives each setup's ratio to echo."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_support import load_bench

pytestmark = pytest.mark.unit

instructions = load_bench("bench_load_instructions", "instructions.py")


def _dump(directory: Path, name: str, total: int) -> None:
    (directory / name).write_text(f"# callgrind format\nevents: Ir\nsummary: {total}\nfn=x\n")


def test_dumps_are_read_by_thread_of_the_process_first_dump_only(tmp_path: Path) -> None:
    _dump(tmp_path, "callgrind.out.42.1-01", 5_000)
    _dump(tmp_path, "callgrind.out.42.1-02", 70)
    _dump(tmp_path, "callgrind.out.42.1-11", 900)
    _dump(tmp_path, "callgrind.out.42.2-01", 1)  # a later dump
    _dump(tmp_path, "callgrind.out.7.1-01", 2)  # another process
    (tmp_path / "callgrind.out.42-01").write_text("")  # the empty end-of-run files
    assert instructions.summaries(tmp_path, 42) == {1: 5_000, 2: 70, 11: 900}
    with pytest.raises(RuntimeError, match="main thread"):
        instructions.summaries(tmp_path, 8)


def _h2load(succeeded: int, failed: int, data: int) -> str:
    total = succeeded + failed
    return (
        # h2load gives a run shorter than a second in ms.
        f"finished in 967.00ms, {total / 0.967:.2f} req/s, 1.00KB/s\n"
        f"requests: {total} total, {total} started, {total} done, {succeeded} succeeded, "
        f"{failed} failed, 0 errored, 0 timeout\n"
        f"status codes: {succeeded} 2xx, 0 3xx, 0 4xx, 0 5xx\n"
        f"traffic: 1.00KB ({data + 999}) total, 10B (999) headers (space savings 90%), "
        f"1.00KB ({data}) data\n"
    )


def test_a_run_counts_only_when_every_call_was_answered_with_a_body() -> None:
    instructions.answered(_h2load(100, 0, 100 * 170), 100)
    with pytest.raises(RuntimeError, match="succeeded"):
        instructions.answered(_h2load(99, 1, 99 * 170), 100)
    # HTTP 200 with no body: the call failed (its gRPC status was in the trailers).
    with pytest.raises(RuntimeError, match="without a body"):
        instructions.answered(_h2load(100, 0, 0), 100)
    with pytest.raises(RuntimeError, match="without a body"):
        instructions.answered(_h2load(100, 0, 20 * 170), 100)


def test_errors_in_the_server_log_are_counted(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text(
        '{"level": "warning", "msg": "no admin tokens configured"}\n'
        '{"level": "error", "msg": "Unexpected [ValueError] raised by servicer method"}\n'
        '{"level": "info", "msg": "serving"}\n'
    )
    assert instructions.errors_logged(log) == 1
    assert instructions.errors_logged(tmp_path / "missing.log") == 0


def test_the_table_gives_each_setup_per_call_and_its_ratio_to_echo() -> None:
    counted = [
        instructions.Counted("echo", 1000, 270_000_000, 300_000_000),
        instructions.Counted("allocsvc", 1000, 337_500_000, 380_000_000),
    ]
    text = instructions.table(counted, 1000)
    assert "| echo | 270,000 | 300,000 | - |" in text
    assert "| allocsvc | 337,500 | 380,000 | 80% |" in text
    assert "allocsvc without metrics" in text
    assert "allocsvc serving metrics" in instructions.table(counted, 1000, metrics=True)
