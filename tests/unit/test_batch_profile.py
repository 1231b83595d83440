"""bench/load/batch_profile.py sorts the event loop's perf samples by what they were in."""

from __future__ import annotations

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
