"""Drawing a segment tree: ASCII (terminal), JSON (`schema.json`), self-contained HTML, DOT.

Every format shows per node its visits (allocations), conversion rate per variant, whether it is
kept or pruned (and why), marks the best and worst nodes, and carries the tree's summary.
Keys and variant names are user-controlled text: control characters are shown as escapes in the
text formats, HTML escapes everything with `html.escape`, DOT escapes quotes and backslashes.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterator
from functools import cache
from importlib import resources
from typing import Any, Final

from allocsvc.hierarchy.tree import (
    Correction,
    DifferenceTest,
    NodeReason,
    SegmentTree,
    TreeNode,
)

SCHEMA_VERSION: Final = 1
FORMATS: Final = ("ascii", "json", "html", "dot")

_ANSI_DIM = "\x1b[2m"
_ANSI_BEST = "\x1b[1;32m"
_ANSI_WORST = "\x1b[1;31m"
_ANSI_RESET = "\x1b[0m"


def render(tree: SegmentTree, fmt: str, *, show_pruned: bool = True, color: bool = False) -> str:
    """The tree in one of `FORMATS`; `color` (ANSI) applies to ascii only."""
    if fmt == "ascii":
        return render_ascii(tree, show_pruned=show_pruned, color=color)
    if fmt == "json":
        return render_json(tree)
    if fmt == "html":
        return render_html(tree, show_pruned=show_pruned)
    if fmt == "dot":
        return render_dot(tree, show_pruned=show_pruned)
    raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")


# shared text


def printable(text: str) -> str:
    """`text` with control and other non-printable characters shown as Python escapes."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100.0 * rate:.2f}%"


def _rates(tree: SegmentTree, node: TreeNode) -> str:
    return ", ".join(
        f"{printable(name)} {_pct(rate)}"
        for name, rate in zip(tree.variant_names, node.conversion_rates, strict=True)
    )


def _test_text(test: DifferenceTest | None) -> str:
    if test is None:
        return ""
    # Nothing to compare with (e.g. an only child): no test was possible.
    return f"p={test.p_value:.3g}" if test.variants_tested else "p=n/a"


def _verdict(node: TreeNode) -> str:
    """`kept` / `kept: misserved ...` / `pruned: reason`, with the adjusted p-value when the
    node was tested."""
    p = _test_text(node.test)
    if node.is_root:
        return "root"
    if node.kept:
        misserved = node.reason is NodeReason.MISSERVED
        state = f"kept: {node.reason.description}" if misserved else "kept"
    else:
        state = f"pruned: {node.reason.description}"
    return f"{state}, {p}" if p else state


def _best_text(tree: SegmentTree, node: TreeNode | None) -> str:
    if node is None:
        return "none"
    v = node.best_variant
    variant = "" if v is None else f" ({printable(tree.variant_names[v])} {_pct(node.best_rate)})"
    return f"{printable(node.key)}{variant}"


def summary_lines(tree: SegmentTree) -> list[tuple[str, str]]:
    """The summary as (label, text) pairs, shared by every format but JSON."""
    s = tree.summary
    settings = tree.settings
    levels = " > ".join(printable(d) for d in settings.levels)
    if settings.depth < len(settings.levels):
        levels += f" (max depth {settings.depth})"
    reasons = ", ".join(f"{r} {n}" for r, n in s.pruned_by_reason.items()) or "none"
    per_level = ", ".join(
        f"{printable(lv.dimension or 'global')} {lv.kept}/{lv.nodes}" for lv in s.levels
    )
    rate = s.conversions / s.visits if s.visits else None
    if settings.prune:
        test = (
            "interaction z-test (log rate of each variant over the reference's best) vs "
            f"nearest kept ancestor, Bonferroni over variants, alpha {settings.alpha:g}"
            + (" over the tree" if settings.correction is Correction.TREE else " per node")
        )
    else:
        test = "pruning off (tests reported only)"
    minimums = ", ".join(f"{n:,}" for n in settings.min_samples_per_level)
    lines = [
        ("levels", levels),
        ("variants", ", ".join(printable(n) for n in tree.variant_names)),
        ("nodes", f"{s.nodes} (kept {s.kept}, pruned {s.pruned})"),
        ("pruned by reason", reasons),
        ("kept per level", per_level),
        ("kept leaves", f"{s.kept_leaves} (kept depth {s.kept_depth})"),
        ("visits", f"{s.visits:,} (conversions {s.conversions:,}, rate {_pct(rate)})"),
        ("min samples per level", minimums),
        ("test", test),
        ("best", _best_text(tree, tree.best)),
        ("worst", _best_text(tree, tree.worst)),
    ]
    if tree.ignored_keys:
        lines.append(("ignored keys", str(len(tree.ignored_keys))))
    return lines


