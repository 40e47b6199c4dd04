"""Softmax attention of a few queries over a few keys, one Pallas program per (batch, head).

In a batch-1 streaming step the attentions are tiny (1 future query over 32 context tokens, 16
memory tokens over each other) and read their queries, keys and values as column blocks of merged
projections. XLA runs each as several small kernels; one program per head computes its logits,
softmax and weighted values at once. (An attention fused into its output projection, every
program recomputing all heads, ran 60 us per call on an H200: each head's chain of cross-warp
reductions is serial within a program; here the heads run side by side.)
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas import checks
from pallas.kernel_call import KernelCall, interpret_default, launch, without_program_id


def _kernel(*refs, has_mask, scale, use_dot, precision):
  if has_mask:
    q_ref, k_ref, v_ref, mask_ref, o_ref = refs
  else:
    (q_ref, k_ref, v_ref, o_ref), mask_ref = refs, None
  f32 = lambda x: x.astype(jnp.float32)
  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  if use_dot:
    logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)
  else:
    logits = jnp.sum(f32(q)[:, None, :] * f32(k)[None, :, :], axis=2)
  logits = scale * logits
  if mask_ref is not None:
    logits = logits + mask_ref[...][None, :]
  weights = jnp.exp(logits - jnp.max(logits, axis=1)[:, None])
  weights = weights / jnp.sum(weights, axis=1)[:, None]
  if use_dot:
    o = jnp.dot(weights.astype(v.dtype), v, precision=precision,
                preferred_element_type=jnp.float32)
  else:
    o = jnp.sum(weights[:, :, None] * f32(v)[None, :, :], axis=1)
  o_ref[...] = o.astype(o_ref.dtype)


def small_attention(q, k, v, *, num_heads, width, column_blocks=(0, 0, 0), mask=None,
                    num_warps=4, interpret=None):
  """concat_h softmax(q_h k_h^T / sqrt(dh) + mask) v_h for a few queries and keys.

  q: (B or 1, Q, Wq) (batch 1: shared by every batch element); k, v: (B, K, Wk), (B, K, Wv); the
  heads are the D = width columns at column_blocks[i] * D of each (merged projections are read in
  place, not sliced), head-major: H = num_heads heads of dh = D / H. mask: (B, K) bool (False:
  never attended) or None. Q, K and dh must be powers of two. Logits and softmax in float32 (a fully
  masked row attends uniformly, as Flax's). Returns (B, Q, D) in v's dtype. Runs
  `launch(small_attention_call(...))`.
  """
  return launch(small_attention_call(q, k, v, num_heads=num_heads, width=width,
                                     column_blocks=column_blocks, mask=mask, num_warps=num_warps,
                                     interpret=interpret))


def small_attention_call(q, k, v, *, num_heads, width, column_blocks=(0, 0, 0), mask=None,
                         num_warps=4, interpret=None):
  """`small_attention` as a KernelCall (same arguments and result)."""
  b, num_keys = k.shape[:2]
  num_queries = q.shape[1]
  d = width
  if d % num_heads:
    raise ValueError(f"the attention width D = {d} must be a multiple of num_heads = {num_heads}")
  head_dim = d // num_heads
  for name, array, block in zip("qkv", (q, k, v), column_blocks):
    if array.ndim != 3 or array.shape[-1] < (block + 1) * d or array.shape[0] not in (1, b):
      raise ValueError(f"{name} must have shape (B, rows, W) with W >= {(block + 1) * d} "
                       f"(column block {block} of D = {d}) and B = {b}, got {array.shape}")
  if v.shape[:2] != (b, num_keys):
    raise ValueError(f"v must have k's leading shape {(b, num_keys)}, got {v.shape}")
  for name, size in (("Q", num_queries), ("K", num_keys), ("dh", head_dim)):
    if not checks.is_power_of_two(size):
      raise ValueError(f"small_attention needs powers of two: {name} = {size}")
  def spec(array, block):
    batch = (lambda i: 0) if array.shape[0] == 1 else (lambda i: i)
    return pl.BlockSpec((None, array.shape[1], head_dim),
                        lambda i, h: (batch(i), 0, block * num_heads + h))

  specs = [spec(x, block) for x, block in zip((q, k, v), column_blocks)]
  operands = [q, k, v]
  if mask is not None:
    if mask.shape != (b, num_keys):
      raise ValueError(f"mask must have shape (B, K) = {(b, num_keys)}, got {mask.shape}")
    # Flax's masked logits are the dtype's minimum: an additive large negative does the same.
    operands.append(jnp.where(mask, 0.0, -1e30).astype(jnp.float32))
    specs.append(pl.BlockSpec((None, num_keys), lambda i, h: (i, 0)))
  use_dot = min(num_queries, num_keys, head_dim) >= checks.MIN_DOT_DIM
  precision = lax.Precision.HIGHEST if v.dtype == jnp.float32 else None
  return KernelCall(
      kernel=without_program_id(functools.partial(
          _kernel, has_mask=mask is not None, scale=float(head_dim ** -0.5), use_dot=use_dot,
          precision=precision)),
      grid=(b, num_heads),
      in_specs=specs,
      out_specs=[pl.BlockSpec((None, num_queries, head_dim), lambda i, h: (i, 0, h))],
      out_shape=[jax.ShapeDtypeStruct((b, num_queries, d), v.dtype)],
      operands=tuple(operands),
      finish=lambda outputs: outputs[0],
      num_warps=num_warps, num_stages=1,
      interpret=interpret_default(interpret),
      name=f"small_attention_q{num_queries}_k{num_keys}")


def small_attention_reference(q, k, v, *, num_heads, width, column_blocks=(0, 0, 0), mask=None):
  """`small_attention` through Flax's dot_product_attention in float32."""
  b, d = k.shape[0], width
  heads = lambda array, block: jnp.broadcast_to(
      array, (b,) + array.shape[1:])[..., block * d:(block + 1) * d].reshape(
          (b, array.shape[1], num_heads, -1)).astype(jnp.float32)
  q, k, v_heads = (heads(array, block) for array, block in zip((q, k, v), column_blocks))
  o = nn.dot_product_attention(q, k, v_heads, precision="highest",
                               mask=None if mask is None else mask[:, None, None, :])
  return o.reshape(o.shape[:2] + (d,)).astype(v.dtype)
