"""Compiled training of the recommendation models, with or without Mirror Gradient.

A `TrainingProgram` turns a dataset, a model and a `TrainConfig` into pure, jittable
functions of explicit state. `init` builds parameters and optimizer state from a seed.
`train_epoch` runs a whole epoch as one `lax.scan` over fixed-shape batches, with negative
sampling, shuffling, FREEDOM's edge pruning and MG's same-batch second pass inside.
`evaluate` ranks all items for every user of a split. Because the functions are pure, the
benchmarks `jax.vmap` them over seeds. `fit` is the host loop around them: early stopping,
logging, a progress bar, orbax checkpoints and resuming.

Reference trainer behaviour kept: the batch counter restarts every epoch, so the first
batch of each epoch is a mirror batch. Early stopping compares the validation metric
rounded to 4 decimals, an equal value is no improvement, and training stops once the
count of evaluations without improvement exceeds ``patience``. Test metrics are those of
the best validation epoch. Deviations: an epoch's loss is the mean of its batch losses
(MMRec logs their sum), and the shuffled order and negatives come from
``fold_in(key(seed), epoch)``, so they are the same with and without MG for a seed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import optax_mg
from models.data import Dataset
from models.evaluation import DEFAULT_CHUNK_SIZE, Evaluator, evaluate
from models.parallel import ShardingPlan, make_mesh, make_sharding_plan
from models.registry import MODEL_NAMES, build_model
from models.sampling import Batch, NegativeSampler, epoch_batches

logger = logging.getLogger(__name__)

OPTIMIZER_NAMES = ("adam", "sgd", "adagrad", "rmsprop", "adamw")
METRIC_NAMES = ("recall", "precision", "ndcg", "map")
EVALUATION_KS = (5, 10, 20, 50)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that decides a training run, recorded in results.json."""

  model: str = "lightgcn"
  model_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  weight_decay: float = 0.0
  mg: bool = False
  interval: int = 3
  descent_scale: float = 1.0
  ascent_scale: float = 0.2
  placement: str = "gradient"
  batch_size: int = 2048
  epochs: int = 1000
  patience: int = 20
  valid_metric: str = "recall@20"
  seed: int = 999
  eval_chunk_size: int = DEFAULT_CHUNK_SIZE
  checkpoint_every: int = 5
  # Devices of the data-parallel mesh; None means all devices (jax.device_count()).
  devices: int | None = None
  # Split the user and item tables and their optimizer moments by rows over the devices.
  shard_embeddings: bool = False

  def __post_init__(self):
    if self.model not in MODEL_NAMES:
      raise ValueError(f"invalid model {self.model!r}; expected one of {MODEL_NAMES}")
    if self.optimizer not in OPTIMIZER_NAMES:
      raise ValueError(
          f"invalid optimizer {self.optimizer!r}; expected one of {OPTIMIZER_NAMES}")
    _check_number("learning_rate", self.learning_rate, positive=True)
    _check_number("weight_decay", self.weight_decay, positive=False)
    for name in ("batch_size", "epochs", "eval_chunk_size", "interval", "checkpoint_every"):
      _check_count(name, getattr(self, name), minimum=1)
    _check_count("patience", self.patience, minimum=0)
    if self.devices is not None:
      _check_count("devices", self.devices, minimum=1)
    if not isinstance(self.shard_embeddings, bool):
      raise ValueError(
          f"invalid shard_embeddings {self.shard_embeddings!r}; expected True or False")
    if self.placement not in optax_mg.PLACEMENTS:
      raise ValueError(
          f"invalid placement {self.placement!r}; expected one of {optax_mg.PLACEMENTS}")
    valid_metrics = [f"{m}@{k}" for m in METRIC_NAMES for k in EVALUATION_KS]
    if self.valid_metric not in valid_metrics:
      raise ValueError(
          f"invalid valid_metric {self.valid_metric!r}; expected one of {valid_metrics}")
    # mirror_gradient validates the scales with the same rules it applies to users.
    optax_mg.mirror_gradient(self.interval, descent_scale=self.descent_scale,
                             ascent_scale=self.ascent_scale)

  def to_dict(self) -> dict[str, Any]:
    config = dataclasses.asdict(self)
    config["model_options"] = dict(self.model_options)
    return config


