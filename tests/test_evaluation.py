"""Tests of full-ranking evaluation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.data import Dataset
from models.evaluation import Evaluator
from models.synthetic import make_synthetic_dataset


def log2_discount(rank: int) -> float:
    return 1.0 / math.log2(rank + 1)


@pytest.fixture(scope="module")
def tiny():
    """Three users over 8 items; item i scores -i except item 0, which scores 100.

    User 0 trains on item 0 and holds out items {1, 5}: ranking 1, 2, ..., 7, hits at ranks 1 and 5.
    User 1 trains on item 7 and holds out items {2, 3, 4}: ranking 0, 1, 2, ..., hits at ranks 3, 4, 5.
    User 2 has no held-out item and is not evaluated.
    """
    dataset = Dataset.from_interactions(
        "tiny",
        num_users=3,
        num_items=8,
        train=([0, 1, 2], [0, 7, 6]),
        valid=([2], [1]),
        test=([0, 0, 1, 1, 1], [1, 5, 2, 3, 4]),
    )
    item_scores = -np.arange(8, dtype=np.float32)
    item_scores[0] = 100.0
    user_emb = jnp.ones((3, 1), jnp.float32)
    item_emb = jnp.asarray(item_scores[:, None])
    return dataset, user_emb, item_emb


def tiny_expected():
    d = log2_discount
    user0 = {  # held out {1, 5}, hits at ranks 1 and 5
        1: {"recall": 1 / 2, "precision": 1.0, "ndcg": 1.0, "map": 1.0},
        3: {"recall": 1 / 2, "precision": 1 / 3, "ndcg": 1.0 / (d(1) + d(2)), "map": 1.0 / 2},
        5: {
            "recall": 1.0,
            "precision": 2 / 5,
            "ndcg": (d(1) + d(5)) / (d(1) + d(2)),
            "map": (1.0 + 2 / 5) / 2,
        },
    }
    user1 = {  # held out {2, 3, 4} (more than K=1), hits at ranks 3, 4, 5
        1: {"recall": 0.0, "precision": 0.0, "ndcg": 0.0, "map": 0.0},
        3: {"recall": 1 / 3, "precision": 1 / 3, "ndcg": d(3) / (d(1) + d(2) + d(3)), "map": (1 / 3) / 3},
        5: {
            "recall": 1.0,
            "precision": 3 / 5,
            "ndcg": (d(3) + d(4) + d(5)) / (d(1) + d(2) + d(3)),
            "map": (1 / 3 + 2 / 4 + 3 / 5) / 3,
        },
    }
    return user0, user1


def test_tiny_hand_computed(tiny):
    dataset, user_emb, item_emb = tiny
    evaluator = Evaluator(dataset, "test", ks=(1, 3, 5))
    metrics = evaluator(user_emb, item_emb)
    user0, user1 = tiny_expected()

    assert len(metrics) == 12
    for k in (1, 3, 5):
        for metric in ("recall", "precision", "ndcg", "map"):
            expected = (user0[k][metric] + user1[k][metric]) / 2
            assert metrics[f"{metric}@{k}"] == pytest.approx(expected, abs=1e-6), f"{metric}@{k}"


def test_tiny_single_user_rank_one_and_rank_k(tiny):
    # User 0 alone: hit at rank 1. User 1 alone: first hit exactly at rank K = 3.
    dataset, user_emb, item_emb = tiny
    user0, user1 = tiny_expected()
    for user, expected in ((0, user0), (1, user1)):
        keep = dataset.test.users == user
        single = Dataset.from_interactions(
            "single", 3, 8,
            train=(dataset.train.users, dataset.train.items),
            valid=([], []),
            test=(dataset.test.users[keep], dataset.test.items[keep]),
        )
        metrics = Evaluator(single, "test", ks=(1, 3, 5))(user_emb, item_emb)
        for k in (1, 3, 5):
            for metric in ("recall", "precision", "ndcg", "map"):
                assert metrics[f"{metric}@{k}"] == pytest.approx(expected[k][metric], abs=1e-6)


def test_tiny_top_items_mask_training(tiny):
    dataset, user_emb, item_emb = tiny
    evaluator = Evaluator(dataset, "test", ks=(5,))
    np.testing.assert_array_equal(evaluator.users, [0, 1])
    np.testing.assert_array_equal(evaluator.top_items(user_emb, item_emb), [[1, 2, 3, 4, 5], [0, 1, 2, 3, 4]])


def test_validation_items_stay_candidates(tiny):
    # User 2 trains on item 6 and validates on item 1. Only item 6 is masked for this
    # user, so item 1 ranks second behind item 0.
    dataset, user_emb, item_emb = tiny
    evaluator = Evaluator(dataset, "valid", ks=(2,))
    np.testing.assert_array_equal(evaluator.users, [2])
    np.testing.assert_array_equal(evaluator.top_items(user_emb, item_emb), [[0, 1]])
    assert evaluator(user_emb, item_emb)["recall@2"] == pytest.approx(1.0)


def numpy_reference(dataset, split, user_emb, item_emb, ks):
    """Plain per-user loop over the metric definitions."""
    held_out = dataset.split(split)
    users = np.unique(held_out.users)
    scores = np.asarray(user_emb, np.float64) @ np.asarray(item_emb, np.float64).T
    totals = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "precision", "ndcg", "map")}
    for user in users:
        user_scores = scores[user].copy()
        user_scores[dataset.user_train_items(user)] = -np.inf
        ranking = np.argsort(-user_scores, kind="stable")
        targets = set(held_out.items[held_out.users == user].tolist())
        for k in ks:
            hits = [rank for rank, item in enumerate(ranking[:k], start=1) if item in targets]
            ideal = sum(1 / math.log2(i + 1) for i in range(1, min(len(targets), k) + 1))
            totals[f"recall@{k}"] += len(hits) / len(targets)
            totals[f"precision@{k}"] += len(hits) / k
            totals[f"ndcg@{k}"] += sum(1 / math.log2(r + 1) for r in hits) / ideal
            totals[f"map@{k}"] += sum(
                (index + 1) / rank for index, rank in enumerate(hits)
            ) / min(len(targets), k)
    return {name: value / users.size for name, value in totals.items()}


@pytest.fixture(scope="module")
def synthetic():
    dataset = make_synthetic_dataset(num_users=300, num_items=200, seed=4)
    rng = np.random.default_rng(0)
    user_emb = jnp.asarray(rng.normal(size=(300, 16)), jnp.float32)
    item_emb = jnp.asarray(rng.normal(size=(200, 16)), jnp.float32)
    return dataset, user_emb, item_emb


@pytest.mark.parametrize("split", ["valid", "test"])
def test_matches_numpy_reference(synthetic, split):
    dataset, user_emb, item_emb = synthetic
    ks = (5, 10, 20, 50)
    metrics = Evaluator(dataset, split, ks=ks, chunk_size=64)(user_emb, item_emb)
    expected = numpy_reference(dataset, split, user_emb, item_emb, ks)
    assert metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-6), name


@pytest.mark.parametrize("chunk_size", [1, 64, 256])
def test_tied_scores_rank_lower_item_first(synthetic, chunk_size):
    # Small integer embeddings make most scores tie, zeros with either sign included.
    # Ties must go to the lower item id, as jax.lax.top_k and a stable sort order them.
    dataset, _, _ = synthetic
    rng = np.random.default_rng(5)
    user_emb = jnp.asarray(rng.integers(-1, 2, size=(300, 3)), jnp.float32)
    item_emb = jnp.asarray(rng.integers(-1, 2, size=(200, 3)), jnp.float32)
    item_emb = item_emb.at[:, 0].multiply(-1.0)  # -0.0 entries give -0.0 products
    ks = (5, 20, 50)
    metrics = Evaluator(dataset, "test", ks=ks, chunk_size=chunk_size)(user_emb, item_emb)
    expected = numpy_reference(dataset, "test", user_emb, item_emb, ks)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-6), name


def test_signed_zero_scores_tie(tiny):
    # Items 1 and 3 score -0.0 and items 2 and 4 score 0.0, so ids decide among them.
    dataset, user_emb, _ = tiny
    item_emb = jnp.asarray([[5.0], [-0.0], [0.0], [-0.0], [0.0], [-1.0], [-2.0], [-3.0]])
    evaluator = Evaluator(dataset, "test", ks=(5,))
    np.testing.assert_array_equal(evaluator.top_items(user_emb, item_emb)[0], [1, 2, 3, 4, 5])

    # User 0 (item 0 masked) finds its held-out items 1 and 5 at ranks 1 and 5. User 1
    # (item 7 masked) ranks item 0 first and finds its items 2, 3 and 4 at ranks 3 to 5.
    d = log2_discount
    user0_ndcg = (d(1) + d(5)) / (d(1) + d(2))
    user1_ndcg = (d(3) + d(4) + d(5)) / (d(1) + d(2) + d(3))
    metrics = evaluator(user_emb, item_emb)
    assert metrics["recall@5"] == pytest.approx(1.0)
    assert metrics["ndcg@5"] == pytest.approx((user0_ndcg + user1_ndcg) / 2)


def test_informative_embeddings_score_higher(synthetic):
    # Sanity check that the metrics react to signal: embeddings that put each user's
    # test items on top give recall@50 = 1.
    dataset, _, _ = synthetic
    relevance = np.zeros((dataset.num_users, dataset.num_items), np.float32)
    relevance[dataset.test.users, dataset.test.items] = 1.0
    metrics = Evaluator(dataset, "test", ks=(50,))(jnp.asarray(relevance), jnp.eye(dataset.num_items))
    assert metrics["recall@50"] == pytest.approx(1.0)
    assert metrics["ndcg@50"] == pytest.approx(1.0)
    assert metrics["map@50"] == pytest.approx(1.0)


def test_training_items_never_ranked(synthetic):
    # Scores are the training indicator plus small noise, so before masking every
    # user's training items would fill the top of the ranking.
    dataset, _, _ = synthetic
    trained = np.zeros((dataset.num_users, dataset.num_items), np.float32)
    trained[dataset.train.users, dataset.train.items] = 1.0
    noise = np.random.default_rng(1).uniform(0, 0.1, size=trained.shape).astype(np.float32)
    evaluator = Evaluator(dataset, "test", ks=(50,))

    top = evaluator.top_items(jnp.asarray(trained + noise), jnp.eye(dataset.num_items))
    assert top.shape == (evaluator.users.size, 50)
    for row, user in enumerate(evaluator.users):
        assert not np.isin(top[row], dataset.user_train_items(user)).any(), user


def test_nan_scores_never_first(synthetic):
    dataset, user_emb, item_emb = synthetic
    nan_items = np.array([3, 17, 150])
    item_emb = item_emb.at[nan_items, 0].set(jnp.nan)
    evaluator = Evaluator(dataset, "test", ks=(5, 50))

    top = evaluator.top_items(user_emb, item_emb)
    assert not np.isin(top[:, 0], nan_items).any()
    assert not np.isin(top, nan_items).any()  # every user has > 50 finite candidates
    metrics = evaluator(user_emb, item_emb)
    assert all(np.isfinite(value) for value in metrics.values())


def test_all_nan_user_ranks_no_training_item(synthetic):
    dataset, user_emb, item_emb = synthetic
    evaluator = Evaluator(dataset, "test", ks=(20,))
    user = int(evaluator.users[0])
    top = evaluator.top_items(user_emb.at[user].set(jnp.nan), item_emb)
    assert not np.isin(top[0], dataset.user_train_items(user)).any()


def test_chunk_size_does_not_change_results(synthetic):
    dataset, user_emb, item_emb = synthetic
    reference = Evaluator(dataset, "test", chunk_size=1024)(user_emb, item_emb)
    for chunk_size in (1, 7, 64):
        metrics = Evaluator(dataset, "test", chunk_size=chunk_size)(user_emb, item_emb)
        for name, value in reference.items():
            assert metrics[name] == pytest.approx(value, abs=1e-6), (chunk_size, name)


def test_compute_jit_and_vmap(synthetic):
    dataset, user_emb, item_emb = synthetic
    evaluator = Evaluator(dataset, "valid", ks=(10, 20))
    expected = evaluator(user_emb, item_emb)

    jitted = jax.jit(evaluator.compute)(user_emb, item_emb)
    assert jitted["recall@20"] == pytest.approx(expected["recall@20"], abs=1e-6)

    stacked = jax.vmap(evaluator.compute)(jnp.stack([user_emb, -user_emb]), jnp.stack([item_emb, item_emb]))
    assert stacked["ndcg@10"].shape == (2,)
    assert float(stacked["ndcg@10"][0]) == pytest.approx(expected["ndcg@10"], abs=1e-6)
    negated = evaluator(-user_emb, item_emb)
    assert float(stacked["ndcg@10"][1]) == pytest.approx(negated["ndcg@10"], abs=1e-6)


def test_invalid_arguments(synthetic):
    dataset, user_emb, item_emb = synthetic
    with pytest.raises(ValueError, match="each K in ks must lie in"):
        Evaluator(dataset, "test", ks=(201,))
    with pytest.raises(ValueError, match="split must be 'valid' or 'test'"):
        Evaluator(dataset, "train")
    evaluator = Evaluator(dataset, "test")
    with pytest.raises(ValueError, match=r"expected user_emb \[300, d\]"):
        evaluator(user_emb[:10], item_emb)
