"""Tests of data-parallel training and row-sharded embedding tables on virtual CPU devices.

The pytest process has already started JAX with one CPU device, so the multi-device runs
happen in one child process started with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
The child trains every setting with MG, saves losses, parameters, metrics and embeddings
to an .npz file and the observed shardings to a JSON file, and the tests compare them here.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import throughput
from benchmarks import train as train_cli
from models import parallel
from models.sampling import Batch
from models.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 4
# Equal up to the order of float sums: N devices add per-device gradient sums.
# Adam divides by the root of the squared gradients, so a bias whose gradient is near zero
# can move by a few 1e-6 more on one setting than on another within 3 epochs at lr 1e-3.
RTOL = 1e-4
ATOL = 1e-5

CHILD_SCRIPT = textwrap.dedent("""
    import json
    import sys

    import jax
    import numpy as np

    from models.synthetic import make_synthetic_dataset
    from models.train import TrainConfig, TrainingProgram

    EPOCHS = 3
    SEED = 1
    BATCH_SIZE = 128  # divisible by 4 but not by 3
    arrays_path, facts_path = sys.argv[1:3]
    dataset = make_synthetic_dataset(num_users=200, num_items=120)
    arrays = {}
    facts = {"device_count": jax.device_count(), "train_rows": len(dataset.train.users)}


    def spec_and_shard(array):
        return {"spec": str(array.sharding.spec),
                "devices": len(array.sharding.device_set),
                "shard_shape": list(array.addressable_shards[0].data.shape)}


    def embed_fn(program):
        def embed(params, data):
            model = program.model(params, data.constants)
            return program.sharding.constrain(model.embed(None))
        return jax.jit(embed)


    def train(name, model, devices, shard_embeddings):
        config = TrainConfig(model=model, mg=True, interval=3, batch_size=BATCH_SIZE,
                             epochs=EPOCHS, devices=devices, shard_embeddings=shard_embeddings)
        program = TrainingProgram(dataset, config)
        state = program.init(SEED)
        losses = []
        for epoch in range(EPOCHS):
            state, loss = program.train_epoch(state, program.epoch_key(SEED, epoch))
            losses.append(float(loss))
        arrays[f"{name}/losses"] = np.array(losses)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
            arrays[f"{name}/params{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
        metrics = program.evaluate(state.params, "valid")
        arrays[f"{name}/valid"] = np.array([metrics[key] for key in sorted(metrics)])

        # The jit cache returns the epoch function compiled above.
        compiled = program.train_epoch_fn.lower(
            state, program.epoch_key(SEED, 0), program.data).compile()
        facts[name] = {
            "mesh_shape": dict(program.mesh.shape),
            "user_embedding": spec_and_shard(jax.tree.leaves(state.params["user_embedding"])[0]),
            "item_embedding": spec_and_shard(jax.tree.leaves(state.params["item_embedding"])[0]),
            "opt_state": [spec_and_shard(leaf) for leaf in jax.tree.leaves(state.opt_state)
                          if leaf.ndim == 2],
            "epoch_has_all_reduce": "all-reduce" in compiled.as_text(),
        }
        if devices > 1:
            batches = jax.jit(program.make_batches)(program.epoch_key(SEED, 0), program.data)
            facts[name].update(batch_users=spec_and_shard(batches.users),
                               batch_shape=list(batches.users.shape),
                               valid_rows=int(np.asarray(batches.mask).sum()))
        return program, state


    for model in ("lightgcn", "vbpr"):
        reference, reference_state = train(f"{model}-1", model, 1, False)
        if model == "lightgcn":
            train(f"{model}-4", model, 4, False)
            train(f"{model}-3", model, 3, False)
        sharded, _ = train(f"{model}-4-sharded", model, 4, True)

        # The 1-device parameters scored by the sharded program isolate evaluation from
        # training: the embeddings and metrics must agree to float rounding.
        params = jax.device_get(reference_state.params)
        for name, program in (("reference", reference), ("sharded", sharded)):
            placed = program.sharding.place(params)
            user_emb, item_emb = embed_fn(program)(placed, program.data)
            arrays[f"{model}-eval-{name}/user_emb"] = np.asarray(user_emb)
            arrays[f"{model}-eval-{name}/item_emb"] = np.asarray(item_emb)
            metrics = program.evaluate(placed, "valid")
            arrays[f"{model}-eval-{name}/valid"] = np.array([metrics[k] for k in sorted(metrics)])
            facts[f"{model}-eval-{name}"] = {"user_emb": spec_and_shard(user_emb),
                                             "item_emb": spec_and_shard(item_emb)}

    np.savez(arrays_path, **arrays)
    with open(facts_path, "w") as file:
        json.dump(facts, file)
""")


@pytest.fixture(scope="module")
def child(tmp_path_factory):
  """Run the child script once; return its arrays and sharding facts."""
  folder = tmp_path_factory.mktemp("parallel")
  arrays_path, facts_path = folder / "arrays.npz", folder / "facts.json"
  env = dict(os.environ,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
             JAX_PLATFORMS="cpu")
  completed = subprocess.run(
      [sys.executable, "-c", CHILD_SCRIPT, str(arrays_path), str(facts_path)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert completed.returncode == 0, completed.stderr[-4000:]
  with np.load(arrays_path) as arrays:
    return dict(arrays), json.loads(facts_path.read_text())


def _run_arrays(arrays, name):
  prefix = f"{name}/"
  return {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}


def _assert_runs_equal(arrays, name, reference):
  actual, expected = _run_arrays(arrays, name), _run_arrays(arrays, reference)
  assert sorted(actual) == sorted(expected)
  assert any(key.startswith("params") for key in actual)
  for key in expected:
    np.testing.assert_allclose(actual[key], expected[key], rtol=RTOL, atol=ATOL,
                               err_msg=f"{name} differs from {reference} in {key}")


def test_child_sees_four_devices(child):
  _, facts = child
  assert facts["device_count"] == DEVICES


@pytest.mark.parametrize("name", ["lightgcn-4", "lightgcn-3", "lightgcn-4-sharded",
                                  "vbpr-4-sharded"])
def test_multi_device_training_matches_one_device(child, name):
  arrays, _ = child
  _assert_runs_equal(arrays, name, name.split("-")[0] + "-1")


def test_training_changes_parameters(child):
  # Equality of runs means little if training did nothing: the loss must fall.
  arrays, _ = child
  losses = arrays["lightgcn-1/losses"]
  assert losses[-1] < losses[0]


@pytest.mark.parametrize("name,devices", [("lightgcn-4", 4), ("lightgcn-3", 3),
                                          ("vbpr-4-sharded", 4)])
def test_batch_rows_split_over_devices(child, name, devices):
  _, facts = child
  run = facts[name]
  padded = -(-128 // devices) * devices
  assert run["batch_shape"][1] == padded
  assert run["batch_users"]["devices"] == devices
  assert run["batch_users"]["shard_shape"] == [run["batch_shape"][0], padded // devices]
  assert run["valid_rows"] == facts["train_rows"]


def test_gradients_reduced_across_devices(child):
  _, facts = child
  assert facts["lightgcn-4"]["epoch_has_all_reduce"]
  assert not facts["lightgcn-1"]["epoch_has_all_reduce"]


def test_one_device_replicates_everything(child):
  _, facts = child
  run = facts["lightgcn-1"]
  assert run["mesh_shape"] == {"data": 1}
  assert run["user_embedding"] == {"spec": "P()", "devices": 1,
                                   "shard_shape": [200, 64]}


@pytest.mark.parametrize("model", ["lightgcn", "vbpr"])
def test_sharded_tables_split_by_rows(child, model):
  _, facts = child
  run = facts[f"{model}-4-sharded"]
  assert run["mesh_shape"] == {"data": 1, "model": DEVICES}
  assert run["user_embedding"]["spec"] == "P('model',)"
  assert run["user_embedding"]["shard_shape"][0] == 200 // DEVICES
  assert run["item_embedding"]["shard_shape"][0] == 120 // DEVICES
  # Adam's two moments of each table follow the table's sharding.
  sharded_moments = [leaf for leaf in run["opt_state"]
                     if leaf["spec"] == "P('model',)"]
  assert len(sharded_moments) >= 4
  assert facts[f"{model}-1"]["user_embedding"]["spec"] == "P()"


@pytest.mark.parametrize("model", ["lightgcn", "vbpr"])
def test_sharded_evaluation_matches(child, model):
  arrays, facts = child
  for key in ("user_emb", "item_emb", "valid"):
    np.testing.assert_allclose(arrays[f"{model}-eval-sharded/{key}"],
                               arrays[f"{model}-eval-reference/{key}"], rtol=RTOL, atol=ATOL,
                               err_msg=key)
  assert facts[f"{model}-eval-sharded"]["item_emb"]["shard_shape"][0] == 120 // DEVICES
  assert facts[f"{model}-eval-sharded"]["user_emb"]["spec"] == "P('model',)"


def test_pad_rows_masks_padding():
  batch = Batch(users=jnp.arange(10).reshape(2, 5), pos_items=jnp.ones((2, 5), jnp.int32),
                neg_items=jnp.zeros((2, 5), jnp.int32), mask=jnp.ones((2, 5), bool))
  padded = parallel.pad_rows(batch, 4, axis=1)
  assert padded.users.shape == (2, 8)
  assert padded.mask.sum() == 10
  assert not padded.mask[:, 5:].any()
  # Padding copies each batch's first row, so its ids are valid.
  np.testing.assert_array_equal(padded.users[:, 5:], [[0, 0, 0], [5, 5, 5]])
  assert parallel.pad_rows(batch, 5, axis=1) is batch


def test_devices_beyond_available_rejected():
  # The pytest process has one device.
  with pytest.raises(ValueError, match=r"invalid devices 2: .*jax.device_count\(\) = 1"):
    parallel.resolve_device_count(2)
  assert parallel.resolve_device_count(None) == 1


def test_config_rejects_bad_devices():
  with pytest.raises(ValueError, match="invalid devices 0"):
    TrainConfig(devices=0)
  with pytest.raises(ValueError, match="invalid shard_embeddings"):
    TrainConfig(shard_embeddings="yes")


def test_cli_rejects_too_many_devices(capsys):
  parser = train_cli.build_parser()
  args = parser.parse_args(["--model", "lightgcn", "--devices", "8"])
  with pytest.raises(SystemExit):
    train_cli.check_parallel_arguments(args, parser)
  assert "argument --devices: invalid devices 8" in capsys.readouterr().err


def test_incomplete_coordinator_environment_rejected(monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
  monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
  monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID missing"):
    parallel.maybe_initialize_distributed()


def test_no_coordinator_environment_is_single_process(monkeypatch):
  for name in parallel.COORDINATOR_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  assert parallel.maybe_initialize_distributed() is False


def test_sweep_child_arguments_drop_sweep_options():
  argv = ["--models", "lightgcn", "--device-counts", "1", "2", "--out", "x.json",
          "--seed", "-1", "--devices=3", "--repeats", "2"]
  assert throughput.child_arguments(argv, 4, Path("y.json")) == [
      "--models", "lightgcn", "--seed", "-1", "--repeats", "2",
      "--devices", "4", "--out", "y.json"]


def test_sweep_child_environment_replaces_flag(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/d")
  flags = throughput.child_environment(2)["XLA_FLAGS"].split()
  assert flags == ["--xla_dump_to=/tmp/d", "--xla_force_host_platform_device_count=2"]


def _sweep_run(seconds, first_loss):
  arm = {"epoch_seconds": {"median": seconds, "min": seconds, "max": seconds},
         "steps_per_second": 10 / seconds, "first_epoch_loss": first_loss,
         "last_epoch_loss": 0.5}
  return {"environment": {"device_count": 0, "backend": "cpu", "cpu_affinity": [0, 1],
                          "cpu_count": 2},
          "models": {"lightgcn": {"arms": {"plain": arm}}}}


def test_sweep_scaling_efficiency_and_loss_check():
  runs = {1: _sweep_run(2.0, 0.69), 2: _sweep_run(1.0, 0.69 + 1e-8),
          4: _sweep_run(2.0, 0.70)}
  rows = throughput.scaling_report(runs)["lightgcn"]["plain"]
  assert [row["devices"] for row in rows] == [1, 2, 4]
  assert rows[1]["scaling_efficiency"] == pytest.approx(1.0)
  assert rows[2]["scaling_efficiency"] == pytest.approx(0.25)
  assert rows[1]["first_epoch_loss_equal"]
  assert not rows[2]["first_epoch_loss_equal"]
  assert "share the same 2 CPUs" in throughput.sweep_note(runs)