def _check_number(name: str, value: Any, *, positive: bool) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"invalid {name} {value!r}; expected a finite number")
  if positive and value <= 0:
    raise ValueError(f"invalid {name} {value!r}; expected a number > 0")
  if value < 0:
    raise ValueError(f"invalid {name} {value!r}; expected a number >= 0")


def _check_count(name: str, value: Any, *, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"invalid {name} {value!r}; expected an integer >= {minimum}")


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """Build the optimizer named in ``config``, chained with MG when ``config.mg``.

  ``mirror_gradient`` goes before the optimizer for the "gradient" placement and after it
  for the "update" placement.

  Weight decay follows PyTorch's optimizers: ``adamw`` decouples it, the others add
  ``weight_decay * params`` to the gradient. With MG at the gradient placement, the scales
  act on the loss gradient only, as when the reference scales the loss.
  """
  lr = config.learning_rate
  if config.optimizer == "adamw":
    optimizer = optax.adamw(lr, weight_decay=config.weight_decay)
  else:
    factory = {"adam": optax.adam, "sgd": optax.sgd, "adagrad": optax.adagrad,
               "rmsprop": optax.rmsprop}[config.optimizer]
    optimizer = factory(lr)
    if config.weight_decay > 0:
      optimizer = optax.chain(optax.add_decayed_weights(config.weight_decay), optimizer)

  if not config.mg:
    return optimizer
  mirror = optax_mg.mirror_gradient(config.interval, descent_scale=config.descent_scale,
                                    ascent_scale=config.ascent_scale)
  if config.placement == "gradient":
    return optax.chain(mirror, optimizer)
  return optax.chain(optimizer, mirror)


class ProgramData(NamedTuple):
  """Device arrays that the compiled functions read but never change."""

  constants: Any  # nnx.State of the model's non-parameter variables (graphs, features)
  train_users: jax.Array  # int32 [num_train]
  train_items: jax.Array  # int32 [num_train]
  sampler: NegativeSampler
  valid_index: Any  # models.evaluation.EvaluationIndex
  test_index: Any


class TrainState(NamedTuple):
  """Trainable state of one run; a leading seed axis when the functions are vmapped."""

  params: Any  # nnx.State of the model's nnx.Param variables
  opt_state: optax.OptState


