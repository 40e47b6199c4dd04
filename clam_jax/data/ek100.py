"""EPIC-KITCHENS-100 action anticipation: annotations + RULSTM-layout LMDB features, random access.

Annotations (one CSV per split), either layout is detected from the first line:
    EPIC_100_{train,validation}.csv  header row; narration_id, video_id, start_timestamp,
                          stop_timestamp ("HH:MM:SS.ss"), verb_class, noun_class, all_noun_classes
                          ("[2, 5]", read with ast.literal_eval), ... (start_frame/stop_frame count
                          frames at each video's nominal rate and are ignored)
    RULSTM training.csv / validation.csv  no header; narration_id, video_id, start_frame,
                          stop_frame (30 fps, seconds = frame / 30), verb, noun, action
    actions.csv           header id,verb,noun,action: the action classes = (verb, noun) pairs (3806)
Features (root):
    <root>/<modality>/data.mdb  one LMDB per modality; key f"{video_id}_frame_{frame:010d}.jpg"
                          counting frames of the 30 fps re-encoding from 1; value raw float32 (dim)

Sampling (AFFT's "last clip", DATA_FORMATS.md section 2): the observation ends tau_a =
anticipation_seconds before the action's start, obs_end = start - tau_a, and holds
T = obs_seconds * fps times t_k = obs_end - (T - 1 - k) / fps, k = 0..T-1 (oldest first), read at
the 30 fps frame floor(t_k * 30) as RULSTM and AFFT do. Frames < 1 (before the video start) are
left padding: zero features, mask False. Segments whose obs_end < 1/30 s (last frame < 1) have no
observation and are dropped from the source; `dropped_rows` keeps them so evaluation can count
them as misses. A missing key is replaced by the nearest earlier frame up to 9 back (AFFT);
beyond that it is an error.

Example (one dict, numpy):
    "features":       {modality: (T, dim) float32}
    "mask":           (T,) bool, False on padding
    "future_targets": {"verb", "noun", "action": (1,) int32}, the anticipated action
    "past_targets":   {"verb", "noun", "action": (T,) int32}, the annotated segment covering t_k
                      (closest centre wins among overlapping ones), -1 if none or padding
    "sample_id":      () int64, index into this source; source.rows[sample_id] is its annotation row
"""

import ast
import csv
import dataclasses
import itertools
import os
import threading

import lmdb
import numpy as np

LMDB_FPS = 30
LOOKBACK_FRAMES = 9
HEADS = ("verb", "noun", "action")
EPIC_COLUMNS = ("narration_id", "video_id", "start_timestamp", "stop_timestamp", "verb_class",
                "noun_class", "all_noun_classes")
RULSTM_COLUMNS = ("narration_id", "video_id", "start_frame", "stop_frame", "verb", "noun",
                  "action")
# Seconds from timestamps or frame / 30 are inexact binary fractions: (46/30 - 1) * 30 is
# 15.999999999999998. Timestamps have centisecond resolution, far above this tolerance.
_FRAME_EPS = 1e-6


@dataclasses.dataclass(frozen=True, eq=False)
class Annotations:
  """One split's segments, S rows in file order (seconds; class ids; all_noun_classes is None for
  RULSTM CSVs, else a tuple of tuples)."""
  path: str
  narration_id: np.ndarray  # (S,) str
  video_id: np.ndarray      # (S,) str
  start: np.ndarray         # (S,) float64 seconds
  stop: np.ndarray          # (S,) float64 seconds
  verb: np.ndarray          # (S,) int32
  noun: np.ndarray          # (S,) int32
  action: np.ndarray        # (S,) int32
  all_noun_classes: tuple | None

  def __len__(self):
    return len(self.narration_id)


def frame_index(seconds):
  """30 fps LMDB frame numbers (1-based) of times in seconds: floor(seconds * 30), any shape."""
  return np.floor(np.asarray(seconds) * LMDB_FPS + _FRAME_EPS).astype(np.int64)


def frame_key(video_id, frame):
  """The RULSTM LMDB key of a 30 fps frame, e.g. 'P01_11_frame_0000000113.jpg'."""
  return f"{video_id}_frame_{frame:010d}.jpg"


