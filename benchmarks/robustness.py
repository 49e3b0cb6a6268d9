"""Robustness of plain and Mirror Gradient training to item-feature perturbations.

Examples:
  python -m benchmarks.robustness --models vbpr --seeds 2 --epochs 3    # synthetic data
  python -m benchmarks.robustness --data-dir ../shared/data/tiktok --models vbpr freedom
  python -m benchmarks.robustness --data-dir ../shared/data/tiktok \\
      --from-runs runs/vbpr-tiktok-plain-seed999 runs/vbpr-tiktok-mg-gradient-seed999

For every model, arm (plain, mg-gradient, mg-update) and seed, the program trains with
`models.train.fit`, or restores the best checkpoint of a `benchmarks.train` run, and keeps
the parameters of the best validation epoch. It then ranks the test split with the clean
item features and with each perturbation of `benchmarks.perturb`: Gaussian noise, rows
replaced by other items' rows, and rows set to 0, per modality and on all modalities.
Perturbations are applied at inference only and are identical across arms for a seed.
The relative drop of a metric is ``(clean - perturbed) / clean``, so a positive drop
means the perturbation hurt.

A flatness report (`optax_mg.flatness_report`: Hessian trace, top Hessian eigenvalue and
sharpness) of each trained state is computed on the training loss over a fixed set of
training batches, on the full user-item graph.

Writes ``robustness.json`` (every per-run number plus the summaries), ``robustness.md``
(tables per model and metric, and a flatness table) and ``robustness.png`` (relative drop
against perturbation strength) into ``--out``, and prints the Markdown. Summaries give the
mean over seeds with a 95% Student-t interval, and the MG-minus-plain difference of
relative drops paired by seed.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import optax_mg
from benchmarks import stats
from benchmarks.perturb import (ALL_MODALITIES, FAMILIES, FRACTIONS, NOISE_SCALES, Perturbation,
                                perturb_features, standard_perturbations)
from benchmarks.train import (add_data_arguments, add_model_arguments, add_training_arguments,
                              configure_logging, load_data, make_config, non_negative_int,
                              positive_float,
                              positive_int)
from models.data import Dataset
from models.sampling import Batch, epoch_batches
from models.train import EVALUATION_KS, METRIC_NAMES, TrainConfig, TrainingProgram, fit

logger = logging.getLogger(__name__)

ARMS = ("plain", "mg-gradient", "mg-update")
BASELINE_ARM = "plain"
DEFAULT_METRICS = ("recall@20", "ndcg@20")
UNAFFECTED_NOTE = "unaffected: model uses no item features"
CONFIDENCE = 0.95
FLATNESS_KEYS = ("loss", "hessian_trace", "top_hessian_eigenvalue", "sharpness",
                 "relative_sharpness")


def arm_settings(arm: str) -> tuple[bool, str]:
  """Return (mg, placement) of an arm name; the plain arm's placement is unused."""
  if arm == BASELINE_ARM:
    return False, "gradient"
  if arm in ARMS:
    return True, arm.removeprefix("mg-")
  raise ValueError(f"invalid arm {arm!r}; expected one of {ARMS}")


def arm_name(config: TrainConfig) -> str:
  return f"mg-{config.placement}" if config.mg else BASELINE_ARM


@dataclasses.dataclass
class TrainedRun:
  """The best-validation parameters of one (model, arm, seed) run."""

  model: str
  arm: str
  seed: int
  params: Any = dataclasses.field(repr=False)
  program: TrainingProgram = dataclasses.field(repr=False)
  best_epoch: int | None
  epochs_run: int | None
  stop_reason: str
  source: str  # "trained here", or the benchmarks.train folder it was loaded from


# ----------------------------------------------------------------------------------------
# Inference with replaced item features


def with_item_features(program: TrainingProgram, params: Any,
                       features: Mapping[str, np.ndarray]) -> tuple[Any, Any]:
  """Return (params, ProgramData) of the model with ``features`` as its item features.

  The model's own `set_item_features` decides what changes: VBPR swaps its constant
  feature matrix, and FREEDOM rebuilds its kNN item graph (a constant) and overwrites its
  trainable feature tables, which the returned params then hold.
  """
  # ``program.model`` merges without copying, so set_item_features on that model would
  # overwrite the program's constants and the caller's parameters in place.
  model = nnx.merge(program.graphdef, params, program.data.constants, copy=True)
  model.set_item_features(features)
  _, new_params, new_constants = nnx.split(model, nnx.Param, ...)
  return new_params, program.data._replace(constants=new_constants)


