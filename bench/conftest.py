"""Collects benchmark medians of one session and writes bench/RESULTS.md at its end.

Benchmark modules put medians (name -> seconds per call) into the `bench_medians` fixture and
register a section renderer with `add_results_section`; each section replaces its own part of
RESULTS.md, so sections written by other runs are kept. Nothing is written unless benchmarks are
enabled, every benchmark a section needs ran and the session passed.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

RESULTS_PATH = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nEach section lists the command that produced it.\n"


@dataclass
class ResultsSection:
    """A `## title` section of RESULTS.md made from the session's medians."""

    title: str
    required: frozenset[str]
    render: Callable[[dict[str, float]], str]


@dataclass
class SessionResults:
    medians: dict[str, float] = field(default_factory=dict)
    sections: list[ResultsSection] = field(default_factory=list)


RESULTS_KEY = pytest.StashKey[SessionResults]()


Render = Callable[[dict[str, float]], str]


def _session_results(config: pytest.Config) -> SessionResults:
    return config.stash.setdefault(RESULTS_KEY, SessionResults())


@pytest.fixture(scope="session")
def bench_medians(request: pytest.FixtureRequest) -> dict[str, float]:
    """Median seconds per call of this session's benchmarks, by name."""
    return _session_results(request.config).medians


@pytest.fixture(scope="session")
def add_results_section(
    request: pytest.FixtureRequest,
) -> Callable[[str, frozenset[str], Render], None]:
    """Register `## title` of RESULTS.md, rendered from the medians once all `required` exist."""
    results = _session_results(request.config)

    def add(title: str, required: frozenset[str], render: Render) -> None:
        if all(s.title != title for s in results.sections):
            results.sections.append(ResultsSection(title, required, render))

    return add


def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if found:
            cpu = found.group(1).strip()
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (
        f"{cpu}, nproc {cores}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}; load average at the end of the run: {load}"
    )


def command_line(config: pytest.Config) -> str:
    args = " ".join(shlex.quote(a) for a in config.invocation_params.args)
    return f"cd {shlex.quote(str(config.rootpath))} && {sys.executable} -m pytest {args}"


def replace_section(document: str, title: str, body: str) -> str:
    """`document` with its `## title` section set to `body` (appended when missing)."""
    if not document.startswith("# "):
        document = HEADER + ("\n" + document if document.strip() else "")
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    section = f"## {title}\n\n{body.strip()}\n\n"
    if pattern.search(document):
        return pattern.sub(lambda _: section, document, count=1).rstrip() + "\n"
    return document.rstrip() + "\n\n" + section.rstrip() + "\n"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    results = session.config.stash.get(RESULTS_KEY, None)
    if results is None or exitstatus != 0:
        return
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    document = RESULTS_PATH.read_text() if RESULTS_PATH.exists() else HEADER
    changed = False
    for section in results.sections:
        if not section.required <= results.medians.keys():
            continue
        body = (
            f"Command: `{command_line(session.config)}`\n\n"
            f"Date: {date}. Machine: {machine_description()}.\n\n" + section.render(results.medians)
        )
        document = replace_section(document, section.title, body)
        changed = True
    if changed:
        RESULTS_PATH.write_text(document)
