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
the predictor's first-layer targets), merges the projections that share an input into one weight
matrix each, and can cast the Dense weights to the compute dtype once. At batch 1 a step is a chain
of small kernels whose launches, not their bytes, set its latency, so the prepared step runs one
product where the model runs several: the key, value and gate projections of every memory layer
(the frame LayerNorm's scale and bias folded into them), the query, key and value of each
self-attention, the cross-attention keys and values of every predictor layer, and the classifiers.

(choice) Only act_token_selection="fifo" streams: "uniform" spaces the N tokens over the whole
observed window, which grows with t, so no fixed-size state can hold its candidates;
make_stream_step raises for it.
"""

from flax import traverse_util
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

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

  params: the model's variables["params"]. Returns {"params": params less the weights that the
  constants and merged products replace, "constants": {
    "future_targets": (F, D) float32, the predictor's layer-0 targets (first_targets);
    "predictor_queries": (F, H_p, D / H_p) config.dtype, layer 0's cross-attention queries of them;
    "memory_tokens": (M, D) float32, the memory's layer-0 tokens (CLAMMemory.first_tokens);
    "memory_queries": (M, H, DK) config.dtype, layer 0's cross-attention query projections of them
    (these two only with config.memory);
    "merged": `merge_projections`}}.
  cast: every Dense kernel and bias, the merged ones included, is cast to config.dtype once; Flax
  casts them to it at every call anyway, so the outputs are the same and a step reads half the
  bytes (bfloat16) without the per-call conversions.
  """
  module = model_lib.CLAM(model_config)
  dtype = jnp.dtype(model_config.dtype)

  def query(part, x):  # layer 0's cross-attention query projection of x (..., D) -> (..., H, DH)
    weights = params[part]["layer_0"]["cross_attention"]["query"]
    return _dense(x, flat_dense(weights), dtype).reshape(x.shape[:-1] + weights["bias"].shape)

  def constants(module):
    targets = module.predictor.first_targets()
    values = {"future_targets": targets,
              "predictor_queries": query("predictor", targets + module.predictor.pos)}
    if module.memory is not None:
      tokens = module.memory.first_tokens()
      values.update(memory_tokens=tokens, memory_queries=query(
          "memory", module.memory.layers[0].cross_attention_norm(tokens)))
    return values

  values = module.apply({"params": params}, method=constants)
  values["merged"] = merge_projections(params, model_config)
  # The weights that the constants and merged products replace: the step never reads them.
  replaced = [("predictor", "layer_0", "self_attention_norm")]
  replaced += [(f"classifiers_{head}",) for head in model_config.heads]
  replaced += [("predictor", f"layer_{i}", part) for i in range(model_config.predictor_layers)
               for part in ("self_attention", "cross_attention")]
  if model_config.memory:
    replaced += [("memory", "layer_0", part) for part in ("self_attention_norm",
                                                           "cross_attention_norm")]
    replaced += [("memory", f"layer_{i}", *part) for i in range(model_config.memory_layers)
                 for part in [("frame_norm",), ("self_attention",)] + [
                     ("cross_attention", name) for name in ("key", "value", "gate")]]
    replaced.append(("memory", "layer_0", "cross_attention", "query"))
  params = traverse_util.unflatten_dict(
      {path: x for path, x in traverse_util.flatten_dict(params).items()
       if not any(path[:len(prefix)] == prefix for prefix in replaced)})
  prepared = {"params": params, "constants": values}
  if cast:
    prepared = traverse_util.flatten_dict(prepared)
    dense = lambda path: path[-1] in ("kernel", "bias") and path[:-1] + ("kernel",) in prepared
    prepared = traverse_util.unflatten_dict(
        {path: x.astype(dtype) if dense(path) else x for path, x in prepared.items()})
  return prepared


def flat_dense(weights):
  """A Dense or DenseGeneral's params as one product: {"kernel": (D_in, D_out), "bias": (D_out,)}
  (its outputs are the bias's axes)."""
  return {"kernel": weights["kernel"].reshape(-1, weights["bias"].size),
          "bias": weights["bias"].reshape(-1)}


def merge_projections(params, model_config):
  """The weights of the prepared step's merged products, float32, each {"kernel": (D_in, D_out),
  "bias": (D_out,) or (rows, D_out)}, from the model's params (all exact rewrites of the model's
  products in real arithmetic; in floating point only the rounding differs):

  "classifiers": every head's classifier side by side (D, sum of C_head), in config.heads' order;
  "memory_frames": the key, value and gate projections of memory layers 0, 1, ... side by side
  (D, 3 D L_m), with the frame LayerNorm's scale folded into the kernel and its bias into the bias
  (LN(x) W + b = n(x) (scale * W) + (bias W + b), n(x) the LayerNorm without them);
  "memory_layers": {"layer_<i>": {"qkv": the self-attention's query, key and value (D, 3 D),
  "out": (D, D)}} for each memory layer after the first;
  "predictor_context": the cross-attention keys and values of predictor layers 0, 1, ... side by
  side (D, 2 D L_p), with bias (N + M, 2 D L_p): each context row's type embedding e (act or
  memory) folded in as e W + b;
  "predictor_layers": {"layer_<i>": {"cross_out": (D, D)} and, after the first, "cross_query":
  (D, D) and the self-attention: with F = 1 its query attends to its own key alone, with softmax
  weight 1, so the block is one product "self_value_out" (D, D) (value then out); otherwise
  "self_qkv" (D, 3 D) with bias (F, 3 D): its queries and keys read x + pos, so pos W is folded in,
  and "self_out" (D, D)}. The memory's entries only with config.memory.
  """
  highest = lambda a, b: jnp.matmul(a, b, precision="highest")
  # (x + e) W + b = x W + (e W + b): an addend e of the input (D,) or (rows, D) into the bias.
  add_input = lambda e, p: {"kernel": p["kernel"], "bias": highest(e, p["kernel"]) + p["bias"]}

  def side_by_side(parts):  # biases broadcast to the same rows first
    rows = lambda key: jnp.broadcast_shapes(*(part[key].shape[:-1] for part in parts))
    return {key: jnp.concatenate([jnp.broadcast_to(part[key], rows(key) + part[key].shape[-1:])
                                  for part in parts], axis=-1)
            for key in ("kernel", "bias")}

  merged = {"classifiers": side_by_side([flat_dense(params[f"classifiers_{head}"])
                                         for head in model_config.heads])}
  if model_config.memory:
    layers = [params["memory"][f"layer_{i}"] for i in range(model_config.memory_layers)]
    frames = []
    for layer in layers:
      norm = layer["frame_norm"]
      for name in ("key", "value", "gate"):
        p = add_input(norm["bias"], flat_dense(layer["cross_attention"][name]))
        frames.append({"kernel": norm["scale"][:, None] * p["kernel"], "bias": p["bias"]})
    merged["memory_frames"] = side_by_side(frames)
    merged["memory_layers"] = {
        f"layer_{i}": {"qkv": side_by_side([flat_dense(layers[i]["self_attention"][name])
                                            for name in ("query", "key", "value")]),
                       "out": flat_dense(layers[i]["self_attention"]["out"])}
        for i in range(1, len(layers))}
  predictor, n = params["predictor"], model_config.num_act_tokens
  layers = [predictor[f"layer_{i}"] for i in range(model_config.predictor_layers)]
  types = jnp.zeros((n + model_config.memory_tokens * bool(model_config.memory),
                     model_config.d_model))
  if model_config.type_embeddings:
    types = types.at[:n].set(predictor["act_type"])
    if model_config.memory:
      types = types.at[n:].set(predictor["memory_type"])
  merged["predictor_context"] = side_by_side(
      [add_input(types, flat_dense(layer["cross_attention"][name]))
       for layer in layers for name in ("key", "value")])
  merged["predictor_layers"] = {}
  for i, layer in enumerate(layers):
    attention = lambda name: flat_dense(layer["self_attention"][name])
    weights = {"cross_out": flat_dense(layer["cross_attention"]["out"])}
    if i:
      weights["cross_query"] = flat_dense(layer["cross_attention"]["query"])
    if i and model_config.future_queries == 1:
      value, out = attention("value"), attention("out")
      weights["self_value_out"] = {"kernel": highest(value["kernel"], out["kernel"]),
                                   "bias": highest(value["bias"], out["kernel"]) + out["bias"]}
    elif i:
      pos = predictor["future_queries"]
      weights["self_qkv"] = side_by_side([add_input(pos, attention("query")),
                                          add_input(pos, attention("key")), attention("value")])
      weights["self_out"] = attention("out")
    merged["predictor_layers"][f"layer_{i}"] = weights
  return merged


def _dense(x, weights, dtype):
  """x: (..., D_in) through {"kernel", "bias"} as Flax's Dense does (inputs, kernel and bias in
  dtype) -> (..., D_out) in dtype."""
  return jnp.dot(x.astype(dtype), weights["kernel"].astype(dtype)) + weights["bias"].astype(dtype)


def _attention(q, k, v, out, dtype, mask=None):
  """Flax's MultiHeadDotProductAttention from its projections on: q (B, Q, H, DH); k, v (B, K, H,
  DH); out: the output's {"kernel", "bias"}; mask (B, 1, Q, K) bool or None. Returns (B, Q, D) in
  dtype."""
  o = nn.dot_product_attention(q, k, v, mask=mask, dtype=dtype)
  return _dense(o.reshape(o.shape[:-2] + (-1,)), out, dtype)


def _merged_memory(memory, x, state, constants):
  """CLAMMemory's one-frame call (x: (B, D), state: its tuple) with prepare_stream_params'
  constants; returns the same (memory tokens (B, M, D), new state)."""
  config, merged = memory.config, constants["merged"]
  dtype, b = jnp.dtype(config.dtype), x.shape[0]
  heads = config.memory_heads
  # Every layer's frame LayerNorm normalises the same x; their scales and biases are folded into
  # the merged kernel.
  normalized = nn.LayerNorm(use_bias=False, use_scale=False, dtype=dtype).apply({}, x)
  frames = _dense(normalized, merged["memory_frames"], dtype).reshape(b, 1, -1, 3, heads,
                                                                       config.d_model // heads)
  batch = lambda constant: jnp.broadcast_to(constant, (b,) + constant.shape)
  tokens, states = batch(constants["memory_tokens"]), []
  for i, layer in enumerate(memory.layers):
    projections = dict(zip(("key", "value", "gate"), (frames[:, :, i, j] for j in range(3))))
    if i:
      weights = merged["memory_layers"][f"layer_{i}"]
      h = layer.self_attention_norm(tokens)
      qkv = _dense(h, weights["qkv"], dtype).reshape(h.shape[:2] + (3, heads, -1))
      tokens = tokens + _attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], weights["out"], dtype)
    else:
      projections["query"] = batch(constants["memory_queries"])
    tokens, layer_state = layer.read(tokens, None, jnp.ones((b, 1), bool), state[i], train=False,
                                     projections=projections)
    states.append(layer_state)
  return memory.final_norm(tokens), tuple(states)


