"""Tests of the MMRec dataset loader and the Dataset container."""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models import data
from models.data import Dataset, DatasetError, load_dataset

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# users, items, train, valid, test as stated for the shared copies (before any drop).
SHARED_COUNTS = {
    "tiktok": (9308, 6710, 59541, 3051, 6130),
    "baby": (19445, 7050, 118551, 21682, 20559),
    "sports": (35598, 18357, 218409, 40029, 37899),
    "clothing": (39387, 23033, 197338, 41189, 40150),
}


def shared_folder(name: str) -> Path:
    folder = DATA_ROOT / name
    if not (folder / f"{name}.inter").is_file():
        pytest.skip(f"shared dataset folder {folder} is not available")
    return folder


def write_folder(tmp_path: Path, inter_text: str, features=None, name="toy") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / f"{name}.inter").write_text(inter_text)
    for modality, values in (features or {}).items():
        np.save(folder / f"{modality}_feat.npy", values)
    return folder


# 3 users, 4 items; user 2 has no training row.
TOY_INTER = (
    "userID\titemID\tx_label\n"
    "0\t0\t0\n"
    "0\t1\t0\n"
    "0\t2\t1\n"
    "1\t3\t0\n"
    "1\t1\t2\n"
    "2\t0\t2\n"
)


def test_tiktok_counts_and_dropped_rows(caplog):
    folder = shared_folder("tiktok")
    users, items, train, valid, test = SHARED_COUNTS["tiktok"]

    raw = pd.read_csv(folder / "tiktok.inter", sep="\t")
    trained_users = set(raw.loc[raw.x_label == 0, "userID"])
    orphan = raw[~raw.userID.isin(trained_users)]
    assert orphan.userID.nunique() == 10
    dropped_valid = int((orphan.x_label == 1).sum())
    dropped_test = int((orphan.x_label == 2).sum())

    with caplog.at_level(logging.INFO, logger="models.data"):
        dataset = load_dataset(folder)

    assert dataset.name == "tiktok"
    assert (dataset.num_users, dataset.num_items) == (users, items)
    assert dataset.train.users.size == train
    assert dataset.valid.users.size == valid - dropped_valid
    assert dataset.test.users.size == test - dropped_test
    messages = [record.getMessage() for record in caplog.records]
    expected = (
        f"tiktok: dropped {dropped_valid} validation and {dropped_test} test rows of 10 users"
    )
    assert any(expected in message for message in messages), messages


def test_tiktok_features_float32_read_only():
    folder = shared_folder("tiktok")
    dataset = load_dataset(folder)

    assert sorted(dataset.features) == ["audio", "image"]
    for modality, values in dataset.features.items():
        assert values.dtype == np.float32
        assert values.shape == (6710, 128)
        assert not values.flags.writeable
        raw = np.load(folder / f"{modality}_feat.npy")
        np.testing.assert_array_equal(values, raw.astype(np.float32))


def test_tiktok_modality_subset():
    dataset = load_dataset(shared_folder("tiktok"), modalities=["image"])
    assert list(dataset.features) == ["image"]
    assert load_dataset(shared_folder("tiktok"), modalities=()).features == {}


@pytest.mark.parametrize("name", ["baby", "sports", "clothing"])
def test_amazon_counts(name, caplog):
    users, items, train, valid, test = SHARED_COUNTS[name]
    with caplog.at_level(logging.INFO, logger="models.data"):
        dataset = load_dataset(shared_folder(name))

    assert (dataset.num_users, dataset.num_items) == (users, items)
    assert dataset.train.users.size == train
    assert dataset.valid.users.size == valid
    assert dataset.test.users.size == test
    assert dataset.features == {}
    assert not any("dropped" in record.getMessage() for record in caplog.records)


def test_toy_dataset_structure(tmp_path):
    dataset = load_dataset(write_folder(tmp_path, TOY_INTER))

    assert (dataset.num_users, dataset.num_items) == (3, 4)
    np.testing.assert_array_equal(dataset.train.users, [0, 0, 1])
    np.testing.assert_array_equal(dataset.train.items, [0, 1, 3])
    np.testing.assert_array_equal(dataset.train_indptr, [0, 2, 3, 3])
    np.testing.assert_array_equal(dataset.train_indices, [0, 1, 3])
    np.testing.assert_array_equal(dataset.item_pool, [0, 1, 3])
    np.testing.assert_array_equal(dataset.user_train_items(0), [0, 1])
    assert dataset.user_train_items(2).size == 0
    assert dataset.train.users.dtype == np.int32
    assert dataset.train_indptr.dtype == np.int64


def test_toy_drops_rows_of_untrained_user(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="models.data"):
        dataset = load_dataset(write_folder(tmp_path, TOY_INTER))

    np.testing.assert_array_equal(dataset.valid.users, [0])
    np.testing.assert_array_equal(dataset.test.users, [1])
    assert "toy: dropped 0 validation and 1 test rows of 1 users" in caplog.text


