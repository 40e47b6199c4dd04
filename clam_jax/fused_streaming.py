"""The streaming step in fused Pallas kernels: the same step as clam_jax.streaming, ~52 launches.

    fused = prepare_fused_params(params, config.model)        # once
    state, out = fused_stream_step(fused, state, features_t)  # jax.jit it; state and out as
                                                              # streaming.stream_step's

At batch 1 the step is a chain of products of a few rows. XLA runs it as 139 kernels on an H200
(EK100, busy 359 of 383 us per frame: kernel time, not launch gaps, dominates). Here each product
carries its normalisation, bias, activation and residual (pallas.fused_dense), each attention is
one kernel over its heads (pallas.small_attention), a Mamba block is two kernels plus its
out-projection (pallas.mamba_step) and the memory's state update is one kernel for every layer
(pallas.memory_step). Residual streams are kept before their LayerNorm: the next kernel
normalises its own input rows (post-norm predictor layers included), so no kernel waits for a
separate normalisation. The processor and the memory do not depend on each other until the
predictor, and XLA runs the kernels of a loop body one at a time: their kernels go in pairs into
shared launches (pallas.kernel_call.run_side_by_side). On an H100 (EK100, bf16, batch 1) a frame
takes 0.205 ms in a lax.scan (each kernel alone: 0.226) against XLA's 0.350
(benchmarks/RESULTS.md). For batch 1: at batch B every stream re-reads the weights (7x slower
than streaming.stream_step at B = 64).

Supported: the Mamba processor, memory on or off with memory_normalize=False, any number of layers,
a power-of-two number of memory tokens (every config in configs/); `check_fused_config` names
what is not. Context rows and future queries are padded to powers of two (never attended).
Weights are in config.dtype; outputs equal stream_step's up to the compute dtype's rounding
(float32: ~1e-6).
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from clam_jax import streaming
from clam_jax.processor import NORM_EPS
from pallas import checks
from pallas.fused_dense import Norm, fused_dense, fused_dense_call
from pallas.kernel_call import run_side_by_side
from pallas.mamba_step import mamba_in_conv_call, mamba_scan_gate_call, pack_x_proj
from pallas.memory_step import memory_readout_call, memory_update_call
from pallas.small_attention import small_attention, small_attention_call

_LAYER_NORM_EPS = 1e-6  # Flax's LayerNorm default, which every LayerNorm of the model keeps
_CLASSIFIER_BLOCK = 64  # the classifier's columns are padded to a multiple of fused_dense's block


def check_fused_config(model_config):
  """Raises ValueError naming the config.model field that the fused step does not support."""
  config = model_config
  if config.processor != "mamba":
    raise ValueError(f"the fused step needs config.model.processor='mamba', found "
                     f"{config.processor!r} (use streaming.make_stream_step)")
  if config.memory and config.memory_normalize:
    raise ValueError("the fused step needs config.model.memory_normalize=False")
  if config.act_token_selection != "fifo":
    raise ValueError("config.model.act_token_selection must be 'fifo' to stream")
  if not checks.is_power_of_two(config.memory_tokens):
    raise ValueError(f"the fused step needs config.model.memory_tokens to be a power of two, "
                     f"found {config.memory_tokens}")


def _norm(weights, eps=_LAYER_NORM_EPS, kind="layer"):
  """A Flax LayerNorm / RMSNorm's params as a fused_dense Norm."""
  return Norm(kind, weights.get("scale"), weights.get("bias"), eps)