def _visible_children(tree: SegmentTree, node: TreeNode, show_pruned: bool) -> tuple[TreeNode, ...]:
    return tree.children(node.key, kept_only=not show_pruned)


# ASCII


def render_ascii(tree: SegmentTree, *, show_pruned: bool = True, color: bool = False) -> str:
    """A terminal drawing (├──/└──); pruned nodes marked `x` (dimmed with `color`).

    Without `show_pruned` the kept tree is drawn (kept nodes under their nearest kept ancestor).
    """
    width = max(len(label) for label, _ in summary_lines(tree))
    out = ["Segment tree"]
    out += [f"  {label.ljust(width)}  {text}" for label, text in summary_lines(tree)]
    out.append("")
    out += _ascii_lines(tree, tree.root, "", "", show_pruned, color)
    return "\n".join(out) + "\n"


def _ascii_lines(
    tree: SegmentTree,
    node: TreeNode,
    lead: str,
    child_lead: str,
    show_pruned: bool,
    color: bool,
) -> Iterator[str]:
    marks = []
    if node is tree.best:
        marks.append("[BEST]")
    if node is tree.worst:
        marks.append("[WORST]")
    state = "" if node.kept else "x "
    text = (
        f"{state}{printable(node.label)}  visits {node.visits:,}  {_rates(tree, node)}"
        f"  ({_verdict(node)})"
    )
    if marks:
        text += "  " + " ".join(marks)
    if color:
        if node is tree.best:
            text = f"{_ANSI_BEST}{text}{_ANSI_RESET}"
        elif node is tree.worst:
            text = f"{_ANSI_WORST}{text}{_ANSI_RESET}"
        elif not node.kept:
            text = f"{_ANSI_DIM}{text}{_ANSI_RESET}"
    yield lead + text
    kids = _visible_children(tree, node, show_pruned)
    for i, child in enumerate(kids):
        last = i == len(kids) - 1
        yield from _ascii_lines(
            tree,
            child,
            child_lead + ("└── " if last else "├── "),
            child_lead + ("    " if last else "│   "),
            show_pruned,
            color,
        )


# JSON


def node_to_dict(tree: SegmentTree, node: TreeNode) -> dict[str, Any]:
    """One node as in the JSON output (hashes are decimal strings: u64 exceeds JSON's safe ints)."""
    best = node.best_variant
    return {
        "key": node.key,
        "hash": str(node.segment_hash),
        "level": node.level,
        "dimension": node.dimension,
        "value": node.value,
        "label": node.label,
        "parent": None if node.parent_hash is None else str(node.parent_hash),
        "kept_parent": None if node.kept_parent_hash is None else str(node.kept_parent_hash),
        "children": [str(c.segment_hash) for c in tree.children(node.key)],
        "kept": node.kept,
        "reason": node.reason.value,
        "enough_data": node.enough_data,
        "synthesized": node.synthesized,
        "visits": node.visits,
        "conversions": node.conversions,
        "conversion_rate": node.conversion_rate,
        "value_sum": node.stats.value_sum,
        "variants": [
            {"name": name, "allocations": a, "conversions": c, "conversion_rate": rate}
            for name, (a, c), rate in zip(
                tree.variant_names, node.stats.variant_counts, node.conversion_rates, strict=True
            )
        ],
        "best_variant": None if best is None else tree.variant_names[best],
        "best": node is tree.best,
        "worst": node is tree.worst,
        "test": None if node.test is None else _test_to_dict(node.test),
    }


def _test_to_dict(test: DifferenceTest) -> dict[str, Any]:
    return {
        "reference": test.reference_key,
        "reference_hash": str(test.reference_hash),
        "reference_remainder": test.reference_remainder,
        "baseline_variant": test.baseline_variant,
        "variants_tested": test.variants_tested,
        "p_value": test.p_value,
        "alpha": test.alpha,
        "significant": test.significant,
        "per_variant": [
            {"z": z, "p_value": p, "reference_rate": r}
            for z, p, r in zip(test.z, test.p_values, test.reference_rates, strict=True)
        ],
    }


