"""The `allocsvc` command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from allocsvc.commands.common import connect, connection_options
from allocsvc.commands.experiments import experiments
from allocsvc.commands.learning import similar_users, train
from allocsvc.commands.quality import evaluate, simulate
from allocsvc.commands.users import users
from allocsvc.config import ConfigError, load_settings


@click.group()
@click.version_option(package_name="allocsvc")
def main() -> None:
    """allocsvc: experiment allocation over gRPC."""


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, exists=True),
    help="YAML or JSON settings file.",
)
@click.option("--host", help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=int, help="Port to listen on (default 50051; 0 picks one).")
@click.option("--workers", type=int, help="Processes sharing the port (SO_REUSEPORT).")
@click.option("--seed", type=int, help="Seed of the sampler, for reproducible runs.")
@click.option("--postgres-dsn", help="Use this PostgreSQL instead of the embedded one.")
@click.option("--redis-url", help="Share state with other replicas through this Redis.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Embedded PostgreSQL home.")
@click.option("--in-memory", is_flag=True, default=None, help="Keep all state in the process.")
@click.option("--migrate/--no-migrate", default=None, help="Apply migrations at start (default).")
@click.option("--metrics-port", type=int, help="Serve Prometheus metrics on this HTTP port.")
def serve(config_file: Path | None, **flags: object) -> None:
    """Start the gRPC server (SIGTERM or Ctrl-C stops it gracefully)."""
    from allocsvc import server

    try:
        settings = load_settings(config_file, **flags)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(server.run(settings))


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, exists=True),
    help="YAML or JSON settings file.",
)
@click.option("--postgres-dsn", help="The database to migrate (default: the embedded one).")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Embedded PostgreSQL home.")
def migrate(config_file: Path | None, **flags: object) -> None:
    """Apply pending SQL migrations from sql/ and list what was applied."""
    import asyncio

    from allocsvc import logs
    from allocsvc.store import EmbeddedPostgres
    from allocsvc.store import migrate as apply

    try:
        settings = load_settings(config_file, **flags)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    logs.configure(settings.log_level)
    embedded = None
    dsn = settings.postgres_dsn
    if dsn is None:
        embedded = EmbeddedPostgres(settings.data_dir / "postgres")
        dsn = embedded.start()
    try:
        applied = asyncio.run(apply(dsn))
    finally:
        if embedded is not None:
            embedded.stop()
    click.echo("\n".join(applied) if applied else "nothing to apply: the schema is current")


@main.group()
def tree() -> None:
    """Segment trees."""


@tree.command("show")
@click.argument("experiment")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["ascii", "json", "html", "dot"]),
    default="ascii",
    show_default=True,
)
@click.option("--rebuild", is_flag=True, help="Rebuild the tree from current statistics first.")
@click.option("--output", type=click.Path(path_type=Path), help="Write to this file.")
@connection_options(timeout=60.0)
def tree_show(
    experiment: str,
    fmt: str,
    rebuild: bool,
    output: Path | None,
    target: str,
    token: str | None,
    timeout: float,
) -> None:
    """Print (or write) an experiment's segment tree."""
    with connect(target, token, timeout) as client:
        if rebuild:
            client.rebuild_tree(experiment)
        answer = client.get_tree(experiment, fmt)
    if output is not None:
        output.write_text(answer.content)
        click.echo(f"wrote {output} ({fmt})")
    else:
        click.echo(answer.content)


