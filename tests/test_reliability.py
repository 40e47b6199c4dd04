"""Reliability of training runs: SIGKILL and resume, a kill during a checkpoint write, two processes
on one workdir, and the NaN/Inf guard.

Every run is a real train.py process on configs/demo.py shrunk by command-line overrides (TINY,
and a batch size of a fifth of the training segments: 10 steps over 2 epochs, checkpoints every
2 steps and at the evaluations of steps 5 and 10). The processes share a persistent compilation
cache, so only the first one compiles. A process that must die at a known point runs train.py
under `_hooked_train`, whose hooks stall it there until the test kills it; every restart is the
plain command.
"""

import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import types

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from ml_collections import config_flags

from clam_jax import train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.modalities.rgb=16", "--config.data.modalities.rgb=16",
        "--config.data.synthetic.feature_dim=16", "--config.data.synthetic.num_videos=5",
        "--config.data.synthetic.num_validation_videos=1", "--config.model.d_model=16",
        "--config.model.processor=gru", "--config.model.processor_layers=1",
        "--config.model.memory=False", "--config.model.num_act_tokens=4",
        "--config.model.predictor_heads=2", "--config.data.obs_seconds=12", "--config.data.fps=1",
        "--config.eval.batch_size=32", "--config.train.num_epochs=2",
        "--config.train.log_every_steps=1", "--config.train.eval_every_epochs=1",
        "--config.train.checkpoint_every_epochs=0.4"]
TOTAL_STEPS = 10
TIMEOUT = 300


def _hooked_train(marker, stall_before_save=None, stall_in_data_save=None, poison_sample=None):
  """Runs train.py in this process (its flags in sys.argv[1:]) with test hooks.

  stall_before_save=K: at step K's checkpoint, once the earlier ones are written, touch `marker`
  and sleep: killed now, the run loses the steps since its last checkpoint.
  stall_in_data_save=K: while writing checkpoint K (its data-iterator item, in the background
  thread, after params and opt_state were started) touch `marker` and sleep.
  poison_sample=S: sample S's features are NaN in every training batch that holds it.
  """
  import runpy

  import grain

  from clam_jax import checkpointing
  from clam_jax.data import pipeline

  def stall():
    pathlib.Path(marker).touch()
    time.sleep(TIMEOUT)

  save = checkpointing.save

  def save_or_stall(manager, step, *args, **kwargs):
    if step == stall_before_save:
      manager.wait_until_finished()
      stall()
    save(manager, step, *args, **kwargs)

  data_save = grain.checkpoint.CheckpointHandler.save

  def data_save_or_stall(self, directory, *args, **kwargs):
    if f"/{stall_in_data_save}.orbax-checkpoint-tmp/" in str(directory):
      stall()
    return data_save(self, directory, *args, **kwargs)

  make_loader = pipeline.make_loader

  def poisoned_loader(data_config, split, **kwargs):
    loader = make_loader(data_config, split, **kwargs)

    def poison(batch):
      for features in batch["features"].values():
        features[batch["sample_id"] == poison_sample] = np.nan
      return batch

    return loader.map(poison) if split == "train" else loader

  checkpointing.save = save_or_stall
  grain.checkpoint.CheckpointHandler.save = data_save_or_stall
  pipeline.make_loader = poisoned_loader
  sys.argv[0] = "train.py"
  runpy.run_path(os.path.join(REPO, "train.py"), run_name="__main__")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """What every train.py process gets: the environment, and flags pointing it at a dataset
  generated once for all of them (model heads set to its class counts, batches of a fifth of its
  training segments)."""
  from clam_jax.data import pipeline

  out = tmp_path_factory.mktemp("shared")
  config = _config(f"--config.data.root={out / 'data'}")
  heads = pipeline.head_sizes(config.data)  # generates the dataset
  segments = len(pipeline.make_source(config.data, "train"))
  batch_size = segments // 5
  assert 2 * segments // batch_size == TOTAL_STEPS, segments
  # The runs are compared with each other only, and compiling dominates them: no LLVM optimisation.
  xla_flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(out / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}",
             PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), REPO,
                                         os.environ.get("PYTHONPATH", "")]))
  data_flags = [f"--config.data.root={out / 'data'}", f"--config.data.batch_size={batch_size}",
                *(f"--config.model.heads.{head}={size}" for head, size in heads.items())]
  return types.SimpleNamespace(env=env, flags=data_flags)


