"""The temporal processor: a stack of causal sequence layers whose per-frame outputs are the act-tokens.

As querymamba's encoder (mamba_ssm's MixerModel with rms_norm=True): processor_layers layers, each
x <- x + layer(RMSNorm(x)), then a final RMSNorm. The layer is a Mamba block ("mamba"), a GRU ("gru")
or an LSTM ("lstm"). The residual stream is float32; the output is in config.dtype.
(choice) Dropout at config.dropout on each layer's output before the residual add; querymamba has none
inside its stack, only on the projected input.

Full sequence (training):  y = Processor(config).apply(variables, x, mask, train=...)
Streaming, O(1) per frame: carry = init_processor_carry(config, batch_size)
                           carry, y_t = module.apply(variables, carry, x_t, method=Processor.step)
"""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from clam_jax import recurrent
from clam_jax import ssm

PROCESSORS = ("mamba", "gru", "lstm")
NORM_EPS = 1e-5  # mamba_ssm's norm_epsilon


def check_processor_config(config):
  """Raises ValueError naming config.model.processor if it is not one of PROCESSORS."""
  if config.processor not in PROCESSORS:
    raise ValueError(f"config.model.processor: expected one of {PROCESSORS}, found {config.processor!r}")


def init_processor_carry(config, batch_size):
  """Zero streaming state: a tuple with one carry per layer, all float32 and of fixed size.

  mamba: {"conv": (batch_size, d_conv - 1, expand * d_model), "ssm": (batch_size, expand * d_model,
  d_state)}; gru: h (batch_size, d_model); lstm: (c, h), each (batch_size, d_model).
  """
  check_processor_config(config)
  if config.processor == "mamba":
    make = lambda: ssm.init_mamba_carry(batch_size, config.d_model, d_state=config.ssm.d_state,
                                        d_conv=config.ssm.d_conv, expand=config.ssm.expand)
  else:
    make = lambda: recurrent.init_recurrent_carry(config.processor, batch_size, config.d_model)
  return tuple(make() for _ in range(config.processor_layers))


class Processor(nn.Module):
  """Causal stack over projected frames: (B, T, d_model) -> act-tokens (B, T, d_model)."""
  config: ml_collections.ConfigDict

  def setup(self):
    config = self.config
    check_processor_config(config)
    dtype = jnp.dtype(config.dtype)
    if config.processor == "mamba":
      make = lambda i: ssm.MambaBlock(
          config.d_model, d_state=config.ssm.d_state, d_conv=config.ssm.d_conv,
          expand=config.ssm.expand, num_layers=config.processor_layers, dtype=dtype,
          scan_impl=config.scan_impl, name=f"layer_{i}")
    else:
      make = lambda i: recurrent.RecurrentLayer(config.processor, config.d_model, dtype=dtype,
                                                name=f"layer_{i}")
    self.layers = [make(i) for i in range(config.processor_layers)]
    self.norms = [nn.RMSNorm(NORM_EPS, dtype=dtype, name=f"norm_{i}")
                  for i in range(config.processor_layers)]
    self.final_norm = nn.RMSNorm(NORM_EPS, dtype=dtype)
    self.dropout = nn.Dropout(config.dropout)

  def __call__(self, x, mask, *, train):
    """x: (B, T, d_model); mask: (B, T) bool (True = real frame; padding leaves every state as it was).

    Returns (B, T, d_model) in config.dtype; y_t depends on x_1..x_t only. Needs a "dropout" rng when
    train and config.dropout > 0.
    """
    h = x.astype(jnp.float32)
    for norm, layer in zip(self.norms, self.layers):
      h = h + self.dropout(layer(norm(h), mask), deterministic=not train)
    return self.final_norm(h)

  def step(self, carry, x_t):
    """One frame for every stream: carry from `init_processor_carry`, x_t: (B, d_model).

    Returns (carry, y_t: (B, d_model)); equals __call__'s output at the same frame (no dropout).
    """
    h = x_t.astype(jnp.float32)
    new_carry = []
    for norm, layer, layer_carry in zip(self.norms, self.layers, carry):
      layer_carry, y = layer.step(layer_carry, norm(h))
      h = h + y
      new_carry.append(layer_carry)
    return tuple(new_carry), self.final_norm(h)
