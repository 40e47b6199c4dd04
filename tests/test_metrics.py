"""clam_jax.metrics against independent implementations: sklearn AP, brute-force loops, the real
EK100 validation labels (both action-id spaces of DATA_FORMATS.md section 6), a recursive
Levenshtein."""

import csv
import functools
import os
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from clam_jax import metrics

SHARED_DATA = Path(os.environ.get("CLAM_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))
EK100_ANNOTATIONS = SHARED_DATA / "ek100_annotations"
EK100_RULSTM = SHARED_DATA / "ek100_rulstm"
needs_real_ek100 = pytest.mark.skipif(
    not (EK100_ANNOTATIONS / "EPIC_100_validation.csv").exists(),
    reason=f"real EK100 files not found under {SHARED_DATA} (set CLAM_SHARED_DATA)")


# --- THUMOS'14 ------------------------------------------------------------------------------


@pytest.mark.parametrize("n,round_to", [(1, None), (7, None), (503, None), (503, 1)])
def test_average_precision_matches_sklearn(n, round_to):
  rng = np.random.default_rng()
  y = rng.random(n) < 0.3
  y[rng.integers(n)] = True
  score = rng.standard_normal(n)
  if round_to is not None:  # many tied scores
    score = np.round(score, round_to)
  assert metrics.average_precision(y, score) == pytest.approx(average_precision_score(y, score),
                                                              abs=1e-12)


def _calibrated_ap_loop(y, score):
  order = np.argsort(-score, kind="stable")
  y = y[order].astype(bool)
  w = (~y).sum() / y.sum()
  total = 0.0
  for i in np.flatnonzero(y):
    tp, fp = y[:i + 1].sum(), (~y[:i + 1]).sum()
    total += tp / (tp + fp / w)
  return total / y.sum()


def test_calibrated_average_precision_matches_loop():
  rng = np.random.default_rng()
  y = rng.random(311) < 0.2
  y[0] = True
  score = rng.standard_normal(311)
  assert metrics.calibrated_average_precision(y, score) == pytest.approx(
      _calibrated_ap_loop(y, score))
  assert metrics.calibrated_average_precision(np.ones(4, bool), score[:4]) == 1.0


def _fake_thumos(rng, n):
  """(N, 22) softmax scores and multi-hot targets: one-hot rows, some CliffDiving+Diving, some
  ambiguous, and class 3 absent."""
  labels = rng.choice([c for c in range(21) if c != 3], size=n)
  targets = np.eye(22)[labels]
  targets[rng.random(n) < 0.05, 21] = 1
  cliff = rng.random(n) < 0.05
  targets[cliff] = 0
  targets[cliff, 5] = targets[cliff, 8] = 1
  logits = rng.standard_normal((n, 22)) + 2 * targets
  scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  return scores, targets


def _per_frame_reference(score_fn, scores, targets):
  keep = targets[:, 21] != 1
  scores, targets = scores[keep], targets[keep]
  values = [score_fn(targets[:, c], scores[:, c]) for c in range(1, 21) if targets[:, c].any()]
  return np.mean(values), len(values)


def test_per_frame_map_and_mcap_match_lstr_procedure():
  rng = np.random.default_rng()
  scores, targets = _fake_thumos(rng, 997)
  ref_map, num_classes = _per_frame_reference(average_precision_score, scores, targets)
  assert num_classes == 19  # class 3 has no positive frame and is skipped
  assert metrics.per_frame_map(scores, targets) == pytest.approx(ref_map, abs=1e-12)
  ref_mcap, _ = _per_frame_reference(_calibrated_ap_loop, scores, targets)
  assert metrics.per_frame_mcap(scores, targets) == pytest.approx(ref_mcap)
  # Ambiguous frames must not count: corrupting their scores changes nothing.
  corrupted = scores.copy()
  corrupted[targets[:, 21] == 1] = rng.random((int((targets[:, 21] == 1).sum()), 22))
  assert metrics.per_frame_map(corrupted, targets) == pytest.approx(ref_map, abs=1e-12)


def test_anticipation_map_and_alignment():
  rng = np.random.default_rng()
  t, h, c = 29, 4, 22
  future = rng.random((t, h, c))
  present = rng.random((t, c))
  aligned = metrics.align_anticipation_scores(future, present)
  for k in range(h):
    for step in range(t):
      expected = future[step - k - 1, k] if step > k else present[step]
      np.testing.assert_array_equal(aligned[k, step], expected)

  scores, targets = _fake_thumos(rng, 401)
  per_h = np.stack([scores, rng.random(scores.shape), scores[::-1]])
  result = metrics.anticipation_map(per_h, targets)
  expected = [metrics.per_frame_map(s, targets) for s in per_h]
  np.testing.assert_allclose(result["per_horizon"], expected)
  assert result["mean"] == pytest.approx(np.mean(expected))
  assert result["per_horizon"][0] > result["per_horizon"][1]  # informative beats random


# --- EK100 ----------------------------------------------------------------------------------


def _top_k_recall_loop(scores, labels, k, classes=None):
  top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  per_class = []
  for c in np.unique(labels):
    if classes is not None and c not in classes:
      continue
    rows = np.flatnonzero(labels == c)
    per_class.append(np.mean([c in top[r] for r in rows]))
  return np.mean(per_class)


@pytest.mark.parametrize("n,c,k", [(1, 3, 1), (113, 37, 5), (257, 300, 5), (64, 11, 3)])
def test_mean_top_k_recall_matches_loop(n, c, k):
  rng = np.random.default_rng()
  labels = rng.integers(0, c, n) // 2 * 2  # odd classes never appear in the ground truth
  scores = rng.standard_normal((n, c)) + (np.eye(c)[labels] * rng.random((n, 1)) * 3)
  got = metrics.mean_top_k_recall(scores, labels, k=k)
  assert got == pytest.approx(_top_k_recall_loop(scores, labels, k))
  classes = rng.choice(c, size=max(1, c // 2), replace=False)
  if np.isin(labels, classes).any():
    assert metrics.mean_top_k_recall(scores, labels, k=k, classes=classes) == pytest.approx(
        _top_k_recall_loop(scores, labels, k, set(classes.tolist())))


def test_mean_top_k_recall_counts_only_classes_present():
  # Class 0: 1 of 2 rows hit; class 2: 1 of 1; class 1 absent from labels -> (0.5 + 1) / 2, not /3.
  scores = np.array([[3., 2., 1.], [1., 2., 3.], [1., 2., 3.]])
  labels = np.array([0, 0, 2])
  assert metrics.mean_top_k_recall(scores, labels, k=1) == pytest.approx(0.75)
  assert np.isnan(metrics.mean_top_k_recall(scores[:0], labels[:0]))
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
    metrics.mean_top_k_recall(scores, np.array([0, 3, 1]))


def _read_rows(path, header=True):
  with open(path, newline="") as f:
    return list(csv.DictReader(f)) if header else list(csv.reader(f))


@functools.lru_cache(maxsize=1)
def _real_validation():
  epic = _read_rows(EK100_ANNOTATIONS / "EPIC_100_validation.csv")
  rulstm = {row[0]: row for row in _read_rows(EK100_RULSTM / "validation.csv", header=False)}
  actions = _read_rows(EK100_RULSTM / "actions.csv")
  return epic, rulstm, actions


@needs_real_ek100
def test_ek100_action_recall_same_in_rulstm_ids_and_official_keys():
  epic, rulstm, actions = _real_validation()
  assert len(epic) == 9668
  rulstm_ids = np.array([int(rulstm[row["narration_id"]][6]) for row in epic])
  official_keys = np.array([int(row["verb_class"]) * 1000 + int(row["noun_class"]) for row in epic])
  column_key = np.array([int(a["verb"]) * 1000 + int(a["noun"]) for a in actions])
  rng = np.random.default_rng()
  # A random ranking per row, without ties (random float32 scores tie now and then, and a tie at
  # the 5th place is broken differently by the two top-5 rules).
  scores = rng.permuted(np.tile(np.arange(len(actions), dtype=np.float32), (len(epic), 1)), axis=1)

  got = metrics.mean_top_k_recall(scores, rulstm_ids)
  # C3 evaluator: rank the actions, read their verb*1000+noun keys, class-mean over GT keys.
  top5_keys = column_key[np.argpartition(-scores, 4, axis=1)[:, :5]]
  hits = (top5_keys == official_keys[:, None]).any(axis=1)
  c3 = np.mean([hits[official_keys == key].mean() for key in np.unique(official_keys)])
  assert got == pytest.approx(c3, abs=1e-12)
  assert len(np.unique(official_keys)) == 1352


@needs_real_ek100
def test_ek100_subsets_on_real_validation():
  epic, _, _ = _real_validation()
  verbs = np.array([int(row["verb_class"]) for row in epic])
  nouns = np.array([int(row["noun_class"]) for row in epic])
  participants = [row["participant_id"] for row in epic]
  masks = metrics.load_ek100_subset_masks(EK100_ANNOTATIONS, participants, verbs, nouns)
  assert masks["unseen_mask"].sum() == 1065
  assert masks["tail_verb_mask"].sum() == 1760
  assert masks["tail_noun_mask"].sum() == 1900
  assert (masks["tail_verb_mask"] | masks["tail_noun_mask"]).sum() == 3105
  ids = np.array([row["narration_id"] for row in epic])
  for mask, name in [(masks["unseen_mask"], "unseen_participants"),
                     (masks["tail_verb_mask"], "tail_verbs"),
                     (masks["tail_noun_mask"], "tail_nouns"),
                     (masks["tail_verb_mask"] | masks["tail_noun_mask"], "tail_actions")]:
    rows = _read_rows(EK100_RULSTM / f"validation_{name}_ids.csv", header=False)
    listed = {row[0] for row in rows}
    assert set(ids[mask]) == listed, name

  rng = np.random.default_rng()
  verb_scores, noun_scores = rng.random((len(epic), 97)), rng.random((len(epic), 300))
  pairs = verbs * 300 + nouns
  _, actions = np.unique(pairs, return_inverse=True)
  action_scores = rng.random((len(epic), actions.max() + 1))
  result = metrics.ek100_anticipation_metrics(verb_scores, noun_scores, action_scores, verbs, nouns,
                                              actions, **masks)
  assert len(result) == 9
  tail_action = masks["tail_verb_mask"] | masks["tail_noun_mask"]
  assert result["tail/action"] == pytest.approx(
      100 * metrics.mean_top_k_recall(action_scores[tail_action], actions[tail_action]))
  unseen = masks["unseen_mask"]
  assert result["unseen/noun"] == pytest.approx(
      100 * metrics.mean_top_k_recall(noun_scores[unseen], nouns[unseen]))
  assert result["overall/verb"] == pytest.approx(
      100 * metrics.mean_top_k_recall(verb_scores, verbs))


def test_ek100_metrics_subset_arguments():
  rng = np.random.default_rng()
  n = 50
  args = [rng.random((n, 5)), rng.random((n, 7)), rng.random((n, 9)), rng.integers(0, 5, n),
          rng.integers(0, 7, n), rng.integers(0, 9, n)]
  assert sorted(metrics.ek100_anticipation_metrics(*args)) == [
      "overall/action", "overall/noun", "overall/verb"]
  with pytest.raises(ValueError, match="tail_verb_mask and tail_noun_mask"):
    metrics.ek100_anticipation_metrics(*args, tail_verb_mask=np.ones(n, bool))
  with pytest.raises(FileNotFoundError, match="EPIC_100_unseen_participant_ids_validation.csv"):
    metrics.load_ek100_subset_masks("/nonexistent", ["P01"], [0], [0])


# --- Ego4D ----------------------------------------------------------------------------------


def _levenshtein_recursive(a, b):
  @functools.lru_cache(maxsize=None)
  def d(i, j):
    if i == 0 or j == 0:
      return i + j
    return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
  return d(len(a), len(b))


@pytest.mark.parametrize("l1,l2", [(1, 1), (20, 20), (7, 13), (13, 4), (0, 5)])
def test_levenshtein_matches_recursive(l1, l2):
  rng = np.random.default_rng()
  a, b = rng.integers(0, 4, (31, l1)), rng.integers(0, 4, (31, l2))
  expected = [_levenshtein_recursive(tuple(x), tuple(y)) for x, y in zip(a, b)]
  np.testing.assert_array_equal(metrics.levenshtein(a, b), expected)


def test_edit_distance_at_z_and_action_pairs():
  rng = np.random.default_rng()
  n, k, z = 17, 5, 20
  verb_labels, noun_labels = rng.integers(0, 6, (n, z)), rng.integers(0, 6, (n, z))
  verb_preds, noun_preds = rng.integers(0, 6, (n, k, z)), rng.integers(0, 6, (n, k, z))
  verb_preds[0, 2] = verb_labels[0]  # one exact candidate: distance 0 for sample 0
  expected = np.mean([min(_levenshtein_recursive(tuple(verb_preds[i, j]), tuple(verb_labels[i]))
                          for j in range(k)) / z for i in range(n)])
  assert metrics.edit_distance_at_z(verb_preds, verb_labels) == pytest.approx(expected)

  result = metrics.ego4d_lta_metrics(verb_preds, noun_preds, verb_labels, noun_labels)
  assert result["verb"] == pytest.approx(expected)
  pair = lambda v, m: tuple(zip(v.tolist(), m.tolist()))
  expected_action = np.mean([
      min(_levenshtein_recursive(pair(verb_preds[i, j], noun_preds[i, j]),
                                 pair(verb_labels[i], noun_labels[i])) for j in range(k)) / z
      for i in range(n)])
  assert result["action"] == pytest.approx(expected_action)
  assert result["action"] >= max(result["verb"], result["noun"])
  with pytest.raises(ValueError, match=r"preds must be \(N, K, Z\)"):
    metrics.edit_distance_at_z(verb_preds[:, 0], verb_labels)
