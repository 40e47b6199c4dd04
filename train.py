"""Trains CLAM on the dataset of a config, evaluating and checkpointing under a workdir.

Usage:
  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/ek100.py --workdir runs/ek100 --config.optimizer.lr=1e-4

--config is a Python file whose get_config() returns an ml_collections ConfigDict (configs/*.py);
any of its fields can be overridden with --config.<field>=<value>, e.g. --config.data.batch_size=64
or --config.model.d_model=512. Rerunning with the same --workdir resumes from its latest checkpoint
(same step, same next batch), also after a kill; a second train.py on a workdir in use exits with an
error. The workdir gets: config.json, checkpoints/ (the latest and the best by
config.eval.best_metric), metrics.jsonl, TensorBoard event files (tensorboard --logdir WORKDIR) and
training_curves.png. Evaluate afterwards with evaluate.py.

A NaN or Inf loss or gradient stops the run with exit status 1, naming the step and its batch's
sample ids; the checkpoints hold only earlier steps. --config.train.on_nonfinite=skip skips such
steps instead (logged as warnings and as train/skipped_steps). An example that cannot be read
(missing or malformed file, LMDB key or value; arrays shaped unlike the others) stops it with exit
status 1 and one line naming the example, the file/key/field and the latest checkpoint, which a
rerun resumes from; --verbosity=1 adds the traceback.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from clam_jax import train_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py); override fields with --config.<field>=<value>.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for checkpoints, metrics and plots; resumed if it has checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  train_lib.run_command(argv, lambda: train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main, flags_parser=train_lib.parse_flags)
