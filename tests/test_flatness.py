"""Tests of optax_mg.flatness on quadratics with known Hessians and an MLP."""

import doctest
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_mg import flatness
from optax_mg.flatness import flatness_report
from optax_mg.flatness import hessian_trace
from optax_mg.flatness import sharpness
from optax_mg.flatness import top_hessian_eigenvalue

DIMENSION = 6
DENSE_EIGENVALUES = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])


def split_params(x):
  """Splits a length-6 vector into a nested dict, so each test uses a pytree."""
  x = jnp.asarray(x)
  return {"a": x[:2], "b": {"c": x[2:].reshape(2, 2)}}


def join_params(params):
  return jnp.concatenate([params["a"], params["b"]["c"].ravel()])


def quadratic_loss(params, batch):
  """Returns 0.5 x^T A x + b^T x + c, with x the concatenated params."""
  x = join_params(params)
  return (
      0.5 * x @ batch["hessian"] @ x + batch["linear"] @ x + batch["offset"]
  )


def quadratic_batch(hessian, linear=None, offset=0.0):
  if linear is None:
    linear = np.zeros(DIMENSION)
  return {
      "hessian": jnp.asarray(hessian, jnp.float32),
      "linear": jnp.asarray(linear, jnp.float32),
      "offset": jnp.asarray(offset, jnp.float32),
  }


def symmetric_with_eigenvalues(eigenvalues, seed=0):
  """Returns a symmetric matrix with these eigenvalues, and its eigenvectors."""
  rng = np.random.default_rng(seed)
  eigenvectors, _ = np.linalg.qr(rng.normal(size=(len(eigenvalues),) * 2))
  matrix = (eigenvectors * eigenvalues) @ eigenvectors.T
  return (matrix + matrix.T) / 2, eigenvectors


def quadratic_value(hessian, linear, offset, x):
  return 0.5 * x @ hessian @ x + linear @ x + offset


DENSE_HESSIAN, DENSE_EIGENVECTORS = symmetric_with_eigenvalues(
    DENSE_EIGENVALUES
)
ZERO_PARAMS = split_params(np.zeros(DIMENSION, np.float32))
OFF_MINIMUM_X = np.array([0.3, -0.2, 0.5, 0.1, -0.4, 0.2], np.float32)
OFF_MINIMUM_LINEAR = np.array([0.5, -1.0, 0.25, 0.0, 0.75, -0.5], np.float32)


# Hessian trace.


def test_trace_diagonal_hessian_is_exact():
  curvatures = np.array([0.5, 1.5, 2.0, 3.0, 4.0, 7.0])
  batch = quadratic_batch(np.diag(curvatures), OFF_MINIMUM_LINEAR)
  params = split_params(OFF_MINIMUM_X)

  estimate = hessian_trace(
      quadratic_loss, params, batch, jax.random.key(0), num_probes=7
  )

  assert float(estimate.trace) == pytest.approx(curvatures.sum(), rel=1e-5)
  assert float(estimate.std_error) <= 1e-5
  assert int(estimate.num_probes) == 7
  assert estimate.trace.dtype == jnp.float32


def test_trace_dense_hessian_within_standard_error():
  num_probes = 4000
  batch = quadratic_batch(DENSE_HESSIAN)

  estimate = hessian_trace(
      quadratic_loss, ZERO_PARAMS, batch, jax.random.key(1),
      num_probes=num_probes,
  )

  exact_trace = DENSE_EIGENVALUES.sum()
  # For Rademacher probes Var(v^T A v) = 2 * sum over i != j of A_ij^2.
  off_diagonal = DENSE_HESSIAN - np.diag(np.diag(DENSE_HESSIAN))
  expected_std_error = math.sqrt(2 * np.sum(off_diagonal**2) / num_probes)
  assert abs(float(estimate.trace) - exact_trace) <= 4 * float(
      estimate.std_error
  )
  assert float(estimate.std_error) == pytest.approx(
      expected_std_error, rel=0.15
  )
  assert float(estimate.trace) == pytest.approx(exact_trace, rel=0.05)


