"""Checkpoints of a training run: Orbax CheckpointManager in workdir/checkpoints.

Each step directory holds three items:
    params     the model parameters (StandardSave: any pytree of arrays, sharding kept)
    opt_state  the optimizer state
    data       the grain iterator state, so a resumed run sees the batches it would have seen
The manager keeps the latest step and the `keep` best steps by an evaluation metric. Before anything
is restored, the checkpoint's parameter shapes are compared with the model's, so a workdir written
by another config fails with one line naming the first parameter that differs.

A killed run loses at most the steps since its last checkpoint. Orbax writes each step into
<step>.orbax-checkpoint-tmp and renames it when complete, so a kill during a write leaves the
previous checkpoints readable and a temporary folder that the next training run's manager deletes.
Only one process at a time may train in a workdir (`workdir_lock`).
"""

import contextlib
import fcntl
import json
import os

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

CONFIG_FILE = "config.json"


class CheckpointMismatchError(ValueError):
  """The checkpoints in a workdir do not fit the model the config describes."""


class WorkdirBusyError(RuntimeError):
  """Another process is training in the workdir."""


@contextlib.contextmanager
def workdir_lock(workdir):
  """Holds an exclusive lock on workdir (created if absent) for the duration of a with-block.

  Raises WorkdirBusyError at once if another process holds it. The lock is flock(2) on the folder
  itself, so there is no lock file to go stale: the kernel releases it when its holder exits, even
  by SIGKILL. flock is not reliable on network file systems.
  """
  os.makedirs(workdir, exist_ok=True)
  fd = os.open(workdir, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise WorkdirBusyError(
        f"{os.path.abspath(workdir)} is in use by another training process; wait for it to "
        f"finish, or give this run another --workdir") from None
  try:
    yield
  finally:
    os.close(fd)


def checkpoint_manager(workdir, *, best_metric, best_mode="max", keep=1, create=True):
  """The run's CheckpointManager over workdir/checkpoints.

  best_metric: key of the metrics dict given to `save` that ranks checkpoints; best_mode: "max"
  (higher is better) or "min"; keep: how many best checkpoints survive besides the latest one.
  create: False to read an existing run (evaluation): the folder must exist. A manager deletes
  checkpoints only when it saves, so one that never saves leaves them as they are. A manager with
  create=True (a training run, which holds `workdir_lock`) deletes the temporary folders of writes
  that a killed run left unfinished; evaluation must not, as they may be a live run's.
  """
  if best_mode not in ("max", "min"):
    raise ValueError(f"best_mode must be 'max' or 'min'; got {best_mode!r}")
  sign = 1.0 if best_mode == "max" else -1.0
  best_fn = lambda metrics: sign * metrics[best_metric]
  options = ocp.CheckpointManagerOptions(
      best_fn=best_fn, best_mode="max", create=create, cleanup_tmp_directories=create,
      preservation_policy=checkpoint_managers.AnyPreservationPolicy([
          checkpoint_managers.LatestN(n=1),
          checkpoint_managers.BestN(get_metric_fn=best_fn, n=keep,
                                    keep_checkpoints_without_metrics=False),
      ]))
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")), options=options,
      item_handlers={"params": ocp.StandardCheckpointHandler(),
                     "opt_state": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler()})


def save(manager, step, state, data_iterator, metrics=None):
  """Saves state.params, state.opt_state and the grain iterator position at `step` (async).

  metrics: {name: float} with the manager's best_metric, or None for a checkpoint that only serves
  resumption (it is deleted once a newer one exists).
  """
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      opt_state=ocp.args.StandardSave(state.opt_state),
      data=grain.checkpoint.CheckpointSave(data_iterator)), metrics=metrics)


def check_params(manager, step, abstract_params, config):
  """Raises CheckpointMismatchError unless checkpoint `step` has the params' paths and shapes.

  abstract_params: pytree of arrays or jax.ShapeDtypeStruct (e.g. train_lib.param_shapes);
  config: the run's config, whose model fields that differ from workdir/config.json are named in
  the error.
  """
  directory = manager.directory / str(step)
  try:
    saved = manager.item_metadata(step)["params"]
  except (KeyError, FileNotFoundError, ValueError) as e:
    raise CheckpointMismatchError(f"{directory} holds no readable params item ({e})") from None
  saved = dict(_shapes(getattr(saved, "tree", saved)))
  wanted = dict(_shapes(abstract_params))
  for path in sorted(saved.keys() | wanted.keys()):
    if saved.get(path) != wanted.get(path):
      differences = config_differences(manager.directory.parent, config)
      raise CheckpointMismatchError(
          f"{directory} was written by another model: params/{path} is "
          f"{saved.get(path, 'absent')} there but {wanted.get(path, 'absent')} in this config"
          + (f" (config changes: {', '.join(differences)})" if differences else ""))


def _shapes(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return [("/".join(str(getattr(k, "key", k)) for k in path), tuple(leaf.shape))
          for path, leaf in leaves]


def restore(manager, step, abstract_state, data_iterator=None):
  """Restores params and opt_state (and, in place, the iterator position) of checkpoint `step`.

  abstract_state: a TrainState of jax.ShapeDtypeStruct with the target shardings. Returns the
  restored TrainState at that step.
  """
  args = {"params": ocp.args.StandardRestore(abstract_state.params),
          "opt_state": ocp.args.StandardRestore(abstract_state.opt_state)}
  if data_iterator is not None:
    args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  return abstract_state.replace(step=step, params=restored["params"],
                                opt_state=restored["opt_state"])


def restore_params(manager, step, abstract_params):
  """The params of checkpoint `step`, placed as abstract_params' shardings say."""
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params)))
  return restored["params"]


def write_config(workdir, config):
  """Writes the run's config to workdir/config.json (read back by `config_differences`)."""
  write_atomically(os.path.join(workdir, CONFIG_FILE),
                   config.to_json_best_effort(indent=2, sort_keys=True))


def write_atomically(path, text):
  """Writes text to path through a temporary file and a rename: a kill leaves the old file or the
  new one, never a part."""
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def config_differences(workdir, config, section="model"):
  """Fields of config[section] that differ from workdir/config.json: ["d_model: 64 -> 32", ...].

  Empty when the file is absent. Values are compared after a JSON round trip (tuples as lists).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    saved = _flatten(json.load(f).get(section, {}))
  current = _flatten(json.loads(config[section].to_json_best_effort()))
  return [f"{section}.{key}: {saved.get(key, 'absent')} -> {current.get(key, 'absent')}"
          for key in sorted(saved.keys() | current.keys()) if saved.get(key) != current.get(key)]


def _flatten(tree, prefix=""):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat
