"""Data errors met while reading batches: one DataError naming the split, example and LMDB key (also
from a grain worker), and train.py / evaluate.py exiting with that one line, the checkpoints written
before it intact."""

import os
import subprocess
import sys

import jax
import lmdb
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from clam_jax import train_lib
from clam_jax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 3 training videos P01_01..03, 2 validation videos P01_04..05.
GENERATOR = dict(num_videos=5, num_validation_videos=2, episodes_per_video=2, num_recipes=3,
                 steps_per_episode=3, step_variants=2, feature_dim=11, seed=7)


def _data_config(root, num_workers=0):
  return ml_collections.ConfigDict(dict(
      name="synthetic", root=str(root), modalities={"rgb": 11}, obs_seconds=6.5, fps=2.0,
      anticipation_seconds=1.0, batch_size=5, num_workers=num_workers, seed=1,
      synthetic=GENERATOR))


def _rewrite(root, video_id, value):
  """Sets every LMDB key of video_id's frames to `value` (bytes), or deletes them (None)."""
  env = lmdb.open(os.path.join(root, "rgb"))
  prefix = f"{video_id}_frame_".encode()
  with env.begin(write=True) as txn:
    keys = [key for key, _ in txn.cursor() if key.startswith(prefix)]
    assert keys, video_id
    for key in keys:
      if value is None:
        txn.delete(key)
      else:
        txn.put(key, value)
  env.close()


def _first_example_of(source, video_id):
  videos = [source.annotations.video_id[row] for row in source.rows]
  return videos.index(video_id)


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
  """A synthetic dataset whose LMDB holds 10 float32 instead of 11 for every frame of training
  video P01_02 and lost every frame of validation video P01_05."""
  root = tmp_path_factory.mktemp("broken") / "data"
  config = _data_config(root)
  pipeline.head_sizes(config)  # generates it
  _rewrite(str(root), "P01_02", np.random.default_rng(0).random(10, np.float32).tobytes())
  _rewrite(str(root), "P01_05", None)
  return root


def _read_until_error(config, split):
  """Reads split's examples in order, one per batch; returns (examples read, the DataError)."""
  iterator = iter(pipeline.make_loader(config, split, shuffle=False, num_epochs=1, batch_size=1))
  read = 0
  try:
    with pytest.raises(pipeline.DataError) as error:
      for batch in iterator:
        assert batch["sample_id"].tolist() == [read]
        read += 1
  finally:
    iterator.close()
  return read, str(error.value)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_short_lmdb_value_is_one_data_error_naming_example_and_key(broken, num_workers):
  config = _data_config(broken, num_workers)
  bad = _first_example_of(pipeline.make_source(config, "train"), "P01_02")
  assert bad > 0
  read, message = _read_until_error(config, "train")
  assert read == bad
  assert message.startswith(f"data 'synthetic', split 'train', example {bad}: EK100 rgb features "
                            f"in {os.path.join(broken, 'rgb')}: key 'P01_02_frame_")
  assert message.endswith("holds 40 bytes = 10 float32, expected dim 11 (data config modalities)")


def test_a_missing_lmdb_key_is_one_data_error_naming_example_and_key(broken):
  config = _data_config(broken)
  bad = _first_example_of(pipeline.make_source(config, "validation"), "P01_05")
  read, message = _read_until_error(config, "validation")
  assert read == bad
  # The KeyError's message, not its quoted repr.
  assert message.startswith(
      f"data 'synthetic', split 'validation', example {bad}: EK100 rgb features: LMDB "
      f"{os.path.join(broken, 'rgb')} has no key 'P01_05_frame_")
  assert "\n" not in message


class _Source:
  """6 examples with (7, 3) features, except example 4: (7, 2) features ("narrow") or an extra
  field ("extra")."""

  def __init__(self, kind):
    self.kind = kind

  def __len__(self):
    return 6

  def __getitem__(self, sample_id):
    rng = np.random.default_rng(sample_id)
    narrow = sample_id == 4 and self.kind == "narrow"
    example = {"features": {"rgb": rng.random((7, 2 if narrow else 3), np.float32)},
               "mask": np.ones(7, bool), "future_targets": {"verb": np.array([1], np.int32)},
               "past_targets": {"verb": np.zeros(7, np.int32)}, "sample_id": np.int64(sample_id)}
    if sample_id == 4 and self.kind == "extra":
      example["extra"] = np.zeros(2)
    return example