class TrainingProgram:
  """The pure functions of one (dataset, config) pair, compiled once.

  The program trains on a mesh of ``config.devices`` devices (`models.parallel`): `init`
  and ``data`` place their arrays on it, and `run_epoch` splits every batch's rows over
  the devices, so one code path serves one and many devices.

  Args:
    dataset: the data to train and evaluate on.
    config: the run's configuration; ``config.seed`` is not used here, so one program
      serves every seed.

  Raises:
    ValueError: when ``config.devices`` exceeds the available devices.
  """

  def __init__(self, dataset: Dataset, config: TrainConfig):
    self.dataset = dataset
    self.config = config
    self.optimizer = make_optimizer(config)
    self.mesh = make_mesh(config.devices, config.shard_embeddings)
    self.sharding: ShardingPlan = make_sharding_plan(
        self.mesh, (dataset.num_users, dataset.num_items), config.shard_embeddings)

    template = build_model(config.model, dataset, rngs=nnx.Rngs(0),
                           **dict(config.model_options))
    self.graphdef, _, self.constants = nnx.split(template, nnx.Param, ...)
    self.uses_features = bool(template.uses_features)

    self.evaluators = {
        split: Evaluator(dataset, split, ks=EVALUATION_KS, chunk_size=config.eval_chunk_size)
        for split in ("valid", "test")
    }
    # Arrays derived from the data enter the compiled functions as arguments, not as
    # closed-over constants, which XLA would embed in the program and fold slowly.
    # Every device has a full copy, because each device samples its rows of a batch.
    self.data = self.sharding.replicate(ProgramData(
        constants=self.constants,
        train_users=jnp.asarray(dataset.train.users, jnp.int32),
        train_items=jnp.asarray(dataset.train.items, jnp.int32),
        sampler=NegativeSampler(dataset),
        valid_index=self.evaluators["valid"].index,
        test_index=self.evaluators["test"].index,
    ))

    self.train_epoch_fn = jax.jit(self.run_epoch)
    self.evaluate_fn = jax.jit(self.evaluate_metrics, static_argnames="split")

  def train_epoch(self, state: TrainState, key: jax.Array) -> tuple[TrainState, jax.Array]:
    """Run one compiled epoch; returns the new state and the mean batch loss."""
    return self.train_epoch_fn(state, key, self.data)

  def model(self, params: Any, constants: Any) -> nnx.Module:
    """Merge ``params`` with the model's constants into a usable model.

    The model owns copies of the variables, so mutating it (``set_item_features``) leaves
    ``params``, ``constants`` and the program's data unchanged.
    """
    return nnx.merge(self.graphdef, params, constants, copy=True)

  def init(self, seed: int) -> TrainState:
    """Initialise parameters from ``seed`` and the optimizer state, placed on the mesh."""
    model = build_model(self.config.model, self.dataset, rngs=nnx.Rngs(seed),
                        **dict(self.config.model_options))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    return self.sharding.place(TrainState(params, self.optimizer.init(params)))

  def epoch_key(self, seed: int, epoch: int) -> jax.Array:
    """Key of one epoch's order, negatives and pruned graph; equal across MG arms."""
    return jax.random.fold_in(jax.random.key(seed), epoch)

  def make_batches(self, key: jax.Array, data: ProgramData) -> Batch:
    """Shuffle and cut one epoch's batches, their rows split over the mesh (pure).

    Each batch's rows are padded with masked rows to a multiple of the device count, so
    the result has shape ``[num_batches, padded_batch_size]``.
    """
    batches = epoch_batches(key, data.train_users, data.train_items, data.sampler,
                            self.config.batch_size)
    return self.sharding.constrain_batches(self.sharding.pad_batches(batches))

  def run_epoch(self, state: TrainState, key: jax.Array,
                data: ProgramData) -> tuple[TrainState, jax.Array]:
    """Train one epoch; pure, so it can be vmapped over ``state`` and ``key`` (seeds)."""
    batch_key, graph_key = jax.random.split(key)
    batches = self.make_batches(batch_key, data)
    state = self.sharding.constrain(state)
    graph = self.model(state.params, data.constants).train_graph(graph_key)

    def loss_fn(params, batch):
      return self.model(params, data.constants).loss(batch, graph)

    plain_step = self._plain_step(loss_fn)
    carry = (state.params, state.opt_state)
    if not self.config.mg:
      carry, losses = jax.lax.scan(plain_step, carry, batches)
      return self.sharding.constrain(TrainState(*carry)), jnp.mean(losses)

    # The reference restarts the batch counter every epoch, so mirror batches sit at the
    # static positions 0, interval, 2 * interval, ... The epoch is therefore a scan over
    # groups of `interval` batches whose first batch takes MG's two updates, and no
    # lax.cond decides per batch (on CPU a cond copied the whole optimizer state).
    mirror_step = self._mirror_step(loss_fn)
    interval = self.config.interval
    num_batches = batches.users.shape[0]
    num_groups, remainder = divmod(num_batches, interval)
    carry = (carry[0], optax_mg.restart_cycle(carry[1]))

    def group_step(carry, group):
      carry, first_loss = mirror_step(carry, jax.tree.map(lambda x: x[0], group))
      carry, losses = jax.lax.scan(plain_step, carry, jax.tree.map(lambda x: x[1:], group))
      return carry, jnp.concatenate([first_loss[None], losses])

    grouped = jax.tree.map(
        lambda x: x[: num_groups * interval].reshape(num_groups, interval, *x.shape[1:]),
        batches)
    carry, losses = jax.lax.scan(group_step, carry, grouped)
    losses = [losses.reshape(-1)]
    if remainder:
      carry, tail_losses = group_step(
          carry, jax.tree.map(lambda x: x[num_groups * interval:], batches))
      losses.append(tail_losses)
    return self.sharding.constrain(TrainState(*carry)), jnp.mean(jnp.concatenate(losses))

  def _plain_step(self, loss_fn: Callable) -> Callable:
    def step(carry, batch):
      params, opt_state = carry
      # Rows split over the devices and replicated parameters make XLA sum the gradients
      # of the devices' rows with an all-reduce.
      batch = self.sharding.constrain_batch(batch)
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, opt_state = self.optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    return step

  def _mirror_step(self, loss_fn: Callable) -> Callable:
    """Build the step of a mirror batch: descent update, then the same-batch mirror update."""
    plain_step = self._plain_step(loss_fn)

    def step(carry, batch):
      carry, loss = plain_step(carry, batch)
      carry, _ = plain_step(carry, batch)
      return carry, loss
    return step

  def evaluate_metrics(self, params: Any, data: ProgramData, split: str) -> dict[str, jax.Array]:
    """Rank all items on the full graph for ``split``; pure and vmappable over ``params``."""
    user_emb, item_emb = self.model(params, data.constants).embed(None)
    # With sharded tables the final embeddings stay split by rows, so each device scores
    # a chunk of users against its share of the items.
    # NOTE: without shard_embeddings every device runs the whole evaluation.
    user_emb, item_emb = self.sharding.constrain((user_emb, item_emb))
    index = data.valid_index if split == "valid" else data.test_index
    return evaluate(index, user_emb, item_emb, EVALUATION_KS)

  def evaluate(self, params: Any, split: str, data: ProgramData | None = None) -> dict[str, float]:
    """Return the metrics of ``split`` ("valid" or "test") as Python floats.

    ``data`` replaces the program's data, e.g. with perturbed item features.
    """
    metrics = self.evaluate_fn(params, data or self.data, split=split)
    return {name: float(value) for name, value in jax.device_get(metrics).items()}