@main.command()
@click.argument("experiment")
@click.option("--min-allocations", type=int, default=0, help="Segments below are not tested.")
@click.option("--alpha", type=float, default=0.0, help="Significance level (default 0.05).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@connection_options(timeout=60.0)
def analyze(
    experiment: str,
    min_allocations: int,
    alpha: float,
    as_json: bool,
    target: str,
    token: str | None,
    timeout: float,
) -> None:
    """Segment lift, z-tests and recommendations for an experiment."""
    from allocsvc.client import as_dict

    with connect(target, token, timeout) as client:
        answer = client.analyze_segments(experiment, min_allocations=min_allocations, alpha=alpha)
    if as_json:
        click.echo(json.dumps(as_dict(answer), indent=2))
        return
    if answer.reason:
        click.echo(answer.reason)
    click.echo(
        f"{'segment':40} {'variant':10} {'alloc':>8} {'conv':>6} {'rate':>7} {'lift':>7}"
        f" {'p adj':>9}"
    )
    for r in answer.results:
        click.echo(
            f"{(r.segment_key or '(global)')[:40]:40} {r.variant_id[:10]:10} {r.allocations:>8}"
            f" {r.conversions:>6} {r.conversion_rate:>7.2%} {r.lift:>+7.1%}"
            f" {r.p_adjusted:>9.3g}{' *' if r.significant else ''}"
        )
    for line in answer.recommendations:
        click.echo(f"- {line}")


@main.command()
@click.argument("experiment")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@connection_options(timeout=60.0)
def validate(
    experiment: str, as_json: bool, target: str, token: str | None, timeout: float
) -> None:
    """Sample-ratio mismatch, early stopping and alerts for an experiment."""
    from allocsvc.client import as_dict

    with connect(target, token, timeout) as client:
        answer = client.validate_experiment(experiment)
    if as_json:
        click.echo(json.dumps(as_dict(answer), indent=2))
        return
    srm = answer.sample_ratio
    if srm.reason and not srm.observed:
        click.echo(f"sample ratio: {srm.reason}")
    else:
        verdict = "MISMATCH" if srm.mismatch else "ok"
        click.echo(f"sample ratio: {verdict} (chi2 {srm.statistic:.3g}, p {srm.p_value:.3g})")
    click.echo(f"early stopping: {answer.early_stopping.reason}")
    for alert in answer.alerts:
        click.echo(f"alert [{alert.severity}] {alert.message}")


@main.command("sample-size")
@click.option("--baseline", type=float, required=True, help="Control conversion rate, e.g. 0.05.")
@click.option("--mde", type=float, required=True, help="Minimum detectable effect (relative).")
@click.option("--absolute", is_flag=True, help="--mde is an absolute difference of rates.")
@click.option("--alpha", type=float, default=0.05, show_default=True)
@click.option("--power", type=float, default=0.8, show_default=True)
@click.option("--variants", type=int, default=2, show_default=True)
@click.option("--segments", type=int, default=1, show_default=True)
@click.option("--one-sided", is_flag=True)
@click.option("--daily-traffic", type=float, default=0.0, help="Visitors per day.")
@click.option("--horizon-days", type=int, default=0, help="Days available (0: no limit).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def sample_size_command(
    baseline: float,
    mde: float,
    absolute: bool,
    alpha: float,
    power: float,
    variants: int,
    segments: int,
    one_sided: bool,
    daily_traffic: float,
    horizon_days: int,
    as_json: bool,
) -> None:
    """Two-proportion power analysis (computed locally, no server needed)."""
    from allocsvc.analytics import EffectKind, SampleSizeQuery, days_needed, sample_size
    from allocsvc.errors import InvalidRequest

    try:
        size = sample_size(
            SampleSizeQuery(
                baseline_rate=baseline,
                minimum_detectable_effect=mde,
                effect_kind=EffectKind.ABSOLUTE if absolute else EffectKind.RELATIVE,
                alpha=alpha,
                power=power,
                variants=variants,
                segments=segments,
                two_sided=not one_sided,
            )
        )
    except InvalidRequest as exc:
        raise click.BadParameter(exc.message, param_hint=exc.field) from None
    plan = days_needed(size.total, daily_traffic, horizon_days or None) if daily_traffic else None
    result = {
        "per_variant": size.per_variant,
        "total": size.total,
        "effect_size": size.effect_size,
        "adjusted_alpha": size.adjusted_alpha,
        "days_needed": None if plan is None else plan.days_needed,
        "achievable": None if plan is None else plan.achievable,
        "reason": None if plan is None else plan.reason,
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"per variant     {size.per_variant:,}")
    click.echo(f"total           {size.total:,}")
    click.echo(f"Cohen's h       {size.effect_size:.4f}")
    click.echo(f"adjusted alpha  {size.adjusted_alpha:.4g}")
    if plan is not None:
        click.echo(plan.reason)


main.add_command(experiments)
main.add_command(train)
main.add_command(similar_users)
main.add_command(simulate)
main.add_command(evaluate)
main.add_command(users)
