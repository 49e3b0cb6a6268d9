"""Measure training and evaluation speed of each model with and without Mirror Gradient.

Examples:
  python -m benchmarks.throughput                               # synthetic data, all models
  python -m benchmarks.throughput --data-dir ../shared/data/tiktok --models freedom
  python -m benchmarks.throughput --models lightgcn --device-counts 1 2 4

For each model, one process builds a plain and an MG `TrainingProgram` and times the
trainer's own compiled functions (``train_epoch_fn`` and ``evaluate_fn``):

* compile time of the epoch function (``lower`` plus ``compile``) and the time of its first
  call;
* epoch time (median, min, max) over ``--repeats`` epochs after ``--warmup`` epochs. The
  arms alternate epoch by epoch (plain, MG, plain, MG, ...) so that machine noise hits both
  alike, and both arms see the same shuffled batches and negatives;
* training steps and gradient evaluations per second, and the MG/plain ratio of median
  epoch times next to the theoretical ratios;
* full-ranking evaluation time of all validation and all test users;
* peak device memory where the backend reports it, XLA's memory estimate of each compiled
  epoch function, and the process's peak resident set size.

Counting: a mirror batch counts as one training step but as two gradient evaluations. The
trainer restarts the MG cycle every epoch, so an epoch of ``N`` batches contains
``ceil(N / interval)`` mirror batches. The exact gradient-evaluation ratio MG/plain is then
``(N + ceil(N / interval)) / N``, and ``(interval + 1) / interval`` is its limit for long
epochs.

``--device-counts`` sweeps the number of data-parallel devices instead: it runs this
benchmark once per count in a child process with ``--devices N`` and
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (which gives N virtual devices on
the CPU backend and leaves other backends alone). It then reports per count the median
epoch time, steps per second, scaling efficiency relative to the smallest count, and
whether the losses after the first and the last epoch equal those of the smallest count.
Virtual CPU devices share the same CPUs, so on CPU the sweep measures the overhead of
partitioning and checks the results, but cannot show a speed-up.

NOTE: models measured later in one process can run slower than alone. On a 2-core CPU,
FREEDOM measured after LightGCN and VBPR took 0.38 s per epoch in 6 of 9 repeats against
0.23 s in the others and in a process of its own; the cause is not known. For stable
figures, run one model per process.

The benchmark sets no thread count. XLA sizes its CPU thread pools from the CPUs the process
may run on, so run it under ``taskset -c LIST`` to use fewer CPUs; the JSON records the CPU
affinity. Writes ``--out`` (default ``runs/throughput-<dataset>.json``) and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import logging
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from benchmarks.train import (add_data_arguments, add_model_arguments,
                              add_parallel_arguments, add_training_arguments,
                              check_parallel_arguments, configure_logging, load_data,
                              make_config, positive_float, positive_int)
from models.data import Dataset
from models.registry import MODEL_NAMES
from models.sampling import num_batches
from models.train import TrainConfig, TrainingProgram, TrainState

logger = logging.getLogger(__name__)

ARMS = ("plain", "mg")
SPLITS = ("valid", "test")
# Fields of XLA's CompiledMemoryStats kept in the report. The serialized buffer assignment is
# left out.
COMPILED_MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes",
                          "alias_size_in_bytes", "temp_size_in_bytes",
                          "generated_code_size_in_bytes", "peak_memory_in_bytes")
# Keys of jax.Device.memory_stats() kept in the report, where the backend has them.
DEVICE_MEMORY_FIELDS = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
# Losses of a device-count sweep count as equal to the baseline's within these tolerances:
# more devices only change the order of float sums.
LOSS_RTOL = 1e-4
LOSS_ATOL = 1e-6
VIRTUAL_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def mirror_batches_per_epoch(batches: int, interval: int) -> int:
  """Return the number of mirror batches in an epoch of ``batches`` batches.

  The trainer restarts the MG cycle every epoch, so batches 0, interval, 2 * interval, ...
  of each epoch are mirror batches.
  """
  if batches < 1 or interval < 1:
    raise ValueError(f"invalid batches={batches} or interval={interval}: expected integers >= 1")
  return -(-batches // interval)


def theoretical_ratios(batches: int, interval: int) -> dict[str, float]:
  """Return the MG/plain cost ratios in gradient evaluations.

  ``asymptotic`` is ``(interval + 1) / interval``. ``exact`` counts the mirror batches of an
  epoch of ``batches`` batches.
  """
  mirror = mirror_batches_per_epoch(batches, interval)
  return {"asymptotic": (interval + 1) / interval, "exact": (batches + mirror) / batches}


def summarize(seconds: Sequence[float]) -> dict[str, Any]:
  """Return the median, min and max of timings, with the timings themselves."""
  if not seconds:
    raise ValueError("no timings to summarize")
  return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds),
          "values": list(seconds)}


def _timed(function: Callable[[], Any]) -> tuple[Any, float]:
  """Call ``function``, wait for its device results, and return them with the seconds taken."""
  start = time.perf_counter()
  result = jax.block_until_ready(function())
  return result, time.perf_counter() - start


def compiled_memory(compiled: Any) -> dict[str, int] | None:
  """Return XLA's memory estimate of a compiled function, or None where there is none."""
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError) as error:
    logger.info("no memory analysis of the compiled function: %s", error)
    return None
  if stats is None:
    return None
  return {name: int(getattr(stats, name)) for name in COMPILED_MEMORY_FIELDS
          if hasattr(stats, name)}


