"""FREEDOM, a frozen item-item graph plus a pruned user-item graph, in Flax NNX.

Reference: Zhou and Shen, "A Tale of Two Graphs: Freezing and Denoising Graph Structures
for Multimodal Recommendation", ACM MM 2023, as its public PyTorch code (built on MMRec)
implements it:
- A frozen item-item graph, built once from the raw features: per modality, the k = 10 most
  cosine-similar items of every item (the item itself included) with weight 1/k each, and
  the modalities mixed with per-modality weights.
- The symmetric normalised user-item graph, 2 LightGCN layers, mean over layers 0..2.
- Final item vector = LightGCN item vector + item-graph @ item id embeddings (one layer);
  final user vector = LightGCN user vector.
- Degree-sensitive edge pruning before every epoch (see `models.graph.prune_edges`): the
  pruned graph trains, the full graph evaluates.
- Loss = BPR(final user, final pos, final neg) + reg_weight * sum over modalities of
  BPR(final user, proj_m(feat_m)[pos], proj_m(feat_m)[neg]). There is no L2 term.
- Each modality has a Linear(feature dim -> d) projection with PyTorch's default
  ``nn.Linear`` initialisation, and the raw feature tables are trainable parameters.
  Embeddings are Xavier-uniform.

Modalities are a named set. The default mixing weights are 0.1 for ``image`` and 0.9
split equally over the other modalities, so on TikTok audio takes the text slot and gets
0.9. A single modality gets 1.0, and a set without ``image`` is split equally.

What the port changes:
- Pruning keeps exactly ``int(E * (1 - dropout))`` edges drawn by the Gumbel top-k trick,
  which has the distribution of ``torch.multinomial`` without replacement and gives every
  pruned graph the same shape.
- The item-item graph keeps each modality's k edges per item as separate entries instead
  of merging duplicates. Propagation sums them, so the matrix is the same, and its shape
  stays fixed when `FREEDOM.set_item_features` rebuilds it.
- Cosine similarities are computed in chunks of items, so memory stays bounded on large
  catalogues. A zero feature vector gets similarity 0 to every item instead of NaN, and
  ties go to the lower item id.
- `FREEDOM.set_item_features` rebuilds the item-item graph from the new features. The
  reference caches the graph on disk keyed only by k and the image weight.
- Padded batch rows (``mask`` False) contribute exactly zero, and every BPR term is a mean
  over valid rows. The loss projects only the batch's feature rows, and for each row the
  difference of the positive and negative item's features, which gives the same value
  and gradients as projecting both items (or the whole table). The projection bias
  cancels in that difference, so its gradient is exactly zero, where the reference's is
  zero up to rounding. The bias enters no other output.
- `FREEDOM.embed` propagates the full graph once per evaluation instead of once per batch
  of users.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.graph import (
    Constant,
    Graph,
    TrainingEdges,
    light_gcn_layers,
    normalized_adjacency,
    num_kept_edges,
    propagate,
    transpose_graph,
    prune_edges,
    training_edges,
)
from models.lightgcn import bpr_loss, check_float, check_int, dataset_name, xavier_uniform
from models.vbpr import check_item_features, check_same_modalities, order_modalities

IMAGE_WEIGHT = 0.1  # default item-graph weight of the image modality when others exist


def default_modality_weights(modalities: Sequence[str]) -> dict[str, float]:
    """Return FREEDOM's default item-graph mixing weights for a set of modalities."""
    if "image" in modalities and len(modalities) > 1:
        share = (1.0 - IMAGE_WEIGHT) / (len(modalities) - 1)
        return {name: IMAGE_WEIGHT if name == "image" else share for name in modalities}
    return {name: 1.0 / len(modalities) for name in modalities}


@functools.partial(jax.jit, static_argnames="k")
def _most_similar(queries: jax.Array, keys: jax.Array, k: int) -> jax.Array:
    similarity = jnp.matmul(queries, keys.T, precision=jax.lax.Precision.HIGHEST)
    return jax.lax.top_k(similarity, k)[1]


