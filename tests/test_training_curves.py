"""training_curves.png: the evaluation axis is labelled with the dataset's own metric."""

import json
import os

import numpy as np
import pytest

from clam_jax import train_lib


@pytest.mark.parametrize("data_name, metrics, label", [
    ("synthetic", ("overall/verb", "overall/action"), "class-mean top-5 recall (%)"),
    ("ek100", ("overall/action", "tail/action"), "class-mean top-5 recall (%)"),
    ("thumos14", ("map/detection", "mcap/anticipation"), "per-frame mAP / mcAP"),
    ("ego4d", ("edit_distance/verb", "edit_distance/action"),
     "edit distance @ Z = 20 (lower is better)"),
])
def test_evaluation_axis_names_the_plotted_metric(tmp_path, monkeypatch, data_name, metrics,
                                                  label):
  rng = np.random.default_rng(len(data_name))
  rows = [{"step": step, "train/loss": float(rng.random())} for step in range(1, 8)]
  rows += [{"step": step, **{f"eval/{m}": float(rng.random()) for m in metrics}}
           for step in (3, 7)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
  figures = []
  monkeypatch.setattr(train_lib.plt, "close", figures.append)  # keeps the figure to inspect
  path = train_lib.plot_training_curves(str(tmp_path), data_name)
  monkeypatch.undo()
  train_lib.plt.close(*figures)
  assert path == str(tmp_path / "training_curves.png") and os.path.getsize(path) > 0
  (left, right), = [figure.axes for figure in figures]
  assert right.get_ylabel() == label
  assert sorted(line.get_label() for line in right.get_lines()) == sorted(metrics)
  np.testing.assert_array_equal(right.get_lines()[0].get_xdata(), [3, 7])
  assert [line.get_label() for line in left.get_lines()] == ["loss"]
