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

from absl import app

from clam_jax import train_lib

_CONFIG, _WORKDIR, _CHECKPOINT = train_lib.define_saved_run_flags()


def main(argv):
  report = train_lib.run_command(argv, lambda: train_lib.evaluate(
      _CONFIG.value, _WORKDIR.value, checkpoint=_CHECKPOINT.value))
  print(report["markdown"])


if __name__ == "__main__":
  app.run(main, flags_parser=train_lib.parse_flags)