def memory_report() -> dict[str, Any]:
  """Return peak device memory (where reported) and the process's peak resident set size.

  Both figures are peaks since the process started, not per model or per arm.
  """
  devices = []
  for device in jax.local_devices():
    stats = device.memory_stats()
    fields = None if stats is None else {key: int(stats[key]) for key in DEVICE_MEMORY_FIELDS
                                         if key in stats}
    devices.append({"device": str(device), "memory_stats": fields})
  peaks = [entry["memory_stats"].get("peak_bytes_in_use") for entry in devices
           if entry["memory_stats"]]
  peaks = [peak for peak in peaks if peak is not None]

  # ru_maxrss is in kibibytes on Linux and in bytes on macOS.
  max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  rss_bytes = max_rss if sys.platform == "darwin" else max_rss * 1024
  return {
      "device_peak_bytes_in_use": max(peaks) if peaks else None,
      "device": devices,
      "device_note": (
          "largest peak_bytes_in_use of memory_stats() over the local devices, since the"
          " process started" if peaks else
          f"the {jax.default_backend()} backend reports no peak device memory (memory_stats()"
          " returned None or no peak_bytes_in_use), so the device peak is null"),
      "process_peak_rss_bytes": rss_bytes,
      "process_peak_rss_note": (
          "peak resident set size of the whole process (host memory) since it started, from"
          " getrusage. On the CPU backend it includes the device arrays"),
  }


def environment(argv: Sequence[str]) -> dict[str, Any]:
  """Return the software, hardware and command line that the figures belong to."""
  import jaxlib  # Imported here: only its version is read.

  devices = jax.devices()
  affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": shlex.join(["python", "-m", "benchmarks.throughput", *argv]),
      "jax_version": jax.__version__,
      "jaxlib_version": jaxlib.__version__,
      "backend": jax.default_backend(),
      "device_count": len(devices),
      "devices": [{"id": d.id, "platform": d.platform, "kind": d.device_kind, "name": str(d)}
                  for d in devices],
      "cpu_count": os.cpu_count(),
      "cpu_affinity": affinity,
      "python_version": platform.python_version(),
      "platform": platform.platform(),
      "xla_flags": os.environ.get("XLA_FLAGS"),
      "jax_platforms": os.environ.get("JAX_PLATFORMS"),
  }