def prepare_fused_params(params, model_config):
  """The fused step's weights, from the model's variables["params"].

  streaming.prepare_stream_params(params, config, cast=True) (merged products, params-only
  constants, Dense weights in config.dtype) plus: the Mamba blocks' x_proj / dt_proj packed for
  the kernels (pack_x_proj) and A = -exp(A_log), DenseGeneral kernels flattened to (D_in, D_out),
  the predictor's query positions folded into its cross-attention query biases, its context's
  per-token bias rows zero-padded to a power of two (as the context rows are), the classifier
  columns zero-padded to a multiple of 64, and every Dense kernel stored transposed, as "weight"
  (N, K) (fused_dense's layout). Returns a pytree of arrays.
  """
  check_fused_config(model_config)
  config = model_config
  dtype = jnp.dtype(config.dtype)
  prepared = streaming.prepare_stream_params(params, config, cast=True)
  p, constants = prepared["params"], prepared["constants"]
  merged = constants["merged"]
  flat = streaming.flat_dense
  layers = []
  for i in range(config.processor_layers):
    block = p["processor"][f"layer_{i}"]
    x_packed, dt_packed = pack_x_proj(block["x_proj"]["kernel"], block["dt_proj"]["kernel"],
                                      dt_rank=block["dt_proj"]["kernel"].shape[0],
                                      d_state=config.ssm.d_state)
    layers.append({
        "norm_scale": p["processor"][f"norm_{i}"]["scale"],
        "in_weight": block["in_proj"]["kernel"].T,
        "conv_kernel": block["conv_kernel"], "conv_bias": block["conv_bias"],
        "x_packed": x_packed, "dt_packed": dt_packed, "dt_bias": block["dt_bias"],
        "A": -jnp.exp(block["A_log"]), "D": block["D"],
        "out_weight": block["out_proj"]["kernel"].T})
  fused = {"projections": {name: p[f"projections_{name}"] for name in config.modalities},
           "processor": {"layers": layers, "final_norm": p["processor"]["final_norm"]}}
  if config.memory:
    memory = p["memory"]
    fused["memory"] = {
        "frames": merged["memory_frames"], "queries": constants["memory_queries"],
        "tokens": constants["memory_tokens"][None], "final_norm": memory["final_norm"],
        "layers": [{
            "self_attention_norm": memory[f"layer_{i}"].get("self_attention_norm"),
            "self_attention": merged.get("memory_layers", {}).get(f"layer_{i}"),
            "cross_attention_norm": memory[f"layer_{i}"].get("cross_attention_norm"),
            "query": (flat(memory[f"layer_{i}"]["cross_attention"]["query"]) if i else None),
            "out": flat(memory[f"layer_{i}"]["cross_attention"]["out"]),
            "ffn_norm": memory[f"layer_{i}"]["ffn_norm"], "ffn": memory[f"layer_{i}"]["ffn"]}
            for i in range(config.memory_layers)]}
  predictor = p["predictor"]
  pos = params["predictor"]["future_queries"]
  predictor_layers = []
  for i in range(config.predictor_layers):
    weights = dict(merged["predictor_layers"][f"layer_{i}"])
    if i:  # (x + pos) W + b = x W + (pos W + b), one bias row per future query
      query = weights["cross_query"]
      weights["cross_query"] = {"kernel": query["kernel"], "bias": (
          jnp.matmul(pos, query["kernel"].astype(jnp.float32), precision="highest")
          + query["bias"].astype(jnp.float32)).astype(dtype)}
    layer = predictor[f"layer_{i}"]
    predictor_layers.append({**weights, **{name: layer[name] for name in (
        "self_attention_norm", "cross_attention_norm", "ffn_norm", "ffn") if name in layer}})
  # The context's and the future queries' rows are padded to powers of two in the step (the
  # kernels' tiles), and so are their bias rows here (one per context token / future query).
  pad_bias_rows = lambda weights: (
      {**weights, "bias": _pad_rows(weights["bias"], axis=0)}
      if isinstance(weights, dict) and getattr(weights.get("bias"), "ndim", 1) == 2 else weights)
  fused["predictor"] = {
      "context": pad_bias_rows(merged["predictor_context"]),
      "layers": [{name: pad_bias_rows(weights) for name, weights in layer.items()}
                 for layer in predictor_layers],
      "targets": _pad_rows(constants["future_targets"][None]),
      "queries": _pad_rows(constants["predictor_queries"].reshape(1, config.future_queries, -1))}
  classifiers = merged["classifiers"]
  pad = -classifiers["kernel"].shape[1] % _CLASSIFIER_BLOCK
  fused["classifiers"] = {"kernel": jnp.pad(classifiers["kernel"], ((0, 0), (0, pad))),
                          "bias": jnp.pad(classifiers["bias"], (0, pad))}
  return _transposed(fused)


def _transposed(tree):
  """Every {"kernel": (K, N), "bias"} in tree as {"weight": (N, K), "bias"}: fused_dense's
  layout."""
  if isinstance(tree, dict):
    return {("weight" if key == "kernel" else key):
            (value.T if key == "kernel" else _transposed(value)) for key, value in tree.items()}
  if isinstance(tree, list):
    return [_transposed(value) for value in tree]
  return tree


def _processor(config, fused, carry, x, in_conv_warps):
  """x: (B, 1, D) -> (carry, pre-norm residual stream (B, 1, D) float32). A branch: it yields its
  KernelCalls and is sent their results (kernel_call.run_side_by_side)."""
  h, new_carry = x.astype(jnp.float32), []
  for layer, layer_carry in zip(fused["layers"], carry):
    u, z, conv, partial = yield mamba_in_conv_call(
        h[:, 0], layer["norm_scale"], layer["in_weight"], layer_carry["conv"],
        layer["conv_kernel"], layer["conv_bias"], layer["x_packed"], eps=NORM_EPS,
        num_warps=in_conv_warps)
    x_proj = jnp.sum(partial, axis=1)  # once: every scan_gate program needs all of it
    y, ssm = yield mamba_scan_gate_call(x_proj, layer["dt_packed"], layer["dt_bias"], layer["A"],
                                        layer["D"], layer_carry["ssm"], u, z,
                                        d_state=config.ssm.d_state)
    h = yield fused_dense_call(y[:, None], layer["out_weight"], residual=h)
    new_carry.append({"conv": conv, "ssm": ssm})
  return tuple(new_carry), h


