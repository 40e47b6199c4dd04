"""Length scaling: forward+backward time and peak device memory against T, CLAM vs softmax.

Usage (GPU):  python benchmarks/length_scaling.py [--out benchmarks/results/length_scaling.json]
              python benchmarks/length_scaling.py --quick   (CPU, tiny model: a check of the script;
                  minutes, nearly all of it XLA compiling the model on the CPU)
Prediction:   JAX_PLATFORMS=cpu python benchmarks/length_scaling.py --compile-only
                  --scan-impl chunked --methods clam --lengths 65536      (one command line)
              compiled bytes, nothing run; the CPU's buffer assignment, which may keep more
              alive at once than the GPU's.

Batch 1, T = 128, 256, ..., 65,536 frames (--quick: a tiny model, T = 256, 1024), the EK100 model
config (configs/ek100.py: D = 1024, 4 Mamba layers, memory on, bfloat16). Methods:
  clam           the whole model: value_and_grad of train_lib.compute_loss (dropout on)
  clam-softmax   the same model with each memory layer's cross linear attention replaced by softmax
                 cross-attention of the M memory tokens over the T frames (same width: H heads of
                 D / H). It computes what CLAM's training forward computes, the memory read at the
                 last step only, so it is linear in T too
  processor      the processor alone (x -> act-tokens), gradients of params and x
  memory         the CLAM memory alone (x -> memory tokens at step T), gradients of params and x
  steps-linear   the memory's cross-attention op with a read-out at every step, as streaming emits
                 it: pallas.gated_linear_attention, M queries per step (what the memory would cost
                 if every step's memory tokens were supervised); O(T)
  steps-softmax  the same per-step read-outs by causal softmax attention (query (t, m) sees frames
                 <= t; jax.nn.dot_product_attention, XLA: materialises the T x T scores); O(T^2)
  steps-flash    as steps-softmax with cuDNN flash attention (GPU only): O(T) memory, O(T^2) time
Each method runs in two fresh processes sharing a persistent compilation cache: the first compiles
every length at once in threads (compile time and compiled memory_analysis recorded), the second
loads them from the cache and runs the lengths in increasing order, so the device's running
peak_bytes_in_use (it never resets) after length T is the peak at T and holds no compiler
buffers. Per length: a warm-up call, then the median of up to --repeats timed calls
(jax.block_until_ready). A RESOURCE_EXHAUSTED failure is recorded as "OOM" and the method's longer
lengths as "skipped". Workers get XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 unless it is set, so OOM
means the card's memory, not JAX's default 75 % pool.

Writes rows + log-log slopes to --out (JSON) and a log-log plot next to it (.png); prints a table
last. The slope is fitted over the 4 longest lengths that ran: ~1 for linear methods, ~2 quadratic.
On a GPU, scan_impl "auto" takes the chunked Pallas kernel; on the CPU the lax.scan reference,
whose backward keeps every state (--scan-impl chunked approximates the GPU's compiled bytes).
"""

import argparse
import concurrent.futures
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pallas  # noqa: E402
from clam_jax import clam as clam_lib  # noqa: E402
from clam_jax import model as model_lib  # noqa: E402
from clam_jax import train_lib  # noqa: E402
from clam_jax.processor import Processor  # noqa: E402
from configs import ek100  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

METHODS = ("clam", "clam-softmax", "processor", "memory", "steps-linear", "steps-softmax",
           "steps-flash")
