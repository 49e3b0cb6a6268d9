"""Diagnostics of the direction of the Mirror Gradient ascent call."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_mg import _mirror


class MirrorAlignment(NamedTuple):
  """Geometry of one mirror batch, from :func:`mirror_alignment`."""

  update_cosine: jax.Array  # shape=(), dtype=float32
  gradient_cosine: jax.Array  # shape=(), dtype=float32
  norm_ratio: jax.Array  # shape=(), dtype=float32
  descent_loss: jax.Array  # shape=(), dtype=float32
  after_descent_loss: jax.Array  # shape=(), dtype=float32
  after_ascent_loss: jax.Array  # shape=(), dtype=float32


def _flat(tree: Any) -> jax.Array:
  leaves = [jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)]
  return jnp.concatenate(leaves)


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  denominator = jnp.linalg.norm(a) * jnp.linalg.norm(b)
  return jnp.where(denominator > 0, jnp.vdot(a, b) / denominator, 0.0)


def mirror_alignment(
    loss_fn: Callable[[optax.Params, Any], jax.Array],
    optimizer: optax.GradientTransformation,
    params: optax.Params,
    opt_state: optax.OptState,
    batch: Any,
) -> MirrorAlignment:
  """Measure where the mirror call of one mirror batch moves the parameters.

  Runs the two calls of a mirror batch on ``batch`` from the given state,
  after moving the cycle to its start with :func:`restart_cycle`, and compares
  the ascent-call update ``u2`` with the descent-call update ``u1`` and with
  the loss gradient ``g`` at the point where ``u2`` is applied. The intended
  ascent has ``gradient_cosine > 0`` (uphill). A ``gradient_cosine < 0`` with
  ``update_cosine`` near +1 means that the optimizer turned the ascent call
  into a second descent step, as Adam does when ``mirror_gradient`` sits
  before it.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar loss``.
    optimizer: an optimizer that contains one :func:`mirror_gradient`, at
      either position in its chain.
    params: the parameters, for example those of a model being trained.
    opt_state: the optimizer state that belongs to ``params``. Nothing is
      written back to it.
    batch: the batch of the mirror step.

  Returns:
    A :class:`MirrorAlignment`: ``update_cosine`` is cos(u2, u1),
    ``gradient_cosine`` is cos(u2, g), ``norm_ratio`` is ||u2|| / ||u1||, and
    the three losses are at ``params``, after the descent call and after the
    ascent call.
  """
  opt_state = _mirror.restart_cycle(opt_state)
  grad_fn = jax.value_and_grad(loss_fn)

  descent_loss, grads = grad_fn(params, batch)
  descent_updates, opt_state = optimizer.update(grads, opt_state, params)
  moved = optax.apply_updates(params, descent_updates)

  moved_loss, moved_grads = grad_fn(moved, batch)
  ascent_updates, _ = optimizer.update(moved_grads, opt_state, moved)
  final = optax.apply_updates(moved, ascent_updates)

  u1 = _flat(descent_updates)
  u2 = _flat(ascent_updates)
  u1_norm = jnp.linalg.norm(u1)
  return MirrorAlignment(
      update_cosine=_cosine(u2, u1),
      gradient_cosine=_cosine(u2, _flat(moved_grads)),
      norm_ratio=jnp.where(u1_norm > 0, jnp.linalg.norm(u2) / u1_norm, 0.0),
      descent_loss=jnp.asarray(descent_loss, jnp.float32),
      after_descent_loss=jnp.asarray(moved_loss, jnp.float32),
      after_ascent_loss=jnp.asarray(loss_fn(final, batch), jnp.float32),
  )
