"""Flatness diagnostics of a loss surface around given parameters.

Each diagnostic looks at one scalar loss ``loss_fn(params, batch)`` with the
evaluation ``batch`` held fixed, and needs only gradients and Hessian-vector
products, so its memory grows linearly with the number of parameters:

* :func:`hessian_trace`: Hutchinson's estimate of the Hessian trace (the sum
  of the curvatures along all directions).
* :func:`top_hessian_eigenvalue`: power iteration for the dominant Hessian
  eigenvalue (the curvature along the sharpest direction).
* :func:`sharpness`: the largest loss increase found inside an L2 ball around
  the parameters, by normalised gradient ascent.
* :func:`flatness_report`: all three, as a dict of Python floats.

All parameter leaves are differentiated, and leaves with a floating dtype
narrower than float32 (bfloat16, float16) are promoted to float32 first, so the
results are float32, or float64 for float64 parameters with ``jax_enable_x64``.
"""

from collections.abc import Callable
import functools
import math
import numbers
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[Any, Any], jax.Array]


class HessianTraceEstimate(NamedTuple):
  """Hutchinson estimate of the trace of a loss Hessian.

  Attributes:
    trace: mean of the probe values ``v^T H v`` over the Rademacher probes.
    std_error: standard error of ``trace``, the sample standard deviation of
      the probe values (``ddof=1``) divided by ``sqrt(num_probes)``. It is NaN
      when ``num_probes`` is 1.
    num_probes: number of probes averaged.
  """

  trace: jax.Array  # shape=(), dtype=jnp.float32 (float64 for float64 params)
  std_error: jax.Array  # shape=(), dtype like trace
  num_probes: jax.Array  # shape=(), dtype=jnp.int32


class TopHessianEigenvalue(NamedTuple):
  """Result of power iteration on a loss Hessian.

  Attributes:
    eigenvalue: Rayleigh quotient ``v^T H v`` of ``eigenvector``, with its sign.
    eigenvector: unit vector ``v`` (global L2 norm over all leaves), a pytree
      with the structure and shapes of the parameters.
    num_iterations: number of Hessian-vector products computed.
    converged: whether the relative change of the eigenvalue fell to ``tol``
      before ``num_iterations`` reached its limit.
  """

  eigenvalue: jax.Array  # shape=(), dtype=jnp.float32 (float64 for float64)
  eigenvector: Any  # pytree like params, leaves float32 or wider
  num_iterations: jax.Array  # shape=(), dtype=jnp.int32
  converged: jax.Array  # shape=(), dtype=jnp.bool_


class SharpnessEstimate(NamedTuple):
  """Largest loss found in an L2 ball around the parameters.

  Attributes:
    loss: loss at the parameters themselves.
    max_loss: largest loss evaluated inside the ball, ``loss`` included.
    absolute_increase: ``max_loss - loss``, never negative unless NaN.
    relative_increase: ``absolute_increase / |loss|``. It is 0 when the
      increase is 0, and +inf when ``loss`` is 0 and the increase is positive.
    perturbation: offset, with global L2 norm at most ``rho``, at which
      ``max_loss`` was found, a pytree like the parameters.
  """

  loss: jax.Array  # shape=(), dtype=jnp.float32 (float64 for float64 params)
  max_loss: jax.Array  # shape=(), dtype like loss
  absolute_increase: jax.Array  # shape=(), dtype like loss
  relative_increase: jax.Array  # shape=(), dtype like loss
  perturbation: Any  # pytree like params, leaves float32 or wider


