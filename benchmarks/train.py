"""Train one recommendation model, with or without Mirror Gradient, and report metrics.

Examples:
  python -m benchmarks.train --model lightgcn                  # synthetic data
  python -m benchmarks.train --model freedom --data-dir ../shared/data/tiktok --mg
  python -m benchmarks.train --model lightgcn --devices 4 --shard-embeddings

Writes ``results.json`` (configuration, per-epoch loss, validation metrics and times, best
epoch, test metrics at the best validation epoch, wall times, JAX version and backend) and
orbax checkpoints of the latest and best states into ``--out``.

Multi-process runs start the same command in every process, with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set or with ``--distributed`` under a cluster manager.
Every process loads the dataset and trains its share of each batch. Process 0 writes
results.json and the progress files, and all processes write the checkpoint shards.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import jax

import optax_mg
from models.data import DatasetError, load_dataset
from models.evaluation import DEFAULT_CHUNK_SIZE
from models.parallel import maybe_initialize_distributed, resolve_device_count
from models.registry import MODEL_NAMES
from models.synthetic import make_synthetic_dataset
from models.train import (EVALUATION_KS, METRIC_NAMES, OPTIMIZER_NAMES, TrainConfig,
                          TrainResult, fit)

SUMMARY_METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")


def positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
  return value


def non_negative_int(text: str) -> int:
  value = int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
  return value


def positive_float(text: str) -> float:
  value = float(text)
  if not math.isfinite(value) or value <= 0:
    raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
  return value


def non_negative_float(text: str) -> float:
  value = float(text)
  if not math.isfinite(value) or value < 0:
    raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
  return value


def fraction(text: str) -> float:
  value = float(text)
  if not 0 <= value < 1:
    raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
  return value


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
  """Add the options that choose a dataset."""
  data = parser.add_mutually_exclusive_group()
  data.add_argument("--data-dir", type=Path,
                    help="MMRec dataset folder holding <name>.inter and <modality>_feat.npy")
  data.add_argument("--dataset", choices=["synthetic"], default="synthetic",
                    help="built-in dataset used when --data-dir is absent (default: synthetic)")
  parser.add_argument("--modalities", nargs="+", metavar="NAME",
                      help="feature files to load, e.g. image audio (default: all found)")


def add_model_arguments(parser: argparse.ArgumentParser, *, multiple: bool = False) -> None:
  """Add the model choice and its hyperparameters."""
  if multiple:
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES),
                        help="models to run (default: all)")
  else:
    parser.add_argument("--model", choices=MODEL_NAMES, required=True, help="model to train")
  parser.add_argument("--embedding-dim", type=positive_int, help="embedding size (default 64)")
  parser.add_argument("--num-layers", type=non_negative_int,
                      help="user-item propagation layers of LightGCN and FREEDOM")
  parser.add_argument("--reg-weight", type=non_negative_float,
                      help="regularisation weight of the model's loss")
  parser.add_argument("--dropout", type=fraction,
                      help="FREEDOM: fraction of training edges pruned each epoch")
  parser.add_argument("--image-weight", type=fraction,
                      help="FREEDOM: weight of the image kNN graph; the rest is split over"
                           " the other modalities")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
  """Add optimizer, MG, schedule and evaluation options."""
  parser.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default="adam",
                      help="optax optimizer (default: adam)")
  parser.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate (default: 1e-3)")
  parser.add_argument("--weight-decay", type=non_negative_float, default=0.0,
                      help="L2 weight decay; decoupled for adamw (default: 0)")
  parser.add_argument("--interval", type=positive_int, default=3,
                      help="MG: every interval-th batch is a mirror batch (default: 3)")
  parser.add_argument("--descent-scale", type=positive_float, default=1.0,
                      help="MG: scale of the descent step, alpha1 (default: 1.0)")
  parser.add_argument("--ascent-scale", type=non_negative_float, default=0.2,
                      help="MG: scale of the ascent step, alpha2 (default: 0.2)")
  parser.add_argument("--mg-placement", choices=optax_mg.PLACEMENTS, default="gradient",
                      help="MG: scale gradients before the optimizer (gradient, as the"
                           " reference) or the optimizer's updates (update)")
  parser.add_argument("--batch-size", type=positive_int, default=2048,
                      help="training rows per batch (default: 2048)")
  parser.add_argument("--epochs", type=positive_int, default=1000, help="maximum epochs")
  parser.add_argument("--patience", type=non_negative_int, default=20,
                      help="stop once more than this many evaluations in a row did not"
                           " improve the validation metric, as MMRec does (default: 20)")
  valid_metrics = [f"{m}@{k}" for m in METRIC_NAMES for k in EVALUATION_KS]
  parser.add_argument("--valid-metric", choices=valid_metrics, default="recall@20",
                      metavar="METRIC", help="validation metric for early stopping")
  parser.add_argument("--eval-chunk-size", type=positive_int, default=DEFAULT_CHUNK_SIZE,
                      help="users scored at once during evaluation")
  parser.add_argument("--log-level", default="INFO",
                      choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def add_parallel_arguments(parser: argparse.ArgumentParser, *, distributed: bool = True) -> None:
  """Add the device count, embedding sharding and (optionally) multi-process options."""
  parser.add_argument("--devices", type=positive_int,
                      help="devices to train on; each batch's rows are split over them"
                           " (default: all, jax.device_count())")
  parser.add_argument("--shard-embeddings", action="store_true",
                      help="split the user and item tables and their optimizer state by rows"
                           " over the devices instead of replicating them")
  if distributed:
    parser.add_argument("--distributed", action="store_true",
                        help="start multi-process JAX from the cluster manager's settings"
                             " (Slurm, Open MPI, Cloud TPU). Without it, a multi-process run"
                             " starts when JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and"
                             " JAX_PROCESS_ID are set")


def check_parallel_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
  """Start multi-process JAX if requested, then check --devices, or exit with a parser error.

  Call it right after parsing: the distributed runtime must start before any other JAX call.
  """
  try:
    maybe_initialize_distributed(getattr(args, "distributed", False))
  except ValueError as error:
    parser.error(str(error))
  if args.devices is not None:
    try:
      resolve_device_count(args.devices)
    except ValueError as error:
      parser.error(f"argument --devices: {error}")


def configure_logging(level: str) -> None:
  """Set up the log format and level that every benchmark entry point uses.

  orbax logs each checkpoint write through absl, and JAX logs its backend search (a
  missing TPU library on CPU machines), both at INFO level. Neither helps a training log,
  so both loggers stay at WARNING unless ``level`` is stricter.
  """
  logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  quiet_level = max(logging.WARNING, logging.getLevelName(level))
  logging.getLogger("absl").setLevel(quiet_level)
  logging.getLogger("jax").setLevel(quiet_level)


def load_data(args: argparse.Namespace, parser: argparse.ArgumentParser):
  """Load the dataset the options name, or exit with a parser error."""
  try:
    if args.data_dir is not None:
      return load_dataset(args.data_dir, args.modalities)
    kwargs = {"modalities": args.modalities} if args.modalities else {}
    return make_synthetic_dataset(**kwargs)
  except (DatasetError, FileNotFoundError) as error:
    parser.error(f"argument --data-dir: {error}")


def model_options(args: argparse.Namespace, model: str) -> dict[str, Any]:
  """Collect the model hyperparameters given on the command line."""
  options = {"embedding_dim": args.embedding_dim, "reg_weight": args.reg_weight}
  if model in ("lightgcn", "freedom"):
    options["num_layers"] = args.num_layers
  if model == "freedom":
    options["dropout"] = args.dropout
    if args.image_weight is not None:
      options["image_weight"] = args.image_weight
  return {key: value for key, value in options.items() if value is not None}


def make_config(args: argparse.Namespace, model: str, *, mg: bool, seed: int,
                placement: str | None = None) -> TrainConfig:
  return TrainConfig(
      model=model,
      model_options=model_options(args, model),
      optimizer=args.optimizer,
      learning_rate=args.lr,
      weight_decay=args.weight_decay,
      mg=mg,
      interval=args.interval,
      descent_scale=args.descent_scale,
      ascent_scale=args.ascent_scale,
      placement=placement or args.mg_placement,
      batch_size=args.batch_size,
      epochs=args.epochs,
      patience=args.patience,
      valid_metric=args.valid_metric,
      seed=seed,
      eval_chunk_size=args.eval_chunk_size,
      checkpoint_every=getattr(args, "checkpoint_every", 5),
      devices=getattr(args, "devices", None),
      shard_embeddings=getattr(args, "shard_embeddings", False),
  )


def format_summary(result: TrainResult) -> str:
  """Render the best epoch and its test metrics as a small table."""
  config = result.config
  arm = f"MG ({config.placement})" if config.mg else "plain"
  header = ["model", "setting", "best epoch"] + [f"test {m}" for m in SUMMARY_METRICS]
  row = [config.model, arm, str(result.best_epoch)]
  row += [f"{result.test.get(m, float('nan')):.4f}" for m in SUMMARY_METRICS]
  widths = [max(len(h), len(c)) for h, c in zip(header, row)]
  lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
           "  ".join(c.ljust(w) for c, w in zip(row, widths))]
  train_time = result.to_dict()["mean_train_seconds_per_epoch"]
  lines.append(f"stopped: {result.stop_reason}; {len(result.history)} epochs,"
               f" {train_time or float('nan'):.3f} s/epoch training,"
               f" {result.wall_seconds:.1f} s in all")
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.train",
      description="Train a recommendation model with or without Mirror Gradient.")
  add_model_arguments(parser)
  add_data_arguments(parser)
  add_training_arguments(parser)
  add_parallel_arguments(parser)
  parser.add_argument("--mg", action=argparse.BooleanOptionalAction, default=False,
                      help="train with Mirror Gradient (default: --no-mg)")
  parser.add_argument("--seed", type=int, default=999,
                      help="seed of initialisation, batch order and negatives (default: 999)")
  parser.add_argument("--out", type=Path,
                      help="output folder (default: runs/<model>-<dataset>-<arm>-seed<S>)")
  parser.add_argument("--resume", action="store_true",
                      help="continue from the latest checkpoint in --out")
  parser.add_argument("--checkpoint-every", type=positive_int, default=5,
                      help="write the latest and best checkpoints every N epochs and at the end")
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  check_parallel_arguments(args, parser)
  configure_logging(args.log_level)

  dataset = load_data(args, parser)
  try:
    config = make_config(args, args.model, mg=args.mg, seed=args.seed)
  except ValueError as error:
    parser.error(str(error))

  arm = f"mg-{config.placement}" if config.mg else "plain"
  out = args.out or Path("runs") / f"{config.model}-{dataset.name}-{arm}-seed{config.seed}"
  if args.resume and not (out / "checkpoints" / "latest").exists():
    parser.error(f"argument --resume: no checkpoint found in {out / 'checkpoints'}")
  out.mkdir(parents=True, exist_ok=True)

  try:
    result = fit(dataset, config, checkpoint_dir=(out / "checkpoints").resolve(),
                 resume=args.resume, progress=not args.no_progress)
  except ValueError as error:
    parser.error(str(error))

  if jax.process_index() != 0:
    return 0
  results_path = out / "results.json"
  results_path.write_text(json.dumps(result.to_dict(), indent=2))
  print(format_summary(result))
  print(f"wrote {results_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
