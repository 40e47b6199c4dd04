"""The synthetic EK100 generator: deterministic files in the real layout that EK100Source reads
back, the documented grammar, and a recipe cue that only a long memory can use."""

import filecmp
import json
import os
import signal
import subprocess
import sys
import time

import lmdb
import numpy as np
import pytest

from clam_jax.data import ek100, synthetic

SMALL = dict(num_videos=7, num_validation_videos=3, episodes_per_video=3, num_recipes=5,
             steps_per_episode=3, step_variants=3, feature_dim=29, seed=11)


def _lmdb_items(path):
  env = lmdb.open(str(path), readonly=True, lock=False)
  with env.begin() as txn:
    items = list(txn.cursor())
  env.close()
  return items


def _source(root, split, dim=29, obs_seconds=20, fps=2):
  paths = synthetic.annotation_paths(str(root))
  return ek100.EK100Source(paths[split], paths["actions"], str(root), {"rgb": dim},
                           obs_seconds=obs_seconds, fps=fps)


def test_same_seed_same_files_other_seed_other_files(tmp_path):
  info = synthetic.write_synthetic_ek100(str(tmp_path / "a"), **SMALL)
  synthetic.write_synthetic_ek100(str(tmp_path / "b"), **SMALL)
  synthetic.write_synthetic_ek100(str(tmp_path / "c"), **{**SMALL, "seed": 12})
  files = ["annotations/EPIC_100_train.csv", "annotations/EPIC_100_validation.csv",
           "annotations/actions.csv", "synthetic.json"]
  match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
  assert match == files and not errors
  assert _lmdb_items(tmp_path / "a" / "rgb") == _lmdb_items(tmp_path / "b" / "rgb")
  assert not filecmp.cmp(tmp_path / "a" / files[0], tmp_path / "c" / files[0], shallow=False)
  assert json.loads((tmp_path / "a" / "synthetic.json").read_text()) == info

  # Reused when asked again with the same params; refused with others or over foreign files.
  assert synthetic.write_synthetic_ek100(str(tmp_path / "a"), **SMALL) == info
  with pytest.raises(ValueError, match=r"synthetic\.json: .* holds a synthetic dataset written"):
    synthetic.write_synthetic_ek100(str(tmp_path / "a"), **{**SMALL, "num_recipes": 6})
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "x").write_text("mine")
  with pytest.raises(FileExistsError, match="non-empty folder without synthetic.json"):
    synthetic.write_synthetic_ek100(str(tmp_path / "d"), **SMALL)


def test_a_generation_killed_midway_leaves_no_dataset_and_the_next_one_cleans_up(tmp_path):
  root = tmp_path / "data"
  # Killed (SIGKILL) once the LMDB is written, before the annotation files.
  code = (f"import os, signal\nfrom clam_jax.data import synthetic\n"
          f"synthetic._write_csv = lambda *args: os.kill(os.getpid(), signal.SIGKILL)\n"
          f"synthetic.write_synthetic_ek100({str(root)!r}, **{SMALL!r})\n")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert done.returncode == -signal.SIGKILL, done.stderr
  leftover, = os.listdir(tmp_path)
  assert leftover.startswith("data.partial") and (tmp_path / leftover / "rgb" / "data.mdb").exists()
  # A live process's folder (this test's parent, say, generating meanwhile) is not touched.
  live = tmp_path / f"data.partial{os.getppid()}"
  live.mkdir()

  info = synthetic.write_synthetic_ek100(str(root), **SMALL)
  assert sorted(os.listdir(tmp_path)) == ["data", live.name]
  # The same dataset as an uninterrupted generation's.
  reference = tmp_path / "reference"
  assert synthetic.write_synthetic_ek100(str(reference), **SMALL) == info
  files = [os.path.join("annotations", name) for name in os.listdir(reference / "annotations")]
  assert len(files) == 5
  match, _, _ = filecmp.cmpfiles(reference, root, files + ["synthetic.json"], shallow=False)
  assert len(match) == 6
  assert _lmdb_items(root / "rgb") == _lmdb_items(reference / "rgb")