def hessian_trace(
    loss_fn: LossFn,
    params: Any,
    batch: Any,
    key: jax.Array,
    *,
    num_probes: int = 100,
    probe_batch_size: Optional[int] = None,
) -> HessianTraceEstimate:
  """Estimates the trace of the Hessian of ``loss_fn`` with respect to params.

  Hutchinson's estimator averages ``v^T H v`` over random probes ``v`` with
  independent Rademacher (+1 or -1) entries, because ``E[v^T H v] = tr(H)``.
  Each ``H v`` is a forward-over-reverse Hessian-vector product
  (``jax.jvp`` of ``jax.grad``), so the Hessian is never formed. A probe
  value differs from the trace only through the off-diagonal Hessian
  entries, so for a diagonal Hessian every probe returns the exact trace.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from optax_mg.flatness import hessian_trace
    >>> def loss_fn(params, curvatures):
    ...   return 0.5 * jnp.sum(curvatures * params['w'] ** 2)
    >>> params = {'w': jnp.zeros(3)}
    >>> curvatures = jnp.array([1.0, 2.0, 3.0])
    >>> estimate = hessian_trace(
    ...     loss_fn, params, curvatures, jax.random.key(0), num_probes=8)
    >>> print(f'{estimate.trace:.2f} +- {estimate.std_error:.2f}')
    6.00 +- 0.00

  Args:
    loss_fn: function ``loss_fn(params, batch)`` returning a scalar loss. It is
      a static argument of the compiled computation, so it must be hashable,
      and passing the same function object again reuses the compiled code.
    params: pytree of floating-point arrays, the point at which the Hessian is
      taken. Every leaf is differentiated.
    batch: pytree of arrays passed unchanged to ``loss_fn``.
    key: a JAX PRNG key that draws the probes.
    num_probes: number of Rademacher probes, a positive integer. The standard
      error shrinks like ``1 / sqrt(num_probes)``.
    probe_batch_size: how many probes are evaluated at once. ``None`` evaluates
      all of them in one ``jax.vmap``, which needs memory for ``num_probes``
      Hessian-vector products. A positive integer evaluates them in sequential
      chunks of that size with ``jax.lax.map``, which bounds the memory. The
      probes do not depend on this choice, so neither does the estimate, up
      to floating-point rounding.

  Returns:
    A :class:`HessianTraceEstimate` with the estimate, its standard error and
    the number of probes.

  Raises:
    TypeError: if ``loss_fn`` is not callable, ``key`` is not a PRNG key, or a
      leaf of ``params`` is not floating point.
    ValueError: if ``num_probes`` or ``probe_batch_size`` is not a positive
      integer, or ``loss_fn`` does not return a scalar.

  References:
    Hutchinson, A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines, 1990

    Pearlmutter, Fast exact multiplication by the Hessian, 1994
  """
  _check_loss_fn(loss_fn)
  _check_key("key", key)
  num_probes = _check_positive_int("num_probes", num_probes)
  if probe_batch_size is not None:
    probe_batch_size = _check_positive_int("probe_batch_size", probe_batch_size)
    probe_batch_size = min(probe_batch_size, num_probes)
  return _hessian_trace(
      loss_fn,
      params,
      batch,
      key,
      num_probes=num_probes,
      probe_batch_size=probe_batch_size,
  )


@functools.partial(
    jax.jit, static_argnames=("loss_fn", "num_probes", "probe_batch_size")
)
def _hessian_trace(
    loss_fn, params, batch, key, *, num_probes, probe_batch_size
):
  params = _to_compute_dtype(params)

  def probe_value(probe_key):
    probe = _rademacher_like(probe_key, params)
    hessian_probe = _hessian_vector_product(loss_fn, params, batch, probe)
    return optax.tree.vdot(probe, hessian_probe)

  probe_keys = jax.random.split(key, num_probes)
  if probe_batch_size is None:
    values = jax.vmap(probe_value)(probe_keys)
  else:
    values = jax.lax.map(probe_value, probe_keys, batch_size=probe_batch_size)

  trace = jnp.mean(values)
  std_error = jnp.std(values, ddof=1) / math.sqrt(num_probes)
  return HessianTraceEstimate(
      trace=trace,
      std_error=std_error,
      num_probes=jnp.asarray(num_probes, dtype=jnp.int32),
  )


