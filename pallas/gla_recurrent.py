"""Fused recurrent gated linear attention: Pallas GPU (Triton) kernels, forward and backward.

One program per (batch, head, DV block) keeps its DK x block_v slice of the state on chip and walks
time inside the kernel, so per-step states never reach device memory. The backward kernel recomputes
S_t in a forward-time pass (for dq) and carries dS_t in a reverse pass (for dk, dv and the initial
state); the log-gate gradient follows from dq and dk by a reverse cumulative sum outside the kernel.
Semantics are those of `pallas.reference.gla_reference`.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas import checks

# Triton's tl.dot needs every dimension >= 16; smaller products are done elementwise.
_MIN_DOT_DIM = 16
# Software-pipelining depth Triton gets for the time loop (its loads do not depend on the state).
_NUM_STAGES = 2


def _products(use_dot):
  """The three (M, DK, bv) contractions of the recurrence, as tl.dot or multiply-and-sum."""
  if use_dot:
    def contract(a, b, dims):
      return lax.dot_general(a, b, (dims, ((), ())), precision=lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)
    q_s = lambda q, s: contract(q, s, ((1,), (0,)))      # (M, DK) x (DK, bv) -> (M, bv)
    do_st = lambda do, s: contract(do, s, ((1,), (1,)))  # (M, bv) x (DK, bv) -> (M, DK)
    qt_do = lambda q, do: contract(q, do, ((0,), (0,)))  # (M, DK) x (M, bv) -> (DK, bv)
  else:
    q_s = lambda q, s: jnp.sum(q[:, :, None] * s[None], axis=1)
    do_st = lambda do, s: jnp.sum(do[:, None, :] * s[None], axis=2)
    qt_do = lambda q, do: jnp.sum(q[:, :, None] * do[:, None, :], axis=0)
  return q_s, do_st, qt_do


def _load_step(t, q_ref, k_ref, v_ref, g_ref):
  f32 = lambda ref: ref[t].astype(jnp.float32)
  return f32(q_ref), f32(k_ref), f32(v_ref), f32(g_ref)


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, s0_ref, o_ref, s_out_ref, *, scale, use_dot):
  """Refs: q (T, M, DK), k, g (T, DK), v (T, bv), s0 (DK, bv); writes o (T, M, bv), s_T (DK, bv)."""
  q_s, _, _ = _products(use_dot)

  def step(t, s):
    q, k, v, g = _load_step(t, q_ref, k_ref, v_ref, g_ref)
    s = jnp.exp(g)[:, None] * s + k[:, None] * v[None, :]
    o_ref[t] = (scale * q_s(q, s)).astype(o_ref.dtype)
    return s

  s_out_ref[...] = lax.fori_loop(0, k_ref.shape[0], step, s0_ref[...])


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, s0_ref, do_ref, ds_out_ref,
                     dq_ref, dk_ref, dv_ref, ds0_ref, *, scale, use_dot):
  """Refs as in `_forward_kernel` plus do (T, M, bv) and dS_T (DK, bv); writes this DV block's
  partial dq (T, M, DK) and dk (T, DK), and its dv (T, bv) and d initial_state (DK, bv)."""
  _, do_st, qt_do = _products(use_dot)
  num_steps = k_ref.shape[0]

  def forward_step(t, s):
    _, k, v, g = _load_step(t, q_ref, k_ref, v_ref, g_ref)
    s = jnp.exp(g)[:, None] * s + k[:, None] * v[None, :]
    dq_ref[t] = scale * do_st(do_ref[t].astype(jnp.float32), s)
    return s

  lax.fori_loop(0, num_steps, forward_step, s0_ref[...])

  def reverse_step(i, ds):
    t = num_steps - 1 - i
    q, k, v, g = _load_step(t, q_ref, k_ref, v_ref, g_ref)
    ds = ds + scale * qt_do(q, do_ref[t].astype(jnp.float32))
    dk_ref[t] = jnp.sum(ds * v[None, :], axis=1)
    dv_ref[t] = jnp.sum(ds * k[:, None], axis=0).astype(dv_ref.dtype)
    return jnp.exp(g)[:, None] * ds

  ds0_ref[...] = lax.fori_loop(0, num_steps, reverse_step, ds_out_ref[...])


def _specs(t, m, dk, block_v):
  """BlockSpecs over the grid (B, H, DV / block_v) for q, k, v, g, states and do/o."""
  q = pl.BlockSpec((None, t, m, None, dk), lambda b, h, j: (b, 0, 0, h, 0))
  k = pl.BlockSpec((None, t, None, dk), lambda b, h, j: (b, 0, h, 0))
  v = pl.BlockSpec((None, t, None, block_v), lambda b, h, j: (b, 0, h, j))
  s = pl.BlockSpec((None, None, dk, block_v), lambda b, h, j: (b, h, 0, j))
  o = pl.BlockSpec((None, t, m, None, block_v), lambda b, h, j: (b, 0, 0, h, j))
  return q, k, v, s, o


def _use_dot(m, dk, block_v):
  return min(m, dk, block_v) >= _MIN_DOT_DIM


def _forward(q, k, v, g, s0, scale, block_v, num_warps, interpret):
  b, t, m, h, dk = q.shape
  dv = v.shape[-1]
  q_spec, k_spec, v_spec, s_spec, o_spec = _specs(t, m, dk, block_v)
  kernel = functools.partial(_forward_kernel, scale=scale, use_dot=_use_dot(m, dk, block_v))
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


def _backward(q, k, v, g, s0, do, ds_out, scale, block_v, num_warps, interpret):
  b, t, m, h, dk = q.shape
  dv = v.shape[-1]
  num_v_blocks = dv // block_v
  q_spec, k_spec, v_spec, s_spec, o_spec = _specs(t, m, dk, block_v)
  # dq and dk sum over DV: each DV block writes its own partial, summed after the call.
  dq_spec = pl.BlockSpec((None, None, t, m, None, dk), lambda b, h, j: (j, b, 0, 0, h, 0))
  dk_spec = pl.BlockSpec((None, None, t, None, dk), lambda b, h, j: (j, b, 0, h, 0))
  kernel = functools.partial(_backward_kernel, scale=scale, use_dot=_use_dot(m, dk, block_v))
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8))
def _gla(q, k, v, g, s0, scale, block_v, num_warps, interpret):
  """Power-of-two shapes: q (B, T, M, H, DK), k, g (B, T, H, DK), v (B, T, H, DV), s0 (B, H, DK, DV)
  float32. Returns o (B, T, M, H, DV) in v's dtype and S_T (B, H, DK, DV) float32."""
  return _forward(q, k, v, g, s0, scale, block_v, num_warps, interpret)


