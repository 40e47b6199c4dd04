"""THUMOS'14 and Ego4D end to end on tiny fake data in their real layouts: a few training steps
through the pipeline, the model and train_lib's step, then predict -> compute_metrics ->
metrics_table, checked against independent computations; unknown names and splits fail clearly."""

import functools
import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from clam_jax import model as model_lib
from clam_jax import train_lib
from clam_jax.data import pipeline
from test_data_thumos_ego4d import TEST, ego, thumos  # noqa: F401  (pytest fixtures)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = dict(d_model=16, dtype="float32", processor="gru", processor_layers=1, memory_tokens=4,
                  memory_layers=1, memory_heads=2, num_act_tokens=4, predictor_layers=1,
                  predictor_heads=2)


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _thumos_config(root):
  config = load_config("thumos14")
  config.model.update(dict(TINY_MODEL, memory=False, future_queries=3))
  config.data.update(dict(root=str(root), data_info=str(root / "data_info.json"), window=6,
                          stride=4, future_steps=3, batch_size=4, num_workers=0))
  config.eval.batch_size = 16
  return config


def _ego4d_config(root):
  config = load_config("ego4d")
  config.model.update(dict(TINY_MODEL, memory=False, modalities={"videomae": 32}))
  config.data.update(dict(annotation_dir=str(root / "annotations"),
                          feature_dirs=(str(root / "verb"), str(root / "noun")),
                          modalities={"videomae": 32}, window=16, batch_size=2, num_workers=0))
  config.eval.batch_size = 8
  return config


def _train_and_predict(config, steps=2):
  """`steps` optimizer steps from scratch, then predict on config.eval.split; returns (losses,
  predictions)."""
  parallel = train_lib.Parallel(jax.devices()[:1])
  model = model_lib.CLAM(config.model)
  assert pipeline.head_sizes(config.data) == dict(config.model.heads)
  source = pipeline.make_source(config.data, "train")
  tx, _ = train_lib.make_optimizer(config.optimizer, steps_per_epoch=1, total_steps=steps)
  init = functools.partial(train_lib.create_train_state, model, tx,
                           train_lib.example_inputs(source))
  state = jax.jit(init, out_shardings=parallel.replicated)(jax.random.key(0))
  step_fn = parallel.train_step(config.loss)
  batches = iter(pipeline.make_loader(config.data, "train", shuffle=True, num_epochs=None))
  losses = []
  for _ in range(steps):
    state, metrics = step_fn(state, parallel.shard_batch(train_lib.model_inputs(next(batches))),
                             jax.random.key(1))
    losses.append(float(metrics["loss"]))
  predictions = train_lib.predict(config, state.params, parallel, parallel.predict_step(model),
                                  config.eval.split)
  return losses, predictions


def test_thumos14_trains_and_scores_every_test_frame(thumos):
  root, arrays = thumos
  config = _thumos_config(root)
  losses, predictions = _train_and_predict(config)
  assert np.isfinite(losses).all()

  # One item per test frame, videos in data_info order, frames in order.
  lengths = list(TEST.values())
  np.testing.assert_array_equal(predictions["video"], np.repeat(np.arange(len(TEST)), lengths))
  np.testing.assert_array_equal(predictions["step"],
                                np.concatenate([np.arange(t) for t in lengths]))
  targets = np.concatenate([arrays["target_perframe", session] for session in TEST])
  np.testing.assert_array_equal(predictions["targets"], targets)
  detection, anticipation = (predictions["scores"][k] for k in ("detection", "anticipation"))
  assert detection.shape == (sum(lengths), 22) and anticipation.shape == (sum(lengths), 3, 22)
  np.testing.assert_allclose(detection.sum(1), 1, rtol=1e-5)

  results = train_lib.compute_metrics(config, predictions)
  horizons = ("0.25s", "0.50s", "0.75s")
  assert set(results) == {f"{m}/{k}" for m in ("map", "mcap")
                          for k in ("detection", "anticipation", *horizons)}
  assert all(0 <= v <= 1 for v in results.values()), results

  # Independently: sklearn's AP over the non-ambiguous frames, classes 1..20 with a positive.
  keep = targets[:, 21] == 0
  classes = [c for c in range(1, 21) if targets[keep, c].any()]
  ap = lambda scores: np.mean([average_precision_score(targets[keep, c], scores[keep, c])
                               for c in classes])
  assert results["map/detection"] == pytest.approx(ap(detection), abs=1e-9)
  # At 0.50 s, frame t of a video is scored by the prediction made at t - 2 for 2 steps ahead;
  # its first 2 frames, which nothing predicted that far ahead, by their detection scores.
  shifted = detection.copy()
  for video in range(len(TEST)):
    rows = np.flatnonzero(predictions["video"] == video)
    shifted[rows[2:]] = anticipation[rows[:-2], 1]
  assert results["map/0.50s"] == pytest.approx(ap(shifted), abs=1e-9)
  assert results["map/anticipation"] == pytest.approx(
      np.mean([results[f"map/{h}"] for h in horizons]))

  table = train_lib.metrics_table(results, "thumos14 test", digits=4)
  assert "| | detection | anticipation | 0.25s | 0.50s | 0.75s |" in table
  assert f"| map | {results['map/detection']:.4f} |" in table and "| mcap |" in table