def top_hessian_eigenvalue(
    loss_fn: LossFn,
    params: Any,
    batch: Any,
    key: jax.Array,
    *,
    num_iterations: int = 100,
    tol: float = 1e-6,
) -> TopHessianEigenvalue:
  """Estimates the dominant eigenvalue of the Hessian by power iteration.

  Starting from a random unit vector ``v``, each iteration computes ``H v``
  with one forward-over-reverse Hessian-vector product, takes the Rayleigh
  quotient ``v^T H v`` as the eigenvalue estimate, and continues from
  ``H v / ||H v||``. The loop is a ``jax.lax.while_loop`` that stops after
  ``num_iterations`` products, or earlier once two consecutive estimates
  satisfy ``|new - old| <= tol * |new|``.

  .. warning::
    Power iteration converges to the eigenvalue of largest *magnitude*, not
    to the largest algebraic one. At a minimum the Hessian is positive
    semidefinite and the two agree. Where the Hessian has a negative
    eigenvalue larger in magnitude than every positive one (near a saddle
    point), the result is that negative eigenvalue, so check the sign.

  .. note::
    The convergence rate is ``|lambda_2 / lambda_1|`` per iteration. When the
    two largest magnitudes are close, the change per iteration can fall below
    ``tol`` while the estimate is still short of ``lambda_1``. If they are
    equal with opposite signs, the iteration does not converge. The
    magnitude of the Rayleigh quotient never exceeds the dominant one.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from optax_mg.flatness import top_hessian_eigenvalue
    >>> def loss_fn(params, curvatures):
    ...   return 0.5 * jnp.sum(curvatures * params['w'] ** 2)
    >>> params = {'w': jnp.zeros(3)}
    >>> curvatures = jnp.array([1.0, 2.0, 3.0])
    >>> result = top_hessian_eigenvalue(
    ...     loss_fn, params, curvatures, jax.random.key(0))
    >>> print(f'{result.eigenvalue:.3f}')
    3.000

  Args:
    loss_fn: function ``loss_fn(params, batch)`` returning a scalar loss. It is
      a static argument of the compiled computation, so it must be hashable,
      and passing the same function object again reuses the compiled code.
    params: pytree of floating-point arrays, the point at which the Hessian is
      taken. Every leaf is differentiated.
    batch: pytree of arrays passed unchanged to ``loss_fn``.
    key: a JAX PRNG key that draws the starting vector.
    num_iterations: maximum number of power iterations (Hessian-vector
      products), a positive integer.
    tol: relative tolerance on the change of the eigenvalue estimate between
      two iterations, a finite number >= 0. With 0 the loop stops early only
      when two estimates are exactly equal.

  Returns:
    A :class:`TopHessianEigenvalue` with the eigenvalue estimate, its unit
    eigenvector, the number of iterations run and whether the tolerance was
    met.

  Raises:
    TypeError: if ``loss_fn`` is not callable, ``key`` is not a PRNG key, or a
      leaf of ``params`` is not floating point.
    ValueError: if ``num_iterations`` is not a positive integer, ``tol`` is
      negative or not finite, or ``loss_fn`` does not return a scalar.

  References:
    Yao et al., PyHessian: Neural Networks Through the Lens of the Hessian,
    2020
  """
  _check_loss_fn(loss_fn)
  _check_key("key", key)
  num_iterations = _check_positive_int("num_iterations", num_iterations)
  tol = _check_finite_number("tol", tol, allow_zero=True)
  return _top_hessian_eigenvalue(
      loss_fn, params, batch, key, num_iterations=num_iterations, tol=tol
  )


