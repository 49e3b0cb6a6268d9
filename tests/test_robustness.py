"""Tests of the feature perturbations and the robustness benchmark."""

from __future__ import annotations

import hashlib
import json
import math

import jax
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from benchmarks import robustness
from benchmarks import train as train_cli
from benchmarks.perturb import (
    ALL_MODALITIES,
    Perturbation,
    choose_items,
    perturb_features,
    random_derangement,
    standard_perturbations,
)
from models.freedom import knn_item_graph
from models.synthetic import make_synthetic_dataset
from models.train import TrainConfig, TrainingProgram


def unique_row_features(num_items=101, dims=(3, 5)):
    """Two modalities whose rows are all distinct, so a moved row can be traced back."""
    rng = np.random.default_rng(0)
    return {
        name: rng.normal(size=(num_items, dim)).astype(np.float32)
        for name, dim in zip(("image", "text"), dims)
    }


def digest(features):
    hasher = hashlib.sha256()
    for name in sorted(features):
        hasher.update(name.encode())
        hasher.update(np.ascontiguousarray(features[name]).tobytes())
    return hasher.hexdigest()


def state_copy(state):
    return jax.tree.map(lambda leaf: np.array(leaf, copy=True), state)


def states_equal(first, second):
    pairs = jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)), first, second))
    return all(pairs)


@pytest.fixture(scope="module")
def small_dataset():
    return make_synthetic_dataset(num_users=200, num_items=120, seed=3)


@pytest.fixture(scope="module")
def programs(small_dataset):
    """An untrained program and initial parameters per model, built once for the file."""
    built = {}
    for model in ("vbpr", "freedom", "lightgcn"):
        program = TrainingProgram(small_dataset, TrainConfig(model=model, eval_chunk_size=256))
        built[model] = (program, program.init(0).params)
    return built


# ----------------------------------------------------------------------------------------
# Perturbations


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_noise_std_scales_per_dimension(scale):
    rng = np.random.default_rng(1)
    column_scales = np.array([0.5, 2.0, 10.0, 0.0])
    features = {"image": (rng.normal(size=(20000, 4)) * column_scales).astype(np.float32)}
    perturbed = perturb_features(features, Perturbation("noise", scale, "image"), seed=0)
    noise = perturbed["image"].astype(np.float64) - features["image"]
    expected = scale * features["image"].astype(np.float64).std(axis=0)

    np.testing.assert_allclose(noise.std(axis=0)[:3], expected[:3], rtol=0.03)
    assert np.all(noise[:, 3] == 0.0)  # a constant dimension gets no noise
    assert abs(noise.mean()) < 0.05 * scale * 10.0
    assert perturbed["image"].dtype == np.float32


def test_noise_targets_one_modality():
    features = unique_row_features()
    perturbed = perturb_features(features, Perturbation("noise", 0.5, "image"), seed=0)
    assert not np.array_equal(perturbed["image"], features["image"])
    assert np.array_equal(perturbed["text"], features["text"])

    both = perturb_features(features, Perturbation("noise", 0.5, ALL_MODALITIES), seed=0)
    assert not np.array_equal(both["image"], features["image"])
    assert not np.array_equal(both["text"], features["text"])


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5])
def test_replace_deranges_chosen_rows(fraction):
    features = unique_row_features()
    num_items = 101
    perturbed = perturb_features(features, Perturbation("replace", fraction, ALL_MODALITIES), seed=4)

    changed = np.flatnonzero(np.any(perturbed["image"] != features["image"], axis=1))
    assert changed.size == round(fraction * num_items)
    # Every modality is replaced on the same items, as one broken item record.
    changed_text = np.flatnonzero(np.any(perturbed["text"] != features["text"], axis=1))
    assert np.array_equal(changed, changed_text)

    for item in changed:
        matches = np.flatnonzero(np.all(features["image"] == perturbed["image"][item], axis=1))
        assert matches.size == 1
        source = matches[0]
        assert source != item
        assert np.array_equal(perturbed["text"][item], features["text"][source])
    sources = [np.flatnonzero(np.all(features["image"] == perturbed["image"][i], axis=1))[0]
               for i in changed]
    assert sorted(sources) == sorted(changed)


