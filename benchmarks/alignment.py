"""Measure which way MG's mirror call moves a real model, per placement.

With an adaptive optimizer, scaling the gradient before the optimizer (the reference's
placement) can turn the mirror "ascent" call into a second descent step. This benchmark
trains a model with MG for a few epochs, then, on the mirror batches of the next epoch,
measures with `optax_mg.mirror_alignment` the cosine between the mirror-call update and
the descent-call update, the cosine between the mirror-call update and the loss gradient
(positive = uphill), the update-norm ratio, and whether the mirror call raised the batch
loss. Training continues with the real MG steps between measurements.

Example:
  python -m benchmarks.alignment --models freedom vbpr --data-dir ../shared/data/tiktok
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

import optax_mg
from benchmarks.train import (add_data_arguments, add_model_arguments, add_training_arguments,
                              configure_logging, load_data, make_config, positive_int)
from models.sampling import epoch_batches
from models.train import TrainingProgram

logger = logging.getLogger(__name__)

FIELDS = ("update_cosine", "gradient_cosine", "norm_ratio")


def measure(program: TrainingProgram, seed: int, warmup_epochs: int,
            max_batches: int) -> dict[str, Any]:
  """Train ``warmup_epochs`` epochs, then measure the mirror batches of the next epoch."""
  config = program.config
  state = program.init(seed)
  for epoch in range(warmup_epochs):
    state, loss = program.train_epoch(state, program.epoch_key(seed, epoch))
  logger.info("%s %s: trained %d epochs, last loss %.5f", config.model, config.placement,
              warmup_epochs, float(loss))

  data = program.data
  batch_key, graph_key = jax.random.split(program.epoch_key(seed, warmup_epochs))
  batches = epoch_batches(batch_key, data.train_users, data.train_items, data.sampler,
                          config.batch_size)
  graph = program.model(state.params, data.constants).train_graph(graph_key)

  def loss_fn(params, batch):
    return program.model(params, data.constants).loss(batch, graph)

  optimizer = program.optimizer
  alignment_fn = jax.jit(lambda params, opt_state, batch: optax_mg.mirror_alignment(
      loss_fn, optimizer, params, opt_state, batch))
  step_fn = jax.jit(optax_mg.mirror_train_step(loss_fn, optimizer))

  params, opt_state = state.params, optax_mg.restart_cycle(state.opt_state)
  records = []
  for index in range(batches.users.shape[0]):
    batch = jax.tree.map(lambda x: x[index], batches)
    if index % config.interval == 0 and len(records) < max_batches:
      alignment = jax.device_get(alignment_fn(params, opt_state, batch))
      records.append({name: float(value) for name, value in alignment._asdict().items()})
    params, opt_state, _ = step_fn(params, opt_state, batch)

  summary = {}
  for name in FIELDS:
    values = np.array([record[name] for record in records])
    summary[name] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)),
                     "min": float(values.min()), "max": float(values.max())}
  uphill = [r["after_ascent_loss"] > r["after_descent_loss"] for r in records]
  summary["uphill_fraction"] = float(np.mean(uphill))
  return {"batches": records, "summary": summary, "warmup_epochs": warmup_epochs}


def format_markdown(report: dict[str, Any]) -> str:
  lines = [
      "| model | optimizer | placement | mirror batches | cos(mirror update, descent update)"
      " | cos(mirror update, gradient) | norm ratio | mirror call raised the loss |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for run in report["runs"]:
    summary = run["summary"]
    cells = [run["model"], run["optimizer"], run["placement"], str(len(run["batches"]))]
    for name in FIELDS:
      cells.append(f"{summary[name]['mean']:+.3f} ± {summary[name]['std']:.3f}")
    cells.append(f"{summary['uphill_fraction']:.0%}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.alignment",
      description="Measure the direction of MG's mirror call for each placement.")
  add_model_arguments(parser, multiple=True)
  add_data_arguments(parser)
  add_training_arguments(parser)
  parser.add_argument("--placements", nargs="+", choices=optax_mg.PLACEMENTS,
                      default=list(optax_mg.PLACEMENTS), help="placements to measure")
  parser.add_argument("--warmup-epochs", type=positive_int, default=10,
                      help="MG training epochs before the measured epoch")
  parser.add_argument("--max-batches", type=positive_int, default=10,
                      help="mirror batches measured per run")
  parser.add_argument("--seed", type=int, default=999)
  parser.add_argument("--out", type=Path, help="output folder (default: runs/alignment-<dataset>)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  configure_logging(args.log_level)
  dataset = load_data(args, parser)

  runs = []
  for model in args.models:
    for placement in args.placements:
      config = make_config(args, model, mg=True, seed=args.seed, placement=placement)
      result = measure(TrainingProgram(dataset, config), args.seed, args.warmup_epochs,
                       args.max_batches)
      runs.append({"model": model, "optimizer": config.optimizer, "placement": placement,
                   "config": config.to_dict(), **result})

  report = {
      "command": " ".join(["python -m benchmarks.alignment", *(argv or sys.argv[1:])]),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "dataset": dataset.stats(),
      "jax_version": jax.__version__,
      "backend": jax.default_backend(),
      "runs": runs,
  }
  out = args.out or Path("runs") / f"alignment-{dataset.name}"
  out.mkdir(parents=True, exist_ok=True)
  (out / "alignment.json").write_text(json.dumps(report, indent=2))
  markdown = format_markdown(report)
  (out / "alignment.md").write_text(f"`{report['command']}`\n\n{markdown}\n")
  print(markdown)
  print(f"wrote {out / 'alignment.json'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
