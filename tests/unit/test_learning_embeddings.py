"""Embeddings on synthetic users from known classes: loss falls, held-out triplet accuracy, safe
saving and loading, NumPy inference = torch inference, similarity top-k = brute force, ensemble,
fine-tuning, and embeddings as the input of clustering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sklearn.metrics import adjusted_rand_score  # noqa: E402

from allocsvc.learning import embeddings as emb  # noqa: E402
from allocsvc.learning.clustering import AutoK, QualityGate, train_matrix  # noqa: E402
from allocsvc.learning.features import FeatureNormaliser  # noqa: E402
from allocsvc.learning.similarity import Ensemble, NumpyEncoder, SimilarityIndex  # noqa: E402

pytestmark = pytest.mark.unit

DIMS = 20
CLASSES = 5


def users(n: int, seed: int, noise: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """Users of CLASSES known classes: a class prototype plus Gaussian noise, 20 features."""
    prototypes = np.random.default_rng(123).uniform(0, 1, size=(CLASSES, DIMS))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, size=n)
    return prototypes[labels] + rng.normal(0, noise, size=(n, DIMS)), labels


def triplet_accuracy(embedded: np.ndarray, labels: np.ndarray, seed: int) -> float:
    rng = np.random.default_rng(seed)
    hits = 0
    trials = 2000
    for _ in range(trials):
        a = int(rng.integers(len(labels)))
        same = np.flatnonzero((labels == labels[a]) & (np.arange(len(labels)) != a))
        other = np.flatnonzero(labels != labels[a])
        p, n = int(rng.choice(same)), int(rng.choice(other))
        d_pos = np.sum((embedded[a] - embedded[p]) ** 2)
        d_neg = np.sum((embedded[a] - embedded[n]) ** 2)
        hits += bool(d_pos < d_neg)
    return hits / trials


@pytest.fixture(scope="module")
def trained() -> emb.TrainResult:
    x, y = users(1200, seed=1)
    return emb.Trainer(emb.TrainConfig(epochs=15, seed=0)).fit(x, y)


def test_encoder_shape_and_normalised_output() -> None:
    encoder = emb.Encoder(emb.EncoderConfig(DIMS))
    layers = [type(m).__name__ for m in encoder.layers]
    assert layers == [
        "Linear", "BatchNorm1d", "ReLU", "Dropout",
        "Linear", "BatchNorm1d", "ReLU", "Dropout",
        "Linear",
    ]  # fmt: skip
    widths = [(m.in_features, m.out_features) for m in encoder.layers if hasattr(m, "in_features")]
    assert widths == [(DIMS, 64), (64, 48), (48, 32)]
    assert encoder.layers[3].p == pytest.approx(0.2)
    out = emb.embed(encoder, users(10, seed=2)[0])
    assert out.shape == (10, 32)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_loss_falls_and_held_out_triplet_accuracy(trained: emb.TrainResult) -> None:
    history = trained.history
    assert len(history) >= 3
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert min(h["validation_loss"] for h in history) < history[0]["validation_loss"]
    x_test, y_test = users(600, seed=99)
    assert triplet_accuracy(emb.embed(trained.encoder, x_test), y_test, seed=5) >= 0.9
    # Untrained weights do clearly worse on the same held-out triplets.
    untrained = emb.Encoder(emb.EncoderConfig(DIMS)).eval()
    untrained_accuracy = triplet_accuracy(emb.embed(untrained, x_test), y_test, seed=5)
    assert untrained_accuracy < triplet_accuracy(emb.embed(trained.encoder, x_test), y_test, seed=5)


def test_contrastive_loss_learns_too() -> None:
    x, y = users(800, seed=3)
    result = emb.Trainer(emb.TrainConfig(epochs=12, loss="contrastive", seed=1)).fit(x, y)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    x_test, y_test = users(500, seed=98)
    assert triplet_accuracy(emb.embed(result.encoder, x_test), y_test, seed=6) >= 0.9


def test_unlabelled_training_keeps_neighbours_close() -> None:
    x, _ = users(800, seed=4, noise=0.15)
    result = emb.Trainer(emb.TrainConfig(epochs=10, seed=2)).fit(x)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    x_test, y_test = users(400, seed=97, noise=0.15)
    assert triplet_accuracy(emb.embed(result.encoder, x_test), y_test, seed=7) >= 0.9


def test_early_stopping_restores_the_best_epoch() -> None:
    x, y = users(300, seed=5)
    result = emb.Trainer(emb.TrainConfig(epochs=200, patience=2, seed=0)).fit(x, y)
    assert result.stopped_early
    assert len(result.history) < 200
    best = min(result.history, key=lambda h: h["validation_loss"])
    assert result.best_epoch == best["epoch"]


def test_save_and_load_round_trip_without_unpickling(
    trained: emb.TrainResult, tmp_path: Path
) -> None:
    path = tmp_path / "encoder.safetensors"
    emb.save(trained.encoder, path)
    assert path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle stream
    loaded = emb.load(path)
    x = users(50, seed=6)[0]
    assert np.array_equal(emb.embed(loaded, x), emb.embed(trained.encoder, x))
    again = emb.from_bytes(emb.to_bytes(trained.encoder), trained.encoder.config)
    assert np.array_equal(emb.embed(again, x), emb.embed(trained.encoder, x))


def test_numpy_inference_equals_torch(trained: emb.TrainResult) -> None:
    x = users(200, seed=7)[0]
    numpy_encoder = NumpyEncoder.from_bytes(
        emb.to_bytes(trained.encoder), trained.encoder.config.to_json()
    )
    assert np.allclose(numpy_encoder.embed(x), emb.embed(trained.encoder, x), atol=1e-5)


def test_similarity_top_k_equals_brute_force(trained: emb.TrainResult) -> None:
    x = users(400, seed=8)[0]
    embedded = emb.embed(trained.encoder, x)
    index = SimilarityIndex(embedded)
    queries = emb.embed(trained.encoder, users(25, seed=9)[0])
    k = 7
    brute = queries @ embedded.T  # unit vectors: dot product = cosine
    for query, answer in zip(brute, index.top_k_batch(queries, k), strict=True):
        expected = np.argsort(-query, kind="stable")[:k]
        assert [n.index for n in answer] == expected.tolist()
        assert [n.score for n in answer] == pytest.approx(query[expected].tolist(), abs=1e-5)
    single = index.top_k(embedded[3], k, exclude=3)
    assert 3 not in [n.index for n in single]
    expected = [i for i in np.argsort(-(embedded @ embedded[3]), kind="stable") if i != 3][:k]
    assert [n.index for n in single] == expected


def test_fine_tuning_starts_from_the_earlier_model(trained: emb.TrainResult) -> None:
    x, y = users(400, seed=10)
    tuned = emb.Trainer(emb.TrainConfig(epochs=3, seed=3)).fit(x, y, start_from=trained.encoder)
    fresh = emb.Trainer(emb.TrainConfig(epochs=3, seed=3)).fit(x, y)
    # Starting from a trained model, the first epoch is already far better than from scratch.
    assert tuned.history[0]["validation_loss"] < fresh.history[0]["validation_loss"]
    x_test, y_test = users(400, seed=96)
    assert triplet_accuracy(emb.embed(tuned.encoder, x_test), y_test, seed=8) >= 0.9


def test_ensemble_averages_members(trained: emb.TrainResult) -> None:
    x, y = users(600, seed=11)
    other = emb.Trainer(emb.TrainConfig(epochs=8, seed=4)).fit(x, y)
    members = [
        NumpyEncoder.from_bytes(emb.to_bytes(m.encoder), m.encoder.config.to_json())
        for m in (trained, other)
    ]
    x_test, y_test = users(300, seed=95)
    mean = members[0].embed(x_test) + members[1].embed(x_test)
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    combined = Ensemble(members).embed(x_test)
    assert np.allclose(combined, expected, atol=1e-6)
    assert triplet_accuracy(combined, y_test, seed=9) >= 0.9


def test_embeddings_feed_clustering(trained: emb.TrainResult) -> None:
    x, y = users(600, seed=12)
    embedded = emb.embed(trained.encoder, x).astype(np.float64)
    normaliser = FeatureNormaliser((), (), ())  # placeholder scaler: the input is embeddings
    result = train_matrix(embedded, normaliser, AutoK(seed=0), QualityGate())
    assert result.model.k == CLASSES
    # The classes overlap (noise 0.35 per feature), so perfect recovery is not expected.
    assert adjusted_rand_score(y, result.model.assign_many(embedded)) >= 0.8