class _PowerIterationState(NamedTuple):
  iteration: jax.Array  # shape=(), dtype=jnp.int32
  vector: Any  # pytree like params, whose Rayleigh quotient is eigenvalue
  eigenvalue: jax.Array  # shape=(), NaN before the first iteration
  next_vector: Any  # pytree like params, H @ vector scaled to unit norm
  converged: jax.Array  # shape=(), dtype=jnp.bool_


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_iterations"))
def _top_hessian_eigenvalue(
    loss_fn, params, batch, key, *, num_iterations, tol
):
  params = _to_compute_dtype(params)
  start = _normalize(optax.tree.random_like(key, params), fallback=None)
  result_dtype = optax.tree.vdot(start, start).dtype

  def should_continue(state):
    return (state.iteration < num_iterations) & ~state.converged

  def power_step(state):
    vector = state.next_vector
    hessian_vector = _hessian_vector_product(loss_fn, params, batch, vector)
    eigenvalue = optax.tree.vdot(vector, hessian_vector)
    change = jnp.abs(eigenvalue - state.eigenvalue)
    return _PowerIterationState(
        iteration=state.iteration + 1,
        vector=vector,
        eigenvalue=eigenvalue,
        next_vector=_normalize(hessian_vector, fallback=vector),
        converged=change <= tol * jnp.abs(eigenvalue),
    )

  initial_state = _PowerIterationState(
      iteration=jnp.zeros((), jnp.int32),
      vector=start,
      eigenvalue=jnp.full((), jnp.nan, result_dtype),
      next_vector=start,
      converged=jnp.zeros((), jnp.bool_),
  )
  state = jax.lax.while_loop(should_continue, power_step, initial_state)
  return TopHessianEigenvalue(
      eigenvalue=state.eigenvalue,
      eigenvector=state.vector,
      num_iterations=state.iteration,
      converged=state.converged,
  )