def test_trace_chunked_probes_match_vmap():
  batch = quadratic_batch(DENSE_HESSIAN)
  key = jax.random.key(2)

  all_at_once = hessian_trace(
      quadratic_loss, ZERO_PARAMS, batch, key, num_probes=10
  )
  chunked = hessian_trace(
      quadratic_loss, ZERO_PARAMS, batch, key, num_probes=10,
      probe_batch_size=3,
  )

  np.testing.assert_allclose(chunked.trace, all_at_once.trace, rtol=1e-5)
  np.testing.assert_allclose(
      chunked.std_error, all_at_once.std_error, rtol=1e-5
  )


def test_trace_is_seeded():
  batch = quadratic_batch(DENSE_HESSIAN)

  first = hessian_trace(
      quadratic_loss, ZERO_PARAMS, batch, jax.random.key(3), num_probes=5
  )
  repeated = hessian_trace(
      quadratic_loss, ZERO_PARAMS, batch, jax.random.key(3), num_probes=5
  )
  other_key = hessian_trace(
      quadratic_loss, ZERO_PARAMS, batch, jax.random.key(4), num_probes=5
  )

  assert float(first.trace) == float(repeated.trace)
  assert float(first.trace) != float(other_key.trace)


def test_trace_single_probe_has_nan_std_error():
  batch = quadratic_batch(DENSE_HESSIAN)

  estimate = hessian_trace(
      quadratic_loss, ZERO_PARAMS, batch, jax.random.key(0), num_probes=1
  )

  assert math.isfinite(float(estimate.trace))
  assert math.isnan(float(estimate.std_error))


# Top Hessian eigenvalue.


def test_top_eigenvalue_matches_dense_eigendecomposition():
  batch = quadratic_batch(DENSE_HESSIAN, OFF_MINIMUM_LINEAR)
  params = split_params(OFF_MINIMUM_X)

  result = top_hessian_eigenvalue(
      quadratic_loss, params, batch, jax.random.key(0),
      num_iterations=200, tol=1e-7,
  )

  vector = np.asarray(join_params(result.eigenvector))
  assert float(result.eigenvalue) == pytest.approx(5.0, rel=1e-3)
  assert abs(vector @ DENSE_EIGENVECTORS[:, 0]) >= 0.999
  assert np.linalg.norm(vector) == pytest.approx(1.0, rel=1e-5)
  assert float(result.eigenvalue) == pytest.approx(
      vector @ DENSE_HESSIAN @ vector, rel=1e-5
  )
  assert bool(result.converged)
  assert 1 < int(result.num_iterations) < 200
  assert jax.tree.structure(result.eigenvector) == jax.tree.structure(params)


def test_top_eigenvalue_returns_largest_magnitude():
  eigenvalues = np.array([-6.0, 3.0, 2.0, 1.0, 0.5, 0.1])
  hessian, eigenvectors = symmetric_with_eigenvalues(eigenvalues, seed=1)

  result = top_hessian_eigenvalue(
      quadratic_loss, ZERO_PARAMS, quadratic_batch(hessian),
      jax.random.key(0), num_iterations=200, tol=1e-7,
  )

  vector = np.asarray(join_params(result.eigenvector))
  assert float(result.eigenvalue) == pytest.approx(-6.0, rel=1e-3)
  assert abs(vector @ eigenvectors[:, 0]) >= 0.999


def test_top_eigenvalue_zero_hessian():
  batch = quadratic_batch(np.zeros((DIMENSION, DIMENSION)), OFF_MINIMUM_LINEAR)

  result = top_hessian_eigenvalue(
      quadratic_loss, ZERO_PARAMS, batch, jax.random.key(0)
  )

  vector = np.asarray(join_params(result.eigenvector))
  assert float(result.eigenvalue) == 0.0
  assert bool(result.converged)
  assert int(result.num_iterations) == 2
  assert np.linalg.norm(vector) == pytest.approx(1.0, rel=1e-5)


