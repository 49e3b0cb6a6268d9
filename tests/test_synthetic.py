"""Tests of the seeded synthetic dataset generator."""

import numpy as np
import pytest

from models.data import Dataset
from models.synthetic import make_synthetic_data, make_synthetic_dataset


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic_data(seed=3)


def test_default_size(synthetic):
    dataset = synthetic.dataset
    assert isinstance(dataset, Dataset)
    assert dataset.name == "synthetic"
    assert (dataset.num_users, dataset.num_items) == (500, 300)
    total = dataset.train.users.size + dataset.valid.users.size + dataset.test.users.size
    assert 12_000 <= total <= 18_000


def test_same_seed_same_data():
    first = make_synthetic_dataset(seed=7)
    second = make_synthetic_dataset(seed=7)
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(first.split(split).users, second.split(split).users)
        np.testing.assert_array_equal(first.split(split).items, second.split(split).items)
    for modality in ("image", "text"):
        np.testing.assert_array_equal(first.features[modality], second.features[modality])


def test_other_seed_other_data():
    first = make_synthetic_dataset(seed=7)
    second = make_synthetic_dataset(seed=8)
    assert not np.array_equal(first.features["image"], second.features["image"])
    assert not (
        first.train.items.size == second.train.items.size
        and np.array_equal(first.train.items, second.train.items)
    )


def test_every_user_has_training_rows(synthetic):
    degrees = np.diff(synthetic.dataset.train_indptr)
    assert degrees.min() >= 1


def test_splits_disjoint_and_proportional(synthetic):
    dataset = synthetic.dataset
    pairs = np.concatenate(
        [
            dataset.split(split).users.astype(np.int64) * dataset.num_items
            + dataset.split(split).items
            for split in ("train", "valid", "test")
        ]
    )
    assert np.unique(pairs).size == pairs.size

    total = pairs.size
    assert dataset.valid.users.size / total == pytest.approx(0.1, abs=0.02)
    assert dataset.test.users.size / total == pytest.approx(0.1, abs=0.02)


def test_tiny_users_keep_training_item():
    dataset = make_synthetic_dataset(
        num_users=50, num_items=20, interactions_per_user=1, min_interactions=1,
        valid_fraction=0.45, test_fraction=0.45, seed=1,
    )
    assert np.diff(dataset.train_indptr).min() >= 1


def test_named_modalities_and_dims():
    dataset = make_synthetic_dataset(modalities={"image": 16, "audio": 8}, seed=0)
    assert {name: values.shape for name, values in dataset.features.items()} == {
        "image": (300, 16),
        "audio": (300, 8),
    }
    assert all(values.dtype == np.float32 for values in dataset.features.values())
    assert make_synthetic_dataset(modalities=(), seed=0).features == {}


def test_features_carry_item_factors(synthetic):
    # Least-squares fit of each modality from the planted item factors: most variance
    # is explained (noise std 0.5 against unit signal gives R^2 near 0.8).
    factors = np.column_stack([synthetic.item_factors, np.ones(synthetic.item_factors.shape[0])])
    for modality, values in synthetic.dataset.features.items():
        coefficients, *_ = np.linalg.lstsq(factors, values, rcond=None)
        residual = values - factors @ coefficients
        r_squared = 1.0 - residual.var() / values.var()
        assert r_squared > 0.7, modality

    # Shuffled features explain almost nothing.
    shuffled = np.random.default_rng(0).permutation(synthetic.dataset.features["image"])
    coefficients, *_ = np.linalg.lstsq(factors, shuffled, rcond=None)
    assert 1.0 - (shuffled - factors @ coefficients).var() / shuffled.var() < 0.15


def test_features_predict_interactions(synthetic):
    # Items that share a user are closer in feature space than random item pairs.
    dataset = synthetic.dataset
    features = dataset.features["text"]
    features = features / np.linalg.norm(features, axis=1, keepdims=True)
    similarity = features @ features.T

    co_consumed = []
    for user in range(dataset.num_users):
        items = dataset.user_train_items(user)
        block = similarity[np.ix_(items, items)]
        co_consumed.append(block[np.triu_indices(items.size, k=1)])
    assert np.concatenate(co_consumed).mean() > similarity.mean() + 0.1


def test_interactions_follow_planted_preferences(synthetic):
    dataset = synthetic.dataset
    scores = synthetic.user_factors @ synthetic.item_factors.T
    train_scores = scores[dataset.train.users, dataset.train.items]
    assert train_scores.mean() > scores.mean() + 0.5


def test_popular_items_more_frequent(synthetic):
    counts = np.bincount(synthetic.dataset.train.items, minlength=300)
    by_popularity = np.argsort(-synthetic.item_popularity)
    assert counts[by_popularity[:30]].mean() > 3 * counts[by_popularity[-30:]].mean()


def test_invalid_arguments():
    with pytest.raises(ValueError, match="valid_fraction and test_fraction"):
        make_synthetic_dataset(valid_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="feature dimension must be positive"):
        make_synthetic_dataset(modalities={"image": 0})
