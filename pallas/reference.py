"""Pure-JAX references of the scan ops: a lax.scan form and an associative-scan form of each.

Shapes are batch-major with heads next to last; states are always float32.
"""

import jax
import jax.numpy as jnp

from pallas import checks


def state_update_reference(g, kv, s0=None):
  """s_t = g_t * s_{t-1} + kv_t by lax.scan.

  g, kv: (B, T, H, DK, DV); s0: (B, H, DK, DV) or None (zeros). Returns s: (B, T, H, DK, DV) float32.
  """
  checks.check_state_update_args(g, kv, s0)
  g, kv = jnp.asarray(g, jnp.float32), jnp.asarray(kv, jnp.float32)
  s0 = jnp.zeros_like(kv[:, 0]) if s0 is None else s0.astype(jnp.float32)

  def step(s, inputs):
    g_t, kv_t = inputs
    s = g_t * s + kv_t
    return s, s

  _, s = jax.lax.scan(step, s0, (jnp.moveaxis(g, 1, 0), jnp.moveaxis(kv, 1, 0)))
  return jnp.moveaxis(s, 0, 1)


def _linear_recurrence_associative(a, b):
  """x_t = a_t * x_{t-1} + b_t with x_0 = 0, along axis 1, by jax.lax.associative_scan."""

  def combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r

  return jax.lax.associative_scan(combine, (a, b), axis=1)[1]


def state_update_associative(g, kv, s0=None):
  """`state_update_reference` by jax.lax.associative_scan (O(log T) depth, same shapes)."""
  checks.check_state_update_args(g, kv, s0)
  g, kv = jnp.asarray(g, jnp.float32), jnp.asarray(kv, jnp.float32)
  if s0 is not None:
    kv = kv.at[:, 0].add(g[:, 0] * s0.astype(jnp.float32))
  return _linear_recurrence_associative(g, kv)


def _default_scale(scale, dk):
  return dk ** -0.5 if scale is None else scale


def gla_reference(q, k, v, g, *, scale=None, initial_state=None, return_final_state=False):
  """Gated linear attention with M queries per step, by lax.scan.

  S_t = diag(exp g_t) S_{t-1} + k_t^T v_t;  o_t[m] = scale * q_t[m] S_t.
  q: (B, T, H, DK) or (B, T, M, H, DK); k, g: (B, T, H, DK); v: (B, T, H, DV);
  initial_state: (B, H, DK, DV) or None. Returns o with q's leading shape and DV last, in v's dtype
  ((B, T, H, DV) or (B, T, M, H, DV)), and S_T: (B, H, DK, DV) float32 if return_final_state.
  """
  squeeze = q.ndim == 4
  q5 = checks.check_gla_args(q, k, v, g, initial_state)
  b, _, h, dk = k.shape
  scale = _default_scale(scale, dk)
  f32 = lambda x: jnp.moveaxis(jnp.asarray(x, jnp.float32), 1, 0)
  s0 = (jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))

  def step(s, inputs):
    q_t, k_t, v_t, g_t = inputs
    s = jnp.exp(g_t)[..., None] * s + k_t[..., :, None] * v_t[..., None, :]
    o_t = scale * jnp.einsum("bmhk,bhkv->bmhv", q_t, s, precision="highest")
    return s, o_t

  s_final, o = jax.lax.scan(step, s0, (f32(q5), f32(k), f32(v), f32(g)))
  o = jnp.moveaxis(o, 0, 1).astype(v.dtype)
  if squeeze:
    o = o[:, :, 0]
  return (o, s_final) if return_final_state else o


def gla_associative(q, k, v, g, *, scale=None, initial_state=None, return_final_state=False):
  """`gla_reference` by jax.lax.associative_scan over materialised states (O(T DK DV) memory)."""
  squeeze = q.ndim == 4
  q5 = checks.check_gla_args(q, k, v, g, initial_state)
  scale = _default_scale(scale, k.shape[-1])
  k32, v32, q32 = (jnp.asarray(x, jnp.float32) for x in (k, v, q5))
  a = jnp.broadcast_to(jnp.exp(jnp.asarray(g, jnp.float32))[..., None], k32.shape + v.shape[-1:])
  kv = k32[..., :, None] * v32[..., None, :]
  if initial_state is not None:
    kv = kv.at[:, 0].add(a[:, 0] * initial_state.astype(jnp.float32))
  s = _linear_recurrence_associative(a, kv)
  o = scale * jnp.einsum("btmhk,bthkv->btmhv", q32, s, precision="highest")
  o = o.astype(v.dtype)
  if squeeze:
    o = o[:, :, 0]
  return (o, s[:, -1]) if return_final_state else o