def _merged_predictor(predictor, act_tokens, act_mask, memory_tokens, constants):
  """FuturePredictor's call with prepare_stream_params' constants; same arguments and output
  (B, F, D) in config.dtype."""
  config, merged = predictor.config, constants["merged"]
  dtype, heads = jnp.dtype(config.dtype), config.predictor_heads
  context, mask = act_tokens.astype(dtype), act_mask
  if memory_tokens is not None:
    context = jnp.concatenate([context, memory_tokens.astype(dtype)], axis=1)
    mask = jnp.concatenate([mask, jnp.ones(memory_tokens.shape[:2], bool)], axis=1)
  b, num_context = context.shape[:2]
  keys_values = _dense(context, merged["predictor_context"], dtype).reshape(
      b, num_context, -1, 2, heads, config.d_model // heads)
  mask = jnp.broadcast_to(mask[:, None, None], (b, 1, config.future_queries, num_context))
  split_heads = lambda y: y.reshape(y.shape[:-1] + (heads, -1))
  batch = lambda constant: jnp.broadcast_to(constant, (b,) + constant.shape)
  x = batch(constants["future_targets"])
  for i, layer in enumerate(predictor.layers):
    weights = merged["predictor_layers"][f"layer_{i}"]
    if "self_value_out" in weights:
      x = layer.self_attention_norm(x + _dense(x, weights["self_value_out"], dtype))
    elif i:
      qkv = split_heads(_dense(x, weights["self_qkv"], dtype).reshape(x.shape[:2] + (3, -1)))
      x = layer.self_attention_norm(x + _attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                                   weights["self_out"], dtype))
    q = (split_heads(_dense(x + predictor.pos, weights["cross_query"], dtype)) if i else
         batch(constants["predictor_queries"]))
    x = layer.cross_attention_norm(x + _attention(
        q, keys_values[:, :, i, 0], keys_values[:, :, i, 1], weights["cross_out"], dtype, mask))
    x = layer.ffn_norm(x + layer.ffn(x, train=False))
  return x.astype(dtype)


