"""The seed's Algorithms 1 and 2: s_t = g_t * s_{t-1} + kv_t, every state written out.

Pallas GPU (Triton) kernels under `jax.custom_vjp`. Each program owns one (block_k, block_v) tile
of the state of one (batch, head) and runs the whole time loop over it with the tile in registers,
so the grid is (B, H, DK / block_k, DV / block_v) and memory is O(T DK DV). The paper's baseline and
the correctness anchor of the fused op in gla.py; its reference is
`reference.state_update_reference`.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas import checks

# A 16 x 128 float32 tile is 16 values a thread at 4 warps; small tiles give many programs, whose
# independent loads hide the memory latency of the sequential time loop.
_DEFAULT_BLOCK_K = 16
_DEFAULT_BLOCK_V = 128


def _forward_kernel(g_ref, kv_ref, s0_ref, s_ref):
  """Algorithm 1 on one tile. g_ref, kv_ref, s_ref: (T, bk, bv); s0_ref: (bk, bv)."""

  def step(t, s):
    s = g_ref[t].astype(jnp.float32) * s + kv_ref[t].astype(jnp.float32)
    s_ref[t] = s
    return s

  jax.lax.fori_loop(0, s_ref.shape[0], step, s0_ref[...].astype(jnp.float32))


def _backward_kernel(g_ref, s0_ref, s_ref, ds_ref, dg_ref, dkv_ref, ds0_ref):
  """Algorithm 2 on one tile, t = T-1 .. 0, with S_{-1} = s0.

  g_ref, s_ref, ds_ref (cotangent of s), dg_ref, dkv_ref: (T, bk, bv); s0_ref, ds0_ref: (bk, bv).
  """
  num_steps = s_ref.shape[0]

  def step(t, s_prev, acc):
    acc = acc + ds_ref[t]
    dkv_ref[t] = acc.astype(dkv_ref.dtype)
    dg_ref[t] = (acc * s_prev).astype(dg_ref.dtype)
    return acc * g_ref[t].astype(jnp.float32)

  def body(i, acc):
    t = num_steps - i
    return step(t, s_ref[t - 1], acc)

  # t = 0 runs after the loop, so that S_{t-1} inside it is always a plain load of s.
  acc = jax.lax.fori_loop(1, num_steps, body, jnp.zeros(s0_ref.shape, jnp.float32))
  ds0_ref[...] = step(0, s0_ref[...].astype(jnp.float32), acc).astype(ds0_ref.dtype)


class _Config(NamedTuple):
  """Static settings of both kernels (hashable: the custom_vjp's non-differentiable argument)."""
  kv_dtype: Any
  block_k: int
  block_v: int
  num_warps: int
  num_stages: int
  interpret: bool


def _grid_and_specs(shape, config):
  """The (B, H, DK/bk, DV/bv) grid and the BlockSpecs of a (B, T, H, DK, DV) sequence and of a
  (B, H, DK, DV) state: one (bk, bv) tile of one (batch, head), all T steps of it for a sequence."""
  b, t, h, dk, dv = shape
  bk, bv = config.block_k, config.block_v
  seq = pl.BlockSpec((None, t, None, bk, bv), lambda ib, ih, ik, iv: (ib, 0, ih, ik, iv))
  state = pl.BlockSpec((None, None, bk, bv), lambda ib, ih, ik, iv: (ib, ih, ik, iv))
  return (b, h, dk // bk, dv // bv), seq, state


def _compiler_params(config):
  # Without Triton compiler params, JAX >= 0.10 lowers pallas_call to Mosaic GPU instead.
  return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _forward(g, kv, s0, config):
  grid, seq, state = _grid_and_specs(kv.shape, config)
  return pl.pallas_call(
      _forward_kernel, grid=grid, in_specs=[seq, seq, state], out_specs=seq,
      out_shape=jax.ShapeDtypeStruct(kv.shape, jnp.float32),
      compiler_params=_compiler_params(config), interpret=config.interpret,
      name="state_update_forward")(g, kv, s0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _state_update(g, kv, s0, config):
  return _forward(g, kv, s0, config)


def _state_update_fwd(g, kv, s0, config):
  s = _forward(g, kv, s0, config)
  return s, (g, s0, s)


def _state_update_bwd(config, residuals, ds):
  g, s0, s = residuals
  grid, seq, state = _grid_and_specs(s.shape, config)
  return pl.pallas_call(
      _backward_kernel, grid=grid, in_specs=[seq, state, seq, seq],
      out_specs=[seq, seq, state],
      out_shape=[jax.ShapeDtypeStruct(g.shape, g.dtype),
                 jax.ShapeDtypeStruct(s.shape, config.kv_dtype),
                 jax.ShapeDtypeStruct(s0.shape, s0.dtype)],
      compiler_params=_compiler_params(config), interpret=config.interpret,
      name="state_update_backward")(g, s0, s, ds)


_state_update.defvjp(_state_update_fwd, _state_update_bwd)


def _block_size(name, block, dim_name, dim, default):
  """`block` checked against `dim`; for None the largest power of two <= default dividing dim."""
  if block is None:
    return min(default, dim & -dim)
  if block < 1 or block & (block - 1) or dim % block:
    raise ValueError(f"{name} must be a power of two (Triton tiles have power-of-two sides) "
                     f"dividing {dim_name} = {dim}, got {block}")
  return block


@functools.partial(jax.jit, static_argnames=("block_k", "block_v", "num_warps", "num_stages",
                                             "interpret"))
def state_update(g, kv, s0=None, *, block_k=None, block_v=None, num_warps=4, num_stages=2,
                 interpret=False):
  """s_t = g_t * s_{t-1} + kv_t for t = 0 .. T-1 (s_{-1} = s0), every s_t returned.

  g, kv: (B, T, H, DK, DV), any float dtypes; s0: (B, H, DK, DV) or None (zeros). Returns
  s: (B, T, H, DK, DV) float32 (the state math is float32 whatever the inputs). Differentiable in g,
  kv and s0; gradients come in their dtypes. block_k / block_v: state tile per program, powers of
  two dividing DK / DV; None picks the largest such power of two up to 16 / 128. num_warps,
  num_stages: Triton settings. interpret=True runs the kernels in Pallas interpret mode (any
  backend).
  """
  checks.check_state_update_args(g, kv, s0)
  if kv.shape[0] == 0 or kv.shape[1] == 0:
    raise ValueError(f"kv must have B >= 1 and T >= 1, got shape {tuple(kv.shape)}")
  dk, dv = kv.shape[-2:]
  config = _Config(kv_dtype=kv.dtype,
                   block_k=_block_size("block_k", block_k, "DK", dk, _DEFAULT_BLOCK_K),
                   block_v=_block_size("block_v", block_v, "DV", dv, _DEFAULT_BLOCK_V),
                   num_warps=num_warps, num_stages=num_stages, interpret=interpret)
  if s0 is None:
    s0 = jnp.zeros((kv.shape[0],) + kv.shape[2:], jnp.float32)
  return _state_update(g, kv, s0, config)
