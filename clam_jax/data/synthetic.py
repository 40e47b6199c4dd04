"""A small synthetic EK100 in the real on-disk layout, whose next action depends on a distant cue.

Grammar. A video is a short lead-in (lead_seconds, unannotated) followed by `episodes_per_video`
episodes; each episode draws a recipe, a dish r uniformly from num_recipes and for each of its
M = steps_per_episode steps an item v_j uniformly from step_variants, and is the action sequence

    cue "read recipe"          -> step j = 0 .. M-1: verb do_j,  -> finale "serve dish_r"
    (cue_seconds long; its        noun item_j-v_j
     features show the recipe)

with step_seconds-long actions separated by unannotated gaps (gap_seconds). The verbs follow
deterministically (cue after a finale or at the video start, do_j+1 after do_j); the nouns of
the steps and of the finale are drawn per episode and shown ahead only by the cue's features (the
recipe card), never by earlier steps (the items are independent), so anticipating them
(observation ending 1 s before the action) needs the cue. For step j the cue ends at least
j * step_seconds[0] - 1 s and starts at most cue_seconds[1] + gap_seconds[1] + j * (step_seconds[1]
+ gap_seconds[1]) - 1 s before the observation end (finale: j = M): a model that keeps only the
last few seconds guesses the later steps (1 / step_variants) and the finale (1 / num_recipes), one
with a long memory gets them exactly. Choose obs_seconds above the upper bound of the last target
that depends on the cue so the card is always observed (the demo's: configs/demo.py).

Features: one modality "rgb" of feature_dim. The 30 fps frame f (time f / 30 s) holds the
embedding of the action covering that time (a fixed background embedding in gaps), plus, in cue
segments, the recipe card: the sum of the dish's embedding and of the embeddings of the episode's
M (step, item) pairs; plus N(0, noise_std^2) noise per frame. Embeddings are standard normal
vectors.

Files (root), exactly the layout ek100.EK100Source reads:
    rgb/data.mdb                           LMDB, keys f"{video}_frame_{frame:010d}.jpg", float32
    annotations/EPIC_100_train.csv         EPIC columns (timestamps at centisecond resolution;
    annotations/EPIC_100_validation.csv    start/stop_frame at a nominal 60 fps, as real ones differ
                                           from the 30 fps LMDB numbering)
    annotations/EPIC_100_{verb,noun}_classes.csv, annotations/actions.csv (pairs sorted by
                                           f"{verb}_{noun}" as RULSTM's)
    synthetic.json                         generator params and the Bayes-optimal hints

Bayes-optimal hints (synthetic.json "bayes"), action head over all validation segments with the
dropped ones (no observation) counted as misses: expected top-1/top-5 accuracy and class-mean
top-5 recall of the predictor that knows the whole past ("with_cue": every observed target
exactly) and of the one that knows everything but the recipe card ("without_cue": the items and
the dish guessed uniformly).
"""

import csv
import json
import os
import shutil

import lmdb
import numpy as np

from clam_jax.data import ek100

MODALITY = "rgb"
_CUE, _STEP, _FINALE = 0, 1, 2


def annotation_paths(root):
  """{"train", "validation", "actions", "verb_classes", "noun_classes": path} under root."""
  folder = os.path.join(root, "annotations")
  return {
      "train": os.path.join(folder, "EPIC_100_train.csv"),
      "validation": os.path.join(folder, "EPIC_100_validation.csv"),
      "actions": os.path.join(folder, "actions.csv"),
      "verb_classes": os.path.join(folder, "EPIC_100_verb_classes.csv"),
      "noun_classes": os.path.join(folder, "EPIC_100_noun_classes.csv"),
  }


def _vocabulary(steps, variants, recipes):
  """Verb and noun keys and the (kind, verb, noun) of every action of the grammar."""
  verbs = ["read"] + [f"do{j}" for j in range(steps)] + ["serve"]
  nouns = (["recipe"] + [f"item{j}-{v}" for j in range(steps) for v in range(variants)]
           + [f"dish{r}" for r in range(recipes)])
  cue = (_CUE, 0, 0)
  step = [[(_STEP, 1 + j, 1 + j * variants + v) for v in range(variants)] for j in range(steps)]
  finale = [(_FINALE, steps + 1, 1 + steps * variants + r) for r in range(recipes)]
  return verbs, nouns, cue, step, finale


def _centiseconds(rng, bounds):
  return int(round(rng.uniform(*bounds) * 100))


def _timestamp(centiseconds):
  seconds, hundredths = divmod(centiseconds, 100)
  minutes, seconds = divmod(seconds, 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours:02d}:{minutes:02d}:{seconds:02d}.{hundredths:02d}"


