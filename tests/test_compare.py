"""Tests of the seed-paired comparison of plain and MG training (benchmarks.compare)."""

import contextlib
import dataclasses
import io
import json
import logging
import math

import numpy as np
import pytest

from benchmarks import compare, stats
from models.synthetic import make_synthetic_dataset
from models.train import TrainConfig

SUMMARY_METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
# lr 0.01 with patience 0 makes the two MG seeds stop at different epochs on the default
# synthetic data, so the vmap run keeps training a seed whose results are already final.
TINY_RUN = ["--models", "lightgcn", "--seeds", "2", "--epochs", "6", "--patience", "0",
            "--lr", "0.01", "--no-progress", "--log-level", "WARNING"]


@pytest.fixture(scope="module")
def vmap_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("vmap")
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert compare.main([*TINY_RUN, "--out", str(out)]) == 0
  return out, json.loads((out / "compare.json").read_text()), printed.getvalue()


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("loop")
  assert compare.main([*TINY_RUN, "--seed-mode", "loop", "--out", str(out)]) == 0
  return json.loads((out / "compare.json").read_text())


def test_paired_difference_known_values():
  difference = stats.paired_difference([0.3, 0.5, 0.4, math.nan], [0.1, 0.2, 0.4, 0.3])

  assert difference.count == 3
  assert difference.wins == 2
  assert difference.win_fraction == pytest.approx(2 / 3)
  assert difference.mean == pytest.approx(0.5 / 3)
  assert difference.std == pytest.approx(np.std([0.2, 0.3, 0.0], ddof=1))
  half_width = 4.302652729911275 * difference.std / math.sqrt(3)  # t(0.975, df=2)
  assert difference.low == pytest.approx(difference.mean - half_width)
  assert difference.high == pytest.approx(difference.mean + half_width)


def test_paired_difference_single_pair_has_no_interval():
  difference = stats.paired_difference([0.5], [0.4])

  assert difference.count == 1
  assert difference.mean == pytest.approx(0.1)
  assert math.isnan(difference.std)
  assert math.isnan(difference.low)
  assert math.isnan(difference.high)


def test_seed_run_non_finite_loss_keeps_best(caplog):
  run = compare.SeedRun(7, valid_metric="recall@20", patience=3)
  assert run.record(0, 0.7, {"recall@20": 0.1})
  assert run.record(1, 0.6, {"recall@20": 0.2})
  run.set_test({"recall@20": 0.25})

  with caplog.at_level(logging.ERROR, logger="benchmarks.compare"):
    assert not run.record(2, math.nan, {"recall@20": 0.0})

  assert not run.active
  assert "epoch 2" in run.stop_reason
  assert "seed 7" in caplog.text
  assert "epoch 2" in caplog.text
  assert run.best_epoch == 1
  assert run.test == {"recall@20": 0.25}
  assert run.epochs == [0, 1]
  with pytest.raises(RuntimeError, match="seed 7 already stopped"):
    run.record(3, 0.5, {"recall@20": 0.3})


def test_seed_run_early_stopping_rounds_to_4_decimals():
  run = compare.SeedRun(1, valid_metric="recall@20", patience=1)

  assert run.record(0, 0.7, {"recall@20": 0.10001})
  assert not run.record(1, 0.6, {"recall@20": 0.10004})  # equal after rounding
  assert run.active
  assert not run.record(2, 0.5, {"recall@20": 0.09})

  assert not run.active
  assert run.stop_reason.startswith("early stopping")
  assert run.best_epoch == 0


