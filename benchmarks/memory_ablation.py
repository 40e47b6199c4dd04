"""Does the CLAM memory matter? The demo (configs/demo.py) trained with the memory on and off.

    python benchmarks/memory_ablation.py [--workdir runs/memory_ablation] [--seed 0] [--quick]

Both variants run the README's commands with the same seed, data and number of steps; only
--config.model.memory differs:

    python train.py --config configs/demo.py --workdir WORKDIR/<variant> \
        --config.data.root=WORKDIR/data --config.seed=SEED [--config.model.memory=False]
    python evaluate.py (same flags) --checkpoint=last

From WORKDIR/<variant>/eval/{metrics.json, predictions.npz} it reports the class-mean top-5 recall
(verb, noun, action; the EK100 metric, in %), the action top-1 accuracy over all validation
segments and per episode step (the items that only the recipe card announces: from step 2 on the
card is older than the 4 act-tokens the predictor sees), next to the Bayes-optimal numbers of the
data with and without the card (synthetic.json; dropped segments count as misses everywhere).
Writes --out (JSON) and the same path with .md (markdown), and prints the table last. --quick runs
1 epoch on 16 videos to check the script (< 1 min; its numbers mean nothing). Runs on the CPU in a
few minutes; an existing WORKDIR/<variant> is resumed (or reused when finished), so give a fresh
--workdir after changing the config.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from clam_jax.data import ek100  # noqa: E402  (after the repository is on the path)
from clam_jax.data import synthetic  # noqa: E402

VARIANTS = {"memory on (CLAM)": [], "memory off": ["--config.model.memory=False"]}
QUICK = ["--config.train.num_epochs=1", "--config.data.synthetic.num_videos=16",
         "--config.data.synthetic.num_validation_videos=4"]


def run(script, flags):
  """Runs `python script flags` in the repository; its output streams through."""
  command = [sys.executable, script, "--config", "configs/demo.py", *flags]
  print("$", " ".join(command), flush=True)
  subprocess.run(command, cwd=REPO, check=True)
  return " ".join(["python", script, "--config", "configs/demo.py", *flags])


def top1_by_verb(predictions, verbs):
  """Action top-1 accuracy (%) over all rows and over the rows of each verb (episode position)."""
  hits = predictions["scores/action"].argmax(1) == predictions["labels/action"]
  by_verb = {name: 100.0 * hits[predictions["labels/verb"] == v].mean()
             for v, name in enumerate(verbs)}
  return 100.0 * hits.mean(), by_verb


def bayes_by_verb(predictions, verbs, params):
  """Top-1 accuracy (%) per verb of the Bayes predictors with and without the card (as
  synthetic._bayes: cue exact, steps 1 / step_variants, finale 1 / num_recipes without it)."""
  guess = {0: 1.0, len(verbs) - 1: 1.0 / params["num_recipes"]}
  rows = {"with": {}, "without": {}}
  for v, name in enumerate(verbs):
    observed = predictions["observed"][predictions["labels/verb"] == v]
    rows["with"][name] = 100.0 * observed.mean()
    rows["without"][name] = 100.0 * observed.mean() * guess.get(v, 1.0 / params["step_variants"])
  return rows


def markdown(results, steps):
  columns = ["verb top-5", "noun top-5", "action top-5", "action top-1", *steps]
  lines = ["| demo, validation | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for name, row in results["rows"].items():
    lines.append(f"| {name} | " + " | ".join("" if row.get(c) is None else f"{row[c]:.1f}"
                                             for c in columns) + " |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "memory_ablation"),
                      help="runs go to WORKDIR/<variant>, the data to WORKDIR/data")
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results",
                                                    "memory_ablation.json"))
  parser.add_argument("--seed", type=int, default=0,
                      help="config.seed: model initialisation and dropout (the data stay the same)")
  parser.add_argument("--quick", action="store_true", help="1 epoch on 16 videos (a smoke test)")
  args = parser.parse_args()

  workdir = os.path.abspath(args.workdir)
  data_root = os.path.join(workdir, "data")
  results = {"config": "configs/demo.py", "seed": args.seed, "quick": args.quick, "commands": [],
             "rows": {}, "wall_seconds": {}}
  for name, flags in VARIANTS.items():
    run_dir = os.path.join(workdir, "memory_" + ("off" if flags else "on"))
    flags = [f"--workdir={run_dir}", f"--config.data.root={data_root}",
             f"--config.seed={args.seed}", *flags, *(QUICK if args.quick else [])]
    start = time.perf_counter()
    results["commands"].append(run("train.py", flags))
    results["commands"].append(run("evaluate.py", [*flags, "--checkpoint=last"]))
    results["wall_seconds"][name] = time.perf_counter() - start
    with open(os.path.join(run_dir, "eval", "metrics.json")) as f:
      report = json.load(f)
    predictions = dict(np.load(os.path.join(run_dir, "eval", "predictions.npz")))
    verbs = ek100.load_class_names(synthetic.annotation_paths(data_root)["verb_classes"])
    top1, by_verb = top1_by_verb(predictions, verbs)
    results["rows"][name] = {
        "step": report["step"], **{f"{h} top-5": report["metrics"][f"overall/{h}"]
                                   for h in ("verb", "noun", "action")},
        "action top-1": top1, **by_verb}

  with open(os.path.join(data_root, "synthetic.json")) as f:
    info = json.load(f)
  bayes = bayes_by_verb(predictions, verbs, info["params"])
  for known in ("with", "without"):
    results["rows"][f"Bayes, {known} the card"] = {
        "action top-5": 100.0 * info["bayes"][f"mean_top5_recall_{known}_cue"],
        "action top-1": 100.0 * info["bayes"][f"top1_{known}_cue"], **bayes[known]}
  steps = [v for v in verbs if v.startswith("do")]
  results["markdown"] = markdown(results, steps)

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
    f.write(results["markdown"] + "\n")
  print(f"\nwrote {args.out}; class-mean top-5 recall and action top-1 accuracy (%), "
        f"do0..do{len(steps) - 1}: action top-1 of each step (seed {args.seed})")
  print(results["markdown"])


if __name__ == "__main__":
  main()
