"""The CLAM memory: M learnable memory tokens that read the whole observation by gated cross linear
attention, at O(1) cost per frame.

L_m pre-LayerNorm layers over the M tokens; layer l at step t maps the layer-(l-1) tokens at step t
(layer 0: the learned queries, the same at every t) through
    self-attention among the M tokens -> cross linear attention to S^l_t -> FFN (4 * D, ReLU),
each a residual block with dropout on its output, then a final LayerNorm. Per head (H =
memory_heads, DK = DV = d_model / H, tau = gate_temperature) the state of layer l is
    S^l_t = diag(exp g_t) S^l_{t-1} + phi(k_t)^T v_t,     g_t = log_sigmoid(W_g x_t) / tau <= 0,
with k_t, v_t, g_t projected from LayerNorm(x_t); the read-out of a memory token m is
    o_t[m] = DK^-1/2 phi(q_t[m]) S^l_t        (/ DK^-1/2 phi(q_t[m]) z^l_t with memory_normalize)
with q_t[m] projected from the normalised token, and z^l_t, the gated sum of phi(k_t), one extra
value column of ones in S. phi = identity or elu + 1 (memory_feature_map). Masked frames have
g = 0 and k = 0: they leave S as it was.

(choice) x_t are the projected frame features (the processor's input), not the act-tokens: the
memory keeps the per-frame evidence and does not wait for the processor.

S^l_t depends on the frames only, never on the memory tokens, so every layer's state is one call of
`pallas.gated_linear_attention` over the frames; the tokens are needed at one step only (the last
one for the predictor, the current one in streaming), so they are read out of S_T directly rather
than through the op's per-step outputs (T * M * D values per layer, all but one step unused).
The same code serves a full sequence (state None) and one streaming step (T = 1, the carried state;
the op's "auto" implementation runs one step as fused elementwise ops, not a kernel).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

import pallas

FEATURE_MAPS = ("identity", "elu1")
_NORMALIZER_EPS = 1e-6


def check_memory_config(config):
  """Raises ValueError naming the config.model field that cannot describe a memory."""
  if config.memory_feature_map not in FEATURE_MAPS:
    raise ValueError(f"config.model.memory_feature_map: expected one of {FEATURE_MAPS}, "
                     f"found {config.memory_feature_map!r}")
  if config.memory_normalize and config.memory_feature_map != "elu1":
    raise ValueError("config.model.memory_normalize=True needs memory_feature_map='elu1': with "
                     "identity features the normaliser q . z can be 0 or negative")
  if config.d_model % config.memory_heads:
    raise ValueError(f"config.model.d_model ({config.d_model}) must be a multiple of "
                     f"config.model.memory_heads ({config.memory_heads})")
  if not config.gate_temperature > 0:
    raise ValueError(f"config.model.gate_temperature must be > 0, found {config.gate_temperature}")


def state_shape(config, batch_size):
  """Shape of one layer's state: (batch_size, H, DK, DV + memory_normalize)."""
  dk = config.d_model // config.memory_heads
  return (batch_size, config.memory_heads, dk, dk + int(config.memory_normalize))


def init_memory_state(config, batch_size):
  """Zero streaming state: a tuple of memory_layers float32 arrays of `state_shape`."""
  return tuple(jnp.zeros(state_shape(config, batch_size), jnp.float32)
               for _ in range(config.memory_layers))


def _feature_map(name, x):
  return jax.nn.elu(x) + 1 if name == "elu1" else x


