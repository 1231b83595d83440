"""Training-job metrics: what the collector exposes for a Learning's job counts."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from allocsvc.learning.service import JobMetrics
from allocsvc.metrics import LearningJobsCollector

pytestmark = pytest.mark.unit


def exposed(jobs: JobMetrics) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(LearningJobsCollector(lambda: jobs))
    samples = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_job_counts_by_kind_and_outcome() -> None:
    jobs = JobMetrics(
        started={"clusters": 3, "embeddings": 1},
        finished={("clusters", "succeeded"): 1, ("clusters", "failed"): 1},
        running={"clusters": 1, "embeddings": 1},
        last_duration_s={"clusters": 2.5},
    )
    samples = exposed(jobs)
    assert samples['allocsvc_learning_jobs_started_total{kind="clusters"}'] == 3
    assert samples['allocsvc_learning_jobs_started_total{kind="embeddings"}'] == 1
    assert samples['allocsvc_learning_jobs_finished_total{kind="clusters",state="failed"}'] == 1
    assert samples['allocsvc_learning_jobs_failed_total{kind="clusters"}'] == 1
    assert samples['allocsvc_learning_jobs_failed_total{kind="embeddings"}'] == 0
    assert samples['allocsvc_learning_jobs_running{kind="embeddings"}'] == 1
    assert samples['allocsvc_learning_job_last_duration_seconds{kind="clusters"}'] == 2.5
    assert not any("last_duration" in name and "embeddings" in name for name in samples)


def test_nothing_started_exposes_no_series() -> None:
    assert not any(name.startswith("allocsvc_learning") for name in exposed(JobMetrics()))
