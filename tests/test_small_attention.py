"""pallas.small_attention (Pallas interpret mode) against its reference, with one query (elementwise
logits) and 16 (tl.dot), shared queries, column blocks of merged projections and masks; the
reference against Flax's MultiHeadDotProductAttention."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas.small_attention import small_attention, small_attention_reference
from helpers import rel_err


@pytest.mark.parametrize("b, q, keys, d, heads, dtype", [
    (2, 1, 32, 64, 4, np.float32),    # one query: elementwise logits
    (2, 16, 16, 64, 2, np.float32),   # tl.dot path
    (1, 1, 8, 64, 4, jnp.bfloat16),
    (2, 16, 16, 128, 4, jnp.bfloat16),
])
def test_small_attention_matches_reference(b, q, keys, d, heads, dtype):
  rng = np.random.default_rng()
  queries = jnp.asarray(rng.standard_normal((1, q, 3 * d)), dtype)  # shared by the batch
  keys_values = jnp.asarray(rng.standard_normal((b, keys, 4 * d)), dtype)
  mask = jnp.asarray(rng.random((b, keys)) < 0.6).at[:, -1].set(True)
  tolerance = 1e-5 if dtype == np.float32 else 1.5e-2
  for kwargs in (dict(column_blocks=(0, 0, 1)), dict(column_blocks=(2, 1, 3), mask=mask)):
    out = small_attention(queries, keys_values, keys_values, num_heads=heads, width=d,
                          interpret=True, **kwargs)
    ref = small_attention_reference(queries, keys_values, keys_values, num_heads=heads, width=d,
                                    **kwargs)
    assert out.shape == (b, q, d) and out.dtype == dtype
    assert rel_err(out, ref) <= tolerance, sorted(kwargs)


def test_small_attention_reference_is_flax_attention():
  """Against Flax's MultiHeadDotProductAttention (float32) on the same projections, then its
  output projection."""
  rng = np.random.default_rng()
  d, heads = 32, 4
  attention = nn.MultiHeadDotProductAttention(heads, precision="highest")
  tokens = jnp.asarray(rng.standard_normal((2, 8, d)), jnp.float32)
  mask = jnp.asarray(rng.random((2, 8)) < 0.7).at[:, 0].set(True)
  params = attention.init(jax.random.key(0), tokens, tokens)["params"]
  params = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
  expected = attention.apply({"params": params}, tokens, tokens, mask=mask[:, None, None, :])
  project = lambda name: (jnp.einsum("btd,dhk->bthk", tokens, params[name]["kernel"])
                          + params[name]["bias"]).reshape(2, 8, d)
  o = small_attention_reference(project("query"), project("key"), project("value"),
                                num_heads=heads, width=d, mask=mask)
  out = jnp.einsum("btd,de->bte", o, params["out"]["kernel"].reshape(d, d),
                   precision="highest") + params["out"]["bias"]
  assert rel_err(out, expected) <= 1e-5


def test_bad_arguments_name_what_is_wrong():
  with pytest.raises(ValueError, match="column block 3"):
    small_attention(jnp.ones((1, 1, 8)), jnp.ones((1, 4, 16)), jnp.ones((1, 4, 16)),
                    num_heads=2, width=8, column_blocks=(0, 3, 1), interpret=True)
  with pytest.raises(ValueError, match="K = 3"):
    small_attention(jnp.ones((1, 1, 8)), jnp.ones((1, 3, 8)), jnp.ones((1, 3, 8)),
                    num_heads=2, width=8, interpret=True)
