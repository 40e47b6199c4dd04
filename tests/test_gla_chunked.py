"""The chunked GLA kernels (Pallas interpret mode) against pallas.reference.gla_reference, and their
real Triton lowering for GPU (no GPU needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas import reference
from pallas.gla_chunked import gla_chunked
from helpers import lower_for_h100


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _inputs(rng, b, t, m, h, dk, dv, dtype=np.float32, gates=(0.02, 0.999)):
  """Random q (4-D when m is None), k, v in dtype; logs of gates drawn uniformly; float32 s0."""
  q_shape = (b, t, h, dk) if m is None else (b, t, m, h, dk)
  q, k, v = (jnp.asarray(rng.standard_normal(s), dtype)
             for s in (q_shape, (b, t, h, dk), (b, t, h, dv)))
  g = np.log(rng.uniform(*gates, (b, t, h, dk))).astype(np.float32)
  s0 = rng.standard_normal((b, h, dk, dv)).astype(np.float32)
  return q, k, v, g, s0


def _kernel(**kwargs):
  return jax.jit(lambda q, k, v, g, s0: gla_chunked(
      q, k, v, g, initial_state=s0, return_final_state=True, interpret=True, **kwargs))


def _reference(q, k, v, g, s0):
  return reference.gla_reference(q, k, v, g, initial_state=s0, return_final_state=True)


def _outputs_and_grads(fn, args, do, ds):
  """fn(*args) and the gradients wrt (q, k, v, g, s0) of <o, do> + <S_T, ds>."""
  out, vjp = jax.vjp(fn, *args)
  return out, vjp((jnp.asarray(do, out[0].dtype), jnp.asarray(ds)))


def _check_against_reference(args, kernel, tol, grad_tol):
  """Forward and all gradients of `kernel` vs the reference, with random cotangents."""
  rng = np.random.default_rng()
  o_shape = args[0].shape[:-1] + (args[2].shape[-1],)
  do = rng.standard_normal(o_shape).astype(np.float32)
  ds = rng.standard_normal(args[4].shape).astype(np.float32)
  (o, s), grads = _outputs_and_grads(kernel, args, do, ds)
  (o_ref, s_ref), grads_ref = _outputs_and_grads(_reference, args, do, ds)
  assert o.shape == o_ref.shape and o.dtype == o_ref.dtype and s.shape == s_ref.shape
  assert _rel_err(o, o_ref) < tol and _rel_err(s, s_ref) < tol
  for name, x, ref in zip("q k v g s0".split(), grads, grads_ref):
    assert x.shape == ref.shape and x.dtype == ref.dtype, name
    assert np.all(np.isfinite(np.asarray(x, np.float32))), name
    assert _rel_err(x, ref) < grad_tol, (name, _rel_err(x, ref))


# float32 in interpret mode: the matmuls are exact float32 on CPU and the errors ~1e-6; on GPU they
# run at TF32 (~1e-3 relative), which these bounds would not cover.
# Gates near 0 (down to log(1e-4) and log(1e-12) per step) check that nothing overflows (every exp
# the kernels form has an argument <= MAX_SPREAD; such gates take the one-by-one path for the keys
# inside a query block, MILD ones mostly the one-matmul path) and that the log-gate gradient keeps
# its precision (its large gate-free terms are kept out of the differences); gates near 1 do not
# decay at all.
MILD, NEAR_1, STRONG, EXTREME = (0.02, 0.999), (0.9999, 1.0), (1e-4, 2e-4), (1e-12, 1e-11)
# (b, t, m, h, dk, dv, chunk_size, sub_chunk, gates): T = 1; T not a multiple of the chunk, M = 1
# as 4-D q, DK != DV, H > 1 (one 16-step block per chunk); M = 16 in one-step query blocks over two
# chunks; M = 3 padded to 4 with non-power-of-two DK, DV (each step's gates repeated over its
# rows); M = 16 in four-step blocks; M = 1 in two 16-step blocks per chunk (later query blocks for
# a key block); M = 4 likewise with mild gates (one matmul per block); M = 2 (16-step blocks).
CASES = [(1, 1, 1, 1, 16, 16, 16, None, MILD), (2, 37, None, 2, 32, 16, 16, None, MILD),
         (1, 40, 16, 1, 16, 16, 32, 1, NEAR_1), (1, 21, 3, 2, 5, 6, 16, None, MILD),
         (1, 40, 16, 1, 16, 32, 16, 4, STRONG), (1, 40, None, 1, 16, 16, 32, 16, STRONG),
         (1, 45, 4, 1, 16, 16, 32, 8, MILD), (1, 40, 2, 1, 16, 16, 16, None, EXTREME)]


@pytest.mark.parametrize("b,t,m,h,dk,dv,chunk_size,sub_chunk,gates", CASES)
def test_forward_and_gradients_match_reference(b, t, m, h, dk, dv, chunk_size, sub_chunk, gates):
  args = _inputs(np.random.default_rng(), b, t, m, h, dk, dv, gates=gates)
  kernel = _kernel(chunk_size=chunk_size, sub_chunk=sub_chunk)
  _check_against_reference(args, kernel, tol=1e-5, grad_tol=1e-4)


def test_without_initial_or_final_state_matches_reference():
  q, k, v, g, _ = _inputs(np.random.default_rng(), 2, 19, 2, 1, 16, 16)
  do = np.random.default_rng().standard_normal(q.shape[:-1] + (16,)).astype(np.float32)
  kernel = jax.jit(lambda *a: gla_chunked(*a, chunk_size=16, interpret=True))
  o, grads = jax.vjp(kernel, q, k, v, g)
  o_ref, grads_ref = jax.vjp(reference.gla_reference, q, k, v, g)
  assert _rel_err(o, o_ref) < 1e-5
  for x, ref in zip(grads(do), grads_ref(do)):
    assert _rel_err(x, ref) < 2e-5


def test_bfloat16_inputs():
  """bfloat16 q, k, v (matmul operands rounded to bfloat16, accumulated in float32) against the
  reference on the same inputs (exact float32 arithmetic)."""
  args = _inputs(np.random.default_rng(), 1, 37, 4, 2, 32, 16, dtype=jnp.bfloat16)
  _check_against_reference(args, _kernel(chunk_size=16), tol=1e-2, grad_tol=1.5e-2)


def test_two_halves_with_carried_state_equal_the_whole():
  q, k, v, g, s0 = _inputs(np.random.default_rng(), 1, 40, 2, 2, 16, 16)
  kernel = _kernel(chunk_size=16)
  o, s = kernel(q, k, v, g, s0)
  o1, s1 = kernel(q[:, :23], k[:, :23], v[:, :23], g[:, :23], s0)
  o2, s2 = kernel(q[:, 23:], k[:, 23:], v[:, 23:], g[:, 23:], s1)
  assert _rel_err(np.concatenate([o1, o2], 1), o) < 1e-5
  assert _rel_err(s2, s) < 1e-5


@pytest.mark.parametrize("kwargs,message", [
    (dict(chunk_size=24), "chunk_size must be a power of two >= 16, got 24"),
    (dict(block_v=8), "block_v must be a power of two >= 16, got 8"),
    (dict(sub_chunk=2), r"sub_chunk must be .* \(M = 3, padded to 4\), got 2"),
    (dict(sub_chunk=128), "got 128")])
def test_bad_block_sizes_are_rejected(kwargs, message):
  q, k, v, g, _ = _inputs(np.random.default_rng(), 1, 2, 3, 1, 4, 4)
  with pytest.raises(ValueError, match=message):
    gla_chunked(q, k, v, g, interpret=True, **kwargs)


@pytest.mark.parametrize("m,dk,dv,dtype,sub_chunk", [
    (None, 128, 128, jnp.bfloat16, None), (16, 128, 128, jnp.float32, None),
    (16, 128, 128, jnp.bfloat16, 4), (3, 5, 6, jnp.float32, None)])
def test_triton_lowering_for_gpu(m, dk, dv, dtype, sub_chunk):
  """Lowers forward and gradient through the Pallas Triton backend for an abstract H100 (not
  compiled: Triton's own compile errors show only on a GPU)."""
  b, t, h = 2, 70, 2
  q_shape = (b, t, h, dk) if m is None else (b, t, m, h, dk)
  shapes = [(q_shape, dtype), ((b, t, h, dk), dtype), ((b, t, h, dv), dtype),
            ((b, t, h, dk), jnp.float32), ((b, h, dk, dv), jnp.float32)]
  args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
  forward = lambda q, k, v, g, s0: gla_chunked(q, k, v, g, initial_state=s0,
                                               return_final_state=True, sub_chunk=sub_chunk)

  def loss(*args):
    o, s = forward(*args)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

  for fn, num_kernels in ((forward, 2), (jax.grad(loss, argnums=range(5)), 5)):
    assert lower_for_h100(fn, *args).count("__gpu$xla.gpu.triton") == num_kernels