def test_arrays_read_only(tmp_path):
    dataset = load_dataset(write_folder(tmp_path, TOY_INTER))
    for array in (dataset.train.users, dataset.test.items, dataset.train_indptr, dataset.item_pool):
        with pytest.raises(ValueError):
            array[0] = 1
    with pytest.raises(TypeError):
        dataset.features["image"] = np.zeros((4, 2), np.float32)


def test_rows_sorted_by_user_and_item(tmp_path):
    text = "userID\titemID\tx_label\n1\t2\t0\n0\t3\t0\n1\t0\t0\n0\t1\t0\n"
    dataset = load_dataset(write_folder(tmp_path, text))
    np.testing.assert_array_equal(dataset.train.users, [0, 0, 1, 1])
    np.testing.assert_array_equal(dataset.train.items, [1, 3, 0, 2])


def test_extra_columns_ignored(tmp_path):
    text = (
        "rating\titemID\ttimestamp\tuserID\tx_label\n"
        "5\t0\t1600000000\t0\t0\n"
        "3.5\t1\t1600000001\t0\t1\n"
        "1\t1\t1600000002\t1\t0\n"
    )
    dataset = load_dataset(write_folder(tmp_path, text))
    np.testing.assert_array_equal(dataset.train.users, [0, 1])
    np.testing.assert_array_equal(dataset.train.items, [0, 1])
    np.testing.assert_array_equal(dataset.valid.items, [1])


def test_features_converted_to_float32(tmp_path):
    features = {
        "image": np.arange(8, dtype=np.float16).reshape(4, 2),
        "text": np.ones((4, 3), dtype=np.float64),
    }
    dataset = load_dataset(write_folder(tmp_path, TOY_INTER, features))
    assert sorted(dataset.features) == ["image", "text"]
    assert all(values.dtype == np.float32 for values in dataset.features.values())
    np.testing.assert_array_equal(dataset.features["image"], features["image"].astype(np.float32))


def test_name_selects_inter_file(tmp_path):
    folder = write_folder(tmp_path, TOY_INTER)
    (folder / "other.inter").write_text("userID\titemID\tx_label\n0\t0\t0\n")
    assert load_dataset(folder).name == "toy"  # <folder name>.inter preferred
    other = load_dataset(folder, name="other")
    assert (other.name, other.num_users, other.num_items) == ("other", 1, 1)
    assert load_dataset(folder / "other.inter").name == "other"


def test_with_features_validates(tmp_path):
    dataset = load_dataset(write_folder(tmp_path, TOY_INTER))
    updated = dataset.with_features({"image": np.ones((4, 5), np.float64)})
    assert updated.features["image"].dtype == np.float32
    assert dataset.features == {}
    with pytest.raises(DatasetError, match="3 rows"):
        dataset.with_features({"image": np.ones((3, 5))})


def test_stats_and_summary(tmp_path):
    dataset = load_dataset(
        write_folder(tmp_path, TOY_INTER, {"image": np.ones((4, 2), np.float16)})
    )
    stats = dataset.stats()
    assert stats["users"] == 3
    assert (stats["train"], stats["valid"], stats["test"]) == (3, 1, 1)
    assert stats["density"] == pytest.approx(5 / 12)
    assert stats["modalities"] == {"image": 2}
    assert "3 users, 4 items" in dataset.summary()


def test_main_prints_table(tmp_path, capsys):
    folder = write_folder(tmp_path, TOY_INTER)
    assert data.main([str(folder)]) == 0
    output = capsys.readouterr().out
    assert "| toy | 3 | 4 | 5 | 3 | 1 | 1 |" in output


# --- invalid input: each case names the file and the offending value ---


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder not found"):
        load_dataset(tmp_path / "absent")


def test_missing_inter_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no .inter file found"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="named.inter"):
        load_dataset(tmp_path / "empty", name="named")


def test_missing_column(tmp_path):
    folder = write_folder(tmp_path, "userID\titemID\n0\t0\n")
    with pytest.raises(DatasetError, match="missing column 'x_label'") as error:
        load_dataset(folder)
    assert "toy.inter" in str(error.value)


def test_non_integer_id(tmp_path):
    text = "userID\titemID\tx_label\n0\t0\t0\n0\tabc\t0\n"
    with pytest.raises(DatasetError) as error:
        load_dataset(write_folder(tmp_path, text))
    message = str(error.value)
    assert "line 3" in message
    assert "itemID" in message
    assert "'abc'" in message


def test_fractional_id(tmp_path):
    text = "userID\titemID\tx_label\n0\t0\t0\n1.5\t0\t0\n"
    with pytest.raises(DatasetError, match="line 3, column userID.*'1.5'"):
        load_dataset(write_folder(tmp_path, text))


def test_negative_id(tmp_path):
    text = "userID\titemID\tx_label\n0\t0\t0\n-4\t1\t0\n"
    with pytest.raises(DatasetError, match="line 3, column userID: negative id -4"):
        load_dataset(write_folder(tmp_path, text))


