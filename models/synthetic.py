"""Seeded synthetic recommendation data with planted structure, for tests and quick runs.

Each user and item gets a random low-rank factor vector. A user's interactions are drawn
without replacement with probability proportional to
``exp(preference_strength * <user, item> + popularity_exponent * log(popularity))``,
where item popularity follows a power law over a random item ranking. Every item modality
is a fixed random linear projection of the item factors plus Gaussian noise, so the
features carry the same signal as the interactions. Interactions are split per user into
training, validation and test rows; every user keeps at least one training row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from models.data import Dataset

_USER_CHUNK = 1024  # users whose item logits are held in memory at once


class SyntheticData(NamedTuple):
    """A synthetic dataset together with the planted factors that generated it."""

    dataset: Dataset
    user_factors: np.ndarray  # shape=[num_users, rank], dtype=float32
    item_factors: np.ndarray  # shape=[num_items, rank], dtype=float32
    item_popularity: np.ndarray  # shape=[num_items], dtype=float64; sums to 1


def _feature_dims(modalities: Sequence[str] | Mapping[str, int], feature_dim: int) -> dict[str, int]:
    if isinstance(modalities, str):
        modalities = [modalities]
    if isinstance(modalities, Mapping):
        dims = {str(name): int(dim) for name, dim in modalities.items()}
    else:
        dims = {str(name): int(feature_dim) for name in modalities}
    for name, dim in dims.items():
        if dim <= 0:
            raise ValueError(f"modality {name!r}: feature dimension must be positive, got {dim}")
    return dims


def _sample_interaction_counts(
    rng: np.random.Generator, num_users: int, num_items: int, mean: float, minimum: int
) -> np.ndarray:
    """Draw each user's interaction count: ``minimum`` plus a Poisson excess."""
    counts = minimum + rng.poisson(max(mean - minimum, 0.0), size=num_users)
    return np.minimum(counts, num_items // 2).astype(np.int64)


def _sample_user_items(
    rng: np.random.Generator, logits: np.ndarray, counts: np.ndarray
) -> list[np.ndarray]:
    """Sample ``counts[u]`` distinct items per row of ``logits`` (Gumbel top-k trick)."""
    perturbed = logits + rng.gumbel(size=logits.shape)
    ranked = np.argsort(-perturbed, axis=1)
    return [ranked[row, :count] for row, count in enumerate(counts)]


def _split_user_items(
    rng: np.random.Generator, items: np.ndarray, valid_fraction: float, test_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle one user's items and cut them into (train, valid, test), train non-empty."""
    items = rng.permutation(items)
    count = items.size
    num_test = int(round(count * test_fraction))
    num_valid = int(round(count * valid_fraction))
    excess = num_test + num_valid - (count - 1)
    if excess > 0:  # keep at least one training item, trimming validation first
        trim_valid = min(excess, num_valid)
        num_valid -= trim_valid
        num_test -= excess - trim_valid
    num_train = count - num_valid - num_test
    return items[:num_train], items[num_train : num_train + num_valid], items[num_train + num_valid :]


def make_synthetic_data(
    num_users: int = 500,
    num_items: int = 300,
    *,
    interactions_per_user: float = 30.0,
    min_interactions: int = 5,
    rank: int = 8,
    preference_strength: float = 3.0,
    popularity_exponent: float = 0.8,
    modalities: Sequence[str] | Mapping[str, int] = ("image", "text"),
    feature_dim: int = 32,
    feature_noise: float = 0.5,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> SyntheticData:
    """Generate a synthetic dataset and return it with its planted factors.

    Args:
      num_users: number of users.
      num_items: number of items.
      interactions_per_user: mean interactions per user (the count is
        ``min_interactions`` plus a Poisson excess, capped at ``num_items // 2``).
      min_interactions: minimum interactions per user (at least 1).
      rank: dimension of the planted user and item factors.
      preference_strength: weight of the factor dot product in the item logits; the
        dot product of two factor vectors has unit variance.
      popularity_exponent: weight of log popularity in the item logits; popularity
        of the item at rank r (1-based) is proportional to ``1 / r``.
      modalities: modality names (each ``feature_dim`` wide) or a mapping from name to
        feature dimension.
      feature_dim: dimension of each modality given by name only.
      feature_noise: standard deviation of the Gaussian noise added to each feature
        (the noiseless projection has unit variance per coordinate).
      valid_fraction: share of each user's interactions held out for validation.
      test_fraction: share of each user's interactions held out for test.
      seed: seed of the NumPy generator; equal arguments give identical data.

    Returns:
      A ``SyntheticData`` whose dataset is named "synthetic".
    """
    if num_users <= 0 or num_items < 2:
        raise ValueError(f"need num_users >= 1 and num_items >= 2, got {num_users} and {num_items}")
    if min_interactions < 1 or rank < 1:
        raise ValueError(
            f"min_interactions and rank must be at least 1, got {min_interactions} and {rank}"
        )
    if valid_fraction < 0 or test_fraction < 0 or valid_fraction + test_fraction >= 1:
        raise ValueError(
            "valid_fraction and test_fraction must be non-negative with a sum below 1, "
            f"got {valid_fraction} and {test_fraction}"
        )
    dims = _feature_dims(modalities, feature_dim)
    rng = np.random.default_rng(seed)

    # Factors scaled so that <user, item> has unit variance.
    user_factors = rng.normal(size=(num_users, rank)) / rank**0.25
    item_factors = rng.normal(size=(num_items, rank)) / rank**0.25
    popularity = 1.0 / (rng.permutation(num_items) + 1.0)
    popularity /= popularity.sum()

    counts = _sample_interaction_counts(
        rng, num_users, num_items, interactions_per_user, min_interactions
    )
    splits: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {
        name: ([], []) for name in ("train", "valid", "test")
    }
    for start in range(0, num_users, _USER_CHUNK):
        stop = min(start + _USER_CHUNK, num_users)
        logits = preference_strength * user_factors[start:stop] @ item_factors.T
        logits += popularity_exponent * np.log(popularity)
        for offset, items in enumerate(_sample_user_items(rng, logits, counts[start:stop])):
            user = start + offset
            parts = _split_user_items(rng, items, valid_fraction, test_fraction)
            for name, part in zip(("train", "valid", "test"), parts):
                splits[name][0].append(np.full(part.size, user))
                splits[name][1].append(part)

    features = {}
    for name, dim in dims.items():
        projection = rng.normal(size=(rank, dim)) / rank**0.25
        noise = feature_noise * rng.normal(size=(num_items, dim))
        features[name] = (item_factors @ projection + noise).astype(np.float32)

    dataset = Dataset.from_interactions(
        "synthetic",
        num_users,
        num_items,
        features=features,
        **{name: (np.concatenate(users), np.concatenate(items)) for name, (users, items) in splits.items()},
    )
    return SyntheticData(
        dataset=dataset,
        user_factors=user_factors.astype(np.float32),
        item_factors=item_factors.astype(np.float32),
        item_popularity=popularity,
    )


def make_synthetic_dataset(
    num_users: int = 500,
    num_items: int = 300,
    *,
    modalities: Sequence[str] | Mapping[str, int] = ("image", "text"),
    seed: int = 0,
    **options,
) -> Dataset:
    """Generate a synthetic ``Dataset``; see ``make_synthetic_data`` for the options.

    The defaults give about 500 users, 300 items and 15,000 interactions, small enough
    for a model to train in seconds on a CPU.
    """
    return make_synthetic_data(
        num_users, num_items, modalities=modalities, seed=seed, **options
    ).dataset
