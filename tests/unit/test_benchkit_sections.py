"""A bench rewrites its own section of bench/RESULTS.md after each run; what was written by
hand under a `BY_HAND` line of that section (earlier runs side by side, what each showed) stays.
h2.py's rewrites had dropped it twice."""

from __future__ import annotations

from pathlib import Path

from bench_support import load_bench

benchkit = load_bench("bench_load_benchkit", "benchkit.py")

BEFORE = """# Benchmark results

## Load (issue 10)

Run 1 table.

{marker}

Earlier runs, side by side.

| run | figure |
|---|---|
| 1 | 5 |

## Other

Another bench's words.
"""


def test_a_rewrite_keeps_what_follows_the_by_hand_line(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text(BEFORE.format(marker=benchkit.BY_HAND))
    benchkit.write_section("## Load (issue 10)", "## Load (issue 10)\n\nRun 2 table.\n", results)
    assert results.read_text() == BEFORE.format(marker=benchkit.BY_HAND).replace(
        "Run 1 table.", "Run 2 table."
    )


def test_a_section_without_the_line_is_replaced_whole_and_a_new_one_appended(
    tmp_path: Path,
) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text(BEFORE.format(marker="Not the marker."))
    benchkit.write_section("## Load (issue 10)", "## Load (issue 10)\n\nRun 2 table.\n", results)
    text = results.read_text()
    assert "Run 2 table." in text and "Earlier runs" not in text and "Run 1" not in text
    assert text.endswith("## Other\n\nAnother bench's words.\n")
    benchkit.write_section("## New", "## New\n\nFirst run.\n", results)
    assert results.read_text() == text + "\n## New\n\nFirst run.\n"
