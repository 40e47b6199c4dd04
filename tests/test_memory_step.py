"""The memory-step kernels (Pallas interpret mode) against their references, the references against
the model's CrossLinearAttention, and their Triton lowering for GPU (no GPU needed)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clam_jax import clam
from pallas.memory_step import (memory_readout, memory_readout_reference, memory_update,
                                memory_update_reference)
import helpers

D, H = 64, 4
DK = D // H
TAU = 16.0


def _inputs(rng, b, m, num_layers, dtype=np.float32, d=D, h=H):
  """Random frames (B, L 3 D) (gates of both signs), queries (M, H, DK), non-zero states."""
  dk = d // h
  frames = (3 * rng.standard_normal((b, num_layers * 3 * d))).astype(dtype)
  queries = rng.standard_normal((m, h, dk)).astype(dtype)
  states = tuple(rng.standard_normal((b, h, dk, dk)).astype(np.float32)
                 for _ in range(num_layers))
  return frames, states, queries


def _update(feature_map, kernel=True, h=H, **options):
  fn = memory_update if kernel else memory_update_reference
  if kernel:
    options["interpret"] = True
  return jax.jit(lambda frames, states, queries: fn(
      frames, states, queries, num_heads=h, gate_temperature=TAU, feature_map=feature_map,
      **options))


# (b, m, num_layers, dtype, feature_map): tl.dot (M = DK = 16) and row-by-row (M = 4) read-outs.
CASES = [(1, 16, 2, np.float32, "identity"), (3, 4, 1, np.float32, "elu1"),
         (3, 16, 2, jnp.bfloat16, "elu1"), (1, 4, 2, jnp.bfloat16, "identity")]


@pytest.mark.parametrize("b,m,num_layers,dtype,feature_map", CASES)
def test_memory_update_matches_reference(b, m, num_layers, dtype, feature_map):
  args = _inputs(np.random.default_rng(), b, m, num_layers, dtype)
  o, states = _update(feature_map)(*args)
  o_ref, states_ref = _update(feature_map, kernel=False)(*args)
  assert o.shape == (b, m, D) and o.dtype == dtype
  assert len(states) == num_layers
  for s, s_ref in zip(states, states_ref):
    assert s.shape == (b, H, DK, DK) and s.dtype == jnp.float32
    # Both compute in float32 from the same inputs: tight for the states whatever the dtype.
    assert helpers.rel_err(s, s_ref) < 1e-5
  # bf16: o rounded to 8 mantissa bits.
  assert helpers.rel_err(o, o_ref) < (1e-5 if dtype == np.float32 else 1e-2)


@pytest.mark.parametrize("b,m,dtype,feature_map", [
    (3, 16, np.float32, "elu1"), (1, 4, np.float32, "identity"), (3, 4, jnp.bfloat16, "elu1")])
def test_memory_readout_matches_reference(b, m, dtype, feature_map):
  rng = np.random.default_rng()
  q = rng.standard_normal((b, m, D)).astype(dtype)
  state = rng.standard_normal((b, H, DK, DK)).astype(np.float32)
  o = jax.jit(lambda q, s: memory_readout(q, s, feature_map=feature_map, interpret=True))(q, state)
  o_ref = memory_readout_reference(q, state, feature_map=feature_map)
  assert o.shape == (b, m, D) and o.dtype == dtype
  assert helpers.rel_err(o, o_ref) < (1e-5 if dtype == np.float32 else 1e-2)


# (block_v, m, dtype, feature_map) at DK = DV = 64: 4, 2 and 1 DV blocks per head; tl.dot (M = 16)
# and row-by-row (M = 4) read-outs.
BLOCK_V_CASES = [(16, 16, np.float32, "elu1"), (32, 4, np.float32, "identity"),
                 (32, 16, jnp.bfloat16, "identity"), (64, 16, np.float32, "identity")]


@pytest.mark.parametrize("block_v,m,dtype,feature_map", BLOCK_V_CASES)
def test_block_v_splits_dv(block_v, m, dtype, feature_map):
  """Both kernels with the state split over DV blocks (the tests above have DV = 16 = one block)."""
  b, d, h = 2, 128, 2
  rng = np.random.default_rng()
  args = _inputs(rng, b, m, 2, dtype, d=d, h=h)
  o, states = _update(feature_map, h=h, block_v=block_v)(*args)
  o_ref, states_ref = _update(feature_map, kernel=False, h=h)(*args)
  tolerance = 1e-5 if dtype == np.float32 else 1e-2
  for s, s_ref in zip(states, states_ref):
    assert helpers.rel_err(s, s_ref) < 1e-5
  assert o.shape == (b, m, d) and helpers.rel_err(o, o_ref) < tolerance
  q = rng.standard_normal((b, m, d)).astype(dtype)
  o = jax.jit(lambda q, s: memory_readout(q, s, feature_map=feature_map, block_v=block_v,
                                          interpret=True))(q, args[1][0])
  o_ref = memory_readout_reference(q, args[1][0], feature_map=feature_map)
  assert o.shape == (b, m, d) and helpers.rel_err(o, o_ref) < tolerance


@pytest.mark.parametrize("feature_map", clam.FEATURE_MAPS)
def test_references_match_cross_linear_attention(feature_map):
  """One unmasked frame through each layer's CrossLinearAttention, its projections taken from the
  merged frames as streaming._merged_memory splits them; its `out` projection set to the identity
  so that the module returns its read-out o itself."""
  b, m, num_layers = 3, 4, 2
  frames, states, queries = _inputs(np.random.default_rng(), b, m, num_layers)
  config = helpers.model_config(d_model=D, memory_heads=H, memory_tokens=m,
                                memory_layers=num_layers, gate_temperature=TAU,
                                memory_feature_map=feature_map)
  attention = clam.CrossLinearAttention(config)
  split = frames.reshape(b, 1, num_layers, 3, H, DK)
  batch_queries = np.broadcast_to(queries, (b,) + queries.shape)
  mask = np.ones((b, 1), bool)
  params = flax.core.unfreeze(attention.init(
      jax.random.key(0), None, None, mask, states[0],
      projections=dict(query=batch_queries, key=split[:, :, 0, 0], value=split[:, :, 0, 1],
                       gate=split[:, :, 0, 2])))
  params["params"]["out"] = {"kernel": np.eye(D, dtype=np.float32).reshape(H, DK, D),
                             "bias": np.zeros(D, np.float32)}
  o_ref, states_ref = memory_update_reference(frames, states, queries, num_heads=H,
                                              gate_temperature=TAU, feature_map=feature_map)
  for layer in range(num_layers):
    projections = dict(zip(("key", "value", "gate"), (split[:, :, layer, j] for j in range(3))))
    projections["query"] = batch_queries
    o, state = attention.apply(params, None, None, mask, states[layer], projections=projections)
    assert helpers.rel_err(states_ref[layer], state) < 1e-5
    if layer == 0:
      assert helpers.rel_err(o_ref, o) < 1e-5
      readout = memory_readout_reference(batch_queries.reshape(b, m, D), state,
                                         feature_map=feature_map)
      assert helpers.rel_err(readout, o) < 1e-5


@pytest.mark.parametrize("fn,args,message", [
    ("update", dict(m=12), "queries: M = 12 must be a power of two"),
    ("update", dict(dv=DK + 1), r"states\[1\] must have shape \(B, H, DK, DV\) with DV = DK"),
    ("readout", dict(m=6), "q: M = 6 must be a power of two"),
    ("readout", dict(dv=DK + 1), r"state must have shape \(B, H, DK, DV\) with DV = DK"),
    ("update", dict(block_v=12), "block_v must be a power of two, got 12"),
    ("readout", dict(block_v=0), "block_v must be a power of two, got 0")])
def test_bad_shapes(fn, args, message):
  rng = np.random.default_rng()
  m, dv, block_v = args.get("m", 4), args.get("dv", DK), args.get("block_v", 16)
  frames, states, queries = _inputs(rng, 2, m, 2)
  bad_state = rng.standard_normal((2, H, DK, dv)).astype(np.float32)
  with pytest.raises(ValueError, match=message):
    if fn == "update":
      memory_update(frames, (states[0], bad_state), queries, num_heads=H, gate_temperature=TAU,
                    block_v=block_v, interpret=True)
    else:
      memory_readout(rng.standard_normal((2, m, D)).astype(np.float32), bad_state,
                     block_v=block_v, interpret=True)


@pytest.mark.parametrize("b,m,d,h,num_layers,dtype,block_v", [
    (1, 16, 1024, 8, 2, jnp.bfloat16, 32), (2, 4, 64, 4, 1, jnp.float32, 16)])
def test_triton_lowering_for_gpu(b, m, d, h, num_layers, dtype, block_v):
  """Lowers both kernels through the Pallas Triton backend for an abstract H100, the EK100 memory
  (4 DV blocks per head, tl.dot read-outs) and a small one (one DV block, row read-outs); not
  compiled: Triton's own compile errors show only on a GPU."""
  dk = d // h
  frames = jax.ShapeDtypeStruct((b, num_layers * 3 * d), dtype)
  states = tuple(jax.ShapeDtypeStruct((b, h, dk, dk), jnp.float32) for _ in range(num_layers))
  queries = jax.ShapeDtypeStruct((m, h, dk), dtype)
  update = lambda frames, states, queries: memory_update(
      frames, states, queries, num_heads=h, gate_temperature=TAU, feature_map="elu1",
      block_v=block_v, interpret=False)
  readout = lambda q, state: memory_readout(q, state, feature_map="elu1", block_v=block_v,
                                            interpret=False)
  for fn, args in ((update, (frames, states, queries)),
                   (readout, (jax.ShapeDtypeStruct((b, m, d), dtype), states[0]))):
    assert "__gpu$xla.gpu.triton" in helpers.lower_for_h100(fn, *args)