def sharpness(
    loss_fn: LossFn,
    params: Any,
    batch: Any,
    *,
    rho: float = 0.05,
    num_steps: int = 10,
    step_size: Optional[float] = None,
    key: Optional[jax.Array] = None,
) -> SharpnessEstimate:
  """Estimates the largest loss within an L2 ball of radius ``rho``.

  This is the epsilon-sharpness of Keskar et al. with an L2 ball in place of
  their box, as an absolute and a relative increase: ``max over ||e|| <= rho
  of loss(params + e) - loss(params)``, where ``||e||`` is the global L2 norm
  over all leaves. The maximum is approximated by ``num_steps`` steps of
  normalised gradient ascent on ``e``, starting at ``e = 0``. Each step moves
  ``e`` by ``step_size`` along ``g / ||g||``, with ``g`` the gradient at
  ``params + e``, and then scales ``e`` back onto the ball if it left it. With
  the default ``step_size = rho`` the first step is the inner step of SAM,
  ``e = rho * g / ||g||``. The loss is evaluated at every iterate, and the
  largest value is returned with its perturbation.

  .. note::
    Ascent can only find a lower bound on the true maximum: a local maximum of
    the loss on the ball, after a finite number of steps. Where the gradient is
    exactly zero (for example at an exact minimum, where SAM's step is
    undefined) the step takes a random unit direction drawn from ``key``
    instead. For a quadratic loss with positive semidefinite Hessian started at
    its minimum, the iterates approach the top eigendirection like power
    iteration, and ``max_loss - loss`` tends to ``0.5 * lambda_max * rho**2``.

  .. note::
    ``rho`` is an absolute radius in parameter space. It is not scaled by the
    parameter norm, so compare sharpness only between parameter vectors of a
    similar scale.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optax_mg.flatness import sharpness
    >>> def loss_fn(params, curvatures):
    ...   return 0.5 * jnp.sum(curvatures * params['w'] ** 2)
    >>> params = {'w': jnp.zeros(3)}
    >>> curvatures = jnp.array([1.0, 2.0, 3.0])
    >>> result = sharpness(loss_fn, params, curvatures, rho=0.1, num_steps=40)
    >>> print(f'{result.absolute_increase:.4f}')
    0.0150

  Args:
    loss_fn: function ``loss_fn(params, batch)`` returning a scalar loss. It is
      a static argument of the compiled computation, so it must be hashable,
      and passing the same function object again reuses the compiled code.
    params: pytree of floating-point arrays, the centre of the ball.
    batch: pytree of arrays passed unchanged to ``loss_fn``.
    rho: radius of the ball, a finite number > 0.
    num_steps: number of ascent steps, a positive integer. The loss and its
      gradient are evaluated ``num_steps`` times and the loss once more.
    step_size: length of each ascent step before projection, a finite number
      > 0. ``None`` uses ``rho``.
    key: a JAX PRNG key for the random direction taken where the gradient is
      exactly zero. ``None`` uses ``jax.random.key(0)``.

  Returns:
    A :class:`SharpnessEstimate` with the loss at ``params``, the largest loss
    found, the absolute and relative increase, and the perturbation that
    reached it.

  Raises:
    TypeError: if ``loss_fn`` is not callable, ``key`` is not a PRNG key, or a
      leaf of ``params`` is not floating point.
    ValueError: if ``rho`` or ``step_size`` is not a finite number > 0,
      ``num_steps`` is not a positive integer, or ``loss_fn`` does not return
      a scalar.

  References:
    Keskar et al., `On Large-Batch Training for Deep Learning: Generalization
    Gap and Sharp Minima <https://arxiv.org/abs/1609.04836>`_, 2017

    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, 2021
  """
  _check_loss_fn(loss_fn)
  rho = _check_finite_number("rho", rho, allow_zero=False)
  num_steps = _check_positive_int("num_steps", num_steps)
  if step_size is None:
    step_size = rho
  else:
    step_size = _check_finite_number("step_size", step_size, allow_zero=False)
  if key is None:
    key = jax.random.key(0)
  _check_key("key", key)
  return _sharpness(
      loss_fn,
      params,
      batch,
      key,
      rho=rho,
      num_steps=num_steps,
      step_size=step_size,
  )


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_steps"))
def _sharpness(loss_fn, params, batch, key, *, rho, num_steps, step_size):
  params = _to_compute_dtype(params)

  def perturbed_loss(perturbation):
    return _scalar_loss(loss_fn, optax.tree.add(params, perturbation), batch)

  loss_and_grad = jax.value_and_grad(perturbed_loss)
  random_direction = _normalize(optax.tree.random_like(key, params), None)

  def keep_larger(best, perturbation, loss):
    best_perturbation, best_loss = best
    # A NaN loss replaces the best one and then stays, so it is reported.
    is_larger = (loss > best_loss) | jnp.isnan(loss)
    best_perturbation = optax.tree.where(
        is_larger, perturbation, best_perturbation
    )
    return best_perturbation, jnp.where(is_larger, loss, best_loss)

  def ascent_step(carry, _):
    perturbation, best = carry
    loss, grad = loss_and_grad(perturbation)
    best = keep_larger(best, perturbation, loss)

    direction = _normalize(grad, fallback=random_direction)
    perturbation = optax.tree.add_scale(perturbation, step_size, direction)
    # Dividing by a zero norm gives inf, and the minimum then keeps scale 1.
    scale = jnp.minimum(1.0, rho / optax.tree.norm(perturbation))
    perturbation = _scale_leaves(scale, perturbation)
    return (perturbation, best), loss

  zeros = optax.tree.zeros_like(params)
  loss_dtype = jax.eval_shape(perturbed_loss, zeros).dtype
  initial_best = (zeros, jnp.full((), -jnp.inf, loss_dtype))
  (perturbation, best), losses = jax.lax.scan(
      ascent_step, (zeros, initial_best), length=num_steps
  )
  best_perturbation, max_loss = keep_larger(
      best, perturbation, perturbed_loss(perturbation)
  )

  loss = losses[0]
  absolute_increase = max_loss - loss
  # Division by |loss| = 0 gives +inf for a positive increase, as documented.
  relative_increase = jnp.where(
      absolute_increase == 0, 0.0, absolute_increase / jnp.abs(loss)
  )
  return SharpnessEstimate(
      loss=loss,
      max_loss=max_loss,
      absolute_increase=absolute_increase,
      relative_increase=relative_increase,
      perturbation=best_perturbation,
  )


