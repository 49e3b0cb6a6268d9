"""Mirror Gradient (MG) as optax gradient transformations.

MG (Zhong et al., "Mirror Gradient: Towards Robust Multimodal Recommender
Systems via Exploring Flat Local Minima", WWW 2024) trains on every
``interval``-th batch twice: a descent step scaled by ``descent_scale``, then,
on the same batch at the updated parameters, an ascent step scaled by
``ascent_scale``. The other batches take one plain step.

Two forms are provided:

* :func:`mirror_gradient`, a step-counted transformation for
  ``optax.chain``. The caller makes two ``update`` calls on a mirror batch: the
  second one with the gradient at the updated parameters, on the same batch.
  :func:`is_mirror_step` returns whether that second call is due.
* :func:`with_mirror_gradient`, a wrapper around any optimizer that makes one
  ``update`` call per batch and evaluates the second gradient itself through a
  ``grad_fn`` extra argument. It suits ``lax.scan`` epochs.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PLACEMENTS = ("gradient", "update")

_DESCENT_CALL = 0
_ASCENT_CALL = 1


class MirrorGradientState(NamedTuple):
  """State of :func:`mirror_gradient`."""

  cycle_step: jax.Array  # shape=(), dtype=jnp.int32, in [0, interval]


class WithMirrorGradientState(NamedTuple):
  """State of :func:`with_mirror_gradient`."""

  batch_in_cycle: jax.Array  # shape=(), dtype=jnp.int32, in [0, interval)
  inner_state: optax.OptState


def _concrete(value: Any) -> np.ndarray | None:
  """Return ``value`` as a NumPy array, or None when it is a tracer."""
  if isinstance(value, jax.core.Tracer):
    return None
  return np.asarray(value)


def _check_interval(interval: Any) -> None:
  if isinstance(interval, bool):
    raise ValueError(
        f"interval must be a positive integer, got {interval!r}."
    )
  if isinstance(interval, jax.core.Tracer):
    if not jnp.issubdtype(interval.dtype, jnp.integer):
      raise ValueError(
          f"interval must have an integer dtype, got {interval.dtype}."
      )
    return
  value = np.asarray(interval)
  if (
      value.shape != ()
      or not np.issubdtype(value.dtype, np.integer)
      or value < 1
  ):
    raise ValueError(
        f"interval must be a positive integer, got {interval!r}."
    )


def _check_scale(name: str, scale: Any, *, allow_zero: bool) -> None:
  value = _concrete(scale)
  if value is None:
    return
  if value.shape != () or not np.issubdtype(value.dtype, np.number):
    raise ValueError(f"{name} must be a real scalar, got {scale!r}.")
  if not math.isfinite(float(value)):
    raise ValueError(f"{name} must be finite, got {scale!r}.")
  if allow_zero and value < 0:
    raise ValueError(f"{name} must be >= 0, got {scale!r}.")
  if not allow_zero and value <= 0:
    raise ValueError(f"{name} must be > 0, got {scale!r}.")


def _check_placement(placement: str) -> None:
  if placement not in PLACEMENTS:
    raise ValueError(
        f"placement must be one of {PLACEMENTS}, got {placement!r}."
    )


def _scale_tree(scale: jax.Array, tree: Any) -> Any:
  """Multiply every leaf by ``scale`` without changing the leaf's dtype."""
  return jax.tree.map(lambda x: jnp.asarray(scale, x.dtype) * x, tree)