def knn_neighbours(features: np.ndarray, k: int, *, chunk_size: int = 1024) -> np.ndarray:
    """Find the ``k`` most cosine-similar items of every item, the item itself included.

    Args:
      features: ``[num_items, dim]`` feature matrix.
      k: neighbours per item, at most ``num_items``.
      chunk_size: items whose similarity row is held in memory at once; peak memory is
        about ``chunk_size * num_items`` floats.

    Returns:
      int32 ``[num_items, k]`` neighbour ids, most similar first.
    """
    features = jnp.asarray(features, dtype=jnp.float32)
    num_items = features.shape[0]
    if not 1 <= k <= num_items:
        raise ValueError(f"knn_k must lie in [1, {num_items}] (the item count), got {k}")

    norms = jnp.linalg.norm(features, axis=1, keepdims=True)
    normalized = features / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny)

    # Pad to whole chunks so that every chunk reuses one compiled program.
    chunk_size = min(chunk_size, num_items)
    padding = -num_items % chunk_size
    queries = jnp.pad(normalized, ((0, padding), (0, 0)))
    neighbours = [
        np.asarray(_most_similar(queries[start : start + chunk_size], normalized, k))
        for start in range(0, num_items, chunk_size)
    ]
    return np.concatenate(neighbours)[:num_items].astype(np.int32)


def knn_item_graph(
    features: Mapping[str, np.ndarray],
    modality_weights: Mapping[str, float],
    k: int,
    *,
    chunk_size: int = 1024,
) -> Graph:
    """Build FREEDOM's frozen item-item graph as an edge list over ``num_items`` nodes.

    Every item gets, per modality m, an edge to each of its ``k`` nearest items with weight
    ``modality_weights[m] / k``. Edges found by several modalities stay separate entries,
    so the graph always has ``num_items * k * len(features)`` entries.

    Args:
      features: modality name -> ``[num_items, dim]`` features.
      modality_weights: modality name -> mixing weight, for every key of ``features``.
      k: neighbours per item and modality.
      chunk_size: see `knn_neighbours`.

    Returns:
      A `Graph` with rows sorted.
    """
    names = sorted(features)
    num_items = features[names[0]].shape[0]
    neighbours = [knn_neighbours(features[name], k, chunk_size=chunk_size) for name in names]
    weights = [np.full((num_items, k), modality_weights[name] / k) for name in names]

    row_length = k * len(names)
    return Graph(
        rows=jnp.asarray(np.repeat(np.arange(num_items), row_length), dtype=jnp.int32),
        cols=jnp.asarray(np.concatenate(neighbours, axis=1).ravel(), dtype=jnp.int32),
        weights=jnp.asarray(np.concatenate(weights, axis=1).ravel(), dtype=jnp.float32),
        indptr=jnp.arange(0, (num_items + 1) * row_length, row_length, dtype=jnp.int32),
    )


def _torch_linear_init(fan_in: int) -> tuple[Any, Any]:
    """Return (kernel_init, bias_init) matching PyTorch's default ``nn.Linear`` init."""
    bound = 1.0 / math.sqrt(fan_in)
    kernel_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return kernel_init, bias_init


