"""LightGCN for collaborative filtering, in Flax NNX.

Reference: He, Deng, Wang, Li, Zhang and Wang, "LightGCN: Simplifying and Powering Graph
Convolution Network for Recommendation", SIGIR 2020. The port follows MMRec's LightGCN:
Xavier-uniform user and item embeddings, L propagation layers over the symmetric normalised
user-item adjacency, the mean of layers 0..L as the final embedding, dot-product scores,
and the loss BPR + reg_weight * (||E_u|| + ||E_pos|| + ||E_neg||) / batch size, where each
norm is the un-squared L2 (Frobenius) norm of the batch's layer-0 embedding matrix, as
MMRec's ``EmbLoss`` computes it.

What the port changes:
- The BPR term is ``-mean(log_sigmoid(s_pos - s_neg))``. MMRec's ``BPRLoss`` adds 1e-10
  inside the log, which only matters once a pair is ranked wrong by more than about 23.
- Padded batch rows (``mask`` False) contribute exactly zero, and both terms are divided
  by the number of valid rows instead of the padded batch size.
- `embed` propagates the full graph once per call, so an evaluation computes the
  embeddings once instead of once per batch of users.

This module also contains the loss and hyperparameter helpers that VBPR and FREEDOM share.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.graph import Constant, Graph, light_gcn_layers, normalized_adjacency

xavier_uniform = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def check_int(model: str, name: str, value: Any, *, minimum: int) -> int:
    """Return ``value`` as an int, or raise ValueError naming the model, field and value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(
            f"{model}: invalid hyperparameter {name}={value!r}; expected an integer >= {minimum}"
        )
    return int(value)


def check_float(model: str, name: str, value: Any, *, minimum: float = 0.0) -> float:
    """Return ``value`` as a finite float >= ``minimum``, or raise ValueError naming it."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < minimum
    ):
        raise ValueError(
            f"{model}: invalid hyperparameter {name}={value!r}; expected a finite number "
            f">= {minimum}"
        )
    return float(value)


def num_valid_rows(mask: jax.Array) -> jax.Array:
    """Return the number of True entries of ``mask`` as float32, at least 1."""
    return jnp.maximum(jnp.sum(mask, dtype=jnp.float32), 1.0)


def bpr_loss(
    pos_scores: jax.Array,
    neg_scores: jax.Array | float,
    mask: jax.Array,
    *,
    epsilon: float | None = None,
) -> jax.Array:
    """Compute the masked BPR loss, the mean of -log sigmoid(s_pos - s_neg) over valid rows.

    Args:
      pos_scores: scores of the positive items, shape ``[B]``.
      neg_scores: scores of the negative items, shape ``[B]``, or 0 when ``pos_scores``
        already holds the score differences.
      mask: bool ``[B]``; rows where it is False contribute exactly zero.
      epsilon: if given, compute ``-log(epsilon + sigmoid(.))`` as MMRec's ``BPRLoss``
        does; otherwise use the exact ``log_sigmoid``.

    Returns:
      A float32 scalar.
    """
    difference = pos_scores - neg_scores
    if epsilon is None:
        per_row = -jax.nn.log_sigmoid(difference)
    else:
        per_row = -jnp.log(epsilon + jax.nn.sigmoid(difference))
    return jnp.sum(jnp.where(mask, per_row, 0.0)) / num_valid_rows(mask)


def masked_norm(embeddings: jax.Array | Sequence[jax.Array], mask: jax.Array) -> jax.Array:
    """Compute the L2 (Frobenius) norm of the valid rows of a ``[B, d]`` matrix.

    ``embeddings`` may also be a sequence of ``[B, d_k]`` column blocks; the result is the
    norm of their concatenation, computed without building it.

    The square root has an infinite derivative at zero, so an all-zero input returns 0
    with a zero gradient instead of NaN.
    """
    blocks = list(embeddings) if isinstance(embeddings, (list, tuple)) else [embeddings]
    total = sum(jnp.sum(jnp.where(mask[:, None], jnp.square(block), 0.0)) for block in blocks)
    positive = total > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, total, 1.0)), 0.0)


def dataset_name(dataset: Any) -> str:
    """Return the dataset's name for error messages."""
    return str(getattr(dataset, "name", "<unnamed dataset>"))


