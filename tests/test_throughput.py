"""Tests of benchmarks/throughput.py: one small run on synthetic data, and its helpers."""

import argparse
import contextlib
import io
import json
import math

import jax
import pytest

from benchmarks import throughput
from models.synthetic import make_synthetic_dataset
from models.train import TrainConfig

# One model keeps the file fast. FREEDOM has the most parts: features, a kNN item graph and
# edge pruning.
MODELS = ("freedom",)
REPEATS = 2
BATCH_SIZE = 1024
INTERVAL = 5
REFERENCE_SECONDS = 1.5
REFERENCE_EVAL_SECONDS = 0.9


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Run the benchmark once on the default synthetic dataset, returning report and output."""
  out = tmp_path_factory.mktemp("throughput") / "report.json"
  argv = ["--models", *MODELS, "--repeats", str(REPEATS), "--warmup", "1",
          "--batch-size", str(BATCH_SIZE), "--interval", str(INTERVAL),
          "--reference-epoch-seconds", f"freedom=mg:{REFERENCE_SECONDS}",
          "--reference-eval-seconds", str(REFERENCE_EVAL_SECONDS),
          "--out", str(out), "--log-level", "WARNING"]
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert throughput.main(argv) == 0
  return json.loads(out.read_text()), printed.getvalue()


@pytest.fixture(scope="module")
def batches():
  train_rows = len(make_synthetic_dataset().train.users)
  return -(-train_rows // BATCH_SIZE)


def _numbers(tree, path="report"):
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from _numbers(value, f"{path}.{key}")
  elif isinstance(tree, list):
    for index, value in enumerate(tree):
      yield from _numbers(value, f"{path}[{index}]")
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield path, tree


def _arms(report):
  for model in MODELS:
    for name in throughput.ARMS:
      yield model, name, report["models"][model]["arms"][name]


def test_report_numbers_finite(run):
  report, _ = run
  numbers = list(_numbers(report))
  assert len(numbers) > 50
  for path, value in numbers:
    assert math.isfinite(value), path


def test_report_has_each_model_and_arm(run):
  report, _ = run
  assert list(report["models"]) == list(MODELS)
  for model, name, arm in _arms(report):
    assert arm["config"]["model"] == model
    assert arm["config"]["mg"] == (name == "mg")
    assert arm["config"]["interval"] == INTERVAL
    assert arm["config"]["batch_size"] == BATCH_SIZE


def test_compile_times_positive(run):
  report, _ = run
  for model, name, arm in _arms(report):
    compile_times = arm["epoch_compile"]
    for key in ("lower_seconds", "compile_seconds", "first_call_seconds"):
      assert compile_times[key] > 0, (model, name, key)
    assert compile_times["total_seconds"] == pytest.approx(
        compile_times["lower_seconds"] + compile_times["compile_seconds"])
    assert set(arm["eval_compile_seconds"]) == {"valid", "test"}
    assert all(seconds > 0 for seconds in arm["eval_compile_seconds"].values())


def test_epoch_timings_summarized(run):
  report, _ = run
  for model, name, arm in _arms(report):
    epochs = arm["epoch_seconds"]
    assert len(epochs["values"]) == REPEATS, (model, name)
    assert all(seconds > 0 for seconds in epochs["values"]), (model, name)
    assert epochs["min"] == min(epochs["values"])
    assert epochs["max"] == max(epochs["values"])
    assert epochs["min"] <= epochs["median"] <= epochs["max"]


def test_evaluation_timings_cover_both_splits(run):
  report, _ = run
  for model, name, arm in _arms(report):
    evals = arm["eval_seconds"]
    total = evals["valid_and_test"]["values"]
    assert len(total) == REPEATS, (model, name)
    assert all(seconds > 0 for seconds in total)
    for index in range(REPEATS):
      assert total[index] == pytest.approx(
          evals["valid"]["values"][index] + evals["test"]["values"][index])


def test_theoretical_ratio_for_batch_count(run, batches):
  report, _ = run
  mirror = -(-batches // INTERVAL)
  assert batches % INTERVAL != 0  # so the exact and asymptotic ratios differ
  for model in MODELS:
    entry = report["models"][model]
    assert entry["batches_per_epoch"] == batches
    assert entry["mirror_batches_per_epoch"] == mirror
    assert entry["theoretical_ratio"]["asymptotic"] == pytest.approx((INTERVAL + 1) / INTERVAL)
    assert entry["theoretical_ratio"]["exact"] == pytest.approx((batches + mirror) / batches)


def test_rates_follow_counts(run, batches):
  report, _ = run
  mirror = -(-batches // INTERVAL)
  for model, name, arm in _arms(report):
    median = arm["epoch_seconds"]["median"]
    evaluations = batches + (mirror if name == "mg" else 0)
    assert arm["steps_per_epoch"] == batches
    assert arm["gradient_evaluations_per_epoch"] == evaluations
    assert arm["steps_per_second"] == pytest.approx(batches / median)
    assert arm["gradient_evaluations_per_second"] == pytest.approx(evaluations / median)


def test_measured_ratio_uses_medians(run):
  report, _ = run
  for model in MODELS:
    entry = report["models"][model]
    plain = entry["arms"]["plain"]["epoch_seconds"]
    mg = entry["arms"]["mg"]["epoch_seconds"]
    ratio = entry["measured_ratio"]
    assert ratio["of_medians"] > 0
    assert ratio["of_medians"] == pytest.approx(mg["median"] / plain["median"])
    assert ratio["paired"] == pytest.approx(
        [m / p for p, m in zip(plain["values"], mg["values"])])


def test_losses_recorded(run):
  report, _ = run
  for model, name, arm in _arms(report):
    assert arm["last_epoch_loss"] is not None, (model, name)
    assert arm["last_epoch_loss"] > 0


def test_reference_speedup(run):
  report, _ = run
  arm = report["models"]["freedom"]["arms"]["mg"]
  assert arm["reference_epoch_seconds"] == REFERENCE_SECONDS
  assert arm["speedup_vs_reference"] == pytest.approx(
      REFERENCE_SECONDS / arm["epoch_seconds"]["median"])
  assert "speedup_vs_reference" not in report["models"]["freedom"]["arms"]["plain"]


def test_reference_eval_speedup(run):
  report, printed = run
  for model, name, arm in _arms(report):
    evals = arm["eval_seconds"]["valid_and_test"]
    assert arm["eval_speedup_vs_reference"] == pytest.approx(
        REFERENCE_EVAL_SECONDS / evals["median"]), (model, name)
  assert "eval speed-up vs reference" in printed


def test_environment_recorded(run):
  report, _ = run
  env = report["environment"]
  assert env["jax_version"] == jax.__version__
  assert env["backend"] == jax.default_backend()
  assert env["device_count"] == len(env["devices"]) >= 1
  assert env["cpu_count"] >= 1
  assert env["command"].startswith("python -m benchmarks.throughput --models freedom")
  assert env["date"].endswith("+00:00")
  assert report["dataset"]["name"] == "synthetic"


def test_memory_reported_or_null(run):
  report, _ = run
  memory = report["memory"]
  assert memory["process_peak_rss_bytes"] > 2**20
  peak = memory["device_peak_bytes_in_use"]
  if peak is None:
    assert "null" in memory["device_note"]
  else:
    assert peak > 0
  for model, name, arm in _arms(report):
    if arm["epoch_xla_memory"] is not None:
      assert arm["epoch_xla_memory"]["argument_size_in_bytes"] > 0, (model, name)


def test_table_has_row_per_arm(run):
  report, printed = run
  lines = printed.splitlines()
  assert lines[0].startswith("| model | arm | compile s | epoch s median (min-max) |")
  assert lines[0].rstrip().endswith("| speed-up vs reference | eval speed-up vs reference |")
  rows = [line for line in lines if line.startswith("| freedom |")]
  assert len(rows) == len(MODELS) * len(throughput.ARMS)
  mg_row = next(row for row in rows if row.startswith("| freedom | MG (gradient)"))
  ratio = report["models"]["freedom"]["measured_ratio"]["of_medians"]
  assert f"| {ratio:.3f} |" in mg_row
  assert f"(N={report['models']['freedom']['batches_per_epoch']})" in mg_row
  assert "Process peak RSS" in printed


@pytest.mark.parametrize("batches, interval, mirror", [
    (12, 5, 3), (12, 3, 4), (12, 1, 12), (1, 3, 1), (3, 5, 1), (10, 10, 1),
])
def test_mirror_batches_per_epoch(batches, interval, mirror):
  assert throughput.mirror_batches_per_epoch(batches, interval) == mirror


def test_mirror_batches_rejects_zero():
  with pytest.raises(ValueError, match="invalid batches=0"):
    throughput.mirror_batches_per_epoch(0, 3)


def test_theoretical_ratio_whole_cycles():
  ratios = throughput.theoretical_ratios(30, 3)
  assert ratios["exact"] == pytest.approx(4 / 3)
  assert ratios["asymptotic"] == pytest.approx(4 / 3)


def test_parse_reference_valid():
  assert throughput.parse_reference("freedom=mg:3.25") == ("freedom", "mg", 3.25)


@pytest.mark.parametrize("text", [
    "bpr=mg:1", "freedom=adam:1", "freedom=mg:", "freedom=mg:abc", "freedom=mg:-1",
    "freedom=mg:nan", "freedom:mg=1",
])
def test_parse_reference_invalid(text):
  with pytest.raises(argparse.ArgumentTypeError, match="invalid reference"):
    throughput.parse_reference(text)


def test_cli_rejects_bad_reference(capsys):
  with pytest.raises(SystemExit) as exit_info:
    throughput.main(["--reference-epoch-seconds", "vbpr=fast:1"])
  assert exit_info.value.code == 2
  assert "invalid reference 'vbpr=fast:1'" in capsys.readouterr().err


def test_measure_model_rejects_swapped_arms():
  dataset = make_synthetic_dataset()
  plain = TrainConfig(model="vbpr", mg=False)
  mg = TrainConfig(model="vbpr", mg=True)
  with pytest.raises(ValueError, match="expected plain.mg=False and mg.mg=True"):
    throughput.measure_model(dataset, mg, plain)


def test_measure_model_rejects_two_models():
  dataset = make_synthetic_dataset()
  with pytest.raises(ValueError, match="different models"):
    throughput.measure_model(dataset, TrainConfig(model="vbpr"),
                             TrainConfig(model="lightgcn", mg=True))


def test_measure_model_rejects_batch_mismatch():
  dataset = make_synthetic_dataset()
  with pytest.raises(ValueError, match="batch sizes differ"):
    throughput.measure_model(dataset, TrainConfig(model="vbpr", batch_size=512),
                             TrainConfig(model="vbpr", mg=True, batch_size=1024))