def tree_to_dict(tree: SegmentTree) -> dict[str, Any]:
    """The JSON document as Python objects; valid against `json_schema()`."""
    s = tree.summary
    settings = tree.settings
    return {
        "schema_version": SCHEMA_VERSION,
        "levels": list(settings.levels),
        "variants": list(tree.variant_names),
        "settings": {
            "min_samples_per_level": list(settings.min_samples_per_level),
            "max_depth": settings.max_depth,
            "alpha": settings.alpha,
            "correction": settings.correction.value,
            "prune": settings.prune,
        },
        "summary": {
            "nodes": s.nodes,
            "kept": s.kept,
            "pruned": s.pruned,
            "pruned_by_reason": dict(s.pruned_by_reason),
            "kept_leaves": s.kept_leaves,
            "kept_depth": s.kept_depth,
            "visits": s.visits,
            "conversions": s.conversions,
            "levels": [
                {
                    "level": lv.level,
                    "dimension": lv.dimension,
                    "nodes": lv.nodes,
                    "kept": lv.kept,
                    "pruned": lv.pruned,
                }
                for lv in s.levels
            ],
            "best": s.best_key,
            "worst": s.worst_key,
        },
        "ignored_keys": list(tree.ignored_keys),
        "nodes": [node_to_dict(tree, n) for n in tree.nodes],
    }


def render_json(tree: SegmentTree, *, indent: int | None = None) -> str:
    """The tree as JSON (UTF-8 text, no NaN/Infinity), described by `schema.json`."""
    return json.dumps(tree_to_dict(tree), indent=indent, ensure_ascii=False, allow_nan=False)


@cache
def _schema_text() -> str:
    return resources.files(__package__).joinpath("schema.json").read_text(encoding="utf-8")


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of `render_json`'s output, shipped with the package."""
    schema: dict[str, Any] = json.loads(_schema_text())
    return schema


