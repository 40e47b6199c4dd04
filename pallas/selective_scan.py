"""Mamba's selective scan as Pallas GPU (Triton) kernels, forward and backward.

  h_t = exp(delta_t A) * h_{t-1} + (delta_t u_t) B_t^T,   y_t = h_t C_t     (per batch element)

with h_t: (Di, N), u_t, delta_t: (Di,), A: (Di, N), B_t, C_t: (N,). One program per (batch element,
block of block_d channels) keeps its (block_d, N) slice of the state in registers and walks time
inside the kernel, so no per-step state reaches device memory (the associative scan of
`clam_jax.ssm.selective_scan` materialises all T of them, (B, T, Di, N) float32, several times).
The forward kernel also writes the state at the start of every chunk of `chunk` steps, a
1/chunk fraction of the states; the backward kernel walks the chunks in reverse, recomputes each
chunk's states from its start state into registers (the chunk's steps are unrolled) and carries
dL/dh_t backwards through them. The skip term D u and the silu(z) gate are elementwise and stay
outside, in plain JAX.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _f32(*xs):
  return tuple(x.astype(jnp.float32) for x in xs)


def _decay(delta, a_log2):
  """exp(delta A) for one step: (block_d,) x (block_d, N), with a_log2 = A * log2(e) (one MUFU.EX2)."""
  return jnp.exp2(delta[:, None] * a_log2)


def _forward_kernel(u_ref, delta_ref, a_ref, b_ref, c_ref, h0_ref, y_ref, hc_ref, ht_ref, *, chunk):
  """Refs: u, delta (T, bd); A (bd, N); B, C (T, N); h0 (bd, N).
  Writes y (T, bd), the chunk start states hc (T / chunk, bd, N) and h_T (bd, N)."""
  a_log2 = a_ref[...].astype(jnp.float32) * math.log2(math.e)

  def chunk_body(c, h):
    hc_ref[c] = h
    for i in range(chunk):
      t = c * chunk + i
      u, delta, b, cq = _f32(u_ref[t], delta_ref[t], b_ref[t], c_ref[t])
      h = _decay(delta, a_log2) * h + (delta * u)[:, None] * b[None, :]
      y_ref[t] = jnp.sum(h * cq[None, :], axis=1)
    return h

  ht_ref[...] = lax.fori_loop(0, hc_ref.shape[0], chunk_body, h0_ref[...])


def _backward_kernel(u_ref, delta_ref, a_ref, b_ref, c_ref, hc_ref, dy_ref, dht_ref,
                     du_ref, ddelta_ref, da_ref, db_ref, dc_ref, dh0_ref, *, chunk):
  """Refs as in `_forward_kernel` plus hc, dy (T, bd) and dL/dh_T (bd, N). Writes du, ddelta (T, bd),
  this program's dA (bd, N), its channel block's partial dB, dC (T, N) and dL/dh0 (bd, N)."""
  a = a_ref[...].astype(jnp.float32)
  a_log2 = a * math.log2(math.e)
  num_chunks = hc_ref.shape[0]

  def chunk_body(j, carry):
    dh, da_acc = carry
    c = num_chunks - 1 - j
    states, inputs = [hc_ref[c]], []
    for i in range(chunk):
      t = c * chunk + i
      u, delta, b, cq, dy = _f32(u_ref[t], delta_ref[t], b_ref[t], c_ref[t], dy_ref[t])
      states.append(_decay(delta, a_log2) * states[-1] + (delta * u)[:, None] * b[None, :])
      inputs.append((t, u, delta, b, cq, dy))
    for i in reversed(range(chunk)):
      t, u, delta, b, cq, dy = inputs[i]
      h, h_prev = states[i + 1], states[i]
      dc_ref[t] = jnp.sum(dy[:, None] * h, axis=0)
      dh = dh + dy[:, None] * cq[None, :]
      db_ref[t] = jnp.sum(dh * (delta * u)[:, None], axis=0)
      dx = jnp.sum(dh * b[None, :], axis=1)  # dL/d(delta_t u_t)
      decay = _decay(delta, a_log2)
      dlog_decay = dh * h_prev * decay        # dL/d(delta_t A), elementwise
      du_ref[t] = dx * delta
      ddelta_ref[t] = dx * u + jnp.sum(dlog_decay * a, axis=1)
      da_acc = da_acc + dlog_decay * delta[:, None]
      dh = decay * dh
    return dh, da_acc

  dh0, da = lax.fori_loop(0, num_chunks, chunk_body, (dht_ref[...], jnp.zeros_like(a)))
  dh0_ref[...] = dh0
  da_ref[...] = da


def _specs(t, n, num_chunks, block_d):
  """BlockSpecs over the grid (B, Di / block_d)."""
  channels = pl.BlockSpec((None, t, block_d), lambda b, j: (b, 0, j))      # u, delta, y, dy
  shared = pl.BlockSpec((None, t, n), lambda b, j: (b, 0, 0))              # B, C
  a = pl.BlockSpec((block_d, n), lambda b, j: (j, 0))
  state = pl.BlockSpec((None, block_d, n), lambda b, j: (b, j, 0))         # h0, h_T, dA
  starts = pl.BlockSpec((None, num_chunks, block_d, n), lambda b, j: (b, 0, j, 0))
  return channels, shared, a, state, starts


def _forward(u, delta, a, b, c, h0, chunk, block_d, num_warps, interpret):
  bt, t, di = u.shape
  n = a.shape[1]
  num_chunks = t // chunk
  channels, shared, a_spec, state, starts = _specs(t, n, num_chunks, block_d)
  return pl.pallas_call(
      functools.partial(_forward_kernel, chunk=chunk),
      grid=(bt, di // block_d),
      in_specs=[channels, channels, a_spec, shared, shared, state],
      out_specs=[channels, starts, state],
      out_shape=[jax.ShapeDtypeStruct((bt, t, di), jnp.float32),
                 jax.ShapeDtypeStruct((bt, num_chunks, di, n), jnp.float32),
                 jax.ShapeDtypeStruct((bt, di, n), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="selective_scan_forward",
  )(u, delta, a, b, c, h0)


def _backward(u, delta, a, b, c, hc, dy, dht, chunk, block_d, num_warps, interpret):
  bt, t, di = u.shape
  n = a.shape[1]
  num_blocks = di // block_d
  channels, shared, a_spec, state, starts = _specs(t, n, hc.shape[1], block_d)
  # dB and dC sum over channels: each channel block writes its own partial, summed after the call.
  partial = pl.BlockSpec((None, None, t, n), lambda b, j: (j, b, 0, 0))
  du, ddelta, da, db, dc, dh0 = pl.pallas_call(
      functools.partial(_backward_kernel, chunk=chunk),
      grid=(bt, num_blocks),
      in_specs=[channels, channels, a_spec, shared, shared, starts, channels, state],
      out_specs=[channels, channels, state, partial, partial, state],
      out_shape=[jax.ShapeDtypeStruct((bt, t, di), jnp.float32),
                 jax.ShapeDtypeStruct((bt, t, di), jnp.float32),
                 jax.ShapeDtypeStruct((bt, di, n), jnp.float32),
                 jax.ShapeDtypeStruct((num_blocks, bt, t, n), jnp.float32),
                 jax.ShapeDtypeStruct((num_blocks, bt, t, n), jnp.float32),
                 jax.ShapeDtypeStruct((bt, di, n), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="selective_scan_backward",
  )(u, delta, a, b, c, hc, dy, dht)
  return du, ddelta, da.sum(0), db.sum(0), dc.sum(0), dh0


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _scan(u, delta, a, b, c, h0, chunk, block_d, num_warps, interpret):
  """Padded shapes (T a multiple of chunk, Di of block_d, N a power of two). Returns y (B, T, Di)
  and h_T (B, Di, N), float32."""
  y, _, ht = _forward(u, delta, a, b, c, h0, chunk, block_d, num_warps, interpret)
  return y, ht


def _scan_fwd(u, delta, a, b, c, h0, chunk, block_d, num_warps, interpret):
  y, hc, ht = _forward(u, delta, a, b, c, h0, chunk, block_d, num_warps, interpret)
  return (y, ht), (u, delta, a, b, c, hc)


def _scan_bwd(chunk, block_d, num_warps, interpret, residuals, cotangents):
  u, delta, a, b, c, hc = residuals
  dy, dht = cotangents
  du, ddelta, da, db, dc, dh0 = _backward(u, delta, a, b, c, hc, dy, dht, chunk, block_d,
                                          num_warps, interpret)
  return (du.astype(u.dtype), ddelta.astype(delta.dtype), da.astype(a.dtype), db.astype(b.dtype),
          dc.astype(c.dtype), dh0)


_scan.defvjp(_scan_fwd, _scan_bwd)


def selective_scan_pallas(u, delta, A, B, C, h0=None, *, chunk=8, block_d=16, num_warps=1,
                          interpret=False):
  """The selective scan's state recurrence and read-out, by Pallas kernels (differentiable).

  u, delta: (Bt, T, Di); A: (Di, N); B, C: (Bt, T, N); h0: (Bt, Di, N) or None (zeros); any float
  dtypes, computed in float32. Returns y: (Bt, T, Di) float32 with y_t = h_t C_t (no D u skip, no
  gate) and h_T: (Bt, Di, N) float32.
  chunk: steps unrolled per iteration of the time loop (and the spacing of the states the backward
  pass restarts from); block_d: channels per program (a power of two); num_warps: Triton warps per
  program (defaults: the fastest forward + backward of benchmarks/selective_scan.py's sweep at an
  EK100 layer on an H200, 8 state elements per thread); interpret: Pallas interpret mode (CPU). T is padded to a multiple of chunk with
  delta = 0 steps, Di to a multiple of block_d and N to a power of two with zeros; none of that
  changes y or h_T.
  """
  bt, t, di = u.shape
  n = A.shape[1]
  block_d = min(block_d, pl.next_power_of_2(di))
  tp, dp, n_p = -(-t // chunk) * chunk, -(-di // block_d) * block_d, pl.next_power_of_2(n)
  pad = lambda x, shape: jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])
  h0 = jnp.zeros((bt, dp, n_p), jnp.float32) if h0 is None else pad(h0.astype(jnp.float32),
                                                                   (bt, dp, n_p))
  y, ht = _scan(pad(u, (bt, tp, dp)), pad(delta, (bt, tp, dp)), pad(A, (dp, n_p)),
                pad(B, (bt, tp, n_p)), pad(C, (bt, tp, n_p)), h0, chunk, block_d, num_warps,
                interpret)
  return y[:, :t, :di], ht[:, :di, :n]
