"""Where models live: versioned rows of `clustering_models` and `embedding_models`, or memory.

A clustering model is stored as JSON (`ClusterModel.to_json`); at most one version per name is
deployed. An embedding model is its safetensors bytes with JSON config and normaliser, and the
newest one keeps the embeddings of the users it was trained on (`user_embeddings`), so that a
restarted server or another replica answers FindSimilarUsers the same way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from allocsvc.learning.features import FeatureNormaliser
from allocsvc.learning.model import ClusterModel

DEFAULT_NAME = "default"


@dataclass(frozen=True)
class StoredModel:
    version: int
    model: ClusterModel
    deployed: bool
    created_ms: int
    deployed_ms: int | None


@dataclass
class EmbeddingModel:
    """A trained encoder: safetensors weights, their config JSON, the normaliser in front."""

    version: int
    weights: bytes
    config_json: str
    normaliser: FeatureNormaliser
    history: list[dict[str, float]] = field(default_factory=list)
    created_ms: int = 0


@dataclass(frozen=True)
class UserEmbeddings:
    """The embeddings of the users a model was trained on, in similarity-index order."""

    version: int
    users: list[str]
    vectors: npt.NDArray[np.float32]


class ModelStore(Protocol):
    async def save(self, model: ClusterModel, *, deploy: bool, name: str = ...) -> StoredModel:
        """Store a new version (deploying it replaces the deployed one)."""
        ...

    async def deployed(self, name: str = ...) -> StoredModel | None: ...

    async def deployed_version(self, name: str = ...) -> int:
        """Version of the deployed model (0: none); cheap enough to poll."""
        ...

    async def save_embeddings(
        self,
        model: EmbeddingModel,
        users: Sequence[str],
        vectors: npt.NDArray[np.float32],
        name: str = ...,
    ) -> EmbeddingModel:
        """Store a new embedding model version (the version is the store's) with the users'
        embeddings, which replace those of earlier versions."""
        ...

    async def latest_embedding_version(self, name: str = ...) -> int: ...

    async def latest_embeddings(
        self, count: int, name: str = ...
    ) -> tuple[list[EmbeddingModel], UserEmbeddings | None]:
        """The newest `count` models (oldest first) and the newest one's user embeddings."""
        ...


class MemoryModelStore:
    def __init__(self) -> None:
        self._models: dict[str, list[StoredModel]] = {}
        self._embeddings: dict[str, list[EmbeddingModel]] = {}
        self._users: dict[str, UserEmbeddings] = {}

    async def save(
        self, model: ClusterModel, *, deploy: bool, name: str = DEFAULT_NAME
    ) -> StoredModel:
        versions = self._models.setdefault(name, [])
        now = time.time_ns() // 1_000_000
        if deploy:
            versions[:] = [
                StoredModel(m.version, m.model, False, m.created_ms, m.deployed_ms)
                for m in versions
            ]
        stored = StoredModel(len(versions) + 1, model, deploy, now, now if deploy else None)
        versions.append(stored)
        return stored

    async def deployed(self, name: str = DEFAULT_NAME) -> StoredModel | None:
        return next((m for m in self._models.get(name, []) if m.deployed), None)

    async def deployed_version(self, name: str = DEFAULT_NAME) -> int:
        found = await self.deployed(name)
        return 0 if found is None else found.version

    async def save_embeddings(
        self,
        model: EmbeddingModel,
        users: Sequence[str],
        vectors: npt.NDArray[np.float32],
        name: str = DEFAULT_NAME,
    ) -> EmbeddingModel:
        versions = self._embeddings.setdefault(name, [])
        model.version = len(versions) + 1
        versions.append(model)
        self._users[name] = UserEmbeddings(model.version, list(users), vectors)
        return model

    async def latest_embedding_version(self, name: str = DEFAULT_NAME) -> int:
        return len(self._embeddings.get(name, []))

    async def latest_embeddings(
        self, count: int, name: str = DEFAULT_NAME
    ) -> tuple[list[EmbeddingModel], UserEmbeddings | None]:
        return self._embeddings.get(name, [])[-count:], self._users.get(name)


def _ms(value: Any) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)


