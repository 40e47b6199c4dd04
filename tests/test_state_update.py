"""The state_update Pallas kernels (interpret mode) against the lax.scan reference, values and
gradients; their Triton lowering for CUDA; their argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas import reference
from pallas.state_update import state_update

_GATE_RANGES = {"any": (0.0, 1.0), "near0": (0.0, 1e-3), "near1": (1.0 - 1e-3, 1.0)}


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _inputs(rng, shape, *, gates="any", with_s0=True, dtype=jnp.float32):
  """g, kv: (B, T, H, DK, DV) and s0: (B, H, DK, DV) or None, random, in `dtype`."""
  b, _, h, dk, dv = shape
  g = jnp.asarray(rng.uniform(*_GATE_RANGES[gates], shape), dtype)
  kv = jnp.asarray(rng.standard_normal(shape), dtype)
  s0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)), dtype) if with_s0 else None
  return g, kv, s0


def _value_and_grads(fn, g, kv, s0, cotangent):
  """fn(g, kv, s0) and the gradients of <fn(g, kv, s0), cotangent> in (g, kv[, s0])."""
  if s0 is None:
    s, vjp = jax.vjp(lambda g, kv: fn(g, kv, None), g, kv)
  else:
    s, vjp = jax.vjp(fn, g, kv, s0)
  return s, vjp(cotangent)


@pytest.mark.parametrize("shape,blocks,gates,with_s0", [
    ((1, 1, 1, 4, 8), (None, None), "any", True),      # T = 1: only the step after the loop
    ((2, 7, 3, 8, 16), (4, 8), "any", True),           # 2 x 2 tiles per (batch, head)
    ((2, 7, 3, 8, 16), (4, 8), "any", False),
    ((1, 5, 2, 6, 12), (None, None), "near0", True),   # default blocks 2 x 4 on non-powers of two
    ((1, 9, 2, 16, 4), (8, 2), "near1", False),        # DK > DV, gates that keep every step
])
def test_matches_reference_values_and_grads(shape, blocks, gates, with_s0):
  rng = np.random.default_rng()
  g, kv, s0 = _inputs(rng, shape, gates=gates, with_s0=with_s0)
  cotangent = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  block_k, block_v = blocks
  kernel = lambda g, kv, s0: state_update(g, kv, s0, block_k=block_k, block_v=block_v,
                                          interpret=True)
  s, grads = _value_and_grads(kernel, g, kv, s0, cotangent)
  s_ref, grads_ref = _value_and_grads(reference.state_update_reference, g, kv, s0, cotangent)
  assert s.shape == shape and s.dtype == jnp.float32
  assert _rel_err(s, s_ref) < 1e-6
  assert len(grads) == len(grads_ref) == (3 if with_s0 else 2)
  for name, grad, grad_ref in zip(("g", "kv", "s0"), grads, grads_ref):
    assert _rel_err(grad, grad_ref) < 1e-5, name


@pytest.mark.parametrize("dtype,grad_tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_input_dtypes_keep_float32_state(dtype, grad_tol):
  """The state is float32 whatever the inputs; gradients come back in the inputs' dtype, so their
  error is that dtype's rounding, against float32 gradients at the same input values."""
  rng = np.random.default_rng()
  shape = (2, 6, 2, 8, 8)
  g, kv, s0 = _inputs(rng, shape, dtype=dtype)
  cotangent = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  kernel = lambda g, kv, s0: state_update(g, kv, s0, block_k=4, block_v=8, interpret=True)
  s, grads = _value_and_grads(kernel, g, kv, s0, cotangent)
  f32 = [x.astype(jnp.float32) for x in (g, kv, s0)]
  s_ref, grads_ref = _value_and_grads(reference.state_update_reference, *f32, cotangent)
  assert s.dtype == jnp.float32
  assert _rel_err(s, s_ref) < 1e-6
  for name, grad, grad_ref in zip(("g", "kv", "s0"), grads, grads_ref):
    assert grad.dtype == dtype, name
    assert _rel_err(grad, grad_ref) < grad_tol, name


def test_lowers_to_triton_for_cuda():
  """Pallas -> Triton lowering of both kernels at DK = DV = 128, T not a power of two, bf16 kv.

  Needs no GPU on JAX 0.10; later versions ask the local GPU for its compute capability."""
  shape = (2, 7, 2, 128, 128)
  g = jax.ShapeDtypeStruct(shape, jnp.float32)
  kv = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  s0 = jax.ShapeDtypeStruct((2, 2, 128, 128), jnp.float32)
  loss = lambda g, kv, s0: jnp.sum(state_update(g, kv, s0))
  try:
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(g, kv, s0).lower(
        lowering_platforms=("cuda",))
  except RuntimeError as e:
    if "No supported GPU devices" not in str(e):
      raise
    pytest.skip(f"this JAX version lowers Pallas to Triton only with a GPU present: {e}")
  text = lowered.as_text()
  assert text.count("xla.gpu.triton") == 2, "expected the forward and the backward Triton kernel"
  assert "state_update_forward" in text and "state_update_backward" in text


@pytest.mark.parametrize("kwargs,shape,s0_shape,match", [
    ({"block_k": 3}, (1, 2, 1, 6, 8), None, r"block_k must be a power of two .* DK = 6, got 3"),
    ({"block_v": 16}, (1, 2, 1, 4, 8), None, r"block_v must be a power of two .* DV = 8, got 16"),
    ({}, (1, 0, 1, 4, 8), None, "T >= 1"),
    ({}, (1, 2, 1, 4, 8), (1, 1, 8, 4), r"s0 must have shape \(B, H, DK, DV\)"),
])
def test_bad_arguments_raise(kwargs, shape, s0_shape, match):
  g = kv = jnp.ones(shape, jnp.float32)
  s0 = None if s0_shape is None else jnp.ones(s0_shape, jnp.float32)
  with pytest.raises(ValueError, match=match):
    state_update(g, kv, s0, interpret=True, **kwargs)
