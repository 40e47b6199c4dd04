"""The fused Mamba step kernels (Pallas interpret mode) against their jnp references, and the
references, chained, against clam_jax.ssm.MambaBlock.step on RMSNorm's output."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from clam_jax import ssm
from pallas.mamba_step import (mamba_in_conv, mamba_in_conv_reference, mamba_scan_gate,
                               mamba_scan_gate_reference, pack_x_proj)
from helpers import lower_for_h100, rel_err

EPS = 1e-5
D_STATE, D_CONV, EXPAND = 16, 4, 2


def _model(d_model, batch, seed):
  """A float32 MambaBlock with random parameters, its variables, an RMSNorm scale, a random
  residual stream h (B, D) and a random non-zero carry."""
  block = ssm.MambaBlock(d_model, d_state=D_STATE, d_conv=D_CONV, expand=EXPAND)
  keys = jax.random.split(jax.random.PRNGKey(seed), 8)
  d_inner, _ = ssm.mamba_dims(d_model, EXPAND)
  params = dict(block.init(keys[0], jnp.zeros((batch, 2, d_model)),
                           jnp.ones((batch, 2), bool))["params"])
  # A_log and D init to constants: made random so every channel differs.
  params["A_log"] = jnp.log(jax.random.uniform(keys[1], (d_inner, D_STATE), minval=0.5, maxval=8))
  params["D"] = jax.random.normal(keys[2], (d_inner,))
  norm_scale = 1 + 0.3 * jax.random.normal(keys[3], (d_model,))
  h = 2 * jax.random.normal(keys[4], (batch, d_model))
  carry = {"conv": jax.random.normal(keys[5], (batch, D_CONV - 1, d_inner)),
           "ssm": jax.random.normal(keys[6], (batch, d_inner, D_STATE))}
  return block, {"params": params}, norm_scale, h, carry


def _weights(params, d_model, dtype):
  """The kernels' weight arguments from MambaBlock params, matrices in the compute dtype."""
  _, dt_rank = ssm.mamba_dims(d_model, EXPAND)
  x_packed, dt_packed = pack_x_proj(params["x_proj"]["kernel"], params["dt_proj"]["kernel"],
                                    dt_rank=dt_rank, d_state=D_STATE)
  return dict(in_weight=params["in_proj"]["kernel"].T.astype(dtype),
              conv_kernel=params["conv_kernel"], conv_bias=params["conv_bias"],
              x_packed=x_packed.astype(dtype), dt_packed=dt_packed.astype(dtype),
              dt_bias=params["dt_bias"], A=-jnp.exp(params["A_log"]), D=params["D"])


def _step(in_conv, scan_gate, h, norm_scale, carry, w, **kwargs):
  """One step through in_conv then scan_gate: (y before out_proj, new carry)."""
  u, z, conv, x_partial = in_conv(h, norm_scale, w["in_weight"], carry["conv"], w["conv_kernel"],
                                  w["conv_bias"], w["x_packed"], eps=EPS, **kwargs)
  y, ssm_state = scan_gate(x_partial.sum(1), w["dt_packed"], w["dt_bias"], w["A"], w["D"],
                           carry["ssm"], u, z, d_state=D_STATE, **kwargs)
  return y, {"conv": conv, "ssm": ssm_state}


# (d_model, batch, block_c, dtype, tolerance): B = 1 and 3, several channel blocks, D = 48
# (dt_rank 3 padded to R = 4; Di = 96, six blocks of 16, D walked in chunks of 16), bf16 compute.
CASES = [(64, 1, 16, jnp.float32, 1e-5), (48, 3, 16, jnp.float32, 1e-5),
         (64, 3, 32, jnp.bfloat16, 2e-2)]