def _ffn(weights, x, norm):
  """The FFN block on the pre-norm stream x (B, R, D): norm(x) + FFN(norm(x)), pre-norm out."""
  hidden = fused_dense(x, weights["ffn"]["hidden"]["weight"], weights["ffn"]["hidden"]["bias"],
                       norm=norm, activation="relu")
  return fused_dense(hidden, weights["ffn"]["out"]["weight"], weights["ffn"]["out"]["bias"],
                     residual=x, residual_norm=norm)


def _memory(config, fused, states, x):
  """x: (B, 1, D) -> (memory tokens before their final LayerNorm (B, M, D) float32, states). A
  branch, as _processor."""
  heads, feature_map = config.memory_heads, config.memory_feature_map
  frames = yield fused_dense_call(x, fused["frames"]["weight"], fused["frames"]["bias"],
                                  norm=Norm("layer", eps=_LAYER_NORM_EPS))
  read, states = yield memory_update_call(
      frames[:, 0], states, fused["queries"], num_heads=heads,
      gate_temperature=config.gate_temperature, feature_map=feature_map)
  tokens = fused["tokens"]
  for i, layer in enumerate(fused["layers"]):
    if i:
      norm = _norm(layer["self_attention_norm"])
      qkv = yield fused_dense_call(tokens, layer["self_attention"]["qkv"]["weight"],
                                   layer["self_attention"]["qkv"]["bias"], norm=norm)
      attended = yield small_attention_call(qkv, qkv, qkv, num_heads=heads,
                                            width=config.d_model, column_blocks=(0, 1, 2))
      tokens = yield fused_dense_call(attended, layer["self_attention"]["out"]["weight"],
                                      layer["self_attention"]["out"]["bias"], residual=tokens)
      query = yield fused_dense_call(tokens, layer["query"]["weight"], layer["query"]["bias"],
                                     norm=_norm(layer["cross_attention_norm"]))
      read = yield memory_readout_call(query, states[i], feature_map=feature_map)
    tokens = yield fused_dense_call(read, layer["out"]["weight"], layer["out"]["bias"],
                                    residual=tokens)
    # Pre-norm layers: the FFN's residual is the stream itself, not its normalisation.
    hidden = yield fused_dense_call(tokens, layer["ffn"]["hidden"]["weight"],
                                    layer["ffn"]["hidden"]["bias"], norm=_norm(layer["ffn_norm"]),
                                    activation="relu")
    tokens = yield fused_dense_call(hidden, layer["ffn"]["out"]["weight"],
                                    layer["ffn"]["out"]["bias"], residual=tokens)
  return tokens, states


def _predictor(config, fused, context, mask):
  """context: (B, N + M, D) act-tokens then memory tokens (before the memory's final LayerNorm:
  fused["context_norm"]); mask (B, N + M) bool (both padded to a power of two) -> (future
  tokens before the last LayerNorm (B, F padded to a power of two, D) float32, that LayerNorm)."""
  heads = config.predictor_heads
  rows = fused["targets"].shape[1]  # F future queries, padded to a power of two
  future_mask = (None if rows == config.future_queries else jnp.broadcast_to(
      jnp.arange(rows) < config.future_queries, (context.shape[0], rows)))
  keys_values = fused_dense(context, fused["context"]["weight"], fused["context"]["bias"],
                            norm=fused.get("context_norm"), norm_from_row=config.num_act_tokens)
  x, norm = fused["targets"], None
  for i, layer in enumerate(fused["layers"]):
    if "self_value_out" in layer:  # F = 1: a query attends to itself alone (merge_projections)
      x = fused_dense(x, layer["self_value_out"]["weight"], layer["self_value_out"]["bias"],
                      norm=norm, residual=x, residual_norm=norm)
    elif i:  # the positions are folded into the qkv bias rows
      qkv = fused_dense(x, layer["self_qkv"]["weight"], layer["self_qkv"]["bias"], norm=norm)
      attended = small_attention(qkv, qkv, qkv, num_heads=heads, width=config.d_model,
                                 column_blocks=(0, 1, 2), mask=future_mask)
      x = fused_dense(attended, layer["self_out"]["weight"], layer["self_out"]["bias"],
                      residual=x, residual_norm=norm)
    if i:
      norm = _norm(layer["self_attention_norm"])
      query = fused_dense(x, layer["cross_query"]["weight"], layer["cross_query"]["bias"],
                          norm=norm)
    else:
      query = fused["queries"]
    attended = small_attention(query, keys_values, keys_values, num_heads=heads,
                               width=config.d_model, column_blocks=(0, 2 * i, 2 * i + 1),
                               mask=mask)
    x = fused_dense(attended, layer["cross_out"]["weight"], layer["cross_out"]["bias"],
                    residual=x, residual_norm=norm)
    norm = _norm(layer["cross_attention_norm"])
    x = _ffn(layer, x, norm)
    norm = _norm(layer["ffn_norm"])
  return x, norm


