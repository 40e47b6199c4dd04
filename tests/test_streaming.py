"""Streaming: stream_step over x_1..x_t == the full forward on x_1..x_t at every t; fixed-size
state; jit, vmap and export agree; prepared params give the same outputs with fewer kernels;
errors."""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clam_jax import clam
from clam_jax.model import CLAM
from clam_jax.streaming import init_stream_state, make_stream_step, prepare_stream_params
from helpers import MODALITIES, load_benchmark, max_rel_err, model_config

streaming_benchmark = load_benchmark("streaming")

B, T, N = 2, 12, 5


def _last(outputs):
  """A forward's outputs as a stream step gives them: the past logits of the last frame only."""
  return {"future": outputs["future"], "past": jax.tree.map(lambda r: r[:, -1], outputs["past"])}


def _frames(rng, *lead):
  return {m: rng.standard_normal(lead + (dim,)).astype(np.float32) for m, dim in MODALITIES.items()}


@functools.cache
def _setup(processor="mamba", memory=True):
  """(config, params, jitted forward(features, mask), stream_step, jitted stream(state, features)
  -> (state, outputs with time first)). Params are random, not the init: the equalities must
  hold for any, and random norms and biases exercise more than ones and zeros."""
  config = model_config(processor=processor, memory=memory, type_embeddings=memory)
  model = CLAM(config)
  features, mask = _frames(np.random.default_rng(0), 1, 2), np.ones((1, 2), bool)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          features, mask)["params"]
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: 0.5 * rng.standard_normal(s.shape).astype(s.dtype), shapes)
  forward = jax.jit(lambda features, mask: model.apply({"params": params}, features, mask,
                                                       train=False))
  step = make_stream_step(config)

  @jax.jit
  def stream(state, features):
    frames = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), features)
    return jax.lax.scan(lambda state, frame: step(params, state, frame), state, frames)

  return config, params, forward, step, stream


@pytest.mark.parametrize("processor, memory", [("mamba", True), ("gru", False)])
def test_stream_equals_forward_on_every_prefix(processor, memory):
  config, _, forward, _, stream = _setup(processor, memory)
  rng = np.random.default_rng()
  x = _frames(rng, B, T)
  _, outs = stream(init_stream_state(config, B), x)
  # Window t (row block t - 1) holds x_1..x_t after T - t padding frames of large random values.
  windows = {m: 10 * rng.standard_normal((T, B, T, dim)).astype(np.float32)
             for m, dim in MODALITIES.items()}
  mask = np.zeros((T, B, T), bool)
  for t in range(1, T + 1):
    for m in MODALITIES:
      windows[m][t - 1, :, T - t:] = x[m][:, :t]
    mask[t - 1, :, T - t:] = True
  ref = forward({m: w.reshape(T * B, T, -1) for m, w in windows.items()}, mask.reshape(T * B, T))
  at = lambda t: jax.tree.map(lambda o: o[t - 1], outs)
  for t in range(1, T + 1):
    rows = slice((t - 1) * B, t * B)
    assert max_rel_err(at(t), _last(jax.tree.map(lambda r: r[rows], ref))) <= 1e-5, t
  # The last block has no padding; a window shorter than N without padding at all:
  short = forward({m: v[:, :3] for m, v in x.items()}, np.ones((B, 3), bool))
  assert max_rel_err(at(3), _last(short)) <= 1e-5


def test_state_size_is_fixed():
  config, params, _, step, stream = _setup()
  initial = init_stream_state(config, B)
  describe = lambda state: [(x.shape, x.dtype) for x in jax.tree.leaves(state)]
  nbytes = lambda state: sum(x.nbytes for x in jax.tree.leaves(state))
  frame = jax.tree.map(lambda v: v[:, 0], _frames(np.random.default_rng(), B, 1))
  # One step maps the state to one of the same shapes and dtypes, so does any number of steps.
  assert describe(jax.eval_shape(step, params, initial, frame)[0]) == describe(initial)
  x = _frames(np.random.default_rng(), B, T)
  state, _ = stream(initial, x)
  size = nbytes(state)
  assert size == nbytes(initial) > 0
  runs = -(-10_000 // T)
  for _ in range(runs - 1):
    state, outs = stream(state, x)
  assert nbytes(state) == size and describe(state) == describe(initial)
  np.testing.assert_array_equal(state["step"], runs * T)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves((state, outs)))


