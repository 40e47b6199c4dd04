"""Mixed precision on the demo: the same training run with config.model.dtype float32 and bfloat16,
and what it changes in the loss after a fixed number of steps.

Usage:
  python3 benchmarks/mixed_precision.py                  # GPU: the demo's whole schedule
  JAX_PLATFORMS=cpu python3 benchmarks/mixed_precision.py --quick

Trains configs/demo.py's model with its optimizer on its synthetic dataset (generated into a
temporary folder, read by the grain pipeline) for --steps steps, three times:
  float32           seed = config.seed
  bfloat16          the same seed: same initial params (float32 in both), data order and dropout
  float32, seed+1   the yardstick: how far the loss moves from the seed alone
and reports for each the final loss, the mean loss of the last 10 % of the steps, the validation
action class-mean top-5 recall (train_lib.predict / compute_metrics) and the median step time
(the demo is tiny: the speed-up that matters is benchmarks/train_throughput.py's at EK100 size).
The bfloat16 run also checks what stays float32 (dtypes found, by tracing): every parameter and
optimizer-state leaf, the processor's selective-scan states (B, [T,] D_inner, d_state), the memory's
per-layer state S_T (B, H, DK, DV) and the logits.
Prints a table last and writes --out (JSON).
"""

import argparse
import functools
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clam_jax import model as model_lib  # noqa: E402
from clam_jax import ssm  # noqa: E402
from clam_jax import train_lib  # noqa: E402
from clam_jax.data import pipeline  # noqa: E402
from configs import demo  # noqa: E402


def dtype_names(tree):
  return sorted({str(x.dtype) for x in jax.tree.leaves(tree) if hasattr(x, "dtype")})


def float32_checks(config, model, params, opt_state, batch):
  """{what: dtypes found} for the arrays mixed precision must keep in float32."""
  mc = config.model
  b, t = batch["mask"].shape
  d_inner, _ = ssm.mamba_dims(mc.d_model, mc.ssm.expand)
  dk = mc.d_model // mc.memory_heads
  memory = lambda m, features, mask: m.memory(m.project(features, train=False), mask,
                                              train=False)[1]
  forward = jax.make_jaxpr(lambda params, features, mask: model.apply(
      {"params": params}, features, mask, train=False))(params, batch["features"], batch["mask"])
  outputs = model.apply({"params": params}, batch["features"], batch["mask"], train=False)
  return {
      "params": dtype_names(params),
      "optimizer state": dtype_names([x for x in jax.tree.leaves(opt_state) if x.ndim]),
      # (B, T, Di, N) from the associative scan; (B, Di, N) and the chunk starts (B, T / chunk,
      # Di, N) from the Pallas kernels.
      f"processor scan states ({b}, [steps,] {d_inner}, {mc.ssm.d_state}) in the traced forward":
          sorted(set(re.findall(rf"(\w+)\[{b},(?:\d+,)?{d_inner},{mc.ssm.d_state}\]",
                                str(forward)))),
      f"memory state S_T ({b}, {mc.memory_heads}, {dk}, {dk})": dtype_names(model.apply(
          {"params": params}, batch["features"], batch["mask"], method=memory)),
      "logits": dtype_names(outputs),
  }