# HTML

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em; color: #1d2330; background: #fff; }
h1 { font-size: 1.3em; margin: 0 0 .6em; }
table.summary { border-collapse: collapse; margin-bottom: 1em; }
table.summary th { text-align: left; padding: 2px 14px 2px 0; color: #555; font-weight: 600; }
table.summary td { padding: 2px 0; }
p.legend { color: #555; margin: 0 0 1em; }
ul.tree, ul.tree ul { list-style: none; margin: 0; padding-left: 1.4em; }
ul.tree ul { border-left: 1px solid #d0d4dc; }
ul.tree { padding-left: 0; }
summary { cursor: pointer; }
div.leaf { padding-left: 1.15em; }
.node { padding: 1px 6px; border-radius: 4px; line-height: 1.7;
  -webkit-box-decoration-break: clone; box-decoration-break: clone; }
.node .label { font-weight: 600; font-family: ui-monospace, monospace; }
.node .visits, .node .rate { color: #444; margin-left: .7em; }
.node .verdict { color: #777; margin-left: .7em; font-style: italic; }
.node.pruned { opacity: .55; }
.node.pruned .label { text-decoration: line-through; }
.node.best { background: #c8f7c5; outline: 1px solid #2e9d45; }
.node.worst { background: #f9d0d0; outline: 1px solid #c0392b; }
.badge { font-size: 11px; text-transform: uppercase; margin-left: .7em; padding: 0 4px;
  border-radius: 3px; color: #fff; }
.badge.best { background: #2e9d45; }
.badge.worst { background: #c0392b; }
"""


def _e(text: str) -> str:
    return html.escape(printable(text), quote=True)


def render_html(tree: SegmentTree, *, title: str = "Segment tree", show_pruned: bool = True) -> str:
    """A self-contained page: no scripts, no external resources (a CSP forbids them too).

    Nodes are collapsible (`<details>`/`<summary>`); subtrees without a kept node start closed.
    Node elements carry the classes `node`, `kept`/`pruned`, and `best`/`worst`.
    """
    has_kept = _subtrees_with_kept(tree)
    rows = "\n".join(
        f"<tr><th>{_e(label)}</th><td>{_e(text)}</td></tr>" for label, text in summary_lines(tree)
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{_e(title)}</h1>",
        f'<table class="summary">\n{rows}\n</table>',
        '<p class="legend">Per node: visits (allocations), conversion rate per variant, verdict. '
        '<span class="node best">best</span> and <span class="node worst">worst</span> are '
        "the kept nodes whose best variant converts best and worst; pruned nodes are struck "
        "through.</p>",
        '<ul class="tree">',
        *_html_node(tree, tree.root, show_pruned, has_kept),
        "</ul>",
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


def _subtrees_with_kept(tree: SegmentTree) -> set[int]:
    """Hashes of the nodes that are kept or have a kept descendant."""
    marked: set[int] = set()
    for node in reversed(tree.nodes):
        if node.kept or any(c.segment_hash in marked for c in tree.children(node.key)):
            marked.add(node.segment_hash)
    return marked


def _html_node(
    tree: SegmentTree, node: TreeNode, show_pruned: bool, has_kept: set[int]
) -> Iterator[str]:
    classes = ["node", "kept" if node.kept else "pruned"]
    badges = ""
    if node is tree.best:
        classes.append("best")
        badges += '<span class="badge best">best</span>'
    if node is tree.worst:
        classes.append("worst")
        badges += '<span class="badge worst">worst</span>'
    content = (
        f'<span class="{" ".join(classes)}" title="{_e(node.key or "global")}">'
        f'<span class="label">{_e(node.label)}</span>'
        f'<span class="visits">{node.visits:,} visits</span>'
        f'<span class="rate">{_e(_rates(tree, node))}</span>'
        f'<span class="verdict">{_e(_verdict(node))}</span>{badges}</span>'
    )
    kids = _visible_children(tree, node, show_pruned)
    if not kids:
        yield f'<li><div class="leaf">{content}</div></li>'
        return
    opened = " open" if node.segment_hash in has_kept else ""
    yield f"<li><details{opened}><summary>{content}</summary>"
    yield "<ul>"
    for child in kids:
        yield from _html_node(tree, child, show_pruned, has_kept)
    yield "</ul>"
    yield "</details></li>"


# DOT


def _dot_escape(text: str) -> str:
    return printable(text).replace("\\", "\\\\").replace('"', '\\"')


def _dot_label(lines: list[str], *, left: bool = False) -> str:
    """A quoted DOT label of several lines (centred, or left-justified with `left`)."""
    sep = "\\l" if left else "\\n"
    body = sep.join(_dot_escape(line) for line in lines)
    return f'"{body}{sep if left else ""}"'


def render_dot(tree: SegmentTree, *, show_pruned: bool = True) -> str:
    """A Graphviz digraph (left to right); best node green, worst red, pruned dashed grey.

    Without `show_pruned` only kept nodes are drawn, under their nearest kept ancestor.
    """
    summary = [f"{label}: {text}" for label, text in summary_lines(tree)]
    out = [
        "digraph segment_tree {",
        f'  graph [rankdir=LR, fontname="Helvetica", fontsize=11, labelloc=t, labeljust=l, '
        f"label={_dot_label(['Segment tree', *summary], left=True)}];",
        '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", color="#4a5568", '
        'fontname="Helvetica", fontsize=10];',
        '  edge [color="#8a93a6", arrowsize=0.6];',
    ]
    shown = [n for n in tree.nodes if show_pruned or n.kept]
    for node in shown:
        lines = [
            node.label,
            f"visits {node.visits:,}",
            _rates(tree, node),
            _verdict(node),
        ]
        style: list[str] = []
        if node is tree.best:
            lines.append("BEST")
            style = ['fillcolor="#c8f7c5"', 'color="#2e9d45"', "penwidth=2"]
        elif node is tree.worst:
            lines.append("WORST")
            style = ['fillcolor="#f9d0d0"', 'color="#c0392b"', "penwidth=2"]
        elif not node.kept:
            style = [
                'style="rounded,dashed,filled"',
                'fillcolor="#f4f5f7"',
                'color="#9aa0ab"',
                'fontcolor="#8a8f99"',
            ]
        attrs = [
            f"label={_dot_label(lines)}",
            f"tooltip={_dot_label([node.key or 'global'])}",
            *style,
        ]
        out.append(f"  n{node.segment_hash} [{', '.join(attrs)}];")
    for node in shown:
        parent = node.parent_hash if show_pruned else node.kept_parent_hash
        if parent is not None:
            edge = "" if node.kept else ' [style=dashed, color="#c3c7cf"]'
            out.append(f"  n{parent} -> n{node.segment_hash}{edge};")
    out.append("}")
    return "\n".join(out) + "\n"
