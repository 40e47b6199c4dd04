"""The fused-kernel streaming step (clam_jax.fused_streaming, Pallas interpret mode on the CPU):
the same states and logits as streaming.stream_step at every frame, in float32 and within the
rounding of bfloat16; the same with the processor's and memory's kernels side by side as alone;
the shipped configs' steps lower through Triton; unsupported configs are named."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clam_jax.fused_streaming import make_fused_stream_step, prepare_fused_params
from clam_jax.model import CLAM
from clam_jax.streaming import init_stream_state, make_stream_step, prepare_stream_params
from helpers import lower_for_h100, max_rel_err, model_config, random_params

MODALITIES = {"rgb": 32, "flow": 16}
B, T = 2, 6


def _config(**overrides):
  fields = dict(modalities=MODALITIES, num_act_tokens=4, future_queries=1, predictor_layers=2,
                processor_layers=2, heads={"verb": 7, "noun": 11, "action": 13})
  return model_config(**{**fields, **overrides})


def _run(step, params, config, frames):
  """Every frame's outputs and the final state of a lax.scan of step over frames (T, B, F)."""
  return jax.jit(lambda p: jax.lax.scan(lambda s, f: step(p, s, f),
                                        init_stream_state(config, B), frames))(params)


def _frames(rng):
  return {m: jnp.asarray(rng.standard_normal((T, B, d)), jnp.float32)
          for m, d in MODALITIES.items()}


@pytest.mark.parametrize("overrides", [
    {},
    dict(memory_layers=1, memory_feature_map="elu1", type_embeddings=False, predictor_layers=1),
    dict(memory=False, processor_layers=1),
    dict(future_queries=4, memory_layers=1),
    dict(future_queries=5, num_act_tokens=3, memory_layers=1),  # rows padded to 8 in the step
], ids=["two_memory_layers", "one_memory_layer_elu1", "no_memory", "four_future_queries",
        "five_future_queries_three_act_tokens"])
def test_fused_step_equals_stream_step_float32(overrides):
  config = _config(**overrides)
  params = random_params(config, MODALITIES)
  frames = _frames(np.random.default_rng())
  ref_state, ref = _run(make_stream_step(config), prepare_stream_params(params, config), config,
                        frames)
  state, out = _run(make_fused_stream_step(config), prepare_fused_params(params, config), config,
                    frames)
  assert max_rel_err(out, ref) <= 1e-5
  assert max_rel_err(state, ref_state) <= 1e-5


def test_side_by_side_equals_each_kernel_alone():
  """The processor's and the memory's kernels in shared launches give exactly the logits and
  states of each kernel launched alone (bfloat16; in interpret mode warps do not change sums)."""
  config = _config(dtype="bfloat16")
  params = prepare_fused_params(random_params(config, MODALITIES), config)
  frames = _frames(np.random.default_rng())
  side = _run(make_fused_stream_step(config), params, config, frames)
  alone = _run(make_fused_stream_step(config, side_by_side=False), params, config, frames)
  for x, y in zip(jax.tree.leaves(side), jax.tree.leaves(alone), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_fused_step_bfloat16_is_as_close_to_float32_as_the_xla_step():
  """In bfloat16 the two steps round differently; each is compared to the float32 step, by the
  mean error over 4 random models and inputs (one draw's fused / XLA ratio ranged 0.70-1.68 over
  11 draws, the logits' error up to 3.7e-2 for both). Params: the init plus noise (the 0.5-scale
  params above make bf16 runs chaotic: 3-7 % for both)."""
  config, f32 = _config(dtype="bfloat16"), _config()
  rng = np.random.default_rng()
  features = {m: np.ones((1, 2, d), np.float32) for m, d in MODALITIES.items()}
  errors = {"logits": [], "state": []}
  for _ in range(4):
    params = CLAM(config).init(jax.random.key(int(rng.integers(2**31))), features,
                               np.ones((1, 2), bool), train=False)["params"]
    params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(p.dtype),
                          params)
    frames = _frames(rng)
    exact_state, exact = _run(make_stream_step(f32), prepare_stream_params(params, f32), f32,
                              frames)
    xla_state, xla = _run(make_stream_step(config),
                          prepare_stream_params(params, config, cast=True), config, frames)
    state, fused = _run(make_fused_stream_step(config), prepare_fused_params(params, config),
                        config, frames)
    for name, ref, out, exact_ in (("logits", xla, fused, exact),
                                   ("state", xla_state, state, exact_state)):
      errors[name].append((max_rel_err(ref, exact_), max_rel_err(out, exact_)))
  for name, pairs in errors.items():
    xla_err, fused_err = np.mean(pairs, axis=0)
    assert fused_err <= max(1.5 * xla_err, 4e-3) and fused_err <= 3e-2, (name, fused_err, xla_err)


@pytest.mark.parametrize("name", ["ek100", "ego4d", "thumos14"])
def test_fused_step_lowers_through_triton(monkeypatch, name):
  """Every kernel of a shipped config's step (D = 1024, bf16; Ego4D's 20 future queries padded to
  32, THUMOS's 8) lowers with the Pallas Triton backend for an abstract H100 (not compiled:
  Triton's own compile errors show only on a GPU)."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the kernels' interpret default
  config = importlib.import_module(f"configs.{name}").get_config().model
  frame = {m: jax.ShapeDtypeStruct((1, d), jnp.float32) for m, d in config.modalities.items()}
  params = jax.eval_shape(
      lambda k: CLAM(config).init(k, {m: jnp.ones((1, 2, d)) for m, d in config.modalities.items()},
                                  jnp.ones((1, 2), bool), train=False)["params"], jax.random.key(0))
  fused = jax.eval_shape(lambda p: prepare_fused_params(p, config), params)
  state = jax.eval_shape(lambda: init_stream_state(config, 1))
  text = lower_for_h100(make_fused_stream_step(config), fused, state, frame)
  assert "__gpu$xla.gpu.triton" in text
  for kernel in ("fused_dense", "small_attention", "mamba_in_conv", "mamba_scan_gate",
                 "memory_update", "memory_readout"):
    assert kernel in text, kernel


def test_unsupported_configs_are_named():
  for overrides, field in ((dict(processor="gru"), "processor"),
                           (dict(memory_normalize=True, memory_feature_map="elu1"),
                            "memory_normalize"),
                           (dict(memory_tokens=6), "memory_tokens")):
    with pytest.raises(ValueError, match=field):
      make_fused_stream_step(_config(**overrides))
