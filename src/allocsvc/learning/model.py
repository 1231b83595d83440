"""A trained clustering model as served: centroids, feature scaler, metrics, drift reference.

Serialised as JSON (never pickle). Serving assigns the nearest centroid on the cached model
with `math.dist` over centroids kept as tuples (no scikit-learn, no NumPy per request: for ≤8
centroids of 20 numbers this is about 3× faster than NumPy's per-call overhead, see
bench/RESULTS.md). A model clustered on embeddings carries its encoder (safetensors bytes in
base64, with the encoder's JSON config) and embeds each request with NumPy first.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from allocsvc.learning.features import FeatureNormaliser, RawFeatures
from allocsvc.learning.similarity import Ensemble, NumpyEncoder

FORMAT_VERSION = 1


@dataclass(frozen=True)
class EncoderSpec:
    """The embedding model a clustering model's space comes from: its version and the
    members of its ensemble as (safetensors bytes, encoder config JSON)."""

    version: int
    members: tuple[tuple[bytes, str], ...]

    def ensemble(self) -> Ensemble:
        return Ensemble([NumpyEncoder.from_bytes(w, c) for w, c in self.members])

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "members": [
                {"safetensors_base64": base64.b64encode(w).decode("ascii"), "config": c}
                for w, c in self.members
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EncoderSpec:
        return cls(
            int(data["version"]),
            tuple(
                (base64.b64decode(m["safetensors_base64"], validate=True), str(m["config"]))
                for m in data["members"]
            ),
        )


@dataclass(frozen=True)
class ClusterModel:
    """k centroids in the normaliser's feature space, with what was measured when training."""

    normaliser: FeatureNormaliser
    centroids: npt.NDArray[np.float64]  # k x dimensions
    metrics: dict[str, Any] = field(default_factory=dict)
    # Bin shares of each feature in the training data (see allocsvc.learning.drift).
    reference: list[list[float]] = field(default_factory=list)
    samples: int = 0
    trained_at_ms: int = 0
    seed: int = 0
    # Set: the centroids are in this encoder's embedding space, not the feature space.
    encoder: EncoderSpec | None = None
    _rows: tuple[tuple[float, ...], ...] = field(init=False, repr=False, compare=False)
    _ensemble: Ensemble | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Serving's copies: centroids as tuples for math.dist, the encoder ready to run.
        rows = tuple(tuple(float(x) for x in row) for row in self.centroids.tolist())
        object.__setattr__(self, "_rows", rows)
        ensemble = None if self.encoder is None else self.encoder.ensemble()
        object.__setattr__(self, "_ensemble", ensemble)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def feature_names(self) -> list[str]:
        return self.normaliser.feature_names

    @property
    def embedding_version(self) -> int:
        """Version of the embedding model whose space the centroids are in; 0: features."""
        return 0 if self.encoder is None else self.encoder.version

    def to_space(self, features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Feature vectors (rows) in the space the centroids live in."""
        if self._ensemble is None:
            return features
        return self._ensemble.embed(features).astype(np.float64)

    def assign_vector(self, vector: Sequence[float]) -> int:
        """Index of the nearest centroid to a vector of the centroids' space (Euclidean
        distance; ties: lowest index)."""
        best, nearest = math.inf, 0
        for i, centroid in enumerate(self._rows):
            distance = math.dist(vector, centroid)
            if distance < best:
                best, nearest = distance, i
        return nearest

    def assign(self, row: RawFeatures) -> int:
        """The cluster of one request (serving)."""
        vector = self.normaliser.transform(row)
        if self._ensemble is not None:
            vector = self._ensemble.embed(np.array([vector], dtype=np.float32))[0].tolist()
        return self.assign_vector(vector)

    def assign_many(self, matrix: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        """Nearest centroid of each row of a matrix in the centroids' space (`to_space`)."""
        distances = (
            np.einsum("ij,ij->i", matrix, matrix)[:, None]
            - 2.0 * matrix @ self.centroids.T
            + np.einsum("ij,ij->i", self.centroids, self.centroids)[None, :]
        )
        nearest: npt.NDArray[np.int64] = np.argmin(distances, axis=1).astype(np.int64)
        return nearest

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "kind": "kmeans",
            "normaliser": self.normaliser.to_json(),
            "feature_names": self.feature_names,
            "centroids": self.centroids.tolist(),
            "metrics": self.metrics,
            "reference": self.reference,
            "samples": self.samples,
            "trained_at_ms": self.trained_at_ms,
            "seed": self.seed,
            **({} if self.encoder is None else {"encoder": self.encoder.to_json()}),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), allow_nan=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClusterModel:
        if data.get("format") != FORMAT_VERSION or data.get("kind") != "kmeans":
            raise ValueError(f"not a clustering model of format {FORMAT_VERSION}")
        normaliser = FeatureNormaliser.from_json(data["normaliser"])
        centroids = np.array(data["centroids"], dtype=np.float64)
        encoder = None if data.get("encoder") is None else EncoderSpec.from_json(data["encoder"])
        width = (
            normaliser.dimensions if encoder is None else encoder.ensemble().encoders[0].output_dim
        )
        if centroids.ndim != 2 or centroids.shape[1] != width:
            raise ValueError(f"centroids must be k x {width}, got {list(centroids.shape)}")
        return cls(
            normaliser,
            centroids,
            dict(data.get("metrics", {})),
            [list(map(float, shares)) for shares in data.get("reference", [])],
            int(data.get("samples", 0)),
            int(data.get("trained_at_ms", 0)),
            int(data.get("seed", 0)),
            encoder,
        )

    @classmethod
    def loads(cls, text: str) -> ClusterModel:
        loaded: dict[str, Any] = json.loads(text)
        return cls.from_json(loaded)
