"""Normalised user-item graphs, sparse propagation and degree-sensitive edge pruning.

A user-item graph is a symmetric edge list over ``num_users + num_items`` nodes: users come
first and item ``i`` is node ``num_users + i``. Edge lists are sorted by row, which
lets propagation run as a CSR sparse-dense product. No dense users x items matrix is ever
formed.

The pruning follows FREEDOM (Zhou and Shen, "A Tale of Two Graphs: Freezing and Denoising
Graph Structures for Multimodal Recommendation", ACM MM 2023). The port draws the kept
edges with the Gumbel top-k trick instead of ``torch.multinomial``. Every pruned graph then
has the same number of entries, so one compiled program serves every epoch.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import sparse

DEGREE_EPSILON = 1e-7  # added to every node degree before the inverse square root


class Graph(NamedTuple):
    """Weighted edge list of a normalised adjacency matrix, without its (static) node count.

    ``indptr`` contains the CSR row pointers of the sorted rows. The builders in this module
    fill it, so that propagation over a graph reused many times does not search for them
    on every call. For a graph without it (None), `propagate` computes them.
    """

    rows: jax.Array  # shape=[nnz], dtype=int32, sorted ascending
    cols: jax.Array  # shape=[nnz], dtype=int32
    weights: jax.Array  # shape=[nnz], dtype=float32
    indptr: jax.Array | None = None  # shape=[num_rows + 1], dtype=int32


class TrainingEdges(NamedTuple):
    """Training interactions prepared for degree-sensitive pruning (see `prune_edges`)."""

    users: jax.Array  # shape=[E], dtype=int32; sorted, items sorted within each user
    items: jax.Array  # shape=[E], dtype=int32
    log_weights: jax.Array  # shape=[E], dtype=float32; log of 1/sqrt(deg(u) deg(i))
    item_major_order: jax.Array  # shape=[E], dtype=int32; edge ids sorted by (item, user)


class Constant(nnx.Variable):
    """Non-trainable array kept in a model's state, such as graph edges or item features.

    ``nnx.split(model, nnx.Param, ...)`` puts these into the second state, so an optimizer
    built on ``nnx.Param`` never updates them.
    """


def _check_interactions(
    users: np.ndarray, items: np.ndarray, num_users: int, num_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return the interactions as int64 arrays sorted by (user, item), or raise ValueError."""
    users = np.asarray(users)
    items = np.asarray(items)
    if users.ndim != 1 or users.shape != items.shape:
        raise ValueError(
            f"training users and items must be 1-D arrays of equal length, got shapes "
            f"{users.shape} and {items.shape}"
        )
    if users.size == 0:
        raise ValueError("the training split is empty, so no user-item graph can be built")
    if not (np.issubdtype(users.dtype, np.integer) and np.issubdtype(items.dtype, np.integer)):
        raise ValueError(
            f"training users and items must be integer ids, got dtypes {users.dtype} and "
            f"{items.dtype}"
        )
    users = users.astype(np.int64)
    items = items.astype(np.int64)
    for field, ids, count in (("users", users, num_users), ("items", items, num_items)):
        if ids.min() < 0 or ids.max() >= count:
            raise ValueError(
                f"training {field} must lie in [0, {count}), got values from {ids.min()} to "
                f"{ids.max()}"
            )

    order = np.lexsort((items, users))
    users, items = users[order], items[order]
    duplicate = (users[1:] == users[:-1]) & (items[1:] == items[:-1])
    if duplicate.any():
        first = int(np.flatnonzero(duplicate)[0])
        raise ValueError(
            f"training interactions contain duplicates, e.g. user {users[first]} and item "
            f"{items[first]}; each (user, item) pair must occur once"
        )
    return users, items


