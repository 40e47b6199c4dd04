"""Tests of the training library, train.py and evaluate.py on tiny synthetic data (CPU).

The training runs share one subprocess started with 2 virtual CPU devices (XLA_FLAGS must be set
before JAX starts) and a persistent compilation cache, so the data-parallel check, the end-to-end
run, the interrupted and the resumed run and the evaluation compile each program once. That
process writes its observations to results.json; the tests below check them and the files it left.
The tiny model uses the GRU processor without memory: it compiles in a fraction of the Mamba +
memory model's time, and the loop does not depend on the model's insides (tests/test_model*.py).
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax.training import train_state

from clam_jax import checkpointing
from clam_jax import metrics as metrics_lib
from clam_jax import train_lib
from helpers import random_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERRUPT_AT = 4  # mid-epoch: the tiny training split has 38 segments, 4.75 batches of 8


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_config(data_root=""):
  """configs/demo.py shrunk: 5 videos (38 + 10 segments), D = 16, 12 frames, 9 steps of 8."""
  config = load_config("demo")
  config.model.update(dict(
      modalities={"rgb": 16}, d_model=16, processor="gru", processor_layers=1, memory=False,
      num_act_tokens=4, predictor_heads=2, heads={"verb": 5, "noun": 10, "action": 10}))
  config.data.update(dict(
      root=data_root, modalities={"rgb": 16}, obs_seconds=12.0, fps=1.0, batch_size=8))
  # Replaced, not updated: the demo's other generator arguments would carry over.
  config.data.synthetic = dict(num_videos=5, num_validation_videos=1, episodes_per_video=2,
                               num_recipes=3, steps_per_episode=3, feature_dim=16, seed=0)
  config.optimizer.update(dict(lr=3e-3, warmup_epochs=0.5))
  config.train.update(dict(num_epochs=2, log_every_steps=1, eval_every_epochs=1.0,
                           checkpoint_every_epochs=0.5))
  config.eval.batch_size = 16
  return config


class _Interrupt(Exception):
  pass


def _run_all(out):
  """The subprocess body (2 CPU devices): writes out/results.json and the workdirs under out."""
  from clam_jax.data import pipeline

  results = {"devices": jax.device_count()}
  full, resumed = os.path.join(out, "full"), os.path.join(out, "resumed")
  config = tiny_config()
  results["final_metrics"] = train_lib.train_and_evaluate(config, full)
  data_root = config.data.root  # train_and_evaluate pointed it at full/data and generated it

  # Interrupted right after the checkpoint of step INTERRUPT_AT, then resumed.
  config = tiny_config(data_root)
  save = checkpointing.save

  def save_then_stop(manager, step, *args, **kwargs):
    save(manager, step, *args, **kwargs)
    if step == INTERRUPT_AT:
      manager.wait_until_finished()
      raise _Interrupt

  checkpointing.save = save_then_stop
  try:
    train_lib.train_and_evaluate(config, resumed)
  except _Interrupt:
    results["interrupted_steps"] = checkpointing.checkpoint_manager(
        resumed, best_metric=config.eval.best_metric).all_steps()
  finally:
    checkpointing.save = save
  train_lib.train_and_evaluate(tiny_config(data_root), resumed)

  one, two = train_lib.Parallel(jax.devices()[:1]), train_lib.Parallel()
  model = train_lib.model_lib.CLAM(config.model)
  abstract = two.abstract(train_lib.param_shapes(
      model, train_lib.example_inputs(pipeline.make_source(config.data, "train"))))
  params = {}
  for name, workdir in (("full", full), ("resumed", resumed)):
    manager = checkpointing.checkpoint_manager(workdir, best_metric=config.eval.best_metric,
                                               create=False)
    params[name] = jax.device_get(checkpointing.restore_params(
        manager, manager.latest_step(), abstract))
    results[f"{name}_steps"] = manager.all_steps()
  results["resumed_params_max_difference"] = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(a - b).max()), params["full"], params["resumed"])))

  # One train step with the batch on 1 device and split over 2, then more steps on a fixed batch.
  # Dropout off: each device draws its own masks. The first half of the rows (device 0's) has no
  # future action labels, so each device's loss must divide by the global count of labels.
  batch = train_lib.model_inputs(next(iter(pipeline.make_loader(
      config.data, "train", shuffle=True, num_epochs=1))))
  half = len(batch["mask"]) // 2
  batch["future_targets"]["action"][:half] = -1
  no_dropout = config.model.copy_and_resolve_references()
  no_dropout.dropout = 0.0
  tx, _ = train_lib.make_optimizer(config.optimizer, steps_per_epoch=38 / 8, total_steps=9)
  # On the host: each device_put below makes fresh buffers, as the steps donate theirs.
  state = jax.device_get(train_state.TrainState.create(
      apply_fn=train_lib.model_lib.CLAM(no_dropout).apply, params=params["full"],
      tx=tx)).replace(step=np.int32(0))
  key = jax.random.key(1)
  stepped = {}
  for name, parallel in (("one", one), ("two", two)):
    new_state, metrics = parallel.train_step(config.loss)(
        jax.device_put(state, parallel.replicated), parallel.shard_batch(batch), key)
    stepped[name] = (jax.device_get(new_state.params), float(metrics["loss"]))
  results["loss_one_device"], results["loss_two_devices"] = stepped["one"][1], stepped["two"][1]
  results["params_max_difference"] = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(a - b).max()), stepped["one"][0], stepped["two"][0])))
  step_fn = two.train_step(config.loss)
  state, losses = jax.device_put(state, two.replicated), []
  for _ in range(9):
    state, metrics = step_fn(state, two.shard_batch(batch), key)
    losses.append(float(metrics["loss"]))
  results["fixed_batch_losses"] = losses

  report = train_lib.evaluate(tiny_config(data_root), full)
  results["evaluate_step"] = report["step"]
  results["data_root"] = data_root
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("runs"))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=os.path.join(out, "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), REPO,
                                         os.environ.get("PYTHONPATH", "")]))
  code = f"import test_train; test_train._run_all({out!r})"
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=600, cwd=REPO)
  assert done.returncode == 0, done.stderr[-5000:]
  with open(os.path.join(out, "results.json")) as f:
    return out, json.load(f)


def _rows(workdir):
  return train_lib.read_metrics(workdir)


def test_cross_entropy_ignores_minus_one_and_smooths_labels():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
  labels = rng.integers(0, 7, (3, 5)).astype(np.int32)
  labels[0, 1] = labels[2, 4] = -1
  valid = labels >= 0
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(train_lib.cross_entropy(logits, labels),
                             -log_p[valid, labels[valid]].mean(), rtol=1e-5)
  smoothed = optax.smooth_labels(np.eye(7)[labels[valid]], 0.2)
  np.testing.assert_allclose(train_lib.cross_entropy(logits, labels, 0.2),
                             -(smoothed * log_p[valid]).sum(-1).mean(), rtol=1e-5)
  assert float(train_lib.cross_entropy(logits, np.full((3, 5), -1, np.int32))) == 0.0


def test_compute_loss_weights_heads_and_past_frames():
  rng = np.random.default_rng(1)
  heads = {"verb": 4, "action": 6}
  outputs = {"future": {h: rng.normal(size=(2, 1, c)) for h, c in heads.items()},
             "past": {h: rng.normal(size=(2, 9, c)) for h, c in heads.items()}}
  batch = {"future_targets": {h: rng.integers(0, c, (2, 1)) for h, c in heads.items()},
           "past_targets": {h: rng.integers(-1, c, (2, 9)) for h, c in heads.items()}}
  config = ml_collections.ConfigDict(dict(
      weights={"verb": 0.5, "action": 2.0}, past_loss_weight=0.25, label_smoothing=0.0))
  loss, parts = train_lib.compute_loss(outputs, batch, config)
  ce = lambda kind, h: float(train_lib.cross_entropy(outputs[kind][h], batch[f"{kind}_targets"][h]))
  expected = sum(w * (ce("future", h) + 0.25 * ce("past", h)) for h, w in config.weights.items())
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(parts["past/action"], ce("past", "action"), rtol=1e-6)


def test_loss_and_optimizer_reduce_the_loss_on_a_fixed_batch(runs):
  losses = runs[1]["fixed_batch_losses"]
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.9 * losses[0], losses


def test_data_parallel_step_matches_one_device(runs):
  _, results = runs
  assert results["devices"] == 2
  np.testing.assert_allclose(results["loss_two_devices"], results["loss_one_device"], rtol=1e-5)
  assert results["params_max_difference"] < 1e-5


def test_train_and_evaluate_writes_checkpoints_metrics_and_plots(runs):
  out, results = runs
  full = os.path.join(out, "full")
  assert results["data_root"] == os.path.join(full, "data")  # generated into the workdir
  assert os.path.exists(os.path.join(full, "data", "synthetic.json"))
  assert results["full_steps"][-1] == 9  # 2 epochs of 38 examples, batches of 8
  rows = _rows(full)
  train_steps = [r["step"] for r in rows if "train/loss" in r]
  assert train_steps == list(range(1, 10))
  assert [r["step"] for r in rows if "eval/overall/action" in r] == [5, 9]
  assert all(np.isfinite(r["train/loss"]) and r["train/lr"] >= 0 for r in rows if "train/loss" in r)
  assert set(results["final_metrics"]) == {"overall/verb", "overall/noun", "overall/action"}
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(full))
  with open(os.path.join(full, "training_curves.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(full, "config.json")) as f:
    assert json.load(f)["model"]["d_model"] == 16


def test_resume_continues_at_the_step_with_the_same_batches(runs):
  out, results = runs
  assert results["interrupted_steps"][-1] == INTERRUPT_AT
  assert results["resumed_steps"][-1] == 9
  full, resumed = _rows(os.path.join(out, "full")), _rows(os.path.join(out, "resumed"))
  loss = lambda rows: {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
  assert sorted(loss(resumed)) == list(range(1, 10))  # no step repeated or skipped
  for step in range(INTERRUPT_AT + 1, 10):  # same batches and dropout after resuming
    np.testing.assert_allclose(loss(resumed)[step], loss(full)[step], rtol=1e-5)
  assert results["resumed_params_max_difference"] < 1e-6


def test_evaluate_metrics_match_the_saved_predictions(runs):
  out, results = runs
  eval_dir = os.path.join(out, "full", "eval")
  with open(os.path.join(eval_dir, "metrics.json")) as f:
    report = json.load(f)
  assert report["step"] == results["evaluate_step"] == 9
  saved = np.load(os.path.join(eval_dir, "predictions.npz"))
  heads = ("verb", "noun", "action")
  expected = metrics_lib.ek100_anticipation_metrics(
      *(saved[f"scores/{h}"] for h in heads), *(saved[f"labels/{h}"] for h in heads))
  assert report["metrics"] == pytest.approx(expected, abs=1e-9)
  # Every validation segment has a row; dropped ones (no observation) can never be hits.
  assert len(saved["row"]) == 10 and saved["scores/action"].shape == (10, 10)
  dropped = ~saved["observed"]
  labels = saved["labels/action"][dropped]
  assert np.all(saved["scores/action"][dropped, labels] < saved["scores/action"][dropped].max(1))
  with open(os.path.join(eval_dir, "metrics.md")) as f:
    assert "| overall |" in f.read()
  with open(os.path.join(eval_dir, "per_class_recall.png"), "rb") as f:
    assert f.read(4) == b"\x89PNG"


def _snapshot(directory):
  return sorted((os.path.relpath(os.path.join(d, n), directory),
                 os.stat(os.path.join(d, n)).st_mtime_ns)
                for d, _, names in os.walk(directory) for n in names)


def test_mismatched_or_missing_workdir_fails_without_touching_checkpoints(runs, tmp_path):
  out, results = runs
  full = os.path.join(out, "full")
  with pytest.raises(FileNotFoundError, match="checkpoints"):
    train_lib.evaluate(tiny_config(results["data_root"]), str(tmp_path / "empty"))

  before = _snapshot(full)
  other = tiny_config(results["data_root"])
  other.model.d_model = 24
  shapes = r"params/.* is \(.*16.*\) there but \(.*24.*\).*model.d_model: 16 -> 24"
  with pytest.raises(checkpointing.CheckpointMismatchError, match=shapes):
    train_lib.evaluate(other, full)
  with pytest.raises(checkpointing.CheckpointMismatchError, match="model.d_model"):
    train_lib.train_and_evaluate(other, full)
  assert _snapshot(full) == before


def _cli(*args):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_cli_misspelt_config_field_is_one_line_naming_it(tmp_path):
  done = _cli("train.py", "--config", "configs/demo.py", "--workdir", str(tmp_path),
              "--config.optimizer.lrr=1")
  assert done.returncode != 0
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and "--config.optimizer.lrr" in lines[0] and '"lr"' in lines[0], lines
  assert not os.listdir(tmp_path)


def test_cli_evaluate_without_checkpoints_is_one_line(tmp_path):
  done = _cli("evaluate.py", "--config", "configs/demo.py", "--workdir", str(tmp_path / "none"))
  assert done.returncode != 0
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and "evaluate.py: error:" in lines[0] and "checkpoints" in lines[0], lines


def test_stream_video_equals_the_model_on_the_video_so_far(runs, tmp_path):
  """replay.stream_video (stream.py's library) feeds one validation video frame by frame: after
  every frame its anticipation is the model's on the whole video so far; segments read the frame
  of their observation end; an unknown video is named."""
  from clam_jax import replay
  from clam_jax.data import pipeline
  from clam_jax.model import CLAM

  out, _ = runs
  workdir = os.path.join(out, "full")
  config = tiny_config()
  result = replay.stream_video(config, workdir, checkpoint="last")
  times = result["times"]
  source = pipeline.make_source(config.data, config.eval.split)
  ann = source.annotations
  rows = np.flatnonzero(ann.video_id == result["video_id"])
  assert result["video_id"] == ann.video_id[0]
  np.testing.assert_allclose(times, np.arange(1, len(times) + 1) / config.data.fps)
  assert times[-1] <= ann.stop[rows].max() < times[-1] + 1 / config.data.fps
  assert result["probabilities"]["action"].shape == (len(times), 10)
  assert len(result["latency_ms"]) == len(times)
  _, params = train_lib.load_checkpoint(config, workdir, "last")
  for t in (0, len(times) // 2, len(times) - 1):
    features, mask = source.video_features(result["video_id"], times[:t + 1])
    full = CLAM(config.model).apply({"params": params}, {m: x[None] for m, x in features.items()},
                                    mask[None], train=False)
    expected = jax.nn.softmax(full["future"]["action"][0, 0])
    np.testing.assert_allclose(result["probabilities"]["action"][t], expected, atol=1e-5)
  assert [s["narration_id"] for s in result["segments"]] == list(ann.narration_id[rows])
  for segment, row in zip(result["segments"], rows):
    obs_end = ann.start[row] - config.data.anticipation_seconds
    if segment["frame"] >= 0:
      assert times[segment["frame"]] <= obs_end + 1e-6 < times[segment["frame"]] + 1 / config.data.fps
      top5 = np.argsort(-result["probabilities"]["action"][segment["frame"]])[:5]
      assert segment["top5"] == top5.tolist()
    assert segment["hit"] == (segment["action"] in segment["top5"])
  replay.plot(result, config.data.anticipation_seconds, tmp_path / "stream.png")
  with open(tmp_path / "stream.png", "rb") as f:
    assert f.read(4) == b"\x89PNG"
  with pytest.raises(ValueError, match="no_such_video"):
    replay.stream_video(config, workdir, video_id="no_such_video")
  with pytest.raises(ValueError, match="processor='mamba'"):  # this config's is a GRU
    replay.stream_video(config, workdir, kernels="fused")


def test_fused_streamer_equals_the_xla_streamer():
  """replay.make_streamer's two step kernels give the same anticipations, frame by frame
  (float32, a Mamba + memory model with random params, 4 act-tokens + 8 memory tokens as the
  demo's: 12 context rows, padded to 16 in the fused step; its kernels in interpret mode)."""
  from clam_jax import replay
  from clam_jax import streaming

  config = tiny_config().model
  config.update(dict(processor="mamba", memory=True, memory_tokens=8, memory_heads=2))
  params = random_params(config, {"rgb": 16})
  frames = np.random.default_rng(0).standard_normal((4, 1, 16)).astype(np.float32)
  outs = {}
  for kernels in replay.KERNELS:
    prepared, step = replay.make_streamer(config, params, kernels)
    state = streaming.init_stream_state(config, 1)
    outs[kernels] = []
    for frame in frames:
      state, out = step(prepared, state, {"rgb": frame})
      outs[kernels].append(np.asarray(out["future"]["action"]))
  np.testing.assert_allclose(outs["fused"], outs["xla"], rtol=1e-5, atol=1e-5)
  assert np.abs(np.diff(outs["xla"], axis=0)).max() > 1e-3  # the frames do change the output
  with pytest.raises(ValueError, match="kernels must be one of"):
    replay.make_streamer(config, params, "triton")


def test_cli_stream_without_checkpoints_is_one_line(tmp_path):
  done = _cli("stream.py", "--config", "configs/demo.py", "--workdir", str(tmp_path / "none"))
  assert done.returncode != 0
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and "stream.py: error:" in lines[0] and "checkpoints" in lines[0], lines