def _config(*extra):
  """The config train.py builds from configs/demo.py and TINY (flags parsed as it parses them)."""
  argv = ["train.py", "--config", os.path.join(REPO, "configs", "demo.py"), *TINY, *extra]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


class _Run:
  """A train.py process on workdir (plain, or under `_hooked_train` with hooks), output to files."""

  def __init__(self, shared, workdir, *extra, **hooks):
    self.workdir, self.log = str(workdir), f"{workdir}.{time.monotonic_ns()}.log"
    self.marker = self.log + ".stalled"
    args = ["--config", "configs/demo.py", "--workdir", self.workdir, *TINY,
            *shared.flags, *extra]
    if hooks:
      code = f"import test_reliability; test_reliability._hooked_train({self.marker!r}, **{hooks})"
      command = [sys.executable, "-c", code, *args]
    else:
      command = [sys.executable, "train.py", *args]
    with open(self.log, "w") as log:
      self.process = subprocess.Popen(command, cwd=REPO, env=shared.env, stdout=log,
                                      stderr=subprocess.STDOUT)

  def output(self):
    with open(self.log) as f:
      return f.read()

  def wait(self):
    """Waits for the exit; returns (exit status, output)."""
    return self.process.wait(timeout=TIMEOUT), self.output()

  def wait_until_stalled(self):
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(self.marker):
      assert self.process.poll() is None, f"exited before its hook stalled it:\n{self.output()}"
      assert time.monotonic() < deadline, self.output()
      time.sleep(0.05)

  def kill_when_stalled(self):
    """SIGKILLs the process once its hook has stalled it."""
    self.wait_until_stalled()
    self.process.send_signal(signal.SIGKILL)
    self.process.wait()


def _checkpoints(workdir):
  """(committed steps, temporary folders) under workdir/checkpoints."""
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return (sorted(int(n) for n in names if n.isdigit()),
          sorted(n for n in names if "orbax-checkpoint-tmp" in n))


def _restore(workdir, step, item):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), item))


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _batches(config):
  """The sample ids of every training batch, in order: (B,) int arrays."""
  from clam_jax.data import pipeline

  return [batch["sample_id"] for batch in pipeline.make_loader(
      config.data, "train", shuffle=True, num_epochs=config.train.num_epochs)]


@pytest.fixture(scope="module")
def runs(shared, tmp_path_factory):
  """All the train.py processes, overlapped where they do not depend on each other:

  full: uninterrupted. killed: killed between checkpoints, restarted and killed while writing a
  checkpoint (a second process tries the workdir meanwhile), restarted to the end. stop, skip:
  training batches hold a poisoned sample (NaN features) at step 3 and again in the second epoch;
  logging every 10 steps, with on_nonfinite=stop and =skip.
  """
  out = tmp_path_factory.mktemp("runs")
  config = _config(*shared.flags)
  batches = _batches(config)
  # A sample of step 3's batch that comes again in the second epoch (not in its dropped remainder).
  poison = next(int(i) for i in batches[2] if sum(i in ids for ids in batches) == 2)
  seen = {"batches": batches, "bad_steps": [s for s, ids in enumerate(batches, 1) if poison in ids]}
  killed = str(out / "killed")
  started = {}
  try:
    # Stalled after the evaluation of step 5, so that every program is compiled and cached.
    started["first"] = _Run(shared, killed, stall_before_save=8)
    started["first"].kill_when_stalled()
    seen["first_kill"] = (_checkpoints(killed),
                          [r["step"] for r in _rows(killed) if "train/loss" in r])
    # The compilation cache is warm now: the other runs only load its programs.
    started["full"] = _Run(shared, out / "full")
    for mode in ("stop", "skip"):
      started[mode] = _Run(shared, out / mode, "--config.train.log_every_steps=10",
                           f"--config.train.on_nonfinite={mode}", poison_sample=poison)
    started["second"] = _Run(shared, killed, stall_in_data_save=TOTAL_STEPS)
    started["second"].wait_until_stalled()
    # Stalled while writing checkpoint 10: a second train.py now could delete or overwrite it.
    seen["concurrent"] = _Run(shared, killed).wait()
    started["second"].kill_when_stalled()
    seen["second_output"] = started["second"].output()
    seen["second_kill"] = _checkpoints(killed)
    seen["tmp_contents"] = sorted(os.listdir(os.path.join(killed, "checkpoints",
                                                          "10.orbax-checkpoint-tmp")))
    seen["resumed"] = _Run(shared, killed).wait()
    for name in ("full", "stop", "skip"):
      seen[name] = started[name].wait()
  finally:
    for run in started.values():
      if run.process.poll() is None:
        run.process.send_signal(signal.SIGKILL)
        run.process.wait()
  return out, seen


