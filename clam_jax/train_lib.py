"""Training and evaluation of CLAM: optimizer, losses, the data-parallel step and the loop.

`train_and_evaluate(config, workdir)` trains (resuming from the latest checkpoint if there is one),
evaluates periodically and writes, under workdir (the flax-examples convention):

    config.json              the run's config (its model fields name what differs on a mismatch)
    checkpoints/<step>/      Orbax: params, opt_state, grain iterator state (see checkpointing.py);
                             the latest step and the best by config.eval.best_metric are kept
    metrics.jsonl            one JSON object per logged step: {"step", "train/loss", ...} or
                             {"step", "eval/overall/action", ...}
    events.out.tfevents.*    the same scalars for TensorBoard
    training_curves.png      losses and evaluation metrics against the step

`evaluate(config, workdir, checkpoint="best")` restores a checkpoint, runs the evaluation split and
writes workdir/eval/{metrics.json, metrics.md, predictions.npz, per_class_recall.png}.

Data parallelism: a 1-D Mesh over jax.devices(); each batch is sharded on its leading axis, params
and optimizer state are replicated, and jit inserts the gradient all-reduce. The step never syncs
with the host: metrics stay on device until a logging step fetches them.
"""

import functools
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import tqdm
from ml_collections import config_flags
from absl import app
from absl import flags
from absl import logging
from flax.training import train_state

from clam_jax import checkpointing
from clam_jax import metrics as metrics_lib
from clam_jax import model as model_lib
from clam_jax.data import pipeline
from clam_jax.data import thumos14

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


class ConfigError(ValueError):
  """A config field has a value this code cannot run with."""


class NonFiniteError(FloatingPointError):
  """A training step had a NaN or Inf loss or gradient (config.train.on_nonfinite="stop")."""


# ---------------------------------------------------------------------------------------------
# Optimizer and loss


def make_optimizer(optimizer_config, steps_per_epoch, total_steps):
  """AdamW with linear warm-up from 0 and cosine decay to 0, after global-norm gradient clipping.

  optimizer_config: lr, weight_decay, warmup_epochs, clip_norm, b1, b2. Weight decay applies to
  matrices only (ndim >= 2), except Mamba's A_log, which mamba_ssm exempts as it does D: biases,
  norm scales and the SSM's state parameters are not shrunk.
  Returns (tx, schedule) with schedule(step) -> learning rate.
  """
  warmup = int(round(optimizer_config.warmup_epochs * steps_per_epoch))
  # optax needs a cosine part of at least one step.
  warmup = max(0, min(warmup, total_steps - 1))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, optimizer_config.lr, warmup_steps=warmup, decay_steps=total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(optimizer_config.clip_norm),
      optax.adamw(schedule, b1=optimizer_config.b1, b2=optimizer_config.b2,
                  weight_decay=optimizer_config.weight_decay,
                  mask=_decayed))
  return tx, schedule


def _decayed(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim >= 2 and getattr(path[-1], "key", None) != "A_log", params)


def cross_entropy(logits, labels, label_smoothing=0.0, axis_name=None):
  """Mean softmax cross-entropy over the entries whose label is >= 0 (0 if there are none).

  logits: (..., C) float; labels: (...) int, -1 = ignore. With label smoothing eps the target is
  (1 - eps) one-hot + eps uniform; the uniform part is computed as logsumexp - mean(logits), so no
  (..., C) one-hot is built (C is 3806 for EK100 actions). axis_name: inside jax.shard_map, the
  mesh axis the batch is split over: the mean divides by the count over all devices, so the
  psum of the devices' values is the global batch's mean.
  """
  logits = logits.astype(jnp.float32)
  valid = labels >= 0
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
  if label_smoothing:
    uniform = jax.nn.logsumexp(logits, axis=-1) - logits.mean(axis=-1)
    loss = (1.0 - label_smoothing) * loss + label_smoothing * uniform
  count = valid.sum() if axis_name is None else jax.lax.psum(valid.sum(), axis_name)
  return jnp.sum(jnp.where(valid, loss, 0.0)) / jnp.maximum(count, 1)


def compute_loss(outputs, batch, loss_config, axis_name=None):
  """The training objective and its parts.

  outputs: the model's {"future": {head: (B, F, C)}, "past": {head: (B, T, C)}};
  batch: {"future_targets": {head: (B, F)}, "past_targets": {head: (B, T)}} int, -1 = ignore;
  loss_config: weights {head: float}, past_loss_weight, label_smoothing.
  loss = sum_h w_h CE(future_h) + past_loss_weight * sum_h w_h CE(past_h).
  axis_name: as cross_entropy's (each device's share of the global batch's loss).
  Returns (loss, {"loss", "future/<head>", "past/<head>"}) of scalars.
  """
  smoothing = loss_config.label_smoothing
  parts = {}
  total = 0.0
  for head, weight in loss_config.weights.items():
    parts[f"future/{head}"] = cross_entropy(
        outputs["future"][head], batch["future_targets"][head], smoothing, axis_name)
    parts[f"past/{head}"] = cross_entropy(
        outputs["past"][head], batch["past_targets"][head], smoothing, axis_name)
    past = loss_config.past_loss_weight * parts[f"past/{head}"]
    total += weight * (parts[f"future/{head}"] + past)
  parts["loss"] = total
  return total, parts


