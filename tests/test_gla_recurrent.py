"""The fused recurrent GLA kernels (Pallas interpret mode) against pallas.reference.gla_reference,
and their real Triton lowering for GPU (no GPU needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas import reference
from pallas.gla_recurrent import gla_recurrent
from helpers import lower_for_h100


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _inputs(rng, b, t, m, h, dk, dv, dtype=np.float32, gates=(0.02, 0.999)):
  """Random q (4-D when m is None), k, v in dtype; logs of gates drawn uniformly; float32 s0."""
  q_shape = (b, t, h, dk) if m is None else (b, t, m, h, dk)
  shapes = (q_shape, (b, t, h, dk), (b, t, h, dv))
  q, k, v = (rng.standard_normal(s).astype(dtype) for s in shapes)
  g = np.log(rng.uniform(*gates, (b, t, h, dk))).astype(np.float32)
  s0 = rng.standard_normal((b, h, dk, dv)).astype(np.float32)
  return q, k, v, g, s0


def _kernel(block_t=1, **kwargs):
  """block_t = 1 unless asked: interpret mode compiles every unrolled time step of a block."""
  return jax.jit(lambda q, k, v, g, s0: gla_recurrent(
      q, k, v, g, initial_state=s0, return_final_state=True, block_t=block_t, interpret=True,
      **kwargs))


def _reference(q, k, v, g, s0):
  return reference.gla_reference(q, k, v, g, initial_state=s0, return_final_state=True)


def _grads(fn, args, do, ds):
  """Gradients wrt (q, k, v, g, s0) of <o, do> + <S_T, ds>."""
  def loss(*args):
    o, s = fn(*args)
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(s * ds)
  return jax.grad(loss, argnums=range(5))(*args)


# (b, t, m, h, dk, dv, block_v, block_t): T = 1 < block_t, odd T with whole time blocks and a
# remainder, M = 1 as 4-D q, M > 1 padded to a power of two, DK != DV (non powers of two), several
# DV blocks, and the tl.dot path (M, DK, block_v >= 16).
CASES = [(1, 1, None, 1, 4, 4, 32, 4), (2, 7, 3, 2, 5, 6, 2, 3), (1, 5, 16, 2, 16, 32, 16, 2)]


@pytest.mark.parametrize("b,t,m,h,dk,dv,block_v,block_t", CASES)
def test_forward_and_gradients_match_reference(b, t, m, h, dk, dv, block_v, block_t):
  rng = np.random.default_rng()
  args = _inputs(rng, b, t, m, h, dk, dv)
  kernel = _kernel(block_v=block_v, block_t=block_t)
  o, s = kernel(*args)
  o_ref, s_ref = _reference(*args)
  assert o.shape == o_ref.shape and o.dtype == o_ref.dtype and s.shape == (b, h, dk, dv)
  assert _rel_err(o, o_ref) < 1e-4 and _rel_err(s, s_ref) < 1e-4
  do = rng.standard_normal(o.shape).astype(np.float32)
  ds = rng.standard_normal(s.shape).astype(np.float32)
  grads = _grads(kernel, args, do, ds)
  for name, grad, grad_ref in zip("q k v g s0".split(), grads, _grads(_reference, args, do, ds)):
    assert grad.shape == grad_ref.shape, name
    assert _rel_err(grad, grad_ref) < 1e-4, name


def test_without_initial_state_or_final_state():
  rng = np.random.default_rng()
  q, k, v, g, _ = _inputs(rng, 2, 6, 2, 1, 8, 4)
  kernel = jax.jit(lambda q, k, v, g: gla_recurrent(q, k, v, g, block_t=1, interpret=True))
  o = kernel(q, k, v, g)
  assert _rel_err(o, reference.gla_reference(q, k, v, g)) < 1e-4
  do = rng.standard_normal(o.shape).astype(np.float32)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * do)
  grads = jax.grad(loss(kernel), argnums=range(4))(q, k, v, g)
  grads_ref = jax.grad(loss(reference.gla_reference), argnums=range(4))(q, k, v, g)
  for name, grad, grad_ref in zip("q k v g".split(), grads, grads_ref):
    assert _rel_err(grad, grad_ref) < 1e-4, name


# The log-gate gradient is a reverse cumulative sum of q.dq - k.dk, terms of order one. With forget
# gates near 0 the true dg is ~1e-3 of them (dg_t = exp(g_t) rowsum(dS_t * S_{t-1})), so float32
# rounding of the summed terms gives it a relative error ~1e3 times larger than the other gradients.
@pytest.mark.parametrize("gates,dg_tol", [((5e-4, 2e-3), 3e-3), ((0.9998, 0.99995), 1e-4)])
def test_gradients_with_extreme_gates(gates, dg_tol):
  rng = np.random.default_rng()
  args = _inputs(rng, 1, 9, None, 2, 8, 4, gates=gates)
  o, s = _kernel()(*args)
  o_ref, s_ref = _reference(*args)
  assert _rel_err(o, o_ref) < 1e-4 and _rel_err(s, s_ref) < 1e-4
  do = rng.standard_normal(o.shape).astype(np.float32)
  ds = rng.standard_normal(s.shape).astype(np.float32)
  grads = _grads(_kernel(), args, do, ds)
  for name, grad, grad_ref in zip("q k v g s0".split(), grads, _grads(_reference, args, do, ds)):
    assert _rel_err(grad, grad_ref) < (dg_tol if name == "g" else 1e-4), name


def test_bfloat16_inputs():
  rng = np.random.default_rng()
  args = _inputs(rng, 2, 5, 2, 2, 8, 8, dtype=jnp.bfloat16)
  o, s = _kernel()(*args)
  o_ref, s_ref = _reference(*args)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  # Both compute in float32 from the same bf16 inputs; o is rounded to bf16 (8 mantissa bits).
  assert _rel_err(o, o_ref) < 1e-2 and _rel_err(s, s_ref) < 1e-4
  do = rng.standard_normal(o.shape).astype(jnp.bfloat16)
  ds = rng.standard_normal(s.shape).astype(np.float32)
  grads = _grads(_kernel(), args, do, ds)
  for name, grad, grad_ref in zip("q k v g s0".split(), grads, _grads(_reference, args, do, ds)):
    assert grad.dtype == grad_ref.dtype, name
    assert _rel_err(grad, grad_ref) < 1e-2, name


def test_final_state_composes_over_halves():
  rng = np.random.default_rng()
  q, k, v, g, s0 = _inputs(rng, 2, 9, None, 1, 4, 8)
  kernel = _kernel(block_v=4)
  o, s = kernel(q, k, v, g, s0)
  o1, s1 = kernel(q[:, :4], k[:, :4], v[:, :4], g[:, :4], s0)
  o2, s2 = kernel(q[:, 4:], k[:, 4:], v[:, 4:], g[:, 4:], s1)
  assert _rel_err(np.concatenate([o1, o2], 1), o) < 1e-5
  assert _rel_err(s2, s) < 1e-5


@pytest.mark.parametrize("option,message", [
    (dict(block_v=24), "block_v must be a power of two, got 24"),
    (dict(block_t=0), "block_t must be >= 1, got 0")])
def test_bad_block_sizes(option, message):
  q, k, v, g, _ = _inputs(np.random.default_rng(), 1, 2, None, 1, 4, 4)
  with pytest.raises(ValueError, match=message):
    gla_recurrent(q, k, v, g, interpret=True, **option)


@pytest.mark.parametrize("m,dk,dv,dtype", [
    (None, 128, 128, jnp.bfloat16), (16, 128, 128, jnp.float32), (3, 5, 6, jnp.float32)])
def test_triton_lowering_for_gpu(m, dk, dv, dtype):
  """Lowers forward and gradient through the Pallas Triton backend for an abstract H100 (not
  compiled: Triton's own compile errors show only on a GPU)."""
  b, t, h = 2, 7, 2
  q_shape = (b, t, h, dk) if m is None else (b, t, m, h, dk)
  shapes = [(q_shape, dtype), ((b, t, h, dk), dtype), ((b, t, h, dv), dtype),
            ((b, t, h, dk), jnp.float32), ((b, h, dk, dv), jnp.float32)]
  args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
  forward = lambda q, k, v, g, s0: gla_recurrent(q, k, v, g, initial_state=s0,
                                                 return_final_state=True)

  def loss(*args):
    o, s = forward(*args)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

  for fn in (forward, jax.grad(loss, argnums=range(5))):
    assert "__gpu$xla.gpu.triton" in lower_for_h100(fn, *args)