def test_kill_between_checkpoints_loses_only_the_steps_since_the_last_one(runs):
  _, seen = runs
  (steps, tmp), logged = seen["first_kill"]
  assert steps == [5, 6] and tmp == []  # 5 was evaluated (the best so far), 6 is the latest
  assert logged == list(range(1, 9))  # steps 7 and 8 were trained, then lost


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(runs):
  _, seen = runs
  assert "resuming from step 6" in seen["second_output"]
  steps, tmp = seen["second_kill"]
  assert steps == [5, 8]  # 6 was deleted when 8 was written
  assert tmp == ["10.orbax-checkpoint-tmp"]
  assert "data.orbax-checkpoint-tmp" in seen["tmp_contents"]  # unfinished


def test_second_process_on_a_workdir_refuses(runs):
  out, seen = runs
  killed = str(out / "killed")
  status, output = seen["concurrent"]
  assert status == 1
  assert output.strip().splitlines()[-1] == (
      f"train.py: error: {killed} is in use by another training process; wait for it to finish, "
      f"or give this run another --workdir")
  assert seen["second_kill"][1] == ["10.orbax-checkpoint-tmp"]  # the live write was left alone


def test_resumed_run_equals_the_uninterrupted_one_bit_for_bit(runs):
  out, seen = runs
  full, killed = str(out / "full"), str(out / "killed")
  for status, output in (seen["full"], seen["resumed"]):
    assert status == 0, output
  assert "resuming from step 8" in seen["resumed"][1]
  assert _checkpoints(killed)[1] == []  # the unfinished write was cleaned up
  assert _checkpoints(full)[0][-1] == _checkpoints(killed)[0][-1] == TOTAL_STEPS
  # The same batches in the same order: every step's losses, and the iterator's final position.
  drop = lambda row: {k: v for k, v in row.items() if k != "train/examples_per_sec"}
  rows = [drop(r) for r in _rows(full)]
  assert [drop(r) for r in _rows(killed)] == rows
  assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, TOTAL_STEPS + 1))
  data = [sorted(pathlib.Path(w, "checkpoints", str(TOTAL_STEPS), "data").glob("*.json"))
          for w in (full, killed)]
  assert data[0] and [p.read_text() for p in data[0]] == [p.read_text() for p in data[1]]
  for item in ("params", "opt_state"):
    a, b = (_restore(w, TOTAL_STEPS, item) for w in (full, killed))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------------
# NaN/Inf guard


