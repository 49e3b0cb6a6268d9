"""Summary statistics over seeds for the benchmarks: mean, spread and paired differences.

Values that are NaN (a seed that diverged before its first evaluation has no test metric)
are left out, and every result carries the count of values it was computed from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.stats


class Summary(NamedTuple):
  """Mean and sample standard deviation of one metric over seeds."""

  mean: float  # NaN when no value is finite
  std: float  # ddof=1; NaN with fewer than two finite values
  count: int  # finite values used


class PairedDifference(NamedTuple):
  """Per-seed difference ``treatment - control`` and its t-interval."""

  mean: float
  std: float  # ddof=1 over the differences
  low: float  # bounds of the two-sided t-interval of the mean; NaN with count < 2
  high: float
  confidence: float
  wins: int  # pairs where the treatment value is strictly greater
  count: int  # pairs where both values are finite

  @property
  def win_fraction(self) -> float:
    return self.wins / self.count if self.count else math.nan


def _finite(values: Sequence[float]) -> np.ndarray:
  array = np.asarray(values, dtype=np.float64)
  return array[np.isfinite(array)]


def summarize(values: Sequence[float]) -> Summary:
  """Return the mean and sample standard deviation of the finite ``values``."""
  finite = _finite(values)
  mean = float(finite.mean()) if finite.size else math.nan
  std = float(finite.std(ddof=1)) if finite.size >= 2 else math.nan
  return Summary(mean, std, int(finite.size))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
  """Return the two-sided Student-t confidence interval of the mean of ``values``.

  Args:
    values: independent observations; non-finite ones are left out.
    confidence: coverage of the interval, in (0, 1).

  Returns:
    ``(low, high)``; both NaN with fewer than two finite values.
  """
  if not 0 < confidence < 1:
    raise ValueError(f"invalid confidence {confidence!r}; expected a number in (0, 1)")
  finite = _finite(values)
  if finite.size < 2:
    return math.nan, math.nan
  mean = finite.mean()
  half_width = (scipy.stats.t.ppf(0.5 + confidence / 2, df=finite.size - 1)
                * finite.std(ddof=1) / math.sqrt(finite.size))
  return float(mean - half_width), float(mean + half_width)


def paired_difference(treatment: Sequence[float], control: Sequence[float],
                      confidence: float = 0.95) -> PairedDifference:
  """Compare two arms run on the same seeds through their per-seed differences.

  Args:
    treatment: one value per seed.
    control: one value per seed, in the same seed order.
    confidence: coverage of the t-interval of the mean difference.

  Returns:
    A `PairedDifference` over the seeds where both values are finite.
  """
  treatment = np.asarray(treatment, dtype=np.float64)
  control = np.asarray(control, dtype=np.float64)
  if treatment.shape != control.shape or treatment.ndim != 1:
    raise ValueError(
        f"treatment and control need one value per seed each, got shapes {treatment.shape}"
        f" and {control.shape}")
  both = np.isfinite(treatment) & np.isfinite(control)
  differences = treatment[both] - control[both]

  summary = summarize(differences)
  low, high = t_interval(differences, confidence)
  wins = int(np.sum(treatment[both] > control[both]))
  return PairedDifference(summary.mean, summary.std, low, high, confidence, wins, summary.count)
