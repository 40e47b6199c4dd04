"""Helpers shared by the model and streaming tests: a tiny model config, relative errors, and the
streaming benchmark loaded as a module (benchmarks/ is not a package)."""

import importlib.util
import os

import jax
import ml_collections
import numpy as np

MODALITIES = {"rgb": 20, "flow": 6}


def model_config(**overrides):
  """A tiny CLAM config.model (every field set, two modalities); overrides replace fields."""
  fields = dict(
      modalities=MODALITIES, d_model=32, dropout=0.1, dtype="float32", processor="mamba",
      processor_layers=1, ssm=dict(d_state=4, d_conv=4, expand=2), memory=True, memory_tokens=4,
      memory_layers=2, memory_heads=2, memory_feature_map="identity", memory_normalize=False,
      gate_temperature=16.0, scan_impl="auto", num_act_tokens=5, act_token_selection="fifo",
      type_embeddings=True, future_queries=3, predictor_layers=1, predictor_heads=2,
      heads={"verb": 7, "noun": 11})
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def rel_err(x, ref):
  """||x - ref|| / ||ref|| in float64."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def max_rel_err(out, ref):
  """The largest rel_err over the leaves of two pytrees of the same structure."""
  return max(rel_err(x, r) for x, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))


def load_streaming_benchmark():
  """benchmarks/streaming.py as a module."""
  spec = importlib.util.spec_from_file_location(
      "streaming_benchmark", os.path.join(os.path.dirname(__file__), "..", "benchmarks",
                                          "streaming.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
