"""Compare Mirror Gradient with plain training over several seeds, paired by seed.

Examples:
  python -m benchmarks.compare --models lightgcn --seeds 3 --epochs 50   # synthetic data
  python -m benchmarks.compare --models vbpr freedom --data-dir ../shared/data/tiktok
  python -m benchmarks.compare --models freedom --arms plain mg-gradient mg-update \\
      --seed-list 1 2 3 --seed-mode loop --data-dir ../shared/data/tiktok

Every arm (``plain``, ``mg-gradient``: MG scaling the gradients before the optimizer as the
reference does, ``mg-update``: MG scaling the optimizer's updates) trains the same seeds.
An epoch's shuffled order, negatives and pruned graph come from ``fold_in(key(seed),
epoch)``, so for one seed every arm trains on the same batches, and each MG arm is compared
with ``plain`` through per-seed differences of the test metrics.

With ``--seed-mode vmap`` (the default) the seeds of an arm train together as one
``jax.vmap`` over independent training states, each seed with its own early stopping on
the host. ``--seed-mode loop`` trains them one after another with ``models.train.fit``;
it needs a single seed's memory, and its wall times are those of one run.

Writes ``compare.json`` (configuration, per-seed results and histories, per-arm mean and
standard deviation, paired differences with t-intervals and win fractions, wall times,
JAX version and devices), ``compare.md`` (the same as tables) and ``valid_recall.png``
(validation Recall@20 per epoch) into ``--out``, and prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from benchmarks import stats
from benchmarks.train import (SUMMARY_METRICS, add_data_arguments, add_model_arguments,
                              add_training_arguments, configure_logging, load_data,
                              make_config, positive_int)
from models.data import Dataset
from models.train import EarlyStopping, TrainConfig, TrainingProgram, TrainResult, fit

logger = logging.getLogger(__name__)

# Arm name -> (mg, placement). The placement of the plain arm is unused.
ARMS = {
    "plain": (False, "gradient"),
    "mg-gradient": (True, "gradient"),
    "mg-update": (True, "update"),
}
CONTROL_ARM = "plain"
SEED_MODES = ("vmap", "loop")
PLOT_METRIC = "recall@20"


class SeedRun:
  """History, early stopping and best results of one seed of one arm.

  It applies the rules of `models.train.fit`. An epoch with a non-finite loss ends the
  seed without being recorded. A validation value improves when it is strictly greater
  after rounding to 4 decimals, and the seed stops once more than ``patience`` epochs in
  a row did not improve. The test metrics belong to the best validation epoch.
  """

  def __init__(self, seed: int, *, valid_metric: str, patience: int, label: str = ""):
    self.seed = seed
    self.label = label
    self.valid_metric = valid_metric
    self.patience = patience
    self.stopping = EarlyStopping(patience)
    self.epochs: list[int] = []
    self.losses: list[float] = []
    self.valid: list[dict[str, float]] = []
    self.best_epoch: int | None = None
    self.best_valid: dict[str, float] = {}
    self.test: dict[str, float] = {}
    self.stop_reason: str | None = None

  @property
  def active(self) -> bool:
    """Whether the seed still trains."""
    return self.stop_reason is None

  def record(self, epoch: int, loss: float, valid: Mapping[str, float]) -> bool:
    """Record one epoch's mean loss and validation metrics and return whether it improved.

    The caller then stores the test metrics of an improving epoch with `set_test`.
    """
    if not self.active:
      raise RuntimeError(f"seed {self.seed} already stopped: {self.stop_reason}")
    if not math.isfinite(loss):
      self.stop_reason = (f"non-finite loss {loss} at epoch {epoch}; kept the best state"
                          f" (epoch {self.best_epoch})")
      logger.error("%s seed %d stopped: non-finite loss %s at epoch %d; keeping its best"
                   " results (epoch %s)", self.label, self.seed, loss, epoch, self.best_epoch)
      return False

    self.epochs.append(epoch)
    self.losses.append(loss)
    self.valid.append(dict(valid))
    improved = self.stopping.update(valid[self.valid_metric])
    if improved:
      self.best_epoch = epoch
      self.best_valid = dict(valid)
    if self.stopping.should_stop:
      self.stop_reason = f"early stopping: no improvement for {self.patience + 1} evaluations"
    return improved

  def set_test(self, test: Mapping[str, float]) -> None:
    self.test = dict(test)

  def finish(self, max_epochs: int) -> None:
    """Mark a seed that is still active as having run out of epochs."""
    if self.stop_reason is None:
      self.stop_reason = f"reached {max_epochs} epochs"

  @classmethod
  def from_fit(cls, result: TrainResult) -> SeedRun:
    """Build the record of a run trained by `models.train.fit`."""
    config = result.config
    run = cls(config.seed, valid_metric=config.valid_metric, patience=config.patience)
    for record in result.history:
      run.epochs.append(record.epoch)
      run.losses.append(record.loss)
      run.valid.append(dict(record.valid))
    run.best_epoch = result.best_epoch
    run.best_valid = dict(result.best_valid)
    run.test = dict(result.test)
    run.stop_reason = result.stop_reason
    return run

  def to_dict(self) -> dict[str, Any]:
    history = {"epoch": list(self.epochs), "loss": list(self.losses),
               f"valid_{PLOT_METRIC}": [valid[PLOT_METRIC] for valid in self.valid]}
    if self.valid_metric != PLOT_METRIC:
      history[f"valid_{self.valid_metric}"] = [valid[self.valid_metric] for valid in self.valid]
    return {
        "seed": self.seed,
        "best_epoch": self.best_epoch,
        "best_valid": self.best_valid,
        "test": self.test,
        "stop_reason": self.stop_reason,
        "epochs_run": len(self.epochs),
        "history": history,
    }


@dataclasses.dataclass
class ArmRun:
  """All seeds of one arm and the time they took."""

  config: TrainConfig
  seed_mode: str
  runs: list[SeedRun]
  wall_seconds: float
  compile_seconds: float
  train_seconds: float

  def summary(self) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation of each summary test metric over seeds."""
    result = {}
    for metric in SUMMARY_METRICS:
      summary = stats.summarize([run.test.get(metric, math.nan) for run in self.runs])
      result[metric] = summary._asdict()
    return result

  def to_dict(self) -> dict[str, Any]:
    config = self.config.to_dict()
    del config["seed"]  # each seed is listed with its results
    return {
        "config": config,
        "seed_mode": self.seed_mode,
        "wall_seconds": self.wall_seconds,
        "compile_seconds": self.compile_seconds,
        "train_seconds": self.train_seconds,
        "epochs_run": max((len(run.epochs) for run in self.runs), default=0),
        "summary": self.summary(),
        "seeds": [run.to_dict() for run in self.runs],
    }


