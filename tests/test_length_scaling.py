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


def test_softmax_memory_is_a_drop_in():
  # The clam-softmax method swaps the memory's attention class: it must accept the same call and
  # really replace the linear attention (no gate projections left, softmax attention params there).
  import inspect
  from unittest import mock

  import jax
  from clam_jax import clam as clam_lib

  assert (list(inspect.signature(length_scaling.SoftmaxCrossAttention.__call__).parameters) ==
          list(inspect.signature(clam_lib.CrossLinearAttention.__call__).parameters))
  config = length_scaling.model_config(True, "reference")
  with mock.patch.object(clam_lib, "CrossLinearAttention", length_scaling.SoftmaxCrossAttention):
    fn, make_args = length_scaling.model_problem(config, "clam-softmax", jax.random.key(0))
    args = make_args(12)
    loss, grads = fn(*args)
  names = {"/".join(str(getattr(k, "key", k)) for k in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(args[0])[0]}
  assert any("/attention/" in n for n in names)
  assert not any(n.endswith("gate/kernel") for n in names)
  assert np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
