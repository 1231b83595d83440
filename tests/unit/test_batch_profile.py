"""bench/load/batch_profile.py sorts the event loop's perf samples by what they were in."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

LOAD = Path(__file__).resolve().parents[2] / "bench" / "load"


def _load():  # type: ignore[no-untyped-def]
    # Its neighbours (h2, run, echo, benchkit) import each other by their plain names.
    sys.path.insert(0, str(LOAD))
    spec = importlib.util.spec_from_file_location(
        "bench_load_batch_profile", LOAD / "batch_profile.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


profile = _load()

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