class PostgresModelStore:
    """Models in the `clustering_models` table (sql/001_core.sql), through a pool whose
    connections encode and decode json/jsonb (`PostgresStore.pool`)."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def save(
        self, model: ClusterModel, *, deploy: bool, name: str = DEFAULT_NAME
    ) -> StoredModel:
        metrics = {k: v for k, v in model.metrics.items() if k != "candidates"}
        async with self._pool.acquire() as conn, conn.transaction():
            # One writer per name at a time, so versions do not collide between replicas.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('clustering:' || $1))", name)
            if deploy:
                await conn.execute(
                    "UPDATE clustering_models SET deployed = false WHERE name = $1 AND deployed",
                    name,
                )
            row = await conn.fetchrow(
                """
                INSERT INTO clustering_models
                    (name, version, k, feature_names, samples, model, metrics, deployed,
                     deployed_at)
                SELECT $1, COALESCE(MAX(version), 0) + 1, $2::smallint, $3::text[], $4::bigint,
                       $5::jsonb, $6::jsonb, $7::boolean, CASE WHEN $7::boolean THEN now() END
                FROM clustering_models WHERE name = $1
                RETURNING version, created_at, deployed_at
                """,
                name,
                model.k,
                model.feature_names,
                model.samples,
                model.to_json(),
                metrics,
                deploy,
            )
        return StoredModel(
            row["version"], model, deploy, _ms(row["created_at"]) or 0, _ms(row["deployed_at"])
        )

    async def deployed_version(self, name: str = DEFAULT_NAME) -> int:
        version = await self._pool.fetchval(
            "SELECT version FROM clustering_models WHERE name = $1 AND deployed", name
        )
        return 0 if version is None else int(version)

    async def deployed(self, name: str = DEFAULT_NAME) -> StoredModel | None:
        row = await self._pool.fetchrow(
            "SELECT version, model, created_at, deployed_at"
            " FROM clustering_models WHERE name = $1 AND deployed",
            name,
        )
        if row is None:
            return None
        return StoredModel(
            row["version"],
            ClusterModel.from_json(row["model"]),
            True,
            _ms(row["created_at"]) or 0,
            _ms(row["deployed_at"]),
        )

    async def save_embeddings(
        self,
        model: EmbeddingModel,
        users: Sequence[str],
        vectors: npt.NDArray[np.float32],
        name: str = DEFAULT_NAME,
    ) -> EmbeddingModel:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('embeddings:' || $1))", name)
            row = await conn.fetchrow(
                """
                INSERT INTO embedding_models
                    (name, version, config, normaliser, weights, history, users)
                SELECT $1, COALESCE(MAX(version), 0) + 1, $2::jsonb, $3::jsonb, $4::bytea,
                       $5::jsonb, $6::integer
                FROM embedding_models WHERE name = $1
                RETURNING id, version, created_at
                """,
                name,
                json.loads(model.config_json),
                model.normaliser.to_json(),
                model.weights,
                model.history,
                len(users),
            )
            # Only the newest model keeps user embeddings (personal data: keep no more).
            await conn.execute(
                "DELETE FROM user_embeddings WHERE model_id IN"
                " (SELECT id FROM embedding_models WHERE name = $1 AND id <> $2)",
                name,
                row["id"],
            )
            await conn.copy_records_to_table(
                "user_embeddings",
                records=[
                    (row["id"], user, i, vector)
                    for i, (user, vector) in enumerate(zip(users, vectors.tolist(), strict=True))
                ],
                columns=["model_id", "user_id", "position", "embedding"],
            )
        model.version = int(row["version"])
        model.created_ms = _ms(row["created_at"]) or model.created_ms
        return model

    async def latest_embedding_version(self, name: str = DEFAULT_NAME) -> int:
        version = await self._pool.fetchval(
            "SELECT MAX(version) FROM embedding_models WHERE name = $1", name
        )
        return 0 if version is None else int(version)

    async def latest_embeddings(
        self, count: int, name: str = DEFAULT_NAME
    ) -> tuple[list[EmbeddingModel], UserEmbeddings | None]:
        rows = await self._pool.fetch(
            "SELECT id, version, config, normaliser, weights, history, created_at"
            " FROM embedding_models WHERE name = $1 ORDER BY version DESC LIMIT $2",
            name,
            count,
        )
        if not rows:
            return [], None
        models = [
            EmbeddingModel(
                int(r["version"]),
                bytes(r["weights"]),
                json.dumps(r["config"]),
                FeatureNormaliser.from_json(r["normaliser"]),
                list(r["history"]),
                _ms(r["created_at"]) or 0,
            )
            for r in reversed(rows)
        ]
        users = await self._pool.fetch(
            "SELECT user_id, embedding FROM user_embeddings WHERE model_id = $1 ORDER BY position",
            rows[0]["id"],
        )
        if not users:
            return models, None
        vectors = np.array([u["embedding"] for u in users], dtype=np.float32)
        return models, UserEmbeddings(models[-1].version, [u["user_id"] for u in users], vectors)
