"""Embedding models as versioned rows (safetensors bytes, JSON config), the newest with its
users' embeddings; erasure removes a user's embedding; a new Learning loads what was stored."""

from __future__ import annotations

import json

import asyncpg
import numpy as np
import pytest
from safetensors.numpy import save as save_arrays

from allocsvc.config import ClusteringSettings, EmbeddingsSettings
from allocsvc.learning.features import FeatureNormaliser, RawFeatures
from allocsvc.learning.service import Learning
from allocsvc.learning.similarity import NumpyEncoder, SimilarityIndex
from allocsvc.learning.store import EmbeddingModel, PostgresModelStore
from allocsvc.store import PostgresStore

pytestmark = pytest.mark.integration

HIDDEN = [6]


def encoder_model(seed: int, normaliser: FeatureNormaliser) -> EmbeddingModel:
    """A small random encoder in the trainer's layout (Linear, BatchNorm1d, ReLU, Dropout,
    Linear), so NumpyEncoder can run it."""
    rng = np.random.default_rng(seed)
    d, h, out = normaliser.dimensions, HIDDEN[0], 4
    weights = {
        "layers.0.weight": rng.normal(size=(h, d)),
        "layers.0.bias": rng.normal(size=h),
        "layers.1.weight": rng.uniform(0.5, 1.5, size=h),
        "layers.1.bias": rng.normal(size=h),
        "layers.1.running_mean": rng.normal(size=h),
        "layers.1.running_var": rng.uniform(0.5, 2, size=h),
        "layers.4.weight": rng.normal(size=(out, h)),
        "layers.4.bias": rng.normal(size=out),
    }
    data = save_arrays({k: v.astype(np.float32) for k, v in weights.items()})
    config = json.dumps({"input_dim": d, "hidden": HIDDEN, "output_dim": out, "dropout": 0.2})
    return EmbeddingModel(0, data, config, normaliser, [{"epoch": 1.0, "train_loss": 0.5}])


def normaliser() -> FeatureNormaliser:
    rows = [RawFeatures("web", "mobile", "google", h % 24, h % 7, float(h)) for h in range(30)]
    return FeatureNormaliser.fit(rows)


async def test_versions_newest_users_and_erasure(migrated_db: str) -> None:
    store = await PostgresStore.connect(migrated_db)
    try:
        models = PostgresModelStore(store.pool)
        assert await models.latest_embedding_version() == 0
        assert await models.latest_embeddings(3) == ([], None)
        scaler = normaliser()
        first_vectors = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
        first = await models.save_embeddings(
            encoder_model(1, scaler), ["a", "b", "c"], first_vectors
        )
        users = [f"user-{i}" for i in range(50)]
        vectors = np.random.default_rng(2).normal(size=(50, 4)).astype(np.float32)
        second = await models.save_embeddings(encoder_model(2, scaler), users, vectors)
        assert (first.version, second.version) == (1, 2)
        assert await models.latest_embedding_version() == 2

        loaded, stored_users = await models.latest_embeddings(2)
        assert [m.version for m in loaded] == [1, 2]
        assert loaded[1].weights == encoder_model(2, scaler).weights
        assert loaded[1].normaliser == scaler
        assert loaded[1].history == [{"epoch": 1.0, "train_loss": 0.5}]
        features = scaler.transform_many([RawFeatures("web", "mobile", "google", 3, 2, 4.0)])
        original = encoder_model(2, scaler)
        assert np.array_equal(
            NumpyEncoder.from_bytes(loaded[1].weights, loaded[1].config_json).embed(features),
            NumpyEncoder.from_bytes(original.weights, original.config_json).embed(features),
        )
        assert stored_users is not None and stored_users.version == 2
        assert stored_users.users == users
        assert np.array_equal(stored_users.vectors, vectors)

        conn = await asyncpg.connect(migrated_db)
        try:
            # Only the newest model keeps user embeddings.
            assert await conn.fetchval("SELECT count(*) FROM user_embeddings") == 50
            assert "user_embeddings" in await conn.fetchval(
                "SELECT array_agg(t) FROM user_data_tables() t"
            )
            erased = await conn.fetch("SELECT * FROM erase_user_rows('user-7', 'user:erased')")
            assert {r["table_name"]: r["removed"] for r in erased}["user_embeddings"] == 1
        finally:
            await conn.close()
        _, after = await models.latest_embeddings(1)
        assert after is not None and "user-7" not in after.users and len(after.users) == 49

        # A new process's Learning serves the stored model: the same neighbours as the index
        # built from the stored vectors.
        learn = Learning(ClusteringSettings(), EmbeddingsSettings(ensemble_size=1), models)
        await learn.load()
        assert learn.embedding_version == 2
        index = SimilarityIndex(np.delete(vectors, 7, axis=0))
        kept = [u for u in users if u != "user-7"]
        expected = [kept[n.index] for n in index.top_k(index.embeddings[0], 5, exclude=0)]
        assert [u.user_id for u in learn.find_similar("user-0", 5)] == expected
    finally:
        await store.close()
