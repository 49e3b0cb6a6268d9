"""VBPR, matrix factorisation with projected item features, in Flax NNX.

Reference: He and McAuley, "VBPR: Visual Bayesian Personalized Ranking from Implicit
Feedback", AAAI 2016, as MMRec implements it. A user has one embedding of size 2d. An item's
vector is ``concat(item id embedding [d], Linear(concat of its modality features) [d])``,
the score is the dot product, and the loss is BPR with 1e-10 inside the log plus
reg_weight * (||U_b|| + ||P_b|| + ||N_b||) / batch size, where each norm is the un-squared
L2 (Frobenius) norm of the batch's final user, positive-item or negative-item matrix.
Embeddings are Xavier-uniform. The projection has a Xavier-normal kernel and a zero bias,
as MMRec's ``xavier_normal_initialization`` sets them. The visual bias terms of the paper
are absent, as in MMRec.

Modality order in the concatenation (fixed by `order_modalities`): MMRec puts text before
image. For other modality sets the "text slot" goes first: ``text`` if present, otherwise
the alphabetically first modality other than ``image``. Then comes ``image``, then every
remaining modality in alphabetical order. TikTok (image + audio) therefore uses
``(audio, image)``.

What the port changes:
- Padded batch rows (``mask`` False) contribute exactly zero, and both terms are divided
  by the number of valid rows instead of the padded batch size.
- The loss projects only the batch's item features instead of the whole catalogue, which
  gives the same value and gradient at lower cost.
- The feature matrix is a non-trainable `Constant` in the model state, so
  `VBPR.set_item_features` can swap it at inference time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.graph import Constant
from models.lightgcn import (
    bpr_loss,
    check_float,
    check_int,
    dataset_name,
    masked_norm,
    num_valid_rows,
    xavier_uniform,
)

xavier_normal = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "normal")
BPR_LOG_EPSILON = 1e-10  # MMRec's BPRLoss computes -log(1e-10 + sigmoid(.))


def order_modalities(names: Iterable[str]) -> tuple[str, ...]:
    """Order modality names as VBPR concatenates them: text slot, image, the rest sorted."""
    names = sorted(set(names))
    others = [name for name in names if name != "image"]
    ordered = []
    if others:
        text_slot = "text" if "text" in others else others[0]
        ordered.append(text_slot)
        others.remove(text_slot)
    if "image" in names:
        ordered.append("image")
    return tuple(ordered + others)


def check_item_features(
    model: str, features: Mapping[str, Any], num_items: int, source: str
) -> dict[str, np.ndarray]:
    """Return the feature matrices as float32 arrays, or raise ValueError naming the problem.

    Args:
      model: model name for messages.
      features: modality name -> ``[num_items, dim]`` matrix.
      num_items: expected number of rows.
      source: where the features come from (a dataset name), for messages.
    """
    if not features:
        raise ValueError(
            f"model {model!r} needs item features, but {source} has none; load a dataset "
            f"folder with at least one <modality>_feat.npy file"
        )
    checked = {}
    for name, values in features.items():
        matrix = np.asarray(values, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[0] != num_items or matrix.shape[1] == 0:
            raise ValueError(
                f"model {model!r}: {source} has invalid {name!r} features of shape "
                f"{matrix.shape}; expected ({num_items}, dim) with dim >= 1"
            )
        if not np.isfinite(matrix).all():
            raise ValueError(f"model {model!r}: {source} has non-finite {name!r} features")
        checked[str(name)] = matrix
    return checked


def check_same_modalities(
    model: str, features: Mapping[str, np.ndarray], expected_dims: Mapping[str, int]
) -> None:
    """Raise ValueError unless ``features`` has exactly the expected modalities and widths."""
    dims = {name: matrix.shape[1] for name, matrix in features.items()}
    if dims != dict(expected_dims):
        raise ValueError(
            f"model {model!r}: replacement features must keep the modalities and widths the "
            f"model was built with, {dict(expected_dims)}, got {dims}"
        )


class VBPR(nnx.Module):
    """VBPR: user embeddings scored against item id embeddings plus projected features.

    The feature matrix is a `Constant` derived from the dataset only, never from ``rngs``,
    so every seed's model has the same non-parameter state.

    Args:
      dataset: provides ``num_users``, ``num_items``, ``name`` and a non-empty ``features``.
      embedding_dim: d; users get 2d, items d (id) + d (features).
      reg_weight: weight of the norm term; MMRec searches {2.0, 1.0, 0.1, ..., 1e-5}.
      rngs: supplies ``rngs.params()`` for the embeddings and the projection.
    """

    uses_features = True

    def __init__(
        self,
        dataset: Any,
        *,
        embedding_dim: int = 64,
        reg_weight: float = 1e-3,
        rngs: nnx.Rngs,
    ):
        self.embedding_dim = check_int("vbpr", "embedding_dim", embedding_dim, minimum=1)
        self.reg_weight = check_float("vbpr", "reg_weight", reg_weight)
        self.num_users = int(dataset.num_users)
        self.num_items = int(dataset.num_items)

        features = check_item_features(
            "vbpr", dataset.features, self.num_items, f"dataset {dataset_name(dataset)!r}"
        )
        self.modalities = order_modalities(features)
        self.feature_dims = tuple((name, features[name].shape[1]) for name in self.modalities)
        self.item_features = Constant(self._concatenate(features))

        self.user_embedding = nnx.Param(
            xavier_uniform(rngs.params(), (self.num_users, 2 * self.embedding_dim))
        )
        self.item_embedding = nnx.Param(
            xavier_uniform(rngs.params(), (self.num_items, self.embedding_dim))
        )
        self.projection = nnx.Linear(
            sum(dim for _, dim in self.feature_dims),
            self.embedding_dim,
            kernel_init=xavier_normal,
            bias_init=nnx.initializers.zeros_init(),
            rngs=rngs,
        )

    def _concatenate(self, features: Mapping[str, np.ndarray]) -> jax.Array:
        return jnp.asarray(np.concatenate([features[name] for name in self.modalities], axis=1))

    def _item_vectors(self) -> jax.Array:
        """Return ``concat(id embedding, projected features)`` for every item."""
        features = self.projection(self.item_features[...])
        return jnp.concatenate([self.item_embedding[...], features], axis=-1)

    def train_graph(self, key: jax.Array) -> None:
        """Return None, because VBPR uses no graph."""
        del key
        return None

    def embed(self, graph: Any = None) -> tuple[jax.Array, jax.Array]:
        """Compute the user ``[U, 2d]`` and item ``[I, 2d]`` vectors; ``graph`` is ignored."""
        del graph
        return self.user_embedding[...], self._item_vectors()

    def loss(self, batch: Any, graph: Any = None) -> jax.Array:
        """Compute BPR plus the final-vector norm term on one padded batch.

        Args:
          batch: ``users``, ``pos_items``, ``neg_items`` (int32 ``[B]``) and ``mask``
            (bool ``[B]``, False on padding rows).
          graph: ignored.

        Returns:
          A float32 scalar.
        """
        del graph
        mask = jnp.asarray(batch.mask, dtype=bool)
        users = self.user_embedding[...][batch.users]
        # An item vector is [id embedding, projected features]. Its two parts stay separate
        # arrays, and one projection serves the positive and the negative items.
        items = jnp.concatenate([batch.pos_items, batch.neg_items])
        ids = self.item_embedding[...][items]
        projected = self.projection(self.item_features[...][items])
        size = batch.users.shape[0]
        user_ids, user_features = users[:, : self.embedding_dim], users[:, self.embedding_dim :]

        def scores(rows: slice) -> jax.Array:
            return jnp.sum(user_ids * ids[rows], axis=-1) + jnp.sum(
                user_features * projected[rows], axis=-1
            )

        positive, negative = slice(0, size), slice(size, None)
        ranking_loss = bpr_loss(
            scores(positive), scores(negative), mask, epsilon=BPR_LOG_EPSILON
        )
        norms = (
            masked_norm(users, mask)
            + masked_norm((ids[positive], projected[positive]), mask)
            + masked_norm((ids[negative], projected[negative]), mask)
        )
        return ranking_loss + self.reg_weight * norms / num_valid_rows(mask)

    def set_item_features(self, features: Mapping[str, np.ndarray]) -> None:
        """Replace the item feature matrix, keeping the learned parameters.

        Args:
          features: the same modalities with the same widths as at construction.

        Raises:
          ValueError: on missing, extra or reshaped modalities.
        """
        checked = check_item_features("vbpr", features, self.num_items, "the new features")
        check_same_modalities("vbpr", checked, dict(self.feature_dims))
        self.item_features.set_value(self._concatenate(checked))