@pytest.mark.parametrize("kind, problem", [
    ("narrow", "features/rgb is float32(7, 2), expected float32(7, 3) as in example 0"),
    ("extra", "extra is not in example 0"),
])
def test_an_example_shaped_unlike_example_0_is_a_data_error_naming_the_field(monkeypatch, kind,
                                                                             problem):
  monkeypatch.setattr(pipeline, "make_source", lambda data_config, split: _Source(kind))
  config = ml_collections.ConfigDict(dict(name="ego4d", batch_size=1, num_workers=0, seed=0))
  iterator = iter(pipeline.make_loader(config, "val", shuffle=False, num_epochs=1))
  assert [int(next(iterator)["sample_id"][0]) for _ in range(4)] == [0, 1, 2, 3]
  with pytest.raises(pipeline.DataError) as error:
    next(iterator)
  assert str(error.value) == f"data 'ego4d', split 'val', example 4: {problem}"


def test_cli_data_error_mid_training_is_one_line_and_keeps_the_checkpoints(tmp_path):
  """train.py on test_train's tiny config (checkpoints at steps 2 and 4, the first evaluation at
  step 5, before its checkpoint) with the validation video's frames gone; then evaluate."""
  root, workdir = tmp_path / "data", tmp_path / "run"
  config_file = tmp_path / "tiny.py"
  config_file.write_text(
      f"import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\nimport test_train\n\n\n"
      f"def get_config():\n  return test_train.tiny_config({str(root)!r})\n")
  import test_train  # pylint: disable=import-outside-toplevel  (pytest puts tests/ on sys.path)
  pipeline.head_sizes(test_train.tiny_config(str(root)).data)  # generates the data
  _rewrite(str(root), "P01_05", None)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"))

  done = subprocess.run([sys.executable, "train.py", "--config", str(config_file), "--workdir",
                         str(workdir)], capture_output=True, text=True, timeout=300, cwd=REPO,
                        env=env)
  assert done.returncode == 1, done.stderr[-3000:]
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  line = done.stderr.strip().splitlines()[-1]
  error = (f"data 'synthetic', split 'validation', example 0: EK100 rgb features: LMDB "
           f"{root / 'rgb'} has no key 'P01_05_frame_")
  assert line.startswith(f"train.py: error: {error}"), line
  assert line.endswith("; training stopped at step 5, its latest checkpoint is step 4"), line
  assert os.listdir(workdir / "checkpoints") == ["4"]  # config.train.keep: the latest only
  params = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "4" / "params")
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  # evaluate.py's function (its command line catches what train.py's does). It reads example 0
  # before any loader, to shape the model's parameters.
  with pytest.raises(pipeline.DataError) as raised:
    train_lib.evaluate(test_train.tiny_config(str(root)), str(workdir))
  assert str(raised.value).startswith(f"EK100Source, {error.split(', ', 2)[2]}")
  assert not (workdir / "eval").exists()


def test_malformed_annotation_files_are_user_errors(tmp_path):
  """A malformed training CSV or class list raises DataError (one line from train.py: it is in
  train_lib.USER_ERRORS), naming the dataset, split, file and line."""
  synthetic_config = _data_config(tmp_path / "synthetic")
  paths = pipeline.annotation_paths(synthetic_config)  # generates a well-formed EK100 layout
  bad = tmp_path / "bad.csv"
  bad.write_text("foo,bar\n1,2\n")
  config = ml_collections.ConfigDict({**synthetic_config.to_dict(), "name": "ek100",
                                      "annotations": {**paths, "train": str(bad)}})
  with pytest.raises(train_lib.USER_ERRORS) as error:
    pipeline.make_source(config, "train")
  assert isinstance(error.value, pipeline.DataError)
  assert str(error.value).startswith(f"data 'ek100', split 'train': {bad}, line 1:")
  pipeline.make_source(config, "validation")  # the well-formed files are read as before
  config.annotations.noun_classes = str(bad)
  with pytest.raises(pipeline.DataError, match=f"^data 'ek100': {bad}"):
    pipeline.head_sizes(config)
