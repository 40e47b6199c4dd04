"""The selective state-space model (Mamba's S6) in pure JAX: the scan and the Mamba block.

Semantics follow mamba_ssm (`selective_scan_ref`, `Mamba` in mamba_simple.py), batch-major:
  h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,   y_t = (C_t h_t + D u_t) * silu(z_t),
with A diagonal per channel (A: (D_inner, d_state)) and B_t, C_t shared by all channels. The scan state,
exp and softplus are always float32; matmuls run in the block's dtype.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas.selective_scan import selective_scan_pallas

# As pallas.gla's implementations: "reference" is the associative scan below; "recurrent" and
# "chunked" (the memory's kernel choices) both mean the Pallas kernels of pallas/selective_scan.py,
# which "auto" takes on GPU.
SCAN_IMPLEMENTATIONS = ("auto", "reference", "recurrent", "chunked")

# PyTorch's nn.Linear / nn.Conv1d default (kaiming_uniform(a=sqrt(5))), which mamba_ssm keeps.
_torch_default_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def selective_scan(u, delta, A, B, C, D, z=None, h0=None, return_final_state=False,
                   implementation="reference"):
  """The selective scan over a whole sequence.

  u, delta: (Bt, T, Di) (delta >= 0, already through softplus); A: (Di, N) (negative); B, C: (Bt, T, N);
  D: (Di,); z: (Bt, T, Di) or None (no gate); h0: (Bt, Di, N) or None (zeros).
  Returns y: (Bt, T, Di) in u's dtype, and h_T: (Bt, Di, N) float32 if return_final_state.
  implementation (SCAN_IMPLEMENTATIONS): "reference", jax.lax.associative_scan (O(log T) depth),
  materialises every state, (Bt, T, Di, N) float32, during the forward pass, and its backward pass
  recomputes them rather than keeping them (jax.checkpoint), so a stack of blocks saves per block only
  the scan's (Bt, T, Di)-sized inputs; "recurrent" / "chunked", the Pallas kernels, keep the states on
  chip (interpret mode off GPU); "auto", the kernels on GPU and the reference elsewhere.
  """
  if implementation not in SCAN_IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {SCAN_IMPLEMENTATIONS}, got {implementation!r}")
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  on_gpu = jax.default_backend() == "gpu"
  if implementation == "auto":
    implementation = "recurrent" if on_gpu else "reference"
  if implementation != "reference":  # the kernels compute in float32 whatever the input dtypes
    y, h_last = selective_scan_pallas(u, delta, f32(A), B, C, h0, interpret=not on_gpu)
    return _skip_and_gate(y, h_last, u, D, z, return_final_state)
  u32, delta = f32(u), f32(delta)
  h0 = jnp.zeros(u.shape[:1] + A.shape, jnp.float32) if h0 is None else f32(h0)

  @jax.checkpoint
  def scan(u32, delta, A, B, C, h0):
    decay = jnp.exp(delta[..., None] * A)
    inputs = (delta * u32)[..., None] * B[:, :, None, :]
    inputs = inputs.at[:, 0].add(decay[:, 0] * h0)

    def combine(left, right):
      a_l, b_l = left
      a_r, b_r = right
      return a_l * a_r, a_r * b_l + b_r

    _, h = jax.lax.associative_scan(combine, (decay, inputs), axis=1)
    return jnp.einsum("btdn,btn->btd", h, C, precision="highest"), h[:, -1]

  y, h_last = scan(u32, delta, f32(A), f32(B), f32(C), h0)
  return _skip_and_gate(y, h_last, u, D, z, return_final_state)


def _skip_and_gate(y, h_last, u, D, z, return_final_state):
  """(y_t = C_t h_t: (Bt, T, Di) float32) -> (y_t + D u_t) * silu(z_t) in u's dtype, with h_T if asked."""
  y = y + jnp.asarray(D, jnp.float32) * jnp.asarray(u, jnp.float32)
  if z is not None:
    y = y * jax.nn.silu(jnp.asarray(z, jnp.float32))
  y = y.astype(u.dtype)
  return (y, h_last) if return_final_state else y


def selective_scan_step(h, u, delta, A, B, C, D, z=None):
  """One step of `selective_scan`.

  h: (Bt, Di, N) float32; u, delta: (Bt, Di); A: (Di, N); B, C: (Bt, N); D: (Di,); z: (Bt, Di) or None.
  Returns (h_t: (Bt, Di, N) float32, y_t: (Bt, Di) in u's dtype).
  """
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  u32, delta = f32(u), f32(delta)
  h = jnp.exp(delta[..., None] * f32(A)) * f32(h) + (delta * u32)[..., None] * f32(B)[:, None, :]
  y = jnp.einsum("bdn,bn->bd", h, f32(C), precision="highest") + f32(D) * u32
  if z is not None:
    y = y * jax.nn.silu(f32(z))
  return h, y.astype(u.dtype)


def mamba_dims(d_model, expand):
  """(d_inner, dt_rank) of a Mamba block, as mamba_ssm: expand * d_model and ceil(d_model / 16)."""
  return expand * d_model, math.ceil(d_model / 16)


