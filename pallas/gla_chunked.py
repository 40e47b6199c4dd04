"""Chunked gated linear attention: Pallas GPU (Triton) kernels, forward and backward.

Semantics are those of `pallas.reference.gla_reference`. Time is cut into chunks of C steps; only
the states at chunk boundaries reach device memory, and the products inside a chunk are tensor-core
matmuls. Gates enter through b, the cumulative log gate from the chunk start (b_t <= 0 and
non-increasing), so the factor exp(b_t - b_s) linking query step t to key step s <= t is <= 1.

A matmul needs that factor split as exp(b_t - r) exp(r - b_s); both halves stay <= 1 (no overflow
however negative the gates) only when r is b at a step between s and t. So query rows go in blocks
of `sub_chunk` steps with r = b at the block's first step, which covers every earlier key (the
key-side kernel does the same per key block of 16 steps, with r = b at the key block's last step
for all the query blocks after it). A block of one step (the default for M >= 16) is then done.
A longer block (M < 16) takes r = b at its last step instead, which covers its own keys too, when
the gates decay by at most e^MAX_SPREAD across it: the query half is then <= e^MAX_SPREAD, far
from overflow. Otherwise (gates near 0) the keys inside the block are done elementwise, one by one.

q's M queries per step are flattened with time into rows (row r of a chunk belongs to step r // M),
so a block of sub_chunk steps is sub_chunk * M rows; Triton's matmuls need >= 16, and more fill
the tensor cores better (128 by default in the output kernel; 16 in the backward, faster there).

Kernels (grids start with batch and head):
  _states   walks the chunks: h[n], the state at the start of chunk n, (B, H, NC, DK, DV), and S_T.
            Grid (B, H, DV / block_v).
  _output   one program per chunk: o = scale [(q e^b) h[n] + A v], A the gated causal scores.
  _dstates  walks the chunks backwards: dh[n] = dL/d(state at the end of chunk n), and dL/dS_0.
  _dq       one program per chunk: dq.
  _dkv      one program per key block of 16 steps: dk and dv.
The log-gate gradient follows from dq and dk, chunk by chunk (see `_gla_bwd`).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas import checks

# Rows per query block of the output kernel by default (up to a whole chunk), by the inputs'
# itemsize: fuller tensor-core matmuls than 16 rows; float32 blocks take twice the shared memory
# (H200: 227 KiB per block), hence fewer rows and no software pipelining (num_stages = 1) for them.
# The backward's query-side kernels run fastest with 16 rows (H200 sweep).
_QUERY_ROWS = {2: 128, 4: 32}
_F32 = jnp.float32
# dot_general contraction dims: a @ b, a @ b^T, a^T @ b.
_NN, _NT, _TN = ((1,), (0,)), ((1,), (1,)), ((0,), (0,))
# The largest log-gate decay across a query block for which one matmul with r = b at the block's
# last step covers the block's own keys (module docstring): factors up to e^40 ~ 2e17 are exact
# in bfloat16/TF32/float32 operands, whose exponent range ends at ~e^88.
MAX_SPREAD = 40.0
# (num_warps, num_stages) per kernel, from a sweep on an H200 (B = 64, T = 4096, H = 8,
# DK = DV = 128, bfloat16; see benchmarks/RESULTS.md).
LAUNCH = {
    "gla_chunked_states": (8, 2),
    "gla_chunked_output": (8, 2),
    "gla_chunked_dstates": (8, 3),
    "gla_chunked_dq": (4, 3),
    "gla_chunked_dkv": (4, 3),
}


class _Config(NamedTuple):
  """Static arguments of the kernels (hashable, for custom_vjp's nondiff_argnums)."""
  m: int          # queries per step, a power of two
  scale: float
  chunk: int
  steps: int      # time steps per block of query rows in the output kernel (sub-chunk)
  bwd_steps: int  # the same in the dq and dkv kernels
  block_v: int    # DV columns per program of the sequential kernels
  pipelined: bool  # Triton software pipelining (LAUNCH's num_stages); off for float32 inputs
  interpret: bool


def _mm(a, b, dtype, dims):
  """a, b contracted over dims (_NN, _NT or _TN) with operands in dtype, accumulated in float32.

  dtype is the inputs' dtype: bfloat16 inputs run bfloat16 tensor-core matmuls, float32 inputs
  run at the default precision (TF32 on GPU).
  """
  return lax.dot_general(a.astype(dtype), b.astype(dtype), (dims, ((), ())),
                         preferred_element_type=_F32)


def _rows(x, m):
  """Repeats each row of x (c, D) m times: per-step values to the query rows, (c * m, D)."""
  c, d = x.shape
  if m == 1:
    return x
  if c == 1:
    return jnp.broadcast_to(x, (m, d))
  return jnp.broadcast_to(x[:, None, :], (c, m, d)).reshape(c * m, d)


def _row_steps(first, steps, m):
  """(steps * m, 1) int32, the time step (in the chunk) of each row of a query block; a scalar for
  one-step blocks."""
  if steps == 1:
    return first
  return first + _rows(lax.broadcasted_iota(jnp.int32, (steps, 1), 0), m)


def _query_block(i, b_ref, steps, m):
  """Rows slice, first step, per-step b (steps, DK), b of each row and r = b at the first step."""
  first = i * steps
  b_steps = b_ref[pl.ds(first, steps), :]
  return pl.ds(first * m, steps * m), first, b_steps, _rows(b_steps, m), b_ref[pl.ds(first, 1), :]


def _block_end(b_ref, first, steps, r):
  """b at a query block's last step (1, DK), and whether one matmul with it as r is safe (module
  docstring): the block's gates decay by at most e^MAX_SPREAD."""
  r_last = b_ref[pl.ds(first + steps - 1, 1), :]
  return r_last, jnp.max((r - r_last).reshape(-1)) <= MAX_SPREAD


def _inside_gate(b_steps, b_ref, s, m):
  """exp(b_t - b_s) for each row of a query block and key step s; 1 (masked later) where t < s."""
  return _rows(jnp.exp(jnp.minimum(b_steps - b_ref[pl.ds(s, 1), :], 0.0)), m)


def _states_kernel(k_ref, v_ref, b_ref, s0_ref, h_ref, st_ref, *, chunk):
  """Refs: k, b (Tp, DK), v (Tp, bv), s0 (DK, bv); writes h (NC, DK, bv) and S_T (DK, bv)."""
  dtype = k_ref.dtype

  def body(n, s):
    h_ref[n] = s.astype(h_ref.dtype)
    t = pl.ds(n * chunk, chunk)
    b_last = b_ref[n * chunk + chunk - 1, :]
    k = k_ref[t, :].astype(_F32) * jnp.exp(b_last[None, :] - b_ref[t, :])
    return jnp.exp(b_last)[:, None] * s + _mm(k, v_ref[t, :], dtype, _TN)

  st_ref[...] = lax.fori_loop(0, h_ref.shape[0], body, s0_ref[...])


def _output_kernel(q_ref, k_ref, v_ref, b_ref, h_ref, o_ref, *, scale, m, steps):
  """Refs of one chunk: q (C*M, DK), k, b (C, DK), v (C, DV), h (DK, DV); writes o (C*M, DV)."""
  chunk = k_ref.shape[0]
  dtype = q_ref.dtype
  key = lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
  load_chunk = lambda: (k_ref[...], v_ref[...], b_ref[...], h_ref[...])
  # One-step query blocks (M >= 16) are many per chunk and have no elementwise part: the chunk's
  # keys, values and state stay in registers across them. Otherwise each block reloads them (from
  # cache), which leaves the registers to the elementwise part (no spills on sm_90 at 8 warps).
  hoisted = load_chunk() if steps == 1 else None

  def body(i, carry):
    k, v, b, h = load_chunk() if hoisted is None else hoisted
    rows, first, b_steps, b_q, r = _query_block(i, b_ref, steps, m)
    q = q_ref[rows, :].astype(_F32)
    o = _mm(q * jnp.exp(b_q), h, dtype, _NN)
    scores = lambda r: _mm(q * jnp.exp(b_q - r), k.astype(_F32) * jnp.exp(jnp.minimum(r - b, 0.0)),
                           dtype, _NT)
    if steps == 1:
      a = jnp.where(key <= first, scores(r), 0.0)
    else:
      t_q = _row_steps(first, steps, m)
      r_last, one_matmul = _block_end(b_ref, first, steps, r)

      def inside(u, a):
        s = first + u
        col = jnp.sum(q * k_ref[pl.ds(s, 1), :].astype(_F32) * _inside_gate(b_steps, b_ref, s, m),
                      axis=1, keepdims=True)
        return jnp.where(key == s, jnp.where(t_q >= s, col, 0.0), a)

      a = lax.cond(one_matmul,
                   lambda: jnp.where(key <= t_q, scores(r_last), 0.0),
                   lambda: lax.fori_loop(1, steps, inside, jnp.where(key <= first, scores(r), 0.0)))
    o += _mm(a, v, dtype, _NN)
    o_ref[rows, :] = (scale * o).astype(o_ref.dtype)
    return carry

  lax.fori_loop(0, chunk // steps, body, 0)


def _dstates_kernel(q_ref, do_ref, b_ref, dst_ref, dh_ref, ds0_ref, *, scale, m, steps):
  """Refs: q (Tp*M, DK), do (Tp*M, bv), b (Tp, DK), dS_T (DK, bv); chunks in reverse, writes
  dh (NC, DK, bv), dh[n] = dL/d(state at the end of chunk n), and dL/dS_0 (DK, bv)."""
  num_chunks = dh_ref.shape[0]
  chunk = b_ref.shape[0] // num_chunks
  dtype = q_ref.dtype

  def chunk_body(j, dh):
    n = num_chunks - 1 - j
    dh_ref[n] = dh.astype(dh_ref.dtype)

    def rows_body(i, acc):
      first = n * chunk + i * steps
      rows = pl.ds(first * m, steps * m)
      q = q_ref[rows, :].astype(_F32) * jnp.exp(_rows(b_ref[pl.ds(first, steps), :], m))
      return acc + _mm(q, do_ref[rows, :], dtype, _TN)

    acc = lax.fori_loop(0, chunk // steps, rows_body, jnp.zeros_like(dh))
    return jnp.exp(b_ref[n * chunk + chunk - 1, :])[:, None] * dh + scale * acc

  ds0_ref[...] = lax.fori_loop(0, num_chunks, chunk_body, dst_ref[...])


def _sum_rows(x, m):
  """Sums each step's m rows of x (c * m, D): per-row values to per-step ones, (c, D)."""
  if m == 1:
    return x
  if x.shape[0] == m:
    return jnp.sum(x, axis=0, keepdims=True)
  return jnp.sum(x.reshape(x.shape[0] // m, m, x.shape[1]), axis=1)


def _dq_kernel(q_ref, do_ref, k_ref, v_ref, b_ref, h_ref, dh_ref, dq_ref, dbq_ref, *, scale, m,
               steps):
  """Refs of one chunk: q, do (C*M, DK | DV), k, b (C, DK), v (C, DV), chunk-start state h and
  dh = dL/d(chunk-end state) (DK, DV); writes dq (C*M, DK) and the query side of the log-gate
  gradient dbq (C, DK) (see `_gla_bwd`)."""
  chunk = k_ref.shape[0]
  dtype = do_ref.dtype
  k, v, b, h = k_ref[...], v_ref[...], b_ref[...], h_ref[...]
  key = lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
  start_state_term = (jnp.exp(b_ref[pl.ds(chunk - 1, 1), :])
                      * jnp.sum(h.astype(_F32) * dh_ref[...].astype(_F32), axis=1)[None, :])

  def body(i, carry):
    rows, first, b_steps, b_q, r = _query_block(i, b_ref, steps, m)
    do = do_ref[rows, :]
    t_q = _row_steps(first, steps, m)
    da_all = _mm(do, v, dtype, _NT)
    da = jnp.where(key < t_q, da_all, 0.0)
    from_keys = lambda da, r: jnp.exp(b_q - r) * _mm(
        da, k.astype(_F32) * jnp.exp(jnp.minimum(r - b, 0.0)), dtype, _NN)
    dq = jnp.exp(b_q) * _mm(do, h, dtype, _NT)
    if steps == 1:
      dq += from_keys(jnp.where(key <= first, da, 0.0), r)
    else:
      r_last, one_matmul = _block_end(b_ref, first, steps, r)

      def inside(u, dq):
        s = first + u
        col = jnp.sum(jnp.where(key == s, da, 0.0), axis=1, keepdims=True)
        return dq + col * k_ref[pl.ds(s, 1), :].astype(_F32) * _inside_gate(b_steps, b_ref, s, m)

      dq += lax.cond(one_matmul,
                     lambda: from_keys(da, r_last),
                     lambda: lax.fori_loop(1, steps, inside,
                                           from_keys(jnp.where(key <= first, da, 0.0), r)))
    dbq = scale * _sum_rows(q_ref[rows, :].astype(_F32) * dq, m)
    last = _row_steps(first, steps, 1) == chunk - 1
    dbq_ref[pl.ds(first, steps), :] = dbq + jnp.where(last, start_state_term, 0.0)
    same_step = jnp.sum(jnp.where(key == t_q, da_all, 0.0), axis=1, keepdims=True)
    dq += same_step * _rows(k_ref[pl.ds(first, steps), :].astype(_F32), m)
    dq_ref[rows, :] = (scale * dq).astype(dq_ref.dtype)
    return carry

  lax.fori_loop(0, chunk // steps, body, 0)


def _dkv_kernel(q_ref, k_ref, v_ref, b_ref, do_ref, dh_ref, dk_ref, dv_ref, dbk_ref, dbe_ref, *,
                scale, m, steps, block_k):
  """Refs of one chunk: q, do (C*M, DK | DV), k, b (C, DK), v (C, DV), dh = dL/d(chunk-end state)
  (DK, DV); for key block j = program_id(3), keys J = [j, j+1) * block_k (block_k a multiple of
  the query blocks' steps), writes dk, dv and the
  key side of the log-gate gradient: dbk from the chunk's queries, dbe from its end state (see
  `_gla_bwd`).

  Query blocks after J ("far") share r = b at J's last step, so their key-side factor is applied
  once; those inside J ("near") use r = b at their own first step.
  """
  chunk = k_ref.shape[0]
  dtype = q_ref.dtype
  first_key = pl.program_id(3) * block_k
  keys = pl.ds(first_key, block_k)
  k, v, b_k = k_ref[keys, :].astype(_F32), v_ref[keys, :], b_ref[keys, :]
  key = first_key + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
  key_col = first_key + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)

  # Query blocks after J, sharing r = b at J's last step.
  r = b_ref[pl.ds(first_key + block_k - 1, 1), :]
  k_gate = jnp.exp(r - b_k)
  k_gated = k * k_gate

  def far(i, carry):
    acc, dv = carry
    rows = pl.ds(i * steps * m, steps * m)
    q_gated = q_ref[rows, :].astype(_F32) * jnp.exp(_rows(b_ref[pl.ds(i * steps, steps), :], m) - r)
    do = do_ref[rows, :]
    a = _mm(q_gated, k_gated, dtype, _NT)
    da = scale * _mm(do, v, dtype, _NT)
    return acc + _mm(da, q_gated, dtype, _TN), dv + scale * _mm(a, do, dtype, _TN)

  blocks_per_key_block = block_k // steps
  first_block = pl.program_id(3) * blocks_per_key_block
  acc, dv = lax.fori_loop(first_block + blocks_per_key_block, chunk // steps, far,
                          (jnp.zeros_like(k), jnp.zeros(v.shape, _F32)))

  # Query blocks inside J, each with r = b at its own first step.
  def near(i, carry):
    dk, dk_same, dv = carry
    rows, first, b_steps, b_q, r = _query_block(i, b_ref, steps, m)
    q, do = q_ref[rows, :].astype(_F32), do_ref[rows, :]
    t_q = _row_steps(first, steps, m)
    da_all = scale * _mm(do, v, dtype, _NT)
    da = jnp.where(key < t_q, da_all, 0.0)
    dk_same += _mm(jnp.where(key == t_q, da_all, 0.0), q, dtype, _TN)

    def by_matmul(r, last_key):
      """(a, dk) over the keys up to last_key (per row) with the split at r."""
      q_gated = q * jnp.exp(b_q - r)
      k_gate = jnp.exp(jnp.minimum(r - b_k, 0.0))
      a = jnp.where(key <= last_key, _mm(q_gated, k * k_gate, dtype, _NT), 0.0)
      return a, dk + k_gate * _mm(jnp.where(key <= last_key, da, 0.0), q_gated, dtype, _TN)

    if steps == 1:
      a, dk = by_matmul(r, first)
    else:
      def inside(u, carry):
        a, dk = carry
        s = first + u
        q_e = q * _inside_gate(b_steps, b_ref, s, m)
        col = jnp.sum(q_e * k_ref[pl.ds(s, 1), :].astype(_F32), axis=1, keepdims=True)
        da_col = jnp.sum(jnp.where(key == s, da, 0.0), axis=1, keepdims=True)
        dk_row = jnp.sum(da_col * q_e, axis=0, keepdims=True)
        return (jnp.where(key == s, jnp.where(t_q >= s, col, 0.0), a),
                jnp.where(key_col == s, dk + dk_row, dk))

      r_last, one_matmul = _block_end(b_ref, first, steps, r)
      a, dk = lax.cond(one_matmul, lambda: by_matmul(r_last, t_q),
                       lambda: lax.fori_loop(1, steps, inside, by_matmul(r, first)))
    return dk, dk_same, dv + scale * _mm(a, do, dtype, _TN)

  dk, dk_same, dv = lax.fori_loop(first_block, first_block + blocks_per_key_block, near,
                                  (k_gate * acc, jnp.zeros_like(k), dv))
  dbk_ref[...] = k * dk

  # Through the state at the chunk's end.
  dh = dh_ref[...]
  decay = jnp.exp(b_ref[pl.ds(chunk - 1, 1), :] - b_k)
  dk_end = decay * _mm(v, dh, dtype, _NT)
  dbe_ref[...] = k * dk_end
  dk_ref[...] = (dk + dk_same + dk_end).astype(dk_ref.dtype)
  dv_ref[...] = (dv + _mm(k * decay, dh, dtype, _NN)).astype(dv_ref.dtype)


def _call(kernel, cfg, grid, in_specs, out_specs, out_shape, name):
  num_warps, num_stages = LAUNCH[name]
  num_stages = num_stages if cfg.pipelined else 1
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=cfg.interpret, name=name)


def _time_spec(length, width, col_block=False):
  """A (B, T', H, D) array, all of T' and `width` of D per program of a (B, H, ...) grid."""
  if col_block:
    return pl.BlockSpec((None, length, None, width), lambda b, h, j: (b, 0, h, j))
  return pl.BlockSpec((None, length, None, width), lambda b, h, *_: (b, 0, h, 0))


def _chunk_spec(length, width):
  """Block n (of `length` rows) of a (B, T', H, D) array, on a (B, H, NC, ...) grid."""
  return pl.BlockSpec((None, length, None, width), lambda b, h, n, *_: (b, n, h, 0))


def _chunk_state_spec(dk, dv):
  """State n of a (B, H, NC, DK, DV) array, on a (B, H, NC, ...) grid."""
  return pl.BlockSpec((None, None, None, dk, dv), lambda b, h, n, *_: (b, h, n, 0, 0))


def _states(k, v, b, s0, cfg):
  """k, b (B, Tp, H, DK), v (B, Tp, H, DV), s0 (B, H, DK, DV) -> h (B, H, NC, DK, DV), S_T."""
  bsz, tp, nh, dk = k.shape
  dv = v.shape[-1]
  nc, bv = tp // cfg.chunk, cfg.block_v
  state_spec = pl.BlockSpec((None, None, dk, bv), lambda b, h, j: (b, h, 0, j))
  return _call(
      functools.partial(_states_kernel, chunk=cfg.chunk), cfg, (bsz, nh, dv // bv),
      [_time_spec(tp, dk), _time_spec(tp, bv, True), _time_spec(tp, dk), state_spec],
      [pl.BlockSpec((None, None, nc, dk, bv), lambda b, h, j: (b, h, 0, 0, j)), state_spec],
      [jax.ShapeDtypeStruct((bsz, nh, nc, dk, dv), k.dtype), jax.ShapeDtypeStruct(s0.shape, _F32)],
      "gla_chunked_states")(k, v, b, s0)


def _output(q, k, v, b, h, cfg):
  """q (B, Tp*M, H, DK), chunk states h -> o (B, Tp*M, H, DV) in v's dtype."""
  bsz, tp, nh, dk = k.shape
  dv, c, rows = v.shape[-1], cfg.chunk, cfg.chunk * cfg.m
  kernel = functools.partial(_output_kernel, scale=cfg.scale, m=cfg.m, steps=cfg.steps)
  return _call(
      kernel, cfg, (bsz, nh, tp // c),
      [_chunk_spec(rows, dk), _chunk_spec(c, dk), _chunk_spec(c, dv), _chunk_spec(c, dk),
       _chunk_state_spec(dk, dv)],
      _chunk_spec(rows, dv), jax.ShapeDtypeStruct((bsz, q.shape[1], nh, dv), v.dtype),
      "gla_chunked_output")(q, k, v, b, h)


def _dstates(q, do, b, ds_t, cfg):
  """-> dh (B, H, NC, DK, DV) (dL/d state at each chunk's end) and dL/dS_0 (B, H, DK, DV)."""
  bsz, tp, nh, dk = b.shape
  dv = do.shape[-1]
  nc, bv, rows = tp // cfg.chunk, cfg.block_v, tp * cfg.m
  state_spec = pl.BlockSpec((None, None, dk, bv), lambda b, h, j: (b, h, 0, j))
  # Nothing causal here, so the row blocks can be larger than the query blocks: 64 rows (or one
  # step if M > 64), for fuller matmuls.
  steps = min(cfg.chunk, max(cfg.bwd_steps, 64 // cfg.m))
  kernel = functools.partial(_dstates_kernel, scale=cfg.scale, m=cfg.m, steps=steps)
  return _call(
      kernel, cfg, (bsz, nh, dv // bv),
      [_time_spec(rows, dk), _time_spec(rows, bv, True), _time_spec(tp, dk), state_spec],
      [pl.BlockSpec((None, None, nc, dk, bv), lambda b, h, j: (b, h, 0, 0, j)), state_spec],
      [jax.ShapeDtypeStruct((bsz, nh, nc, dk, dv), q.dtype),
       jax.ShapeDtypeStruct(ds_t.shape, _F32)],
      "gla_chunked_dstates")(q, do, b, ds_t)


def _dq(q, do, k, v, b, h, dh, cfg):
  """-> dq (B, Tp*M, H, DK) in q's dtype and dbq (B, Tp, H, DK) float32."""
  bsz, tp, nh, dk = k.shape
  dv, c, rows = v.shape[-1], cfg.chunk, cfg.chunk * cfg.m
  kernel = functools.partial(_dq_kernel, scale=cfg.scale, m=cfg.m, steps=cfg.bwd_steps)
  return _call(
      kernel, cfg, (bsz, nh, tp // c),
      [_chunk_spec(rows, dk), _chunk_spec(rows, dv), _chunk_spec(c, dk), _chunk_spec(c, dv),
       _chunk_spec(c, dk), _chunk_state_spec(dk, dv), _chunk_state_spec(dk, dv)],
      [_chunk_spec(rows, dk), _chunk_spec(c, dk)],
      [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, _F32)],
      "gla_chunked_dq")(q, do, k, v, b, h, dh)


def _dkv(q, k, v, b, do, dh, cfg):
  """-> dk (B, Tp, H, DK) and dv (B, Tp, H, DV) in the inputs' dtype, dbk and dbe (B, Tp, H, DK)
  float32."""
  bsz, tp, nh, dk = k.shape
  dv, c, rows = v.shape[-1], cfg.chunk, cfg.chunk * cfg.m
  block_k = max(checks.MIN_DOT_DIM, cfg.bwd_steps)  # whole query blocks per key block
  key_spec = lambda d: pl.BlockSpec((None, block_k, None, d),
                                    lambda b, h, n, j: (b, n * (c // block_k) + j, h, 0))
  kernel = functools.partial(_dkv_kernel, scale=cfg.scale, m=cfg.m, steps=cfg.bwd_steps,
                             block_k=block_k)
  return _call(
      kernel, cfg, (bsz, nh, tp // c, c // block_k),
      [_chunk_spec(rows, dk), _chunk_spec(c, dk), _chunk_spec(c, dv), _chunk_spec(c, dk),
       _chunk_spec(rows, dv), _chunk_state_spec(dk, dv)],
      [key_spec(dk), key_spec(dv), key_spec(dk), key_spec(dk)],
      [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
       jax.ShapeDtypeStruct(k.shape, _F32), jax.ShapeDtypeStruct(k.shape, _F32)],
      "gla_chunked_dkv")(q, k, v, b, do, dh)


def _local_cumsum(g, chunk):
  """b: cumulative sum of g (B, Tp, H, DK) restarted at every chunk start."""
  bsz, tp, nh, dk = g.shape
  return jnp.cumsum(g.reshape(bsz, tp // chunk, chunk, nh, dk), axis=2).reshape(g.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gla(q, k, v, g, s0, cfg):
  """Padded shapes: q (B, Tp*M, H, DK) (rows = steps x queries), k (B, Tp, H, DK), v (B, Tp, H, DV),
  g (B, Tp, H, DK) float32, s0 (B, H, DK, DV) float32. Returns o (B, Tp*M, H, DV) and S_T."""
  return _gla_fwd(q, k, v, g, s0, cfg)[0]


def _gla_fwd(q, k, v, g, s0, cfg):
  b = _local_cumsum(g, cfg.chunk)
  h, s_t = _states(k, v, b, s0, cfg)
  return (_output(q, k, v, b, h, cfg), s_t), (q, k, v, b, h)


def _gla_bwd(cfg, residuals, cotangents):
  q, k, v, b, h = residuals
  do, ds_t = cotangents
  dh, ds0 = _dstates(q, do, b, ds_t, cfg)
  dq, dbq = _dq(q, do, k, v, b, h, dh, cfg)
  dk, dv, dbk, dbe = _dkv(q, k, v, b, do, dh, cfg)
  # The log-gate gradient, chunk by chunk. g_i (step i of chunk n) enters the chunk's outputs o_t,
  # t >= i, and its end state h_{n+1}; later outputs see it only through h_{n+1}. With b the
  # chunk-local cumulative gate, o_t = scale q_t e^{b_t} (h_n + sum_{s<=t} (k_s e^{-b_s})^T v_s) and
  # h_{n+1} = e^{b_L} h_n + sum_s e^{b_L - b_s} k_s^T v_s (L the chunk's last step), so
  #   dL/dg_i = sum_{t>=i} (sum_m q_t[m] dq_t[m] - k_t dk_t|queries)   (dbq - dbk)
  #           + rowsum(dh_n * e^{b_L} h_n)                             (in dbq at step L)
  #           + sum_{s<i} k_s dk_s|end state                           (dbe).
  # The terms of pairs s = t carry no gate and cancel exactly in the first line, and the end-state
  # paths of keys s >= i would cancel between a reverse and a forward sum: the kernels leave the
  # former out and keep dbe apart, since with strong gates both dwarf the result (differences of
  # them would be rounding noise).
  bsz, tp, nh, dk_dim = k.shape
  by_chunk = lambda x: x.reshape(bsz, tp // cfg.chunk, cfg.chunk, nh, dk_dim)
  from_queries = lax.cumsum(by_chunk(dbq - dbk), axis=2, reverse=True)
  from_end_state = jnp.cumsum(by_chunk(dbe), axis=2)
  from_end_state = jnp.pad(from_end_state[:, :, :-1], ((0, 0), (0, 0), (1, 0), (0, 0), (0, 0)))
  dg = (from_queries + from_end_state).reshape(k.shape)
  return dq, dk, dv, dg, ds0


_gla.defvjp(_gla_fwd, _gla_bwd)


def _pad_to(x, shape):
  """Zero-pads x at the end of each axis to shape."""
  if x.shape == shape:
    return x
  return jnp.pad(x, [(0, n - d) for d, n in zip(x.shape, shape)])


def gla_chunked(q, k, v, g, *, scale=None, initial_state=None, return_final_state=False,
                chunk_size=64, sub_chunk=None, block_v=128, interpret=False):
  """Gated linear attention by chunked Pallas kernels (differentiable).

  S_t = diag(exp g_t) S_{t-1} + k_t^T v_t;  o_t[m] = scale * q_t[m] S_t.
  q: (B, T, H, DK) or (B, T, M, H, DK); k, g: (B, T, H, DK) (g = log forget gate <= 0);
  v: (B, T, H, DV); initial_state: (B, H, DK, DV) or None (zeros); scale (a Python number)
  defaults to DK ** -0.5. Returns o with q's leading shape and DV last, in v's dtype, and S_T:
  (B, H, DK, DV) float32 if return_final_state.

  chunk_size: time steps per chunk (a power of two >= 16); sub_chunk: time steps per block of
  query rows in the output kernel (a power of two <= chunk_size with sub_chunk * M >= 16; default
  128 rows for bfloat16 inputs, 32 for float32; the backward takes blocks of 16 rows);
  block_v: DV columns of the state per program of the two kernels that walk the chunks (a power
  of two >= 16, capped at DV); interpret: run in Pallas interpret mode (CPU). Triton's launch
  parameters per kernel are in LAUNCH.
  T is zero-padded to a multiple of chunk_size and M, DK, DV to powers of two (DK, DV >= 16), which
  leaves S unchanged. Matmuls run in the inputs' dtype (bfloat16, or float32 at TF32 on GPU) with
  float32 accumulation. States are carried in float32; the chunk-boundary states and their
  gradients that the backward keeps, (B, H, T / chunk_size, DK, DV) each, are stored in the
  inputs' dtype, to which the matmuls they enter round them anyway.
  """
  squeeze = q.ndim == 4
  q = checks.check_gla_args(q, k, v, g, initial_state)
  for name, n in (("chunk_size", chunk_size), ("block_v", block_v)):
    if n < checks.MIN_DOT_DIM or n & (n - 1):
      raise ValueError(f"{name} must be a power of two >= {checks.MIN_DOT_DIM}, got {n}")
  bsz, t, m, nh, dk = q.shape
  dv = v.shape[-1]
  scale = dk ** -0.5 if scale is None else scale
  mp = pl.next_power_of_2(m)
  if sub_chunk is None:
    sub_chunk = min(chunk_size, max(1, _QUERY_ROWS[jnp.dtype(v.dtype).itemsize] // mp))
  if sub_chunk > chunk_size or sub_chunk * mp < checks.MIN_DOT_DIM or sub_chunk & (sub_chunk - 1):
    raise ValueError(f"sub_chunk must be a power of two <= chunk_size = {chunk_size} with "
                     f"sub_chunk * M >= {checks.MIN_DOT_DIM} (M = {m}, padded to {mp}), got "
                     f"{sub_chunk}")
  dkp, dvp = (max(checks.MIN_DOT_DIM, pl.next_power_of_2(n)) for n in (dk, dv))
  tp = -(-t // chunk_size) * chunk_size
  cfg = _Config(m=mp, scale=float(scale), chunk=chunk_size, steps=sub_chunk,
                bwd_steps=min(sub_chunk, max(1, checks.MIN_DOT_DIM // mp)),
                block_v=min(block_v, dvp), pipelined=jnp.dtype(v.dtype).itemsize < 4,
                interpret=interpret)
  s0 = (jnp.zeros((bsz, nh, dkp, dvp), _F32) if initial_state is None
        else _pad_to(initial_state.astype(_F32), (bsz, nh, dkp, dvp)))
  o, s_t = _gla(_pad_to(q, (bsz, tp, mp, nh, dkp)).reshape(bsz, tp * mp, nh, dkp),
                _pad_to(k, (bsz, tp, nh, dkp)), _pad_to(v, (bsz, tp, nh, dvp)),
                _pad_to(g.astype(_F32), (bsz, tp, nh, dkp)), s0, cfg)
  o = o.reshape(bsz, tp, mp, nh, dvp)[:, :t, :m, :, :dv]
  if squeeze:
    o = o[:, :, 0]
  return (o, s_t[:, :, :dk, :dv]) if return_final_state else o