def test_nonfinite_step_stops_the_run_naming_it_and_keeps_the_last_good_checkpoint(runs):
  out, seen = runs
  batches = seen["batches"]
  assert seen["bad_steps"][0] == 3 and len(seen["bad_steps"]) == 2
  status, output = seen["stop"]
  assert status == 1
  assert output.strip().splitlines()[-1] == (
      f"train.py: error: step 3: loss nan, gradient norm nan on the batch of sample ids "
      f"{batches[2].tolist()}; training stopped, its latest checkpoint is step 2 "
      f"(--config.train.on_nonfinite=skip skips such steps)")
  # Found at step 4's checkpoint, which was not written: nothing after step 3 was saved.
  workdir = str(out / "stop")
  assert _checkpoints(workdir) == ([2], [])
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_restore(workdir, 2, "params")))
  assert [r["step"] for r in _rows(workdir)] == [2]


def test_nonfinite_steps_are_skipped_when_the_config_says_so(runs):
  out, seen = runs
  batches = seen["batches"]
  status, output = seen["skip"]
  assert status == 0, output
  for step in seen["bad_steps"]:
    assert (f"step {step}: loss nan, gradient norm nan on the batch of sample ids "
            f"{batches[step - 1].tolist()}: skipped") in output
  workdir = str(out / "skip")
  rows = _rows(workdir)
  assert sum(r.get("train/skipped_steps", 0) for r in rows) == 2
  assert all(np.isfinite(v) for r in rows for v in r.values())
  assert _checkpoints(workdir)[0][-1] == TOTAL_STEPS
  params = _restore(workdir, TOTAL_STEPS, "params")
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_metric_rows_after_the_checkpoint_and_a_torn_last_line_are_dropped_on_resume(tmp_path):
  rows = [{"step": step, "train/loss": float(loss)}
          for step, loss in enumerate(np.random.default_rng().random(5), 1)]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
    f.write(json.dumps({"step": 6, "train/loss": 1.0})[:9])  # killed while writing
  train_lib.MetricWriter(str(tmp_path), resume_step=4).close()
  assert _rows(tmp_path) == rows[:4]
  assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


class _Linear(nn.Module):
  """A stand-in for CLAM in train_step (quick to compile): one Dense per head on every frame."""
  heads: dict

  @nn.compact
  def __call__(self, features, mask, *, train):
    dense = {head: nn.Dropout(0.5, deterministic=not train) for head in self.heads}
    past = {head: nn.Dense(classes, name=head)(dense[head](features["rgb"]))
            for head, classes in self.heads.items()}
    return {"future": {head: logits[:, -1:] for head, logits in past.items()}, "past": past}


def test_train_step_leaves_the_state_as_it_was_on_a_nonfinite_batch():
  config = _config()
  rng = np.random.default_rng()
  b, t, heads = 3, 5, dict(config.model.heads)
  batch = {"features": {"rgb": rng.standard_normal((b, t, 16)).astype(np.float32)},
           "mask": np.ones((b, t), bool),
           "future_targets": {h: rng.integers(0, c, (b, 1)) for h, c in heads.items()},
           "past_targets": {h: rng.integers(-1, c, (b, t)) for h, c in heads.items()}}
  tx, _ = train_lib.make_optimizer(config.optimizer, steps_per_epoch=2, total_steps=10)
  state = jax.jit(functools.partial(train_lib.create_train_state, _Linear(heads), tx, batch))(
      jax.random.key(0))
  step = jax.jit(functools.partial(train_lib.train_step, loss_config=config.loss))
  key = jax.random.key(1)
  initial = state.params
  for _ in range(2):  # the first has the warm-up's learning rate 0
    state, metrics = step(state, batch, key)
    assert metrics["finite"]
  assert int(state.step) == 2
  assert all(np.any(a != b) for a, b in zip(jax.tree.leaves(state.params),
                                            jax.tree.leaves(initial)))
  for bad in (np.inf, np.nan):
    batch["features"]["rgb"][1, -1, 3] = bad
    new, metrics = step(state, batch, key)
    assert not metrics["finite"] and int(new.step) == int(state.step) + 1
    for a, b in zip(jax.tree.leaves((new.params, new.opt_state)),
                    jax.tree.leaves((state.params, state.opt_state))):
      np.testing.assert_array_equal(a, b)
