"""Thumos14Source and Ego4dLtaSource on small fake data in the real layouts (DATA_FORMATS.md
section 9): windows, padding, targets, evaluation keys, and every bad-input error."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from clam_jax.data import ego4d, thumos14

SHARED_DATA = Path(os.environ.get("CLAM_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))
REAL_DATA_INFO = SHARED_DATA / "thumos14" / "data_info.json"

# --- THUMOS'14 ------------------------------------------------------------------------------

TRAIN = {"video_validation_0000690": 37, "video_validation_0000288": 5}
TEST = {"video_test_0000004": 23, "video_test_0000270": 12, "video_test_0001496": 9}


def _class_names():
  if REAL_DATA_INFO.exists():
    return json.loads(REAL_DATA_INFO.read_text())["THUMOS"]["class_names"]
  return ["Background"] + [f"Action{i}" for i in range(1, 21)] + ["Ambiguous"]


def _targets(rng, t):
  """One-hot rows, with CliffDiving+Diving multi-hot and Ambiguous rows."""
  rows = np.eye(22, dtype=np.float32)[rng.integers(0, 21, t)]
  rows[rng.random(t) < 0.2] = np.eye(22)[21]
  cliff = rng.random(t) < 0.2
  rows[cliff] = 0
  rows[cliff, 5] = rows[cliff, 8] = 1
  return rows


@pytest.fixture
def thumos(tmp_path):
  rng = np.random.default_rng()
  info = {"THUMOS": {"class_names": _class_names(), "num_classes": 22, "ignore_index": 21,
                     "metrics": "AP", "fps": 4, "train_session_set": list(TRAIN),
                     "test_session_set": list(TEST)}}
  (tmp_path / "data_info.json").write_text(json.dumps(info))
  arrays = {}
  for session, t in {**TRAIN, **TEST}.items():
    for subdir, dim in [("rgb_kinetics_resnet50", 2048), ("flow_kinetics_bninception", 1024)]:
      arrays[subdir, session] = rng.standard_normal((t, dim)).astype(np.float32)
    arrays["target_perframe", session] = _targets(rng, t)
  for (subdir, session), array in arrays.items():
    (tmp_path / subdir).mkdir(exist_ok=True)
    np.save(tmp_path / subdir / f"{session}.npy", array)
  return tmp_path, arrays


def _source(root, split="train", **kwargs):
  return thumos14.Thumos14Source(root, split, data_info=root / "data_info.json", **kwargs)


def test_thumos_windows_cover_every_step_with_left_padding(thumos):
  root, arrays = thumos
  window, future = 8, 3
  source = _source(root, window=window, future_steps=future)
  # Ends at T-1, T-1-8, ...: 37 steps -> 5 windows, 5 steps -> 1 (padded by 3).
  assert len(source) == 5 + 1
  seen = {session: np.zeros(t, int) for session, t in TRAIN.items()}
  for i in range(len(source)):
    example = source[i]
    session_index, end = source.index[i]
    session = source.sessions[session_index]
    t = TRAIN[session]
    pad = int((~example["mask"]).sum())
    assert pad == max(0, window - end - 1) and example["mask"][pad:].all()
    start = end + 1 - (window - pad)
    seen[session][start:end + 1] += 1
    np.testing.assert_array_equal(example["features"]["rgb"][pad:],
                                  arrays["rgb_kinetics_resnet50", session][start:end + 1])
    np.testing.assert_array_equal(example["features"]["flow"][:pad], 0)
    assert example["features"]["flow"].shape == (window, 1024)
    targets = arrays["target_perframe", session]
    np.testing.assert_array_equal(example["frame_targets"][pad:], targets[start:end + 1])
    assert example["frame_targets"].dtype == np.float32
    past = example["past_targets"]["action"]
    assert past.dtype == np.int32 and (past[:pad] == -1).all()
    np.testing.assert_array_equal(past[pad:], thumos14.single_labels(targets[start:end + 1]))
    fut = targets[end + 1:end + 1 + future]
    np.testing.assert_array_equal(example["future_frame_targets"][:len(fut)], fut)
    np.testing.assert_array_equal(example["future_targets"]["action"][:len(fut)],
                                  thumos14.single_labels(fut))
    assert (example["future_targets"]["action"][len(fut):] == -1).all()
    assert example["sample_id"] == i and example["sample_id"].dtype == np.int64
  assert all((count >= 1).all() for count in seen.values())


def test_thumos_single_labels():
  rows = np.zeros((5, 22), np.float32)
  rows[0, 3] = 1
  rows[1, [5, 8]] = 1  # CliffDiving + Diving -> CliffDiving
  rows[2, [4, 21]] = 1  # ambiguous
  rows[3, 0] = 1  # background
  np.testing.assert_array_equal(thumos14.single_labels(rows), [3, 5, -1, 0, -1])


def test_thumos_whole_videos_for_evaluation(thumos):
  root, arrays = thumos
  source = _source(root, "test", modalities=("flow",))
  assert len(source) == len(TEST)
  for i, (session, t) in enumerate(TEST.items()):
    example = source[i]
    assert list(example["features"]) == ["flow"]
    assert example["features"]["flow"].shape == (t, 1024) and example["mask"].all()
    np.testing.assert_array_equal(example["frame_targets"], arrays["target_perframe", session])
    assert (example["future_targets"]["action"] == -1).all()  # nothing after the video end


def test_thumos_bad_inputs(thumos):
  root, _ = thumos
  session = "video_validation_0000690"
  os.remove(root / "flow_kinetics_bninception" / f"{session}.npy")
  missing = f"{session}.*flow_kinetics_bninception/{session}.npy"
  with pytest.raises(FileNotFoundError, match=missing):
    _source(root, window=4)
  _source(root, window=4, modalities=("rgb",))  # flow not asked for: fine

  np.save(root / "flow_kinetics_bninception" / f"{session}.npy", np.zeros((36, 1024), np.float32))
  with pytest.raises(ValueError, match="flow features have T=36 but target_perframe has T=37"):
    _source(root, window=4)
  np.save(root / "flow_kinetics_bninception" / f"{session}.npy", np.zeros((37, 2048), np.float32))
  with pytest.raises(ValueError, match=r"expected \(T, 1024\) flow features, found shape \(37, 2"):
    _source(root, window=4)
  bad = np.ones((37, 1024), np.float32)
  bad[30, 7] = np.inf
  np.save(root / "flow_kinetics_bninception" / f"{session}.npy", bad)
  source = _source(root, window=4)
  assert source.index[0] == (0, 0) and source.index[8] == (0, 32)
  source[0]  # rows 0..0: finite
  with pytest.raises(ValueError, match=f"{session}.npy: NaN or Inf in rows 29..32"):
    source[8]
  np.save(root / "target_perframe" / f"{session}.npy", np.zeros((37, 21), np.float32))
  with pytest.raises(ValueError, match=r"expected \(T, 22\) targets, found shape \(37, 21\)"):
    _source(root, window=4)
  with pytest.raises(ValueError, match="split must be one of"):
    _source(root, "val")
  with pytest.raises(ValueError, match="modalities must be"):
    _source(root, modalities=("audio",))


@pytest.mark.skipif(not REAL_DATA_INFO.exists(), reason="real data_info.json not found")
def test_thumos_real_data_info_names_every_missing_session(tmp_path):
  info = thumos14.load_data_info(REAL_DATA_INFO)
  assert len(info["train_session_set"]) == 200 and len(info["test_session_set"]) == 213
  with pytest.raises(FileNotFoundError, match=info["test_session_set"][0]):
    thumos14.Thumos14Source(tmp_path, "test", data_info=REAL_DATA_INFO)


# --- Ego4D LTA ------------------------------------------------------------------------------

CLIP_A, CLIP_B, CLIP_C = "a1b2c3d4-0000-4000-8000-00000000000a", "b-clip", "c-short-clip"


def _actions(rng, clip_uid, n, first_frame):
  """n consecutive actions of 40-120 frames with -20..30 frame gaps, shuffled (the loader sorts).
  Action 8 (the first future one of window 0) starts 40 frames before action 7 ends."""
  entries, frame = [], first_frame
  for idx in range(n):
    length, gap = rng.integers(40, 120), (-40 if idx == 7 else rng.integers(-20, 30))
    entries.append({
        "clip_uid": clip_uid, "video_uid": "v-" + clip_uid, "clip_parent_start_sec": 10.0,
        "clip_parent_end_sec": 490.0, "clip_parent_start_frame": 300,
        "clip_parent_end_frame": 14700, "action_idx": idx, "action_clip_start_sec": frame / 30,
        "action_clip_end_sec": (frame + length) / 30,
        "action_clip_start_frame": int(frame), "action_clip_end_frame": int(frame + length),
        "verb": "take", "verb_label": int(rng.integers(0, 117)), "noun": "cup",
        "noun_label": int(rng.integers(0, 521))})
    frame += length + gap
  rng.shuffle(entries)
  return entries


@pytest.fixture
def ego(tmp_path):
  rng = np.random.default_rng()
  ann = tmp_path / "annotations"
  ann.mkdir()
  (ann / "fho_lta_taxonomy.json").write_text(json.dumps(
      {"verbs": [f"v{i}" for i in range(117)], "nouns": [f"n{i}" for i in range(521)]}))
  clips = (_actions(rng, CLIP_A, 31, 500) + _actions(rng, CLIP_B, 29, 3)
           + _actions(rng, CLIP_C, 28, 0))
  for split in ("train", "test_unannotated"):
    labels = ("verb", "verb_label", "noun", "noun_label")
    unlabelled = [{k: v for k, v in e.items() if k not in labels} for e in clips]
    entries = clips if split == "train" else unlabelled
    (ann / f"fho_lta_{split}.json").write_text(json.dumps(
        {"version": "2.0", "date": "x", "description": "fake", "split": split, "clips": entries}))
  features = {}
  for uid in (CLIP_A, CLIP_B, CLIP_C):
    t = max(round(e["action_clip_end_frame"] / 16) for e in clips if e["clip_uid"] == uid)
    for name, dim in (("verb", 24), ("noun", 8)):
      features[name, uid] = rng.standard_normal((t, dim)).astype(np.float32)
      (tmp_path / name).mkdir(exist_ok=True)
      np.save(tmp_path / name / f"{uid}.npy", features[name, uid])
  by_clip = {uid: sorted([e for e in clips if e["clip_uid"] == uid], key=lambda e: e["action_idx"])
             for uid in (CLIP_A, CLIP_B)}
  return tmp_path, features, by_clip


def _ego_source(root, split="train", window=64, **kwargs):
  return ego4d.Ego4dLtaSource(root / "annotations", split,
                              feature_dirs=[root / "verb", root / "noun"], window=window,
                              feature_dim=32, **kwargs)


def test_ego4d_windows_keys_and_targets(ego):
  root, features, by_clip = ego
  window = 64
  source = _ego_source(root, window=window)
  assert (source.num_verbs, source.num_nouns) == (117, 521)
  # 31 actions -> windows i = 0..2, 29 -> i = 0, 28 -> none (the official keys).
  assert source.keys == [f"{CLIP_A}_{i}" for i in (7, 8, 9)] + [f"{CLIP_B}_7"]
  for i, (uid, first) in enumerate([(CLIP_A, 0), (CLIP_A, 1), (CLIP_A, 2), (CLIP_B, 0)]):
    example = source[i]
    actions = by_clip[uid]
    observed = actions[first:first + 8]
    end = round(max(a["action_clip_end_frame"] for a in observed) / 16)
    start = max(0, end - window)
    pad = window - (end - start)
    expected = np.concatenate([features["verb", uid], features["noun", uid]], 1)[start:end]
    assert example["features"]["videomae"].shape == (window, 32)
    np.testing.assert_array_equal(example["features"]["videomae"][pad:], expected)
    np.testing.assert_array_equal(example["mask"], np.arange(window) >= pad)
    future = actions[first + 8:first + 28]
    for head in ("verb", "noun"):
      np.testing.assert_array_equal(example["future_targets"][head],
                                    [a[f"{head}_label"] for a in future])
      assert example["future_targets"][head].dtype == np.int32
    # Past targets: the last observed action covers its feature steps, padding is -1.
    last = observed[-1]
    lo = round(last["action_clip_start_frame"] / 16) - (end - window)
    hi = round(last["action_clip_end_frame"] / 16) - (end - window)
    assert (example["past_targets"]["verb"][lo:hi] == last["verb_label"]).all()
    assert (example["past_targets"]["noun"][:pad] == -1).all()
    seen_nouns = {-1} | {a["noun_label"] for a in actions[:first + 8]}
    assert set(example["past_targets"]["noun"][pad:].tolist()) <= seen_nouns
  assert pad > 0  # CLIP_B starts at frame 3: its window runs past the clip start


@pytest.mark.parametrize("window", [5, 16, 200])
def test_ego4d_past_targets_match_step_loop(ego, window):
  root, _, by_clip = ego
  source = _ego_source(root, window=window)
  for i, (uid, first) in enumerate([(CLIP_A, 0), (CLIP_A, 1), (CLIP_A, 2), (CLIP_B, 0)]):
    actions = by_clip[uid][:first + 8]
    end = round(max(a["action_clip_end_frame"] for a in actions[first:]) / 16)
    expected = {"verb": [], "noun": []}
    for step in range(end - window, end):
      covering = [a for a in actions if round(a["action_clip_start_frame"] / 16) <= step
                  < round(a["action_clip_end_frame"] / 16)]
      for head in expected:
        expected[head].append(covering[-1][f"{head}_label"] if covering else -1)
    example = source[i]
    for head in expected:
      np.testing.assert_array_equal(example["past_targets"][head], expected[head])


def test_ego4d_test_split_has_no_labels(ego):
  root, _, _ = ego
  source = _ego_source(root, "test_unannotated")
  assert len(source) == 4
  example = source[3]
  assert (example["future_targets"]["verb"] == -1).all()
  assert (example["past_targets"]["noun"] == -1).all()


def _rewrite(path, edit):
  data = json.loads(path.read_text())
  edit(data)
  path.write_text(json.dumps(data))


def test_ego4d_bad_inputs(ego):
  root, features, _ = ego
  ann = root / "annotations"
  original = (ann / "fho_lta_train.json").read_text()

  _rewrite(ann / "fho_lta_train.json", lambda d: d["clips"][4].pop("action_clip_end_frame"))
  with pytest.raises(KeyError, match=r"clips\[4\].*lacks field\(s\) \['action_clip_end_frame'\]"):
    _ego_source(root)
  (ann / "fho_lta_train.json").write_text(original)
  _rewrite(ann / "fho_lta_train.json", lambda d: d["clips"][0].pop("noun_label"))
  with pytest.raises(KeyError, match=r"lacks field\(s\) \['noun_label'\]"):
    _ego_source(root)
  (ann / "fho_lta_train.json").write_text(original)
  _rewrite(ann / "fho_lta_train.json", lambda d: d["clips"][0].update(verb_label=117))
  with pytest.raises(ValueError, match=r"verb_label 117 outside the taxonomy's \[0, 117\)"):
    _ego_source(root)
  (ann / "fho_lta_train.json").write_text(original)
  with pytest.raises(FileNotFoundError, match="fho_lta_val.json"):
    _ego_source(root, "val")

  os.remove(root / "noun" / f"{CLIP_B}.npy")
  with pytest.raises(FileNotFoundError, match=f"no {CLIP_B}.npy or {CLIP_B}.pt in .*noun"):
    _ego_source(root)
  (root / "noun" / f"{CLIP_B}.pt").write_bytes(b"not really torch")
  if not _has_torch():
    source = _ego_source(root)
    with pytest.raises(ImportError, match="convert the features to .npy"):
      source[3]
  os.remove(root / "noun" / f"{CLIP_B}.pt")

  np.save(root / "noun" / f"{CLIP_B}.npy", features["noun", CLIP_B][:-2])
  with pytest.raises(ValueError, match=f"clip {CLIP_B}: feature files disagree on T"):
    _ego_source(root)
  np.save(root / "noun" / f"{CLIP_B}.npy", np.zeros((len(features["noun", CLIP_B]), 9), np.float32))
  with pytest.raises(ValueError, match="concatenated feature dim 33 .* expected 32"):
    _ego_source(root)
  bad = features["noun", CLIP_B].copy()
  bad[0, 0] = np.nan  # row 0 is inside CLIP_B's first window
  np.save(root / "noun" / f"{CLIP_B}.npy", bad)
  with pytest.raises(ValueError, match=f"clip {CLIP_B}: NaN or Inf"):
    _ego_source(root)[3]
  np.save(root / "noun" / f"{CLIP_B}.npy", features["noun", CLIP_B][:5])
  np.save(root / "verb" / f"{CLIP_B}.npy", features["verb", CLIP_B][:5])
  with pytest.raises(ValueError, match="observation ends at feature step .* only 5 steps"):
    _ego_source(root)[3]


def _has_torch():
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True