def _open_csv(path, what):
  if not os.path.exists(path):
    raise FileNotFoundError(f"EK100 {what} file not found: {path}")
  return open(path, newline="")


def _check_header(path, header, required):
  missing = [c for c in required if c not in header]
  if missing:
    raise ValueError(f"{path}: missing column(s) {missing}; found header {header}")
  return {c: header.index(c) for c in required}


def _field(path, line, column, value, parse):
  try:
    return parse(value)
  except (ValueError, SyntaxError) as e:
    raise ValueError(f"{path}, line {line}, column '{column}': cannot parse {value!r} ({e})") from e


def _timestamp(value):
  """'HH:MM:SS.ss' -> seconds."""
  hours, minutes, seconds = value.split(":")
  return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _int_list(value):
  parsed = ast.literal_eval(value)
  if not isinstance(parsed, list) or not all(isinstance(x, int) for x in parsed):
    raise ValueError("expected a list of ints")
  return tuple(parsed)


def load_actions(path):
  """actions.csv -> {(verb_class, noun_class): action_id}; ids must be 0..A-1 in row order."""
  with _open_csv(path, "actions") as f:
    reader = csv.reader(f)
    header = next(reader, [])
    index = _check_header(path, header, ("id", "verb", "noun"))
    actions = {}
    for row in reader:
      line = reader.line_num
      if len(row) != len(header):
        raise ValueError(f"{path}, line {line}: expected {len(header)} fields, found {len(row)}")
      action, verb, noun = (_field(path, line, c, row[index[c]], int)
                            for c in ("id", "verb", "noun"))
      if action != len(actions) or (verb, noun) in actions:
        raise ValueError(f"{path}, line {line}: expected action id {len(actions)} for a new "
                         f"(verb, noun) pair, found id {action} for ({verb}, {noun})")
      actions[verb, noun] = action
  return actions


def load_class_names(path):
  """EPIC_100_{verb,noun}_classes.csv -> list of class keys; ids must be 0..C-1 in row order."""
  with _open_csv(path, "class list") as f:
    reader = csv.reader(f)
    index = _check_header(path, next(reader, []), ("id", "key"))
    keys = []
    for row in reader:
      class_id = _field(path, reader.line_num, "id", row[index["id"]], int)
      if class_id != len(keys):
        raise ValueError(f"{path}, line {reader.line_num}: expected id {len(keys)}, found "
                         f"{class_id}")
      keys.append(row[index["key"]])
  return keys


def _action_id(path, line, actions, verb, noun):
  if (verb, noun) not in actions:
    raise ValueError(f"{path}, line {line}: unknown class: (verb_class={verb}, noun_class={noun}) "
                     f"is not an action of actions.csv ({len(actions)} actions)")
  return actions[verb, noun]


def _epic_rows(path, reader, header, actions):
  index = _check_header(path, header, EPIC_COLUMNS)
  for row in reader:
    line = reader.line_num
    if len(row) != len(header):
      raise ValueError(f"{path}, line {line}: expected {len(header)} fields, found {len(row)}")
    get = lambda column, parse: _field(path, line, column, row[index[column]], parse)
    verb, noun = get("verb_class", int), get("noun_class", int)
    yield (row[index["narration_id"]], row[index["video_id"]], get("start_timestamp", _timestamp),
           get("stop_timestamp", _timestamp), verb, noun,
           _action_id(path, line, actions, verb, noun), get("all_noun_classes", _int_list))


def _rulstm_rows(path, reader, first, actions):
  for row in itertools.chain([first], reader):
    line = reader.line_num
    if len(row) != len(RULSTM_COLUMNS):
      raise ValueError(f"{path}, line {line}: expected {len(RULSTM_COLUMNS)} fields "
                       f"{RULSTM_COLUMNS} (RULSTM layout, no header), found {len(row)}")
    try:
      start, stop, verb, noun, action = map(int, row[2:])
    except ValueError:  # name the offending column
      for column, value in zip(RULSTM_COLUMNS[2:], row[2:]):
        _field(path, line, column, value, int)
    expected = _action_id(path, line, actions, verb, noun)
    if action != expected:
      raise ValueError(f"{path}, line {line}, column 'action': {action} disagrees with "
                       f"actions.csv, which maps ({verb}, {noun}) to {expected}")
    yield row[0], row[1], start / LMDB_FPS, stop / LMDB_FPS, verb, noun, action, None