def _stack(trees: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _seed_values(metrics: Mapping[str, np.ndarray], index: int) -> dict[str, float]:
  return {name: float(values[index]) for name, values in metrics.items()}


def train_seeds_vmap(program: TrainingProgram, seeds: Sequence[int], *, progress: bool = True,
                     label: str = "") -> ArmRun:
  """Train ``seeds`` together as one vmapped program, each seed with its own stopping.

  Every seed trains until all seeds have stopped or ``config.epochs`` is reached. A seed
  that stopped keeps training in the batch, but its recorded results no longer change,
  so the results match those of `train_seeds_loop` up to float rounding, because the
  vmapped kernels may sum in another order.

  Args:
    program: the compiled functions of one dataset and arm configuration.
    seeds: the seeds to train; equal seeds give equal results.
    progress: show a progress bar over epochs.
    label: name of the arm in logs and on the progress bar.

  Returns:
    An `ArmRun` holding one `SeedRun` per seed, in the order of ``seeds``.
  """
  start = time.perf_counter()
  config = program.config
  seeds = list(seeds)
  state = _stack([program.init(seed) for seed in seeds])
  runs = [SeedRun(seed, valid_metric=config.valid_metric, patience=config.patience, label=label)
          for seed in seeds]

  def epoch_keys(epoch: int) -> jax.Array:
    return jnp.stack([program.epoch_key(seed, epoch) for seed in seeds])

  compile_start = time.perf_counter()
  train_epoch = jax.jit(jax.vmap(program.run_epoch, in_axes=(0, 0, None)))
  train_epoch = train_epoch.lower(state, epoch_keys(0), program.data).compile()
  evaluate = {}
  for split in ("valid", "test"):
    split_metrics = functools.partial(program.evaluate_metrics, split=split)
    evaluate[split] = (jax.jit(jax.vmap(split_metrics, in_axes=(0, None)))
                       .lower(state.params, program.data).compile())
  compile_seconds = time.perf_counter() - compile_start

  train_seconds = 0.0
  bar = tqdm(range(config.epochs), desc=label, disable=None if progress else True, unit="epoch")
  for epoch in bar:
    active = [run.active for run in runs]
    if not any(active):
      break

    train_start = time.perf_counter()
    state, losses = train_epoch(state, epoch_keys(epoch), program.data)
    losses = np.asarray(jax.device_get(losses))
    train_seconds += time.perf_counter() - train_start
    valid = jax.device_get(evaluate["valid"](state.params, program.data))

    improved = [
        is_active and run.record(epoch, float(losses[index]), _seed_values(valid, index))
        for index, (run, is_active) in enumerate(zip(runs, active))
    ]
    if any(improved):
      test = jax.device_get(evaluate["test"](state.params, program.data))
      for index, run in enumerate(runs):
        if improved[index]:
          run.set_test(_seed_values(test, index))

    _log_epoch(label, epoch, runs, active, losses, valid, config.valid_metric, bar)

  bar.close()
  for run in runs:
    run.finish(config.epochs)
  return ArmRun(config, "vmap", runs, time.perf_counter() - start, compile_seconds,
                train_seconds)


def _log_epoch(label: str, epoch: int, runs: Sequence[SeedRun], active: Sequence[bool],
               losses: np.ndarray, valid: Mapping[str, np.ndarray], metric: str,
               bar: Any) -> None:
  trained = [index for index, is_active in enumerate(active) if is_active]
  loss_text = ", ".join(f"{runs[i].seed}: {losses[i]:.5f}" for i in trained)
  valid_text = ", ".join(f"{runs[i].seed}: {valid[metric][i]:.4f}" for i in trained)
  logger.info("%s epoch %d, %d of %d seeds training; loss by seed {%s}; valid %s by seed"
              " {%s}", label, epoch, len(trained), len(runs), loss_text, metric, valid_text)
  still_active = sum(run.active for run in runs)
  bar.set_postfix(seeds=f"{still_active}/{len(runs)}",
                  loss=f"{stats.summarize(losses[trained]).mean:.4f}",
                  **{metric: f"{stats.summarize(valid[metric][trained]).mean:.4f}"})


def train_seeds_loop(program: TrainingProgram, seeds: Sequence[int], *, progress: bool = True,
                     label: str = "") -> ArmRun:
  """Train ``seeds`` one after another with `models.train.fit`, sharing ``program``."""
  start = time.perf_counter()
  runs, compile_seconds, train_seconds = [], 0.0, 0.0
  for seed in tqdm(list(seeds), desc=label, disable=None if progress else True, unit="seed"):
    config = dataclasses.replace(program.config, seed=seed)
    result = fit(program.dataset, config, progress=False, program=program)
    runs.append(SeedRun.from_fit(result))
    compile_seconds += result.compile_seconds
    train_seconds += sum(record.train_seconds for record in result.history)
    # fit names the epoch of a non-finite loss in its stop reason, but not the seed.
    level = logging.ERROR if result.stop_reason.startswith("non-finite") else logging.INFO
    logger.log(level, "%s seed %d stopped: %s; best epoch %s, valid %s %s", label, seed,
               result.stop_reason, result.best_epoch, config.valid_metric,
               result.best_valid.get(config.valid_metric))
  return ArmRun(program.config, "loop", runs, time.perf_counter() - start, compile_seconds,
                train_seconds)


def train_arm(dataset: Dataset, config: TrainConfig, seeds: Sequence[int], *,
              seed_mode: str = "vmap", progress: bool = True, label: str = "") -> ArmRun:
  """Train one arm on every seed; ``config.seed`` is ignored."""
  if seed_mode not in SEED_MODES:
    raise ValueError(f"invalid seed_mode {seed_mode!r}; expected one of {SEED_MODES}")
  if not seeds:
    raise ValueError("no seeds given; pass at least one seed")
  start = time.perf_counter()
  program = TrainingProgram(dataset, config)
  train = train_seeds_vmap if seed_mode == "vmap" else train_seeds_loop
  arm = train(program, seeds, progress=progress, label=label)
  arm.wall_seconds = time.perf_counter() - start
  return arm


def compare_arms(dataset: Dataset, configs: Mapping[str, TrainConfig], seeds: Sequence[int], *,
                 seed_mode: str = "vmap", progress: bool = True,
                 confidence: float = 0.95) -> dict[str, Any]:
  """Train every arm of one model on ``seeds`` and compare each MG arm with ``plain``.

  Args:
    dataset: the data every arm trains on.
    configs: arm name -> configuration; the arm named ``plain`` is the control.
    seeds: the seeds every arm trains.
    seed_mode: ``"vmap"`` trains an arm's seeds together, ``"loop"`` one after another.
    progress: show progress bars.
    confidence: coverage of the t-intervals of the paired differences.

  Returns:
    ``{"arms": {arm: ArmRun.to_dict()}, "differences": {arm: {metric: {...}}}}``; the
    differences are those of the test metrics, arm minus ``plain``, and are empty without
    a ``plain`` arm.
  """
  arms = {}
  for name, config in configs.items():
    label = f"{config.model} {name}"
    logger.info("training %s on %d seeds (%s)", label, len(seeds), seed_mode)
    arms[name] = train_arm(dataset, config, seeds, seed_mode=seed_mode, progress=progress,
                           label=label).to_dict()

  differences = {}
  if CONTROL_ARM not in arms:
    logger.warning("no %r arm: reporting no paired differences", CONTROL_ARM)
  else:
    control = arms[CONTROL_ARM]["seeds"]
    for name, arm in arms.items():
      if name == CONTROL_ARM:
        continue
      differences[name] = {}
      for metric in SUMMARY_METRICS:
        difference = stats.paired_difference(
            [run["test"].get(metric, math.nan) for run in arm["seeds"]],
            [run["test"].get(metric, math.nan) for run in control],
            confidence)
        differences[name][metric] = {**difference._asdict(),
                                     "win_fraction": difference.win_fraction}
  return {"arms": arms, "differences": differences}


def _format_value(value: float | None, digits: int = 4, *, sign: bool = False) -> str:
  if value is None or not math.isfinite(value):
    return "n/a"
  return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _arm_table(model_report: Mapping[str, Any]) -> list[str]:
  header = (["arm"] + [f"test {metric}" for metric in SUMMARY_METRICS]
            + ["best epoch (min-max)", "epochs run", "wall s", "compile s"])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, arm in model_report["arms"].items():
    cells = [name]
    for metric in SUMMARY_METRICS:
      summary = arm["summary"][metric]
      cells.append(f"{_format_value(summary['mean'])} ± {_format_value(summary['std'])}")
    best_epochs = [run["best_epoch"] for run in arm["seeds"] if run["best_epoch"] is not None]
    if best_epochs:
      cells.append(f"{np.mean(best_epochs):.1f} ({min(best_epochs)}-{max(best_epochs)})")
    else:
      cells.append("n/a")
    cells += [str(arm["epochs_run"]), f"{arm['wall_seconds']:.1f}",
              f"{arm['compile_seconds']:.1f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _difference_table(model_report: Mapping[str, Any]) -> list[str]:
  header = [f"arm - {CONTROL_ARM}"] + list(SUMMARY_METRICS)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, metrics in model_report["differences"].items():
    cells = [name]
    for metric in SUMMARY_METRICS:
      difference = metrics[metric]
      cells.append(f"{_format_value(difference['mean'], sign=True)}"
                   f" [{_format_value(difference['low'], sign=True)},"
                   f" {_format_value(difference['high'], sign=True)}],"
                   f" wins {difference['wins']}/{difference['count']}")
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _seed_table(model_report: Mapping[str, Any]) -> list[str]:
  arms = model_report["arms"]
  header = ["seed"] + [f"{name}: test {PLOT_METRIC} (best epoch)" for name in arms]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  seed_lists = [arm["seeds"] for arm in arms.values()]
  for rows in zip(*seed_lists):
    cells = [str(rows[0]["seed"])]
    for run in rows:
      best_epoch = "none" if run["best_epoch"] is None else run["best_epoch"]
      cells.append(f"{_format_value(run['test'].get(PLOT_METRIC))} ({best_epoch})")
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def format_markdown(report: Mapping[str, Any]) -> str:
  """Render a comparison report (the content of compare.json) as Markdown tables."""
  seeds = report["seeds"]
  jax_info = report["jax"]
  dataset = report["dataset"]
  confidence = report["confidence"]
  lines = [
      f"# Mirror Gradient comparison on {dataset.get('name', 'dataset')}",
      "",
      f"Command: `{report['command']}`",
      "",
      f"Seeds: {', '.join(str(seed) for seed in seeds)} ({len(seeds)}, trained with"
      f" --seed-mode {report['seed_mode']}). JAX {jax_info['version']} on"
      f" {jax_info['backend']} ({', '.join(jax_info['devices'])}); {report['date']}.",
  ]
  for model, model_report in report["models"].items():
    config = next(iter(model_report["arms"].values()))["config"]
    lines += [
        "",
        f"## {model}",
        "",
        f"Optimizer {config['optimizer']}, learning rate {config['learning_rate']}, batch"
        f" {config['batch_size']}, at most {config['epochs']} epochs, early stopping on"
        f" validation {config['valid_metric']} with patience {config['patience']}. MG:"
        f" interval {config['interval']}, descent scale {config['descent_scale']}, ascent"
        f" scale {config['ascent_scale']}. Model options: {config['model_options'] or 'defaults'}.",
        "",
        *_arm_table(model_report),
        "",
        f"Test metrics at each seed's best validation epoch: mean ± standard deviation"
        f" (ddof=1) over seeds. Wall time includes compilation; in vmap mode all seeds of an"
        f" arm train together.",
    ]
    if model_report["differences"]:
      lines += [
          "",
          *_difference_table(model_report),
          "",
          f"Paired per-seed difference of the test metric (arm minus {CONTROL_ARM}): mean"
          f" [{confidence:.0%} t-interval], and the seeds where the arm's value is strictly"
          f" greater.",
      ]
    lines += ["", *_seed_table(model_report)]
  lines += ["", "Validation curves: valid_recall.png."]
  return "\n".join(lines) + "\n"


def _valid_curves(arm: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                    np.ndarray]:
  """Return epochs and the mean, min and max over the seeds that ran each epoch."""
  by_epoch: dict[int, list[float]] = {}
  for run in arm["seeds"]:
    history = run["history"]
    for epoch, value in zip(history["epoch"], history[f"valid_{PLOT_METRIC}"]):
      by_epoch.setdefault(epoch, []).append(value)
  epochs = np.array(sorted(by_epoch))
  values = [np.asarray(by_epoch[epoch], dtype=np.float64) for epoch in epochs]
  return (epochs, np.array([v.mean() for v in values]), np.array([v.min() for v in values]),
          np.array([v.max() for v in values]))


def plot_valid_recall(report: Mapping[str, Any], path: Path) -> None:
  """Plot validation Recall@20 per epoch for every model and arm into ``path`` (PNG)."""
  # The Agg canvas is used directly, so the caller's pyplot backend stays as it is.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  models = list(report["models"])
  figure = Figure(figsize=(max(6.5, 5.5 * len(models)), 4.8), layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.subplots(1, len(models), squeeze=False)[0]
  for ax, model in zip(axes, models):
    for name, arm in report["models"][model]["arms"].items():
      epochs, mean, low, high = _valid_curves(arm)
      if not epochs.size:
        continue
      line, = ax.plot(epochs, mean, label=f"{name} (mean of {len(arm['seeds'])} seeds)")
      ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2)
    ax.set_title(model)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {PLOT_METRIC}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize="small")
  figure.suptitle("Line: mean over the seeds still training at that epoch. Band: their"
                  " min-max.\nA seed that stopped early is left out from then on.",
                  fontsize="small")
  figure.savefig(path, dpi=120)


def _json_ready(value: Any) -> Any:
  """Replace NaN and infinities, which JSON lacks, by None, and paths by strings."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, Mapping):
    return {str(key): _json_ready(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_ready(item) for item in value]
  if isinstance(value, Path):
    return str(value)
  if isinstance(value, np.generic):
    return _json_ready(value.item())
  return value


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.compare",
      description="Train plain and Mirror Gradient arms on the same seeds and compare their"
                  " test metrics seed by seed.")
  add_model_arguments(parser, multiple=True)
  add_data_arguments(parser)
  add_training_arguments(parser)
  # Each MG arm sets its own placement; None marks an --mg-placement given by mistake.
  parser.set_defaults(mg_placement=None)
  parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=["plain", "mg-gradient"],
                      help="arms to train: plain, mg-gradient (MG scales the gradients before"
                           " the optimizer, as the reference does), mg-update (MG scales the"
                           " optimizer's updates); each MG arm is compared with plain"
                           " (default: plain mg-gradient)")
  parser.add_argument("--seeds", type=positive_int,
                      help="number of seeds, counted up from --first-seed (default 5)")
  parser.add_argument("--first-seed", type=int, help="first seed (default 999)")
  parser.add_argument("--seed-list", type=int, nargs="+", metavar="SEED",
                      help="explicit distinct seeds, in place of --seeds and --first-seed")
  parser.add_argument("--seed-mode", choices=SEED_MODES, default="vmap",
                      help="vmap: train an arm's seeds together (memory grows with the seed"
                           " count); loop: one seed after another (default: vmap)")
  parser.add_argument("--confidence", type=float, default=0.95,
                      help="coverage of the t-interval of each paired difference"
                           " (default 0.95)")
  parser.add_argument("--out", type=Path,
                      help="output folder (default: runs/compare-<dataset>-<models>)")
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
  return parser


def _parse_seeds(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[int]:
  if args.seed_list is not None:
    if args.seeds is not None or args.first_seed is not None:
      parser.error("argument --seed-list: not allowed with --seeds or --first-seed")
    if len(set(args.seed_list)) != len(args.seed_list):
      parser.error(f"argument --seed-list: seeds must be distinct, got {args.seed_list}")
    return list(args.seed_list)
  count = 5 if args.seeds is None else args.seeds
  first = 999 if args.first_seed is None else args.first_seed
  return list(range(first, first + count))


def _check_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
  if args.mg_placement is not None:
    parser.error("argument --mg-placement: each arm sets its own placement; choose"
                 " --arms mg-gradient and/or mg-update")
  if len(set(args.arms)) != len(args.arms):
    parser.error(f"argument --arms: arms must be distinct, got {args.arms}")
  if len(set(args.models)) != len(args.models):
    parser.error(f"argument --models: models must be distinct, got {args.models}")
  if not 0 < args.confidence < 1:
    parser.error(f"argument --confidence: expected a number in (0, 1), got {args.confidence}")


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  args = parser.parse_args(argv)
  configure_logging(args.log_level)
  _check_arguments(args, parser)
  seeds = _parse_seeds(args, parser)

  dataset = load_data(args, parser)
  configs = {}
  try:
    for model in args.models:
      configs[model] = {
          arm: make_config(args, model, mg=ARMS[arm][0], seed=seeds[0], placement=ARMS[arm][1])
          for arm in args.arms
      }
  except ValueError as error:
    parser.error(str(error))

  out = args.out or Path("runs") / f"compare-{dataset.name}-{'-'.join(args.models)}"
  out.mkdir(parents=True, exist_ok=True)
  report: dict[str, Any] = {
      "command": shlex.join(["python", "-m", "benchmarks.compare", *argv]),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "jax": {"version": jax.__version__, "backend": jax.default_backend(),
              "devices": [str(device) for device in jax.devices()]},
      "options": vars(args),
      "dataset": dataset.stats(),
      "seeds": seeds,
      "seed_mode": args.seed_mode,
      "arms": list(args.arms),
      "confidence": args.confidence,
      "models": {},
  }
  for model in args.models:
    report["models"][model] = compare_arms(
        dataset, configs[model], seeds, seed_mode=args.seed_mode,
        progress=not args.no_progress, confidence=args.confidence)

  json_path, markdown_path, plot_path = (out / "compare.json", out / "compare.md",
                                         out / "valid_recall.png")
  json_path.write_text(json.dumps(_json_ready(report), indent=2))
  markdown = format_markdown(report)
  markdown_path.write_text(markdown)
  plot_valid_recall(report, plot_path)
  print(markdown)
  print(f"wrote {json_path}, {markdown_path} and {plot_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