class CrossLinearAttention(nn.Module):
  """Gated cross linear attention of M token queries to the frames seen so far (see module doc)."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, tokens, frames, mask, state, projections=None):
    """tokens: (B, M, D) normalised queries at step T; frames: (B, T, D) normalised frames;
    mask: (B, T) bool; state: (B, H, DK, DV') float32 before frame 1, or None (zeros);
    projections: {name: projection} computed beforehand, for any of "query" ((B, M, H, DK): tokens
    is then unused) and "key", "value", "gate" (all three, each (B, T, H, DK): frames is then
    unused), in config.dtype (streaming's merged products), or None.

    Returns (read-out (B, M, D) at step T in config.dtype, S_T (B, H, DK, DV') float32).
    """
    config = self.config
    dtype = jnp.dtype(config.dtype)
    heads, dk = config.memory_heads, config.d_model // config.memory_heads
    project = lambda name: nn.DenseGeneral((heads, dk), dtype=dtype, name=name)
    phi = lambda x: _feature_map(config.memory_feature_map, x)
    projections = dict(projections or {})
    if "query" not in projections:
      projections["query"] = project("query")(tokens)
    if "key" not in projections:
      projections.update({name: project(name)(frames) for name in ("key", "value", "gate")})
    q = phi(projections["query"])                                # (B, M, H, DK)
    k = jnp.where(mask[..., None, None], phi(projections["key"]), 0)
    v = projections["value"]
    g = jax.nn.log_sigmoid(projections["gate"].astype(jnp.float32)) / config.gate_temperature
    g = jnp.where(mask[..., None, None], g, 0)
    if config.memory_normalize:
      v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)
    # Only S_T is used: the op's own read-out gets one zero query per step (see module doc).
    _, state = pallas.gated_linear_attention(
        jnp.zeros_like(k), k, v, g, initial_state=state, return_final_state=True,
        implementation=config.scan_impl)
    o = dk ** -0.5 * jnp.einsum("bmhk,bhkv->bmhv", q.astype(jnp.float32), state,
                                precision="highest")
    if config.memory_normalize:
      o = o[..., :-1] / (o[..., -1:] + _NORMALIZER_EPS)
    out = nn.DenseGeneral(config.d_model, axis=(-2, -1), dtype=dtype, name="out")
    return out(o.astype(dtype)), state


class FeedForward(nn.Module):
  """Dense(4 D) -> ReLU -> dropout -> Dense(D) as querymamba's decoder FFN; (..., D) -> (..., D)."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x, *, train):
    dtype = jnp.dtype(self.config.dtype)
    x = nn.relu(nn.Dense(4 * self.config.d_model, dtype=dtype, name="hidden")(x))
    x = nn.Dropout(self.config.dropout)(x, deterministic=not train)
    return nn.Dense(self.config.d_model, dtype=dtype, name="out")(x)


class MemoryLayer(nn.Module):
  """One memory layer: self-attention, cross linear attention, FFN; pre-LayerNorm residuals."""
  config: ml_collections.ConfigDict

  def setup(self):
    config = self.config
    dtype = jnp.dtype(config.dtype)
    norm = lambda: nn.LayerNorm(dtype=dtype)
    self.self_attention_norm = norm()
    self.self_attention = nn.MultiHeadDotProductAttention(config.memory_heads, dtype=dtype)
    self.cross_attention_norm = norm()
    self.frame_norm = norm()
    self.cross_attention = CrossLinearAttention(config)
    self.ffn_norm = norm()
    self.ffn = FeedForward(config)
    self.dropout = nn.Dropout(config.dropout)

  def attend(self, tokens, *, train):
    """The self-attention block: tokens (..., M, D) float32 -> (..., M, D) float32."""
    h = self.self_attention_norm(tokens)
    return tokens + self.dropout(self.self_attention(h), deterministic=not train)

  def read(self, tokens, frames, mask, state, *, train, projections=None):
    """The cross-attention and FFN blocks on the self-attended tokens (B, M, D) float32, with
    `__call__`'s other arguments; returns `__call__`'s outputs. projections: as
    CrossLinearAttention's, of the normalised tokens and frames; or None."""
    projections = projections or {}
    read, state = self.cross_attention(
        None if "query" in projections else self.cross_attention_norm(tokens),
        None if "key" in projections else self.frame_norm(frames), mask, state, projections)
    tokens = tokens + self.dropout(read, deterministic=not train)
    h = self.ffn(self.ffn_norm(tokens), train=train)
    return tokens + self.dropout(h, deterministic=not train), state

  def __call__(self, tokens, frames, mask, state, *, train):
    """tokens: (B, M, D) float32, the previous layer's tokens at step T; frames: (B, T, D);
    mask: (B, T) bool; state: (B, H, DK, DV') float32 or None.

    Returns (tokens (B, M, D) float32 at step T, S_T).
    """
    return self.read(self.attend(tokens, train=train), frames, mask, state, train=train)


class CLAMMemory(nn.Module):
  """The memory_layers-layer CLAM memory over memory_tokens learned queries (see module doc)."""
  config: ml_collections.ConfigDict

  def setup(self):
    config = self.config
    check_memory_config(config)
    self.queries = self.param("queries", nn.initializers.normal(0.02),
                              (config.memory_tokens, config.d_model))
    self.layers = [MemoryLayer(config, name=f"layer_{i}") for i in range(config.memory_layers)]
    self.final_norm = nn.LayerNorm(dtype=jnp.dtype(config.dtype))

  def first_tokens(self):
    """(M, D) float32: layer 0's tokens after its self-attention without dropout. They depend on
    the params only (layer 0 starts from the learned queries at every step), so streaming computes
    them once."""
    return self.layers[0].attend(self.queries, train=False)

  def __call__(self, frames, mask, state=None, *, train):
    """frames: (B, T, D) projected frame features; mask: (B, T) bool (False = padding);
    state: `init_memory_state(config, B)` (the memory before frame 1) or None (zeros).

    Returns (memory tokens at step T (B, M, D) in config.dtype, new state: a tuple of S_T, one per
    layer). Needs a "dropout" rng when train and config.dropout > 0.
    """
    tokens = jnp.broadcast_to(self.queries, (frames.shape[0],) + self.queries.shape)
    states = []
    for i, layer in enumerate(self.layers):
      tokens, layer_state = layer(tokens, frames, mask, None if state is None else state[i],
                                  train=train)
      states.append(layer_state)
    return self.final_norm(tokens), tuple(states)