def test_cli_writes_report_files(vmap_run):
  out, report, printed = vmap_run

  markdown = (out / "compare.md").read_text()
  assert markdown.startswith("# Mirror Gradient comparison")
  assert "| mg-gradient |" in markdown
  assert markdown in printed
  assert (out / "valid_recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  for key in ("command", "date", "jax", "dataset", "seeds", "seed_mode", "arms", "models"):
    assert key in report
  assert report["seeds"] == [999, 1000]
  assert report["jax"]["backend"]
  assert set(report["models"]["lightgcn"]["arms"]) == {"plain", "mg-gradient"}


def test_cli_report_seed_results_are_finite(vmap_run):
  _, report, _ = vmap_run

  for arm in report["models"]["lightgcn"]["arms"].values():
    assert arm["wall_seconds"] > 0
    assert len(arm["seeds"]) == 2
    for run in arm["seeds"]:
      assert run["best_epoch"] is not None
      assert run["best_valid"]["recall@20"] == max(run["history"]["valid_recall@20"])
      assert len(run["history"]["loss"]) == run["epochs_run"]
      for metric in SUMMARY_METRICS:
        assert math.isfinite(run["test"][metric])
    for metric in SUMMARY_METRICS:
      summary = arm["summary"][metric]
      assert math.isfinite(summary["mean"])
      assert summary["std"] >= 0
      assert summary["count"] == 2


def test_cli_report_paired_differences(vmap_run):
  _, report, _ = vmap_run
  model = report["models"]["lightgcn"]

  assert set(model["differences"]) == {"mg-gradient"}
  for metric, difference in model["differences"]["mg-gradient"].items():
    mg = [run["test"][metric] for run in model["arms"]["mg-gradient"]["seeds"]]
    plain = [run["test"][metric] for run in model["arms"]["plain"]["seeds"]]
    assert difference["mean"] == pytest.approx(np.mean(np.subtract(mg, plain)))
    assert difference["low"] <= difference["mean"] <= difference["high"]
    assert 0 <= difference["win_fraction"] <= 1
    assert difference["wins"] == sum(m > p for m, p in zip(mg, plain))


def test_vmap_equals_loop(vmap_run, loop_run):
  _, vmapped, _ = vmap_run
  stopped_at = set()
  for arm_name in ("plain", "mg-gradient"):
    vmap_seeds = vmapped["models"]["lightgcn"]["arms"][arm_name]["seeds"]
    loop_seeds = loop_run["models"]["lightgcn"]["arms"][arm_name]["seeds"]
    for vmap_seed, loop_seed in zip(vmap_seeds, loop_seeds):
      assert vmap_seed["seed"] == loop_seed["seed"]
      assert vmap_seed["best_epoch"] == loop_seed["best_epoch"]
      assert vmap_seed["epochs_run"] == loop_seed["epochs_run"]
      assert vmap_seed["stop_reason"] == loop_seed["stop_reason"]
      for metric in SUMMARY_METRICS:
        assert vmap_seed["test"][metric] == pytest.approx(loop_seed["test"][metric], rel=1e-4)
      np.testing.assert_allclose(vmap_seed["history"]["valid_recall@20"],
                                 loop_seed["history"]["valid_recall@20"], rtol=1e-4)
      np.testing.assert_allclose(vmap_seed["history"]["loss"], loop_seed["history"]["loss"],
                                 rtol=1e-4)
      stopped_at.add(vmap_seed["epochs_run"])
  # Seeds that stop at different epochs exercise the per-seed stopping of the vmap run.
  assert len(stopped_at) > 1


def test_arms_see_same_batches_per_seed():
  # With SGD (no optimizer state) and ascent scale 0, an MG mirror batch adds a zero
  # update, so MG equals plain training exactly when both see the same batches.
  dataset = make_synthetic_dataset(num_users=150, num_items=80)
  config = TrainConfig(model="lightgcn", optimizer="sgd", learning_rate=0.5, epochs=3,
                       patience=5, batch_size=256, ascent_scale=0.0)
  seeds = [3, 3, 4]
  plain = compare.train_arm(dataset, config, seeds, seed_mode="loop", progress=False)
  mirror = compare.train_arm(dataset, dataclasses.replace(config, mg=True), seeds,
                             seed_mode="loop", progress=False)

  for plain_run, mirror_run in zip(plain.runs, mirror.runs):
    assert plain_run.best_epoch == mirror_run.best_epoch
    for metric in SUMMARY_METRICS:
      assert mirror_run.test[metric] == pytest.approx(plain_run.test[metric], rel=1e-5)
  assert plain.runs[0].test == plain.runs[1].test
  assert plain.runs[0].valid == plain.runs[1].valid
  assert plain.runs[0].valid != plain.runs[2].valid


@pytest.mark.parametrize("arguments, message", [
    (["--seed-list", "1", "1"], "seeds must be distinct"),
    (["--seed-list", "1", "--seeds", "2"], "not allowed with --seeds"),
    (["--mg-placement", "update"], "each arm sets its own placement"),
    (["--arms", "plain", "plain"], "arms must be distinct"),
    (["--confidence", "1.5"], "expected a number in (0, 1)"),
])
def test_cli_rejects_bad_arguments(arguments, message, capsys):
  with pytest.raises(SystemExit):
    compare.main(["--models", "lightgcn", *arguments])
  assert message in capsys.readouterr().err