# ---------------------------------------------------------------------------------------------
# Model state and steps


def model_inputs(batch):
  """The device part of a batch: features, mask and targets (sample_id stays on the host)."""
  return {key: batch[key] for key in ("features", "mask", "future_targets", "past_targets")}


def create_train_state(model, tx, example, rng):
  """Initialises params from an example batch and wraps them with the optimizer.

  example: a batch (or its jax.ShapeDtypeStruct pytree) with "features" {m: (B, T, F_m)} and
  "mask" (B, T). Returns a flax TrainState (step 0).
  """
  params_rng, dropout_rng = jax.random.split(rng)
  variables = model.init({"params": params_rng, "dropout": dropout_rng}, example["features"],
                         example["mask"], train=False)
  return train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)


def param_shapes(model, example):
  """model's params as jax.ShapeDtypeStruct (traced, nothing computed); example as in
  create_train_state."""
  return jax.eval_shape(
      lambda features, mask: model.init(jax.random.key(0), features, mask, train=False),
      example["features"], example["mask"])["params"]


def loss_and_grads(params, batch, dropout_key, *, apply_fn, loss_config, axis_name=None):
  """compute_loss's parts {"loss", "future/*", "past/*"} (scalars) and d loss / d params.

  batch: model_inputs(...) with leading axis B. axis_name: inside jax.shard_map over a mesh axis
  that splits the batch: batch holds this device's rows, its dropout masks are drawn from
  dropout_key folded with the device's index, and the parts and gradients returned are the
  global batch's (summed over the axis), the same on every device.
  """
  if axis_name is not None:
    dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))

  def loss_fn(params):
    outputs = apply_fn({"params": params}, batch["features"], batch["mask"], train=True,
                       rngs={"dropout": dropout_key})
    return compute_loss(outputs, batch, loss_config, axis_name)

  (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  if axis_name is not None:
    parts, grads = jax.lax.psum((parts, grads), axis_name)
  return parts, grads


def train_step(state, batch, dropout_key, *, loss_config, mesh=None):
  """One optimizer step on a (global, possibly sharded) batch.

  batch: model_inputs(...) with leading axis B; dropout_key: a base PRNG key, folded with the step
  so a resumed run draws the same masks. mesh: a device mesh whose "data" axis splits the batch:
  each device runs the model on its rows (jax.shard_map; XLA does not partition the Pallas
  kernels, it would gather the whole batch onto every device) and the gradients are summed; None:
  the model sees the whole batch. Returns (new state, {"loss", "future/*", "past/*",
  "grad_norm", "finite"} device scalars). When the loss or a gradient is NaN or Inf ("finite" is
  False) the new state keeps the old params and optimizer state, only its step advances: the bad
  batch changes nothing, and the loop decides whether to stop or go on (config.train.on_nonfinite).
  """
  key = jax.random.fold_in(dropout_key, state.step)
  grads_fn = functools.partial(loss_and_grads, apply_fn=state.apply_fn, loss_config=loss_config)
  if mesh is not None:
    split, whole = jax.sharding.PartitionSpec("data"), jax.sharding.PartitionSpec()
    # check_vma off: pallas_call has no rule for it; the psums make the outputs replicated.
    grads_fn = jax.shard_map(functools.partial(grads_fn, axis_name="data"), mesh=mesh,
                             in_specs=(whole, split, whole), out_specs=whole, check_vma=False)
  parts, grads = grads_fn(state.params, batch, key)
  parts["grad_norm"] = optax.tree.norm(grads)
  # The global norm is NaN or Inf if any gradient is. (optax.apply_if_finite would change the
  # optimizer state's structure, and lets updates through after max_consecutive_errors.)
  parts["finite"] = jnp.isfinite(parts["loss"]) & jnp.isfinite(parts["grad_norm"])
  new_state = state.apply_gradients(grads=grads)
  keep = lambda new, old: jax.tree.map(functools.partial(jnp.where, parts["finite"]), new, old)
  return new_state.replace(params=keep(new_state.params, state.params),
                           opt_state=keep(new_state.opt_state, state.opt_state)), parts


def predict_step(params, batch, *, apply_fn):
  """Class probabilities at each window's last step, float32: {"future": {head: (B, F, C)} of the
  future queries, "present": {head: (B, C)} of the last act-token (online detection)}.
  batch: {"features": {modality: (B, T, F_m)}, "mask": (B, T) bool, ...}."""
  outputs = apply_fn({"params": params}, batch["features"], batch["mask"], train=False)
  softmax = lambda logits: jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return {"future": {head: softmax(logits) for head, logits in outputs["future"].items()},
          "present": {head: softmax(logits[:, -1]) for head, logits in outputs["past"].items()}}


class Parallel:
  """The device mesh and how arrays are placed on it (batch axis sharded, the rest replicated)."""

  def __init__(self, devices=None):
    devices = jax.devices() if devices is None else devices
    self.mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    self.data = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
    self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  def shard_batch(self, batch):
    """Host numpy batch (leading axis B, B % devices == 0) -> global arrays split over devices."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.data, np.asarray(x)), batch)

  def train_step(self, loss_config):
    """jit(train_step): state and key replicated, batch split over the devices (each runs the
    model on its rows), the old state's buffers donated."""
    return jax.jit(functools.partial(train_step, loss_config=loss_config, mesh=self.mesh),
                   in_shardings=(self.replicated, self.data, self.replicated),
                   out_shardings=(self.replicated, self.replicated), donate_argnums=0)

  def predict_step(self, model):
    """jit(predict_step) of model: params replicated, each device predicting its rows of the
    batch, probabilities gathered (replicated)."""
    per_device = jax.shard_map(functools.partial(predict_step, apply_fn=model.apply),
                               mesh=self.mesh, in_specs=(self.replicated.spec, self.data.spec),
                               out_specs=self.data.spec, check_vma=False)
    return jax.jit(per_device, in_shardings=(self.replicated, self.data),
                   out_shardings=self.replicated)

  def abstract(self, tree):
    """tree's shapes and dtypes as jax.ShapeDtypeStruct, replicated on the mesh."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated), tree)


# ---------------------------------------------------------------------------------------------
# Evaluation


def predict(config, params, parallel, predict_fn, split):
  """The model's probabilities on every evaluation item of a split (numpy), for compute_metrics.

  ek100, synthetic: one item per annotated segment, in annotation-row order: {"row": (R,) int64
  annotation rows 0..R-1, "observed": (R,) bool, "participant": (R,) str, "scores": {head: (R, C)
  float32}, "labels": {head: (R,) int32}}, the scores of the first future query (the anticipated
  action). Segments the source dropped (no observed frame before tau_a) get no prediction: their
  row scores 0 everywhere and -1 on the label, a miss whatever the tie rule, as the official
  evaluator counts them.
  thumos14: one item per frame of every video (the split's sessions in order, frames in order),
  scored as the last frame of its own window: {"video": (N,) int32 session index, "step": (N,)
  int32, "scores": {"detection": (N, C) of the last act-token, "anticipation": (N, F, C) of the
  future queries, steps t+1..t+F}, "targets": (N, C) float32 rows of target_perframe}.
  ego4d: one item per window (the official evaluation keys): {"key": (N,) str, "sequences":
  {"verb", "noun": (N, 1, Z) int32}, "labels": {"verb", "noun": (N, Z) int32}}; (choice) one
  sequence per window, each future query's most probable class, as QueryMamba validates (the
  challenge takes the best of K = 5).
  predict_fn: parallel.predict_step(model), made once so repeated evaluations reuse its compilation.
  """
  source = pipeline.make_source(config.data, split)
  loader = pipeline.make_loader(config.data, split, shuffle=False, num_epochs=1,
                                batch_size=config.eval.batch_size, source=source)

  def batches():
    """(sample ids (n,), the batch's n real rows, their probabilities) for every batch."""
    for batch in loader:
      real = batch["sample_id"] >= 0  # the pipeline pads the last batch with sample_id -1
      probabilities = jax.device_get(predict_fn(params, parallel.shard_batch(model_inputs(batch))))
      yield batch["sample_id"][real], *jax.tree.map(lambda x: x[real], (batch, probabilities))

  if config.data.name == "thumos14":
    return _predict_thumos14(source, batches())
  if config.data.name == "ego4d":
    return _predict_ego4d(source, batches())
  return _predict_ek100(config, source, batches())


def _predict_ek100(config, source, batches):
  ann = source.annotations
  num_rows = len(ann)
  scores = {head: np.zeros((num_rows, size), np.float32)
            for head, size in config.model.heads.items()}
  observed = np.zeros(num_rows, bool)
  for sample_ids, _, probabilities in batches:
    rows = source.rows[sample_ids]
    for head in scores:
      scores[head][rows] = probabilities["future"][head][:, 0]
    observed[rows] = True
  labels = {head: np.asarray(getattr(ann, head), np.int32) for head in scores}
  dropped = np.flatnonzero(~observed)
  for head in scores:
    scores[head][dropped, labels[head][dropped]] = -1.0
  return {"row": np.arange(num_rows), "observed": observed,
          "participant": np.array([video.split("_")[0] for video in ann.video_id]),
          "scores": scores, "labels": labels}


def _predict_thumos14(source, batches):
  index = np.asarray(source.index, np.int32)  # (session, last step) of every window
  n, c = len(index), source.num_classes
  scores = {"detection": np.zeros((n, c), np.float32),
            "anticipation": np.zeros((n, source.future_steps, c), np.float32)}
  targets = np.zeros((n, c), np.float32)
  for sample_ids, batch, probabilities in batches:
    scores["detection"][sample_ids] = probabilities["present"]["action"]
    scores["anticipation"][sample_ids] = probabilities["future"]["action"]
    targets[sample_ids] = batch["frame_targets"][:, -1]
  return {"video": index[:, 0], "step": index[:, 1], "scores": scores, "targets": targets}


def _predict_ego4d(source, batches):
  n, z = len(source), source.num_future
  sequences = {head: np.zeros((n, 1, z), np.int32) for head in ("verb", "noun")}
  labels = {head: np.zeros((n, z), np.int32) for head in ("verb", "noun")}
  for sample_ids, batch, probabilities in batches:
    for head in sequences:
      sequences[head][sample_ids, 0] = probabilities["future"][head].argmax(-1)
      labels[head][sample_ids] = batch["future_targets"][head]
  return {"key": np.array(source.keys), "sequences": sequences, "labels": labels}


def compute_metrics(config, predictions):
  """The benchmark's metrics of `predict`'s output, {"<group>/<name>": float}.

  ek100, synthetic: class-mean top-5 recall x 100, {"overall/<head>"} and, when
  config.eval.subsets_dir names the folder of the official EPIC_100_unseen_participant_ids_*/tail_*
  files, {"unseen/<head>", "tail/<head>"} too.
  thumos14 (fractions): per-frame mAP and mcAP of online detection, {"map/detection",
  "mcap/detection"}, and of anticipation at each horizon, {"map/<seconds>s", "mcap/<seconds>s"}
  (0.25s .. 2.00s at 4 fps and 8 future queries) with their means {"map/anticipation",
  "mcap/anticipation"}; ambiguous frames dropped, background and ambiguous columns skipped.
  ego4d: edit distance @ Z (a fraction, lower is better), {"edit_distance/verb", "/noun",
  "/action"}.
  """
  pipeline.check_name(config.data)
  if config.data.name == "thumos14":
    return _thumos14_metrics(config, predictions)
  if config.data.name == "ego4d":
    return {f"edit_distance/{head}": value for head, value in metrics_lib.ego4d_lta_metrics(
        predictions["sequences"]["verb"], predictions["sequences"]["noun"],
        predictions["labels"]["verb"], predictions["labels"]["noun"]).items()}
  masks = {}
  if config.eval.subsets_dir:
    masks = metrics_lib.load_ek100_subset_masks(
        config.eval.subsets_dir, predictions["participant"], predictions["labels"]["verb"],
        predictions["labels"]["noun"], split=config.eval.split)
  return metrics_lib.ek100_anticipation_metrics(
      *(predictions["scores"][h] for h in ("verb", "noun", "action")),
      *(predictions["labels"][h] for h in ("verb", "noun", "action")), **masks)


def _thumos14_metrics(config, predictions):
  info = thumos14.load_data_info(config.data.data_info)
  scores, targets = predictions["scores"], predictions["targets"]
  videos = np.split(np.arange(len(targets)), np.flatnonzero(np.diff(predictions["video"])) + 1)
  # (H, N, C): each frame's scores as predicted 1..H steps before it, video by video.
  anticipated = np.concatenate([metrics_lib.align_anticipation_scores(
      scores["anticipation"][rows], scores["detection"][rows]) for rows in videos], axis=1)
  ignore = {"ignore_index": info["ignore_index"]}
  results = {}
  for name, metric, per_frame in (("map", "AP", metrics_lib.per_frame_map),
                                  ("mcap", "cAP", metrics_lib.per_frame_mcap)):
    results[f"{name}/detection"] = per_frame(scores["detection"], targets, **ignore)
    anticipation = metrics_lib.anticipation_map(anticipated, targets, metric=metric, **ignore)
    results[f"{name}/anticipation"] = anticipation["mean"]
    for h, value in enumerate(anticipation["per_horizon"]):
      results[f"{name}/{(h + 1) / info['fps']:.2f}s"] = float(value)
  return results


# ---------------------------------------------------------------------------------------------
# Logging


class MetricWriter:
  """Scalars to workdir/metrics.jsonl (one object per call) and to TensorBoard event files."""

  def __init__(self, workdir, resume_step):
    self.path = os.path.join(workdir, "metrics.jsonl")
    # Lines an interrupted run wrote after its last checkpoint would repeat after resuming; a run
    # killed while writing a line leaves it without its newline.
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f
                if line.endswith("\n") and json.loads(line)["step"] <= resume_step]
      checkpointing.write_atomically(self.path, "".join(kept))
    import tensorboardX  # here, not at the top: benchmarks import this module without it
    self.tensorboard = tensorboardX.SummaryWriter(logdir=workdir)

  def write(self, step, scalars):
    scalars = {name: float(value) for name, value in scalars.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")
    for name, value in scalars.items():
      self.tensorboard.add_scalar(name, value, step)
    self.tensorboard.flush()

  def close(self):
    self.tensorboard.close()


def read_metrics(workdir):
  """The rows of workdir/metrics.jsonl as a list of dicts."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def last_eval_metrics(workdir):
  """The latest evaluation in workdir/metrics.jsonl as {"overall/<head>": value}, {} if none."""
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return {}
  rows = [row for row in read_metrics(workdir) if any(k.startswith("eval/") for k in row)]
  return {k.removeprefix("eval/"): v for k, v in rows[-1].items() if k != "step"} if rows else {}


# data.name -> the y label of compute_metrics' numbers in training_curves.png
METRIC_AXIS_LABELS = {
    "ek100": "class-mean top-5 recall (%)",
    "synthetic": "class-mean top-5 recall (%)",
    "thumos14": "per-frame mAP / mcAP",
    "ego4d": "edit distance @ Z = 20 (lower is better)",
}


def plot_training_curves(workdir, data_name):
  """Writes workdir/training_curves.png: training losses (left) and evaluation metrics (right,
  labelled with data_name's metric, one of METRIC_AXIS_LABELS); returns its path."""
  rows = read_metrics(workdir)
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for ax, prefix, title in ((left, "train/", "training loss"), (right, "eval/", "evaluation")):
    names = sorted({k for row in rows for k in row if k.startswith(prefix)})
    if prefix == "train/":
      names = [n for n in names if n.startswith(("train/loss", "train/future/", "train/past/"))]
    for name in names:
      points = [(row["step"], row[name]) for row in rows if name in row]
      ax.plot(*zip(*points), marker="." if len(points) < 30 else None,
              label=name.removeprefix(prefix))
    ax.set(title=title, xlabel="step")
    if names:
      ax.legend(fontsize="small")
  right.set_ylabel(METRIC_AXIS_LABELS[data_name])
  fig.tight_layout()
  path = os.path.join(workdir, "training_curves.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


# ---------------------------------------------------------------------------------------------
# Training loop


ON_NONFINITE = ("stop", "skip")


def check_config(config):
  """Raises ConfigError naming the field when config fields disagree with each other."""
  try:
    model_lib.check_config(config.model)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.data.name not in pipeline.DATASETS:
    raise ConfigError(f"data.name={config.data.name!r}: the training pipeline "
                      f"(clam_jax/data/pipeline.py) reads {pipeline.DATASETS}")
  if dict(config.data.modalities) != dict(config.model.modalities):
    raise ConfigError(f"data.modalities {dict(config.data.modalities)} and model.modalities "
                      f"{dict(config.model.modalities)} must be the same {{name: feature dim}}")
  heads = set(config.model.heads)  # the classes per head are checked against the data later
  future = {"thumos14": "future_steps", "ego4d": "num_future"}.get(config.data.name)
  if future and config.model.future_queries != config.data[future]:
    raise ConfigError(f"model.future_queries={config.model.future_queries} must equal "
                      f"data.{future}={config.data[future]} (one query per predicted step)")
  if set(config.loss.weights) != heads:
    raise ConfigError(f"loss.weights has heads {sorted(config.loss.weights)} but model.heads has "
                      f"{sorted(heads)}")
  devices = jax.device_count()
  for field, size in (("data.batch_size", config.data.batch_size),
                      ("eval.batch_size", config.eval.batch_size)):
    if size < 1 or size % devices:
      raise ConfigError(f"{field}={size} must be a positive multiple of the {devices} devices")
  if config.train.on_nonfinite not in ON_NONFINITE:
    raise ConfigError(f"train.on_nonfinite: expected one of {ON_NONFINITE}, found "
                      f"{config.train.on_nonfinite!r}")


def prepare_data_config(config, workdir):
  """Points a synthetic dataset without data.root at workdir/data (generated there if absent)."""
  if config.data.name == "synthetic" and not config.data.root:
    config.data.root = os.path.join(workdir, "data")
  sizes = pipeline.head_sizes(config.data)
  if dict(config.model.heads) != sizes:
    raise ConfigError(f"model.heads {dict(config.model.heads)} do not match the class counts of "
                      f"data {config.data.name!r}: {sizes}")


def example_inputs(source):
  """Inputs of batch size 1 shaped like source's examples, to initialise the model (its example 0;
  pipeline.DataError if that cannot be read)."""
  example = pipeline.read_example(source, 0, type(source).__name__)
  return jax.tree.map(lambda x: np.asarray(x)[None],
                      {"features": example["features"], "mask": example["mask"]})


def _every(epochs, steps_per_epoch):
  return max(1, int(round(epochs * steps_per_epoch)))


def train_and_evaluate(config, workdir):
  """Trains config's model on its data, evaluating and checkpointing under workdir.

  Resumes from the latest checkpoint in workdir/checkpoints (same step, same next batch). Returns
  the evaluation metrics of the final step ({"overall/<head>": top-5 recall %}), also when the
  run had already finished. Raises checkpointing.WorkdirBusyError if another process trains in
  workdir. A step with a NaN or Inf loss or gradient raises NonFiniteError naming it and its
  batch before anything after it is evaluated or checkpointed, or, with
  config.train.on_nonfinite="skip", changes nothing and is logged (train_step, _train_scalars).
  An example that cannot be read raises pipeline.DataError naming it, the step and the latest
  checkpoint (complete: later steps are not saved).
  """
  check_config(config)
  with checkpointing.workdir_lock(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config, workdir):
  parallel = Parallel()
  model = model_lib.CLAM(config.model)
  prepare_data_config(config, workdir)
  source = pipeline.make_source(config.data, "train")
  # Batches run across epoch boundaries (the pipeline repeats, then batches).
  steps_per_epoch = len(source) / config.data.batch_size
  total_steps = int(len(source) * config.train.num_epochs // config.data.batch_size)
  if total_steps < 1:
    raise ConfigError(f"data.batch_size={config.data.batch_size} exceeds the "
                      f"{len(source) * config.train.num_epochs} training examples of "
                      f"{config.train.num_epochs} epochs of data {config.data.name!r}")
  train_loader = pipeline.make_loader(config.data, "train", shuffle=True,
                                      num_epochs=config.train.num_epochs)
  tx, schedule = make_optimizer(config.optimizer, steps_per_epoch, total_steps)
  init_rng, dropout_key = jax.random.split(jax.random.key(config.seed))
  init = functools.partial(create_train_state, model, tx, example_inputs(source))
  abstract_state = parallel.abstract(jax.eval_shape(init, init_rng))

  manager = checkpointing.checkpoint_manager(
      workdir, best_metric=config.eval.best_metric, best_mode=config.eval.best_mode,
      keep=config.train.keep)
  train_iter = iter(train_loader)
  start = manager.latest_step() or 0
  if start:
    checkpointing.check_params(manager, start, abstract_state.params, config)
    state = checkpointing.restore(manager, start, abstract_state, train_iter)
    tqdm.tqdm.write(f"resuming from step {start} ({manager.directory})")
  else:
    state = jax.jit(init, out_shardings=parallel.replicated)(init_rng)
  state = state.replace(step=jax.device_put(jnp.asarray(start, jnp.int32), parallel.replicated))
  checkpointing.write_config(workdir, config)

  step_fn = parallel.train_step(config.loss)
  predict_fn = parallel.predict_step(model)
  writer = MetricWriter(workdir, resume_step=start)
  log_every = config.train.log_every_steps
  eval_every = _every(config.train.eval_every_epochs, steps_per_epoch)
  checkpoint_every = _every(config.train.checkpoint_every_epochs, steps_per_epoch)
  eval_metrics = last_eval_metrics(workdir)
  pending, last_log, last_saved = [], (start, time.perf_counter()), start
  try:
    with tqdm.tqdm(total=total_steps, initial=start, desc="train", unit="step") as bar:
      for step in range(start + 1, total_steps + 1):
        batch = next(train_iter)
        state, step_metrics = step_fn(state, parallel.shard_batch(model_inputs(batch)),
                                      dropout_key)
        pending.append((step, batch["sample_id"], step_metrics))
        bar.update()
        evaluate_now = step % eval_every == 0 or step == total_steps
        save_now = evaluate_now or step % checkpoint_every == 0
        # Checkpoints close a logging window: every step is checked before anything after it is
        # saved, and a resumed run averages over the same windows as an uninterrupted one.
        if save_now or step % log_every == 0:
          scalars = _train_scalars(pending, config.train.on_nonfinite, last_saved)
          now = time.perf_counter()
          scalars["train/lr"] = float(schedule(step - 1))
          scalars["train/examples_per_sec"] = (
              (step - last_log[0]) * config.data.batch_size / (now - last_log[1]))
          writer.write(step, scalars)
          bar.set_postfix(loss=f"{scalars.get('train/loss', np.nan):.4f}",
                          ex_s=f"{scalars['train/examples_per_sec']:.0f}")
          pending, last_log = [], (step, now)
        paused = time.perf_counter()
        if evaluate_now:
          eval_metrics = compute_metrics(
              config, predict(config, state.params, parallel, predict_fn, config.eval.split))
          writer.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
          plot_training_curves(workdir, config.data.name)
          bar.write(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in eval_metrics.items()))
        if save_now:
          checkpointing.save(manager, step, state, train_iter,
                             eval_metrics if evaluate_now else None)
          last_saved = step
        # Throughput counts training only.
        last_log = (last_log[0], last_log[1] + time.perf_counter() - paused)
  except pipeline.DataError as e:
    kept = f"its latest checkpoint is step {last_saved}" if last_saved else "no checkpoint"
    raise pipeline.DataError(f"{e}; training stopped at step {step}, {kept}") from e
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
    train_iter.close()  # stops grain's workers
  return eval_metrics


def _train_scalars(pending, on_nonfinite, last_saved):
  """Mean training scalars {"train/<name>": float} of the steps since the last log, each checked.

  pending: [(step, sample ids (B,), train_step's device metrics)]. A step whose loss or gradient
  is NaN or Inf raises NonFiniteError naming it and its batch if on_nonfinite is "stop"
  (last_saved: the step of the latest checkpoint, 0 for none); with "skip" it is logged, left out
  of the means and counted in "train/skipped_steps" (the only scalar if every step was skipped).
  """
  fetched = jax.device_get([metrics for _, _, metrics in pending])
  skipped = 0
  for (step, sample_ids, _), metrics in zip(pending, fetched):
    if metrics["finite"]:
      continue
    message = (f"step {step}: loss {metrics['loss']}, gradient norm {metrics['grad_norm']} on the "
               f"batch of sample ids {sample_ids.tolist()}")
    if on_nonfinite == "stop":
      kept = f"its latest checkpoint is step {last_saved}" if last_saved else "no checkpoint"
      raise NonFiniteError(f"{message}; training stopped, {kept} "
                           f"(--config.train.on_nonfinite=skip skips such steps)")
    logging.warning("%s: skipped (config.train.on_nonfinite='skip')", message)
    skipped += 1
  finite = [metrics for metrics in fetched if metrics["finite"]]
  names = [name for name in fetched[0] if name != "finite"] if finite else []
  scalars = {f"train/{k}": float(np.mean([m[k] for m in finite])) for k in names}
  if skipped:
    scalars["train/skipped_steps"] = skipped
  return scalars


# ---------------------------------------------------------------------------------------------
# Evaluation of a saved run


def load_checkpoint(config, workdir, checkpoint="best"):
  """(step, params) of a checkpoint of workdir, replicated on the local devices.

  checkpoint: "best" (by config.eval.best_metric; the latest if none has metrics), "last", or a
  step number. Points config.data at the workdir's generated data when it has none (the demo).
  Raises FileNotFoundError for a workdir without checkpoints or an unknown checkpoint, and
  checkpointing.CheckpointMismatchError for checkpoints of another model.
  """
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory} does not exist: train first with "
                            f"`python train.py --config ... --workdir {workdir}`")
  manager = checkpointing.checkpoint_manager(
      workdir, best_metric=config.eval.best_metric, best_mode=config.eval.best_mode,
      create=False)
  if not manager.all_steps():
    raise FileNotFoundError(f"no checkpoint in {directory}: train first with "
                            f"`python train.py --config ... --workdir {workdir}`")
  if checkpoint == "best":
    step = manager.best_step()
  elif checkpoint == "last":
    step = manager.latest_step()
  elif checkpoint.isdigit() and int(checkpoint) in manager.all_steps():
    step = int(checkpoint)
  else:
    raise FileNotFoundError(f"--checkpoint={checkpoint}: expected 'best', 'last' or one of the "
                            f"steps in {directory}: {manager.all_steps()}")

  prepare_data_config(config, workdir)
  model = model_lib.CLAM(config.model)
  abstract_params = Parallel().abstract(param_shapes(
      model, example_inputs(pipeline.make_source(config.data, config.eval.split))))
  checkpointing.check_params(manager, step, abstract_params, config)
  params = checkpointing.restore_params(manager, step, abstract_params)
  manager.close()
  return step, params


def evaluate(config, workdir, checkpoint="best"):
  """Restores a checkpoint of workdir, evaluates it on config.eval.split and writes workdir/eval/.

  checkpoint: "best" (by config.eval.best_metric; the latest if none has metrics), "last", or a
  step number. Writes eval/metrics.json ({"step", "split", "metrics"}), eval/metrics.md,
  eval/predictions.npz (predict's arrays, nested names joined by "/": for EK100 row, observed,
  participant, scores/<head> (R, C), labels/<head> (R,)) and, for EK100 and the synthetic data,
  eval/per_class_recall.png. Returns {"step", "metrics", "markdown"}.
  Raises FileNotFoundError for a workdir without checkpoints and
  checkpointing.CheckpointMismatchError for checkpoints of another model (before touching any),
  pipeline.DataError for an example that cannot be read.
  """
  check_config(config)
  step, params = load_checkpoint(config, workdir, checkpoint)
  parallel = Parallel()
  model = model_lib.CLAM(config.model)
  predictions = predict(config, params, parallel, parallel.predict_step(model), config.eval.split)
  results = compute_metrics(config, predictions)
  out = os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump({"step": step, "split": config.eval.split, "metrics": results}, f, indent=2)
  description, digits = METRIC_DESCRIPTIONS[config.data.name]
  markdown = metrics_table(
      results, title=f"{config.data.name} {config.eval.split}, step {step} ({description})",
      digits=digits)
  with open(os.path.join(out, "metrics.md"), "w") as f:
    f.write(markdown + "\n")
  np.savez(os.path.join(out, "predictions.npz"),
           **{f"{k}/{h}" if isinstance(v, dict) else k: x
              for k, v in predictions.items() for h, x in (v.items() if isinstance(v, dict)
                                                           else [(None, v)])})
  if config.data.name in ("ek100", "synthetic"):
    plot_per_class_recall(predictions, os.path.join(out, "per_class_recall.png"))
  return {"step": step, "metrics": results, "markdown": markdown}


# data.name -> (what compute_metrics' numbers are, decimals shown)
METRIC_DESCRIPTIONS = {
    "ek100": ("class-mean top-5 recall, %", 2),
    "synthetic": ("class-mean top-5 recall, %", 2),
    "thumos14": ("per-frame mAP and calibrated mAP; anticipation: mean and per horizon", 4),
    "ego4d": ("edit distance @ Z = 20 of the most probable sequence, lower is better", 4),
}


def metrics_table(results, title, digits=2):
  """A markdown table of {"<row>/<column>": value} (e.g. "overall/verb"): one row per first part,
  one column per second part, values with `digits` decimals."""
  rows = list(dict.fromkeys(k.split("/")[0] for k in results))
  columns = list(dict.fromkeys(k.split("/")[1] for k in results))
  lines = [f"**{title}**", "",
           "| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for row in rows:
    values = [results.get(f"{row}/{c}") for c in columns]
    lines.append(f"| {row} | " + " | ".join("" if v is None else f"{v:.{digits}f}"
                                            for v in values) + " |")
  return "\n".join(lines)


def per_class_recall(scores, labels, k=5):
  """Top-k recall of every class present in labels: (classes (K,) int, recall (K,) float).

  scores: (N, C); labels: (N,) int >= 0. Same hit rule as metrics.mean_top_k_recall, whose value
  is recall.mean().
  """
  label_scores = np.take_along_axis(scores, labels[:, None], axis=1)
  hits = (scores > label_scores).sum(axis=1) < k
  classes, inverse = np.unique(labels, return_inverse=True)
  return classes, np.bincount(inverse, weights=hits) / np.bincount(inverse)


def plot_per_class_recall(predictions, path):
  """Writes a PNG with, per head, the top-5 recall of every evaluated class, sorted."""
  heads = [h for h in ("verb", "noun", "action") if h in predictions["scores"]]
  fig, axes = plt.subplots(1, len(heads), figsize=(4.5 * len(heads), 3.5), squeeze=False)
  for ax, head in zip(axes[0], heads):
    _, recall = per_class_recall(predictions["scores"][head], predictions["labels"][head])
    ax.bar(np.arange(len(recall)), 100.0 * np.sort(recall)[::-1], width=1.0)
    ax.axhline(100.0 * recall.mean(), color="k", linestyle="--", linewidth=1,
               label=f"mean {100.0 * recall.mean():.1f}")
    ax.set(title=f"{head}: {len(recall)} classes", xlabel="class (sorted)",
           ylabel="top-5 recall (%)", ylim=(0, 100))
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line


USER_ERRORS = (ConfigError, NonFiniteError, checkpointing.CheckpointMismatchError,
               checkpointing.WorkdirBusyError, FileNotFoundError, pipeline.DataError)


def define_saved_run_flags():
  """Defines the --config, --workdir (both required) and --checkpoint flags of a script that reads
  a trained run (evaluate.py, stream.py); returns their (config, workdir, checkpoint) holders."""
  config = config_flags.DEFINE_config_file(
      "config", None, "Config file the run was trained with; fields overridable as in train.py.",
      lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "The training run's workdir.")
  checkpoint = flags.DEFINE_string(
      "checkpoint", "best", "'best' (by config.eval.best_metric), 'last', or a step number.")
  flags.mark_flags_as_required(["config", "workdir"])
  return config, workdir, checkpoint


def run_command(argv, work, errors=USER_ERRORS):
  """A script's main(argv) around work(): no positional arguments; Orbax's INFO logs off unless
  --verbosity is given; an error a user can act on (one of errors) ends the program with one line
  `<script>: error: ...` and exit status 1 (--verbosity=1 adds the traceback). Returns work()."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every checkpoint operation at INFO; --verbosity=0 brings that back.
    logging.set_verbosity(logging.WARNING)
  try:
    return work()
  except errors as e:
    logging.debug("traceback of the error:", exc_info=True)  # shown with --verbosity=1
    sys.exit(f"{os.path.basename(argv[0])}: error: {e}")


def parse_flags(argv):
  """absl flag parsing (for app.run's flags_parser) where a misspelt --config.<field> exits with
  one line naming it (status 1) instead of a traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    # ml_collections raises KeyError("'lrr'\nDid you mean \"lr\" instead of \"lrr\"?"), wrapped.
    message = str(e)
    missing = re.findall(r"\w+", message)[0]
    flag = next((arg.split("=")[0] for arg in argv[1:] if arg.startswith("--config.")
                 and missing in arg.split("=")[0].split(".")), f"--config...{missing}")
    hint = re.search(r'Did you mean "(\w+)"', message)
    sys.exit(f"{os.path.basename(argv[0])}: error: {flag}: the config has no field '{missing}'"
             + (f' (did you mean "{hint.group(1)}"?)' if hint else ""))