@dataclasses.dataclass
class _Arm:
  """One arm's program, its current training state and its timings."""

  name: str
  program: TrainingProgram
  state: TrainState
  epochs_run: int = 0
  epoch_compile: dict[str, float] = dataclasses.field(default_factory=dict)
  epoch_xla_memory: dict[str, int] | None = None
  eval_compile_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
  epoch_seconds: list[float] = dataclasses.field(default_factory=list)
  eval_seconds: dict[str, list[float]] = dataclasses.field(
      default_factory=lambda: {split: [] for split in SPLITS})
  last_loss: float = math.nan
  first_loss: float = math.nan

  def compile_epoch(self) -> None:
    """Time the lowering and compilation of the epoch function, as `fit` does."""
    program = self.program
    key = program.epoch_key(program.config.seed, 0)
    start = time.perf_counter()
    lowered = program.train_epoch_fn.lower(self.state, key, program.data)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    self.epoch_compile.update(lower_seconds=lowered_at - start,
                              compile_seconds=compiled_at - lowered_at,
                              total_seconds=compiled_at - start)
    self.epoch_xla_memory = compiled_memory(compiled)

  def run_epoch(self) -> float:
    """Train one epoch from the current state and return its seconds."""
    program = self.program
    key = program.epoch_key(program.config.seed, self.epochs_run)
    (self.state, loss), seconds = _timed(lambda: program.train_epoch(self.state, key))
    self.last_loss = float(loss)
    if self.epochs_run == 0:
      self.first_loss = self.last_loss
    self.epochs_run += 1
    return seconds

  def compile_evaluation(self) -> None:
    """Time the compilation of the evaluation function for each split."""
    program = self.program
    for split in SPLITS:
      start = time.perf_counter()
      program.evaluate_fn.lower(self.state.params, program.data, split=split).compile()
      self.eval_compile_seconds[split] = time.perf_counter() - start

  def evaluate(self) -> dict[str, float]:
    """Time a full-ranking evaluation of all valid and all test users, in seconds per split."""
    program = self.program
    seconds = {}
    for split in SPLITS:
      _, seconds[split] = _timed(
          lambda: program.evaluate_fn(self.state.params, program.data, split=split))
    return seconds


def _alternate(arms: Sequence[_Arm], rounds: int, action: Callable[[_Arm], Any]) -> None:
  for _ in range(rounds):
    for arm in arms:
      action(arm)


def _check_pair(plain: TrainConfig, mg: TrainConfig) -> None:
  if plain.mg or not mg.mg:
    raise ValueError(f"invalid arms: expected plain.mg=False and mg.mg=True, got {plain.mg}"
                     f" and {mg.mg}")
  if plain.model != mg.model:
    raise ValueError(f"invalid arms: they train different models, {plain.model!r} and"
                     f" {mg.model!r}")


def measure_model(dataset: Dataset, plain: TrainConfig, mg: TrainConfig, *,
                  warmup: int = 1, repeats: int = 5) -> dict[str, Any]:
  """Time one model's plain and MG arms on ``dataset``, alternating the arms.

  Args:
    dataset: the data to train and evaluate on.
    plain: configuration of the plain arm (``mg=False``).
    mg: configuration of the MG arm (``mg=True``), same model and batch size.
    warmup: untimed epochs (and evaluations) per arm before the timed ones; the first
      warm-up epoch is the first call of the compiled function, reported separately.
    repeats: timed epochs (and evaluations) per arm.

  Returns:
    A JSON-ready dict: batch counts, theoretical and measured MG/plain ratios, and per arm
    the compile times, epoch and evaluation timings, rates and XLA memory estimate.
  """
  _check_pair(plain, mg)
  if plain.batch_size != mg.batch_size:
    raise ValueError(f"invalid arms: batch sizes differ (plain {plain.batch_size}, MG"
                     f" {mg.batch_size}); give both configs the same batch_size")
  if warmup < 1 or repeats < 1:
    raise ValueError(f"invalid warmup={warmup} or repeats={repeats}: expected integers >= 1")

  start = time.perf_counter()
  arms = []
  for name, config in zip(ARMS, (plain, mg)):
    program = TrainingProgram(dataset, config)
    arms.append(_Arm(name, program, program.init(config.seed)))
  setup_seconds = time.perf_counter() - start

  for arm in arms:
    arm.compile_epoch()
    logger.info("%s %s: epoch function compiled in %.2f s", plain.model, arm.name,
                arm.epoch_compile["total_seconds"])
  for arm in arms:
    arm.epoch_compile["first_call_seconds"] = arm.run_epoch()
  _alternate(arms, warmup - 1, _Arm.run_epoch)
  _alternate(arms, repeats, lambda arm: arm.epoch_seconds.append(arm.run_epoch()))

  for arm in arms:
    arm.compile_evaluation()
  _alternate(arms, warmup, _Arm.evaluate)

  def timed_evaluation(arm: _Arm) -> None:
    for split, seconds in arm.evaluate().items():
      arm.eval_seconds[split].append(seconds)

  _alternate(arms, repeats, timed_evaluation)

  batches = num_batches(len(dataset.train.users), plain.batch_size)
  mirror = mirror_batches_per_epoch(batches, mg.interval)
  report = {
      "batch_size": plain.batch_size,
      "train_rows": len(dataset.train.users),
      "batches_per_epoch": batches,
      "mirror_batches_per_epoch": mirror,
      "interval": mg.interval,
      "theoretical_ratio": theoretical_ratios(batches, mg.interval),
      "setup_seconds": setup_seconds,
      "arms": {arm.name: _arm_report(arm, batches, mirror if arm.program.config.mg else 0)
               for arm in arms},
  }
  plain_epochs, mg_epochs = arms[0].epoch_seconds, arms[1].epoch_seconds
  paired = [m / p for p, m in zip(plain_epochs, mg_epochs)]
  report["measured_ratio"] = {
      "of_medians": statistics.median(mg_epochs) / statistics.median(plain_epochs),
      "median_of_paired": statistics.median(paired),
      "paired": paired,
  }
  return report


