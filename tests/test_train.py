"""Tests of the compiled trainer and the benchmarks.train command line."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mg
from benchmarks import train as train_cli
from models.data import load_dataset
from models.sampling import epoch_batches
from models.synthetic import make_synthetic_dataset
from models.train import EarlyStopping, TrainConfig, TrainingProgram, fit

TIKTOK = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tiktok"


@pytest.fixture(scope="module")
def dataset():
  return make_synthetic_dataset(num_users=200, num_items=120, seed=3)


def test_early_stopping_follows_mmrec_rule():
  stopping = EarlyStopping(patience=2)
  assert stopping.update(0.1)
  assert not stopping.update(0.10004)  # equal after rounding to 4 decimals
  assert not stopping.update(0.05)
  assert not stopping.should_stop
  assert not stopping.update(0.1)
  assert stopping.should_stop
  assert stopping.epochs_without_improvement == 3


@pytest.mark.parametrize("placement", optax_mg.PLACEMENTS)
def test_mg_epoch_matches_two_call_loop(dataset, placement):
  config = TrainConfig(model="lightgcn", mg=True, interval=2, batch_size=512,
                       learning_rate=0.01, placement=placement)
  program = TrainingProgram(dataset, config)
  state = program.init(0)
  key = program.epoch_key(0, 0)
  compiled_state, _ = program.train_epoch(state, key)

  # The same epoch with the chain form, deciding the mirror call on the host.
  mirror = optax_mg.mirror_gradient(2)
  adam = optax.adam(0.01)
  chain = (optax.chain(mirror, adam) if placement == "gradient"
           else optax.chain(adam, mirror))
  data = program.data
  batch_key, graph_key = jax.random.split(key)
  batches = epoch_batches(batch_key, data.train_users, data.train_items, data.sampler,
                          config.batch_size)
  graph = program.model(state.params, data.constants).train_graph(graph_key)
  grad_fn = jax.jit(jax.grad(
      lambda params, batch: program.model(params, data.constants).loss(batch, graph)))
  params = state.params
  opt_state = chain.init(params)
  num_batches = batches.users.shape[0]
  assert num_batches >= 3
  for index in range(num_batches):
    batch = jax.tree.map(lambda x: x[index], batches)
    updates, opt_state = chain.update(grad_fn(params, batch), opt_state, params)
    params = optax.apply_updates(params, updates)
    if optax_mg.is_mirror_step(opt_state):
      updates, opt_state = chain.update(grad_fn(params, batch), opt_state, params)
      params = optax.apply_updates(params, updates)

  for expected, actual in zip(jax.tree.leaves(params), jax.tree.leaves(compiled_state.params)):
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6)


def test_mg_changes_training(dataset):
  plain = TrainingProgram(dataset, TrainConfig(model="vbpr", batch_size=512))
  mirror = TrainingProgram(dataset, TrainConfig(model="vbpr", batch_size=512, mg=True))
  state = plain.init(0)
  key = plain.epoch_key(0, 0)
  plain_state, plain_loss = plain.train_epoch(state, key)
  mirror_state, mirror_loss = mirror.train_epoch(mirror.init(0), key)
  # Both arms start from the same parameters and batches, and MG's extra steps must then
  # make the parameters differ.
  assert math.isfinite(float(plain_loss))
  assert math.isfinite(float(mirror_loss))
  difference = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                            plain_state.params, mirror_state.params)
  assert max(jax.tree.leaves(difference)) > 1e-6


@pytest.mark.parametrize("model", ["lightgcn", "freedom"])
def test_resume_reaches_same_result(dataset, tmp_path, model):
  config = TrainConfig(model=model, mg=True, epochs=8, patience=3, batch_size=512,
                       seed=5, checkpoint_every=2)
  uninterrupted = fit(dataset, config, progress=False)

  directory = tmp_path / "checkpoints"
  interrupted = fit(dataset, config, checkpoint_dir=directory, progress=False,
                    stop_after_epoch=4)
  assert interrupted.stop_reason == "interrupted after epoch 4"
  resumed = fit(dataset, config, checkpoint_dir=directory, resume=True, progress=False)

  assert resumed.history[0].epoch == 0
  assert [r.epoch for r in resumed.history] == [r.epoch for r in uninterrupted.history]
  assert resumed.best_epoch == uninterrupted.best_epoch
  for name, value in uninterrupted.test.items():
    assert resumed.test[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
  losses = [r.loss for r in uninterrupted.history]
  np.testing.assert_allclose([r.loss for r in resumed.history], losses, rtol=1e-5)


def test_resume_rejects_changed_config(dataset, tmp_path):
  config = TrainConfig(model="lightgcn", epochs=2, batch_size=512)
  fit(dataset, config, checkpoint_dir=tmp_path, progress=False)
  changed = TrainConfig(model="lightgcn", epochs=2, batch_size=512, learning_rate=0.1)
  with pytest.raises(ValueError, match="learning_rate: checkpoint 0.001, now 0.1"):
    fit(dataset, changed, checkpoint_dir=tmp_path, resume=True, progress=False)


def test_nan_loss_stops_and_keeps_best(dataset, tmp_path):
  config = TrainConfig(model="lightgcn", epochs=10, batch_size=512)
  program = TrainingProgram(dataset, config)
  compiled = program.train_epoch_fn

  third_key = jax.random.key_data(program.epoch_key(config.seed, 3))

  def diverge_at_epoch_3(state, key, data):
    new_state, loss = compiled(state, key, data)
    is_third = jnp.all(jax.random.key_data(key) == third_key)
    return new_state, jnp.where(is_third, jnp.nan, loss)

  program.train_epoch_fn = jax.jit(diverge_at_epoch_3)
  result = fit(dataset, config, program=program, checkpoint_dir=tmp_path, progress=False)

  assert "non-finite loss nan at epoch 3" in result.stop_reason
  assert len(result.history) == 3
  assert result.best_epoch is not None and result.best_epoch <= 2
  assert set(result.test) >= {"recall@20", "ndcg@20"}
  assert (tmp_path / "best").exists()
  saved = json.loads((tmp_path / "latest.json").read_text())
  assert saved["next_epoch"] == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model": "mf"}, "invalid model 'mf'"),
        ({"optimizer": "lion"}, "invalid optimizer 'lion'"),
        ({"learning_rate": 0.0}, "invalid learning_rate 0.0"),
        ({"batch_size": 0}, "invalid batch_size 0"),
        ({"valid_metric": "auc"}, "invalid valid_metric 'auc'"),
        ({"placement": "before"}, "invalid placement 'before'"),
        ({"ascent_scale": -1.0}, "ascent_scale must be >= 0, got -1.0"),
    ],
)
def test_config_rejects_invalid_values(kwargs, message):
  with pytest.raises(ValueError, match=message):
    TrainConfig(**kwargs)


def test_cli_writes_results(tmp_path, capsys):
  out = tmp_path / "run"
  code = train_cli.main(["--model", "vbpr", "--mg", "--epochs", "3", "--no-progress",
                         "--out", str(out), "--log-level", "WARNING"])
  assert code == 0
  results = json.loads((out / "results.json").read_text())
  assert results["config"]["mg"] is True
  assert results["config"]["placement"] == "gradient"
  assert results["epochs_run"] == 3
  assert len(results["history"]) == 3
  assert results["best_epoch"] in (0, 1, 2)
  assert 0.0 <= results["test"]["recall@20"] <= 1.0
  assert results["backend"] == jax.default_backend()
  assert results["dataset"]["name"] == "synthetic"
  printed = capsys.readouterr().out
  assert "test recall@20" in printed


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--lr", "-1"], "argument --lr: expected a finite number > 0, got -1"),
        (["--interval", "0"], "argument --interval: expected an integer >= 1, got 0"),
        (["--dropout", "1.5"], "argument --dropout: expected a number in [0, 1), got 1.5"),
        (["--optimizer", "lion"], "argument --optimizer: invalid choice: 'lion'"),
        (["--data-dir", "/nonexistent/folder"], "/nonexistent/folder"),
    ],
)
def test_cli_rejects_invalid_options(arguments, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train_cli.main(["--model", "lightgcn", "--no-progress"] + arguments)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


@pytest.mark.skipif(not TIKTOK.exists(), reason="../shared/data/tiktok is not present")
@pytest.mark.parametrize("model", ["lightgcn", "vbpr", "freedom"])
def test_tiktok_short_run(model, tmp_path):
  dataset = load_dataset(TIKTOK)
  config = TrainConfig(model=model, mg=True, epochs=2, valid_metric="recall@5")
  result = fit(dataset, config, checkpoint_dir=tmp_path, progress=False)
  assert len(result.history) == 2
  for record in result.history:
    assert math.isfinite(record.loss)
  assert result.history[-1].loss < 0.7  # BPR starts at log(2) = 0.693
  assert 0.0 < result.test["recall@20"] < 1.0
  assert (tmp_path / "latest").exists()
