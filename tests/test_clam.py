"""The CLAM memory: masked frames change nothing, the normaliser averages, config errors."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clam_jax.clam import CLAMMemory, init_memory_state, state_shape

D_MODEL, HEADS, TOKENS = 32, 2, 4


def _config(**overrides):
  fields = dict(d_model=D_MODEL, dropout=0.1, dtype="float32", memory_tokens=TOKENS,
                memory_layers=2, memory_heads=HEADS, memory_feature_map="identity",
                memory_normalize=False, gate_temperature=16.0, scan_impl="auto")
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


@functools.cache
def _variables():
  """Random params (not the init: random norms and biases exercise more), shared by every config
  here (the feature map and the normaliser add none)."""
  shapes = jax.eval_shape(functools.partial(CLAMMemory(_config()).init, train=False),
                          jax.random.key(0), jnp.zeros((1, 1, D_MODEL)), jnp.ones((1, 1), bool))
  rng = np.random.default_rng(3)
  return jax.tree.map(lambda s: 0.5 * rng.standard_normal(s.shape).astype(s.dtype), shapes)


@functools.cache
def _memory(**overrides):
  """Jitted memory(frames, mask) -> (tokens, states)."""
  module, variables = CLAMMemory(_config(**overrides)), _variables()
  return jax.jit(lambda frames, mask: module.apply(variables, frames, mask, train=False))


def test_masked_frames_change_nothing():
  memory = _memory()
  rng = np.random.default_rng()
  real = rng.standard_normal((2, 7, D_MODEL)).astype(np.float32)
  # Five large random frames at random places (the first one included), masked out.
  mask = np.ones(12, bool)
  mask[np.concatenate([[0], rng.choice(np.arange(1, 12), 4, replace=False)])] = False
  padded = 10 * rng.standard_normal((2, 12, D_MODEL)).astype(np.float32)
  padded[:, mask] = real
  tokens, states = memory(real, np.ones((2, 7), bool))
  tokens_padded, states_padded = memory(padded, np.broadcast_to(mask, (2, 12)))
  assert tokens.shape == (2, TOKENS, D_MODEL) and len(states) == 2
  assert _rel_err(tokens_padded, tokens) < 1e-5
  for s, s_padded in zip(states, states_padded):
    assert s.shape == state_shape(_config(), 2) == (2, HEADS, 16, 16) and s.dtype == jnp.float32
    assert _rel_err(s_padded, s) < 1e-5
  tokens_unmasked, _ = memory(padded, np.ones((2, 12), bool))
  assert _rel_err(tokens_unmasked, tokens) > 1e-2


def test_every_layer_reads_the_frames():
  memory = _memory()
  rng = np.random.default_rng()
  x = rng.standard_normal((2, 12, D_MODEL)).astype(np.float32)
  perturbed = x.copy()
  perturbed[:, 0] += rng.standard_normal((2, D_MODEL)).astype(np.float32)
  mask = np.ones((2, 12), bool)
  (tokens, states), (tokens_p, states_p) = memory(x, mask), memory(perturbed, mask)
  assert _rel_err(tokens_p, tokens) > 1e-3
  assert all(_rel_err(s_p, s) > 1e-3 for s, s_p in zip(states, states_p))


def test_normaliser_averages_values():
  # One frame seen once or repeated 12 times: a normalised read-out is a weighted mean of the
  # values, hence the same (an unnormalised one would grow with the count); another frame differs.
  memory = _memory(memory_feature_map="elu1", memory_normalize=True)
  frames = np.random.default_rng().standard_normal((2, D_MODEL)).astype(np.float32)
  once = np.arange(12) == 11
  tokens, _ = memory(np.repeat(frames[[0, 0, 1]][:, None], 12, axis=1),
                     np.stack([once, np.ones(12, bool), once]))
  assert _rel_err(tokens[1], tokens[0]) < 1e-5
  assert _rel_err(tokens[2], tokens[0]) > 1e-2


def test_initial_state_layout():
  config = _config(memory_normalize=True, memory_feature_map="elu1", memory_layers=3)
  state = init_memory_state(config, 5)
  assert len(state) == 3
  assert all(s.shape == (5, HEADS, 16, 17) and s.dtype == jnp.float32 for s in state)


@pytest.mark.parametrize("overrides, message", [
    (dict(memory_feature_map="relu"), "memory_feature_map.*'relu'"),
    (dict(memory_normalize=True), "memory_normalize.*elu1"),
    (dict(memory_heads=3), "d_model \\(32\\).*memory_heads \\(3\\)"),
    (dict(gate_temperature=0.0), "gate_temperature must be > 0"),
])
def test_config_errors_name_the_field(overrides, message):
  module = CLAMMemory(_config(**overrides))
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0),
                   jnp.zeros((1, 2, D_MODEL)), jnp.ones((1, 2), bool))