MODEL_METHODS = METHODS[:4]
LENGTHS = tuple(2 ** i for i in range(7, 17))    # 128 ... 65,536
QUICK_LENGTHS = (256, 1024)
SLOPE_POINTS = 4
TIME_BUDGET_S = 3.0  # per length, after the warm-up; at least 3 timed calls
COMPILE_THREADS = max(1, min(len(LENGTHS), (os.cpu_count() or 2) // 2))


def model_config(quick, scan_impl):
  """configs/ek100.py's model config; quick: a tiny model of the same structure."""
  config = ek100.get_config()
  if quick:
    # One layer of each kind: on a CPU the compile, not the run, is what takes the time.
    config.model.update(dict(modalities={"rgb": 64}, d_model=64, processor_layers=1,
                             memory_layers=1, memory_heads=4, memory_tokens=8, predictor_layers=1,
                             predictor_heads=4, num_act_tokens=8,
                             heads={"verb": 8, "noun": 21, "action": 33}))
  config.model.scan_impl = scan_impl
  return config


def loglog_slope(lengths, values, points=SLOPE_POINTS):
  """Least-squares slope of log(value) against log(length) over the `points` longest lengths
  whose value is a positive finite number; None with fewer than 2 such lengths.

  lengths, values: equal-length sequences (values may hold None or NaN for lengths that failed).
  """
  pairs = sorted((t, v) for t, v in zip(lengths, values)
                 if v is not None and np.isfinite(v) and v > 0)[-points:]
  if len(pairs) < 2:
    return None
  t, v = np.log(np.asarray(pairs, np.float64)).T
  return float(np.polyfit(t, v, 1)[0])


class SoftmaxCrossAttention(nn.Module):
  """Drop-in for clam.CrossLinearAttention: softmax attention of the tokens over all frames."""
  config: object

  @nn.compact
  def __call__(self, tokens, frames, mask, state, projections=None):
    """tokens: (B, M, D); frames: (B, T, D); mask: (B, T) bool; state passes through;
    projections (streaming's merged products) must be empty. Returns ((B, M, D), state)."""
    if projections:
      raise ValueError("the softmax memory takes no precomputed projections")
    attention = nn.MultiHeadDotProductAttention(
        self.config.memory_heads, dtype=jnp.dtype(self.config.dtype), name="attention")
    return attention(tokens, frames, mask=mask[:, None, None, :]), state


def _normal(key, shape, dtype):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _square_mean(x):
  return jnp.mean(jnp.square(x.astype(jnp.float32)))


def model_problem(config, method, key):
  """(fn, make_args) for a model method: fn = jit(value_and_grad(loss)), make_args(T) -> args."""
  mc = config.model
  dtype = jnp.dtype(mc.dtype)
  init_key, data_key = jax.random.split(key)
  mask = lambda t: jnp.ones((1, t), bool)
  if method in ("clam", "clam-softmax"):
    model = model_lib.CLAM(mc)

    def batch(t):
      keys = iter(jax.random.split(jax.random.fold_in(data_key, t), 2 * len(mc.heads) + 1))
      return {"features": {name: _normal(next(keys), (1, t, dim), jnp.float32)
                           for name, dim in mc.modalities.items()},
              "mask": mask(t),
              "future_targets": {h: jax.random.randint(next(keys), (1, mc.future_queries), 0, c)
                                 for h, c in mc.heads.items()},
              "past_targets": {h: jax.random.randint(next(keys), (1, t), 0, c)
                               for h, c in mc.heads.items()}}

    example = batch(mc.num_act_tokens)
    params = model.init(init_key, example["features"], example["mask"], train=False)["params"]

    def loss(params, batch, dropout_key):
      out = model.apply({"params": params}, batch["features"], batch["mask"], train=True,
                        rngs={"dropout": dropout_key})
      return train_lib.compute_loss(out, batch, config.loss)[0]

    return (jax.jit(jax.value_and_grad(loss)),
            lambda t: (params, batch(t), jax.random.fold_in(key, t)))

  module = Processor(mc) if method == "processor" else clam_lib.CLAMMemory(mc)
  x = lambda t: _normal(jax.random.fold_in(data_key, t), (1, t, mc.d_model), dtype)
  params = module.init(init_key, x(8), mask(8), train=False)["params"]

  def loss(params, x, mask, dropout_key):
    out = module.apply({"params": params}, x, mask, train=True, rngs={"dropout": dropout_key})
    return _square_mean(out if method == "processor" else out[0])

  return (jax.jit(jax.value_and_grad(loss, argnums=(0, 1))),
          lambda t: (params, x(t), mask(t), jax.random.fold_in(key, t)))


def steps_problem(config, method, key):
  """(fn, make_args) for a per-step read-out method at the memory's width (M, H, D / H)."""
  mc = config.model
  dtype = jnp.dtype(mc.dtype)
  m, h, dk = mc.memory_tokens, mc.memory_heads, mc.d_model // mc.memory_heads

  def make_args(t):
    kq, kk, kv, kg = jax.random.split(jax.random.fold_in(key, t), 4)
    q = _normal(kq, (1, t, m, h, dk), dtype)
    k, v = _normal(kk, (1, t, h, dk), dtype), _normal(kv, (1, t, h, dk), dtype)
    if method == "steps-linear":
      g = jax.nn.log_sigmoid(jax.random.normal(kg, (1, t, h, dk))) / mc.gate_temperature
      return q, k, v, g.astype(dtype)
    return q, k, v

  if method == "steps-linear":
    def loss(q, k, v, g):
      return _square_mean(pallas.gated_linear_attention(q, k, v, g, implementation=mc.scan_impl))
  else:
    implementation = "cudnn" if method == "steps-flash" else "xla"

    def loss(q, k, v):
      # Query heads h * M + m share key/value head h (grouped-query attention), so query (t, m) of
      # head h attends to that head's frames <= t.
      t = q.shape[1]
      q = q.transpose(0, 1, 3, 2, 4).reshape(1, t, h * m, dk)
      return _square_mean(jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                       implementation=implementation))

  argnums = tuple(range(4 if method == "steps-linear" else 3))
  return jax.jit(jax.value_and_grad(loss, argnums=argnums)), make_args


def _device_stats():
  stats = jax.devices()[0].memory_stats()
  return stats or {}


def _is_oom(error):
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def compile_length(fn, make_args, t):
  """Compiles fn for length t from abstract arguments (nothing allocated); returns a row with the
  compile time and the compiled memory_analysis."""
  start = time.perf_counter()
  compiled = fn.lower(*jax.eval_shape(lambda: make_args(t))).compile()
  row = {"t": t, "status": "compiled", "compile_s": time.perf_counter() - start}
  analysis = compiled.memory_analysis()
  if analysis is not None:
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes")
    row["memory_analysis"] = {f: int(getattr(analysis, f)) for f in fields}
    row["compiled_bytes"] = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                             - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
  return row


def run_length(fn, make_args, t, repeats):
  """Compiles fn for length t (a persistent-cache hit after the compile phase), then times up to
  `repeats` calls after a warm-up; returns a row with the median and the device's running
  peak_bytes_in_use."""
  args = make_args(t)
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  load_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))
  times = []
  start = time.perf_counter()
  while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < TIME_BUDGET_S):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return {"t": t, "status": "ok", "load_s": load_s, "ms": statistics.median(times),
          "times_ms": times, "peak_bytes": _device_stats().get("peak_bytes_in_use")}


