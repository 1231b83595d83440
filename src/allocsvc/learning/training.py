"""Entry points of training processes (see `allocsvc.learning.jobs`).

Payloads and results are plain data (lists, dicts, bytes, NumPy arrays); scikit-learn and torch
are imported here, inside the functions, so only the training process loads them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from allocsvc.learning.features import FeatureNormaliser, RawFeatures
from allocsvc.learning.jobs import Report
from allocsvc.learning.model import EncoderSpec


def clusters(payload: dict[str, Any], report: Report) -> dict[str, Any]:
    """payload: rows (RawFeatures tuples), auto (AutoK fields), gate (QualityGate fields),
    max_sources; to cluster on embeddings, also encoder (EncoderSpec JSON) and normaliser (the
    encoder's FeatureNormaliser JSON). Result: the model as JSON data, and whether it passed
    the quality gate."""
    from allocsvc.learning.clustering import AutoK, QualityGate, train, train_matrix

    rows = [RawFeatures(*row) for row in payload["rows"]]
    auto, gate = AutoK(**payload["auto"]), QualityGate(**payload["gate"])
    if payload.get("encoder") is None:
        trained = train(rows, auto, gate, payload["max_sources"], progress=report)
    else:
        encoder = EncoderSpec.from_json(payload["encoder"])
        normaliser = FeatureNormaliser.from_json(payload["normaliser"])
        features = normaliser.transform_many(rows)
        embedded = encoder.ensemble().embed(features).astype(np.float64)
        trained = train_matrix(
            embedded, normaliser, auto, gate, report, features=features, encoder=encoder
        )
    return {"model": trained.model.to_json(), "passed": trained.passed, "reasons": trained.reasons}


def embeddings(payload: dict[str, Any], report: Report) -> dict[str, Any]:
    """payload: features (rows x dims), labels (or None), config (TrainConfig fields),
    start_from ((safetensors bytes, config JSON) of an earlier model, or None).
    Result: the trained weights as safetensors bytes, their config, and the loss history."""
    from allocsvc.learning.embeddings import (
        EncoderConfig,
        TrainConfig,
        Trainer,
        from_bytes,
        to_bytes,
    )

    start_from = None
    if payload.get("start_from") is not None:
        weights, config_json = payload["start_from"]
        start_from = from_bytes(weights, EncoderConfig.from_json(config_json))
    labels = payload.get("labels")
    result = Trainer(TrainConfig(**payload["config"])).fit(
        np.asarray(payload["features"], dtype=np.float64),
        None if labels is None else np.asarray(labels, dtype=np.int64),
        start_from=start_from,
        progress=lambda epoch, epochs, _train, _val: report(epoch, epochs),
    )
    return {
        "weights": to_bytes(result.encoder),
        "config": result.encoder.config.to_json(),
        "history": result.history,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "device": result.device,
    }
