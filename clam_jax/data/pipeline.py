"""Grain input pipeline for EK100 anticipation (real RULSTM-layout data or the synthetic demo).

Data config (`config.data`, an ml_collections.ConfigDict or any object with these attributes):
    name                  "ek100" | "synthetic"
    root                  ek100: folder of the per-modality LMDBs (<root>/<modality>/data.mdb);
                          synthetic: folder the generator writes into, or reuses when it already
                          holds a dataset with the same `synthetic` params
    annotations           ek100 only: {"train", "validation": EPIC_100_*.csv or RULSTM
                          training/validation.csv, "actions": actions.csv, "verb_classes",
                          "noun_classes": EPIC_100_{verb,noun}_classes.csv} paths
    modalities            {name: feature dim}, e.g. {"rgb": 1024, "obj": 352}; synthetic:
                          {"rgb": synthetic.feature_dim}
    obs_seconds           observed seconds before tau_a (paper: 32)
    fps                   observed frames per second (obs_seconds * fps frames per window)
    anticipation_seconds  tau_a (EK100: 1.0)
    batch_size            examples per batch
    num_workers           grain worker processes (0: read in the calling process)
    seed                  shuffle seed
    synthetic             synthetic only: keyword arguments of synthetic.write_synthetic_ek100
                          (num_videos, num_recipes, feature_dim, seed, ...)

Batches are the examples of ek100.py stacked on a leading batch axis B (numpy):
    features {modality: (B, T, dim) float32}, mask (B, T) bool, future_targets {head: (B, 1) int32},
    past_targets {head: (B, T) int32}, sample_id (B,) int64.
The split "train" drops the last partial batch. Other splits keep it, padded to batch_size by
repeating its last example with sample_id = -1 and every target = -1 (losses and metrics ignore
those rows), so every batch has one shape.

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

from clam_jax.data import ek100
from clam_jax.data import synthetic

SPLITS = ("train", "validation")
ANNOTATION_FILES = ("train", "validation", "actions", "verb_classes", "noun_classes")


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
  raise ValueError(f"data.name must be 'ek100' or 'synthetic'; got {data_config.name!r}")


def make_source(data_config, split):
  """The split's ek100.EK100Source (its rows, dropped_rows and annotations serve evaluation)."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
  paths = annotation_paths(data_config)
  return ek100.EK100Source(paths[split], paths["actions"], data_config.root,
                           dict(data_config.modalities), obs_seconds=data_config.obs_seconds,
                           fps=data_config.fps,
                           anticipation_seconds=data_config.anticipation_seconds)


def head_sizes(data_config):
  """{"verb": V, "noun": N, "action": A} from the class lists and actions.csv (model heads)."""
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
                worker_count=None):
  """A grain.IterDataset of batches (module docstring); iter() it for a checkpointable iterator.

  shuffle: reshuffle every epoch (seeded by seed, default data_config.seed); num_epochs: None
  repeats forever (training), 1 for evaluation; batch_size, worker_count default to
  data_config.batch_size, data_config.num_workers.
  """
  source = make_source(data_config, split)
  batch_size = data_config.batch_size if batch_size is None else batch_size
  worker_count = data_config.num_workers if worker_count is None else worker_count
  dataset = grain.MapDataset.source(source)
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
