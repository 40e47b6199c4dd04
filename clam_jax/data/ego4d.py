"""Ego4D long-term anticipation (fho_lta) on per-clip VideoMAE features: a random-access source.

Annotations (annotation_dir):
    fho_lta_{split}.json   {"clips": [one entry per action: clip_uid, action_idx,
                           action_clip_start_frame, action_clip_end_frame (30 fps, relative to the
                           clip), verb_label, noun_label (absent in test_unannotated), ...]}
    fho_lta_taxonomy.json  {"verbs": [...], "nouns": [...]} (v2: 117 verbs, 521 nouns)
Features (feature_dirs, e.g. the VideoMAE-L verb and noun models as QueryMamba uses them):
    {feature_dir}/{clip_uid}.npy  (T, F_i), one vector per `frame_stride` frames of the clip;
    {clip_uid}.pt (a torch tensor) is read only when torch is installed. The dirs are concatenated
    on the last axis (2 x 1024 = 2048).

Samples follow the Ego4D forecasting helper: the actions of a clip sorted by action_idx, windows of
num_observed (8) observed + num_future (Z = 20) future actions starting at i = 0 .. n - 29, i.e.
exactly the official evaluation keys f"{clip_uid}_{last observed action_idx}" (QueryMamba trains on
one more window per clip; the challenge keys never include it).

The observation ends at the feature step of the latest observed action end,
round(max action_clip_end_frame / frame_stride) (Python's round, as QueryMamba's frame_to_feat),
and covers the `window` steps before it, left-padded (mask False) at the clip start.

Example (one dict, numpy):
    "features":       {"videomae": (window, feature_dim) float32}
    "mask":           (window,) bool
    "past_targets":   {"verb", "noun": (window,) int32}, the label of the observed-or-earlier action
                      covering each step (steps [round(start/stride), round(end/stride)), later
                      actions win), -1 elsewhere and on the test split
    "future_targets": {"verb", "noun": (num_future,) int32}, -1 on the test split
    "sample_id":      () int64, index into this source; source.keys[sample_id] is its eval key
"""

import collections
import json
import os

import numpy as np

MODALITY = "videomae"
REQUIRED_FIELDS = ("clip_uid", "action_idx", "action_clip_start_frame", "action_clip_end_frame")
LABEL_FIELDS = ("verb_label", "noun_label")
UNLABELLED_SPLIT = "test_unannotated"


def _load_json(path):
  if not os.path.exists(path):
    raise FileNotFoundError(f"Ego4D annotation file not found: {path}")
  with open(path) as f:
    return json.load(f)


def load_taxonomy(annotation_dir):
  """(number of verbs, number of nouns) from fho_lta_taxonomy.json."""
  path = os.path.join(annotation_dir, "fho_lta_taxonomy.json")
  taxonomy = _load_json(path)
  missing = [key for key in ("verbs", "nouns") if key not in taxonomy]
  if missing:
    raise KeyError(f"{path}: lacks {missing}; expected {{'verbs': [...], 'nouns': [...]}}")
  return len(taxonomy["verbs"]), len(taxonomy["nouns"])


def load_clips(annotation_dir, split):
  """fho_lta_{split}.json grouped by clip_uid, each clip's actions sorted by action_idx.

  Returns {clip_uid: [entry dict, ...]}; entries of the unlabelled split get verb_label = noun_label
  = -1. Raises naming the file, the entry and the missing fields.
  """
  path = os.path.join(annotation_dir, f"fho_lta_{split}.json")
  data = _load_json(path)
  if "clips" not in data:
    raise KeyError(f"{path}: no 'clips' list; found keys {sorted(data)}")
  required = REQUIRED_FIELDS + (() if split == UNLABELLED_SPLIT else LABEL_FIELDS)
  clips = collections.defaultdict(list)
  for i, entry in enumerate(data["clips"]):
    missing = [field for field in required if field not in entry]
    if missing:
      raise KeyError(f"{path}: clips[{i}] (clip_uid {entry.get('clip_uid')!r}) lacks field(s) "
                     f"{missing}")
    clips[entry["clip_uid"]].append({"verb_label": -1, "noun_label": -1, **entry})
  return {uid: sorted(actions, key=lambda a: a["action_idx"]) for uid, actions in clips.items()}


def _feature_path(feature_dir, clip_uid):
  for ext in (".npy", ".pt"):
    path = os.path.join(feature_dir, clip_uid + ext)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"Ego4D features of clip {clip_uid!r} not found: no {clip_uid}.npy or "
                          f"{clip_uid}.pt in {feature_dir}")


def _load_features(path, mmap):
  if path.endswith(".npy"):
    return np.load(path, mmap_mode="r" if mmap else None)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"{path} is a torch file and torch is not installed: convert the features to "
                      f".npy (np.save(path, torch.load(path).numpy()) where torch exists)") from e
  return torch.load(path, map_location="cpu").float().numpy()