def init_mamba_carry(batch_size, d_model, *, d_state, d_conv, expand):
  """Zero streaming state of one Mamba block.

  Returns {"conv": (batch_size, d_conv - 1, Di) float32 (the last d_conv - 1 conv inputs, oldest first),
           "ssm": (batch_size, Di, d_state) float32}.
  """
  d_inner, _ = mamba_dims(d_model, expand)
  return {"conv": jnp.zeros((batch_size, d_conv - 1, d_inner), jnp.float32),
          "ssm": jnp.zeros((batch_size, d_inner, d_state), jnp.float32)}


def _symmetric_uniform(bound):
  """Initializer drawing uniformly from [-bound, bound)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _dt_bias_init(dt_min=1e-3, dt_max=0.1, dt_floor=1e-4):
  """mamba_ssm's dt bias: softplus(bias) log-uniform in [dt_min, dt_max], floored at dt_floor."""

  def init(key, shape, dtype=jnp.float32):
    log_dt = jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max))
    dt = jnp.maximum(jnp.exp(log_dt), dt_floor)
    return dt + jnp.log(-jnp.expm1(-dt))  # inverse of softplus

  return init


def _s4d_real_init(key, shape, dtype=jnp.float32):
  """A_log with A = -(1, 2, ..., N) in every channel (S4D-real); shape (Di, N)."""
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=dtype)), shape)


class MambaBlock(nn.Module):
  """A Mamba (S6) mixer: in_proj -> causal depthwise conv + silu -> selective scan gated by silu(z)
  -> out_proj. Input and output (Bt, T, d_model).

  num_layers rescales out_proj's init by 1/sqrt(num_layers), as mamba_ssm's `_init_weights` does for
  the residual branches of a stack of that depth.
  """
  d_model: int
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  num_layers: int = 1
  dtype: Any = jnp.float32
  scan_impl: str = "auto"  # selective_scan's implementation

  def setup(self):
    d_inner, dt_rank = mamba_dims(self.d_model, self.expand)
    dense = lambda features, name, init=_torch_default_init: nn.Dense(
        features, use_bias=False, dtype=self.dtype, kernel_init=init, name=name)
    self.in_proj = dense(2 * d_inner, "in_proj")
    self.conv_kernel = self.param("conv_kernel", _torch_default_init, (self.d_conv, d_inner))
    self.conv_bias = self.param("conv_bias", _symmetric_uniform(self.d_conv ** -0.5), (d_inner,))
    self.x_proj = dense(dt_rank + 2 * self.d_state, "x_proj")
    self.dt_proj = dense(d_inner, "dt_proj", _symmetric_uniform(dt_rank ** -0.5))
    # Added in float32 before the softplus, as mamba_ssm's kernels take delta_bias.
    self.dt_bias = self.param("dt_bias", _dt_bias_init(), (d_inner,))
    self.A_log = self.param("A_log", _s4d_real_init, (d_inner, self.d_state))
    self.D = self.param("D", nn.initializers.ones, (d_inner,))
    self.out_proj = dense(self.d_model, "out_proj", nn.initializers.variance_scaling(
        1 / (3 * self.num_layers), "fan_in", "uniform"))

  def _ssm_inputs(self, u):
    """u: (..., Di) -> (delta (..., Di) float32, B (..., N), C (..., N))."""
    _, dt_rank = mamba_dims(self.d_model, self.expand)
    dt, B, C = jnp.split(self.x_proj(u), [dt_rank, dt_rank + self.d_state], axis=-1)
    delta = jax.nn.softplus(self.dt_proj(dt).astype(jnp.float32) + self.dt_bias)
    return delta, B, C

  def __call__(self, x, mask):
    """x: (Bt, T, d_model); mask: (Bt, T) bool (False = padding). Returns (Bt, T, d_model).

    Padding frames leave the state untouched: the conv sees zeros there and delta is 0
    (exp(0 A) = 1, 0 B u = 0). For left padding this equals running the unpadded sequence; a padding
    frame between real frames still shifts a zero into the conv window.
    """
    xs, z = jnp.split(self.in_proj(x), 2, axis=-1)
    xs = jnp.where(mask[..., None], xs, 0).astype(jnp.float32)
    t = xs.shape[1]
    padded = jnp.pad(xs, ((0, 0), (self.d_conv - 1, 0), (0, 0)))
    conv = sum(self.conv_kernel[k] * padded[:, k:k + t] for k in range(self.d_conv))
    u = jax.nn.silu(conv + self.conv_bias).astype(self.dtype)
    delta, B, C = self._ssm_inputs(u)
    delta = jnp.where(mask[..., None], delta, 0)
    y = selective_scan(u, delta, -jnp.exp(self.A_log), B, C, self.D, z,
                       implementation=self.scan_impl)
    return self.out_proj(y)

  def step(self, carry, x_t):
    """carry: `init_mamba_carry`'s pytree; x_t: (Bt, d_model). Returns (carry, y_t: (Bt, d_model))."""
    xs, z = jnp.split(self.in_proj(x_t), 2, axis=-1)
    window = jnp.concatenate([carry["conv"], xs.astype(jnp.float32)[:, None]], axis=1)
    u = jax.nn.silu(jnp.sum(window * self.conv_kernel, axis=1) + self.conv_bias).astype(self.dtype)
    delta, B, C = self._ssm_inputs(u)
    h, y = selective_scan_step(carry["ssm"], u, delta, -jnp.exp(self.A_log), B, C, self.D, z)
    return {"conv": window[:, 1:], "ssm": h}, self.out_proj(y)

