"""User embeddings with PyTorch (SPEC §8): encoder, losses, trainer, safe saving and loading.

The only module of the package that imports torch; it runs in training processes and in tests,
never in the serving process (serving embeds with `allocsvc.learning.similarity.NumpyEncoder`,
the same arithmetic in NumPy from the same safetensors weights).

- Encoder: input → 64 → 48 → 32; each hidden layer is Linear, BatchNorm1d, ReLU, Dropout(0.2);
  the output is L2-normalised, so squared distances are 2 − 2·cosine.
- Triplet loss: mean(max(0, ‖a − p‖² − ‖a − n‖² + margin)) (Schroff et al., FaceNet, 2015).
- Contrastive loss: y·d² + (1 − y)·max(0, margin − d)², d = ‖x1 − x2‖, y = 1 for a similar pair
  (Hadsell, Chopra & LeCun, 2006).
- With class labels, a positive is another row of the anchor's class and a negative a row of
  another class; without labels a positive is a noisy view of the anchor itself (Gaussian noise
  and feature dropout) and a negative is a random other row.
- Models are saved as safetensors (tensors only) with their config as JSON metadata; loading
  never unpickles anything.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file
from torch import nn

Loss = Literal["triplet", "contrastive"]
# Called after each epoch with (epoch, epochs, train loss, validation loss).
Progress = Callable[[int, int, float, float], None]


@dataclass(frozen=True, slots=True)
class EncoderConfig:
    input_dim: int
    hidden: tuple[int, ...] = (64, 48)
    output_dim: int = 32
    dropout: float = 0.2

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> EncoderConfig:
        data = json.loads(text)
        return cls(
            int(data["input_dim"]),
            tuple(int(h) for h in data["hidden"]),
            int(data["output_dim"]),
            float(data["dropout"]),
        )


class Encoder(nn.Module):
    """Feature vector → L2-normalised embedding."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = config.input_dim
        for hidden in config.hidden:
            layers += [
                nn.Linear(width, hidden),
                nn.BatchNorm1d(hidden),
                nn.ReLU(),
                nn.Dropout(config.dropout),
            ]
            width = hidden
        layers.append(nn.Linear(width, config.output_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(x), p=2.0, dim=1)


def triplet_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float
) -> torch.Tensor:
    d_pos = (anchor - positive).pow(2).sum(1)
    d_neg = (anchor - negative).pow(2).sum(1)
    return F.relu(d_pos - d_neg + margin).mean()


def contrastive_loss(
    first: torch.Tensor, second: torch.Tensor, similar: torch.Tensor, margin: float
) -> torch.Tensor:
    distance = (first - second).pow(2).sum(1).clamp_min(1e-12).sqrt()
    return (similar * distance.pow(2) + (1 - similar) * F.relu(margin - distance).pow(2)).mean()