def _step(module, state, features_t, constants):
  """CLAM.apply method: one frame through the bound model (see make_stream_step); constants:
  prepare_stream_params' (the merged step) or {} (the model's own modules)."""
  (b,) = model_lib.check_features(module.config, features_t, rank=2)
  if state["act_mask"].shape[0] != b:
    raise ValueError(f"features_t has batch size {b}, the stream state "
                     f"{state['act_mask'].shape[0]}")
  x = module.project(features_t, train=False)
  processor_state, act = module.processor.step(state["processor"], x)
  memory_tokens, memory_state = None, state["memory"]
  if module.memory is not None and constants:
    memory_tokens, memory_state = _merged_memory(module.memory, x, memory_state, constants)
  elif module.memory is not None:
    memory_tokens, memory_state = module.memory(x[:, None], jnp.ones((b, 1), bool), memory_state,
                                                train=False)
  tokens = jnp.concatenate([state["act_tokens"][:, 1:], act[:, None]], axis=1)
  mask = jnp.concatenate([state["act_mask"][:, 1:], jnp.ones((b, 1), bool)], axis=1)
  if constants:
    future = _merged_predictor(module.predictor, tokens, mask, memory_tokens, constants)
  else:
    future = module.predictor(tokens, mask, memory_tokens, train=False)
  # One classifier product for the future tokens and the act-token: each head's weights are read
  # once per step, not twice (and with constants one product for all heads).
  both = jnp.concatenate([future, act[:, None]], axis=1)
  if constants:
    heads = module.config.heads
    y = _dense(both, constants["merged"]["classifiers"], module.config.dtype)
    logits = dict(zip(heads, jnp.split(y.astype(jnp.float32),
                                       np.cumsum([heads[h] for h in heads])[:-1], axis=-1)))
  else:
    logits = module.classify(both)
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