def _pad_rows(x, axis=1):
  """x with zero (False) rows appended along axis up to a power-of-two length."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, (1 << (x.shape[axis] - 1).bit_length()) - x.shape[axis])
  return jnp.pad(x, pad)


def fused_stream_step(model_config, fused, state, features_t, side_by_side=True):
  """streaming.stream_step's step through the fused kernels.

  fused: prepare_fused_params' output; state: streaming.init_stream_state's pytree;
  features_t: {modality: (B, F_m)}. Returns (state, {"future": {head: (B, F, C)}, "past": {head:
  (B, C)}}) float32 logits, as stream_step.
  side_by_side: the processor's and the memory's kernels (independent until the predictor) run in
  shared launches, a kernel of each per launch (kernel_call.run_side_by_side); False: each kernel
  alone, one branch after the other (for comparison; the same results up to the rounding of
  sums taken by other numbers of warps).
  """
  config = model_config
  dtype = jnp.dtype(config.dtype)
  x = None
  for name in sorted(config.modalities):
    projection = fused["projections"][name]
    x = fused_dense(features_t[name][:, None], projection["weight"],
                    projection["bias"], residual=x)
  x = x.astype(dtype)
  # A shared launch runs every program with the most warps of its kernels: mamba_in_conv's 8
  # (its best alone) slowed the kernels beside it, and 4 made the step 4 % faster (H100, EK100:
  # 0.2005 vs 0.2098 ms per frame, benchmarks/RESULTS.md).
  branches = [_processor(config, fused["processor"], state["processor"], x,
                         in_conv_warps=4 if side_by_side else 8)]
  if config.memory:  # the memory's programs first in each shared grid: ~1 % faster
    branches.insert(0, _memory(config, fused["memory"], state["memory"], x))
  if side_by_side:
    results = run_side_by_side(*branches)
  else:
    results = [run_side_by_side(branch)[0] for branch in branches]
  processor_state, h = results[-1]
  act = nn.RMSNorm(NORM_EPS, dtype=dtype).apply(                          # (B, 1, D)
      {"params": fused["processor"]["final_norm"]}, h)
  tokens = jnp.concatenate([state["act_tokens"][:, 1:], act], axis=1)
  b = act.shape[0]
  mask = jnp.concatenate([state["act_mask"][:, 1:], jnp.ones((b, 1), bool)], axis=1)
  context, context_mask, predictor = tokens, mask, dict(fused["predictor"])
  memory_state = state["memory"]
  if config.memory:
    memory_tokens, memory_state = results[0]
    context = jnp.concatenate([tokens.astype(jnp.float32), memory_tokens], axis=1)
    context_mask = jnp.concatenate([mask, jnp.ones(memory_tokens.shape[:2], bool)], axis=1)
    predictor["context_norm"] = _norm(fused["memory"]["final_norm"])
  # The kernels' tiles need power-of-two rows: padded context rows are never attended.
  context, context_mask = _pad_rows(context), _pad_rows(context_mask)
  future, future_norm = _predictor(config, predictor, context, context_mask)
  # One classifier product for the act-token (row 0, as it is) and the future tokens (their last
  # LayerNorm applied in the kernel); rows padded to a power of two.
  rows = _pad_rows(jnp.concatenate([act.astype(jnp.float32), future], axis=1))
  logits = fused_dense(rows, fused["classifiers"]["weight"], fused["classifiers"]["bias"],
                       norm=future_norm, norm_from_row=1).astype(jnp.float32)
  bounds = np.cumsum(list(config.heads.values()))
  heads = dict(zip(config.heads, np.split(np.arange(bounds[-1]), bounds[:-1])))
  num_future = config.future_queries
  out = {"future": {}, "past": {}}
  for head, columns in heads.items():
    y = logits[..., columns[0]:columns[-1] + 1]
    out["future"][head], out["past"][head] = y[:, 1:1 + num_future], y[:, 0]
  new_state = {"processor": processor_state, "memory": memory_state, "act_tokens": tokens,
               "act_mask": mask, "step": state["step"] + 1}
  return new_state, out


def make_fused_stream_step(model_config, side_by_side=True):
  """Returns fused_stream_step bound to model_config (and side_by_side): (fused, state,
  features_t) -> (state, out). Raises ValueError for a config the fused kernels do not support
  (check_fused_config)."""
  check_fused_config(model_config)
  return lambda fused, state, features_t: fused_stream_step(model_config, fused, state,
                                                            features_t, side_by_side)
