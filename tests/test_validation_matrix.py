"""Every bad input of the project in one parametrised test: data files, configs, workdirs, model
and streaming inputs. Each must raise an error that names what is wrong, and write no file (so
none half-written): the case's whole folder (a copy of a small EK100-layout dataset and the
workdir) is compared before and after.

Training and evaluation fail before compiling anything: the cases cost tracing at most.
"""

import importlib.util
import os
import shutil

import jax
import lmdb
import ml_collections
import numpy as np
import pytest
from flax.training import train_state

from clam_jax import checkpointing
from clam_jax import model as model_lib
from clam_jax import train_lib
from clam_jax.data import pipeline
from clam_jax.data import synthetic
from clam_jax.streaming import init_stream_state, make_stream_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = dict(num_videos=5, num_validation_videos=1, feature_dim=16, seed=0)


def _config(root):
  """configs/demo.py with a tiny model, reading the EK100-layout dataset under root."""
  spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.update(dict(modalities={"rgb": 16}, d_model=16, processor="gru",
                           processor_layers=1, memory=False, num_act_tokens=4, predictor_heads=2))
  config.data = ml_collections.ConfigDict(dict(
      name="ek100", root=root, annotations=synthetic.annotation_paths(root), modalities={"rgb": 16},
      obs_seconds=12.0, fps=1.0, anticipation_seconds=1.0, batch_size=24, num_workers=0, seed=0))
  config.eval.batch_size = 32
  config.model.heads = pipeline.head_sizes(config.data)
  return config


class Case:
  """The folder of one case: data (a fresh copy of the dataset), workdir, config."""

  def __init__(self, folder, dataset):
    self.folder = str(folder)
    self.data = os.path.join(self.folder, "data")
    shutil.copytree(dataset, self.data)
    self.workdir = os.path.join(self.folder, "workdir")
    self.config = _config(self.data)
    self.paths = dict(self.config.data.annotations)

  def train(self):
    return train_lib.train_and_evaluate(self.config, self.workdir)

  def rewrite(self, name, edit):
    """Replaces annotation file `name` by edit(its lines)."""
    with open(self.paths[name]) as f:
      lines = f.read().splitlines()
    with open(self.paths[name], "w") as f:
      f.write("\n".join(edit(lines)) + "\n")


CASES = {}


def case(error, match):
  def register(make):
    CASES[make.__name__] = (make, error, match)
    return make
  return register


# Data files


@case(FileNotFoundError, r"EK100 annotation file not found: .*/EPIC_100_train\.csv")
def missing_annotation_file(c):
  os.remove(c.paths["train"])
  return c.train


@case(FileNotFoundError, r"not found: .*/EPIC_100_noun_classes\.csv")
def missing_class_list(c):
  os.remove(c.paths["noun_classes"])
  return c.train


@case(ValueError, r"EPIC_100_train\.csv: missing column\(s\) \['verb_class'\]")
def annotation_column_missing(c):
  c.rewrite("train", lambda lines: [line.replace("verb_class", "verb_id") for line in lines])
  return c.train


@case(ValueError, r"EPIC_100_train\.csv, line 3: expected \d+ fields, found \d+")
def annotation_line_cut_short(c):
  c.rewrite("train", lambda lines: lines[:2] + [lines[2].rsplit(",", 2)[0]] + lines[3:])
  return c.train


@case(FileNotFoundError, r"EK100 rgb features: no LMDB at .*/data/rgb")
def feature_lmdb_missing(c):
  shutil.rmtree(os.path.join(c.data, "rgb"))
  return c.train


@case(ValueError, r"EK100 rgb features in .*/rgb: key '.*' holds 64 bytes = 16 float32, "
                  r"expected dim 20")
def feature_dim_differs_from_config(c):
  c.config.data.modalities.rgb = c.config.model.modalities.rgb = 20
  return c.train


