"""Grain input pipeline: EK100 (real RULSTM-layout data or the synthetic demo), THUMOS'14, Ego4D.

Data config (`config.data`, an ml_collections.ConfigDict or any object with these attributes):
    name                  one of DATASETS: "ek100" | "synthetic" | "thumos14" | "ego4d"
    modalities            {name: feature dim}, e.g. {"rgb": 1024, "obj": 352}; synthetic:
                          {"rgb": synthetic.feature_dim}; thumos14: a subset of
                          thumos14.MODALITIES with their dims; ego4d: {"videomae": concatenated dim}
    batch_size            examples per batch
    num_workers           grain worker processes (0: read in the calling process)
    seed                  shuffle seed
  ek100 and synthetic (ek100.EK100Source):
    root                  ek100: folder of the per-modality LMDBs (<root>/<modality>/data.mdb);
                          synthetic: folder the generator writes into, or reuses when it already
                          holds a dataset with the same `synthetic` params
    annotations           ek100 only: {"train", "validation": EPIC_100_*.csv or RULSTM
                          training/validation.csv, "actions": actions.csv, "verb_classes",
                          "noun_classes": EPIC_100_{verb,noun}_classes.csv} paths
    obs_seconds           observed seconds before tau_a (paper: 32)
    fps                   observed frames per second (obs_seconds * fps frames per window)
    anticipation_seconds  tau_a (EK100: 1.0)
    synthetic             synthetic only: keyword arguments of synthetic.write_synthetic_ek100
                          (num_videos, num_recipes, feature_dim, seed, ...)
  thumos14 (thumos14.Thumos14Source):
    root, data_info       the LSTR-layout feature folder and its data_info.json
    window                steps per example; training windows end every `stride` steps, the test
                          split's at every step (each frame scored as the last of its own causal
                          window, as LSTR's evaluation)
    stride                steps between training windows
    future_steps          anticipated steps after each window (= model.future_queries)
  ego4d (ego4d.Ego4dLtaSource):
    annotation_dir, feature_dirs, window, frame_stride, num_observed, num_future

Batches are the examples of the sources stacked on a leading batch axis B (numpy); all have
    features {modality: (B, T, dim) float32}, mask (B, T) bool, future_targets {head: (B, F) int32},
    past_targets {head: (B, T) int32}, sample_id (B,) int64
(thumos14 adds frame_targets (B, T, 22) and future_frame_targets (B, F, 22)).
The split "train" drops the last partial batch. Other splits keep it, padded to batch_size by
repeating its last example with sample_id = -1 and every target = -1 (losses and metrics ignore
those rows), so every batch has one shape.

An example that cannot be read (a missing file or LMDB key, a malformed or non-finite value), or
whose arrays differ in shape or dtype from the first example's, raises DataError from the iterator
(also when a worker read it), naming the dataset, split, example id and the file/key/field.

Batches are formed before the worker processes split the work (each worker builds whole batches
of the global order), so the sequence of batches does not depend on num_workers. The iterator
state is checkpointable, e.g. with Orbax next to the model:

    it = iter(make_loader(config.data, "train", shuffle=True, num_epochs=None, seed=0))
    manager.save(step, args=ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointSave(it)))
    it = iter(make_loader(...same arguments...))
    manager.restore(step, args=ocp.args.Composite(
        state=..., data=grain.checkpoint.CheckpointRestore(it)))

or by hand: `state = it.get_state()` (a JSON-serialisable dict), later `it.set_state(state)`.
The state is only valid for the same config, split, shuffle, num_epochs, seed, batch_size and
worker_count. With workers, call `it.close()` when done (grain's advice, frees shared memory).
"""

import functools

from absl import flags
import grain
import jax
import numpy as np

from clam_jax.data import ego4d
from clam_jax.data import ek100
from clam_jax.data import synthetic
from clam_jax.data import thumos14

DATASETS = ("ek100", "synthetic", "thumos14", "ego4d")
# The evaluation split is the second: EK100's validation, THUMOS's test videos, Ego4D's val.
SPLITS = {"ek100": ("train", "validation"), "synthetic": ("train", "validation"),
          "thumos14": ("train", "test"), "ego4d": ("train", "val")}
ANNOTATION_FILES = ("train", "validation", "actions", "verb_classes", "noun_classes")