def test_replace_single_item():
    features = unique_row_features(num_items=10)
    for seed in range(20):
        perturbed = perturb_features(features, Perturbation("replace", 0.1, "image"), seed=seed)
        changed = np.flatnonzero(np.any(perturbed["image"] != features["image"], axis=1))
        assert changed.size == 1
        assert np.array_equal(perturbed["text"], features["text"])


def test_zero_clears_chosen_rows():
    features = unique_row_features()
    perturbation = Perturbation("zero", 0.3, ALL_MODALITIES)
    perturbed = perturb_features(features, perturbation, seed=2)
    zeroed = np.flatnonzero(np.all(perturbed["image"] == 0, axis=1))

    assert zeroed.size == round(0.3 * 101)
    assert np.array_equal(zeroed, np.flatnonzero(np.all(perturbed["text"] == 0, axis=1)))
    kept = np.setdiff1d(np.arange(101), zeroed)
    assert np.array_equal(perturbed["image"][kept], features["image"][kept])
    assert np.array_equal(perturbed["text"][kept], features["text"][kept])

    only_text = perturb_features(features, Perturbation("zero", 0.3, "text"), seed=2)
    assert np.array_equal(only_text["image"], features["image"])
    assert np.flatnonzero(np.all(only_text["text"] == 0, axis=1)).size == round(0.3 * 101)


def test_perturbations_copy_inputs():
    features = unique_row_features()
    before = {name: values.copy() for name, values in features.items()}
    for perturbation in standard_perturbations(features):
        perturb_features(features, perturbation, seed=0)
    for name in features:
        assert np.array_equal(features[name], before[name])


def test_perturbations_are_seeded():
    features = unique_row_features()
    for family, strength in (("noise", 0.3), ("replace", 0.3), ("zero", 0.3)):
        perturbation = Perturbation(family, strength, ALL_MODALITIES)
        first = perturb_features(features, perturbation, seed=7)
        again = perturb_features(features, perturbation, seed=7)
        other_seed = perturb_features(features, perturbation, seed=8)
        assert digest(first) == digest(again)
        assert digest(first) != digest(other_seed)

    # Different perturbations draw independently: zeroing 30% of image rows and 30% of
    # all rows picks different items for the same seed.
    image_only = perturb_features(features, Perturbation("zero", 0.3, "image"), seed=7)
    all_modalities = perturb_features(features, Perturbation("zero", 0.3, ALL_MODALITIES), seed=7)
    assert not np.array_equal(image_only["image"], all_modalities["image"])


def test_derangement_has_no_fixed_point():
    rng = np.random.default_rng(0)
    for size in range(2, 40):
        permutation = random_derangement(size, rng)
        assert sorted(permutation) == list(range(size))
        assert not np.any(permutation == np.arange(size))
    with pytest.raises(ValueError, match="one item"):
        random_derangement(1, rng)


def test_choose_items_count():
    rng = np.random.default_rng(0)
    for num_items, fraction in ((101, 0.1), (101, 0.5), (7, 0.3), (50, 1.0), (50, 0.0)):
        items = choose_items(num_items, fraction, rng)
        assert items.size == round(fraction * num_items)
        assert np.unique(items).size == items.size
        assert items.min(initial=0) >= 0
        assert items.max(initial=0) < num_items


def test_standard_perturbations_targets():
    perturbations = standard_perturbations(["text", "image"])
    names = [p.name for p in perturbations]
    assert len(names) == len(set(names)) == (4 + 3 + 3) * 3
    assert {p.target for p in perturbations} == {"image", "text", ALL_MODALITIES}
    assert "noise/all/s=0.3" in names
    assert "replace/image/p=0.5" in names

    single = standard_perturbations(["audio"])
    assert {p.target for p in single} == {ALL_MODALITIES}
    assert len(single) == 10
    assert standard_perturbations([]) == []


def test_invalid_perturbations_raise():
    with pytest.raises(ValueError, match="family"):
        Perturbation("blur", 0.1)
    with pytest.raises(ValueError, match="fraction"):
        Perturbation("zero", 1.5)
    with pytest.raises(ValueError, match="strength"):
        Perturbation("noise", -0.1)
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        perturb_features(unique_row_features(), Perturbation("noise", 0.1, "audio"), seed=0)


# ----------------------------------------------------------------------------------------
# Statistics


