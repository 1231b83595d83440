"""`allocsvc simulate` and `allocsvc evaluate`: decision quality on simulated users and logs."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click

from allocsvc.config import SegmentTreeSettings


@click.command()
@click.option(
    "--scenario",
    "scenarios",
    multiple=True,
    help="Scenario to run (repeat for several; default: all).",
)
@click.option(
    "--policy",
    "policies",
    multiple=True,
    help="Policy to compare (repeat for several; default: all).",
)
@click.option("--seeds", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--first-seed", type=int, default=1, show_default=True)
@click.option("--users", type=click.IntRange(min=100), default=100_000, show_default=True)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Users decided per engine call before their conversions are recorded.",
)
@click.option(
    "--rebuild-every",
    type=click.IntRange(min=0),
    default=20_000,
    show_default=True,
    help="Users between segment-tree rebuilds (0: never).",
)
@click.option(
    "--first-rebuild",
    type=click.IntRange(min=0),
    # The field's default, read without building the settings (that loads the context parser).
    default=SegmentTreeSettings.model_fields["first_rebuild_at"].default,
    show_default=True,
    help="Users at which the tree is first rebuilt by growth, then at each doubling (0: never); "
    "the server's hierarchy.first_rebuild_at.",
)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--json-out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write every run's summary as JSON here.",
)
def simulate(
    scenarios: tuple[str, ...],
    policies: tuple[str, ...],
    seeds: int,
    first_seed: int,
    users: int,
    batch: int,
    rebuild_every: int,
    first_rebuild: int,
    workers: int,
    json_out: Path | None,
) -> None:
    """Compare allocation policies on simulated users with known conversion rates.

    Every policy runs through the real Rust core on the same user streams; the table gives
    regret against the oracle and lift against global Thompson sampling with 95% intervals
    (bootstrap over seeds).
    """
    from allocsvc.quality.policies import standard_policies
    from allocsvc.quality.scenarios import DIMENSIONS, SCENARIOS, VARIANTS
    from allocsvc.quality.simulator import (
        BASELINE,
        NEW_SEGMENT_USERS,
        compare,
        markdown_table,
    )
    from allocsvc.quality.simulator import simulate as run

    known = standard_policies(DIMENSIONS, VARIANTS)
    for name in scenarios:
        if name not in SCENARIOS:
            raise click.BadParameter(
                f"{name!r} is not one of {', '.join(SCENARIOS)}", param_hint="--scenario"
            )
    for name in policies:
        if name not in known:
            raise click.BadParameter(
                f"{name!r} is not one of {', '.join(known)}", param_hint="--policy"
            )
    chosen_scenarios = list(scenarios or SCENARIOS)
    chosen_policies = list(policies or known)
    seed_list = list(range(first_seed, first_seed + seeds))
    streams = len(chosen_scenarios) * len(seed_list)
    with click.progressbar(length=streams, label="streams", file=sys.stderr) as bar:
        summaries = run(
            chosen_scenarios,
            chosen_policies,
            seed_list,
            users,
            batch=batch,
            rebuild_every=rebuild_every,
            first_rebuild=first_rebuild,
            workers=workers,
            on_done=bar.update,
        )
    rows = compare(summaries)
    click.echo(markdown_table(rows))
    for r in rows:
        # Scenarios with a new segment: its first users, paired with the baseline's.
        if r.new_segment is not None and r.new_segment_difference is not None:
            d = r.new_segment_difference
            click.echo(
                f"{r.scenario}, {r.policy}: new segment's first {NEW_SEGMENT_USERS} users "
                f"{r.new_segment.value:.4%}, minus {BASELINE}'s {d.value:+.4%} "
                f"[{d.low:+.4%}, {d.high:+.4%}]"
            )
    click.echo(f"seeds {seed_list[0]}..{seed_list[-1]}, {users} users per stream, batch {batch}")
    if json_out is not None:
        json_out.write_text(json.dumps([asdict(s) for s in summaries]))


@click.command()
@click.argument("log_file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--target",
    default="uniform",
    show_default=True,
    help="Candidate policy: uniform, variant:NAME, greedy, or a JSON file "
    '{"context": {"variant": p, ...}, "*": {...}}.',
)
@click.option("--as-json", is_flag=True, help="Print the estimates as JSON.")
def evaluate(log_file: Path, target: str, as_json: bool) -> None:
    """Off-policy estimates (IPS, SNIPS, DR) of a candidate policy from a log of assignments.

    LOG_FILE is CSV with a header, or JSON lines (.jsonl), with fields context, variant,
    propensity and reward, one row per logged assignment.
    """
    from allocsvc.quality import ope

    try:
        log = ope.read_log(log_file)
        table = ope.target_policy(log, target)
        estimates = [ope.on_policy(log), *ope.evaluate(log, table)]
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    ess = ope.effective_sample_size(log, table)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "rows": len(log),
                    "target": target,
                    "effective_sample_size": ess,
                    "estimates": [asdict(e) for e in estimates],
                }
            )
        )
        return
    click.echo(f"{len(log)} logged rows, {len(log.context_names)} contexts, target {target}")
    click.echo(f"effective sample size of the weights: {ess:,.0f}")
    click.echo(f"{'estimator':<12}{'value':>10}{'95% low':>10}{'95% high':>10}")
    for e in estimates:
        label = "logged" if e.estimator == "on_policy" else e.estimator
        click.echo(f"{label:<12}{e.value:>10.5f}{e.low:>10.5f}{e.high:>10.5f}")
