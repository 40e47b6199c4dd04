"""Where a batch-1 streaming step spends its GPU time: per-kernel device time from a profiler trace.

Usage (GPU):  python benchmarks/stream_kernels.py [--out benchmarks/results/stream_kernels.json]
              JAX_PLATFORMS=cpu python benchmarks/stream_kernels.py --quick   (CPU: no kernels
              in the trace, so it reports that and exits 1; checks the script runs)

For the EK100 model (random params) at batch 1, each step variant of replay.make_streamer ("bf16":
stream_step on prepare_stream_params(cast=True), XLA's kernels; "fused": fused_streaming's Pallas
kernels, the processor's and the memory's side by side in shared launches), and "fused_serial"
(the same kernels each launched alone: side_by_side=False) runs a lax.scan of --steps frames once to compile, then once under jax.profiler.trace.
From the trace's GPU events (perfetto JSON) it reports per frame: the wall time of the traced call, the summed
kernel time (busy) and the rest (idle: launch gaps, the loop's own synchronisation), and every
kernel name with its launches and microseconds, and the kernel time that ran concurrently with
other kernels (summed durations minus the time covered by at least one kernel). The Pallas
kernels are named by shape (fused_dense_r<rows>_k<K>_n<N>_b<block_n>x<block_k>_w<warps>...,
mamba_in_conv_c<block_c>_w<warps>, ...; a shared launch joins its kernels' names with "_with_"),
so each layer's cost can be read off.

Prints a table per variant (top kernels) and writes every row to --out (JSON).
"""

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from clam_jax import fused_streaming  # noqa: E402
from clam_jax import model as model_lib  # noqa: E402
from clam_jax import replay  # noqa: E402
from clam_jax import streaming  # noqa: E402
from configs import ek100  # noqa: E402


def trace_events(log_dir):
  """The perfetto trace's complete events ("ph" == "X") on GPU processes, or [] if none."""
  path = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  gpus = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
          and "GPU" in e.get("args", {}).get("name", "")}
  return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpus]


def profile(name, run, steps):
  """{variant, wall_us, busy_us, idle_us per frame, kernels: [(name, launches, us) per frame]}."""
  jax.block_until_ready(run())  # compile and warm up
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      start = time.perf_counter()
      jax.block_until_ready(run())
      wall = time.perf_counter() - start
    events = trace_events(log_dir)
  by_kernel = collections.defaultdict(lambda: [0, 0.0])
  for e in events:
    by_kernel[e["name"]][0] += 1
    by_kernel[e["name"]][1] += float(e.get("dur", 0.0))
  kernels = sorted(((k, n / steps, us / steps) for k, (n, us) in by_kernel.items()),
                   key=lambda row: -row[2])
  busy = sum(us for _, _, us in kernels)
  wall_us = 1e6 * wall / steps
  return dict(variant=name, wall_us=wall_us, busy_us=busy, idle_us=wall_us - busy,
              concurrent_us=(busy - covered_us(events) / steps),
              launches=sum(n for _, n, _ in kernels), kernels=kernels)


def covered_us(events):
  """Microseconds during which at least one of the events ran (their intervals' union)."""
  total, end = 0.0, float("-inf")
  for start, stop in sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
                            for e in events):
    total += max(0.0, stop - max(start, end))
    end = max(end, stop)
  return total


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=64, help="frames in the traced scan")
  parser.add_argument("--quick", action="store_true", help="D = 64, one layer each, float32")
  parser.add_argument("--out", help="JSON path (default benchmarks/results/stream_kernels.json)")
  args = parser.parse_args()
  out_path = Path(args.out or Path(__file__).parent / "results" / "stream_kernels.json")
  config = ek100.get_config().model
  if args.quick:
    config.update(d_model=64, processor_layers=1, memory_layers=1, predictor_layers=1,
                  dtype="float32")
  key = jax.random.key(0, impl="rbg")
  frames = {name: jax.random.normal(jax.random.fold_in(key, i), (args.steps, 1, dim))
            for i, (name, dim) in enumerate(sorted(config.modalities.items()))}
  params = jax.jit(lambda k: model_lib.CLAM(config).init(
      k, jax.tree.map(lambda x: x[:2, 0][None], frames), jnp.ones((1, 2), bool),
      train=False)["params"])(key)
  rows = []
  streamers = {"bf16": replay.make_streamer(config, params, "xla"),
               "fused": replay.make_streamer(config, params, "fused")}
  streamers["fused_serial"] = (streamers["fused"][0], jax.jit(
      fused_streaming.make_fused_stream_step(config, side_by_side=False), donate_argnums=1))
  for name, (prepared, step) in streamers.items():
    scan = jax.jit(lambda p, s, f, step=step: jax.lax.scan(lambda c, x: step(p, c, x), s, f))
    state = streaming.init_stream_state(config, 1)
    try:
      rows.append(profile(name, lambda: scan(prepared, state, frames), args.steps))
    except Exception as e:  # e.g. a Pallas kernel Triton rejects on this GPU: reported, not fatal
      rows.append(dict(variant=name, error=f"{type(e).__name__}: {e}"[:500]))
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(json.dumps(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                                      steps=args.steps, rows=rows), indent=1))
  for row in rows:
    if "error" in row:
      print(f"\n== {row['variant']}: failed: {row['error']}")
      continue
    print(f"\n== {row['variant']}: per frame wall {row['wall_us']:.1f} us = kernels busy "
          f"{row['busy_us']:.1f} us ({row['launches']:.0f} launches) + idle {row['idle_us']:.1f} us"
          f"; {row['concurrent_us']:.1f} us of it concurrent with other kernels; "
          f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    for kernel, launches, us in row["kernels"][:25]:
      print(f"  {us:8.2f} us  {launches:5.1f} x  {kernel[:90]}")
  if not any(row.get("kernels") for row in rows):
    print("no GPU kernel events in the trace (CPU backend, or the profiler found no CUPTI)")
    sys.exit(1)


if __name__ == "__main__":
  main()