def evaluate_with_features(program: TrainingProgram, params: Any,
                           features: Mapping[str, np.ndarray],
                           split: str = "test") -> dict[str, float]:
  """Rank ``split`` with ``features`` in place of the training features."""
  new_params, data = with_item_features(program, params, features)
  return program.evaluate(new_params, split, data=data)


# ----------------------------------------------------------------------------------------
# Flatness of the trained parameters


@dataclasses.dataclass(frozen=True)
class FlatnessSettings:
  """Settings of the flatness report, recorded in the outputs."""

  num_batches: int = 4
  batch_size: int = 2048
  batch_seed: int = 0
  key_seed: int = 0
  num_probes: int = 20
  num_iterations: int = 20
  rho: float = 0.05
  num_steps: int = 10

  def describe(self, batches_used: int | None = None) -> str:
    batches = self.num_batches if batches_used is None else batches_used
    return (f"training loss (mean over {batches} fixed training batches of {self.batch_size}"
            f" rows, the first batches of epoch_batches with key {self.batch_seed}, full"
            f" user-item graph); Hessian trace from {self.num_probes} Rademacher probes,"
            f" top eigenvalue from at most {self.num_iterations} power iterations,"
            f" sharpness in an L2 ball of radius rho={self.rho:g} ({self.num_steps} ascent"
            f" steps); diagnostic key {self.key_seed}, the same for every run")


class FlatnessProbe:
  """Flatness report of parameters of one model, on a fixed set of training batches.

  One probe serves every arm and seed of a model. They share the batches and the PRNG
  key of the diagnostics, which pairs the estimates across arms. They also share the loss
  function object, a static argument of the compiled diagnostics, so those compile once.
  """

  def __init__(self, program: TrainingProgram, settings: FlatnessSettings):
    self.settings = settings
    data = program.data
    batches = epoch_batches(jax.random.key(settings.batch_seed), data.train_users,
                            data.train_items, data.sampler, settings.batch_size)
    self.num_batches = min(settings.num_batches, batches.users.shape[0])
    self.batches = Batch(*(field[: self.num_batches] for field in batches))
    self.constants = data.constants
    graphdef = program.graphdef

    def loss_fn(params, inputs):
      # The constants travel with the batches, as an argument: closed over, they would
      # be embedded in the compiled program as literals.
      batches, constants = inputs

      def batch_loss(batch):
        return nnx.merge(graphdef, params, constants).loss(batch, None)

      return jnp.mean(jax.vmap(batch_loss)(batches))

    self.loss_fn = loss_fn

  def __call__(self, params: Any) -> dict[str, float]:
    settings = self.settings
    return optax_mg.flatness_report(
        self.loss_fn, params, (self.batches, self.constants), jax.random.key(settings.key_seed),
        num_probes=settings.num_probes, num_iterations=settings.num_iterations,
        rho=settings.rho, num_steps=settings.num_steps)


# ----------------------------------------------------------------------------------------
# Statistics


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, float]:
  """Return the mean and the half-width of its Student-t confidence interval.

  NaN values are left out, and ``n`` counts the values used. The half-width is NaN
  for fewer than 2 values.
  """
  values = [math.nan if value is None else value for value in values]
  summary = stats.summarize(values)
  low, high = stats.t_interval(values, confidence)
  return {"mean": summary.mean, "half_width": (high - low) / 2, "n": summary.count}


def relative_drop(clean: float, perturbed: float) -> float:
  """Return ``(clean - perturbed) / clean``; NaN when the clean metric is 0."""
  return (clean - perturbed) / clean if clean != 0 else math.nan


# ----------------------------------------------------------------------------------------
# Obtaining trained runs


