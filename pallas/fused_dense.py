"""A dense layer for a few rows, with its LayerNorm/RMSNorm, activation and residual, in one kernel.

    y = residual_norm(residual) + round(act(input_norm(x) @ W^T + b))

At batch 1 a streaming step is a chain of products of a handful of rows (one frame, 16 memory
tokens, one future query) with normalisations and residual adds between them, which XLA runs as
separate kernels (on an H200 the EK100 step is 139 of them, busy 359 of its 383 us per frame).
Here one program per block of output columns normalises its rows itself (the statistics of a
1024-wide row cost little next to the weight rows it streams) and applies the bias, activation
and residual to its block before storing it. Weights are (N, K), Dense kernels transposed: a
program's loads run along contiguous K.

Grid: (N / block_n, split_k, B), one program per block of output columns, share of K and batch
element; a program holds the R rows of its batch element, so row-wise normalisation needs no
communication (and at batch B > 1 every batch element re-reads the weights: this kernel is for
batch 1). With K split, the programs write float32 partial sums that XLA adds before the
epilogue."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas import checks
from pallas.kernel_call import KernelCall, interpret_default, launch

# Row statistics are taken in unrolled chunks of _STATS_TILE elements (R rows x 1024 / R columns),
# 64 to 512 columns wide: not by the product's blocks, which can be 2 columns wide (a 512-step
# unrolled loop compiled for minutes). 512-column chunks at 16-32 rows made the normalised products
# 1.4-1.9x slower than these (H200: the EK100 step 0.238 vs 0.220 ms/frame; benchmarks/RESULTS.md).
_STATS_TILE = 1024
_STATS_COLUMNS = (64, 512)
# Elements of an elementwise accumulator tile per warp: 64 float32 registers a thread.
_TILE_PER_WARP = 2048


class Norm(NamedTuple):
  """A row normalisation: kind "layer" (x - mean) / sqrt(var + eps) or "rms" x / sqrt(mean(x^2) +
  eps), then * scale + bias (each (K,) or None: absent). Statistics in float32, variance as
  E[x^2] - E[x]^2 (Flax's LayerNorm and RMSNorm)."""
  kind: str
  scale: jax.Array | None = None
  bias: jax.Array | None = None
  eps: float = 1e-6


class Blocks(NamedTuple):
  """How fused_dense tiles a product: block_n output columns per program; the K loop in
  block_k chunks, unrolled (num_stages None: every chunk's loads issued at once) or a loop that
  Triton software-pipelines over num_stages stages; num_warps per program; K split over split_k
  programs per block of columns. Powers of two, narrowed to divide N and K."""
  block_n: int = 16
  block_k: int = 512
  num_warps: int = 4
  num_stages: int | None = None
  split_k: int = 1


def default_blocks(r, k, n, input_norm=False):
  """The Blocks of an (R rows, K) x (K, N) product at batch 1 (input_norm: it normalises its
  input rows). A few rows: 2-column programs over whole 2048-long K chunks (many programs, each
  streaming long contiguous rows), 4-column ones with an input norm, whose rows and scale and bias
  every program re-reads (the EK100 fused step on an H200: 0.213 vs 0.220 ms per frame). 16+ rows:
  tl.dot in a pipelined loop with K split in four (the step: 250 us per frame against 257 with K
  unsplit below 4096; benchmarks/RESULTS.md), where each quarter of K is a whole number of 16-wide
  tl.dot steps."""
  if r < checks.MIN_DOT_DIM:
    return Blocks(block_n=4 if input_norm else 2, block_k=2048)
  split_k = 4 if k % (4 * checks.MIN_DOT_DIM) == 0 else 1
  if k >= 4096:
    return Blocks(block_n=16, block_k=256, num_stages=3, split_k=split_k)
  if n >= 3072:
    return Blocks(block_n=64, block_k=64, num_stages=3, split_k=split_k)
  return Blocks(block_n=32, block_k=128, num_stages=3, split_k=split_k)


def _row_stats(ref, kind, eps):
  """ref: (R, K) -> (shift (R, 1), inverse scale (R, 1)) float32 of `Norm` kind over K."""
  total = squares = jnp.zeros((ref.shape[0], 1), jnp.float32)
  chunk = _fit(min(max(_STATS_TILE // ref.shape[0], _STATS_COLUMNS[0]), _STATS_COLUMNS[1]),
               ref.shape[-1])
  for start in range(0, ref.shape[-1], chunk):  # unrolled: every chunk's load in flight at once
    x = ref[:, pl.ds(start, chunk)].astype(jnp.float32)
    total, squares = total + jnp.sum(x, axis=1)[:, None], squares + jnp.sum(x * x, axis=1)[:, None]
  mean_square = squares / ref.shape[-1]
  if kind == "rms":
    return jnp.zeros_like(total), lax.rsqrt(mean_square + eps)
  mean = total / ref.shape[-1]
  return mean, lax.rsqrt(jnp.maximum(mean_square - mean * mean, 0.0) + eps)


def _normalize(x, stats, scale_ref, bias_ref, start, size):
  """x: (R, size) float32 columns [start, start + size) of the rows that `stats` describe."""
  shift, inverse = stats
  y = (x - shift) * inverse
  if scale_ref is not None:
    y = y * scale_ref[pl.ds(start, size)].astype(jnp.float32)[None, :]
  if bias_ref is not None:
    y = y + bias_ref[pl.ds(start, size)].astype(jnp.float32)[None, :]
  return y


def _kernel(*refs, layout, input_norm, residual_norm, norm_from_row, activation, block_k,
            use_dot, precision, pipelined, split, program_id):
  refs = dict(zip(layout, refs))
  x_ref, w_ref, out_ref = refs["x"], refs["weight"], refs["out"]
  num_rows, block_n = out_ref.shape
  dtype = w_ref.dtype
  offset = program_id(1) * w_ref.shape[-1]  # this program's share of K: its split
  rows = lax.broadcasted_iota(jnp.int32, (num_rows, 1), 0)
  stats = None if input_norm is None else _row_stats(x_ref, input_norm.kind, input_norm.eps)

  def chunk(start, acc):
    x = x_ref[:, pl.ds(offset + start, block_k)]
    if input_norm is not None:
      normed = _normalize(x.astype(jnp.float32), stats, refs.get("norm_scale"),
                          refs.get("norm_bias"), offset + start, block_k)
      x = normed if norm_from_row == 0 else jnp.where(rows >= norm_from_row, normed,
                                                      x.astype(jnp.float32))
    x = x.astype(dtype)
    w = w_ref[:, pl.ds(start, block_k)]
    if use_dot:
      return acc + _dot_transposed(x, w, precision)
    return acc + x.astype(jnp.float32)[:, None, :] * w.astype(jnp.float32)[None]

  # Without tl.dot the products accumulate elementwise in an (R, block_n, block_k) tile, reduced
  # once at the end rather than once per chunk.
  acc = jnp.zeros((num_rows, block_n) if use_dot else (num_rows, block_n, block_k), jnp.float32)
  num_chunks = w_ref.shape[-1] // block_k
  if pipelined:  # Triton's software pipeline keeps num_stages chunks' loads in flight
    acc = lax.fori_loop(
        0, num_chunks, lambda c, acc: chunk(pl.multiple_of(c * block_k, block_k), acc), acc)
  else:  # unrolled: every chunk's loads in flight at once (at batch 1 a program is latency-bound)
    for c in range(num_chunks):
      acc = chunk(c * block_k, acc)
  if not use_dot:
    acc = jnp.sum(acc, axis=2)
  if split:  # a partial sum: the epilogue comes after the splits are added
    out_ref[...] = acc
  else:
    _store(acc, refs, activation, residual_norm, program_id(0))


def _store(acc, refs, activation, residual_norm, column_block):
  """out = residual_norm(residual) + round(activation(acc + bias)); acc: (R, block_n) float32."""
  out_ref = refs["out"]
  block_n = out_ref.shape[-1]
  if "bias" in refs:
    bias = refs["bias"][...].astype(jnp.float32)
    acc = acc + (bias[None, :] if bias.ndim == 1 else bias)
  if activation == "relu":
    acc = jnp.maximum(acc, 0.0)
  y = acc.astype(refs["weight"].dtype)
  if "residual" in refs:
    residual_ref = refs["residual"]
    if residual_norm is None:
      residual = residual_ref[...].astype(jnp.float32)
    else:
      start = pl.multiple_of(column_block * block_n, block_n)
      residual = _normalize(
          residual_ref[:, pl.ds(start, block_n)].astype(jnp.float32),
          _row_stats(residual_ref, residual_norm.kind, residual_norm.eps),
          refs.get("residual_scale"), refs.get("residual_bias"), start, block_n)
    y = residual + y.astype(jnp.float32)
  out_ref[...] = y.astype(out_ref.dtype)


class _Operands:
  """The pallas_call operands of a grid (N / block_n, split_k, B): the kernel's ref names, arrays,
  specs."""

  def __init__(self):
    self.layout, self.arrays, self.specs = [], [], []

  def add(self, name, array, block_shape, index_map):
    self.layout.append(name)
    self.arrays.append(array)
    self.specs.append(pl.BlockSpec(block_shape, index_map))

  def add_norm(self, prefix, norm, size):
    for name in ("scale", "bias"):
      value = getattr(norm, name)
      if value is not None:
        if value.shape != (size,):
          raise ValueError(f"the {prefix} norm's {name} must have shape ({size},), got "
                           f"{value.shape}")
        self.add(f"{prefix}_{name}", value, (size,), lambda j, s, i: (0,))

  def add_epilogue(self, b, r, n, block_n, bias, residual, residual_norm):
    """The epilogue's operands, checked by _check_epilogue."""
    if bias is not None:
      if bias.ndim == 1:
        self.add("bias", bias, (block_n,), lambda j, s, i: (j,))
      else:
        self.add("bias", bias, (r, block_n), lambda j, s, i: (0, j))
    if residual is None:
      return
    index = _batch_index(residual)
    if residual_norm is None:
      self.add("residual", residual, (None, r, block_n), lambda j, s, i: (index(i), 0, j))
    else:  # its statistics need whole rows
      self.add("residual", residual, (None, r, n), lambda j, s, i: (index(i), 0, 0))
      self.add_norm("residual", residual_norm, n)

  def call(self, body, *, grid, out_shape, out_spec, num_warps, num_stages, interpret, name,
           finish):
    """The KernelCall of body over these operands and one output."""
    return KernelCall(
        kernel=functools.partial(body, layout=tuple(self.layout) + ("out",)), grid=grid,
        in_specs=self.specs, out_specs=[out_spec], out_shape=[out_shape],
        operands=tuple(self.arrays), finish=finish, num_warps=num_warps, num_stages=num_stages,
        name=name, interpret=interpret_default(interpret))


def _check_epilogue(b, r, n, bias, residual, residual_norm):
  """bias (N,) or (R, N) or None; residual (B or 1, R, N) or None; its Norm or None."""
  if bias is not None and bias.shape not in ((n,), (r, n)):
    raise ValueError(f"bias must have shape (N,) = ({n},) or (R, N) = ({r}, {n}), got "
                     f"{bias.shape}")
  if residual_norm is not None and residual is None:
    raise ValueError("residual_norm needs a residual")
  if residual is not None and (residual.ndim != 3 or residual.shape[0] not in (1, b)
                               or residual.shape[1:] != (r, n)):
    raise ValueError(f"residual must have shape (B or 1, R, N) = ({b} or 1, {r}, {n}), got "
                     f"{residual.shape}")


def _batch_index(array):
  """Index map of the batch axis: an array of batch 1 is shared by every batch element."""
  return (lambda i: 0) if array.shape[0] == 1 else (lambda i: i)


def _fit(block, dim):
  """The largest power of two <= block that divides dim (any width runs, in narrower blocks)."""
  block = 1 << (min(block, dim).bit_length() - 1)
  while dim % block:
    block //= 2
  return block


def fused_dense(x, weight, bias=None, *, norm=None, norm_from_row=0, activation=None,
                residual=None, residual_norm=None, blocks=None, interpret=None):
  """act(norm(x) @ weight.T + bias), rounded to weight's dtype, plus an optional (normalised)
  residual: `launch(fused_dense_call(...))`.

  x: (B, R, K), R rows per batch element (a power of two, at most 64); weight: (N, K), a Dense
  kernel transposed so that a program's loads run along contiguous K (at batch 1 the kernel is a
  matrix-vector product bound by how fast its weight rows stream in); its dtype is the compute
  dtype (inputs are rounded to it, products accumulate in float32, as Flax's Dense);
  bias: (N,) or (R, N) (a bias per row) or None.
  norm: a `Norm` over K applied to rows norm_from_row.. of x before the product (the rows before
  it enter as they are), or None.
  activation: None or "relu", after the bias.
  residual: (B or 1, R, N) or None; residual_norm: a `Norm` over N applied to it first, or None.
  Returns (B, R, N): float32 with a residual (the residual stream), else weight's dtype.
  blocks: `Blocks`, None: default_blocks(R, K, N, norm is not None). With split_k > 1 the kernel
  writes float32 partial sums and XLA adds them and applies the bias, activation, rounding and
  residual (the partials are not rounded to the compute dtype first).
  interpret: Pallas interpret mode (default: off on GPU, on elsewhere).
  """
  return launch(fused_dense_call(
      x, weight, bias, norm=norm, norm_from_row=norm_from_row, activation=activation,
      residual=residual, residual_norm=residual_norm, blocks=blocks, interpret=interpret))


def fused_dense_call(x, weight, bias=None, *, norm=None, norm_from_row=0, activation=None,
                     residual=None, residual_norm=None, blocks=None, interpret=None):
  """`fused_dense` as a KernelCall (same arguments; its result is fused_dense's), to launch alone
  or side by side with independent calls."""
  if x.ndim != 3:
    raise ValueError(f"x must have shape (B, R, K), got {x.shape}")
  b, r, k = x.shape
  if weight.ndim != 2 or weight.shape[1] != k:
    raise ValueError(f"weight must have shape (N, K) with K = {k} from x {x.shape}, got "
                     f"{weight.shape}")
  n = weight.shape[0]
  if not checks.is_power_of_two(r) or r > 64:
    raise ValueError(f"x's row count R must be a power of two <= 64, got x of shape {x.shape}")
  block_n, block_k, num_warps, num_stages, split_k = blocks or default_blocks(
      r, k, n, input_norm=norm is not None)
  if not checks.is_power_of_two(split_k) or k % split_k:
    raise ValueError(f"split_k must be a power of two dividing K = {k}, got {split_k}")
  k_split = k // split_k
  block_n = _fit(block_n, n)
  use_dot = min(r, block_n) >= checks.MIN_DOT_DIM
  if not use_dot:  # the elementwise accumulator (R, block_n, block_k) stays within registers
    block_k = min(block_k, max(_TILE_PER_WARP * num_warps // (r * block_n), 1))
  block_k = _fit(block_k, k_split)
  use_dot = use_dot and block_k >= checks.MIN_DOT_DIM
  if activation not in (None, "relu"):
    raise ValueError(f"activation must be None or 'relu', got {activation!r}")
  _check_epilogue(b, r, n, bias, residual, residual_norm)
  operands = _Operands()
  operands.add("x", x, (None, r, k), lambda j, s, i: (i, 0, 0))  # whole rows: the norm's stats
  operands.add("weight", weight, (block_n, k_split), lambda j, s, i: (j, s))
  if norm is not None:
    operands.add_norm("norm", norm, k)
  split = split_k > 1
  if split:  # partial sums (split_k, B, R, N); the epilogue is XLA's, after their sum
    out_shape = jax.ShapeDtypeStruct((split_k, b, r, n), jnp.float32)
    out_spec = pl.BlockSpec((None, None, r, block_n), lambda j, s, i: (s, i, 0, j))
  else:
    operands.add_epilogue(b, r, n, block_n, bias, residual, residual_norm)
    out_shape = jax.ShapeDtypeStruct(
        (b, r, n), jnp.float32 if residual is not None else weight.dtype)
    out_spec = pl.BlockSpec((None, r, block_n), lambda j, s, i: (i, 0, j))
  body = functools.partial(
      _kernel, input_norm=norm, residual_norm=residual_norm, norm_from_row=norm_from_row,
      activation=activation, block_k=block_k, use_dot=use_dot,
      precision=_precision(weight.dtype), pipelined=num_stages is not None, split=split)
  # Named by shape and blocks, so that kernels can be told apart in profiler traces.
  name = f"fused_dense_r{r}_k{k}_n{n}_b{block_n}x{block_k}_w{num_warps}"
  name += "".join(f"_{tag}{value}" for tag, value in (("s", num_stages), ("split", split_k))
                  if value not in (None, 1))
  if split:
    finish = lambda outputs: _epilogue(jnp.sum(outputs[0], axis=0), bias, activation,
                                       weight.dtype, residual, residual_norm)
  else:
    finish = lambda outputs: outputs[0]
  return operands.call(body, grid=(n // block_n, split_k, b), out_shape=out_shape,
                       out_spec=out_spec, num_warps=num_warps, num_stages=num_stages or 1,
                       interpret=interpret, name=name, finish=finish)


def _dot_transposed(a, b, precision):
  """a (M, C) times b (N, C) transposed -> (M, N) float32, on tensor cores."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _precision(dtype):
  # float32 products in full precision (Triton's default for float32 tl.dot is TF32).
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _normalize_rows(y, norm):
  """`Norm` over the last axis of y, in float32 (jnp)."""
  y = y.astype(jnp.float32)
  mean = jnp.mean(y, axis=-1, keepdims=True)
  mean_square = jnp.mean(y * y, axis=-1, keepdims=True)
  if norm.kind == "rms":
    y = y * lax.rsqrt(mean_square + norm.eps)
  else:
    y = (y - mean) * lax.rsqrt(jnp.maximum(mean_square - mean * mean, 0.0) + norm.eps)
  if norm.scale is not None:
    y = y * norm.scale.astype(jnp.float32)
  return y if norm.bias is None else y + norm.bias.astype(jnp.float32)


def _epilogue(y, bias, activation, dtype, residual, residual_norm):
  """residual_norm(residual) + round(activation(y + bias)) for float32 products y (B, R, N)."""
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  if activation == "relu":
    y = jnp.maximum(y, 0.0)
  y = y.astype(dtype)
  if residual is None:
    return y
  residual = (residual.astype(jnp.float32) if residual_norm is None
              else _normalize_rows(residual, residual_norm))
  return residual + y.astype(jnp.float32)


def fused_dense_reference(x, weight, bias=None, *, norm=None, norm_from_row=0, activation=None,
                          residual=None, residual_norm=None):
  """`fused_dense` in plain jnp (same arguments and result, no block sizes)."""
  if norm is not None:
    rows = jnp.arange(x.shape[1])[:, None] >= norm_from_row
    x = jnp.where(rows, _normalize_rows(x, norm), x.astype(jnp.float32))
  y = jnp.einsum("brk,nk->brn", x.astype(weight.dtype), weight, precision="highest",
                 preferred_element_type=jnp.float32)
  return _epilogue(y, bias, activation, weight.dtype, residual, residual_norm)
