"""benchmarks/length_scaling.py's log-log slope fit (the benchmark itself runs on the GPU)."""

import importlib.util
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "length_scaling", os.path.join(REPO, "benchmarks", "length_scaling.py"))
length_scaling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(length_scaling)
loglog_slope = length_scaling.loglog_slope

LENGTHS = 2 ** np.arange(7, 17)


@pytest.mark.parametrize("power", [1.0, 2.0, None])
def test_slope_of_a_power_law(power):
  rng = np.random.default_rng()
  power = rng.uniform(0.3, 2.5) if power is None else power
  values = rng.uniform(0.1, 10) * LENGTHS.astype(float) ** power
  order = rng.permutation(len(LENGTHS))  # the fit does not depend on the order of the rows
  assert loglog_slope(LENGTHS[order], values[order]) == pytest.approx(power, abs=1e-9)


def test_only_the_longest_lengths_count():
  # Short lengths are overhead-bound (flat); the fit over the 4 longest sees the quadratic part.
  values = np.maximum(5.0, 1e-7 * LENGTHS.astype(float) ** 2)
  assert loglog_slope(LENGTHS, values) == pytest.approx(2.0, abs=1e-9)
  assert loglog_slope(LENGTHS, values, points=len(LENGTHS)) < 1.5


def test_failed_lengths_are_skipped():
  values = [3.0 * t for t in LENGTHS[:6]] + [None, float("nan"), 0.0, float("inf")]
  assert loglog_slope(LENGTHS, values) == pytest.approx(1.0, abs=1e-9)
  assert loglog_slope(LENGTHS[:2], [None, 4.0]) is None
  assert loglog_slope([], []) is None