def train_runs(dataset: Dataset, args: argparse.Namespace, models: Sequence[str],
               arms: Sequence[str], seeds: Sequence[int]) -> list[TrainedRun]:
  """Train every (model, arm, seed) with `fit`; one compiled program per (model, arm)."""
  runs = []
  for model in models:
    for arm in arms:
      mg, placement = arm_settings(arm)
      configs = [make_config(args, model, mg=mg, seed=seed, placement=placement)
                 for seed in seeds]
      program = TrainingProgram(dataset, configs[0])
      for config in configs:
        logger.info("training %s, %s, seed %d", model, arm, config.seed)
        result = fit(dataset, config, program=program, progress=not args.no_progress)
        runs.append(TrainedRun(model, arm, config.seed, result.best_params, program,
                               result.best_epoch, len(result.history), result.stop_reason,
                               "trained here"))
  return runs


# Options that change what a TrainingProgram computes; runs sharing a (model, arm) must
# agree on them to share a program and to be summarised together.
_PROGRAM_FIELDS = ("model_options", "optimizer", "learning_rate", "weight_decay", "mg",
                   "interval", "descent_scale", "ascent_scale", "placement", "batch_size",
                   "eval_chunk_size")


def load_runs(directories: Sequence[Path], dataset: Dataset) -> list[TrainedRun]:
  """Restore the best checkpoints of `benchmarks.train` output folders.

  Raises:
    ValueError: naming the file and field when a folder lacks results.json or its best
      checkpoint, was trained on another dataset, repeats a (model, arm, seed), or
      disagrees with other runs of its (model, arm) on a training option.
  """
  import orbax.checkpoint as ocp  # Imported here: only --from-runs needs it.

  entries = []
  for directory in directories:
    results_path = Path(directory) / "results.json"
    if not results_path.is_file():
      raise ValueError(f"{results_path}: not found; expected the --out folder of"
                       " python -m benchmarks.train")
    results = json.loads(results_path.read_text())
    try:
      config = TrainConfig(**results["config"])
    except (KeyError, TypeError, ValueError) as error:
      raise ValueError(f"{results_path}: invalid field 'config': {error}") from None
    _check_same_dataset(results_path, results.get("dataset", {}), dataset)
    checkpoint = (Path(directory) / "checkpoints" / "best").resolve()
    if not checkpoint.exists():
      raise ValueError(f"{checkpoint}: not found; the run saved no best state (field"
                       f" 'best_epoch' is {results.get('best_epoch')!r})")
    entries.append((config, results, checkpoint))

  groups = collections.defaultdict(list)
  for entry in entries:
    config = entry[0]
    groups[(config.model, arm_name(config))].append(entry)

  checkpointer = ocp.StandardCheckpointer()
  runs = []
  for (model, arm), members in groups.items():
    first = members[0][0]
    seen_seeds = set()
    for config, _, checkpoint in members:
      if config.seed in seen_seeds:
        raise ValueError(f"{checkpoint.parent.parent}: a second run of {model}, {arm},"
                         f" seed {config.seed}")
      seen_seeds.add(config.seed)
      for field in _PROGRAM_FIELDS:
        if getattr(config, field) != getattr(first, field):
          raise ValueError(
              f"{checkpoint.parent.parent / 'results.json'}: field 'config.{field}' is"
              f" {getattr(config, field)!r}, but another {model} {arm} run has"
              f" {getattr(first, field)!r}; runs of one arm must share their options")
    program = TrainingProgram(dataset, first)
    for config, results, checkpoint in members:
      template = program.init(config.seed)
      target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            {"params": template.params, "opt_state": template.opt_state})
      restored = checkpointer.restore(checkpoint, target)
      runs.append(TrainedRun(model, arm, config.seed, restored["params"], program,
                             results.get("best_epoch"), results.get("epochs_run"),
                             results.get("stop_reason", ""), str(checkpoint.parent.parent)))
  return runs


def _check_same_dataset(path: Path, stats: Mapping[str, Any], dataset: Dataset) -> None:
  expected = {"name": dataset.name, "users": dataset.num_users, "items": dataset.num_items}
  for field, value in expected.items():
    if field in stats and stats[field] != value:
      raise ValueError(f"{path}: field 'dataset.{field}' is {stats[field]!r}, but the loaded"
                       f" dataset has {value!r}; pass the dataset the run was trained on")


# ----------------------------------------------------------------------------------------
# Measuring


