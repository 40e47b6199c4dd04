"""pallas.fused_dense (Pallas interpret mode) against its jnp reference, at row counts taking both
the elementwise and the tl.dot paths, the K loop unrolled and pipelined, K split over programs,
widths that are not multiples of the blocks (default blocks too), row-wise and per-row biases,
partial-row norms and normalised residuals; the reference against float64 arithmetic and Flax's
own LayerNorm / RMSNorm."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from pallas.fused_dense import Blocks, Norm, fused_dense, fused_dense_reference
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
# The K loop unrolled / pipelined, whole rows / K split over programs.
@pytest.mark.parametrize("num_stages, split_k", [(None, 1), (2, 1), (None, 2)])
def test_fused_dense_matches_reference(b, r, k, n, dtype, num_stages, split_k):
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
    out = fused_dense(x, weight, blocks=Blocks(32, 32, 4, num_stages, split_k), interpret=True,
                      **kwargs)
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


@pytest.mark.parametrize("r, k, n", [(1, 48, 40), (16, 30, 40), (16, 128, 32), (32, 6, 16)])
def test_default_blocks_fit_any_width(r, k, n):
  """default_blocks at widths that are not multiples of its blocks (K split only where each
  quarter is a multiple of 16): the same product as the reference."""
  rng = np.random.default_rng()
  x = jnp.asarray(rng.standard_normal((1, r, k)), jnp.float32)
  weight = jnp.asarray(rng.standard_normal((n, k)) / np.sqrt(k), jnp.float32)
  residual = jnp.asarray(rng.standard_normal((1, r, n)), jnp.float32)
  kwargs = dict(norm=_norm(rng, "layer", k), residual=residual, residual_norm=_norm(rng, "rms", n))
  out = fused_dense(x, weight, interpret=True, **kwargs)
  assert rel_err(out, fused_dense_reference(x, weight, **kwargs)) <= 1e-5


def test_bad_arguments_name_what_is_wrong():
  x, weight = jnp.ones((1, 3, 8)), jnp.ones((16, 8))
  with pytest.raises(ValueError, match="power of two"):
    fused_dense(x, weight, interpret=True)
  with pytest.raises(ValueError, match="K = 4"):
    fused_dense(jnp.ones((1, 2, 4)), weight, interpret=True)
  with pytest.raises(ValueError, match="residual must have shape"):
    fused_dense(jnp.ones((1, 2, 8)), weight, residual=jnp.ones((1, 2, 8)), interpret=True)
  with pytest.raises(ValueError, match="split_k must be a power of two dividing K = 8"):
    fused_dense(jnp.ones((1, 2, 8)), weight, blocks=Blocks(split_k=3), interpret=True)
  with pytest.raises(ValueError, match="residual must have shape"):  # also when K is split
    fused_dense(jnp.ones((1, 2, 8)), weight, residual=jnp.ones((1, 2, 8)),
                blocks=Blocks(split_k=2), interpret=True)
