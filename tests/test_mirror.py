"""Tests of the Mirror Gradient transformations in optax_mg."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mg

DESCENT_SCALE = 1.0
ASCENT_SCALE = 0.2


def init_mlp(key, dtype=jnp.float32):
  k1, k2 = jax.random.split(key)
  return {
      "w1": (jax.random.normal(k1, (4, 8)) * 0.5).astype(dtype),
      "b1": jnp.zeros((8,), dtype),
      "w2": (jax.random.normal(k2, (8, 1)) * 0.5).astype(dtype),
  }


def mlp_loss(params, batch):
  x, y = batch
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  prediction = (hidden @ params["w2"])[:, 0]
  return jnp.mean((prediction - y) ** 2)


def make_batches(num_batches, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_batches, 16, 4))
  y = np.sin(x.sum(-1)) + 0.1 * rng.normal(size=(num_batches, 16))
  return [(jnp.asarray(x[i], dtype), jnp.asarray(y[i], dtype))
          for i in range(num_batches)]


def train_two_call(optimizer, params, batches):
  """Train with the two-call form, deciding the second call on the host."""
  state = optimizer.init(params)
  grad_fn = jax.jit(jax.grad(mlp_loss))
  update = jax.jit(optimizer.update)
  for batch in batches:
    updates, state = update(grad_fn(params, batch), state, params)
    params = optax.apply_updates(params, updates)
    if optax_mg.is_mirror_step(state):
      updates, state = update(grad_fn(params, batch), state, params)
      params = optax.apply_updates(params, updates)
  return params


def train_with_step(optimizer, params, batches):
  step = jax.jit(optax_mg.mirror_train_step(mlp_loss, optimizer))
  state = optimizer.init(params)
  for batch in batches:
    params, state, _ = step(params, state, batch)
  return params


def train_one_call(optimizer, params, batches):
  state = optimizer.init(params)
  grad_fn = jax.grad(mlp_loss)

  @jax.jit
  def step(params, state, batch):
    updates, state = optimizer.update(
        grad_fn(params, batch), state, params,
        grad_fn=lambda p: grad_fn(p, batch),
    )
    return optax.apply_updates(params, updates), state

  for batch in batches:
    params, state = step(params, state, batch)
  return params


def train_reference_sgd(learning_rate, interval, params, batches):
  """Algorithm 1 of the MG paper, written out for plain SGD."""
  grad_fn = jax.grad(mlp_loss)
  sub = lambda p, g, s: jax.tree.map(lambda a, b: a - s * learning_rate * b, p, g)
  for t, batch in enumerate(batches):
    if t % interval == 0:
      params = sub(params, grad_fn(params, batch), DESCENT_SCALE)
      params = sub(params, grad_fn(params, batch), -ASCENT_SCALE)
    else:
      params = sub(params, grad_fn(params, batch), 1.0)
  return params


def train_reference_loop(optimizer, interval, params, batches):
  """The reference trainer: two optimizer steps on scaled losses."""
  state = optimizer.init(params)
  for t, batch in enumerate(batches):
    if t % interval == 0:
      scaled_losses = (
          lambda p: DESCENT_SCALE * mlp_loss(p, batch),
          lambda p: -ASCENT_SCALE * mlp_loss(p, batch),
      )
    else:
      scaled_losses = (lambda p: mlp_loss(p, batch),)
    for scaled_loss in scaled_losses:
      updates, state = optimizer.update(jax.grad(scaled_loss)(params), state,
                                        params)
      params = optax.apply_updates(params, updates)
  return params


def assert_trees_close(actual, expected, rtol, atol=0.0):
  for key in expected:
    np.testing.assert_allclose(actual[key], expected[key], rtol=rtol,
                               atol=atol, err_msg=key)


@pytest.mark.parametrize("interval", [1, 2, 3, 5])
def test_sgd_matches_algorithm(interval):
  with jax.enable_x64(True):
    params = init_mlp(jax.random.key(0), jnp.float64)
    batches = make_batches(32, dtype=jnp.float64)
    optimizer = optax.chain(
        optax_mg.mirror_gradient(interval, descent_scale=DESCENT_SCALE,
                                 ascent_scale=ASCENT_SCALE),
        optax.sgd(0.1),
    )
    expected = train_reference_sgd(0.1, interval, params, batches)
    actual = train_two_call(optimizer, params, batches)
    assert_trees_close(actual, expected, rtol=1e-6, atol=1e-12)
    # The ascent step must have an effect, or the test could not fail.
    plain = train_reference_sgd(0.1, len(batches) + 1, params, batches)
    assert not np.allclose(plain["w1"], expected["w1"], rtol=1e-6)


@pytest.mark.parametrize("name", ["adam", "adagrad", "rmsprop"])
@pytest.mark.parametrize("interval", [1, 3])
def test_adaptive_matches_reference_loop(name, interval):
  with jax.enable_x64(True):
    params = init_mlp(jax.random.key(1), jnp.float64)
    batches = make_batches(31, seed=1, dtype=jnp.float64)
    inner = getattr(optax, name)(0.01)
    optimizer = optax.chain(
        optax_mg.mirror_gradient(interval, descent_scale=DESCENT_SCALE,
                                 ascent_scale=ASCENT_SCALE),
        inner,
    )
    expected = train_reference_loop(inner, interval, params, batches)
    actual = train_two_call(optimizer, params, batches)
    assert_trees_close(actual, expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("placement", optax_mg.PLACEMENTS)
@pytest.mark.parametrize("interval", [1, 3])
def test_three_forms_agree(placement, interval):
  params = init_mlp(jax.random.key(2))
  batches = make_batches(30, seed=2)
  mirror = optax_mg.mirror_gradient(interval, ascent_scale=ASCENT_SCALE)
  chain = (optax.chain(mirror, optax.adam(0.01)) if placement == "gradient"
           else optax.chain(optax.adam(0.01), mirror))
  wrapped = optax_mg.with_mirror_gradient(
      optax.adam(0.01), interval, ascent_scale=ASCENT_SCALE,
      placement=placement)

  two_call = train_two_call(chain, params, batches)
  helper = train_with_step(chain, params, batches)
  one_call = train_one_call(wrapped, params, batches)
  helper_one_call = train_with_step(wrapped, params, batches)

  assert_trees_close(helper, two_call, rtol=1e-6, atol=1e-7)
  assert_trees_close(one_call, two_call, rtol=1e-5, atol=1e-6)
  assert_trees_close(helper_one_call, one_call, rtol=1e-6, atol=1e-7)


def test_cycle_scales_and_counter():
  optimizer = optax_mg.mirror_gradient(3, descent_scale=2.0, ascent_scale=0.5)
  state = optimizer.init(jnp.zeros(2))
  seen = []
  for _ in range(8):
    updates, state = optimizer.update(jnp.ones(2), state)
    seen.append(float(updates[0]))
  assert seen == [2.0, -0.5, 1.0, 1.0, 2.0, -0.5, 1.0, 1.0]


def test_is_mirror_step_follows_cycle():
  optimizer = optax.chain(optax_mg.mirror_gradient(2), optax.sgd(1.0))
  state = optimizer.init(jnp.zeros(1))
  flags = []
  for _ in range(6):
    _, state = optimizer.update(jnp.ones(1), state)
    flags.append(bool(optax_mg.is_mirror_step(state)))
  assert flags == [True, False, False, True, False, False]


def test_is_mirror_step_finds_nested_state():
  mirror = optax_mg.mirror_gradient(3)
  params = jnp.zeros(3)
  optimizers = {
      "chain": optax.chain(mirror, optax.adam(1e-3)),
      "named_chain": optax.named_chain(("mg", mirror),
                                       ("adam", optax.adam(1e-3))),
      "inject": optax.inject_hyperparams(optax_mg.mirror_gradient)(
          interval=3, ascent_scale=0.2),
      "multi_steps": optax.MultiSteps(optax.chain(mirror, optax.sgd(0.1)), 2),
  }
  for name, optimizer in optimizers.items():
    state = optimizer.init(params)
    flag = optax_mg.is_mirror_step(state)
    assert flag.dtype == jnp.bool_, name
    assert not bool(flag), name
    if name != "multi_steps":
      _, state = optimizer.update(jnp.ones(3), state, params)
      assert bool(optax_mg.is_mirror_step(state)), name


def test_is_mirror_step_errors():
  params = jnp.zeros(2)
  with pytest.raises(ValueError, match="no MirrorGradientState"):
    optax_mg.is_mirror_step(optax.adam(1e-3).init(params))

  two = optax.chain(optax_mg.mirror_gradient(), optax_mg.mirror_gradient())
  with pytest.raises(ValueError, match="found 2 MirrorGradientState"):
    optax_mg.is_mirror_step(two.init(params))

  wrapped = optax_mg.with_mirror_gradient(optax.sgd(0.1))
  with pytest.raises(ValueError, match="WithMirrorGradientState"):
    optax_mg.is_mirror_step(wrapped.init(params))


def test_restart_cycle_resets_both_forms():
  params = jnp.zeros(2)
  chain = optax.chain(optax_mg.mirror_gradient(3), optax.sgd(0.1))
  state = chain.init(params)
  _, state = chain.update(jnp.ones(2), state)
  _, state = chain.update(jnp.ones(2), state)
  assert int(optax.tree.get(state, "cycle_step")) == 2
  state = optax_mg.restart_cycle(state)
  assert int(optax.tree.get(state, "cycle_step")) == 0

  wrapped = optax_mg.with_mirror_gradient(optax.sgd(0.1), 3)
  state = wrapped.init(params)
  _, state = wrapped.update(jnp.ones(2), state, params,
                            grad_fn=lambda p: jnp.ones(2))
  assert int(state.batch_in_cycle) == 1
  assert int(optax_mg.restart_cycle(state).batch_in_cycle) == 0

  with pytest.raises(ValueError, match="no Mirror Gradient state"):
    optax_mg.restart_cycle(optax.sgd(0.1).init(params))


def test_tree_get_reads_state():
  optimizer = optax.chain(optax_mg.mirror_gradient(3), optax.adam(1e-3))
  state = optimizer.init(jnp.zeros(2))
  mg_state = optax.tree.get(state, "MirrorGradientState")
  assert isinstance(mg_state, optax_mg.MirrorGradientState)
  assert optax.tree.get(state, "cycle_step").dtype == jnp.int32
  state = optax.tree.set(state, cycle_step=jnp.asarray(1, jnp.int32))
  assert bool(optax_mg.is_mirror_step(state))


def test_inject_hyperparams_schedules_ascent_scale():
  schedule = lambda count: 0.1 * (count + 1)
  optimizer = optax.inject_hyperparams(optax_mg.mirror_gradient)(
      interval=1, ascent_scale=schedule)
  state = optimizer.init(jnp.zeros(1))
  update = jax.jit(optimizer.update)
  outputs = []
  for _ in range(4):
    updates, state = update(jnp.ones(1), state)
    outputs.append(float(updates[0]))
  np.testing.assert_allclose(outputs, [1.0, -0.2, 1.0, -0.4], rtol=1e-6)
  assert float(state.hyperparams["ascent_scale"]) == pytest.approx(0.4)
  assert state.hyperparams["interval"].dtype == jnp.int32


def test_inject_hyperparams_with_static_interval():
  optimizer = optax.chain(
      optax.inject_hyperparams(optax_mg.mirror_gradient,
                               static_args="interval")(interval=2),
      optax.sgd(1.0),
  )
  state = optimizer.init(jnp.zeros(1))
  signs = []
  for _ in range(6):
    updates, state = optimizer.update(jnp.ones(1), state)
    signs.append(float(jnp.sign(-updates[0])))
  assert signs == [1.0, -1.0, 1.0, 1.0, -1.0, 1.0]


@pytest.mark.parametrize("placement", optax_mg.PLACEMENTS)
def test_vmap_over_seeds_matches_loop(placement):
  optimizer = optax_mg.with_mirror_gradient(
      optax.adam(0.01), 2, placement=placement)
  step = optax_mg.mirror_train_step(mlp_loss, optimizer)
  batches = make_batches(7, seed=3)
  keys = jax.random.split(jax.random.key(3), 4)

  def train(key):
    params = init_mlp(key)
    state = optimizer.init(params)
    for batch in batches:
      params, state, _ = step(params, state, batch)
    return params

  batched = jax.jit(jax.vmap(train))(keys)
  for i, key in enumerate(keys):
    single = jax.jit(train)(key)
    assert_trees_close({k: v[i] for k, v in batched.items()}, single,
                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes_and_state_are_stable(dtype):
  params = init_mlp(jax.random.key(4), dtype)
  batches = make_batches(4, seed=4, dtype=dtype)
  chain = optax.chain(optax_mg.mirror_gradient(1), optax.sgd(0.01))
  wrapped = optax_mg.with_mirror_gradient(optax.sgd(0.01), 1)
  for optimizer in (chain, wrapped):
    step = jax.jit(optax_mg.mirror_train_step(mlp_loss, optimizer))
    state = optimizer.init(params)
    start_shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    current = params
    for batch in batches:
      current, state, loss = step(current, state, batch)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == start_shapes
    for key, value in current.items():
      assert value.dtype == dtype, key
      assert bool(jnp.all(jnp.isfinite(value))), key


def test_update_dtype_preserved_for_bfloat16():
  optimizer = optax_mg.mirror_gradient(3, ascent_scale=0.3)
  grads = jnp.ones(3, jnp.bfloat16)
  state = optimizer.init(grads)
  for _ in range(4):
    updates, state = optimizer.update(grads, state)
    assert updates.dtype == jnp.bfloat16


def test_nan_scale_of_unused_call_does_not_leak():
  optimizer = optax.inject_hyperparams(optax_mg.mirror_gradient)(
      interval=3, ascent_scale=0.2)
  state = optimizer.init(jnp.zeros(2))
  state = optax.tree.set(state, ascent_scale=jnp.asarray(jnp.nan))
  update = jax.jit(optimizer.update)
  outputs = []
  for _ in range(4):
    updates, state = update(jnp.ones(2), state)
    outputs.append(bool(jnp.all(jnp.isfinite(updates))))
  # Only call 1 (the mirror call) uses the NaN scale.
  assert outputs == [True, False, True, True]


@pytest.mark.parametrize("batched", [False, True])
def test_nan_grad_fn_on_plain_batch_does_not_leak(batched):
  optimizer = optax_mg.with_mirror_gradient(optax.sgd(0.1), 2)
  nan_grad_fn = lambda p: jnp.full_like(p, jnp.nan)

  def two_batches(params):
    state = optimizer.init(params)
    outputs = []
    for _ in range(2):
      updates, state = optimizer.update(jnp.ones_like(params), state, params,
                                        grad_fn=nan_grad_fn)
      outputs.append(updates)
    return outputs

  run = jax.jit(jax.vmap(two_batches) if batched else two_batches)
  params = jnp.zeros((3, 2)) if batched else jnp.zeros(2)
  mirror_updates, plain_updates = run(params)
  assert bool(jnp.all(jnp.isnan(mirror_updates)))
  assert bool(jnp.all(jnp.isfinite(plain_updates)))


def test_grad_fn_not_called_on_plain_batches():
  calls = []

  def counting_grad_fn(params):
    jax.debug.callback(lambda: calls.append(1))
    return jnp.ones_like(params)

  optimizer = optax_mg.with_mirror_gradient(optax.sgd(0.1), 3)
  params = jnp.zeros(2)
  state = optimizer.init(params)
  update = jax.jit(functools.partial(optimizer.update,
                                     grad_fn=counting_grad_fn))
  for _ in range(6):
    _, state = update(jnp.ones(2), state, params)
  jax.effects_barrier()
  assert len(calls) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"interval": 0}, "interval must be a positive integer, got 0"),
        ({"interval": 2.5}, "interval must be a positive integer, got 2.5"),
        ({"interval": True}, "interval must be a positive integer, got True"),
        ({"descent_scale": 0.0}, "descent_scale must be > 0, got 0.0"),
        ({"descent_scale": float("inf")}, "descent_scale must be finite"),
        ({"ascent_scale": -0.1}, "ascent_scale must be >= 0, got -0.1"),
        ({"ascent_scale": float("nan")}, "ascent_scale must be finite"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    optax_mg.mirror_gradient(**kwargs)
  with pytest.raises(ValueError, match=message):
    optax_mg.with_mirror_gradient(optax.sgd(0.1), **kwargs)


def test_wrapper_rejects_bad_placement_and_missing_arguments():
  with pytest.raises(ValueError, match="placement must be one of"):
    optax_mg.with_mirror_gradient(optax.sgd(0.1), placement="after")
  optimizer = optax_mg.with_mirror_gradient(optax.sgd(0.1))
  params = jnp.zeros(2)
  state = optimizer.init(params)
  with pytest.raises(ValueError, match="grad_fn"):
    optimizer.update(jnp.ones(2), state, params)
  with pytest.raises(ValueError, match="needs params"):
    optimizer.update(jnp.ones(2), state, grad_fn=lambda p: p)


def test_placements_agree_for_sgd():
  params = init_mlp(jax.random.key(5))
  batches = make_batches(12, seed=5)
  mirror = optax_mg.mirror_gradient(3)
  before = train_two_call(optax.chain(mirror, optax.sgd(0.05)), params,
                          batches)
  after = train_two_call(optax.chain(optax.sgd(0.05), mirror), params,
                         batches)
  assert_trees_close(after, before, rtol=1e-6, atol=1e-7)


def linear_loss(params, batch):
  x, y = batch
  return jnp.mean((x @ params - y) ** 2)


def warm_up_and_measure(placement):
  """Train a linear model for 20 plain steps, then measure one mirror batch."""
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(64, 5)), jnp.float32)
  y = x @ jnp.arange(1.0, 6.0)
  mirror = optax_mg.mirror_gradient(100)
  adam = optax.adam(0.05)
  optimizer = (optax.chain(mirror, adam) if placement == "gradient"
               else optax.chain(adam, mirror))
  params = jnp.zeros(5)
  state = optimizer.init(params)
  # Move the cycle past its mirror batch so the warm-up steps are plain.
  state = optax.tree.set(state, cycle_step=jnp.asarray(2, jnp.int32))
  for _ in range(20):
    updates, state = optimizer.update(jax.grad(linear_loss)(params, (x, y)),
                                      state, params)
    params = optax.apply_updates(params, updates)
  return optax_mg.mirror_alignment(linear_loss, optimizer, params, state,
                                   (x, y))


def test_adam_gradient_placement_descends_on_mirror_call():
  alignment = warm_up_and_measure("gradient")
  assert float(alignment.update_cosine) > 0.9
  assert float(alignment.gradient_cosine) < 0.0
  assert float(alignment.after_ascent_loss) < float(alignment.after_descent_loss)


def test_adam_update_placement_ascends_on_mirror_call():
  alignment = warm_up_and_measure("update")
  assert float(alignment.update_cosine) < -0.9
  assert float(alignment.gradient_cosine) > 0.0
  assert float(alignment.after_ascent_loss) > float(alignment.after_descent_loss)
  np.testing.assert_allclose(float(alignment.norm_ratio), ASCENT_SCALE,
                             rtol=0.3)