def mirror_gradient(
    interval: int | jax.Array = 3,
    *,
    descent_scale: float | jax.Array = 1.0,
    ascent_scale: float | jax.Array = 0.2,
) -> optax.GradientTransformation:
  r"""Scale updates by the Mirror Gradient cycle.

  One cycle is ``interval + 1`` update calls. Call 0 is the descent step of a
  mirror batch and multiplies the incoming updates by ``descent_scale``. Call 1
  is the mirror step: the caller passes the gradient at the updated
  parameters, on the same batch, and this call multiplies it by
  ``-ascent_scale``. Calls 2 to ``interval`` are plain steps on the next
  batches and pass the updates through unchanged. With ``interval=1`` every
  batch is a mirror batch.

  The position in the chain decides what the scales act on:

  * first, ``optax.chain(mirror_gradient(3), optax.adam(lr))``: the scales act
    on the gradient before the optimizer, which is what the reference PyTorch
    trainer does (it scales the loss and calls ``optimizer.step()`` twice).
    With Adam the negated gradient enters the moment estimates. The first
    moment, dominated by earlier descent gradients, then turns the "ascent"
    call into a second descent step. Measured on the reference PyTorch code
    (FREEDOM and VBPR on TikTok), that update had cosine +0.999 with the
    descent update and about -0.45 with the gradient, at 0.85 to 0.88 times
    its size.
  * last, ``optax.chain(optax.adam(lr), mirror_gradient(3))``: the scales act
    on the optimizer's update, so the mirror call moves the parameters uphill
    by ``ascent_scale`` times an Adam step, as the algorithm in the paper
    writes it.

  With plain SGD both positions give the same parameters.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_mg
    >>> loss_fn = lambda p, x: jnp.sum((p - x) ** 2)
    >>> opt = optax.chain(optax_mg.mirror_gradient(2), optax.sgd(0.1))
    >>> params = jnp.array([1.0, -1.0])
    >>> state = opt.init(params)
    >>> for x in jnp.linspace(0.0, 0.5, 4):
    ...   updates, state = opt.update(jax.grad(loss_fn)(params, x), state)
    ...   params = optax.apply_updates(params, updates)
    ...   if optax_mg.is_mirror_step(state):  # same batch, new parameters
    ...     updates, state = opt.update(jax.grad(loss_fn)(params, x), state)
    ...     params = optax.apply_updates(params, updates)

  Args:
    interval: number of batches per cycle: batch 0 of each cycle is a mirror
      batch. A positive integer (an integer array is accepted, so that
      ``optax.inject_hyperparams`` may hold it).
    descent_scale: factor of the descent call of a mirror batch, > 0.
    ascent_scale: factor of the mirror call, >= 0; the call uses its
      negative.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`MirrorGradientState`.

  Raises:
    ValueError: if ``interval`` is not a positive integer, or a concrete scale
      is not finite or out of range.

  References:
    Zhong et al., `Mirror Gradient: Towards Robust Multimodal Recommender
    Systems via Exploring Flat Local Minima <https://arxiv.org/abs/2402.11262>`_,
    WWW 2024.
  """
  _check_interval(interval)
  _check_scale("descent_scale", descent_scale, allow_zero=False)
  _check_scale("ascent_scale", ascent_scale, allow_zero=True)

  def init_fn(params):
    del params
    return MirrorGradientState(cycle_step=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    step = state.cycle_step
    # A select on the scale keeps one arithmetic path, so a NaN can only come
    # from the updates of this call.
    scale = jnp.where(
        step == _DESCENT_CALL,
        descent_scale,
        jnp.where(step == _ASCENT_CALL, -jnp.asarray(ascent_scale), 1.0),
    )
    updates = _scale_tree(scale, updates)
    next_step = jnp.mod(step + 1, jnp.asarray(interval, jnp.int32) + 1)
    return updates, MirrorGradientState(cycle_step=next_step.astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)


def _find_mirror_states(opt_state: Any) -> list[tuple[Any, Any]]:
  is_state = lambda x: isinstance(
      x, (MirrorGradientState, WithMirrorGradientState)
  )
  leaves, _ = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_state)
  return [(path, leaf) for path, leaf in leaves if is_state(leaf)]


def is_mirror_step(opt_state: optax.OptState) -> jax.Array:
  """Tell whether the next ``update`` call is the mirror (ascent) step.

  The :class:`MirrorGradientState` may sit anywhere in ``opt_state``: inside
  ``optax.chain``, ``optax.named_chain``, ``optax.inject_hyperparams`` or
  ``optax.MultiSteps``.

  .. note::
    Inside ``optax.MultiSteps`` the result refers to the next update of the
    inner optimizer, which happens only on every ``every_k_schedule``-th call.

  Args:
    opt_state: an optimizer state that contains exactly one
      :class:`MirrorGradientState`.

  Returns:
    A boolean scalar array, traceable under ``jax.jit`` and ``jax.vmap``.

  Raises:
    ValueError: if ``opt_state`` contains no :class:`MirrorGradientState`, or
      more than one, or a :class:`WithMirrorGradientState`, whose ``update``
      performs the mirror step itself.
  """
  found = _find_mirror_states(opt_state)
  chain_states = [
      (path, s) for path, s in found if isinstance(s, MirrorGradientState)
  ]
  if not chain_states:
    if found:
      raise ValueError(
          "is_mirror_step found a WithMirrorGradientState: an optimizer built"
          " by with_mirror_gradient performs the mirror step inside its own"
          " update call, so no second call is due."
      )
    raise ValueError(
        "is_mirror_step found no MirrorGradientState in the optimizer state."
        " Build the optimizer with optax_mg.mirror_gradient(...) inside"
        " optax.chain."
    )
  if len(chain_states) > 1:
    paths = ", ".join(jax.tree_util.keystr(p) for p, _ in chain_states)
    raise ValueError(
        f"is_mirror_step found {len(chain_states)} MirrorGradientState"
        f" entries (at {paths}); the optimizer must contain exactly one"
        " mirror_gradient."
    )
  return chain_states[0][1].cycle_step == _ASCENT_CALL


