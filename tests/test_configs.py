"""The configs in configs/: fields, the seed hyper-parameters, and models they build."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from clam_jax import model as model_lib
from clam_jax import train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("demo", "ek100", "ego4d", "thumos14")
FIELDS = {
    "optimizer": {"lr", "weight_decay", "warmup_epochs", "clip_norm", "b1", "b2"},
    "loss": {"weights", "past_loss_weight", "label_smoothing"},
    "train": {"num_epochs", "log_every_steps", "eval_every_epochs", "checkpoint_every_epochs",
              "keep", "on_nonfinite"},
    "eval": {"split", "batch_size", "best_metric", "best_mode", "subsets_dir"},
}


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("name", NAMES)
def test_config_has_every_section_and_field(name):
  config = load_config(name)
  assert isinstance(config.seed, int)
  for section, fields in FIELDS.items():
    assert set(config[section]) == fields, section
  # All configs describe the same model fields (one model, four sizes).
  assert set(config.model) == set(load_config("ek100").model)
  assert set(config.loss.weights) == set(config.model.heads)
  assert dict(config.data.modalities) == dict(config.model.modalities)
  assert config.data.batch_size % 8 == 0 or config.data.batch_size == 1
  model_lib.check_config(config.model)


def test_seed_hyperparameters():
  ek100, ego4d, thumos = (load_config(n) for n in ("ek100", "ego4d", "thumos14"))
  assert (ek100.train.num_epochs, ek100.optimizer.lr, ek100.data.batch_size) == (50, 5e-4, 256)
  assert ek100.data.obs_seconds == 32.0
  assert (ek100.model.d_model, ek100.model.processor_layers) == (1024, 4)
  assert dict(ek100.model.heads) == {"verb": 97, "noun": 300, "action": 3806}
  assert (ego4d.train.num_epochs, ego4d.optimizer.lr, ego4d.data.batch_size) == (15, 1e-4, 128)
  assert ego4d.model.future_queries == ego4d.data.num_future == 20
  assert ego4d.data.window * ego4d.data.frame_stride / 30 == pytest.approx(32, abs=0.1)
  assert (thumos.train.num_epochs, thumos.optimizer.lr) == (40, 1e-4)


def _window(config):
  data = config.data
  if "obs_seconds" in data:
    return round(data.obs_seconds * data.fps)
  return data.window or 37  # THUMOS: whole videos (any length)


@pytest.mark.parametrize("name", NAMES)
def test_config_builds_its_model(name):
  config = load_config(name)
  t = _window(config)
  example = {"features": {m: jax.ShapeDtypeStruct((1, t, d), np.float32)
                          for m, d in config.model.modalities.items()},
             "mask": jax.ShapeDtypeStruct((1, t), bool)}
  model = model_lib.CLAM(config.model)
  params = train_lib.param_shapes(model, example)
  outputs = jax.eval_shape(lambda p, f, m: model.apply({"params": p}, f, m, train=False),
                           params, example["features"], example["mask"])
  for head, classes in config.model.heads.items():
    assert outputs["future"][head].shape == (1, config.model.future_queries, classes)
    assert outputs["past"][head].shape == (1, t, classes)
  if name == "ek100":  # D = 1024, 4 Mamba layers, 3806 actions: tens of millions of parameters
    assert 2e7 < sum(np.prod(p.shape) for p in jax.tree.leaves(params)) < 3e8


def test_check_config_names_the_inconsistent_field():
  config = load_config("demo")
  train_lib.check_config(config)
  config.loss.weights = {"verb": 1.0, "noun": 1.0}
  with pytest.raises(train_lib.ConfigError, match="loss.weights"):
    train_lib.check_config(config)
  config = load_config("demo")
  config.data.modalities = {"rgb": 32}
  with pytest.raises(train_lib.ConfigError, match="data.modalities"):
    train_lib.check_config(config)
  config = load_config("ego4d")
  config.data.name = "epic"
  with pytest.raises(train_lib.ConfigError, match="data.name='epic'"):
    train_lib.check_config(config)
  config = load_config("ego4d")
  config.data.num_future = 8
  with pytest.raises(train_lib.ConfigError, match="future_queries=20 must equal data.num_future=8"):
    train_lib.check_config(config)
  for name in NAMES:
    train_lib.check_config(load_config(name))