class DataError(ValueError):
  """An annotation file, example or data field could not be used (module docstring); the message
  names the dataset and the file, key or field."""


# What the sources raise for a missing or malformed file, key or value.
_READ_ERRORS = (OSError, LookupError, ValueError, EOFError)


def _shapes(example):
  """{"features/rgb": "float32(36, 64)", ...}: dtype and shape of each of an example's arrays."""
  leaves = jax.tree_util.tree_flatten_with_path(example)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"):
          f"{np.asarray(x).dtype}{np.shape(x)}" for path, x in leaves}


def read_example(source, sample_id, where):
  """source[sample_id]; a missing or malformed file, key or value raises DataError
  "<where>, example <sample_id>: <the source's message>"."""
  try:
    return source[sample_id]
  except _READ_ERRORS as e:
    # str() of a KeyError is its message quoted.
    message = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    raise DataError(f"{where}, example {sample_id}: {message}") from e


class _CheckedSource:
  """source's examples, each checked: read errors and arrays unlike example 0's (which batching
  would reject without naming the example) raise DataError. Pickled to grain's workers."""

  def __init__(self, source, where):
    self.source, self.where = source, where
    self.expected = _shapes(read_example(source, 0, where))

  def __len__(self):
    return len(self.source)

  def __getitem__(self, sample_id):
    example = read_example(self.source, sample_id, self.where)
    found = _shapes(example)
    if found != self.expected:
      wrong = [f"{name} is {found.get(name, 'missing')}, expected {expected} as in example 0"
               for name, expected in self.expected.items() if found.get(name) != expected]
      wrong += [f"{name} is not in example 0" for name in found.keys() - self.expected.keys()]
      raise DataError(f"{self.where}, example {sample_id}: {'; '.join(wrong)}")
    return example


def annotation_paths(data_config):
  """{"train", "validation", "actions", "verb_classes", "noun_classes": path}; for "synthetic"
  this writes the dataset under data_config.root unless it is already there."""
  if data_config.name == "synthetic":
    info = synthetic.write_synthetic_ek100(data_config.root, **dict(data_config.synthetic))
    if dict(data_config.modalities) != info["modalities"]:
      raise ValueError(f"data.modalities {dict(data_config.modalities)} do not match the synthetic "
                       f"dataset's {info['modalities']} (data.synthetic.feature_dim)")
    return synthetic.annotation_paths(data_config.root)
  if data_config.name == "ek100":
    paths = dict(data_config.annotations)
    missing = [name for name in ANNOTATION_FILES if name not in paths]
    if missing:
      raise KeyError(f"data.annotations lacks {missing}; expected paths for {ANNOTATION_FILES}")
    return paths
  raise ValueError(f"data.name must be 'ek100' or 'synthetic' to have EPIC annotation files; got "
                   f"{data_config.name!r}")


def check_name(data_config):
  """Raises ValueError unless data_config.name is one of DATASETS."""
  if data_config.name not in DATASETS:
    raise ValueError(f"data.name must be one of {DATASETS} (the datasets clam_jax/data/ reads); "
                     f"got {data_config.name!r}")


def _check_modalities(data_config, expected):
  modalities = dict(data_config.modalities)
  wrong = {m: d for m, d in modalities.items() if expected.get(m) != d}
  if wrong or not modalities:
    raise ValueError(f"data.modalities {modalities}: {data_config.name} has {expected} "
                     f"(name: feature dim)")


def make_source(data_config, split):
  """The split's random-access source: ek100.EK100Source (ek100, synthetic; its rows,
  dropped_rows and annotations serve evaluation), thumos14.Thumos14Source or
  ego4d.Ego4dLtaSource (module docstring). A malformed annotation file or data field raises
  DataError naming the dataset and split."""
  try:
    return _make_source(data_config, split)
  except DataError:
    raise
  except ValueError as e:
    raise DataError(f"data {data_config.name!r}, split {split!r}: {e}") from e