def test_loader_reads_the_grammar_back(tmp_path):
  info = synthetic.write_synthetic_ek100(str(tmp_path), **SMALL)
  steps, variants, recipes = 3, 3, 5
  verbs = ek100.load_class_names(synthetic.annotation_paths(str(tmp_path))["verb_classes"])
  nouns = ek100.load_class_names(synthetic.annotation_paths(str(tmp_path))["noun_classes"])
  assert len(verbs) == steps + 2 and len(nouns) == 1 + steps * variants + recipes
  for split, videos in (("train", 4), ("validation", 3)):
    source = _source(tmp_path, split)
    ann = source.annotations
    assert len(ann) == info["num_segments"][split] == videos * 3 * (steps + 2)
    assert len(source) + len(source.dropped_rows) == len(ann)
    assert set(source.dropped_rows) <= set(np.flatnonzero(ann.start < 1 + 1 / 30))
    # cue, do0 .. do{M-1}, serve, repeated; nouns of step j among its own variants.
    np.testing.assert_array_equal(ann.verb, np.tile(np.arange(steps + 2), videos * 3))
    step_nouns = ann.noun.reshape(-1, steps + 2)[:, 1:-1]
    assert ((step_nouns - 1) // variants == np.arange(steps)).all()
    same_video = ann.video_id[1:] == ann.video_id[:-1]
    assert (ann.stop > ann.start).all() and (ann.start[1:] >= ann.stop[:-1])[same_video].all()

  # Frames are noisy embeddings of the labelled action: nearest class mean recovers the label
  # (cue frames also carry one of the recipe embeddings: left out).
  source = _source(tmp_path, "train")
  examples = [source[i] for i in range(len(source))]
  feats = np.concatenate([e["features"]["rgb"] for e in examples])
  labels = np.concatenate([e["past_targets"]["action"] for e in examples])
  verbs = np.concatenate([e["past_targets"]["verb"] for e in examples])
  feats, labels = feats[verbs > 0], labels[verbs > 0]
  classes = np.unique(labels)
  means = np.stack([feats[labels == c].mean(0) for c in classes])
  nearest = classes[((feats[:, None] - means[None]) ** 2).sum(-1).argmin(1)]
  assert np.mean(nearest == labels) > 0.9


def _cards(root, split, steps):
  """Per episode whose finale the source observes: the mean features of its cue (the recipe card)
  in the finale's observation window, and the labels the card announces: the noun of each step
  and of the finale (-1 for a step the window does not show)."""
  source = _source(root, split, dim=64, obs_seconds=24)
  ann = source.annotations
  serve = steps + 1
  cards, nouns = [], []
  for i in np.flatnonzero(ann.verb[source.rows] == serve):
    example = source[i]
    verbs = example["past_targets"]["verb"]
    since = np.flatnonzero(verbs == serve)[-1:] + 1 if (verbs == serve).any() else 0
    cue = np.flatnonzero(verbs == 0)
    cue = cue[cue >= since]
    assert len(cue) > 0, "the window must show this episode's card"
    cards.append(example["features"]["rgb"][cue].mean(0))
    row = source.rows[i]
    nouns.append(ann.noun[row - steps:row + 1])  # the episode's steps, then its finale
  return np.array(cards), np.array(nouns)


def test_default_dataset_is_fast_and_only_the_card_announces_items_and_dish(tmp_path):
  start = time.perf_counter()
  info = synthetic.write_synthetic_ek100(str(tmp_path))
  assert time.perf_counter() - start < 15  # about 0.5 s on one core
  steps, variants, recipes = 6, 2, 8

  # The card is a linear code of the recipe: least squares on the training episodes decodes the
  # validation episodes' items and dishes; the previous step's item says nothing about the next.
  train_cards, train_nouns = _cards(tmp_path, "train", steps)
  val_cards, val_nouns = _cards(tmp_path, "validation", steps)
  classes = np.unique(np.concatenate([train_nouns, val_nouns]))
  one_hot = lambda nouns: (nouns[..., None] == classes).reshape(len(nouns), -1).astype(float)
  design = lambda cards: np.c_[cards, np.ones(len(cards))]
  weights = np.linalg.lstsq(design(train_cards), one_hot(train_nouns), rcond=None)[0]
  scores = (design(val_cards) @ weights).reshape(len(val_cards), steps + 1, len(classes))
  decoded = np.stack([classes[np.where(np.isin(classes, train_nouns[:, p]), scores[:, p],
                                       -np.inf).argmax(-1)] for p in range(steps + 1)], axis=1)
  assert np.mean(decoded == val_nouns) > 0.9
  items = np.concatenate([train_nouns, val_nouns])[:, :steps] % variants
  agree = np.mean(items[:, 1:] == items[:, :-1])
  assert abs(agree - 1 / variants) < 0.1, agree
  majority = np.bincount(train_nouns[:, -1]).argmax()
  assert np.mean(val_nouns[:, -1] == majority) < 0.35  # 8 dishes: the finale needs the card

  bayes = info["bayes"]
  observed = 1 - (len(_source(tmp_path, "validation", dim=64).dropped_rows)
                  / info["num_segments"]["validation"])
  # With the card every observed target is exact; without it the items (6 of 8 segments) are
  # guessed among 2 and the dish (1 of 8) among 8.
  assert bayes["top5_with_cue"] == bayes["top1_with_cue"] == pytest.approx(observed)
  lost = steps / (steps + 2) * (1 - 1 / variants) + 1 / (steps + 2) * (1 - 1 / recipes)
  assert bayes["top1_without_cue"] == pytest.approx(observed - lost)
  assert bayes["top5_without_cue"] == pytest.approx(observed - 1 / (steps + 2) * (1 - 5 / recipes))
  assert bayes["mean_top5_recall_with_cue"] > bayes["mean_top5_recall_without_cue"] + 0.1
