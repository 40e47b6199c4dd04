"""The selective scan (parallel, step, float64 loop; values and gradients) and the Mamba block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clam_jax import ssm


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _silu(x):
  return x / (1 + np.exp(-x))


def _softplus(x):
  return np.logaddexp(0, x)


_jit_scan = jax.jit(ssm.selective_scan, static_argnames="return_final_state")


def _scan_loop(u, delta, A, B, C, D, z, h0):
  """float64 loop: h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, y_t = (C_t h_t + D u_t) silu(z_t)."""
  u, delta, A, B, C, D, h = (np.asarray(a, np.float64) for a in (u, delta, A, B, C, D, h0))
  y = np.zeros_like(u)
  for t in range(u.shape[1]):
    h = np.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]
    y[:, t] = np.einsum("bdn,bn->bd", h, C[:, t]) + D * u[:, t]
  if z is not None:
    y = y * _silu(np.asarray(z, np.float64))
  return y, h


def _scan_inputs(rng, bt, t, di, n):
  f32 = lambda a: np.asarray(a, np.float32)
  return dict(
      u=f32(rng.standard_normal((bt, t, di))),
      delta=f32(_softplus(rng.standard_normal((bt, t, di)) - 1)),
      A=f32(-rng.uniform(0.1, 4.0, (di, n))),
      B=f32(rng.standard_normal((bt, t, n))),
      C=f32(rng.standard_normal((bt, t, n))),
      D=f32(rng.standard_normal(di)),
      z=f32(rng.standard_normal((bt, t, di))),
      h0=f32(rng.standard_normal((bt, di, n))))


def _scan_by_steps(u, delta, A, B, C, D, z, h0):
  """`selective_scan` as a lax.scan of `selective_scan_step`."""
  time_major = lambda a: None if a is None else jnp.moveaxis(a, 1, 0)

  def body(h, xs):
    u_t, delta_t, B_t, C_t, z_t = xs
    return ssm.selective_scan_step(h, u_t, delta_t, A, B_t, C_t, D, z_t)

  h, y = jax.lax.scan(body, h0, tuple(time_major(a) for a in (u, delta, B, C, z)))
  return jnp.moveaxis(y, 0, 1), h


@pytest.mark.parametrize("bt,t,di,n,gated", [(1, 1, 3, 2, True), (2, 13, 6, 5, True),
                                              (3, 8, 4, 7, False)])
def test_selective_scan_matches_steps_and_float64_loop(bt, t, di, n, gated):
  args = _scan_inputs(np.random.default_rng(), bt, t, di, n)
  if not gated:
    args["z"] = None
  y, h = _jit_scan(**args, return_final_state=True)
  y_steps, h_steps = jax.jit(_scan_by_steps)(**args)
  y_ref, h_ref = _scan_loop(**args)
  assert y.shape == (bt, t, di) and y.dtype == jnp.float32
  assert h.shape == (bt, di, n) and h.dtype == jnp.float32
  assert _rel_err(y, y_ref) < 1e-5 and _rel_err(h, h_ref) < 1e-5
  assert _rel_err(y_steps, y_ref) < 1e-5 and _rel_err(h_steps, h_ref) < 1e-5


def test_selective_scan_default_state_is_zero_and_returns_y_only():
  args = _scan_inputs(np.random.default_rng(), 2, 5, 3, 4)
  h0 = args.pop("h0")
  y = _jit_scan(**args)
  y_ref, _ = _scan_loop(**args, h0=np.zeros_like(h0))
  assert _rel_err(y, y_ref) < 1e-5


def test_selective_scan_gradients_match_step_form():
  rng = np.random.default_rng()
  args = _scan_inputs(rng, 2, 9, 5, 3)
  cotangent = rng.standard_normal((2, 9, 5)).astype(np.float32)
  h_cotangent = rng.standard_normal((2, 5, 3)).astype(np.float32)

  def loss(fn, kwargs):
    y, h = fn(**kwargs)
    return jnp.sum(y * cotangent) + jnp.sum(h * h_cotangent)

  parallel = lambda **kw: ssm.selective_scan(**kw, return_final_state=True)
  grads = jax.jit(jax.grad(lambda kw: loss(parallel, kw)))(args)
  grads_ref = jax.jit(jax.grad(lambda kw: loss(_scan_by_steps, kw)))(args)
  for name in args:
    assert _rel_err(grads[name], grads_ref[name]) < 1e-5, name


def test_selective_scan_bfloat16_keeps_float32_state():
  args = _scan_inputs(np.random.default_rng(), 2, 6, 4, 3)
  bf16 = {k: jnp.asarray(v, jnp.bfloat16) if k in ("u", "B", "C", "z") else v for k, v in args.items()}
  y, h = _jit_scan(**bf16, return_final_state=True)
  y_ref, h_ref = _scan_loop(**bf16)
  assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
  assert _rel_err(h, h_ref) < 1e-5  # the state saw bf16 inputs but accumulated in float32
  assert _rel_err(y, y_ref) < 1e-2


def _block_loop(p, x, d_conv, d_state):
  """float64 Mamba block (mamba_ssm's equations) on one unpadded sequence x: (Bt, T, d_model)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  xz = x.astype(np.float64) @ p["in_proj"]["kernel"]
  xs, z = np.split(xz, 2, axis=-1)
  t = xs.shape[1]
  padded = np.pad(xs, ((0, 0), (d_conv - 1, 0), (0, 0)))
  conv = np.stack([np.einsum("bkd,kd->bd", padded[:, s:s + d_conv], p["conv_kernel"])
                   for s in range(t)], 1)
  u = _silu(conv + p["conv_bias"])
  dbc = u @ p["x_proj"]["kernel"]
  dt_rank = dbc.shape[-1] - 2 * d_state
  dt, B, C = dbc[..., :dt_rank], dbc[..., dt_rank:dt_rank + d_state], dbc[..., dt_rank + d_state:]
  delta = _softplus(dt @ p["dt_proj"]["kernel"] + p["dt_bias"])
  h0 = np.zeros(u.shape[:1] + p["A_log"].shape)
  y, _ = _scan_loop(u, delta, -np.exp(p["A_log"]), B, C, p["D"], z, h0)
  return y @ p["out_proj"]["kernel"]


def test_mamba_block_matches_float64_equations_and_init():
  d_model, d_state, d_conv = 20, 6, 4
  block = ssm.MambaBlock(d_model, d_state=d_state, d_conv=d_conv, expand=2, num_layers=3)
  x = np.random.default_rng().standard_normal((2, 7, d_model)).astype(np.float32)
  mask = np.ones((2, 7), bool)
  params = jax.jit(block.init)(jax.random.key(0), x, mask)["params"]
  y = jax.jit(block.apply)({"params": params}, x, mask)
  assert _rel_err(y, _block_loop(params, x, d_conv, d_state)) < 1e-5

  d_inner, dt_rank = 40, 2
  assert params["x_proj"]["kernel"].shape == (d_inner, dt_rank + 2 * d_state)
  dt = jax.nn.softplus(params["dt_bias"])
  assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 0.1 * 1.001
  np.testing.assert_allclose(-np.exp(params["A_log"]),
                             -np.broadcast_to(np.arange(1, d_state + 1), (d_inner, d_state)), rtol=1e-6)
  np.testing.assert_array_equal(params["D"], 1.0)
