"""EK100 annotations (real CSVs from shared/data) and EK100Source on a fake RULSTM LMDB whose
values encode their frame, so windows, padding, sampling, dropping and past labels are exact."""

import os
import pickle
from pathlib import Path

import lmdb
import numpy as np
import pytest

from clam_jax.data import ek100

SHARED_DATA = Path(os.environ.get("CLAM_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))
EPIC_DIR = SHARED_DATA / "ek100_annotations"
RULSTM_DIR = SHARED_DATA / "ek100_rulstm"
real_data = pytest.mark.skipif(not (RULSTM_DIR / "actions.csv").exists(),
                               reason=f"real EK100 CSVs not found under {SHARED_DATA}")

EPIC_HEADER = ("narration_id,participant_id,video_id,narration_timestamp,start_timestamp,"
               "stop_timestamp,start_frame,stop_frame,narration,verb,verb_class,noun,noun_class,"
               "all_nouns,all_noun_classes")
PAIRS = [(0, 2), (1, 2), (2, 10), (3, 8), (3, 9)]  # ids in f"{verb}_{noun}" order, as RULSTM's
VIDEOS = {"P01_11": 200, "P01_101": 300, "P03_04": 150}  # 30 fps frames
DIMS = {"rgb": 24, "obj": 7}
# (video, start s, stop s, verb, noun); P01_11 probes the video start and the drop rule, P01_101
# the closest-centre rule for overlapping segments.
SEGMENTS = [
    ("P01_11", 0.50, 2.00, 0, 2),    # obs_end -0.5: dropped
    ("P01_11", 1.02, 2.50, 1, 2),    # obs_end 0.02 < 1/30: dropped
    ("P01_11", 1.04, 3.00, 3, 8),    # obs_end 0.04: frame 1, the rest padding
    ("P01_11", 2.00, 3.50, 2, 10),   # obs_end 1.0: frames 30, 22, 15, 7, then t=0 -> frame 0: pad
    ("P01_11", 5.50, 6.50, 3, 9),    # obs_end 4.5: a full window
    ("P01_101", 2.00, 4.10, 1, 2),   # A
    ("P01_101", 4.40, 5.10, 3, 8),   # B
    ("P01_101", 3.90, 5.30, 2, 10),  # E
    ("P01_101", 6.50, 8.00, 0, 2),   # target: observes 3.75 .. 5.5
    ("P03_04", 3.10, 4.00, 3, 9),
]
OBS_SECONDS, FPS = 2.0, 4.0  # T = 8, one frame every 7.5 at 30 fps


def _timestamp(seconds):
  centiseconds = round(seconds * 100)
  return f"00:{centiseconds // 6000:02d}:{centiseconds % 6000 // 100:02d}.{centiseconds % 100:02d}"


def _epic_rows(segments=SEGMENTS):
  rows = []
  for i, (video, start, stop, verb, noun) in enumerate(segments):
    # start_frame at a nominal 60 fps: using it as a 30 fps key would read the wrong frames.
    rows.append(f"{video}_{i},{video[:3]},{video},{_timestamp(start)}0,{_timestamp(start)},"
                f"{_timestamp(stop)},{int(start * 60)},{int(stop * 60)},v n,v,{verb},n,{noun},"
                f"\"['n']\",\"[{noun}]\"")
  return rows


def _write(path, lines):
  path.write_text("\n".join(lines) + "\n")
  return path


def _value(rng, video, frame, dim):
  """Feature of a frame: [frame, video index, random...]."""
  return np.concatenate([[frame, list(VIDEOS).index(video)],
                         rng.standard_normal(dim - 2)]).astype(np.float32)


def _write_lmdb(path, values):
  """values: {key: float array} -> <path>/data.mdb."""
  env = lmdb.open(str(path), map_size=1 << 26)
  with env.begin(write=True) as txn:
    for key, value in values.items():
      txn.put(key.encode(), np.asarray(value, np.float32).tobytes())
  env.close()


def _features(rng):
  return {modality: {ek100.frame_key(video, f): _value(rng, video, f, dim)
                     for video, frames in VIDEOS.items() for f in range(1, frames + 1)}
          for modality, dim in DIMS.items()}


@pytest.fixture
def dataset(tmp_path):
  """(root, annotations dict, {modality: {key: value}})."""
  rng = np.random.default_rng()
  features = _features(rng)
  for modality, values in features.items():
    _write_lmdb(tmp_path / modality, values)
  actions = _write(tmp_path / "actions.csv",
                   ["id,verb,noun,action"] + [f"{i},{v},{n},v n" for i, (v, n) in enumerate(PAIRS)])
  epic = _write(tmp_path / "EPIC_100_validation.csv", [EPIC_HEADER] + _epic_rows())
  rulstm = _write(tmp_path / "validation.csv", [
      f"{video}_{i},{video},{int(start * 30 + 1e-6)},{int(stop * 30 + 1e-6)},{v},{n},"
      f"{PAIRS.index((v, n))}"
      for i, (video, start, stop, v, n) in enumerate(SEGMENTS)])
  return tmp_path, {"epic": epic, "rulstm": rulstm, "actions": actions}, features


def _source(root, annotations, actions, modalities=DIMS, **kwargs):
  return ek100.EK100Source(annotations, actions, root, modalities, obs_seconds=OBS_SECONDS, fps=FPS,
                           **kwargs)


def _example(source, row):
  return source[int(np.flatnonzero(source.rows == row)[0])]


@pytest.mark.parametrize("layout", ["epic", "rulstm"])
def test_windows_sampling_padding_and_dropped_segments(dataset, layout):
  root, files, features = dataset
  source = _source(root, files[layout], files["actions"])
  np.testing.assert_array_equal(source.dropped_rows, [0, 1])
  assert len(source) == len(SEGMENTS) - 2
  np.testing.assert_array_equal(source.rows, np.arange(2, len(SEGMENTS)))

  full = _example(source, 4)  # start 5.5 s: times 2.75 .. 4.5 every 0.25 s
  frames = [82, 90, 97, 105, 112, 120, 127, 135]
  assert full["mask"].all()
  for modality, dim in DIMS.items():
    window = full["features"][modality]
    assert window.shape == (8, dim) and window.dtype == np.float32
    np.testing.assert_array_equal(
        window, [features[modality][ek100.frame_key("P01_11", f)] for f in frames])
  assert {h: t.tolist() for h, t in full["future_targets"].items()} == {
      "verb": [3], "noun": [9], "action": [PAIRS.index((3, 9))]}
  assert all(t.dtype == np.int32 for t in full["future_targets"].values())

  first = _example(source, 2)  # obs_end 0.04 s: only frame 1
  np.testing.assert_array_equal(first["mask"], [False] * 7 + [True])
  np.testing.assert_array_equal(first["features"]["rgb"][:7], 0)
  assert first["features"]["obj"][7, 0] == 1 and first["features"]["obj"][7, 1] == 0
  second = _example(source, 3)  # obs_end 1.0 s: 30, 22, 15, 7, then t <= 0 is padding
  np.testing.assert_array_equal(second["mask"], [False] * 4 + [True] * 4)
  np.testing.assert_array_equal(second["features"]["rgb"][4:, 0], [7, 15, 22, 30])
  # Padding has no label; frames covered by segment 0 (0.5-2.0 s) carry its action.
  np.testing.assert_array_equal(second["past_targets"]["action"], [-1] * 4 + [-1, 0, 0, 0])
  assert second["sample_id"].dtype == np.int64


def test_past_targets_pick_the_closest_covering_centre(dataset):
  root, files, _ = dataset
  source = _source(root, files["epic"], files["actions"])
  example = _example(source, 8)  # times 3.75, 4.0, ..., 5.5 in P01_101
  a, b, e = PAIRS.index((1, 2)), PAIRS.index((3, 8)), PAIRS.index((2, 10))
  np.testing.assert_array_equal(example["past_targets"]["action"], [a, e, e, e, b, b, e, -1])
  np.testing.assert_array_equal(example["past_targets"]["verb"], [1, 2, 2, 2, 3, 3, 2, -1])
  np.testing.assert_array_equal(example["past_targets"]["noun"], [2, 10, 10, 10, 8, 8, 10, -1])
  np.testing.assert_array_equal(example["features"]["rgb"][:, 1], 1)  # video P01_101


def test_source_pickles_and_reads_in_a_fresh_process_state(dataset):
  root, files, features = dataset
  source = _source(root, files["epic"], files["actions"])
  clone = pickle.loads(pickle.dumps(source))
  assert repr(clone) == repr(source)
  np.testing.assert_array_equal(clone[3]["features"]["obj"], source[3]["features"]["obj"])


def test_missing_keys_look_back_nine_frames_then_fail(dataset, tmp_path_factory):
  root, files, features = dataset
  other = tmp_path_factory.mktemp("holes")
  for modality, values in features.items():
    holes = range(126, 136) if modality == "obj" else [127, 128]  # rgb: 127 -> 126
    holes = {ek100.frame_key("P01_11", f) for f in holes}
    _write_lmdb(other / modality, {k: v for k, v in values.items() if k not in holes})
  source = _source(other, files["epic"], files["actions"], modalities={"rgb": 24})
  np.testing.assert_array_equal(_example(source, 4)["features"]["rgb"][:, 0],
                                [82, 90, 97, 105, 112, 120, 126, 135])
  # obj lacks frames 126..135: frame 135 has nothing within 9 frames back.
  source = _source(other, files["epic"], files["actions"])
  with pytest.raises(KeyError, match=r"obj.*P01_11_frame_0000000135\.jpg.*9 frames"):
    _example(source, 4)
  with pytest.raises(KeyError, match=str(other / "obj")):
    _example(source, 4)


def test_bad_features_raise_naming_modality_key_and_dims(dataset, tmp_path_factory):
  root, files, features = dataset
  with pytest.raises(ValueError, match=r"obj features in .*obj.*28 bytes = 7 float32, expected "
                                       r"dim 8"):
    _source(root, files["epic"], files["actions"], modalities={"rgb": 24, "obj": 8})
  with pytest.raises(FileNotFoundError, match=r"flow features: no LMDB at .*flow"):
    _source(root, files["epic"], files["actions"], modalities={"flow": 1024})

  bad = tmp_path_factory.mktemp("bad")
  rgb = dict(features["rgb"])
  rgb[ek100.frame_key("P01_11", 120)] = np.where(np.arange(24) == 5, np.nan, 1.0)
  rgb[ek100.frame_key("P01_11", 105)] = np.ones(23)
  _write_lmdb(bad / "rgb", rgb)
  source = _source(bad, files["epic"], files["actions"], modalities={"rgb": 24})
  with pytest.raises(ValueError, match=r"key 'P01_11_frame_0000000105\.jpg' holds 92 bytes"):
    _example(source, 4)
  rgb[ek100.frame_key("P01_11", 105)] = np.ones(24)
  bad2 = tmp_path_factory.mktemp("bad2")
  _write_lmdb(bad2 / "rgb", rgb)
  source = _source(bad2, files["epic"], files["actions"], modalities={"rgb": 24})
  with pytest.raises(ValueError, match=r"NaN or Inf in key 'P01_11_frame_0000000120\.jpg'"):
    _example(source, 4)
  _example(source, 2)  # other windows still read


def test_bad_annotations_raise_naming_file_line_and_column(dataset):
  root, files, _ = dataset
  actions = ek100.load_actions(files["actions"])
  rows = _epic_rows()

  def check(lines, error, pattern, name="bad.csv"):
    path = _write(root / name, lines)
    with pytest.raises(error, match=pattern) as info:
      ek100.load_annotations(str(path), actions)
    assert str(path) in str(info.value)

  check([EPIC_HEADER, rows[0], rows[1].replace("00:00:01.02", "00:00:x1.02")], ValueError,
        r"line 3, column 'start_timestamp': cannot parse '00:00:x1.02'")
  check([EPIC_HEADER, rows[0].replace('"[2]"', '"[2,"')], ValueError,
        r"line 2, column 'all_noun_classes'")
  check([EPIC_HEADER.replace(",noun_class,", ",noun_id,")] + rows, ValueError,
        r"missing column\(s\) \['noun_class'\]")
  check([EPIC_HEADER, rows[0], rows[1].replace(",1,n,2,", ",4,n,77,")], ValueError,
        r"line 3: unknown class: \(verb_class=4, noun_class=77\) is not an action of actions\.csv")
  check([EPIC_HEADER, rows[0] + ",extra"], ValueError, r"line 2: expected 15 fields, found 16")
  check(["P01_11_0,P01_11,15,60,0,2,0", "P01_11_1,P01_11,31,75,0,2"], ValueError,
        r"line 2: expected 7 fields .* found 6")
  check(["P01_11_0,P01_11,15,60,0,2,0", "P01_11_1,P01_11,31,7.5,0,2,0"], ValueError,
        r"line 2, column 'stop_frame': cannot parse '7.5'")
  check(["P01_11_0,P01_11,15,60,3,9,1"], ValueError,
        r"line 1, column 'action': 1 disagrees with actions.csv, which maps \(3, 9\) to 4")
  check(["P01_11_0,P01_11,15,60,9,9,1"], ValueError, r"\(verb_class=9, noun_class=9\)")
  with pytest.raises(FileNotFoundError, match=r"annotation file not found: .*nope\.csv"):
    ek100.load_annotations(str(root / "nope.csv"), actions)
  _write(root / "dup.csv", ["id,verb,noun,action", "0,0,2,a", "1,0,2,b"])
  with pytest.raises(ValueError, match=r"dup\.csv, line 3: expected action id 1 for a new"):
    ek100.load_actions(str(root / "dup.csv"))


def test_source_rejects_bad_window_settings(dataset):
  root, files, _ = dataset
  with pytest.raises(ValueError, match="obs_seconds \\* fps must be a positive integer"):
    ek100.EK100Source(files["epic"], files["actions"], root, DIMS, obs_seconds=2.1, fps=4)
  with pytest.raises(ValueError, match="fps must be in"):
    ek100.EK100Source(files["epic"], files["actions"], root, DIMS, obs_seconds=1, fps=60)


@real_data
def test_real_epic_and_rulstm_csvs_parse_with_consistent_action_ids():
  actions = ek100.load_actions(str(RULSTM_DIR / "actions.csv"))
  assert len(actions) == 3806 and actions[0, 0] == 0 and actions[0, 10] == 2
  epic = ek100.load_annotations(str(EPIC_DIR / "EPIC_100_validation.csv"), actions)
  rulstm = ek100.load_annotations(str(RULSTM_DIR / "validation.csv"), actions)
  assert len(epic) == len(rulstm) == 9668
  assert len(set(epic.video_id)) == 138
  assert (len(set(epic.verb)), len(set(epic.noun)), len(set(epic.action))) == (78, 211, 1352)
  np.testing.assert_array_equal(epic.narration_id, rulstm.narration_id)
  # RULSTM's own action column (checked row by row against actions.csv while loading) equals
  # the mapping of the official CSV's (verb_class, noun_class).
  np.testing.assert_array_equal(epic.action, rulstm.action)
  assert (epic.narration_id[0], epic.start[0], epic.stop[0], epic.all_noun_classes[0]) == (
      "P01_11_0", 0.0, 1.89, (2,))
  frames = ek100.frame_index(epic.start)
  rulstm_frames = np.round(rulstm.start * 30).astype(int)
  assert np.mean(frames == rulstm_frames) > 0.99 and np.abs(frames - rulstm_frames).max() <= 1
  assert len(ek100.load_class_names(str(EPIC_DIR / "EPIC_100_verb_classes.csv"))) == 97
  assert ek100.load_class_names(str(EPIC_DIR / "EPIC_100_noun_classes.csv"))[:2] == ["tap", "spoon"]

  training = ek100.load_annotations(str(RULSTM_DIR / "training.csv"), actions)
  assert len(training) == 67217 and len(set(training.video_id)) == 495
  assert len(set(zip(training.verb, training.noun))) == 3568


@real_data
def test_real_validation_drops_the_30_segments_without_observation(tmp_path):
  _write_lmdb(tmp_path / "rgb", {ek100.frame_key("P01_11", 1): np.ones(5)})
  for annotations in (EPIC_DIR / "EPIC_100_validation.csv", RULSTM_DIR / "validation.csv"):
    source = ek100.EK100Source(str(annotations), str(RULSTM_DIR / "actions.csv"), str(tmp_path),
                               {"rgb": 5}, obs_seconds=16, fps=1)
    assert len(source.dropped_rows) == 30 and len(source) == 9668 - 30
    assert (source.annotations.start[source.dropped_rows] < 1 + 1 / 30).all()
