"""pipeline.make_loader on the synthetic dataset: batch shapes, remainders, padding, resumable
iterator state (by hand and through Orbax) and worker-count independence."""

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from clam_jax.data import pipeline, synthetic

GENERATOR = dict(num_videos=5, num_validation_videos=2, episodes_per_video=2, num_recipes=3,
                 steps_per_episode=3, step_variants=2, feature_dim=11, seed=5)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  return ml_collections.ConfigDict(dict(
      name="synthetic", root=str(tmp_path_factory.mktemp("data") / "synthetic"),
      modalities={"rgb": 11}, obs_seconds=6.5, fps=2.0, anticipation_seconds=1.0, batch_size=7,
      num_workers=0, seed=3, synthetic=GENERATOR))


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches, others):
  assert len(batches) == len(others)
  for a, b in zip(batches, others):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_train_batches_shapes_dtypes_and_dropped_remainder(config):
  source = pipeline.make_source(config, "train")
  batches = list(pipeline.make_loader(config, "train", shuffle=True, num_epochs=2))
  assert len(batches) == 2 * len(source) // 7
  batch = batches[0]
  assert batch["features"]["rgb"].shape == (7, 13, 11)
  assert batch["features"]["rgb"].dtype == np.float32
  assert batch["mask"].shape == (7, 13) and batch["mask"].dtype == bool
  for head in ("verb", "noun", "action"):
    assert batch["future_targets"][head].shape == (7, 1)
    assert batch["future_targets"][head].dtype == np.int32
    assert batch["past_targets"][head].shape == (7, 13)
    assert batch["past_targets"][head].dtype == np.int32
  assert batch["sample_id"].shape == (7,) and batch["sample_id"].dtype == np.int64
  ids = np.concatenate([b["sample_id"] for b in batches])
  first_epoch = ids[:len(source)]
  assert len(set(first_epoch)) == len(first_epoch) and (ids >= 0).all()
  assert not np.array_equal(first_epoch, np.sort(first_epoch))  # shuffled
  # Each example is the source's example of its sample_id.
  example = source[int(batch["sample_id"][4])]
  np.testing.assert_array_equal(batch["features"]["rgb"][4], example["features"]["rgb"])
  np.testing.assert_array_equal(batch["past_targets"]["noun"][4], example["past_targets"]["noun"])


def test_eval_batches_cover_every_example_once_and_pad_the_last(config):
  source = pipeline.make_source(config, "validation")
  assert len(source) % 7, "the test needs a partial last batch"
  batches = list(pipeline.make_loader(config, "validation", shuffle=False, num_epochs=1))
  ids = np.concatenate([b["sample_id"] for b in batches])
  assert all(len(b["sample_id"]) == 7 for b in batches)
  np.testing.assert_array_equal(ids[ids >= 0], np.arange(len(source)))
  last, n = batches[-1], len(source) % 7
  np.testing.assert_array_equal(last["sample_id"][n:], -1)
  for group in ("future_targets", "past_targets"):
    for targets in last[group].values():
      np.testing.assert_array_equal(targets[n:], -1)
  np.testing.assert_array_equal(last["features"]["rgb"][n:],
                                np.broadcast_to(last["features"]["rgb"][n - 1], (7 - n, 13, 11)))
  assert last["mask"][n:].any(axis=1).all()  # never an empty window


def test_iterator_state_resumes_the_exact_batches(config, tmp_path):
  loader = lambda: pipeline.make_loader(config, "train", shuffle=True, num_epochs=None, seed=9)
  iterator = iter(loader())
  _take(iterator, 3)
  state = iterator.get_state()
  manager = ocp.CheckpointManager(tmp_path / "ckpt")
  manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = _take(iterator, 6)  # crosses the epoch boundary (4 batches per epoch)

  fresh = iter(loader())
  fresh.set_state(state)
  _assert_same(_take(fresh, 6), expected)

  restored = iter(loader())
  manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  _assert_same(_take(restored, 6), expected)
  other_seed = iter(pipeline.make_loader(config, "train", shuffle=True, num_epochs=None, seed=10))
  assert not np.array_equal(next(other_seed)["sample_id"], _take(iter(loader()), 1)[0]["sample_id"])


def test_two_workers_give_the_same_batches_and_resume(config):
  loader = lambda workers: pipeline.make_loader(config, "train", shuffle=True, num_epochs=None,
                                                worker_count=workers)
  expected = _take(iter(loader(0)), 7)
  iterator = iter(loader(2))
  try:
    _assert_same(_take(iterator, 3), expected[:3])
    state = iterator.get_state()
    _assert_same(_take(iterator, 4), expected[3:])
    # Rewinding the running workers (a fresh 2-worker iterator restores the same way, but spawning
    # workers again would double this test's time).
    iterator.set_state(state)
    _assert_same(_take(iterator, 4), expected[3:])
  finally:
    iterator.close()


def test_head_sizes_and_the_ek100_route(config):
  sizes = pipeline.head_sizes(config)
  assert sizes == {"verb": 3 + 2, "noun": 1 + 3 * 2 + 3, "action": 1 + 3 * 2 + 3}
  ek100_config = ml_collections.ConfigDict(config.to_dict())
  ek100_config.name = "ek100"
  ek100_config.annotations = synthetic.annotation_paths(config.root)
  _assert_same(_take(iter(pipeline.make_loader(ek100_config, "validation", shuffle=False,
                                               num_epochs=1)), 2),
               _take(iter(pipeline.make_loader(config, "validation", shuffle=False,
                                               num_epochs=1)), 2))
  assert pipeline.head_sizes(ek100_config) == sizes


def test_config_errors_name_the_field(config):
  bad = ml_collections.ConfigDict(config.to_dict())
  bad.name = "epic"
  with pytest.raises(ValueError, match=r"data.name must be one of \(.*'ek100'.*\).*got 'epic'"):
    pipeline.make_source(bad, "train")
  with pytest.raises(ValueError, match="split must be one of"):
    pipeline.make_source(config, "test")
  bad = ml_collections.ConfigDict(config.to_dict())
  bad.modalities = {"rgb": 12}
  with pytest.raises(ValueError, match=r"data.modalities \{'rgb': 12\} do not match .*'rgb': 11"):
    pipeline.make_source(bad, "train")
  bad = ml_collections.ConfigDict(config.to_dict())
  bad.name = "ek100"
  bad.annotations = {"train": "x.csv"}
  with pytest.raises(KeyError, match=r"data.annotations lacks \['validation', 'actions'"):
    pipeline.make_source(bad, "train")


def test_a_loader_given_its_source_does_not_make_another(config, monkeypatch):
  """train_lib.predict builds the source once and hands it to the loader (the annotations are
  parsed once); the batches are those of a loader that makes its own."""
  source = pipeline.make_source(config, "validation")
  expected = list(pipeline.make_loader(config, "validation", shuffle=False, num_epochs=1))

  def no_second_source(*args):
    raise AssertionError("make_loader made a source although it was given one")

  monkeypatch.setattr(pipeline, "make_source", no_second_source)
  batches = list(pipeline.make_loader(config, "validation", shuffle=False, num_epochs=1,
                                      source=source))
  assert len(batches) == len(expected)
  for batch, reference in zip(batches, expected):
    np.testing.assert_array_equal(batch["sample_id"], reference["sample_id"])
    np.testing.assert_array_equal(batch["features"]["rgb"], reference["features"]["rgb"])