def load_annotations(path, actions):
  """A split's CSV (EPIC_100_*.csv or RULSTM training/validation.csv) -> Annotations.

  actions: load_actions(actions.csv). Raises naming the file, line and column on missing columns,
  malformed fields and (verb, noun) pairs that are not actions.
  """
  with _open_csv(path, "annotation") as f:
    reader = csv.reader(f)
    first = next(reader, None)
    if first is None:
      raise ValueError(f"{path}: empty annotation file")
    if "narration_id" in first:
      rows = list(_epic_rows(path, reader, first, actions))
    else:
      rows = list(_rulstm_rows(path, reader, first, actions))
  if not rows:
    raise ValueError(f"{path}: no annotation rows")
  narration_id, video_id, start, stop, verb, noun, action, nouns = zip(*rows)
  return Annotations(path, np.array(narration_id), np.array(video_id), np.array(start, np.float64),
                     np.array(stop, np.float64), np.array(verb, np.int32), np.array(noun, np.int32),
                     np.array(action, np.int32), None if nouns[0] is None else nouns)


_ENVS = {}
_ENVS_LOCK = threading.Lock()


def _open_lmdb(path, modality):
  """One read-only handle per LMDB folder and process, shared by all sources and threads: py-lmdb
  refuses to open an environment twice in a process. Grain workers are spawned and open their own
  when the pickled source first reads."""
  with _ENVS_LOCK:
    key = os.path.realpath(path)
    if key not in _ENVS:
      if not os.path.exists(os.path.join(path, "data.mdb")):
        raise FileNotFoundError(f"EK100 {modality} features: no LMDB at {path} (expected "
                                f"{os.path.join(path, 'data.mdb')})")
      _ENVS[key] = lmdb.open(path, readonly=True, lock=False, readahead=False)
    return _ENVS[key]