def test_jit_vmap_and_export_agree():
  config, params, _, step, stream = _setup()
  rng = np.random.default_rng()
  x = _frames(rng, B, T)
  initial = init_stream_state(config, B)
  state, outs = stream(initial, x)
  frame = jax.tree.map(lambda v: v[:, 0], _frames(rng, B, 1))
  exported = jax.export.export(jax.jit(step))(params, state, frame)
  new_state, out = exported.call(params, state, frame)
  assert out["future"]["verb"].shape == (B, 3, 7) and out["past"]["noun"].shape == (B, 11)
  # vmap over groups of streams: group 0 continues `state` with `frame`, group 1 starts with x_1.
  stack = lambda a, b: jax.tree.map(lambda u, v: jnp.stack([u, v]), a, b)
  vmapped_state, vmapped_out = jax.jit(jax.vmap(step, in_axes=(None, 0, 0)))(
      params, stack(state, initial), stack(frame, jax.tree.map(lambda v: v[:, 0], x)))
  group = lambda tree, i: jax.tree.map(lambda v: v[i], tree)
  assert max_rel_err((group(vmapped_state, 0), group(vmapped_out, 0)), (new_state, out)) <= 1e-5
  assert max_rel_err(group(vmapped_out, 1), group(outs, 0)) <= 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prepared_params_stream_the_same_with_fewer_kernels(dtype):
  _, params, _, _, _ = _setup()
  config = model_config(dtype=dtype)
  step = make_stream_step(config)
  rng = np.random.default_rng()
  frames = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), _frames(rng, B, T))
  run = jax.jit(lambda p, state: jax.lax.scan(lambda s, f: step(p, s, f), state, frames))
  initial = init_stream_state(config, B)
  ref_state, ref = run(params, initial)
  for cast in (False, True):
    prepared = prepare_stream_params(params, config, cast=cast)
    kernel = prepared["params"]["predictor"]["layer_0"]["ffn"]["hidden"]["kernel"]
    assert kernel.dtype == (jnp.dtype(dtype) if cast else jnp.float32)
    assert prepared["params"]["processor"]["layer_0"]["A_log"].dtype == jnp.float32
    state, out = run(prepared, initial)
    # float32: only the summation order may differ; bfloat16: the constants are rounded once to
    # bfloat16 by the first layers where the raw step rounds them in place.
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    assert max_rel_err((state["memory"], state["processor"], out),
                        (ref_state["memory"], ref_state["processor"], ref)) <= tolerance
  if dtype != "float32":
    return
  frame = jax.tree.map(lambda v: v[0], frames)
  count = lambda p: streaming_benchmark.kernel_count(
      jax.jit(step).lower(p, initial, frame).compile().as_text())
  raw, fast = count(params), count(prepare_stream_params(params, config))
  # Layer 0 of the memory (self-attention of the learned queries) and of the predictor
  # (self-attention of zero targets) run once in prepare_stream_params, not in every step.
  assert 0 < fast["total"] <= raw["total"] - 10, (raw, fast)
  # The exported step takes prepared params as well. (Against the jitted step: the op-by-op one
  # rounds differently, 1.3e-6 apart on one CI run's random inputs.)
  prepared = prepare_stream_params(params, config)
  exported = jax.export.export(jax.jit(step))(prepared, initial, frame)
  assert max_rel_err(exported.call(prepared, initial, frame),
                     jax.jit(step)(prepared, initial, frame)) <= 1e-6


def test_softmax_baseline_streams():
  """benchmarks/streaming.py's softmax-memory baseline takes the call CLAM's memory makes of its
  attention (it broke silently once, reported as an 'error' row) and gives finite outputs."""
  config, params, *_ = _setup()
  fns = streaming_benchmark.make_functions(config)
  frame = _frames(np.random.default_rng(), 1)
  with mock.patch.object(clam, "CrossLinearAttention", streaming_benchmark.SoftmaxCrossAttention):
    row = streaming_benchmark.measure_softmax(fns, params, config, 1, 5, frame,
                                              dict(calls=2, warmup=1), jax.random.key(0))
  assert row["status"] == "ok", row.get("error")
  assert row["finite"]


def test_concurrent_kernel_time_is_overlap():
  """benchmarks/stream_kernels.py counts as concurrent the kernel time beyond the intervals'
  union: [0, 5] and [3, 7] overlap by 2 us, [10, 11] by nothing."""
  stream_kernels = load_benchmark("stream_kernels")
  events = [dict(ts=3, dur=4), dict(ts=0, dur=5), dict(ts=10, dur=1)]
  assert stream_kernels.covered_us(events) == 8.0


def test_kernel_count_reads_hlo():
  hlo = jax.jit(lambda w, x: (jnp.tanh(x @ w.astype(jnp.bfloat16)), x + 1)).lower(
      jnp.ones((8, 8)), jnp.ones((4, 8), jnp.bfloat16)).compile().as_text()
  count = streaming_benchmark.kernel_count(hlo)
  assert count["total"] == sum(count["by_op"].values()) >= 2
  assert count["params_only"] >= 1  # the conversion of w, or x + 1
  assert not set(count["by_op"]) & {"parameter", "tuple", "constant"}


def test_uniform_selection_cannot_stream():
  with pytest.raises(ValueError, match="act_token_selection='uniform' cannot stream"):
    make_stream_step(model_config(act_token_selection="uniform"))


@pytest.mark.parametrize("frame, message", [
    ({"rgb": np.ones((B, 19), np.float32), "flow": np.ones((B, 6), np.float32)},
     "modality 'rgb' has feature dim 19, config.model.modalities.rgb expects 20"),
    ({"rgb": np.ones((B + 1, 20), np.float32), "flow": np.ones((B + 1, 6), np.float32)},
     "features_t has batch size 3, the stream state 2"),
    ({"rgb": np.ones((B, 1, 20), np.float32), "flow": np.ones((B, 1, 6), np.float32)},
     "must have rank 2"),
])
def test_frame_errors_say_what_was_expected(frame, message):
  config, params, _, step, _ = _setup()
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(step, params, init_stream_state(config, B), frame)
