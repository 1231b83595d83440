"""Clustering models as versioned JSON rows of clustering_models, one deployed per name."""

from __future__ import annotations

import asyncpg
import numpy as np
import pytest

from allocsvc.learning.features import FeatureNormaliser, RawFeatures
from allocsvc.learning.model import ClusterModel
from allocsvc.learning.store import PostgresModelStore
from allocsvc.store import PostgresStore

pytestmark = pytest.mark.integration


def model(seed: int) -> ClusterModel:
    rng = np.random.default_rng(seed)
    rows = [RawFeatures("web", "mobile", "google", h % 24, h % 7, float(h)) for h in range(50)]
    normaliser = FeatureNormaliser.fit(rows)
    centroids = rng.uniform(0, 1, size=(3, normaliser.dimensions))
    return ClusterModel(normaliser, centroids, {"silhouette": 0.5, "k": 3}, samples=50)


async def test_versions_and_the_deployed_model(migrated_db: str) -> None:
    store = await PostgresStore.connect(migrated_db)
    try:
        models = PostgresModelStore(store.pool)
        assert await models.deployed() is None
        first = await models.save(model(1), deploy=True)
        rejected = await models.save(model(2), deploy=False)
        assert (first.version, rejected.version) == (1, 2)
        deployed = await models.deployed()
        assert deployed is not None and deployed.version == 1
        assert np.array_equal(deployed.model.centroids, model(1).centroids)
        assert deployed.model.normaliser == model(1).normaliser
        third = await models.save(model(3), deploy=True)
        deployed = await models.deployed()
        assert deployed is not None and deployed.version == third.version == 3
        conn = await asyncpg.connect(migrated_db)
        try:
            rows = await conn.fetch(
                "SELECT version, deployed, k, jsonb_typeof(model) AS t FROM clustering_models"
                " ORDER BY version"
            )
        finally:
            await conn.close()
        assert [(r["version"], r["deployed"], r["k"], r["t"]) for r in rows] == [
            (1, False, 3, "object"),
            (2, False, 3, "object"),
            (3, True, 3, "object"),
        ]
    finally:
        await store.close()