def _levenshtein(a, b):
  row = list(range(len(b) + 1))
  for i, x in enumerate(a, 1):
    previous, row[0] = row[0], i
    for j, y in enumerate(b, 1):
      previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
  return row[-1]


def test_ego4d_trains_and_scores_every_official_window(ego):
  root, _, _ = ego
  annotations = root / "annotations"
  (annotations / "fho_lta_val.json").write_text((annotations / "fho_lta_train.json").read_text())
  config = _ego4d_config(root)
  losses, predictions = _train_and_predict(config)
  assert np.isfinite(losses).all()

  source = pipeline.make_source(config.data, "val")
  assert list(predictions["key"]) == source.keys and len(source) == 4
  for i in range(len(source)):
    for head in ("verb", "noun"):
      np.testing.assert_array_equal(predictions["labels"][head][i],
                                    source[i]["future_targets"][head])
  verbs, nouns = predictions["sequences"]["verb"], predictions["sequences"]["noun"]
  assert verbs.shape == nouns.shape == (4, 1, 20)
  assert 0 <= verbs.min() and verbs.max() < 117 and 0 <= nouns.min() and nouns.max() < 521

  results = train_lib.compute_metrics(config, predictions)
  assert set(results) == {"edit_distance/verb", "edit_distance/noun", "edit_distance/action"}
  assert all(0 <= v <= 1 for v in results.values()), results
  labels = predictions["labels"]
  expected = {
      "verb": [_levenshtein(p[0], l) for p, l in zip(verbs, labels["verb"])],
      "action": [_levenshtein(list(zip(pv[0], pn[0])), list(zip(lv, ln)))
                 for pv, pn, lv, ln in zip(verbs, nouns, labels["verb"], labels["noun"])]}
  for head, distances in expected.items():
    assert results[f"edit_distance/{head}"] == pytest.approx(np.mean(distances) / 20)
  table = train_lib.metrics_table(results, "ego4d val", digits=4)
  assert "| edit_distance |" in table and "| | verb | noun | action |" in table


def test_unknown_dataset_names_and_splits_fail_naming_them(thumos):
  root, _ = thumos
  config = _thumos_config(root)
  config.data.name = "thumos15"
  expected = r"data.name must be one of \('ek100', 'synthetic', 'thumos14', 'ego4d'\).*'thumos15'"
  for call in (lambda: pipeline.make_source(config.data, "train"),
               lambda: pipeline.make_loader(config.data, "train", shuffle=False, num_epochs=1),
               lambda: pipeline.head_sizes(config.data),
               lambda: train_lib.compute_metrics(config, {})):
    with pytest.raises(ValueError, match=expected):
      call()
  config = _thumos_config(root)
  with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\) for "
                                       r"data.name='thumos14'; got 'validation'"):
    pipeline.make_source(config.data, "validation")
  config.data.modalities = {"rgb": 1024}
  with pytest.raises(ValueError,
                     match=r"data.modalities \{'rgb': 1024\}: thumos14 has .*'rgb': 2048"):
    pipeline.make_source(config.data, "train")


def test_thumos14_data_info_needs_fps(thumos):
  root, _ = thumos
  info = json.loads((root / "data_info.json").read_text())
  del info["THUMOS"]["fps"]
  (root / "data_info.json").write_text(json.dumps(info))
  with pytest.raises(KeyError, match=r"data_info.json: entry 'THUMOS' lacks \['fps'\]"):
    pipeline.make_source(_thumos_config(root).data, "test")