def _failure(t, error):
  return {"t": t, "status": "OOM" if _is_oom(error) else "error",
          "error": f"{type(error).__name__}: {error}"[:600]}


def worker(args):
  """One phase of one method in this process; writes {"rows", "device"} to args.rows_file.

  compile: every length compiled at once in threads (filling the persistent compilation cache);
  run: lengths in increasing order, each loaded from the cache and timed, so no compiler work
  (autotuning buffers) lands in the peak memory of a shorter length.
  """
  jax.config.update("jax_compilation_cache_dir", args.cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  if args.worker == "steps-flash" and jax.default_backend() != "gpu":
    rows = [{"t": t, "status": "skipped", "error": "cuDNN flash attention needs a GPU"}
            for t in args.lengths]
  else:
    # The model has no switch for a softmax memory (nor should it): swap the class it builds.
    swap = (mock.patch.object(clam_lib, "CrossLinearAttention", SoftmaxCrossAttention)
            if args.worker == "clam-softmax" else contextlib.nullcontext())
    with swap:
      rows = (compile_method if args.phase == "compile" else run_method_lengths)(args)
  device = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "jax": jax.__version__, "bytes_limit": _device_stats().get("bytes_limit")}
  Path(args.rows_file).write_text(json.dumps({"rows": rows, "device": device}))


def _problem(args):
  config = model_config(args.quick, args.scan_impl)
  make = model_problem if args.worker in MODEL_METHODS else steps_problem
  return make(config, args.worker, jax.random.key(time.time_ns() % 2 ** 31))


def compile_method(args):
  """Compile rows of args.worker, one per length, compiled concurrently."""
  fn, make_args = _problem(args)

  def compile_one(t):
    try:
      row = compile_length(fn, make_args, t)
    except Exception as e:  # reported in the table, the run goes on
      row = _failure(t, e)
    _log(args.worker, row)
    return row

  with concurrent.futures.ThreadPoolExecutor(COMPILE_THREADS) as pool:
    return list(pool.map(compile_one, sorted(args.lengths)))


