"""Tests of negative sampling and epoch batching."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from models.data import Dataset, DatasetError, load_dataset
from models.sampling import (
    Batch,
    NegativeSampler,
    _sort_rounds,
    epoch_batches,
    num_batches,
    permutation,
)
from models.synthetic import make_synthetic_dataset

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pair_keys(dataset: Dataset, users, items) -> np.ndarray:
    return np.asarray(users, np.int64) * dataset.num_items + np.asarray(items, np.int64)


def train_arrays(dataset: Dataset):
    return jnp.asarray(dataset.train.users), jnp.asarray(dataset.train.items)


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic_dataset(num_users=60, num_items=40, interactions_per_user=8, seed=2)


def test_tiktok_negatives_avoid_training_items():
    folder = DATA_ROOT / "tiktok"
    if not (folder / "tiktok.inter").is_file():
        pytest.skip(f"shared dataset folder {folder} is not available")
    dataset = load_dataset(folder, modalities=())
    sampler = NegativeSampler(dataset)
    users, items = train_arrays(dataset)
    train_keys = pair_keys(dataset, dataset.train.users, dataset.train.items)

    for epoch in range(3):
        batch = epoch_batches(jax.random.key(epoch), users, items, sampler, 2048)
        negatives = np.asarray(batch.neg_items).ravel()
        keys = pair_keys(dataset, np.asarray(batch.users).ravel(), negatives)
        position = np.minimum(np.searchsorted(train_keys, keys), train_keys.size - 1)
        assert not np.any(train_keys[position] == keys), f"epoch {epoch}"
        assert np.isin(negatives, dataset.item_pool).all()


def test_negatives_uniform_over_allowed_items():
    # Items 0..29 are in the pool; 30..34 occur only in the test split and must never be
    # drawn. User 0 has trained on 10 pool items, so 20 items remain allowed.
    user_items = np.arange(0, 30, 3)
    other_items = np.arange(1, 30)
    dataset = Dataset.from_interactions(
        "pool",
        num_users=2,
        num_items=35,
        train=(np.r_[np.zeros(10), np.ones(29)].astype(int), np.r_[user_items, other_items]),
        valid=([], []),
        test=(np.ones(5, int), np.arange(30, 35)),
    )
    sampler = NegativeSampler(dataset)
    draws = 40_000
    negatives = np.asarray(sampler.sample(jax.random.key(5), jnp.zeros(draws, jnp.int32)))

    allowed = np.setdiff1d(np.arange(30), user_items)
    assert np.isin(negatives, allowed).all()
    counts = np.bincount(negatives, minlength=35)[allowed]
    result = stats.chisquare(counts)
    assert result.pvalue > 1e-3, counts


def test_sampler_rejects_user_covering_pool():
    dataset = Dataset.from_interactions(
        "full",
        num_users=2,
        num_items=3,
        train=([0, 0, 0, 1], [0, 1, 2, 0]),
        valid=([], []),
        test=([], []),
    )
    with pytest.raises(DatasetError, match="user 0 has training interactions with all 3 items"):
        NegativeSampler(dataset)


def test_sample_shape_and_reproducibility(synthetic):
    sampler = NegativeSampler(synthetic)
    users = jnp.arange(60, dtype=jnp.int32).reshape(6, 10)
    first = sampler.sample(jax.random.key(0), users)
    again = sampler.sample(jax.random.key(0), users)
    other = sampler.sample(jax.random.key(1), users)

    assert first.shape == (6, 10)
    assert first.dtype == jnp.int32
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_sampler_is_pytree_under_jit(synthetic):
    sampler = NegativeSampler(synthetic)
    users = jnp.asarray(synthetic.train.users)

    @jax.jit
    def draw(sampler, key):
        return sampler.sample(key, users)

    negatives = np.asarray(draw(sampler, jax.random.key(3)))
    train_keys = pair_keys(synthetic, synthetic.train.users, synthetic.train.items)
    assert not np.isin(pair_keys(synthetic, synthetic.train.users, negatives), train_keys).any()


def test_epoch_covers_each_row_once(synthetic):
    sampler = NegativeSampler(synthetic)
    users, items = train_arrays(synthetic)
    num_rows = synthetic.train.users.size
    batch = epoch_batches(jax.random.key(11), users, items, sampler, 64)

    assert isinstance(batch, Batch)
    assert batch.users.shape == (num_batches(num_rows, 64), 64)
    mask = np.asarray(batch.mask)
    real = pair_keys(synthetic, np.asarray(batch.users)[mask], np.asarray(batch.pos_items)[mask])
    expected = pair_keys(synthetic, synthetic.train.users, synthetic.train.items)
    assert real.size == num_rows
    np.testing.assert_array_equal(np.sort(real), np.sort(expected))


def test_epoch_padding_masked_and_in_range(synthetic):
    sampler = NegativeSampler(synthetic)
    users, items = train_arrays(synthetic)
    num_rows = synthetic.train.users.size
    batch_size = 100
    assert num_rows % batch_size != 0
    batch = epoch_batches(jax.random.key(4), users, items, sampler, batch_size)

    mask = np.asarray(batch.mask)
    assert mask[:-1].all()
    assert mask[-1].sum() == num_rows % batch_size
    assert not mask[-1, num_rows % batch_size :].any()

    # Padding rows are copies of real training rows, so every gather stays in range.
    padding = ~mask
    pad_keys = pair_keys(synthetic, np.asarray(batch.users)[padding], np.asarray(batch.pos_items)[padding])
    train_keys = pair_keys(synthetic, synthetic.train.users, synthetic.train.items)
    assert np.isin(pad_keys, train_keys).all()


def test_epoch_order_changes_with_key(synthetic):
    sampler = NegativeSampler(synthetic)
    users, items = train_arrays(synthetic)
    first = epoch_batches(jax.random.key(0), users, items, sampler, 64)
    again = epoch_batches(jax.random.key(0), users, items, sampler, 64)
    other = epoch_batches(jax.random.key(1), users, items, sampler, 64)

    for name in Batch._fields:
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.users, other.users)
    # Negatives are not fixed per row: the same row gets new draws in another epoch.
    assert not np.array_equal(
        np.sort(pair_keys(synthetic, first.users.ravel(), first.neg_items.ravel())),
        np.sort(pair_keys(synthetic, other.users.ravel(), other.neg_items.ravel())),
    )


def test_batch_larger_than_rows(synthetic):
    sampler = NegativeSampler(synthetic)
    users, items = train_arrays(synthetic)
    num_rows = synthetic.train.users.size
    batch = epoch_batches(jax.random.key(0), users, items, sampler, 4 * num_rows)
    assert batch.users.shape == (1, 4 * num_rows)
    assert int(batch.mask.sum()) == num_rows


def test_num_batches():
    assert num_batches(10, 5) == 2
    assert num_batches(11, 5) == 3
    assert num_batches(1, 2048) == 1
    with pytest.raises(ValueError, match="batch_size must be positive"):
        num_batches(10, 0)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 2**16, 2**16 + 1, 300_000])
def test_permutation_contains_every_index_once(n):
    order = np.asarray(jax.jit(permutation, static_argnums=1)(jax.random.key(n), n))
    assert order.dtype == np.int32
    np.testing.assert_array_equal(np.sort(order), np.arange(n))


def test_permutation_depends_only_on_key():
    first = permutation(jax.random.key(0), 1000)
    np.testing.assert_array_equal(first, permutation(jax.random.key(0), 1000))
    assert not np.array_equal(first, permutation(jax.random.key(1), 1000))


def test_permutation_uniform_over_all_orders():
    # All 24 orders of 4 items should be equally likely.
    keys = jax.random.split(jax.random.key(7), 48_000)
    orders = np.asarray(jax.jit(jax.vmap(lambda key: permutation(key, 4)))(keys))
    codes = orders @ np.array([64, 16, 4, 1])
    counts = np.unique(codes, return_counts=True)[1]
    assert counts.size == 24
    assert stats.chisquare(counts).pvalue > 1e-3


def test_permutation_positions_uniform_on_tiktok_size():
    # Where row 0 and the last row land, over many epochs, is uniform over the positions.
    n = 59_541
    keys = jax.random.split(jax.random.key(3), 400)
    orders = np.asarray(jax.jit(jax.vmap(lambda key: permutation(key, n)))(keys))
    for row in (0, n - 1):
        positions = np.argmax(orders == row, axis=1)
        assert stats.kstest(positions / n, "uniform").pvalue > 1e-3


def test_sort_rounds_meet_the_tie_criterion():
    # Ties in all rounds must be as unlikely as with jax.random.permutation: n**3 <= 2**(r b).
    for n in (2, 10, 59_541, 218_409, 2**20, 2**28):
        index_bits, rounds = _sort_rounds(n)
        assert 2**index_bits >= n
        assert n**3 <= 2 ** (rounds * (32 - index_bits))
    assert _sort_rounds(59_541) == (16, 3)
    assert _sort_rounds(2**28 + 1) is None
