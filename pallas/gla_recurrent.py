"""Fused recurrent gated linear attention: Pallas GPU (Triton) kernels, forward and backward.

One program per (batch, head, DV block) keeps its DK x block_v slice of the state on chip and walks
time inside the kernel, so per-step states never reach device memory. The backward kernel recomputes
S_t in a forward-time pass (for dq) and carries dS_t in a reverse pass (for dk, dv and the initial
state); the log-gate gradient follows from dq and dk by a reverse cumulative sum outside the kernel.
Semantics are those of `pallas.reference.gla_reference`.
"""

import functools
import math
import operator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas import checks

# The kernels prefetch by hand (see `_prefetched_loop`); Triton's own pipelining stays off.
_NUM_STAGES = 1


def _queries(m, use_dot, interpret):
  """Loads, stores and the three (M, DK, bv) contractions of the M queries of one step.

  With tl.dot a step's queries are one (M, D) tile, contracted on tensor cores by three TF32
  products (about float32 accuracy; Triton's float32 tl.dot on CUDA cores keeps both operands
  whole in registers and spills); the CPU of interpret mode has only plain float32 products.
  Without tl.dot they are M separate rows: a row times the (DK, bv) state is a 2-D broadcast and
  reduction in the state's own layout, where an (M, DK, bv) broadcast would make Triton move the
  whole state through shared memory every step.
  """
  if use_dot:
    precision = (lax.Precision.HIGHEST if interpret
                 else lax.DotAlgorithmPreset.TF32_TF32_F32_X3)

    def contract(a, b, dims):
      return lax.dot_general(a, b, (dims, ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)

    def store(ref, t, x):
      ref[t] = x.astype(ref.dtype)

    load = lambda ref, t: ref[t]                          # (M, D)
    q_s = lambda q, s: contract(q, s, ((1,), (0,)))       # (M, DK) x (DK, bv) -> (M, bv)
    do_st = lambda do, s: contract(do, s, ((1,), (1,)))   # (M, bv) x (DK, bv) -> (M, DK)
    qt_do = lambda q, do: contract(q, do, ((0,), (0,)))   # (M, DK) x (M, bv) -> (DK, bv)
  else:
    def store(ref, t, rows):
      for i, row in enumerate(rows):
        ref[t, i] = row.astype(ref.dtype)

    load = lambda ref, t: tuple(ref[t, i] for i in range(m))  # M rows of (D,)
    q_s = lambda q, s: tuple(jnp.sum(row[:, None] * s, axis=0) for row in q)
    do_st = lambda do, s: tuple(jnp.sum(row[None, :] * s, axis=1) for row in do)
    qt_do = lambda q, do: functools.reduce(
        operator.add, (a[:, None] * b[None, :] for a, b in zip(q, do)))
  return load, store, q_s, do_st, qt_do


def _exp(x):
  # exp2 is one MUFU.EX2 (plus a scaling for subnormals) where exp is about eight instructions, on
  # values that every thread sharing a state row recomputes each step.
  return jnp.exp2(x * math.log2(math.e))


def _f32(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def _prefetched_loop(num_steps, block_t, load, body, carry, reverse=False):
  """carry = body(t, inputs_t, carry) for t = 0 .. num_steps - 1 (descending if reverse).

  inputs_t = load(t) is loaded block_t steps ahead, right after step t - block_t has used its slot,
  so its memory latency overlaps the work of the steps in between instead of stalling step t. The
  loop body holds block_t steps, each slot refilled in place: a slot rotated through the loop
  carry would need a register copy that waits for the load. Convert loaded values only where they
  are used, for the same reason.
  """
  time = (lambda i: num_steps - 1 - i) if reverse else (lambda i: i)
  fetch = lambda i: load(time(jnp.minimum(i, num_steps - 1)))

  def run(first, num, carry, slots, refill=True):
    slots = list(slots)
    for j in range(num):
      carry = body(time(first + j), slots[j], carry)
      if refill:
        slots[j] = fetch(first + j + block_t)
    return carry, tuple(slots)

  num_blocks, tail = divmod(num_steps, block_t)
  slots = tuple(fetch(j) for j in range(block_t))
  carry, slots = lax.fori_loop(0, num_blocks, lambda n, state: run(n * block_t, block_t, *state),
                               (carry, slots))
  return run(num_blocks * block_t, tail, carry, slots, refill=False)[0]


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, s0_ref, o_ref, s_out_ref, *, scale, queries,
                    block_t):
  """Refs: q (T, M, DK), k, g (T, DK), v (T, bv), s0 (DK, bv); writes o (T, M, bv), s_T (DK, bv)."""
  load_q, store, q_s, _, _ = queries

  def step(t, inputs, s):
    q, k, v, g = _f32(inputs)
    s = _exp(g)[:, None] * s + k[:, None] * v[None, :]
    store(o_ref, t, jax.tree.map(lambda o: scale * o, q_s(q, s)))
    return s

  load = lambda t: (load_q(q_ref, t), k_ref[t], v_ref[t], g_ref[t])
  s_out_ref[...] = _prefetched_loop(k_ref.shape[0], block_t, load, step, s0_ref[...])


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, s0_ref, do_ref, ds_out_ref,
                     dq_ref, dk_ref, dv_ref, ds0_ref, *, scale, queries, block_t):
  """Refs as in `_forward_kernel` plus do (T, M, bv) and dS_T (DK, bv); writes this DV block's
  partial dq (T, M, DK) and dk (T, DK), and its dv (T, bv) and d initial_state (DK, bv)."""
  load_q, store, _, do_st, qt_do = queries
  num_steps = k_ref.shape[0]

  def forward_step(t, inputs, s):
    k, v, g, do = _f32(inputs)
    s = _exp(g)[:, None] * s + k[:, None] * v[None, :]
    store(dq_ref, t, jax.tree.map(lambda dq: scale * dq, do_st(do, s)))
    return s

  load = lambda t: (k_ref[t], v_ref[t], g_ref[t], load_q(do_ref, t))
  _prefetched_loop(num_steps, block_t, load, forward_step, s0_ref[...])

  def reverse_step(t, inputs, ds):
    q, k, v, g, do = _f32(inputs)
    ds = ds + scale * qt_do(q, do)
    dk_ref[t] = jnp.sum(ds * v[None, :], axis=1)
    dv_ref[t] = jnp.sum(ds * k[:, None], axis=0).astype(dv_ref.dtype)
    return _exp(g)[:, None] * ds

  load = lambda t: (load_q(q_ref, t), k_ref[t], v_ref[t], g_ref[t], load_q(do_ref, t))
  ds0_ref[...] = _prefetched_loop(num_steps, block_t, load, reverse_step, ds_out_ref[...],
                                  reverse=True)


