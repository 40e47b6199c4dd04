"""pallas.gla.gated_linear_attention: dispatch to each implementation and argument errors."""

import jax
import numpy as np
import pytest

from pallas import gla, reference


def _inputs(rng, b=2, t=5, m=3, h=2, dk=4, dv=6):
  q_shape = (b, t, h, dk) if m is None else (b, t, m, h, dk)
  shapes = (q_shape, (b, t, h, dk), (b, t, h, dv))
  q, k, v = (rng.standard_normal(s).astype(np.float32) for s in shapes)
  g = np.log(rng.uniform(0.02, 0.999, (b, t, h, dk))).astype(np.float32)
  s0 = rng.standard_normal((b, h, dk, dv)).astype(np.float32)
  return q, k, v, g, s0


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("m", [None, 3])
@pytest.mark.parametrize("implementation", ["auto", "reference", "recurrent", "chunked"])
def test_every_implementation_matches_reference(implementation, m):
  q, k, v, g, s0 = _inputs(np.random.default_rng(), m=m)
  o, s = gla.gated_linear_attention(q, k, v, g, initial_state=s0, return_final_state=True,
                                    implementation=implementation)
  o_ref, s_ref = reference.gla_reference(q, k, v, g, initial_state=s0, return_final_state=True)
  assert o.shape == o_ref.shape and s.shape == s_ref.shape
  assert _rel_err(o, o_ref) < 1e-4 and _rel_err(s, s_ref) < 1e-4


def _spy(calls, name):
  def fn(q, k, v, g, **kwargs):
    calls.append((name, kwargs))
    return "out"
  return fn


# T = 1 (a streaming step) takes the reference on GPU too: one fused update, no kernel launch.
@pytest.mark.parametrize("backend,t,expected", [("cpu", 5, "reference"), ("gpu", 5, "recurrent"),
                                                ("gpu", 1, "reference")])
def test_auto_picks_kernels_only_on_gpu(monkeypatch, backend, t, expected):
  calls = []
  monkeypatch.setattr(reference, "gla_reference", _spy(calls, "reference"))
  monkeypatch.setattr(gla, "gla_recurrent", _spy(calls, "recurrent"))
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  q, k, v, g, s0 = _inputs(np.random.default_rng(), t=t)
  assert gla.gated_linear_attention(q, k, v, g, scale=0.3, initial_state=s0) == "out"
  [(name, kwargs)] = calls
  assert name == expected
  assert kwargs["scale"] == 0.3 and kwargs["initial_state"] is s0
  assert kwargs["return_final_state"] is False
  if name == "recurrent":
    assert kwargs["interpret"] is False


def test_unknown_implementation_names_it_and_the_choices():
  q, k, v, g, _ = _inputs(np.random.default_rng())
  with pytest.raises(ValueError, match=r"implementation must be one of \('auto', 'reference', "
                                       r"'recurrent'.*\), got 'triton'"):
    gla.gated_linear_attention(q, k, v, g, implementation="triton")


@pytest.mark.parametrize("bad,match", [
    (dict(g=np.full((2, 5, 2, 4), 0.1, np.float32)), "must be <= 0"),
    (dict(v=np.ones((2, 4, 2, 6), np.float32)), "v must have shape"),
    (dict(initial_state=np.ones((2, 2, 6, 4), np.float32)), "initial_state must have shape"),
])
def test_bad_arguments_raise_value_error_before_any_kernel_runs(bad, match):
  q, k, v, g, _ = _inputs(np.random.default_rng())
  args = dict(q=q, k=k, v=v, g=g, initial_state=None) | bad
  with pytest.raises(ValueError, match=match):
    gla.gated_linear_attention(**args, implementation="recurrent")
