"""Evaluates a trained CLAM checkpoint on the evaluation split of its config.

Usage:
  python evaluate.py --config configs/demo.py --workdir runs/demo [--checkpoint=last]

Restores the best checkpoint of WORKDIR/checkpoints (by config.eval.best_metric; --checkpoint=last
for the latest, or a step number), runs config.eval.split and writes WORKDIR/eval/: metrics.json,
metrics.md (also printed), predictions.npz (the scores and labels the metrics were computed from)
and, for EK100 and the synthetic demo, per_class_recall.png. The metrics are the dataset's own
(train_lib.compute_metrics): EK100 class-mean top-5 recall, THUMOS'14 per-frame mAP / mcAP of
detection and anticipation, Ego4D edit distance @ 20. The config must describe the model that
wrote the checkpoint; a mismatch is reported with the parameter and config fields that differ,
and nothing is written. These and data errors (an example that cannot be read: the file/key/field
is named) exit with status 1 and one line; --verbosity=1 adds the traceback.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from clam_jax import train_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file the run was trained with; fields overridable as in train.py.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "best", "'best' (by config.eval.best_metric), 'last', or a step number.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every checkpoint operation at INFO; --verbosity=0 brings that back.
    logging.set_verbosity(logging.WARNING)
  try:
    report = train_lib.evaluate(_CONFIG.value, _WORKDIR.value, checkpoint=_CHECKPOINT.value)
  except train_lib.USER_ERRORS as e:
    logging.debug("traceback of the error:", exc_info=True)  # shown with --verbosity=1
    sys.exit(f"evaluate.py: error: {e}")
  print(report["markdown"])


if __name__ == "__main__":
  app.run(main, flags_parser=train_lib.parse_flags)