def _edge_weights(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> np.ndarray:
    """Return 1 / sqrt((deg(u) + eps) (deg(i) + eps)) per edge, in float64."""
    user_degree = np.bincount(users, minlength=num_users) + DEGREE_EPSILON
    item_degree = np.bincount(items, minlength=num_items) + DEGREE_EPSILON
    return user_degree[users] ** -0.5 * item_degree[items] ** -0.5


def normalized_adjacency(
    users: np.ndarray, items: np.ndarray, num_users: int, num_items: int
) -> Graph:
    """Build the symmetric normalised adjacency D^-1/2 A D^-1/2 of the user-item graph.

    A has a 1 for every training interaction in both directions and no self-loops. The
    degree of every node gets ``DEGREE_EPSILON`` before the inverse square root, as
    MMRec's LightGCN does, so isolated nodes stay finite. The edge list is built on the
    host with numpy.

    Args:
      users: user id of every training interaction.
      items: item id of every training interaction; each (user, item) pair occurs once.
      num_users: number of users U.
      num_items: number of items I.

    Returns:
      A `Graph` with ``2 * len(users)`` entries over ``U + I`` nodes, rows sorted.

    Raises:
      ValueError: on ids out of range, duplicate pairs or an empty training split.
    """
    users, items = _check_interactions(users, items, num_users, num_items)
    weights = _edge_weights(users, items, num_users, num_items)

    rows = np.concatenate([users, items + num_users])
    cols = np.concatenate([items + num_users, users])
    weights = np.concatenate([weights, weights])
    order = np.lexsort((cols, rows))
    rows = jnp.asarray(rows[order], dtype=jnp.int32)

    return Graph(
        rows=rows,
        cols=jnp.asarray(cols[order], dtype=jnp.int32),
        weights=jnp.asarray(weights[order], dtype=jnp.float32),
        indptr=_row_pointers(rows, num_users + num_items),
    )


def _row_pointers(rows: jax.Array, num_nodes: int) -> jax.Array:
    """Return the CSR row pointers of sorted ``rows`` ([num_nodes + 1], int32)."""
    nodes = jnp.arange(num_nodes + 1, dtype=rows.dtype)
    return jnp.searchsorted(rows, nodes, side="left").astype(jnp.int32)


def _graph_row_pointers(graph: Graph, num_rows: int) -> jax.Array:
    """Return ``graph.indptr``, or compute the row pointers when the graph has none."""
    if graph.indptr is None:
        return _row_pointers(graph.rows, num_rows)
    return graph.indptr


def _csr_matmul(graph: Graph, x: jax.Array, num_nodes: int) -> jax.Array:
    indptr = _graph_row_pointers(graph, num_nodes)
    matrix = sparse.BCSR((graph.weights, graph.cols, indptr), shape=(num_nodes, x.shape[0]))
    return matrix @ x


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _csr_propagate(graph: Graph, transpose: Graph, x: jax.Array, num_nodes: int) -> jax.Array:
    return _csr_matmul(graph, x, num_nodes)


def _csr_propagate_forward(graph, transpose, x, num_nodes):
    return _csr_matmul(graph, x, num_nodes), (graph, transpose, x.shape[0])


def _csr_propagate_backward(num_nodes, residuals, cotangent):
    # The gradient of A @ x with respect to x is A^T @ cotangent: one more sorted sparse
    # product, where autodiff would scatter-add into unsorted columns (about 6x slower on
    # CPU for the TikTok graph). The graph arrays get no gradient.
    graph, transpose, num_inputs = residuals
    del num_nodes
    grad_x = _csr_matmul(transpose, cotangent, num_inputs)
    return None, None, grad_x


_csr_propagate.defvjp(_csr_propagate_forward, _csr_propagate_backward)


def transpose_graph(graph: Graph, num_columns: int | None = None) -> Graph:
    """Return the transpose of ``graph`` with its rows sorted (jittable).

    With the (static) ``num_columns`` of ``graph``, the result carries its row pointers.
    """
    order = jnp.argsort(graph.cols, stable=True)
    rows = graph.cols[order]
    indptr = None if num_columns is None else _row_pointers(rows, num_columns)
    return Graph(rows=rows, cols=graph.rows[order], weights=graph.weights[order], indptr=indptr)


def propagate(
    graph: Graph,
    x: jax.Array,
    num_nodes: int,
    *,
    symmetric: bool = False,
    transpose: Graph | None = None,
) -> jax.Array:
    """Multiply the sparse matrix ``graph`` with the dense node features ``x``.

    The product runs as a CSR sparse-dense product (``jax.experimental.sparse.BCSR``) built
    from the sorted edge list, and its gradient as the product with the transposed matrix.

    Args:
      graph: edge list with rows sorted ascending.
      x: features of the column nodes, shape ``[num_columns, d]``.
      num_nodes: number of output rows (static).
      symmetric: whether the matrix equals its transpose (normalised adjacencies and
        FREEDOM's pruned graphs do), so the gradient reuses ``graph``.
      transpose: the transposed graph with sorted rows, for a non-symmetric matrix whose
        transpose is precomputed; otherwise it is computed here with a sort.

    Returns:
      ``A @ x`` of shape ``[num_nodes, d]``.
    """
    if symmetric:
        transpose = graph
    elif transpose is None:
        transpose = transpose_graph(graph)
    return _csr_propagate(graph, transpose, x, num_nodes)


def _user_item_blocks(graph: Graph, num_users: int, num_items: int) -> tuple[Graph, Graph]:
    """Split a user-item adjacency into its user-to-item and item-to-user blocks.

    The builders of user-item graphs (`normalized_adjacency`, `prune_edges`) list one
    entry per edge and direction with rows sorted. The first half of the entries are
    therefore the user rows and the second half the item rows, so static slices give the
    two CSR matrices. Column and row ids of the blocks count users and items from 0.
    """
    half = graph.rows.shape[0] // 2
    indptr = _graph_row_pointers(graph, num_users + num_items)
    user_rows = Graph(
        rows=graph.rows[:half],
        cols=graph.cols[:half] - num_users,
        weights=graph.weights[:half],
        indptr=indptr[: num_users + 1],
    )
    item_rows = Graph(
        rows=graph.rows[half:] - num_users,
        cols=graph.cols[half:],
        weights=graph.weights[half:],
        indptr=indptr[num_users:] - half,
    )
    return user_rows, item_rows


def _user_item_products(user_rows, item_rows, users, items, num_users, num_items):
    return _csr_matmul(user_rows, items, num_users), _csr_matmul(item_rows, users, num_items)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _propagate_user_item(user_rows, item_rows, users, items, num_users, num_items):
    return _user_item_products(user_rows, item_rows, users, items, num_users, num_items)


# The rules call the plain products, not the custom_vjp function, so that forward-mode
# autodiff of the gradient (Hessian-vector products in optax_mg.flatness) works.
def _propagate_user_item_forward(user_rows, item_rows, users, items, num_users, num_items):
    outputs = _user_item_products(user_rows, item_rows, users, items, num_users, num_items)
    return outputs, (user_rows, item_rows)


def _propagate_user_item_backward(num_users, num_items, residuals, cotangents):
    # The symmetric adjacency is its own transpose: the gradient with respect to the items
    # is the item-row block times the users' cotangent, and the other way round.
    user_rows, item_rows = residuals
    user_cotangent, item_cotangent = cotangents
    grad_users, grad_items = _user_item_products(
        user_rows, item_rows, user_cotangent, item_cotangent, num_users, num_items
    )
    return None, None, grad_users, grad_items


_propagate_user_item.defvjp(_propagate_user_item_forward, _propagate_user_item_backward)


def light_gcn_layers(
    graph: Graph, users: jax.Array, items: jax.Array, num_layers: int
) -> tuple[jax.Array, jax.Array]:
    """Propagate user and item embeddings through LightGCN layers and average layers 0..L.

    The users and items stay separate arrays: each layer multiplies the items by the
    user-row block of ``graph`` and the users by the item-row block, which equals
    propagating their concatenation over the whole adjacency without building it.

    Args:
      graph: user-item adjacency from `normalized_adjacency` or `prune_edges`.
      users: layer-0 user embeddings, shape ``[U, d]``.
      items: layer-0 item embeddings, shape ``[I, d]``.
      num_layers: number of propagation layers L (static, at least 0).

    Returns:
      The means over layers of the users ``[U, d]`` and of the items ``[I, d]``.
    """
    num_users, num_items = users.shape[0], items.shape[0]
    user_rows, item_rows = _user_item_blocks(graph, num_users, num_items)
    user_total, item_total = users, items
    for _ in range(num_layers):
        users, items = _propagate_user_item(
            user_rows, item_rows, users, items, num_users, num_items
        )
        user_total = user_total + users
        item_total = item_total + items
    return user_total / (num_layers + 1), item_total / (num_layers + 1)


def training_edges(
    users: np.ndarray, items: np.ndarray, num_users: int, num_items: int
) -> TrainingEdges:
    """Prepare the training interactions for `prune_edges` (host side, numpy).

    Args:
      users: user id of every training interaction.
      items: item id of every training interaction; each (user, item) pair occurs once.
      num_users: number of users U.
      num_items: number of items I.

    Returns:
      `TrainingEdges` sorted by (user, item), with the log sampling weight of every edge
      and the permutation that sorts the edges by (item, user).
    """
    users, items = _check_interactions(users, items, num_users, num_items)
    log_weights = np.log(_edge_weights(users, items, num_users, num_items))
    item_major_order = np.lexsort((users, items))

    return TrainingEdges(
        users=jnp.asarray(users, dtype=jnp.int32),
        items=jnp.asarray(items, dtype=jnp.int32),
        log_weights=jnp.asarray(log_weights, dtype=jnp.float32),
        item_major_order=jnp.asarray(item_major_order, dtype=jnp.int32),
    )


def num_kept_edges(num_edges: int, dropout: float) -> int:
    """Return how many edges pruning keeps: ``int(num_edges * (1 - dropout))``.

    This is the reference formula, float rounding included (``int(10 * (1 - 0.8)) == 1``).
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    kept = int(num_edges * (1.0 - dropout))
    if kept < 1:
        raise ValueError(
            f"dropout {dropout} keeps no edge of the {num_edges} training edges; lower it"
        )
    return kept


def prune_edges(
    key: jax.Array, edges: TrainingEdges, num_kept: int, num_users: int, num_items: int
) -> Graph:
    """Sample a degree-sensitive pruned user-item graph (FREEDOM's edge pruning).

    Keeps exactly ``num_kept`` training edges, drawn without replacement with probability
    proportional to ``1 / sqrt(deg(u) deg(i))`` in the full training graph, so edges between
    low-degree nodes survive more often. The draw uses the Gumbel top-k trick
    (``top_k(log w + Gumbel noise)``), which has the same distribution as sequential
    weighted sampling without replacement (``torch.multinomial`` in the reference). The kept
    edges are then normalised with degrees counted over the kept edges only, plus
    ``DEGREE_EPSILON``, and symmetrised.

    Jittable and vmappable; the output always has ``2 * num_kept`` entries and sorted rows.

    Args:
      key: PRNG key.
      edges: prepared training edges from `training_edges`.
      num_kept: number of edges to keep (static), see `num_kept_edges`.
      num_users: number of users U (static).
      num_items: number of items I (static).

    Returns:
      A `Graph` over ``U + I`` nodes with ``2 * num_kept`` entries and its row pointers.
    """
    num_edges = edges.users.shape[0]
    gumbel = jax.random.gumbel(key, (num_edges,), dtype=jnp.float32)
    _, kept_ids = jax.lax.top_k(edges.log_weights + gumbel, num_kept)
    kept = jnp.zeros(num_edges, dtype=bool).at[kept_ids].set(True)

    kept_count = kept.astype(jnp.float32)
    user_degree = jax.ops.segment_sum(
        kept_count, edges.users, num_segments=num_users, indices_are_sorted=True
    )
    item_degree = jax.ops.segment_sum(kept_count, edges.items, num_segments=num_items)
    weights = jax.lax.rsqrt(user_degree[edges.users] + DEGREE_EPSILON) * jax.lax.rsqrt(
        item_degree[edges.items] + DEGREE_EPSILON
    )

    # The user rows list kept edges in (user, item) order and the item rows in (item, user)
    # order. A static `size` keeps the output shape of `nonzero` fixed.
    user_major = jnp.nonzero(kept, size=num_kept)[0]
    item_major = edges.item_major_order[
        jnp.nonzero(kept[edges.item_major_order], size=num_kept)[0]
    ]

    rows = jnp.concatenate([edges.users[user_major], edges.items[item_major] + num_users])
    cols = jnp.concatenate([edges.items[user_major] + num_users, edges.users[item_major]])
    # The kept degrees count the entries of every row, so their running sum gives the
    # CSR row pointers without a search.
    row_lengths = jnp.concatenate([user_degree, item_degree]).astype(jnp.int32)
    indptr = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(row_lengths, dtype=jnp.int32)])
    return Graph(
        rows=rows.astype(jnp.int32),
        cols=cols.astype(jnp.int32),
        weights=jnp.concatenate([weights[user_major], weights[item_major]]),
        indptr=indptr,
    )
