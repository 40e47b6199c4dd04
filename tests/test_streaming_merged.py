"""The prepared step's merged products: the same outputs as the raw step and the full forward for
configs that take each branch (F = 1 and F > 1 after the first predictor layer, one or two memory
layers, memory off, normalised elu1 memory, no type embeddings), one product per merged group,
and fewer kernels than before the merge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clam_jax.model import CLAM
from clam_jax.streaming import init_stream_state, make_stream_step, prepare_stream_params
from helpers import (MODALITIES, load_benchmark, max_rel_err, model_config,
                     random_params)

streaming_benchmark = load_benchmark("streaming")

B, T = 2, 9
# EK100's layout at a small width: F = 1, two predictor and memory layers, three heads.
EK100_LIKE = dict(future_queries=1, predictor_layers=2, heads={"verb": 7, "noun": 11, "action": 13})


@pytest.mark.parametrize("overrides", [
    EK100_LIKE,
    dict(predictor_layers=3, memory_layers=1, memory_feature_map="elu1", memory_normalize=True,
         type_embeddings=False),
    dict(memory=False, processor="gru", predictor_layers=2, future_queries=2),
], ids=["ek100_like", "f3_one_memory_layer_elu1", "no_memory"])
def test_merged_step_equals_raw_step_and_forward(overrides):
  config = model_config(**overrides)
  params = random_params(config)
  step = make_stream_step(config)
  rng = np.random.default_rng()
  x = {m: rng.standard_normal((B, T, d)).astype(np.float32) for m, d in MODALITIES.items()}
  frames = jax.tree.map(lambda v: jnp.moveaxis(v, 1, 0), x)
  run = jax.jit(lambda p: jax.lax.scan(lambda s, f: step(p, s, f), init_stream_state(config, B),
                                       frames))
  ref_state, ref = run(params)
  state, outs = run(prepare_stream_params(params, config))
  assert max_rel_err(outs, ref) <= 1e-5
  assert max_rel_err(state, ref_state) <= 1e-5
  # And the full forward on the whole window, as the raw step is tested against it at every t.
  full = CLAM(config).apply({"params": params}, x, np.ones((B, T), bool), train=False)
  last = {"future": full["future"], "past": jax.tree.map(lambda r: r[:, -1], full["past"])}
  assert max_rel_err(jax.tree.map(lambda o: o[-1], outs), last) <= 1e-5


def test_merged_step_runs_one_product_per_merged_group():
  config = model_config(**EK100_LIKE)
  params = random_params(config)
  step = make_stream_step(config)
  state = init_stream_state(config, B)
  frame = {m: np.ones((B, d), np.float32) for m, d in MODALITIES.items()}
  products = lambda p: jax.jit(step).lower(p, state, frame).as_text().count(
      "= stablehlo.dot_general")
  # 2 input projections, 5 in the Mamba layer; memory: 1 for every layer's frame key, value and
  # gate, layer 0 (its query is a constant) read-out, out and FFN (4), layer 1 self-attention
  # (qkv, 2 in the attention, out) and query, read-out, out, FFN (9); predictor: 1 for every
  # layer's context keys and values, layer 0 (its query a constant) 2 in the attention, out, FFN
  # (5), layer 1 self-attention (F = 1: value-out, 1) and query, 2 in the attention, out, FFN (7);
  # 1 for every classifier.
  merged = 2 + 5 + (1 + 4 + 9) + (1 + 5 + 7) + 1
  assert products(prepare_stream_params(params, config)) == merged
  assert products(params) >= merged + 20


@pytest.mark.parametrize("cast", [False, True])
def test_merged_step_has_far_fewer_kernels(cast):
  config = model_config(**EK100_LIKE, dtype="bfloat16" if cast else "float32")
  params = random_params(config)
  step = make_stream_step(config)
  state = init_stream_state(config, B)
  frame = {m: np.ones((B, d), np.float32) for m, d in MODALITIES.items()}
  count = lambda p: streaming_benchmark.kernel_count(
      jax.jit(step).lower(p, state, frame).compile().as_text())["total"]
  raw, fast = count(params), count(prepare_stream_params(params, config, cast=cast))
  # Before the merge (layer-0 constants only) the prepared step saved 28 (float32) and 85
  # (bfloat16, cast) of this config's CPU kernels.
  assert 0 < fast <= raw - (45 if not cast else 110), (raw, fast)
