"""Rendering segment trees: ASCII, JSON against its schema, HTML (parsed, and drawn by Chromium),
DOT (through Graphviz). Keys and variant names carry hostile text to check the escaping.

The Graphviz and Chromium tests are marked `integration` (they need the Debian packages `graphviz`
and `chromium`) and skip when the tools are missing; the rest are `unit`.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Sequence
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from allocsvc.core import key_hash, path_keys, segment_key
from allocsvc.hierarchy import (
    HierarchySettings,
    SegmentStats,
    SegmentTree,
    build_tree,
    json_schema,
    render,
    render_ascii,
    render_dot,
    render_html,
    render_json,
    tree_to_dict,
)
from allocsvc.hierarchy.render import printable

unit = pytest.mark.unit
integration = pytest.mark.integration

LEVELS = ("country", "device")
EVIL = "<script>alert(\"x\")</script> & 'co' \\n \x1b[31mred"
EVIL_VARIANT = '<img src=x onerror="alert(1)">'
BEST_KEY = segment_key(LEVELS[:1], [EVIL])
CELLS: dict[tuple[str, ...], list[tuple[int, int]]] = {
    ("us", "mobile"): [(3000, 300), (3000, 450)],
    ("us", "desktop"): [(3000, 300), (3000, 300)],
    (EVIL, "tablet"): [(3000, 300), (3000, 750)],
    ("de", "mobile"): [(3000, 150), (3000, 75)],  # A wins here; B wins or ties elsewhere
    ("fr", "mobile"): [(100, 10), (100, 10)],
}
BEST_RGB = (0xC8, 0xF7, 0xC5)
WORST_RGB = (0xF9, 0xD0, 0xD0)


def cumulative_stats(cells: dict[tuple[str, ...], list[tuple[int, int]]]) -> list[SegmentStats]:
    totals: dict[str, list[tuple[int, int]]] = {}
    for values, counts in cells.items():
        for key in path_keys(list(LEVELS[: len(values)]), list(values)):
            old = totals.setdefault(key, [(0, 0)] * len(counts))
            totals[key] = [(a + b, c + d) for (a, c), (b, d) in zip(old, counts, strict=True)]
    return [SegmentStats(k, tuple(v)) for k, v in totals.items()]


@pytest.fixture(scope="module")
def tree() -> SegmentTree:
    settings = HierarchySettings(LEVELS, (1000, 500))
    return build_tree(cumulative_stats(CELLS), settings, variant_names=["control", EVIL_VARIANT])


@pytest.fixture(scope="module")
def root_only() -> SegmentTree:
    return build_tree([], HierarchySettings(LEVELS, (1000, 500)), variant_names=["a"])


@unit
def test_fixture_tree_has_best_worst_and_pruned_nodes(tree: SegmentTree) -> None:
    assert tree.best is not None and tree.best.key == BEST_KEY
    assert tree.worst is not None and tree.worst.key == "country:de"
    assert tree.summary.pruned_by_reason == {"insufficient_data": 2, "not_significant": 2}


# ASCII


@unit
def test_ascii_draws_the_tree_with_markers_and_summary(tree: SegmentTree) -> None:
    text = render_ascii(tree)
    lines = text.splitlines()
    assert lines[0] == "Segment tree"
    assert any(line.strip().startswith("nodes") and "kept 6" in line for line in lines)
    assert any("├── " in line for line in lines) and any("└── " in line for line in lines)
    best = next(line for line in lines if "[BEST]" in line)
    assert "country:<script>" in best and "visits 6,000" in best and "25.00%" in best
    worst = next(line for line in lines if "[WORST]" in line)
    assert "country:de" in worst
    pruned = next(line for line in lines if "country:fr" in line and "──" in line)
    assert "x country:fr" in pruned and "insufficient data" in pruned
    # control characters from keys never reach the terminal
    assert "\x1b" not in text
    assert "\\x1b[31mred" in text
    kept_only = render_ascii(tree, show_pruned=False)
    assert "country:fr" not in kept_only and "[BEST]" in kept_only


@unit
def test_ascii_colour_uses_only_its_own_escapes(tree: SegmentTree) -> None:
    text = render_ascii(tree, color=True)
    assert "\x1b[2mx country:fr" in text
    for code in ("\x1b[2m", "\x1b[1;32m", "\x1b[1;31m", "\x1b[0m"):
        assert code in text
        text = text.replace(code, "")
    assert "\x1b" not in text


# JSON


@unit
def test_schema_is_shipped_in_the_package_and_valid() -> None:
    shipped = resources.files("allocsvc.hierarchy").joinpath("schema.json").read_text("utf-8")
    schema = json_schema()
    assert schema == json.loads(shipped)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


@unit
def test_json_output_validates_against_its_schema(tree: SegmentTree) -> None:
    doc = json.loads(render_json(tree))
    jsonschema.Draft202012Validator(json_schema()).validate(doc)
    assert doc == json.loads(json.dumps(tree_to_dict(tree)))
    nodes = {n["key"]: n for n in doc["nodes"]}
    assert len(nodes) == len(tree) == doc["summary"]["nodes"]
    assert doc["nodes"][0]["key"] == ""
    for node in doc["nodes"]:
        assert int(node["hash"]) == key_hash(node["key"])
    best = nodes[BEST_KEY]
    assert best["best"] and best["kept"] and best["best_variant"] == EVIL_VARIANT
    assert best["variants"][1] == {
        "name": EVIL_VARIANT,
        "allocations": 3000,
        "conversions": 750,
        "conversion_rate": 0.25,
    }
    assert doc["summary"]["best"] == BEST_KEY and doc["summary"]["worst"] == "country:de"
    assert nodes["country:fr"]["reason"] == "insufficient_data"
    assert nodes["country:fr"]["test"] is None
    assert nodes["country:us"]["test"]["reference"] == ""
    assert sum(n["kept"] for n in doc["nodes"]) == doc["summary"]["kept"]
    assert int(nodes["country:us|device:mobile"]["parent"]) == key_hash("country:us")


@unit
def test_schema_rejects_malformed_documents(tree: SegmentTree) -> None:
    validator = jsonschema.Draft202012Validator(json_schema())
    good = tree_to_dict(tree)
    bad_reason = json.loads(json.dumps(good))
    bad_reason["nodes"][1]["reason"] = "because"
    bad_hash = json.loads(json.dumps(good))
    bad_hash["nodes"][0]["hash"] = key_hash("")
    missing = json.loads(json.dumps(good))
    del missing["summary"]["best"]
    for doc in (bad_reason, bad_hash, missing):
        assert not validator.is_valid(doc)


@unit
def test_every_format_renders_a_root_only_tree(root_only: SegmentTree) -> None:
    jsonschema.Draft202012Validator(json_schema()).validate(json.loads(render_json(root_only)))
    for fmt in ("ascii", "json", "html", "dot"):
        assert render(root_only, fmt)
    assert "best                   none" in render(root_only, "ascii")
    with pytest.raises(ValueError, match="unknown format"):
        render(root_only, "svg")


# HTML


class WellFormed(HTMLParser):
    """Checks that every opened element is closed in order; records elements and text."""

    VOID = frozenset({"meta", "br", "hr", "img", "input", "link", "area", "base", "col", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.errors: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse_html(page: str) -> WellFormed:
    parser = WellFormed()
    parser.feed(page)
    parser.close()
    assert parser.errors == []
    assert parser.stack == [], f"unclosed: {parser.stack}"
    return parser


def classes(attrs: dict[str, str | None]) -> set[str]:
    return set((attrs.get("class") or "").split())


@unit
def test_html_is_well_formed_self_contained_and_escaped(tree: SegmentTree) -> None:
    page = render_html(tree, title=f"Tree of {EVIL}")
    assert page.startswith("<!DOCTYPE html>")
    parsed = parse_html(page)
    tags = [tag for tag, _ in parsed.elements]
    # no scripts, no external resources
    assert not {"script", "link", "img", "iframe", "object", "embed"} & set(tags)
    for _, attrs in parsed.elements:
        assert "src" not in attrs and "href" not in attrs
        assert not any(name.startswith("on") for name in attrs)
    assert "<script>" not in page and EVIL_VARIANT not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;co&#x27;" in page
    assert "\x1b" not in page
    text = "".join(parsed.text)
    assert 'alert("x")' in text and "onerror" in text  # shown as text, escaped in the markup
    # collapsible nodes, summary table
    assert tags.count("details") == tags.count("summary") > 0
    assert "table" in tags and "kept 6" in text


@unit
def test_html_marks_best_worst_and_pruned_nodes(tree: SegmentTree) -> None:
    parsed = parse_html(render_html(tree))
    nodes = {
        attrs["title"]: classes(attrs)
        for _, attrs in parsed.elements
        if "node" in classes(attrs) and attrs.get("title")
    }
    assert nodes[printable(BEST_KEY)] >= {"node", "kept", "best"}
    assert nodes["country:de"] >= {"node", "kept", "worst"}
    assert nodes["country:fr"] >= {"node", "pruned"}
    assert nodes["global"] == {"node", "kept"}
    assert sum("best" in c for c in nodes.values()) == 1
    assert sum("worst" in c for c in nodes.values()) == 1
    # a subtree without kept nodes starts collapsed
    details = [attrs for tag, attrs in parsed.elements if tag == "details"]
    assert any("open" in d for d in details) and any("open" not in d for d in details)


# DOT (Graphviz)


def dot_binary() -> str:
    found = shutil.which("dot")
    if found is None:
        pytest.skip("Graphviz `dot` not installed (Debian: apt-get install -y graphviz)")
    return found


@integration
def test_dot_renders_through_graphviz(tree: SegmentTree, tmp_path: Path) -> None:
    source = render_dot(tree)
    assert source.startswith("digraph segment_tree {")
    assert 'fillcolor="#c8f7c5"' in source and 'fillcolor="#f9d0d0"' in source
    done = subprocess.run(
        [dot_binary(), "-Tsvg"], input=source, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    svg = ET.fromstring(done.stdout)
    texts = "".join(el.text or "" for el in svg.iter() if el.tag.endswith("text"))
    assert "device:tablet" in texts and "BEST" in texts and "WORST" in texts
    # the hostile key survives as text, backslash and quotes included
    assert "country:<script>alert(\"x\")</script> & 'co' \\n \\x1b[31mred" in texts
    titles = [el.text for el in svg.iter() if el.tag.endswith("title")]
    assert f"n{key_hash(BEST_KEY)}" in titles
    kept_only = render_dot(tree, show_pruned=False)
    assert f"n{key_hash('country:fr')}" not in kept_only
    done = subprocess.run(
        [dot_binary(), "-Tsvg"], input=kept_only, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stderr == ""


# HTML in a real browser (Chromium)


def png_pixels(data: bytes) -> tuple[int, int, set[tuple[int, ...]]]:
    """Width, height and the distinct RGB(A) colours of an 8-bit RGB/RGBA non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, bytearray()
    width = height = depth = colour = interlace = -1
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    bpp = 3 if colour == 2 else 4
    stride = width * bpp
    raw = zlib.decompress(bytes(idat))
    prev = bytearray(stride)
    colours: set[tuple[int, ...]] = set()
    for y in range(height):
        start = y * (stride + 1)
        kind_byte, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up = prev[i]
            if kind_byte == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind_byte == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind_byte == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind_byte == 4:
                up_left = prev[i - bpp] if i >= bpp else 0
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                pred = left if pa <= pb and pa <= pc else (up if pb <= pc else up_left)
                line[i] = (line[i] + pred) & 0xFF
        colours.update(tuple(line[i : i + 3]) for i in range(0, stride, bpp))
        prev = line
    return width, height, colours


def near(colour: Sequence[int], colours: set[tuple[int, ...]], tolerance: int = 3) -> bool:
    return any(
        all(abs(a - b) <= tolerance for a, b in zip(colour, c, strict=False)) for c in colours
    )


@integration
def test_html_renders_in_chromium(tree: SegmentTree, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium not installed (Debian: apt-get install -y chromium)")
    page = tmp_path / "tree.html"
    page.write_text(render_html(tree), encoding="utf-8")
    shot = tmp_path / "tree.png"
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=900,500",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    width, height, colours = png_pixels(shot.read_bytes())
    assert (width, height) == (900, 500)
    assert len(colours) > 16  # text, borders, highlights: not a blank page
    assert near(BEST_RGB, colours) and near(WORST_RGB, colours)