class EK100Source:
  """Random-access EK100 anticipation examples for grain (module docstring: sampling, example).

  annotations: the split's CSV; actions: actions.csv; root: folder of the per-modality LMDBs;
  modalities: {name: feature dim}. T = obs_seconds * fps must be an integer.
  rows: (N,) annotation rows of the examples; dropped_rows: rows without observation.
  The LMDBs are opened read-only without locking, once per process (the source is pickled to grain
  workers, which open them at their first read) and must not change while it runs; their presence
  and feature dims are checked at construction, values (dim, NaN/Inf) at every read.
  """

  def __init__(self, annotations, actions, root, modalities, *, obs_seconds, fps,
               anticipation_seconds=1.0):
    if not modalities:
      raise ValueError("modalities must name at least one {modality: feature dim}")
    if not 0 < fps <= LMDB_FPS:
      raise ValueError(f"fps must be in (0, {LMDB_FPS}]; got {fps}")
    steps = obs_seconds * fps
    if steps < 1 or abs(steps - round(steps)) > 1e-6:
      raise ValueError(f"obs_seconds * fps must be a positive integer (frames per window); got "
                       f"{obs_seconds} * {fps}")
    self.root = root
    self.modalities = dict(modalities)
    self.obs_seconds, self.fps, self.anticipation_seconds = obs_seconds, fps, anticipation_seconds
    self.num_frames = round(steps)
    self.annotations = load_annotations(annotations, load_actions(actions))
    ann = self.annotations
    observed = frame_index(ann.start - anticipation_seconds) >= 1
    self.rows = np.flatnonzero(observed)
    self.dropped_rows = np.flatnonzero(~observed)
    self._segments = {}
    for row, video in enumerate(ann.video_id):
      self._segments.setdefault(video, []).append(row)
    self._segments = {video: np.array(rows) for video, rows in self._segments.items()}
    for modality, dim in self.modalities.items():
      self._check_lmdb(modality, dim)

  def _lmdb_path(self, modality):
    return os.path.join(self.root, modality)

  def _env(self, modality):
    return _open_lmdb(self._lmdb_path(modality), modality)

  def _check_lmdb(self, modality, dim):
    with self._env(modality).begin() as txn:
      cursor = txn.cursor()
      if not cursor.first():
        raise ValueError(f"EK100 {modality} features: LMDB {self._lmdb_path(modality)} is empty")
      self._check_dim(modality, cursor.key().decode(), cursor.value(), dim)

  def _check_dim(self, modality, key, value, dim):
    if len(value) != 4 * dim:
      raise ValueError(f"EK100 {modality} features in {self._lmdb_path(modality)}: key '{key}' "
                       f"holds {len(value)} bytes = {len(value) / 4:g} float32, expected dim {dim} "
                       f"(data config modalities)")

  def _read(self, modality, video_id, frames):
    """(n,) frame numbers >= 1 -> (n, dim) float32."""
    dim = self.modalities[modality]
    keys, values = [], []
    with self._env(modality).begin() as txn:
      for frame in frames:
        for earlier in range(frame, max(frame - LOOKBACK_FRAMES, 1) - 1, -1):
          key = frame_key(video_id, earlier)
          value = txn.get(key.encode())
          if value is not None:
            break
        else:
          raise KeyError(f"EK100 {modality} features: LMDB {self._lmdb_path(modality)} has no key "
                         f"'{frame_key(video_id, frame)}' nor any of the {LOOKBACK_FRAMES} frames "
                         f"before it")
        self._check_dim(modality, key, value, dim)
        keys.append(key)
        values.append(value)
    out = np.frombuffer(b"".join(values), np.float32).reshape(len(frames), dim)
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():
      raise ValueError(f"EK100 {modality} features: NaN or Inf in key '{keys[finite.argmin()]}' of "
                       f"LMDB {self._lmdb_path(modality)}")
    return out

  def _past_targets(self, video_id, times, valid):
    """Per-time labels of the covering segment with the closest centre: {head: (T,) int32}."""
    ann, rows = self.annotations, self._segments[video_id]
    start, stop = ann.start[rows], ann.stop[rows]
    covers = (start <= times[:, None]) & (times[:, None] <= stop) & valid[:, None]
    distance = np.where(covers, np.abs(times[:, None] - (start + stop) / 2), np.inf)
    closest = rows[distance.argmin(axis=1)]
    found = covers.any(axis=1)
    return {head: np.where(found, getattr(ann, head)[closest], -1).astype(np.int32)
            for head in HEADS}

  def __len__(self):
    return len(self.rows)

  def video_features(self, video_id, times):
    """The features of video_id at times (n,) seconds: ({modality: (n, dim) float32}, mask (n,)
    bool: False (and zeros) before the video's first frame)."""
    frames = frame_index(times)
    mask = frames >= 1
    features = {}
    for modality, dim in self.modalities.items():
      features[modality] = np.zeros((len(frames), dim), np.float32)
      features[modality][mask] = self._read(modality, video_id, frames[mask])
    return features, mask

  def __getitem__(self, sample_id):
    ann, row = self.annotations, self.rows[sample_id]
    video_id = ann.video_id[row]
    obs_end = ann.start[row] - self.anticipation_seconds
    times = obs_end - np.arange(self.num_frames - 1, -1, -1) / self.fps
    features, mask = self.video_features(video_id, times)
    return {
        "features": features,
        "mask": mask,
        "future_targets": {head: np.array([getattr(ann, head)[row]], np.int32) for head in HEADS},
        "past_targets": self._past_targets(video_id, times, mask),
        "sample_id": np.int64(sample_id),
    }

  def __repr__(self):
    return (f"EK100Source(annotations={self.annotations.path!r}, root={self.root!r}, "
            f"modalities={self.modalities}, obs_seconds={self.obs_seconds}, fps={self.fps}, "
            f"anticipation_seconds={self.anticipation_seconds}, len={len(self)})")
