"""pallas.fused_dense's kernels (Pallas interpret mode) against their jnp references, at row counts
that take both the elementwise and the tl.dot paths, widths that are not multiples of the blocks,
row-wise and per-row biases, partial-row norms and normalised residuals; the references against
float64 arithmetic and Flax's own LayerNorm / RMSNorm / attention."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas.fused_dense import (Norm, attention_dense, attention_dense_reference, fused_dense,
                                fused_dense_reference)
from helpers import rel_err


def _norm(rng, kind, size, affine=True):
  if not affine:
    return Norm(kind, eps=1e-5)
  return Norm(kind, jnp.asarray(rng.standard_normal(size), jnp.float32),
              None if kind == "rms" else jnp.asarray(rng.standard_normal(size), jnp.float32), 1e-5)


@pytest.mark.parametrize("b, r, k, n, dtype", [
    (1, 1, 96, 48, np.float32),      # K and N not multiples of the blocks: narrower blocks
    (3, 2, 64, 128, np.float32),
    (2, 16, 64, 128, np.float32),    # tl.dot path
    (1, 2, 128, 192, jnp.bfloat16),
    (2, 32, 64, 64, jnp.bfloat16),
])
def test_fused_dense_matches_reference(b, r, k, n, dtype):
  rng = np.random.default_rng()
  x = jnp.asarray(2 * rng.standard_normal((b, r, k)) + 0.5, jnp.float32)
  weight = jnp.asarray(rng.standard_normal((n, k)) / np.sqrt(k), dtype)
  bias_rows = jnp.asarray(rng.standard_normal((r, n)), dtype)
  residual = jnp.asarray(rng.standard_normal((1, r, n)), jnp.float32)
  tolerance = 1e-5 if dtype == np.float32 else 1e-2
  for kwargs in (
      {},
      dict(bias=bias_rows[0], norm=_norm(rng, "layer", k), activation="relu"),
      dict(bias=bias_rows, norm=_norm(rng, "rms", k), norm_from_row=r // 2, residual=residual,
           residual_norm=_norm(rng, "layer", n)),
      dict(norm=_norm(rng, "layer", k, affine=False),
           residual=jnp.broadcast_to(residual, (b, r, n))),
  ):
    out = fused_dense(x, weight, block_n=32, block_k=32, interpret=True, **kwargs)
    ref = fused_dense_reference(x, weight, **kwargs)
    assert out.dtype == ref.dtype == (jnp.float32 if "residual" in kwargs else dtype)
    assert rel_err(out, ref) <= tolerance, sorted(kwargs)


def test_fused_dense_reference_is_flax_norm_dense_residual():
  """The reference in float64 terms: Flax's LayerNorm / RMSNorm, a float64 product, the residual."""
  rng = np.random.default_rng()
  x = rng.standard_normal((2, 4, 32)) + 1.0
  kernel, bias = rng.standard_normal((32, 16)), rng.standard_normal(16)
  residual = rng.standard_normal((2, 4, 16))
  scale, shift = rng.standard_normal(32), rng.standard_normal(32)
  layer = nn.LayerNorm(epsilon=1e-5).apply({"params": {"scale": scale, "bias": shift}},
                                           jnp.asarray(x, jnp.float32))
  rms = nn.RMSNorm(epsilon=1e-5).apply({"params": {"scale": scale}}, jnp.asarray(x, jnp.float32))
  for kind, normed, norm in (("layer", layer, Norm("layer", scale, shift, 1e-5)),
                             ("rms", rms, Norm("rms", scale, None, 1e-5))):
    expected = residual + np.maximum(np.asarray(normed, np.float64) @ kernel + bias, 0)
    out = fused_dense_reference(jnp.asarray(x, jnp.float32), jnp.asarray(kernel.T, jnp.float32),
                                jnp.asarray(bias, jnp.float32), norm=norm, activation="relu",
                                residual=jnp.asarray(residual, jnp.float32))
    assert rel_err(out, expected) <= 1e-5, kind


@pytest.mark.parametrize("b, q, keys, d, heads, dtype", [
    (2, 1, 32, 64, 4, np.float32),    # one query: elementwise logits
    (2, 16, 16, 64, 2, np.float32),   # tl.dot path
    (1, 1, 8, 64, 4, jnp.bfloat16),
    (2, 16, 16, 128, 4, jnp.bfloat16),
])
def test_attention_dense_matches_reference(b, q, keys, d, heads, dtype):
  rng = np.random.default_rng()
  queries = jnp.asarray(rng.standard_normal((1, q, 3 * d)), dtype)  # shared by the batch
  keys_values = jnp.asarray(rng.standard_normal((b, keys, 4 * d)), dtype)
  weight = jnp.asarray(rng.standard_normal((96, d)) / np.sqrt(d), dtype)
  mask = jnp.asarray(rng.random((b, keys)) < 0.6).at[:, -1].set(True)
  tolerance = 1e-5 if dtype == np.float32 else 1.5e-2
  for kwargs in (
      dict(column_blocks=(0, 0, 1)),
      dict(column_blocks=(2, 1, 3), mask=mask, bias=jnp.asarray(rng.standard_normal(96), dtype),
           residual=jnp.asarray(rng.standard_normal((b, q, 96)), jnp.float32),
           residual_norm=_norm(rng, "layer", 96)),
  ):
    out = attention_dense(queries, keys_values, keys_values, weight, num_heads=heads,
                          interpret=True, **kwargs)
    ref = attention_dense_reference(queries, keys_values, keys_values, weight, num_heads=heads,
                                    **kwargs)
    assert out.shape == (b, q, 96)
    assert rel_err(out, ref) <= tolerance, sorted(kwargs)


def test_attention_dense_reference_is_flax_attention():
  """Against Flax's MultiHeadDotProductAttention (float32) with the same projections."""
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
  out = attention_dense_reference(project("query"), project("key"), project("value"),
                                  params["out"]["kernel"].reshape(d, d).T, params["out"]["bias"],
                                  num_heads=heads, mask=mask)
  assert rel_err(out, expected) <= 1e-5


def test_bad_arguments_name_what_is_wrong():
  x, weight = jnp.ones((1, 3, 8)), jnp.ones((16, 8))
  with pytest.raises(ValueError, match="power of two"):
    fused_dense(x, weight, interpret=True)
  with pytest.raises(ValueError, match="K = 4"):
    fused_dense(jnp.ones((1, 2, 4)), weight, interpret=True)
  with pytest.raises(ValueError, match="residual must have shape"):
    fused_dense(jnp.ones((1, 2, 8)), weight, residual=jnp.ones((1, 2, 8)), interpret=True)
  with pytest.raises(ValueError, match="column block 3"):
    attention_dense(jnp.ones((1, 1, 8)), jnp.ones((1, 4, 16)), jnp.ones((1, 4, 16)), weight,
                    num_heads=2, column_blocks=(0, 3, 1), interpret=True)