def _arm_report(arm: _Arm, batches: int, mirror: int) -> dict[str, Any]:
  epochs = summarize(arm.epoch_seconds)
  valid_and_test = [v + t for v, t in zip(arm.eval_seconds["valid"], arm.eval_seconds["test"])]
  return {
      "config": arm.program.config.to_dict(),
      "epoch_compile": arm.epoch_compile,
      "epoch_xla_memory": arm.epoch_xla_memory,
      "eval_compile_seconds": arm.eval_compile_seconds,
      "epoch_seconds": epochs,
      "steps_per_epoch": batches,
      "gradient_evaluations_per_epoch": batches + mirror,
      "steps_per_second": batches / epochs["median"],
      "gradient_evaluations_per_second": (batches + mirror) / epochs["median"],
      "eval_seconds": {
          "valid_and_test": summarize(valid_and_test),
          **{split: summarize(arm.eval_seconds[split]) for split in SPLITS},
      },
      "last_epoch_loss": arm.last_loss if math.isfinite(arm.last_loss) else None,
      "first_epoch_loss": arm.first_loss if math.isfinite(arm.first_loss) else None,
      "epochs_run": arm.epochs_run,
  }


def parse_reference(text: str) -> tuple[str, str, float]:
  """Parse ``MODEL=ARM:SECONDS`` (e.g. ``freedom=mg:3.2``) for --reference-epoch-seconds."""
  model, _, rest = text.partition("=")
  arm, _, seconds = rest.partition(":")
  if model not in MODEL_NAMES or arm not in ARMS:
    raise argparse.ArgumentTypeError(
        f"invalid reference {text!r}. Expected MODEL=ARM:SECONDS with MODEL in {MODEL_NAMES}"
        f" and ARM in {ARMS}, e.g. freedom=mg:3.2")
  try:
    value = float(seconds)
  except ValueError:
    value = math.nan
  if not math.isfinite(value) or value <= 0:
    raise argparse.ArgumentTypeError(
        f"invalid reference {text!r}. SECONDS must be a finite number > 0")
  return model, arm, value


def add_reference_speedups(report: dict[str, Any],
                           references: Sequence[tuple[str, str, float]],
                           eval_seconds: float | None = None) -> None:
  """Add each given reference time and its speed-up (reference / median) to its arm.

  ``references`` are epoch times per model and arm; ``eval_seconds`` is one evaluation
  time of validation and test users, compared with every arm's evaluation.
  """
  if eval_seconds is not None:
    for entry in report["models"].values():
      for arm in entry["arms"].values():
        arm["reference_eval_seconds"] = eval_seconds
        arm["eval_speedup_vs_reference"] = (
            eval_seconds / arm["eval_seconds"]["valid_and_test"]["median"])
  for model, arm, seconds in references:
    if model not in report["models"]:
      logger.warning("ignored the reference epoch time of %s because --models does not"
                     " include it", model)
      continue
    entry = report["models"][model]["arms"][arm]
    entry["reference_epoch_seconds"] = seconds
    entry["speedup_vs_reference"] = seconds / entry["epoch_seconds"]["median"]