def measure_model(dataset: Dataset, runs: Sequence[TrainedRun],
                  perturbations: Sequence[Perturbation], metrics: Sequence[str],
                  flatness: FlatnessSettings | None, *, progress: bool) -> dict[str, Any]:
  """Evaluate one model's runs clean and perturbed; return its per-run records."""
  program = runs[0].program
  uses_features = program.uses_features
  records = {id(run): {"arm": run.arm, "seed": run.seed, "best_epoch": run.best_epoch,
                       "epochs_run": run.epochs_run, "stop_reason": run.stop_reason,
                       "source": run.source, "perturbed": {}, "relative_drop": {}}
             for run in runs}

  for run in runs:
    clean = run.program.evaluate(run.params, "test")
    records[id(run)]["clean"] = {metric: clean[metric] for metric in metrics}

  runs_by_seed = collections.defaultdict(list)
  for run in runs:
    runs_by_seed[run.seed].append(run)
  tasks = [(seed, perturbation) for seed in sorted(runs_by_seed) for perturbation in perturbations]
  for seed, perturbation in tqdm(tasks, desc=f"{runs[0].model} perturbations", unit="perturbation",
                                 disable=None if progress else True):
    # Drawn once per (seed, perturbation), so every arm of this seed gets the same features.
    features = perturb_features(dataset.features, perturbation, seed) if uses_features else None
    for run in runs_by_seed[seed]:
      record = records[id(run)]
      if uses_features:
        values = evaluate_with_features(run.program, run.params, features)
        perturbed = {metric: values[metric] for metric in metrics}
      else:
        perturbed = dict(record["clean"])
      record["perturbed"][perturbation.name] = perturbed
      record["relative_drop"][perturbation.name] = {
          metric: relative_drop(record["clean"][metric], perturbed[metric]) for metric in metrics}

  batches_used = None
  if flatness is not None:
    probe = FlatnessProbe(program, flatness)
    batches_used = probe.num_batches
    for run in tqdm(runs, desc=f"{runs[0].model} flatness", unit="run", disable=None if progress else True):
      records[id(run)]["flatness"] = probe(run.params)

  result = {
      "uses_features": uses_features,
      "unaffected": not uses_features,
      "note": None if uses_features else UNAFFECTED_NOTE,
      # The training configuration of each arm; its seed is that of the arm's first run.
      "configs": {run.arm: run.program.config.to_dict() for run in reversed(runs)},
      "runs": [records[id(run)] for run in runs],
  }
  if flatness is not None:
    result["flatness_settings"] = {**dataclasses.asdict(flatness), "batches_used": batches_used,
                                   "description": flatness.describe(batches_used)}
  result.update(summarize_model(result["runs"], perturbations, metrics))
  return result


def summarize_model(records: Sequence[Mapping[str, Any]], perturbations: Sequence[Perturbation],
                    metrics: Sequence[str]) -> dict[str, Any]:
  """Summarise the runs of one model over seeds, per arm and paired against plain."""
  by_arm = collections.defaultdict(dict)
  for record in records:
    by_arm[record["arm"]][record["seed"]] = record
  arms = [arm for arm in ARMS if arm in by_arm]
  compared = [arm for arm in arms if arm != BASELINE_ARM] if BASELINE_ARM in by_arm else []

  def paired(arm, extract):
    seeds = sorted(set(by_arm[arm]) & set(by_arm[BASELINE_ARM]))
    return [extract(by_arm[arm][seed]) - extract(by_arm[BASELINE_ARM][seed]) for seed in seeds]

  clean = {arm: {metric: t_interval([r["clean"][metric] for r in by_arm[arm].values()])
                 for metric in metrics} for arm in arms}
  perturbed = {}
  differences = {}
  for perturbation in perturbations:
    name = perturbation.name
    perturbed[name] = {
        arm: {metric: {
            "perturbed": t_interval([r["perturbed"][name][metric] for r in by_arm[arm].values()]),
            "relative_drop": t_interval(
                [r["relative_drop"][name][metric] for r in by_arm[arm].values()]),
        } for metric in metrics}
        for arm in arms}
    differences[name] = {
        f"{arm} - {BASELINE_ARM}": {
            metric: t_interval(paired(arm, lambda r, m=metric: r["relative_drop"][name][m]))
            for metric in metrics}
        for arm in compared}

  summary = {"clean_summary": clean, "perturbed_summary": perturbed,
             "drop_difference": differences}
  if records and "flatness" in records[0]:
    summary["flatness_summary"] = {
        arm: {key: t_interval([r["flatness"][key] for r in by_arm[arm].values()])
              for key in FLATNESS_KEYS} for arm in arms}
    summary["flatness_difference"] = {
        f"{arm} - {BASELINE_ARM}": {
            key: t_interval(paired(arm, lambda r, k=key: r["flatness"][k]))
            for key in FLATNESS_KEYS}
        for arm in compared}
  return summary


