"""Seeded perturbations of item features, applied at inference to test robustness.

Two families of perturbation model what can go wrong with multimodal item features after
a recommender is trained:

- inherent noise (``noise``): Gaussian noise with standard deviation ``s * std_d`` added to
  every feature dimension ``d``, where ``std_d`` is that dimension's standard deviation
  over items;
- information adjustment: a fraction ``p`` of the items (exactly ``round(p * num_items)``)
  has its feature rows replaced or removed. ``replace`` models a catalogue update that
  attached features to the wrong items: the chosen items get each other's rows through a
  derangement, so no item keeps its own row. ``zero`` models a missing modality and sets
  the rows to 0.

A perturbation targets one modality or ``"all"`` of them. With ``"all"``, ``replace`` and
``zero`` hit the same items with the same mapping in every modality, as a broken update of
whole item records would, and every modality gets its own noise draw.

Every draw comes from a generator seeded by ``(seed, perturbation name)``, so a given seed
gives the same perturbed features to every training arm (paired comparisons), and
different perturbations get independent draws.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

FAMILIES = ("noise", "replace", "zero")
ALL_MODALITIES = "all"
NOISE_SCALES = (0.1, 0.3, 0.5, 1.0)
FRACTIONS = (0.1, 0.3, 0.5)


@dataclasses.dataclass(frozen=True)
class Perturbation:
  """One feature perturbation.

  Attributes:
    family: ``"noise"``, ``"replace"`` or ``"zero"``.
    strength: the noise scale ``s`` (a finite number >= 0) for ``noise``; the fraction
      ``p`` of items (in [0, 1]) for ``replace`` and ``zero``.
    target: a modality name, or ``"all"`` for every modality at once.
  """

  family: str
  strength: float
  target: str = ALL_MODALITIES

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"invalid perturbation family {self.family!r}; expected one of {FAMILIES}")
    strength = self.strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)):
      raise ValueError(f"invalid {self.family} strength {strength!r}; expected a number")
    strength = float(strength)
    if not np.isfinite(strength) or strength < 0:
      raise ValueError(f"invalid {self.family} strength {strength!r}; expected a finite number >= 0")
    if self.family != "noise" and strength > 1:
      raise ValueError(
          f"invalid {self.family} fraction {strength!r}; expected a fraction of items in [0, 1]")
    object.__setattr__(self, "strength", strength)
    if not isinstance(self.target, str) or not self.target:
      raise ValueError(f"invalid perturbation target {self.target!r}; expected a modality name"
                       f" or {ALL_MODALITIES!r}")

  @property
  def strength_name(self) -> str:
    """The strength's symbol: ``s`` for noise, ``p`` for the item fractions."""
    return "s" if self.family == "noise" else "p"

  @property
  def name(self) -> str:
    """A stable identifier such as ``noise/image/s=0.3``, also used to seed the draws."""
    return f"{self.family}/{self.target}/{self.strength_name}={self.strength:g}"

  def apply(self, features: Mapping[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Return perturbed copies of ``features``; see `perturb_features`."""
    return perturb_features(features, self, seed)


def standard_perturbations(
    modalities: Iterable[str],
    noise_scales: Sequence[float] = NOISE_SCALES,
    fractions: Sequence[float] = FRACTIONS,
) -> list[Perturbation]:
  """List every family and strength on all modalities at once and on each modality.

  With a single modality the per-modality entries would repeat the ``"all"`` ones, so
  only ``"all"`` is listed. An empty ``modalities`` gives an empty list.
  """
  names = sorted(set(modalities))
  if not names:
    return []
  targets = [ALL_MODALITIES] + names if len(names) > 1 else [ALL_MODALITIES]
  perturbations = []
  for family, strengths in (("noise", noise_scales), ("replace", fractions), ("zero", fractions)):
    for target in targets:
      perturbations.extend(Perturbation(family, strength, target) for strength in strengths)
  return perturbations


def perturbation_rng(seed: int, perturbation: Perturbation) -> np.random.Generator:
  """Return the generator of one (seed, perturbation) pair.

  The perturbation enters through a CRC-32 of its name, which unlike ``hash`` does not
  change between Python processes.
  """
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"invalid perturbation seed {seed!r}; expected an integer >= 0")
  return np.random.default_rng([int(seed), zlib.crc32(perturbation.name.encode())])


def feature_std(features: np.ndarray) -> np.ndarray:
  """Return the standard deviation over items of each feature dimension, as float64."""
  return np.asarray(features, dtype=np.float64).std(axis=0)


def add_gaussian_noise(features: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
  """Add noise with standard deviation ``scale * std_d`` to each dimension ``d``.

  ``std_d`` is the standard deviation over items of the clean dimension (`feature_std`).
  The result keeps the dtype of ``features``.
  """
  features = np.asarray(features)
  noise = rng.standard_normal(features.shape) * (scale * feature_std(features))
  return (features + noise).astype(features.dtype)


def choose_items(num_items: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
  """Draw ``round(fraction * num_items)`` distinct item ids, sorted."""
  count = int(round(fraction * num_items))
  return np.sort(rng.choice(num_items, size=count, replace=False))


def random_derangement(size: int, rng: np.random.Generator) -> np.ndarray:
  """Draw a permutation of ``range(size)`` without fixed points, uniformly.

  Rejection sampling: about ``1/e`` of uniform permutations are derangements, so the
  expected number of draws is below 3 for every ``size >= 2``.

  Raises:
    ValueError: for ``size`` 1, which has no derangement.
  """
  if size == 1:
    raise ValueError("a set of one item has no derangement")
  positions = np.arange(size)
  while True:
    permutation = rng.permutation(size)
    if not np.any(permutation == positions):
      return permutation


def replacement_sources(
    items: np.ndarray, num_items: int, rng: np.random.Generator
) -> np.ndarray:
  """Choose, for each of ``items``, another item whose feature row it receives.

  Sources are a derangement of ``items``, so each affected item takes the row of another
  affected item and the set of rows stays the same. A single affected item cannot be
  deranged and takes the row of a random other item instead.
  """
  if items.size == 0:
    return items.copy()
  if items.size == 1:
    if num_items < 2:
      raise ValueError("replacing features needs at least 2 items")
    return (items + rng.integers(1, num_items, size=1)) % num_items
  return items[random_derangement(items.size, rng)]


def perturb_features(
    features: Mapping[str, np.ndarray], perturbation: Perturbation, seed: int
) -> dict[str, np.ndarray]:
  """Apply ``perturbation`` to ``features`` with the draws of ``seed``.

  Args:
    features: modality name -> ``[num_items, dim]`` matrix; never modified.
    perturbation: what to apply, to which modality.
    seed: an integer >= 0, normally the training seed, so that every arm trained with
      that seed is evaluated on the same perturbed features.

  Returns:
    A new dict with every modality of ``features``: perturbed copies for the targeted
    modalities, the unchanged arrays for the others.

  Raises:
    ValueError: if the target is not a modality of ``features``, the matrices do not
      share one item count, or a replacement needs 2 items and there is one.
  """
  if not features:
    raise ValueError("no item features to perturb")
  names = sorted(features)
  if perturbation.target == ALL_MODALITIES:
    targets = names
  elif perturbation.target in features:
    targets = [perturbation.target]
  else:
    raise ValueError(f"perturbation {perturbation.name}: unknown modality"
                     f" {perturbation.target!r}; expected one of {names} or {ALL_MODALITIES!r}")
  item_counts = {name: np.shape(features[name])[0] for name in names}
  if len(set(item_counts.values())) != 1:
    raise ValueError(f"feature matrices have different item counts: {item_counts}")
  num_items = item_counts[names[0]]

  rng = perturbation_rng(seed, perturbation)
  perturbed = dict(features)
  if perturbation.family == "noise":
    for name in targets:
      perturbed[name] = add_gaussian_noise(features[name], perturbation.strength, rng)
    return perturbed

  items = choose_items(num_items, perturbation.strength, rng)
  sources = replacement_sources(items, num_items, rng) if perturbation.family == "replace" else None
  for name in targets:
    matrix = np.array(features[name], copy=True)
    if sources is None:
      matrix[items] = 0
    else:
      matrix[items] = np.asarray(features[name])[sources]
    perturbed[name] = matrix
  return perturbed
