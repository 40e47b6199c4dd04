"""The Pallas selective scan (interpret mode) against the associative-scan reference of clam_jax.ssm
(itself checked against a float64 loop in test_ssm.py): outputs, final state and every gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clam_jax import ssm
from pallas.selective_scan import selective_scan_pallas


def _rel_err(x, ref):
  """Relative error; an exactly zero reference (dA at T = 1 from a zero state) must be met exactly."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), np.finfo(np.float64).tiny)


def _inputs(seed, bt, t, di, n, delta_shift=-1.0, dtype=jnp.float32):
  """Fresh random scan inputs; delta = softplus(normal + delta_shift) (large shift: decays near 0)."""
  rng = np.random.default_rng(seed)
  arr = lambda a, dt=jnp.float32: jnp.asarray(np.asarray(a, np.float32), dt)
  return dict(
      u=arr(rng.standard_normal((bt, t, di)), dtype),
      delta=arr(np.logaddexp(0, rng.standard_normal((bt, t, di)) + delta_shift)),
      A=arr(-rng.uniform(0.1, 4.0, (di, n))),
      B=arr(rng.standard_normal((bt, t, n)), dtype),
      C=arr(rng.standard_normal((bt, t, n)), dtype),
      h0=arr(rng.standard_normal((bt, di, n))))


def _reference(u, delta, A, B, C, h0):
  """y_t = C_t h_t (no skip, no gate) and h_T by the associative scan, in float32."""
  f32 = lambda x: x.astype(jnp.float32)
  return ssm.selective_scan(f32(u), delta, A, f32(B), f32(C), jnp.zeros(u.shape[-1]), None, h0,
                            return_final_state=True)


def _kernel(u, delta, A, B, C, h0):
  return selective_scan_pallas(u, delta, A, B, C, h0, chunk=4, block_d=8, interpret=True)


def _weighted_loss(fn, seed, y_shape, h_shape):
  """A scalar that depends on every output element with a random weight (fresh cotangents)."""
  rng = np.random.default_rng(seed)
  wy = jnp.asarray(rng.standard_normal(y_shape), jnp.float32)
  wh = jnp.asarray(rng.standard_normal(h_shape), jnp.float32)

  def loss(*args):
    y, h = fn(*args)
    return jnp.sum(y * wy) + jnp.sum(h * wh)

  return loss


# (Bt, T, Di, N): T = 1; T not a multiple of the chunk (4); Di not a multiple of block_d (8) and
# smaller than it; N not a power of two.
@pytest.mark.parametrize("bt,t,di,n", [(2, 1, 8, 16), (2, 13, 20, 16), (1, 9, 5, 3)])
@pytest.mark.parametrize("with_h0", [True, False])
def test_kernel_matches_reference_values_and_gradients(bt, t, di, n, with_h0):
  args = _inputs(bt * 100 + t + n, bt, t, di, n)
  if not with_h0:
    args["h0"] = None
  names = [k for k, v in args.items() if v is not None]
  call = lambda fn: lambda *xs: fn(**dict(zip(names, xs)), **{k: None for k in args if k not in names})
  xs = [args[k] for k in names]
  y_ref, h_ref = _reference(**args)
  y, h = _kernel(**args)
  assert y.shape == (bt, t, di) and h.shape == (bt, di, n)
  assert _rel_err(y, y_ref) < 1e-5 and _rel_err(h, h_ref) < 1e-5
  loss = lambda fn: _weighted_loss(call(fn), t, y.shape, h.shape)
  grads = jax.grad(loss(_kernel), argnums=tuple(range(len(xs))))(*xs)
  grads_ref = jax.grad(loss(_reference), argnums=tuple(range(len(xs))))(*xs)
  for name, g, g_ref in zip(names, grads, grads_ref):
    assert _rel_err(g, g_ref) < 1e-5, name


