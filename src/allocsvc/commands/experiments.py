"""`allocsvc experiments create|list|show|pause|resume` against a running server.

Exit codes: 0 done; 1 an unexpected server error; 2 bad usage or input (a flag, the file, or a
request the server rejected as INVALID_ARGUMENT); 3 not found; 4 conflict (the id exists, or the
experiment's state does not allow the change); 5 server unreachable or too slow; 6 not allowed
(UNAUTHENTICATED / PERMISSION_DENIED).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import yaml

from allocsvc.client import (
    as_dict,
    experiment_from_dict,
    pb,
    status_name,
)
from allocsvc.commands.common import (
    connect,
    connection_options,
    echo_json,
)

STATUSES = ("draft", "running", "paused", "archived")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table; numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [
        bool(rows) and all(isinstance(r[i], int | float) for r in rows) for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


@click.group()
def experiments() -> None:
    """Create, list, show, pause and resume experiments.

    \b
    Exit codes: 0 done, 1 server error, 2 bad input, 3 not found,
    4 conflict (id taken, or the state does not allow it), 5 server unreachable
    or too slow, 6 not allowed (token missing or refused).
    """


# create -------------------------------------------------------------------------------------


def _load_file(path: str) -> list[dict[str, Any]]:
    """One experiment, a list of them, or {"experiments": [...]} from YAML or JSON."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise click.BadParameter(f"{path}: {exc.strerror}", param_hint="FILE") from None
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"{path}: not valid YAML/JSON: {exc}", param_hint="FILE") from None
    if isinstance(data, Mapping) and "experiments" in data:
        data = data["experiments"]
    items = data if isinstance(data, list) else [data]
    if not items or not all(isinstance(item, Mapping) for item in items):
        raise click.BadParameter(
            f"{path}: must hold an experiment mapping or a list of them", param_hint="FILE"
        )
    return [dict(item) for item in items]


def _variant_flag(text: str) -> dict[str, str]:
    key, _, name = text.partition("=")
    if not key.strip():
        raise click.BadParameter(f"{text!r}: give ID or ID=NAME", param_hint="--variant")
    return {"id": key.strip(), "name": name.strip() or key.strip()}