def _video(rng, p, cue, step, finale):
  """One video's segments [(start_cs, stop_cs, (kind, verb, noun, action), recipe)] and its end
  (cs); recipe = (dish, (M,) items) of the segment's episode."""
  segments = []
  t = _centiseconds(rng, p["lead_seconds"])
  for _ in range(p["episodes_per_video"]):
    dish = int(rng.integers(p["num_recipes"]))
    items = np.array([rng.integers(len(variants)) for variants in step])
    actions = ([(cue, p["cue_seconds"])]
               + [(variants[v], p["step_seconds"]) for variants, v in zip(step, items)]
               + [(finale[dish], p["step_seconds"])])
    for action, duration in actions:
      stop = t + _centiseconds(rng, duration)
      segments.append((t, stop, action, (dish, items)))
      t = stop + _centiseconds(rng, p["gap_seconds"])
  return segments, t + 100


def _features(rng, segments, end, embeddings, dish_embeddings, item_embeddings, background,
              noise_std):
  """(frames, dim) float32 for 30 fps frames 1..frames covering [0, end] centiseconds."""
  frames = end * ek100.LMDB_FPS // 100 + 1
  times = np.arange(1, frames + 1) * 100 / ek100.LMDB_FPS
  starts = np.array([s[0] for s in segments])
  stops = np.array([s[1] for s in segments])
  index = np.searchsorted(starts, times, side="right") - 1
  inside = (index >= 0) & (times < stops[np.maximum(index, 0)])
  action = np.array([s[2][3] for s in segments])
  card = np.stack([dish_embeddings[dish] + item_embeddings[np.arange(len(items)), items].sum(0)
                   for _, _, _, (dish, items) in segments])
  is_cue = np.array([s[2][0] == _CUE for s in segments])
  features = np.where(inside[:, None], embeddings[action[index]], background)
  cue_frames = inside & is_cue[index]
  features[cue_frames] += card[index[cue_frames]]
  features += noise_std * rng.standard_normal(features.shape)
  return features.astype(np.float32)


