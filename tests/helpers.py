"""Helpers shared by the tests: a tiny model config and random params for it, relative errors,
Pallas kernels lowered for an abstract GPU, and the streaming benchmark loaded as a module
(benchmarks/ is not a package)."""

import functools
import importlib.util
import os

import jax
import ml_collections
import numpy as np
import pytest

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


def random_params(config, modalities=MODALITIES):
  """Random params of CLAM(config) (0.5 * standard normal, seed 1; not the init: random norms,
  biases and type embeddings exercise the streaming step's folds)."""
  from clam_jax.model import CLAM  # the kernel tests import this module without the model

  features = {m: np.ones((1, 2, d), np.float32) for m, d in modalities.items()}
  shapes = jax.eval_shape(functools.partial(CLAM(config).init, train=False), jax.random.key(0),
                          features, np.ones((1, 2), bool))["params"]
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda s: 0.5 * rng.standard_normal(s.shape).astype(s.dtype), shapes)


def lower_for_h100(fn, *args):
  """StableHLO text of jax.jit(fn) on args (arrays or ShapeDtypeStructs) lowered for an abstract
  H100, Pallas kernels through the Triton backend (not compiled: Triton's own compile errors show
  only on a GPU). Skips the test on a JAX that cannot lower Triton kernels without a GPU."""
  h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                     platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)
  with jax.sharding.use_abstract_mesh(mesh):
    try:
      return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as e:
      if "No supported GPU devices found" in str(e):
        pytest.skip(f"this JAX cannot lower Triton kernels without a GPU: {e}")
      raise


def rel_err(x, ref):
  """||x - ref|| / ||ref|| in float64."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def max_rel_err(out, ref):
  """The largest rel_err over the leaves of two pytrees of the same structure."""
  return max(rel_err(x, r) for x, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))


def load_benchmark(name):
  """benchmarks/<name>.py as a module."""
  spec = importlib.util.spec_from_file_location(
      f"{name}_benchmark", os.path.join(os.path.dirname(__file__), "..", "benchmarks",
                                        f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
