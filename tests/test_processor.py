"""The processor stack: full sequence == streaming steps, masking, causality, fixed-size carry,
dtypes."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clam_jax.processor import Processor, init_processor_carry

D_MODEL = 24
B, T = 3, 11  # one shape for every full-sequence call: one compilation per model
KINDS = ("mamba", "gru", "lstm")


def _config(processor, dtype="float32", dropout=0.1):
  return ml_collections.ConfigDict(dict(
      d_model=D_MODEL, processor=processor, processor_layers=2, dtype=dtype, dropout=dropout,
      ssm=dict(d_state=5, d_conv=4, expand=2), scan_impl="auto"))


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


@functools.cache
def _variables(processor):
  """Parameters of the float32 model; the bfloat16 model uses the same ones (params are float32)."""
  init = jax.jit(functools.partial(Processor(_config(processor)).init, train=False))
  return init(jax.random.key(7), jnp.zeros((1, 1, D_MODEL)), jnp.ones((1, 1), bool))


@functools.cache
def _model(processor, dtype="float32"):
  """(module, variables, jitted forward(x, mask), jitted stream(carry, x) -> (ys, carry))."""
  module, variables = Processor(_config(processor, dtype)), _variables(processor)
  forward = jax.jit(lambda x, mask: module.apply(variables, x, mask, train=False))

  @jax.jit
  def stream(carry, x):
    step = lambda carry, x_t: module.apply(variables, carry, x_t, method=Processor.step)
    carry, ys = jax.lax.scan(step, carry, jnp.moveaxis(x, 1, 0))
    return jnp.moveaxis(ys, 0, 1), carry

  return module, variables, forward, stream


def _initial(processor):
  return init_processor_carry(_config(processor), B)


def _frames(rng, b, t):
  return rng.standard_normal((b, t, D_MODEL)).astype(np.float32)


@pytest.mark.parametrize("processor", KINDS)
def test_full_sequence_equals_streaming_steps(processor):
  _, _, forward, stream = _model(processor)
  x = _frames(np.random.default_rng(), B, T)
  y = forward(x, np.ones((B, T), bool))
  y_steps, _ = stream(_initial(processor), x)
  assert y.shape == (B, T, D_MODEL) and y.dtype == jnp.float32
  for t in range(T):
    assert _rel_err(y_steps[:, t], y[:, t]) < 1e-5, t


@pytest.mark.parametrize("processor", KINDS)
def test_left_padding_leaves_real_frames_unchanged(processor):
  _, _, forward, _ = _model(processor)
  rng = np.random.default_rng()
  pads = np.array([0, 4, 9])
  # Row i holds the first T - pads[i] frames of one sequence after pads[i] random (not zero) frames;
  # by causality its real frames must reproduce row 0's outputs on that prefix.
  sequence = _frames(rng, 1, T)[0]
  x = _frames(rng, len(pads), T)
  for i, pad in enumerate(pads):
    x[i, pad:] = sequence[:T - pad]
  y = forward(x, np.arange(T)[None] >= pads[:, None])
  for i, pad in enumerate(pads[1:], 1):
    assert _rel_err(y[i, pad:], y[0, :T - pad]) < 1e-5, pad


@pytest.mark.parametrize("processor", KINDS)
def test_causal(processor):
  _, _, forward, _ = _model(processor)
  rng = np.random.default_rng()
  x, mask, t0 = _frames(rng, B, T), np.ones((B, T), bool), 6
  perturbed = x.copy()
  perturbed[:, t0] += rng.standard_normal((B, D_MODEL)).astype(np.float32)
  y, y_perturbed = forward(x, mask), forward(perturbed, mask)
  np.testing.assert_array_equal(y[:, :t0], y_perturbed[:, :t0])
  assert np.all(np.abs(np.asarray(y[:, t0:] - y_perturbed[:, t0:])).max(axis=-1) > 0)


@pytest.mark.parametrize("processor", KINDS)
def test_carry_size_is_independent_of_steps(processor):
  _, _, _, stream = _model(processor)
  x = _frames(np.random.default_rng(), B, 2 * T)
  describe = lambda carry: [(a.shape, a.dtype, a.nbytes) for a in jax.tree.leaves(carry)]
  initial = _initial(processor)
  _, carry = stream(initial, x[:, :T])
  assert describe(carry) == describe(initial) and len(describe(initial)) > 0
  _, carry = stream(carry, x[:, T:])
  assert describe(carry) == describe(initial)


def test_mamba_carry_layout():
  carry = init_processor_carry(_config("mamba"), 3)
  assert len(carry) == 2
  assert carry[0]["conv"].shape == (3, 3, 2 * D_MODEL) and carry[0]["ssm"].shape == (3, 2 * D_MODEL, 5)


def test_dropout_only_when_training():
  module, variables, forward, _ = _model("mamba")
  x, mask = _frames(np.random.default_rng(), B, T), np.ones((B, T), bool)
  train = jax.jit(lambda key: module.apply(variables, x, mask, train=True, rngs={"dropout": key}))
  y0, y1 = train(jax.random.key(0)), train(jax.random.key(1))
  assert _rel_err(y0, y1) > 1e-3 and _rel_err(y0, forward(x, mask)) > 1e-3


@pytest.mark.parametrize("processor", KINDS)
def test_bfloat16_compute_float32_state(processor):
  _, _, forward, _ = _model(processor)
  _, _, forward_bf16, stream_bf16 = _model(processor, "bfloat16")
  x, mask = _frames(np.random.default_rng(), B, T), np.ones((B, T), bool)
  y, y_bf16 = forward(x, mask), forward_bf16(x, mask)
  y_steps, carry = stream_bf16(_initial(processor), x)
  assert y_bf16.dtype == jnp.bfloat16 and y_steps.dtype == jnp.bfloat16
  assert all(c.dtype == jnp.float32 for c in jax.tree.leaves(carry))
  assert _rel_err(y_bf16, y) < 5e-2 and _rel_err(y_steps, y) < 5e-2


def test_unknown_processor_is_named_in_error():
  module = Processor(_config("transformer"))
  with pytest.raises(ValueError, match="config.model.processor.*'transformer'"):
    module.init(jax.random.key(0), jnp.zeros((1, 2, D_MODEL)), jnp.ones((1, 2), bool), train=False)
