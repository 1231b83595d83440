"""bench/load's scripts as modules for tests: each under a name of its own (`h2` is also a
PyPI package's name), with bench/load on sys.path, as its scripts import their neighbours
(h2, run, echo, benchkit) by their plain names."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

LOAD = Path(__file__).resolve().parents[1] / "bench" / "load"


def load_bench(name: str, file: str) -> ModuleType:
    """bench/load/`file` as the module `name` (registered: dataclasses look their module up)."""
    if str(LOAD) not in sys.path:
        sys.path.insert(0, str(LOAD))
    spec = importlib.util.spec_from_file_location(name, LOAD / file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
