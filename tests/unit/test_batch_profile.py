"""bench/load/batch_profile.py sorts the event loop's perf samples by what they were in, and
counts the server's context switches by thread."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from bench_support import load_bench

profile = load_bench("bench_load_batch_profile", "batch_profile.py")

# Four samples as `perf script -F ip,sym --no-inline` prints them: frames innermost first.
SCRIPT = """\
\t    7f01 allocsvc_core::decide::Engine::decide_on_path
\t    7f02 _core::PyPreparedBatch::finish
\t    7f03 _PyEval_EvalFrameDefault

\t    7f04 allocsvc_core::wire::Reader::next_field
\t    7f05 _core::PyBatchCatalogue::__pymethod_prepare__

\t    ffff tcp_sendmsg
\t    ffff entry_SYSCALL_64_after_hwframe
\t    7f06 __libc_sendmsg

\t    7f07 _PyEval_EvalFrameDefault
\t    7f08 [unknown]
"""


def test_samples_are_sorted_by_what_they_were_in() -> None:
    assert profile.shares(SCRIPT) == {
        "rust finish": 0.25,
        "rust prepare": 0.25,
        "system calls": 0.25,
        "python, grpc, uvloop": 0.25,
    }


def test_a_sample_in_a_rust_call_counts_as_rust_even_inside_a_system_call() -> None:
    frames = ["futex_wait", "entry_SYSCALL_64", "allocsvc_core::held::Held::insert"]
    assert profile.category(frames) == "rust other"
    assert profile.shares("") == {}


def test_context_switches_are_counted_by_thread_per_call() -> None:
    napped, done = threading.Event(), threading.Event()

    def naps() -> None:
        for _ in range(20):
            time.sleep(0.001)  # blocks, and is woken: a voluntary switch each time at least
        napped.set()
        done.wait()

    thread = threading.Thread(target=naps)
    before = profile.switches([os.getpid()])
    thread.start()
    try:
        assert napped.wait(10)
        switched = profile.switches([os.getpid()]) - before
        name = Path(f"/proc/self/task/{thread.native_id}/comm").read_text().strip()
    finally:
        done.set()
        thread.join()
    by_thread = profile.per_call(switched, 20)
    # This thread blocked in `napped.wait`: the main thread is counted apart from the others.
    assert by_thread["main"]["voluntary"] >= 1 / 20
    assert by_thread[name]["voluntary"] >= 1
    assert set(by_thread[name]) == {"voluntary", "involuntary"}
