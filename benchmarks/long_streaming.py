"""Long streaming: 100,000 stream_step calls of the EK100 model on one stream; does anything grow?

Usage (GPU):  python benchmarks/long_streaming.py [--out benchmarks/results/long_streaming.json]
              JAX_PLATFORMS=cpu python benchmarks/long_streaming.py --quick   (CPU, tiny model)

The EK100 model (configs/ek100.py: D = 1024, bfloat16 compute, float32 params and state) with its
init params, at batch 1, fed standard-normal frames drawn on the device (--quick: D = 64, one layer
per stack, float32, 2,000 frames). The stream advances in chunks of CHUNK frames: one jitted call
runs lax.scan of stream_step over the chunk with the state donated, so the device holds one state
however long the stream runs. After every chunk it records
  t                  frames seen
  bytes_in_use       the device's memory in use (memory_stats(); None on CPU) and its peak
  max_abs            max |x| of each part of the state (processor, memory, act_tokens) at t
  finite             state and every output of the chunk free of NaN/Inf
  ms_per_frame       wall time of the chunk / CHUNK (the first chunk includes the compile)
Summary: memory growth from the end of the first chunk to the end (bytes), all finite, and, per
state part, max |x| at the end over its maximum over the first 10 % of the stream (a bounded
state stays near 1; one that drifts grows with t). Writes every chunk to --out (JSON) and prints a
table of selected t last.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clam_jax import model as model_lib  # noqa: E402
from clam_jax import streaming  # noqa: E402
from benchmarks.streaming import model_config  # noqa: E402  (the same model as streaming.py)

PARTS = ("processor", "memory", "act_tokens")


def make_advance(config, chunk):
  """jit of (params, state, key) -> (state after `chunk` more frames, {"max_abs": {part: ()},
  "finite": ()}), the state donated; the frames are drawn from key on the device."""
  step = streaming.make_stream_step(config)

  def advance(params, state, key):
    keys = jax.random.split(key, len(config.modalities))
    frames = {name: jax.random.normal(k, (chunk, 1, dim))
              for k, (name, dim) in zip(keys, sorted(config.modalities.items()))}

    def body(state, frame):
      state, out = step(params, state, frame)
      return state, jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(out)]))

    state, outputs_finite = jax.lax.scan(body, state, frames)
    tracked = {part: state[part] for part in PARTS}
    max_abs = {part: jnp.max(jnp.stack([jnp.abs(x).max() for x in jax.tree.leaves(tree)]))
               for part, tree in tracked.items() if jax.tree.leaves(tree)}
    finite = jnp.all(outputs_finite) & jnp.all(jnp.stack(
        [jnp.isfinite(x).all() for x in jax.tree.leaves(tracked)]))
    return state, {"max_abs": max_abs, "finite": finite}

  return jax.jit(advance, donate_argnums=1)


def device_memory():
  stats = jax.devices()[0].memory_stats() or {}
  return {key: stats.get(key) for key in ("bytes_in_use", "peak_bytes_in_use")}


def summarize(rows):
  """Memory growth, finiteness and the bounded-state ratios of the chunk rows (module doc)."""
  early = [r for r in rows if r["t"] <= rows[-1]["t"] // 10] or rows[:1]
  in_use = [r["bytes_in_use"] for r in rows]
  return {
      "memory_growth_bytes": None if in_use[0] is None else in_use[-1] - in_use[0],
      "all_finite": all(r["finite"] for r in rows),
      "max_abs_end_over_first_10pct": {
          part: rows[-1]["max_abs"][part] / max(r["max_abs"][part] for r in early)
          for part in rows[-1]["max_abs"]},
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="a tiny model and 2,000 frames: a CPU check in < 1 min")
  parser.add_argument("--out", help="JSON path (default "
                      "benchmarks/results/long_streaming[_quick].json)")
  args = parser.parse_args()
  out_path = Path(args.out or Path(__file__).parent / "results" /
                  f"long_streaming{'_quick' if args.quick else ''}.json")
  out_path.parent.mkdir(parents=True, exist_ok=True)
  steps, chunk = (2_000, 200) if args.quick else (100_000, 1_000)
  config = model_config(args.quick)
  start = time.perf_counter()
  # XLA's own generator: the params' init compiles in half the time of threefry's.
  init_key, frames_key = jax.random.split(jax.random.key(time.time_ns() % 2**31, impl="rbg"))
  example = {name: jnp.zeros((1, 2, dim)) for name, dim in config.modalities.items()}
  params = jax.jit(lambda k: model_lib.CLAM(config).init(
      k, example, jnp.ones((1, 2), bool), train=False)["params"])(init_key)
  advance = make_advance(config, chunk)
  state = streaming.init_stream_state(config, 1)
  state_bytes = int(sum(x.nbytes for x in jax.tree.leaves(state)))
  rows = []
  for i in range(steps // chunk):
    chunk_start = time.perf_counter()
    state, stats = jax.block_until_ready(advance(params, state, jax.random.fold_in(frames_key, i)))
    ms_per_frame = 1e3 * (time.perf_counter() - chunk_start) / chunk
    stats = jax.device_get(stats)
    rows.append(dict(t=(i + 1) * chunk, **device_memory(), finite=bool(stats["finite"]),
                     max_abs={part: float(v) for part, v in stats["max_abs"].items()},
                     ms_per_frame=ms_per_frame))
  results = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                 jax=jax.__version__, quick=args.quick, config=config.to_dict(), steps=steps,
                 chunk=chunk, state_bytes=state_bytes,
                 params_bytes=int(sum(p.nbytes for p in jax.tree.leaves(params))),
                 elapsed_s=time.perf_counter() - start, summary=summarize(rows), rows=rows)
  out_path.write_text(json.dumps(results, indent=1))
  print_table(results, out_path)


def print_table(results, out_path):
  mib = lambda x: "-" if x is None else f"{x / 2**20:.2f}"
  rows, summary = results["rows"], results["summary"]
  shown = {1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, rows[0]["t"], rows[-1]["t"]}
  parts = list(rows[-1]["max_abs"])
  print(f"\n== long streaming, {results['device']}, jax {results['jax']}, EK100 model"
        f"{' (quick: tiny)' if results['quick'] else ''}, batch 1, {results['steps']} frames in "
        f"scans of {results['chunk']}; state {mib(results['state_bytes'])} MiB, params "
        f"{mib(results['params_bytes'])} MiB; {out_path}")
  print(f"{'t':>7s} {'in use MiB':>11s} {'peak MiB':>9s} {'finite':>6s} {'ms/frame':>9s} "
        + " ".join(f"{'max|' + p + '|':>14s}" for p in parts))
  for r in rows:
    if r["t"] in shown:
      print(f"{r['t']:7d} {mib(r['bytes_in_use']):>11s} {mib(r['peak_bytes_in_use']):>9s} "
            f"{str(r['finite']):>6s} {r['ms_per_frame']:9.4f} "
            + " ".join(f"{r['max_abs'][p]:14.4g}" for p in parts))
  growth = summary["memory_growth_bytes"]
  print(f"memory growth after the first chunk: {'-' if growth is None else f'{growth} bytes'}; "
        f"all finite: {summary['all_finite']}; max|x| at the end / over the first 10 %: "
        + ", ".join(f"{p} {v:.3f}" for p, v in summary["max_abs_end_over_first_10pct"].items()))


if __name__ == "__main__":
  main()