class Ego4dLtaSource:
  """Random-access Ego4D LTA windows for grain (see the module docstring for the example dict).

  annotation_dir: folder of fho_lta_{split}.json and fho_lta_taxonomy.json; split: "train", "val" or
  "test_unannotated"; feature_dirs: folders of per-clip features, concatenated in this order;
  window: observed feature steps per example; feature_dim: expected concatenated dim;
  frame_stride: frames per feature step.
  .npy headers are checked at construction (missing files, 2-D, equal T across dirs, dim); values
  are checked for NaN/Inf when read.
  """

  def __init__(self, annotation_dir, split, *, feature_dirs, window, feature_dim=2048,
               frame_stride=16, num_observed=8, num_future=20):
    if not feature_dirs:
      raise ValueError("feature_dirs must name at least one folder")
    self.num_verbs, self.num_nouns = load_taxonomy(annotation_dir)
    self.clips = load_clips(annotation_dir, split)
    self.feature_dirs = tuple(feature_dirs)
    self.window = window
    self.feature_dim = feature_dim
    self.frame_stride = frame_stride
    self.num_observed = num_observed
    self.num_future = num_future
    self._check_labels(os.path.join(annotation_dir, f"fho_lta_{split}.json"))
    span = num_observed + num_future
    self.index = [(uid, i) for uid, actions in self.clips.items()
                  for i in range(len(actions) - span)]
    self.keys = [f"{uid}_{self.clips[uid][i + num_observed - 1]['action_idx']}"
                 for uid, i in self.index]
    self.paths = {uid: [_feature_path(d, uid) for d in self.feature_dirs]
                  for uid in dict.fromkeys(uid for uid, _ in self.index)}
    for uid, paths in self.paths.items():
      if all(p.endswith(".npy") for p in paths):
        self._check_shapes(uid, [_load_features(p, mmap=True) for p in paths])

  def _check_labels(self, path):
    for uid, actions in self.clips.items():
      for action in actions:
        for field, size in (("verb_label", self.num_verbs), ("noun_label", self.num_nouns)):
          if not -1 <= action[field] < size:
            raise ValueError(f"{path}: clip {uid} action_idx {action['action_idx']}: {field} "
                             f"{action[field]} outside the taxonomy's [0, {size})")

  def _check_shapes(self, uid, arrays):
    paths = self.paths[uid]
    for path, array in zip(paths, arrays):
      if array.ndim != 2:
        raise ValueError(f"{path}: expected (T, F) features, found shape {array.shape}")
    lengths = {path: array.shape[0] for path, array in zip(paths, arrays)}
    if len(set(lengths.values())) > 1:
      raise ValueError(f"clip {uid}: feature files disagree on T: {lengths}")
    dim = sum(array.shape[1] for array in arrays)
    if dim != self.feature_dim:
      raise ValueError(f"clip {uid}: concatenated feature dim {dim} from "
                       f"{[(p, a.shape) for p, a in zip(paths, arrays)]}, "
                       f"expected {self.feature_dim}")

  def _step(self, frame):
    return round(frame / self.frame_stride)

  def __len__(self):
    return len(self.index)

  def __getitem__(self, sample_id):
    uid, first = self.index[sample_id]
    actions = self.clips[uid]
    observed = actions[first:first + self.num_observed]
    future = actions[first + self.num_observed:first + self.num_observed + self.num_future]

    arrays = [_load_features(p, mmap=True) for p in self.paths[uid]]
    self._check_shapes(uid, arrays)
    length = arrays[0].shape[0]
    end = self._step(max(a["action_clip_end_frame"] for a in observed))
    # round() of a clip's last frame may land one step past the clip's features.
    if end > length + 1:
      raise ValueError(f"clip {uid}: observation ends at feature step {end} but "
                       f"{self.paths[uid][0]} has only {length} steps")
    end = min(end, length)
    start = max(0, end - self.window)
    features = np.concatenate([np.asarray(a[start:end], np.float32) for a in arrays], axis=1)
    if not np.isfinite(features).all():
      raise ValueError(f"clip {uid}: NaN or Inf in features rows {start}..{end - 1} of "
                       f"{self.paths[uid]}")
    pad = self.window - (end - start)
    features = np.pad(features, [(pad, 0), (0, 0)])

    past = {head: np.full(self.window, -1, np.int32) for head in ("verb", "noun")}
    offset = end - self.window
    for action in actions[:first + self.num_observed]:
      lo = max(self._step(action["action_clip_start_frame"]) - offset, 0)
      hi = min(self._step(action["action_clip_end_frame"]) - offset, self.window)
      if lo < hi:  # a negative hi would slice from the far end
        for head in past:
          past[head][lo:hi] = action[f"{head}_label"]
    return {
        "features": {MODALITY: features},
        "mask": np.arange(self.window) >= pad,
        "past_targets": past,
        "future_targets": {head: np.array([a[f"{head}_label"] for a in future], np.int32)
                           for head in ("verb", "noun")},
        "sample_id": np.int64(sample_id),
    }
