"""Evaluation metrics of the three benchmarks, in plain numpy (host side, after inference).

- EK100 action anticipation: class-mean top-k recall (the official C3 evaluator / RULSTM definition)
  overall and on the unseen-participant and tail subsets.
- THUMOS'14 online detection and anticipation: per-frame (calibrated) average precision as in
  LSTR/TeSTra/MAT, ambiguous frames dropped, mean over the action classes.
- Ego4D long-term anticipation: edit distance @ Z, the minimum over K predicted sequences, / Z.
"""

import csv
import os

import numpy as np

# ---------------------------------------------------------------------------------------------
# EK100


def mean_top_k_recall(scores, labels, k=5, classes=None):
  """Class-mean top-k recall over the classes present in `labels`, in [0, 1].

  scores: (N, C) float, higher = more likely; labels: (N,) int in [0, C). For every class c in
  unique(labels) (intersected with `classes` when given, as RULSTM's topk_recall does), recall_c =
  fraction of the rows labelled c whose label is among the row's top k scores; the result is the
  unweighted mean of recall_c. Classes absent from `labels` never count. Ties with the label's score
  count in its favour (a row is a hit when fewer than k classes score strictly higher). Returns nan
  when no class is evaluated (e.g. an empty subset).
  """
  scores = np.asarray(scores)
  labels = np.asarray(labels)
  if scores.ndim != 2 or labels.shape != scores.shape[:1]:
    raise ValueError(f"scores must be (N, C) and labels (N,); got {scores.shape} and "
                     f"{labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() >= scores.shape[1]):
    raise ValueError(f"labels must lie in [0, {scores.shape[1]}); found "
                     f"[{labels.min()}, {labels.max()}]")
  label_scores = np.take_along_axis(scores, labels[:, None].astype(np.int64), axis=1)
  hits = (scores > label_scores).sum(axis=1) < k
  present, inverse = np.unique(labels, return_inverse=True)
  recall = np.bincount(inverse, weights=hits) / np.bincount(inverse)
  if classes is not None:
    recall = recall[np.isin(present, np.asarray(classes))]
  return float(recall.mean()) if recall.size else float("nan")


def ek100_anticipation_metrics(verb_scores, noun_scores, action_scores, verb_labels, noun_labels,
                               action_labels, *, unseen_mask=None, tail_verb_mask=None,
                               tail_noun_mask=None, k=5):
  """The EK100 anticipation numbers: class-mean top-5 recall x 100 per subset and head.

  *_scores: (N, C_head) float (C = 97 verbs, 300 nouns, A actions); *_labels: (N,) int in the same
  class space (actions e.g. RULSTM actions.csv ids; any id space gives the same number as the
  official verb*1000+noun keys as long as it is one id per (verb, noun) pair).
  unseen_mask: (N,) bool, rows of unseen participants; tail_verb_mask / tail_noun_mask: (N,) bool,
  rows whose verb / noun is a tail class (give both or neither). The tail action subset is tail verb
  OR tail noun, as the official evaluator defines it.
  Returns {"overall/verb", "overall/noun", "overall/action"} plus "unseen/*" when unseen_mask is
  given and "tail/*" when the tail masks are; values in percent, nan for an empty subset.
  """
  if (tail_verb_mask is None) != (tail_noun_mask is None):
    raise ValueError("give both tail_verb_mask and tail_noun_mask, or neither")
  heads = {"verb": (verb_scores, verb_labels), "noun": (noun_scores, noun_labels),
           "action": (action_scores, action_labels)}
  n = len(verb_labels)
  subsets = {"overall": {head: np.ones(n, bool) for head in heads}}
  if unseen_mask is not None:
    subsets["unseen"] = {head: np.asarray(unseen_mask, bool) for head in heads}
  if tail_verb_mask is not None:
    tail_verb, tail_noun = np.asarray(tail_verb_mask, bool), np.asarray(tail_noun_mask, bool)
    subsets["tail"] = {"verb": tail_verb, "noun": tail_noun, "action": tail_verb | tail_noun}
  results = {}
  for subset, masks in subsets.items():
    for head, (scores, labels) in heads.items():
      mask = masks[head]
      if mask.shape != (n,):
        raise ValueError(f"{subset} mask for {head} must be ({n},) bool; got shape {mask.shape}")
      results[f"{subset}/{head}"] = 100.0 * mean_top_k_recall(
          np.asarray(scores)[mask], np.asarray(labels)[mask], k=k)
  return results


def _read_csv_column(path, column):
  if not os.path.exists(path):
    raise FileNotFoundError(f"EK100 subset file not found: {path}")
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    if column not in (reader.fieldnames or []):
      raise ValueError(f"{path}: expected a column '{column}', found {reader.fieldnames}")
    return [row[column] for row in reader]


def load_ek100_subset_masks(annotations_dir, participant_ids, verb_labels, noun_labels, *,
                            split="validation"):
  """Row masks of the official EK100 subsets, from the epic-kitchens-100-annotations files.

  annotations_dir holds EPIC_100_unseen_participant_ids_{split}.csv (column participant_id),
  EPIC_100_tail_verbs.csv (column verb) and EPIC_100_tail_nouns.csv (column noun).
  participant_ids: (N,) str such as "P18" (for RULSTM rows: video_id.split("_")[0]);
  verb_labels, noun_labels: (N,) int. Returns {"unseen_mask", "tail_verb_mask", "tail_noun_mask"}:
  (N,) bool each, ready for ek100_anticipation_metrics(**masks).
  """
  unseen = _read_csv_column(
      os.path.join(annotations_dir, f"EPIC_100_unseen_participant_ids_{split}.csv"),
      "participant_id")
  tail_verbs = _read_csv_column(os.path.join(annotations_dir, "EPIC_100_tail_verbs.csv"), "verb")
  tail_nouns = _read_csv_column(os.path.join(annotations_dir, "EPIC_100_tail_nouns.csv"), "noun")
  return {
      "unseen_mask": np.isin(np.asarray(participant_ids, str), unseen),
      "tail_verb_mask": np.isin(np.asarray(verb_labels), np.asarray(tail_verbs, np.int64)),
      "tail_noun_mask": np.isin(np.asarray(noun_labels), np.asarray(tail_nouns, np.int64)),
  }


# ---------------------------------------------------------------------------------------------
# THUMOS'14 (and TVSeries) per-frame metrics


def _sorted_hits(y_true, y_score):
  y_true = np.asarray(y_true).astype(bool)
  y_score = np.asarray(y_score, np.float64)
  if y_true.ndim != 1 or y_true.shape != y_score.shape:
    raise ValueError(f"y_true and y_score must be (N,) each; got {y_true.shape} and "
                     f"{y_score.shape}")
  order = np.argsort(-y_score, kind="stable")
  return y_true[order], y_score[order]


def average_precision(y_true, y_score):
  """Non-interpolated average precision, as sklearn.metrics.average_precision_score.

  y_true: (N,) {0, 1} or bool with at least one positive; y_score: (N,) float.
  AP = sum over distinct score thresholds of (R_n - R_{n-1}) P_n (tied scores form one threshold).
  """
  hits, scores = _sorted_hits(y_true, y_score)
  if not hits.any():
    raise ValueError("average_precision needs at least one positive")
  last_of_tie = np.r_[scores[1:] != scores[:-1], True]
  tps = np.cumsum(hits)[last_of_tie]
  fps = np.cumsum(~hits)[last_of_tie]
  precision = tps / (tps + fps)
  recall = tps / tps[-1]
  return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def calibrated_average_precision(y_true, y_score):
  """Calibrated AP (De Geest et al. 2016), as LSTR's calibrated_average_precision_score.

  y_true: (N,) {0, 1} or bool with at least one positive; y_score: (N,) float. Frames sorted by
  descending score (ties keep input order); w = #negatives / #positives;
  cPrec(i) = TP(i) / (TP(i) + FP(i) / w); cAP = mean of cPrec over the positive positions.
  """
  hits, _ = _sorted_hits(y_true, y_score)
  if not hits.any():
    raise ValueError("calibrated_average_precision needs at least one positive")
  tps = np.cumsum(hits)
  fps = np.cumsum(~hits)
  w = fps[-1] / tps[-1]
  if w == 0:
    return 1.0
  cprec = tps / (tps + fps / w)
  return float(cprec[hits].mean())


def _per_frame_mean(score_fn, scores, targets, ignore_index, background_index):
  scores, targets = np.asarray(scores), np.asarray(targets)
  if scores.ndim != 2 or scores.shape != targets.shape:
    raise ValueError(f"scores and targets must be (N, C) each; got {scores.shape} and "
                     f"{targets.shape}")
  if ignore_index is not None:
    keep = targets[:, ignore_index] != 1
    scores, targets = scores[keep], targets[keep]
  skipped = {background_index, ignore_index}
  values = [score_fn(targets[:, c], scores[:, c]) for c in range(targets.shape[1])
            if c not in skipped and np.any(targets[:, c] == 1)]
  return float(np.mean(values)) if values else float("nan")


def per_frame_map(scores, targets, *, ignore_index=21, background_index=0):
  """Per-frame mAP of online action detection (LSTR's perframe_average_precision, metrics "AP").

  scores: (N, C) float (LSTR: softmax over all C logits), targets: (N, C) multi-hot {0, 1}; the
  frames of all test videos concatenated (C = 22 for THUMOS'14). Frames whose `ignore_index` column
  is 1 (Ambiguous) are dropped (ignore_index=None keeps all); then AP per class, skipping the
  background and ignore columns and classes without a positive frame; returns their mean (a
  fraction, not percent), nan if no class has a positive.
  """
  return _per_frame_mean(average_precision, scores, targets, ignore_index, background_index)


def per_frame_mcap(scores, targets, *, ignore_index=21, background_index=0):
  """Per-frame mean calibrated AP (metrics "cAP"): per_frame_map with calibrated_average_precision.

  Same shapes and frame/class rules as per_frame_map. TVSeries uses ignore_index=None.
  """
  return _per_frame_mean(calibrated_average_precision, scores, targets, ignore_index,
                         background_index)


def align_anticipation_scores(future_scores, present_scores):
  """Per-horizon scores aligned with the frame they predict, for one video.

  future_scores: (T, H, C), row t = the H predictions made at step t for steps t+1 .. t+H;
  present_scores: (T, C), the detection scores of each step. Returns (H, T, C) with
  out[h, t] = future_scores[t - h - 1, h], the prediction made h + 1 steps before t; the first
  h + 1 steps of the video, which no earlier step predicted at that horizon, take present_scores[t]
  (MAT/TeSTra fill them with the first window's in-window outputs).
  """
  future_scores = np.asarray(future_scores)
  present_scores = np.asarray(present_scores)
  t, h, c = future_scores.shape
  if present_scores.shape != (t, c):
    raise ValueError(f"present_scores must be ({t}, {c}); got {present_scores.shape}")
  out = np.broadcast_to(present_scores, (h, t, c)).copy()
  for k in range(h):
    out[k, k + 1:] = future_scores[:t - k - 1, k]
  return out


def anticipation_map(scores_per_horizon, targets, *, ignore_index=21, background_index=0,
                     metric="AP"):
  """Per-frame anticipation mAP (TeSTra/MAT): the detection metric once per horizon, and the mean.

  scores_per_horizon: (H, N, C), entry [h, t] = the score predicted at horizon h for frame t (see
  align_anticipation_scores; videos concatenated along N as for per_frame_map); targets: (N, C)
  multi-hot ground truth of frame t. metric: "AP" (per_frame_map) or "cAP" (per_frame_mcap).
  Returns {"per_horizon": (H,) float64, "mean": float}.
  """
  fn = {"AP": per_frame_map, "cAP": per_frame_mcap}.get(metric)
  if fn is None:
    raise ValueError(f"metric must be 'AP' or 'cAP'; got {metric!r}")
  per_horizon = np.array([fn(s, targets, ignore_index=ignore_index,
                             background_index=background_index) for s in scores_per_horizon])
  return {"per_horizon": per_horizon, "mean": float(per_horizon.mean())}


# ---------------------------------------------------------------------------------------------
# Ego4D long-term anticipation


def levenshtein(a, b):
  """Plain Levenshtein distance (unit insert/delete/substitute) between rows of two int arrays.

  a: (P, L1), b: (P, L2) int. Returns (P,) int64. One vectorised DP row per element of a: within a
  row, insertions chain left to right, which is a running minimum of (d[j] - j) + j.
  """
  a, b = np.atleast_2d(a), np.atleast_2d(b)
  if a.shape[0] != b.shape[0]:
    raise ValueError(f"a and b need the same number of rows; got {a.shape} and {b.shape}")
  cols = np.arange(b.shape[1] + 1)
  row = np.broadcast_to(cols, (a.shape[0], cols.size)).astype(np.int64)
  for i in range(a.shape[1]):
    substitute = row[:, :-1] + (a[:, i:i + 1] != b)
    best = np.concatenate([np.full((a.shape[0], 1), i + 1), np.minimum(row[:, 1:] + 1, substitute)],
                          axis=1)
    row = np.minimum.accumulate(best - cols, axis=1) + cols
  return row[:, -1]


def edit_distance_at_z(preds, labels):
  """Ego4D LTA edit distance @ Z: mean over n of min_k Levenshtein(preds[n, k], labels[n]) / Z.

  preds: (N, K, Z) int, K candidate sequences per sample (the official lta_metrics takes (N, Z, K));
  labels: (N, Z) int. Returns a float in [0, 1], lower is better.
  """
  preds, labels = np.asarray(preds), np.asarray(labels)
  if preds.ndim != 3 or labels.shape != (preds.shape[0], preds.shape[2]):
    raise ValueError(f"preds must be (N, K, Z) and labels (N, Z); got {preds.shape} and "
                     f"{labels.shape}")
  n, k, z = preds.shape
  dist = levenshtein(preds.reshape(n * k, z), np.repeat(labels, k, axis=0)).reshape(n, k)
  return float(np.mean(dist.min(axis=1) / z))


def ego4d_lta_metrics(verb_preds, noun_preds, verb_labels, noun_labels):
  """Edit distance @ Z for verb, noun and action on Ego4D LTA.

  *_preds: (N, K, Z) int; *_labels: (N, Z) int. The action token of a step is its (verb, noun) pair:
  an action matches only when both match (the pairing, not an action vocabulary, decides equality).
  Returns {"verb", "noun", "action"}: floats in [0, 1], lower is better.
  """
  verb_preds, noun_preds = np.asarray(verb_preds, np.int64), np.asarray(noun_preds, np.int64)
  verb_labels, noun_labels = np.asarray(verb_labels, np.int64), np.asarray(noun_labels, np.int64)
  nouns = max(noun_preds.max(), noun_labels.max()) + 1
  lowest = min(noun_preds.min(), noun_labels.min(), verb_preds.min(), verb_labels.min())
  if lowest < 0:
    raise ValueError(f"labels and predictions must be >= 0; found {lowest}")
  return {
      "verb": edit_distance_at_z(verb_preds, verb_labels),
      "noun": edit_distance_at_z(noun_preds, noun_labels),
      "action": edit_distance_at_z(verb_preds * nouns + noun_preds,
                                   verb_labels * nouns + noun_labels),
  }
