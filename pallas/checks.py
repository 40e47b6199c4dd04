"""Argument checks shared by every scan op: errors name the argument and the shapes."""

import jax
import numpy as np


# Triton's tl.dot needs every dimension >= 16; the kernels do smaller products elementwise.
MIN_DOT_DIM = 16


def is_power_of_two(n):
  """Whether n is 1, 2, 4, ...: Triton's tiles have power-of-two sides."""
  return n >= 1 and not n & (n - 1)


def _shape(x):
  return tuple(x.shape)


def check_state_update_args(g, kv, s0):
  """Checks `state_update` arguments. g, kv: (B, T, H, DK, DV); s0: (B, H, DK, DV) or None."""
  if kv.ndim != 5:
    raise ValueError(f"kv must have rank 5 (B, T, H, DK, DV), got shape {_shape(kv)}")
  if _shape(g) != _shape(kv):
    raise ValueError(f"g must have the shape of kv {_shape(kv)}, got {_shape(g)}")
  if s0 is not None:
    b, _, h, dk, dv = kv.shape
    if _shape(s0) != (b, h, dk, dv):
      raise ValueError(
          f"s0 must have shape (B, H, DK, DV) = {(b, h, dk, dv)} for kv of shape {_shape(kv)}, "
          f"got {_shape(s0)}")


def check_gla_args(q, k, v, g, initial_state):
  """Checks `gated_linear_attention` arguments and returns q as (B, T, M, H, DK).

  q: (B, T, H, DK) or (B, T, M, H, DK); k, g: (B, T, H, DK); v: (B, T, H, DV);
  initial_state: (B, H, DK, DV) or None. Log-gates must be <= 0; that is checked only on concrete
  (non-traced) values, since a traced value has none to look at.
  """
  if k.ndim != 4:
    raise ValueError(f"k must have rank 4 (B, T, H, DK), got shape {_shape(k)}")
  b, t, h, dk = k.shape
  if v.ndim != 4 or _shape(v)[:3] != (b, t, h):
    raise ValueError(f"v must have shape (B, T, H, DV) with (B, T, H) = {(b, t, h)} from k, "
                     f"got {_shape(v)}")
  dv = v.shape[-1]
  if _shape(g) != _shape(k):
    raise ValueError(f"g must have the shape of k {_shape(k)}, got {_shape(g)}")
  if q.ndim == 4:
    q = q[:, :, None]
  if q.ndim != 5 or _shape(q)[:2] != (b, t) or _shape(q)[3:] != (h, dk):
    raise ValueError(f"q must have shape (B, T, H, DK) or (B, T, M, H, DK) with "
                     f"(B, T, H, DK) = {(b, t, h, dk)} from k, got {_shape(q)}")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if t == 0 or b == 0:
    raise ValueError(f"q, k, v, g must have B >= 1 and T >= 1, got k of shape {_shape(k)}")
  if initial_state is not None and _shape(initial_state) != (b, h, dk, dv):
    raise ValueError(f"initial_state must have shape (B, H, DK, DV) = {(b, h, dk, dv)}, "
                     f"got {_shape(initial_state)}")
  if not isinstance(g, jax.core.Tracer) and np.any(np.asarray(g, np.float32) > 0):
    raise ValueError(f"g holds log forget gates and must be <= 0; its maximum is "
                     f"{float(np.max(np.asarray(g, np.float32)))}")
  return q
