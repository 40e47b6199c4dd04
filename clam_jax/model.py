"""CLAM: frame features -> act-tokens and memory tokens -> future tokens -> logits.

    x_t    = dropout(sum_m Dense_m(features_m[t]))                  per-modality input projections
    act    = Processor(x, mask)                                     (B, T, D) act-tokens
    memory = CLAMMemory(x, mask) at the last step                   (B, M, D)   (if config.memory)
    tokens = the N = num_act_tokens selected act-tokens             (B, N, D) and their mask
    future = FuturePredictor(tokens, mask, memory)                  (B, F, D)
    logits = one Dense per head, shared by act-tokens ("past", (B, T, C)) and future tokens
             ("future", (B, F, C)), returned in float32.

    model = CLAM(config.model)
    variables = model.init({"params": k1, "dropout": k2}, features, mask, train=False)
    out = model.apply(variables, features, mask, train=True, rngs={"dropout": k})

Parameters: {"projections_<modality>", "processor", "memory" (if config.memory), "predictor",
"classifiers_<head>"}. The only rng besides "params" is "dropout" (train=True, config.dropout > 0).
One frame at a time: clam_jax.streaming.
"""

from collections.abc import Mapping

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from clam_jax.clam import CLAMMemory, check_memory_config
from clam_jax.predictor import FuturePredictor
from clam_jax.processor import Processor, check_processor_config

SELECTIONS = ("fifo", "uniform")


def check_config(config):
  """Raises ValueError naming the config.model field that the model cannot be built from."""
  check_processor_config(config)
  if config.memory:
    check_memory_config(config)
  if config.act_token_selection not in SELECTIONS:
    raise ValueError(f"config.model.act_token_selection: expected one of {SELECTIONS}, found "
                     f"{config.act_token_selection!r}")
  for field in ("num_act_tokens", "future_queries", "predictor_layers"):
    if config[field] < 1:
      raise ValueError(f"config.model.{field} must be >= 1, found {config[field]}")
  if config.d_model % config.predictor_heads:
    raise ValueError(f"config.model.d_model ({config.d_model}) must be a multiple of "
                     f"config.model.predictor_heads ({config.predictor_heads})")
  if not config.modalities or not config.heads:
    raise ValueError(f"config.model.modalities and config.model.heads must be non-empty, found "
                     f"{dict(config.modalities)} and {dict(config.heads)}")


def check_features(config, features, rank):
  """Checks features {modality: (*lead, F_m)} against config.modalities; returns lead, the shared
  leading shape of rank - 1 ((B, T) for a window, (B,) for a streaming frame)."""
  if not isinstance(features, Mapping) or set(features) != set(config.modalities):
    found = sorted(features) if isinstance(features, Mapping) else type(features).__name__
    raise ValueError(f"features must be a dict with the modalities of config.model.modalities "
                     f"{sorted(config.modalities)}, found {found}")
  lead = None
  for name, x in sorted(features.items()):
    if x.ndim != rank:
      raise ValueError(f"features[{name!r}] must have rank {rank}, found shape {tuple(x.shape)}")
    if x.shape[-1] != config.modalities[name]:
      raise ValueError(f"modality {name!r} has feature dim {x.shape[-1]}, "
                       f"config.model.modalities.{name} expects {config.modalities[name]}")
    if x.shape[0] < 1:
      raise ValueError(f"features[{name!r}] must hold B >= 1 windows or streams, found shape "
                       f"{tuple(x.shape)}")
    if lead is None:
      lead = tuple(x.shape[:-1])
    elif tuple(x.shape[:-1]) != lead:
      raise ValueError(f"features[{name!r}] has leading shape {tuple(x.shape[:-1])}, the other "
                       f"modalities {lead}")
  return lead


def check_inputs(config, features, mask):
  """Checks a window: features {modality: (B, T, F_m)}, mask (B, T) bool with T >= 1."""
  lead = check_features(config, features, rank=3)
  if tuple(mask.shape) != lead or mask.dtype != jnp.bool_:
    raise ValueError(f"mask must be bool of shape (B, T) = {lead} as the features, found "
                     f"{mask.dtype} {tuple(mask.shape)}")
  if lead[1] < 1:
    raise ValueError(f"the window must hold T >= 1 frames, found features of shape (B, T) = {lead}")


def select_act_tokens(tokens, mask, num, selection):
  """The act-tokens that reach the predictor.

  tokens: (B, T, D); mask: (B, T) bool. Returns (B, num, D) tokens and their (B, num) mask.
  "fifo": the last num frames of the window. "uniform": num frames evenly spaced over the window's
  n real frames, the last one included (indices T - n + floor((j + 1) n / num) - 1, j < num;
  windows are left-padded, so the real frames are the last n); when n < num, as "fifo". A window
  shorter than num is left-padded with masked slots first.
  """
  t = tokens.shape[1]
  if t < num:
    tokens = jnp.pad(tokens, ((0, 0), (num - t, 0), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (num - t, 0)))
    t = num
  if selection == "fifo":
    return tokens[:, t - num:], mask[:, t - num:]
  n = mask.sum(axis=1, keepdims=True)
  j = jnp.arange(num)
  index = jnp.where(n >= num, t - n + (j + 1) * n // num - 1, t - num + j)
  return (jnp.take_along_axis(tokens, index[..., None], axis=1),
          jnp.take_along_axis(mask, index, axis=1))


class CLAM(nn.Module):
  """The CLAM model (see module doc); its submodules are used one frame at a time by streaming."""
  config: ml_collections.ConfigDict

  def setup(self):
    config = self.config
    check_config(config)
    dtype = jnp.dtype(config.dtype)
    self.projections = {name: nn.Dense(config.d_model, dtype=dtype) for name in config.modalities}
    self.input_dropout = nn.Dropout(config.dropout)
    self.processor = Processor(config)
    self.memory = CLAMMemory(config) if config.memory else None
    self.predictor = FuturePredictor(config)
    self.classifiers = {head: nn.Dense(classes, dtype=dtype)
                        for head, classes in config.heads.items()}

  def project(self, features, *, train):
    """features: {modality: (..., F_m)} -> (..., D) in config.dtype (modalities summed)."""
    x = sum(self.projections[name](features[name]) for name in sorted(features))
    return self.input_dropout(x, deterministic=not train)

  def classify(self, tokens):
    """tokens: (..., D) -> {head: (..., C_head) float32 logits}."""
    return {head: dense(tokens).astype(jnp.float32) for head, dense in self.classifiers.items()}

  def __call__(self, features, mask, *, train):
    """features: {modality: (B, T, F_m) float}; mask: (B, T) bool (True = real frame; windows are
    left-padded, padding frames change no state).

    Returns {"future": {head: (B, F, C_head)}, "past": {head: (B, T, C_head)}} float32 logits; the
    future ones depend on the real frames only.
    """
    check_inputs(self.config, features, mask)
    x = self.project(features, train=train)
    act = self.processor(x, mask, train=train)
    memory = None if self.memory is None else self.memory(x, mask, train=train)[0]
    tokens, token_mask = select_act_tokens(act, mask, self.config.num_act_tokens,
                                           self.config.act_token_selection)
    future = self.predictor(tokens, token_mask, memory, train=train)
    return {"future": self.classify(future), "past": self.classify(act)}