def _write_csv(path, header, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def _bayes(kinds, actions, observed, recipes, variants):
  """Expected action hits of the two Bayes predictors on validation (see the module docstring)."""
  hints = {}
  guess = lambda k, n: min(k, n) / n
  for name, known in (("with_cue", True), ("without_cue", False)):
    for k in (1, 5):
      hit = {_CUE: 1.0, _STEP: 1.0 if known else guess(k, variants),
             _FINALE: 1.0 if known else guess(k, recipes)}
      hits = np.array([hit[kind] for kind in kinds]) * observed
      hints[f"top{k}_{name}"] = float(hits.mean())
    hints[f"mean_top5_recall_{name}"] = float(np.mean([hits[actions == a].mean()
                                                       for a in np.unique(actions)]))
  return hints


def write_synthetic_ek100(root, *, num_videos=40, num_validation_videos=8, episodes_per_video=4,
                          num_recipes=8, steps_per_episode=6, step_variants=2, feature_dim=64,
                          noise_std=1.0, cue_seconds=(2.0, 3.0), step_seconds=(1.5, 3.0),
                          gap_seconds=(0.0, 0.5), lead_seconds=(0.0, 4.0), seed=0):
  """Writes the dataset of the module docstring under root (or finds it there); returns its info.

  num_videos includes the num_validation_videos. The same arguments always give the same files.
  If root already holds a dataset written with the same arguments it is reused; with other
  arguments, or if root is a non-empty folder without synthetic.json, this raises. The files are
  written into the sibling folder root.partial<pid>, renamed to root once complete: a run killed
  mid-generation leaves no root, and the next call deletes the folder it left.
  Returns {"params", "modalities": {"rgb": feature_dim}, "num_segments": {split: S},
  "bayes": {...}} (also stored as root/synthetic.json).
  """
  params = dict(num_videos=num_videos, num_validation_videos=num_validation_videos,
                episodes_per_video=episodes_per_video, num_recipes=num_recipes,
                steps_per_episode=steps_per_episode, step_variants=step_variants,
                feature_dim=feature_dim, noise_std=noise_std, cue_seconds=cue_seconds,
                step_seconds=step_seconds, gap_seconds=gap_seconds, lead_seconds=lead_seconds,
                seed=seed)
  params = json.loads(json.dumps(params))  # tuples -> lists, as stored
  stamp = os.path.join(root, "synthetic.json")
  if os.path.exists(stamp):
    with open(stamp) as f:
      info = json.load(f)
    if info["params"] != params:
      raise ValueError(f"{stamp}: {root} holds a synthetic dataset written with {info['params']}, "
                       f"not the requested {params}; use another root or delete it")
    return info
  if os.path.isdir(root) and os.listdir(root):
    raise FileExistsError(f"{root} is a non-empty folder without synthetic.json; refusing to write "
                          f"a synthetic dataset into it")
  if not 0 < num_validation_videos < num_videos:
    raise ValueError(f"need 0 < num_validation_videos < num_videos; got {num_validation_videos}, "
                     f"{num_videos}")

  rng = np.random.default_rng(seed)
  verbs, nouns, cue, step, finale = _vocabulary(steps_per_episode, step_variants, num_recipes)
  kinds = [cue] + [a for variants in step for a in variants] + finale
  # Action ids as RULSTM numbers EK100's: pairs sorted by the string f"{verb}_{noun}".
  pairs = sorted(((a[1], a[2]) for a in kinds), key=lambda vn: f"{vn[0]}_{vn[1]}")
  action_id = {vn: i for i, vn in enumerate(pairs)}
  with_id = lambda a: (*a, action_id[a[1], a[2]])  # (kind, verb, noun, action id)
  cue, finale = with_id(cue), [with_id(a) for a in finale]
  step = [[with_id(a) for a in variants] for variants in step]
  embeddings = rng.standard_normal((len(pairs), feature_dim))
  dish_embeddings = rng.standard_normal((num_recipes, feature_dim))
  background = rng.standard_normal(feature_dim)
  # From a stream of their own, so the labels and timings of a seed stay those of the generator
  # before the card showed the items.
  item_embeddings = np.random.default_rng([seed, 1]).standard_normal(
      (steps_per_episode, step_variants, feature_dim))

  tmp = _partial_folder(root)
  paths = annotation_paths(tmp)
  os.makedirs(os.path.join(tmp, MODALITY))
  os.makedirs(os.path.dirname(paths["train"]))
  num_train = num_videos - num_validation_videos
  rows = {"train": [], "validation": []}
  validation = []  # (kind, action id, observed) per validation segment
  # map_size is only an upper bound: the file grows as written.
  env = lmdb.open(os.path.join(tmp, MODALITY), map_size=1 << 34)
  with env.begin(write=True) as txn:
    for v in range(num_videos):
      split = "train" if v < num_train else "validation"
      video_id = f"P{v // 10 + 1:02d}_{v % 10 + 1:02d}"
      segments, end = _video(rng, params, cue, step, finale)
      features = _features(rng, segments, end, embeddings, dish_embeddings, item_embeddings,
                           background, noise_std)
      for frame, value in enumerate(features, start=1):
        txn.put(ek100.frame_key(video_id, frame).encode(), value.tobytes())
      for i, (start, stop, (kind, verb, noun, action), _) in enumerate(segments):
        rows[split].append([
            f"{video_id}_{i}", video_id[:3], video_id, _timestamp(start) + "0", _timestamp(start),
            _timestamp(stop), max(1, start * 60 // 100), stop * 60 // 100,
            f"{verbs[verb]} {nouns[noun]}", verbs[verb], verb, nouns[noun], noun,
            str([nouns[noun]]), str([noun])])
        if split == "validation":
          validation.append((kind, action, ek100.frame_index(start / 100 - 1.0) >= 1))
  env.close()

  header = ["narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
            "stop_timestamp", "start_frame", "stop_frame", "narration", "verb", "verb_class",
            "noun", "noun_class", "all_nouns", "all_noun_classes"]
  for split, split_rows in rows.items():
    _write_csv(paths[split], header, split_rows)
  _write_csv(paths["actions"], ["id", "verb", "noun", "action"],
             [[i, vb, n, f"{verbs[vb]} {nouns[n]}"] for i, (vb, n) in enumerate(pairs)])
  for name, keys in (("verb_classes", verbs), ("noun_classes", nouns)):
    _write_csv(paths[name], ["id", "key", "instances", "category"],
               [[i, key, str([key]), "synthetic"] for i, key in enumerate(keys)])

  bayes = _bayes(*map(np.array, zip(*validation)), num_recipes, step_variants)
  info = {"params": params, "modalities": {MODALITY: feature_dim},
          "num_segments": {split: len(r) for split, r in rows.items()}, "bayes": bayes}
  with open(os.path.join(tmp, "synthetic.json"), "w") as f:
    json.dump(info, f, indent=2)
  os.replace(tmp, root)  # also over an empty root; a reader never sees a half-written dataset
  return info


def _partial_folder(root):
  """A fresh sibling folder root.partial<pid> to write into, after deleting those that runs killed
  mid-generation left (their process is gone); a live process's folder is left alone."""
  root = os.path.normpath(root)
  prefix = f"{os.path.basename(root)}.partial"
  parent = os.path.dirname(root) or "."
  for name in os.listdir(parent) if os.path.isdir(parent) else ():
    pid = name.removeprefix(prefix)
    if name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
      shutil.rmtree(os.path.join(parent, name))
  tmp = f"{root}.partial{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)  # this process's own, from an earlier failed call
  return tmp


def _alive(pid):
  try:
    os.kill(pid, 0)  # signal 0: only asks whether the process exists
  except ProcessLookupError:
    return False
  except PermissionError:  # it exists, as another user's
    pass
  return True