# ----------------------------------------------------------------------------------------
# Reports


def _number(value: float, digits: int = 4) -> str:
  return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _interval(summary: Mapping[str, float], *, percent: bool = False, digits: int = 4) -> str:
  scale = 100.0 if percent else 1.0
  unit = "%" if percent else ""
  mean, half_width = summary["mean"], summary["half_width"]
  if not math.isfinite(mean):
    return "n/a"
  text = f"{mean * scale:.{1 if percent else digits}f}{unit}"
  if math.isfinite(half_width):
    text += f" ± {half_width * scale:.{1 if percent else digits}f}"
  return text


def _scientific(summary: Mapping[str, float]) -> str:
  mean, half_width = summary["mean"], summary["half_width"]
  if not math.isfinite(mean):
    return "n/a"
  text = f"{mean:.4g}"
  if math.isfinite(half_width):
    text += f" ± {half_width:.2g}"
  return text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return lines


def format_markdown(report: Mapping[str, Any]) -> str:
  """Render the report as Markdown tables: per model and metric, then flatness."""
  seeds = report["seeds"]
  lines = [
      f"# Robustness to item-feature perturbations: {report['dataset']['name']}",
      "",
      f"Arms: {', '.join(report['arms'])}; seeds: {', '.join(map(str, seeds))}."
      f" Test metrics of the best validation epoch, {report['training']}.",
      "",
      "Each cell is the mean over seeds ± the half-width of its 95% Student-t interval"
      " (none with one seed). Drop = (clean - perturbed) / clean, so a positive drop means"
      " the perturbation hurt. The last columns are the MG drop minus the plain drop,"
      " paired by seed: a negative value means the MG arm lost less.",
      "",
      "Perturbations (test time only, identical across arms for a seed): noise adds"
      " Gaussian noise of s times each feature dimension's std over items; replace gives a"
      " fraction p of items the rows of other items of that set (no item keeps its own);"
      " zero sets the rows of a fraction p of items to 0. The middle part of a name is the"
      " modality, or all modalities at once.",
  ]
  for model, result in report["models"].items():
    arms = list(result["clean_summary"])
    differences = [name for name in next(iter(result["drop_difference"].values()), {})]
    for metric in report["metrics"]:
      lines += ["", f"## {model}: {metric}", ""]
      if result["note"]:
        lines += [f"**{result['note']}.** Its perturbed metrics equal the clean ones.", ""]
      header = ["perturbation"]
      for arm in arms:
        header += [arm, f"{arm} drop"]
      header += [f"{name} drop" for name in differences]
      rows = [["clean"] + [cell for arm in arms
                           for cell in (_interval(result["clean_summary"][arm][metric]), "")]
              + ["" for _ in differences]]
      for name, per_arm in result["perturbed_summary"].items():
        row = [name]
        for arm in arms:
          row += [_interval(per_arm[arm][metric]["perturbed"]),
                  _interval(per_arm[arm][metric]["relative_drop"], percent=True)]
        row += [_interval(result["drop_difference"][name][difference][metric], percent=True)
                for difference in differences]
        rows.append(row)
      lines += _table(header, rows)

  flatness_models = {model: result for model, result in report["models"].items()
                     if "flatness_summary" in result}
  if flatness_models:
    lines += ["", "## Flatness of the trained parameters", ""]
    first = next(iter(flatness_models.values()))
    lines += [f"Computed on the {first['flatness_settings']['description']}.", ""]
    header = ["model", "arm", "loss", "Hessian trace", "top eigenvalue", "sharpness",
              "relative sharpness"]
    rows = []
    for model, result in flatness_models.items():
      for arm, values in result["flatness_summary"].items():
        rows.append([model, arm] + [_scientific(values[key]) for key in FLATNESS_KEYS])
      for difference, values in result["flatness_difference"].items():
        rows.append([model, difference] + [_scientific(values[key]) for key in FLATNESS_KEYS])
    lines += _table(header, rows)
  return "\n".join(lines) + "\n"