def restart_cycle(opt_state: optax.OptState) -> optax.OptState:
  """Move every Mirror Gradient state in ``opt_state`` to the cycle start.

  The reference trainer counts batches from 0 in every epoch, so the first
  batch of each epoch is a mirror batch. Calling this at the start of each
  epoch reproduces that. Without it the cycle runs on across epochs.

  Args:
    opt_state: an optimizer state.

  Returns:
    ``opt_state`` with the counters of every :class:`MirrorGradientState` and
    :class:`WithMirrorGradientState` set to 0; the rest is unchanged.

  Raises:
    ValueError: if ``opt_state`` contains neither state.
  """
  if not _find_mirror_states(opt_state):
    raise ValueError(
        "restart_cycle found no Mirror Gradient state in the optimizer state."
    )

  def restart(node):
    if isinstance(node, MirrorGradientState):
      return MirrorGradientState(jnp.zeros_like(node.cycle_step))
    if isinstance(node, WithMirrorGradientState):
      return node._replace(batch_in_cycle=jnp.zeros_like(node.batch_in_cycle))
    return node

  return jax.tree.map(
      restart,
      opt_state,
      is_leaf=lambda x: isinstance(
          x, (MirrorGradientState, WithMirrorGradientState)
      ),
  )


def with_mirror_gradient(
    optimizer: optax.GradientTransformation,
    interval: int = 3,
    *,
    descent_scale: float | jax.Array = 1.0,
    ascent_scale: float | jax.Array = 0.2,
    placement: str = "gradient",
) -> optax.GradientTransformationExtraArgs:
  """Wrap ``optimizer`` so that one ``update`` call performs a whole MG batch.

  The returned ``update(grads, state, params, *, grad_fn)`` takes the gradient
  of the current batch and a ``grad_fn(params) -> grads`` that evaluates the
  gradient of the SAME batch at other parameters. On a mirror batch (batch 0
  of every ``interval`` batches) it makes the inner descent update, calls
  ``grad_fn`` at the updated parameters, makes the inner ascent update, and
  returns the sum of both updates. On other batches it makes one plain inner
  update and does not evaluate ``grad_fn``, because a ``lax.cond`` picks the
  branch. Under ``jax.vmap`` with a batched state both branches run and a
  select picks one result, so a NaN of the unused branch still does not reach
  the output.

  The inner optimizer's state advances as in the reference trainer: two inner
  updates on a mirror batch, one on other batches. The resulting parameters
  equal those of the two-call form of :func:`mirror_gradient` up to
  floating-point rounding, because ``params + (u1 + u2)`` is rounded once
  where the two-call form rounds ``(params + u1) + u2``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_mg
    >>> loss_fn = lambda p, x: jnp.sum((p - x) ** 2)
    >>> opt = optax_mg.with_mirror_gradient(optax.adam(0.1), interval=3)
    >>> params = jnp.array([1.0, -1.0])
    >>> state = opt.init(params)
    >>> for x in jnp.linspace(0.0, 0.5, 4):
    ...   grads = jax.grad(loss_fn)(params, x)
    ...   grad_fn = lambda p, x=x: jax.grad(loss_fn)(p, x)
    ...   updates, state = opt.update(grads, state, params, grad_fn=grad_fn)
    ...   params = optax.apply_updates(params, updates)

  Args:
    optimizer: the inner optimizer, without a :func:`mirror_gradient` in it.
    interval: number of batches per cycle; batch 0 is a mirror batch.
    descent_scale: factor of the descent update, > 0.
    ascent_scale: factor of the ascent update, >= 0; it is negated.
    placement: ``"gradient"`` scales the gradients before the inner optimizer
      (the reference trainer); ``"update"`` scales the inner optimizer's
      updates, which makes the mirror step a true ascent for adaptive
      optimizers. See :func:`mirror_gradient`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`WithMirrorGradientState`.

  Raises:
    ValueError: for an invalid ``interval``, scale or ``placement``; at update
      time, when ``params`` or ``grad_fn`` is missing.
  """
  _check_interval(interval)
  _check_scale("descent_scale", descent_scale, allow_zero=False)
  _check_scale("ascent_scale", ascent_scale, allow_zero=True)
  _check_placement(placement)
  inner = optax.with_extra_args_support(optimizer)
  descent = jnp.asarray(descent_scale)
  ascent = -jnp.asarray(ascent_scale)

  def scaled_inner_update(scale, grads, inner_state, params, extra_args):
    if placement == "gradient":
      grads = _scale_tree(scale, grads)
    updates, inner_state = inner.update(grads, inner_state, params, **extra_args)
    if placement == "update":
      updates = _scale_tree(scale, updates)
    return updates, inner_state

  def init_fn(params):
    return WithMirrorGradientState(
        batch_in_cycle=jnp.zeros([], jnp.int32),
        inner_state=inner.init(params),
    )

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    if params is None:
      raise ValueError(
          "with_mirror_gradient needs params in update(): the ascent gradient"
          " is evaluated at params + descent update."
      )
    if grad_fn is None:
      raise ValueError(
          "with_mirror_gradient needs update(..., grad_fn=fn), where fn(params)"
          " returns the gradient of the current batch at those parameters."
      )

    def mirror_batch(operand):
      grads, inner_state = operand
      descent_updates, inner_state = scaled_inner_update(
          descent, grads, inner_state, params, extra_args
      )
      moved = optax.apply_updates(params, descent_updates)
      ascent_updates, inner_state = scaled_inner_update(
          ascent, grad_fn(moved), inner_state, moved, extra_args
      )
      combined = jax.tree.map(
          lambda a, b: (a + b).astype(a.dtype), descent_updates, ascent_updates
      )
      return combined, inner_state

    def plain_batch(operand):
      grads, inner_state = operand
      return inner.update(grads, inner_state, params, **extra_args)

    new_updates, inner_state = jax.lax.cond(
        state.batch_in_cycle == 0,
        mirror_batch,
        plain_batch,
        (updates, state.inner_state),
    )
    next_batch = jnp.mod(
        state.batch_in_cycle + 1, jnp.asarray(interval, jnp.int32)
    )
    return new_updates, WithMirrorGradientState(
        batch_in_cycle=next_batch.astype(jnp.int32), inner_state=inner_state
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mirror_train_step(
    loss_fn: Callable[[optax.Params, Any], jax.Array],
    optimizer: optax.GradientTransformation,
) -> Callable[[optax.Params, optax.OptState, Any], tuple[Any, Any, jax.Array]]:
  """Build a training step that applies the same-batch rule of MG.

  ``optimizer`` is either an optimizer that contains one
  :func:`mirror_gradient` (the two-call form) or one built by
  :func:`with_mirror_gradient`. The returned
  ``step(params, opt_state, batch) -> (params, opt_state, loss)`` takes one
  batch. With the two-call form it makes the first update, and when
  :func:`is_mirror_step` is then true, a second update with the gradient of
  the same batch at the new parameters, decided by ``lax.cond`` inside the
  compiled step (no host synchronisation). ``step`` is pure, so it can be
  wrapped in ``jax.jit``, ``jax.vmap`` or used as a ``lax.scan`` body.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_mg
    >>> loss_fn = lambda p, x: jnp.sum((p - x) ** 2)
    >>> opt = optax.chain(optax_mg.mirror_gradient(3), optax.adam(0.1))
    >>> step = jax.jit(optax_mg.mirror_train_step(loss_fn, opt))
    >>> params = jnp.array([1.0, -1.0])
    >>> state = opt.init(params)
    >>> for x in jnp.linspace(0.0, 0.5, 4):
    ...   params, state, loss = step(params, state, x)

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar loss``.
    optimizer: see above.

  Returns:
    The step function. The loss it returns is the loss of the batch at the
    parameters before the step.
  """
  grad_fn = jax.grad(loss_fn)

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)

    if isinstance(opt_state, WithMirrorGradientState):
      updates, opt_state = optimizer.update(
          grads, opt_state, params, grad_fn=lambda p: grad_fn(p, batch)
      )
      return optax.apply_updates(params, updates), opt_state, loss

    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

    def mirror_update(carry):
      params, opt_state = carry
      updates, opt_state = optimizer.update(
          grad_fn(params, batch), opt_state, params
      )
      return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(
        is_mirror_step(opt_state),
        mirror_update,
        lambda carry: carry,
        (params, opt_state),
    )
    return params, opt_state, loss

  return step
