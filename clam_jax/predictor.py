"""The future predictor: a non-autoregressive transformer decoder of F learned future queries.

As querymamba's DETR-style QueryDecoder (its default, post-norm): the targets start at zero and the
learned query embeddings are added as positions to the queries and keys of the self-attention and to
the queries of the cross-attention at every layer; each layer is
    x = LN(x + drop(SelfAttn(x + pos, x + pos, x)))
    x = LN(x + drop(CrossAttn(x + pos, context, context)))
    x = LN(x + drop(FFN(x)))                                   (FFN: 4 * D, ReLU)
with no final norm. The context is [act-tokens + e_act ; memory tokens + e_mem], e_act and e_mem
learned type embeddings when config.type_embeddings. (choice) Dropout only on the residual branches
and inside the FFN, none on attention weights.
"""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from clam_jax.clam import FeedForward


class DecoderLayer(nn.Module):
  """One post-norm decoder layer (see module doc); the residual stream is float32."""
  config: ml_collections.ConfigDict

  def setup(self):
    config = self.config
    attention = lambda: nn.MultiHeadDotProductAttention(config.predictor_heads,
                                                        dtype=jnp.dtype(config.dtype))
    self.self_attention = attention()
    self.self_attention_norm = nn.LayerNorm(dtype=jnp.float32)
    self.cross_attention = attention()
    self.cross_attention_norm = nn.LayerNorm(dtype=jnp.float32)
    self.ffn = FeedForward(config)
    self.ffn_norm = nn.LayerNorm(dtype=jnp.float32)
    self.dropout = nn.Dropout(config.dropout)

  def attend(self, x, pos, *, train):
    """The self-attention block: x (..., F, D) float32, pos (F, D) -> (..., F, D) float32."""
    q = x + pos
    return self.self_attention_norm(
        x + self.dropout(self.self_attention(q, q, x), deterministic=not train))

  def read(self, x, pos, context, cross_mask, *, train):
    """The cross-attention and FFN blocks on the self-attended x, with `__call__`'s other
    arguments; returns `__call__`'s output."""
    drop = lambda y: self.dropout(y, deterministic=not train)
    x = self.cross_attention_norm(x + drop(self.cross_attention(x + pos, context, context,
                                                                mask=cross_mask)))
    return self.ffn_norm(x + drop(self.ffn(x, train=train)))

  def __call__(self, x, pos, context, cross_mask, *, train):
    """x: (B, F, D) float32; pos: (F, D); context: (B, Nc, D); cross_mask: (B, 1, F, Nc) bool.

    Returns (B, F, D) float32.
    """
    return self.read(self.attend(x, pos, train=train), pos, context, cross_mask, train=train)


class FuturePredictor(nn.Module):
  """[act-tokens ; memory tokens] -> F future tokens in one shot."""
  config: ml_collections.ConfigDict

  def setup(self):
    config = self.config
    type_embedding = lambda name: self.param(name, nn.initializers.normal(0.02),
                                             (config.d_model,))
    if config.type_embeddings:
      self.act_type = type_embedding("act_type")
      if config.memory:
        self.memory_type = type_embedding("memory_type")
    self.pos = self.param("future_queries", nn.initializers.xavier_uniform(),
                          (config.future_queries, config.d_model))
    self.layers = [DecoderLayer(config, name=f"layer_{i}")
                   for i in range(config.predictor_layers)]

  def first_targets(self):
    """(F, D) float32: layer 0's targets after its self-attention without dropout. The targets
    start at zero, so these depend on the params only and streaming computes them once."""
    return self.layers[0].attend(jnp.zeros(self.pos.shape, jnp.float32), self.pos, train=False)

  def __call__(self, act_tokens, act_mask, memory_tokens, *, train):
    """act_tokens: (B, N, D); act_mask: (B, N) bool (False = no token: never attended);
    memory_tokens: (B, M, D) or None (memory off).

    Returns future tokens (B, F, D) in config.dtype. Needs a "dropout" rng when train and
    config.dropout > 0. With no valid act-token and no memory the attention is uniform over the
    (zero-weight) slots, which is defined but meaningless.
    """
    config = self.config
    dtype = jnp.dtype(config.dtype)
    context, context_mask = act_tokens.astype(dtype), act_mask
    if config.type_embeddings:
      context = context + self.act_type.astype(dtype)
    if memory_tokens is not None:
      memory_tokens = memory_tokens.astype(dtype)
      if config.type_embeddings:
        memory_tokens = memory_tokens + self.memory_type.astype(dtype)
      context = jnp.concatenate([context, memory_tokens], axis=1)
      context_mask = jnp.concatenate([act_mask, jnp.ones(memory_tokens.shape[:2], bool)], axis=1)
    batch, num_queries = act_tokens.shape[0], config.future_queries
    cross_mask = jnp.broadcast_to(context_mask[:, None, None, :],
                                  (batch, 1, num_queries, context.shape[1]))
    x = jnp.zeros((batch, num_queries, config.d_model), jnp.float32)
    for layer in self.layers:
      x = layer(x, self.pos, context, cross_mask, train=train)
    return x.astype(dtype)
