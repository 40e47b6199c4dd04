"""THUMOS'14 per-frame features and targets (LSTR/TeSTra/MAT layout) as a random-access source.

On disk (4 feature steps per second, one file per session = video):

    {root}/rgb_kinetics_resnet50/{session}.npy       (T, 2048)
    {root}/flow_kinetics_bninception/{session}.npy   (T, 1024)
    {root}/target_perframe/{session}.npy             (T, 22) 0/1: 0 Background, 1..20 actions,
                                                      21 Ambiguous; rows may be multi-hot
    data_info.json  ["THUMOS"]: class_names, train_session_set (200), test_session_set (213)

Example (one dict, numpy; W = window steps, or the session's T when window is None):
    "features":            {modality: (W, F_m) float32}
    "mask":                (W,) bool, False on the left padding before the video start
    "frame_targets":       (W, 22) float32 multi-hot rows of target_perframe (zeros on padding)
    "past_targets":        {"action": (W,) int32} single label per step, -1 on padding, ambiguous
                           or empty rows (see `single_labels`)
    "future_frame_targets": (F, 22) float32, the rows of the F steps after the window (zeros past
                           the video end)
    "future_targets":      {"action": (F,) int32}, their single labels (-1 past the video end)
    "sample_id":           () int64, index into this source
"""

import json
import os

import numpy as np

MODALITIES = {"rgb": ("rgb_kinetics_resnet50", 2048), "flow": ("flow_kinetics_bninception", 1024)}
TARGET_DIR = "target_perframe"
SPLITS = {"train": "train_session_set", "test": "test_session_set"}


def load_data_info(path, dataset="THUMOS"):
  """data_info.json's entry for `dataset`: class_names, ignore_index, fps, *_session_set, ..."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"data_info.json not found: {path}")
  with open(path) as f:
    info = json.load(f)
  if dataset not in info:
    raise KeyError(f"{path}: no entry '{dataset}'; found {sorted(info)}")
  entry = info[dataset]
  missing = [key for key in ("class_names", "ignore_index", "fps", *SPLITS.values())
             if key not in entry]
  if missing:
    raise KeyError(f"{path}: entry '{dataset}' lacks {missing}")
  return entry


def single_labels(rows, ignore_index=21):
  """One class per row of multi-hot targets: (N, C) {0, 1} -> (N,) int32.

  -1 where the ignore (Ambiguous) column is set or no column is; otherwise the lowest set column
  other than ignore_index, which picks the more specific class of THUMOS's overlapping pairs
  (CliffDiving 5 over Diving 8, CricketBowling 6 over CricketShot 7).
  """
  rows = np.asarray(rows) > 0.5
  valid = rows.copy()
  valid[:, ignore_index] = False
  labels = np.where(valid.any(axis=1), valid.argmax(axis=1), -1)
  labels[rows[:, ignore_index]] = -1
  return labels.astype(np.int32)


class Thumos14Source:
  """Random-access THUMOS'14 windows (or whole sessions) for grain.

  root: folder with the per-modality and target_perframe subfolders; data_info: path of
  data_info.json; split: "train" (the THUMOS validation videos) or "test".
  modalities: names from MODALITIES. window: steps per example; examples end at T-1, T-1-stride,
  ... (>= 0) of every session, so every step is covered when stride <= window and the first window
  is left-padded (mask False). window=None gives one example per whole session (evaluation; T
  varies). future_steps: F, the anticipation horizon in steps (8 = 2 s at 4 fps).
  File headers are checked at construction (missing files, T mismatches, feature dims); values are
  checked for NaN/Inf when read.
  """

  def __init__(self, root, split, *, data_info, modalities=("rgb", "flow"), window=None,
               stride=None, future_steps=8):
    info = load_data_info(data_info)
    if split not in SPLITS:
      raise ValueError(f"split must be one of {sorted(SPLITS)}; got {split!r}")
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities:
      raise ValueError(f"modalities must be a non-empty subset of {sorted(MODALITIES)}; "
                       f"got {modalities}")
    self.root = root
    self.modalities = tuple(modalities)
    self.num_classes = len(info["class_names"])
    self.ignore_index = info["ignore_index"]
    self.sessions = list(info[SPLITS[split]])
    self.window = window
    self.stride = window if stride is None else stride
    self.future_steps = future_steps
    if window is not None and (window < 1 or self.stride < 1):
      raise ValueError(f"window and stride must be >= 1; got window={window}, stride={stride}")
    self.lengths = [self._check_session(session) for session in self.sessions]
    if window is None:
      self.index = [(i, length - 1) for i, length in enumerate(self.lengths)]
    else:
      self.index = [(i, end) for i, length in enumerate(self.lengths)
                    for end in range(length - 1, -1, -self.stride)[::-1]]

  def _path(self, subdir, session):
    return os.path.join(self.root, subdir, f"{session}.npy")

  def _open(self, subdir, session):
    path = self._path(subdir, session)
    if not os.path.exists(path):
      raise FileNotFoundError(f"THUMOS session '{session}': missing file {path}")
    return np.load(path, mmap_mode="r")

  def _check_session(self, session):
    target = self._open(TARGET_DIR, session)
    if target.ndim != 2 or target.shape[1] != self.num_classes:
      raise ValueError(f"{self._path(TARGET_DIR, session)}: expected (T, {self.num_classes}) "
                       f"targets, found shape {target.shape}")
    for modality in self.modalities:
      subdir, dim = MODALITIES[modality]
      features = self._open(subdir, session)
      if features.ndim != 2 or features.shape[1] != dim:
        raise ValueError(f"{self._path(subdir, session)}: expected (T, {dim}) {modality} features, "
                         f"found shape {features.shape}")
      if features.shape[0] != target.shape[0]:
        raise ValueError(f"session '{session}': {modality} features have T={features.shape[0]} but "
                         f"{TARGET_DIR} has T={target.shape[0]}")
    return target.shape[0]

  def _read(self, subdir, session, start, stop):
    values = np.asarray(self._open(subdir, session)[start:stop], np.float32)
    if not np.isfinite(values).all():
      raise ValueError(f"{self._path(subdir, session)}: NaN or Inf in rows {start}..{stop - 1}")
    return values

  def __len__(self):
    return len(self.index)

  def __getitem__(self, sample_id):
    session_index, end = self.index[sample_id]
    session = self.sessions[session_index]
    length = self.lengths[session_index]
    window = length if self.window is None else self.window
    start = max(0, end + 1 - window)
    pad = window - (end + 1 - start)
    left_pad = lambda x: np.pad(x, [(pad, 0)] + [(0, 0)] * (x.ndim - 1))

    features = {m: left_pad(self._read(MODALITIES[m][0], session, start, end + 1))
                for m in self.modalities}
    frame_targets = left_pad(self._read(TARGET_DIR, session, start, end + 1))
    future = self._read(TARGET_DIR, session, end + 1, end + 1 + self.future_steps)
    future_frame_targets = np.pad(future, [(0, self.future_steps - len(future)), (0, 0)])
    return {
        "features": features,
        "mask": np.arange(window) >= pad,
        "frame_targets": frame_targets,
        "past_targets": {"action": single_labels(frame_targets, self.ignore_index)},
        "future_frame_targets": future_frame_targets,
        "future_targets": {"action": single_labels(future_frame_targets, self.ignore_index)},
        "sample_id": np.int64(sample_id),
    }