def _gla_fwd(q, k, v, g, s0, scale, block_v, num_warps, interpret):
  o, s_out = _forward(q, k, v, g, s0, scale, block_v, num_warps, interpret)
  return (o, s_out), (q, k, v, g, s0, s_out)


def _gla_bwd(scale, block_v, num_warps, interpret, residuals, cotangents):
  q, k, v, g, s0, s_out = residuals
  do, ds_out = cotangents
  dq, dk, dv, ds0 = _backward(q, k, v, g, s0, do, ds_out, scale, block_v, num_warps, interpret)
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
                  block_v=32, num_warps=4, interpret=False):
  """Gated linear attention by fused recurrent Pallas kernels (differentiable).

  S_t = diag(exp g_t) S_{t-1} + k_t^T v_t;  o_t[m] = scale * q_t[m] S_t.
  q: (B, T, H, DK) or (B, T, M, H, DK); k, g: (B, T, H, DK) (g = log forget gate <= 0);
  v: (B, T, H, DV); initial_state: (B, H, DK, DV) or None (zeros); scale defaults to DK ** -0.5.
  Returns o with q's leading shape and DV last, in v's dtype, and S_T: (B, H, DK, DV) float32 if
  return_final_state. block_v: DV columns of the state per program (a power of two, capped at
  DV rounded up to a power of two); num_warps: Triton warps per program; interpret: run in Pallas
  interpret mode (CPU).
  M, DK and DV are zero-padded to powers of two (Triton's requirement), which leaves S unchanged.
  """
  squeeze = q.ndim == 4
  q = checks.check_gla_args(q, k, v, g, initial_state)
  if block_v < 1 or block_v & (block_v - 1):
    raise ValueError(f"block_v must be a power of two, got {block_v}")
  b, t, m, h, dk = q.shape
  dv = v.shape[-1]
  scale = dk ** -0.5 if scale is None else scale
  mp, dkp, dvp = (pl.next_power_of_2(n) for n in (m, dk, dv))
  block_v = min(block_v, dvp)
  s0 = (jnp.zeros((b, h, dkp, dvp), jnp.float32) if initial_state is None
        else _pad_to(initial_state.astype(jnp.float32), (b, h, dkp, dvp)))
  o, s_out = _gla(_pad_to(q, (b, t, mp, h, dkp)), _pad_to(k, (b, t, h, dkp)),
                  _pad_to(v, (b, t, h, dvp)), _pad_to(g, (b, t, h, dkp)), s0, float(scale),
                  block_v, num_warps, interpret)
  o = o[:, :, :m, :, :dv]
  if squeeze:
    o = o[:, :, 0]
  return (o, s_out[:, :, :dk, :dv]) if return_final_state else o