def test_top_eigenvalue_zero_tol_runs_all_iterations():
  result = top_hessian_eigenvalue(
      quadratic_loss, ZERO_PARAMS, quadratic_batch(DENSE_HESSIAN),
      jax.random.key(0), num_iterations=7, tol=0.0,
  )

  assert int(result.num_iterations) == 7
  assert not bool(result.converged)


# Sharpness.


def test_sharpness_at_minimum_matches_closed_form():
  rho = 0.1
  batch = quadratic_batch(DENSE_HESSIAN)

  result = sharpness(quadratic_loss, ZERO_PARAMS, batch, rho=rho, num_steps=50)

  # max over ||e|| <= rho of 0.5 e^T A e is reached along the top eigenvector.
  expected_increase = 0.5 * DENSE_EIGENVALUES.max() * rho**2
  perturbation = np.asarray(join_params(result.perturbation))
  assert float(result.loss) == 0.0
  assert float(result.absolute_increase) == pytest.approx(
      expected_increase, rel=1e-3
  )
  assert float(result.max_loss) == pytest.approx(expected_increase, rel=1e-3)
  assert np.linalg.norm(perturbation) <= rho * (1 + 1e-5)
  assert float(result.max_loss) == pytest.approx(
      quadratic_value(DENSE_HESSIAN, np.zeros(DIMENSION), 0.0, perturbation),
      rel=1e-5,
  )
  assert math.isinf(float(result.relative_increase))


def test_sharpness_relative_increase_divides_by_loss():
  rho = 0.1
  offset = 2.0
  batch = quadratic_batch(DENSE_HESSIAN, offset=offset)

  result = sharpness(quadratic_loss, ZERO_PARAMS, batch, rho=rho, num_steps=50)

  expected_increase = 0.5 * DENSE_EIGENVALUES.max() * rho**2
  assert float(result.loss) == pytest.approx(offset)
  assert float(result.absolute_increase) == pytest.approx(
      expected_increase, rel=1e-3
  )
  assert float(result.relative_increase) == pytest.approx(
      expected_increase / offset, rel=1e-3
  )


def test_sharpness_first_step_is_sam_step():
  rho = 0.05
  batch = quadratic_batch(DENSE_HESSIAN, OFF_MINIMUM_LINEAR)
  x = OFF_MINIMUM_X.astype(np.float64)

  result = sharpness(
      quadratic_loss, split_params(OFF_MINIMUM_X), batch, rho=rho, num_steps=1
  )

  gradient = DENSE_HESSIAN @ x + OFF_MINIMUM_LINEAR
  sam_perturbation = rho * gradient / np.linalg.norm(gradient)
  np.testing.assert_allclose(
      join_params(result.perturbation), sam_perturbation, rtol=1e-4, atol=1e-7
  )
  assert float(result.max_loss) == pytest.approx(
      quadratic_value(DENSE_HESSIAN, OFF_MINIMUM_LINEAR, 0.0,
                      x + sam_perturbation),
      rel=1e-5,
  )


def test_sharpness_off_minimum_within_bounds():
  rho = 0.05
  batch = quadratic_batch(DENSE_HESSIAN, OFF_MINIMUM_LINEAR)
  x = OFF_MINIMUM_X.astype(np.float64)
  gradient = DENSE_HESSIAN @ x + OFF_MINIMUM_LINEAR
  loss = quadratic_value(DENSE_HESSIAN, OFF_MINIMUM_LINEAR, 0.0, x)

  result = sharpness(
      quadratic_loss, split_params(OFF_MINIMUM_X), batch, rho=rho,
      num_steps=20, step_size=rho / 4,
  )

  sam_loss = quadratic_value(
      DENSE_HESSIAN, OFF_MINIMUM_LINEAR, 0.0,
      x + rho * gradient / np.linalg.norm(gradient),
  )
  # On the ball, L(x + e) <= L(x) + rho ||g|| + 0.5 lambda_max rho^2.
  upper_bound = (
      loss + rho * np.linalg.norm(gradient)
      + 0.5 * DENSE_EIGENVALUES.max() * rho**2
  )
  perturbation = np.asarray(join_params(result.perturbation))
  assert float(result.loss) == pytest.approx(loss, rel=1e-5)
  assert float(result.max_loss) >= sam_loss - 1e-5
  assert float(result.max_loss) <= upper_bound + 1e-5
  assert np.linalg.norm(perturbation) <= rho * (1 + 1e-5)
  assert float(result.relative_increase) == pytest.approx(
      float(result.absolute_increase) / abs(loss), rel=1e-4
  )