def run_method_lengths(args):
  """Run rows of args.worker, shortest length first; after an OOM the longer ones are skipped."""
  fn, make_args = _problem(args)
  rows, failed = [], None
  for t in sorted(args.lengths):
    if failed is not None:
      row = {"t": t, "status": "skipped", "error": f"OOM at T={failed}"}
    else:
      try:
        row = run_length(fn, make_args, t, args.repeats)
      except Exception as e:  # reported in the table, the run goes on
        row = _failure(t, e)
        failed = t if row["status"] == "OOM" else None
    rows.append(row)
    _log(args.worker, row)
  return rows


def _log(method, row):
  shown = f"{row['ms']:.2f} ms" if "ms" in row else row["status"]
  seconds = row.get("compile_s", row.get("load_s"))
  print(f"[{method}] T={row['t']:6d} {shown}"
        + ("" if seconds is None else f"  {'compile' if 'compile_s' in row else 'load'} "
           f"{seconds:.1f} s")
        + f"  peak {_gb(row.get('peak_bytes'))}  compiled {_gb(row.get('compiled_bytes'))}"
        + (f"  {row['error'][:200]}" if "error" in row else ""), file=sys.stderr, flush=True)


def _worker_process(method, phase, args, cache_dir):
  """Runs `worker` in a fresh process; returns (rows, device info), error rows if it died."""
  rows_file = os.path.join(cache_dir, f"rows_{phase}.json")
  command = [sys.executable, os.path.abspath(__file__), "--worker", method, "--phase", phase,
             "--cache-dir", cache_dir, "--rows-file", rows_file, "--repeats", str(args.repeats),
             "--scan-impl", args.scan_impl, "--lengths", *map(str, args.lengths)]
  command += ["--quick"] * args.quick
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  result = subprocess.run(command, env=env, check=False)
  if result.returncode or not os.path.exists(rows_file):
    error = f"{phase} process exited with status {result.returncode}"
    return [{"t": t, "status": "error", "error": error} for t in args.lengths], {}
  out = json.loads(Path(rows_file).read_text())
  return out["rows"], out["device"]


def run_method(method, args):
  """Both phases of one method in fresh processes sharing a compilation cache; returns (rows with
  compile and run fields merged, device info)."""
  with tempfile.TemporaryDirectory() as cache_dir:
    compiled, device = _worker_process(method, "compile", args, cache_dir)
    if args.compile_only:
      return compiled, device
    ran, device = _worker_process(method, "run", args, cache_dir)
  by_length = {row["t"]: row for row in compiled}
  rows = []
  for row in ran:
    merged = dict(by_length.get(row["t"], {}))
    merged.pop("error", None)
    rows.append({**merged, **row})
  return rows, device


def _gb(n):
  return "-" if n is None else f"{n / 2 ** 30:.2f} GiB"


def memory_of(row):
  """The measured peak where the device reports one, else the compiled bytes."""
  return row.get("peak_bytes") or row.get("compiled_bytes")