@dataclasses.dataclass
class EpochRecord:
  """One line of the training history."""

  epoch: int
  loss: float
  train_seconds: float
  valid_seconds: float
  valid: dict[str, float]


@dataclasses.dataclass
class TrainResult:
  """Outcome of `fit`; `to_dict` is what results.json holds."""

  config: TrainConfig
  dataset: dict[str, Any]
  history: list[EpochRecord]
  best_epoch: int | None
  best_valid: dict[str, float]
  test: dict[str, float]
  stop_reason: str
  wall_seconds: float
  compile_seconds: float
  best_params: Any = dataclasses.field(repr=False, default=None)
  mesh_shape: dict[str, int] | None = None  # axis name -> devices of the training mesh

  def to_dict(self) -> dict[str, Any]:
    return {
        "config": self.config.to_dict(),
        "dataset": self.dataset,
        "best_epoch": self.best_epoch,
        "best_valid": self.best_valid,
        "test": self.test,
        "stop_reason": self.stop_reason,
        "epochs_run": len(self.history),
        "wall_seconds": self.wall_seconds,
        "compile_seconds": self.compile_seconds,
        "mean_train_seconds_per_epoch": _mean([r.train_seconds for r in self.history[1:]]),
        "mean_valid_seconds_per_epoch": _mean([r.valid_seconds for r in self.history[1:]]),
        "history": [dataclasses.asdict(r) for r in self.history],
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "mesh_shape": self.mesh_shape,
        "process_count": jax.process_count(),
    }


def _mean(values: list[float]) -> float | None:
  return float(np.mean(values)) if values else None