def train(config, steps, step_fn, predict_fn, parallel, seed):
  """steps optimizer steps from seed's init; returns (losses (steps,), final state, median s)."""
  model = model_lib.CLAM(config.model)
  source = pipeline.make_source(config.data, "train")
  tx, _ = train_lib.make_optimizer(config.optimizer, len(source) / config.data.batch_size, steps)
  init_rng, dropout_key = jax.random.split(jax.random.key(seed))
  state = jax.jit(functools.partial(train_lib.create_train_state, model, tx,
                                    train_lib.example_inputs(source)),
                  out_shardings=parallel.replicated)(init_rng)
  iterator = iter(pipeline.make_loader(config.data, "train", shuffle=True, num_epochs=None))
  metrics, times = [], []
  for _ in range(steps):
    batch = parallel.shard_batch(train_lib.model_inputs(next(iterator)))
    start = time.perf_counter()
    state, step_metrics = step_fn(state, batch, dropout_key)
    jax.block_until_ready(step_metrics)  # per-step times; the demo's steps are short anyway
    times.append(time.perf_counter() - start)
    metrics.append(step_metrics)
  losses = np.array([float(m["loss"]) for m in jax.device_get(metrics)])
  recall = train_lib.compute_metrics(config, train_lib.predict(
      config, state.params, parallel, predict_fn, config.eval.split))["overall/action"]
  return losses, state, statistics.median(times[1:]), recall


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=None,
                      help="optimizer steps per run (default: the demo's whole schedule; "
                           "--quick: 20)")
  parser.add_argument("--quick", action="store_true", help="20 steps, for a CPU")
  parser.add_argument("--out", default="benchmarks/results/mixed_precision.json")
  args = parser.parse_args()

  root = tempfile.mkdtemp(prefix="clam_demo_")
  try:
    base = demo.get_config()
    base.data.root = root
    source = pipeline.make_source(base.data, "train")  # writes the dataset
    base.model.heads = pipeline.head_sizes(base.data)  # as train_lib.prepare_data_config checks
    steps = args.steps or (20 if args.quick else int(
        len(source) * base.train.num_epochs // base.data.batch_size))
    parallel = train_lib.Parallel(jax.local_devices()[:1])
    runs, fns = [], {}
    for dtype, seed in (("float32", base.seed), ("bfloat16", base.seed),
                        ("float32", base.seed + 1)):
      config = base.copy_and_resolve_references()
      config.model.dtype = dtype
      if dtype not in fns:
        fns[dtype] = (parallel.train_step(config.loss),
                      parallel.predict_step(model_lib.CLAM(config.model)))
      losses, state, seconds, recall = train(config, steps, *fns[dtype], parallel, seed)
      tail = max(1, steps // 10)
      run = {"dtype": dtype, "seed": seed, "steps": steps, "final_loss": float(losses[-1]),
             "tail_mean_loss": float(losses[-tail:].mean()), "step_ms": 1e3 * seconds,
             "val_action_top5_recall": recall, "losses": losses.tolist()}
      if dtype == "bfloat16":
        batch = train_lib.model_inputs(next(iter(pipeline.make_loader(
            config.data, "train", shuffle=False, num_epochs=1))))
        run["float32_checks"] = float32_checks(config, model_lib.CLAM(config.model),
                                               state.params, state.opt_state, batch)
      print(json.dumps({k: v for k, v in run.items() if k != "losses"}), flush=True)
      runs.append(run)
  finally:
    shutil.rmtree(root, ignore_errors=True)

  f32, bf16, other_seed = runs
  summary = {key: {"bf16 - f32": bf16[key] - f32[key], "seed+1 - seed": other_seed[key] - f32[key]}
             for key in ("final_loss", "tail_mean_loss", "val_action_top5_recall")}
  results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "runs": runs,
             "differences": summary}
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=1))

  print(f"\n== demo, {steps} steps, {results['device']}, jax {results['jax']}")
  print("\n| run | final loss | mean loss, last 10 % | val action top-5 recall % | ms/step |")
  print("|---|---|---|---|---|")
  for run in runs:
    print(f"| {run['dtype']} seed {run['seed']} | {run['final_loss']:.4f} | "
          f"{run['tail_mean_loss']:.4f} | {run['val_action_top5_recall']:.2f} | "
          f"{run['step_ms']:.2f} |")
  for key, diff in summary.items():
    print(f"{key}: bf16 - f32 = {diff['bf16 - f32']:+.4f}; "
          f"seed+1 - seed (f32) = {diff['seed+1 - seed']:+.4f}")
  print("float32 checks of the bfloat16 run (dtypes found):")
  for what, dtypes in bf16["float32_checks"].items():
    print(f"  {what}: {', '.join(dtypes) or 'none found'}")
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