@pytest.mark.parametrize("delta_shift", [-6.0, 4.0])  # decays near 1 / near 0
def test_kernel_extreme_decays(delta_shift):
  args = _inputs(7, 2, 11, 16, 4, delta_shift)
  y_ref, h_ref = _reference(**args)
  y, h = _kernel(**args)
  assert _rel_err(y, y_ref) < 1e-5 and _rel_err(h, h_ref) < 1e-5
  loss = lambda fn: _weighted_loss(fn, 3, y.shape, h.shape)
  grads = jax.grad(loss(_kernel), argnums=(0, 1, 2))(args["u"], args["delta"], args["A"], args["B"],
                                                      args["C"], args["h0"])
  grads_ref = jax.grad(loss(_reference), argnums=(0, 1, 2))(
      args["u"], args["delta"], args["A"], args["B"], args["C"], args["h0"])
  for g, g_ref in zip(grads, grads_ref):
    assert _rel_err(g, g_ref) < 1e-5


def test_kernel_bfloat16_inputs():
  args = _inputs(11, 2, 10, 16, 16, dtype=jnp.bfloat16)
  y_ref, h_ref = _reference(**args)  # the same bf16 values, in float32
  y, h = _kernel(**args)
  assert y.dtype == jnp.float32
  assert _rel_err(y, y_ref) < 1e-5 and _rel_err(h, h_ref) < 1e-5


def test_final_state_composes():
  """Running T steps at once equals running two halves with the state carried."""
  args = _inputs(5, 2, 14, 8, 16)
  y, h = _kernel(**args)
  first = {k: (v[:, :6] if k in ("u", "delta", "B", "C") else v) for k, v in args.items()}
  second = {k: (v[:, 6:] if k in ("u", "delta", "B", "C") else v) for k, v in args.items()}
  y1, h1 = _kernel(**first)
  y2, h2 = _kernel(**{**second, "h0": h1})
  assert _rel_err(jnp.concatenate([y1, y2], axis=1), y) < 1e-6 and _rel_err(h2, h) < 1e-6


def test_selective_scan_entry_point_runs_the_kernels():
  """ssm.selective_scan with the kernels (skip term and gate in plain JAX) == the reference."""
  args = _inputs(13, 2, 9, 8, 16)
  rng = np.random.default_rng(13)
  D = jnp.asarray(rng.standard_normal(8), jnp.float32)
  z = jnp.asarray(rng.standard_normal((2, 9, 8)), jnp.float32)
  run = lambda impl: ssm.selective_scan(args["u"], args["delta"], args["A"], args["B"], args["C"], D,
                                        z, args["h0"], return_final_state=True, implementation=impl)
  (y, h), (y_ref, h_ref) = run("recurrent"), run("reference")
  assert _rel_err(y, y_ref) < 1e-5 and _rel_err(h, h_ref) < 1e-5
  with pytest.raises(ValueError, match="implementation"):
    run("fused")


def test_mamba_processor_with_kernels_equals_reference():
  """The Mamba processor stack with config.scan_impl = "recurrent" (kernels, interpret mode) gives
  the reference's outputs and parameter gradients, left padding included."""
  import ml_collections
  from clam_jax.processor import Processor

  make = lambda impl: Processor(ml_collections.ConfigDict(dict(
      d_model=16, processor="mamba", processor_layers=2, dtype="float32", dropout=0.0,
      ssm=dict(d_state=5, d_conv=4, expand=2), scan_impl=impl)))
  rng = np.random.default_rng(17)
  x = jnp.asarray(rng.standard_normal((2, 10, 16)), jnp.float32)
  mask = jnp.asarray(np.arange(10)[None, :] >= np.array([[0], [4]]))  # row 1 left-padded by 4
  params = make("reference").init(jax.random.key(0), x, mask, train=False)
  weights = jnp.asarray(rng.standard_normal((2, 10, 16)), jnp.float32)

  def loss(impl):
    return lambda params: jnp.sum(make(impl).apply(params, x, mask, train=False) * weights)

  (value, grads), (value_ref, grads_ref) = (jax.value_and_grad(loss(impl))(params)
                                            for impl in ("recurrent", "reference"))
  assert abs(float(value) - float(value_ref)) < 1e-5 * abs(float(value_ref))
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    assert _rel_err(g, g_ref) < 1e-4