class LightGCN(nnx.Module):
    """LightGCN: embeddings smoothed by parameter-free propagation over the user-item graph.

    The adjacency is a `Constant` derived from the dataset only, never from ``rngs``, so
    every seed's model has the same non-parameter state.

    Args:
      dataset: provides ``num_users``, ``num_items`` and ``train.users``/``train.items``.
      embedding_dim: embedding size d.
      num_layers: propagation layers L; MMRec searches 1..4.
      reg_weight: weight of the embedding-norm term; MMRec searches 1e-2 .. 1e-6.
      rngs: supplies ``rngs.params()`` for the initial embeddings.
    """

    uses_features = False

    def __init__(
        self,
        dataset: Any,
        *,
        embedding_dim: int = 64,
        num_layers: int = 2,
        reg_weight: float = 1e-4,
        rngs: nnx.Rngs,
    ):
        self.embedding_dim = check_int("lightgcn", "embedding_dim", embedding_dim, minimum=1)
        self.num_layers = check_int("lightgcn", "num_layers", num_layers, minimum=0)
        self.reg_weight = check_float("lightgcn", "reg_weight", reg_weight)
        self.num_users = int(dataset.num_users)
        self.num_items = int(dataset.num_items)

        graph = normalized_adjacency(
            dataset.train.users, dataset.train.items, self.num_users, self.num_items
        )
        self.adjacency_rows = Constant(graph.rows)
        self.adjacency_cols = Constant(graph.cols)
        self.adjacency_weights = Constant(graph.weights)
        self.adjacency_indptr = Constant(graph.indptr)

        self.user_embedding = nnx.Param(
            xavier_uniform(rngs.params(), (self.num_users, self.embedding_dim))
        )
        self.item_embedding = nnx.Param(
            xavier_uniform(rngs.params(), (self.num_items, self.embedding_dim))
        )

    def full_graph(self) -> Graph:
        """Return the normalised adjacency of all training interactions."""
        return Graph(
            self.adjacency_rows[...],
            self.adjacency_cols[...],
            self.adjacency_weights[...],
            self.adjacency_indptr[...],
        )

    def train_graph(self, key: jax.Array) -> Graph:
        """Return the graph to train on: LightGCN always uses the full graph."""
        del key
        return self.full_graph()

    def embed(self, graph: Graph | None = None) -> tuple[jax.Array, jax.Array]:
        """Compute the final user ``[U, d]`` and item ``[I, d]`` embeddings.

        Args:
          graph: adjacency to propagate over; None means the full training graph.
        """
        if graph is None:
            graph = self.full_graph()
        return light_gcn_layers(
            graph, self.user_embedding[...], self.item_embedding[...], self.num_layers
        )

    def loss(self, batch: Any, graph: Graph | None = None) -> jax.Array:
        """Compute BPR plus the layer-0 embedding-norm term on one padded batch.

        Args:
          batch: ``users``, ``pos_items``, ``neg_items`` (int32 ``[B]``) and ``mask``
            (bool ``[B]``, False on padding rows).
          graph: adjacency from `train_graph`; None means the full training graph.

        Returns:
          A float32 scalar.
        """
        mask = jnp.asarray(batch.mask, dtype=bool)
        user_final, item_final = self.embed(graph)

        users = user_final[batch.users]
        pos_scores = jnp.sum(users * item_final[batch.pos_items], axis=-1)
        neg_scores = jnp.sum(users * item_final[batch.neg_items], axis=-1)
        ranking_loss = bpr_loss(pos_scores, neg_scores, mask)

        norms = (
            masked_norm(self.user_embedding[...][batch.users], mask)
            + masked_norm(self.item_embedding[...][batch.pos_items], mask)
            + masked_norm(self.item_embedding[...][batch.neg_items], mask)
        )
        return ranking_loss + self.reg_weight * norms / num_valid_rows(mask)

    def set_item_features(self, features: Mapping[str, np.ndarray]) -> None:
        """Accept new item features and ignore them, because LightGCN uses none."""
        del features