def flatness_report(
    loss_fn: LossFn,
    params: Any,
    batch: Any,
    key: jax.Array,
    *,
    num_probes: int = 100,
    probe_batch_size: Optional[int] = None,
    num_iterations: int = 100,
    tol: float = 1e-6,
    rho: float = 0.05,
    num_steps: int = 10,
    step_size: Optional[float] = None,
) -> dict[str, float]:
  """Runs all flatness diagnostics and returns their results as Python floats.

  The three compiled diagnostics run with independent keys split from
  ``key``, and their results are copied to the host once at the end, so this
  function cannot itself run inside ``jax.jit``. Use it between epochs or after
  training. The keyword arguments are passed on unchanged to
  :func:`hessian_trace`, :func:`top_hessian_eigenvalue` and
  :func:`sharpness`.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from optax_mg.flatness import flatness_report
    >>> def loss_fn(params, curvatures):
    ...   return 0.5 * jnp.sum(curvatures * params['w'] ** 2)
    >>> params = {'w': jnp.zeros(3)}
    >>> curvatures = jnp.array([1.0, 2.0, 3.0])
    >>> report = flatness_report(
    ...     loss_fn, params, curvatures, jax.random.key(0), num_probes=8)
    >>> print(f"{report['hessian_trace']:.2f}")
    6.00

  Args:
    loss_fn: function ``loss_fn(params, batch)`` returning a scalar loss.
    params: pytree of floating-point arrays.
    batch: pytree of arrays passed unchanged to ``loss_fn``.
    key: a JAX PRNG key.
    num_probes: see :func:`hessian_trace`.
    probe_batch_size: see :func:`hessian_trace`.
    num_iterations: see :func:`top_hessian_eigenvalue`.
    tol: see :func:`top_hessian_eigenvalue`.
    rho: see :func:`sharpness`.
    num_steps: see :func:`sharpness`.
    step_size: see :func:`sharpness`.

  Returns:
    A dict with the keys ``loss``, ``hessian_trace``,
    ``hessian_trace_std_error``, ``hessian_trace_num_probes``,
    ``top_hessian_eigenvalue``, ``power_iterations``,
    ``power_iteration_converged`` (1.0 or 0.0), ``sharpness_rho``,
    ``sharpness_max_loss``, ``sharpness`` (the absolute increase) and
    ``relative_sharpness`` (the relative increase), all Python floats.

  Raises:
    TypeError: as :func:`hessian_trace`.
    ValueError: as the three diagnostics, for the argument concerned.
  """
  # Checked here as well, so a bad sharpness argument fails before the
  # trace and eigenvalue are computed.
  _check_loss_fn(loss_fn)
  _check_key("key", key)
  _check_positive_int("num_probes", num_probes)
  if probe_batch_size is not None:
    _check_positive_int("probe_batch_size", probe_batch_size)
  _check_positive_int("num_iterations", num_iterations)
  _check_finite_number("tol", tol, allow_zero=True)
  _check_finite_number("rho", rho, allow_zero=False)
  _check_positive_int("num_steps", num_steps)
  if step_size is not None:
    _check_finite_number("step_size", step_size, allow_zero=False)

  trace_key, eigenvalue_key, sharpness_key = jax.random.split(key, 3)
  trace = hessian_trace(
      loss_fn,
      params,
      batch,
      trace_key,
      num_probes=num_probes,
      probe_batch_size=probe_batch_size,
  )
  top = top_hessian_eigenvalue(
      loss_fn,
      params,
      batch,
      eigenvalue_key,
      num_iterations=num_iterations,
      tol=tol,
  )
  sharp = sharpness(
      loss_fn,
      params,
      batch,
      rho=rho,
      num_steps=num_steps,
      step_size=step_size,
      key=sharpness_key,
  )

  values = {
      "loss": sharp.loss,
      "hessian_trace": trace.trace,
      "hessian_trace_std_error": trace.std_error,
      "hessian_trace_num_probes": trace.num_probes,
      "top_hessian_eigenvalue": top.eigenvalue,
      "power_iterations": top.num_iterations,
      "power_iteration_converged": top.converged,
      "sharpness_rho": rho,
      "sharpness_max_loss": sharp.max_loss,
      "sharpness": sharp.absolute_increase,
      "relative_sharpness": sharp.relative_increase,
  }
  host_values = jax.device_get(values)
  return {name: float(host_values[name]) for name in values}


