"""Replicas share a model store: polling adopts what another Learning saved; a store that
cannot be read is logged once per outage, not at every poll."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from allocsvc.config import ClusteringSettings, EmbeddingsSettings
from allocsvc.learning.features import FeatureNormaliser, RawFeatures
from allocsvc.learning.model import ClusterModel
from allocsvc.learning.service import Learning
from allocsvc.learning.store import MemoryModelStore

pytestmark = pytest.mark.unit

ROWS = [RawFeatures("web", "mobile", "google", h % 24, h % 7, float(h)) for h in range(40)]


def learning(store: MemoryModelStore) -> Learning:
    return Learning(ClusteringSettings(), EmbeddingsSettings(), store)


async def test_poll_adopts_the_model_another_replica_deployed() -> None:
    shared = MemoryModelStore()
    trainer, other = learning(shared), learning(shared)
    normaliser = FeatureNormaliser.fit(ROWS)
    centroids = np.random.default_rng(2).uniform(0, 1, size=(3, normaliser.dimensions))
    await other.poll()
    assert other.status().model is None
    stored = await shared.save(ClusterModel(normaliser, centroids), deploy=True)
    trainer._adopt(stored)
    await other.poll()
    status = other.status().model
    assert status is not None and status.version == 1
    assert [other._model.assign(r) for r in ROWS] == [trainer._model.assign(r) for r in ROWS]  # type: ignore[union-attr]
    # A rejected (not deployed) model changes nothing.
    await shared.save(ClusterModel(normaliser, centroids[:2]), deploy=False)
    await other.poll()
    assert other.status().model.version == 1  # type: ignore[union-attr]


class UnreadableStore(MemoryModelStore):
    def __init__(self) -> None:
        super().__init__()
        self.down = True

    async def deployed_version(self, name: str = "default") -> int:
        if self.down:
            raise ConnectionRefusedError("store down")
        return await super().deployed_version(name)


async def test_a_store_that_is_down_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    store = UnreadableStore()
    learn = learning(store)
    with caplog.at_level(logging.INFO, logger="allocsvc.learning.service"):
        for _ in range(5):
            await learn.poll()
        store.down = False
        await learn.poll()
        await learn.poll()
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("cannot read learning models from the store") == 1
    assert messages.count("learning models readable again") == 1