class FREEDOM(nnx.Module):
    """FREEDOM: LightGCN on a pruned user-item graph plus a frozen kNN item-item graph.

    Graphs are `Constant` state derived from the dataset and hyperparameters only, never
    from ``rngs``, so every seed's model has the same non-parameter state.

    Args:
      dataset: provides ``num_users``, ``num_items``, ``name``, ``train.users``,
        ``train.items`` and a non-empty ``features``.
      embedding_dim: embedding size d.
      num_layers: LightGCN layers on the user-item graph.
      num_item_graph_layers: propagation layers on the item-item graph.
      knn_k: neighbours per item in the item-item graph.
      dropout: fraction of training edges removed by pruning each epoch, in [0, 1); the
        authors search {0.8, 0.9}.
      reg_weight: weight of the per-modality BPR terms; the authors search
        {0, 1e-5, 1e-4, 1e-3}.
      modality_weights: modality name -> item-graph mixing weight, for every modality of
        the dataset; None uses `default_modality_weights`.
      knn_chunk_size: items per chunk of the kNN similarity computation.
      rngs: supplies ``rngs.params()`` for embeddings and projections.
    """

    uses_features = True

    def __init__(
        self,
        dataset: Any,
        *,
        embedding_dim: int = 64,
        num_layers: int = 2,
        num_item_graph_layers: int = 1,
        knn_k: int = 10,
        dropout: float = 0.8,
        reg_weight: float = 1e-4,
        modality_weights: Mapping[str, float] | None = None,
        knn_chunk_size: int = 1024,
        rngs: nnx.Rngs,
    ):
        self.embedding_dim = check_int("freedom", "embedding_dim", embedding_dim, minimum=1)
        self.num_layers = check_int("freedom", "num_layers", num_layers, minimum=0)
        self.num_item_graph_layers = check_int(
            "freedom", "num_item_graph_layers", num_item_graph_layers, minimum=0
        )
        self.knn_k = check_int("freedom", "knn_k", knn_k, minimum=1)
        self.knn_chunk_size = check_int("freedom", "knn_chunk_size", knn_chunk_size, minimum=1)
        self.dropout = check_float("freedom", "dropout", dropout)
        if self.dropout >= 1.0:
            raise ValueError(
                f"freedom: invalid hyperparameter dropout={dropout!r}; expected a value in [0, 1)"
            )
        self.reg_weight = check_float("freedom", "reg_weight", reg_weight)
        self.num_users = int(dataset.num_users)
        self.num_items = int(dataset.num_items)

        features = check_item_features(
            "freedom", dataset.features, self.num_items, f"dataset {dataset_name(dataset)!r}"
        )
        self.modalities = order_modalities(features)
        self.feature_dims = tuple((name, features[name].shape[1]) for name in self.modalities)
        self.modality_weights = self._check_modality_weights(modality_weights)
        if self.knn_k > self.num_items:
            raise ValueError(
                f"freedom: invalid hyperparameter knn_k={knn_k!r}; expected at most the "
                f"{self.num_items} items of dataset {dataset_name(dataset)!r}"
            )

        self._build_user_item_graphs(dataset)
        for name, value in self._item_graph_arrays(features).items():
            setattr(self, name, Constant(value))

        self.user_embedding = nnx.Param(
            xavier_uniform(rngs.params(), (self.num_users, self.embedding_dim))
        )
        self.item_embedding = nnx.Param(
            xavier_uniform(rngs.params(), (self.num_items, self.embedding_dim))
        )
        self.feature_tables = nnx.Dict(
            {name: nnx.Param(jnp.asarray(features[name])) for name in self.modalities}
        )
        projections = {}
        for name, dim in self.feature_dims:
            kernel_init, bias_init = _torch_linear_init(dim)
            projections[name] = nnx.Linear(
                dim, self.embedding_dim, kernel_init=kernel_init, bias_init=bias_init, rngs=rngs
            )
        self.projections = nnx.Dict(projections)

    def _check_modality_weights(
        self, modality_weights: Mapping[str, float] | None
    ) -> tuple[tuple[str, float], ...]:
        if modality_weights is None:
            weights = default_modality_weights(self.modalities)
        elif not isinstance(modality_weights, Mapping) or set(modality_weights) != set(
            self.modalities
        ):
            raise ValueError(
                f"freedom: invalid hyperparameter modality_weights={modality_weights!r}; "
                f"expected a mapping with exactly the keys {list(self.modalities)}"
            )
        else:
            weights = {
                name: check_float("freedom", f"modality_weights[{name!r}]", value)
                for name, value in modality_weights.items()
            }
            if sum(weights.values()) <= 0.0:
                raise ValueError(
                    f"freedom: invalid hyperparameter modality_weights={modality_weights!r}; "
                    f"at least one weight must be positive"
                )
        return tuple((name, float(weights[name])) for name in self.modalities)

    def _build_user_item_graphs(self, dataset: Any) -> None:
        users, items = dataset.train.users, dataset.train.items
        graph = normalized_adjacency(users, items, self.num_users, self.num_items)
        self.adjacency_rows = Constant(graph.rows)
        self.adjacency_cols = Constant(graph.cols)
        self.adjacency_weights = Constant(graph.weights)
        self.adjacency_indptr = Constant(graph.indptr)

        edges = training_edges(users, items, self.num_users, self.num_items)
        self.edge_users = Constant(edges.users)
        self.edge_items = Constant(edges.items)
        self.edge_log_weights = Constant(edges.log_weights)
        self.edge_item_major_order = Constant(edges.item_major_order)
        self.num_kept_edges = num_kept_edges(len(users), self.dropout)

    def _item_graph_arrays(self, features: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Build the kNN item-item graph and its transpose, keyed by attribute name."""
        graph = knn_item_graph(
            features, dict(self.modality_weights), self.knn_k, chunk_size=self.knn_chunk_size
        )
        # The kNN graph is not symmetric, so its gradient needs the transposed edge list.
        transposed = transpose_graph(graph, self.num_items)
        arrays = {}
        for prefix, edges in (("item_graph", graph), ("item_graph_transpose", transposed)):
            for field in Graph._fields:
                arrays[f"{prefix}_{field}"] = getattr(edges, field)
        return arrays

    def full_graph(self) -> Graph:
        """Return the normalised adjacency of all training interactions."""
        return Graph(
            self.adjacency_rows[...],
            self.adjacency_cols[...],
            self.adjacency_weights[...],
            self.adjacency_indptr[...],
        )

    def item_graph(self) -> Graph:
        """Return the frozen kNN item-item graph."""
        return Graph(*(getattr(self, f"item_graph_{field}")[...] for field in Graph._fields))

    def item_graph_transpose(self) -> Graph:
        """Return the transpose of the kNN item-item graph, rows sorted."""
        return Graph(
            *(getattr(self, f"item_graph_transpose_{field}")[...] for field in Graph._fields)
        )

    def train_graph(self, key: jax.Array) -> Graph:
        """Sample this epoch's degree-sensitive pruned user-item graph (jittable).

        Returns:
          A `Graph` with ``2 * self.num_kept_edges`` entries and sorted rows.
        """
        edges = TrainingEdges(
            users=self.edge_users[...],
            items=self.edge_items[...],
            log_weights=self.edge_log_weights[...],
            item_major_order=self.edge_item_major_order[...],
        )
        return prune_edges(key, edges, self.num_kept_edges, self.num_users, self.num_items)

    def embed(self, graph: Graph | None = None) -> tuple[jax.Array, jax.Array]:
        """Compute the final user ``[U, d]`` and item ``[I, d]`` vectors.

        Args:
          graph: user-item adjacency to propagate over; None means the full training graph.
        """
        if graph is None:
            graph = self.full_graph()
        user_final, item_final = light_gcn_layers(
            graph, self.user_embedding[...], self.item_embedding[...], self.num_layers
        )

        item_graph = self.item_graph()
        item_item = self.item_embedding[...]
        for _ in range(self.num_item_graph_layers):
            item_item = propagate(
                item_graph, item_item, self.num_items, transpose=self.item_graph_transpose()
            )

        return user_final, item_final + item_item

    def loss(self, batch: Any, graph: Graph | None = None) -> jax.Array:
        """Compute BPR on the final vectors plus the per-modality BPR terms on one batch.

        Args:
          batch: ``users``, ``pos_items``, ``neg_items`` (int32 ``[B]``) and ``mask``
            (bool ``[B]``, False on padding rows).
          graph: pruned adjacency from `train_graph`; None means the full training graph.

        Returns:
          A float32 scalar.
        """
        mask = jnp.asarray(batch.mask, dtype=bool)
        user_final, item_final = self.embed(graph)
        users = user_final[batch.users]

        pos_scores = jnp.sum(users * item_final[batch.pos_items], axis=-1)
        neg_scores = jnp.sum(users * item_final[batch.neg_items], axis=-1)
        total = bpr_loss(pos_scores, neg_scores, mask)

        for name in self.modalities:
            # BPR depends only on the score difference, which is linear in the projected
            # features. One projection of the feature difference therefore serves both
            # items, and the bias cancels. This halves the matmul work.
            table = self.feature_tables[name][...]
            difference = table[batch.pos_items] - table[batch.neg_items]
            projected = difference @ self.projections[name].kernel[...]
            score_difference = jnp.sum(users * projected, axis=-1)
            total = total + self.reg_weight * bpr_loss(score_difference, 0.0, mask)
        return total

    def set_item_features(self, features: Mapping[str, np.ndarray]) -> None:
        """Replace the feature tables and rebuild the item-item graph from ``features``.

        The learned embeddings and projections stay; the trained feature tables are
        overwritten by the new features.

        Args:
          features: the same modalities with the same widths as at construction.

        Raises:
          ValueError: on missing, extra or reshaped modalities.
        """
        checked = check_item_features("freedom", features, self.num_items, "the new features")
        check_same_modalities("freedom", checked, dict(self.feature_dims))

        for name, value in self._item_graph_arrays(checked).items():
            getattr(self, name).set_value(value)
        for name in self.modalities:
            self.feature_tables[name].set_value(jnp.asarray(checked[name]))