def test_t_interval_student_t():
    summary = robustness.t_interval([1.0, 2.0, 3.0])
    assert summary["mean"] == pytest.approx(2.0)
    assert summary["n"] == 3
    assert summary["half_width"] == pytest.approx(scipy.stats.t.ppf(0.975, 2) / math.sqrt(3))

    single = robustness.t_interval([0.5])
    assert single["mean"] == 0.5
    assert math.isnan(single["half_width"])
    assert robustness.t_interval([1.0, float("nan"), 3.0])["n"] == 2


def test_relative_drop_sign():
    assert robustness.relative_drop(0.2, 0.15) == pytest.approx(0.25)
    assert robustness.relative_drop(0.2, 0.25) == pytest.approx(-0.25)
    assert math.isnan(robustness.relative_drop(0.0, 0.1))


# ----------------------------------------------------------------------------------------
# Inference with perturbed features


def strong_noise(dataset):
    return perturb_features(dataset.features, Perturbation("noise", 3.0, ALL_MODALITIES), seed=0)


@pytest.mark.parametrize("model", ["vbpr", "freedom"])
def test_perturbed_features_change_metrics(programs, small_dataset, model):
    program, params = programs[model]
    constants_before = state_copy(program.data.constants)
    params_before = state_copy(params)

    clean = program.evaluate(params, "test")
    reproduced = robustness.evaluate_with_features(program, params, small_dataset.features)
    noisy_features = strong_noise(small_dataset)
    noisy = robustness.evaluate_with_features(program, params, noisy_features)

    assert reproduced == clean
    assert noisy["recall@20"] != clean["recall@20"]
    assert noisy["ndcg@20"] != clean["ndcg@20"]
    # set_item_features acts on a copy: the program and the trained parameters stay.
    assert states_equal(constants_before, program.data.constants)
    assert states_equal(params_before, params)


def test_vbpr_embed_uses_new_features(programs, small_dataset):
    program, params = programs["vbpr"]
    noisy_features = strong_noise(small_dataset)
    new_params, data = robustness.with_item_features(program, params, noisy_features)
    model = program.model(new_params, data.constants)

    expected = np.concatenate([noisy_features[name] for name in model.modalities], axis=1)
    np.testing.assert_array_equal(np.asarray(model.item_features[...]), expected)
    _, clean_items = program.model(params, program.data.constants).embed()
    _, noisy_items = model.embed()
    assert not np.allclose(np.asarray(clean_items), np.asarray(noisy_items))


def test_freedom_embed_uses_new_graph(programs, small_dataset):
    program, params = programs["freedom"]
    noisy_features = strong_noise(small_dataset)
    new_params, data = robustness.with_item_features(program, params, noisy_features)
    model = program.model(new_params, data.constants)

    expected = knn_item_graph(noisy_features, dict(model.modality_weights), model.knn_k)
    np.testing.assert_array_equal(np.asarray(model.item_graph_cols[...]), np.asarray(expected.cols))
    clean_model = program.model(params, program.data.constants)
    assert not np.array_equal(np.asarray(clean_model.item_graph_cols[...]),
                              np.asarray(model.item_graph_cols[...]))
    _, clean_items = clean_model.embed()
    _, noisy_items = model.embed()
    assert not np.allclose(np.asarray(clean_items), np.asarray(noisy_items))


def test_lightgcn_metrics_ignore_features(programs, small_dataset):
    program, params = programs["lightgcn"]
    clean = program.evaluate(params, "test")
    assert robustness.evaluate_with_features(program, params, strong_noise(small_dataset)) == clean


def test_lightgcn_flagged_unaffected(programs, small_dataset):
    program, params = programs["lightgcn"]
    runs = [robustness.TrainedRun("lightgcn", "plain", 0, params, program, None, 0, "", "test")]
    perturbations = [Perturbation("noise", 1.0), Perturbation("zero", 0.5, "image")]
    result = robustness.measure_model(small_dataset, runs, perturbations, ["recall@20"], None,
                                      progress=False)

    assert result["unaffected"] is True
    assert result["note"] == robustness.UNAFFECTED_NOTE
    record = result["runs"][0]
    for perturbation in perturbations:
        assert record["perturbed"][perturbation.name] == record["clean"]
        assert record["relative_drop"][perturbation.name]["recall@20"] == 0.0