def _hessian_vector_product(loss_fn, params, batch, vector):
  def grad_fn(point):
    return jax.grad(lambda p: _scalar_loss(loss_fn, p, batch))(point)

  return jax.jvp(grad_fn, (params,), (vector,))[1]


def _scalar_loss(loss_fn, params, batch):
  loss = jnp.asarray(loss_fn(params, batch))
  if loss.shape != ():
    raise ValueError(
        f"loss_fn must return a scalar, got an array of shape {loss.shape}."
        " Reduce it with a mean or sum over the batch."
    )
  if not jnp.issubdtype(loss.dtype, jnp.floating):
    raise TypeError(
        f"loss_fn must return a real floating-point scalar, got dtype"
        f" {loss.dtype}."
    )
  return loss.astype(jnp.promote_types(loss.dtype, jnp.float32))


def _to_compute_dtype(params):
  """Checks that params are floating point and promotes them to >= float32."""
  leaves_with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
  if not leaves_with_paths:
    raise ValueError(
        "params must contain at least one array leaf, got an empty pytree."
    )
  for path, leaf in leaves_with_paths:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"params leaf {jax.tree_util.keystr(path) or '(root)'} has dtype"
          f" {dtype}, but every leaf is differentiated and must be real"
          " floating point. Close over non-trainable arrays in loss_fn"
          " instead of passing them in params."
      )

  def promote(leaf):
    dtype = jnp.promote_types(jnp.result_type(leaf), jnp.float32)
    return jnp.asarray(leaf, dtype=jax.dtypes.canonicalize_dtype(dtype))

  return jax.tree.map(promote, params)


def _rademacher_like(key, tree):
  def sample(leaf_key, leaf):
    signs = jax.random.rademacher(leaf_key, leaf.shape, dtype=jnp.int8)
    return signs.astype(leaf.dtype)

  return jax.tree.map(sample, optax.tree.split_key_like(key, tree), tree)


def _normalize(tree, fallback):
  """Scales ``tree`` to unit global L2 norm, or returns ``fallback`` for 0."""
  norm = optax.tree.norm(tree)
  if fallback is None:
    return _scale_leaves(1.0 / norm, tree)
  is_zero = norm == 0
  safe_norm = jnp.where(is_zero, 1.0, norm)
  unit_tree = _scale_leaves(1.0 / safe_norm, tree)
  return optax.tree.where(is_zero, fallback, unit_tree)


def _scale_leaves(factor, tree):
  """Multiplies every leaf by ``factor`` and keeps each leaf's dtype.

  A norm over float32 and float64 leaves is float64, and multiplying a float32
  leaf by it would otherwise change the leaf dtype.
  """
  return jax.tree.map(lambda leaf: (factor * leaf).astype(leaf.dtype), tree)


def _check_loss_fn(loss_fn):
  if not callable(loss_fn):
    raise TypeError(
        "loss_fn must be a callable loss_fn(params, batch) returning a scalar,"
        f" got {loss_fn!r}."
    )


def _check_key(name, key):
  dtype = getattr(key, "dtype", None)
  shape = getattr(key, "shape", None)
  is_typed_key = (
      dtype is not None
      and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
      and shape == ()
  )
  is_raw_key = dtype == jnp.uint32 and shape is not None and len(shape) == 1
  if not (is_typed_key or is_raw_key):
    raise TypeError(
        f"{name} must be a single JAX PRNG key, such as jax.random.key(0),"
        f" got {key!r}."
    )


def _check_positive_int(name, value):
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be a positive integer, got {value!r}.")
  if value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  return int(value)


def _check_finite_number(name, value, *, allow_zero):
  bound = ">= 0" if allow_zero else "> 0"
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(
        f"{name} must be a finite Python number {bound}, got {value!r}."
    )
  number = float(value)
  is_below_bound = number < 0 or (number == 0 and not allow_zero)
  if not math.isfinite(number) or is_below_bound:
    raise ValueError(f"{name} must be a finite number {bound}, got {value!r}.")
  return number