class _Checkpoints:
  """Latest and best training states under ``directory``, written with orbax.

  In a multi-process run every process calls `save` and `restore`, because orbax writes
  and reads sharded arrays collectively; only process 0 writes the progress JSON.
  """

  def __init__(self, directory: Path):
    import orbax.checkpoint as ocp  # Imported here: only runs that write need it.

    self.directory = directory
    self.checkpointer = ocp.StandardCheckpointer()
    self._to_abstract = ocp.utils.to_shape_dtype_struct

  def save(self, name: str, state: TrainState, progress: dict[str, Any]) -> None:
    self.checkpointer.wait_until_finished()
    self.checkpointer.save(self.directory / name, {"params": state.params,
                                                   "opt_state": state.opt_state},
                           force=True)
    self.checkpointer.wait_until_finished()
    if jax.process_index() != 0:
      return
    progress_path = self.directory / f"{name}.json"
    temporary = progress_path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(progress))
    temporary.replace(progress_path)

  def exists(self, name: str) -> bool:
    return (self.directory / name).exists() and (self.directory / f"{name}.json").exists()

  def restore(self, name: str, template: TrainState) -> tuple[TrainState, dict[str, Any]]:
    target = jax.tree.map(self._to_abstract, {"params": template.params,
                                              "opt_state": template.opt_state})
    restored = self.checkpointer.restore(self.directory / name, target)
    progress = json.loads((self.directory / f"{name}.json").read_text())
    return TrainState(restored["params"], restored["opt_state"]), progress


class EarlyStopping:
  """Early stopping as MMRec does it, for one run.

  A value improves when, rounded to 4 decimals, it is strictly greater than the best so
  far. The run should stop once more than ``patience`` evaluations in a row did not
  improve.
  """

  def __init__(self, patience: int, best: float | None = None, epochs_without_improvement: int = 0):
    self.patience = patience
    self.best = best
    self.epochs_without_improvement = epochs_without_improvement

  def update(self, value: float) -> bool:
    """Record one evaluation; return whether it improved on the best."""
    if self.best is None or round(value, 4) > round(self.best, 4):
      self.best = value
      self.epochs_without_improvement = 0
      return True
    self.epochs_without_improvement += 1
    return False

  @property
  def should_stop(self) -> bool:
    return self.epochs_without_improvement > self.patience