# Argument validation.


def _call(function, **overrides):
  arguments = {
      "loss_fn": quadratic_loss,
      "params": ZERO_PARAMS,
      "batch": quadratic_batch(DENSE_HESSIAN),
  }
  if function is not sharpness:
    arguments["key"] = jax.random.key(0)
  arguments.update(overrides)
  return function(**arguments)


@pytest.mark.parametrize(
    "function, overrides, error, name",
    [
        (hessian_trace, {"num_probes": 0}, ValueError, "num_probes"),
        (hessian_trace, {"num_probes": -3}, ValueError, "num_probes"),
        (hessian_trace, {"num_probes": 2.5}, TypeError, "num_probes"),
        (hessian_trace, {"num_probes": True}, TypeError, "num_probes"),
        (hessian_trace, {"probe_batch_size": 0}, ValueError,
         "probe_batch_size"),
        (hessian_trace, {"key": 0}, TypeError, "key"),
        (hessian_trace, {"loss_fn": "loss"}, TypeError, "loss_fn"),
        (top_hessian_eigenvalue, {"num_iterations": 0}, ValueError,
         "num_iterations"),
        (top_hessian_eigenvalue, {"tol": -1e-3}, ValueError, "tol"),
        (top_hessian_eigenvalue, {"tol": float("nan")}, ValueError, "tol"),
        (top_hessian_eigenvalue, {"key": None}, TypeError, "key"),
        (sharpness, {"rho": 0.0}, ValueError, "rho"),
        (sharpness, {"rho": -0.1}, ValueError, "rho"),
        (sharpness, {"rho": float("inf")}, ValueError, "rho"),
        (sharpness, {"rho": float("nan")}, ValueError, "rho"),
        (sharpness, {"rho": "0.1"}, TypeError, "rho"),
        (sharpness, {"num_steps": 0}, ValueError, "num_steps"),
        (sharpness, {"step_size": 0.0}, ValueError, "step_size"),
        (sharpness, {"key": 7}, TypeError, "key"),
        (flatness_report, {"num_probes": 0}, ValueError, "num_probes"),
        (flatness_report, {"rho": -1.0}, ValueError, "rho"),
    ],
)
def test_invalid_argument_raises_with_name(function, overrides, error, name):
  with pytest.raises(error, match=rf"^{name} must be") as raised:
    _call(function, **overrides)

  bad_value = next(iter(overrides.values()))
  assert repr(bad_value) in str(raised.value)


@pytest.mark.parametrize(
    "function", [hessian_trace, top_hessian_eigenvalue, sharpness]
)
def test_integer_params_leaf_is_named(function):
  params = {"a": jnp.zeros(2), "b": {"c": jnp.zeros((2, 2), jnp.int32)}}

  with pytest.raises(TypeError, match=r"params leaf \['b'\]\['c'\].*int32"):
    _call(function, params=params)


def test_empty_params_raise():
  with pytest.raises(ValueError, match="params must contain"):
    _call(hessian_trace, params={})


def test_non_scalar_loss_raises():
  def vector_loss(params, batch):
    del batch
    return join_params(params) ** 2

  with pytest.raises(ValueError, match=r"loss_fn must return a scalar.*\(6,\)"):
    _call(top_hessian_eigenvalue, loss_fn=vector_loss)


