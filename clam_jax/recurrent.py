"""GRU and LSTM sequence layers (the processor's alternatives to Mamba), built on Flax's cells.

The carry is float32 whatever the compute dtype, so a bfloat16 layer keeps a fixed-type state.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_CELLS = {"gru": nn.GRUCell, "lstm": nn.OptimizedLSTMCell}


def init_recurrent_carry(cell_type, batch_size, features):
  """Zero carry: "gru" -> h (batch_size, features); "lstm" -> (c, h), each (batch_size, features).

  All float32.
  """
  h = jnp.zeros((batch_size, features), jnp.float32)
  return (h, h) if cell_type == "lstm" else h


def _hidden(cell_type, carry):
  return carry[1] if cell_type == "lstm" else carry


class RecurrentLayer(nn.Module):
  """A GRU or LSTM over time; input (Bt, T, features) -> hidden states (Bt, T, features)."""
  cell_type: str  # "gru" | "lstm"
  features: int
  dtype: Any = jnp.float32

  def setup(self):
    self.cell = _CELLS[self.cell_type](features=self.features, dtype=self.dtype, name="cell")

  def _advance(self, cell, carry, x_t):
    new_carry, _ = cell(carry, x_t)
    return jax.tree.map(lambda c: c.astype(jnp.float32), new_carry)

  def __call__(self, x, mask):
    """x: (Bt, T, features); mask: (Bt, T) bool (False = padding: the carry is kept as it was).

    Returns (Bt, T, features) in the layer's dtype; a padding frame repeats the previous hidden state.
    """

    def body(cell, carry, inputs):
      x_t, m_t = inputs
      new_carry = self._advance(cell, carry, x_t)
      carry = jax.tree.map(lambda n, o: jnp.where(m_t[:, None], n, o), new_carry, carry)
      return carry, _hidden(self.cell_type, carry)

    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=1, out_axes=1)
    carry = init_recurrent_carry(self.cell_type, x.shape[0], self.features)
    _, h = scan(self.cell, carry, (x, mask))
    return h.astype(self.dtype)

  def step(self, carry, x_t):
    """carry: `init_recurrent_carry`'s pytree; x_t: (Bt, features).

    Returns (carry, y_t: (Bt, features)).
    """
    carry = self._advance(self.cell, carry, x_t)
    return carry, _hidden(self.cell_type, carry).astype(self.dtype)