def _make_source(data_config, split):
  check_name(data_config)
  splits = SPLITS[data_config.name]
  if split not in splits:
    raise ValueError(f"split must be one of {splits} for data.name={data_config.name!r}; got "
                     f"{split!r}")
  if data_config.name == "thumos14":
    _check_modalities(data_config, {m: dim for m, (_, dim) in thumos14.MODALITIES.items()})
    if data_config.window is None:
      raise ValueError("data.window must be a number of steps for thumos14: evaluation scores "
                       "every frame as the last of its own window")
    return thumos14.Thumos14Source(
        data_config.root, split, data_info=data_config.data_info,
        modalities=tuple(data_config.modalities), window=data_config.window,
        stride=data_config.stride if split == "train" else 1,
        future_steps=data_config.future_steps)
  if data_config.name == "ego4d":
    dim = sum(dict(data_config.modalities).values())
    _check_modalities(data_config, {ego4d.MODALITY: dim})
    return ego4d.Ego4dLtaSource(
        data_config.annotation_dir, split, feature_dirs=tuple(data_config.feature_dirs),
        window=data_config.window, feature_dim=dim, frame_stride=data_config.frame_stride,
        num_observed=data_config.num_observed, num_future=data_config.num_future)
  paths = annotation_paths(data_config)
  return ek100.EK100Source(paths[split], paths["actions"], data_config.root,
                           dict(data_config.modalities), obs_seconds=data_config.obs_seconds,
                           fps=data_config.fps,
                           anticipation_seconds=data_config.anticipation_seconds)


def head_sizes(data_config):
  """{head: number of classes} of the dataset (the model's heads): ek100, synthetic: {"verb",
  "noun", "action"} from the class lists and actions.csv; thumos14: {"action": 22}, the columns
  of data_info.json's class_names; ego4d: {"verb", "noun"} from fho_lta_taxonomy.json. A
  malformed class list raises DataError naming the dataset."""
  try:
    return _head_sizes(data_config)
  except DataError:
    raise
  except ValueError as e:
    raise DataError(f"data {data_config.name!r}: {e}") from e


def _head_sizes(data_config):
  check_name(data_config)
  if data_config.name == "thumos14":
    return {"action": len(thumos14.load_data_info(data_config.data_info)["class_names"])}
  if data_config.name == "ego4d":
    verbs, nouns = ego4d.load_taxonomy(data_config.annotation_dir)
    return {"verb": verbs, "noun": nouns}
  paths = annotation_paths(data_config)
  return {"verb": len(ek100.load_class_names(paths["verb_classes"])),
          "noun": len(ek100.load_class_names(paths["noun_classes"])),
          "action": len(ek100.load_actions(paths["actions"]))}


def _pad_batch(batch, batch_size):
  """A partial batch (n < batch_size rows) -> batch_size rows, the extra ones copies of the last
  example with sample_id and every target set to -1."""
  n = len(batch["sample_id"])
  if n == batch_size:
    return batch
  batch = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[-1:], batch_size - n, 0)]), batch)
  for group in ("future_targets", "past_targets"):
    for targets in batch[group].values():
      targets[n:] = -1
  batch["sample_id"][n:] = -1
  return batch


def make_loader(data_config, split, *, shuffle, num_epochs, seed=None, batch_size=None,
                worker_count=None, source=None):
  """A grain.IterDataset of batches (module docstring); iter() it for a checkpointable iterator.

  shuffle: reshuffle every epoch (seeded by seed, default data_config.seed); num_epochs: None
  repeats forever (training), 1 for evaluation; batch_size, worker_count default to
  data_config.batch_size, data_config.num_workers; source: the split's `make_source` when the
  caller already has it (its annotations are parsed once), else made here.
  """
  source = make_source(data_config, split) if source is None else source
  batch_size = data_config.batch_size if batch_size is None else batch_size
  worker_count = data_config.num_workers if worker_count is None else worker_count
  dataset = grain.MapDataset.source(
      _CheckedSource(source, f"data {data_config.name!r}, split {split!r}"))
  if shuffle:
    dataset = dataset.shuffle(seed=data_config.seed if seed is None else seed)
  dataset = dataset.repeat(num_epochs).batch(batch_size, drop_remainder=split == "train")
  if split != "train":
    dataset = dataset.map(functools.partial(_pad_batch, batch_size=batch_size))
  # Elements are whole batches (hundreds of MB for EK100): read ahead little, use workers.
  dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
  if worker_count > 0:
    # grain 0.2.x reads an absl flag when it starts workers and fails in programs that have not
    # parsed flags (absl.app does); google/grain#1355.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return dataset
