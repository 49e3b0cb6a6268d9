"""Tests for the graph helpers and the LightGCN, VBPR and FREEDOM models."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from models.freedom import FREEDOM, default_modality_weights, knn_item_graph, knn_neighbours
from models.graph import (
    DEGREE_EPSILON,
    Graph,
    light_gcn_layers,
    normalized_adjacency,
    num_kept_edges,
    propagate,
    prune_edges,
    training_edges,
    transpose_graph,
)
from models.lightgcn import LightGCN
from models.registry import MODEL_NAMES, build_model
from models.sampling import Batch
from models.synthetic import make_synthetic_dataset
from models.vbpr import VBPR, order_modalities

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# A tiny bipartite graph: 3 users, 4 items; item 3 has no interaction.
TINY_USERS = np.array([0, 0, 1, 2, 2, 2], dtype=np.int32)
TINY_ITEMS = np.array([0, 1, 1, 0, 1, 2], dtype=np.int32)


def dense_adjacency(users, items, num_users, num_items):
    """Return the dense D^-1/2 A D^-1/2 of the bipartite graph (numpy reference)."""
    num_nodes = num_users + num_items
    adjacency = np.zeros((num_nodes, num_nodes))
    adjacency[users, items + num_users] = 1.0
    adjacency[items + num_users, users] = 1.0
    inverse_sqrt = (adjacency.sum(axis=1) + DEGREE_EPSILON) ** -0.5
    return inverse_sqrt[:, None] * adjacency * inverse_sqrt[None, :]


def to_dense(graph: Graph, num_nodes: int) -> np.ndarray:
    dense = np.zeros((num_nodes, num_nodes))
    np.add.at(dense, (np.asarray(graph.rows), np.asarray(graph.cols)), np.asarray(graph.weights))
    return dense


def tiny_dataset(features=None, name="tiny"):
    return SimpleNamespace(
        name=name,
        num_users=3,
        num_items=4,
        train=SimpleNamespace(users=TINY_USERS, items=TINY_ITEMS),
        features={} if features is None else features,
    )


@functools.lru_cache(maxsize=None)
def _cached_synthetic(modalities):
    return make_synthetic_dataset(80, 50, modalities=dict(modalities), seed=0)


def synthetic(modalities=("image", "text")):
    """Return a shared read-only synthetic dataset: 80 users, 50 items, 32-d features."""
    if not isinstance(modalities, dict):
        modalities = {name: 32 for name in modalities}
    return _cached_synthetic(tuple(sorted(modalities.items())))


def fixed_batch(dataset, size, seed=0):
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(dataset.train.users), size=size, replace=False)
    return Batch(
        users=jnp.asarray(dataset.train.users[rows], dtype=jnp.int32),
        pos_items=jnp.asarray(dataset.train.items[rows], dtype=jnp.int32),
        neg_items=jnp.asarray(rng.integers(0, dataset.num_items, size), dtype=jnp.int32),
        mask=jnp.ones(size, dtype=bool),
    )


def pad_batch(batch: Batch, extra: int) -> Batch:
    """Append ``extra`` padding rows holding arbitrary valid ids."""
    filler = jnp.arange(extra, dtype=jnp.int32) % 7
    return Batch(
        users=jnp.concatenate([batch.users, filler]),
        pos_items=jnp.concatenate([batch.pos_items, filler + 1]),
        neg_items=jnp.concatenate([batch.neg_items, filler + 2]),
        mask=jnp.concatenate([batch.mask, jnp.zeros(extra, dtype=bool)]),
    )


@functools.partial(jax.jit, static_argnums=0)
def loss_and_grad(graphdef, params, rest, batch, key):
    """Return the loss on ``model.train_graph(key)`` and its gradient, jitted per graphdef."""

    def loss_fn(params):
        model = nnx.merge(graphdef, params, rest)
        return model.loss(batch, model.train_graph(key))

    return jax.value_and_grad(loss_fn)(params)


# --- graph helpers ---------------------------------------------------------------------


def test_normalized_adjacency_matches_dense():
    graph = normalized_adjacency(TINY_USERS, TINY_ITEMS, 3, 4)
    rows = np.asarray(graph.rows)

    assert graph.rows.shape == (2 * len(TINY_USERS),)
    assert graph.rows.dtype == jnp.int32
    assert graph.cols.dtype == jnp.int32
    assert graph.weights.dtype == jnp.float32
    assert np.all(np.diff(rows) >= 0)
    assert not np.any(rows == np.asarray(graph.cols))
    np.testing.assert_allclose(
        to_dense(graph, 7), dense_adjacency(TINY_USERS, TINY_ITEMS, 3, 4), rtol=1e-6
    )


def assert_row_pointers(graph, num_rows):
    rows = np.asarray(graph.rows)
    expected = np.searchsorted(rows, np.arange(num_rows + 1), side="left")
    assert graph.indptr.dtype == jnp.int32
    np.testing.assert_array_equal(graph.indptr, expected)


def test_graph_builders_fill_row_pointers():
    assert_row_pointers(normalized_adjacency(TINY_USERS, TINY_ITEMS, 3, 4), 7)
    edges = training_edges(TINY_USERS, TINY_ITEMS, 3, 4)
    for seed in range(5):
        pruned = prune_edges(jax.random.key(seed), edges, 3, 3, 4)
        assert_row_pointers(pruned, 7)
    features = {"image": np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)}
    item_graph = knn_item_graph(features, {"image": 1.0}, 2)
    assert_row_pointers(item_graph, 6)
    assert_row_pointers(transpose_graph(item_graph, 6), 6)
    assert transpose_graph(item_graph).indptr is None


def test_propagate_without_row_pointers():
    graph = normalized_adjacency(TINY_USERS, TINY_ITEMS, 3, 4)
    x = jax.random.normal(jax.random.key(0), (7, 5))
    np.testing.assert_array_equal(
        propagate(graph._replace(indptr=None), x, 7), propagate(graph, x, 7)
    )


def test_normalized_adjacency_sorts_unsorted_input():
    order = np.array([5, 2, 0, 4, 1, 3])
    graph = normalized_adjacency(TINY_USERS[order], TINY_ITEMS[order], 3, 4)
    reference = normalized_adjacency(TINY_USERS, TINY_ITEMS, 3, 4)

    for field in Graph._fields:
        np.testing.assert_array_equal(getattr(graph, field), getattr(reference, field))


@pytest.mark.parametrize(
    "users, items, message",
    [
        ([0, 0], [1, 1], "duplicates"),
        ([0, 3], [1, 1], "users must lie in"),
        ([0, 1], [1, -1], "items must lie in"),
        ([], [], "empty"),
    ],
)
def test_normalized_adjacency_rejects_bad_input(users, items, message):
    with pytest.raises(ValueError, match=message):
        normalized_adjacency(np.array(users, dtype=np.int32), np.array(items, dtype=np.int32), 3, 4)


def test_propagate_matches_dense_matmul():
    graph = normalized_adjacency(TINY_USERS, TINY_ITEMS, 3, 4)
    x = jax.random.normal(jax.random.key(0), (7, 5))

    expected = dense_adjacency(TINY_USERS, TINY_ITEMS, 3, 4) @ np.asarray(x)
    np.testing.assert_allclose(propagate(graph, x, 7), expected, rtol=1e-5, atol=1e-6)


def test_light_gcn_layers_mean_over_layers():
    graph = normalized_adjacency(TINY_USERS, TINY_ITEMS, 3, 4)
    x = np.asarray(jax.random.normal(jax.random.key(1), (7, 3)))
    dense = dense_adjacency(TINY_USERS, TINY_ITEMS, 3, 4)

    expected = (x + dense @ x + dense @ dense @ x) / 3
    users, items = light_gcn_layers(graph, jnp.asarray(x[:3]), jnp.asarray(x[3:]), 2)
    np.testing.assert_allclose(np.concatenate([users, items]), expected, rtol=1e-5)
    users, items = light_gcn_layers(graph, jnp.asarray(x[:3]), jnp.asarray(x[3:]), 0)
    np.testing.assert_allclose(np.concatenate([users, items]), x)
    without_pointers = graph._replace(indptr=None)
    users, items = light_gcn_layers(without_pointers, jnp.asarray(x[:3]), jnp.asarray(x[3:]), 2)
    np.testing.assert_allclose(np.concatenate([users, items]), expected, rtol=1e-5)


@pytest.mark.parametrize("pruned", [False, True])
def test_light_gcn_layers_gradient_matches_dense(pruned):
    num_users, num_items = 3, 4
    graph = normalized_adjacency(TINY_USERS, TINY_ITEMS, num_users, num_items)
    dense = dense_adjacency(TINY_USERS, TINY_ITEMS, num_users, num_items)
    if pruned:
        edges = training_edges(TINY_USERS, TINY_ITEMS, num_users, num_items)
        graph = prune_edges(jax.random.key(3), edges, 3, num_users, num_items)
        dense = np.zeros_like(dense)
        dense[np.asarray(graph.rows), np.asarray(graph.cols)] = np.asarray(graph.weights)
    x = jax.random.normal(jax.random.key(2), (num_users + num_items, 3))

    def sparse_loss(x):
        users, items = light_gcn_layers(graph, x[:num_users], x[num_users:], 2)
        return jnp.sum(jnp.sin(jnp.concatenate([users, items])))

    def dense_loss(x):
        return jnp.sum(jnp.sin((x + dense @ x + dense @ (dense @ x)) / 3))

    np.testing.assert_allclose(sparse_loss(x), dense_loss(x), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(sparse_loss)(x), jax.grad(dense_loss)(x), rtol=1e-4, atol=1e-6)

    # Hessian-vector products (forward mode over the gradient), as optax_mg.flatness uses.
    direction = jax.random.normal(jax.random.key(4), x.shape)
    sparse_hvp = jax.jvp(jax.grad(sparse_loss), (x,), (direction,))[1]
    dense_hvp = jax.jvp(jax.grad(dense_loss), (x,), (direction,))[1]
    np.testing.assert_allclose(sparse_hvp, dense_hvp, rtol=1e-4, atol=1e-6)


def star_graph():
    """User 0 interacts with all 20 items; user 1 + i interacts with item i only."""
    items = np.arange(20)
    users = np.concatenate([np.zeros(20), 1 + items]).astype(np.int32)
    return users, np.concatenate([items, items]).astype(np.int32), 21, 20


def test_num_kept_edges_follows_reference_formula():
    assert num_kept_edges(59541, 0.8) == int(59541 * (1 - 0.8))
    assert num_kept_edges(10, 0.8) == 1  # 10 * 0.19999999999999996 rounds down
    assert num_kept_edges(40, 0.0) == 40
    with pytest.raises(ValueError, match="dropout"):
        num_kept_edges(40, 1.0)
    with pytest.raises(ValueError, match="keeps no edge"):
        num_kept_edges(3, 0.9)


def test_prune_edges_keeps_fixed_count_and_renormalises():
    users, items, num_users, num_items = star_graph()
    edges = training_edges(users, items, num_users, num_items)
    num_kept = num_kept_edges(len(users), 0.5)
    prune = jax.jit(prune_edges, static_argnums=(2, 3, 4))

    for seed in range(3):
        graph = prune(jax.random.key(seed), edges, num_kept, num_users, num_items)
        rows, cols = np.asarray(graph.rows), np.asarray(graph.cols)

        assert graph.rows.shape == graph.cols.shape == graph.weights.shape == (2 * num_kept,)
        assert np.all(np.diff(rows) >= 0)
        assert len(set(zip(rows.tolist(), cols.tolist()))) == 2 * num_kept

        # The pruned graph equals the normalised adjacency of the kept edges alone.
        kept_users = rows[:num_kept]
        kept_items = cols[:num_kept] - num_users
        expected = dense_adjacency(kept_users, kept_items, num_users, num_items)
        np.testing.assert_allclose(to_dense(graph, num_users + num_items), expected, rtol=1e-5)


def test_prune_edges_vmaps_over_keys():
    users, items, num_users, num_items = star_graph()
    edges = training_edges(users, items, num_users, num_items)
    keys = jax.random.split(jax.random.key(0), 4)

    graphs = jax.jit(jax.vmap(lambda key: prune_edges(key, edges, 8, num_users, num_items)))(keys)

    assert graphs.rows.shape == (4, 16)
    assert not np.array_equal(graphs.rows[0], graphs.rows[1]) or not np.array_equal(
        graphs.cols[0], graphs.cols[1]
    )


def test_prune_edges_favours_low_degree_edges():
    users, items, num_users, num_items = star_graph()
    edges = training_edges(users, items, num_users, num_items)
    keys = jax.random.split(jax.random.key(0), 4000)

    # With one kept edge, P(edge) = w / sum(w): each of user 0's edges has w = 1/sqrt(20 * 2),
    # each single-item user's edge w = 1/sqrt(1 * 2), so P(low-degree edge) = 0.8173.
    single = jax.jit(jax.vmap(lambda key: prune_edges(key, edges, 1, num_users, num_items)))(keys)
    low_degree_share = np.mean(np.asarray(single.rows[:, 0]) > 0)
    high, low = 20 / np.sqrt(40), 20 / np.sqrt(2)
    assert abs(low_degree_share - low / (low + high)) < 0.03

    half = jax.jit(jax.vmap(lambda key: prune_edges(key, edges, 20, num_users, num_items)))(keys[:500])
    user_rows = np.asarray(half.rows[:, :20])
    kept_from_user_zero = np.mean(np.sum(user_rows == 0, axis=1)) / 20
    kept_from_others = np.mean(np.sum(user_rows > 0, axis=1)) / 20
    assert kept_from_others > kept_from_user_zero + 0.3


def test_knn_neighbours_match_brute_force():
    features = np.random.default_rng(0).normal(size=(37, 6)).astype(np.float32)
    normalized = features / np.linalg.norm(features, axis=1, keepdims=True)
    expected = np.argsort(-(normalized @ normalized.T), axis=1)[:, :5]

    neighbours = knn_neighbours(features, 5, chunk_size=8)

    assert neighbours.shape == (37, 5)
    np.testing.assert_array_equal(neighbours, expected)
    np.testing.assert_array_equal(neighbours[:, 0], np.arange(37))


def test_knn_neighbours_zero_vector_ties_to_lower_ids():
    features = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)
    features[2] = 0.0
    norms = np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-30)
    similarity = (features / norms) @ (features / norms).T
    expected = np.argsort(-similarity, axis=1, kind="stable")[:, :2]

    neighbours = knn_neighbours(features, 2)

    np.testing.assert_array_equal(neighbours[2], [0, 1])
    np.testing.assert_array_equal(neighbours, expected)


def test_knn_item_graph_weights_per_modality():
    rng = np.random.default_rng(2)
    features = {"image": rng.normal(size=(20, 4)), "audio": rng.normal(size=(20, 5))}
    weights = {"image": 0.1, "audio": 0.9}

    graph = knn_item_graph(features, weights, 3, chunk_size=7)
    dense = to_dense(graph, 20)

    assert graph.rows.shape == (20 * 3 * 2,)
    assert np.all(np.diff(np.asarray(graph.rows)) >= 0)
    np.testing.assert_allclose(dense.sum(axis=1), 1.0, rtol=1e-6)
    expected = np.zeros((20, 20))
    for name, weight in weights.items():
        neighbours = knn_neighbours(features[name], 3)
        np.add.at(expected, (np.repeat(np.arange(20), 3), neighbours.ravel()), weight / 3)
    np.testing.assert_allclose(dense, expected, rtol=1e-6)


# --- models ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_loss_decreases_under_jit(name):
    dataset = synthetic()
    model = build_model(name, dataset, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)
    batches = [fixed_batch(dataset, 32, seed) for seed in range(5)]

    @jax.jit
    def step(params, opt_state, batch, key):
        loss, grads = loss_and_grad(graphdef, params, rest, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def mean_loss(params):
        model = nnx.merge(graphdef, params, rest)
        return jnp.mean(jnp.stack([model.loss(batch) for batch in batches]))

    initial = float(mean_loss(params))
    for index in range(50):
        key = jax.random.key(index)
        params, opt_state, loss = step(params, opt_state, batches[index % 5], key)
        assert np.isfinite(float(loss))
    final = float(mean_loss(params))

    assert np.isfinite(initial)
    assert final < 0.8 * initial


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_padding_changes_nothing(name):
    dataset = synthetic()
    model = build_model(name, dataset, rngs=nnx.Rngs(1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = fixed_batch(dataset, 32)
    key = jax.random.key(3)

    loss, grads = loss_and_grad(graphdef, params, rest, batch, key)
    padded_loss, padded_grads = loss_and_grad(graphdef, params, rest, pad_batch(batch, 13), key)

    np.testing.assert_allclose(padded_loss, loss, rtol=1e-6)
    for grad, padded_grad in zip(jax.tree.leaves(grads), jax.tree.leaves(padded_grads)):
        np.testing.assert_allclose(padded_grad, grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_all_padding_batch_is_zero(name):
    dataset = synthetic()
    model = build_model(name, dataset, rngs=nnx.Rngs(2))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = pad_batch(fixed_batch(dataset, 32), 13)
    empty = batch._replace(mask=jnp.zeros(45, dtype=bool))

    loss, grads = loss_and_grad(graphdef, params, rest, empty, jax.random.key(0))

    assert float(loss) == 0.0
    assert all(np.all(np.asarray(grad) == 0.0) for grad in jax.tree.leaves(grads))


@pytest.mark.parametrize(
    "name, dim", [("lightgcn", 16), ("vbpr", 32), ("freedom", 16)]
)
def test_model_embed_shapes(name, dim):
    dataset = synthetic()
    model = build_model(name, dataset, rngs=nnx.Rngs(0), embedding_dim=16)

    users, items = model.embed()

    assert users.shape == (80, dim)
    assert items.shape == (50, dim)
    assert np.all(np.isfinite(users))
    assert np.all(np.isfinite(items))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_vmaps_over_seeds(name):
    dataset = synthetic()
    splits = [nnx.split(build_model(name, dataset, rngs=nnx.Rngs(seed)), nnx.Param, ...) for seed in (0, 1)]
    graphdef = splits[0][0]
    params = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[split[1] for split in splits])
    rests = [split[2] for split in splits]

    # Non-parameter state depends on the dataset only, so it can be shared across seeds.
    for left, right in zip(jax.tree.leaves(rests[0]), jax.tree.leaves(rests[1])):
        np.testing.assert_array_equal(left, right)

    batch = fixed_batch(dataset, 16)
    keys = jax.random.split(jax.random.key(0), 2)

    def loss_and_embed(params, key):
        model = nnx.merge(graphdef, params, rests[0])
        return model.loss(batch, model.train_graph(key)), model.embed()[1]

    losses, items = jax.jit(jax.vmap(loss_and_embed))(params, keys)

    assert losses.shape == (2,)
    assert np.all(np.isfinite(losses))
    assert not np.allclose(items[0], items[1])
    single_loss, _ = jax.jit(loss_and_embed)(jax.tree.map(lambda leaf: leaf[1], params), keys[1])
    np.testing.assert_allclose(losses[1], single_loss, rtol=1e-5)


def test_lightgcn_loss_matches_formula():
    dataset = synthetic(modalities=())
    model = LightGCN(dataset, num_layers=1, reg_weight=0.5, rngs=nnx.Rngs(0))
    batch = fixed_batch(dataset, 10)

    user_final, item_final = (np.asarray(array) for array in model.embed())
    users, pos, neg = (np.asarray(ids) for ids in (batch.users, batch.pos_items, batch.neg_items))
    difference = np.sum(user_final[users] * (item_final[pos] - item_final[neg]), axis=1)
    ranking = np.mean(np.log1p(np.exp(-difference)))
    user_table, item_table = np.asarray(model.user_embedding[...]), np.asarray(model.item_embedding[...])
    norms = (
        np.linalg.norm(user_table[users])
        + np.linalg.norm(item_table[pos])
        + np.linalg.norm(item_table[neg])
    )

    np.testing.assert_allclose(model.loss(batch), ranking + 0.5 * norms / 10, rtol=1e-5)


def test_models_accept_dataset_like_objects():
    image = np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32)
    dataset = tiny_dataset({"image": image})
    reference = normalized_adjacency(TINY_USERS, TINY_ITEMS, 3, 4)

    for name, dim in (("lightgcn", 8), ("vbpr", 16), ("freedom", 8)):
        options = {"knn_k": 2, "dropout": 0.5} if name == "freedom" else {}
        model = build_model(name, dataset, rngs=nnx.Rngs(0), embedding_dim=8, **options)
        users, items = model.embed()

        assert users.shape == (3, dim), name
        assert items.shape == (4, dim), name
        if name != "vbpr":
            np.testing.assert_allclose(model.full_graph().weights, reference.weights)


def test_order_modalities_puts_text_slot_first():
    assert order_modalities(["image", "text"]) == ("text", "image")
    assert order_modalities(["image", "audio"]) == ("audio", "image")
    assert order_modalities(["video", "image", "text", "audio"]) == ("text", "image", "audio", "video")
    assert order_modalities(["image"]) == ("image",)
    assert order_modalities(["video", "audio"]) == ("audio", "video")


def test_vbpr_concatenates_text_before_image():
    dataset = synthetic(modalities={"image": 6, "text": 4})
    model = VBPR(dataset, embedding_dim=8, rngs=nnx.Rngs(0))

    expected = np.concatenate([dataset.features["text"], dataset.features["image"]], axis=1)
    np.testing.assert_array_equal(model.item_features[...], expected)
    assert model.projection.kernel.shape == (10, 8)
    items = np.asarray(model.embed()[1])
    projected = expected @ np.asarray(model.projection.kernel[...]) + np.asarray(model.projection.bias[...])
    np.testing.assert_allclose(items[:, 8:], projected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(items[:, :8], model.item_embedding[...])


def test_vbpr_loss_matches_formula():
    dataset = synthetic(modalities={"image": 6, "audio": 4})
    model = VBPR(dataset, embedding_dim=8, reg_weight=0.25, rngs=nnx.Rngs(0))
    batch = fixed_batch(dataset, 12)

    user_table, item_table = (np.asarray(array) for array in model.embed())
    users = user_table[np.asarray(batch.users)]
    pos = item_table[np.asarray(batch.pos_items)]
    neg = item_table[np.asarray(batch.neg_items)]
    difference = np.sum(users * (pos - neg), axis=1)
    ranking = -np.mean(np.log(1e-10 + 1 / (1 + np.exp(-difference))))
    norms = np.linalg.norm(users) + np.linalg.norm(pos) + np.linalg.norm(neg)

    np.testing.assert_allclose(model.loss(batch), ranking + 0.25 * norms / 12, rtol=1e-5)


@pytest.mark.parametrize(
    "modalities, weights",
    [
        ({"image": 6}, {"image": 1.0}),
        ({"image": 6, "audio": 5}, {"audio": 0.9, "image": 0.1}),
        ({"text": 6, "audio": 5}, {"audio": 0.5, "text": 0.5}),
    ],
)
def test_freedom_modality_sets(modalities, weights):
    dataset = synthetic(modalities=modalities)
    model = FREEDOM(dataset, embedding_dim=8, rngs=nnx.Rngs(0))

    assert default_modality_weights(tuple(modalities)) == pytest.approx(weights)
    assert dict(model.modality_weights) == pytest.approx(weights)
    assert set(model.projections.keys()) == set(modalities)
    assert model.item_graph_rows.shape == (50 * 10 * len(modalities),)
    np.testing.assert_allclose(to_dense(model.item_graph(), 50).sum(axis=1), 1.0, rtol=1e-6)
    loss = model.loss(fixed_batch(dataset, 16), model.train_graph(jax.random.key(0)))
    assert np.isfinite(float(loss))


def test_freedom_loss_matches_formula():
    dataset = synthetic(modalities={"image": 6, "audio": 4})
    model = FREEDOM(dataset, embedding_dim=8, reg_weight=0.5, rngs=nnx.Rngs(0))
    batch = fixed_batch(dataset, 12)
    users, pos, neg = (np.asarray(ids) for ids in (batch.users, batch.pos_items, batch.neg_items))

    def bpr(user_vectors, pos_vectors, neg_vectors):
        difference = np.sum(user_vectors * (pos_vectors - neg_vectors), axis=1)
        return np.mean(np.log1p(np.exp(-difference)))

    user_final, item_final = (np.asarray(array) for array in model.embed())
    expected = bpr(user_final[users], item_final[pos], item_final[neg])
    for name in ("image", "audio"):
        projected = np.asarray(model.projections[name](model.feature_tables[name][...]))
        expected += 0.5 * bpr(user_final[users], projected[pos], projected[neg])

    np.testing.assert_allclose(model.loss(batch), expected, rtol=1e-5)


def test_freedom_item_vectors_add_item_graph_layer():
    dataset = synthetic(modalities={"image": 6})
    model = FREEDOM(dataset, embedding_dim=8, num_layers=0, rngs=nnx.Rngs(0))

    item_table = np.asarray(model.item_embedding[...])
    smoothed = to_dense(model.item_graph(), 50) @ item_table
    np.testing.assert_allclose(model.embed()[1], item_table + smoothed, rtol=1e-5, atol=1e-6)


def test_freedom_prunes_training_graph_only():
    dataset = synthetic()
    model = FREEDOM(dataset, embedding_dim=8, dropout=0.8, rngs=nnx.Rngs(0))
    num_train = len(dataset.train.users)

    pruned = model.train_graph(jax.random.key(0))

    assert pruned.rows.shape == (2 * int(num_train * (1 - 0.8)),)
    assert model.full_graph().rows.shape == (2 * num_train,)
    assert not np.allclose(model.embed(pruned)[0], model.embed()[0])


@pytest.mark.parametrize("name", ["vbpr", "freedom"])
def test_feature_models_reject_dataset_without_features(name):
    dataset = synthetic(modalities=())

    with pytest.raises(ValueError, match=rf"model '{name}' needs item features.*'synthetic'"):
        build_model(name, dataset, rngs=nnx.Rngs(0))
    model_class = {"vbpr": VBPR, "freedom": FREEDOM}[name]
    with pytest.raises(ValueError, match=rf"model '{name}' needs item features.*'synthetic'"):
        model_class(dataset, rngs=nnx.Rngs(0))


def test_build_model_rejects_unknown_names():
    dataset = synthetic()

    with pytest.raises(ValueError, match="unknown model 'bpr'"):
        build_model("bpr", dataset, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown hyperparameter knn_k=5"):
        build_model("lightgcn", dataset, rngs=nnx.Rngs(0), knn_k=5)


@pytest.mark.parametrize(
    "name, hyperparams, message",
    [
        ("lightgcn", {"num_layers": -1}, "num_layers=-1"),
        ("lightgcn", {"embedding_dim": 2.5}, "embedding_dim=2.5"),
        ("vbpr", {"reg_weight": "0.1"}, "reg_weight='0.1'"),
        ("vbpr", {"reg_weight": float("nan")}, "reg_weight=nan"),
        ("freedom", {"dropout": 1.0}, "dropout=1.0"),
        ("freedom", {"knn_k": 0}, "knn_k=0"),
        ("freedom", {"knn_k": 51}, "knn_k=51"),
        ("freedom", {"modality_weights": {"image": 1.0}}, "modality_weights="),
        ("freedom", {"modality_weights": {"image": -1.0, "text": 1.0}}, "modality_weights\\['image'\\]=-1.0"),
    ],
)
def test_build_model_rejects_invalid_values(name, hyperparams, message):
    with pytest.raises(ValueError, match=message):
        build_model(name, synthetic(), rngs=nnx.Rngs(0), **hyperparams)


def test_build_model_accepts_custom_modality_weights():
    model = build_model(
        "freedom", synthetic(), rngs=nnx.Rngs(0), modality_weights={"image": 0.5, "text": 0.5}
    )

    assert dict(model.modality_weights) == {"image": 0.5, "text": 0.5}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_set_item_features_changes_feature_models_only(name):
    dataset = synthetic()
    model = build_model(name, dataset, rngs=nnx.Rngs(0))
    before_users, before_items = (np.asarray(array) for array in model.embed())
    rng = np.random.default_rng(5)
    noisy = {
        modality: values + rng.normal(size=values.shape).astype(np.float32)
        for modality, values in dataset.features.items()
    }

    model.set_item_features(noisy)
    after_users, after_items = (np.asarray(array) for array in model.embed())

    np.testing.assert_array_equal(after_users, before_users)
    if name == "lightgcn":
        np.testing.assert_array_equal(after_items, before_items)
    else:
        assert not np.allclose(after_items, before_items)


def test_freedom_set_item_features_rebuilds_item_graph():
    dataset = synthetic()
    model = FREEDOM(dataset, embedding_dim=8, rngs=nnx.Rngs(0))
    shuffled = {name: values[::-1].copy() for name, values in dataset.features.items()}

    model.set_item_features(shuffled)

    expected = knn_item_graph(shuffled, dict(model.modality_weights), 10)
    np.testing.assert_array_equal(model.item_graph_cols[...], expected.cols)
    np.testing.assert_array_equal(model.feature_tables["image"][...], shuffled["image"])


@pytest.mark.parametrize("name", ["vbpr", "freedom"])
def test_set_item_features_rejects_other_modalities(name):
    dataset = synthetic()
    model = build_model(name, dataset, rngs=nnx.Rngs(0))

    with pytest.raises(ValueError, match="same modalities|keep the modalities"):
        model.set_item_features({"image": dataset.features["image"]})
    with pytest.raises(ValueError, match="invalid 'text' features"):
        model.set_item_features({**dataset.features, "text": dataset.features["text"][:10]})


def test_tiktok_models_smoke():
    folder = DATA_DIR / "tiktok"
    if not folder.is_dir():
        pytest.skip(f"tiktok dataset not found at {folder}")
    from models.data import load_dataset

    dataset = load_dataset(folder)
    batch = fixed_batch(dataset, 256)

    for name in MODEL_NAMES:
        model = build_model(name, dataset, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        @jax.jit
        def loss_and_embed(params, rest, key):
            model = nnx.merge(graphdef, params, rest)
            return model.loss(batch, model.train_graph(key)), model.embed()

        loss, (users, items) = loss_and_embed(params, rest, jax.random.key(0))

        assert np.isfinite(float(loss)), name
        assert users.shape[0] == dataset.num_users, name
        assert items.shape[0] == dataset.num_items, name
        assert np.all(np.isfinite(users)), name
        assert np.all(np.isfinite(items)), name


def test_propagate_gradient_matches_dense():
    rng = np.random.default_rng(7)
    num_users, num_items = 7, 5
    pairs = sorted({(int(rng.integers(num_users)), int(rng.integers(num_items))) for _ in range(15)})
    users = np.array([pair[0] for pair in pairs])
    items = np.array([pair[1] for pair in pairs])
    graph = normalized_adjacency(users, items, num_users, num_items)
    num_nodes = num_users + num_items
    dense = np.zeros((num_nodes, num_nodes), np.float32)
    np.add.at(dense, (np.asarray(graph.rows), np.asarray(graph.cols)), np.asarray(graph.weights))
    x = jax.random.normal(jax.random.key(0), (num_nodes, 3))

    expected = jax.grad(lambda x: jnp.sum(jnp.sin(jnp.asarray(dense) @ x)))(x)
    for symmetric in (True, False):
        actual = jax.grad(
            lambda x: jnp.sum(jnp.sin(propagate(graph, x, num_nodes, symmetric=symmetric)))
        )(x)
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_propagate_non_symmetric_gradient():
    rng = np.random.default_rng(8)
    num_nodes = 6
    rows = np.repeat(np.arange(num_nodes), 2)
    cols = rng.integers(0, num_nodes, size=rows.size)
    weights = rng.random(rows.size).astype(np.float32)
    graph = Graph(jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32), jnp.asarray(weights))
    dense = np.zeros((num_nodes, num_nodes), np.float32)
    np.add.at(dense, (rows, cols), weights)
    x = jax.random.normal(jax.random.key(1), (num_nodes, 4))

    np.testing.assert_allclose(propagate(graph, x, num_nodes), dense @ x, rtol=1e-5, atol=1e-6)
    expected = jax.grad(lambda x: jnp.sum(jnp.sin(jnp.asarray(dense) @ x)))(x)
    for transpose in (None, transpose_graph(graph)):
        actual = jax.grad(
            lambda x: jnp.sum(jnp.sin(propagate(graph, x, num_nodes, transpose=transpose)))
        )(x)
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
