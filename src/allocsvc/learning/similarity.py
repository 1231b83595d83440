"""Embedding inference and similarity search in NumPy (no torch in the serving process).

`NumpyEncoder` runs a trained encoder (see `allocsvc.learning.embeddings`) from its safetensors
weights in inference mode: per hidden layer x·Wᵀ + b, batch norm with the running statistics,
ReLU (dropout is the identity at inference); a last linear layer; L2 normalisation.
`SimilarityIndex` answers cosine top-k for one query or a batch of queries.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load as load_arrays

BATCH_NORM_EPS = 1e-5  # torch.nn.BatchNorm1d's default

Matrix = npt.NDArray[np.float32]


def normalise_rows(matrix: npt.NDArray[np.floating]) -> Matrix:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.asarray(matrix / np.maximum(norms, 1e-12), dtype=np.float32)


class NumpyEncoder:
    """A trained encoder's forward pass from its safetensors bytes."""

    def __init__(self, weights: dict[str, npt.NDArray[np.float32]], hidden_layers: int) -> None:
        self._layers = []
        for i in range(hidden_layers):
            base = 4 * i  # Linear, BatchNorm1d, ReLU, Dropout
            w, b = weights[f"layers.{base}.weight"], weights[f"layers.{base}.bias"]
            bn = f"layers.{base + 1}"
            scale = weights[f"{bn}.weight"] / np.sqrt(weights[f"{bn}.running_var"] + BATCH_NORM_EPS)
            shift = weights[f"{bn}.bias"] - weights[f"{bn}.running_mean"] * scale
            self._layers.append((w.T.astype(np.float32), b, scale, shift))
        last = 4 * hidden_layers
        self._out = (
            weights[f"layers.{last}.weight"].T.astype(np.float32),
            weights[f"layers.{last}.bias"],
        )
        self.input_dim = int(self._layers[0][0].shape[0] if self._layers else self._out[0].shape[0])
        self.output_dim = int(self._out[0].shape[1])

    @classmethod
    def from_bytes(cls, data: bytes, config_json: str) -> NumpyEncoder:
        config = json.loads(config_json)
        arrays = {k: np.asarray(v, dtype=np.float32) for k, v in load_arrays(data).items()}
        return cls(arrays, len(config["hidden"]))

    def embed(self, features: npt.NDArray[np.floating]) -> Matrix:
        x = np.asarray(features, dtype=np.float32)
        for w, b, scale, shift in self._layers:
            x = np.maximum((x @ w + b) * scale + shift, 0.0)
        return normalise_rows(x @ self._out[0] + self._out[1])


class Ensemble:
    """Several encoders of the same input width; the embedding is the L2-normalised mean."""

    def __init__(self, encoders: Sequence[NumpyEncoder]) -> None:
        if not encoders:
            raise ValueError("an ensemble needs at least one encoder")
        if len({(e.input_dim, e.output_dim) for e in encoders}) != 1:
            raise ValueError("ensemble members must share input and output widths")
        self.encoders = list(encoders)

    def embed(self, features: npt.NDArray[np.floating]) -> Matrix:
        return normalise_rows(np.mean([e.embed(features) for e in self.encoders], axis=0))


@dataclass(frozen=True, slots=True)
class Neighbour:
    index: int
    score: float  # cosine similarity


class SimilarityIndex:
    """Cosine top-k over a fixed set of (normalised) embeddings."""

    def __init__(self, embeddings: npt.NDArray[np.floating]) -> None:
        self.embeddings = normalise_rows(np.atleast_2d(embeddings))

    def __len__(self) -> int:
        return len(self.embeddings)

    def top_k_batch(
        self, queries: npt.NDArray[np.floating], k: int, exclude: Sequence[int] | None = None
    ) -> list[list[Neighbour]]:
        """The k most similar rows for each query, best first (ties: lower index first);
        `exclude[i]`, when given, is a row left out of query i's answer (e.g. the query itself)."""
        scores = normalise_rows(np.atleast_2d(queries)) @ self.embeddings.T
        if exclude is not None:
            for i, row in enumerate(exclude):
                if row >= 0:
                    scores[i, row] = -np.inf
        k = min(k, len(self.embeddings) - (0 if exclude is None else 1))
        if k <= 0:
            return [[] for _ in range(len(scores))]
        answers = []
        for row in scores:
            # Stable order: by score descending, then index ascending.
            top = np.lexsort((np.arange(len(row)), -row))[:k]
            answers.append([Neighbour(int(i), float(row[i])) for i in top])
        return answers

    def top_k(self, query: npt.NDArray[np.floating], k: int, exclude: int = -1) -> list[Neighbour]:
        return self.top_k_batch(np.atleast_2d(query), k, [exclude])[0]