# Compilation, dtypes and a small network.


def test_diagnostics_work_under_jit():
  batch = quadratic_batch(DENSE_HESSIAN, OFF_MINIMUM_LINEAR)
  params = split_params(OFF_MINIMUM_X)
  key = jax.random.key(5)

  jitted_trace = jax.jit(
      functools.partial(hessian_trace, quadratic_loss, num_probes=16,
                        probe_batch_size=4)
  )
  eager_trace = hessian_trace(
      quadratic_loss, params, batch, key, num_probes=16, probe_batch_size=4
  )
  np.testing.assert_allclose(
      jitted_trace(params, batch, key).trace, eager_trace.trace, rtol=1e-5
  )

  @jax.jit
  def all_diagnostics(params, batch, key):
    trace_key, eigenvalue_key, sharpness_key = jax.random.split(key, 3)
    trace = hessian_trace(
        quadratic_loss, params, batch, trace_key, num_probes=16
    )
    top = top_hessian_eigenvalue(
        quadratic_loss, params, batch, eigenvalue_key, tol=1e-7
    )
    sharp = sharpness(
        quadratic_loss, params, batch, rho=0.05, num_steps=5, key=sharpness_key
    )
    return trace.trace, top.eigenvalue, sharp.max_loss, sharp.loss

  trace, eigenvalue, max_loss, loss = all_diagnostics(params, batch, key)
  assert math.isfinite(float(trace))
  assert float(eigenvalue) == pytest.approx(5.0, rel=1e-3)
  assert float(max_loss) > float(loss)


def test_bfloat16_params_computed_in_float32():
  # These curvatures are not representable in bfloat16. A Hessian-vector
  # product in bfloat16 rounds them and returns a trace of 9.625, not 9.6.
  curvatures = np.array([1.1, 2.3, 0.7, 3.3, 1.9, 0.3], np.float32)
  batch = quadratic_batch(np.diag(curvatures))
  params = jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16), ZERO_PARAMS)

  trace = hessian_trace(
      quadratic_loss, params, batch, jax.random.key(0), num_probes=4
  )
  top = top_hessian_eigenvalue(
      quadratic_loss, params, batch, jax.random.key(0), tol=1e-7
  )
  sharp = sharpness(quadratic_loss, params, batch, rho=0.1, num_steps=3)

  assert trace.trace.dtype == jnp.float32
  assert float(trace.trace) == pytest.approx(float(curvatures.sum()), rel=1e-6)
  assert top.eigenvalue.dtype == jnp.float32
  assert float(top.eigenvalue) == pytest.approx(3.3, rel=1e-3)
  assert all(
      leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(top.eigenvector)
  )
  assert sharp.max_loss.dtype == jnp.float32
  assert all(
      leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(sharp.perturbation)
  )


def test_mixed_float32_float64_leaves_keep_dtypes():
  def loss_fn(params, curvatures):
    return (
        0.5 * jnp.sum(curvatures * params["wide"] ** 2)
        + jnp.sum(params["narrow"] ** 2)
    )

  with jax.enable_x64(True):
    params = {
        "wide": jnp.ones(3, jnp.float64),
        "narrow": jnp.ones(2, jnp.float32),
    }
    curvatures = jnp.array([1.0, 2.0, 3.0], jnp.float64)
    leaf_dtypes = {"wide": jnp.float64, "narrow": jnp.float32}

    trace = hessian_trace(
        loss_fn, params, curvatures, jax.random.key(0), num_probes=4
    )
    top = top_hessian_eigenvalue(
        loss_fn, params, curvatures, jax.random.key(0), tol=1e-9
    )
    sharp = sharpness(loss_fn, params, curvatures, rho=0.1, num_steps=3)

    # The Hessian is diag(1, 2, 3) for "wide" and 2 * I for "narrow".
    assert trace.trace.dtype == jnp.float64
    assert float(trace.trace) == pytest.approx(10.0, rel=1e-9)
    assert float(top.eigenvalue) == pytest.approx(3.0, rel=1e-4)
    assert jax.tree.map(lambda leaf: leaf.dtype, top.eigenvector) == leaf_dtypes
    assert jax.tree.map(lambda leaf: leaf.dtype, sharp.perturbation) == (
        leaf_dtypes
    )
    assert float(sharp.max_loss) > float(sharp.loss)