def format_table(report: dict[str, Any]) -> str:
  """Render the report's per-arm figures as a Markdown table, with a memory note below."""
  with_reference = any("reference_epoch_seconds" in arm for model in report["models"].values()
                       for arm in model["arms"].values())
  header = ["model", "arm", "compile s", "epoch s median (min-max)", "steps/s", "grad evals/s",
            "MG/plain ratio", "theoretical (i+1)/i", "exact for N batches", "eval valid+test s"]
  with_eval_reference = any("reference_eval_seconds" in arm
                            for model in report["models"].values()
                            for arm in model["arms"].values())
  if with_reference:
    header.append("speed-up vs reference")
  if with_eval_reference:
    header.append("eval speed-up vs reference")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

  for model, entry in report["models"].items():
    for name, arm in entry["arms"].items():
      is_mg = arm["config"]["mg"]
      label = f"MG ({arm['config']['placement']})" if is_mg else "plain"
      epochs, evals = arm["epoch_seconds"], arm["eval_seconds"]["valid_and_test"]
      ratio = entry["theoretical_ratio"]
      row = [
          model, label, f"{arm['epoch_compile']['total_seconds']:.2f}",
          f"{epochs['median']:.4f} ({epochs['min']:.4f}-{epochs['max']:.4f})",
          f"{arm['steps_per_second']:.1f}", f"{arm['gradient_evaluations_per_second']:.1f}",
          f"{entry['measured_ratio']['of_medians']:.3f}" if is_mg else "-",
          f"{ratio['asymptotic']:.3f}" if is_mg else "-",
          f"{ratio['exact']:.3f} (N={entry['batches_per_epoch']})" if is_mg else "-",
          f"{evals['median']:.4f} ({evals['min']:.4f}-{evals['max']:.4f})",
      ]
      if with_reference:
        speedup = arm.get("speedup_vs_reference")
        row.append("-" if speedup is None else f"{speedup:.2f}x")
      if with_eval_reference:
        row.append(f"{arm['eval_speedup_vs_reference']:.2f}x")
      lines.append("| " + " | ".join(row) + " |")

  memory = report["memory"]
  peak = memory["device_peak_bytes_in_use"]
  device_text = (f"{peak / 2**20:.1f} MiB" if peak is not None
                 else f"null: {memory['device_note']}")
  lines.append("")
  lines.append(f"Peak device memory: {device_text}.")
  lines.append(f"Process peak RSS (host memory, CPU fallback): "
               f"{memory['process_peak_rss_bytes'] / 2**20:.1f} MiB.")
  return "\n".join(lines)

# Options of the sweep itself, which its child processes must not get.
SWEEP_OPTIONS = ("--device-counts", "--devices", "--out")


def child_arguments(argv: Sequence[str], devices: int, out: Path) -> list[str]:
  """Return the command line of one sweep child: ``argv`` without the sweep's options."""
  remaining = []
  skipping = False
  for token in argv:
    name = token.split("=", 1)[0]
    if name in SWEEP_OPTIONS:
      skipping = "=" not in token
      continue
    if skipping and not token.startswith("-"):
      continue
    skipping = False
    remaining.append(token)
  return [*remaining, "--devices", str(devices), "--out", str(out)]


def child_environment(devices: int) -> dict[str, str]:
  """Return this process's environment with XLA_FLAGS asking for ``devices`` CPU devices."""
  flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
           if not flag.startswith(VIRTUAL_DEVICES_FLAG)]
  flags.append(f"{VIRTUAL_DEVICES_FLAG}={devices}")
  return {**os.environ, "XLA_FLAGS": " ".join(flags)}


def run_device_count(argv: Sequence[str], devices: int, folder: Path) -> dict[str, Any]:
  """Run the benchmark on ``devices`` devices in a child process and return its report."""
  out = folder / f"devices-{devices}.json"
  command = [sys.executable, "-m", "benchmarks.throughput", *child_arguments(argv, devices, out)]
  logger.info("%d devices: running %s", devices, shlex.join(command))
  completed = subprocess.run(command, env=child_environment(devices), capture_output=True,
                             text=True, check=False)
  if completed.returncode != 0:
    raise RuntimeError(f"the benchmark on {devices} devices failed with exit code"
                       f" {completed.returncode}:\n{completed.stderr[-3000:]}")
  return json.loads(out.read_text())