def plot(results, path, device):
  """Log-log time and memory against T: model methods on top, per-step read-outs below."""
  groups = [[m for m in MODEL_METHODS if m in results], [m for m in METHODS[4:] if m in results]]
  groups = [g for g in groups if g]
  fig, axes = plt.subplots(len(groups), 2, figsize=(11, 4.2 * len(groups)), squeeze=False)
  for group, (ax_time, ax_mem) in zip(groups, axes):
    for method in group:
      rows = [r for r in results[method] if r.get("status") in ("ok", "compiled")]
      if not rows:  # nothing ran (skipped, or failed at every length): the table says why
        continue
      failed = [r for r in results[method] if r.get("status") == "OOM"]
      label = method + (f" (OOM at T={failed[0]['t']})" if failed else "")
      t = [r["t"] for r in rows]
      if any("ms" in r for r in rows):
        ax_time.plot(t, [r["ms"] for r in rows], "o-", label=label)
      ax_mem.plot(t, [memory_of(r) / 2 ** 30 for r in rows], "o-", label=label)
    ax_time.set_ylabel("forward + backward (ms, median)")
    ax_mem.set_ylabel("peak device memory (GiB)" if any(
        r.get("peak_bytes") for m in group for r in results[m]) else "compiled bytes (GiB)")
    for ax in (ax_time, ax_mem):
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("T (frames, batch 1)")
      ax.grid(True, which="both", alpha=0.3)
      if ax.get_legend_handles_labels()[0]:  # the time axis is empty with --compile-only
        ax.legend(fontsize=8)
  fig.suptitle(f"Length scaling on {device}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def print_table(results, slopes, device):
  measured = any(r.get("peak_bytes") for rows in results.values() for r in rows)
  print(f"\n== {device.get('device', '?')} (JAX {device.get('jax', '?')}): forward+backward "
        f"median ms / {'peak device' if measured else 'compiled'} GiB, batch 1")
  for group in (MODEL_METHODS, METHODS[4:]):
    group = [m for m in group if m in results]
    if not group:
      continue
    print("T".rjust(6) + "".join(m.rjust(24) for m in group))
    lengths = sorted({r["t"] for m in group for r in results[m]})
    for t in lengths:
      cells = []
      for m in group:
        row = next((r for r in results[m] if r["t"] == t), {})
        if row.get("status") in ("ok", "compiled"):
          ms = f"{row['ms']:.2f}" if "ms" in row else "-"
          mem = memory_of(row)
          cells.append(f"{ms} / {'-' if mem is None else f'{mem / 2 ** 30:.3f}'}")
        elif row.get("compiled_bytes"):  # e.g. OOM: what the executable asked for
          cells.append(f"{row['status']} ({row['compiled_bytes'] / 2 ** 30:.1f} compiled)")
        else:
          cells.append(row.get("status", "-"))
      print(f"{t:6d}" + "".join(c.rjust(24) for c in cells))
  print(f"log-log slope over the {SLOPE_POINTS} longest lengths that ran (time, memory):")
  for m, s in slopes.items():
    fmt = lambda x: "-" if x is None else f"{x:.2f}"
    print(f"  {m:14s} time {fmt(s['time'])}  memory {fmt(s['memory'])}")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--out", default="benchmarks/results/length_scaling.json",
                      help="JSON of all rows and slopes; the plot goes next to it (.png)")
  parser.add_argument("--quick", action="store_true",
                      help="tiny model, T in {256, 1024}: a CPU check of the script")
  parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
  parser.add_argument("--lengths", nargs="+", type=int,
                      help="frames per sequence (default 128 ... 65536; --quick: 256 1024)")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per length, at most")
  parser.add_argument("--scan-impl", default="auto", choices=pallas.gla.IMPLEMENTATIONS,
                      help="config.model.scan_impl (auto: chunked kernel on GPU, lax.scan on CPU)")
  parser.add_argument("--compile-only", action="store_true",
                      help="record compiled memory_analysis only, run nothing")
  parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
  parser.add_argument("--phase", choices=("compile", "run"), help=argparse.SUPPRESS)
  parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
  parser.add_argument("--rows-file", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.lengths is None:
    args.lengths = list(QUICK_LENGTHS if args.quick else LENGTHS)
  if args.worker:
    worker(args)
    return
  # The GPU is left to the worker processes: initialising it here would take its memory.
  print(f"== length scaling, methods {args.methods}, lengths {args.lengths}", flush=True)
  start = time.perf_counter()
  results, device = {}, {}
  for method in args.methods:
    results[method], method_device = run_method(method, args)
    device = device or method_device
    slopes = write_outputs(args, results, device, time.perf_counter() - start)
  print(f"\nwrote {args.out} and its .png ({time.perf_counter() - start:.0f} s)")
  print_table(results, slopes, device)


def write_outputs(args, results, device, wall_s):
  """Writes the JSON and the plot of the methods done so far; returns the slopes."""
  slopes = {}
  for method, rows in results.items():
    ran = [r for r in rows if r.get("status") in ("ok", "compiled")]
    slopes[method] = {
        "time": loglog_slope([r["t"] for r in ran], [r.get("ms") for r in ran]),
        "memory": loglog_slope([r["t"] for r in ran], [memory_of(r) for r in ran])}
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(
      **device, quick=args.quick, compile_only=args.compile_only, scan_impl=args.scan_impl,
      model=model_config(args.quick, args.scan_impl).model.to_dict(), wall_s=wall_s,
      slopes=slopes, results=results), indent=1))
  plot(results, out.with_suffix(".png"), device.get("device", "?"))
  return slopes


if __name__ == "__main__":
  main()
