"""Segment hierarchy (SPEC §7): build and prune the segment tree, navigate it, render it.

`build_tree(stats, settings)` gives a `SegmentTree`; `tree.kept_hashes()` is what
`Engine.set_tree` takes. `render` draws a tree as ASCII, JSON (schema in `schema.json`), HTML
or DOT.
"""

from allocsvc.hierarchy.builder import (
    bonferroni,
    build_tree,
    difference_test,
    interaction_ztest,
    stats_from_counts,
    two_proportion_ztest,
)
from allocsvc.hierarchy.render import (
    FORMATS,
    json_schema,
    node_to_dict,
    render,
    render_ascii,
    render_dot,
    render_html,
    render_json,
    tree_to_dict,
)
from allocsvc.hierarchy.tree import (
    CascadeLevelUsage,
    CascadeUsage,
    Correction,
    DifferenceTest,
    HierarchySettings,
    LevelSummary,
    NodeReason,
    SegmentStats,
    SegmentTree,
    TreeNode,
    TreeSummary,
    cascade_usage,
)

__all__ = [
    "FORMATS",
    "CascadeLevelUsage",
    "CascadeUsage",
    "Correction",
    "DifferenceTest",
    "HierarchySettings",
    "LevelSummary",
    "NodeReason",
    "SegmentStats",
    "SegmentTree",
    "TreeNode",
    "TreeSummary",
    "bonferroni",
    "build_tree",
    "cascade_usage",
    "difference_test",
    "interaction_ztest",
    "json_schema",
    "node_to_dict",
    "render",
    "render_ascii",
    "render_dot",
    "render_html",
    "render_json",
    "stats_from_counts",
    "tree_to_dict",
    "two_proportion_ztest",
]
