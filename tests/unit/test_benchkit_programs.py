"""bench/load/benchkit.py finds the programs the benches run (installing their Debian package
only when one is missing)."""

from __future__ import annotations

import shutil

import pytest
from bench_support import load_bench

pytestmark = pytest.mark.unit

benchkit = load_bench("bench_load_benchkit", "benchkit.py")


def test_programs_on_the_path_are_found_without_installing() -> None:
    assert benchkit.debian_programs("coreutils", "ls", "cat") == [
        shutil.which("ls"),
        shutil.which("cat"),
    ]
