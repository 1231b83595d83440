"""Learning in the serving process: the traffic sample, the deployed model, jobs, drift.

The allocation service calls `observe` for a sample of allocations (about one in
`clustering.observe_every`, see `allocsvc.learning.sampling`; none when clustering and
embeddings are both disabled): one tuple appended to a bounded buffer. It calls `cluster_of`
for experiments in `auto` mode (nearest centroid of the cached model). Training runs in a
separate process (`allocsvc.learning.jobs`); this module imports neither scikit-learn nor torch.

Models live in the store (Postgres for a server with one): `load` adopts a clustering model
another replica deployed and a newer embedding model, so a model trained on one replica
serves on all of them (the server polls every `clustering.model_poll_interval`). The traffic
sample itself is per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from allocsvc.config import ClusteringSettings, EmbeddingsSettings
from allocsvc.context.extraction import ExtractedContext
from allocsvc.errors import FailedPrecondition, InvalidRequest, NotFound
from allocsvc.learning import drift
from allocsvc.learning.features import FeatureNormaliser, RawFeatures, raw_features
from allocsvc.learning.jobs import run_in_process
from allocsvc.learning.model import ClusterModel, EncoderSpec
from allocsvc.learning.sampling import ObservationGaps
from allocsvc.learning.similarity import Ensemble, NumpyEncoder, SimilarityIndex
from allocsvc.learning.store import EmbeddingModel, ModelStore, StoredModel, UserEmbeddings

log = logging.getLogger(__name__)

# Segment value of the cluster dimension while no model is deployed.
NO_CLUSTER = "none"
MS_PER_DAY = 86_400_000
MAX_JOBS_KEPT = 100


class JobKind(StrEnum):
    CLUSTERS = "clusters"
    EMBEDDINGS = "embeddings"


class JobState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # trained and deployed
    REJECTED = "rejected"  # trained, but the quality gate kept it from serving
    FAILED = "failed"


@dataclass
class Job:
    id: str
    kind: JobKind
    reason: str  # "requested", "drift"
    state: JobState = JobState.RUNNING
    done: int = 0
    total: int = 0
    message: str = ""
    started_ms: int = 0
    finished_ms: int = 0
    version: int = 0  # of the model it produced


@dataclass(frozen=True)
class ClusteringStatus:
    model: StoredModel | None
    stale: bool
    age_days: float
    drift: drift.DriftReport | None
    retrain_scheduled: bool
    latest_job: Job | None


@dataclass(frozen=True)
class JobMetrics:
    """Training jobs since start, by kind: started, finished by outcome state, running, and
    the duration of the last finished one. Replaced, never mutated, so the metrics server's
    threads read a consistent copy."""

    started: dict[str, int] = field(default_factory=dict)
    finished: dict[tuple[str, str], int] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)
    last_duration_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SimilarUser:
    user_id: str
    score: float


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Learning:
    """Clustering and embeddings of one serving process."""

    def __init__(
        self,
        clustering: ClusteringSettings,
        embeddings: EmbeddingsSettings,
        store: ModelStore,
    ) -> None:
        self.clustering = clustering
        self.embeddings = embeddings
        self._store = store
        # (user id, raw features) of recent allocations: training data.
        self._buffer: deque[tuple[str, RawFeatures]] = deque(maxlen=clustering.buffer_size)
        # Rows seen since the deployed model was trained: compared with it for drift.
        self._recent: deque[RawFeatures] = deque(maxlen=clustering.buffer_size)
        self._deployed: StoredModel | None = None
        self._model: ClusterModel | None = None
        self._drift: drift.DriftReport | None = None
        self._jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._embedding_models: list[EmbeddingModel] = []
        self._index: SimilarityIndex | None = None
        self._index_users: list[str] = []
        self._index_rows: dict[str, int] = {}
        # Users erased while an embeddings job runs: dropped from the index it builds.
        self._forget_after_job: set[str] = set()
        self.job_metrics = JobMetrics()
        self._poll_failing = False
        self.gaps: ObservationGaps | None = None
        if clustering.enabled or embeddings.enabled:
            self.gaps = ObservationGaps(clustering.observe_every, clustering.seed)

    # Hot path ---------------------------------------------------------------------------

    def observe(self, user_id: str, context: ExtractedContext) -> None:
        self.observe_features(user_id, raw_features(context))

    def observe_features(self, user_id: str, row: RawFeatures) -> None:
        """`observe` of a context already reduced to its features (the batch path's)."""
        self._buffer.append((user_id, row))
        self._recent.append(row)

    def cluster_of(self, context: ExtractedContext) -> str:
        """Segment value of the request's cluster under the deployed model."""
        model = self._model
        if model is None:
            return NO_CLUSTER
        return str(model.assign(raw_features(context)))

    # Clustering -------------------------------------------------------------------------

    async def load(self) -> None:
        """Adopt the deployed clustering model and the newest embedding model from the store
        (at start, and when another replica trained newer ones). Two cheap version queries
        when nothing changed."""
        version = await self._store.deployed_version()
        if version and (self._deployed is None or version != self._deployed.version):
            stored = await self._store.deployed()
            if stored is not None:
                self._adopt(stored)
        if (
            await self._store.latest_embedding_version() > self.embedding_version
            and self._running(JobKind.EMBEDDINGS) is None
        ):
            models, users = await self._store.latest_embeddings(self.embeddings.ensemble_size)
            if models:
                self._adopt_embeddings(models, users)

    async def poll(self) -> None:
        """`load` for the scheduler: a store that cannot be read is logged when that starts
        and when it ends, not at every poll."""
        try:
            await self.load()
        except Exception:
            if not self._poll_failing:
                log.warning("cannot read learning models from the store", exc_info=True)
            self._poll_failing = True
        else:
            if self._poll_failing:
                log.info("learning models readable again")
            self._poll_failing = False

    def _adopt(self, stored: StoredModel) -> None:
        self._deployed = stored
        self._model = stored.model
        self._recent.clear()
        self._drift = None
        log.info(
            "clustering model deployed", extra={"version": stored.version, "k": stored.model.k}
        )

    def _running(self, kind: JobKind) -> Job | None:
        return next(
            (j for j in self._jobs.values() if j.kind is kind and j.state is JobState.RUNNING),
            None,
        )

    def _new_job(self, kind: JobKind, reason: str) -> Job:
        job = Job(f"{kind.value}-{next(self._ids)}-{_now_ms()}", kind, reason, started_ms=_now_ms())
        self._jobs[job.id] = job
        while len(self._jobs) > MAX_JOBS_KEPT:
            oldest = next(iter(self._jobs))
            if self._jobs[oldest].state is JobState.RUNNING:
                break
            del self._jobs[oldest]
        return job

    def _count(self, job: Job, *, finished: bool) -> None:
        m, kind = self.job_metrics, job.kind.value
        running = dict(m.running)
        if not finished:
            running[kind] = running.get(kind, 0) + 1
            self.job_metrics = replace(
                m, started={**m.started, kind: m.started.get(kind, 0) + 1}, running=running
            )
            return
        running[kind] = running.get(kind, 1) - 1
        slot = (kind, job.state.value)
        self.job_metrics = replace(
            m,
            finished={**m.finished, slot: m.finished.get(slot, 0) + 1},
            running=running,
            last_duration_s={
                **m.last_duration_s,
                kind: max(0, job.finished_ms - job.started_ms) / 1000.0,
            },
        )

    def _spawn(self, job: Job, work: Callable[[Job], Any]) -> None:
        async def run() -> None:
            self._count(job, finished=False)
            try:
                await work(job)
            except asyncio.CancelledError:
                job.state, job.message = JobState.FAILED, "cancelled"
                raise
            except Exception as exc:
                log.exception("learning job failed", extra={"job": job.id})
                job.state, job.message = JobState.FAILED, str(exc) or type(exc).__name__
            finally:
                job.finished_ms = _now_ms()
                if job.kind is JobKind.EMBEDDINGS:
                    self._forget_after_job.clear()
                self._count(job, finished=True)

        task = asyncio.create_task(run(), name=job.id)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def train_clusters(self, reason: str = "requested", *, use_embeddings: bool = False) -> Job:
        """Start a clustering job on the buffered traffic (or return the one running); with
        `use_embeddings`, k-means runs on the newest embedding model's embeddings of it."""
        if not self.clustering.enabled:
            raise FailedPrecondition("clustering is disabled (clustering.enabled)")
        if use_embeddings and not self._embedding_models:
            raise FailedPrecondition(
                "use_embeddings: no embedding model yet, call TrainEmbeddings first"
            )
        running = self._running(JobKind.CLUSTERS)
        if running is not None:
            return running
        if len(self._buffer) < self.clustering.min_samples:
            raise FailedPrecondition(
                f"{len(self._buffer)} requests observed, clustering needs"
                f" {self.clustering.min_samples} (clustering.min_samples)"
            )
        job = self._new_job(JobKind.CLUSTERS, reason)
        rows = [tuple(row) for _, row in self._buffer]
        encoder = self._encoder_spec() if use_embeddings else None
        self._spawn(job, lambda j: self._train_clusters(j, rows, encoder))
        return job

    def _encoder_spec(self) -> tuple[EncoderSpec, FeatureNormaliser]:
        """The newest embedding model's ensemble (what FindSimilarUsers uses), for clustering."""
        newest = self._embedding_models[-1]
        members = tuple(
            (m.weights, m.config_json)
            for m in self._embedding_models[-self.embeddings.ensemble_size :]
            if m.normaliser == newest.normaliser
        )
        return EncoderSpec(newest.version, members), newest.normaliser

    async def _train_clusters(
        self,
        job: Job,
        rows: list[tuple[Any, ...]],
        encoder: tuple[EncoderSpec, FeatureNormaliser] | None = None,
    ) -> None:
        c = self.clustering
        payload = {
            "rows": rows,
            "encoder": None if encoder is None else encoder[0].to_json(),
            "normaliser": None if encoder is None else encoder[1].to_json(),
            "auto": {
                "k_min": c.k_min,
                "k_max": c.k_max,
                "silhouette_sample": c.silhouette_sample,
                "n_init": c.n_init,
                "seed": c.seed,
            },
            "gate": {
                "min_silhouette": c.min_silhouette,
                "max_davies_bouldin": c.max_davies_bouldin,
                "min_cluster_fraction": c.min_cluster_fraction,
            },
            "max_sources": c.max_sources,
        }

        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        result = await run_in_process("allocsvc.learning.training:clusters", payload, progress)
        model = ClusterModel.from_json(result["model"])
        stored = await self._store.save(model, deploy=result["passed"])
        job.version = stored.version
        if result["passed"]:
            self._adopt(stored)
            job.state = JobState.SUCCEEDED
            job.message = f"deployed version {stored.version} with k={model.k}"
        else:
            job.state = JobState.REJECTED
            job.message = "quality gate: " + "; ".join(result["reasons"])

    def job(self, job_id: str) -> Job:
        found = self._jobs.get(job_id)
        if found is None:
            raise NotFound(f"job {job_id!r} does not exist")
        return found

    def latest_job(self, kind: JobKind) -> Job | None:
        return next((j for j in reversed(self._jobs.values()) if j.kind is kind), None)

    def deployed_model(self) -> tuple[str, datetime, timedelta] | None:
        """The deployed clustering model's name, training time and the age past which it is
        stale (None: no model)."""
        if self._deployed is None:
            return None
        trained = datetime.fromtimestamp(self._deployed.model.trained_at_ms / 1000, tz=UTC)
        return (
            f"v{self._deployed.version}",
            trained,
            timedelta(days=self.clustering.stale_after_days),
        )

    def stale(self, now_ms: int | None = None) -> tuple[bool, float]:
        """Whether the deployed model is older than clustering.stale_after_days, and its age."""
        if self._deployed is None:
            return False, 0.0
        now = _now_ms() if now_ms is None else now_ms
        age = (now - self._deployed.model.trained_at_ms) / MS_PER_DAY
        return age > self.clustering.stale_after_days, age

    def measure_drift(self) -> drift.DriftReport | None:
        """PSI of recent traffic against the deployed model's training data (None: no model
        or fewer than clustering.drift_min_samples recent requests)."""
        model = self._model
        if (
            model is None
            or not model.reference
            or len(self._recent) < self.clustering.drift_min_samples
        ):
            return None
        recent = model.normaliser.transform_many(list(self._recent))
        report = drift.measure(
            model.reference,
            recent,
            model.normaliser.feature_ranges,
            model.feature_names,
            self.clustering.drift_threshold,
        )
        self._drift = report
        return report

    async def check(self) -> None:
        """The periodic job: adopt a newer deployed model, measure drift, retrain on drift."""
        await self.load()
        report = await asyncio.to_thread(self.measure_drift)
        if report is not None and report.exceeded and self._running(JobKind.CLUSTERS) is None:
            log.warning(
                "feature drift above threshold: retraining",
                extra={"drift": report.drift, "threshold": report.threshold},
            )
            with contextlib.suppress(FailedPrecondition):
                self.train_clusters(reason="drift")
        stale, age = self.stale()
        if stale:
            log.warning("clustering model is stale", extra={"age_days": round(age, 2)})

    def status(self) -> ClusteringStatus:
        stale, age = self.stale()
        running = self._running(JobKind.CLUSTERS)
        return ClusteringStatus(
            self._deployed,
            stale,
            age,
            self._drift,
            running is not None and running.reason == "drift",
            self.latest_job(JobKind.CLUSTERS),
        )

    # Embeddings -------------------------------------------------------------------------

    def _users(self) -> tuple[list[str], list[RawFeatures]]:
        latest = {user: row for user, row in self._buffer}
        return list(latest), list(latest.values())

    def train_embeddings(
        self, *, epochs: int = 0, loss: str = "", labels: str = "", fine_tune: bool = False
    ) -> Job:
        """Start an embeddings job on the latest features of each buffered user."""
        e = self.embeddings
        if not e.enabled:
            raise FailedPrecondition("embeddings are disabled (embeddings.enabled)")
        if loss not in ("", "triplet", "contrastive"):
            raise InvalidRequest("loss", "one of triplet, contrastive")
        if labels not in ("", "none", "clusters"):
            raise InvalidRequest("labels", "one of none, clusters")
        if not 0 <= epochs <= 1000:
            raise InvalidRequest("epochs", "must lie in 0..1000 (0: the configured default)")
        if fine_tune and not self._embedding_models:
            raise FailedPrecondition("fine_tune: no earlier embedding model to start from")
        if labels == "clusters" and self._model is None:
            raise FailedPrecondition("labels: no clustering model is deployed")
        running = self._running(JobKind.EMBEDDINGS)
        if running is not None:
            return running
        users, rows = self._users()
        if len(users) < e.min_users:
            raise FailedPrecondition(
                f"{len(users)} users observed, embeddings need {e.min_users} (embeddings.min_users)"
            )
        start_from = self._embedding_models[-1] if fine_tune else None
        if start_from is not None:
            normaliser = start_from.normaliser
        elif self._model is not None:
            normaliser = self._model.normaliser
        else:
            normaliser = FeatureNormaliser.fit(rows, self.clustering.max_sources)
        features = normaliser.transform_many(rows)
        label_values = None
        if labels == "clusters" and self._model is not None:
            model = self._model
            label_values = model.assign_many(model.to_space(model.normaliser.transform_many(rows)))
        config: dict[str, Any] = {
            "epochs": epochs or e.epochs,
            "batch_size": e.batch_size,
            "learning_rate": e.learning_rate,
            "loss": loss or e.loss,
            "margin": e.margin,
            "patience": e.patience,
            "validation_fraction": e.validation_fraction,
            "seed": e.seed,
        }
        payload = {
            "features": features,
            "labels": label_values,
            "config": config,
            "start_from": None
            if start_from is None
            else (start_from.weights, start_from.config_json),
        }
        job = self._new_job(JobKind.EMBEDDINGS, "fine-tune" if fine_tune else "requested")
        job.total = epochs or e.epochs
        self._spawn(job, lambda j: self._train_embeddings(j, payload, normaliser, users, features))
        return job

    async def _train_embeddings(
        self,
        job: Job,
        payload: dict[str, Any],
        normaliser: FeatureNormaliser,
        users: list[str],
        features: np.ndarray[Any, Any],
    ) -> None:
        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        result = await run_in_process("allocsvc.learning.training:embeddings", payload, progress)
        model = EmbeddingModel(
            0, result["weights"], result["config"], normaliser, result["history"], _now_ms()
        )
        ensemble = self._ensemble([*self._embedding_models, model])
        embedded = await asyncio.to_thread(ensemble.embed, features)
        # Users erased while the job ran are neither stored nor searchable.
        keep = [i for i, user in enumerate(users) if user not in self._forget_after_job]
        users, embedded = [users[i] for i in keep], embedded[keep]
        # The store numbers the version (replicas share it) and keeps the users' embeddings.
        model = await self._store.save_embeddings(model, users, embedded)
        if self.embeddings.model_dir is not None:
            await asyncio.to_thread(self._save_embedding_model, model, self.embeddings.model_dir)
        self._embedding_models.append(model)
        self._install_index(users, embedded)
        for user in self._forget_after_job:
            self._drop_from_index(user)
        self._forget_after_job.clear()
        job.version = model.version
        job.state = JobState.SUCCEEDED
        last = result["history"][-1] if result["history"] else {}
        job.message = (
            f"version {model.version}: {len(result['history'])} epochs"
            f"{' (stopped early)' if result['stopped_early'] else ''},"
            f" validation loss {last.get('validation_loss', float('nan')):.4f}, {len(users)} users"
        )

    @staticmethod
    def _save_embedding_model(model: EmbeddingModel, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        stem = directory / f"embeddings-v{model.version}-{model.created_ms}"
        stem.with_suffix(".safetensors").write_bytes(model.weights)
        stem.with_suffix(".json").write_text(model.config_json)

    def _ensemble(self, models: list[EmbeddingModel]) -> Ensemble:
        """The newest `ensemble_size` of `models` that share the newest one's normaliser."""
        newest = models[-1]
        members = [
            NumpyEncoder.from_bytes(m.weights, m.config_json)
            for m in models[-self.embeddings.ensemble_size :]
            if m.normaliser == newest.normaliser
        ]
        return Ensemble(members)

    def _install_index(self, users: list[str], embedded: np.ndarray[Any, Any]) -> None:
        self._index = SimilarityIndex(embedded)
        self._index_users = users
        self._index_rows = {user: i for i, user in enumerate(users)}

    def _adopt_embeddings(self, models: list[EmbeddingModel], users: UserEmbeddings | None) -> None:
        """Serve stored embedding models (newest last) and their users' embeddings."""
        self._embedding_models = models
        if users is not None and users.version == models[-1].version and users.users:
            self._install_index(users.users, users.vectors)
        else:
            self._index, self._index_users, self._index_rows = None, [], {}
        log.info("embedding model loaded", extra={"version": models[-1].version})

    def find_similar(self, user_id: str, k: int) -> list[SimilarUser]:
        if not user_id:
            raise InvalidRequest("user_id", "must not be empty")
        if not 1 <= k <= 1000:
            raise InvalidRequest("k", "must lie in 1..1000")
        index = self._index
        if index is None:
            raise FailedPrecondition("no embedding model yet: call TrainEmbeddings first")
        row = self._index_rows.get(user_id)
        if row is None:
            raise NotFound(f"user {user_id!r} has no embedding (not in the last training data)")
        found = index.top_k(index.embeddings[row], k, exclude=row)
        return [SimilarUser(self._index_users[n.index], n.score) for n in found]

    @property
    def embedding_version(self) -> int:
        return self._embedding_models[-1].version if self._embedding_models else 0

    def embedding_history(self) -> list[dict[str, float]]:
        return self._embedding_models[-1].history if self._embedding_models else []

    def user_records(self, user_id: str) -> dict[str, list[dict[str, Any]]]:
        """What learning holds on a user (data-protection export): the user's rows of the
        training sample and the user's embedding in the similarity index."""
        out: dict[str, list[dict[str, Any]]] = {}
        sample = [row._asdict() for u, row in self._buffer if u == user_id]
        if sample:
            out["training_sample"] = sample
        row = self._index_rows.get(user_id)
        if row is not None and self._index is not None:
            out["similarity_index"] = [
                {
                    "user_id": user_id,
                    "embedding_version": self.embedding_version,
                    "embedding": [float(x) for x in self._index.embeddings[row]],
                }
            ]
        return out

    def held_user_ids(self) -> set[str]:
        """Every user id in the training sample and the similarity index."""
        return {u for u, _ in self._buffer} | set(self._index_rows)

    def forget_user(self, user_id: str) -> int:
        """Drop a user's rows from the traffic sample and the similarity index (erasure);
        returns how many records went. An embeddings job running now trained on a copy of the
        sample: the user is dropped from the index it builds too."""
        if self._running(JobKind.EMBEDDINGS) is not None:
            self._forget_after_job.add(user_id)
        before = len(self._buffer)
        kept = [(u, row) for u, row in self._buffer if u != user_id]
        self._buffer.clear()
        self._buffer.extend(kept)
        return before - len(kept) + self._drop_from_index(user_id)

    def _drop_from_index(self, user_id: str) -> int:
        row = self._index_rows.pop(user_id, None)
        if row is None or self._index is None:
            return 0
        keep = [i for i in range(len(self._index_users)) if i != row]
        self._index = SimilarityIndex(self._index.embeddings[keep])
        self._index_users = [self._index_users[i] for i in keep]
        self._index_rows = {u: i for i, u in enumerate(self._index_users)}
        return 1

    # Lifecycle --------------------------------------------------------------------------

    async def close(self) -> None:
        """Cancel running jobs (their training processes are killed)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


def build_learning(
    clustering: ClusteringSettings, embeddings: EmbeddingsSettings, pool: Any | None
) -> Learning:
    """The server's Learning: models in Postgres through `pool`, or in memory without one."""
    from allocsvc.learning.store import MemoryModelStore, PostgresModelStore

    store: ModelStore = MemoryModelStore() if pool is None else PostgresModelStore(pool)
    return Learning(clustering, embeddings, store)