def _from_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The experiment fields given as flags (only those given)."""
    out: dict[str, Any] = {}
    for name in ("id", "name", "description", "status", "policy"):
        if flags[name] is not None:
            out[name] = flags[name]
    if flags["variant"]:
        out["variants"] = [_variant_flag(v) for v in flags["variant"]]
    if flags["weights"]:
        try:
            weights = [float(w) for w in flags["weights"].split(",")]
        except ValueError:
            raise click.BadParameter(
                "numbers separated by commas", param_hint="--weights"
            ) from None
        variants = out.get("variants")
        if variants is None or len(variants) != len(weights):
            raise click.BadParameter("give one weight per --variant", param_hint="--weights")
        for variant, weight in zip(variants, weights, strict=True):
            variant["weight"] = weight
    segment_by = [d.strip() for part in flags["segment_by"] for d in part.split(",") if d.strip()]
    if segment_by or flags["min_samples"] is not None:
        segmentation: dict[str, Any] = {}
        if segment_by:
            segmentation.update(mode="manual", segment_by=segment_by)
        if flags["min_samples"] is not None:
            segmentation["min_samples_per_segment"] = flags["min_samples"]
        out["segmentation"] = segmentation
    exploration: dict[str, Any] = {}
    if flags["exploration"] is not None:
        exploration["mode"] = flags["exploration"]
    if flags["propensity_floor"] is not None:
        exploration["propensity_floor"] = flags["propensity_floor"]
    if exploration:
        out["exploration"] = exploration
    if flags["sticky"] is not None:
        out["sticky"] = flags["sticky"]
    return out


@experiments.command()
@click.argument("file", required=False)
@click.option("--id", "id", help="Experiment id (e.g. checkout-button).")
@click.option("--name", help="Display name (default: the id).")
@click.option("--description")
@click.option("--variant", multiple=True, help="A variant: ID or ID=NAME (repeat; at least 2).")
@click.option("--weights", help="Weights of the variants in order, e.g. 0.8,0.2 (fixed policy).")
@click.option("--policy", type=click.Choice(["thompson", "uniform", "fixed"]))
@click.option("--status", type=click.Choice(["draft", "running"]), help="Default: draft.")
@click.option("--segment-by", multiple=True, help="Dimensions in cascade order (comma or repeat).")
@click.option("--min-samples", type=click.IntRange(min=0), help="min_samples_per_segment.")
@click.option("--exploration", type=click.Choice(["default", "aggressive", "conservative"]))
@click.option(
    "--propensity-floor",
    type=click.FloatRange(min=0, max=1, max_open=True),
    help="Least probability of each variant under Thompson sampling (e.g. 0.01), so that "
    "the logs support off-policy evaluation; below 1 / number of variants. Default 0: off.",
)
@click.option("--sticky/--no-sticky", default=None, help="Returning users keep their variant.")
@click.option("--json", "as_json", is_flag=True, help="Print the created experiments as JSON.")
@connection_options()
def create(
    file: str | None, as_json: bool, target: str, token: str | None, timeout: float, **flags: Any
) -> None:
    """Create experiments from FILE (YAML or JSON; - reads stdin) and/or flags.

    Flags override the file's fields (with a file of several experiments, every one of them).
    """
    overrides = _from_flags(flags)
    items = _load_file(file) if file else [{}]
    messages = []
    for i, item in enumerate(items):
        data = {**item, **overrides}
        if not data.get("id"):
            raise click.UsageError("an experiment needs an id (--id or `id:` in the file)")
        try:
            messages.append(experiment_from_dict(data))
        except ValueError as exc:
            where = f"{file}[{i}]" if file else "flags"
            raise click.BadParameter(str(exc), param_hint=where) from None
    created = []
    with connect(target, token, timeout) as client:
        for message in messages:
            created.append(client.create_experiment(message))
            if not as_json:
                e = created[-1]
                click.echo(f"created {e.id} ({status_name(e.status)}, {len(e.variants)} variants)")
    if as_json:
        echo_json([as_dict(e) for e in created])


# list / show --------------------------------------------------------------------------------


def _segmentation_text(e: pb.Experiment) -> str:
    mode = pb.SegmentationMode.Name(e.segmentation.mode).removeprefix("SEGMENTATION_MODE_")
    if e.segmentation.mode == pb.SEGMENTATION_MODE_MANUAL:
        return ">".join(e.segmentation.segment_by)
    return "-" if mode in ("UNSPECIFIED", "DISABLED") else mode.lower()


def _policy_text(e: pb.Experiment) -> str:
    name = pb.AllocationPolicy.Name(e.policy).removeprefix("ALLOCATION_POLICY_").lower()
    return "thompson" if name == "unspecified" else name


@experiments.command("list")
@click.option("--status", type=click.Choice(STATUSES), help="Only experiments in this status.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@connection_options()
def list_command(
    status: str | None, as_json: bool, target: str, token: str | None, timeout: float
) -> None:
    """List experiments."""
    with connect(target, token, timeout) as client:
        found = client.list_experiments(status)
    if as_json:
        echo_json([as_dict(e) for e in found])
        return
    if not found:
        click.echo("no experiments" + (f" in status {status}" if status else ""))
        return
    rows = [
        (
            e.id,
            e.name,
            status_name(e.status),
            _policy_text(e),
            ",".join(v.id for v in e.variants),
            _segmentation_text(e),
        )
        for e in found
    ]
    click.echo(table(("id", "name", "status", "policy", "variants", "segments"), rows))


@experiments.command()
@click.argument("experiment")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@connection_options()
def show(experiment: str, as_json: bool, target: str, token: str | None, timeout: float) -> None:
    """An experiment's settings and its per-variant counts."""
    with connect(target, token, timeout) as client:
        found = client.get_experiment(experiment)
        segments = client.list_segments(experiment)
    overall = next((s for s in segments if s.segment_key == ""), None)
    counts = {v.variant_id: v for v in overall.variants} if overall is not None else {}
    if as_json:
        echo_json(
            {
                "experiment": as_dict(found),
                "variants": [
                    {
                        "variant_id": v.id,
                        "allocations": counts[v.id].allocations if v.id in counts else 0,
                        "conversions": counts[v.id].conversions if v.id in counts else 0,
                    }
                    for v in found.variants
                ],
                "segments": len(segments),
            }
        )
        return
    click.echo(f"{found.id}: {found.name}")
    if found.description:
        click.echo(found.description)
    click.echo(
        f"status {status_name(found.status)}, policy {_policy_text(found)}, "
        f"segments {_segmentation_text(found)}, sticky {'yes' if found.sticky else 'no'}"
    )
    rows = []
    for v in found.variants:
        c = counts.get(v.id)
        a, k = (c.allocations, c.conversions) if c is not None else (0, 0)
        rows.append((v.id, v.name, a, k, f"{k / a:.2%}" if a else "-"))
    click.echo(table(("variant", "name", "allocations", "conversions", "rate"), rows))
    click.echo(f"{len(segments)} segments seen")


# pause / resume -----------------------------------------------------------------------------


def _set_status(experiment: str, status: str, as_json: bool, conn: tuple[str, Any, float]) -> None:
    with connect(*conn) as client:
        updated = client.set_status(experiment, status)
    if as_json:
        echo_json(as_dict(updated))
    else:
        click.echo(f"{updated.id} is {status_name(updated.status)}")


@experiments.command()
@click.argument("experiment")
@click.option("--json", "as_json", is_flag=True, help="Print the experiment as JSON.")
@connection_options()
def pause(experiment: str, as_json: bool, target: str, token: str | None, timeout: float) -> None:
    """Stop allocating (state is kept; `resume` continues)."""
    _set_status(experiment, "paused", as_json, (target, token, timeout))


@experiments.command()
@click.argument("experiment")
@click.option("--json", "as_json", is_flag=True, help="Print the experiment as JSON.")
@connection_options()
def resume(experiment: str, as_json: bool, target: str, token: str | None, timeout: float) -> None:
    """Set a paused (or draft) experiment running."""
    _set_status(experiment, "running", as_json, (target, token, timeout))
