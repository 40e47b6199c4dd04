"""One streaming step of a Mamba block (one frame, batch B) as two fused Pallas (Triton) kernels.

`mamba_in_conv`: RMSNorm of the residual stream, in_proj, the causal depthwise conv step and silu,
and this channel block's share of x_proj; `mamba_scan_gate`: dt_proj, softplus, the selective-scan
step and the silu(z) gate. out_proj and the residual add come after them. Both grids are (B, Di /
block_c): one program per block_c channels of one stream, so at batch 1 the weights, not the
arithmetic, bound the time and each weight is read once. x_proj contracts over
all of Di, which one program of the first kernel does not see: each writes its partial product
(B, Di / block_c, P), which XLA sums before the second kernel.
Semantics are those of `clam_jax.ssm.MambaBlock.step` on `nn.RMSNorm(eps, dtype=...)`'s output, as
in `clam_jax.processor.Processor.step`; `mamba_in_conv_reference` / `mamba_scan_gate_reference`
spell them out in jnp.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas import checks
from pallas.kernel_call import KernelCall, interpret_default, launch, without_program_id

# Elements of one broadcast product per loop iteration: about 32 float32 values a thread at 4
# warps, so the (chunk, block_c) weight tiles stay in registers.
_MAX_TILE = 4096
_NUM_STAGES = 1


def _check_block_c(block_c, d_inner):
  if not checks.is_power_of_two(block_c) or d_inner % block_c:
    raise ValueError(f"block_c must be a power of two (Triton tiles have power-of-two sides) "
                     f"dividing Di = {d_inner}, got {block_c}")


def _chunk(n, block_c):
  """The power of two dividing n, at most _MAX_TILE / block_c, by which the kernels walk n."""
  return min(n & -n, max(_MAX_TILE // block_c, 1))


def _silu(x):
  return x * jax.nn.sigmoid(x)


def _softplus(x):
  # log(1 + e^x) without overflow; jax.nn.softplus's logaddexp brings a custom_jvp and isinf checks.
  return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def pack_x_proj(x_kernel, dt_kernel, *, dt_rank, d_state):
  """Lays x_proj and dt_proj out so that the kernels load each part with a power-of-two slice.

  x_kernel: (Di, dt_rank + 2 d_state) (MambaBlock's x_proj kernel); dt_kernel: (dt_rank, Di)
  (dt_proj's). With R the next power of two >= dt_rank and P the next power of two >= R + 2 d_state,
  returns x_packed (Di, P), columns [0:dt_rank] the dt part, [R:R+d_state] B,
  [R+d_state:R+2 d_state] C and zeros elsewhere, and dt_packed (R, Di), rows [0:dt_rank] dt_kernel
  and zeros after, both in their inputs' dtypes. The zero rows of dt_packed meet the zero columns
  of x_packed, so dt_proj's product is unchanged. d_state must be a power of two.
  """
  if not checks.is_power_of_two(d_state):
    raise ValueError(f"d_state must be a power of two, got {d_state}")
  d_inner = x_kernel.shape[0]
  if x_kernel.shape != (d_inner, dt_rank + 2 * d_state):
    raise ValueError(f"x_kernel must have shape (Di, dt_rank + 2 d_state) = "
                     f"(Di, {dt_rank + 2 * d_state}), got {tuple(x_kernel.shape)}")
  if dt_kernel.shape != (dt_rank, d_inner):
    raise ValueError(f"dt_kernel must have shape (dt_rank, Di) = {(dt_rank, d_inner)}, "
                     f"got {tuple(dt_kernel.shape)}")
  r = pl.next_power_of_2(dt_rank)
  p = pl.next_power_of_2(r + 2 * d_state)
  x_packed = jnp.zeros((d_inner, p), x_kernel.dtype)
  x_packed = x_packed.at[:, :dt_rank].set(x_kernel[:, :dt_rank])
  x_packed = x_packed.at[:, r:r + 2 * d_state].set(x_kernel[:, dt_rank:])
  dt_packed = jnp.zeros((r, d_inner), dt_kernel.dtype).at[:dt_rank].set(dt_kernel)
  return x_packed, dt_packed


def _in_conv_kernel(h_ref, scale_ref, wx_ref, wz_ref, conv_ref, conv_kernel_ref, conv_bias_ref,
                    x_packed_ref, u_ref, z_ref, conv_out_ref, partial_ref, *, eps, chunk):
  """Refs: h, scale (D,); wx, wz (bc, D) (in_proj's xs and z rows of this block); conv
  (d_conv - 1, bc); conv_kernel (d_conv, bc); conv_bias (bc,); x_packed (bc, P). Writes u, z (bc,),
  the new conv state (d_conv - 1, bc) and the x_proj partial (P,)."""
  d_model = h_ref.shape[0]
  cdt = wx_ref.dtype
  # The loops over D are unrolled: their loads do not depend on each other, so all of them can be
  # in flight at once, where a fori_loop would wait out the memory latency once per iteration.
  # The RMS statistic needs the whole row before any normalised value exists: a first pass.
  rms_chunk = _chunk(d_model, 1)
  ms = sum(jnp.sum(jnp.square(h_ref[pl.ds(i, rms_chunk)]))
           for i in range(0, d_model, rms_chunk)) / d_model
  # Applied as flax's RMSNorm does: x * (rsqrt(ms + eps) * scale), then rounded.
  inv_rms = lax.rsqrt(ms + eps)
  # The weight rows are contiguous along D (coalesced loads); the products accumulate elementwise
  # in (bc, chunk) tiles, reduced once after the loop rather than once per chunk.
  xs = z = jnp.zeros(wx_ref.shape[:1] + (chunk,), jnp.float32)
  for i in range(0, d_model, chunk):
    rows = pl.ds(i, chunk)
    n = (h_ref[rows] * (inv_rms * scale_ref[rows])).astype(cdt).astype(jnp.float32)
    xs = xs + n[None, :] * wx_ref[:, rows].astype(jnp.float32)
    z = z + n[None, :] * wz_ref[:, rows].astype(jnp.float32)
  xs, z = jnp.sum(xs, axis=1), jnp.sum(z, axis=1)
  z_ref[...] = z.astype(cdt)
  xs = xs.astype(cdt).astype(jnp.float32)  # in_proj's output is in the compute dtype

  # d_conv - 1 is rarely a power of two: the window moves one (bc,) row at a time.
  d_conv = conv_kernel_ref.shape[0]
  window = [conv_ref[k] for k in range(d_conv - 1)] + [xs]
  conv = conv_bias_ref[...]
  for k in range(d_conv):
    conv = conv + window[k] * conv_kernel_ref[k]
  for k in range(d_conv - 1):
    conv_out_ref[k] = window[k + 1]
  u = _silu(conv).astype(cdt)
  u_ref[...] = u
  partial_ref[...] = jnp.sum(u.astype(jnp.float32)[:, None]
                             * x_packed_ref[...].astype(jnp.float32), axis=0)


@functools.partial(jax.jit, static_argnames=("eps", "block_c", "num_warps", "interpret"))
def mamba_in_conv(h, norm_scale, in_weight, conv_state, conv_kernel, conv_bias, x_packed, *, eps,
                  block_c=16, num_warps=8, interpret=None):
  """RMSNorm, in_proj, conv step + silu and the partial x_proj products of one Mamba step:
  `launch(mamba_in_conv_call(...))`.

  h: (B, D) float32 residual stream; norm_scale: (D,) float32 RMSNorm scale; in_weight: (2 Di, D),
  in_proj's kernel transposed (rows contiguous along D: coalesced loads), in the compute dtype
  (bf16 or float32; the compute dtype is in_weight.dtype); conv_state: (B,
  d_conv - 1, Di) float32 (the last d_conv - 1 conv inputs, oldest first); conv_kernel: (d_conv, Di)
  float32; conv_bias: (Di,) float32; x_packed: (Di, P) compute dtype, from `pack_x_proj`.
  Returns u (B, Di) and z (B, Di) in the compute dtype, the new conv state (B, d_conv - 1, Di)
  float32 (written over conv_state's buffer where it is donated), and x_partial (B, Di / block_c,
  P) float32, whose sum over axis 1 is u @ x_packed. block_c: channels per program, a power of two
  dividing Di; num_warps: Triton warps per program (8: 5.5 vs 6.6 us at 4 on an H200, EK100
  layer, stream_kernel_sweep.py); interpret: Pallas interpret mode, None meaning
  off GPU. D is walked in power-of-two chunks dividing it.
  """
  return launch(mamba_in_conv_call(h, norm_scale, in_weight, conv_state, conv_kernel, conv_bias,
                                   x_packed, eps=eps, block_c=block_c, num_warps=num_warps,
                                   interpret=interpret))


def mamba_in_conv_call(h, norm_scale, in_weight, conv_state, conv_kernel, conv_bias, x_packed, *,
                       eps, block_c=16, num_warps=8, interpret=None):
  """`mamba_in_conv` as a KernelCall (same arguments and result)."""
  b, d_model = h.shape
  d_inner = in_weight.shape[0] // 2
  d_conv = conv_kernel.shape[0]
  p = x_packed.shape[1]
  if norm_scale.shape != (d_model,) or in_weight.shape != (2 * d_inner, d_model):
    raise ValueError(f"norm_scale must have shape (D,) and in_weight (2 Di, D) with D = {d_model} "
                     f"from h {tuple(h.shape)}, got {tuple(norm_scale.shape)} and "
                     f"{tuple(in_weight.shape)}")
  if (conv_state.shape != (b, d_conv - 1, d_inner) or conv_kernel.shape != (d_conv, d_inner)
      or conv_bias.shape != (d_inner,)):
    raise ValueError(f"conv_state, conv_kernel, conv_bias must have shapes (B, d_conv - 1, Di), "
                     f"(d_conv, Di), (Di,) = {(b, d_conv - 1, d_inner)}, {(d_conv, d_inner)}, "
                     f"{(d_inner,)}, got {tuple(conv_state.shape)}, {tuple(conv_kernel.shape)}, "
                     f"{tuple(conv_bias.shape)}")
  if x_packed.shape[0] != d_inner or not checks.is_power_of_two(p):
    raise ValueError(f"x_packed must have shape (Di, P) with Di = {d_inner} and P a power of two "
                     f"(see pack_x_proj), got {tuple(x_packed.shape)}")
  _check_block_c(block_c, d_inner)
  num_blocks = d_inner // block_c
  cdt = in_weight.dtype
  row = pl.BlockSpec((None, d_model), lambda i, j: (i, 0))
  vector = pl.BlockSpec((d_model,), lambda i, j: (0,))
  # in_weight goes in twice: its xs rows [c] and its z rows [Di + c].
  wx = pl.BlockSpec((block_c, d_model), lambda i, j: (j, 0))
  wz = pl.BlockSpec((block_c, d_model), lambda i, j: (j + num_blocks, 0))
  conv = pl.BlockSpec((None, d_conv - 1, block_c), lambda i, j: (i, 0, j))
  conv_kernel_spec = pl.BlockSpec((d_conv, block_c), lambda i, j: (0, j))
  channels = pl.BlockSpec((block_c,), lambda i, j: (j,))
  x_packed_spec = pl.BlockSpec((block_c, p), lambda i, j: (j, 0))
  channels_of_row = pl.BlockSpec((None, block_c), lambda i, j: (i, j))
  partial = pl.BlockSpec((None, None, p), lambda i, j: (i, j, 0))
  kernel = functools.partial(_in_conv_kernel, eps=eps, chunk=_chunk(d_model, block_c))
  return KernelCall(
      kernel=without_program_id(kernel),
      grid=(b, num_blocks),
      in_specs=[row, vector, wx, wz, conv, conv_kernel_spec, channels, x_packed_spec],
      out_specs=[channels_of_row, channels_of_row, conv, partial],
      out_shape=[jax.ShapeDtypeStruct((b, d_inner), cdt),
                 jax.ShapeDtypeStruct((b, d_inner), cdt),
                 jax.ShapeDtypeStruct(conv_state.shape, jnp.float32),
                 jax.ShapeDtypeStruct((b, num_blocks, p), jnp.float32)],
      operands=(h.astype(jnp.float32), norm_scale.astype(jnp.float32), in_weight, in_weight,
                conv_state.astype(jnp.float32), conv_kernel.astype(jnp.float32),
                conv_bias.astype(jnp.float32), x_packed.astype(cdt)),
      finish=tuple,
      input_output_aliases={4: 2},
      num_warps=num_warps, num_stages=_NUM_STAGES,
      interpret=interpret_default(interpret),
      name=f"mamba_in_conv_c{block_c}_w{num_warps}")  # blocks: told apart in traces


def _scan_gate_kernel(x_proj_ref, dt_packed_ref, dt_bias_ref, a_ref, d_ref, ssm_ref, u_ref, z_ref,
                      y_ref, ssm_out_ref, *, d_state):
  """Refs: x_proj (P,); dt_packed (R, bc); dt_bias, d, u, z (bc,); a (bc, N); ssm (bc, N). Writes
  y (bc,) and the new ssm state (bc, N)."""
  cdt = dt_packed_ref.dtype
  r = dt_packed_ref.shape[0]

  def x_proj_part(start, size):
    """Columns [start, start + size) of x_proj's output, rounded to cdt."""
    return x_proj_ref[pl.ds(start, size)].astype(cdt).astype(jnp.float32)

  dt = x_proj_part(0, r)
  b_in = x_proj_part(r, d_state)
  c_in = x_proj_part(r + d_state, d_state)
  dt_proj = jnp.sum(dt[:, None] * dt_packed_ref[...].astype(jnp.float32), axis=0)
  delta = _softplus(dt_proj.astype(cdt).astype(jnp.float32) + dt_bias_ref[...])
  u = u_ref[...].astype(jnp.float32)
  h = (jnp.exp(delta[:, None] * a_ref[...]) * ssm_ref[...]
       + (delta * u)[:, None] * b_in[None, :])
  ssm_out_ref[...] = h
  y = jnp.sum(h * c_in[None, :], axis=1) + d_ref[...] * u
  y_ref[...] = (y * _silu(z_ref[...].astype(jnp.float32))).astype(y_ref.dtype)


@functools.partial(jax.jit, static_argnames=("d_state", "block_c", "num_warps", "interpret"))
def mamba_scan_gate(x_proj, dt_packed, dt_bias, A, D, ssm_state, u, z, *, d_state, block_c=16,
                    num_warps=4, interpret=None):
  """dt_proj, softplus, the selective-scan step and the silu(z) gate of a Mamba step:
  `launch(mamba_scan_gate_call(...))`.

  x_proj: (B, P) float32, u @ x_packed: the sum over axis 1 of `mamba_in_conv`'s partials (summed
  once outside: every program needs all of it; in-kernel sums re-read by every program ran 6.1
  against 3.3 + 1.4 us on an H200, EK100 layer); dt_packed: (R, Di) in
  the compute dtype, from `pack_x_proj` (the compute dtype is dt_packed.dtype); dt_bias: (Di,)
  float32; A: (Di, d_state) float32 (-exp(A_log)); D: (Di,) float32; ssm_state: (B, Di, d_state)
  float32; u, z: (B, Di) compute dtype. d_state: a power of two, R + 2 d_state <= P.
  Returns y (B, Di) in the compute dtype (before out_proj) and the new ssm state (B, Di, d_state)
  float32 (written over ssm_state's buffer where it is donated). block_c: channels per program, a
  power of two dividing Di; num_warps: Triton warps per program; interpret: Pallas interpret mode,
  None meaning off GPU.
  """
  return launch(mamba_scan_gate_call(x_proj, dt_packed, dt_bias, A, D, ssm_state, u, z,
                                     d_state=d_state, block_c=block_c, num_warps=num_warps,
                                     interpret=interpret))


def mamba_scan_gate_call(x_proj, dt_packed, dt_bias, A, D, ssm_state, u, z, *, d_state,
                         block_c=16, num_warps=4, interpret=None):
  """`mamba_scan_gate` as a KernelCall (same arguments and result)."""
  b, p = x_proj.shape
  r, d_inner = dt_packed.shape
  if not checks.is_power_of_two(d_state):
    raise ValueError(f"d_state must be a power of two, got {d_state}")
  if not checks.is_power_of_two(r) or not checks.is_power_of_two(p) or r + 2 * d_state > p:
    raise ValueError(f"dt_packed (R, Di) and x_proj (B, P) need powers of two R and P with "
                     f"R + 2 d_state <= P (see pack_x_proj), got {tuple(dt_packed.shape)} and "
                     f"{tuple(x_proj.shape)} with d_state = {d_state}")
  for name, x, shape in (("dt_bias", dt_bias, (d_inner,)), ("A", A, (d_inner, d_state)),
                         ("D", D, (d_inner,)), ("ssm_state", ssm_state, (b, d_inner, d_state)),
                         ("u", u, (b, d_inner)), ("z", z, (b, d_inner))):
    if x.shape != shape:
      raise ValueError(f"{name} must have shape {shape} (Di = {d_inner} from dt_packed, B = {b} "
                       f"from x_proj), got {tuple(x.shape)}")
  _check_block_c(block_c, d_inner)
  cdt = dt_packed.dtype
  x_proj_spec = pl.BlockSpec((None, p), lambda i, j: (i, 0))
  dt_packed_spec = pl.BlockSpec((r, block_c), lambda i, j: (0, j))
  channels = pl.BlockSpec((block_c,), lambda i, j: (j,))
  a_spec = pl.BlockSpec((block_c, d_state), lambda i, j: (j, 0))
  state = pl.BlockSpec((None, block_c, d_state), lambda i, j: (i, j, 0))
  channels_of_row = pl.BlockSpec((None, block_c), lambda i, j: (i, j))
  kernel = functools.partial(_scan_gate_kernel, d_state=d_state)
  return KernelCall(
      kernel=without_program_id(kernel),
      grid=(b, d_inner // block_c),
      in_specs=[x_proj_spec, dt_packed_spec, channels, a_spec, channels, state, channels_of_row,
                channels_of_row],
      out_specs=[channels_of_row, state],
      out_shape=[jax.ShapeDtypeStruct((b, d_inner), cdt),
                 jax.ShapeDtypeStruct(ssm_state.shape, jnp.float32)],
      operands=(x_proj.astype(jnp.float32), dt_packed, dt_bias.astype(jnp.float32),
                A.astype(jnp.float32), D.astype(jnp.float32), ssm_state.astype(jnp.float32),
                u.astype(cdt), z.astype(cdt)),
      finish=tuple,
      input_output_aliases={5: 1},
      num_warps=num_warps, num_stages=_NUM_STAGES,
      interpret=interpret_default(interpret),
      name=f"mamba_scan_gate_c{block_c}_w{num_warps}")


def mamba_in_conv_reference(h, norm_scale, in_weight, conv_state, conv_kernel, conv_bias,
                            x_packed, *, eps):
  """`mamba_in_conv` in jnp. x_partial comes as one block, (B, 1, P): the whole u @ x_packed."""
  cdt = in_weight.dtype
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  dot = lambda a, b: jnp.dot(a, b, precision="highest", preferred_element_type=jnp.float32)
  h = f32(h)
  ms = jnp.mean(h * h, axis=-1, keepdims=True)
  n = (h * (lax.rsqrt(ms + eps) * f32(norm_scale))).astype(cdt)
  xs, z = jnp.split(dot(n, in_weight.T).astype(cdt), 2, axis=-1)
  window = jnp.concatenate([f32(conv_state), f32(xs)[:, None]], axis=1)
  u = jax.nn.silu(jnp.sum(window * f32(conv_kernel), axis=1) + f32(conv_bias)).astype(cdt)
  return u, z, window[:, 1:], dot(u, x_packed.astype(cdt))[:, None]


def mamba_scan_gate_reference(x_proj, dt_packed, dt_bias, A, D, ssm_state, u, z, *, d_state):
  """`mamba_scan_gate` in jnp."""
  cdt = dt_packed.dtype
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  r = dt_packed.shape[0]
  x_dbl = f32(f32(x_proj).astype(cdt))
  dt, b_in, c_in = x_dbl[:, :r], x_dbl[:, r:r + d_state], x_dbl[:, r + d_state:r + 2 * d_state]
  dt_proj = jnp.dot(dt.astype(cdt), dt_packed, precision="highest",
                    preferred_element_type=jnp.float32).astype(cdt)
  delta = jax.nn.softplus(f32(dt_proj) + f32(dt_bias))
  u32 = f32(u)
  h = jnp.exp(delta[..., None] * f32(A)) * f32(ssm_state) + (delta * u32)[..., None] * b_in[:, None]
  y = jnp.einsum("bdn,bn->bd", h, c_in, precision="highest") + f32(D) * u32
  return (y * jax.nn.silu(f32(z))).astype(cdt), h