@dataclass(frozen=True, slots=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    loss: Loss = "triplet"
    margin: float = 0.5
    patience: int = 5  # epochs without a better validation loss before stopping
    validation_fraction: float = 0.2
    noise: float = 0.05  # unlabelled positives: Gaussian noise ...
    feature_dropout: float = 0.1  # ... and this share of features zeroed
    seed: int = 0
    threads: int = 1


@dataclass
class TrainResult:
    encoder: Encoder
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    device: str = "cpu"


def device() -> torch.device:
    """A GPU when one is present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _triplets(
    rows: int, labels: npt.NDArray[np.int64] | None, rng: np.random.Generator
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(anchor, positive, negative) row indices, one triplet per row; without labels the
    positive index is the anchor (its noisy view is made later)."""
    anchors = rng.permutation(rows).astype(np.int64)
    if labels is None:
        negatives = (anchors + rng.integers(1, max(rows, 2), size=rows)) % rows
        return anchors, anchors.copy(), negatives.astype(np.int64)
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    others = {c: np.flatnonzero(labels != c) for c in by_class}
    positives = np.empty(rows, dtype=np.int64)
    negatives = np.empty(rows, dtype=np.int64)
    for i, a in enumerate(anchors):
        same = by_class[labels[a]]
        positives[i] = same[rng.integers(len(same))]
        other = others[labels[a]]
        negatives[i] = other[rng.integers(len(other))] if len(other) else a
    return anchors, positives, negatives


class Trainer:
    """Trains an encoder with validation, early stopping and a loss history."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def _views(self, x: torch.Tensor, generator: torch.Generator, labelled: bool) -> torch.Tensor:
        if labelled:
            return x
        keep = (torch.rand(x.shape, generator=generator) >= self.config.feature_dropout).to(x)
        noise = torch.randn(x.shape, generator=generator).to(x) * self.config.noise
        return x * keep + noise

    def _loss(
        self,
        encoder: Encoder,
        x: torch.Tensor,
        batch: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]],
        generator: torch.Generator,
        labelled: bool,
    ) -> torch.Tensor:
        a_idx, p_idx, n_idx = (torch.as_tensor(i) for i in batch)
        anchor = encoder(x[a_idx])
        positive = encoder(self._views(x[p_idx], generator, labelled))
        negative = encoder(x[n_idx])
        margin = self.config.margin
        if self.config.loss == "triplet":
            return triplet_loss(anchor, positive, negative, margin)
        # Contrastive: each anchor once with its positive, once with its negative.
        ones = torch.ones(len(a_idx), device=x.device)
        return 0.5 * (
            contrastive_loss(anchor, positive, ones, margin)
            + contrastive_loss(anchor, negative, 0 * ones, margin)
        )

    def fit(
        self,
        features: npt.NDArray[np.float64],
        labels: Sequence[int] | npt.NDArray[np.int64] | None = None,
        *,
        start_from: Encoder | None = None,
        progress: Progress | None = None,
    ) -> TrainResult:
        """Train on `features` (rows), with class `labels` when given; `start_from` fine-tunes
        a copy of an earlier encoder instead of starting from random weights."""
        cfg = self.config
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        on = device()
        x_all = np.asarray(features, dtype=np.float32)
        y_all = None if labels is None else np.asarray(labels, dtype=np.int64)
        if len(x_all) < 4:
            raise ValueError("need at least 4 rows to train")
        order = rng.permutation(len(x_all))
        n_val = max(2, round(len(x_all) * cfg.validation_fraction))
        val_idx, train_idx = order[:n_val], order[n_val:]
        x_train = torch.as_tensor(x_all[train_idx], device=on)
        x_val = torch.as_tensor(x_all[val_idx], device=on)
        y_train = None if y_all is None else y_all[train_idx]
        y_val = None if y_all is None else y_all[val_idx]
        labelled = y_all is not None

        encoder = Encoder(EncoderConfig(x_all.shape[1]))
        if start_from is not None:
            if start_from.config.input_dim != x_all.shape[1]:
                raise ValueError("the earlier model was trained on another feature width")
            encoder = Encoder(start_from.config)
            encoder.load_state_dict(start_from.state_dict())
        encoder.to(on)
        lr = cfg.learning_rate * (0.1 if start_from is not None else 1.0)
        optimiser = torch.optim.Adam(encoder.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        val_triplets = _triplets(len(x_val), y_val, np.random.default_rng(cfg.seed + 1))
        val_generator_seed = cfg.seed + 2

        result = TrainResult(encoder, device=str(on))
        best = math.inf
        best_state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        waited = 0
        for epoch in range(1, cfg.epochs + 1):
            encoder.train()
            a, p, n = _triplets(len(x_train), y_train, rng)
            total, batches = 0.0, 0
            for start in range(0, len(a), cfg.batch_size):
                stop = start + cfg.batch_size
                if len(a[start:stop]) < 2:  # batch norm needs two rows
                    continue
                optimiser.zero_grad()
                loss = self._loss(
                    encoder,
                    x_train,
                    (a[start:stop], p[start:stop], n[start:stop]),
                    generator,
                    labelled,
                )
                loss.backward()  # type: ignore[no-untyped-call]
                optimiser.step()
                total += float(loss.detach())
                batches += 1
            encoder.eval()
            with torch.no_grad():
                val_loss = float(
                    self._loss(
                        encoder,
                        x_val,
                        val_triplets,
                        torch.Generator().manual_seed(val_generator_seed),
                        labelled,
                    )
                )
            train_loss = total / max(batches, 1)
            result.history.append(
                {"epoch": epoch, "train_loss": train_loss, "validation_loss": val_loss}
            )
            if progress is not None:
                progress(epoch, cfg.epochs, train_loss, val_loss)
            if val_loss < best - 1e-6:
                best, waited, result.best_epoch = val_loss, 0, epoch
                best_state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
            else:
                waited += 1
                if waited >= cfg.patience:
                    result.stopped_early = True
                    break
        encoder.load_state_dict(best_state)
        encoder.eval()
        result.encoder = encoder.cpu()
        return result


def embed(
    encoder: Encoder, features: npt.NDArray[np.float64], batch_size: int = 4096
) -> npt.NDArray[np.float32]:
    """Embeddings of many rows (inference mode, in batches)."""
    encoder.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            chunk = torch.as_tensor(np.asarray(features[start : start + batch_size], np.float32))
            out.append(encoder(chunk).numpy())
    if not out:
        return np.zeros((0, encoder.config.output_dim), dtype=np.float32)
    return np.concatenate(out)


def _tensors(encoder: Encoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}


def to_bytes(encoder: Encoder) -> bytes:
    """The encoder as safetensors bytes, its config in the metadata."""
    return save_bytes(_tensors(encoder), metadata={"config": encoder.config.to_json()})


def from_bytes(data: bytes, config: EncoderConfig) -> Encoder:
    encoder = Encoder(config)
    encoder.load_state_dict(load_bytes(data))
    encoder.eval()
    return encoder


def save(encoder: Encoder, path: Path) -> None:
    save_file(_tensors(encoder), str(path), metadata={"config": encoder.config.to_json()})


def load(path: Path) -> Encoder:
    """An encoder saved by `save` (tensors and JSON only: nothing is unpickled)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    if "config" not in metadata:
        raise ValueError(f"{path}: no encoder config in the safetensors metadata")
    encoder = Encoder(EncoderConfig.from_json(metadata["config"]))
    encoder.load_state_dict(tensors)
    encoder.eval()
    return encoder
