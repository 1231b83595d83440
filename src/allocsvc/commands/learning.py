"""`allocsvc train clusters|embeddings` and `allocsvc similar-users` against a running server.

A training command starts the job, then follows it with a progress bar (k values tried, or
epochs) until it ends, and prints the outcome (JSON with --json). Exit codes: 0 the job
succeeded; 1 the job failed; 3 the quality gate rejected the model; a failed call exits as
every server command does (`allocsvc.commands.common`: e.g. 5 unreachable, 6 not allowed).
Their `--timeout` is how long to follow the job; each call has the client's default deadline.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import click

from allocsvc.client import Client, as_dict, pb
from allocsvc.commands.common import connect, connection_options

EXIT_FAILED = 1
EXIT_REJECTED = 3
POLL_SECONDS = 0.5


def _follow(client: Client, job: pb.LearningJob, label: str, timeout: float) -> pb.LearningJob:
    """Poll the job until it ends, drawing a progress bar on stderr."""
    deadline = time.monotonic() + timeout
    with click.progressbar(
        length=max(job.total, 1), label=label, file=sys.stderr, show_pos=True
    ) as bar:
        shown = 0
        while True:
            status = client.get_clustering_status(job.job_id)
            job = status.job
            if job.total and bar.length != job.total:
                bar.length = job.total
            if job.done > shown:
                bar.update(job.done - shown)
                shown = job.done
            if job.state != "running":
                return job
            if time.monotonic() > deadline:
                raise click.ClickException(f"job {job.job_id} still running after {timeout:.0f} s")
            time.sleep(POLL_SECONDS)


def _finish(job: pb.LearningJob, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(as_dict(job), indent=2))
    else:
        click.echo(f"{job.kind} job {job.job_id}: {job.state}: {job.message}")
    if job.state == "rejected":
        sys.exit(EXIT_REJECTED)
    if job.state != "succeeded":
        sys.exit(EXIT_FAILED)


def _run(
    start: Callable[[Client], pb.LearningJob],
    target: str,
    token: str | None,
    label: str,
    as_json: bool,
    timeout: float,
) -> None:
    with connect(target, token) as client:
        job = _follow(client, start(client), label, timeout)
    _finish(job, as_json)


@click.group()
def train() -> None:
    """Train learning models on the server's recent traffic (in the background)."""


@train.command("clusters")
@click.option(
    "--use-embeddings", is_flag=True, help="Cluster the newest embedding model's embeddings."
)
@click.option("--json", "as_json", is_flag=True, help="Print the finished job as JSON.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for the job.")
@connection_options(timeout=None)
def train_clusters(
    use_embeddings: bool, as_json: bool, timeout: float, target: str, token: str | None
) -> None:
    """k-means with k chosen automatically; deployed if it passes the quality gate."""
    _run(
        lambda c: c.train_clusters(use_embeddings=use_embeddings),
        target,
        token,
        "clustering (k tried)",
        as_json,
        timeout,
    )


@train.command("embeddings")
@click.option("--epochs", type=click.IntRange(0, 1000), default=0, help="0: server default.")
@click.option("--loss", type=click.Choice(["triplet", "contrastive"]), help="Loss function.")
@click.option(
    "--labels",
    type=click.Choice(["none", "clusters"]),
    default="none",
    show_default=True,
    help="What makes users similar: a noisy copy of themselves, or the same cluster.",
)
@click.option("--fine-tune", is_flag=True, help="Start from the latest embedding model.")
@click.option("--json", "as_json", is_flag=True, help="Print the finished job as JSON.")
@click.option("--timeout", default=1800.0, show_default=True, help="Seconds to wait for the job.")
@connection_options(timeout=None)
def train_embeddings(
    epochs: int,
    loss: str | None,
    labels: str,
    fine_tune: bool,
    as_json: bool,
    timeout: float,
    target: str,
    token: str | None,
) -> None:
    """The PyTorch user encoder (input → 64 → 48 → 32), trained on CPU or GPU."""
    _run(
        lambda c: c.train_embeddings(
            epochs=epochs, loss=loss or "", labels=labels, fine_tune=fine_tune
        ),
        target,
        token,
        "embeddings (epochs)",
        as_json,
        timeout,
    )


@click.command("similar-users")
@click.argument("user_id")
@click.option("-k", "k", type=click.IntRange(1, 1000), default=10, show_default=True)
@connection_options()
def similar_users(user_id: str, k: int, target: str, token: str | None, timeout: float) -> None:
    """The users most similar to USER_ID (cosine similarity of their embeddings)."""
    with connect(target, token, timeout) as client:
        reply = client.find_similar_users(user_id, k)
    for user in reply.users:
        click.echo(f"{user.similarity:.4f}\t{user.user_id}")
