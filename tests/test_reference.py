"""The pure-JAX references against a float64 Python loop, and the references' argument checks."""

import numpy as np
import pytest

from pallas import reference


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _gla_loop(q, k, v, g, scale, s0):
  """float64 loop of S_t = diag(exp g_t) S_{t-1} + k_t^T v_t, o_t[m] = scale q_t[m] S_t."""
  q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
  s = np.asarray(s0, np.float64).copy()
  o = np.zeros(q.shape[:-1] + (v.shape[-1],))
  for t in range(q.shape[1]):
    s = np.exp(g[:, t])[..., None] * s + k[:, t, :, :, None] * v[:, t, :, None, :]
    o[:, t] = scale * np.einsum("bmhk,bhkv->bmhv", q[:, t], s)
  return o, s


def _inputs(rng, b, t, m, h, dk, dv, gate_scale=1.0):
  q = rng.standard_normal((b, t, m, h, dk)).astype(np.float32)
  k = rng.standard_normal((b, t, h, dk)).astype(np.float32)
  v = rng.standard_normal((b, t, h, dv)).astype(np.float32)
  g = (np.log(rng.uniform(0.02, 0.999, (b, t, h, dk))) * gate_scale).astype(np.float32)
  s0 = rng.standard_normal((b, h, dk, dv)).astype(np.float32)
  return q, k, v, g, s0


@pytest.mark.parametrize("fn", [reference.gla_reference, reference.gla_associative])
@pytest.mark.parametrize("b,t,m,h,dk,dv", [(1, 1, 1, 1, 4, 4), (2, 13, 3, 2, 8, 5)])
def test_gla_references_match_float64_loop(fn, b, t, m, h, dk, dv):
  rng = np.random.default_rng()
  q, k, v, g, s0 = _inputs(rng, b, t, m, h, dk, dv)
  o, s = fn(q, k, v, g, initial_state=s0, return_final_state=True)
  o_ref, s_ref = _gla_loop(q, k, v, g, dk ** -0.5, s0)
  assert o.shape == (b, t, m, h, dv) and s.shape == (b, h, dk, dv)
  assert _rel_err(o, o_ref) < 1e-5
  assert _rel_err(s, s_ref) < 1e-5


def test_gla_reference_m1_shape_matches_m_axis():
  rng = np.random.default_rng()
  q, k, v, g, _ = _inputs(rng, 2, 7, 1, 2, 4, 6)
  o4 = reference.gla_reference(q[:, :, 0], k, v, g)
  o5 = reference.gla_reference(q, k, v, g)
  assert o4.shape == (2, 7, 2, 6)
  np.testing.assert_allclose(o4, o5[:, :, 0], rtol=1e-6)


@pytest.mark.parametrize("fn", [reference.state_update_reference, reference.state_update_associative])
@pytest.mark.parametrize("with_s0", [False, True])
def test_state_update_references_match_float64_loop(fn, with_s0):
  rng = np.random.default_rng()
  b, t, h, dk, dv = 2, 11, 3, 4, 5
  g = rng.uniform(0.0, 1.0, (b, t, h, dk, dv)).astype(np.float32)
  kv = rng.standard_normal((b, t, h, dk, dv)).astype(np.float32)
  s0 = rng.standard_normal((b, h, dk, dv)).astype(np.float32) if with_s0 else None
  s = np.zeros((b, h, dk, dv)) if s0 is None else s0.astype(np.float64)
  expected = []
  for i in range(t):
    s = g[:, i] * s + kv[:, i]
    expected.append(s)
  out = fn(g, kv, s0)
  assert _rel_err(out, np.stack(expected, 1)) < 1e-6


@pytest.mark.parametrize("fn", [reference.gla_reference, reference.gla_associative])
def test_gla_final_state_composes_over_halves(fn):
  rng = np.random.default_rng()
  q, k, v, g, s0 = _inputs(rng, 2, 10, 2, 2, 4, 3)
  o, s = fn(q, k, v, g, initial_state=s0, return_final_state=True)
  o1, s1 = fn(q[:, :4], k[:, :4], v[:, :4], g[:, :4], initial_state=s0, return_final_state=True)
  o2, s2 = fn(q[:, 4:], k[:, 4:], v[:, 4:], g[:, 4:], initial_state=s1, return_final_state=True)
  assert _rel_err(np.concatenate([o1, o2], 1), o) < 1e-6
  assert _rel_err(s2, s) < 1e-6


@pytest.mark.parametrize("bad,match", [
    (dict(k=np.zeros((2, 5, 3))), "k must have rank 4"),
    (dict(v=np.zeros((2, 4, 3, 6), np.float32)), r"v must have shape .*\(2, 5, 3\)"),
    (dict(g=np.zeros((2, 5, 3, 5), np.float32)), r"g must have the shape of k \(2, 5, 3, 4\)"),
    (dict(q=np.zeros((2, 5, 3, 8), np.float32)), "q must have shape"),
    (dict(g=np.full((2, 5, 3, 4), 0.5, np.float32)), "must be <= 0"),
    (dict(initial_state=np.zeros((2, 3, 6, 4), np.float32)), "initial_state must have shape"),
])
def test_gla_bad_arguments_raise_value_error_naming_them(bad, match):
  args = dict(q=np.ones((2, 5, 3, 4), np.float32), k=np.ones((2, 5, 3, 4), np.float32),
              v=np.ones((2, 5, 3, 6), np.float32), g=-np.ones((2, 5, 3, 4), np.float32),
              initial_state=None)
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    reference.gla_reference(**args)