def _specs(t, m, dk, block_v):
  """BlockSpecs over the grid (B, H, DV / block_v) for q, k, v, g, states and do/o."""
  q = pl.BlockSpec((None, t, m, None, dk), lambda b, h, j: (b, 0, 0, h, 0))
  k = pl.BlockSpec((None, t, None, dk), lambda b, h, j: (b, 0, h, 0))
  v = pl.BlockSpec((None, t, None, block_v), lambda b, h, j: (b, 0, h, j))
  s = pl.BlockSpec((None, None, dk, block_v), lambda b, h, j: (b, h, 0, j))
  o = pl.BlockSpec((None, t, m, None, block_v), lambda b, h, j: (b, 0, 0, h, j))
  return q, k, v, s, o


def _kernel_options(q, block_v, block_t, interpret):
  m, dk = q.shape[2], q.shape[4]
  use_dot = min(m, dk, block_v) >= checks.MIN_DOT_DIM
  return dict(queries=_queries(m, use_dot, interpret), block_t=block_t)


def _forward(q, k, v, g, s0, scale, block_v, num_warps, block_t, interpret):
  b, t, m, h, dk = q.shape
  dv = v.shape[-1]
  q_spec, k_spec, v_spec, s_spec, o_spec = _specs(t, m, dk, block_v)
  kernel = functools.partial(_forward_kernel, scale=scale,
                             **_kernel_options(q, block_v, block_t, interpret))
  return pl.pallas_call(
      kernel,
      grid=(b, h, dv // block_v),
      in_specs=[q_spec, k_spec, v_spec, k_spec, s_spec],
      out_specs=[o_spec, s_spec],
      out_shape=[jax.ShapeDtypeStruct((b, t, m, h, dv), v.dtype),
                 jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=_NUM_STAGES),
      interpret=interpret,
      name="gla_recurrent_forward",
  )(q, k, v, g, s0)


def _backward(q, k, v, g, s0, do, ds_out, scale, block_v, num_warps, block_t, interpret):
  b, t, m, h, dk = q.shape
  dv = v.shape[-1]
  num_v_blocks = dv // block_v
  q_spec, k_spec, v_spec, s_spec, o_spec = _specs(t, m, dk, block_v)
  # dq and dk sum over DV: each DV block writes its own partial, summed after the call.
  dq_spec = pl.BlockSpec((None, None, t, m, None, dk), lambda b, h, j: (j, b, 0, 0, h, 0))
  dk_spec = pl.BlockSpec((None, None, t, None, dk), lambda b, h, j: (j, b, 0, h, 0))
  kernel = functools.partial(_backward_kernel, scale=scale,
                             **_kernel_options(q, block_v, block_t, interpret))
  dq, dk_, dv_, ds0 = pl.pallas_call(
      kernel,
      grid=(b, h, num_v_blocks),
      in_specs=[q_spec, k_spec, v_spec, k_spec, s_spec, o_spec, s_spec],
      out_specs=[dq_spec, dk_spec, v_spec, s_spec],
      out_shape=[jax.ShapeDtypeStruct((num_v_blocks,) + q.shape, jnp.float32),
                 jax.ShapeDtypeStruct((num_v_blocks,) + k.shape, jnp.float32),
                 jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct(s0.shape, jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=_NUM_STAGES),
      interpret=interpret,
      name="gla_recurrent_backward",
  )(q, k, v, g, s0, do, ds_out)
  return dq.sum(0), dk_.sum(0), dv_, ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9))
