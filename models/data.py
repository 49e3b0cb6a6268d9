"""Interaction datasets in the MMRec folder layout.

An MMRec dataset folder contains ``<name>.inter`` and one ``<modality>_feat.npy`` per
item modality (``image_feat.npy``, ``text_feat.npy``, ``audio_feat.npy``, ...) with one
row per item id. The ``.inter`` file is tab-separated with the columns ``userID``,
``itemID`` and ``x_label`` (0 training, 1 validation, 2 test). Further columns such as
``rating`` or ``timestamp`` are ignored.

Loading follows the MMRec rules. The number of users and items is the largest id in the
whole file plus one. Validation and test rows of users with no training row are dropped
and counted in an INFO log line; the loader drops no other row.

Run ``python -m models.data FOLDER...`` to print a statistics table for dataset folders.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

USER_COLUMN = "userID"
ITEM_COLUMN = "itemID"
LABEL_COLUMN = "x_label"
SPLIT_LABELS = {"train": 0, "valid": 1, "test": 2}
FEATURE_SUFFIX = "_feat.npy"

_INT32_MAX = np.iinfo(np.int32).max
_INTEGER_PATTERN = r"[+-]?\d+"


class DatasetError(ValueError):
    """Invalid or missing dataset input; the message names the file, line or field."""


class Interactions(NamedTuple):
    """One split of user-item interactions, rows sorted by (user, item)."""

    users: np.ndarray  # shape=[n], dtype=int32
    items: np.ndarray  # shape=[n], dtype=int32


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _as_interactions(split: Any, field: str, num_users: int, num_items: int) -> Interactions:
    """Convert a (users, items) pair into int32 read-only arrays sorted by (user, item).

    Raises DatasetError when an id lies outside [0, num_users) or [0, num_items).
    """
    try:
        users, items = split
    except (TypeError, ValueError) as error:
        raise DatasetError(f"{field}: expected a (users, items) pair, got {type(split).__name__}") from error

    users = np.asarray(users)
    items = np.asarray(items)
    if users.ndim != 1 or users.shape != items.shape:
        raise DatasetError(
            f"{field}: users and items must be 1-D arrays of equal length, "
            f"got shapes {users.shape} and {items.shape}"
        )
    for values, kind, limit in ((users, "user", num_users), (items, "item", num_items)):
        if values.size == 0:
            continue
        if not np.issubdtype(values.dtype, np.integer):
            raise DatasetError(f"{field} split: expected integer {kind} ids, got dtype {values.dtype}")
        outside = (values < 0) | (values >= limit)
        if outside.any():
            raise DatasetError(
                f"{field} split: {kind} id {values[outside][0]} is outside [0, {limit})"
            )

    users = users.astype(np.int32)
    items = items.astype(np.int32)
    order = np.lexsort((items, users))
    return Interactions(_read_only(users[order]), _read_only(items[order]))


def _check_feature_matrix(values: Any, num_items: int, source: str) -> np.ndarray:
    """Validate one item-feature matrix and return it as a read-only float32 array.

    ``source`` names the origin in error messages (a file path or a modality name).
    """
    array = np.asarray(values)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise DatasetError(f"{source}: expected a numeric feature array, got dtype {array.dtype}")
    if array.ndim != 2:
        raise DatasetError(
            f"{source}: expected a 2-D feature array [items, dim], got shape {array.shape}"
        )
    if array.size == 0:
        raise DatasetError(f"{source}: feature array is empty, shape {array.shape}")
    if array.shape[0] != num_items:
        raise DatasetError(
            f"{source}: feature array has {array.shape[0]} rows but the dataset has "
            f"{num_items} items (one row per item id is required)"
        )

    # Converting after the float16 -> float32 cast also catches float64 values that
    # overflow float32.
    with np.errstate(over="ignore"):
        features = np.array(array, dtype=np.float32, copy=True)
    finite_rows = np.isfinite(features).all(axis=1)
    if not finite_rows.all():
        bad_rows = np.flatnonzero(~finite_rows)
        first = int(bad_rows[0])
        bad_column = int(np.flatnonzero(~np.isfinite(features[first]))[0])
        raise DatasetError(
            f"{source}: non-finite feature value {float(array[first, bad_column])} in row {first} "
            f"(item id {first}, column {bad_column}); {bad_rows.size} row(s) affected"
        )
    return _read_only(features)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A recommendation dataset: three interaction splits plus optional item features.

    Build one with ``load_dataset``, ``Dataset.from_interactions`` or
    ``models.synthetic.make_synthetic_dataset``. All arrays are read-only. Equality is
    identity, so a dataset can be hashed but two loads of one folder compare unequal.
    """

    name: str
    num_users: int
    num_items: int
    train: Interactions
    valid: Interactions
    test: Interactions
    train_indptr: np.ndarray  # shape=[num_users + 1], dtype=int64; CSR row pointers
    train_indices: np.ndarray  # shape=[num_train], dtype=int32; items sorted per user
    item_pool: np.ndarray  # shape=[pool], dtype=int32; sorted unique training items
    features: Mapping[str, np.ndarray]  # modality -> float32 [num_items, dim]

    def __post_init__(self):
        if int(self.num_users) <= 0 or int(self.num_items) <= 0:
            raise DatasetError(
                f"dataset {self.name!r}: num_users and num_items must be positive, "
                f"got {self.num_users} and {self.num_items}"
            )
        object.__setattr__(self, "num_users", int(self.num_users))
        object.__setattr__(self, "num_items", int(self.num_items))

        for field in SPLIT_LABELS:
            try:
                split = _as_interactions(getattr(self, field), field, self.num_users, self.num_items)
            except DatasetError as error:
                raise DatasetError(f"dataset {self.name!r}, {error}") from None
            object.__setattr__(self, field, split)
        num_train = self.train.users.size
        if num_train == 0:
            raise DatasetError(f"dataset {self.name!r}: the training split is empty")
        self._check_unique_pairs()

        indptr = np.asarray(self.train_indptr, dtype=np.int64)
        indices = np.asarray(self.train_indices, dtype=np.int32)
        if indptr.shape != (self.num_users + 1,) or indptr[0] != 0 or indptr[-1] != num_train:
            raise DatasetError(
                f"dataset {self.name!r}: train_indptr must have {self.num_users + 1} entries "
                f"from 0 to {num_train}, got shape {indptr.shape}"
            )
        if not np.array_equal(indices, self.train.items) or not np.array_equal(
            np.diff(indptr), np.bincount(self.train.users, minlength=self.num_users)
        ):
            raise DatasetError(
                f"dataset {self.name!r}: train_indptr/train_indices do not match the training split"
            )
        object.__setattr__(self, "train_indptr", _read_only(indptr.copy()))
        object.__setattr__(self, "train_indices", _read_only(indices.copy()))
        object.__setattr__(self, "item_pool", _read_only(np.unique(self.train.items)))

        features = {}
        for modality, values in dict(self.features).items():
            features[str(modality)] = _check_feature_matrix(
                values, self.num_items, f"dataset {self.name!r}, modality {modality!r}"
            )
        object.__setattr__(self, "features", types.MappingProxyType(features))

    def _check_unique_pairs(self) -> None:
        """Raise DatasetError if a (user, item) pair occurs twice in or across splits.

        Negative sampling and evaluation both rely on unique pairs.
        """
        splits = [getattr(self, field) for field in SPLIT_LABELS]
        keys = np.concatenate(
            [split.users.astype(np.int64) * self.num_items + split.items for split in splits]
        )
        keys.sort()
        repeated = keys[1:][keys[1:] == keys[:-1]]
        if repeated.size:
            user, item = divmod(int(repeated[0]), self.num_items)
            raise DatasetError(
                f"dataset {self.name!r}: duplicate interaction (user {user}, item {item}); "
                "each (user, item) pair may occur once across all splits"
            )

    @classmethod
    def from_interactions(
        cls,
        name: str,
        num_users: int,
        num_items: int,
        train: Any,
        valid: Any,
        test: Any,
        features: Mapping[str, np.ndarray] | None = None,
    ) -> Dataset:
        """Build a dataset from (users, items) splits, deriving the CSR index and item pool.

        Rows of every split are sorted by (user, item). Unlike ``load_dataset``, this
        keeps validation and test rows of users without training rows.
        """
        num_users = int(num_users)
        train = _as_interactions(train, "train", num_users, int(num_items))
        counts = np.bincount(train.users, minlength=num_users)
        indptr = np.zeros(num_users + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return cls(
            name=name,
            num_users=num_users,
            num_items=num_items,
            train=train,
            valid=valid,
            test=test,
            train_indptr=indptr,
            train_indices=train.items,
            item_pool=np.unique(train.items),
            features=dict(features or {}),
        )

    def user_train_items(self, user: int) -> np.ndarray:
        """Return the sorted training items of ``user`` (a read-only view)."""
        user = int(user)
        if not 0 <= user < self.num_users:
            raise IndexError(f"user id {user} is outside [0, {self.num_users})")
        return self.train_indices[self.train_indptr[user] : self.train_indptr[user + 1]]

    def split(self, name: str) -> Interactions:
        """Return the split called ``name`` ("train", "valid" or "test")."""
        if name not in SPLIT_LABELS:
            raise ValueError(f"unknown split {name!r}; expected one of {sorted(SPLIT_LABELS)}")
        return getattr(self, name)

    def with_features(self, features: Mapping[str, np.ndarray]) -> Dataset:
        """Return a copy whose item features are ``features`` (validated like loaded ones)."""
        return dataclasses.replace(self, features=dict(features))

    def stats(self) -> dict[str, Any]:
        """Return the dataset statistics as a dict of plain Python values."""
        sizes = {split: int(getattr(self, split).users.size) for split in SPLIT_LABELS}
        num_interactions = sum(sizes.values())
        return {
            "name": self.name,
            "users": self.num_users,
            "items": self.num_items,
            "interactions": num_interactions,
            **sizes,
            "density": num_interactions / (self.num_users * self.num_items),
            "train_items": int(self.item_pool.size),
            "valid_users": int(np.unique(self.valid.users).size),
            "test_users": int(np.unique(self.test.users).size),
            "modalities": {name: int(values.shape[1]) for name, values in self.features.items()},
        }

    def summary(self) -> str:
        """Return a one-line human-readable summary of ``stats()``."""
        stats = self.stats()
        modalities = ", ".join(f"{name} {dim}-d" for name, dim in stats["modalities"].items())
        return (
            f"{stats['name']}: {stats['users']} users, {stats['items']} items, "
            f"{stats['interactions']} interactions (train {stats['train']} / valid "
            f"{stats['valid']} / test {stats['test']}), density {stats['density']:.5f}, "
            f"modalities: {modalities or 'none'}"
        )


def _find_inter_file(folder: Path, name: str | None) -> Path:
    if name is not None:
        path = folder / f"{name}.inter"
        if not path.is_file():
            raise DatasetError(f"interaction file not found: {path}")
        return path

    candidates = sorted(folder.glob("*.inter"))
    if len(candidates) == 1:
        return candidates[0]
    preferred = folder / f"{folder.name}.inter"
    if preferred in candidates:
        return preferred
    if not candidates:
        raise DatasetError(f"no .inter file found in {folder}")
    raise DatasetError(
        f"{folder} contains several .inter files ({', '.join(p.name for p in candidates)}); "
        "pass name= to choose one"
    )


def _parse_id_column(column: pd.Series, field: str, path: Path) -> np.ndarray:
    """Parse a column of non-negative integer ids, naming the first bad line on error."""
    text = column.str.strip()
    is_integer = text.str.fullmatch(_INTEGER_PATTERN).fillna(False).to_numpy(dtype=bool)
    if not is_integer.all():
        row = int(np.flatnonzero(~is_integer)[0])
        raise DatasetError(
            f"{path}, line {row + 2}, column {field}: expected an integer, got {column.iloc[row]!r}"
        )

    negative = (text.str.startswith("-") & (text.str.lstrip("-").str.lstrip("0") != "")).to_numpy(dtype=bool)
    if negative.any():
        row = int(np.flatnonzero(negative)[0])
        raise DatasetError(
            f"{path}, line {row + 2}, column {field}: negative id {text.iloc[row]}"
        )

    # Ids must fit int32; more than 10 significant digits would also overflow int64 parsing.
    too_long = (text.str.lstrip("+").str.lstrip("0").str.len() > 10).to_numpy(dtype=bool)
    values = np.where(too_long, -1, 0).astype(np.int64)
    values[~too_long] = text[~too_long].astype(np.int64).to_numpy()
    too_large = too_long | (values > _INT32_MAX)
    if too_large.any():
        row = int(np.flatnonzero(too_large)[0])
        raise DatasetError(
            f"{path}, line {row + 2}, column {field}: id {text.iloc[row]} is larger than "
            f"{_INT32_MAX}"
        )
    return values


def _read_inter_file(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read (users, items, labels) from an MMRec ``.inter`` file, validating every row."""
    # Everything is read as text so that the first invalid value can be reported as
    # written, with its line number. Blank lines are kept so line numbers stay exact.
    # All columns are read because pandas skips its field-count check under usecols.
    try:
        table = pd.read_csv(
            path,
            sep="\t",
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,
        )
    except pd.errors.EmptyDataError as error:
        raise DatasetError(f"{path}: file is empty (expected a header line)") from error
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: invalid tab-separated file ({str(error).strip()})") from error

    table.columns = [str(c).strip() for c in table.columns]
    for required in (USER_COLUMN, ITEM_COLUMN, LABEL_COLUMN):
        if required not in table.columns:
            raise DatasetError(
                f"{path}: missing column {required!r} in the header (found {list(table.columns)})"
            )

    users = _parse_id_column(table[USER_COLUMN], USER_COLUMN, path)
    items = _parse_id_column(table[ITEM_COLUMN], ITEM_COLUMN, path)
    labels = _parse_id_column(table[LABEL_COLUMN], LABEL_COLUMN, path)

    bad_label = ~np.isin(labels, list(SPLIT_LABELS.values()))
    if bad_label.any():
        row = int(np.flatnonzero(bad_label)[0])
        raise DatasetError(
            f"{path}, line {row + 2}, column {LABEL_COLUMN}: expected 0 (train), 1 (valid) or "
            f"2 (test), got {labels[row]}"
        )

    _check_duplicates(users, items, path)
    return users, items, labels


def _check_duplicates(users: np.ndarray, items: np.ndarray, path: Path) -> None:
    order = np.lexsort((items, users))
    same = (np.diff(users[order]) == 0) & (np.diff(items[order]) == 0)
    if same.any():
        position = int(np.flatnonzero(same)[0])
        first, second = sorted((int(order[position]), int(order[position + 1])))
        raise DatasetError(
            f"{path}: duplicate interaction (user {users[first]}, item {items[first]}) "
            f"on lines {first + 2} and {second + 2}; {int(same.sum())} duplicate row(s) in total"
        )


def _find_feature_files(folder: Path, modalities: Sequence[str] | None) -> dict[str, Path]:
    available = {
        path.name[: -len(FEATURE_SUFFIX)]: path
        for path in sorted(folder.glob(f"*{FEATURE_SUFFIX}"))
        if len(path.name) > len(FEATURE_SUFFIX)
    }
    if modalities is None:
        return available
    if isinstance(modalities, str):
        modalities = [modalities]

    chosen = {}
    for modality in modalities:
        if modality not in available:
            raise DatasetError(
                f"feature file not found: {folder / (modality + FEATURE_SUFFIX)} "
                f"(modalities available: {sorted(available) or 'none'})"
            )
        chosen[modality] = available[modality]
    return chosen


def _load_feature_file(path: Path, num_items: int) -> np.ndarray:
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise DatasetError(f"{path}: cannot read as a .npy array ({error})") from error
    return _check_feature_matrix(values, num_items, str(path))


def _drop_rows_without_training_user(
    users: np.ndarray, items: np.ndarray, labels: np.ndarray, num_users: int, name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    has_training = np.zeros(num_users, dtype=bool)
    has_training[users[labels == SPLIT_LABELS["train"]]] = True
    drop = ~has_training[users]
    if drop.any():
        logger.info(
            "%s: dropped %d validation and %d test rows of %d users with no training "
            "interaction",
            name,
            int(np.sum(drop & (labels == SPLIT_LABELS["valid"]))),
            int(np.sum(drop & (labels == SPLIT_LABELS["test"]))),
            int(np.unique(users[drop]).size),
        )
    keep = ~drop
    return users[keep], items[keep], labels[keep]


def load_dataset(
    path: str | Path,
    modalities: Sequence[str] | None = None,
    *,
    name: str | None = None,
) -> Dataset:
    """Load an MMRec dataset folder.

    Args:
      path: the dataset folder, or its ``.inter`` file.
      modalities: feature modalities to load, e.g. ``("image", "text")``; each needs a
        ``<modality>_feat.npy`` file in the folder. ``None`` loads every such file and
        ``()`` loads none.
      name: the dataset name, which selects the interaction file ``<name>.inter``.
        Without it, the loader reads the folder's only ``.inter`` file (or
        ``<folder name>.inter`` among several) and names the dataset after the folder.

    Returns:
      A ``Dataset`` with float32 features.

    Raises:
      DatasetError: a file or column is missing or contains invalid values; the message
        names the file and the line (header = line 1) or the feature row.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".inter":
        folder = path.parent
        name = name or path.stem
    else:
        folder = path
    if not folder.is_dir():
        raise DatasetError(f"dataset folder not found: {folder}")

    inter_path = _find_inter_file(folder, name)
    dataset_name = name or folder.name
    users, items, labels = _read_inter_file(inter_path)
    if users.size == 0:
        raise DatasetError(f"{inter_path}: contains no interaction rows")
    num_users = int(users.max()) + 1
    num_items = int(items.max()) + 1

    if not np.any(labels == SPLIT_LABELS["train"]):
        raise DatasetError(f"{inter_path}: the training split (x_label 0) is empty")
    users, items, labels = _drop_rows_without_training_user(
        users, items, labels, num_users, dataset_name
    )

    features = {
        modality: _load_feature_file(feature_path, num_items)
        for modality, feature_path in _find_feature_files(folder, modalities).items()
    }
    splits = {
        split: (users[labels == label], items[labels == label])
        for split, label in SPLIT_LABELS.items()
    }
    return Dataset.from_interactions(
        dataset_name, num_users, num_items, features=features, **splits
    )


def format_stats_table(datasets: Sequence[Dataset]) -> str:
    """Format the statistics of ``datasets`` as a Markdown table."""
    lines = [
        "| dataset | users | items | interactions | train | valid | test | density | modalities |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset in datasets:
        stats = dataset.stats()
        modalities = ", ".join(f"{name} {dim}" for name, dim in stats["modalities"].items())
        lines.append(
            f"| {stats['name']} | {stats['users']:,} | {stats['items']:,} | "
            f"{stats['interactions']:,} | {stats['train']:,} | {stats['valid']:,} | "
            f"{stats['test']:,} | {stats['density']:.5f} | {modalities or 'none'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.data",
        description="Print statistics of MMRec dataset folders as a Markdown table.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="dataset folders")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        datasets = [load_dataset(path) for path in args.paths]
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_stats_table(datasets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