@pytest.mark.parametrize("d_model,batch,block_c,dtype,tol", CASES)
def test_kernels_match_references(d_model, batch, block_c, dtype, tol):
  _, variables, norm_scale, h, carry = _model(d_model, batch, seed=d_model + batch)
  w = _weights(variables["params"], d_model, dtype)
  args = (h, norm_scale, w["in_weight"], carry["conv"], w["conv_kernel"], w["conv_bias"],
          w["x_packed"])
  out = mamba_in_conv(*args, eps=EPS, block_c=block_c, interpret=True)
  ref = mamba_in_conv_reference(*args, eps=EPS)
  d_inner = 2 * d_model
  assert out[3].shape == (batch, d_inner // block_c, w["x_packed"].shape[1])
  for x, r in zip(out[:3], ref[:3]):
    assert x.shape == r.shape and x.dtype == r.dtype
    assert rel_err(x, r) <= tol
  assert rel_err(out[3].sum(1), ref[3].sum(1)) <= tol

  # The scan kernel on the sum of the kernel's own partials and its reference on the same.
  u, z, _, x_partial = out
  args = (x_partial.sum(1), w["dt_packed"], w["dt_bias"], w["A"], w["D"], carry["ssm"], u, z)
  y, s = mamba_scan_gate(*args, d_state=D_STATE, block_c=block_c, interpret=True)
  y_ref, s_ref = mamba_scan_gate_reference(*args, d_state=D_STATE)
  assert y.shape == y_ref.shape and y.dtype == y_ref.dtype == dtype and s.dtype == jnp.float32
  assert rel_err(y, y_ref) <= tol and rel_err(s, s_ref) <= tol


def test_chained_step_matches_mamba_block():
  # dt_rank 3 (padded by pack_x_proj), B = 3: the kernels' shapes of the D = 48 case above.
  d_model, batch = 48, 3
  block, variables, norm_scale, h, carry = _model(d_model, batch, seed=11)
  norm = nn.RMSNorm(EPS)
  expected_carry, expected = block.apply(
      variables, carry, norm.apply({"params": {"scale": norm_scale}}, h),
      method=ssm.MambaBlock.step)
  w = _weights(variables["params"], d_model, jnp.float32)
  out_proj = variables["params"]["out_proj"]["kernel"]
  steps = {"reference": _step(mamba_in_conv_reference, mamba_scan_gate_reference, h, norm_scale,
                              carry, w),
           "kernels": _step(mamba_in_conv, mamba_scan_gate, h, norm_scale, carry, w,
                            block_c=16, interpret=True)}
  for name, (y, new_carry) in steps.items():
    assert rel_err(jnp.dot(y, out_proj, precision="highest"), expected) <= 1e-5, name
    for key in ("conv", "ssm"):
      assert new_carry[key].shape == expected_carry[key].shape
      assert rel_err(new_carry[key], expected_carry[key]) <= 1e-5, (name, key)


def test_pack_x_proj_layout_and_errors():
  rng = np.random.default_rng(0)
  d_inner, dt_rank, d_state = 96, 3, 16
  x_kernel = rng.standard_normal((d_inner, dt_rank + 2 * d_state)).astype(np.float32)
  dt_kernel = rng.standard_normal((dt_rank, d_inner)).astype(np.float32)
  x_packed, dt_packed = pack_x_proj(x_kernel, dt_kernel, dt_rank=dt_rank, d_state=d_state)
  assert x_packed.shape == (d_inner, 64) and dt_packed.shape == (4, d_inner)
  np.testing.assert_array_equal(x_packed[:, :3], x_kernel[:, :3])
  np.testing.assert_array_equal(x_packed[:, 4:36], x_kernel[:, 3:])
  assert not np.any(x_packed[:, 3]) and not np.any(x_packed[:, 36:]) and not np.any(dt_packed[3])
  np.testing.assert_array_equal(dt_packed[:3], dt_kernel)
  with pytest.raises(ValueError, match="d_state"):
    pack_x_proj(x_kernel[:, :dt_rank + 24], dt_kernel, dt_rank=dt_rank, d_state=12)


@pytest.mark.parametrize("d_model,dtype", [(1024, jnp.bfloat16), (48, jnp.float32)])
def test_triton_lowering_for_gpu(d_model, dtype):
  """Lowers both kernels through the Pallas Triton backend for an abstract H100 (not compiled:
  Triton's own compile errors show only on a GPU): the EK100 layer (Di 2048, dt_rank 64) and D = 48
  (dt_rank 3, D walked in chunks of 16)."""
  b, d_inner = 1, 2 * d_model
  _, dt_rank = ssm.mamba_dims(d_model, EXPAND)
  r = pl.next_power_of_2(dt_rank)
  p = pl.next_power_of_2(r + 2 * D_STATE)
  f32 = jnp.float32
  spec = lambda shape, d=f32: jax.ShapeDtypeStruct(shape, d)
  in_conv_args = [spec((b, d_model)), spec((d_model,)), spec((2 * d_inner, d_model), dtype),
                  spec((b, D_CONV - 1, d_inner)), spec((D_CONV, d_inner)), spec((d_inner,)),
                  spec((d_inner, p), dtype)]
  scan_args = [spec((b, p)), spec((r, d_inner), dtype), spec((d_inner,)),
               spec((d_inner, D_STATE)), spec((d_inner,)), spec((b, d_inner, D_STATE)),
               spec((b, d_inner), dtype), spec((b, d_inner), dtype)]
  for fn, args in ((lambda *a: mamba_in_conv(*a, eps=EPS, interpret=False), in_conv_args),
                   (lambda *a: mamba_scan_gate(*a, d_state=D_STATE, interpret=False),
                    scan_args)):
    assert "__gpu$xla.gpu.triton" in lower_for_h100(fn, *args)
