"""Online CLAM: one frame per stream per call, O(1) time and a fixed-size state.

    state = init_stream_state(config.model, batch_size)
    stream_step = make_stream_step(config.model)      # binds the config; pure in its arguments
    state, out = stream_step(params, state, features_t)

params: the model's variables["params"]; features_t: {modality: (B, F_m)}; out: {"future": {head:
(B, F, C)}, "past": {head: (B, C)}} float32 logits. After frames x_1..x_t, out equals CLAM's forward
on the window x_1..x_t (no padding, train=False): the processor carries its per-layer states, the
memory its per-layer S_t, and the predictor reads the FIFO of the last N act-tokens. stream_step can
be jax.jit-ed, jax.vmap-ed (over an extra leading axis of state and frames) and jax.export-ed.

For the fastest step, pass `prepare_stream_params(params, config.model)` instead of params: it
computes once what a step would recompute from the params alone (the memory's first-layer tokens,
the predictor's first-layer targets) and can cast the Dense weights to the compute dtype once.

(choice) Only act_token_selection="fifo" streams: "uniform" spaces the N tokens over the whole
observed window, which grows with t, so no fixed-size state can hold its candidates;
make_stream_step raises for it.
"""

from flax import traverse_util
import jax.numpy as jnp

from clam_jax import clam
from clam_jax import model as model_lib
from clam_jax.processor import init_processor_carry


def init_stream_state(model_config, batch_size):
  """The state before the first frame; a dict of fixed-size arrays whatever t:

  "processor": init_processor_carry's tuple (one carry per layer, float32);
  "memory": a tuple of memory_layers float32 (B, H, DK, DV') states (() if config.memory is off);
  "act_tokens": (B, N, D) in config.dtype, the last N act-tokens, oldest first (zeros before any);
  "act_mask": (B, N) bool, which of them exist; "step": (B,) int32, frames seen.
  """
  config, b = model_config, batch_size
  return {
      "processor": init_processor_carry(config, b),
      "memory": clam.init_memory_state(config, b) if config.memory else (),
      "act_tokens": jnp.zeros((b, config.num_act_tokens, config.d_model), jnp.dtype(config.dtype)),
      "act_mask": jnp.zeros((b, config.num_act_tokens), bool),
      "step": jnp.zeros((b,), jnp.int32),
  }


def prepare_stream_params(params, model_config, cast=False):
  """The params for stream_step with the step's params-only work done once.

  params: the model's variables["params"]. Returns {"params": params, "constants":
  {"future_targets": (F, D) float32 (FuturePredictor.first_targets), "memory_tokens": (M, D)
  float32 (CLAMMemory.first_tokens; only with config.memory)}}. cast: every Dense kernel and bias
  is cast to config.dtype once; Flax casts them to it at every call anyway, so the outputs are the
  same and a step reads half the bytes (bfloat16) without the per-call conversions.
  """
  module = model_lib.CLAM(model_config)

  def constants(module):
    values = {"future_targets": module.predictor.first_targets()}
    if module.memory is not None:
      values["memory_tokens"] = module.memory.first_tokens()
    return values

  prepared = {"params": params, "constants": module.apply({"params": params}, method=constants)}
  if cast:
    flat = traverse_util.flatten_dict(params)
    dense = lambda path: path[-1] in ("kernel", "bias") and path[:-1] + ("kernel",) in flat
    prepared["params"] = traverse_util.unflatten_dict(
        {path: x.astype(model_config.dtype) if dense(path) else x for path, x in flat.items()})
  return prepared


def _step(module, state, features_t, constants):
  """CLAM.apply method: one frame through the bound model (see make_stream_step)."""
  (b,) = model_lib.check_features(module.config, features_t, rank=2)
  if state["act_mask"].shape[0] != b:
    raise ValueError(f"features_t has batch size {b}, the stream state "
                     f"{state['act_mask'].shape[0]}")
  x = module.project(features_t, train=False)
  processor_state, act = module.processor.step(state["processor"], x)
  memory_tokens, memory_state = None, state["memory"]
  if module.memory is not None:
    memory_tokens, memory_state = module.memory(x[:, None], jnp.ones((b, 1), bool), memory_state,
                                                train=False,
                                                first_tokens=constants.get("memory_tokens"))
  tokens = jnp.concatenate([state["act_tokens"][:, 1:], act[:, None]], axis=1)
  mask = jnp.concatenate([state["act_mask"][:, 1:], jnp.ones((b, 1), bool)], axis=1)
  future = module.predictor(tokens, mask, memory_tokens, train=False,
                            first_targets=constants.get("future_targets"))
  # One classifier product for the future tokens and the act-token: each head's weights are read
  # once per step, not twice.
  logits = module.classify(jnp.concatenate([future, act[:, None]], axis=1))
  num_future = future.shape[1]
  new_state = {"processor": processor_state, "memory": memory_state, "act_tokens": tokens,
               "act_mask": mask, "step": state["step"] + 1}
  return new_state, {"future": {head: y[:, :num_future] for head, y in logits.items()},
                     "past": {head: y[:, num_future] for head, y in logits.items()}}


def make_stream_step(model_config):
  """Returns stream_step(params, state, features_t) -> (state, out) for this config (module doc).

  params: the model's params or `prepare_stream_params`' output (faster, same outputs);
  features_t: {modality: (B, F_m)}, B the state's batch size. Raises ValueError for a config that
  cannot stream (act_token_selection="uniform").
  """
  model_lib.check_config(model_config)
  if model_config.act_token_selection != "fifo":
    raise ValueError(
        f"config.model.act_token_selection={model_config.act_token_selection!r} cannot stream: its "
        f"tokens are spread over the whole observed window, which grows with t; use 'fifo'")
  module = model_lib.CLAM(model_config)

  def stream_step(params, state, features_t):
    """(params or prepared params, state, {modality: (B, F_m)}) -> (state, {"future": {head:
    (B, F, C)}, "past": {head: (B, C)}})."""
    prepared = params if "constants" in params else {"params": params, "constants": {}}
    return module.apply({"params": prepared["params"]}, state, features_t, prepared["constants"],
                        method=_step)

  return stream_step