def _gla(q, k, v, g, s0, scale, block_v, num_warps, block_t, interpret):
  """Power-of-two shapes: q (B, T, M, H, DK), k, g (B, T, H, DK), v (B, T, H, DV), s0 (B, H, DK, DV)
  float32. Returns o (B, T, M, H, DV) in v's dtype and S_T (B, H, DK, DV) float32."""
  return _forward(q, k, v, g, s0, scale, block_v, num_warps, block_t, interpret)


def _gla_fwd(q, k, v, g, s0, scale, block_v, num_warps, block_t, interpret):
  o, s_out = _forward(q, k, v, g, s0, scale, block_v, num_warps, block_t, interpret)
  return (o, s_out), (q, k, v, g, s0, s_out)


def _gla_bwd(scale, block_v, num_warps, block_t, interpret, residuals, cotangents):
  q, k, v, g, s0, s_out = residuals
  do, ds_out = cotangents
  dq, dk, dv, ds0 = _backward(q, k, v, g, s0, do, ds_out, scale, block_v, num_warps, block_t,
                              interpret)
  # With b_t = sum_{i<=t} g_i, o_t = scale q_t e^{b_t} (S_0 + sum_{i<=t} (k_i e^{-b_i})^T v_i) and
  # S_T = e^{b_T} (...), so dL/db_t = q_t dq_t - k_t dk_t (+ rowsum(dS_T * S_T) at t = T); g_t
  # enters every b_s with s >= t, hence the reverse cumulative sum.
  db = (jnp.sum(q.astype(jnp.float32) * dq, axis=2) - k.astype(jnp.float32) * dk)
  db = db.at[:, -1].add(jnp.sum(ds_out * s_out, axis=-1))
  dg = lax.cumsum(db, axis=1, reverse=True)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv, dg.astype(g.dtype), ds0


_gla.defvjp(_gla_fwd, _gla_bwd)


def _pad_to(x, shape):
  """Zero-pads x at the end of each axis to shape."""
  if x.shape == shape:
    return x
  return jnp.pad(x, [(0, n - d) for d, n in zip(x.shape, shape)])


def gla_recurrent(q, k, v, g, *, scale=None, initial_state=None, return_final_state=False,
                  block_v=32, num_warps=4, block_t=4, interpret=False):
  """Gated linear attention by fused recurrent Pallas kernels (differentiable).

  S_t = diag(exp g_t) S_{t-1} + k_t^T v_t;  o_t[m] = scale * q_t[m] S_t.
  q: (B, T, H, DK) or (B, T, M, H, DK); k, g: (B, T, H, DK) (g = log forget gate <= 0);
  v: (B, T, H, DV); initial_state: (B, H, DK, DV) or None (zeros); scale defaults to DK ** -0.5.
  Returns o with q's leading shape and DV last, in v's dtype, and S_T: (B, H, DK, DV) float32 if
  return_final_state. block_v: DV columns of the state per program (a power of two, capped at
  DV rounded up to a power of two); num_warps: Triton warps per program; block_t: time steps per
  iteration of the kernels' time loop, and how many steps ahead each step's inputs are loaded;
  interpret: run in Pallas interpret mode (CPU).
  M, DK and DV are zero-padded to powers of two (Triton's requirement), which leaves S unchanged.
  """
  squeeze = q.ndim == 4
  q = checks.check_gla_args(q, k, v, g, initial_state)
  if block_v < 1 or block_v & (block_v - 1):
    raise ValueError(f"block_v must be a power of two, got {block_v}")
  if block_t < 1:
    raise ValueError(f"block_t must be >= 1, got {block_t}")
  b, t, m, h, dk = q.shape
  dv = v.shape[-1]
  scale = dk ** -0.5 if scale is None else scale
  mp, dkp, dvp = (pl.next_power_of_2(n) for n in (m, dk, dv))
  block_v = min(block_v, dvp)
  s0 = (jnp.zeros((b, h, dkp, dvp), jnp.float32) if initial_state is None
        else _pad_to(initial_state.astype(jnp.float32), (b, h, dkp, dvp)))
  o, s_out = _gla(_pad_to(q, (b, t, mp, h, dkp)), _pad_to(k, (b, t, h, dkp)),
                  _pad_to(v, (b, t, h, dvp)), _pad_to(g, (b, t, h, dkp)), s0, float(scale),
                  block_v, num_warps, block_t, interpret)
  o = o[:, :, :m, :, :dv]
  if squeeze:
    o = o[:, :, 0]
  return (o, s_out[:, :, :dk, :dv]) if return_final_state else o