def _mlp_setup():
  keys = jax.random.split(jax.random.key(42), 4)
  params = {
      "hidden": {
          "kernel": jax.random.normal(keys[0], (4, 8)) / 2,
          "bias": jnp.zeros(8),
      },
      "output": {
          "kernel": jax.random.normal(keys[1], (8, 1)) / math.sqrt(8),
          "bias": jnp.zeros(1),
      },
  }
  inputs = jax.random.normal(keys[2], (32, 4))
  targets = jnp.sin(inputs.sum(axis=1, keepdims=True))
  return params, (inputs, targets)


def mlp_loss(params, batch):
  inputs, targets = batch
  hidden_layer = params["hidden"]
  hidden = jnp.tanh(inputs @ hidden_layer["kernel"] + hidden_layer["bias"])
  outputs = hidden @ params["output"]["kernel"] + params["output"]["bias"]
  return 0.5 * jnp.mean((outputs - targets) ** 2)


def output_layer_loss(output_params, batch):
  """Returns the squared error of a linear layer on fixed features.

  Its Hessian with respect to the layer is positive semidefinite.
  """
  features, targets = batch
  outputs = features @ output_params["kernel"] + output_params["bias"]
  return 0.5 * jnp.mean((outputs - targets) ** 2)


def test_report_on_mlp_is_finite():
  params, batch = _mlp_setup()

  report = flatness_report(
      mlp_loss, params, batch, jax.random.key(0), num_probes=32,
      num_iterations=50, rho=0.05, num_steps=5,
  )

  assert set(report) == {
      "loss", "hessian_trace", "hessian_trace_std_error",
      "hessian_trace_num_probes", "top_hessian_eigenvalue",
      "power_iterations", "power_iteration_converged", "sharpness_rho",
      "sharpness_max_loss", "sharpness", "relative_sharpness",
  }
  for name, value in report.items():
    assert type(value) is float, name
    assert math.isfinite(value), name
  assert report["loss"] == pytest.approx(float(mlp_loss(params, batch)),
                                         rel=1e-5)
  assert report["hessian_trace_num_probes"] == 32.0
  assert report["sharpness"] > 0.0
  assert report["sharpness_max_loss"] == pytest.approx(
      report["loss"] + report["sharpness"], rel=1e-5
  )


def test_gauss_newton_case_trace_positive_and_exact():
  params, (inputs, targets) = _mlp_setup()
  features = jnp.tanh(
      inputs @ params["hidden"]["kernel"] + params["hidden"]["bias"]
  )
  batch = (features, targets)
  # The Hessian over [kernel; bias] is D^T D / n with D = [features, 1].
  design = np.concatenate(
      [np.asarray(features, np.float64), np.ones((features.shape[0], 1))],
      axis=1,
  )
  hessian = design.T @ design / design.shape[0]

  trace = hessian_trace(
      output_layer_loss, params["output"], batch, jax.random.key(0),
      num_probes=256,
  )
  top = top_hessian_eigenvalue(
      output_layer_loss, params["output"], batch, jax.random.key(1),
      num_iterations=500, tol=1e-7,
  )

  assert float(trace.trace) > 0.0
  assert abs(float(trace.trace) - np.trace(hessian)) <= 5 * float(
      trace.std_error
  )
  assert float(top.eigenvalue) == pytest.approx(
      np.linalg.eigvalsh(hessian).max(), rel=1e-3
  )


def test_docstring_examples_pass():
  results = doctest.testmod(flatness, optionflags=doctest.NORMALIZE_WHITESPACE)

  assert results.attempted > 0
  assert results.failed == 0