def fit(
    dataset: Dataset,
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    program: TrainingProgram | None = None,
    stop_after_epoch: int | None = None,
) -> TrainResult:
  """Train until early stopping, divergence or ``config.epochs`` epochs.

  Args:
    dataset: training, validation and test data.
    config: the run's configuration.
    checkpoint_dir: where orbax writes the ``latest`` and ``best`` states, every
      ``config.checkpoint_every`` epochs and when training ends; None writes nothing.
    resume: continue from ``checkpoint_dir/latest`` when it exists. The checkpoint's
      configuration must equal ``config`` except for ``epochs``.
    progress: show a progress bar over epochs.
    program: a `TrainingProgram` of the same dataset and config, to reuse its compiled
      functions.
    stop_after_epoch: end after this epoch as if interrupted (to test resuming).

  Returns:
    A `TrainResult`. When the loss becomes NaN or infinite, training stops, the message
    names the epoch, and the result contains the best state found before it.
  """
  start = time.perf_counter()
  program = program or TrainingProgram(dataset, config)
  checkpoints = _Checkpoints(Path(checkpoint_dir)) if checkpoint_dir is not None else None
  if resume and checkpoints is None:
    raise ValueError("resume=True needs a checkpoint_dir to resume from")

  state = program.init(config.seed)
  history: list[EpochRecord] = []
  best_epoch, best_valid, test, best_state = None, {}, {}, state
  stopping = EarlyStopping(config.patience)
  first_epoch = 0

  if resume and checkpoints.exists("latest"):
    state, saved = checkpoints.restore("latest", state)
    _check_resumable(saved["config"], config)
    history = [EpochRecord(**record) for record in saved["history"]]
    first_epoch = saved["next_epoch"]
    best_epoch, best_valid, test = saved["best_epoch"], saved["best_valid"], saved["test"]
    stopping = EarlyStopping(config.patience, best_valid.get(config.valid_metric),
                             saved["epochs_without_improvement"])
    if best_epoch is not None and checkpoints.exists("best"):
      best_state = checkpoints.restore("best", state)[0]
    logger.info("resumed from %s at epoch %d", checkpoint_dir, first_epoch)
  elif resume:
    logger.info("no checkpoint in %s; starting from epoch 0", checkpoint_dir)

  best_saved = True
  last_epoch = None

  def save_progress(epoch: int) -> None:
    # The best state goes first, so "latest" never refers to an unsaved best epoch.
    nonlocal best_saved
    if not best_saved:
      checkpoints.save("best", best_state, {"epoch": best_epoch})
      best_saved = True
    checkpoints.save("latest", state, {
        "config": config.to_dict(),
        "next_epoch": epoch + 1,
        "history": [dataclasses.asdict(r) for r in history],
        "best_epoch": best_epoch,
        "best_valid": best_valid,
        "test": test,
        "epochs_without_improvement": stopping.epochs_without_improvement,
    })

  compile_start = time.perf_counter()
  program.train_epoch_fn.lower(state, program.epoch_key(config.seed, 0), program.data).compile()
  compile_seconds = time.perf_counter() - compile_start

  stop_reason = f"reached {config.epochs} epochs"
  early_stop_reason = f"early stopping: no improvement for {config.patience + 1} evaluations"
  bar = tqdm(range(first_epoch, config.epochs), desc=f"{config.model}{' MG' if config.mg else ''}",
             # None hides the bar when standard error is not a terminal (a log file).
             disable=None if progress and jax.process_index() == 0 else True, unit="epoch")
  for epoch in bar:
    if stopping.should_stop:
      stop_reason = early_stop_reason
      break

    train_start = time.perf_counter()
    new_state, loss = program.train_epoch(state, program.epoch_key(config.seed, epoch))
    loss = float(loss)
    train_seconds = time.perf_counter() - train_start
    if not math.isfinite(loss):
      stop_reason = f"non-finite loss {loss} at epoch {epoch}; kept the best state (epoch {best_epoch})"
      logger.error("training stopped: %s", stop_reason)
      break
    state = new_state

    valid_start = time.perf_counter()
    valid = program.evaluate(state.params, "valid")
    valid_seconds = time.perf_counter() - valid_start
    history.append(EpochRecord(epoch, loss, train_seconds, valid_seconds, valid))

    value = valid[config.valid_metric]
    if stopping.update(value):
      best_epoch, best_valid, best_state = epoch, valid, state
      test = program.evaluate(state.params, "test")
      best_saved = False

    logger.info("epoch %d: loss %.5f, valid %s %.4f (best %.4f at epoch %s), %.2fs train,"
                " %.2fs valid", epoch, loss, config.valid_metric, value,
                best_valid[config.valid_metric], best_epoch, train_seconds, valid_seconds)
    bar.set_postfix(loss=f"{loss:.4f}", **{config.valid_metric: f"{value:.4f}"})

    last_epoch = epoch
    if checkpoints is not None and (epoch + 1) % config.checkpoint_every == 0:
      save_progress(epoch)
    if stop_after_epoch is not None and epoch >= stop_after_epoch:
      stop_reason = f"interrupted after epoch {epoch}"
      break
  else:
    if stopping.should_stop:
      stop_reason = early_stop_reason
  bar.close()
  if checkpoints is not None and last_epoch is not None:
    save_progress(last_epoch)

  return TrainResult(
      config=config,
      dataset=dataset.stats(),
      history=history,
      best_epoch=best_epoch,
      best_valid=best_valid,
      test=test,
      stop_reason=stop_reason,
      wall_seconds=time.perf_counter() - start,
      compile_seconds=compile_seconds,
      best_params=best_state.params,
      mesh_shape=dict(program.mesh.shape),
  )


def _check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
  current = config.to_dict()
  # The device count and table sharding decide where arrays live, not what is computed,
  # so a run may resume on another number of devices.
  changed = sorted(key for key in current
                   if key not in ("epochs", "checkpoint_every", "devices", "shard_embeddings")
                   and saved.get(key) != current[key])
  if changed:
    details = ", ".join(f"{key}: checkpoint {saved.get(key)!r}, now {current[key]!r}"
                        for key in changed)
    raise ValueError(
        f"cannot resume: the checkpoint was written with a different configuration ({details})."
        " Use the same options, or a new output directory.")