def test_id_beyond_int32(tmp_path):
    text = "userID\titemID\tx_label\n0\t99999999999999999999999\t0\n"
    with pytest.raises(DatasetError, match="line 2, column itemID: id 99999999999999999999999"):
        load_dataset(write_folder(tmp_path, text))


def test_blank_line(tmp_path):
    text = "userID\titemID\tx_label\n0\t0\t0\n\n1\t1\t0\n"
    with pytest.raises(DatasetError, match="line 3"):
        load_dataset(write_folder(tmp_path, text))


def test_invalid_label(tmp_path):
    text = "userID\titemID\tx_label\n0\t0\t0\n0\t1\t3\n"
    with pytest.raises(DatasetError, match="line 3, column x_label.*got 3"):
        load_dataset(write_folder(tmp_path, text))


def test_duplicate_pair(tmp_path):
    text = "userID\titemID\tx_label\n0\t0\t0\n1\t2\t0\n0\t0\t2\n"
    with pytest.raises(DatasetError) as error:
        load_dataset(write_folder(tmp_path, text))
    message = str(error.value)
    assert "duplicate interaction (user 0, item 0)" in message
    assert "lines 2 and 4" in message


def test_empty_training_split(tmp_path):
    text = "userID\titemID\tx_label\n0\t0\t1\n0\t1\t2\n"
    with pytest.raises(DatasetError, match="training split .* is empty"):
        load_dataset(write_folder(tmp_path, text))


def test_header_only(tmp_path):
    with pytest.raises(DatasetError, match="contains no interaction rows"):
        load_dataset(write_folder(tmp_path, "userID\titemID\tx_label\n"))


def test_feature_row_count_mismatch(tmp_path):
    folder = write_folder(tmp_path, TOY_INTER, {"image": np.ones((5, 2), np.float16)})
    with pytest.raises(DatasetError) as error:
        load_dataset(folder)
    message = str(error.value)
    assert "image_feat.npy" in message
    assert "5 rows" in message
    assert "4 items" in message


def test_non_finite_feature(tmp_path):
    values = np.ones((4, 3), np.float32)
    values[2, 1] = np.nan
    folder = write_folder(tmp_path, TOY_INTER, {"text": values})
    with pytest.raises(DatasetError, match=r"text_feat.npy: non-finite feature value nan in row 2"):
        load_dataset(folder)


def test_float32_overflow_feature(tmp_path):
    values = np.ones((4, 3), np.float64)
    values[3, 0] = 1e300
    folder = write_folder(tmp_path, TOY_INTER, {"text": values})
    with pytest.raises(DatasetError, match="row 3"):
        load_dataset(folder)


def test_one_dimensional_feature(tmp_path):
    folder = write_folder(tmp_path, TOY_INTER, {"image": np.ones(4, np.float32)})
    with pytest.raises(DatasetError, match=r"image_feat.npy: expected a 2-D .* shape \(4,\)"):
        load_dataset(folder)


def test_empty_feature(tmp_path):
    folder = write_folder(tmp_path, TOY_INTER, {"image": np.ones((4, 0), np.float32)})
    with pytest.raises(DatasetError, match=r"image_feat.npy: feature array is empty, shape \(4, 0\)"):
        load_dataset(folder)


def test_missing_named_modality(tmp_path):
    folder = write_folder(tmp_path, TOY_INTER, {"image": np.ones((4, 2), np.float32)})
    with pytest.raises(DatasetError, match=r"text_feat.npy.*available: \['image'\]"):
        load_dataset(folder, modalities=["image", "text"])


def test_pickled_feature_rejected(tmp_path):
    folder = write_folder(tmp_path, TOY_INTER)
    np.save(folder / "image_feat.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match="image_feat.npy: cannot read"):
        load_dataset(folder)


def test_from_interactions_rejects_out_of_range():
    with pytest.raises(DatasetError, match="test split: item id 7 is outside"):
        Dataset.from_interactions(
            "bad", 2, 4, train=([0], [1]), valid=([], []), test=([1], [7])
        )


def test_row_with_extra_fields(tmp_path):
    text = "userID\titemID\tx_label\n0\t0\t0\n0\t1\t0\t7\n"
    with pytest.raises(DatasetError, match="toy.inter: invalid tab-separated file.*line 3"):
        load_dataset(write_folder(tmp_path, text))


def test_row_with_missing_field(tmp_path):
    text = "userID\titemID\tx_label\n0\t0\t0\n0\t1\n"
    with pytest.raises(DatasetError, match="line 3, column x_label: expected an integer"):
        load_dataset(write_folder(tmp_path, text))


def test_from_interactions_rejects_duplicate_across_splits():
    with pytest.raises(DatasetError, match=r"duplicate interaction \(user 1, item 2\)"):
        Dataset.from_interactions(
            "bad", 2, 4, train=([0, 1], [1, 2]), valid=([1], [2]), test=([], [])
        )