# ----------------------------------------------------------------------------------------
# Command line, end to end

SMALL_GRID = ["--noise-scales", "1.0", "--fractions", "0.5", "--flatness-probes", "4",
              "--flatness-iterations", "4", "--flatness-steps", "2", "--flatness-batches", "2",
              "--flatness-batch-size", "512", "--no-progress", "--log-level", "WARNING"]


def assert_finite_numbers(tree, path="report"):
    if isinstance(tree, dict):
        for key, value in tree.items():
            assert_finite_numbers(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            assert_finite_numbers(value, f"{path}[{index}]")
    elif isinstance(tree, float):
        assert math.isfinite(tree), path


def test_main_writes_paired_report(tmp_path, monkeypatch, capsys):
    calls = []
    evaluate = robustness.evaluate_with_features

    def recording_evaluate(program, params, features, split="test"):
        calls.append((robustness.arm_name(program.config), digest(features)))
        return evaluate(program, params, features, split)

    monkeypatch.setattr(robustness, "evaluate_with_features", recording_evaluate)
    out = tmp_path / "report"
    code = robustness.main(["--models", "vbpr", "--seeds", "2", "--epochs", "3", "--first-seed", "5",
                            "--out", str(out)] + SMALL_GRID)
    assert code == 0

    for name in ("robustness.json", "robustness.md", "robustness.png"):
        assert (out / name).stat().st_size > 0
    printed = capsys.readouterr().out
    assert "## vbpr: recall@20" in printed
    assert "## vbpr: ndcg@20" in printed

    report = json.loads((out / "robustness.json").read_text())
    assert report["arms"] == ["plain", "mg-gradient"]
    assert report["seeds"] == [5, 6]
    names = report["perturbation_names"]
    assert len(names) == 3 * 3  # one strength per family, on image, text and all
    result = report["models"]["vbpr"]
    assert result["unaffected"] is False
    assert len(result["runs"]) == 4
    assert_finite_numbers(report)
    for record in result["runs"]:
        assert set(record["perturbed"]) == set(names)
        for metric in ("recall@20", "ndcg@20"):
            assert 0 < record["clean"][metric] <= 1
            assert record["relative_drop"]["noise/all/s=1"][metric] is not None
        assert record["flatness"]["hessian_trace_num_probes"] == 4
        assert record["flatness"]["sharpness_rho"] == 0.05
    difference = result["drop_difference"]["replace/all/p=0.5"]["mg-gradient - plain"]["recall@20"]
    assert difference["n"] == 2
    assert difference["half_width"] is not None
    assert set(result["flatness_difference"]["mg-gradient - plain"]) == set(robustness.FLATNESS_KEYS)

    # Paired: every arm was evaluated on the same perturbed features, one set per
    # (seed, perturbation).
    by_arm = {}
    for arm, features_digest in calls:
        by_arm.setdefault(arm, []).append(features_digest)
    assert set(by_arm) == {"plain", "mg-gradient"}
    assert by_arm["plain"] == by_arm["mg-gradient"]
    assert len(set(by_arm["plain"])) == 2 * len(names)


def test_main_restores_trainer_runs(tmp_path):
    run_dir = tmp_path / "run"
    assert train_cli.main(["--model", "vbpr", "--epochs", "2", "--seed", "3", "--out",
                           str(run_dir), "--no-progress", "--log-level", "WARNING"]) == 0
    trained = json.loads((run_dir / "results.json").read_text())

    out = tmp_path / "report"
    assert robustness.main(["--from-runs", str(run_dir), "--no-flatness", "--out", str(out)]
                           + SMALL_GRID) == 0
    report = json.loads((out / "robustness.json").read_text())
    record = report["models"]["vbpr"]["runs"][0]
    assert (record["arm"], record["seed"], record["source"]) == ("plain", 3, str(run_dir.resolve()))
    assert record["clean"]["recall@20"] == pytest.approx(trained["test"]["recall@20"], abs=1e-6)
    assert "flatness" not in record


def test_main_rejects_missing_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        robustness.main(["--from-runs", str(tmp_path / "absent"), "--out", str(tmp_path / "o")])
    assert "results.json: not found" in capsys.readouterr().err