@case(ValueError, r"EK100 rgb features: NaN or Inf in key '.*_frame_\d{10}\.jpg' of LMDB .*/rgb")
def nan_in_features(c):
  path = os.path.join(c.data, "rgb")
  with lmdb.open(path, map_size=1 << 30) as env, env.begin(write=True) as txn:
    for key, value in list(txn.cursor()):
      txn.put(key, np.full(len(value) // 4, np.nan, np.float32).tobytes())
  source = pipeline.make_source(c.config.data, "train")
  return lambda: source[0]


@case(ValueError, r"synthetic\.json: .* holds a synthetic dataset written with .* not the "
                  r"requested")
def synthetic_root_holds_another_dataset(c):
  c.config.data = ml_collections.ConfigDict(dict(
      name="synthetic", root=c.data, modalities={"rgb": 16}, obs_seconds=12.0, fps=1.0,
      anticipation_seconds=1.0, batch_size=24, num_workers=0, seed=0,
      synthetic=dict(DATA, num_videos=6)))
  return c.train


# Configs


@case(train_lib.ConfigError, r"data\.name='epic'")
def unknown_dataset(c):
  c.config.data.name = "epic"
  return c.train


@case(train_lib.ConfigError, r"config\.model\.processor: expected one of .*'transformer'")
def unknown_processor(c):
  c.config.model.processor = "transformer"
  return c.train


@case(train_lib.ConfigError, r"data\.batch_size=0 must be a positive multiple of the 1 devices")
def training_batch_of_size_0(c):
  c.config.data.batch_size = 0
  return c.train


@case(train_lib.ConfigError, r"eval\.batch_size=0 must be a positive multiple")
def evaluation_batch_of_size_0(c):
  c.config.eval.batch_size = 0
  return c.train


@case(train_lib.ConfigError, r"data\.batch_size=1000000 exceeds the \d+ training examples of \d+ "
                             r"epochs of data 'ek100'")
def batch_larger_than_the_data(c):
  c.config.data.batch_size = 1_000_000
  return c.train


@case(ValueError, r"obs_seconds \* fps must be a positive integer .*got 0\.0 \* 1\.0")
def window_of_0_frames(c):
  c.config.data.obs_seconds = 0.0
  return c.train


@case(train_lib.ConfigError, r"model\.heads \{.*\} do not match the class counts of data 'ek100'")
def heads_differ_from_the_data(c):
  c.config.model.heads.noun += 1
  return c.train


@case(train_lib.ConfigError, r"data\.modalities \{'rgb': 16\} and model\.modalities \{'rgb': 8\}")
def modalities_differ(c):
  c.config.model.modalities.rgb = 8
  return c.train


@case(ValueError, r"config\.model\.processor: expected one of .*, found 'transformer'")
def unknown_processor(c):
  c.config.model.processor = "transformer"
  return c.train


@case(train_lib.ConfigError,
      r"train\.on_nonfinite: expected one of \('stop', 'skip'\), found 'ignore'")
def unknown_nonfinite_policy(c):
  c.config.train.on_nonfinite = "ignore"
  return c.train


# Workdirs


def _checkpoint_of_another_model(c):
  """Writes a checkpoint (zero params, fresh optimizer state) of c.config's model with d_model 24
  into c.workdir, as a run of that config would have."""
  config = _config(c.data)
  config.model.d_model = 24
  source = pipeline.make_source(config.data, "train")
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), train_lib.param_shapes(
      model_lib.CLAM(config.model), train_lib.example_inputs(source)))
  tx, _ = train_lib.make_optimizer(config.optimizer, steps_per_epoch=10, total_steps=100)
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  manager = checkpointing.checkpoint_manager(c.workdir, best_metric=config.eval.best_metric)
  loader = pipeline.make_loader(config.data, "train", shuffle=True, num_epochs=1)
  checkpointing.save(manager, 3, state, iter(loader), {config.eval.best_metric: 1.0})
  manager.wait_until_finished()
  checkpointing.write_config(c.workdir, config)


@case(checkpointing.CheckpointMismatchError,
      r"checkpoints/3 was written by another model: params/.* is \(.*24.*\) there but "
      r"\(.*16.*\) in this config \(config changes: model\.d_model: 24 -> 16\)")
def training_into_a_workdir_of_another_model(c):
  _checkpoint_of_another_model(c)
  return c.train


@case(checkpointing.CheckpointMismatchError, r"params/.* there but .* model\.d_model: 24 -> 16")
def evaluating_a_workdir_of_another_model(c):
  _checkpoint_of_another_model(c)
  return lambda: train_lib.evaluate(c.config, c.workdir)


@case(FileNotFoundError, r"workdir/checkpoints does not exist: train first with")
def evaluating_a_workdir_without_checkpoints(c):
  os.makedirs(c.workdir)
  return lambda: train_lib.evaluate(c.config, c.workdir)


@case(checkpointing.WorkdirBusyError, r"workdir is in use by another training process")
def training_into_a_busy_workdir(c):
  def train_while_locked():
    with checkpointing.workdir_lock(c.workdir):
      c.train()
  return train_while_locked


# Model and streaming inputs (the demo model: Mamba processor and CLAM memory)


def _model(c):
  config = _config(c.data).model
  config.update(dict(d_model=32, processor="mamba", memory=True))
  example = {"features": {"rgb": jax.ShapeDtypeStruct((1, 4, 16), np.float32)},
             "mask": jax.ShapeDtypeStruct((1, 4), bool)}
  return config, train_lib.param_shapes(model_lib.CLAM(config), example)


def _stream(c, batch, frame_shape):
  config, params = _model(c)
  step = make_stream_step(config)
  frame = {"rgb": jax.ShapeDtypeStruct(frame_shape, np.float32)}
  return lambda: jax.eval_shape(step, params, init_stream_state(config, batch), frame)


def _forward(c, b, t):
  config, params = _model(c)
  model = model_lib.CLAM(config)
  features = {"rgb": jax.ShapeDtypeStruct((b, t, 16), np.float32)}
  mask = jax.ShapeDtypeStruct((b, t), bool)
  return lambda: jax.eval_shape(
      lambda p, f, m: model.apply({"params": p}, f, m, train=False), params, features, mask)


@case(ValueError, r"modality 'rgb' has feature dim 17, config\.model\.modalities\.rgb expects 16")
def stream_frame_of_another_feature_dim(c):
  return _stream(c, 2, (2, 17))


@case(ValueError, r"features_t has batch size 3, the stream state 2")
def stream_frame_of_another_batch_size(c):
  return _stream(c, 2, (3, 16))


@case(ValueError, r"B >= 1")
def stream_batch_of_size_0(c):
  return _stream(c, 0, (0, 16))


@case(ValueError, r"B >= 1")
def forward_batch_of_size_0(c):
  return _forward(c, 0, 4)


@case(ValueError,
      r"the window must hold T >= 1 frames, found features of shape \(B, T\) = \(2, 0\)")
def forward_window_of_0_frames(c):
  return _forward(c, 2, 0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("dataset") / "data")
  synthetic.write_synthetic_ek100(root, **DATA)
  return root


def _files(folder):
  """{path: (size, mtime)} of every file under folder."""
  return {os.path.join(d, n): (os.stat(os.path.join(d, n)).st_size,
                               os.stat(os.path.join(d, n)).st_mtime_ns)
          for d, _, names in os.walk(folder) for n in names}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_fails_clearly_and_writes_nothing(name, dataset, tmp_path):
  make, error, match = CASES[name]
  c = Case(tmp_path, dataset)
  call = make(c)
  before = _files(c.folder)
  with pytest.raises(error, match=match):
    call()
  assert _files(c.folder) == before
