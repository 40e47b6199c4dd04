"""stream_step for 100,000 frames: its state stays finite and bounded, and the CLAM memory's state
at the end equals a float64 evaluation of the memory recurrence on the same inputs, as do the
outputs computed from it.

The float64 reference is the closed form S_T = sum_t exp(g_{t+1} + ... + g_T) k_t^T v_t, with the
per-frame k_t, v_t, g_t of each memory layer captured from a full-sequence forward of the memory
over the same frames: another algorithm and another precision than the stream's 100,000 float32
updates. (The model code computes in float32 whatever the input, so it cannot itself run in
float64.) benchmarks/long_streaming.py runs the EK100 model this long on a GPU and records its
device memory.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clam_jax.clam import CLAMMemory
from clam_jax.model import CLAM
from clam_jax.streaming import init_stream_state, make_stream_step

T, CHUNK, B, F = 100_000, 1_000, 2, 6
CONFIG = ml_collections.ConfigDict(dict(
    modalities={"rgb": F}, d_model=8, dropout=0.0, dtype="float32", processor="mamba",
    processor_layers=1, ssm=dict(d_state=4, d_conv=4, expand=2), memory=True, memory_tokens=2,
    memory_layers=2, memory_heads=2, memory_feature_map="identity", memory_normalize=False,
    gate_temperature=16.0, scan_impl="auto", num_act_tokens=3, act_token_selection="fifo",
    type_embeddings=True, future_queries=2, predictor_layers=1, predictor_heads=2,
    heads={"verb": 5, "noun": 3}))


def _max_abs(tree):
  return jax.tree.map(lambda x: jnp.max(jnp.abs(x)), tree)


@functools.partial(jax.jit, static_argnums=0)
def _stream(step, params, state, frames):
  """Runs step over frames {m: (T, B, F_m)} in chunks of CHUNK frames.

  Returns (final state, outputs of the last frame, per-chunk max |x| of the processor and memory
  states and the act-tokens (a pytree of (T / CHUNK,) arrays), per-chunk "all outputs finite")."""

  def chunk(state, chunk_frames):
    state, outs = jax.lax.scan(lambda s, f: step(params, s, f), state, chunk_frames)
    finite = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(outs)]))
    tracked = {k: state[k] for k in ("processor", "memory", "act_tokens")}
    return state, (_max_abs(tracked), finite, jax.tree.map(lambda o: o[-1], outs))

  chunks = jax.tree.map(lambda x: x.reshape(-1, CHUNK, *x.shape[1:]), frames)
  state, (max_abs, finite, last) = jax.lax.scan(chunk, state, chunks)
  return state, jax.tree.map(lambda o: o[-1], last), max_abs, finite


@jax.jit
def _memory_inputs(params, features):
  """The per-frame k, v, g projections of every memory layer in a full-sequence forward:
  {"layer_<l>": {"key", "value", "gate": (B, T, H, DK)}}."""
  x = CLAM(CONFIG).apply({"params": params}, features,
                         method=lambda module, f: module.project(f, train=False))
  _, captured = CLAMMemory(CONFIG).apply(
      {"params": params["memory"]}, x, jnp.ones(x.shape[:2], bool), train=False,
      capture_intermediates=lambda module, _: module.name in ("key", "value", "gate"),
      mutable=["intermediates"])
  layers = {name: layer["cross_attention"] for name, layer in captured["intermediates"].items()
            if name.startswith("layer_")}
  return {name: {projection: values["__call__"][0] for projection, values in layer.items()}
          for name, layer in layers.items()}


def _memory_state_float64(params, features):
  """S_T of every memory layer in float64 from the k, v, g of its full-sequence forward."""
  captured = _memory_inputs(params, features)
  states = []
  for layer in range(CONFIG.memory_layers):
    inputs = captured[f"layer_{layer}"]
    k, v, gate = (np.asarray(inputs[name], np.float64) for name in ("key", "value", "gate"))
    g = -np.logaddexp(0.0, -gate) / CONFIG.gate_temperature  # log_sigmoid / tau
    later = np.cumsum(g[:, ::-1], axis=1)[:, ::-1] - g  # g_{t+1} + ... + g_T
    states.append(np.einsum("bthk,bthv->bhkv", np.exp(later) * k, v))
  return states


def test_stream_of_100000_frames_stays_finite_bounded_and_exact():
  rng = np.random.default_rng()
  frames = {"rgb": rng.standard_normal((T, B, F)).astype(np.float32)}
  features = {"rgb": np.swapaxes(frames["rgb"], 0, 1)}
  # Random params, not the init: larger than the init's, and the state must stay bounded for any.
  shapes = jax.eval_shape(functools.partial(CLAM(CONFIG).init, train=False), jax.random.key(0),
                          jax.tree.map(lambda x: x[:, :4], features), np.ones((B, 4), bool))
  params = jax.tree.map(lambda s: 0.5 * rng.standard_normal(s.shape).astype(s.dtype),
                        shapes["params"])
  step = make_stream_step(CONFIG)
  state, last, max_abs, finite = _stream(step, params, init_stream_state(CONFIG, B), frames)

  assert np.all(finite)
  np.testing.assert_array_equal(state["step"], T)
  # Bounded: the typical size of each part (the median over 20 chunk ends of its largest |x|) over
  # the last 20,000 frames is within twice that over frames 1,000..21,000; the Mamba state's is
  # heavy-tailed but stays within 1.7 times, one that drifts like a random walk grows 2.9 times.
  for path, per_chunk in jax.tree_util.tree_flatten_with_path(max_abs)[0]:
    per_chunk = np.asarray(per_chunk)
    assert np.all(np.isfinite(per_chunk)), path
    assert np.median(per_chunk[-20:]) <= 2 * np.median(per_chunk[1:21]), (path, per_chunk)

  exact = _memory_state_float64(params, features)
  for streamed, reference in zip(state["memory"], exact):
    error = np.linalg.norm(np.asarray(streamed, np.float64) - reference) / np.linalg.norm(reference)
    assert error < 1e-5, error
  # One more frame from the streamed state and from the same state with the float64 memory.
  frame = {"rgb": rng.standard_normal((B, F)).astype(np.float32)}
  replaced = dict(state, memory=tuple(jnp.asarray(s, jnp.float32) for s in exact))
  step = jax.jit(step)
  (_, out), (_, reference) = step(params, state, frame), step(params, replaced, frame)
  for x, ref in zip(jax.tree.leaves(out), jax.tree.leaves(reference)):
    assert np.linalg.norm(x - ref) <= 1e-5 * np.linalg.norm(ref)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(last))