def _losses_equal(value: float | None, baseline: float | None) -> bool:
  if value is None or baseline is None:
    return False
  return math.isclose(value, baseline, rel_tol=LOSS_RTOL, abs_tol=LOSS_ATOL)


def scaling_report(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
  """Compare each device count's epochs with those of the smallest count.

  Scaling efficiency is ``(t_base * base) / (t_n * n)`` for median epoch times ``t``: 1.0
  means perfect linear speed-up, and 1 / n means no speed-up at all.
  """
  base = min(runs)
  scaling: dict[str, Any] = {}
  for model, base_entry in runs[base]["models"].items():
    scaling[model] = {}
    for arm, base_arm in base_entry["arms"].items():
      base_seconds = base_arm["epoch_seconds"]["median"]
      rows = []
      for devices, report in sorted(runs.items()):
        entry = report["models"][model]["arms"][arm]
        seconds = entry["epoch_seconds"]["median"]
        rows.append({
            "devices": devices,
            "available_devices": report["environment"]["device_count"],
            "epoch_seconds": entry["epoch_seconds"],
            "steps_per_second": entry["steps_per_second"],
            "speedup": base_seconds / seconds,
            "scaling_efficiency": (base_seconds * base) / (seconds * devices),
            "first_epoch_loss": entry["first_epoch_loss"],
            "last_epoch_loss": entry["last_epoch_loss"],
            "first_epoch_loss_equal": _losses_equal(entry["first_epoch_loss"],
                                                    base_arm["first_epoch_loss"]),
            "last_epoch_loss_equal": _losses_equal(entry["last_epoch_loss"],
                                                   base_arm["last_epoch_loss"]),
        })
      scaling[model][arm] = rows
  return scaling


def sweep_note(runs: dict[int, dict[str, Any]]) -> str:
  """Say what the sweep's figures mean on the backend the children ran on."""
  environment = runs[min(runs)]["environment"]
  if environment["backend"] != "cpu":
    return (f"{environment['backend']} devices; the figures include any speed-up from more"
            " devices.")
  affinity = environment["cpu_affinity"]
  cpus = len(affinity) if affinity else environment["cpu_count"]
  return (f"Virtual CPU devices ({VIRTUAL_DEVICES_FLAG}) share the same {cpus} CPUs, so these"
          " figures measure the overhead of partitioning and check that results equal those"
          " of the smallest count; they cannot show a speed-up.")


def format_sweep_table(report: dict[str, Any]) -> str:
  """Render a device-count sweep as a Markdown table, with its note below."""
  base = min(report["device_counts"])
  header = ["model", "arm", "devices", "epoch s median (min-max)", "steps/s",
            f"scaling efficiency vs {base}",
            f"loss after epoch 1 (last) equal to {base} device{'s' if base > 1 else ''}"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for model, arms in report["scaling"].items():
    for arm, rows in arms.items():
      for row in rows:
        epochs = row["epoch_seconds"]
        equal = "yes" if row["first_epoch_loss_equal"] and row["last_epoch_loss_equal"] else "NO"
        lines.append("| " + " | ".join([
            model, arm, str(row["devices"]),
            f"{epochs['median']:.4f} ({epochs['min']:.4f}-{epochs['max']:.4f})",
            f"{row['steps_per_second']:.1f}", f"{row['scaling_efficiency']:.3f}",
            f"{equal}: {row['first_epoch_loss']:.6f} ({row['last_epoch_loss']:.6f})",
        ]) + " |")
  lines.append("")
  lines.append(report["note"])
  return "\n".join(lines)


def run_device_sweep(argv: Sequence[str], counts: Sequence[int], out: Path) -> dict[str, Any]:
  """Run the benchmark once per device count, each in its own process, and compare them."""
  with tempfile.TemporaryDirectory(prefix="throughput-sweep-") as folder:
    runs = {devices: run_device_count(argv, devices, Path(folder)) for devices in counts}
  report = {
      "benchmark": "throughput-device-sweep",
      "command": shlex.join(["python", "-m", "benchmarks.throughput", *argv]),
      "device_counts": list(counts),
      "loss_tolerance": {"rtol": LOSS_RTOL, "atol": LOSS_ATOL},
      "note": sweep_note(runs),
      "scaling": scaling_report(runs),
      "runs": {str(devices): run for devices, run in runs.items()},
  }
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2, allow_nan=False))
  return report


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.throughput",
      description="Time compiled training epochs and evaluation of each model, with and"
                  " without Mirror Gradient, alternating the two arms. --epochs, --patience"
                  " and --valid-metric are shared with benchmarks.train and have no effect"
                  " here.")
  add_model_arguments(parser, multiple=True)
  add_data_arguments(parser)
  add_training_arguments(parser)
  parser.add_argument("--warmup", type=positive_int, default=1,
                      help="untimed epochs and evaluations per arm before the timed ones. The"
                           " first epoch is the first call, timed separately (at least 1;"
                           " default: 1)")
  parser.add_argument("--repeats", type=positive_int, default=5,
                      help="timed epochs and evaluations per arm (default: 5)")
  parser.add_argument("--seed", type=int, default=999,
                      help="seed of the initial parameters and of each epoch's batches")
  add_parallel_arguments(parser, distributed=False)
  parser.add_argument("--device-counts", type=positive_int, nargs="+", metavar="N",
                      help="run the benchmark once per device count, each in a child process"
                           " with N virtual CPU devices, and report scaling and whether the"
                           " losses match the smallest count. Excludes --devices")
  parser.add_argument("--out", type=Path,
                      help="JSON output file (default: runs/throughput-<dataset>.json, or"
                           " runs/throughput-devices-<dataset>.json with --device-counts)")
  parser.add_argument("--reference-epoch-seconds", type=parse_reference, nargs="+",
                      default=[], metavar="MODEL=ARM:SECONDS",
                      help="epoch times in seconds of another implementation, e.g."
                           " freedom=plain:2.5 freedom=mg:3.1. Adds a speed-up column"
                           " (reference / median)")
  parser.add_argument("--reference-eval-seconds", type=positive_float, metavar="SECONDS",
                      help="evaluation time in seconds of validation and test users by"
                           " another implementation. Adds an evaluation speed-up column")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  args = parser.parse_args(argv)
  configure_logging(args.log_level)
  if args.device_counts:
    return _main_device_sweep(args, argv, parser)
  check_parallel_arguments(args, parser)

  dataset = load_data(args, parser)
  try:
    configs = {model: (make_config(args, model, mg=False, seed=args.seed),
                       make_config(args, model, mg=True, seed=args.seed))
               for model in args.models}
  except ValueError as error:
    parser.error(str(error))
  logger.info("dataset %s", dataset.summary())

  report: dict[str, Any] = {
      "benchmark": "throughput",
      "environment": environment(argv),
      "dataset": dataset.stats(),
      "warmup": args.warmup,
      "repeats": args.repeats,
      "models": {},
  }
  for model, (plain, mg) in configs.items():
    entry = measure_model(dataset, plain, mg, warmup=args.warmup, repeats=args.repeats)
    entry["memory_after"] = memory_report()
    report["models"][model] = entry
    gc.collect()  # Drop the finished model's programs before the next one compiles.
    logger.info("%s: MG/plain epoch time %.3f (theoretical %.3f)", model,
                entry["measured_ratio"]["of_medians"], entry["theoretical_ratio"]["exact"])
  report["memory"] = memory_report()
  add_reference_speedups(report, args.reference_epoch_seconds, args.reference_eval_seconds)

  out = args.out or Path("runs") / f"throughput-{dataset.name}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2, allow_nan=False))
  print(format_table(report))
  print(f"wrote {out}")
  return 0



def _main_device_sweep(args: argparse.Namespace, argv: Sequence[str],
                       parser: argparse.ArgumentParser) -> int:
  # Only the children start a JAX backend, so this process allocates no accelerator memory.
  if args.devices is not None:
    parser.error("argument --device-counts: not allowed with --devices")
  counts = sorted(set(args.device_counts))
  name = args.data_dir.name if args.data_dir is not None else args.dataset
  out = args.out or Path("runs") / f"throughput-devices-{name}.json"
  try:
    report = run_device_sweep(argv, counts, out)
  except RuntimeError as error:
    logger.error("%s", error)
    return 1
  print(format_sweep_table(report))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