def plot_drops(report: Mapping[str, Any], path: Path) -> None:
  """Plot relative drop against strength: a row per model, a panel per family, a line per arm.

  Only the perturbations of all modalities at once and the first metric are drawn;
  error bars are the 95% t-intervals.
  """
  import matplotlib  # Imported here: only writing the figure needs it.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  metric = report["metrics"][0]
  models = list(report["models"])
  figure, axes = plt.subplots(max(len(models), 1), len(FAMILIES), squeeze=False,
                              figsize=(4.2 * len(FAMILIES), 3.2 * max(len(models), 1)))
  perturbations = [Perturbation(**p) for p in report["perturbations"]]
  for row, model in enumerate(models):
    result = report["models"][model]
    for column, family in enumerate(FAMILIES):
      axis = axes[row, column]
      chosen = sorted((p for p in perturbations
                       if p.family == family and p.target == ALL_MODALITIES),
                      key=lambda p: p.strength)
      arms = list(result["clean_summary"])
      strengths = np.array([p.strength for p in chosen])
      # Arms are shifted sideways a little, so that their error bars do not overlap.
      shift = 0.01 * (np.ptp(strengths) if strengths.size > 1 else 1.0)
      for index, arm in enumerate(arms):
        summaries = [result["perturbed_summary"][p.name][arm][metric]["relative_drop"]
                     for p in chosen]
        means = np.array([s["mean"] for s in summaries], dtype=float) * 100
        errors = np.nan_to_num(np.array([s["half_width"] for s in summaries], dtype=float) * 100)
        offset = (index - (len(arms) - 1) / 2) * shift
        axis.errorbar(strengths + offset, means, yerr=errors, marker="o", capsize=3, label=arm)
      title = f"{model}: {family}"
      if result["note"]:
        title += " (unaffected)"
      axis.set_title(title)
      axis.set_xlabel("s (noise std / feature std)" if family == "noise"
                      else "p (fraction of items)")
      axis.set_ylabel(f"relative drop of {metric} (%)")
      axis.axhline(0.0, color="grey", linewidth=0.5)
      axis.grid(alpha=0.3)
      if chosen:
        axis.legend(fontsize="small")
  figure.suptitle(f"{report['dataset']['name']}: perturbations of all modalities,"
                  f" mean over {len(report['seeds'])} seed(s) with 95% t-intervals")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def _finite_or_none(value: Any) -> Any:
  """Replace NaN and infinities by None, so the JSON output is standard JSON."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, Mapping):
    return {key: _finite_or_none(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_none(item) for item in value]
  return value


# ----------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.robustness",
      description="Train plain and Mirror Gradient models and measure how their test metrics"
                  " drop under item-feature perturbations applied at inference.")
  add_model_arguments(parser, multiple=True)
  add_data_arguments(parser)
  add_training_arguments(parser)
  # Each MG arm sets its own placement; None marks an --mg-placement given by mistake.
  parser.set_defaults(mg_placement=None)

  parser.add_argument("--arms", nargs="+", choices=ARMS, default=["plain", "mg-gradient"],
                      help="training arms (default: plain mg-gradient); differences are"
                           " taken against plain")
  parser.add_argument("--seeds", type=positive_int, default=3,
                      help="number of seeds per arm (default 3)")
  parser.add_argument("--first-seed", type=non_negative_int, default=999,
                      help="first seed; the seeds are first-seed, first-seed + 1, ..."
                           " (default 999). A seed also draws that seed's perturbations")
  parser.add_argument("--from-runs", nargs="+", type=Path, metavar="DIR",
                      help="restore the best checkpoints of these benchmarks.train --out"
                           " folders instead of training; models, arms and seeds come from"
                           " their results.json")

  valid_metrics = [f"{m}@{k}" for m in METRIC_NAMES for k in EVALUATION_KS]
  parser.add_argument("--metrics", nargs="+", choices=valid_metrics, metavar="METRIC",
                      default=list(DEFAULT_METRICS),
                      help="test metrics to report (default: recall@20 ndcg@20)")
  parser.add_argument("--noise-scales", nargs="+", type=positive_float, metavar="S",
                      default=list(NOISE_SCALES),
                      help="noise std as a multiple of each feature dimension's std over"
                           " items (default: 0.1 0.3 0.5 1.0)")
  parser.add_argument("--fractions", nargs="+", type=_item_fraction, metavar="P",
                      default=list(FRACTIONS),
                      help="fractions of items whose features are replaced or zeroed"
                           " (default: 0.1 0.3 0.5)")

  parser.add_argument("--flatness", action=argparse.BooleanOptionalAction, default=True,
                      help="compute the flatness report of each trained state (default: on)")
  parser.add_argument("--flatness-batches", type=positive_int, default=4,
                      help="fixed training batches the flatness loss averages (default 4)")
  parser.add_argument("--flatness-batch-size", type=positive_int, default=2048,
                      help="rows per flatness batch (default 2048)")
  parser.add_argument("--flatness-probes", type=positive_int, default=20,
                      help="Rademacher probes of the Hessian trace estimate (default 20)")
  parser.add_argument("--flatness-iterations", type=positive_int, default=20,
                      help="power iterations of the top Hessian eigenvalue (default 20)")
  parser.add_argument("--flatness-rho", type=positive_float, default=0.05,
                      help="L2 radius of the sharpness ball, in parameter units (default 0.05)")
  parser.add_argument("--flatness-steps", type=positive_int, default=10,
                      help="projected ascent steps of the sharpness estimate (default 10)")

  parser.add_argument("--out", type=Path,
                      help="output folder (default: runs/robustness-<dataset>)")
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
  return parser


def _item_fraction(text: str) -> float:
  value = float(text)
  if not 0 < value <= 1:
    raise argparse.ArgumentTypeError(f"expected a fraction of items in (0, 1], got {text}")
  return value


def _training_description(args: argparse.Namespace, runs: Sequence[TrainedRun]) -> str:
  if args.from_runs:
    return f"restored from {len(runs)} benchmarks.train run(s)"
  return (f"{args.optimizer} lr {args.lr:g}, at most {args.epochs} epochs, patience"
          f" {args.patience}, early stopping on valid {args.valid_metric}; MG interval"
          f" {args.interval}, descent scale {args.descent_scale:g}, ascent scale"
          f" {args.ascent_scale:g}")


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  configure_logging(args.log_level)

  if args.mg_placement is not None:
    parser.error("argument --mg-placement: not used here; choose the placement with --arms"
                 " mg-gradient and/or mg-update")
  dataset = load_data(args, parser)
  seeds = [args.first_seed + offset for offset in range(args.seeds)]
  try:
    if args.from_runs:
      runs = load_runs(args.from_runs, dataset)
    else:
      runs = train_runs(dataset, args, args.models, list(dict.fromkeys(args.arms)), seeds)
  except ValueError as error:
    parser.error(str(error))

  perturbations = standard_perturbations(dataset.features, args.noise_scales, args.fractions)
  flatness = None
  if args.flatness:
    flatness = FlatnessSettings(num_batches=args.flatness_batches,
                                batch_size=args.flatness_batch_size,
                                num_probes=args.flatness_probes,
                                num_iterations=args.flatness_iterations,
                                rho=args.flatness_rho, num_steps=args.flatness_steps)

  runs_by_model = collections.defaultdict(list)
  for run in runs:
    runs_by_model[run.model].append(run)
  report = {
      "dataset": dataset.stats(),
      "metrics": list(args.metrics),
      "arms": [arm for arm in ARMS if any(run.arm == arm for run in runs)],
      "seeds": sorted({run.seed for run in runs}),
      "training": _training_description(args, runs),
      "perturbations": [dataclasses.asdict(p) for p in perturbations],
      "perturbation_names": [p.name for p in perturbations],
      "confidence": CONFIDENCE,
      "models": {
          model: measure_model(dataset, model_runs, perturbations, args.metrics, flatness,
                               progress=not args.no_progress)
          for model, model_runs in runs_by_model.items()},
      "jax_version": jax.__version__,
      "backend": jax.default_backend(),
  }

  out = args.out or Path("runs") / f"robustness-{dataset.name}"
  out.mkdir(parents=True, exist_ok=True)
  markdown = format_markdown(report)
  (out / "robustness.json").write_text(json.dumps(_finite_or_none(report), indent=2))
  (out / "robustness.md").write_text(markdown)
  plot_drops(report, out / "robustness.png")
  print(markdown)
  print(f"wrote {out / 'robustness.json'}, {out / 'robustness.md'} and {out / 'robustness.png'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
